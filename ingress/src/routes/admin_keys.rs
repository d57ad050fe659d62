//! `/api/admin/keys` (any user's keys, or keys of no user) and `/api/admin/users`.

use axum::extract::{Path, State};
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
use crate::routes::body::{double_option, ApiJson, ApiQuery};
use crate::routes::keys::{self, parse_id, CreateKey, KeyView, Scope, UpdateKey};
use crate::state::AppState;

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct KeyFilter {
    #[serde(default)]
    user_id: Option<Uuid>,
}

/// Create a key for any user, or for no user
///
/// Admins may set `group`, `quota` (USD; null = no cap) and `user_id`. The answer is the
/// only time the key itself is shown.
#[utoipa::path(
    post,
    path = "/api/admin/keys",
    operation_id = "adminCreateKey",
    tag = "admin",
    request_body = CreateKey,
    responses(
        (status = 201, description = "The key, with the secret shown once", body = crate::openapi::CreatedKey),
        (status = 400, description = "Invalid body"),
        (status = 401, description = "Missing credentials"),
        (status = 403, description = "Not an admin"),
        (status = 404, description = "No such user"),
    ),
    security(("admin_token" = [])),
)]
pub async fn create(
    _: Admin,
    State(state): State<Arc<AppState>>,
    ApiJson(body): ApiJson<CreateKey>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    keys::create(&state, Scope::Admin, body).await
}

/// Every key, or one user's
#[utoipa::path(
    get,
    path = "/api/admin/keys",
    operation_id = "adminListKeys",
    tag = "admin",
    params(KeyFilter),
    responses(
        (status = 200, description = "The keys, newest first", body = crate::openapi::KeyList),
        (status = 400, description = "Invalid query"),
        (status = 401, description = "Missing credentials"),
        (status = 403, description = "Not an admin"),
    ),
    security(("admin_token" = [])),
)]
pub async fn list(
    _: Admin,
    State(state): State<Arc<AppState>>,
    ApiQuery(filter): ApiQuery<KeyFilter>,
) -> Result<Json<Value>, ApiError> {
    keys::list(&state, Scope::Admin, filter.user_id).await
}

/// Any key
#[utoipa::path(
    get,
    path = "/api/admin/keys/{id}",
    operation_id = "adminGetKey",
    tag = "admin",
    params(("id" = String, Path, description = "The key id (a UUID)")),
    responses(
        (status = 200, description = "The key", body = KeyView),
        (status = 401, description = "Missing credentials"),
        (status = 403, description = "Not an admin"),
        (status = 404, description = "No such key"),
    ),
    security(("admin_token" = [])),
)]
pub async fn get(
    _: Admin,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<KeyView>, ApiError> {
    Ok(Json(keys::get(&state, Scope::Admin, parse_id(&id)?).await?))
}

/// Change any key
///
/// Absent fields stay; `null` clears `expires_at`, `rpm`, `tpm` and `quota`.
#[utoipa::path(
    patch,
    path = "/api/admin/keys/{id}",
    operation_id = "adminUpdateKey",
    tag = "admin",
    params(("id" = String, Path, description = "The key id (a UUID)")),
    request_body = UpdateKey,
    responses(
        (status = 200, description = "The key as changed", body = KeyView),
        (status = 400, description = "Invalid body"),
        (status = 401, description = "Missing credentials"),
        (status = 403, description = "Not an admin"),
        (status = 404, description = "No such key"),
    ),
    security(("admin_token" = [])),
)]
pub async fn update(
    _: Admin,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<UpdateKey>,
) -> Result<Json<KeyView>, ApiError> {
    keys::update(&state, Scope::Admin, parse_id(&id)?, body).await
}

/// Revoke any key
#[utoipa::path(
    delete,
    path = "/api/admin/keys/{id}",
    operation_id = "adminRevokeKey",
    tag = "admin",
    params(("id" = String, Path, description = "The key id (a UUID)")),
    responses(
        (status = 200, description = "The key, revoked", body = KeyView),
        (status = 401, description = "Missing credentials"),
        (status = 403, description = "Not an admin"),
        (status = 404, description = "No such key"),
    ),
    security(("admin_token" = [])),
)]
pub async fn revoke(
    _: Admin,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<KeyView>, ApiError> {
    keys::revoke(&state, Scope::Admin, parse_id(&id)?).await
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUserBody {
    #[schema(min_length = 1, max_length = 64, pattern = r"\S")]
    name: String,
    #[serde(default)]
    #[schema(max_length = 254, pattern = "@")]
    email: Option<String>,
    #[serde(default)]
    #[schema(min_length = 8, max_length = 256)]
    password: Option<String>,
    #[serde(default = "default_role")]
    #[schema(value_type = crate::openapi::Role)]
    role: String,
    #[serde(default)]
    group: Option<String>,
}

fn default_role() -> String {
    "user".to_owned()
}

/// Creates a user of any role: with `SLUICE_ADMIN_TOKEN` this is how the first admin is made.
#[utoipa::path(
    post,
    path = "/api/admin/users",
    operation_id = "adminCreateUser",
    tag = "admin",
    request_body = CreateUserBody,
    responses(
        (status = 201, description = "The user", body = crate::accounts::UserView),
        (status = 400, description = "Invalid body"),
        (status = 401, description = "Missing credentials"),
        (status = 403, description = "Not an admin"),
        (status = 409, description = "The name or email is taken"),
    ),
    security(("admin_token" = [])),
)]
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

/// Every user
#[utoipa::path(
    get,
    path = "/api/admin/users",
    operation_id = "adminListUsers",
    tag = "admin",
    responses(
        (status = 200, description = "The users, oldest first", body = crate::openapi::UserList),
        (status = 401, description = "Missing credentials"),
        (status = 403, description = "Not an admin"),
    ),
    security(("admin_token" = [])),
)]
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

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateUserBody {
    #[serde(default)]
    #[schema(value_type = Option<crate::openapi::Role>)]
    role: Option<String>,
    #[serde(default)]
    group: Option<String>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(minimum = 1, maximum = 2147483647)]
    rpm: Option<Option<u32>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(minimum = 1, maximum = 2147483647)]
    tpm: Option<Option<u32>>,
    #[serde(default)]
    disabled: Option<bool>,
}

/// Role, group, per-user RPM/TPM (shared by all their keys) and disabling a user.
#[utoipa::path(
    patch,
    path = "/api/admin/users/{id}",
    operation_id = "adminUpdateUser",
    tag = "admin",
    params(("id" = String, Path, description = "The user id (a UUID)")),
    request_body = UpdateUserBody,
    responses(
        (status = 200, description = "The user as changed", body = crate::accounts::UserView),
        (status = 400, description = "Invalid body"),
        (status = 401, description = "Missing credentials"),
        (status = 403, description = "Not an admin"),
        (status = 404, description = "No such user"),
    ),
    security(("admin_token" = [])),
)]
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
