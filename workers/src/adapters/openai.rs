//! OpenAI chat completions (and every provider that speaks it: the built-in mock, vLLM,
//! DeepSeek, ...). OpenAI's chunk format is the canonical one, so the stream needs no
//! conversion: each SSE event is parsed once into a JSON value and handed on.

use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use eventsource_stream::{EventStream, Eventsource};
use futures::{Stream, StreamExt};
use reqwest::header::CONTENT_TYPE;
use router::Channel;
use schemas::work::ErrorKind;

use super::{Reply, RequestBody, UpstreamError, UpstreamRequest};

pub const PROVIDER_TYPE: &str = "openai";
/// Used when a channel has no `base_url`; like the OpenAI SDK's, it includes `/v1`.
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

/// Calls `POST {base_url}/chat/completions` with `Authorization: Bearer <key>`.
#[derive(Debug, Clone)]
pub struct OpenAiAdapter {
    http: reqwest::Client,
}

impl OpenAiAdapter {
    pub fn new(http: reqwest::Client) -> Self {
        Self { http }
    }

    pub async fn send(
        &self,
        channel: &Channel,
        req: UpstreamRequest<'_>,
    ) -> Result<Reply, UpstreamError> {
        let base = channel.base_url.as_deref().unwrap_or(DEFAULT_BASE_URL);
        let url = format!("{}/chat/completions", base.trim_end_matches('/'));
        let body = build_body(req.body, req.upstream_model, req.stream).map_err(|e| {
            UpstreamError::new(
                PROVIDER_TYPE,
                ErrorKind::Internal,
                format!("cannot encode the request: {e}"),
            )
        })?;
        let mut call = self
            .http
            .post(url)
            .header(CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(key) = &channel.api_key {
            call = call.bearer_auth(key);
        }
        let resp = call
            .send()
            .await
            .map_err(|e| UpstreamError::from_reqwest(PROVIDER_TYPE, e))?;
        let status = resp.status();
        if !status.is_success() {
            let retry_after = super::retry_after(resp.headers());
            // An error body that cannot be read still leaves the status to classify by.
            let body = resp.bytes().await.unwrap_or_default();
            return Err(UpstreamError::from_status(
                PROVIDER_TYPE,
                status.as_u16(),
                retry_after,
                &body,
            ));
        }
        if req.stream {
            return Ok(Reply::Stream(super::ChunkStream::OpenAi(
                OpenAiStream::new(resp),
            )));
        }
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| UpstreamError::from_reqwest(PROVIDER_TYPE, e))?;
        let value = serde_json::from_slice(&bytes).map_err(|e| {
            UpstreamError::new(
                PROVIDER_TYPE,
                ErrorKind::Upstream5xx,
                format!("the upstream answered with invalid JSON: {e}"),
            )
        })?;
        Ok(Reply::Complete(value))
    }
}

/// The upstream body: the client's fields in the client's order, with `model` set to the
/// upstream model and, for streams, `stream: true` and `stream_options.include_usage`
/// forced on so the provider reports usage (the handler drops the usage chunk again when
/// the client did not ask for it). Values are copied as raw text, never re-parsed, except
/// the small `stream_options` object.
pub fn build_body(
    body: &RequestBody<'_>,
    upstream_model: &str,
    stream: bool,
) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = Vec::with_capacity(body.raw_len() + upstream_model.len() + 64);
    out.extend_from_slice(b"{\"model\":");
    serde_json::to_writer(&mut out, upstream_model)?;
    let mut client_had_stream = false;
    let mut client_options = None;
    for (key, value) in body.fields() {
        match key {
            "model" => continue,
            "stream" => {
                client_had_stream = true;
                continue;
            }
            "stream_options" if stream => {
                client_options = Some(value);
                continue;
            }
            _ => {}
        }
        out.push(b',');
        serde_json::to_writer(&mut out, key)?;
        out.push(b':');
        out.extend_from_slice(value.get().as_bytes());
    }
    if stream {
        out.extend_from_slice(b",\"stream\":true,\"stream_options\":");
        let mut options = client_options
            .and_then(|v| {
                serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(v.get()).ok()
            })
            .unwrap_or_default();
        options.insert("include_usage".to_owned(), serde_json::Value::Bool(true));
        serde_json::to_writer(&mut out, &options)?;
    } else if client_had_stream {
        out.extend_from_slice(b",\"stream\":false");
    }
    out.push(b'}');
    Ok(out)
}

