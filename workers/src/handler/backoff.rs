//! Waiting before retrying the same channel (a channel's `retry: N` gives N attempts in a
//! row). A provider that said "429, retry after 2 s" or answered a 5xx is given a moment
//! before the next attempt instead of being hammered; only when its retries are used up
//! does the request fail over to the next channel.
//!
//! - 429 (and 503/529) with `Retry-After` up to `max_retry_after`: wait exactly that long
//!   (the channel's ban, set by the breaker, has run out by then, and the retry is its
//!   half-open probe). A longer `Retry-After` skips the channel's remaining retries.
//! - 5xx, overload and connection errors without `Retry-After`: exponential backoff from
//!   `retry_backoff`, doubled per retry, at most [`MAX_BACKOFF`], with jitter so that
//!   requests failing together do not come back together.
//! - Timeouts retry at once: the attempt already waited its limit out.

use std::time::Duration;

use rand::Rng;
use router::{Attempt, Availability};
use schemas::work::ErrorKind;
use tokio::time::{sleep_until, Instant};

use super::{Disposition, Request};
use crate::adapters::UpstreamError;
use crate::health::now_ms;
use crate::options::{WorkerOptions, MAX_BACKOFF};

/// What to do before the next attempt on the channel that just failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Retry {
    Now,
    After(Duration),
    /// The provider asked for a longer pause than is worth waiting: go to the next channel.
    NextChannel,
}

/// How long to wait after `e` before retry number `retry` (1 for the first) of a channel.
pub(super) fn before_retry(e: &UpstreamError, retry: u32, opts: &WorkerOptions) -> Retry {
    let asked = e.retry_after.map(Duration::from_secs);
    match e.kind {
        ErrorKind::RateLimited | ErrorKind::Overloaded if asked.is_some() => match asked {
            Some(d) if d <= opts.max_retry_after => Retry::After(d),
            _ => Retry::NextChannel,
        },
        ErrorKind::RateLimited
        | ErrorKind::Overloaded
        | ErrorKind::Upstream5xx
        | ErrorKind::Connection => {
            let exp = opts
                .retry_backoff
                .saturating_mul(1u32 << retry.saturating_sub(1).min(16))
                .min(MAX_BACKOFF);
            // Full jitter over the upper half: never less than half the step.
            let jittered = exp.mul_f64(rand::rng().random_range(0.5..=1.0));
            Retry::After(jittered)
        }
        _ => Retry::Now,
    }
}

impl Request<'_> {
    /// Waits `wait` before another attempt on `attempt`'s channel. `Ok(false)`: skip the
    /// attempt (the channel stays banned past the wait, or the deadline comes first).
    /// `Err`: the request ended while waiting (worker shutdown or a cancel).
    pub(super) async fn back_off(
        &mut self,
        attempt: &Attempt,
        wait: Duration,
    ) -> Result<bool, Disposition> {
        let until = Instant::now() + wait;
        if until >= self.deadline {
            return Ok(false);
        }
        if let Availability::Banned(banned_until) = attempt.health.availability(now_ms()) {
            let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
            if banned_until > now_ms().saturating_add(wait_ms) {
                return Ok(false);
            }
        }
        tracing::debug!(request_id = %self.item.request_id, channel = %attempt.channel.name, wait_ms = wait.as_millis(), "backing off before retrying the channel");
        tokio::select! {
            biased;
            () = self.ctx.abort.cancelled() => Err(Disposition::Nak(None)),
            () = self.cancel.cancelled() => {
                self.cancelled(None, None).await;
                Err(Disposition::Ack)
            }
            () = sleep_until(until) => Ok(true),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(kind: ErrorKind, retry_after: Option<u64>) -> UpstreamError {
        UpstreamError {
            retry_after,
            ..UpstreamError::new("openai", kind, "x")
        }
    }

    #[test]
    fn waits_follow_the_provider_then_double() {
        let opts = WorkerOptions::default();
        assert_eq!(
            before_retry(&err(ErrorKind::RateLimited, Some(2)), 1, &opts),
            Retry::After(Duration::from_secs(2))
        );
        assert_eq!(
            before_retry(&err(ErrorKind::RateLimited, Some(60)), 1, &opts),
            Retry::NextChannel,
            "a long Retry-After is not waited out"
        );
        assert_eq!(
            before_retry(&err(ErrorKind::Timeout, None), 1, &opts),
            Retry::Now
        );
        assert_eq!(
            before_retry(&err(ErrorKind::BadRequest, None), 1, &opts),
            Retry::Now
        );
        for (retry, max) in [(1, 200), (2, 400), (3, 800), (10, 2000)] {
            match before_retry(&err(ErrorKind::Upstream5xx, None), retry, &opts) {
                Retry::After(d) => {
                    let ms = d.as_millis();
                    assert!(ms >= max / 2 && ms <= max, "retry {retry}: {ms} ms");
                }
                other => panic!("retry {retry}: {other:?}"),
            }
        }
    }
}
