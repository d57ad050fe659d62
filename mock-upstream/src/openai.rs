//! The OpenAI surface: `POST /v1/chat/completions` (stream and not), `GET /v1/models` and
//! `GET /v1/models/{id}`, with OpenAI's exact shapes, so the gateway's OpenAI adapter is tested
//! against what it will meet in production. The stream encoder lives in [`sse`].

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::knobs::MockOverrides;
use crate::Shared;

mod sse;

use sse::{stream_response, SseWriter, StreamPlan};

/// The one model `GET /v1/models` lists; chat requests accept any model name and echo it.
pub const MOCK_MODEL: &str = "mock-model";
const FINGERPRINT: &str = "fp_mock";

pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
}

// ---------------------------------------------------------------------------------------------
// Request

/// Only the fields the mock looks at; serde ignores the rest, as OpenAI does. Strings borrow
/// from the body when they have no escapes.
#[derive(Deserialize)]
struct ChatRequest<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    messages: Option<Vec<Message<'a>>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    mock: Option<MockOverrides>,
    #[serde(borrow, default)]
    tools: Option<Vec<Tool<'a>>>,
}

/// An offered tool; the mock calls the first one when the last message is the user's.
#[derive(Deserialize)]
struct Tool<'a> {
    #[serde(borrow)]
    function: ToolFunction<'a>,
}

#[derive(Deserialize)]
struct ToolFunction<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
}

/// The arguments of every tool call the mock makes.
pub(crate) const TOOL_ARGUMENTS: &str = r#"{"query":"tok0","n":1}"#;

/// `(call id, tool name)` when the model calls a tool: tools are offered and the last message
/// is a user turn (not a tool result), as a real model asked to use a tool would.
fn tool_to_call(req: &ChatRequest<'_>) -> Option<(String, String)> {
    let tool = req.tools.as_ref()?.first()?;
    let last = req.messages.as_ref()?.last()?;
    (last.role.as_deref() == Some("user")).then(|| {
        let id = format!("call_{}", &uuid::Uuid::now_v7().simple().to_string()[..24]);
        (id, tool.function.name.to_string())
    })
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow, default)]
    role: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    content: Option<Content<'a>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content<'a> {
    Text(#[serde(borrow)] Cow<'a, str>),
    Parts(#[serde(borrow)] Vec<Part<'a>>),
}

#[derive(Deserialize)]
struct Part<'a> {
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
}

/// Whitespace-separated words over all message contents, plus 3 per message: a cheap,
/// predictable stand-in for a tokenizer.
fn prompt_tokens(messages: &[Message<'_>]) -> u64 {
    let words = |s: &str| s.split_whitespace().count() as u64;
    messages
        .iter()
        .map(|m| {
            3 + match &m.content {
                None => 0,
                Some(Content::Text(s)) => words(s),
                Some(Content::Parts(parts)) => parts
                    .iter()
                    .filter_map(|p| p.text.as_deref())
                    .map(words)
                    .sum(),
            }
        })
        .sum()
}

// ---------------------------------------------------------------------------------------------
// Response shapes

#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub prompt_tokens_details: PromptTokensDetails,
    pub completion_tokens_details: CompletionTokensDetails,
}

#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct PromptTokensDetails {
    pub cached_tokens: u64,
    pub audio_tokens: u64,
}

#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompletionTokensDetails {
    pub reasoning_tokens: u64,
    pub audio_tokens: u64,
    pub accepted_prediction_tokens: u64,
    pub rejected_prediction_tokens: u64,
}

impl Usage {
    fn new(prompt: u64, completion: u64) -> Self {
        Self {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: 0,
                audio_tokens: 0,
            },
            completion_tokens_details: CompletionTokensDetails {
                reasoning_tokens: 0,
                audio_tokens: 0,
                accepted_prediction_tokens: 0,
                rejected_prediction_tokens: 0,
            },
        }
    }
}

