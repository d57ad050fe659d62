//! `--streams N`: N concurrent streams held open for `--hold-secs`, first straight at the
//! mock upstream (the baseline), then through the whole gateway, reporting errors (the
//! target is none), how many streams were open at once and for how long, per-stream
//! duration and time to first byte as ratios gateway ÷ direct, CPU per stream, and the
//! memory (VmRSS) of the ingress, the workers and the mock before, at the peak of, and
//! after each phase — DESIGN.md budgets the ingress at 64 MB with 1,000 open streams.
//!
//! Every stream asks the mock for one chunk per `chunk_delay_ms` (1 s by default) for
//! `hold + ramp` seconds: the N streams are opened evenly over `ramp` (so the listeners'
//! accept queues are not the thing measured), and all of them are open together for at
//! least `hold`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use serde::Serialize;

use crate::load::{percentiles, Percentiles};
use crate::procfs::{self, ClockTicks};
use crate::stack::{self, Stack};

/// What to hold.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct HoldSpec {
    pub streams: usize,
    pub hold_secs: u64,
    pub ramp_secs: u64,
    pub chunk_delay_ms: u64,
}

impl HoldSpec {
    /// Content chunks per stream: enough to last `hold + ramp`.
    pub fn chunks(&self) -> u64 {
        (self.hold_secs + self.ramp_secs) * 1000 / self.chunk_delay_ms.max(1) + 1
    }

    fn body(&self) -> String {
        format!(
            r#"{{"model":"{}","messages":[{{"role":"user","content":"Hold this stream open"}}],"stream":true,"mock":{{"chunks":{},"chunk_delay_ms":{}}}}}"#,
            stack::MODEL,
            self.chunks(),
            self.chunk_delay_ms
        )
    }
}

/// VmRSS of one process (or the sum over a role's processes), MB.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Rss {
    pub before_mb: f64,
    pub peak_mb: f64,
    /// A few seconds after the last stream ended.
    pub after_mb: f64,
}

/// One side of the run.
#[derive(Debug, Clone, Serialize)]
pub struct HoldSide {
    pub ok: usize,
    pub errors: usize,
    pub first_error: Option<String>,
    /// Most streams whose response had started and not yet ended, at any moment.
    pub max_open: usize,
    /// From the moment the last stream had its response head to the moment the first one
    /// ended: how long every stream was open at once (0 when they never all were).
    pub all_open_s: f64,
    pub duration: Percentiles,
    pub ttfb: Percentiles,
    /// CPU seconds of each process (roles summed) over the phase.
    pub cpu_s: BTreeMap<String, f64>,
    pub rss: BTreeMap<String, Rss>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HoldReport {
    pub date: String,
    pub command: String,
    pub sluice_bin: String,
    pub machine: crate::report::Machine,
    pub spec: HoldSpec,
    pub chunks_per_stream: u64,
    pub workers: usize,
    pub worker_args: Vec<String>,
    pub open_files_limit: Option<u64>,
    pub direct: HoldSide,
    pub gateway: HoldSide,
    /// Gateway ÷ direct.
    pub duration_p50_ratio: f64,
    pub duration_p99_ratio: f64,
    pub ttfb_p50_ratio: f64,
    pub ttfb_p99_ratio: f64,
    /// Peak − before, per stream, KB: the ingress's (gateway) and the mock's (direct).
    pub ingress_kb_per_stream: f64,
    pub mock_kb_per_stream: f64,
    /// Ingress + workers CPU per gateway stream ÷ the mock's CPU per direct stream.
    pub gateway_cpu_ms_per_stream: f64,
    pub mock_cpu_ms_per_stream: f64,
    /// Terminal events of the gateway phase in the Postgres log, after the journal caught up.
    pub completions_recorded: Option<i64>,
    pub drain_ms: Option<f64>,
}

/// A client for long streams: one connection per stream, no overall timeout shorter
/// than a stream.
pub fn client(spec: &HoldSpec) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .http1_only()
        .tcp_nodelay(true)
        .no_proxy()
        .pool_max_idle_per_host(spec.streams)
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(spec.hold_secs + spec.ramp_secs + 120))
        .build()?)
}

/// The soft limit of open files of this process (its children inherit it).
pub fn open_files_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

struct Timing {
    ttfb: Duration,
    total: Duration,
    head_at: Instant,
    end_at: Instant,
}

