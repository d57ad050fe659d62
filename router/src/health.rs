//! Per-channel health: in-flight counts and a circuit breaker.
//!
//! The state is atomics, not I/O, so the breaker's rules are unit-tested here; the workers
//! mirror it through NATS KV so that every worker process sees every ban (see
//! `workers/src/health.rs`). Times are Unix milliseconds because bans cross processes and
//! machines, where a monotonic `Instant` means nothing.
//!
//! States of one channel:
//! - **closed**: `banned_until == 0`; it takes traffic. Failures that say something about
//!   the channel (not about the request) are counted; `failure_threshold` of them in a
//!   row ban it for `ban`.
//! - **banned**: `now < banned_until`; the policy leaves it out. A 429 with `Retry-After`
//!   bans at once, for as long as the provider asked (within `[1 s, max_ban]`).
//! - **half-open**: the ban ran out but no call has succeeded since. One request may probe
//!   it (whoever claims `probe_until` first); success closes it, failure bans it again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use schemas::work::ErrorKind;
use uuid::Uuid;

/// How the breaker reacts to failures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive channel failures that ban it.
    pub failure_threshold: u32,
    /// How long a ban lasts when the provider did not say.
    pub ban: Duration,
    /// Upper bound of a ban asked for by `Retry-After`, so a bogus header cannot take a
    /// channel out for a day.
    pub max_ban: Duration,
    /// How long a claimed probe blocks other probes; longer than any sane first byte.
    pub probe_ttl: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 3,
            ban: Duration::from_secs(60),
            max_ban: Duration::from_secs(600),
            probe_ttl: Duration::from_secs(30),
        }
    }
}

/// Whether a channel may take a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    Closed,
    /// Banned until this Unix millisecond.
    Banned(u64),
    /// The ban ran out; a probe may be claimed (`true`) or another request holds it.
    HalfOpen {
        probe_free: bool,
    },
}

/// A ban that just started, for the caller to share and record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ban {
    pub until_ms: u64,
    pub kind: ErrorKind,
    /// Failures in a row that led to it (1 for a `Retry-After` or a failed probe).
    pub failures: u32,
    pub retry_after: Option<u64>,
}

/// Whether a failure of this kind says the channel is unwell. A caller's mistake (a 400,
/// a context too long) or a cancellation says nothing about the channel.
pub fn counts_against_channel(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::RateLimited
            | ErrorKind::Overloaded
            | ErrorKind::Auth
            | ErrorKind::Upstream5xx
            | ErrorKind::Timeout
            | ErrorKind::Connection
    )
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The health of one channel, shared by every request of a worker.
#[derive(Debug, Default)]
pub struct Health {
    local_in_flight: AtomicU32,
    /// The sum of the other workers' last published in-flight counts.
    remote_in_flight: AtomicU32,
    consecutive_failures: AtomicU32,
    /// 0 when closed.
    banned_until_ms: AtomicU64,
    probe_until_ms: AtomicU64,
}

impl Health {
    #[inline]
    pub fn availability(&self, now_ms: u64) -> Availability {
        let until = self.banned_until_ms.load(Ordering::Acquire);
        if until == 0 {
            Availability::Closed
        } else if now_ms < until {
            Availability::Banned(until)
        } else {
            Availability::HalfOpen {
                probe_free: self.probe_until_ms.load(Ordering::Acquire) <= now_ms,
            }
        }
    }

    /// Calls in flight on this channel across all workers, as far as this worker knows.
    #[inline]
    pub fn load(&self) -> u32 {
        self.local_in_flight
            .load(Ordering::Relaxed)
            .saturating_add(self.remote_in_flight.load(Ordering::Relaxed))
    }

    pub fn local_in_flight(&self) -> u32 {
        self.local_in_flight.load(Ordering::Relaxed)
    }

    pub fn set_remote_in_flight(&self, n: u32) {
        self.remote_in_flight.store(n, Ordering::Relaxed);
    }

