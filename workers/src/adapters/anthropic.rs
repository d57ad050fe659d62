//! Anthropic Messages: `POST {base_url}/v1/messages` with `x-api-key` and
//! `anthropic-version`. For an Anthropic client the body and the answer pass through
//! natively; for an OpenAI client they are translated ([`crate::translate::anthropic`]).

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
use super::{Reply, RequestBody, UpstreamError, UpstreamRequest};
use crate::translate::anthropic::{request, response, stream::ToChunks};

pub const PROVIDER_TYPE: &str = "anthropic";
/// The host root, as Anthropic's SDK takes it; the adapter adds `/v1/messages`.
pub const DEFAULT_BASE_URL: &str = "https://api.anthropic.com";
pub const API_VERSION: &str = "2023-06-01";

#[derive(Debug, Clone)]
pub struct AnthropicAdapter {
    http: reqwest::Client,
}

fn encode_error(e: impl std::fmt::Display) -> UpstreamError {
    UpstreamError::new(
        PROVIDER_TYPE,
        ErrorKind::Internal,
        format!("cannot encode the request: {e}"),
    )
}

impl AnthropicAdapter {
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
        let native = req.api == Api::Messages;
        let body = if native {
            native_body(req.body, req.upstream_model, req.stream).map_err(encode_error)?
        } else {
            let client: Value = serde_json::from_str(req.body.to_json()).map_err(encode_error)?;
            let translated = request::openai_to_anthropic(&client, req.upstream_model, req.stream)
                .map_err(|e| UpstreamError::translation(PROVIDER_TYPE, e))?;
            serde_json::to_vec(&translated).map_err(encode_error)?
        };
        let base = channel.base_url.as_deref().unwrap_or(DEFAULT_BASE_URL);
        let url = format!("{}/v1/messages", base.trim_end_matches('/'));
        let mut call = self
            .http
            .post(url)
            .header(CONTENT_TYPE, "application/json")
            .header("anthropic-version", API_VERSION)
            .body(body);
        if let Some(key) = &channel.api_key {
            call = call.header("x-api-key", key);
        }
        if native {
            for (name, value) in req.forward_headers {
                if name == "anthropic-beta" {
                    call = call.header("anthropic-beta", value);
                }
            }
        }
        let resp = call
            .send()
            .await
            .map_err(|e| UpstreamError::from_reqwest(PROVIDER_TYPE, e))?;
        let status = resp.status();
        if !status.is_success() {
            let retry_after = super::retry_after(resp.headers());
            let body = resp.bytes().await.unwrap_or_default();
            return Err(UpstreamError::from_status(
                PROVIDER_TYPE,
                status.as_u16(),
                retry_after,
                &body,
            ));
        }
        if req.stream {
            return Ok(Reply::Stream(super::ChunkStream::Anthropic(Box::new(
                AnthropicStream::new(resp, native),
            ))));
        }
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| UpstreamError::from_reqwest(PROVIDER_TYPE, e))?;
        let message: Value = serde_json::from_slice(&bytes).map_err(|e| {
            UpstreamError::new(
                PROVIDER_TYPE,
                ErrorKind::Upstream5xx,
                format!("the upstream answered with invalid JSON: {e}"),
            )
        })?;
        Ok(Reply::Complete(if native {
            message
        } else {
            response::message_to_completion(&message)
        }))
    }
}

/// The client's Messages body with `model` set to the upstream's name and `stream` to what
/// the attempt needs; every other field is copied byte for byte (thinking blocks and their
/// signatures must reach Anthropic unchanged).
pub fn native_body(
    body: &RequestBody<'_>,
    upstream_model: &str,
    stream: bool,
) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = Vec::with_capacity(body.raw_len() + upstream_model.len() + 32);
    out.extend_from_slice(b"{\"model\":");
    serde_json::to_writer(&mut out, upstream_model)?;
    for (key, value) in body.fields() {
        if matches!(key, "model" | "stream") {
            continue;
        }
        out.push(b',');
        serde_json::to_writer(&mut out, key)?;
        out.push(b':');
        out.extend_from_slice(value.get().as_bytes());
    }
    if stream {
        out.extend_from_slice(b",\"stream\":true");
    }
    out.push(b'}');
    Ok(out)
}

