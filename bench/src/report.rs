//! The report: markdown tables for people, JSON for machines, and the verdict against
//! DESIGN.md's performance budget.

use std::fmt::Write as _;

use serde::Serialize;

use crate::scenario::ScenarioResult;

/// DESIGN.md "Performance budget", per request.
pub const BUDGET_GATEWAY_NON_STREAM_US: f64 = 250.0;
pub const BUDGET_GATEWAY_STREAM_US: f64 = 600.0;
pub const BUDGET_ALL_NON_STREAM_US: f64 = 1000.0;
pub const BUDGET_ALL_STREAM_US: f64 = 1500.0;
pub const BUDGET_ADDED_LATENCY_MS: f64 = 1.0;

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub clk_tck: u64,
    pub clk_tck_source: &'static str,
}

impl Machine {
    pub fn detect(clk_tck: u64, clk_tck_source: &'static str) -> Machine {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".to_owned());
        Machine {
            cpus: std::thread::available_parallelism().map_or(0, usize::from),
            cpu_model,
            kernel,
            clk_tck,
            clk_tck_source,
        }
    }
}

/// One line of the budget verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub scenario: String,
    pub what: String,
    pub measured: f64,
    pub budget: f64,
    pub unit: &'static str,
    pub ok: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub date: String,
    pub command: String,
    pub sluice_bin: String,
    pub machine: Machine,
    pub chunks: u32,
    pub chunk_delay_ms: u64,
    pub ttft_ms: u64,
    pub warmup: usize,
    /// CPU per second with the stack idle, subtracted from "everything together".
    pub idle: crate::scenario::Idle,
    /// The machine was quiet (nothing else running), so machine-wide figures are used.
    pub machine_quiet: bool,
    pub scenarios: Vec<ScenarioResult>,
    pub budget: Vec<Check>,
}

pub fn checks(results: &[ScenarioResult], chunks: u32) -> Vec<Check> {
    let mut out = Vec::new();
    for r in results {
        let scenario = format!("{} c={}", r.scenario, r.concurrency);
        let (gw, all) = if r.stream {
            (BUDGET_GATEWAY_STREAM_US, BUDGET_ALL_STREAM_US)
        } else {
            (BUDGET_GATEWAY_NON_STREAM_US, BUDGET_ALL_NON_STREAM_US)
        };
        // The stream budget is for 20-chunk streams; other lengths are reported unchecked.
        if !r.stream || chunks == 20 {
            out.push(Check {
                scenario: scenario.clone(),
                what: "gateway CPU (ingress+worker)".to_owned(),
                measured: r.gateway_cpu_us_per_req,
                budget: gw,
                unit: "µs/req",
                ok: r.gateway_cpu_us_per_req <= gw,
            });
            out.push(Check {
                scenario: scenario.clone(),
                what: "everything-together CPU".to_owned(),
                measured: r.all_cpu_us_per_req,
                budget: all,
                unit: "µs/req",
                ok: r.all_cpu_us_per_req <= all,
            });
        }
        if r.concurrency == 1 {
            out.push(Check {
                scenario,
                what: "added p50 latency at one client".to_owned(),
                measured: r.added_p50_ms,
                budget: BUDGET_ADDED_LATENCY_MS,
                unit: "ms",
                ok: r.added_p50_ms <= BUDGET_ADDED_LATENCY_MS,
            });
        }
    }
    out
}

fn f0(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.0}")
    } else {
        "–".to_owned()
    }
}

fn f2(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.2}")
    } else {
        "–".to_owned()
    }
}

fn signed2(v: f64) -> String {
    if v.is_finite() {
        format!("{v:+.2}")
    } else {
        "–".to_owned()
    }
}