/// One stream: 200, then read to the end, which must be `data: [DONE]`.
async fn hold_one(
    client: &reqwest::Client,
    url: &str,
    body: String,
    open: &AtomicUsize,
    max_open: &AtomicUsize,
) -> Result<Timing, String> {
    let start = Instant::now();
    let mut resp = client
        .post(url)
        .header(AUTHORIZATION, format!("Bearer {}", stack::KEY))
        .header(CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| format!("sending: {e}"))?;
    let head_at = Instant::now();
    if resp.status() != reqwest::StatusCode::OK {
        let status = resp.status();
        let text: String = resp
            .text()
            .await
            .unwrap_or_default()
            .chars()
            .take(300)
            .collect();
        return Err(format!("status {status}: {text}"));
    }
    let now_open = open.fetch_add(1, Ordering::Relaxed) + 1;
    max_open.fetch_max(now_open, Ordering::Relaxed);
    let mut first = None;
    let mut tail: Vec<u8> = Vec::with_capacity(512);
    let read = async {
        while let Some(chunk) = resp.chunk().await.map_err(|e| format!("reading: {e}"))? {
            first.get_or_insert_with(|| start.elapsed());
            tail.extend_from_slice(&chunk);
            if tail.len() > 256 {
                tail.drain(..tail.len() - 256);
            }
        }
        Ok::<(), String>(())
    }
    .await;
    open.fetch_sub(1, Ordering::Relaxed);
    read?;
    let end_at = Instant::now();
    if !tail.windows(12).any(|w| w == b"data: [DONE]") {
        return Err(format!(
            "stream ended without `data: [DONE]`: {:?}",
            String::from_utf8_lossy(&tail)
        ));
    }
    Ok(Timing {
        ttfb: first.unwrap_or(end_at - start),
        total: end_at - start,
        head_at,
        end_at,
    })
}

