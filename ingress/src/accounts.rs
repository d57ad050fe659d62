//! Users and who is calling `/api/*`: the account errors, argon2 passwords, the user
//! store, and the [`AuthUser`] extractor (a user's JWT, or one of their API keys, in which
//! case what the key does belongs to the key's owner).

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use axum::http::request::Parts;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use std::sync::Arc;
use uuid::Uuid;

use schemas::events::{Event, Metadata, UserRegistered};
use schemas::work::ErrorKind;

use crate::error::ApiError;
use crate::state::AppState;

/// Errors of the accounts, keys, credits and usage API, and of rate limits.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("incorrect login or password")]
    InvalidCredentials,
    #[error("the session token is invalid or expired; log in again")]
    InvalidToken,
    #[error("sign-in is disabled: the gateway has no SLUICE_JWT_SECRET")]
    SignInDisabled,
    #[error("this key belongs to no user; use a user's key or log in")]
    NoUser,
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error("{message}")]
    Invalid {
        message: String,
        param: Option<&'static str>,
    },
    #[error("rate limit reached for this {scope}: {limit} {unit} per {window_secs} s")]
    RateLimited {
        scope: &'static str,
        unit: &'static str,
        limit: u32,
        window_secs: u64,
        retry_after: u64,
    },
    #[error("an internal error occurred")]
    Internal,
}

impl AccountError {
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        AccountError::Invalid {
            message: message.into(),
            param: Some(param),
        }
    }

    pub fn status(&self) -> axum::http::StatusCode {
        use axum::http::StatusCode;
        match self {
            AccountError::InvalidCredentials | AccountError::InvalidToken => {
                StatusCode::UNAUTHORIZED
            }
            AccountError::SignInDisabled => StatusCode::SERVICE_UNAVAILABLE,
            AccountError::NoUser => StatusCode::FORBIDDEN,
            AccountError::NotFound(_) => StatusCode::NOT_FOUND,
            AccountError::Conflict(_) => StatusCode::CONFLICT,
            AccountError::Invalid { .. } => StatusCode::BAD_REQUEST,
            AccountError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            AccountError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// `(kind, code, param, retry_after)` as [`crate::error::ApiError::info`] needs them.
    pub fn parts(&self) -> (ErrorKind, Option<&'static str>, Option<String>, Option<u64>) {
        match self {
            AccountError::InvalidCredentials => {
                (ErrorKind::Auth, Some("invalid_credentials"), None, None)
            }
            AccountError::InvalidToken => (ErrorKind::Auth, Some("invalid_token"), None, None),
            AccountError::SignInDisabled => (ErrorKind::Internal, None, None, None),
            AccountError::NoUser => (ErrorKind::Auth, Some("no_user"), None, None),
            AccountError::NotFound(_) => (ErrorKind::BadRequest, Some("not_found"), None, None),
            AccountError::Conflict(_) => (ErrorKind::BadRequest, Some("conflict"), None, None),
            AccountError::Invalid { param, .. } => {
                (ErrorKind::BadRequest, None, param.map(str::to_owned), None)
            }
            AccountError::RateLimited { retry_after, .. } => (
                ErrorKind::RateLimited,
                Some("rate_limit_exceeded"),
                None,
                Some(*retry_after),
            ),
            AccountError::Internal => (ErrorKind::Internal, None, None, None),
        }
    }
}

/// Logs a database failure (never with bound values) and hides it behind a generic error;
/// unique violations become a 409 naming the field.
pub fn db_error(e: sqlx::Error) -> AccountError {
    if let sqlx::Error::Database(db) = &e {
        if db.is_unique_violation() {
            let what = match db.constraint() {
                Some(c) if c.contains("email") => "email",
                Some(c) if c.contains("name") => "name",
                Some(c) if c.contains("code") => "code",
                _ => "value",
            };
            return AccountError::Conflict(format!("this {what} is already taken"));
        }
    }
    tracing::error!(error = %e, "accounts database error");
    AccountError::Internal
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    User,
}

impl Role {
    pub fn parse(s: &str) -> Result<Role, AccountError> {
        match s {
            "admin" => Ok(Role::Admin),
            "user" => Ok(Role::User),
            _ => Err(AccountError::invalid(
                "role",
                "role must be `admin` or `user`",
            )),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::User => "user",
        }
    }
}

/// A user as the API shows it: never the password hash.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct UserView {
    pub id: Uuid,
    pub name: String,
    pub email: Option<String>,
    pub role: String,
    #[sqlx(rename = "user_group")]
    pub group: String,
    pub rpm: Option<i32>,
    pub tpm: Option<i32>,
    pub created_at: DateTime<Utc>,
}

pub const USER_COLUMNS: &str = "id, name, email, role, user_group, rpm, tpm, created_at";

/// The caller of an `/api/*` route: a user, by JWT or by one of their keys.
#[derive(Debug, Clone)]
pub struct AuthUser {
    pub user_id: Uuid,
    pub role: Role,
    /// Set when the caller authenticated with an API key rather than a session token.
    pub key_id: Option<Uuid>,
}

impl axum::extract::FromRequestParts<Arc<AppState>> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer(parts).ok_or(ApiError::MissingKey)?;
        resolve(state, token).await
    }
}

pub fn bearer(parts: &Parts) -> Option<&str> {
    crate::auth::bearer_token(&parts.headers)
}

