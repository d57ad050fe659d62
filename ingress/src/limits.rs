//! Request and token rate limits in Redis (per key and per user), shared by every ingress.
//!
//! A sliding window approximated from two fixed windows (the current one plus the previous
//! one weighted by how much of it still overlaps), as common gateways do: two small counters
//! per limit instead of one entry per request. All limits of a request are checked and
//! counted in one Lua script, all or nothing, so a request refused by its user's limit does
//! not use up its key's. A refused request counts against nothing.
//!
//! The window is one minute; `SLUICE_RATE_WINDOW_SECS` shortens it (tests) — the limits are
//! then "per window" rather than per minute.
//!
//! Redis being down fails open with a warning: refusing all traffic because a limiter is
//! unreachable would turn a cache outage into a full outage.

use redis::aio::ConnectionManager;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};

use schemas::Namespace;

const DEFAULT_WINDOW_SECS: u64 = 60;

/// Longest a request waits for the rate limiter's answer before it is let through.
pub(crate) const REDIS_WAIT: std::time::Duration = std::time::Duration::from_millis(250);

/// Runs a script on the hot path, waiting at most [`REDIS_WAIT`]: a slow or reconnecting
/// Redis must never hold a request (callers then fail open, or closed, as they decide).
pub(crate) async fn invoke_bounded<T: redis::FromRedisValue>(
    invocation: &redis::ScriptInvocation<'_>,
    redis: &redis::aio::ConnectionManager,
) -> Result<T, redis::RedisError> {
    let mut conn = redis.clone();
    tokio::time::timeout(REDIS_WAIT, invocation.invoke_async(&mut conn))
        .await
        .unwrap_or_else(|_| {
            Err(
                std::io::Error::new(std::io::ErrorKind::TimedOut, "Redis did not answer in time")
                    .into(),
            )
        })
}

/// Requests admitted without a rate-limit check because Redis did not answer.
pub const FAIL_OPEN: &str = "sluice_rate_limit_fail_open_total";

#[derive(Clone)]
pub struct RateLimiter {
    redis: Option<ConnectionManager>,
    ns: Namespace,
    warned: Arc<AtomicBool>,
    window_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    Limited { retry_after: u64 },
}

/// One limit to check for a request.
#[derive(Debug, Clone)]
pub struct Limit {
    /// `rpm` or `tpm`.
    pub kind: &'static str,
    /// Whose counter: `key:<id>` or `user:<id>`.
    pub subject: String,
    pub limit: u32,
    /// What this request counts: 1 for `rpm`, its estimated tokens for `tpm`.
    pub cost: u64,
}

/// The outcome of [`RateLimiter::check_all`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    /// Counted; `counters` are the current-window counters, in the order of the limits, so
    /// a token estimate can be corrected once the real usage is known.
    Allowed { counters: Vec<String> },
    /// The limit at `index` would be exceeded; nothing was counted.
    Limited { index: usize, retry_after: u64 },
}

// KEYS: current and previous window counter of each limit, in pairs.
// ARGV: overlap of the previous window in permille, counter TTL in ms, then limit and cost
// of each limit, in pairs. Returns 0 when every limit admits (and counts), else the
// 1-based index of the first limit that refuses.
static CHECK_ALL: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local n = #KEYS / 2
local overlap = tonumber(ARGV[1]) / 1000
for i = 1, n do
  local cur = tonumber(redis.call('GET', KEYS[2*i-1]) or '0')
  local prev = tonumber(redis.call('GET', KEYS[2*i]) or '0')
  local limit = tonumber(ARGV[1 + 2*i])
  local cost = tonumber(ARGV[2 + 2*i])
  if cur + prev * overlap + cost > limit then return i end
end
for i = 1, n do
  redis.call('INCRBY', KEYS[2*i-1], ARGV[2 + 2*i])
  redis.call('PEXPIRE', KEYS[2*i-1], ARGV[2])
end
return 0
",
    )
});

// Corrects counters that still exist by ARGV[1] (never creating one without a TTL).
static ADJUST: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('INCRBY', KEYS[i], ARGV[1]) end
end
return 0
",
    )
});

