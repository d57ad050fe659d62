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
    /// `SLUICE_RESUME_GRACE_SECS`: how long a stream's generation outlives its client, so
    /// the client can resume it; after that, with nobody attached, it is cancelled and its
    /// partial usage billed. Zero cancels as soon as the client is gone.
    pub resume_grace: std::time::Duration,
    /// Requests one WebSocket may have in flight at once; more get an error frame.
    pub ws_max_requests: usize,
    /// Load shedding, drain, body and header limits (`SLUICE_MAX_QUEUE_DEPTH`, ...).
    pub limits: crate::backpressure::IngressLimits,
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
            resume_grace: crate::presence::grace_from_env(),
            ws_max_requests: 16,
            limits: crate::backpressure::IngressLimits::from_env(4 * 1024 * 1024),
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
    /// Clients attached to streams, and the resume grace of those who left.
    pub presence: std::sync::Arc<crate::presence::Presence>,
    /// The request queue's depth, for load shedding.
    pub queue: std::sync::Arc<crate::backpressure::QueueGauge>,
    /// The opt-in response cache (Redis).
    pub cache: crate::cache::ResponseCache,
}
