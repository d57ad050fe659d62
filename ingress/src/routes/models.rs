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
