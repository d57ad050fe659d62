//! `sluice up`: every role in one process, zero configuration. When NATS, Postgres or
//! Redis are not reachable it starts local ones (data under `.sluice/`); with no channel
//! configured it serves a demo model from the built-in mock upstream and creates a demo
//! key, so the first curl works without any provider account.

use anyhow::Context as _;
use std::path::{Path, PathBuf};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use schemas::config::{ChannelConfig, KeyConfig, PriceConfig, Secret};
use schemas::sealed::SecretKey;

use crate::local_services::{LocalServices, ServiceUrls};
use crate::roles;
use crate::settings::Settings;

pub const DEMO_MODEL: &str = "sluice-demo";

fn data_dir() -> PathBuf {
    std::env::var_os("SLUICE_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(".sluice"))
}

/// Reads a file kept under `.sluice/`, creating it with `make()` the first time.
fn kept(dir: &Path, name: &str, make: impl FnOnce() -> String) -> anyhow::Result<String> {
    let path = dir.join(name);
    if let Ok(text) = std::fs::read_to_string(&path) {
        return Ok(text.trim().to_owned());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let value = make();
    std::fs::write(&path, &value).with_context(|| format!("cannot write {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    }
    Ok(value)
}

fn random_key() -> String {
    format!("sk-sluice-{}", hex::encode(rand::random::<[u8; 24]>()))
}

pub async fn run(mut settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let dir = data_dir();
    let (services, urls) = LocalServices::ensure(
        ServiceUrls {
            nats_url: settings.nats_url.clone(),
            database_url: settings.database_url.clone(),
            redis_url: settings.redis_url.clone(),
        },
        &dir,
    )
    .await?;
    settings.nats_url = urls.nats_url;
    settings.database_url = urls.database_url;
    settings.redis_url = urls.redis_url;
    if settings.secret_key.is_none() {
        settings.secret_key = Some(Secret(kept(
            &dir,
            "secret_key",
            SecretKey::generate_base64,
        )?));
    }

    let mut tasks = JoinSet::new();
    let mut demo_key = None;
    if settings.file.channels.is_empty() {
        let mock = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let mock_addr = mock.local_addr()?;
        let token = shutdown.clone();
        tasks.spawn(async move {
            mock_upstream::serve(mock, mock_upstream::MockConfig::default(), token).await?;
            anyhow::Ok("mock-upstream")
        });
        settings.file.channels.push(ChannelConfig {
            name: "demo-mock".into(),
            channel_type: "mock".into(),
            base_url: Some(format!("http://{mock_addr}/v1")),
            api_key: None,
            models: vec![DEMO_MODEL.into()],
            model_map: Default::default(),
            priority: 0,
            weight: 1,
            retry: 1,
            groups: vec![],
            enabled: true,
            timeouts: Default::default(),
        });
        settings.file.prices.push(PriceConfig {
            model: DEMO_MODEL.into(),
            input_per_mtok: "0.15".into(),
            output_per_mtok: "0.60".into(),
            cached_input_per_mtok: None,
            per_request: None,
        });
    }
    if settings.file.keys.is_empty() {
        let key = kept(&dir, "demo-key", random_key)?;
        settings.file.keys.push(KeyConfig {
            name: "demo".into(),
            key: Secret(key.clone()),
            group: "default".into(),
            quota: None,
            rpm: None,
        });
        demo_key = Some(key);
    }

    roles::migrate(&settings).await?;

    let s = settings.clone();
    let t = shutdown.clone();
    tasks.spawn(async move { roles::journal(&s, t).await.map(|()| "journal") });
    let s = settings.clone();
    let t = shutdown.clone();
    tasks.spawn(async move { roles::billing(&s, t).await.map(|()| "billing") });
    let s = settings.clone();
    let t = shutdown.clone();
    tasks.spawn(async move { roles::projector(&s, t).await.map(|()| "projector") });
    let s = settings.clone();
    let t = shutdown.clone();
    tasks.spawn(async move { roles::worker(&s, 256, t).await.map(|()| "worker") });
    let s = settings.clone();
    let t = shutdown.clone();
    tasks.spawn(async move { roles::ingress(&s, t).await.map(|()| "ingress") });

    let model = settings
        .file
        .channels
        .first()
        .and_then(|c| c.models.first().cloned())
        .unwrap_or_else(|| DEMO_MODEL.to_owned());
    let key_hint = match &demo_key {
        Some(_) => format!("$(cat {}/demo-key)", dir.display()),
        None => "$YOUR_SLUICE_KEY".to_owned(),
    };
    eprintln!(
        "\nSluice is up on http://{listen} (namespace `{ns}`). Try:\n\n  curl http://{listen}/v1/chat/completions \\\n    -H \"Authorization: Bearer {key_hint}\" -H 'Content-Type: application/json' \\\n    -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'\n",
        listen = settings.listen,
        ns = settings.namespace,
    );

    // The first role to stop (an error, or the shutdown token) stops all the others.
    let mut result = Ok(());
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(role)) => tracing::info!(role, "stopped"),
            Ok(Err(e)) => {
                if result.is_ok() {
                    result = Err(e);
                }
            }
            Err(e) => {
                if result.is_ok() {
                    result = Err(anyhow::anyhow!("a role panicked: {e}"));
                }
            }
        }
        shutdown.cancel();
    }
    services.stop().await;
    result
}
