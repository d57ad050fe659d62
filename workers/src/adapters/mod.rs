//! Provider adapters: how a channel's upstream is called and how its answer becomes
//! OpenAI-shaped chunks (the canonical form), or stays native when the client speaks the
//! channel's protocol. See `README.md` here for the translation design.
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
use schemas::work::Api;

pub mod anthropic;
mod body;
mod error;
pub mod gemini;
pub mod openai;
pub mod presets;

pub use body::RequestBody;
pub use error::{retry_after, UpstreamError};

/// The channel's `channel_type` names no adapter this worker has.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("channel type `{0}` is not supported by this worker (supported: anthropic and the OpenAI-compatible presets in `adapters::presets`)")]
pub struct UnsupportedChannelType(pub String);

/// A client API this channel type does not serve (embeddings on an Anthropic channel):
/// the caller's 400, naming the channel type.
pub fn unsupported_api(provider: &'static str, api: Api) -> UpstreamError {
    let what = match api {
        Api::Embeddings => "embeddings",
        Api::Images => "image generations",
        _ => "this API",
    };
    let e = crate::translate::TranslateError::new(
        format!("`{provider}` channels do not serve {what}; route this model to an OpenAI-compatible channel"),
        Some("model"),
    );
    UpstreamError::translation(provider, e)
}

/// The one HTTP client every upstream call goes through: connections are pooled and kept
/// alive across requests (a TLS handshake per request would cost more CPU than the whole
/// gateway budget), `TCP_NODELAY` avoids the 40 ms Nagle/delayed-ACK stall on small
/// request bodies, and a connect timeout turns a dead host into a fast failover.
pub fn http_client() -> Result<reqwest::Client, reqwest::Error> {
    http_client_with_connect(Duration::from_secs(10))
}

/// [`http_client`] with another connect timeout.
pub fn http_client_with_connect(connect: Duration) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .tcp_nodelay(true)
        .connect_timeout(connect)
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_keepalive(Duration::from_secs(30))
        .build()
}

/// Clients for channels whose `timeouts.connect_secs` differs from the worker's default.
/// reqwest sets the connect timeout per client, so each distinct value gets one client
/// (and its own connection pool), built on first use; deployments use a handful at most.
#[derive(Debug)]
pub struct ConnectClients {
    default: Duration,
    by_secs: std::sync::Mutex<std::collections::HashMap<u64, reqwest::Client>>,
}

impl ConnectClients {
    pub fn new(default: Duration) -> Self {
        Self {
            default,
            by_secs: Default::default(),
        }
    }

    /// The client to use for a connect timeout of `connect`: `shared` for the default.
    /// A client that cannot be built (it never fails with these settings) falls back to
    /// `shared`, logged.
    pub fn get(&self, connect: Duration, shared: &reqwest::Client) -> reqwest::Client {
        if connect == self.default {
            return shared.clone();
        }
        let mut map = self.by_secs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(client) = map.get(&connect.as_secs()) {
            return client.clone();
        }
        match http_client_with_connect(connect) {
            Ok(client) => {
                map.insert(connect.as_secs(), client.clone());
                client
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot build an HTTP client; using the default connect timeout");
                shared.clone()
            }
        }
    }
}

/// What an adapter needs to make one attempt.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamRequest<'a> {
    /// The client's body, parsed once per request and shared by its attempts.
    pub body: &'a RequestBody<'a>,
    /// The channel's name for the model (after `model_map`).
    pub upstream_model: &'a str,
    pub stream: bool,
    /// The client's API: the body is in its format, and adapters of another protocol
    /// translate it.
    pub api: Api,
    /// Client headers for an upstream of the client's own protocol (`anthropic-beta`).
    pub forward_headers: &'a [(String, String)],
}

/// A successful answer's head: either a stream of chunks still to read, or the whole
/// non-streaming body.
pub enum Reply {
    Stream(ChunkStream),
    /// An OpenAI `chat.completion` object, or the provider's own answer when the adapter
    /// [speaks](Adapter::speaks) the client's API.
    Complete(serde_json::Value),
}

