//! The state every handler shares.

use std::time::Duration;

use async_nats::jetstream;
use sqlx::PgPool;

use crate::directory::Directory;
use crate::limits::RateLimiter;
use schemas::Namespace;

#[derive(Debug, Clone)]
pub struct IngressOptions {
    /// Larger request bodies get 413 before they are read in full.
    pub max_body_bytes: usize,
    /// How long a request may take end to end; workers drop it after this.
    pub request_timeout: Duration,
    /// How often keys, balances and models are reloaded from Postgres.
    pub refresh_every: Duration,
    /// `SLUICE_ADMIN_TOKEN`: a bearer token with admin rights (bootstrap). Unset = no token admin.
    pub admin_token: Option<String>,
    /// `SLUICE_SECRET_KEY`: seals provider keys of channels created through the admin API
    /// and opens them for `POST /api/admin/channels/{id}/test`.
    pub secret_key: Option<schemas::sealed::SecretKey>,
    /// `SLUICE_JWT_SECRET`: signs `/api` session tokens (HS256). Unset = sign-in disabled.
    pub jwt_secret: Option<String>,
}

impl Default for IngressOptions {
    fn default() -> Self {
        Self {
            max_body_bytes: 4 * 1024 * 1024,
            request_timeout: Duration::from_secs(300),
            refresh_every: Duration::from_secs(2),
            admin_token: None,
            secret_key: None,
            jwt_secret: None,
        }
    }
}

pub struct AppState {
    pub ns: Namespace,
    pub nats: async_nats::Client,
    pub js: jetstream::Context,
    pub pool: PgPool,
    pub directory: Directory,
    pub limiter: RateLimiter,
    pub opts: IngressOptions,
}
