//! `/healthz` (the process is alive) and `/readyz` (it can take requests: NATS is
//! connected and the key directory has loaded at least once).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};
use std::sync::Arc;

use crate::state::AppState;

/// Liveness: the process is up
#[utoipa::path(
    get,
    path = "/healthz",
    operation_id = "healthz",
    tag = "ops",
    responses((status = 200, description = "Alive", body = crate::openapi::HealthStatus)),
)]
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Readiness: NATS is connected and keys and models have loaded
#[utoipa::path(
    get,
    path = "/readyz",
    operation_id = "readyz",
    tag = "ops",
    responses(
        (status = 200, description = "Ready", body = crate::openapi::Readiness),
        (status = 503, description = "Not ready (yet)", body = crate::openapi::Readiness),
    ),
)]
pub async fn readyz(State(state): State<Arc<AppState>>) -> (StatusCode, Json<Value>) {
    let nats = matches!(
        state.nats.connection_state(),
        async_nats::connection::State::Connected
    );
    let directory = state.directory.is_loaded();
    let status = if nats && directory {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({"nats": nats, "directory": directory})))
}
