//! API-key authentication: `Authorization: Bearer sk-…` (and `x-api-key`, which the
//! Anthropic surface uses), checked against the in-memory directory.

use axum::http::HeaderMap;
use std::sync::Arc;

use crate::directory::{Caller, Directory};
use crate::error::ApiError;
use crate::state::AppState;

pub fn authenticate(directory: &Directory, headers: &HeaderMap) -> Result<Arc<Caller>, ApiError> {
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let key = bearer
        .or_else(|| {
            headers
                .get("x-api-key")
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
        })
        .filter(|k| !k.is_empty())
        .ok_or(ApiError::MissingKey)?;
    directory.caller(key).ok_or(ApiError::InvalidKey)
}

/// Proof that the caller is an admin: the bootstrap `SLUICE_ADMIN_TOKEN` (compared in
/// constant time), or the session token (JWT) of a user whose role is `admin`. API keys
/// never carry admin rights. Handlers of `/api/admin/*` take it as an extractor.
#[derive(Debug, Clone, Copy)]
pub struct Admin;

impl axum::extract::FromRequestParts<Arc<AppState>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        use subtle::ConstantTimeEq;
        let presented = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or(ApiError::MissingKey)?;
        match &state.opts.admin_token {
            Some(token) if bool::from(token.as_bytes().ct_eq(presented.as_bytes())) => Ok(Admin),
            _ if crate::jwt::looks_like_jwt(presented) => {
                match crate::accounts::resolve(state, presented).await?.role {
                    crate::accounts::Role::Admin => Ok(Admin),
                    crate::accounts::Role::User => Err(ApiError::Forbidden),
                }
            }
            _ => Err(ApiError::Forbidden),
        }
    }
}
