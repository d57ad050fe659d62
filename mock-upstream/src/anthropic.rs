//! The Anthropic surface: `POST /v1/messages` (stream and not) and
//! `POST /v1/messages/count_tokens`, in the Messages API's exact shapes: `x-api-key` and
//! `anthropic-version` headers, the streaming event sequence (`message_start`, `ping`,
//! `content_block_start`/`_delta`/`_stop`, `message_delta` with usage, `message_stop`),
//! `error` events, and error bodies `{"type":"error","error":{"type","message"}}` with 529
//! for `overloaded_error` and 429 plus `retry-after` for `rate_limit_error`.
//!
//! Like a real model it calls the first tool when the request offers tools and the last
//! user turn is not a tool result; with `thinking` enabled it opens with a thinking block
//! whose signature it checks when the block comes back in a later turn (a changed or
//! dropped signature is a 400, as with Anthropic), and it rejects an assistant turn that
//! uses a tool without its thinking block first. Extra per-request knobs in `"mock"`:
//! `cache_read`, `cache_creation` (usage numbers to report), `redacted_thinking` (add a
//! redacted block), `stream_error_after` (send an `error` event after that many deltas),
//! `require_beta` (a 400 unless the `anthropic-beta` header lists that feature).

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::knobs::{Knobs, MockOverrides};
use crate::openai::pause;
use crate::stats::{StreamEnd, StreamGuard};
use crate::Shared;

pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1/messages", post(messages))
        .route("/v1/messages/count_tokens", post(count_tokens))
}

/// Knobs only this surface has, read from the same `"mock"` object as [`MockOverrides`].
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Extras {
    cache_read: u64,
    cache_creation: u64,
    redacted_thinking: bool,
    stream_error_after: Option<u32>,
    /// Answer 400 unless `anthropic-beta` lists this feature (as Anthropic does for beta
    /// fields sent without their header).
    require_beta: Option<String>,
}

/// The error body Anthropic sends for a status (the `fail_status` knob and real checks).
pub fn error_response(status: u16, message: &str) -> Response {
    let kind = match status {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        504 => "timeout_error",
        _ => "api_error",
    };
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = json!({"type": "error", "error": {"type": kind, "message": message}});
    let mut resp = (status, Json(body)).into_response();
    if status == StatusCode::TOO_MANY_REQUESTS {
        resp.headers_mut()
            .insert("retry-after", HeaderValue::from_static("1"));
    }
    resp
}

fn provider_error(status: u16) -> Response {
    let message = match status {
        401 => "invalid x-api-key",
        429 => "Number of request tokens has exceeded your per-minute rate limit (mock)",
        529 => "Overloaded",
        400 => "Invalid request (mock)",
        _ => "Internal server error",
    };
    error_response(status, message)
}

/// The signature the mock gives a thinking text: deterministic, so a later turn can be
/// checked, and different for any edited text.
fn signature(thinking: &str) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    thinking.hash(&mut h);
    format!("EqMock{:016x}", h.finish())
}

const REDACTED: &str = "redacted-mock:EmwKAhgBEgy3va3pzix/LafPsn4a";

fn words(s: &str) -> u64 {
    s.split_whitespace().count() as u64
}

/// Words of every text in the prompt plus 3 per message: the mock's token count.
fn prompt_tokens(req: &Value) -> u64 {
    let text_of = |c: &Value| -> u64 {
        match c {
            Value::String(s) => words(s),
            Value::Array(blocks) => blocks
                .iter()
                .filter_map(|b| b.get("text").and_then(Value::as_str))
                .map(words)
                .sum(),
            _ => 0,
        }
    };
    let system = req.get("system").map_or(0, text_of);
    let messages = req
        .get("messages")
        .and_then(Value::as_array)
        .map_or(0, |m| {
            m.iter()
                .map(|m| 3 + m.get("content").map_or(0, text_of))
                .sum()
        });
    system + messages
}