/// Resolves a bearer value: a JWT is verified and its user reloaded; anything else must be
/// a live API key whose owner is then the caller.
pub async fn resolve(state: &AppState, token: &str) -> Result<AuthUser, ApiError> {
    if crate::jwt::looks_like_jwt(token) {
        let claims = crate::jwt::verify(state.opts.jwt_secret.as_deref(), token)?;
        let row: Option<(String, DateTime<Utc>, bool)> =
            sqlx::query_as("SELECT role, password_changed_at, disabled FROM users WHERE id = $1")
                .bind(claims.sub)
                .fetch_optional(&state.pool)
                .await
                .map_err(db_error)?;
        return match row {
            Some((role, changed, false)) if claims.iat >= changed.timestamp() => Ok(AuthUser {
                user_id: claims.sub,
                role: Role::parse(&role)?,
                key_id: None,
            }),
            _ => Err(AccountError::InvalidToken.into()),
        };
    }
    let caller = state.directory.caller(token).ok_or(ApiError::InvalidKey)?;
    let user_id = caller.user_id.ok_or(AccountError::NoUser)?;
    let disabled: Option<bool> = sqlx::query_scalar("SELECT disabled FROM users WHERE id = $1")
        .bind(user_id)
        .fetch_optional(&state.pool)
        .await
        .map_err(db_error)?;
    match disabled {
        // A key never carries admin rights: admin routes need a session token or the admin token.
        Some(false) => Ok(AuthUser {
            user_id,
            role: Role::User,
            key_id: Some(caller.key_id),
        }),
        _ => Err(ApiError::InvalidKey),
    }
}

/// Hashes a password with argon2id (default parameters) on the blocking pool: it takes
/// tens of milliseconds of CPU by design.
pub async fn hash_password(password: String) -> Result<String, AccountError> {
    tokio::task::spawn_blocking(move || {
        let salt_bytes: [u8; 16] = rand::random();
        let salt = SaltString::encode_b64(&salt_bytes).map_err(|_| AccountError::Internal)?;
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|_| AccountError::Internal)
    })
    .await
    .map_err(|_| AccountError::Internal)?
}

pub async fn verify_password(password: String, hash: String) -> bool {
    tokio::task::spawn_blocking(move || {
        PasswordHash::new(&hash)
            .map(|parsed| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &parsed)
                    .is_ok()
            })
            .unwrap_or(false)
    })
    .await
    .unwrap_or(false)
}

pub fn check_password(password: &str) -> Result<(), AccountError> {
    if password.chars().count() < 8 {
        return Err(AccountError::invalid(
            "password",
            "the password needs at least 8 characters",
        ));
    }
    if password.len() > 1024 {
        return Err(AccountError::invalid(
            "password",
            "the password is too long",
        ));
    }
    Ok(())
}

pub struct NewUser {
    pub name: String,
    pub email: Option<String>,
    pub password: Option<String>,
    pub role: Role,
    pub group: String,
    /// `register`, `admin` or `cli`, recorded in the audit event.
    pub source: &'static str,
}

/// Creates a user and appends `UserRegistered`. Used by the API and `sluice admin create-user`.
pub async fn create_user(
    pool: &PgPool,
    js: &async_nats::jetstream::Context,
    ns: &schemas::Namespace,
    user: NewUser,
) -> Result<UserView, AccountError> {
    let name = user.name.trim().to_owned();
    if name.is_empty() || name.len() > 64 {
        return Err(AccountError::invalid(
            "name",
            "the name needs 1 to 64 characters",
        ));
    }
    let email = user.email.map(|e| e.trim().to_ascii_lowercase());
    if let Some(email) = &email {
        if !email.contains('@') || email.len() > 254 {
            return Err(AccountError::invalid(
                "email",
                "this is not an email address",
            ));
        }
    }
    let hash = match user.password {
        Some(p) => {
            check_password(&p)?;
            Some(hash_password(p).await?)
        }
        None => None,
    };
    let id = schemas::new_id();
    let view: UserView = sqlx::query_as(&format!(
        "INSERT INTO users (id, name, email, password_hash, role, user_group) VALUES ($1, $2, $3, $4, $5, $6) \
         RETURNING {USER_COLUMNS}"
    ))
    .bind(id)
    .bind(&name)
    .bind(&email)
    .bind(&hash)
    .bind(user.role.as_str())
    .bind(&user.group)
    .fetch_one(pool)
    .await
    .map_err(db_error)?;
    let event = Event::UserRegistered(UserRegistered {
        user_id: id,
        name,
        role: user.role.as_str().to_owned(),
        source: user.source.to_owned(),
    });
    audit(js, ns, event, Some(id)).await;
    Ok(view)
}

/// Appends an audit event and waits for JetStream's ack. The change it records is already
/// committed, so a failure is logged rather than failing the call.
pub async fn audit(
    js: &async_nats::jetstream::Context,
    ns: &schemas::Namespace,
    event: Event,
    user_id: Option<Uuid>,
) {
    let kind = event.type_name();
    let envelope = event.into_envelope(
        Utc::now(),
        Metadata {
            trace_id: None,
            key_id: None,
            user_id,
        },
    );
    match projector::bus::publish_event(js, ns, &envelope).await {
        Ok(ack) => {
            if let Err(e) = ack.await {
                tracing::warn!(error = %e, kind, "audit event not acknowledged by JetStream");
            }
        }
        Err(e) => tracing::warn!(error = %e, kind, "cannot publish an audit event"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[tokio::test]
    async fn passwords_hash_with_a_salt_and_verify() {
        let a = hash_password("correct horse".into()).await.expect("hash");
        let b = hash_password("correct horse".into()).await.expect("hash");
        assert!(a.starts_with("$argon2id$"));
        assert_ne!(a, b, "salted");
        assert!(verify_password("correct horse".into(), a.clone()).await);
        assert!(!verify_password("wrong horse".into(), a).await);
        assert!(!verify_password("x".into(), "not a hash".into()).await);
    }
}
