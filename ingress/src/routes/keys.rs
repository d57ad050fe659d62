//! `/api/keys`: a user's own API keys. Creating one shows the key once; only its SHA-256
//! and a display prefix are stored. Another user's key is a 404, never a 403, so ids do
//! not leak. Users may only restrict their keys (name, expiry, models, RPM/TPM); money
//! (quota) and the channel group are an admin's (`/api/admin/keys`).
//!
//! Every change appends an audit event and refreshes this ingress's directory at once, so
//! a revoked key stops working here immediately and on other ingresses within one refresh.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::sync::Arc;
use uuid::Uuid;

use schemas::events::{Event, KeyCreated, KeyRevoked, KeyUpdated};
use schemas::Nanos;

use crate::accounts::{audit, db_error, AccountError, AuthUser};
use crate::error::ApiError;
use crate::routes::body::{double_option, ApiJson};
use crate::state::AppState;

/// Whose keys a call may touch.
#[derive(Debug, Clone, Copy)]
pub enum Scope {
    Owner(Uuid),
    Admin,
}

impl Scope {
    fn user(self) -> Option<Uuid> {
        match self {
            Scope::Owner(u) => Some(u),
            Scope::Admin => None,
        }
    }
}

/// A key as the API shows it: never the key or its hash.
#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct KeyView {
    pub id: Uuid,
    pub user_id: Option<Uuid>,
    pub name: String,
    pub prefix: String,
    #[sqlx(rename = "key_group")]
    pub group: String,
    /// USD; null = no cap. A key without a user spends quota + credits (null: unlimited);
    /// a key with a user spends the user's balance and plan, at most `quota` + credits.
    #[serde(serialize_with = "usd_opt")]
    #[schema(value_type = Option<String>)]
    pub quota: Option<i64>,
    pub rpm: Option<i32>,
    pub tpm: Option<i32>,
    pub allowed_models: Vec<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    /// Credits granted to the key, USD.
    #[serde(serialize_with = "usd")]
    #[schema(value_type = String)]
    pub credits: i64,
    /// Spent as projected by billing, USD.
    #[serde(serialize_with = "usd")]
    #[schema(value_type = String)]
    pub spent: i64,
}

/// Nano-dollars as a decimal USD string, as money is shown on the API.
pub fn usd<S: serde::Serializer>(n: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&Nanos(*n).to_usd_string())
}

pub fn usd_opt<S: serde::Serializer>(n: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
    match n {
        Some(n) => s.serialize_str(&Nanos(*n).to_usd_string()),
        None => s.serialize_none(),
    }
}

pub const KEY_SELECT: &str =
    "SELECT k.id, k.user_id, k.name, k.prefix, k.key_group, k.quota_nanos AS quota, k.rpm, k.tpm, \
     k.allowed_models, k.expires_at, k.revoked_at, k.created_at, \
     COALESCE(b.granted_nanos, 0) AS credits, COALESCE(b.spent_nanos, 0) AS spent \
     FROM api_keys k LEFT JOIN key_balances b ON b.key_id = k.id";

/// What creating a key may set; `group` and `quota` only for admins.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    #[schema(min_length = 1, max_length = 100, pattern = r"\S")]
    pub name: String,
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub allowed_models: Vec<String>,
    #[serde(default)]
    #[schema(minimum = 1, maximum = 2147483647)]
    pub rpm: Option<u32>,
    #[serde(default)]
    #[schema(minimum = 1, maximum = 2147483647)]
    pub tpm: Option<u32>,
    #[serde(default)]
    pub group: Option<String>,
    /// USD; absent or null = no cap (admins only; see [`KeyView::quota`]).
    #[serde(default)]
    #[schema(pattern = r"^[0-9]{1,9}(\.[0-9]{1,9})?$")]
    pub quota: Option<String>,
    /// Admins only: the owner.
    #[serde(default)]
    pub user_id: Option<Uuid>,
}

/// A PATCH: absent fields stay, `null` clears.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateKey {
    #[serde(default)]
    #[schema(min_length = 1, max_length = 100, pattern = r"\S")]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "double_option")]
    pub expires_at: Option<Option<DateTime<Utc>>>,
    #[serde(default)]
    pub allowed_models: Option<Vec<String>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(minimum = 1, maximum = 2147483647)]
    pub rpm: Option<Option<u32>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(minimum = 1, maximum = 2147483647)]
    pub tpm: Option<Option<u32>>,
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(pattern = r"^[0-9]{1,9}(\.[0-9]{1,9})?$")]
    pub quota: Option<Option<String>>,
}

