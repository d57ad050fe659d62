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

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterBody {
    #[schema(min_length = 1, max_length = 64, pattern = r"\S")]
    name: String,
    #[serde(default)]
    #[schema(max_length = 254, pattern = "@")]
    email: Option<String>,
    #[schema(min_length = 8, max_length = 256)]
    password: String,
}

/// Register a user and sign in
///
/// Needs sign-in on (`SLUICE_JWT_SECRET`, or `SLUICE_SECRET_KEY` it derives from; 503
/// without). The user gets the `user` role and the `default` group.
#[utoipa::path(
    post,
    path = "/api/auth/register",
    operation_id = "register",
    tag = "accounts",
    request_body = RegisterBody,
    responses(
        (status = 201, description = "Registered; a session token", body = crate::openapi::SessionToken),
        (status = 400, description = "Invalid name, email or password (8 characters or more)"),
        (status = 409, description = "The name or email is taken"),
        (status = 503, description = "Sign-in is off (neither `SLUICE_JWT_SECRET` nor `SLUICE_SECRET_KEY`)"),
    ),
    security(()),
)]
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

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginBody {
    /// Email or user name.
    #[serde(alias = "email", alias = "name")]
    #[schema(min_length = 1)]
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

/// Sign in with a name or email and a password
#[utoipa::path(
    post,
    path = "/api/auth/login",
    operation_id = "login",
    tag = "accounts",
    request_body = LoginBody,
    responses(
        (status = 200, description = "A session token", body = crate::openapi::SessionToken),
        (status = 400, description = "Invalid body"),
        (status = 401, description = "Incorrect login or password"),
        (status = 503, description = "Sign-in is off (neither `SLUICE_JWT_SECRET` nor `SLUICE_SECRET_KEY`)"),
    ),
    security(()),
)]
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

/// The calling user
#[utoipa::path(
    get,
    path = "/api/me",
    operation_id = "getMe",
    tag = "accounts",
    responses(
        (status = 200, description = "The user", body = crate::accounts::UserView),
        (status = 401, description = "Missing or invalid credentials"),
        (status = 403, description = "The API key belongs to no user"),
    ),
    security(("session_token" = []), ("api_key" = [])),
)]
pub async fn me(
    State(state): State<Arc<AppState>>,
    caller: AuthUser,
) -> Result<Json<UserView>, ApiError> {
    Ok(Json(load_user(&state, caller.user_id).await?))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordBody {
    current_password: String,
    #[schema(min_length = 8, max_length = 256)]
    new_password: String,
}

/// Changes the password (the current one is required, whatever the credential used) and
/// invalidates every session token issued before; answers with a fresh token.
#[utoipa::path(
    method(put, post),
    path = "/api/me/password",
    operation_id = "changePassword",
    tag = "accounts",
    request_body = PasswordBody,
    responses(
        (status = 200, description = "Changed; a fresh session token (older ones stop working)", body = crate::openapi::SessionToken),
        (status = 400, description = "The new password is too short or too long"),
        (status = 401, description = "Missing or invalid credentials, or the current password is wrong"),
        (status = 403, description = "The API key belongs to no user"),
    ),
    security(("session_token" = []), ("api_key" = [])),
)]
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
