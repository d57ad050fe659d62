//! NATS JetStream plumbing shared by every role: the three streams of a namespace,
//! created idempotently, and publishing an event with its id as `Nats-Msg-Id`.

use async_nats::jetstream::{self, message::PublishMessage, stream};
use std::time::Duration;

use schemas::{Envelope, Namespace};

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("cannot create or update JetStream stream `{name}`: {source}")]
    Stream {
        name: String,
        #[source]
        source: jetstream::context::CreateStreamError,
    },
    #[error("publishing to JetStream failed: {0}")]
    Publish(#[from] jetstream::context::PublishError),
    #[error("encoding an event failed: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("SLUICE_STREAM_REPLICAS must be a whole number from 1 to 5, not `{0}`")]
    Replicas(String),
}

/// How long stored chunks stay available for resumed streams.
pub const CHUNKS_MAX_AGE: Duration = Duration::from_secs(10 * 60);
/// Queued requests nobody took within this long are dropped by JetStream.
pub const REQUESTS_MAX_AGE: Duration = Duration::from_secs(10 * 60);
/// Events stay in JetStream this long after being published; the journal must catch up
/// within it (it copies them to Postgres in milliseconds when running).
pub const EVENTS_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// Republishing the same event id within this window is deduplicated by JetStream.
pub const DEDUPE_WINDOW: Duration = Duration::from_secs(120);

/// Stream replicas, from `SLUICE_STREAM_REPLICAS` (default 1). On a NATS cluster, 3
/// keeps every stream through the loss of one server. Every role that creates or updates
/// the streams reads the same variable, so none of them scales a stream back down.
pub fn stream_replicas() -> Result<usize, BusError> {
    replicas_from(std::env::var("SLUICE_STREAM_REPLICAS").ok().as_deref())
}

fn replicas_from(value: Option<&str>) -> Result<usize, BusError> {
    match value.map(str::trim).filter(|v| !v.is_empty()) {
        None => Ok(1),
        Some(v) => match v.parse::<usize>() {
            Ok(n @ 1..=5) => Ok(n),
            _ => Err(BusError::Replicas(v.to_owned())),
        },
    }
}

/// Connects with TCP_NODELAY-friendly defaults and retries on reconnect forever, so a
/// NATS restart is survived by every role. `url` may list several servers of a cluster,
/// comma-separated: the first reachable one is used, the others are fallbacks.
pub async fn connect(url: &str, name: &str) -> Result<async_nats::Client, BusError> {
    let servers: Vec<&str> = url
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(5))
        .connect(servers)
        .await
        .map_err(|source| BusError::Connect {
            url: url.to_owned(),
            source,
        })
}

/// Creates (or updates) `<NS>_REQUESTS`, `<NS>_CHUNKS` and `<NS>_EVENTS`.
pub async fn ensure_streams(js: &jetstream::Context, ns: &Namespace) -> Result<(), BusError> {
    let num_replicas = stream_replicas()?;
    let configs = [
        stream::Config {
            name: ns.requests_stream(),
            subjects: vec![ns.requests_wildcard()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            num_replicas,
            max_age: REQUESTS_MAX_AGE,
            duplicate_window: DEDUPE_WINDOW,
            ..Default::default()
        },
        stream::Config {
            name: ns.chunks_stream(),
            subjects: vec![ns.chunks_wildcard()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            num_replicas,
            max_age: CHUNKS_MAX_AGE,
            allow_direct: true,
            ..Default::default()
        },
        stream::Config {
            name: ns.events_stream(),
            subjects: vec![ns.events_wildcard()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            num_replicas,
            max_age: EVENTS_MAX_AGE,
            duplicate_window: DEDUPE_WINDOW,
            allow_direct: true,
            ..Default::default()
        },
    ];
    for config in configs {
        let name = config.name.clone();
        js.create_or_update_stream(config)
            .await
            .map_err(|source| BusError::Stream { name, source })?;
    }
    Ok(())
}

/// Publishes an event to `<NS>_EVENTS` with `Nats-Msg-Id` = event id and returns the ack
/// future: callers that must know the event is stored (a terminal event before acking
/// the request) await it; others may await it later.
pub async fn publish_event(
    js: &jetstream::Context,
    ns: &Namespace,
    envelope: &Envelope,
) -> Result<jetstream::context::PublishAckFuture, BusError> {
    let payload = serde_json::to_vec(envelope)?;
    let mut publish = PublishMessage::build()
        .payload(payload.into())
        .message_id(envelope.event_id.to_string());
    // The request's trace id travels in a W3C header too, for tools reading NATS directly;
    // the parent id is the event id's random tail. Only a well-formed id becomes a header.
    let trace_id = envelope.metadata.trace_id.as_deref();
    if let Some(trace_id) =
        trace_id.filter(|t| t.len() == 32 && t.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        let span = envelope.event_id.simple().to_string();
        publish = publish.header("traceparent", format!("00-{trace_id}-{}-01", &span[16..]));
    }
    Ok(js
        .send_publish(ns.event_subject(&envelope.stream), publish)
        .await?)
}

/// Deletes a namespace's streams. Used by tests to clean up after themselves.
pub async fn delete_streams(js: &jetstream::Context, ns: &Namespace) {
    for name in [ns.requests_stream(), ns.chunks_stream(), ns.events_stream()] {
        let _ = js.delete_stream(name).await;
    }
    let _ = js.delete_key_value(ns.channel_health_bucket()).await;
    let _ = js.delete_key_value(ns.nodes_bucket()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_replicas_default_to_one_and_reject_nonsense() {
        assert_eq!(replicas_from(None).ok(), Some(1));
        assert_eq!(replicas_from(Some("")).ok(), Some(1));
        assert_eq!(replicas_from(Some(" 3 ")).ok(), Some(3));
        for bad in ["0", "6", "three", "-1"] {
            let err = replicas_from(Some(bad)).expect_err(bad).to_string();
            assert!(
                err.contains("SLUICE_STREAM_REPLICAS") && err.contains(bad),
                "{err}"
            );
        }
    }
}
