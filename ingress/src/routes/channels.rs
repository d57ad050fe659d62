//! `/api/channels`: a user's personal channels (bring your own key). The fields, checks,
//! sealing of the provider key and audit events are the admin API's
//! ([`super::admin_channels`], called with [`Scope::Owner`]); what differs is whose
//! channels a call sees. A personal channel serves only its owner's requests, ahead of
//! every shared channel; anyone else's channel is a 404 here, and never routes their
//! requests.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::accounts::AuthUser;
use crate::routes::admin_channels::{
    self as shared, ChannelAdminError, ChannelView, CreateChannel, Scope, TestParams, UpdateChannel,
};
use crate::routes::body::{ApiJson, ApiQuery};
use crate::state::AppState;

type Result<T> = std::result::Result<T, ChannelAdminError>;

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/channels", get(list).post(create))
        .route(
            "/api/channels/{id}",
            get(get_one).patch(update).put(update).delete(delete),
        )
        .route("/api/channels/{id}/enable", post(enable))
        .route("/api/channels/{id}/disable", post(disable))
        .route("/api/channels/{id}/test", post(test))
}

fn scope(user: &AuthUser) -> Scope {
    Scope::Owner(user.user_id)
}

/// Create a personal channel
///
/// It serves only the caller's requests, ahead of every shared channel. At most 50 per user.
#[utoipa::path(
    post,
    path = "/api/channels",
    operation_id = "createChannel",
    tag = "channels",
    request_body = CreateChannel,
    responses(
        (status = 201, description = "The channel", body = ChannelView),
        (status = 400, description = "Invalid body"),
        (status = 401, description = "Missing or invalid credentials"),
        (status = 403, description = "The API key belongs to no user"),
        (status = 409, description = "A channel of that name exists, or the caller has 50 already"),
        (status = 503, description = "No `SLUICE_SECRET_KEY` to seal the key with, or the audit log is unavailable; nothing was changed"),
    ),
    security(("session_token" = []), ("api_key" = [])),
)]
pub async fn create(
    user: AuthUser,
    State(state): State<Arc<AppState>>,
    ApiJson(body): ApiJson<CreateChannel>,
) -> Result<(StatusCode, Json<ChannelView>)> {
    let view = shared::create_in(&state, scope(&user), body).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// The caller's personal channels
#[utoipa::path(
    get,
    path = "/api/channels",
    operation_id = "listChannels",
    tag = "channels",
    responses(
        (status = 200, description = "The channels, by priority", body = crate::openapi::ChannelList),
        (status = 401, description = "Missing or invalid credentials"),
        (status = 403, description = "The API key belongs to no user"),
    ),
    security(("session_token" = []), ("api_key" = [])),
)]
pub async fn list(user: AuthUser, State(state): State<Arc<AppState>>) -> Result<Json<Value>> {
    let data = shared::list_in(&state, scope(&user)).await?;
    Ok(Json(json!({ "data": data })))
}

/// One of the caller's personal channels
#[utoipa::path(
    get,
    path = "/api/channels/{id}",
    operation_id = "getChannel",
    tag = "channels",
    params(("id" = String, Path, description = "The channel id (a UUID)")),
    responses(
        (status = 200, description = "The channel", body = ChannelView),
        (status = 401, description = "Missing or invalid credentials"),
        (status = 403, description = "The API key belongs to no user"),
        (status = 404, description = "No such channel of the caller's"),
    ),
    security(("session_token" = []), ("api_key" = [])),
)]
pub async fn get_one(
    user: AuthUser,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<ChannelView>> {
    shared::get_in(&state, scope(&user), &id).await.map(Json)
}

/// Change one of the caller's personal channels
///
/// Absent fields stay; `base_url` and `api_key` can be cleared with `null`.
#[utoipa::path(
    method(patch, put),
    path = "/api/channels/{id}",
    operation_id = "updateChannel",
    tag = "channels",
    params(("id" = String, Path, description = "The channel id (a UUID)")),
    request_body = UpdateChannel,
    responses(
        (status = 200, description = "The channel as changed", body = ChannelView),
        (status = 400, description = "Invalid body"),
        (status = 401, description = "Missing or invalid credentials"),
        (status = 403, description = "The API key belongs to no user"),
        (status = 404, description = "No such channel of the caller's"),
        (status = 409, description = "A channel of that name exists"),
        (status = 503, description = "No `SLUICE_SECRET_KEY`, or the audit log is unavailable; nothing was changed"),
    ),
    security(("session_token" = []), ("api_key" = [])),
)]
pub async fn update(
    user: AuthUser,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<UpdateChannel>,
) -> Result<Json<ChannelView>> {
    shared::change(&state, scope(&user), &id, body)
        .await
        .map(Json)
}

