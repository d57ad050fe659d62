//! `/api/admin/nodes`: the remote worker nodes attached now (`sluice node`), with the
//! models they serve, their load and their health.
//!
//! Nodes are not configuration: each announces itself in the nodes bucket and is listed
//! while its heartbeat arrives (the directory follows the bucket). Health is the workers'
//! circuit breaker for the node's channel, read from the shared health bucket.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use schemas::work::{ApiErrorInfo, ErrorKind};
use serde::Serialize;
use serde_json::{json, Value};
use uuid::Uuid;
use workers::health::{now_ms, BanRecord};
use workers::node::{NodeRecord, ServedModel};

use crate::auth::Admin;
use crate::error::error_response;
use crate::state::AppState;

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/admin/nodes", get(list))
        .route("/api/admin/nodes/{id}", get(get_one))
}

/// A node as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct NodeView {
    id: Uuid,
    name: String,
    /// The channel name its requests are recorded under (`AttemptStarted`, `CompletionFinished`).
    channel: String,
    version: String,
    #[schema(value_type = Vec<crate::openapi::ServedModel>)]
    models: Vec<ServedModel>,
    max_parallel: u32,
    /// Calls running on the node, as of its last heartbeat.
    in_flight: u32,
    /// `in_flight / max_parallel`.
    load: f64,
    priority: i32,
    /// Node clock.
    started_at: Option<DateTime<Utc>>,
    /// Node clock.
    last_heartbeat_at: Option<DateTime<Utc>>,
    health: NodeHealth,
}

/// The workers' view of the node's channel.
#[derive(Debug, Default, Serialize, utoipa::ToSchema)]
pub struct NodeHealth {
    /// `healthy`, `banned` (the breaker keeps it out of routing until `banned_until`), or
    /// `probing` (the ban ran out; the next call decides).
    status: &'static str,
    banned_until: Option<DateTime<Utc>>,
    /// The failure kind behind the current ban.
    #[schema(value_type = Option<crate::openapi::ErrorKindDoc>)]
    ban_kind: Option<ErrorKind>,
    /// Calls the live workers have in flight on it.
    routed_in_flight: u32,
}

fn time(ms: u64) -> Option<DateTime<Utc>> {
    i64::try_from(ms)
        .ok()
        .and_then(DateTime::<Utc>::from_timestamp_millis)
}

fn view(record: &NodeRecord) -> NodeView {
    NodeView {
        id: record.id,
        name: record.name.clone(),
        channel: record.channel_name(),
        version: record.version.clone(),
        models: record.models.clone(),
        max_parallel: record.max_parallel,
        in_flight: record.in_flight,
        load: f64::from(record.in_flight) / f64::from(record.max_parallel.max(1)),
        priority: record.priority,
        started_at: time(record.started_at_ms),
        last_heartbeat_at: time(record.at_ms),
        health: NodeHealth {
            status: "healthy",
            ..NodeHealth::default()
        },
    }
}

/// Reads bans and routed loads of `views` from the health bucket. Best effort: without
/// the bucket (no worker ever ran) or while NATS is away, every node shows as healthy.
async fn attach_health(state: &AppState, views: &mut [NodeView]) {
    let Ok(kv) = state
        .js
        .get_key_value(state.ns.channel_health_bucket())
        .await
    else {
        return;
    };
    let now = now_ms();
    let routed = workers::health::in_flight_by_channel(&kv)
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "routed in-flight counts left out of the node listing");
            Default::default()
        });
    for view in views.iter_mut() {
        view.health.routed_in_flight = routed.get(&view.id).copied().unwrap_or(0);
        let Ok(Some(bytes)) = kv.get(format!("ban.{}", view.id.simple())).await else {
            continue;
        };
        let Ok(ban) = serde_json::from_slice::<BanRecord>(&bytes) else {
            continue;
        };
        if ban.until_ms > now {
            view.health.status = "banned";
            view.health.banned_until = time(ban.until_ms);
            view.health.ban_kind = ban.kind;
        } else if ban.until_ms != 0 {
            view.health.status = "probing";
        }
    }
}

/// The remote worker nodes attached now
///
/// With the models they serve, their load and their health.
#[utoipa::path(
    get,
    path = "/api/admin/nodes",
    operation_id = "adminListNodes",
    tag = "admin",
    responses(
        (status = 200, description = "The live nodes", body = crate::openapi::NodeList),
        (status = 401, description = "Missing credentials"),
        (status = 403, description = "Not an admin"),
    ),
    security(("admin_token" = [])),
)]
pub async fn list(_: Admin, State(state): State<Arc<AppState>>) -> Json<Value> {
    let nodes = state.directory.nodes();
    let mut data: Vec<NodeView> = nodes.nodes.iter().map(view).collect();
    attach_health(&state, &mut data).await;
    Json(json!({ "data": data }))
}

/// One live remote worker node
#[utoipa::path(
    get,
    path = "/api/admin/nodes/{id}",
    operation_id = "adminGetNode",
    tag = "admin",
    params(("id" = String, Path, description = "The node id (a UUID)")),
    responses(
        (status = 200, description = "The node", body = NodeView),
        (status = 401, description = "Missing credentials"),
        (status = 403, description = "Not an admin"),
        (status = 404, description = "No live node has this id"),
    ),
    security(("admin_token" = [])),
)]
pub async fn get_one(
    _: Admin,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Response {
    let nodes = state.directory.nodes();
    let found = Uuid::try_parse(&id)
        .ok()
        .and_then(|id| nodes.nodes.iter().find(|n| n.id == id));
    let Some(record) = found else {
        return error_response(&ApiErrorInfo {
            status: 404,
            kind: ErrorKind::BadRequest,
            message: "no live node has this id".to_owned(),
            code: Some("not_found".to_owned()),
            param: None,
            retry_after: None,
        });
    };
    let mut data = [view(record)];
    attach_health(&state, &mut data).await;
    let [node] = data;
    Json(node).into_response()
}
