//! Who is attached to which stream, and what happens when the last client leaves.
//!
//! A streamed request's generation outlives its client for a resume grace period: the
//! client may come back (`GET /v1/streams/{id}` with `Last-Event-ID`) or another device may
//! be watching. When an attached client leaves before the end, this ingress keeps reading
//! the request's frames (so the original client's quota hold is still settled) and, once
//! the grace has passed, asks every ingress whether anyone is attached to the request or
//! left it within the grace (`<ns>.watchers.<request_id>`, core NATS request, answered by
//! each ingress for its own clients). If nobody answers, it publishes
//! `<ns>.cancel.<request_id>` and the worker stops the upstream call and bills what was
//! generated. A grace of 0 cancels as soon as the last client is gone.
//!
//! Cost on the hot path: one short mutex section when a stream starts and one when it ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use schemas::work::{CancelNotice, CancelReason};
use schemas::Namespace;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::relay::FrameReader;

/// How long a grace check waits for another ingress to say a client is attached. Only an
/// ingress that has one answers, so silence is the answer "nobody".
const ASK_TIMEOUT: Duration = Duration::from_millis(250);

#[derive(Debug, Default)]
struct Seen {
    /// Clients of this ingress reading the request now.
    attached: u32,
    /// When the last one left before the end, and a number for that leave, so only the
    /// grace task of the latest leave decides about the request.
    left: Option<(Instant, u64)>,
}

/// The streams this ingress relays, and the tasks that watch over left-behind ones.
pub struct Presence {
    ns: Namespace,
    nats: async_nats::Client,
    grace: Duration,
    seen: Mutex<HashMap<Uuid, Seen>>,
    leaves: std::sync::atomic::AtomicU64,
    tracker: TaskTracker,
    /// Cancelled at shutdown: grace tasks end (the generations they watch run to their
    /// end and are billed in full), WebSockets close with 1001.
    stop: CancellationToken,
}

impl Presence {
    /// Starts answering `<ns>.watchers.*` for this ingress's clients.
    pub async fn start(
        nats: async_nats::Client,
        ns: Namespace,
        grace: Duration,
    ) -> Result<Arc<Presence>, async_nats::SubscribeError> {
        let mut asks = nats.subscribe(ns.watchers_wildcard()).await?;
        let presence = Arc::new(Presence {
            ns,
            nats,
            grace,
            seen: Mutex::new(HashMap::new()),
            leaves: std::sync::atomic::AtomicU64::new(0),
            tracker: TaskTracker::new(),
            stop: CancellationToken::new(),
        });
        let me = presence.clone();
        presence.tracker.spawn(async move {
            loop {
                let ask = tokio::select! {
                    () = me.stop.cancelled() => break,
                    ask = asks.next() => match ask {
                        Some(ask) => ask,
                        None => break,
                    },
                };
                let (Some(reply), Some(id)) = (ask.reply, id_of(&ask.subject)) else {
                    continue;
                };
                if me.watched_here(id, None) {
                    if let Err(e) = me.nats.publish(reply, "1".into()).await {
                        tracing::debug!(error = %e, "answering a watchers query failed");
                    }
                }
            }
            let _ = asks.unsubscribe().await;
        });
        Ok(presence)
    }

    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// Cancelled when the ingress shuts down.
    pub fn stopping(&self) -> &CancellationToken {
        &self.stop
    }

    /// Tasks that must end before the process exits (WebSocket request relays use it too).
    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Seen>> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A client starts reading request `id`.
    pub fn attach(&self, id: Uuid) {
        self.lock().entry(id).or_default().attached += 1;
    }

    /// A client stopped reading request `id`. `rest`: the client left before the end; its
    /// reader and the request's deadline go to a grace task. `None`: it read to the end.
    pub fn detach(self: &Arc<Self>, id: Uuid, rest: Option<(FrameReader, Instant)>) {
        let Some(number) = self.note_detach(id, rest.is_some()) else {
            return;
        };
        if let Some((reader, deadline)) = rest {
            let me = self.clone();
            self.tracker
                .spawn(async move { me.after_leave(id, number, reader, deadline).await });
        }
    }

    /// Counts a client out; for one that left early, records the leave and returns its
    /// number. A request nobody reads and nobody left early is forgotten.
    fn note_detach(&self, id: Uuid, early: bool) -> Option<u64> {
        let mut seen = self.lock();
        let entry = seen.get_mut(&id)?;
        entry.attached = entry.attached.saturating_sub(1);
        if early {
            let number = self
                .leaves
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            entry.left = Some((Instant::now(), number));
            return Some(number);
        }
        if entry.attached == 0 && entry.left.is_none() {
            seen.remove(&id);
        }
        None
    }

    /// Whether a client of this ingress reads `id`, or left it within the grace. `mine`: the
    /// leave a grace task asks for, which does not count as someone else's.
    fn watched_here(&self, id: Uuid, mine: Option<u64>) -> bool {
        let seen = self.lock();
        let Some(entry) = seen.get(&id) else {
            return false;
        };
        entry.attached > 0
            || entry.left.is_some_and(|(at, number)| match mine {
                Some(mine) => number != mine,
                None => at.elapsed() < self.grace,
            })
    }

    /// Whether anyone, on any ingress, reads `id` or left it within the grace.
    async fn watched(&self, id: Uuid, mine: u64) -> bool {
        if self.watched_here(id, Some(mine)) {
            return true;
        }
        let ask = self
            .nats
            .request(self.ns.watchers_subject(&id), bytes::Bytes::new());
        matches!(tokio::time::timeout(ASK_TIMEOUT, ask).await, Ok(Ok(_)))
    }

