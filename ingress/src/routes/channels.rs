//! `/api/channels`: a user's personal channels (bring your own key). The fields, checks,
//! sealing of the provider key and audit events are the admin API's
//! ([`super::admin_channels`], called with [`Scope::Owner`]); what differs is whose
//! channels a call sees. A personal channel serves only its owner's requests, ahead of
//! every shared channel; anyone else's channel is a 404 here, and never routes their
//! requests.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::accounts::AuthUser;
use crate::routes::admin_channels::{
    self as shared, ChannelAdminError, ChannelView, CreateChannel, Scope, TestParams, UpdateChannel,
};
use crate::routes::body::ApiJson;
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

pub async fn create(
    user: AuthUser,
    State(state): State<Arc<AppState>>,
    ApiJson(body): ApiJson<CreateChannel>,
) -> Result<(StatusCode, Json<ChannelView>)> {
    let view = shared::create_in(&state, scope(&user), body).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

pub async fn list(user: AuthUser, State(state): State<Arc<AppState>>) -> Result<Json<Value>> {
    let data = shared::list_in(&state, scope(&user)).await?;
    Ok(Json(json!({ "data": data })))
}

pub async fn get_one(
    user: AuthUser,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<ChannelView>> {
    shared::get_in(&state, scope(&user), &id).await.map(Json)
}

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

pub async fn enable(
    user: AuthUser,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<ChannelView>> {
    shared::switch(&state, scope(&user), &id, true)
        .await
        .map(Json)
}

pub async fn disable(
    user: AuthUser,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<ChannelView>> {
    shared::switch(&state, scope(&user), &id, false)
        .await
        .map(Json)
}

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
pub async fn test(
    user: AuthUser,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(params): Query<TestParams>,
) -> Result<Json<Value>> {
    shared::test_in(&state, scope(&user), &id, params)
        .await
        .map(Json)
}