/// The kind of an Anthropic error `type` (in an `error` event or body).
pub fn kind_of(error_type: &str) -> ErrorKind {
    match error_type {
        "overloaded_error" => ErrorKind::Overloaded,
        "rate_limit_error" => ErrorKind::RateLimited,
        "authentication_error" | "permission_error" => ErrorKind::Auth,
        "invalid_request_error" | "not_found_error" | "request_too_large" => ErrorKind::BadRequest,
        "timeout_error" => ErrorKind::Timeout,
        _ => ErrorKind::Upstream5xx,
    }
}

/// An Anthropic event stream. Native: the events themselves (pings dropped, the ingress
/// keeps idle streams alive itself), ending after `message_stop`. Translated: the OpenAI
/// chunks they become. An `error` event becomes an error either way.
pub struct AnthropicStream {
    events: EventStream<BodyStream>,
    /// `None` = native pass-through.
    to_chunks: Option<ToChunks>,
    pending: VecDeque<Value>,
    saw_stop: bool,
    eof: bool,
}

impl AnthropicStream {
    fn new(resp: reqwest::Response, native: bool) -> Self {
        let body: BodyStream = Box::pin(resp.bytes_stream());
        Self {
            events: body.eventsource(),
            to_chunks: (!native).then(ToChunks::default),
            pending: VecDeque::new(),
            saw_stop: false,
            eof: false,
        }
    }

    pub fn finished_cleanly(&self) -> bool {
        self.saw_stop
    }

    pub async fn release(mut self, limit: Duration) {
        if self.eof {
            return;
        }
        let drain = async { while self.events.next().await.is_some() {} };
        let _ = tokio::time::timeout(limit, drain).await;
    }
}

fn stream_error(event: &Value) -> UpstreamError {
    let err = &event["error"];
    let kind = kind_of(err["type"].as_str().unwrap_or_default());
    let message = err["message"]
        .as_str()
        .unwrap_or("the upstream reported an error mid-stream");
    UpstreamError::new(PROVIDER_TYPE, kind, message)
}

impl Stream for AnthropicStream {
    type Item = Result<Value, UpstreamError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(v) = self.pending.pop_front() {
                return Poll::Ready(Some(Ok(v)));
            }
            if self.saw_stop || self.eof {
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
                        format!("the upstream sent an invalid event: {e}"),
                    ))))
                }
            };
            match value.get("type").and_then(Value::as_str) {
                Some("ping") => continue,
                Some("error") => {
                    self.eof = true;
                    return Poll::Ready(Some(Err(stream_error(&value))));
                }
                Some("message_stop") => self.saw_stop = true,
                _ => {}
            }
            let this = &mut *self;
            match &mut this.to_chunks {
                None => return Poll::Ready(Some(Ok(value))),
                Some(decoder) => this.pending.extend(decoder.event(&value)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use serde_json::value::RawValue;

    #[test]
    fn native_body_keeps_every_other_byte() {
        let text = r#"{"model":"claude","max_tokens":9,"messages":[{"role":"assistant","content":[{"type":"thinking","thinking":"a\u00e9","signature":"EqX=="}]}],"stream":false}"#;
        let raw = RawValue::from_string(text.to_owned()).expect("raw");
        let body = RequestBody::parse(&raw).expect("object");
        let out = String::from_utf8(native_body(&body, "claude-up", true).expect("encode"))
            .expect("utf8");
        assert_eq!(
            out,
            r#"{"model":"claude-up","max_tokens":9,"messages":[{"role":"assistant","content":[{"type":"thinking","thinking":"a\u00e9","signature":"EqX=="}]}],"stream":true}"#
        );
    }

    #[test]
    fn error_events_are_classified() {
        let e = stream_error(
            &json!({"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}),
        );
        assert_eq!(
            (e.kind, e.message.as_str(), e.status),
            (ErrorKind::Overloaded, "Overloaded", None)
        );
        assert_eq!(kind_of("rate_limit_error"), ErrorKind::RateLimited);
        assert_eq!(kind_of("api_error"), ErrorKind::Upstream5xx);
    }
}
