//! Azure OpenAI's deployment URLs in front of the OpenAI surface:
//! `POST /openai/deployments/{deployment}/chat/completions?api-version=...` with the key in
//! an `api-key` header. A request without `api-version` gets Azure's 404; otherwise it is
//! answered exactly as `/v1/chat/completions` would (the deployment name is echoed as the
//! model only if the body names none, as Azure ignores the body's `model`).

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};

use crate::Shared;

pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new().route(
        "/openai/deployments/{deployment}/chat/completions",
        post(chat_completions),
    )
}

async fn chat_completions(
    State(shared): State<Arc<Shared>>,
    Path(_deployment): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    mut headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !query.contains_key("api-version") {
        let body = serde_json::json!({"error": {"code": "404", "message": "Resource not found"}});
        return (StatusCode::NOT_FOUND, Json(body)).into_response();
    }
    // Azure's `api-key` is what the OpenAI surface checks as a bearer token; a bearer
    // token sent to Azure instead is not a key.
    headers.remove(header::AUTHORIZATION);
    if let Some(key) = headers.get("api-key").and_then(|v| v.to_str().ok()) {
        if let Ok(v) = HeaderValue::from_str(&format!("Bearer {key}")) {
            headers.insert(header::AUTHORIZATION, v);
        }
    }
    crate::openai::chat_completions(State(shared), headers, body).await
}
