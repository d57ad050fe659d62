//! The Gemini surface: `POST /v1beta/models/{model}:generateContent` and
//! `:streamGenerateContent?alt=sse`, with the key in `x-goog-api-key`, answers as
//! `GenerateContentResponse` (`candidates[].content.parts`, `finishReason`,
//! `usageMetadata`), SSE chunks that end at EOF (no end marker; the last chunk carries
//! `finishReason`), and Google's error body `{"error":{"code","message","status"}}`.
//! Like a real model it calls the first declared function when the last turn is the
//! user's (not a `functionResponse`).

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::knobs::{Knobs, MockOverrides};
use crate::openai::pause;
use crate::stats::{StreamEnd, StreamGuard};
use crate::Shared;

pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new().route("/v1beta/models/{call}", post(call))
}

/// Google's error body for a status.
pub fn error_response(status: u16, message: &str) -> Response {
    let kind = match status {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        429 => "RESOURCE_EXHAUSTED",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        _ => "INTERNAL",
    };
    let mut body = json!({"error": {"code": status, "message": message, "status": kind}});
    if status == 429 {
        // Google says when to retry in the body, not in a header.
        body["error"]["details"] =
            json!([{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "1s"}]);
    }
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (code, Json(body)).into_response()
}

fn provider_error(status: u16) -> Response {
    let message = match status {
        400 => "Request contains an invalid argument.",
        401 | 403 => "API key not valid. Please pass a valid API key.",
        429 => "Resource has been exhausted (e.g. check quota).",
        503 => "The model is overloaded. Please try again later.",
        _ => "An internal error has occurred.",
    };
    error_response(status, message)
}

fn words(s: &str) -> u64 {
    s.split_whitespace().count() as u64
}

fn prompt_tokens(req: &Value) -> u64 {
    let parts_words = |c: &Value| -> u64 {
        c.get("parts")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .map(words)
            .sum()
    };
    let system = req.get("systemInstruction").map_or(0, parts_words);
    let contents = req
        .get("contents")
        .and_then(Value::as_array)
        .map_or(0, |c| c.iter().map(|c| 3 + parts_words(c)).sum());
    system + contents
}

/// The function the model calls, if any.
fn function_to_call(req: &Value) -> Option<String> {
    let decls = req.pointer("/tools/0/functionDeclarations")?.as_array()?;
    if req.pointer("/toolConfig/functionCallingConfig/mode") == Some(&json!("NONE")) {
        return None;
    }
    let last = req.get("contents")?.as_array()?.last()?;
    let answered = last
        .get("parts")
        .and_then(Value::as_array)
        .is_some_and(|p| p.iter().any(|p| p.get("functionResponse").is_some()));
    if answered || last.get("role").and_then(Value::as_str) == Some("model") {
        return None;
    }
    decls.first()?.get("name")?.as_str().map(str::to_owned)
}

async fn call(
    State(shared): State<Arc<Shared>>,
    Path(call): Path<String>,
    Query(query): Query<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some((model, method)) = call.split_once(':') else {
        return error_response(404, "Method not found.");
    };
    let stream = match method {
        "generateContent" => false,
        "streamGenerateContent" => true,
        _ => return error_response(404, "Method not found."),
    };
    let cfg = shared.config();
    if let Some(key) = cfg.require_key.as_deref() {
        if headers.get("x-goog-api-key").and_then(|v| v.to_str().ok()) != Some(key) {
            return error_response(400, "API key not valid. Please pass a valid API key.");
        }
    }
    let req: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return error_response(400, &format!("Invalid JSON payload received. {e}")),
    };
    if !req.get("contents").is_some_and(Value::is_array) {
        return error_response(
            400,
            "* GenerateContentRequest.contents: contents is not specified",
        );
    }
    let overrides: Option<MockOverrides> = req
        .get("mock")
        .and_then(|m| serde_json::from_value(m.clone()).ok());
    let knobs = cfg.knobs(overrides.as_ref());
    drop(cfg);
    if knobs.hang {
        shared.shutdown.cancelled().await;
        return provider_error(503);
    }
    if let Some(status) = knobs.fail_status {
        if shared.should_fail(knobs.fail_times) {
            return provider_error(status);
        }
    }
    let limit = req
        .pointer("/generationConfig/maxOutputTokens")
        .and_then(Value::as_u64);
    let (n, finish) = match limit {
        Some(l) if l < u64::from(knobs.chunks) => (l as u32, "MAX_TOKENS"),
        _ => (knobs.chunks, "STOP"),
    };
    let function = function_to_call(&req).filter(|_| finish == "STOP");
    let output = u64::from(n) + if function.is_some() { 10 } else { 0 };
    let prompt = prompt_tokens(&req);
    let usage = json!({"promptTokenCount": prompt, "candidatesTokenCount": output, "totalTokenCount": prompt + output});
    let id = uuid::Uuid::now_v7().simple().to_string();
    let response = |parts: Vec<Value>, finish: Option<&str>, usage: &Value| {
        let mut candidate = json!({"content": {"parts": parts, "role": "model"}, "index": 0});
        if let Some(f) = finish {
            candidate["finishReason"] = json!(f);
        }
        json!({"candidates": [candidate], "usageMetadata": usage, "modelVersion": model, "responseId": id})
    };
    let call_part = function
        .map(|name| json!({"functionCall": {"name": name, "args": {"query": "tok0", "n": 1}}}));
    if !stream {
        if !pause(&shared.shutdown, knobs.ttft_ms).await {
            return provider_error(503);
        }
        let text: String = (0..n).map(|i| format!("tok{i} ")).collect();
        let mut parts = vec![json!({"text": text})];
        parts.extend(call_part);
        return Json(response(parts, Some(finish), &usage)).into_response();
    }
    if query.get("alt").map(String::as_str) != Some("sse") {
        // Without `alt=sse` Gemini streams a JSON array; only SSE is mocked.
        return error_response(400, "the mock streams only with `alt=sse`");
    }
    let mut chunks: Vec<Value> = (0..n)
        .map(|i| {
            let partial = json!({"promptTokenCount": prompt, "totalTokenCount": prompt});
            response(vec![json!({"text": format!("tok{i} ")})], None, &partial)
        })
        .collect();
    let last_parts = call_part.map_or_else(|| vec![json!({"text": ""})], |p| vec![p]);
    chunks.push(response(last_parts, Some(finish), &usage));
    sse(&shared, chunks, knobs)
}

fn sse(shared: &Arc<Shared>, chunks: Vec<Value>, knobs: Knobs) -> Response {
    let mut guard = StreamGuard::new(shared.counters.clone());
    let shutdown = shared.shutdown.clone();
    let body = async_stream::stream! {
        if !pause(&shutdown, knobs.ttft_ms).await {
            guard.finish(StreamEnd::Disconnected);
            yield Err(std::io::Error::other("shutting down"));
            return;
        }
        for (i, chunk) in chunks.iter().enumerate() {
            if knobs.disconnect_after == Some(i as u32) {
                guard.finish(StreamEnd::Disconnected);
                tokio::task::yield_now().await;
                yield Err(std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "mock upstream cut the stream"));
                return;
            }
            if i > 0 && !pause(&shutdown, knobs.chunk_delay_ms).await {
                guard.finish(StreamEnd::Disconnected);
                yield Err(std::io::Error::other("shutting down"));
                return;
            }
            yield Ok::<_, std::io::Error>(Bytes::from(format!("data: {chunk}\r\n\r\n")));
        }
        guard.finish(StreamEnd::Completed);
    };
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        Body::from_stream(body),
    )
        .into_response()
}
