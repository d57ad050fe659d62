//! `sluice-bench`: the gateway measured against its own baseline in one run.
//!
//! For each scenario ({non-stream, 20-chunk stream} × {1, 32 concurrent clients}) it sends
//! the same chat completions to the mock upstream directly, then through the whole gateway
//! (ingress → JetStream → worker → mock, with journal, projectors, Postgres and Redis
//! running), and reports throughput and latency as ratios and differences, plus the CPU
//! time and memory the gateway spent per request. Every process is the release `sluice`
//! binary started as an operator would; see README.md.

// The benchmark's output on stdout is its report.
#![allow(clippy::print_stdout)]

mod cpu;
mod load;
mod procfs;
mod report;
mod scenario;
mod stack;
mod streams;

use anyhow::{bail, Context as _};
use clap::{Parser, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::procfs::ClockTicks;
use crate::report::{Machine, Report};
use crate::scenario::Spec;
use crate::stack::{Stack, StackConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Kind {
    NonStream,
    Stream,
}

#[derive(Parser, Debug)]
#[command(
    name = "sluice-bench",
    about = "Gateway vs. calling the mock upstream directly, as ratios"
)]
struct Args {
    /// Concurrent clients; one scenario per value.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 32])]
    concurrency: Vec<usize>,
    /// Requests per measured phase [default: 2000 at concurrency 1, 10000 above; --quick: 200 / 1000].
    #[arg(long)]
    requests: Option<usize>,
    /// Warm-up requests per side before each measured phase [default: 100; --quick: 20].
    #[arg(long)]
    warmup: Option<usize>,
    /// A ~10-second smoke run with few requests (figures are rough).
    #[arg(long)]
    quick: bool,
    /// Scenarios to run.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Kind::NonStream, Kind::Stream])]
    scenario: Vec<Kind>,
    /// The sluice binary [default: next to this one, else target/release/sluice].
    #[arg(long, env = "SLUICE_BIN")]
    sluice_bin: Option<PathBuf>,
    #[arg(
        long,
        env = "SLUICE_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    #[arg(long, env = "SLUICE_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    #[arg(
        long,
        env = "SLUICE_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    redis_url: String,
    /// Content chunks per mock answer (DESIGN.md's stream budget is for 20).
    #[arg(long, default_value_t = 20)]
    chunks: u32,
    /// Mock delay between chunks, ms.
    #[arg(long, default_value_t = 0)]
    chunk_delay_ms: u64,
    /// Mock delay before the first chunk, ms.
    #[arg(long, default_value_t = 0)]
    ttft_ms: u64,
    /// Where to write the JSON results [default: bench/last-run.json].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Keep the namespace (schema, streams) and the process logs afterwards.
    #[arg(long)]
    keep: bool,
    /// Record `perf record -g` of ingress and worker during each gateway phase into DIR
    /// (perf's own overhead then inflates the CPU figures).
    #[arg(long, value_name = "DIR")]
    perf: Option<PathBuf>,
    /// Only drop a namespace an earlier `--keep` run left (its schema and streams), then exit.
    #[arg(long, value_name = "NAMESPACE")]
    drop_namespace: Option<String>,
    /// Instead of the scenarios: hold N concurrent streams open (straight at the mock, then
    /// through the gateway) and report errors, durations and ingress memory; see
    /// `bench/streams.sh`. The mock sends one chunk per `--chunk-delay-ms` (1000 if unset).
    #[arg(long, value_name = "N")]
    streams: Option<usize>,
    /// With `--streams`: how long all streams stay open together, seconds.
    #[arg(long, default_value_t = 60)]
    hold_secs: u64,
    /// With `--streams`: the streams are opened evenly over this many seconds.
    #[arg(long, default_value_t = 5)]
    ramp_secs: u64,
    /// Worker processes in the gateway.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// `--max-in-flight` of each worker [default: the worker's own (256); with `--streams`,
    /// enough for every stream at once].
    #[arg(long)]
    max_in_flight: Option<usize>,
}

/// Machine busy time with the stack idle above which the machine counts as busy with other
/// work (5% of one CPU), and machine-wide CPU figures are not used.
const QUIET_US_PER_S: f64 = 50_000.0;

