//! What the hot path needs from Postgres — API keys with their limits and balances, the
//! models the enabled channels serve, and the prices in force — held in memory and
//! refreshed in the background, so a request never waits for Postgres and keeps being
//! served while it is down.
//!
//! Each refresh reads one consistent snapshot (a repeatable-read transaction), and also the
//! ledger rows charged since the previous refresh: their quota holds in Redis are released
//! once the new balances (which include those charges) are installed, so a charge is never
//! counted twice nor dropped between the Redis hold and the projected balance.
//!
//! Money of a key with a user is the user's [`Wallet`]: credits granted to the user or to
//! any of their keys, minus what the balance paid for any of their keys (revoked ones
//! included), plus the plan's quota left this month; the key's own quota is then only a
//! cap on that key. A key without a user has only its own allowance (quota + credits).

use sha2::{Digest, Sha256};
use sqlx::{PgPool, Row};
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use schemas::{Nanos, Price};

use crate::quota::{Account, HoldStore};

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
    /// as projected; requests in flight are held in Redis on top (see `quota`). For a key
    /// with a user this is the key's cap; the money itself is the `wallet`'s.
    pub remaining_nanos: Option<i64>,
    /// The owner's shared money, for a key with a user.
    pub wallet: Option<Arc<Wallet>>,
}

/// A user's money as projected at the last refresh, shared by all their keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wallet {
    pub user_id: Uuid,
    /// Credits (to the user and to their keys) minus what the balance paid; may be
    /// slightly negative after an overrun of one request's estimate.
    pub balance_nanos: i64,
    pub plan: Option<PlanGrant>,
}

/// The user's plan and what is left of its quota in the current UTC month.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanGrant {
    pub plan_id: Uuid,
    /// Empty = every model.
    pub models: Vec<String>,
    pub left_nanos: i64,
}

impl Wallet {
    /// A user with no credit and no plan.
    pub fn empty(user_id: Uuid) -> Self {
        Self {
            user_id,
            balance_nanos: 0,
            plan: None,
        }
    }

    /// What the user may spend on `model` now: the balance, plus the plan's quota left
    /// this month when the plan pays for `model` (billing draws on the plan first). A
    /// negative part counts as zero, so a small overrun of the balance does not eat into
    /// the plan.
    pub fn available(&self, model: &str) -> i64 {
        let plan = self
            .plan
            .as_ref()
            .filter(|p| p.models.is_empty() || p.models.iter().any(|m| m == model))
            .map_or(0, |p| p.left_nanos.max(0));
        self.balance_nanos.max(0).saturating_add(plan)
    }
}

impl Caller {
    pub fn may_use(&self, model: &str) -> bool {
        self.allowed_models.is_empty() || self.allowed_models.iter().any(|m| m == model)
    }
}

#[derive(Debug, Default)]
struct Snapshot {
    keys: HashMap<String, Arc<Caller>>,
    /// Model name → whether at least one enabled shared channel serves it.
    models: HashMap<String, bool>,
    /// The same per user, over their personal channels (bring your own key) only.
    personal_models: HashMap<Uuid, HashMap<String, bool>>,
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
    /// Live remote nodes, from the nodes bucket (not Postgres); see [`Directory::follow_nodes`].
    nodes: Arc<RwLock<Arc<NodeView>>>,
}

/// The live remote nodes and the models they serve.
#[derive(Debug, Default)]
pub struct NodeView {
    /// By name.
    pub nodes: Vec<workers::node::NodeRecord>,
    pub models: std::collections::HashSet<String>,
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
            nodes: Arc::default(),
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

    /// The caller of a live key by its stored hash (`api_keys.key_hash`): a user signed in
    /// with a session token acting through one of their keys.
    pub fn caller_by_hash(&self, key_hash: &str) -> Option<Arc<Caller>> {
        self.snapshot().keys.get(key_hash).cloned()
    }

    /// Whether shared channels serve `model`.
    pub fn model(&self, model: &str) -> ModelStatus {
        self.model_for(model, None)
    }

