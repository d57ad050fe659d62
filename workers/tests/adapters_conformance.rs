//! One conformance suite every (client API, channel protocol) pair must pass, expanded per
//! pair by [`conformance!`]: streamed and plain text, tool calls, usage, stop reasons, each
//! error kind, and a mid-stream disconnect. The worker runs against real NATS and Postgres
//! with a `MockUpstream` speaking the channel's real wire format; frames are read as the
//! ingress would relay them, so what is asserted is what the client's SDK receives.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{fast_options, mock_with, Harness};
use mock_upstream::{MockConfig, MockUpstream};
use schemas::work::{Api, ErrorKind, FrameKind};
use serde_json::{json, Value};
use uuid::Uuid;

const MODEL: &str = "conf-model";

/// Inserts a channel of `channel_type` pointing at `base_url`.
pub async fn add_typed_channel(h: &Harness, channel_type: &str, base_url: &str) {
    sqlx::query(
        "INSERT INTO channels (id, name, channel_type, base_url, models, model_map, priority, weight, retry) \
         VALUES ($1, $2, $3, $4, $5, '{}'::jsonb, 0, 1, 1)",
    )
    .bind(Uuid::now_v7())
    .bind(format!("{channel_type}-main"))
    .bind(channel_type)
    .bind(base_url)
    .bind(vec![MODEL.to_owned()])
    .execute(&h.pool)
    .await
    .unwrap();
}

/// The base URL a channel of this type takes for a mock.
pub fn base_url(channel_type: &str, mock: &MockUpstream) -> String {
    match channel_type {
        "anthropic" | "azure" | "gemini" => mock.root_url(),
        _ => mock.base_url(),
    }
}

/// What a client of one API sees, read back from the frames in that API's shape.
#[derive(Debug, Default)]
pub struct Seen {
    pub text: String,
    /// `(id, name, arguments JSON)` per tool call.
    pub tools: Vec<(String, String, String)>,
    /// The stop reason in the client API's own words.
    pub stop: Option<String>,
    pub output_tokens: Option<u64>,
    pub input_tokens: Option<u64>,
}