fn sluice_bin(args: &Args) -> anyhow::Result<PathBuf> {
    let candidates: Vec<PathBuf> = match &args.sluice_bin {
        Some(p) => vec![p.clone()],
        None => {
            let mut c = Vec::new();
            if let Some(dir) = std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(PathBuf::from))
            {
                c.push(dir.join("sluice"));
            }
            c.push(PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../target/release/sluice"
            )));
            c
        }
    };
    let Some(found) = candidates.iter().find(|p| p.is_file()) else {
        bail!(
            "no sluice binary at {}; build it with `cargo build --release -p sluice` or set SLUICE_BIN",
            candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" or ")
        );
    };
    let found = found.canonicalize().unwrap_or_else(|_| found.clone());
    if found.components().any(|c| c.as_os_str() == "debug") {
        eprintln!(
            "warning: {} looks like a debug build; figures will not mean much",
            found.display()
        );
    }
    Ok(found)
}

fn specs(args: &Args) -> Vec<Spec> {
    let warmup = args.warmup.unwrap_or(if args.quick { 20 } else { 100 });
    let mut out = Vec::new();
    for kind in [Kind::NonStream, Kind::Stream] {
        if !args.scenario.contains(&kind) {
            continue;
        }
        for &concurrency in &args.concurrency {
            let concurrency = concurrency.max(1);
            let default = match (args.quick, concurrency) {
                (false, 1) => 2000,
                (false, _) => 10_000,
                (true, 1) => 200,
                (true, _) => 1000,
            };
            out.push(Spec {
                stream: kind == Kind::Stream,
                concurrency,
                requests: args.requests.unwrap_or(default).max(1),
                warmup,
            });
        }
    }
    out
}

