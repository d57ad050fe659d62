//! `POST /v1/messages` (Anthropic-compatible, stream and not, `x-api-key` or Bearer) and
//! `POST /v1/messages/count_tokens`.
//!
//! The flow is chat's (authenticate, validate, [`chat::submit`], relay) with Anthropic's
//! shapes at both ends: the worker already writes frames as Anthropic events (translating
//! when the channel speaks another protocol), so the relay only names the SSE events and
//! renders errors as `{"type":"error","error":{"type","message"}}`. Streams resume and can
//! be watched through `GET /v1/streams/{id}` like chat's.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::value::RawValue;
use serde_json::Value;

use schemas::anthropic::{validate_messages, validate_messages_request};
use schemas::work::Api;

use crate::auth::authenticate;
use crate::error::{anthropic_error_response, ApiError};
use crate::relay::{self, Framing};
use crate::request_id::RequestId;
use crate::state::AppState;

use super::chat;
use super::named::{self, Surface};

/// Create a message (Anthropic-compatible)
///
/// The body is forwarded verbatim (`anthropic-beta` headers reach Anthropic channels);
/// Sluice reads `model`, `max_tokens`, `messages`, `system` and `stream`. With
/// `stream: true` the answer is Anthropic's named server-sent events, resumable through
/// `GET /v1/streams/{id}`. Errors are in Anthropic's shape; overload is 529.
#[utoipa::path(
    post,
    path = "/v1/messages",
    operation_id = "createMessage",
    tag = "anthropic",
    request_body = crate::openapi::MessagesRequest,
    responses(
        (status = 200, description = "The message, or its stream", content(
            (crate::openapi::AnthropicMessage = "application/json"),
            (crate::openapi::SseEvent = "text/event-stream"),
        )),
        (status = 400, description = "Invalid body"),
        (status = 401, description = "Missing or invalid API key"),
        (status = 404, description = "Unknown model"),
        (status = 429, description = "Rate limit or quota reached"),
        (status = 529, description = "Overloaded: no channel or queue available now"),
    ),
    security(("x_api_key" = []), ("api_key" = [])),
)]
pub async fn messages(
    State(state): State<Arc<AppState>>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match create(&state, request_id, &headers, body).await {
        Ok(response) => response,
        Err(e) => anthropic_error_response(&e.info()),
    }
}

async fn create(
    state: &Arc<AppState>,
    request_id: uuid::Uuid,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let caller = authenticate(&state.directory, headers)?;
    let (body, value) = named::read_json(state, body)?;
    let view = validate_messages_request(&value)?;
    // serde_json accepted the bytes, so they are valid UTF-8 JSON; forward them verbatim.
    let text =
        String::from_utf8(body.to_vec()).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    let raw = RawValue::from_string(text).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    // Anthropic streams always carry usage (`message_start`, `message_delta`).
    let submission = chat::Submission {
        request_id,
        api: Api::Messages,
        view: &view,
        value: &value,
        raw,
        stream: view.stream,
        // Beta features (Claude Code turns several on) reach an Anthropic channel.
        forward_headers: headers
            .get_all("anthropic-beta")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(|v| ("anthropic-beta".to_owned(), v.to_owned()))
            .collect(),
        session_id: None,
    };
    let queued = crate::cache::submit(state, &caller, headers, submission).await?;
    if view.stream {
        relay::sse_response(Framing::Anthropic, queued.attach(state)).await
    } else {
        named::plain_response(Surface::Anthropic, queued.reader, queued.deadline).await
    }
}

/// `POST /v1/messages/count_tokens`: `{"input_tokens": n}`. When an Anthropic channel
/// serves the model, Anthropic counts (exactly, `anthropic-beta` forwarded); otherwise
/// Sluice's tokenizer estimates (system, messages and tools).
#[utoipa::path(
    post,
    path = "/v1/messages/count_tokens",
    operation_id = "countMessageTokens",
    tag = "anthropic",
    request_body = crate::openapi::CountTokensRequest,
    responses(
        (status = 200, description = "The prompt's token count", body = crate::openapi::InputTokens),
        (status = 400, description = "Invalid body"),
        (status = 401, description = "Missing or invalid API key"),
    ),
    security(("x_api_key" = []), ("api_key" = [])),
)]
pub async fn count_tokens(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let checked = (|| {
        let caller = authenticate(&state.directory, &headers)?;
        let (_, value) = named::read_json(&state, body)?;
        let model = value
            .get("model")
            .and_then(Value::as_str)
            .filter(|m| !m.is_empty())
            .ok_or_else(|| schemas::openai::InvalidRequest {
                message: "model: Field required".into(),
                param: Some("model".into()),
            })?
            .to_owned();
        validate_messages(value.get("messages"))?;
        Ok::<_, ApiError>((caller, value, model))
    })();
    let (caller, value, model) = match checked {
        Ok(checked) => checked,
        Err(e) => return anthropic_error_response(&e.info()),
    };
    if let Some(answer) =
        super::count_tokens::upstream(&state, &caller.group, &model, &value, &headers).await
    {
        return answer;
    }
    let mut tokens = billing::estimate_prompt(&model, &value);
    if let Some(system) = value.get("system") {
        let text = match system {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        tokens += billing::tokenizer::count_text(&model, &text);
    }
    Json(serde_json::json!({"input_tokens": tokens})).into_response()
}