pub fn request(api: Api, stream: bool, mock: Value, tools: bool) -> Value {
    let mut body = match api {
        Api::Messages => json!({"model": MODEL, "max_tokens": 1000,
            "messages": [{"role": "user", "content": "say something predictable"}]}),
        Api::Responses => json!({"model": MODEL, "input": "say something predictable"}),
        _ => {
            json!({"model": MODEL, "messages": [{"role": "user", "content": "say something predictable"}]})
        }
    };
    body["mock"] = mock;
    if stream {
        body["stream"] = json!(true);
        if api == Api::ChatCompletions {
            body["stream_options"] = json!({"include_usage": true});
        }
    }
    if tools {
        body["tools"] = match api {
            Api::Messages => {
                json!([{"name": "lookup", "description": "look up", "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}}}])
            }
            Api::Responses => {
                json!([{"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}])
            }
            _ => {
                json!([{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}])
            }
        };
    }
    body
}

pub async fn send(h: &Harness, api: Api, body: Value) -> common::Answer {
    let mut item = h.work_item(MODEL, body);
    item.api = api;
    if matches!(api, Api::Messages | Api::Responses) {
        item.include_usage = true;
    }
    let mut sub = h.subscribe_and_queue(&item).await;
    common::read_answer(item.request_id, &mut sub).await
}

/// Reads the frames as the client's SDK would.
pub fn seen(api: Api, a: &common::Answer) -> Seen {
    let mut s = Seen::default();
    let mut args: Vec<String> = Vec::new();
    for f in &a.frames {
        let v: Value = serde_json::from_str(f.data.get()).unwrap();
        match (api, f.kind) {
            (Api::Messages, FrameKind::Chunk) => {
                assert_eq!(
                    f.event.as_deref(),
                    v["type"].as_str(),
                    "every Anthropic event is named after its type"
                );
                match v["type"].as_str().unwrap() {
                    "message_start" => {
                        assert_eq!(v["message"]["model"], MODEL);
                        s.input_tokens = v["message"]["usage"]["input_tokens"].as_u64();
                    }
                    "content_block_start" if v["content_block"]["type"] == "tool_use" => {
                        let b = &v["content_block"];
                        s.tools.push((
                            b["id"].as_str().unwrap().into(),
                            b["name"].as_str().unwrap().into(),
                            String::new(),
                        ));
                        args.push(String::new());
                    }
                    "content_block_delta" => match v["delta"]["type"].as_str().unwrap() {
                        "text_delta" => s.text.push_str(v["delta"]["text"].as_str().unwrap()),
                        "input_json_delta" => args
                            .last_mut()
                            .unwrap()
                            .push_str(v["delta"]["partial_json"].as_str().unwrap()),
                        _ => {}
                    },
                    "message_delta" => {
                        s.stop = v["delta"]["stop_reason"].as_str().map(str::to_owned);
                        s.output_tokens = v["usage"]["output_tokens"].as_u64();
                        if let Some(n) = v["usage"]["input_tokens"].as_u64() {
                            s.input_tokens = Some(n);
                        }
                    }
                    _ => {}
                }
            }
            (Api::Messages, FrameKind::Response) => {
                assert_eq!(v["type"], "message");
                assert_eq!(v["model"], MODEL);
                for b in v["content"].as_array().unwrap() {
                    match b["type"].as_str().unwrap() {
                        "text" => s.text.push_str(b["text"].as_str().unwrap()),
                        "tool_use" => s.tools.push((
                            b["id"].as_str().unwrap().into(),
                            b["name"].as_str().unwrap().into(),
                            b["input"].to_string(),
                        )),
                        _ => {}
                    }
                }
                s.stop = v["stop_reason"].as_str().map(str::to_owned);
                s.output_tokens = v["usage"]["output_tokens"].as_u64();
                s.input_tokens = v["usage"]["input_tokens"].as_u64();
            }
            (Api::Responses, FrameKind::Chunk) => {
                assert_eq!(
                    f.event.as_deref(),
                    v["type"].as_str(),
                    "every Responses event is named after its type"
                );
                match v["type"].as_str().unwrap() {
                    "response.created" => assert_eq!(v["response"]["model"], MODEL),
                    "response.output_text.delta" => s.text.push_str(v["delta"].as_str().unwrap()),
                    "response.output_item.added" if v["item"]["type"] == "function_call" => {
                        let i = &v["item"];
                        s.tools.push((
                            i["call_id"].as_str().unwrap().into(),
                            i["name"].as_str().unwrap().into(),
                            String::new(),
                        ));
                        args.push(String::new());
                    }
                    "response.function_call_arguments.delta" => args
                        .last_mut()
                        .unwrap()
                        .push_str(v["delta"].as_str().unwrap()),
                    "response.completed" | "response.incomplete" => {
                        let r = &v["response"];
                        s.stop = r["status"].as_str().map(str::to_owned);
                        s.output_tokens = r["usage"]["output_tokens"].as_u64();
                        s.input_tokens = r["usage"]["input_tokens"].as_u64();
                    }
                    _ => {}
                }
            }
            (Api::Responses, FrameKind::Response) => {
                assert_eq!(v["object"], "response");
                assert_eq!(v["model"], MODEL);
                for item in v["output"].as_array().unwrap() {
                    match item["type"].as_str().unwrap() {
                        "message" => s
                            .text
                            .push_str(item["content"][0]["text"].as_str().unwrap()),
                        "function_call" => s.tools.push((
                            item["call_id"].as_str().unwrap().into(),
                            item["name"].as_str().unwrap().into(),
                            item["arguments"].as_str().unwrap().into(),
                        )),
                        _ => {}
                    }
                }
                s.stop = v["status"].as_str().map(str::to_owned);
                s.output_tokens = v["usage"]["output_tokens"].as_u64();
                s.input_tokens = v["usage"]["input_tokens"].as_u64();
            }
            (_, FrameKind::Chunk) => {
                assert!(f.event.is_none());
                assert_eq!(v["model"], MODEL);
                if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                    s.output_tokens = u["completion_tokens"].as_u64();
                    s.input_tokens = u["prompt_tokens"].as_u64();
                }
                let Some(choice) = v["choices"].get(0) else {
                    continue;
                };
                if let Some(t) = choice["delta"]["content"].as_str() {
                    s.text.push_str(t);
                }
                for call in choice["delta"]["tool_calls"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    if let Some(id) = call["id"].as_str() {
                        s.tools.push((
                            id.into(),
                            call["function"]["name"].as_str().unwrap().into(),
                            String::new(),
                        ));
                        args.push(String::new());
                    }
                    if let Some(a) = call["function"]["arguments"].as_str() {
                        args.last_mut().unwrap().push_str(a);
                    }
                }
                if let Some(r) = choice["finish_reason"].as_str() {
                    s.stop = Some(r.to_owned());
                }
            }
            (_, FrameKind::Response) => {
                assert_eq!(v["model"], MODEL);
                let m = &v["choices"][0]["message"];
                s.text.push_str(m["content"].as_str().unwrap_or_default());
                for call in m["tool_calls"].as_array().into_iter().flatten() {
                    s.tools.push((
                        call["id"].as_str().unwrap().into(),
                        call["function"]["name"].as_str().unwrap().into(),
                        call["function"]["arguments"].as_str().unwrap().into(),
                    ));
                }
                s.stop = v["choices"][0]["finish_reason"].as_str().map(str::to_owned);
                s.output_tokens = v["usage"]["completion_tokens"].as_u64();
                s.input_tokens = v["usage"]["prompt_tokens"].as_u64();
            }
            _ => {}
        }
    }
    for (tool, a) in s.tools.iter_mut().zip(args) {
        if tool.2.is_empty() {
            tool.2 = a;
        }
    }
    s
}

/// The stop reason of a plain finish, a length cut and a tool call, in the API's words.
pub fn stops(api: Api) -> [&'static str; 3] {
    match api {
        Api::Messages => ["end_turn", "max_tokens", "tool_use"],
        // The Responses API says how the response ended, not why the model stopped.
        Api::Responses => ["completed", "incomplete", "completed"],
        _ => ["stop", "length", "tool_calls"],
    }
}

pub async fn setup(channel_type: &str, config: MockConfig) -> (Harness, MockUpstream) {
    let mut h = Harness::new().await;
    let up = mock_with(config).await;
    add_typed_channel(&h, channel_type, &base_url(channel_type, &up)).await;
    let mut opts = fast_options();
    opts.stream_idle_timeout = Duration::from_secs(1);
    opts.first_token_timeout = Duration::from_secs(1);
    // Each error case must reach the upstream; only a 429's `Retry-After` still bans (1 s).
    opts.breaker.failure_threshold = u32::MAX;
    h.start_worker(opts);
    (h, up)
}

macro_rules! conformance {
    ($name:ident, $channel:literal, $api:expr) => {
        mod $name {
            use super::*;

            const API: Api = $api;

            #[tokio::test]
            async fn text_usage_and_stop_reasons() {
                let (h, _up) = setup($channel, MockConfig::default()).await;
                for stream in [true, false] {
                    let a = send(&h, API, request(API, stream, json!({"chunks": 6}), false)).await;
                    a.assert_seq_contiguous();
                    let s = seen(API, &a);
                    assert_eq!(s.text, common::mock_text(6), "stream={stream}");
                    assert_eq!(s.stop.as_deref(), Some(stops(API)[0]), "stream={stream}");
                    assert_eq!(s.output_tokens, Some(6), "usage reaches the client, stream={stream}");
                    assert!(s.input_tokens.is_some_and(|n| n > 0), "stream={stream}: {s:?}");
                    let done = a.done();
                    assert_eq!(done.usage_source, schemas::UsageSource::Provider);
                    assert_eq!(done.usage.completion_tokens, 6);
                    let finished = h.event(a.request_id, "CompletionFinished").await;
                    assert_eq!(finished["usage"]["completion_tokens"], 6);
                }
                // A length cut: `max_tokens` below what the mock would say.
                let mut body = request(API, true, json!({"chunks": 6}), false);
                let limit = if API == Api::Responses { "max_output_tokens" } else { "max_tokens" };
                body[limit] = json!(3);
                let s = seen(API, &send(&h, API, body).await);
                assert_eq!((s.text.as_str(), s.stop.as_deref()), (common::mock_text(3).as_str(), Some(stops(API)[1])));
                h.cleanup().await;
            }

            #[tokio::test]
            async fn tool_calls_survive() {
                let (h, _up) = setup($channel, MockConfig::default()).await;
                for stream in [true, false] {
                    let a = send(&h, API, request(API, stream, json!({"chunks": 2}), true)).await;
                    let s = seen(API, &a);
                    assert_eq!(s.tools.len(), 1, "stream={stream}: {s:?}");
                    let (id, name, args) = &s.tools[0];
                    assert!(!id.is_empty());
                    assert_eq!(name, "lookup");
                    let args: Value = serde_json::from_str(args).expect("arguments are JSON");
                    assert_eq!(args, json!({"query": "tok0", "n": 1}));
                    assert_eq!(s.stop.as_deref(), Some(stops(API)[2]), "stream={stream}");
                    assert_eq!(a.done().finish_reason.as_deref(), Some("tool_calls"));
                }
                h.cleanup().await;
            }

            #[tokio::test]
            async fn error_kinds() {
                let (h, up) = setup($channel, MockConfig::default()).await;
                let cases = [
                    (401, ErrorKind::Auth, 502),
                    (400, ErrorKind::BadRequest, 400),
                    (500, ErrorKind::Upstream5xx, 502),
                    (529, ErrorKind::Overloaded, 503),
                    // Last: its `Retry-After: 1` bans the channel for a second.
                    (429, ErrorKind::RateLimited, 429),
                ];
                // Timeout: the upstream never answers.
                let e = send(&h, API, request(API, true, json!({"hang": true}), false)).await.error();
                assert_eq!(e.kind, ErrorKind::Timeout);
                for (status, kind, client_status) in cases {
                    let a = send(&h, API, request(API, true, json!({"fail_status": status}), false)).await;
                    let e = a.error();
                    assert_eq!((e.kind, e.status), (kind, client_status), "upstream {status}: {e:?}");
                    if status == 429 {
                        assert_eq!(e.retry_after, Some(1), "retry-after is kept");
                    }
                }
                // Connection: nothing listens there any more.
                up.shutdown().await;
                // Outlast the 429's one-second ban.
                tokio::time::sleep(Duration::from_millis(1100)).await;
                let e = send(&h, API, request(API, false, json!({}), false)).await.error();
                assert_eq!(e.kind, ErrorKind::Connection, "{e:?}");
                h.cleanup().await;
            }

            #[tokio::test]
            async fn mid_stream_disconnect_ends_with_an_error_after_content() {
                let (h, _up) = setup($channel, MockConfig::default()).await;
                let a = send(&h, API, request(API, true, json!({"chunks": 6, "disconnect_after": 3}), false)).await;
                let s = seen(API, &a);
                assert!(s.text.starts_with("tok0 "), "content before the cut reached the client: {s:?}");
                let e = a.error();
                assert_eq!(e.kind, ErrorKind::Connection);
                let failed = h.event(a.request_id, "RequestFailed").await;
                assert!(failed["usage"]["completion_tokens"].as_u64().is_some_and(|n| n > 0), "what was generated is billed");
                h.cleanup().await;
            }
        }
    };
}

conformance!(openai_channel_chat_client, "openai", Api::ChatCompletions);
conformance!(azure_channel_chat_client, "azure", Api::ChatCompletions);
conformance!(azure_channel_messages_client, "azure", Api::Messages);
conformance!(deepseek_channel_messages_client, "deepseek", Api::Messages);
conformance!(openai_channel_messages_client, "openai", Api::Messages);
conformance!(
    anthropic_channel_chat_client,
    "anthropic",
    Api::ChatCompletions
);
conformance!(
    anthropic_channel_messages_client,
    "anthropic",
    Api::Messages
);
conformance!(gemini_channel_chat_client, "gemini", Api::ChatCompletions);
conformance!(gemini_channel_messages_client, "gemini", Api::Messages);
conformance!(openai_channel_responses_client, "openai", Api::Responses);
conformance!(
    anthropic_channel_responses_client,
    "anthropic",
    Api::Responses
);
conformance!(gemini_channel_responses_client, "gemini", Api::Responses);
