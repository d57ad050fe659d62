//! What the hot path needs from Postgres — API keys with their balances, and the models
//! the enabled channels serve — held in memory and refreshed in the background, so a
//! request never waits for Postgres and keeps being served while it is down.

use sha2::{Digest, Sha256};
use sqlx::{PgPool, Row};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The SHA-256 of an API key, hex-encoded: what `api_keys.key_hash` stores. Keys are
/// random 256-bit secrets, so a fast hash is enough (argon2 is for passwords).
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub key_id: Uuid,
    pub user_id: Option<Uuid>,
    pub group: String,
    pub rpm: Option<u32>,
    /// Unset = unlimited. Otherwise what is left: quota + credits − spent, in nano-dollars.
    pub remaining_nanos: Option<i64>,
}

#[derive(Debug, Default)]
struct Snapshot {
    keys: HashMap<String, Arc<Caller>>,
    /// Model name → whether at least one enabled channel serves it.
    models: HashMap<String, bool>,
    loaded: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Directory {
    inner: Arc<RwLock<Arc<Snapshot>>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelStatus {
    Unknown,
    NoEnabledChannel,
    Available,
}

impl Directory {
    fn snapshot(&self) -> Arc<Snapshot> {
        match self.inner.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn caller(&self, key: &str) -> Option<Arc<Caller>> {
        self.snapshot().keys.get(&hash_key(key)).cloned()
    }

    pub fn model(&self, model: &str) -> ModelStatus {
        match self.snapshot().models.get(model) {
            None => ModelStatus::Unknown,
            Some(false) => ModelStatus::NoEnabledChannel,
            Some(true) => ModelStatus::Available,
        }
    }

    /// Models served by at least one enabled channel, sorted.
    pub fn models(&self) -> Vec<String> {
        let mut models: Vec<String> = self
            .snapshot()
            .models
            .iter()
            .filter(|(_, enabled)| **enabled)
            .map(|(m, _)| m.clone())
            .collect();
        models.sort();
        models
    }

    pub fn is_loaded(&self) -> bool {
        self.snapshot().loaded
    }

    /// Reloads keys, balances and models from Postgres in one go.
    pub async fn refresh(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        let rows = sqlx::query(
            "SELECT k.id, k.user_id, k.key_hash, k.key_group, k.rpm, k.quota_nanos,
                    COALESCE(b.granted_nanos, 0) AS granted, COALESCE(b.spent_nanos, 0) AS spent
             FROM api_keys k LEFT JOIN key_balances b ON b.key_id = k.id
             WHERE k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > now())",
        )
        .fetch_all(pool)
        .await?;
        let mut keys = HashMap::with_capacity(rows.len());
        for row in rows {
            let quota: Option<i64> = row.try_get("quota_nanos")?;
            let granted: i64 = row.try_get("granted")?;
            let spent: i64 = row.try_get("spent")?;
            let caller = Caller {
                key_id: row.try_get("id")?,
                user_id: row.try_get("user_id")?,
                group: row.try_get("key_group")?,
                rpm: row
                    .try_get::<Option<i32>, _>("rpm")?
                    .and_then(|r| u32::try_from(r).ok()),
                remaining_nanos: quota.map(|q| q.saturating_add(granted).saturating_sub(spent)),
            };
            keys.insert(row.try_get("key_hash")?, Arc::new(caller));
        }
        let channel_rows = sqlx::query("SELECT models, enabled FROM channels")
            .fetch_all(pool)
            .await?;
        let mut models: HashMap<String, bool> = HashMap::new();
        for row in channel_rows {
            let served: Vec<String> = row.try_get("models")?;
            let enabled: bool = row.try_get("enabled")?;
            for model in served {
                let entry = models.entry(model).or_insert(false);
                *entry |= enabled;
            }
        }
        let snapshot = Arc::new(Snapshot {
            keys,
            models,
            loaded: true,
        });
        match self.inner.write() {
            Ok(mut guard) => *guard = snapshot,
            Err(poisoned) => *poisoned.into_inner() = snapshot,
        }
        Ok(())
    }

    /// Refreshes every `every` until `shutdown`; failures keep the last snapshot.
    pub async fn refresh_loop(self, pool: PgPool, every: Duration, shutdown: CancellationToken) {
        let mut failing = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            match self.refresh(&pool).await {
                Ok(()) if failing => {
                    tracing::info!("key and model directory refreshed again");
                    failing = false;
                }
                Ok(()) => {}
                Err(e) if !failing => {
                    tracing::warn!(error = %e, "cannot refresh keys and models from Postgres; serving the last snapshot");
                    failing = true;
                }
                Err(_) => {}
            }
        }
    }
}
