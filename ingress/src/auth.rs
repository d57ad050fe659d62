//! API-key authentication: `Authorization: Bearer sk-…` (and `x-api-key`, which the
//! Anthropic surface uses), checked against the in-memory directory.

use axum::http::HeaderMap;
use std::sync::Arc;

use crate::directory::{Caller, Directory};
use crate::error::ApiError;
use crate::state::AppState;

/// The token of `Authorization: Bearer <token>`, trimmed; `None` when absent or empty.
/// The scheme name is case-insensitive (RFC 9110 §11.1).
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

pub fn authenticate(directory: &Directory, headers: &HeaderMap) -> Result<Arc<Caller>, ApiError> {
    let key = bearer_token(headers)
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
        let presented = bearer_token(&parts.headers).ok_or(ApiError::MissingKey)?;
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn headers(authorization: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            axum::http::header::AUTHORIZATION,
            authorization.parse().unwrap(),
        );
        h
    }

    #[test]
    fn bearer_tokens_are_read_with_any_scheme_case_and_trimmed() {
        assert_eq!(bearer_token(&headers("Bearer sk-1")), Some("sk-1"));
        assert_eq!(bearer_token(&headers("bearer  sk-2 ")), Some("sk-2"));
        assert_eq!(bearer_token(&headers("BEARER sk-3")), Some("sk-3"));
        assert_eq!(bearer_token(&headers("Bearer ")), None);
        assert_eq!(bearer_token(&headers("Basic dXNlcg==")), None);
        assert_eq!(bearer_token(&headers("Bearersk-4")), None);
        assert_eq!(bearer_token(&HeaderMap::new()), None);
    }
}
