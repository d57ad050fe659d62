//! Provider adapters: how a channel's upstream is called and how its answer becomes
//! OpenAI-shaped chunks, the canonical form the workers publish.
//!
//! Dispatch is an enum chosen from the channel's `channel_type` ([`Adapter::for_channel`]),
//! not a trait object, so the hot path has no virtual calls and adding a provider means a
//! new variant and a new module of the same shape as [`openai`]: `PROVIDER_TYPE`, a body
//! builder, a call, a stream type and tests at the bottom.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use router::Channel;

mod body;
mod error;
pub mod openai;

pub use body::RequestBody;
pub use error::{retry_after, UpstreamError};

/// The channel's `channel_type` names no adapter this worker has.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("channel type `{0}` is not supported by this worker (supported: openai, mock)")]
pub struct UnsupportedChannelType(pub String);

/// The one HTTP client every upstream call goes through: connections are pooled and kept
/// alive across requests (a TLS handshake per request would cost more CPU than the whole
/// gateway budget), `TCP_NODELAY` avoids the 40 ms Nagle/delayed-ACK stall on small
/// request bodies, and a connect timeout turns a dead host into a fast failover.
pub fn http_client() -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_keepalive(Duration::from_secs(30))
        .build()
}

/// What an adapter needs to make one attempt.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamRequest<'a> {
    /// The client's body, parsed once per request and shared by its attempts.
    pub body: &'a RequestBody<'a>,
    /// The channel's name for the model (after `model_map`).
    pub upstream_model: &'a str,
    pub stream: bool,
}

/// A successful answer's head: either a stream of chunks still to read, or the whole
/// non-streaming body.
pub enum Reply {
    Stream(ChunkStream),
    /// An OpenAI `chat.completion` object.
    Complete(serde_json::Value),
}

/// An adapter, selected per channel.
#[derive(Debug, Clone)]
pub enum Adapter {
    OpenAi(openai::OpenAiAdapter),
}

impl Adapter {
    /// The adapter for a channel: `openai`, and `mock` (the built-in mock upstream speaks
    /// OpenAI's wire format exactly). `http` is the shared client; cloning it is cheap.
    pub fn for_channel(
        channel: &Channel,
        http: &reqwest::Client,
    ) -> Result<Adapter, UnsupportedChannelType> {
        match channel.channel_type.as_str() {
            openai::PROVIDER_TYPE | "mock" => {
                Ok(Adapter::OpenAi(openai::OpenAiAdapter::new(http.clone())))
            }
            other => Err(UnsupportedChannelType(other.to_owned())),
        }
    }

    /// The adapter's `PROVIDER_TYPE`, for errors raised around a call.
    pub fn provider(&self) -> &'static str {
        match self {
            Adapter::OpenAi(_) => openai::PROVIDER_TYPE,
        }
    }

    /// Calls the upstream and returns once it answered (a stream's headers arrived) or
    /// failed. Dropping the future aborts the call, so callers can race it with a deadline.
    pub async fn send(
        &self,
        channel: &Channel,
        req: UpstreamRequest<'_>,
    ) -> Result<Reply, UpstreamError> {
        match self {
            Adapter::OpenAi(a) => a.send(channel, req).await,
        }
    }
}

/// Chunks of a streaming answer as OpenAI `chat.completion.chunk` JSON values, each parsed
/// exactly once. The stream ends (`None`) at the provider's end marker or at EOF; which of
/// the two it was is [`ChunkStream::finished_cleanly`].
pub enum ChunkStream {
    OpenAi(openai::OpenAiStream),
}

impl ChunkStream {
    /// The adapter's `PROVIDER_TYPE`, for errors the relay raises about this stream.
    pub fn provider(&self) -> &'static str {
        match self {
            ChunkStream::OpenAi(_) => openai::PROVIDER_TYPE,
        }
    }

    /// Whether the provider sent its end marker (`[DONE]`), as opposed to just closing.
    pub fn finished_cleanly(&self) -> bool {
        match self {
            ChunkStream::OpenAi(s) => s.finished_cleanly(),
        }
    }

    /// Reads what is left of the response body (normally just the chunked-encoding
    /// trailer after `[DONE]`) for at most `limit`, so the connection goes back to the pool
    /// instead of being closed.
    pub async fn release(self, limit: Duration) {
        match self {
            ChunkStream::OpenAi(s) => s.release(limit).await,
        }
    }
}

impl Stream for ChunkStream {
    type Item = Result<serde_json::Value, UpstreamError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.get_mut() {
            ChunkStream::OpenAi(s) => Pin::new(s).poll_next(cx),
        }
    }
}
