//! `sluice migrate` (and `sluice up`): apply migrations, then upsert the channels, keys,
//! prices and plans declared in `sluice.yaml`. Each change appends an audit event (prices
//! are `PriceSet` events, which the billing projector turns into the price history; plans
//! are `PlanConfigured` events, keyed by a plan id derived from the name).

use anyhow::{bail, Context as _};
use chrono::Utc;
use sqlx::{PgPool, Row};

use schemas::config::{ChannelConfig, FileConfig, KeyConfig, PlanConfig, PriceConfig};
use schemas::events::{ChannelConfigured, Event, KeyCreated, Metadata, PlanConfigured, PriceSet};
use schemas::sealed::SecretKey;
use schemas::{Envelope, Namespace, Price};

pub struct Seeder<'a> {
    pub pool: &'a PgPool,
    pub js: &'a async_nats::jetstream::Context,
    pub ns: &'a Namespace,
    pub secret_key: Option<&'a SecretKey>,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct SeedReport {
    pub channels_changed: usize,
    pub keys_created: usize,
    pub prices_set: usize,
    pub plans_set: usize,
}

impl Seeder<'_> {
    pub async fn apply(&self, file: &FileConfig) -> anyhow::Result<SeedReport> {
        let mut report = SeedReport::default();
        for channel in &file.channels {
            if self.upsert_channel(channel).await? {
                report.channels_changed += 1;
            }
        }
        for key in &file.keys {
            if self.upsert_key(key).await? {
                report.keys_created += 1;
            }
        }
        for price in &file.prices {
            if self.set_price(price).await? {
                report.prices_set += 1;
            }
        }
        for plan in &file.plans {
            if self.set_plan(plan).await? {
                report.plans_set += 1;
            }
        }
        Ok(report)
    }

    async fn publish(&self, event: Event) -> anyhow::Result<()> {
        let envelope: Envelope = event.into_envelope(Utc::now(), Metadata::default());
        projector::bus::publish_event(self.js, self.ns, &envelope)
            .await?
            .await
            .context("JetStream did not acknowledge a configuration event")?;
        Ok(())
    }

    /// Inserts or updates a channel by name; returns whether anything changed.
    async fn upsert_channel(&self, c: &ChannelConfig) -> anyhow::Result<bool> {
        let existing = sqlx::query(
            "SELECT id, channel_type, base_url, api_key_sealed, models, model_map, priority, weight, retry, groups, enabled, timeouts
             FROM channels WHERE name = $1 AND owner_user_id IS NULL",
        )
        .bind(&c.name)
        .fetch_optional(self.pool)
        .await?;
        let model_map = serde_json::to_value(&c.model_map)?;
        let timeouts = serde_json::to_value(c.timeouts)?;
        let sealed_now: Option<String> = existing
            .as_ref()
            .and_then(|r| r.try_get("api_key_sealed").ok().flatten());
        let secret_same = match (&c.api_key, &sealed_now, self.secret_key) {
            (None, None, _) => true,
            (Some(k), Some(s), Some(sk)) => sk.open(s).map(|p| p == k.expose()).unwrap_or(false),
            _ => false,
        };
        let sealed = match (&c.api_key, self.secret_key) {
            (None, _) => None,
            (Some(_), _) if secret_same => sealed_now.clone(),
            (Some(k), Some(sk)) => Some(sk.seal(k.expose())),
            (Some(_), None) => bail!(
                "channel `{}` has an api_key but SLUICE_SECRET_KEY is not set; set it to 32 random bytes in base64 \
                 (`openssl rand -base64 32`) so provider secrets are encrypted at rest",
                c.name
            ),
        };
        if let Some(row) = &existing {
            let same = secret_same
                && row.try_get::<String, _>("channel_type")? == c.channel_type
                && row.try_get::<Option<String>, _>("base_url")? == c.base_url
                && row.try_get::<Vec<String>, _>("models")? == c.models
                && row.try_get::<serde_json::Value, _>("model_map")? == model_map
                && row.try_get::<i32, _>("priority")? == c.priority
                && i64::from(row.try_get::<i32, _>("weight")?) == i64::from(c.weight)
                && i64::from(row.try_get::<i32, _>("retry")?) == i64::from(c.retry)
                && row.try_get::<Vec<String>, _>("groups")? == c.groups
                && row.try_get::<bool, _>("enabled")? == c.enabled
                && row.try_get::<serde_json::Value, _>("timeouts")? == timeouts;
            if same {
                return Ok(false);
            }
        }
        let id = match &existing {
            Some(row) => row.try_get("id")?,
            None => schemas::new_id(),
        };
        sqlx::query(
            "INSERT INTO channels (id, name, channel_type, base_url, api_key_sealed, models, model_map, priority, weight, retry, groups, enabled, timeouts, source)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, 'config')
             ON CONFLICT (name) WHERE owner_user_id IS NULL DO UPDATE SET channel_type = EXCLUDED.channel_type, base_url = EXCLUDED.base_url,
               api_key_sealed = EXCLUDED.api_key_sealed, models = EXCLUDED.models, model_map = EXCLUDED.model_map,
               priority = EXCLUDED.priority, weight = EXCLUDED.weight, retry = EXCLUDED.retry, groups = EXCLUDED.groups,
               enabled = EXCLUDED.enabled, timeouts = EXCLUDED.timeouts, updated_at = now()",
        )
        .bind(id)
        .bind(&c.name)
        .bind(&c.channel_type)
        .bind(&c.base_url)
        .bind(&sealed)
        .bind(&c.models)
        .bind(&model_map)
        .bind(c.priority)
        .bind(i32::try_from(c.weight).context("weight is too large")?)
        .bind(i32::try_from(c.retry).context("retry is too large")?)
        .bind(&c.groups)
        .bind(c.enabled)
        .bind(&timeouts)
        .execute(self.pool)
        .await?;
        self.publish(Event::ChannelConfigured(ChannelConfigured {
            channel_id: id,
            name: c.name.clone(),
            channel_type: c.channel_type.clone(),
            models: c.models.clone(),
            enabled: c.enabled,
            source: "config".into(),
            owner_user_id: None,
        }))
        .await?;
        Ok(true)
    }

    /// Creates a bootstrap key (stored as a hash) or updates its limits; returns whether it was created.
    async fn upsert_key(&self, k: &KeyConfig) -> anyhow::Result<bool> {
        let hash = ingress::hash_key(k.key.expose());
        let quota = k
            .quota
            .as_deref()
            .map(schemas::Nanos::from_usd_str)
            .transpose()?
            .map(|n| n.0);
        let rpm = k
            .rpm
            .map(i32::try_from)
            .transpose()
            .context("rpm is too large")?;
        let id = schemas::new_id();
        let prefix = display_prefix(k.key.expose());
        let inserted: Option<uuid::Uuid> = sqlx::query_scalar(
            "INSERT INTO api_keys (id, name, key_hash, prefix, key_group, quota_nanos, rpm, source)
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'config')
             ON CONFLICT (key_hash) DO UPDATE SET name = EXCLUDED.name, key_group = EXCLUDED.key_group,
               quota_nanos = EXCLUDED.quota_nanos, rpm = EXCLUDED.rpm
             RETURNING CASE WHEN xmax = 0 THEN id END",
        )
        .bind(id)
        .bind(&k.name)
        .bind(&hash)
        .bind(&prefix)
        .bind(&k.group)
        .bind(quota)
        .bind(rpm)
        .fetch_one(self.pool)
        .await?;
        let Some(key_id) = inserted else {
            return Ok(false);
        };
        self.publish(Event::KeyCreated(KeyCreated {
            key_id,
            name: k.name.clone(),
            prefix,
            group: k.group.clone(),
            source: "config".into(),
        }))
        .await?;
        Ok(true)
    }

    /// Appends a `PriceSet` unless the price in force already equals the configured one.
    async fn set_price(&self, p: &PriceConfig) -> anyhow::Result<bool> {
        let price = p
            .to_price()
            .with_context(|| format!("price of `{}`", p.model))?;
        let current = sqlx::query(
            "SELECT input_per_mtok, output_per_mtok, cached_input_per_mtok, per_request FROM prices
             WHERE model = $1 AND effective_at <= now() ORDER BY effective_at DESC, position DESC LIMIT 1",
        )
        .bind(&p.model)
        .fetch_optional(self.pool)
        .await?;
        if let Some(row) = current {
            let stored = Price {
                input_per_mtok: schemas::Nanos(row.try_get("input_per_mtok")?),
                output_per_mtok: schemas::Nanos(row.try_get("output_per_mtok")?),
                cached_input_per_mtok: row
                    .try_get::<Option<i64>, _>("cached_input_per_mtok")?
                    .map(schemas::Nanos),
                per_request: schemas::Nanos(row.try_get("per_request")?),
            };
            if stored == price {
                return Ok(false);
            }
        }
        self.publish(Event::PriceSet(PriceSet {
            model: p.model.clone(),
            price,
            effective_at: Utc::now(),
        }))
        .await?;
        Ok(true)
    }
}