fn new_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("sk-{}", hex::encode(bytes))
}

fn positive(param: &'static str, v: Option<u32>) -> Result<Option<i32>, AccountError> {
    match v {
        None => Ok(None),
        Some(0) => Err(AccountError::invalid(
            param,
            format!("`{param}` must be at least 1"),
        )),
        Some(n) => i32::try_from(n)
            .map(Some)
            .map_err(|_| AccountError::invalid(param, format!("`{param}` is too large"))),
    }
}

fn quota_nanos(v: Option<&str>) -> Result<Option<i64>, AccountError> {
    v.map(|q| match Nanos::from_usd_str(q) {
        Ok(n) if n.0 >= 0 => Ok(n.0),
        Ok(_) => Err(AccountError::invalid(
            "quota",
            "`quota` must be zero or more",
        )),
        Err(e) => Err(AccountError::invalid("quota", e.to_string())),
    })
    .transpose()
}

fn check_name(name: &str) -> Result<String, AccountError> {
    let name = name.trim();
    if name.is_empty() || name.len() > 100 {
        return Err(AccountError::invalid(
            "name",
            "the name needs 1 to 100 characters",
        ));
    }
    Ok(name.to_owned())
}

/// Creates a key in `scope`; the answer is the only time the key itself is shown.
pub async fn create(
    state: &AppState,
    scope: Scope,
    body: CreateKey,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let name = check_name(&body.name)?;
    let rpm = positive("rpm", body.rpm)?;
    let tpm = positive("tpm", body.tpm)?;
    let (owner, group, quota) = match scope {
        Scope::Owner(user) => {
            if body.group.is_some() || body.quota.is_some() || body.user_id.is_some() {
                return Err(AccountError::invalid(
                    "quota",
                    "`group`, `quota` and `user_id` are set by an admin",
                )
                .into());
            }
            let group: String = sqlx::query_scalar("SELECT user_group FROM users WHERE id = $1")
                .bind(user)
                .fetch_optional(&state.pool)
                .await
                .map_err(db_error)?
                .ok_or(AccountError::NotFound("user"))?;
            // A user's key draws on the user's balance and plan; no cap of its own unless
            // an admin sets one (`quota`).
            (Some(user), group, None)
        }
        Scope::Admin => {
            if let Some(user) = body.user_id {
                let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM users WHERE id = $1")
                    .bind(user)
                    .fetch_optional(&state.pool)
                    .await
                    .map_err(db_error)?;
                exists.ok_or(AccountError::NotFound("user"))?;
            }
            let group = body.group.unwrap_or_else(|| "default".to_owned());
            (body.user_id, group, quota_nanos(body.quota.as_deref())?)
        }
    };
    let secret = new_secret();
    let prefix = format!("{}…", &secret[..10]);
    let id = schemas::new_id();
    let view: KeyView = sqlx::query_as(&format!(
        "WITH k AS (INSERT INTO api_keys (id, user_id, name, key_hash, prefix, key_group, quota_nanos, rpm, tpm, \
                                          allowed_models, expires_at, source) \
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 'api') RETURNING *) \
         {}",
        KEY_SELECT.replace("FROM api_keys k", "FROM k")
    ))
    .bind(id)
    .bind(owner)
    .bind(&name)
    .bind(crate::directory::hash_key(&secret))
    .bind(&prefix)
    .bind(&group)
    .bind(quota)
    .bind(rpm)
    .bind(tpm)
    .bind(&body.allowed_models)
    .bind(body.expires_at)
    .fetch_one(&state.pool)
    .await
    .map_err(db_error)?;
    let event = Event::KeyCreated(KeyCreated {
        key_id: id,
        name,
        prefix,
        group,
        source: "api".into(),
    });
    audit(&state.js, &state.ns, event, scope.user()).await;
    refresh(state).await;
    let mut out = serde_json::to_value(&view).map_err(|_| ApiError::Internal)?;
    if let Value::Object(map) = &mut out {
        map.insert("key".into(), Value::String(secret));
    }
    Ok((StatusCode::CREATED, Json(out)))
}

pub async fn list(
    state: &AppState,
    scope: Scope,
    user: Option<Uuid>,
) -> Result<Json<Value>, ApiError> {
    let owner = scope.user().or(user);
    let keys: Vec<KeyView> = sqlx::query_as(&format!(
        "{KEY_SELECT} WHERE ($1::uuid IS NULL OR k.user_id = $1) ORDER BY k.created_at DESC"
    ))
    .bind(owner)
    .fetch_all(&state.pool)
    .await
    .map_err(db_error)?;
    Ok(Json(json!({ "data": keys })))
}

