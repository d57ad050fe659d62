//! Per-key request rate limits in Redis, shared by every ingress instance.
//!
//! A sliding window of one minute, approximated from two fixed windows (the current one
//! plus the previous one weighted by how much of it still overlaps), as common gateways do:
//! two small counters per key instead of one entry per request.
//! Redis being down fails open with a warning: refusing all traffic because a limiter is
//! unreachable would turn a cache outage into a full outage.

use redis::aio::ConnectionManager;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use schemas::Namespace;

const WINDOW_SECS: u64 = 60;

#[derive(Clone)]
pub struct RateLimiter {
    redis: Option<ConnectionManager>,
    ns: Namespace,
    warned: Arc<AtomicBool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    Limited { retry_after: u64 },
}

// Increments the current window and reads the previous one atomically.
const SCRIPT: &str = r"
local cur = redis.call('INCR', KEYS[1])
if cur == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
local prev = tonumber(redis.call('GET', KEYS[2]) or '0')
return {cur, prev}
";

impl RateLimiter {
    pub fn new(redis: Option<ConnectionManager>, ns: Namespace) -> Self {
        Self {
            redis,
            ns,
            warned: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Counts one request against `limit` per minute for `subject` (a key id).
    pub async fn check(&self, subject: &str, limit: u32, now_unix: u64) -> Decision {
        let Some(redis) = &self.redis else {
            return Decision::Allowed;
        };
        let window = now_unix / WINDOW_SECS;
        let cur_key = self.ns.redis_key(&["rpm", subject, &window.to_string()]);
        let prev_key =
            self.ns
                .redis_key(&["rpm", subject, &(window.saturating_sub(1)).to_string()]);
        let mut conn = redis.clone();
        let result: Result<(u64, u64), redis::RedisError> = redis::Script::new(SCRIPT)
            .key(&cur_key)
            .key(&prev_key)
            .arg(WINDOW_SECS * 2)
            .invoke_async(&mut conn)
            .await;
        match result {
            Ok((current, previous)) => {
                if self.warned.swap(false, Ordering::Relaxed) {
                    tracing::info!("rate limiter reached Redis again");
                }
                let elapsed = now_unix % WINDOW_SECS;
                let overlap = (WINDOW_SECS - elapsed) as f64 / WINDOW_SECS as f64;
                let estimate = current as f64 + previous as f64 * overlap;
                if estimate > f64::from(limit) {
                    Decision::Limited {
                        retry_after: (WINDOW_SECS - elapsed).max(1),
                    }
                } else {
                    Decision::Allowed
                }
            }
            Err(e) => {
                if !self.warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "Redis unreachable: rate limits are not enforced until it is back");
                }
                Decision::Allowed
            }
        }
    }
}
