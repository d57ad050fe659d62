//! Stopping requests in flight (`<ns>.cancel.<request_id>`, core NATS).
//!
//! Each worker process subscribes once to `<ns>.cancel.*` and dispatches every message to
//! the request it names, if this process is running it: a subscription per request would
//! cost two protocol round trips on the hot path. Every worker sees every cancel, so the
//! one running the request stops it and the others remember it for a while, in case the
//! request is still queued and one of them takes it later.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::StreamExt;
use schemas::work::CancelReason;
use schemas::Namespace;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::error::WorkerError;

/// How long a cancel for a request no worker is running is remembered: as long as a
/// queued request can wait in `<NS>_REQUESTS`.
const EARLY_TTL: Duration = projector::bus::REQUESTS_MAX_AGE;
/// At most this many such cancels are remembered; beyond it new ones are dropped (with a
/// warning), so a flood of bogus cancels cannot grow a worker's memory without bound.
const EARLY_MAX: usize = 100_000;

/// The stop signal of one request: cancelled at most once, with the reason of the first
/// cancel.
#[derive(Debug, Clone, Default)]
pub struct Signal {
    token: CancellationToken,
    reason: Arc<OnceLock<CancelReason>>,
}

impl Signal {
    pub fn cancel(&self, reason: CancelReason) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Completes when the request is cancelled; cancellation safe.
    pub async fn cancelled(&self) {
        self.token.cancelled().await;
    }

    pub fn reason(&self) -> CancelReason {
        self.reason.get().copied().unwrap_or(CancelReason::Stop)
    }
}

#[derive(Default)]
struct State {
    /// Requests this process is running: their signal and a registration number, so a
    /// stale registration never removes a newer one of the same id.
    inflight: HashMap<Uuid, (u64, Signal)>,
    /// Cancels that named a request this process was not running, by arrival time.
    early: HashMap<Uuid, (Instant, CancelReason)>,
    next: u64,
}

/// The cancel signals of one worker process's requests in flight.
#[derive(Default)]
pub struct Cancels {
    state: Mutex<State>,
}

/// A request's place in [`Cancels`], removed when dropped.
pub struct Registration<'a> {
    cancels: &'a Cancels,
    id: Uuid,
    number: u64,
    signal: Signal,
}

impl Registration<'_> {
    pub fn signal(&self) -> &Signal {
        &self.signal
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut state = self.cancels.lock();
        if state.inflight.get(&self.id).map(|(n, _)| *n) == Some(self.number) {
            state.inflight.remove(&self.id);
        }
    }
}

impl Cancels {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Subscribes to `<ns>.cancel.*` and dispatches cancels in a task of `tracker` until
    /// `stop` is cancelled.
    pub async fn start(
        nats: &async_nats::Client,
        ns: &Namespace,
        tracker: &TaskTracker,
        stop: CancellationToken,
    ) -> Result<Arc<Cancels>, WorkerError> {
        let mut sub = nats.subscribe(ns.cancel_wildcard()).await?;
        let cancels = Arc::new(Cancels::default());
        let dispatch = cancels.clone();
        tracker.spawn(async move {
            loop {
                let msg = tokio::select! {
                    () = stop.cancelled() => break,
                    msg = sub.next() => match msg {
                        Some(msg) => msg,
                        None => break,
                    },
                };
                let id = msg
                    .subject
                    .rsplit('.')
                    .next()
                    .and_then(|t| Uuid::try_parse(t).ok());
                match id {
                    Some(id) => dispatch.cancel(id, CancelReason::from_payload(&msg.payload)),
                    None => {
                        tracing::debug!(subject = %msg.subject, "cancel for a malformed request id; ignored");
                    }
                }
            }
            let _ = sub.unsubscribe().await;
        });
        Ok(cancels)
    }

    /// Starts watching for cancels of `id`. A cancel that came while the request was still
    /// queued stops it at once.
    pub fn register(&self, id: Uuid) -> Registration<'_> {
        let signal = Signal::default();
        let mut state = self.lock();
        if let Some((_, reason)) = state.early.remove(&id) {
            signal.cancel(reason);
        }
        state.next += 1;
        let number = state.next;
        state.inflight.insert(id, (number, signal.clone()));
        Registration {
            cancels: self,
            id,
            number,
            signal,
        }
    }

    /// Stops request `id` if this process runs it; otherwise remembers the cancel.
    pub fn cancel(&self, id: Uuid, reason: CancelReason) {
        let mut state = self.lock();
        if let Some((_, signal)) = state.inflight.get(&id) {
            signal.cancel(reason);
            return;
        }
        let now = Instant::now();
        if state.early.len() >= EARLY_MAX {
            state
                .early
                .retain(|_, (at, _)| now.duration_since(*at) < EARLY_TTL);
        }
        if state.early.len() >= EARLY_MAX {
            tracing::warn!(request_id = %id, "too many cancels for requests not running here; this one is not remembered");
            return;
        }
        state.early.insert(id, (now, reason));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancels_reach_running_and_later_requests() {
        let cancels = Cancels::default();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let running = cancels.register(a);
        assert!(!running.signal().is_cancelled());
        cancels.cancel(a, CancelReason::ClientGone);
        assert!(running.signal().is_cancelled());
        assert_eq!(running.signal().reason(), CancelReason::ClientGone);
        // A second cancel keeps the first reason.
        cancels.cancel(a, CancelReason::Stop);
        assert_eq!(running.signal().reason(), CancelReason::ClientGone);
        drop(running);

        // Cancelled while queued: stopped as soon as a worker takes it, once.
        cancels.cancel(b, CancelReason::Stop);
        let taken = cancels.register(b);
        assert!(taken.signal().is_cancelled());
        drop(taken);
        assert!(!cancels.register(b).signal().is_cancelled());
    }

    #[test]
    fn a_stale_registration_leaves_a_newer_one() {
        let cancels = Cancels::default();
        let id = Uuid::now_v7();
        let old = cancels.register(id);
        let new = cancels.register(id);
        drop(old);
        cancels.cancel(id, CancelReason::Stop);
        assert!(new.signal().is_cancelled());
    }

    #[test]
    fn payloads_name_the_reason() {
        assert_eq!(
            CancelReason::from_payload(br#"{"reason":"client_gone"}"#),
            CancelReason::ClientGone
        );
        assert_eq!(CancelReason::from_payload(b""), CancelReason::Stop);
        assert_eq!(CancelReason::from_payload(b"junk"), CancelReason::Stop);
    }
}
