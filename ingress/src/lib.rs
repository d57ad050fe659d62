//! The HTTP front door: authenticates callers, validates and admits requests, queues
//! them on JetStream for the workers, and relays the workers' frames back as SSE or as
//! one JSON body. It never waits for Postgres on the hot path: keys, balances and the
//! model list are held in memory and refreshed in the background.

pub mod accounts;
pub mod auth;
pub mod backpressure;
pub mod cache;
pub mod context;
pub mod directory;
pub mod error;
pub mod jwt;
pub mod limits;
pub mod metrics;
pub mod openapi;
pub mod presence;
pub mod quota;
pub mod relay;
pub mod request_id;
pub mod routes;
pub mod serve;
pub mod state;
pub mod trace;
pub mod ws;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

pub use directory::{hash_key, Directory};
pub use error::ApiError;
pub use state::{AppState, IngressOptions};

use schemas::Namespace;

#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    #[error(transparent)]
    Bus(#[from] projector::bus::BusError),
    #[error("cannot load keys and models from Postgres: {0}")]
    Directory(#[source] sqlx::Error),
    #[error("serving HTTP failed: {0}")]
    Serve(#[from] std::io::Error),
    #[error("cannot subscribe to the stream watchers subject: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
}

/// Builds the shared state: streams exist, and keys and models are loaded once.
pub async fn build_state(
    nats: async_nats::Client,
    pool: sqlx::PgPool,
    redis: Option<redis::aio::ConnectionManager>,
    ns: Namespace,
    opts: IngressOptions,
) -> Result<Arc<AppState>, IngressError> {
    let js = async_nats::jetstream::new(nats.clone());
    projector::bus::ensure_streams(&js, &ns).await?;
    let directory = Directory::with_holds(quota::HoldStore::new(redis.clone(), ns.clone()));
    directory
        .refresh(&pool)
        .await
        .map_err(IngressError::Directory)?;
    let cache = cache::ResponseCache::from_env(redis.clone(), ns.clone());
    let limiter = limits::RateLimiter::new(redis, ns.clone());
    let presence = presence::Presence::start(nats.clone(), ns.clone(), opts.resume_grace).await?;
    let queue = Arc::new(backpressure::QueueGauge::new(
        js.clone(),
        &ns,
        opts.limits.max_queue_depth,
        opts.limits.queue_check_every,
    ));
    Ok(Arc::new(AppState {
        ns,
        nats,
        js,
        pool,
        directory,
        limiter,
        opts,
        presence,
        queue,
        cache,
    }))
}

/// Every route of the API, without state, fallbacks or middleware. The OpenAPI document
/// (`openapi`) must list exactly these; a test of that module checks it.
pub fn route_table() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/chat/completions", post(routes::chat::chat_completions))
        .route("/v1/messages", post(routes::messages::messages))
        .route("/v1/responses", post(routes::responses::responses))
        .route("/v1/embeddings", post(routes::responses::embeddings))
        .route("/v1/images/generations", post(routes::responses::images))
        .route(
            "/v1/messages/count_tokens",
            post(routes::messages::count_tokens),
        )
        .route("/v1/streams/{id}", get(routes::streams::resume))
        .route("/api/requests/{id}/cancel", post(routes::streams::cancel))
        .route("/ws", get(ws::upgrade))
        .route("/v1/models", get(routes::models::list))
        .route("/v1/models/{id}", get(routes::models::get))
        .route("/healthz", get(routes::health::healthz))
        .route("/readyz", get(routes::health::readyz))
        .route("/metrics", get(metrics::scrape))
        .route("/openapi.json", get(openapi::serve))
        .route(
            "/api/admin/projections",
            get(routes::admin_projections::list),
        )
        .merge(routes::api::router())
        .merge(routes::admin_channels::router())
        .merge(routes::admin_nodes::router())
        .merge(routes::channels::router())
}

pub fn router(state: Arc<AppState>) -> Router {
    let max_body = state.opts.max_body_bytes;
    let body_limits = routes::body::BodyLimits {
        max_bytes: max_body,
        ..state.opts.limits.body
    };
    let header_limits = state.opts.limits.headers;
    let queue = state.queue.clone();
    route_table()
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(max_body))
        // One layer for the refusals made before a route runs, in this order: header
        // limits (431), queue over its limit (503), declared size (413), then the body
        // guard. Each `from_fn` layer costs a boxed future and a service clone per request.
        .layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next| {
                let queue = queue.clone();
                async move {
                    if let Some(refused) = request_id::header_refusal(header_limits, &req)
                        .or_else(|| backpressure::shed_refusal(&queue, &req))
                        .or_else(|| request_id::oversize_refusal(max_body, &req))
                    {
                        return refused;
                    }
                    routes::body::guard(body_limits, req, next).await
                }
            },
        ))
        // Request id, then metrics and the trace span (`request_id::assign` and
        // `metrics::observe` in one layer).
        .layer(axum::middleware::from_fn(request_id::assign_observed))
        .with_state(state)
}

/// Serves until `shutdown`, then stops accepting and lets open responses finish.
pub async fn run_ingress(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: CancellationToken,
) -> Result<(), IngressError> {
    let refresh = tokio::spawn(state.directory.clone().refresh_loop(
        state.pool.clone(),
        state.opts.refresh_every,
        shutdown.clone(),
    ));
    // Models of live remote nodes come from NATS, not Postgres.
    let nodes = tokio::spawn(state.directory.clone().follow_nodes(
        state.js.clone(),
        state.ns.clone(),
        shutdown.clone(),
    ));
    let serve_opts = serve::ServeOptions::new(&state.opts.limits);
    let presence = state.presence.clone();
    let app = router(state);
    let token = shutdown.clone();
    let closing = presence.stopping().clone();
    // TCP_NODELAY, header limits and the drain deadline: see `serve`.
    serve::serve(listener, app, serve_opts, async move {
        token.cancelled().await;
        // WebSockets and grace tasks end now; otherwise open sockets hold the drain.
        closing.cancel();
    })
    .await?;
    shutdown.cancel();
    presence.close().await;
    let _ = refresh.await;
    let _ = nodes.await;
    Ok(())
}