/// Samples VmRSS of `groups` (name → pids, summed) every 250 ms until stopped; the peak.
fn sample_rss(
    groups: Vec<(String, Vec<u32>)>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<BTreeMap<String, u64>> {
    tokio::spawn(async move {
        let mut peak: BTreeMap<String, u64> = BTreeMap::new();
        loop {
            for (name, pids) in &groups {
                let sum: u64 = pids.iter().filter_map(|&p| procfs::rss_bytes(p).ok()).sum();
                let e = peak.entry(name.clone()).or_default();
                *e = (*e).max(sum);
            }
            if stop.load(Ordering::Relaxed) {
                return peak;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
}

fn rss_now(groups: &[(String, Vec<u32>)]) -> BTreeMap<String, u64> {
    groups
        .iter()
        .map(|(name, pids)| {
            let sum = pids.iter().filter_map(|&p| procfs::rss_bytes(p).ok()).sum();
            (name.clone(), sum)
        })
        .collect()
}

fn ticks_now(groups: &[(String, Vec<u32>)]) -> BTreeMap<String, u64> {
    groups
        .iter()
        .map(|(name, pids)| {
            let sum = pids
                .iter()
                .filter_map(|&p| procfs::process_ticks(p).ok())
                .sum();
            (name.clone(), sum)
        })
        .collect()
}

const MB: f64 = 1024.0 * 1024.0;

/// Opens `spec.streams` streams at `url` over the ramp, holds them to their end, and
/// measures `groups` (name → pids) around it.
pub async fn hold(
    client: &reqwest::Client,
    url: &str,
    spec: &HoldSpec,
    groups: Vec<(String, Vec<u32>)>,
    ticks: ClockTicks,
    settle: Duration,
) -> HoldSide {
    let before = rss_now(&groups);
    let cpu_before = ticks_now(&groups);
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_rss(groups.clone(), stop.clone());
    let open = Arc::new(AtomicUsize::new(0));
    let max_open = Arc::new(AtomicUsize::new(0));
    let body = spec.body();
    let started = Instant::now();
    let step = Duration::from_secs(spec.ramp_secs).as_secs_f64() / spec.streams.max(1) as f64;
    let tasks: Vec<_> = (0..spec.streams)
        .map(|i| {
            let (client, url, body) = (client.clone(), url.to_owned(), body.clone());
            let (open, max_open) = (open.clone(), max_open.clone());
            let at = started + Duration::from_secs_f64(step * i as f64);
            tokio::spawn(async move {
                tokio::time::sleep_until(at.into()).await;
                hold_one(&client, &url, body, &open, &max_open).await
            })
        })
        .collect();
    let mut timings = Vec::with_capacity(spec.streams);
    let mut errors = 0;
    let mut first_error = None;
    let mut last_report = Instant::now();
    for task in tasks {
        match task.await {
            Ok(Ok(t)) => timings.push(t),
            Ok(Err(e)) => {
                errors += 1;
                first_error.get_or_insert(e);
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("stream task panicked: {e}"));
            }
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "  {:.0} s: {} open, {} done, {} errors",
                started.elapsed().as_secs_f64(),
                open.load(Ordering::Relaxed),
                timings.len(),
                errors
            );
            last_report = Instant::now();
        }
    }
    let cpu_after = ticks_now(&groups);
    stop.store(true, Ordering::Relaxed);
    let peak = sampler.await.unwrap_or_default();
    // Let connections close and buffers go back before the "after" figure.
    tokio::time::sleep(settle).await;
    let after = rss_now(&groups);

    let all_open_s = match (
        timings.iter().map(|t| t.head_at).max(),
        timings.iter().map(|t| t.end_at).min(),
    ) {
        (Some(last_open), Some(first_end)) if errors == 0 && first_end > last_open => {
            (first_end - last_open).as_secs_f64()
        }
        _ => 0.0,
    };
    let us = |d: Duration| u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
    let mut total: Vec<u32> = timings.iter().map(|t| us(t.total)).collect();
    let mut ttfb: Vec<u32> = timings.iter().map(|t| us(t.ttfb)).collect();
    total.sort_unstable();
    ttfb.sort_unstable();
    let rss = groups
        .iter()
        .map(|(name, _)| {
            let get = |m: &BTreeMap<String, u64>| m.get(name).copied().unwrap_or(0) as f64 / MB;
            (
                name.clone(),
                Rss {
                    before_mb: get(&before),
                    peak_mb: get(&peak).max(get(&before)),
                    after_mb: get(&after),
                },
            )
        })
        .collect();
    let cpu_s = groups
        .iter()
        .map(|(name, _)| {
            let spent = cpu_after
                .get(name)
                .copied()
                .unwrap_or(0)
                .saturating_sub(cpu_before.get(name).copied().unwrap_or(0));
            (name.clone(), ticks.micros(spent) / 1e6)
        })
        .collect();
    HoldSide {
        ok: timings.len(),
        errors,
        first_error,
        max_open: max_open.load(Ordering::Relaxed),
        all_open_s,
        duration: percentiles(&total),
        ttfb: percentiles(&ttfb),
        cpu_s,
        rss,
    }
}

/// Both phases and the figures derived from them.
pub async fn run(
    stack: &mut Stack,
    spec: HoldSpec,
    ticks: ClockTicks,
    sluice_bin: &std::path::Path,
    workers: usize,
    worker_args: Vec<String>,
) -> anyhow::Result<HoldReport> {
    let client = client(&spec)?;
    let settle = Duration::from_secs(5);
    let mock = vec![("mock".to_owned(), stack.pids("mock"))];
    eprintln!(
        "direct: {} streams of {} chunks every {} ms, opened over {} s …",
        spec.streams,
        spec.chunks(),
        spec.chunk_delay_ms,
        spec.ramp_secs
    );
    let direct = hold(&client, &stack.direct_url(), &spec, mock, ticks, settle).await;
    eprintln!(
        "  direct: {} ok, {} errors, at most {} open",
        direct.ok, direct.errors, direct.max_open
    );
    stack.check_alive()?;
    let groups = vec![
        ("ingress".to_owned(), stack.pids("ingress")),
        ("worker".to_owned(), stack.pids("worker")),
        ("mock".to_owned(), stack.pids("mock")),
    ];
    let before_events = stack.recorded_terminal_events().await.ok();
    eprintln!("gateway: the same through ingress → worker → mock …");
    let gateway = hold(&client, &stack.gateway_url(), &spec, groups, ticks, settle).await;
    eprintln!(
        "  gateway: {} ok, {} errors, at most {} open",
        gateway.ok, gateway.errors, gateway.max_open
    );
    stack.check_alive()?;
    let drain = stack.drain(Duration::from_secs(120)).await?;
    let completions_recorded = match (stack.recorded_terminal_events().await.ok(), before_events) {
        (Some(after), Some(before)) => Some(after - before),
        _ => None,
    };
    let ratio = |g: f64, d: f64| if d > 0.0 { g / d } else { f64::NAN };
    let per_stream_kb = |side: &HoldSide, name: &str| {
        side.rss.get(name).map_or(f64::NAN, |r| {
            (r.peak_mb - r.before_mb) * 1024.0 / spec.streams.max(1) as f64
        })
    };
    let cpu = |side: &HoldSide, names: &[&str]| {
        names
            .iter()
            .map(|n| side.cpu_s.get(*n).copied().unwrap_or(0.0))
            .sum::<f64>()
            * 1000.0
            / side.ok.max(1) as f64
    };
    Ok(HoldReport {
        date: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        sluice_bin: sluice_bin.display().to_string(),
        machine: crate::report::Machine::detect(ticks.per_second, ticks.source),
        spec,
        chunks_per_stream: spec.chunks(),
        workers,
        worker_args,
        open_files_limit: open_files_limit(),
        duration_p50_ratio: ratio(gateway.duration.p50_ms, direct.duration.p50_ms),
        duration_p99_ratio: ratio(gateway.duration.p99_ms, direct.duration.p99_ms),
        ttfb_p50_ratio: ratio(gateway.ttfb.p50_ms, direct.ttfb.p50_ms),
        ttfb_p99_ratio: ratio(gateway.ttfb.p99_ms, direct.ttfb.p99_ms),
        ingress_kb_per_stream: per_stream_kb(&gateway, "ingress"),
        mock_kb_per_stream: per_stream_kb(&direct, "mock"),
        gateway_cpu_ms_per_stream: cpu(&gateway, &["ingress", "worker"]),
        mock_cpu_ms_per_stream: cpu(&direct, &["mock"]),
        completions_recorded,
        drain_ms: drain.map(|d| d.as_secs_f64() * 1000.0),
        direct,
        gateway,
    })
}

/// The report as markdown.
pub fn markdown(r: &HoldReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let s = &r.spec;
    let _ = writeln!(
        out,
        "{} concurrent streams, each {} chunks {} ms apart (opened over {} s, all open together for ≥ {} s); {} worker(s) `{}`; open files limit {}\n",
        s.streams,
        r.chunks_per_stream,
        s.chunk_delay_ms,
        s.ramp_secs,
        s.hold_secs,
        r.workers,
        r.worker_args.join(" "),
        r.open_files_limit.map_or("?".to_owned(), |n| n.to_string())
    );
    let _ = writeln!(out, "| side | ok | errors | max open | all open together s | duration p50 s | p99 s | max s | TTFB p50 ms | TTFB p99 ms |");
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
    for (name, side) in [("direct", &r.direct), ("gateway", &r.gateway)] {
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {} | {:.1} | {:.2} | {:.2} | {:.2} | {:.1} | {:.1} |",
            side.ok,
            side.errors,
            side.max_open,
            side.all_open_s,
            side.duration.p50_ms / 1000.0,
            side.duration.p99_ms / 1000.0,
            side.duration.max_ms / 1000.0,
            side.ttfb.p50_ms,
            side.ttfb.p99_ms
        );
    }
    let _ = writeln!(
        out,
        "\nratios gateway ÷ direct: duration p50 {:.4}, p99 {:.4}; TTFB p50 {:.1}, p99 {:.1}\n",
        r.duration_p50_ratio, r.duration_p99_ratio, r.ttfb_p50_ratio, r.ttfb_p99_ratio
    );
    let _ = writeln!(
        out,
        "| phase | process | RSS before MB | peak MB | after MB | CPU s |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for (phase, side) in [("direct", &r.direct), ("gateway", &r.gateway)] {
        for (name, rss) in &side.rss {
            let _ = writeln!(
                out,
                "| {phase} | {name} | {:.1} | {:.1} | {:.1} | {:.2} |",
                rss.before_mb,
                rss.peak_mb,
                rss.after_mb,
                side.cpu_s.get(name).copied().unwrap_or(f64::NAN)
            );
        }
    }
    let ingress_peak = r.gateway.rss.get("ingress").map_or(f64::NAN, |x| x.peak_mb);
    let _ = writeln!(
        out,
        "\ningress: {:.1} KB per open stream (peak − before); the mock {:.1} KB per direct stream. \
         CPU: ingress + worker {:.2} ms per stream, the mock {:.2} ms per direct stream.",
        r.ingress_kb_per_stream, r.mock_kb_per_stream, r.gateway_cpu_ms_per_stream, r.mock_cpu_ms_per_stream
    );
    let _ = writeln!(
        out,
        "terminal events journaled for the gateway phase: {}; pipeline drained {}.",
        r.completions_recorded
            .map_or("?".to_owned(), |n| n.to_string()),
        r.drain_ms
            .map_or("not within 120 s".to_owned(), |ms| format!(
                "{ms:.0} ms after the last stream"
            ))
    );
    let verdict = if ingress_peak <= 64.0 {
        "within"
    } else {
        "OVER"
    };
    let _ = writeln!(
        out,
        "Budget (DESIGN.md): ingress RSS ≤ 64 MB with 1,000 open streams: peak {ingress_peak:.1} MB at {} streams — {verdict} budget. Errors: {} (target 0).",
        r.gateway.max_open,
        r.gateway.errors + r.direct.errors
    );
    out
}
