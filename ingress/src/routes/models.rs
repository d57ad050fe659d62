//! `GET /v1/models` and `GET /v1/models/{id}` in OpenAI's shape: the models enabled
//! channels serve — shared ones, plus the caller's own personal channels.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::Json;
use serde_json::{json, Value};
use std::sync::Arc;

use crate::auth::authenticate;
use crate::directory::ModelStatus;
use crate::error::ApiError;
use crate::state::AppState;

fn model_object(id: &str) -> Value {
    json!({"id": id, "object": "model", "created": 0, "owned_by": "sluice"})
}

/// List the models the caller may use
///
/// The models of enabled shared channels, plus the caller's own personal channels'.
#[utoipa::path(
    get,
    path = "/v1/models",
    operation_id = "listModels",
    tag = "openai",
    responses(
        (status = 200, description = "The models", body = crate::openapi::ModelList),
        (status = 401, description = "Missing or invalid API key"),
    ),
    security(("api_key" = []), ("x_api_key" = [])),
)]
pub async fn list(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let caller = authenticate(&state.directory, &headers)?;
    let data: Vec<Value> = state
        .directory
        .models_for(caller.user_id)
        .iter()
        .map(|m| model_object(m))
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

/// Get one model
#[utoipa::path(
    get,
    path = "/v1/models/{id}",
    operation_id = "getModel",
    tag = "openai",
    params(("id" = String, Path, description = "The model name")),
    responses(
        (status = 200, description = "The model", body = crate::openapi::Model),
        (status = 401, description = "Missing or invalid API key"),
        (status = 404, description = "Unknown model, or not served to this caller"),
    ),
    security(("api_key" = []), ("x_api_key" = [])),
)]
pub async fn get(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let caller = authenticate(&state.directory, &headers)?;
    match state.directory.model_for(&id, caller.user_id) {
        ModelStatus::Available => Ok(Json(model_object(&id))),
        _ => Err(ApiError::ModelNotFound(id)),
    }
}