/// What Anthropic would reject in the history: thinking blocks whose signature does not
/// match, and (with thinking on) an assistant tool call without its thinking block.
fn check_history(req: &Value, thinking: bool) -> Result<(), String> {
    let messages = req.get("messages").and_then(Value::as_array);
    for (i, m) in messages.into_iter().flatten().enumerate() {
        if m.get("role").and_then(Value::as_str) != Some("assistant") {
            continue;
        }
        let Some(blocks) = m.get("content").and_then(Value::as_array) else {
            continue;
        };
        for (j, b) in blocks.iter().enumerate() {
            match b.get("type").and_then(Value::as_str) {
                Some("thinking") => {
                    let text = b.get("thinking").and_then(Value::as_str).unwrap_or("");
                    if b.get("signature").and_then(Value::as_str) != Some(&signature(text)) {
                        return Err(format!(
                            "messages.{i}.content.{j}: Invalid `signature` in `thinking` block"
                        ));
                    }
                }
                Some("redacted_thinking")
                    if b.get("data").and_then(Value::as_str) != Some(REDACTED) =>
                {
                    return Err(format!(
                        "messages.{i}.content.{j}: Invalid `data` in `redacted_thinking` block"
                    ));
                }
                _ => {}
            }
        }
        let first = blocks
            .first()
            .and_then(|b| b.get("type"))
            .and_then(Value::as_str);
        let uses_tool = blocks
            .iter()
            .any(|b| b.get("type").and_then(Value::as_str) == Some("tool_use"));
        if thinking && uses_tool && !matches!(first, Some("thinking" | "redacted_thinking")) {
            return Err(format!(
                "messages.{i}.content.0.type: Expected `thinking` or `redacted_thinking`, but found `{}`. When `thinking` is enabled, a final `assistant` message must start with a thinking block.",
                first.unwrap_or("text")
            ));
        }
    }
    Ok(())
}

/// The tool the model calls, if any: the first offered (or the one `tool_choice` names),
/// unless the last user turn answers a tool call or `tool_choice` is `none`.
fn tool_to_call(req: &Value) -> Option<String> {
    let tools = req.get("tools")?.as_array()?;
    let choice = req.get("tool_choice");
    if choice.and_then(|c| c.get("type")).and_then(Value::as_str) == Some("none") {
        return None;
    }
    let last = req.get("messages")?.as_array()?.last()?;
    let answers_tool = last
        .get("content")
        .and_then(Value::as_array)
        .is_some_and(|b| {
            b.iter()
                .any(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
        });
    if answers_tool {
        return None;
    }
    if let Some(name) = choice.and_then(|c| c.get("name")).and_then(Value::as_str) {
        return Some(name.to_owned());
    }
    tools.first()?.get("name")?.as_str().map(str::to_owned)
}

/// One answer, rendered either as a whole message or as a stream.
struct Answer {
    id: String,
    model: String,
    /// Content blocks as the final message carries them.
    blocks: Vec<Value>,
    /// Text deltas of the text block (the stream sends them one by one).
    tokens: Vec<String>,
    stop_reason: &'static str,
    usage: Value,
    output_tokens: u64,
}

fn plan(req: &Value, knobs: &Knobs, extras: &Extras) -> Answer {
    let model = req.get("model").and_then(Value::as_str).unwrap_or("");
    let max_tokens = req.get("max_tokens").and_then(Value::as_u64).unwrap_or(0);
    let thinking = req.pointer("/thinking/type").and_then(Value::as_str) == Some("enabled");
    let (n, mut stop_reason) = if max_tokens < u64::from(knobs.chunks) {
        (max_tokens as u32, "max_tokens")
    } else {
        (knobs.chunks, "end_turn")
    };
    let tokens: Vec<String> = (0..n).map(|i| format!("tok{i} ")).collect();
    let mut blocks = Vec::new();
    let mut output_tokens = u64::from(n);
    if thinking {
        let text = "Let me think about tok0.";
        blocks.push(json!({"type":"thinking","thinking":text,"signature":signature(text)}));
        output_tokens += 5;
    }
    if thinking && extras.redacted_thinking {
        blocks.push(json!({"type":"redacted_thinking","data":REDACTED}));
    }
    blocks.push(json!({"type":"text","text":tokens.concat()}));
    if let Some(name) = tool_to_call(req).filter(|_| stop_reason != "max_tokens") {
        let id = format!("toolu_{}", &uuid::Uuid::now_v7().simple().to_string()[..24]);
        blocks.push(json!({"type":"tool_use","id":id,"name":name,"input":{"query":"tok0","n":1}}));
        stop_reason = "tool_use";
        output_tokens += 10;
    }
    let usage = json!({
        "input_tokens": prompt_tokens(req),
        "cache_creation_input_tokens": extras.cache_creation,
        "cache_read_input_tokens": extras.cache_read,
        "output_tokens": output_tokens,
    });
    Answer {
        id: format!("msg_{}", uuid::Uuid::now_v7().simple()),
        model: model.to_owned(),
        blocks,
        tokens,
        stop_reason,
        usage,
        output_tokens,
    }
}

async fn count_tokens(headers: HeaderMap, body: Bytes) -> Response {
    if let Some(resp) = check_headers(&headers, None) {
        return resp;
    }
    match serde_json::from_slice::<Value>(&body) {
        Ok(req) => Json(json!({"input_tokens": prompt_tokens(&req)})).into_response(),
        Err(e) => error_response(400, &format!("invalid JSON: {e}")),
    }
}

/// Anthropic requires `anthropic-version`, and (when the mock is keyed) `x-api-key`.
fn check_headers(headers: &HeaderMap, key: Option<&str>) -> Option<Response> {
    if headers.get("anthropic-version").is_none() {
        return Some(error_response(400, "anthropic-version: header is required"));
    }
    let key = key?;
    match headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        Some(k) if k == key => None,
        _ => Some(provider_error(401)),
    }
}

