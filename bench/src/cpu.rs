//! CPU snapshots of everything that runs during a phase: the machine as a whole, this
//! benchmark, the mock, each sluice role and the shared servers (NATS, Postgres, Redis).

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use crate::procfs::{self, ClockTicks, GroupTicks};
use crate::stack::Stack;

/// Command names of the shared servers the gateway talks to.
pub const SERVERS: [&str; 3] = ["nats-server", "postgres", "redis-server"];
/// Processes of the stack, by the name used in reports.
pub const OWN: [&str; 6] = [
    "ingress",
    "worker",
    "journal",
    "billing",
    "projector",
    "mock",
];

#[derive(Debug, Clone)]
pub struct Snapshot {
    at: Instant,
    machine: u64,
    bench: u64,
    own: HashMap<&'static str, u64>,
    servers: HashMap<&'static str, GroupTicks>,
}

impl Snapshot {
    pub fn take(stack: &Stack) -> anyhow::Result<Snapshot> {
        let found = procfs::pids_by_name(&SERVERS);
        let servers = SERVERS
            .iter()
            .map(|&name| {
                (
                    name,
                    GroupTicks::read(found.get(name).map(Vec::as_slice).unwrap_or(&[])),
                )
            })
            .collect();
        let own = OWN
            .iter()
            .filter_map(|&name| {
                stack
                    .pid(name)
                    .and_then(|p| procfs::process_ticks(p).ok())
                    .map(|t| (name, t))
            })
            .collect();
        Ok(Snapshot {
            at: Instant::now(),
            bench: procfs::self_ticks()?,
            machine: procfs::machine_busy_ticks()?,
            own,
            servers,
        })
    }
}

/// CPU spent between two snapshots, in microseconds.
#[derive(Debug, Clone)]
pub struct CpuDelta {
    pub wall_s: f64,
    pub machine_us: f64,
    pub bench_us: f64,
    /// Per process of the stack and per shared server (all its processes together).
    pub by_process_us: BTreeMap<String, f64>,
}

impl CpuDelta {
    pub fn between(before: &Snapshot, after: &Snapshot, ticks: ClockTicks) -> CpuDelta {
        let mut by_process_us = BTreeMap::new();
        for name in OWN {
            if let (Some(a), Some(b)) = (after.own.get(name), before.own.get(name)) {
                by_process_us.insert(name.to_owned(), ticks.micros(a.saturating_sub(*b)));
            }
        }
        for name in SERVERS {
            if let (Some(a), Some(b)) = (after.servers.get(name), before.servers.get(name)) {
                by_process_us.insert(name.to_owned(), ticks.micros(a.since(b)));
            }
        }
        CpuDelta {
            wall_s: after.at.duration_since(before.at).as_secs_f64(),
            machine_us: ticks.micros(after.machine.saturating_sub(before.machine)),
            bench_us: ticks.micros(after.bench.saturating_sub(before.bench)),
            by_process_us,
        }
    }

    pub fn of(&self, name: &str) -> f64 {
        self.by_process_us.get(name).copied().unwrap_or(0.0)
    }
}