/// One key within `scope`; anything else is "not found".
pub async fn get(state: &AppState, scope: Scope, id: Uuid) -> Result<KeyView, ApiError> {
    sqlx::query_as(&format!(
        "{KEY_SELECT} WHERE k.id = $1 AND ($2::uuid IS NULL OR k.user_id = $2)"
    ))
    .bind(id)
    .bind(scope.user())
    .fetch_optional(&state.pool)
    .await
    .map_err(db_error)?
    .ok_or_else(|| AccountError::NotFound("key").into())
}

pub async fn update(
    state: &AppState,
    scope: Scope,
    id: Uuid,
    body: UpdateKey,
) -> Result<Json<KeyView>, ApiError> {
    if matches!(scope, Scope::Owner(_)) && (body.group.is_some() || body.quota.is_some()) {
        return Err(
            AccountError::invalid("quota", "`group` and `quota` are set by an admin").into(),
        );
    }
    get(state, scope, id).await?;
    let mut changes = Map::new();
    let name = body.name.as_deref().map(check_name).transpose()?;
    let rpm = body.rpm.map(|v| positive("rpm", v)).transpose()?;
    let tpm = body.tpm.map(|v| positive("tpm", v)).transpose()?;
    let quota = body
        .quota
        .as_ref()
        .map(|q| quota_nanos(q.as_deref()))
        .transpose()?;
    if let Some(v) = &name {
        changes.insert("name".into(), json!(v));
    }
    if let Some(v) = &body.expires_at {
        changes.insert("expires_at".into(), json!(v));
    }
    if let Some(v) = &body.allowed_models {
        changes.insert("allowed_models".into(), json!(v));
    }
    if let Some(v) = rpm {
        changes.insert("rpm".into(), json!(v));
    }
    if let Some(v) = tpm {
        changes.insert("tpm".into(), json!(v));
    }
    if let Some(v) = &body.group {
        changes.insert("group".into(), json!(v));
    }
    if let Some(v) = quota {
        changes.insert("quota".into(), json!(v.map(|n| Nanos(n).to_usd_string())));
    }
    // Each optional column: a flag says whether to overwrite it, so `null` can clear.
    sqlx::query(
        "UPDATE api_keys SET
           name = COALESCE($2, name),
           expires_at = CASE WHEN $3 THEN $4 ELSE expires_at END,
           allowed_models = COALESCE($5, allowed_models),
           rpm = CASE WHEN $6 THEN $7 ELSE rpm END,
           tpm = CASE WHEN $8 THEN $9 ELSE tpm END,
           key_group = COALESCE($10, key_group),
           quota_nanos = CASE WHEN $11 THEN $12 ELSE quota_nanos END,
           updated_at = now()
         WHERE id = $1",
    )
    .bind(id)
    .bind(&name)
    .bind(body.expires_at.is_some())
    .bind(body.expires_at.flatten())
    .bind(&body.allowed_models)
    .bind(rpm.is_some())
    .bind(rpm.flatten())
    .bind(tpm.is_some())
    .bind(tpm.flatten())
    .bind(&body.group)
    .bind(quota.is_some())
    .bind(quota.flatten())
    .execute(&state.pool)
    .await
    .map_err(db_error)?;
    if !changes.is_empty() {
        let event = Event::KeyUpdated(KeyUpdated {
            key_id: id,
            changes: Value::Object(changes),
            by_user: scope.user(),
        });
        audit(&state.js, &state.ns, event, scope.user()).await;
        refresh(state).await;
    }
    Ok(Json(get(state, scope, id).await?))
}

/// Revokes a key; revoking twice is harmless and answers the same.
pub async fn revoke(state: &AppState, scope: Scope, id: Uuid) -> Result<Json<KeyView>, ApiError> {
    get(state, scope, id).await?;
    let changed = sqlx::query(
        "UPDATE api_keys SET revoked_at = now(), updated_at = now() WHERE id = $1 AND revoked_at IS NULL",
    )
    .bind(id)
    .execute(&state.pool)
    .await
    .map_err(db_error)?
    .rows_affected();
    if changed > 0 {
        let event = Event::KeyRevoked(KeyRevoked {
            key_id: id,
            by_user: scope.user(),
        });
        audit(&state.js, &state.ns, event, scope.user()).await;
        refresh(state).await;
    }
    Ok(Json(get(state, scope, id).await?))
}

/// Reloads this ingress's directory now, so the change applies to the next request here.
async fn refresh(state: &AppState) {
    if let Err(e) = state.directory.refresh(&state.pool).await {
        tracing::warn!(error = %e, "cannot refresh the key directory after a key change; the periodic refresh will");
    }
}

