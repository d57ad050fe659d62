//! One scenario: the same load against the mock directly (the baseline), then through the
//! gateway, back to back, with CPU and memory read around each measured phase.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde::Serialize;

use crate::cpu::{CpuDelta, Snapshot};
use crate::load::{self, LoadResult, Percentiles, Target};
use crate::procfs::{self, ClockTicks};
use crate::stack::{self, Stack};

#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub stream: bool,
    pub concurrency: usize,
    pub requests: usize,
    pub warmup: usize,
}

impl Spec {
    pub fn name(&self) -> &'static str {
        if self.stream {
            "stream"
        } else {
            "non-stream"
        }
    }
}

/// How one side (direct or gateway) did.
#[derive(Debug, Clone, Serialize)]
pub struct Side {
    pub ok: usize,
    pub errors: usize,
    pub first_error: Option<String>,
    pub elapsed_s: f64,
    pub throughput_rps: f64,
    pub latency: Percentiles,
    pub ttfb: Percentiles,
}

impl From<&LoadResult> for Side {
    fn from(r: &LoadResult) -> Side {
        Side {
            ok: r.ok,
            errors: r.errors,
            first_error: r.first_error.clone(),
            elapsed_s: r.elapsed.as_secs_f64(),
            throughput_rps: r.throughput(),
            latency: r.latency(),
            ttfb: r.ttfb(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    pub scenario: &'static str,
    pub stream: bool,
    pub concurrency: usize,
    pub requests: usize,
    pub direct: Side,
    pub gateway: Side,
    /// Gateway throughput ÷ direct throughput.
    pub throughput_ratio: f64,
    pub added_p50_ms: f64,
    pub added_p99_ms: f64,
    pub added_ttfb_p50_ms: f64,
    /// The mock's CPU per request when called directly.
    pub direct_mock_cpu_us_per_req: f64,
    /// Ingress + worker CPU per gateway request.
    pub gateway_cpu_us_per_req: f64,
    /// The gateway with NATS, journal, projectors, Postgres and Redis, per request: the
    /// machine-wide figure on a quiet machine, else the by-process one (`all_cpu_source`).
    pub all_cpu_us_per_req: f64,
    pub all_cpu_source: &'static str,
    /// Machine busy time − this benchmark − the mock − the idle background, per request.
    pub all_cpu_machine_us_per_req: f64,
    /// Summed over the processes known to take part (stack roles and the shared servers),
    /// less their idle background: insensitive to unrelated load on the machine, blind to
    /// kernel threads (softirq work, writeback).
    pub all_cpu_attributed_us_per_req: f64,
    /// Gateway phase, per request, per process (plus `machine`, `bench`, `idle`, `other`).
    pub gateway_breakdown_us_per_req: BTreeMap<String, f64>,
    /// Gateway (ingress + worker) CPU ÷ the mock's CPU per direct request.
    pub cpu_ratio_to_mock: f64,
    /// Time the journal and projectors needed after the load to catch up (None: timed out).
    pub drain_ms: Option<f64>,
    pub ingress_rss_mb: f64,
    pub worker_rss_mb: f64,
}

/// Everything a scenario run needs from the caller.
pub struct Context<'a> {
    pub stack: &'a mut Stack,
    pub http: &'a reqwest::Client,
    pub ticks: ClockTicks,
    /// CPU per wall second with the stack idle.
    pub idle: Idle,
    /// Whether the machine-wide figure can be trusted: the machine was quiet while the
    /// stack was idle. Otherwise "everything together" is the by-process sum.
    pub machine_quiet: bool,
    /// Record a `perf` profile of ingress and worker during each gateway phase, into this dir.
    pub perf_dir: Option<PathBuf>,
}

fn rss_mb(stack: &Stack, name: &str) -> f64 {
    stack
        .pid(name)
        .and_then(|p| procfs::rss_bytes(p).ok())
        .map_or(f64::NAN, |b| b as f64 / (1024.0 * 1024.0))
}

fn fail_on_errors(what: &str, r: &LoadResult) -> anyhow::Result<()> {
    if r.errors > 0 {
        eprintln!(
            "warning: {what}: {} of {} requests failed; first: {}",
            r.errors,
            r.errors + r.ok,
            r.first_error.as_deref().unwrap_or("?")
        );
    }
    if r.ok == 0 {
        anyhow::bail!(
            "{what}: every request failed; first error: {}",
            r.first_error.as_deref().unwrap_or("?")
        );
    }
    Ok(())
}

/// A `perf record` attached to ingress and worker, stopped with SIGINT.
struct Perf(tokio::process::Child);

impl Perf {
    async fn start(dir: &std::path::Path, name: &str, pids: &[u32]) -> anyhow::Result<Perf> {
        std::fs::create_dir_all(dir)?;
        let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
        let child = tokio::process::Command::new("perf")
            .args(["record", "-F", "1999", "-g", "-o"])
            .arg(dir.join(format!("{name}.perf.data")))
            .arg("-p")
            .arg(pids.join(","))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        // Give perf time to attach before the load starts.
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok(Perf(child))
    }

    async fn stop(mut self) {
        if let Some(pid) = self.0.id() {
            let _ = tokio::process::Command::new("kill")
                .arg("-INT")
                .arg(pid.to_string())
                .status()
                .await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), self.0.wait()).await;
    }
}

pub async fn run(ctx: &mut Context<'_>, spec: Spec) -> anyhow::Result<ScenarioResult> {
    let label = format!("{} c={}", spec.name(), spec.concurrency);
    let authorization = format!("Bearer {}", stack::KEY);
    let direct = Target {
        url: ctx.stack.direct_url(),
        authorization: authorization.clone(),
        stream: spec.stream,
    };
    let gateway = Target {
        url: ctx.stack.gateway_url(),
        authorization,
        stream: spec.stream,
    };

    // Baseline: the mock called directly.
    if spec.warmup > 0 {
        let w = load::run(ctx.http, &direct, spec.warmup, spec.concurrency).await;
        fail_on_errors(&format!("{label} direct warm-up"), &w)?;
    }
    let before = Snapshot::take(ctx.stack)?;
    let d = load::run(ctx.http, &direct, spec.requests, spec.concurrency).await;
    let after = Snapshot::take(ctx.stack)?;
    fail_on_errors(&format!("{label} direct"), &d)?;
    let direct_cpu = CpuDelta::between(&before, &after, ctx.ticks);

    // The same through the gateway.
    if spec.warmup > 0 {
        let w = load::run(ctx.http, &gateway, spec.warmup, spec.concurrency).await;
        fail_on_errors(&format!("{label} gateway warm-up"), &w)?;
        ctx.stack.drain(Duration::from_secs(30)).await?;
    }
    let perf = match &ctx.perf_dir {
        Some(dir) => {
            let pids: Vec<u32> = ["ingress", "worker"]
                .iter()
                .filter_map(|n| ctx.stack.pid(n))
                .collect();
            let name = format!("{}-c{}", spec.name(), spec.concurrency);
            Some(Perf::start(dir, &name, &pids).await?)
        }
        None => None,
    };
    let before = Snapshot::take(ctx.stack)?;
    let g = load::run(ctx.http, &gateway, spec.requests, spec.concurrency).await;
    let drained = ctx.stack.drain(Duration::from_secs(60)).await?;
    let after = Snapshot::take(ctx.stack)?;
    if let Some(perf) = perf {
        perf.stop().await;
    }
    ctx.stack.check_alive()?;
    fail_on_errors(&format!("{label} gateway"), &g)?;
    let gw_cpu = CpuDelta::between(&before, &after, ctx.ticks);

    let per = |us: f64, n: usize| if n > 0 { us / n as f64 } else { f64::NAN };
    let n_direct = d.ok + d.errors;
    let n_gw = g.ok + g.errors;

    let idle_us = ctx.idle.machine_us_per_s * gw_cpu.wall_s;
    let mock_us = gw_cpu.of("mock");
    let machine_us = (gw_cpu.machine_us - gw_cpu.bench_us - mock_us - idle_us).max(0.0);
    let attributed_us: f64 = (gw_cpu
        .by_process_us
        .iter()
        .filter(|(name, _)| name.as_str() != "mock")
        .map(|(_, us)| us)
        .sum::<f64>()
        - ctx.idle.by_process_total() * gw_cpu.wall_s)
        .max(0.0);
    let all_us = if ctx.machine_quiet {
        machine_us
    } else {
        attributed_us
    };
    let mut breakdown: BTreeMap<String, f64> = gw_cpu
        .by_process_us
        .iter()
        .map(|(k, v)| (k.clone(), per(*v, n_gw)))
        .collect();
    breakdown.insert("machine".to_owned(), per(gw_cpu.machine_us, n_gw));
    breakdown.insert("bench".to_owned(), per(gw_cpu.bench_us, n_gw));
    breakdown.insert("idle".to_owned(), per(idle_us, n_gw));
    breakdown.insert("other".to_owned(), per(machine_us - attributed_us, n_gw));

    let gateway_cpu = per(gw_cpu.of("ingress") + gw_cpu.of("worker"), n_gw);
    let direct_mock = per(direct_cpu.of("mock"), n_direct);
    let (ds, gs) = (Side::from(&d), Side::from(&g));
    Ok(ScenarioResult {
        scenario: spec.name(),
        stream: spec.stream,
        concurrency: spec.concurrency,
        requests: spec.requests,
        throughput_ratio: gs.throughput_rps / ds.throughput_rps,
        added_p50_ms: gs.latency.p50_ms - ds.latency.p50_ms,
        added_p99_ms: gs.latency.p99_ms - ds.latency.p99_ms,
        added_ttfb_p50_ms: gs.ttfb.p50_ms - ds.ttfb.p50_ms,
        direct_mock_cpu_us_per_req: direct_mock,
        gateway_cpu_us_per_req: gateway_cpu,
        all_cpu_us_per_req: per(all_us, n_gw),
        all_cpu_source: if ctx.machine_quiet {
            "machine"
        } else {
            "by-process"
        },
        all_cpu_machine_us_per_req: per(machine_us, n_gw),
        all_cpu_attributed_us_per_req: per(attributed_us, n_gw),
        gateway_breakdown_us_per_req: breakdown,
        cpu_ratio_to_mock: gateway_cpu / direct_mock,
        drain_ms: drained.map(|d| d.as_secs_f64() * 1000.0),
        ingress_rss_mb: rss_mb(ctx.stack, "ingress"),
        worker_rss_mb: rss_mb(ctx.stack, "worker"),
        direct: ds,
        gateway: gs,
    })
}

/// CPU per wall second with the stack up and idle (the projectors' polling, NATS heartbeats
/// — and, machine-wide, anything else running on the machine), subtracted from each phase.
#[derive(Debug, Clone, Serialize)]
pub struct Idle {
    /// Machine busy µs per second, less this benchmark's own.
    pub machine_us_per_s: f64,
    /// Per process of the stack and shared server, µs per second.
    pub by_process_us_per_s: BTreeMap<String, f64>,
}

impl Idle {
    pub fn by_process_total(&self) -> f64 {
        self.by_process_us_per_s
            .iter()
            .filter(|(k, _)| k.as_str() != "mock")
            .map(|(_, v)| v)
            .sum()
    }
}

pub async fn idle(stack: &Stack, ticks: ClockTicks, window: Duration) -> anyhow::Result<Idle> {
    let before = Snapshot::take(stack)?;
    tokio::time::sleep(window).await;
    let after = Snapshot::take(stack)?;
    let d = CpuDelta::between(&before, &after, ticks);
    Ok(Idle {
        machine_us_per_s: ((d.machine_us - d.bench_us) / d.wall_s).max(0.0),
        by_process_us_per_s: d
            .by_process_us
            .iter()
            .map(|(k, v)| (k.clone(), v / d.wall_s))
            .collect(),
    })
}
