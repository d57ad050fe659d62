//! What only the Anthropic path has: native pass-through that is byte-faithful (thinking,
//! redacted thinking, signatures, tool_use), cache read/write tokens kept for billing,
//! Anthropic's mid-stream `error` event, `anthropic-beta` forwarding; and the requests
//! that cannot be translated, refused with a 400 before any upstream call.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{fast_options, mock, Harness};
use mock_upstream::MockUpstream;
use schemas::work::{Api, ErrorKind, FrameKind};
use serde_json::{json, Value};
use uuid::Uuid;

const CLAUDE: &str = "claude-test";

async fn harness(channel_type: &str, up: &MockUpstream) -> Harness {
    let mut h = Harness::new().await;
    let base = if channel_type == "anthropic" {
        up.root_url()
    } else {
        up.base_url()
    };
    sqlx::query(
        "INSERT INTO channels (id, name, channel_type, base_url, models, model_map, priority, weight, retry) \
         VALUES ($1, 'main', $2, $3, $4, '{}'::jsonb, 0, 1, 1)",
    )
    .bind(Uuid::now_v7())
    .bind(channel_type)
    .bind(base)
    .bind(vec![CLAUDE.to_owned()])
    .execute(&h.pool)
    .await
    .unwrap();
    h.start_worker(fast_options());
    h
}

async fn send(h: &Harness, api: Api, body: Value, headers: &[(&str, &str)]) -> common::Answer {
    let mut item = h.work_item(CLAUDE, body);
    item.api = api;
    item.include_usage = true;
    item.forward_headers = headers
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let mut sub = h.subscribe_and_queue(&item).await;
    common::read_answer(item.request_id, &mut sub).await
}

/// Removes what differs between two answers to the same request: ids and the model.
fn normalize(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.remove("id");
            m.remove("model");
            m.values_mut().for_each(normalize);
        }
        Value::Array(a) => a.iter_mut().for_each(normalize),
        _ => {}
    }
}

fn thinking_request(stream: bool) -> Value {
    json!({"model": CLAUDE, "max_tokens": 1000, "stream": stream,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "tools": [{"name": "lookup", "input_schema": {"type": "object"}}],
        "messages": [{"role": "user", "content": "look it up"}],
        "mock": {"chunks": 3, "redacted_thinking": true}})
}

