//! Retry pacing shared by the journal and the projection runtime: both wait out a broken
//! Postgres or NATS rather than give up, because their input stays safe upstream
//! (JetStream for the journal, `event_log` for projectors) while they wait.

use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Exponential backoff from 100 ms, doubling up to 30 s; reset after a success so the
/// next outage starts fast again.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    next: Duration,
}

const FIRST: Duration = Duration::from_millis(100);
const MAX: Duration = Duration::from_secs(30);

impl Backoff {
    pub(crate) fn new() -> Self {
        Self { next: FIRST }
    }

    pub(crate) fn reset(&mut self) {
        self.next = FIRST;
    }

    /// Sleeps for the current delay (then doubles it). Returns `false` when `shutdown`
    /// fired first, so callers can stop instead of retrying.
    pub(crate) async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let delay = self.next;
        self.next = (self.next * 2).min(MAX);
        sleep_or_cancel(delay, shutdown).await
    }

    /// The delay the next [`Backoff::wait`] will sleep, for log lines.
    pub(crate) fn delay(&self) -> Duration {
        self.next
    }
}

/// Sleeps for `delay` unless `shutdown` fires first; `true` when the full delay passed.
pub(crate) async fn sleep_or_cancel(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => false,
        () = tokio::time::sleep(delay) => true,
    }
}