async fn messages(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let cfg = shared.config();
    if let Some(resp) = check_headers(&headers, cfg.require_key.as_deref()) {
        return resp;
    }
    let req: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return error_response(400, &format!("invalid JSON body: {e}")),
    };
    if req.get("max_tokens").and_then(Value::as_u64).is_none() {
        return error_response(400, "max_tokens: Field required");
    }
    if !req.get("messages").is_some_and(Value::is_array) {
        return error_response(400, "messages: Field required");
    }
    let mock = req.get("mock");
    let overrides: Option<MockOverrides> =
        mock.and_then(|m| serde_json::from_value(m.clone()).ok());
    let extras: Extras = mock
        .and_then(|m| serde_json::from_value(m.clone()).ok())
        .unwrap_or_default();
    let knobs = cfg.knobs(overrides.as_ref());
    drop(cfg);
    if let Some(beta) = &extras.require_beta {
        let listed = headers
            .get_all("anthropic-beta")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|f| f.trim() == beta);
        if !listed {
            return error_response(
                400,
                &format!("this request needs the `anthropic-beta: {beta}` header"),
            );
        }
    }
    let thinking = req.pointer("/thinking/type").and_then(Value::as_str) == Some("enabled");
    if let Err(message) = check_history(&req, thinking) {
        return error_response(400, &message);
    }
    if knobs.hang {
        shared.shutdown.cancelled().await;
        return provider_error(529);
    }
    if let Some(status) = knobs.fail_status {
        if shared.should_fail(knobs.fail_times) {
            return provider_error(status);
        }
    }
    let answer = plan(&req, &knobs, &extras);
    if req.get("stream").and_then(Value::as_bool) == Some(true) {
        return stream(&shared, answer, knobs, extras.stream_error_after);
    }
    if !pause(&shared.shutdown, knobs.ttft_ms).await {
        return provider_error(529);
    }
    Json(json!({
        "id": answer.id, "type": "message", "role": "assistant", "model": answer.model,
        "content": answer.blocks, "stop_reason": answer.stop_reason, "stop_sequence": null,
        "usage": answer.usage,
    }))
    .into_response()
}

fn event(value: &Value) -> Bytes {
    let name = value.get("type").and_then(Value::as_str).unwrap_or("");
    Bytes::from(format!("event: {name}\ndata: {value}\n\n"))
}

fn cut() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        "mock upstream cut the stream",
    )
}