/// `chat.completion`, fields in OpenAI's order.
#[derive(Serialize)]
struct Completion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [Choice<'a>; 1],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
    service_tier: &'static str,
    system_fingerprint: &'static str,
}

#[derive(Serialize)]
struct Choice<'a> {
    index: u32,
    message: AssistantMessage<'a>,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct AssistantMessage<'a> {
    role: &'static str,
    content: &'a str,
    refusal: Option<()>,
    annotations: &'static [()],
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<serde_json::Value>,
}

/// OpenAI's error body: `{"error":{"message","type","param","code"}}`.
pub fn error_response(
    status: StatusCode,
    message: &str,
    kind: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> Response {
    let body = serde_json::json!({
        "error": {"message": message, "type": kind, "param": param, "code": code}
    });
    let mut resp = (status, Json(body)).into_response();
    if status == StatusCode::TOO_MANY_REQUESTS {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

/// The error OpenAI sends for a given status (the `fail_status` knob), with
/// `Retry-After: <retry_after>` on a 429 or 503 when given (a 429 has `1` otherwise).
pub fn provider_error_retry_after(status: u16, retry_after: Option<u64>) -> Response {
    let mut resp = provider_error(status);
    if let Some(secs) = retry_after.filter(|_| matches!(status, 429 | 503)) {
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    resp
}

/// The error OpenAI sends for a given status (the `fail_status` knob).
pub fn provider_error(status: u16) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let (msg, kind, code) = match status.as_u16() {
        400 => ("Invalid request (mock).", "invalid_request_error", None),
        401 => (
            "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys.",
            "invalid_request_error",
            Some("invalid_api_key"),
        ),
        403 => ("You are not allowed to sample from this model.", "invalid_request_error", None),
        404 => (
            "The model does not exist or you do not have access to it.",
            "invalid_request_error",
            Some("model_not_found"),
        ),
        429 => (
            "Rate limit reached for requests (mock). Please try again in 1s.",
            "requests",
            Some("rate_limit_exceeded"),
        ),
        503 => (
            "The engine is currently overloaded, please try again later.",
            "server_error",
            Some("overloaded"),
        ),
        s if s < 500 => ("Request failed (mock).", "invalid_request_error", None),
        _ => (
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
            None,
        ),
    };
    error_response(status, msg, kind, None, code)
}

fn invalid_request(message: &str, param: Option<&str>, code: Option<&str>) -> Response {
    error_response(
        StatusCode::BAD_REQUEST,
        message,
        "invalid_request_error",
        param,
        code,
    )
}

/// `404` for unknown paths, worded as OpenAI does.
pub(crate) async fn not_found(method: Method, uri: Uri) -> Response {
    let msg = format!("Invalid URL ({method} {})", uri.path());
    error_response(
        StatusCode::NOT_FOUND,
        &msg,
        "invalid_request_error",
        None,
        None,
    )
}

/// `None` when the request carries `Authorization: Bearer <key>`, else OpenAI's 401.
fn check_key(headers: &HeaderMap, key: &str) -> Option<Response> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(k) if k.trim() == key => None,
        Some(_) => Some(provider_error(401)),
        None => Some(error_response(
            StatusCode::UNAUTHORIZED,
            "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            "invalid_request_error",
            None,
            None,
        )),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Sleeps `ms` unless the server shuts down first; `false` means "shutting down".
pub(crate) async fn pause(shutdown: &CancellationToken, ms: u64) -> bool {
    if ms == 0 {
        return true;
    }
    tokio::select! {
        () = tokio::time::sleep(Duration::from_millis(ms)) => true,
        () = shutdown.cancelled() => false,
    }
}

// ---------------------------------------------------------------------------------------------
// Handlers

pub(crate) async fn chat_completions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let cfg = shared.config();
    // Auth comes before parsing, as with OpenAI (a per-request key can only be checked later).
    if let Some(resp) = cfg
        .require_key
        .as_deref()
        .and_then(|k| check_key(&headers, k))
    {
        return resp;
    }
    let req: ChatRequest<'_> = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            let msg = format!("We could not parse the JSON body of your request. ({e})");
            return invalid_request(&msg, None, None);
        }
    };
    let Some(model) = req.model.as_deref() else {
        return invalid_request("you must provide a model parameter", None, None);
    };
    shared.record_body(model, &body);
    let Some(messages) = req.messages.as_deref() else {
        return invalid_request(
            "Missing required parameter: 'messages'.",
            Some("messages"),
            Some("missing_required_parameter"),
        );
    };
    let overrides = req.mock.as_ref();
    if let Some(resp) = overrides
        .and_then(|o| o.require_key.as_deref())
        .and_then(|k| check_key(&headers, k))
    {
        return resp;
    }
    let knobs = cfg.knobs(overrides);
    drop(cfg);

    if knobs.hang {
        // Never answer; the handler future is dropped when the client goes away.
        shared.shutdown.cancelled().await;
        return provider_error(503);
    }
    if let Some(status) = knobs.fail_status {
        if shared.should_fail(knobs.fail_times) {
            return provider_error_retry_after(status, knobs.retry_after_secs);
        }
    }

    let limit = req.max_completion_tokens.or(req.max_tokens);
    let (n, finish_reason) = match limit {
        Some(l) if l < u64::from(knobs.chunks) => (l as u32, "length"),
        _ => (knobs.chunks, "stop"),
    };
    let tool = tool_to_call(&req).filter(|_| finish_reason == "stop");
    let finish_reason = if tool.is_some() {
        "tool_calls"
    } else {
        finish_reason
    };
    let usage = knobs
        .usage
        .then(|| Usage::new(prompt_tokens(messages), u64::from(n)));
    let id = format!("chatcmpl-{}", uuid::Uuid::now_v7().simple());

    if req.stream == Some(true) {
        let include_usage = req
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        let plan = StreamPlan {
            knobs,
            n,
            finish_reason,
            usage: if include_usage { usage } else { None },
            tool,
        };
        return stream_response(
            &shared,
            SseWriter::new(&id, model, plan.usage.is_some()),
            plan,
        );
    }

    if !pause(&shared.shutdown, knobs.ttft_ms).await {
        return provider_error(503);
    }
    let mut text = String::with_capacity(n as usize * 6);
    for i in 0..n {
        let _ = write!(text, "tok{i} ");
    }
    Json(Completion {
        id: &id,
        object: "chat.completion",
        created: unix_now(),
        model,
        choices: [Choice {
            index: 0,
            message: AssistantMessage {
                role: "assistant",
                content: &text,
                refusal: None,
                annotations: &[],
                tool_calls: tool.map(|(id, name)| {
                    serde_json::json!([{"id": id, "type": "function",
                    "function": {"name": name, "arguments": TOOL_ARGUMENTS}}])
                }),
            },
            logprobs: None,
            finish_reason,
        }],
        usage,
        service_tier: "default",
        system_fingerprint: FINGERPRINT,
    })
    .into_response()
}

async fn list_models() -> Json<serde_json::Value> {
    Json(serde_json::json!({"object": "list", "data": [model_object(MOCK_MODEL)]}))
}

/// Any id exists: chat requests accept any model name, so the lookup does too.
async fn get_model(Path(id): Path<String>) -> Json<serde_json::Value> {
    Json(model_object(&id))
}

fn model_object(id: &str) -> serde_json::Value {
    serde_json::json!({"id": id, "object": "model", "created": 1_700_000_000u64, "owned_by": "mock"})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_token_count() {
        let req: ChatRequest<'_> = serde_json::from_str(
            r#"{"model":"m","messages":[
                {"role":"system","content":"be  brief"},
                {"role":"user","content":[{"type":"text","text":"a b c"},{"type":"image_url","image_url":{"url":"x"}}]},
                {"role":"assistant","content":null,"tool_calls":[]}
            ]}"#,
        )
        .expect("parse");
        assert_eq!(
            prompt_tokens(req.messages.as_deref().expect("messages")),
            2 + 3 + 3 * 3
        );
    }
}