async fn measure(
    args: &Args,
    stack: &mut Stack,
    http: &reqwest::Client,
    ticks: ClockTicks,
    sluice: &std::path::Path,
) -> anyhow::Result<Report> {
    eprintln!(
        "starting the mock upstream and the gateway (namespace {}) …",
        stack.ns
    );
    stack.start_mock().await?;
    stack.start_gateway(http).await?;
    // Let start-up work (projector catch-up, consumer creation) settle, then measure what
    // the idle stack and the rest of the machine cost per second.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let window = Duration::from_secs(if args.quick { 1 } else { 3 });
    let idle = scenario::idle(stack, ticks, window).await?;
    let machine_quiet = idle.machine_us_per_s <= QUIET_US_PER_S;
    eprintln!(
        "idle: machine busy {:.1} ms/s, the stack's processes {:.1} ms/s (subtracted from everything-together)",
        idle.machine_us_per_s / 1000.0,
        idle.by_process_total() / 1000.0
    );
    if !machine_quiet {
        eprintln!(
            "warning: the machine is busy while the stack is idle ({:.0}% of one CPU): something else is running; \
             everything-together CPU is taken from the stack's processes instead of the machine-wide time",
            idle.machine_us_per_s / 10_000.0
        );
    }
    let mut ctx = scenario::Context {
        stack,
        http,
        ticks,
        idle: idle.clone(),
        machine_quiet,
        perf_dir: args.perf.clone(),
    };
    let mut results = Vec::new();
    for spec in specs(args) {
        eprintln!(
            "{} c={}: {} requests per side ({} warm-up) …",
            spec.name(),
            spec.concurrency,
            spec.requests,
            spec.warmup
        );
        let r = scenario::run(&mut ctx, spec).await?;
        eprintln!(
            "  direct {:.0} req/s, gateway {:.0} req/s; p50 {:.2} → {:.2} ms; ingress+worker {:.0} µs/req",
            r.direct.throughput_rps,
            r.gateway.throughput_rps,
            r.direct.latency.p50_ms,
            r.gateway.latency.p50_ms,
            r.gateway_cpu_us_per_req
        );
        results.push(r);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let budget = report::checks(&results, args.chunks);
    Ok(Report {
        date: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        sluice_bin: sluice.display().to_string(),
        machine: Machine::detect(ticks.per_second, ticks.source),
        chunks: args.chunks,
        chunk_delay_ms: args.chunk_delay_ms,
        ttft_ms: args.ttft_ms,
        warmup: args.warmup.unwrap_or(if args.quick { 20 } else { 100 }),
        idle,
        machine_quiet,
        scenarios: results,
        budget,
    })
}

async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(ns) = &args.drop_namespace {
        stack::drop_namespace(&args.database_url, &args.nats_url, ns).await?;
        eprintln!("dropped namespace {ns}");
        return Ok(());
    }
    let sluice = sluice_bin(&args)?;
    let ticks = ClockTicks::detect();
    if ticks.source != "getconf CLK_TCK" {
        eprintln!(
            "warning: clock ticks per second {}: {}",
            ticks.source, ticks.per_second
        );
    }
    let workers = args.workers.max(1);
    let max_in_flight = args.max_in_flight.or_else(|| {
        args.streams
            .map(|n| n.div_ceil(workers).saturating_add(16).max(256))
    });
    let worker_args: Vec<String> = max_in_flight
        .map(|n| vec!["--max-in-flight".to_owned(), n.to_string()])
        .unwrap_or_default();
    let max_concurrency = args.concurrency.iter().copied().max().unwrap_or(1);
    let http = load::client(max_concurrency)?;
    let mut stack = Stack::new(StackConfig {
        sluice_bin: sluice.clone(),
        database_url: args.database_url.clone(),
        nats_url: args.nats_url.clone(),
        redis_url: args.redis_url.clone(),
        chunks: args.chunks,
        chunk_delay_ms: args.chunk_delay_ms,
        ttft_ms: args.ttft_ms,
        workers,
        worker_args: worker_args.clone(),
    })?;

    if let Some(n) = args.streams {
        let spec = streams::HoldSpec {
            streams: n.max(1),
            hold_secs: args.hold_secs,
            ramp_secs: args.ramp_secs,
            chunk_delay_ms: if args.chunk_delay_ms == 0 {
                1000
            } else {
                args.chunk_delay_ms
            },
        };
        return run_streams(&args, &mut stack, &http, spec, ticks, &sluice, worker_args).await;
    }

    let outcome = tokio::select! {
        r = measure(&args, &mut stack, &http, ticks, &sluice) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    let written = match &outcome {
        Ok(report) => {
            print!("{}", report::markdown(report));
            let path = args.out.clone().unwrap_or_else(|| {
                PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/last-run.json"))
            });
            let json = serde_json::to_string_pretty(report).context("encoding the JSON report")?;
            std::fs::write(&path, json + "\n")
                .with_context(|| format!("writing {}", path.display()))
                .map(|()| path)
        }
        Err(_) => Ok(PathBuf::new()),
    };
    let keep_logs = args.keep || outcome.is_err();
    if keep_logs {
        eprintln!("process logs kept in {}", stack.dir.display());
    }
    let cleaned = stack.shutdown(args.keep, keep_logs).await;
    outcome?;
    let path = written?;
    eprintln!("wrote {}", path.display());
    cleaned
}

/// `--streams N`: the hold run (see `streams`), its report on stdout and in the JSON.
async fn run_streams(
    args: &Args,
    stack: &mut Stack,
    http: &reqwest::Client,
    spec: streams::HoldSpec,
    ticks: ClockTicks,
    sluice: &std::path::Path,
    worker_args: Vec<String>,
) -> anyhow::Result<()> {
    let workers = args.workers.max(1);
    let outcome = tokio::select! {
        r = async {
            eprintln!("starting the mock upstream and the gateway (namespace {}) …", stack.ns);
            stack.start_mock().await?;
            stack.start_gateway(http).await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
            streams::run(stack, spec, ticks, sluice, workers, worker_args).await
        } => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    let written = match &outcome {
        Ok(report) => {
            print!("{}", streams::markdown(report));
            let path = args.out.clone().unwrap_or_else(|| {
                PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/last-streams.json"))
            });
            let json = serde_json::to_string_pretty(report).context("encoding the JSON report")?;
            std::fs::write(&path, json + "\n")
                .with_context(|| format!("writing {}", path.display()))
                .map(|()| Some(path))
        }
        Err(_) => Ok(None),
    };
    let failed = outcome
        .as_ref()
        .map_or(true, |r| r.direct.errors + r.gateway.errors > 0);
    let keep_logs = args.keep || failed;
    if keep_logs {
        eprintln!("process logs kept in {}", stack.dir.display());
    }
    let cleaned = stack.shutdown(args.keep, keep_logs).await;
    let report = outcome?;
    if let Some(path) = written? {
        eprintln!("wrote {}", path.display());
    }
    cleaned?;
    if failed {
        bail!(
            "{} streams failed (direct {}, gateway {}); first gateway error: {}",
            report.direct.errors + report.gateway.errors,
            report.direct.errors,
            report.gateway.errors,
            report
                .gateway
                .first_error
                .as_deref()
                .or(report.direct.first_error.as_deref())
                .unwrap_or("-")
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