/// The byte stream of a response body. Boxed once per call because reqwest's stream type
/// cannot be named; nothing is allocated per chunk by it.
type BodyStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// An OpenAI SSE stream: `data: {chunk}` events, then `data: [DONE]`. An `{"error":...}`
/// event (compatible servers report mid-stream failures that way) becomes an error.
pub struct OpenAiStream {
    events: EventStream<BodyStream>,
    saw_done: bool,
    eof: bool,
}

impl OpenAiStream {
    fn new(resp: reqwest::Response) -> Self {
        let body: BodyStream = Box::pin(resp.bytes_stream());
        Self {
            events: body.eventsource(),
            saw_done: false,
            eof: false,
        }
    }

    pub fn finished_cleanly(&self) -> bool {
        self.saw_done
    }

    pub async fn release(mut self, limit: Duration) {
        if self.eof {
            return;
        }
        let drain = async { while self.events.next().await.is_some() {} };
        let _ = tokio::time::timeout(limit, drain).await;
    }
}

impl Stream for OpenAiStream {
    type Item = Result<serde_json::Value, UpstreamError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if self.saw_done || self.eof {
                return Poll::Ready(None);
            }
            let event = match ready!(self.events.poll_next_unpin(cx)) {
                None => {
                    self.eof = true;
                    return Poll::Ready(None);
                }
                Some(Err(e)) => {
                    self.eof = true;
                    let e = match e {
                        eventsource_stream::EventStreamError::Transport(e) => {
                            UpstreamError::from_reqwest(PROVIDER_TYPE, e)
                        }
                        other => UpstreamError::new(
                            PROVIDER_TYPE,
                            ErrorKind::Upstream5xx,
                            format!("invalid event stream: {other}"),
                        ),
                    };
                    return Poll::Ready(Some(Err(e)));
                }
                Some(Ok(event)) => event,
            };
            let data = event.data.trim();
            if data == "[DONE]" {
                self.saw_done = true;
                return Poll::Ready(None);
            }
            if data.is_empty() {
                continue;
            }
            return Poll::Ready(Some(parse_chunk(data)));
        }
    }
}

fn parse_chunk(data: &str) -> Result<serde_json::Value, UpstreamError> {
    let value: serde_json::Value = serde_json::from_str(data).map_err(|e| {
        UpstreamError::new(
            PROVIDER_TYPE,
            ErrorKind::Upstream5xx,
            format!("the upstream sent an invalid chunk: {e}"),
        )
    })?;
    if value.get("choices").is_none() {
        if let Some(err) = value.get("error") {
            let body = serde_json::to_vec(&serde_json::json!({ "error": err })).unwrap_or_default();
            let mut e = UpstreamError::from_status(PROVIDER_TYPE, 500, None, &body);
            // The stream had started with 200: there is no status to pass on.
            e.status = None;
            return Err(e);
        }
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;
    use serde_json::{json, Value};

    fn build(body: &str, model: &str, stream: bool) -> Value {
        let raw = RawValue::from_string(body.to_owned()).expect("raw");
        let body = RequestBody::parse(&raw).expect("object");
        let bytes = build_body(&body, model, stream).expect("encode");
        serde_json::from_slice(&bytes).expect("valid JSON")
    }

    #[test]
    fn sets_model_and_passes_everything_else() {
        let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"temperature":0.2,"tools":[],"mock":{"chunks":3}}"#;
        assert_eq!(
            build(body, "gpt-4o-mini-2024-07-18", false),
            json!({"model":"gpt-4o-mini-2024-07-18","messages":[{"role":"user","content":"hi"}],"temperature":0.2,"tools":[],"mock":{"chunks":3}})
        );
    }

    #[test]
    fn streams_force_usage_and_keep_other_options() {
        let v = build(r#"{"model":"m","stream":true,"messages":[]}"#, "up", true);
        assert_eq!(
            v,
            json!({"model":"up","messages":[],"stream":true,"stream_options":{"include_usage":true}})
        );
        let v = build(
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":false,"other":1},"messages":[]}"#,
            "up",
            true,
        );
        assert_eq!(v["stream_options"], json!({"include_usage":true,"other":1}));
    }

    #[test]
    fn error_events_become_errors() {
        let e =
            parse_chunk(r#"{"error":{"message":"overloaded","type":"server_error","code":null}}"#)
                .expect_err("error");
        assert_eq!(
            (e.kind, e.status, e.message.as_str()),
            (ErrorKind::Upstream5xx, None, "overloaded")
        );
        assert!(parse_chunk(r#"{"choices":[],"usage":null}"#).is_ok());
        assert!(parse_chunk("not json").is_err());
    }
}