/// Why a channel gets no adapter: its type is unknown, or it is a personal channel whose
/// `base_url` is not a public address ([`crate::egress`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelSetupError {
    #[error(transparent)]
    Unsupported(#[from] UnsupportedChannelType),
    #[error(transparent)]
    Egress(#[from] crate::egress::EgressError),
}

/// An adapter, selected per channel.
#[derive(Debug, Clone)]
pub enum Adapter {
    OpenAi(openai::OpenAiAdapter),
    Anthropic(anthropic::AnthropicAdapter),
    Gemini(gemini::GeminiAdapter),
}

impl Adapter {
    /// The adapter for a channel: `anthropic`, `gemini`, or an OpenAI-compatible preset (`openai`,
    /// `azure`, `deepseek`, ..., and `mock`, the built-in mock upstream).
    /// `http` is the shared client; cloning it is cheap. A personal channel restricted to
    /// public addresses ([`crate::egress::restricted`]) gets the egress-guarded client
    /// instead, after its URL's literal IP, if any, is checked.
    pub fn for_channel(
        channel: &Channel,
        http: &reqwest::Client,
    ) -> Result<Adapter, ChannelSetupError> {
        let guarded;
        let http = if crate::egress::restricted(channel) {
            let url = crate::egress::effective_base_url(
                &channel.channel_type,
                channel.base_url.as_deref(),
            );
            if let Some(url) = url {
                crate::egress::check_literal(url)?;
            }
            guarded = crate::egress::public_client()?;
            &guarded
        } else {
            http
        };
        match channel.channel_type.as_str() {
            anthropic::PROVIDER_TYPE => Ok(Adapter::Anthropic(anthropic::AnthropicAdapter::new(
                http.clone(),
            ))),
            gemini::PROVIDER_TYPE => Ok(Adapter::Gemini(gemini::GeminiAdapter::new(http.clone()))),
            other => match presets::find(other) {
                Some(preset) => Ok(Adapter::OpenAi(openai::OpenAiAdapter::new(
                    http.clone(),
                    preset,
                ))),
                None => Err(UnsupportedChannelType(other.to_owned()).into()),
            },
        }
    }

    /// The adapter's `PROVIDER_TYPE`, for errors raised around a call.
    pub fn provider(&self) -> &'static str {
        match self {
            Adapter::OpenAi(_) => openai::PROVIDER_TYPE,
            Adapter::Anthropic(_) => anthropic::PROVIDER_TYPE,
            Adapter::Gemini(_) => gemini::PROVIDER_TYPE,
        }
    }

    /// Whether this adapter's protocol is the client's API, so its answers pass through
    /// natively instead of as canonical OpenAI chunks.
    pub fn speaks(&self, api: Api) -> bool {
        matches!(
            (self, api),
            (Adapter::OpenAi(_), Api::ChatCompletions) | (Adapter::Anthropic(_), Api::Messages)
        )
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
            Adapter::Anthropic(a) => a.send(channel, req).await,
            Adapter::Gemini(a) => a.send(channel, req).await,
        }
    }
}

/// Chunks of a streaming answer as OpenAI `chat.completion.chunk` JSON values, each parsed
/// exactly once. The stream ends (`None`) at the provider's end marker or at EOF; which of
/// the two it was is [`ChunkStream::finished_cleanly`].
pub enum ChunkStream {
    OpenAi(openai::OpenAiStream),
    /// Boxed: its decoder state would make every `ChunkStream` large.
    Anthropic(Box<anthropic::AnthropicStream>),
    Gemini(Box<gemini::GeminiStream>),
}

impl ChunkStream {
    /// The adapter's `PROVIDER_TYPE`, for errors the relay raises about this stream.
    pub fn provider(&self) -> &'static str {
        match self {
            ChunkStream::OpenAi(_) => openai::PROVIDER_TYPE,
            ChunkStream::Anthropic(_) => anthropic::PROVIDER_TYPE,
            ChunkStream::Gemini(_) => gemini::PROVIDER_TYPE,
        }
    }

    /// Whether the provider sent its end marker (`[DONE]`), as opposed to just closing.
    pub fn finished_cleanly(&self) -> bool {
        match self {
            ChunkStream::OpenAi(s) => s.finished_cleanly(),
            ChunkStream::Anthropic(s) => s.finished_cleanly(),
            ChunkStream::Gemini(s) => s.finished_cleanly(),
        }
    }

    /// Reads what is left of the response body (normally just the chunked-encoding
    /// trailer after `[DONE]`) for at most `limit`, so the connection goes back to the pool
    /// instead of being closed.
    pub async fn release(self, limit: Duration) {
        match self {
            ChunkStream::OpenAi(s) => s.release(limit).await,
            ChunkStream::Anthropic(s) => s.release(limit).await,
            ChunkStream::Gemini(s) => s.release(limit).await,
        }
    }
}

impl Stream for ChunkStream {
    type Item = Result<serde_json::Value, UpstreamError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.get_mut() {
            ChunkStream::OpenAi(s) => Pin::new(s).poll_next(cx),
            ChunkStream::Anthropic(s) => Pin::new(s.as_mut()).poll_next(cx),
            ChunkStream::Gemini(s) => Pin::new(s.as_mut()).poll_next(cx),
        }
    }
}
