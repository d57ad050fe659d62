//! Gemini: `POST {base_url}/v1beta/models/{model}:generateContent` (or
//! `:streamGenerateContent?alt=sse`) with `x-goog-api-key`. Requests are translated from
//! OpenAI chat (Anthropic Messages first become OpenAI chat), answers become canonical
//! OpenAI chunks ([`crate::translate::gemini`]).

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use eventsource_stream::{EventStream, Eventsource};
use futures::{Stream, StreamExt};
use reqwest::header::CONTENT_TYPE;
use router::Channel;
use schemas::work::{Api, ErrorKind};
use serde_json::Value;

use super::openai::BodyStream;
use super::{Reply, UpstreamError, UpstreamRequest};
use crate::translate::{anthropic, gemini};

pub const PROVIDER_TYPE: &str = "gemini";
/// The host root, as Google's SDK takes it; the adapter adds `/v1beta/models/...`.
pub const DEFAULT_BASE_URL: &str = "https://generativelanguage.googleapis.com";

#[derive(Debug, Clone)]
pub struct GeminiAdapter {
    http: reqwest::Client,
}

fn encode_error(e: impl std::fmt::Display) -> UpstreamError {
    UpstreamError::new(
        PROVIDER_TYPE,
        ErrorKind::Internal,
        format!("cannot encode the request: {e}"),
    )
}

/// The upstream body for the client's API.
fn body(req: UpstreamRequest<'_>) -> Result<Vec<u8>, UpstreamError> {
    let client: Value = serde_json::from_str(req.body.to_json()).map_err(encode_error)?;
    let chat = match req.api {
        Api::Messages => anthropic::request::anthropic_to_openai(&client)
            .map_err(|e| UpstreamError::translation(PROVIDER_TYPE, e))?,
        _ => client,
    };
    let g = gemini::openai_to_gemini(&chat)
        .map_err(|e| UpstreamError::translation(PROVIDER_TYPE, e))?;
    serde_json::to_vec(&g).map_err(encode_error)
}

impl GeminiAdapter {
    pub fn new(http: reqwest::Client) -> Self {
        Self { http }
    }

    pub async fn send(
        &self,
        channel: &Channel,
        req: UpstreamRequest<'_>,
    ) -> Result<Reply, UpstreamError> {
        if matches!(req.api, Api::Embeddings | Api::Images) {
            return Err(super::unsupported_api(PROVIDER_TYPE, req.api));
        }
        let base = channel.base_url.as_deref().unwrap_or(DEFAULT_BASE_URL);
        let method = if req.stream {
            "streamGenerateContent?alt=sse"
        } else {
            "generateContent"
        };
        let url = format!(
            "{}/v1beta/models/{}:{method}",
            base.trim_end_matches('/'),
            req.upstream_model
        );
        let mut call = self
            .http
            .post(url)
            .header(CONTENT_TYPE, "application/json")
            .body(body(req)?);
        if let Some(key) = &channel.api_key {
            call = call.header("x-goog-api-key", key);
        }
        let resp = call
            .send()
            .await
            .map_err(|e| UpstreamError::from_reqwest(PROVIDER_TYPE, e))?;
        let status = resp.status();
        if !status.is_success() {
            let header = super::retry_after(resp.headers());
            let body = resp.bytes().await.unwrap_or_default();
            let retry_after = header.or_else(|| retry_delay(&body));
            let mut e =
                UpstreamError::from_status(PROVIDER_TYPE, status.as_u16(), retry_after, &body);
            // Google answers a bad key with 400 INVALID_ARGUMENT.
            if e.message.contains("API key not valid") {
                e.kind = ErrorKind::Auth;
            }
            return Err(e);
        }
        if req.stream {
            return Ok(Reply::Stream(super::ChunkStream::Gemini(Box::new(
                GeminiStream::new(resp),
            ))));
        }
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| UpstreamError::from_reqwest(PROVIDER_TYPE, e))?;
        let value: Value = serde_json::from_slice(&bytes).map_err(|e| {
            UpstreamError::new(
                PROVIDER_TYPE,
                ErrorKind::Upstream5xx,
                format!("the upstream answered with invalid JSON: {e}"),
            )
        })?;
        Ok(Reply::Complete(gemini::response_to_completion(&value)))
    }
}

/// Seconds from a `google.rpc.RetryInfo` detail (`"retryDelay": "37s"`), rounded up.
fn retry_delay(body: &[u8]) -> Option<u64> {
    let v: Value = serde_json::from_slice(body).ok()?;
    v.pointer("/error/details")?
        .as_array()?
        .iter()
        .find_map(|d| {
            d.get("retryDelay")?
                .as_str()?
                .strip_suffix('s')?
                .parse::<f64>()
                .ok()
        })
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(|s| s.ceil() as u64)
}

/// A Gemini SSE stream as OpenAI chunks. Gemini has no end marker: the stream is complete
/// when a chunk carried a `finishReason` before EOF.
pub struct GeminiStream {
    events: EventStream<BodyStream>,
    to_chunks: gemini::ToChunks,
    pending: VecDeque<Value>,
    finished: bool,
    eof: bool,
}

impl GeminiStream {
    fn new(resp: reqwest::Response) -> Self {
        let body: BodyStream = Box::pin(resp.bytes_stream());
        Self {
            events: body.eventsource(),
            to_chunks: gemini::ToChunks::default(),
            pending: VecDeque::new(),
            finished: false,
            eof: false,
        }
    }

    pub fn finished_cleanly(&self) -> bool {
        self.finished
    }

    pub async fn release(mut self, limit: Duration) {
        if self.eof {
            return;
        }
        let drain = async { while self.events.next().await.is_some() {} };
        let _ = tokio::time::timeout(limit, drain).await;
    }
}

impl Stream for GeminiStream {
    type Item = Result<Value, UpstreamError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(v) = self.pending.pop_front() {
                return Poll::Ready(Some(Ok(v)));
            }
            if self.eof {
                return Poll::Ready(None);
            }
            let event = match ready!(self.events.poll_next_unpin(cx)) {
                None => {
                    self.eof = true;
                    return Poll::Ready(None);
                }
                Some(Err(e)) => {
                    self.eof = true;
                    return Poll::Ready(Some(Err(UpstreamError::from_event_stream(
                        PROVIDER_TYPE,
                        e,
                    ))));
                }
                Some(Ok(event)) => event,
            };
            if event.data.trim().is_empty() {
                continue;
            }
            let value: Value = match serde_json::from_str(&event.data) {
                Ok(v) => v,
                Err(e) => {
                    return Poll::Ready(Some(Err(UpstreamError::new(
                        PROVIDER_TYPE,
                        ErrorKind::Upstream5xx,
                        format!("the upstream sent an invalid chunk: {e}"),
                    ))))
                }
            };
            if let Some(err) = value.get("error") {
                self.eof = true;
                let code = err["code"]
                    .as_u64()
                    .and_then(|c| u16::try_from(c).ok())
                    .unwrap_or(500);
                let body = serde_json::to_vec(&value).unwrap_or_default();
                let mut e = UpstreamError::from_status(PROVIDER_TYPE, code, None, &body);
                e.status = None;
                return Poll::Ready(Some(Err(e)));
            }
            if value.pointer("/candidates/0/finishReason").is_some() {
                self.finished = true;
            }
            let this = &mut *self;
            this.pending.extend(this.to_chunks.event(&value));
        }
    }
}
