//! Channel health shared by every worker process through one NATS KV bucket
//! (`<NS>_CHANNEL_HEALTH`), so a channel banned by one worker is avoided by all of them.
//!
//! Keys:
//! - `ban.<channel id>` → [`BanRecord`]: the ban's end (0 = healthy again) and the half-open
//!   probe, if one was claimed. A probe is claimed with a compare-and-set on the key's
//!   revision, so one request in the whole deployment probes a channel, not one per worker.
//! - `load.<worker id>` → [`LoadRecord`]: that worker's calls in flight per channel, put
//!   when they change (at most every `PUBLISH_EVERY`) and at least every
//!   `HEARTBEAT`; records older than `STALE_AFTER` are ignored (a dead worker's calls
//!   are not in flight any more).
//!
//! Every worker watches the whole bucket and folds what it sees into its
//! [`router::HealthBook`], which the router's policy reads without I/O. A watch delivers a
//! put within milliseconds, well inside the one second the design allows.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, kv, stream};
use futures::StreamExt;
use router::{Ban, BreakerConfig, HealthBook};
use schemas::work::ErrorKind;
use schemas::Namespace;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

/// How often this worker's in-flight counts are considered for publishing.
const PUBLISH_EVERY: Duration = Duration::from_millis(250);
/// A worker's load record is put at least this often, even unchanged.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// Load records older than this are from a worker that stopped.
const STALE_AFTER: Duration = Duration::from_secs(6);

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("cannot create or open the channel health bucket `{bucket}`: {message}")]
    Bucket { bucket: String, message: String },
}

/// The value of `ban.<channel id>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BanRecord {
    /// Unix ms; 0 means the channel is healthy again.
    pub until_ms: u64,
    #[serde(default)]
    pub probe_until_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ErrorKind>,
    /// The worker that wrote it.
    pub by: Uuid,
}

/// The value of `load.<worker id>`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadRecord {
    pub at_ms: u64,
    pub in_flight: HashMap<Uuid, u32>,
}

/// Calls in flight per channel summed over the live workers' load records, read from the
/// bucket (for listings; the router keeps its own watched copy). A record older than
/// `STALE_AFTER` is a stopped worker's and counts nothing.
pub async fn in_flight_by_channel(
    kv: &kv::Store,
) -> Result<HashMap<Uuid, u32>, crate::kv_keys::ListKeysError> {
    let keys = crate::kv_keys::list_keys(kv, "load.", crate::kv_keys::LIST_TIMEOUT).await?;
    let fresh_after = now_ms().saturating_sub(STALE_AFTER.as_millis() as u64);
    let mut sums: HashMap<Uuid, u32> = HashMap::new();
    for key in &keys {
        let Ok(Some(bytes)) = kv.get(key.as_str()).await else {
            continue;
        };
        let Ok(load) = serde_json::from_slice::<LoadRecord>(&bytes) else {
            continue;
        };
        if load.at_ms < fresh_after {
            continue;
        }
        for (channel, n) in load.in_flight {
            let sum = sums.entry(channel).or_default();
            *sum = sum.saturating_add(n);
        }
    }
    Ok(sums)
}