// ---- handlers of /api/keys ----

/// Create one of the caller's API keys
///
/// The answer is the only time the key itself is shown. `group`, `quota` and `user_id`
/// are an admin's to set.
#[utoipa::path(
    post,
    path = "/api/keys",
    operation_id = "createKey",
    tag = "accounts",
    request_body = CreateKey,
    responses(
        (status = 201, description = "The key, with the secret shown once", body = crate::openapi::CreatedKey),
        (status = 400, description = "Invalid body"),
        (status = 401, description = "Missing or invalid credentials"),
        (status = 403, description = "The API key belongs to no user"),
    ),
    security(("session_token" = []), ("api_key" = [])),
)]
pub async fn create_own(
    State(state): State<Arc<AppState>>,
    caller: AuthUser,
    ApiJson(body): ApiJson<CreateKey>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    create(&state, Scope::Owner(caller.user_id), body).await
}

/// The caller's API keys
#[utoipa::path(
    get,
    path = "/api/keys",
    operation_id = "listKeys",
    tag = "accounts",
    responses(
        (status = 200, description = "The keys, newest first", body = crate::openapi::KeyList),
        (status = 401, description = "Missing or invalid credentials"),
        (status = 403, description = "The API key belongs to no user"),
    ),
    security(("session_token" = []), ("api_key" = [])),
)]
pub async fn list_own(
    State(state): State<Arc<AppState>>,
    caller: AuthUser,
) -> Result<Json<Value>, ApiError> {
    list(&state, Scope::Owner(caller.user_id), None).await
}

/// One of the caller's API keys
#[utoipa::path(
    get,
    path = "/api/keys/{id}",
    operation_id = "getKey",
    tag = "accounts",
    params(("id" = String, Path, description = "The key id (a UUID)")),
    responses(
        (status = 200, description = "The key", body = KeyView),
        (status = 401, description = "Missing or invalid credentials"),
        (status = 403, description = "The API key belongs to no user"),
        (status = 404, description = "No such key of the caller's"),
    ),
    security(("session_token" = []), ("api_key" = [])),
)]
pub async fn get_own(
    State(state): State<Arc<AppState>>,
    caller: AuthUser,
    Path(id): Path<String>,
) -> Result<Json<KeyView>, ApiError> {
    let id = parse_id(&id)?;
    Ok(Json(get(&state, Scope::Owner(caller.user_id), id).await?))
}

/// Change one of the caller's API keys
///
/// Absent fields stay; `null` clears `expires_at`, `rpm` and `tpm`.
#[utoipa::path(
    patch,
    path = "/api/keys/{id}",
    operation_id = "updateKey",
    tag = "accounts",
    params(("id" = String, Path, description = "The key id (a UUID)")),
    request_body = UpdateKey,
    responses(
        (status = 200, description = "The key as changed", body = KeyView),
        (status = 400, description = "Invalid body"),
        (status = 401, description = "Missing or invalid credentials"),
        (status = 403, description = "The API key belongs to no user"),
        (status = 404, description = "No such key of the caller's"),
    ),
    security(("session_token" = []), ("api_key" = [])),
)]
pub async fn update_own(
    State(state): State<Arc<AppState>>,
    caller: AuthUser,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<UpdateKey>,
) -> Result<Json<KeyView>, ApiError> {
    let id = parse_id(&id)?;
    update(&state, Scope::Owner(caller.user_id), id, body).await
}

/// Revoke one of the caller's API keys
///
/// Revoking twice answers the same.
#[utoipa::path(
    delete,
    path = "/api/keys/{id}",
    operation_id = "revokeKey",
    tag = "accounts",
    params(("id" = String, Path, description = "The key id (a UUID)")),
    responses(
        (status = 200, description = "The key, revoked", body = KeyView),
        (status = 401, description = "Missing or invalid credentials"),
        (status = 403, description = "The API key belongs to no user"),
        (status = 404, description = "No such key of the caller's"),
    ),
    security(("session_token" = []), ("api_key" = [])),
)]
pub async fn revoke_own(
    State(state): State<Arc<AppState>>,
    caller: AuthUser,
    Path(id): Path<String>,
) -> Result<Json<KeyView>, ApiError> {
    let id = parse_id(&id)?;
    revoke(&state, Scope::Owner(caller.user_id), id).await
}

/// A malformed id names nothing: 404 like any unknown key.
pub fn parse_id(id: &str) -> Result<Uuid, AccountError> {
    Uuid::parse_str(id).map_err(|_| AccountError::NotFound("key"))
}
