//! What the hot path needs from Postgres — API keys with their limits and balances, the
//! models the enabled channels serve, and the prices in force — held in memory and
//! refreshed in the background, so a request never waits for Postgres and keeps being
//! served while it is down.
//!
//! Each refresh reads one consistent snapshot (a repeatable-read transaction), and also the
//! ledger rows charged since the previous refresh: their quota holds in Redis are released
//! once the new balances (which include those charges) are installed, so a charge is never
//! counted twice nor dropped between the Redis hold and the projected balance.

use sha2::{Digest, Sha256};
use sqlx::{PgPool, Row};
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use schemas::{Nanos, Price};

use crate::quota::HoldStore;

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
    /// Tokens per minute (prompt estimate plus completion budget) for this key.
    pub tpm: Option<u32>,
    /// Limits of the key's owner, shared by all their keys.
    pub user_rpm: Option<u32>,
    pub user_tpm: Option<u32>,
    /// Empty = every model.
    pub allowed_models: Vec<String>,
    /// Unset = unlimited. Otherwise what is left: quota + credits − spent, in nano-dollars,
    /// as projected; requests in flight are held in Redis on top (see `quota`).
    pub remaining_nanos: Option<i64>,
}

impl Caller {
    pub fn may_use(&self, model: &str) -> bool {
        self.allowed_models.is_empty() || self.allowed_models.iter().any(|m| m == model)
    }
}

#[derive(Debug, Default)]
struct Snapshot {
    keys: HashMap<String, Arc<Caller>>,
    /// Model name → whether at least one enabled channel serves it.
    models: HashMap<String, bool>,
    /// Model → the price in force at the refresh.
    prices: HashMap<String, Price>,
    loaded: bool,
}

#[derive(Debug, Clone)]
pub struct Directory {
    inner: Arc<RwLock<Arc<Snapshot>>>,
    holds: HoldStore,
    /// The last ledger position whose holds were released; -1 until the first refresh.
    ledger_seen: Arc<AtomicI64>,
}

impl Default for Directory {
    fn default() -> Self {
        Self::with_holds(HoldStore::default())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelStatus {
    Unknown,
    NoEnabledChannel,
    Available,
}

impl Directory {
    pub fn with_holds(holds: HoldStore) -> Self {
        Self {
            inner: Arc::default(),
            holds,
            ledger_seen: Arc::new(AtomicI64::new(-1)),
        }
    }

    /// The Redis store of quota holds for requests in flight.
    pub fn holds(&self) -> &HoldStore {
        &self.holds
    }

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

    /// The price of `model` in force at the last refresh.
    pub fn price(&self, model: &str) -> Option<Price> {
        self.snapshot().prices.get(model).copied()
    }

    /// Every model's price in force at the last refresh, sorted by model.
    pub fn prices(&self) -> Vec<(String, Price)> {
        let mut prices: Vec<(String, Price)> = self
            .snapshot()
            .prices
            .iter()
            .map(|(m, p)| (m.clone(), *p))
            .collect();
        prices.sort_by(|a, b| a.0.cmp(&b.0));
        prices
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

    /// Reloads keys, balances, models and prices from Postgres in one consistent snapshot,
    /// then releases the quota holds of requests the ledger has charged meanwhile.
    pub async fn refresh(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        let mut tx = pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        let keys = load_keys(&mut tx).await?;
        let models = load_models(&mut tx).await?;
        let prices = load_prices(&mut tx).await?;
        let seen = self.ledger_seen.load(Ordering::Acquire);
        let (charged, head) = load_charged(&mut tx, seen).await?;
        tx.commit().await?;
        let snapshot = Arc::new(Snapshot {
            keys,
            models,
            prices,
            loaded: true,
        });
        match self.inner.write() {
            Ok(mut guard) => *guard = snapshot,
            Err(poisoned) => *poisoned.into_inner() = snapshot,
        }
        // Only after the balances that include these charges are visible.
        if !charged.is_empty() {
            self.holds.release(&charged).await;
        }
        self.ledger_seen.fetch_max(head, Ordering::AcqRel);
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

fn limit(v: Option<i32>) -> Option<u32> {
    v.and_then(|r| u32::try_from(r).ok())
}

async fn load_keys(
    tx: &mut sqlx::PgConnection,
) -> Result<HashMap<String, Arc<Caller>>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT k.id, k.user_id, k.key_hash, k.key_group, k.rpm, k.tpm, k.allowed_models, k.quota_nanos,
                u.rpm AS user_rpm, u.tpm AS user_tpm,
                COALESCE(b.granted_nanos, 0) AS granted, COALESCE(b.spent_nanos, 0) AS spent
         FROM api_keys k
         LEFT JOIN users u ON u.id = k.user_id
         LEFT JOIN key_balances b ON b.key_id = k.id
         WHERE k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > now())
           AND (u.id IS NULL OR NOT u.disabled)",
    )
    .fetch_all(&mut *tx)
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
            rpm: limit(row.try_get("rpm")?),
            tpm: limit(row.try_get("tpm")?),
            user_rpm: limit(row.try_get("user_rpm")?),
            user_tpm: limit(row.try_get("user_tpm")?),
            allowed_models: row.try_get("allowed_models")?,
            remaining_nanos: quota.map(|q| q.saturating_add(granted).saturating_sub(spent)),
        };
        keys.insert(row.try_get("key_hash")?, Arc::new(caller));
    }
    Ok(keys)
}