    /// Counts a call in flight until the guard is dropped.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.local_in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(self))
    }

    /// Claims the half-open probe for `probe_ttl`; `false` when another request holds it
    /// or the channel is not half-open any more.
    pub fn try_claim_probe(&self, now_ms: u64, cfg: &BreakerConfig) -> bool {
        if !matches!(
            self.availability(now_ms),
            Availability::HalfOpen { probe_free: true }
        ) {
            return false;
        }
        let held = self.probe_until_ms.load(Ordering::Acquire);
        held <= now_ms
            && self
                .probe_until_ms
                .compare_exchange(
                    held,
                    now_ms.saturating_add(ms(cfg.probe_ttl)),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
    }

    /// A call answered. After a ban ran out, that closes the breaker; returns whether it
    /// did (then the other workers must hear that the channel is healthy again). A call
    /// that started before a ban and answered during it lifts nothing: a 429's
    /// `Retry-After` or a run of failures outweighs one late success.
    pub fn record_success(&self, now_ms: u64) -> bool {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        let until = self.banned_until_ms.load(Ordering::Acquire);
        if until == 0 || now_ms < until {
            return false;
        }
        self.probe_until_ms.store(0, Ordering::Release);
        // Only the ban seen here is lifted; a newer one set meanwhile stands.
        self.banned_until_ms
            .compare_exchange(until, 0, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// A call failed with `kind`. Returns the ban it started, if any.
    pub fn record_failure(
        &self,
        kind: ErrorKind,
        retry_after: Option<u64>,
        now_ms: u64,
        cfg: &BreakerConfig,
    ) -> Option<Ban> {
        if !counts_against_channel(kind) {
            return None;
        }
        if let Availability::Banned(_) = self.availability(now_ms) {
            // Calls that started before the ban and fail during it change nothing: the
            // channel is already out, and one ban is one event.
            return None;
        }
        let was_probing = matches!(self.availability(now_ms), Availability::HalfOpen { .. });
        let asked = match (kind, retry_after) {
            (ErrorKind::RateLimited, Some(secs)) => Some(
                Duration::from_secs(secs).clamp(Duration::from_secs(1), cfg.max_ban.max(cfg.ban)),
            ),
            _ => None,
        };
        let failures = self.consecutive_failures.fetch_add(1, Ordering::AcqRel) + 1;
        let length = match asked {
            Some(asked) => asked,
            None if was_probing || failures >= cfg.failure_threshold.max(1) => cfg.ban,
            None => return None,
        };
        let until_ms = now_ms.saturating_add(ms(length));
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.probe_until_ms.store(0, Ordering::Release);
        self.banned_until_ms.fetch_max(until_ms, Ordering::AcqRel);
        Some(Ban {
            until_ms,
            kind,
            failures: if asked.is_some() || was_probing {
                1
            } else {
                failures
            },
            retry_after,
        })
    }

    /// Applies what another worker shared: a ban until `until_ms` (0 = closed again) and
    /// the probe it claimed.
    pub fn apply_remote(&self, until_ms: u64, probe_until_ms: u64) {
        if until_ms == 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
            self.probe_until_ms.store(0, Ordering::Release);
        } else if self.banned_until_ms.load(Ordering::Acquire) != until_ms {
            // Another ban period (a failed probe bans again): the probe claimed in the
            // previous one is over, or this worker would skip the next probe for the whole
            // claim's lifetime.
            self.probe_until_ms.store(probe_until_ms, Ordering::Release);
        } else {
            self.probe_until_ms
                .fetch_max(probe_until_ms, Ordering::AcqRel);
        }
        self.banned_until_ms.store(until_ms, Ordering::Release);
    }

    pub fn banned_until_ms(&self) -> u64 {
        self.banned_until_ms.load(Ordering::Acquire)
    }

    pub fn probe_until_ms(&self) -> u64 {
        self.probe_until_ms.load(Ordering::Acquire)
    }
}

/// A call in flight on a channel; dropping it ends the count.
#[derive(Debug)]
pub struct InFlight(Arc<Health>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.local_in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The health cells of every channel a worker has seen, by id. Cells outlive channel
/// refreshes, so reloading the configuration neither forgets a ban nor a load count.
#[derive(Debug, Clone, Default)]
pub struct HealthBook {
    cells: Arc<Mutex<HashMap<Uuid, Arc<Health>>>>,
}

impl HealthBook {
    /// The cell of `id`, created closed on first use.
    pub fn cell(&self, id: Uuid) -> Arc<Health> {
        let mut cells = self.cells.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(cells.entry(id).or_default())
    }

    /// Every cell, for publishing in-flight counts.
    pub fn all(&self) -> Vec<(Uuid, Arc<Health>)> {
        let cells = self.cells.lock().unwrap_or_else(|e| e.into_inner());
        cells.iter().map(|(id, h)| (*id, Arc::clone(h))).collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const T0: u64 = 1_000_000;

    fn cfg() -> BreakerConfig {
        BreakerConfig::default()
    }

    #[test]
    fn consecutive_failures_ban_then_half_open_probe_recovers() {
        let h = Health::default();
        assert_eq!(h.availability(T0), Availability::Closed);
        assert!(h
            .record_failure(ErrorKind::Upstream5xx, None, T0, &cfg())
            .is_none());
        assert!(h
            .record_failure(ErrorKind::Connection, None, T0, &cfg())
            .is_none());
        let ban = h
            .record_failure(ErrorKind::Upstream5xx, None, T0, &cfg())
            .expect("third failure in a row bans");
        assert_eq!(ban.until_ms, T0 + 60_000);
        assert_eq!(ban.failures, 3);
        assert_eq!(
            h.availability(T0 + 59_999),
            Availability::Banned(T0 + 60_000)
        );

        // The ban ran out: one probe, not two.
        let later = T0 + 60_000;
        assert_eq!(
            h.availability(later),
            Availability::HalfOpen { probe_free: true }
        );
        assert!(h.try_claim_probe(later, &cfg()));
        assert!(!h.try_claim_probe(later, &cfg()));
        assert_eq!(
            h.availability(later + 1),
            Availability::HalfOpen { probe_free: false }
        );
        assert!(
            h.record_success(later + 1),
            "closing a half-open breaker is news"
        );
        assert_eq!(h.availability(later + 1), Availability::Closed);
        assert!(!h.record_success(later + 1), "a closed breaker stays quiet");
    }

    #[test]
    fn calls_that_started_before_a_ban_do_not_change_it() {
        let h = Health::default();
        let ban = h
            .record_failure(ErrorKind::RateLimited, Some(30), T0, &cfg())
            .unwrap();
        // A late success does not lift a ban, and late failures neither extend it nor
        // start another.
        assert!(!h.record_success(T0 + 1));
        for _ in 0..5 {
            assert!(h
                .record_failure(ErrorKind::Upstream5xx, None, T0 + 2, &cfg())
                .is_none());
        }
        assert_eq!(h.availability(T0 + 3), Availability::Banned(ban.until_ms));
    }

    #[test]
    fn a_failed_probe_bans_again_at_once() {
        let h = Health::default();
        for _ in 0..3 {
            h.record_failure(ErrorKind::Timeout, None, T0, &cfg());
        }
        let later = T0 + 60_000;
        assert!(h.try_claim_probe(later, &cfg()));
        let ban = h
            .record_failure(ErrorKind::Timeout, None, later, &cfg())
            .expect("a failed probe bans");
        assert_eq!(ban.until_ms, later + 60_000);
        assert_eq!(
            h.availability(later + 1),
            Availability::Banned(later + 60_000)
        );
    }

    #[test]
    fn success_resets_the_count_and_caller_errors_do_not_count() {
        let h = Health::default();
        h.record_failure(ErrorKind::Upstream5xx, None, T0, &cfg());
        h.record_failure(ErrorKind::Upstream5xx, None, T0, &cfg());
        h.record_success(T0);
        h.record_failure(ErrorKind::Upstream5xx, None, T0, &cfg());
        for _ in 0..10 {
            assert!(h
                .record_failure(ErrorKind::BadRequest, None, T0, &cfg())
                .is_none());
            assert!(h
                .record_failure(ErrorKind::ContextTooLong, None, T0, &cfg())
                .is_none());
        }
        assert_eq!(h.availability(T0), Availability::Closed);
    }

    #[test]
    fn retry_after_bans_for_as_long_as_asked_within_bounds() {
        let h = Health::default();
        let ban = h
            .record_failure(ErrorKind::RateLimited, Some(7), T0, &cfg())
            .expect("a 429 with retry-after bans at once");
        assert_eq!(ban.until_ms, T0 + 7_000);
        assert_eq!(ban.retry_after, Some(7));

        let h = Health::default();
        let ban = h
            .record_failure(ErrorKind::RateLimited, Some(86_400), T0, &cfg())
            .unwrap();
        assert_eq!(ban.until_ms, T0 + 600_000, "capped at max_ban");

        // A 429 without retry-after counts like any failure.
        let h = Health::default();
        assert!(h
            .record_failure(ErrorKind::RateLimited, None, T0, &cfg())
            .is_none());
    }

    #[test]
    fn ban_length_is_configurable() {
        let cfg = BreakerConfig {
            failure_threshold: 1,
            ban: Duration::from_secs(5),
            ..BreakerConfig::default()
        };
        let h = Health::default();
        let ban = h
            .record_failure(ErrorKind::Overloaded, None, T0, &cfg)
            .unwrap();
        assert_eq!(ban.until_ms, T0 + 5_000);
    }

    #[test]
    fn remote_bans_and_clears_apply() {
        let h = Health::default();
        h.apply_remote(T0 + 1_000, 0);
        assert_eq!(h.availability(T0), Availability::Banned(T0 + 1_000));
        // Another worker claimed the probe: this one does not probe too.
        h.apply_remote(T0 + 1_000, T0 + 31_000);
        assert_eq!(
            h.availability(T0 + 1_000),
            Availability::HalfOpen { probe_free: false }
        );
        assert!(!h.try_claim_probe(T0 + 1_000, &cfg()));
        h.apply_remote(0, 0);
        assert_eq!(h.availability(T0 + 1_000), Availability::Closed);
    }

    #[test]
    fn a_remote_failed_probe_frees_the_next_probe() {
        let h = Health::default();
        h.apply_remote(T0 + 1_000, 0);
        // Another worker claims the probe when the ban runs out...
        h.apply_remote(T0 + 1_000, T0 + 31_000);
        // ...the probe fails and bans again for a second.
        h.apply_remote(T0 + 3_000, 0);
        assert_eq!(h.availability(T0 + 2_000), Availability::Banned(T0 + 3_000));
        // When that ban runs out, the next probe is free here too, not blocked until the
        // old claim would have expired.
        assert_eq!(
            h.availability(T0 + 3_000),
            Availability::HalfOpen { probe_free: true }
        );
        assert!(h.try_claim_probe(T0 + 3_000, &cfg()));
    }

    #[test]
    fn in_flight_counts_local_and_remote() {
        let book = HealthBook::default();
        let id = Uuid::now_v7();
        let h = book.cell(id);
        let a = h.start();
        let b = book.cell(id).start();
        h.set_remote_in_flight(5);
        assert_eq!(h.load(), 7);
        drop(a);
        drop(b);
        assert_eq!(h.local_in_flight(), 0);
        assert_eq!(h.load(), 5);
    }
}
