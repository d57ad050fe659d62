//! Session tokens for `/api/*`: HS256 JWTs signed with `SLUICE_JWT_SECRET`.
//!
//! A token only names the user (`sub`) and when it was issued; the role and whether the
//! account still exists are read from Postgres on every `/api` call (not the hot path), so
//! a demoted or deleted user loses access at once, and a password change invalidates every
//! token issued before it.

use chrono::Utc;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::accounts::AccountError;

/// How long a session token is valid.
pub const TOKEN_TTL_SECS: i64 = 24 * 3600;

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: Uuid,
    pub iat: i64,
    pub exp: i64,
}

/// Signs a token for `user_id`, valid for [`TOKEN_TTL_SECS`].
pub fn issue(secret: Option<&str>, user_id: Uuid) -> Result<String, AccountError> {
    let secret = secret.ok_or(AccountError::SignInDisabled)?;
    let now = Utc::now().timestamp();
    let claims = Claims {
        sub: user_id,
        iat: now,
        exp: now + TOKEN_TTL_SECS,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| {
        tracing::error!(error = %e, "cannot sign a session token");
        AccountError::Internal
    })
}

/// Verifies signature, algorithm and expiry. Any failure is the same `InvalidToken`, so a
/// caller learns nothing about why.
pub fn verify(secret: Option<&str>, token: &str) -> Result<Claims, AccountError> {
    let secret = secret.ok_or(AccountError::InvalidToken)?;
    let mut validation = Validation::new(Algorithm::HS256);
    validation.leeway = 5;
    validation.set_required_spec_claims(&["exp", "sub"]);
    jsonwebtoken::decode::<Claims>(
        token,
        &DecodingKey::from_secret(secret.as_bytes()),
        &validation,
    )
    .map(|data| data.claims)
    .map_err(|_| AccountError::InvalidToken)
}

/// Whether a bearer value looks like a JWT (three base64url parts) rather than an API key.
pub fn looks_like_jwt(token: &str) -> bool {
    token.starts_with("eyJ") && token.split('.').count() == 3
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn round_trips_and_rejects_other_secrets() {
        let id = Uuid::now_v7();
        let token = issue(Some("s3cret"), id).expect("sign");
        assert!(looks_like_jwt(&token));
        assert_eq!(verify(Some("s3cret"), &token).expect("valid").sub, id);
        assert!(matches!(
            verify(Some("other"), &token),
            Err(AccountError::InvalidToken)
        ));
        assert!(matches!(
            verify(None, &token),
            Err(AccountError::InvalidToken)
        ));
        assert!(matches!(issue(None, id), Err(AccountError::SignInDisabled)));
    }
}
