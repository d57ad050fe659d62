//! `POST /v1/responses` (OpenAI's Responses API, stream and not), `POST /v1/embeddings` and
//! `POST /v1/images/generations`: validated here, translated and answered by the workers
//! (Responses on chat-style channels become chat requests), errors in OpenAI's shape.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::Extension;
use serde_json::Value;

use schemas::openai::{ChatRequestView, InvalidRequest};
use schemas::work::Api;

use crate::auth::authenticate;
use crate::error::ApiError;
use crate::request_id::RequestId;
use crate::state::AppState;

use super::named::{self, Surface};

fn invalid(param: &str, message: impl Into<String>) -> InvalidRequest {
    InvalidRequest {
        message: message.into(),
        param: Some(param.to_owned()),
    }
}

fn model_of(body: &Value) -> Result<String, InvalidRequest> {
    match body.get("model") {
        Some(Value::String(m)) if !m.trim().is_empty() => Ok(m.clone()),
        Some(_) => Err(invalid("model", "`model` must be a non-empty string")),
        None => Err(invalid("model", "you must provide a model parameter")),
    }
}

fn stream_of(body: &Value) -> Result<bool, InvalidRequest> {
    match body.get("stream") {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(invalid("stream", "`stream` must be a boolean")),
    }
}

/// Validates a `/v1/responses` body for the fields Sluice reads.
pub fn validate_responses(body: &Value) -> Result<ChatRequestView, InvalidRequest> {
    if !body.is_object() {
        return Err(InvalidRequest {
            message: "the request body must be a JSON object".into(),
            param: None,
        });
    }
    let model = model_of(body)?;
    match body.get("input") {
        Some(Value::String(_)) => {}
        Some(Value::Array(items)) if items.iter().all(Value::is_object) => {}
        Some(_) => {
            return Err(invalid(
                "input",
                "`input` must be a string or an array of input items",
            ))
        }
        None => return Err(invalid("input", "missing required parameter: `input`")),
    }
    let max_tokens = match body.get("max_output_tokens") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().filter(|n| *n > 0).ok_or_else(|| {
            invalid(
                "max_output_tokens",
                "`max_output_tokens` must be a positive integer",
            )
        })?),
    };
    Ok(ChatRequestView {
        model,
        stream: stream_of(body)?,
        // `response.completed` always carries usage.
        include_usage: true,
        max_tokens,
    })
}

/// Validates `/v1/embeddings` (`input`) and `/v1/images/generations` (`prompt`) bodies.
pub fn validate_plain(body: &Value, required: &str) -> Result<ChatRequestView, InvalidRequest> {
    if !body.is_object() {
        return Err(InvalidRequest {
            message: "the request body must be a JSON object".into(),
            param: None,
        });
    }
    let model = model_of(body)?;
    match body.get(required) {
        Some(Value::String(s)) if !s.is_empty() => {}
        Some(Value::Array(a)) if required == "input" && !a.is_empty() => {}
        _ => {
            return Err(invalid(
                required,
                format!("missing required parameter: `{required}`"),
            ))
        }
    }
    if stream_of(body)? {
        return Err(invalid(
            "stream",
            "streaming is not supported on this endpoint",
        ));
    }
    Ok(ChatRequestView {
        model,
        stream: false,
        include_usage: false,
        max_tokens: Some(0),
    })
}

async fn handle(
    state: Arc<AppState>,
    request_id: uuid::Uuid,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    api: Api,
) -> Result<Response, ApiError> {
    let caller = authenticate(&state.directory, &headers)?;
    let (body, value) = named::read_json(&state, body)?;
    let view = match api {
        Api::Embeddings => validate_plain(&value, "input")?,
        Api::Images => validate_plain(&value, "prompt")?,
        _ => validate_responses(&value)?,
    };
    let submission = named::Submission {
        api,
        view: &view,
        body: &body,
        value: &value,
        surface: Surface::Responses,
        forward_headers: Vec::new(),
    };
    named::submit(&state, request_id, &caller, submission).await
}

/// Create a response (OpenAI Responses API)
///
/// Forwarded verbatim to channels that speak the Responses API, translated to a chat
/// request for the others. With `stream: true` the answer is named server-sent events.
#[utoipa::path(
    post,
    path = "/v1/responses",
    operation_id = "createResponse",
    tag = "openai",
    request_body = crate::openapi::ResponsesRequest,
    responses(
        (status = 200, description = "The response, or its stream", content(
            (crate::openapi::ResponseObject = "application/json"),
            (crate::openapi::SseEvent = "text/event-stream"),
        )),
        (status = 400, description = "Invalid body"),
        (status = 401, description = "Missing or invalid API key"),
        (status = 404, description = "Unknown model"),
        (status = 429, description = "Rate limit or quota reached"),
        (status = 503, description = "No channel serves the model now"),
    ),
    security(("api_key" = []), ("x_api_key" = [])),
)]
pub async fn responses(
    State(state): State<Arc<AppState>>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    handle(state, request_id, headers, body, Api::Responses).await
}

/// Create embeddings (OpenAI-compatible)
#[utoipa::path(
    post,
    path = "/v1/embeddings",
    operation_id = "createEmbeddings",
    tag = "openai",
    request_body = crate::openapi::EmbeddingsRequest,
    responses(
        (status = 200, description = "The embeddings", body = crate::openapi::EmbeddingList),
        (status = 400, description = "Invalid body (streaming is refused here)"),
        (status = 401, description = "Missing or invalid API key"),
        (status = 404, description = "Unknown model"),
        (status = 429, description = "Rate limit or quota reached"),
        (status = 503, description = "No channel serves the model now"),
    ),
    security(("api_key" = []), ("x_api_key" = [])),
)]
pub async fn embeddings(
    State(state): State<Arc<AppState>>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    handle(state, request_id, headers, body, Api::Embeddings).await
}

/// Generate images (OpenAI-compatible)
#[utoipa::path(
    post,
    path = "/v1/images/generations",
    operation_id = "createImages",
    tag = "openai",
    request_body = crate::openapi::ImagesRequest,
    responses(
        (status = 200, description = "The images", body = crate::openapi::ImagesResponse),
        (status = 400, description = "Invalid body (streaming is refused here)"),
        (status = 401, description = "Missing or invalid API key"),
        (status = 404, description = "Unknown model"),
        (status = 429, description = "Rate limit or quota reached"),
        (status = 503, description = "No channel serves the model now"),
    ),
    security(("api_key" = []), ("x_api_key" = [])),
)]
pub async fn images(
    State(state): State<Arc<AppState>>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    handle(state, request_id, headers, body, Api::Images).await
}
