//! API-key authentication: `Authorization: Bearer sk-…` (and `x-api-key`, which the
//! Anthropic surface uses), checked against the in-memory directory.

use axum::http::HeaderMap;
use std::sync::Arc;

use crate::directory::{Caller, Directory};
use crate::error::ApiError;

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