#[tokio::test]
async fn native_stream_and_message_match_the_provider_event_for_event() {
    let up = mock().await;
    let h = harness("anthropic", &up).await;
    let direct = reqwest::Client::new()
        .post(format!("{}/v1/messages", up.root_url()))
        .header("anthropic-version", "2023-06-01")
        .json(&thinking_request(true))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut expected: Vec<(String, Value)> = direct
        .split("\n\n")
        .filter_map(|block| {
            let event = block.lines().find_map(|l| l.strip_prefix("event: "))?;
            let data = block.lines().find_map(|l| l.strip_prefix("data: "))?;
            Some((event.to_owned(), serde_json::from_str(data).unwrap()))
        })
        // Pings are the gateway's own business (it keeps idle streams alive itself).
        .filter(|(event, _)| event != "ping")
        .collect();
    let a = send(&h, Api::Messages, thinking_request(true), &[]).await;
    let mut got: Vec<(String, Value)> = a
        .frames
        .iter()
        .filter(|f| f.kind == FrameKind::Chunk)
        .map(|f| {
            (
                f.event.clone().unwrap(),
                serde_json::from_str(f.data.get()).unwrap(),
            )
        })
        .collect();
    assert_eq!(got[0].1["message"]["model"], CLAUDE);
    for (_, v) in expected.iter_mut().chain(got.iter_mut()) {
        normalize(v);
    }
    assert_eq!(got, expected, "every event as the provider sent it");
    let kinds: Vec<&str> = got
        .iter()
        .filter_map(|(_, v)| v.pointer("/delta/type").and_then(Value::as_str))
        .collect();
    assert!(kinds.contains(&"signature_delta") && kinds.contains(&"thinking_delta"));
    assert_eq!(a.done().finish_reason.as_deref(), Some("tool_calls"));

    // The plain answer too: blocks, signature and redacted data untouched.
    let a = send(&h, Api::Messages, thinking_request(false), &[]).await;
    let body: Value = serde_json::from_str(
        a.frames
            .iter()
            .find(|f| f.kind == FrameKind::Response)
            .unwrap()
            .data
            .get(),
    )
    .unwrap();
    let kinds: Vec<&str> = body["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["thinking", "redacted_thinking", "text", "tool_use"]);
    assert!(body["content"][0]["signature"]
        .as_str()
        .unwrap()
        .starts_with("EqMock"));
    assert_eq!(body["model"], CLAUDE);
    h.cleanup().await;
}

#[tokio::test]
async fn cache_tokens_are_kept_and_errors_mid_stream_are_anthropic_events() {
    let up = mock().await;
    let h = harness("anthropic", &up).await;
    let body = json!({"model": CLAUDE, "max_tokens": 100, "stream": true,
        "messages": [{"role": "user", "content": "hi there"}],
        "mock": {"chunks": 4, "cache_read": 7, "cache_creation": 5}});
    let a = send(&h, Api::Messages, body, &[]).await;
    let usage = a.done().usage;
    assert_eq!(
        (
            usage.cached_tokens,
            usage.cache_creation_tokens,
            usage.completion_tokens
        ),
        (7, 5, 4)
    );
    let finished = h.event(a.request_id, "CompletionFinished").await;
    assert_eq!(finished["usage"]["cached_tokens"], 7);
    assert_eq!(finished["usage"]["cache_creation_tokens"], 5);
    assert_eq!(
        finished["usage"]["prompt_tokens"].as_u64(),
        Some(usage.prompt_tokens),
        "prompt tokens include cache reads and writes"
    );

    // An OpenAI client sees the cache read as `prompt_tokens_details.cached_tokens`.
    let chat = json!({"model": CLAUDE, "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "hi"}], "mock": {"chunks": 2, "cache_read": 7}});
    let a = send(&h, Api::ChatCompletions, chat, &[]).await;
    let last = a.chunks().pop().unwrap();
    assert_eq!(last["usage"]["prompt_tokens_details"]["cached_tokens"], 7);

    // Anthropic's `error` event after content: the request ends as overloaded.
    let body = json!({"model": CLAUDE, "max_tokens": 100, "stream": true,
        "messages": [{"role": "user", "content": "hi"}], "mock": {"chunks": 6, "stream_error_after": 2}});
    let a = send(&h, Api::Messages, body, &[]).await;
    assert!(a.frames.iter().any(|f| f.data.get().contains("text_delta")));
    assert_eq!(a.error().kind, ErrorKind::Overloaded);
    h.cleanup().await;
}

#[tokio::test]
async fn anthropic_beta_reaches_an_anthropic_channel() {
    let up = mock().await;
    let h = harness("anthropic", &up).await;
    let body = json!({"model": CLAUDE, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}],
        "mock": {"require_beta": "interleaved-thinking-2025-05-14"}});
    let a = send(
        &h,
        Api::Messages,
        body.clone(),
        &[("anthropic-beta", "interleaved-thinking-2025-05-14")],
    )
    .await;
    a.done();
    let e = send(&h, Api::Messages, body, &[]).await.error();
    assert_eq!((e.kind, e.status), (ErrorKind::BadRequest, 400));
    h.cleanup().await;
}

#[tokio::test]
async fn untranslatable_requests_are_the_callers_400() {
    let up = mock().await;
    // An image to a text-only provider.
    let h = harness("deepseek", &up).await;
    let image = json!({"model": CLAUDE, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]});
    let e = send(&h, Api::ChatCompletions, image, &[]).await.error();
    assert_eq!(
        (e.kind, e.status, e.param.as_deref()),
        (ErrorKind::BadRequest, 400, Some("messages"))
    );
    // A server tool to an OpenAI-format channel.
    let server_tool = json!({"model": CLAUDE, "max_tokens": 10, "messages": [{"role": "user", "content": "q"}],
        "tools": [{"type": "web_search_20250305", "name": "web_search"}]});
    let e = send(&h, Api::Messages, server_tool, &[]).await.error();
    assert_eq!((e.status, e.param.as_deref()), (400, Some("tools.0.type")));
    assert_eq!(up.stats().requests_total, 0, "nothing reached the upstream");
    h.cleanup().await;

    let h = harness("anthropic", &up).await;
    let e = send(
        &h,
        Api::Embeddings,
        json!({"model": CLAUDE, "input": "x"}),
        &[],
    )
    .await
    .error();
    assert_eq!((e.kind, e.status), (ErrorKind::BadRequest, 400));
    assert!(e.message.contains("embeddings"), "{}", e.message);
    h.cleanup().await;
}
