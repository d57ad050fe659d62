//! `/api/admin/keys` (any user's keys, or keys of no user) and `/api/admin/users`.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use uuid::Uuid;

use schemas::events::{Event, UserUpdated};

use crate::accounts::{
    audit, create_user, db_error, AccountError, NewUser, Role, UserView, USER_COLUMNS,
};
use crate::auth::Admin;
use crate::error::ApiError;
use crate::routes::body::{double_option, ApiJson};
use crate::routes::keys::{self, parse_id, CreateKey, KeyView, Scope, UpdateKey};
use crate::state::AppState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFilter {
    #[serde(default)]
    user_id: Option<Uuid>,
}

pub async fn create(
    _: Admin,
    State(state): State<Arc<AppState>>,
    ApiJson(body): ApiJson<CreateKey>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    keys::create(&state, Scope::Admin, body).await
}

pub async fn list(
    _: Admin,
    State(state): State<Arc<AppState>>,
    Query(filter): Query<KeyFilter>,
) -> Result<Json<Value>, ApiError> {
    keys::list(&state, Scope::Admin, filter.user_id).await
}

pub async fn get(
    _: Admin,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<KeyView>, ApiError> {
    Ok(Json(keys::get(&state, Scope::Admin, parse_id(&id)?).await?))
}

pub async fn update(
    _: Admin,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<UpdateKey>,
) -> Result<Json<KeyView>, ApiError> {
    keys::update(&state, Scope::Admin, parse_id(&id)?, body).await
}

pub async fn revoke(
    _: Admin,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<KeyView>, ApiError> {
    keys::revoke(&state, Scope::Admin, parse_id(&id)?).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateUserBody {
    name: String,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default = "default_role")]
    role: String,
    #[serde(default)]
    group: Option<String>,
}

fn default_role() -> String {
    "user".to_owned()
}

/// Creates a user of any role: with `SLUICE_ADMIN_TOKEN` this is how the first admin is made.
pub async fn create_user_route(
    _: Admin,
    State(state): State<Arc<AppState>>,
    ApiJson(body): ApiJson<CreateUserBody>,
) -> Result<(StatusCode, Json<UserView>), ApiError> {
    let user = create_user(
        &state.pool,
        &state.js,
        &state.ns,
        NewUser {
            name: body.name,
            email: body.email,
            password: body.password,
            role: Role::parse(&body.role)?,
            group: body.group.unwrap_or_else(|| "default".to_owned()),
            source: "admin",
        },
    )
    .await?;
    Ok((StatusCode::CREATED, Json(user)))
}

pub async fn list_users(
    _: Admin,
    State(state): State<Arc<AppState>>,
) -> Result<Json<Value>, ApiError> {
    let users: Vec<UserView> = sqlx::query_as(&format!(
        "SELECT {USER_COLUMNS} FROM users ORDER BY created_at"
    ))
    .fetch_all(&state.pool)
    .await
    .map_err(db_error)?;
    Ok(Json(json!({ "data": users })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateUserBody {
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    group: Option<String>,
    #[serde(default, deserialize_with = "double_option")]
    rpm: Option<Option<u32>>,
    #[serde(default, deserialize_with = "double_option")]
    tpm: Option<Option<u32>>,
    #[serde(default)]
    disabled: Option<bool>,
}

/// Role, group, per-user RPM/TPM (shared by all their keys) and disabling a user.
pub async fn update_user(
    _: Admin,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<UpdateUserBody>,
) -> Result<Json<UserView>, ApiError> {
    let id = Uuid::parse_str(&id).map_err(|_| AccountError::NotFound("user"))?;
    let role = body.role.as_deref().map(Role::parse).transpose()?;
    let limit = |param: &'static str, v: Option<u32>| -> Result<Option<i32>, AccountError> {
        v.map(|n| {
            i32::try_from(n)
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| AccountError::invalid(param, format!("`{param}` must be 1 or more")))
        })
        .transpose()
    };
    let rpm = body.rpm.map(|v| limit("rpm", v)).transpose()?;
    let tpm = body.tpm.map(|v| limit("tpm", v)).transpose()?;
    let user: Option<UserView> = sqlx::query_as(&format!(
        "UPDATE users SET role = COALESCE($2, role), user_group = COALESCE($3, user_group),
           rpm = CASE WHEN $4 THEN $5 ELSE rpm END, tpm = CASE WHEN $6 THEN $7 ELSE tpm END,
           disabled = COALESCE($8, disabled)
         WHERE id = $1 RETURNING {USER_COLUMNS}"
    ))
    .bind(id)
    .bind(role.map(Role::as_str))
    .bind(&body.group)
    .bind(rpm.is_some())
    .bind(rpm.flatten())
    .bind(tpm.is_some())
    .bind(tpm.flatten())
    .bind(body.disabled)
    .fetch_optional(&state.pool)
    .await
    .map_err(db_error)?;
    let user = user.ok_or(AccountError::NotFound("user"))?;
    let mut changes = serde_json::Map::new();
    if let Some(r) = role {
        changes.insert("role".into(), json!(r.as_str()));
    }
    if let Some(g) = &body.group {
        changes.insert("group".into(), json!(g));
    }
    if let Some(v) = rpm {
        changes.insert("rpm".into(), json!(v));
    }
    if let Some(v) = tpm {
        changes.insert("tpm".into(), json!(v));
    }
    if let Some(d) = body.disabled {
        changes.insert("disabled".into(), json!(d));
    }
    if !changes.is_empty() {
        let event = Event::UserUpdated(UserUpdated {
            user_id: id,
            changes: Value::Object(changes),
            by_user: None,
        });
        audit(&state.js, &state.ns, event, None).await;
    }
    if let Err(e) = state.directory.refresh(&state.pool).await {
        tracing::warn!(error = %e, "cannot refresh the key directory after a user change");
    }
    Ok(Json(user))
}
