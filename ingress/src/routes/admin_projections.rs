//! `GET /api/admin/projections`: how far behind the log each projector is.
//!
//! For each projector with a checkpoint (plus the ones every deployment runs, reported at
//! position 0 before their first batch): its checkpoint, the events after it, and the lag
//! in seconds, i.e. how long the oldest event it has not applied has been in the log
//! (0 when caught up). The log head is reported alongside.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::auth::Admin;
use crate::error::ApiError;
use crate::state::AppState;

/// Projectors every deployment runs (`sluice billing`, `sluice projector`).
const EXPECTED: &[&str] = &["billing", "requests", "conversations"];

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ProjectionsReport {
    pub head: Head,
    pub projections: Vec<ProjectionLag>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Head {
    pub position: i64,
    pub recorded_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct ProjectionLag {
    pub name: String,
    pub position: i64,
    /// When the checkpoint last moved; `None` before the first batch.
    pub updated_at: Option<DateTime<Utc>>,
    pub lag_events: i64,
    pub lag_seconds: f64,
}

/// How far behind the event log each projector is
#[utoipa::path(
    get,
    path = "/api/admin/projections",
    operation_id = "adminListProjections",
    tag = "admin",
    responses(
        (status = 200, description = "The log head and each projector's checkpoint and lag", body = ProjectionsReport),
        (status = 401, description = "Missing credentials"),
        (status = 403, description = "Not an admin"),
    ),
    security(("admin_token" = [])),
)]
pub async fn list(
    _admin: Admin,
    State(state): State<Arc<AppState>>,
) -> Result<Json<ProjectionsReport>, ApiError> {
    let head: (i64, Option<DateTime<Utc>>) = sqlx::query_as(
        "SELECT COALESCE(max(position), 0)::bigint, max(recorded_at) FROM event_log",
    )
    .fetch_one(&state.pool)
    .await
    .map_err(internal)?;
    // Each lag is an index range scan from the checkpoint to the head.
    let projections: Vec<ProjectionLag> = sqlx::query_as(
        "WITH p AS ( \
           SELECT projector AS name, position, updated_at FROM checkpoints \
           UNION ALL \
           SELECT name, 0, NULL FROM unnest($1::text[]) AS e(name) \
            WHERE NOT EXISTS (SELECT 1 FROM checkpoints c WHERE c.projector = e.name) \
         ) \
         SELECT p.name, p.position, p.updated_at, \
                (SELECT count(*) FROM event_log e WHERE e.position > p.position)::bigint AS lag_events, \
                COALESCE(EXTRACT(EPOCH FROM now() - ( \
                  SELECT e.recorded_at FROM event_log e WHERE e.position > p.position \
                  ORDER BY e.position LIMIT 1)), 0)::float8 AS lag_seconds \
         FROM p ORDER BY p.name",
    )
    .bind(EXPECTED)
    .fetch_all(&state.pool)
    .await
    .map_err(internal)?;
    Ok(Json(ProjectionsReport {
        head: Head {
            position: head.0,
            recorded_at: head.1,
        },
        projections,
    }))
}

fn internal(err: sqlx::Error) -> ApiError {
    tracing::error!(error = %err, "reading projection checkpoints failed");
    ApiError::Internal
}
