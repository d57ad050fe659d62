//! Each role's start-up: connect to what it needs, refuse an unmigrated database, run
//! its loop until the shutdown token is cancelled.

use anyhow::Context as _;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use schemas::sealed::SecretKey;

use crate::seed::Seeder;
use crate::settings::Settings;

/// Connects to the namespace's schema; `migrated` roles refuse a database lacking migrations.
pub async fn pool(
    settings: &Settings,
    max: u32,
    require_migrated: bool,
) -> anyhow::Result<sqlx::PgPool> {
    let pool = projector::db::connect(&settings.database_url, &settings.namespace, max).await?;
    if require_migrated {
        projector::db::ensure_migrated(&pool, &settings.namespace).await?;
    }
    Ok(pool)
}

pub async fn nats(settings: &Settings, role: &str) -> anyhow::Result<async_nats::Client> {
    Ok(projector::bus::connect(&settings.nats_url, &format!("sluice-{role}")).await?)
}

pub fn secret_key(settings: &Settings) -> anyhow::Result<Option<SecretKey>> {
    settings
        .secret_key
        .as_ref()
        .map(|s| SecretKey::from_base64(s.expose()))
        .transpose()
        .context("SLUICE_SECRET_KEY")
}

/// Redis backs rate limits. Unreachable at start: the ingress runs without limits and
/// says so, rather than refusing all traffic.
pub async fn redis(settings: &Settings) -> Option<redis::aio::ConnectionManager> {
    let client = match redis::Client::open(settings.redis_url.as_str()) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "invalid SLUICE_REDIS_URL; rate limits are off");
            return None;
        }
    };
    // Bounded reconnects: by default the manager backs off for minutes and every command
    // waits on its pending reconnect, so a Redis outage would stall each request instead
    // of failing open at once (see docs/guarantees.md).
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Duration::from_millis(500))
        .set_response_timeout(Duration::from_millis(500))
        .set_number_of_retries(1)
        .set_max_delay(500);
    let connect = client.get_connection_manager_with_config(config);
    match tokio::time::timeout(Duration::from_secs(5), connect).await {
        Ok(Ok(conn)) => Some(conn),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "Redis unreachable at start; rate limits are off");
            None
        }
        Err(_) => {
            tracing::warn!("Redis did not answer within 5 s; rate limits are off");
            None
        }
    }
}

pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let pool = pool(settings, 4, false).await?;
    projector::db::migrate(&pool, &settings.namespace).await?;
    let client = nats(settings, "migrate").await?;
    let js = async_nats::jetstream::new(client.clone());
    projector::bus::ensure_streams(&js, &settings.namespace).await?;
    let key = secret_key(settings)?;
    let report = Seeder {
        pool: &pool,
        js: &js,
        ns: &settings.namespace,
        secret_key: key.as_ref(),
    }
    .apply(&settings.file)
    .await?;
    tracing::info!(
        namespace = %settings.namespace,
        channels_changed = report.channels_changed,
        keys_created = report.keys_created,
        prices_set = report.prices_set,
        plans_set = report.plans_set,
        "migrated"
    );
    client.flush().await.ok();
    Ok(())
}

pub async fn ingress(settings: &Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let pool = pool(settings, 4, true).await?;
    let client = nats(settings, "ingress").await?;
    let redis = redis(settings).await;
    let state = ingress::build_state(
        client,
        pool,
        redis,
        settings.namespace.clone(),
        ingress::IngressOptions {
            admin_token: settings.admin_token.as_ref().map(|t| t.expose().to_owned()),
            secret_key: secret_key(settings)?,
            jwt_secret: crate::admin::jwt_secret(settings),
            ..Default::default()
        },
    )
    .await?;
    let listener = tokio::net::TcpListener::bind(&settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    tracing::info!(listen = %settings.listen, namespace = %settings.namespace, "ingress ready");
    ingress::run_ingress(listener, state, shutdown).await?;
    Ok(())
}

pub async fn worker(
    settings: &Settings,
    max_in_flight: usize,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let pool = pool(settings, 4, true).await?;
    let client = nats(settings, "worker").await?;
    let opts = workers::WorkerOptions {
        max_in_flight,
        secret_key: secret_key(settings)?,
        ..Default::default()
    }
    .with_routing(&settings.file.routing)
    .with_env(|k| std::env::var(k).ok());
    health_server(settings, shutdown.clone()).await?;
    workers::run_worker(client, pool, settings.namespace.clone(), opts, shutdown).await?;
    Ok(())
}

pub async fn journal(settings: &Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let pool = pool(settings, 4, true).await?;
    let client = nats(settings, "journal").await?;
    let js = async_nats::jetstream::new(client);
    projector::bus::ensure_streams(&js, &settings.namespace).await?;
    health_server(settings, shutdown.clone()).await?;
    projector::journal::run_journal(js, pool, settings.namespace.clone(), shutdown).await?;
    Ok(())
}

pub async fn billing(settings: &Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let pool = pool(settings, 4, true).await?;
    health_server(settings, shutdown.clone()).await?;
    let projection = billing::BillingProjection::new(None);
    projector::runtime::run_live(pool, settings.namespace.clone(), projection, shutdown).await?;
    Ok(())
}

pub async fn projector(settings: &Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let pool = pool(settings, 4, true).await?;
    health_server(settings, shutdown.clone()).await?;
    let projection = projector::requests::RequestsProjection::new();
    // Each projection keeps its own checkpoint; they run side by side on one pool.
    let conversations = projector::ConversationsProjection::new();
    tokio::try_join!(
        projector::runtime::run_live(
            pool.clone(),
            settings.namespace.clone(),
            projection,
            shutdown.clone()
        ),
        projector::runtime::run_live(pool, settings.namespace.clone(), conversations, shutdown),
    )?;
    Ok(())
}

/// `/healthz` and `/metrics` for roles that serve no API, on SLUICE_METRICS_LISTEN when set.
async fn health_server(settings: &Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let Some(addr) = &settings.metrics_listen else {
        return Ok(());
    };
    crate::telemetry::serve_metrics(addr, shutdown).await
}

#[derive(clap::Args, Debug)]
pub struct MockArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub listen: String,
    /// Content chunks per answer.
    #[arg(long, default_value_t = 20)]
    pub chunks: u32,
    /// Delay between chunks, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub chunk_delay_ms: u64,
    /// Delay before the first chunk, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub ttft_ms: u64,
    /// Answer every request with this HTTP status and the provider's error body.
    #[arg(long)]
    pub fail_status: Option<u16>,
    /// Cut streams after this many chunks.
    #[arg(long)]
    pub disconnect_after: Option<u32>,
    /// Never report usage.
    #[arg(long)]
    pub no_usage: bool,
}

pub async fn mock_upstream(args: MockArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let config = mock_upstream::MockConfig {
        chunks: args.chunks,
        chunk_delay_ms: args.chunk_delay_ms,
        ttft_ms: args.ttft_ms,
        fail_status: args.fail_status,
        disconnect_after: args.disconnect_after,
        usage: !args.no_usage,
        ..Default::default()
    };
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(listen = %args.listen, "mock upstream ready (OpenAI wire format at /v1)");
    mock_upstream::serve(listener, config, shutdown).await?;
    Ok(())
}
