//! Publishing a request's domain events to `<NS>_EVENTS`.

use std::time::Duration;

use async_nats::jetstream;
use chrono::Utc;
use schemas::events::Metadata;
use schemas::work::WorkItem;
use schemas::{Envelope, Event, Namespace};

/// Waits before each retry of a terminal event. The same envelope (same `Nats-Msg-Id`) is
/// published again, so a retry after a lost ack is deduplicated by JetStream, not doubled.
const RECORD_BACKOFF: [Duration; 4] = [
    Duration::from_millis(100),
    Duration::from_millis(500),
    Duration::from_secs(2),
    Duration::from_secs(5),
];

/// The events of one request, all carrying its key, user and trace ids.
pub struct EventOut<'a> {
    js: &'a jetstream::Context,
    ns: &'a Namespace,
    metadata: Metadata,
}

impl<'a> EventOut<'a> {
    pub fn new(js: &'a jetstream::Context, ns: &'a Namespace, item: &WorkItem) -> Self {
        Self {
            js,
            ns,
            metadata: Metadata {
                trace_id: item.trace_id.clone(),
                key_id: Some(item.key_id),
                user_id: item.user_id,
            },
        }
    }

    fn envelope(&self, event: Event) -> Envelope {
        event.into_envelope(Utc::now(), self.metadata.clone())
    }

    /// Publishes without waiting for JetStream's ack: progress events (`AttemptStarted`,
    /// `AttemptFailed`) must not add a round trip to the request. They are stored before
    /// the terminal event, which is published later on the same connection and awaited.
    pub async fn emit(&self, event: Event) {
        let envelope = self.envelope(event);
        if let Err(e) = projector::bus::publish_event(self.js, self.ns, &envelope).await {
            tracing::warn!(event = %envelope.event_type, stream = %envelope.stream, error = %e, "publishing an event failed");
        }
    }

    /// Publishes a terminal event and waits until JetStream stored it, retrying for a
    /// while: billing depends on it. Returns whether it was stored.
    pub async fn record(&self, event: Event) -> bool {
        let envelope = self.envelope(event);
        let mut backoff = RECORD_BACKOFF.iter();
        loop {
            let stored = match projector::bus::publish_event(self.js, self.ns, &envelope).await {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match (stored, backoff.next()) {
                (Ok(()), _) => return true,
                (Err(e), Some(wait)) => {
                    tracing::warn!(event = %envelope.event_type, stream = %envelope.stream, error = %e, "storing a terminal event failed; retrying");
                    tokio::time::sleep(*wait).await;
                }
                (Err(e), None) => {
                    tracing::error!(event = %envelope.event_type, stream = %envelope.stream, event_id = %envelope.event_id, error = %e, "a terminal event could not be stored; the request goes unrecorded");
                    return false;
                }
            }
        }
    }
}
