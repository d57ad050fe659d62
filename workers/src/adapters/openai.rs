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
use schemas::work::{Api, ErrorKind};
use serde_json::value::RawValue;

use super::presets::{Auth, Preset, Quirks};
use super::{Reply, RequestBody, UpstreamError, UpstreamRequest};
use crate::translate::anthropic;

pub const PROVIDER_TYPE: &str = "openai";

/// Calls `POST {base_url}/chat/completions` (or the preset's URL) with the preset's auth.
#[derive(Debug, Clone)]
pub struct OpenAiAdapter {
    http: reqwest::Client,
    preset: &'static Preset,
}

impl OpenAiAdapter {
    pub fn new(http: reqwest::Client, preset: &'static Preset) -> Self {
        Self { http, preset }
    }

    pub async fn send(
        &self,
        channel: &Channel,
        req: UpstreamRequest<'_>,
    ) -> Result<Reply, UpstreamError> {
        if self.preset.base_url.is_empty() && channel.base_url.as_deref().unwrap_or("").is_empty() {
            // A configuration problem, said plainly instead of as a relative-URL error.
            return Err(UpstreamError::new(
                PROVIDER_TYPE,
                ErrorKind::Internal,
                format!(
                    "channel `{}` of type `{}` needs a `base_url`",
                    channel.name, self.preset.name
                ),
            ));
        }
        let endpoint = match req.api {
            Api::Embeddings => "embeddings",
            Api::Images => "images/generations",
            _ => "chat/completions",
        };
        let url = self
            .preset
            .url(channel.base_url.as_deref(), req.upstream_model, endpoint);
        let body = client_body(req, self.preset)?;
        let mut call = self
            .http
            .post(url)
            .header(CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(key) = &channel.api_key {
            call = match self.preset.auth {
                Auth::Bearer => call.bearer_auth(key),
                Auth::Header(name) => call.header(name, key),
            };
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

/// The upstream body for the client's API: an OpenAI chat body as is (see [`build_body`]),
/// an Anthropic Messages body translated first.
fn client_body(req: UpstreamRequest<'_>, preset: &Preset) -> Result<Vec<u8>, UpstreamError> {
    let encode = |e: serde_json::Error| {
        UpstreamError::new(
            PROVIDER_TYPE,
            ErrorKind::Internal,
            format!("cannot encode the request: {e}"),
        )
    };
    match req.api {
        Api::Messages => {
            let client: serde_json::Value =
                serde_json::from_str(req.body.to_json()).map_err(encode)?;
            let translated = anthropic::request::anthropic_to_openai(&client)
                .map_err(|e| UpstreamError::translation(PROVIDER_TYPE, e))?;
            let raw = RawValue::from_string(translated.to_string()).map_err(encode)?;
            let body = RequestBody::parse(&raw).map_err(encode)?;
            check_quirks(&body, preset)?;
            build_body(&body, req.upstream_model, req.stream, &preset.quirks).map_err(encode)
        }
        _ => {
            check_quirks(req.body, preset)?;
            build_body(req.body, req.upstream_model, req.stream, &preset.quirks).map_err(encode)
        }
    }
}

/// Refuses what the provider cannot take before calling it: images for a text-only
/// provider. Only then are the messages parsed.
fn check_quirks(body: &RequestBody<'_>, preset: &Preset) -> Result<(), UpstreamError> {
    if preset.quirks.vision {
        return Ok(());
    }
    let Some(messages) = body.get("messages") else {
        return Ok(());
    };
    let messages: serde_json::Value = serde_json::from_str(messages.get()).unwrap_or_default();
    let has_image = messages.as_array().into_iter().flatten().any(|m| {
        m.get("content")
            .and_then(serde_json::Value::as_array)
            .is_some_and(|parts| {
                parts.iter().any(|p| {
                    matches!(
                        p.get("type").and_then(serde_json::Value::as_str),
                        Some("image_url" | "input_image" | "image")
                    )
                })
            })
    });
    if has_image {
        let e = crate::translate::TranslateError::new(
            format!(
                "this model's channel (`{}`) accepts text only; remove the image content",
                preset.name
            ),
            Some("messages"),
        );
        return Err(UpstreamError::translation(PROVIDER_TYPE, e));
    }
    Ok(())
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
    quirks: &Quirks,
) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = Vec::with_capacity(body.raw_len() + upstream_model.len() + 64);
    out.extend_from_slice(b"{\"model\":");
    serde_json::to_writer(&mut out, upstream_model)?;
    let mut client_had_stream = false;
    let mut client_streams = false;
    let mut client_options = None;
    for (key, value) in body.fields() {
        match key {
            "model" => continue,
            "stream" => {
                client_had_stream = true;
                client_streams = value.get().trim() == "true";
                continue;
            }
            "stream_options" => {
                client_options = Some(value);
                continue;
            }
            _ => {}
        }
        out.push(b',');
        let key = match key {
            "max_completion_tokens" if !quirks.max_completion_tokens => "max_tokens",
            other => other,
        };
        serde_json::to_writer(&mut out, key)?;
        out.push(b':');
        out.extend_from_slice(value.get().as_bytes());
    }
    if stream && !quirks.stream_options {
        out.extend_from_slice(b",\"stream\":true");
    } else if stream {
        out.extend_from_slice(b",\"stream\":true,\"stream_options\":");
        let mut options = client_options
            .and_then(|v| {
                serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(v.get()).ok()
            })
            .unwrap_or_default();
        options.insert("include_usage".to_owned(), serde_json::Value::Bool(true));
        serde_json::to_writer(&mut out, &options)?;
    } else {
        // A plain client's own `stream_options` passes through (the provider judges it);
        // a stream request retried without streaming (`handler::whole`) must not carry it.
        if let Some(options) = client_options.filter(|_| quirks.stream_options && !client_streams) {
            out.extend_from_slice(b",\"stream_options\":");
            out.extend_from_slice(options.get().as_bytes());
        }
        if client_had_stream {
            out.extend_from_slice(b",\"stream\":false");
        }
    }
    out.push(b'}');
    Ok(out)
}

/// The byte stream of a response body. Boxed once per call because reqwest's stream type
/// cannot be named; nothing is allocated per chunk by it.
pub(crate) type BodyStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

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
                    return Poll::Ready(Some(Err(UpstreamError::from_event_stream(
                        PROVIDER_TYPE,
                        e,
                    ))));
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
    use serde_json::{json, Value};

    fn build_for(body: &str, model: &str, stream: bool, preset: &str) -> Value {
        let raw = RawValue::from_string(body.to_owned()).expect("raw");
        let body = RequestBody::parse(&raw).expect("object");
        let quirks = super::super::presets::find(preset).expect("preset").quirks;
        let bytes = build_body(&body, model, stream, &quirks).expect("encode");
        serde_json::from_slice(&bytes).expect("valid JSON")
    }

    fn build(body: &str, model: &str, stream: bool) -> Value {
        build_for(body, model, stream, "openai")
    }

    #[test]
    fn mistral_gets_no_stream_options_and_max_tokens() {
        let v = build_for(
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"max_completion_tokens":5,"messages":[]}"#,
            "mistral-large",
            true,
            "mistral",
        );
        assert_eq!(
            v,
            json!({"model":"mistral-large","max_tokens":5,"messages":[],"stream":true})
        );
    }

    #[test]
    fn images_to_a_text_only_provider_are_refused() {
        let raw = RawValue::from_string(
            r#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]}"#.to_owned(),
        )
        .expect("raw");
        let body = RequestBody::parse(&raw).expect("object");
        let deepseek = super::super::presets::find("deepseek").expect("preset");
        let e = check_quirks(&body, deepseek).expect_err("text only");
        assert_eq!((e.kind, e.status), (ErrorKind::BadRequest, Some(400)));
        let openai = super::super::presets::find("openai").expect("preset");
        assert!(check_quirks(&body, openai).is_ok());
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
    fn a_stream_sent_without_streaming_drops_its_stream_options() {
        let v = build(
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#,
            "up",
            false,
        );
        assert_eq!(v, json!({"model":"up","messages":[],"stream":false}));
        let v = build(
            r#"{"model":"m","stream_options":{"include_usage":true},"messages":[]}"#,
            "up",
            false,
        );
        assert_eq!(
            v["stream_options"],
            json!({"include_usage":true}),
            "a plain client's own"
        );
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