fn stream(
    shared: &Arc<Shared>,
    answer: Answer,
    knobs: Knobs,
    error_after: Option<u32>,
) -> Response {
    let mut guard = StreamGuard::new(shared.counters.clone());
    let shutdown = shared.shutdown.clone();
    let body = async_stream::stream! {
        if !pause(&shutdown, knobs.ttft_ms).await {
            guard.finish(StreamEnd::Disconnected);
            yield Err(cut());
            return;
        }
        let mut start_usage = answer.usage.clone();
        start_usage["output_tokens"] = json!(1);
        yield Ok(event(&json!({"type":"message_start","message":{
            "id": answer.id, "type":"message", "role":"assistant", "model": answer.model,
            "content": [], "stop_reason": null, "stop_sequence": null, "usage": start_usage}})));
        yield Ok(event(&json!({"type":"ping"})));
        let mut sent = 0u32;
        for (index, block) in answer.blocks.iter().enumerate() {
            let kind = block.get("type").and_then(Value::as_str).unwrap_or("");
            let start = match kind {
                "thinking" => json!({"type":"thinking","thinking":"","signature":""}),
                "text" => json!({"type":"text","text":""}),
                "tool_use" => json!({"type":"tool_use","id":block["id"],"name":block["name"],"input":{}}),
                _ => block.clone(),
            };
            yield Ok(event(&json!({"type":"content_block_start","index":index,"content_block":start})));
            let deltas: Vec<Value> = match kind {
                "thinking" => {
                    let text = block["thinking"].as_str().unwrap_or("");
                    let (a, b) = text.split_at(text.len() / 2);
                    vec![json!({"type":"thinking_delta","thinking":a}),
                         json!({"type":"thinking_delta","thinking":b}),
                         json!({"type":"signature_delta","signature":block["signature"]})]
                }
                "text" => answer.tokens.iter().map(|t| json!({"type":"text_delta","text":t})).collect(),
                "tool_use" => {
                    let input = block["input"].to_string();
                    let (a, b) = input.split_at(input.len() / 2);
                    vec![json!({"type":"input_json_delta","partial_json":""}),
                         json!({"type":"input_json_delta","partial_json":a}),
                         json!({"type":"input_json_delta","partial_json":b})]
                }
                _ => Vec::new(),
            };
            for delta in deltas {
                if knobs.disconnect_after == Some(sent) {
                    guard.finish(StreamEnd::Disconnected);
                    tokio::task::yield_now().await;
                    yield Err(cut());
                    return;
                }
                if error_after == Some(sent) {
                    guard.finish(StreamEnd::Disconnected);
                    yield Ok(event(&json!({"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}})));
                    return;
                }
                if sent > 0 && !pause(&shutdown, knobs.chunk_delay_ms).await {
                    guard.finish(StreamEnd::Disconnected);
                    yield Err(cut());
                    return;
                }
                sent += 1;
                yield Ok(event(&json!({"type":"content_block_delta","index":index,"delta":delta})));
            }
            yield Ok(event(&json!({"type":"content_block_stop","index":index})));
        }
        yield Ok(event(&json!({"type":"message_delta",
            "delta":{"stop_reason":answer.stop_reason,"stop_sequence":null},
            "usage":{"output_tokens":answer.output_tokens}})));
        guard.finish(StreamEnd::Completed);
        yield Ok(event(&json!({"type":"message_stop"})));
    };
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream; charset=utf-8"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_checks_signatures_and_thinking_before_tools() {
        let sig = signature("hm");
        let good = json!({"messages":[{"role":"user","content":"q"},{"role":"assistant","content":[
            {"type":"thinking","thinking":"hm","signature":sig},{"type":"tool_use","id":"t","name":"f","input":{}}]}]});
        assert!(check_history(&good, true).is_ok());
        let mut bad = good.clone();
        bad["messages"][1]["content"][0]["signature"] = json!("forged");
        assert!(check_history(&bad, true).is_err());
        let dropped = json!({"messages":[{"role":"assistant","content":[{"type":"tool_use","id":"t","name":"f","input":{}}]}]});
        assert!(check_history(&dropped, true).is_err());
        assert!(check_history(&dropped, false).is_ok());
    }
}