/// The bucket of a namespace.
pub fn bucket_name(ns: &Namespace) -> String {
    ns.channel_health_bucket()
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn ban_key(channel: Uuid) -> String {
    format!("ban.{}", channel.simple())
}

/// One worker's view of, and voice in, the shared health.
#[derive(Debug)]
pub struct SharedHealth {
    kv: kv::Store,
    book: HealthBook,
    worker: Uuid,
    pub breaker: BreakerConfig,
}

impl SharedHealth {
    /// Opens (creating if needed) the namespace's bucket.
    pub async fn open(
        js: &jetstream::Context,
        ns: &Namespace,
        book: HealthBook,
        breaker: BreakerConfig,
    ) -> Result<Self, HealthError> {
        let bucket = bucket_name(ns);
        // The stream a KV bucket is made of, created directly: `create_key_value` first
        // asks the server for account info, whose shape NATS 2.9 answers differently from
        // what the client expects. The settings are the client's own for a bucket with a
        // history of one.
        js.create_or_update_stream(stream::Config {
            name: format!("KV_{bucket}"),
            description: Some(
                "sluice channel bans and in-flight counts, shared by all workers".to_owned(),
            ),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: 1,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: stream::DiscardPolicy::New,
            num_replicas: 1,
            ..Default::default()
        })
        .await
        .map_err(|e| HealthError::Bucket {
            bucket: bucket.clone(),
            message: e.to_string(),
        })?;
        let kv = js
            .get_key_value(bucket.as_str())
            .await
            .map_err(|e| HealthError::Bucket {
                bucket: bucket.clone(),
                message: e.to_string(),
            })?;
        let health = Self {
            kv,
            book,
            worker: Uuid::now_v7(),
            breaker,
        };
        health.load_bans().await;
        Ok(health)
    }

    /// Reads the bans in force before this worker takes its first request, so a worker
    /// that joins does not hammer a channel the others are avoiding. The watch started by
    /// [`SharedHealth::spawn`] delivers them again, harmlessly.
    async fn load_bans(&self) {
        let keys = match crate::kv_keys::list_keys(&self.kv, "ban.", crate::kv_keys::LIST_TIMEOUT)
            .await
        {
            Ok(keys) => keys,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list channel bans; learning them from the watch");
                return;
            }
        };
        let mut loads = HashMap::new();
        for key in &keys {
            if let Ok(Some(entry)) = self.kv.entry(key.as_str()).await {
                self.apply(&entry, &mut loads);
            }
        }
    }

    /// Starts watching the bucket and publishing this worker's load, until `shutdown`.
    pub fn spawn(self: &Arc<Self>, tracker: &TaskTracker, shutdown: CancellationToken) {
        let me = Arc::clone(self);
        let stop = shutdown.clone();
        tracker.spawn(async move { me.watch(stop).await });
        let me = Arc::clone(self);
        tracker.spawn(async move { me.publish_load(shutdown).await });
    }

    /// Shares a ban this worker just started.
    pub async fn banned(&self, channel: Uuid, ban: &Ban) {
        let record = BanRecord {
            until_ms: ban.until_ms,
            probe_until_ms: 0,
            kind: Some(ban.kind),
            by: self.worker,
        };
        self.put(&ban_key(channel), &record).await;
    }

    /// Shares that a banned channel answered again.
    pub async fn recovered(&self, channel: Uuid) {
        let record = BanRecord {
            until_ms: 0,
            probe_until_ms: 0,
            kind: None,
            by: self.worker,
        };
        self.put(&ban_key(channel), &record).await;
    }

    /// Claims the half-open probe of `channel` for the whole deployment: first locally
    /// (so this worker's other requests skip it without a round trip), then with a
    /// compare-and-set on the shared record. `false` means someone else probes.
    pub async fn claim_probe(&self, channel: Uuid, health: &router::Health) -> bool {
        let now = now_ms();
        if !health.try_claim_probe(now, &self.breaker) {
            return false;
        }
        let key = ban_key(channel);
        let entry = match self.kv.entry(key.as_str()).await {
            Ok(Some(entry)) => entry,
            // Never shared (or the bucket is unreachable): the local claim is all there is.
            Ok(None) => return true,
            Err(e) => {
                tracing::debug!(error = %e, "reading a ban record failed; probing on the local claim");
                return true;
            }
        };
        let Ok(mut record) = serde_json::from_slice::<BanRecord>(&entry.value) else {
            return true;
        };
        if record.until_ms == 0 || record.until_ms > now || record.probe_until_ms > now {
            // Healthy already, banned again, or probed by another worker.
            return record.until_ms == 0;
        }
        record.probe_until_ms = health.probe_until_ms();
        record.by = self.worker;
        let Ok(value) = serde_json::to_vec(&record) else {
            return true;
        };
        self.kv
            .update(key.as_str(), value.into(), entry.revision)
            .await
            .is_ok()
    }

    async fn put<T: Serialize>(&self, key: &str, value: &T) {
        let Ok(bytes) = serde_json::to_vec(value) else {
            return;
        };
        if let Err(e) = self.kv.put(key, bytes.into()).await {
            tracing::warn!(key, error = %e, "sharing channel health failed; other workers find out on their own");
        }
    }

    /// Folds every change of the bucket into the book; re-watches after an error.
    async fn watch(&self, shutdown: CancellationToken) {
        let mut loads: HashMap<Uuid, LoadRecord> = HashMap::new();
        let mut resum = tokio::time::interval(Duration::from_secs(1));
        loop {
            let mut watch = match self.kv.watch_with_history(">").await {
                Ok(watch) => watch,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch channel health; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = resum.tick() => self.sum_loads(&mut loads),
                    entry = watch.next() => match entry {
                        Some(Ok(entry)) => {
                            if self.apply(&entry, &mut loads) {
                                self.sum_loads(&mut loads);
                            }
                        }
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "watching channel health failed; re-watching");
                            break;
                        }
                        None => break,
                    },
                }
            }
        }
    }

    /// Applies one entry; returns whether loads changed.
    fn apply(&self, entry: &kv::Entry, loads: &mut HashMap<Uuid, LoadRecord>) -> bool {
        let deleted = entry.operation != kv::Operation::Put;
        if let Some(id) = entry.key.strip_prefix("ban.") {
            let Ok(channel) = Uuid::parse_str(id) else {
                return false;
            };
            let cell = self.book.cell(channel);
            if deleted {
                cell.apply_remote(0, 0);
                return false;
            }
            match serde_json::from_slice::<BanRecord>(&entry.value) {
                Ok(r) => cell.apply_remote(r.until_ms, r.probe_until_ms),
                Err(e) => tracing::debug!(key = %entry.key, error = %e, "undecodable ban record"),
            }
            false
        } else if let Some(id) = entry.key.strip_prefix("load.") {
            let Ok(worker) = Uuid::parse_str(id) else {
                return false;
            };
            if worker == self.worker {
                return false;
            }
            match serde_json::from_slice::<LoadRecord>(&entry.value) {
                Ok(r) if !deleted => loads.insert(worker, r),
                _ => loads.remove(&worker),
            };
            true
        } else {
            false
        }
    }

    /// Sets every channel's remote in-flight count to the sum over live other workers.
    fn sum_loads(&self, loads: &mut HashMap<Uuid, LoadRecord>) {
        let fresh_after = now_ms().saturating_sub(STALE_AFTER.as_millis() as u64);
        loads.retain(|_, r| r.at_ms >= fresh_after);
        let mut sums: HashMap<Uuid, u32> = HashMap::new();
        for record in loads.values() {
            for (channel, n) in &record.in_flight {
                let sum = sums.entry(*channel).or_default();
                *sum = sum.saturating_add(*n);
            }
        }
        for (channel, cell) in self.book.all() {
            cell.set_remote_in_flight(sums.get(&channel).copied().unwrap_or(0));
        }
    }

    /// Puts this worker's in-flight counts when they change, and as a heartbeat; removes
    /// them at shutdown so other workers stop counting them at once.
    async fn publish_load(&self, shutdown: CancellationToken) {
        let key = format!("load.{}", self.worker.simple());
        let mut tick = tokio::time::interval(PUBLISH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last: Option<HashMap<Uuid, u32>> = None;
        let mut last_put = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let in_flight: HashMap<Uuid, u32> = self
                .book
                .all()
                .into_iter()
                .map(|(id, h)| (id, h.local_in_flight()))
                .filter(|(_, n)| *n > 0)
                .collect();
            if last.as_ref() == Some(&in_flight) && last_put.elapsed() < HEARTBEAT {
                continue;
            }
            let record = LoadRecord {
                at_ms: now_ms(),
                in_flight,
            };
            self.put(&key, &record).await;
            last = Some(record.in_flight);
            last_put = tokio::time::Instant::now();
        }
        if let Err(e) = self.kv.delete(&key).await {
            tracing::debug!(error = %e, "removing this worker's load record failed; it goes stale");
        }
    }
}