/// Enable one of the caller's personal channels
#[utoipa::path(
    post,
    path = "/api/channels/{id}/enable",
    operation_id = "enableChannel",
    tag = "channels",
    params(("id" = String, Path, description = "The channel id (a UUID)")),
    responses(
        (status = 200, description = "The channel", body = ChannelView),
        (status = 401, description = "Missing or invalid credentials"),
        (status = 403, description = "The API key belongs to no user"),
        (status = 404, description = "No such channel of the caller's"),
        (status = 503, description = "The audit log is unavailable; nothing was changed"),
    ),
    security(("session_token" = []), ("api_key" = [])),
)]
pub async fn enable(
    user: AuthUser,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<ChannelView>> {
    shared::switch(&state, scope(&user), &id, true)
        .await
        .map(Json)
}

/// Disable one of the caller's personal channels
#[utoipa::path(
    post,
    path = "/api/channels/{id}/disable",
    operation_id = "disableChannel",
    tag = "channels",
    params(("id" = String, Path, description = "The channel id (a UUID)")),
    responses(
        (status = 200, description = "The channel", body = ChannelView),
        (status = 401, description = "Missing or invalid credentials"),
        (status = 403, description = "The API key belongs to no user"),
        (status = 404, description = "No such channel of the caller's"),
        (status = 503, description = "The audit log is unavailable; nothing was changed"),
    ),
    security(("session_token" = []), ("api_key" = [])),
)]
pub async fn disable(
    user: AuthUser,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<ChannelView>> {
    shared::switch(&state, scope(&user), &id, false)
        .await
        .map(Json)
}

/// Delete one of the caller's personal channels
#[utoipa::path(
    delete,
    path = "/api/channels/{id}",
    operation_id = "deleteChannel",
    tag = "channels",
    params(("id" = String, Path, description = "The channel id (a UUID)")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "Missing or invalid credentials"),
        (status = 403, description = "The API key belongs to no user"),
        (status = 404, description = "No such channel of the caller's"),
        (status = 503, description = "The audit log is unavailable; nothing was changed"),
    ),
    security(("session_token" = []), ("api_key" = [])),
)]
pub async fn delete(
    user: AuthUser,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    shared::delete_in(&state, scope(&user), &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Sends a one-token request through the user's own channel and reports latency or the
/// error, as the admin test does.
#[utoipa::path(
    post,
    path = "/api/channels/{id}/test",
    operation_id = "testChannel",
    tag = "channels",
    params(("id" = String, Path, description = "The channel id (a UUID)"), TestParams),
    responses(
        (status = 200, description = "The test's outcome (`ok` false when the channel failed)", body = crate::openapi::ChannelTestReport),
        (status = 400, description = "The channel does not serve `model`"),
        (status = 401, description = "Missing or invalid credentials"),
        (status = 403, description = "The API key belongs to no user"),
        (status = 404, description = "No such channel of the caller's"),
        (status = 503, description = "The channel's key cannot be opened (no or another `SLUICE_SECRET_KEY`)"),
    ),
    security(("session_token" = []), ("api_key" = [])),
)]
pub async fn test(
    user: AuthUser,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    ApiQuery(params): ApiQuery<TestParams>,
) -> Result<Json<Value>> {
    shared::test_in(&state, scope(&user), &id, params)
        .await
        .map(Json)
}
