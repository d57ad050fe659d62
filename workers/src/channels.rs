//! Loading channels from the `channels` table into the router's [`ChannelSet`], and
//! keeping that set fresh so admin changes reach running workers without a restart.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use router::{Channel, ChannelSet};
use schemas::sealed::SecretKey;
use sqlx::{PgPool, Row};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum ChannelsError {
    #[error("reading the `channels` table failed: {0}")]
    Query(#[from] sqlx::Error),
}

const SELECT_CHANNELS: &str =
    "SELECT id, name, channel_type, base_url, api_key_sealed, models, model_map, \
     priority, weight, retry, groups, enabled, timeouts, owner_user_id, updated_at FROM channels ORDER BY priority, name";

/// Reads channels and opens their secrets. Remembers which broken channels it already
/// reported, so a channel whose key cannot be opened is logged once per change of its
/// row, not on every refresh.
#[derive(Debug)]
pub struct ChannelLoader {
    key: Option<SecretKey>,
    reported: HashSet<(Uuid, DateTime<Utc>)>,
}

impl ChannelLoader {
    pub fn new(key: Option<SecretKey>) -> Self {
        Self {
            key,
            reported: HashSet::new(),
        }
    }

    /// Every channel whose secret (if any) could be opened; the others are skipped with an
    /// error log that names the channel (never the secret).
    pub async fn load(&mut self, pool: &PgPool) -> Result<Vec<Arc<Channel>>, ChannelsError> {
        let rows = sqlx::query(SELECT_CHANNELS).fetch_all(pool).await?;
        let mut channels = Vec::with_capacity(rows.len());
        let mut still_broken = HashSet::new();
        for row in rows {
            let id: Uuid = row.try_get("id")?;
            let name: String = row.try_get("name")?;
            let updated_at: DateTime<Utc> = row.try_get("updated_at")?;
            let sealed: Option<String> = row.try_get("api_key_sealed")?;
            let api_key = match (sealed, &self.key) {
                (None, _) => None,
                (Some(sealed), Some(key)) => match key.open(&sealed) {
                    Ok(plain) => Some(plain),
                    Err(e) => {
                        if self.reported.insert((id, updated_at)) {
                            tracing::error!(channel = %name, channel_id = %id, error = %e, "cannot open the channel's API key; the channel is skipped until its key is set again or SLUICE_SECRET_KEY matches the one it was sealed with");
                        }
                        still_broken.insert((id, updated_at));
                        continue;
                    }
                },
                (Some(_), None) => {
                    if self.reported.insert((id, updated_at)) {
                        tracing::error!(channel = %name, channel_id = %id, "the channel has a sealed API key but this worker has no SLUICE_SECRET_KEY; the channel is skipped");
                    }
                    still_broken.insert((id, updated_at));
                    continue;
                }
            };
            let model_map: sqlx::types::Json<serde_json::Value> = row.try_get("model_map")?;
            let weight: i32 = row.try_get("weight")?;
            let retry: i32 = row.try_get("retry")?;
            let limits: sqlx::types::Json<serde_json::Value> = row.try_get("timeouts")?;
            channels.push(Arc::new(Channel {
                id,
                name,
                channel_type: row.try_get("channel_type")?,
                base_url: row.try_get("base_url")?,
                api_key,
                models: row.try_get("models")?,
                model_map: string_map(&model_map.0),
                priority: row.try_get("priority")?,
                weight: u32::try_from(weight).unwrap_or(1).max(1),
                retry: u32::try_from(retry).unwrap_or(1).max(1),
                groups: row.try_get("groups")?,
                enabled: row.try_get("enabled")?,
                timeouts: timeouts(&limits.0),
                owner: row.try_get("owner_user_id")?,
            }));
        }
        self.reported.retain(|k| still_broken.contains(k));
        Ok(channels)
    }
}

/// The string entries of a `model_map` object; anything else in it is ignored rather than
/// failing the whole load.
fn string_map(v: &serde_json::Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

/// The `timeouts` column; a value this worker cannot read (written by a newer version, or
/// by hand) falls back to the defaults rather than failing the whole load.
fn timeouts(v: &serde_json::Value) -> schemas::config::ChannelTimeouts {
    serde_json::from_value(v.clone()).unwrap_or_default()
}

/// Reloads the channels every `every` into `set` until `shutdown`. A failed reload keeps
/// the last good set (requests keep flowing while Postgres is away) and is logged once
/// per outage, not on every tick.
pub fn spawn_refresh(
    tracker: &TaskTracker,
    pool: PgPool,
    mut loader: ChannelLoader,
    set: ChannelSet,
    every: Duration,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    tracker.spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match loader.load(&pool).await {
                Ok(channels) => {
                    if failing {
                        tracing::info!("reloading channels works again");
                        failing = false;
                    }
                    // Live nodes are not in the table: compare with the configured part only.
                    if set.configured() != channels {
                        tracing::info!(channels = channels.len(), "channels changed");
                        set.replace(channels);
                    }
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "reloading channels failed; routing with the last loaded set");
                        failing = true;
                    }
                }
            }
        }
    })
}