async fn load_models(tx: &mut sqlx::PgConnection) -> Result<HashMap<String, bool>, sqlx::Error> {
    let rows = sqlx::query("SELECT models, enabled FROM channels")
        .fetch_all(&mut *tx)
        .await?;
    let mut models: HashMap<String, bool> = HashMap::new();
    for row in rows {
        let served: Vec<String> = row.try_get("models")?;
        let enabled: bool = row.try_get("enabled")?;
        for model in served {
            let entry = models.entry(model).or_insert(false);
            *entry |= enabled;
        }
    }
    Ok(models)
}

/// The latest price per model with `effective_at <= now()` (later event wins a tie).
async fn load_prices(tx: &mut sqlx::PgConnection) -> Result<HashMap<String, Price>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT DISTINCT ON (model) model, input_per_mtok, output_per_mtok, cached_input_per_mtok, per_request
         FROM prices WHERE effective_at <= now()
         ORDER BY model, effective_at DESC, position DESC",
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut prices = HashMap::with_capacity(rows.len());
    for row in rows {
        let price = Price {
            input_per_mtok: Nanos(row.try_get("input_per_mtok")?),
            output_per_mtok: Nanos(row.try_get("output_per_mtok")?),
            cached_input_per_mtok: row
                .try_get::<Option<i64>, _>("cached_input_per_mtok")?
                .map(Nanos),
            per_request: Nanos(row.try_get("per_request")?),
        };
        prices.insert(row.try_get("model")?, price);
    }
    Ok(prices)
}

/// Requests charged after ledger position `seen` as `(key_id, request_id)`, and the
/// ledger's head. The first refresh (`seen` < 0) only learns the head: holds older than the
/// process are left to their expiry.
async fn load_charged(
    tx: &mut sqlx::PgConnection,
    seen: i64,
) -> Result<(Vec<(Uuid, Uuid)>, i64), sqlx::Error> {
    let head: i64 = sqlx::query_scalar("SELECT COALESCE(max(position), 0) FROM ledger_entries")
        .fetch_one(&mut *tx)
        .await?;
    if seen < 0 || head <= seen {
        return Ok((Vec::new(), head));
    }
    let rows: Vec<(Uuid, Uuid)> = sqlx::query_as(
        "SELECT key_id, request_id FROM ledger_entries
         WHERE position > $1 AND position <= $2 AND request_id IS NOT NULL",
    )
    .bind(seen)
    .bind(head)
    .fetch_all(&mut *tx)
    .await?;
    Ok((rows, head))
}