    /// Whether `model` is served to `user`: by a shared channel or one of their own. Other
    /// users' personal channels do not count, so their models are unknown here.
    pub fn model_for(&self, model: &str, user: Option<Uuid>) -> ModelStatus {
        let snapshot = self.snapshot();
        let own = user.and_then(|u| snapshot.personal_models.get(&u));
        let served = [snapshot.models.get(model), own.and_then(|m| m.get(model))];
        if served.contains(&Some(&true)) || self.nodes().models.contains(model) {
            ModelStatus::Available
        } else if served.contains(&Some(&false)) {
            ModelStatus::NoEnabledChannel
        } else {
            ModelStatus::Unknown
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

    /// Models served by at least one enabled shared channel, sorted.
    pub fn models(&self) -> Vec<String> {
        self.models_for(None)
    }

    /// [`Directory::models`] plus those of `user`'s enabled personal channels, sorted and
    /// deduplicated.
    pub fn models_for(&self, user: Option<Uuid>) -> Vec<String> {
        let snapshot = self.snapshot();
        let own = user.and_then(|u| snapshot.personal_models.get(&u));
        let mut models: Vec<String> = snapshot
            .models
            .iter()
            .chain(own.into_iter().flatten())
            .filter(|(_, enabled)| **enabled)
            .map(|(m, _)| m.clone())
            .collect();
        models.extend(self.nodes().models.iter().cloned());
        models.sort();
        models.dedup();
        models
    }

    /// The live remote nodes, as last seen in the nodes bucket.
    pub fn nodes(&self) -> Arc<NodeView> {
        match self.nodes.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the live nodes (what models they add to the directory).
    pub fn set_nodes(&self, nodes: Vec<workers::node::NodeRecord>) {
        let models = nodes
            .iter()
            .flat_map(|n| n.models.iter().map(|m| m.name.clone()))
            .collect();
        let view = Arc::new(NodeView { nodes, models });
        match self.nodes.write() {
            Ok(mut guard) => *guard = view,
            Err(poisoned) => *poisoned.into_inner() = view,
        }
    }

    /// Follows the nodes bucket until `shutdown`: a model only nodes serve is known (listed,
    /// accepted) while one of them is live.
    pub async fn follow_nodes(
        self,
        js: async_nats::jetstream::Context,
        ns: schemas::Namespace,
        shutdown: CancellationToken,
    ) {
        workers::node::bucket::follow(js, ns, shutdown, move |live| self.set_nodes(live)).await;
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
        let wallets = load_wallets(&mut tx).await?;
        let keys = load_keys(&mut tx, &wallets).await?;
        let (models, personal_models) = load_models(&mut tx).await?;
        let prices = load_prices(&mut tx).await?;
        let seen = self.ledger_seen.load(Ordering::Acquire);
        let (charged, head) = load_charged(&mut tx, seen).await?;
        tx.commit().await?;
        let snapshot = Arc::new(Snapshot {
            keys,
            models,
            personal_models,
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

/// The wallet of every user with a live key; see the module docs for what counts.
async fn load_wallets(
    tx: &mut sqlx::PgConnection,
) -> Result<HashMap<Uuid, Arc<Wallet>>, sqlx::Error> {
    let rows = sqlx::query(
        "WITH owners AS (
           SELECT DISTINCT user_id FROM api_keys WHERE user_id IS NOT NULL AND revoked_at IS NULL
         ), key_money AS (
           SELECT k.user_id, sum(b.granted_nanos)::bigint AS granted,
                  sum(b.spent_nanos - b.plan_nanos)::bigint AS spent
           FROM api_keys k JOIN owners o USING (user_id) JOIN key_balances b ON b.key_id = k.id
           GROUP BY k.user_id
         )
         SELECT o.user_id,
                COALESCE(ub.granted_nanos, 0) + COALESCE(km.granted, 0) - COALESCE(km.spent, 0) AS balance,
                p.plan_id, p.models, p.quota_nanos - COALESCE(pu.used_nanos, 0) AS plan_left
         FROM owners o
         LEFT JOIN user_balances ub ON ub.user_id = o.user_id
         LEFT JOIN key_money km ON km.user_id = o.user_id
         LEFT JOIN current_subscriptions s ON s.user_id = o.user_id
         LEFT JOIN current_plans p ON p.plan_id = s.plan_id
         LEFT JOIN plan_usage pu ON pu.user_id = o.user_id
              AND pu.period = date_trunc('month', now() AT TIME ZONE 'UTC')::date",
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut wallets = HashMap::with_capacity(rows.len());
    for row in rows {
        let user_id: Uuid = row.try_get("user_id")?;
        let plan_id: Option<Uuid> = row.try_get("plan_id")?;
        let plan = match plan_id {
            Some(plan_id) => Some(PlanGrant {
                plan_id,
                models: row.try_get("models")?,
                left_nanos: row.try_get("plan_left")?,
            }),
            None => None,
        };
        let wallet = Wallet {
            user_id,
            balance_nanos: row.try_get("balance")?,
            plan,
        };
        wallets.insert(user_id, Arc::new(wallet));
    }
    Ok(wallets)
}

async fn load_keys(
    tx: &mut sqlx::PgConnection,
    wallets: &HashMap<Uuid, Arc<Wallet>>,
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
        let user_id: Option<Uuid> = row.try_get("user_id")?;
        let wallet = user_id.map(|u| {
            wallets
                .get(&u)
                .cloned()
                .unwrap_or_else(|| Arc::new(Wallet::empty(u)))
        });
        let caller = Caller {
            key_id: row.try_get("id")?,
            user_id,
            group: row.try_get("key_group")?,
            rpm: limit(row.try_get("rpm")?),
            tpm: limit(row.try_get("tpm")?),
            user_rpm: limit(row.try_get("user_rpm")?),
            user_tpm: limit(row.try_get("user_tpm")?),
            allowed_models: row.try_get("allowed_models")?,
            remaining_nanos: quota.map(|q| q.saturating_add(granted).saturating_sub(spent)),
            wallet,
        };
        keys.insert(row.try_get("key_hash")?, Arc::new(caller));
    }
    Ok(keys)
}

/// Shared and personal models: model → whether an enabled channel serves it.
type Models = (HashMap<String, bool>, HashMap<Uuid, HashMap<String, bool>>);

async fn load_models(tx: &mut sqlx::PgConnection) -> Result<Models, sqlx::Error> {
    let rows = sqlx::query("SELECT models, enabled, owner_user_id FROM channels")
        .fetch_all(&mut *tx)
        .await?;
    let mut shared: HashMap<String, bool> = HashMap::new();
    let mut personal: HashMap<Uuid, HashMap<String, bool>> = HashMap::new();
    for row in rows {
        let served: Vec<String> = row.try_get("models")?;
        let enabled: bool = row.try_get("enabled")?;
        let owner: Option<Uuid> = row.try_get("owner_user_id")?;
        let models = match owner {
            None => &mut shared,
            Some(user) => personal.entry(user).or_default(),
        };
        for model in served {
            let entry = models.entry(model).or_insert(false);
            *entry |= enabled;
        }
    }
    Ok((shared, personal))
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

/// The quota holds of requests charged after ledger position `seen` (on the key and, for
/// a key with a user, on the user), and the ledger's head. The first refresh (`seen` < 0)
/// only learns the head: holds older than the process are left to their expiry.
async fn load_charged(
    tx: &mut sqlx::PgConnection,
    seen: i64,
) -> Result<(Vec<(Account, Uuid)>, i64), sqlx::Error> {
    let head: i64 = sqlx::query_scalar("SELECT COALESCE(max(position), 0) FROM ledger_entries")
        .fetch_one(&mut *tx)
        .await?;
    if seen < 0 || head <= seen {
        return Ok((Vec::new(), head));
    }
    let rows: Vec<(Uuid, Option<Uuid>, Uuid)> = sqlx::query_as(
        "SELECT key_id, user_id, request_id FROM ledger_entries
         WHERE position > $1 AND position <= $2 AND request_id IS NOT NULL AND key_id IS NOT NULL",
    )
    .bind(seen)
    .bind(head)
    .fetch_all(&mut *tx)
    .await?;
    let mut holds = Vec::with_capacity(rows.len() * 2);
    for (key_id, user_id, request_id) in rows {
        holds.push((Account::Key(key_id), request_id));
        if let Some(user_id) = user_id {
            holds.push((Account::User(user_id), request_id));
        }
    }
    Ok((holds, head))
}