/// The whole report as markdown.
pub fn markdown(report: &Report) -> String {
    let mut s = String::new();
    let m = &report.machine;
    let _ = writeln!(
        s,
        "Measured {} on {} CPUs ({}), Linux {}; mock: {} chunks, {} ms between chunks, {} ms to first token; \
         {} warm-up requests per side.",
        report.date, m.cpus, m.cpu_model, m.kernel, report.chunks, report.chunk_delay_ms, report.ttft_ms, report.warmup
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "| scenario | conc. | requests | req/s direct | req/s gateway | ratio | p50 ms direct | p50 ms gateway | p50 added | \
         p99 ms direct | p99 ms gateway | p99 added | TTFB p50 direct | TTFB p50 gateway | gateway CPU µs/req (ingress+worker) | \
         all-together CPU µs/req | ingress RSS MB | worker RSS MB |"
    );
    let _ = writeln!(s, "|{}", "---|".repeat(18));
    for r in &report.scenarios {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.scenario,
            r.concurrency,
            r.requests,
            f0(r.direct.throughput_rps),
            f0(r.gateway.throughput_rps),
            f2(r.throughput_ratio),
            f2(r.direct.latency.p50_ms),
            f2(r.gateway.latency.p50_ms),
            signed2(r.added_p50_ms),
            f2(r.direct.latency.p99_ms),
            f2(r.gateway.latency.p99_ms),
            signed2(r.added_p99_ms),
            f2(r.direct.ttfb.p50_ms),
            f2(r.gateway.ttfb.p50_ms),
            f0(r.gateway_cpu_us_per_req),
            f0(r.all_cpu_us_per_req),
            f2(r.ingress_rss_mb),
            f2(r.worker_rss_mb),
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "All-together CPU = {}. Idle background subtracted: machine {:.1} ms/s, the stack's processes {:.1} ms/s.",
        if report.machine_quiet {
            "machine-wide busy time (/proc/stat) − this benchmark − the mock − the idle background"
        } else {
            "the sum over the stack's processes and the NATS/Postgres/Redis servers (the machine was busy with \
             other work, so the machine-wide figure is not used)"
        },
        report.idle.machine_us_per_s / 1000.0,
        report.idle.by_process_total() / 1000.0
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "CPU per request, µs (gateway phase unless marked direct):"
    );
    let _ = writeln!(s);
    let cols = [
        "ingress",
        "worker",
        "journal",
        "billing",
        "projector",
        "nats-server",
        "postgres",
        "redis-server",
        "other",
    ];
    let _ = writeln!(
        s,
        "| scenario | conc. | mock (direct) | {} | mock (gateway) | all (by process) | all (machine) | gateway ÷ mock |",
        cols.join(" | ")
    );
    let _ = writeln!(s, "|{}", "---|".repeat(cols.len() + 7));
    for r in &report.scenarios {
        let b = &r.gateway_breakdown_us_per_req;
        // Machine-wide figures (and "other", derived from them) mean nothing when the
        // machine was busy with other work: shown as "–" then.
        let quiet = report.machine_quiet;
        let get = |k: &str| match k {
            "other" if !quiet => f64::NAN,
            _ => b.get(k).copied().unwrap_or(f64::NAN),
        };
        let middle: Vec<String> = cols.iter().map(|c| f0(get(c))).collect();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {}× |",
            r.scenario,
            r.concurrency,
            f0(r.direct_mock_cpu_us_per_req),
            middle.join(" | "),
            f0(get("mock")),
            f0(r.all_cpu_attributed_us_per_req),
            f0(if quiet {
                r.all_cpu_machine_us_per_req
            } else {
                f64::NAN
            }),
            f2(r.cpu_ratio_to_mock),
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "Budget (DESIGN.md): ingress+worker ≤ {BUDGET_GATEWAY_NON_STREAM_US:.0} µs per non-streaming request and \
         ≤ {BUDGET_GATEWAY_STREAM_US:.0} µs per 20-chunk stream; everything together ≤ {BUDGET_ALL_NON_STREAM_US:.0} µs / \
         ≤ {BUDGET_ALL_STREAM_US:.0} µs; added latency at one client ≤ {BUDGET_ADDED_LATENCY_MS:.0} ms."
    );
    let _ = writeln!(s);
    for c in &report.budget {
        let verdict = if c.ok {
            "within budget".to_owned()
        } else {
            let over = c.measured - c.budget;
            format!(
                "MISSED by {} {} ({:.0}% over)",
                if c.unit == "ms" { f2(over) } else { f0(over) },
                c.unit,
                over / c.budget * 100.0
            )
        };
        let measured = if c.unit == "ms" {
            f2(c.measured)
        } else {
            f0(c.measured)
        };
        let budget = if c.unit == "ms" {
            f2(c.budget)
        } else {
            f0(c.budget)
        };
        let _ = writeln!(
            s,
            "- {}: {} {measured} {} (budget {budget}): {verdict}",
            c.scenario, c.what, c.unit
        );
    }
    s
}