    /// Asks the worker running `id` to stop it; it bills what was generated and ends the
    /// stream. Fire and forget: core NATS, no reply.
    pub async fn cancel(
        &self,
        id: Uuid,
        reason: CancelReason,
    ) -> Result<(), async_nats::PublishError> {
        let payload = serde_json::to_vec(&CancelNotice { reason }).unwrap_or_default();
        self.nats
            .publish(self.ns.cancel_subject(&id), payload.into())
            .await?;
        // Stop means now: do not leave the message in the client's write buffer (bounded,
        // should NATS be reconnecting: the message is still sent once it is back).
        let _ = tokio::time::timeout(Duration::from_secs(1), self.nats.flush()).await;
        Ok(())
    }

    /// The grace task of one leave: wait for the end or the grace; then, if nobody is
    /// attached anywhere, cancel; then read on to the end so the reader settles its hold.
    async fn after_leave(&self, id: Uuid, mine: u64, mut reader: FrameReader, deadline: Instant) {
        let grace_end = (Instant::now() + self.grace).min(deadline);
        let ended = tokio::select! {
            () = self.stop.cancelled() => true,
            ended = read_to_end(&mut reader, grace_end) => ended,
        };
        if !ended {
            if Instant::now() < deadline && !self.watched(id, mine).await {
                tracing::debug!(request_id = %id, "client gone and nobody resumed within the grace; cancelling");
                if let Err(e) = self.cancel(id, CancelReason::ClientGone).await {
                    tracing::warn!(request_id = %id, error = %e, "publishing a cancel failed; the generation runs to its end");
                }
            }
            tokio::select! {
                () = self.stop.cancelled() => {}
                _ = read_to_end(&mut reader, deadline) => {}
            }
        }
        self.forget(id, mine);
    }

    /// Drops the record of `id` once its last leave (`mine`) is settled and nobody reads it.
    fn forget(&self, id: Uuid, mine: u64) {
        let mut seen = self.lock();
        if let Some(entry) = seen.get(&id) {
            if entry.attached == 0 && entry.left.is_none_or(|(_, number)| number == mine) {
                seen.remove(&id);
            }
        }
    }

    /// Stops the grace tasks and the watchers responder, and waits for them.
    pub async fn close(&self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// Reads frames until the terminal one (`true`), the reader closes (`true`: nothing more
/// will come) or `until` passes (`false`).
async fn read_to_end(reader: &mut FrameReader, until: Instant) -> bool {
    loop {
        match reader.next(until).await {
            Ok(frame) if crate::relay::is_terminal(frame.kind) => return true,
            Ok(_) => {}
            Err(crate::relay::ReadError::Timeout) => return false,
            Err(crate::relay::ReadError::Closed) => return true,
        }
    }
}

/// The request id that ends a `<ns>.<kind>.<request_id>` subject.
fn id_of(subject: &str) -> Option<Uuid> {
    subject
        .rsplit('.')
        .next()
        .and_then(|t| Uuid::try_parse(t).ok())
}

/// `SLUICE_RESUME_GRACE_SECS` (whole seconds, 0 = cancel as soon as the client is gone),
/// default 20. Capped at how long `<NS>_CHUNKS` keeps frames: past that there is nothing
/// left to resume from.
pub fn grace_from_env() -> Duration {
    let secs = std::env::var("SLUICE_RESUME_GRACE_SECS")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(DEFAULT_GRACE_SECS);
    Duration::from_secs(secs).min(projector::bus::CHUNKS_MAX_AGE)
}

pub const DEFAULT_GRACE_SECS: u64 = 20;

#[cfg(test)]
mod tests {
    use super::*;

    async fn presence(grace: Duration) -> Presence {
        // Never connects: these tests only touch the bookkeeping.
        let nats = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect("127.0.0.1:1")
            .await
            .expect("lazy client");
        Presence {
            ns: Namespace::default(),
            nats,
            grace,
            seen: Mutex::new(HashMap::new()),
            leaves: std::sync::atomic::AtomicU64::new(0),
            tracker: TaskTracker::new(),
            stop: CancellationToken::new(),
        }
    }

    #[tokio::test]
    async fn a_request_is_watched_while_attached_or_recently_left() {
        let p = presence(Duration::from_secs(60)).await;
        let id = Uuid::now_v7();
        assert!(!p.watched_here(id, None));
        p.attach(id);
        p.attach(id);
        assert!(p.watched_here(id, None));
        // One of two leaves early: the other still reads.
        let first = p.note_detach(id, true).expect("an early leave is numbered");
        assert!(p.watched_here(id, Some(first)));
        // The last one leaves early too: nobody reads, but a grace is running. Another
        // ingress asking is told so; the earlier leave's task defers to the latest one's,
        // and the latest one's task does not count itself.
        let last = p.note_detach(id, true).expect("numbered");
        assert!(p.watched_here(id, None));
        assert!(p.watched_here(id, Some(first)));
        assert!(!p.watched_here(id, Some(last)));
        // The earlier task does not forget what the latest one still decides about.
        p.forget(id, first);
        assert!(p.watched_here(id, None));
        p.forget(id, last);
        assert!(!p.watched_here(id, None));

        // Read to the end: forgotten at once.
        p.attach(id);
        assert_eq!(p.note_detach(id, false), None);
        assert!(p.lock().is_empty());
    }

    #[tokio::test]
    async fn a_leave_older_than_the_grace_is_nobody() {
        let p = presence(Duration::ZERO).await;
        let id = Uuid::now_v7();
        p.attach(id);
        let mine = p.note_detach(id, true).expect("numbered");
        assert!(!p.watched_here(id, None));
        assert!(!p.watched_here(id, Some(mine)));
    }
}
