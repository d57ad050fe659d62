//! The crate's boundary error: what can stop `run_worker` itself. Failures of single
//! requests never surface here; they end as `RequestFailed` events and error frames.

use async_nats::jetstream;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Bus(#[from] projector::bus::BusError),
    #[error("cannot open JetStream stream `{name}`: {source}")]
    Stream {
        name: String,
        #[source]
        source: jetstream::context::GetStreamError,
    },
    #[error("cannot create or bind the workers consumer `{name}`: {source}")]
    Consumer {
        name: String,
        #[source]
        source: jetstream::stream::ConsumerError,
    },
    #[error("cannot start pulling requests: {0}")]
    Pull(#[from] jetstream::consumer::StreamError),
    #[error("cannot build the HTTP client for upstream calls: {0}")]
    Http(#[from] reqwest::Error),
    #[error("loading channels failed: {0}")]
    Channels(#[from] crate::channels::ChannelsError),
    #[error(transparent)]
    Health(#[from] crate::health::HealthError),
    #[error("cannot subscribe to the cancel subject: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
}