/// The window length: `SLUICE_RATE_WINDOW_SECS` (whole seconds, at least 1), default 60.
pub fn window_secs_from_env() -> u64 {
    std::env::var("SLUICE_RATE_WINDOW_SECS")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|s| *s > 0)
        .unwrap_or(DEFAULT_WINDOW_SECS)
}

impl RateLimiter {
    pub fn new(redis: Option<ConnectionManager>, ns: Namespace) -> Self {
        Self::with_window(redis, ns, window_secs_from_env())
    }

    pub fn with_window(redis: Option<ConnectionManager>, ns: Namespace, window_secs: u64) -> Self {
        Self {
            redis,
            ns,
            warned: Arc::new(AtomicBool::new(false)),
            window_ms: window_secs.max(1) * 1000,
        }
    }

    pub fn window_secs(&self) -> u64 {
        self.window_ms / 1000
    }

    /// Counts one request against `limit` per window for `subject` (a key id).
    pub async fn check(&self, subject: &str, limit: u32, now_unix: u64) -> Decision {
        let one = Limit {
            kind: "rpm",
            subject: format!("key:{subject}"),
            limit,
            cost: 1,
        };
        match self.check_all(&[one], now_unix.saturating_mul(1000)).await {
            Checked::Allowed { .. } => Decision::Allowed,
            Checked::Limited { retry_after, .. } => Decision::Limited { retry_after },
        }
    }

    /// Checks every limit and, only if all admit, counts the request against each.
    pub async fn check_all(&self, limits: &[Limit], now_ms: u64) -> Checked {
        let Some(redis) = &self.redis else {
            return Checked::Allowed {
                counters: Vec::new(),
            };
        };
        if limits.is_empty() {
            return Checked::Allowed {
                counters: Vec::new(),
            };
        }
        let window = now_ms / self.window_ms;
        let elapsed = now_ms % self.window_ms;
        let overlap_permille = (self.window_ms - elapsed) * 1000 / self.window_ms;
        let mut invocation = CHECK_ALL.prepare_invoke();
        let mut counters = Vec::with_capacity(limits.len());
        for l in limits {
            let cur = self.counter(l, window);
            let prev = self.counter(l, window.saturating_sub(1));
            invocation.key(&cur).key(prev);
            counters.push(cur);
        }
        invocation.arg(overlap_permille).arg(self.window_ms * 2);
        for l in limits {
            invocation.arg(l.limit).arg(l.cost);
        }
        // Past the wait, fail open.
        let result: Result<usize, redis::RedisError> = invoke_bounded(&invocation, redis).await;
        match result {
            Ok(0) => {
                if self.warned.swap(false, Ordering::Relaxed) {
                    tracing::info!("rate limiter reached Redis again");
                }
                Checked::Allowed { counters }
            }
            Ok(i) => Checked::Limited {
                index: i.saturating_sub(1).min(limits.len() - 1),
                retry_after: (self.window_ms - elapsed).div_ceil(1000).max(1),
            },
            Err(e) => {
                // Counted per request let through unchecked, so an operator sees how much
                // traffic the outage admitted (`docs/guarantees.md`, Redis down).
                metrics::counter!(FAIL_OPEN).increment(1);
                if !self.warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "Redis unreachable: rate limits are not enforced until it is back");
                }
                Checked::Allowed {
                    counters: Vec::new(),
                }
            }
        }
    }

    /// Adds `delta` (may be negative) to counters returned by [`RateLimiter::check_all`]
    /// that have not expired: a token estimate corrected to the real usage.
    pub async fn adjust(&self, counters: &[String], delta: i64) {
        let Some(redis) = &self.redis else { return };
        if counters.is_empty() || delta == 0 {
            return;
        }
        let mut invocation = ADJUST.prepare_invoke();
        for c in counters {
            invocation.key(c);
        }
        invocation.arg(delta);
        let mut conn = redis.clone();
        if let Err(e) = invocation.invoke_async::<i64>(&mut conn).await {
            tracing::debug!(error = %e, "cannot correct a token rate counter");
        }
    }

    fn counter(&self, l: &Limit, window: u64) -> String {
        self.ns.redis_key(&[
            "rl",
            l.kind,
            &l.subject,
            &self.window_ms.to_string(),
            &window.to_string(),
        ])
    }
}