impl Seeder<'_> {
    /// Appends a `PlanConfigured` unless the plan (its id derived from its name) already
    /// has this definition in billing's read model.
    async fn set_plan(&self, p: &PlanConfig) -> anyhow::Result<bool> {
        let name = p.name.trim().to_owned();
        let plan_id = ingress::routes::plans::config_plan_id(&name);
        let monthly_quota = p
            .monthly_quota()
            .with_context(|| format!("quota of plan `{name}`"))?;
        let models = ingress::routes::plans::check_models(p.models.clone())
            .with_context(|| format!("models of plan `{name}`"))?;
        let current: Option<(String, i64, Vec<String>, bool)> = sqlx::query_as(
            "SELECT name, quota_nanos, models, public FROM current_plans WHERE plan_id = $1",
        )
        .bind(plan_id)
        .fetch_optional(self.pool)
        .await?;
        if current == Some((name.clone(), monthly_quota.0, models.clone(), p.public)) {
            return Ok(false);
        }
        self.publish(Event::PlanConfigured(PlanConfigured {
            plan_id,
            name,
            monthly_quota,
            models,
            public: p.public,
            source: "config".to_owned(),
            by_user: None,
        }))
        .await?;
        Ok(true)
    }
}

/// What lists show of a key: its first characters, never enough to use it.
fn display_prefix(key: &str) -> String {
    let head: String = key.chars().take(8).collect();
    format!("{head}…")
}
