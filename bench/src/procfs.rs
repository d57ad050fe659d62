//! CPU time and memory of processes, read from Linux's `/proc`.
//!
//! CPU time comes in clock ticks (`utime + stime` of `/proc/<pid>/stat`, the busy columns of
//! `/proc/stat`). The tick rate is `sysconf(_SC_CLK_TCK)`; the workspace forbids `unsafe` and
//! has no `libc` dependency, so it is asked of `getconf CLK_TCK` and assumed to be 100 (its
//! value on every Linux build in practice) when that fails.

use anyhow::{bail, Context as _};
use std::collections::HashMap;
use std::process::Command;

/// Clock ticks per second and where the figure came from.
#[derive(Debug, Clone, Copy)]
pub struct ClockTicks {
    pub per_second: u64,
    pub source: &'static str,
}

impl ClockTicks {
    pub fn detect() -> ClockTicks {
        let asked = Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .filter(|&t| t > 0);
        match asked {
            Some(per_second) => ClockTicks {
                per_second,
                source: "getconf CLK_TCK",
            },
            None => ClockTicks {
                per_second: 100,
                source: "assumed (getconf CLK_TCK failed)",
            },
        }
    }

    /// Ticks to microseconds.
    pub fn micros(&self, ticks: u64) -> f64 {
        ticks as f64 * 1_000_000.0 / self.per_second as f64
    }
}

/// `utime + stime` of a process (all its threads, living and exited), in clock ticks.
pub fn process_ticks(pid: u32) -> anyhow::Result<u64> {
    stat_ticks(&format!("/proc/{pid}/stat"))
}

/// `utime + stime` of this benchmark process.
pub fn self_ticks() -> anyhow::Result<u64> {
    stat_ticks("/proc/self/stat")
}

fn stat_ticks(path: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    parse_stat_ticks(&text).with_context(|| format!("parsing {path}"))
}

/// Fields 14 and 15 of `/proc/<pid>/stat`. The command name (field 2) is in parentheses and
/// may hold spaces or parentheses itself, so fields are counted from the last `)`.
fn parse_stat_ticks(text: &str) -> anyhow::Result<u64> {
    let Some(close) = text.rfind(')') else {
        bail!("no `)` in stat line")
    };
    // After `)`: field 3 (state) is index 0, so utime (14) is index 11 and stime (15) index 12.
    let fields: Vec<&str> = text[close + 1..].split_whitespace().collect();
    let field = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .context("stat line too short")?
            .parse::<u64>()
            .context("stat field is not a number")
    };
    Ok(field(11)? + field(12)?)
}

/// Machine-wide busy time of all CPUs, in clock ticks: `user + nice + system + irq +
/// softirq` of the `cpu` line of `/proc/stat`. Not `idle` and `iowait`, and not `steal` (time
/// a virtual CPU wanted to run but the hypervisor ran someone else: no work of ours); guest
/// time is already inside `user`.
pub fn machine_busy_ticks() -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    parse_machine_busy(&text).context("parsing /proc/stat")
}

fn parse_machine_busy(text: &str) -> anyhow::Result<u64> {
    let line = text
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no `cpu` line")?;
    let cols: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|c| c.parse::<u64>().context("not a number"))
        .collect::<anyhow::Result<_>>()?;
    if cols.len() < 8 {
        bail!("`cpu` line has {} columns, expected at least 8", cols.len());
    }
    // user nice system idle iowait irq softirq steal [guest guest_nice]
    Ok(cols[0] + cols[1] + cols[2] + cols[5] + cols[6])
}

/// Resident set size (`VmRSS` of `/proc/<pid>/status`) in bytes.
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_vmrss(&text).with_context(|| format!("no VmRSS in {path}"))
}

fn parse_vmrss(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The process ids of every running process whose command name (`/proc/<pid>/comm`) is one
/// of `names`, grouped by name. Used for the shared servers (NATS, Postgres, Redis), whose
/// Postgres backends come and go with connections.
pub fn pids_by_name(names: &[&str]) -> HashMap<String, Vec<u32>> {
    let mut found: HashMap<String, Vec<u32>> = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) else {
            continue;
        };
        let comm = comm.trim();
        if names.contains(&comm) {
            found.entry(comm.to_owned()).or_default().push(pid);
        }
    }
    found
}

/// CPU ticks of a group of processes at one moment, per pid, so that a later snapshot can
/// count the processes that appeared in between (a new Postgres backend) from zero.
#[derive(Debug, Clone, Default)]
pub struct GroupTicks(HashMap<u32, u64>);

impl GroupTicks {
    pub fn read(pids: &[u32]) -> GroupTicks {
        GroupTicks(
            pids.iter()
                .filter_map(|&p| process_ticks(p).ok().map(|t| (p, t)))
                .collect(),
        )
    }

    /// Ticks spent since `before` by the processes alive now. Processes that exited in
    /// between are lost (their time is still in the machine-wide figure).
    pub fn since(&self, before: &GroupTicks) -> u64 {
        self.0
            .iter()
            .map(|(pid, &now)| now.saturating_sub(before.0.get(pid).copied().unwrap_or(0)))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_line_with_spaces_in_the_name() {
        let line =
            "1234 (tokio (rt) w) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 37 0 0 20 0 9 0 100 0 0";
        assert_eq!(parse_stat_ticks(line).expect("parse"), 287);
    }

    #[test]
    fn machine_busy_skips_idle_iowait_and_steal() {
        let text = "cpu  10 1 5 1000 7 2 3 4 0 0\ncpu0 5 0 2 500 3 1 1 2 0 0\n";
        assert_eq!(parse_machine_busy(text).expect("parse"), 10 + 1 + 5 + 2 + 3);
    }

    #[test]
    fn vmrss_in_bytes() {
        let text = "Name:\tsluice\nVmPeak:\t  9000 kB\nVmRSS:\t   2048 kB\n";
        assert_eq!(parse_vmrss(text), Some(2048 * 1024));
    }

    #[test]
    fn own_process_is_readable() {
        assert!(self_ticks().is_ok());
        assert!(machine_busy_ticks().expect("busy") > 0);
        assert!(rss_bytes(std::process::id()).expect("rss") > 0);
    }
}
