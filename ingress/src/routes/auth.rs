//! Users: `POST /api/auth/register`, `POST /api/auth/login`, `GET /api/me`,
//! `PUT /api/me/password`. Passwords are argon2id; answers never carry the hash.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::{Arc, LazyLock};

use schemas::events::{Event, UserUpdated};

use crate::accounts::{
    audit, check_password, create_user, db_error, hash_password, verify_password, AccountError,
    AuthUser, NewUser, Role, UserView, USER_COLUMNS,
};
use crate::error::ApiError;
use crate::jwt;
use crate::routes::body::ApiJson;
use crate::state::AppState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterBody {
    name: String,
    #[serde(default)]
    email: Option<String>,
    password: String,
}

pub async fn register(
    State(state): State<Arc<AppState>>,
    ApiJson(body): ApiJson<RegisterBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    // Checked before the token is needed, so a gateway without a JWT secret creates nobody.
    if state.opts.jwt_secret.is_none() {
        return Err(AccountError::SignInDisabled.into());
    }
    let user = create_user(
        &state.pool,
        &state.js,
        &state.ns,
        NewUser {
            name: body.name,
            email: body.email,
            password: Some(body.password),
            role: Role::User,
            group: "default".to_owned(),
            source: "register",
        },
    )
    .await?;
    let token = jwt::issue(state.opts.jwt_secret.as_deref(), user.id)?;
    Ok((StatusCode::CREATED, Json(session(token, &user))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginBody {
    /// Email or user name.
    #[serde(alias = "email", alias = "name")]
    login: String,
    password: String,
}

/// A valid hash verified against when the login names nobody, so a failed login takes
/// the same time whether or not the account exists.
static DUMMY_HASH: LazyLock<String> = LazyLock::new(|| {
    use argon2::password_hash::{PasswordHasher, SaltString};
    SaltString::encode_b64(&[7u8; 16])
        .ok()
        .and_then(|salt| {
            argon2::Argon2::default()
                .hash_password(b"not a password", &salt)
                .ok()
                .map(|h| h.to_string())
        })
        .unwrap_or_default()
});

pub async fn login(
    State(state): State<Arc<AppState>>,
    ApiJson(body): ApiJson<LoginBody>,
) -> Result<Json<Value>, ApiError> {
    let login = body.login.trim().to_owned();
    let row: Option<(uuid::Uuid, Option<String>, bool)> = sqlx::query_as(
        "SELECT id, password_hash, disabled FROM users WHERE email = lower($1) OR name = $1
         ORDER BY (email = lower($1)) DESC NULLS LAST LIMIT 1",
    )
    .bind(&login)
    .fetch_optional(&state.pool)
    .await
    .map_err(db_error)?;
    let (id, hash, disabled) = match row {
        Some((id, Some(hash), disabled)) => (Some(id), hash, disabled),
        _ => (None, DUMMY_HASH.clone(), true),
    };
    let ok = verify_password(body.password, hash).await;
    let Some(id) = id.filter(|_| ok && !disabled) else {
        return Err(AccountError::InvalidCredentials.into());
    };
    let user = load_user(&state, id).await?;
    let token = jwt::issue(state.opts.jwt_secret.as_deref(), id)?;
    Ok(Json(session(token, &user)))
}

fn session(token: String, user: &UserView) -> Value {
    json!({
        "token": token,
        "token_type": "Bearer",
        "expires_in": jwt::TOKEN_TTL_SECS,
        "user": user,
    })
}

pub async fn load_user(state: &AppState, id: uuid::Uuid) -> Result<UserView, AccountError> {
    sqlx::query_as(&format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1"))
        .bind(id)
        .fetch_optional(&state.pool)
        .await
        .map_err(db_error)?
        .ok_or(AccountError::NotFound("user"))
}

pub async fn me(
    State(state): State<Arc<AppState>>,
    caller: AuthUser,
) -> Result<Json<UserView>, ApiError> {
    Ok(Json(load_user(&state, caller.user_id).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PasswordBody {
    current_password: String,
    new_password: String,
}

/// Changes the password (the current one is required, whatever the credential used) and
/// invalidates every session token issued before; answers with a fresh token.
pub async fn change_password(
    State(state): State<Arc<AppState>>,
    caller: AuthUser,
    ApiJson(body): ApiJson<PasswordBody>,
) -> Result<Json<Value>, ApiError> {
    check_password(&body.new_password)?;
    let hash: Option<String> = sqlx::query_scalar("SELECT password_hash FROM users WHERE id = $1")
        .bind(caller.user_id)
        .fetch_optional(&state.pool)
        .await
        .map_err(db_error)?
        .flatten();
    let Some(hash) = hash else {
        return Err(AccountError::InvalidCredentials.into());
    };
    if !verify_password(body.current_password, hash).await {
        return Err(AccountError::InvalidCredentials.into());
    }
    let new_hash = hash_password(body.new_password).await?;
    sqlx::query(
        "UPDATE users SET password_hash = $2, password_changed_at = date_trunc('second', now()) WHERE id = $1",
    )
    .bind(caller.user_id)
    .bind(new_hash)
    .execute(&state.pool)
    .await
    .map_err(db_error)?;
    let event = Event::UserUpdated(UserUpdated {
        user_id: caller.user_id,
        changes: json!({"password": "changed"}),
        by_user: Some(caller.user_id),
    });
    audit(&state.js, &state.ns, event, Some(caller.user_id)).await;
    let user = load_user(&state, caller.user_id).await?;
    let token = jwt::issue(state.opts.jwt_secret.as_deref(), caller.user_id)?;
    Ok(Json(session(token, &user)))
}
