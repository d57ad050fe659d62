//! The nodes bucket (`<NS>_NODES`): nodes put their [`NodeRecord`] under
//! `node.<node id>` every [`super::HEARTBEAT`]; workers and the ingress watch it.
//!
//! The bucket's stream keeps one message per key for at most [`super::BUCKET_MAX_AGE`], so
//! a node that died without a word leaves nothing behind. NATS does not tell watchers when
//! a message ages out, so watchers judge liveness themselves: a node whose last heartbeat
//! arrived more than [`super::STALE_AFTER`] ago is gone. Arrival time on the watcher's own
//! clock is what counts, never the node's clock.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use futures::StreamExt;
use schemas::Namespace;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::protocol::NodeRecord;
use super::{BUCKET_MAX_AGE, STALE_AFTER};

#[derive(Debug, thiserror::Error)]
#[error("cannot create or open the nodes bucket `{bucket}`: {message}")]
pub struct BucketError {
    pub bucket: String,
    pub message: String,
}

/// The key of a node's record.
pub fn node_key(id: Uuid) -> String {
    format!("node.{}", id.simple())
}

/// Opens the namespace's nodes bucket, creating it when missing.
pub async fn open(js: &jetstream::Context, ns: &Namespace) -> Result<kv::Store, BucketError> {
    let bucket = ns.nodes_bucket();
    let err = |e: &dyn std::fmt::Display| BucketError {
        bucket: bucket.clone(),
        message: e.to_string(),
    };
    if let Ok(kv) = js.get_key_value(bucket.as_str()).await {
        return Ok(kv);
    }
    // Created as a stream directly, as for the health bucket: `create_key_value` first asks
    // for account info, which NATS 2.9 answers in a shape the client does not expect.
    // Memory storage: heartbeats every second are not worth a disk write, and the records
    // are rebuilt within a heartbeat after a NATS restart.
    js.create_or_update_stream(stream::Config {
        name: format!("KV_{bucket}"),
        description: Some("sluice remote worker nodes, heartbeated".to_owned()),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_age: BUCKET_MAX_AGE,
        storage: stream::StorageType::Memory,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        num_replicas: 1,
        ..Default::default()
    })
    .await
    .map_err(|e| err(&e))?;
    js.get_key_value(bucket.as_str()).await.map_err(|e| err(&e))
}

/// A live node as a watcher sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveNode {
    pub record: NodeRecord,
    /// When its last heartbeat arrived here.
    pub seen: Instant,
}

/// Folds bucket entries into the set of live nodes.
#[derive(Debug, Default)]
pub struct LiveNodes {
    nodes: HashMap<Uuid, LiveNode>,
}

impl LiveNodes {
    /// Applies one entry of the bucket.
    pub fn apply_entry(&mut self, entry: &kv::Entry, now: Instant) -> bool {
        let put = entry.operation == kv::Operation::Put;
        self.apply(&entry.key, put.then_some(&entry.value[..]), now)
    }

    /// Applies a put (`Some(value)`) or delete of `key` seen at `now`; returns whether the
    /// live set changed in a way that matters to routing or listing (a node came or went,
    /// or its record changed).
    pub fn apply(&mut self, key: &str, value: Option<&[u8]>, now: Instant) -> bool {
        let Some(id) = key
            .strip_prefix("node.")
            .and_then(|id| Uuid::try_parse(id).ok())
        else {
            return false;
        };
        let Some(value) = value else {
            return self.nodes.remove(&id).is_some();
        };
        let record = match serde_json::from_slice::<NodeRecord>(value) {
            Ok(record) if record.id == id => record,
            Ok(_) => {
                tracing::debug!(key, "node record under another node's key; ignored");
                return false;
            }
            Err(e) => {
                tracing::debug!(key, error = %e, "undecodable node record; ignored");
                return false;
            }
        };
        let changed = self.nodes.get(&id).is_none_or(|n| n.record != record);
        self.nodes.insert(id, LiveNode { record, seen: now });
        changed
    }

    /// Drops nodes whose heartbeat stopped; returns whether any was dropped.
    pub fn prune(&mut self, now: Instant) -> bool {
        let before = self.nodes.len();
        self.nodes
            .retain(|_, n| now.saturating_duration_since(n.seen) <= STALE_AFTER);
        self.nodes.len() != before
    }

    /// The live nodes, by name then id.
    pub fn list(&self) -> Vec<NodeRecord> {
        let mut list: Vec<NodeRecord> = self.nodes.values().map(|n| n.record.clone()).collect();
        list.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        list
    }
}

/// How often the live set is checked for nodes that stopped heartbeating.
const PRUNE_EVERY: Duration = Duration::from_millis(250);

/// Watches the nodes bucket until `shutdown`, calling `on_change` with the live nodes
/// whenever the set or a record changes (joins, leaves, load). Opens the bucket first,
/// retrying while NATS is away, and re-watches after errors.
pub async fn follow(
    js: jetstream::Context,
    ns: Namespace,
    shutdown: CancellationToken,
    mut on_change: impl FnMut(Vec<NodeRecord>) + Send,
) {
    let mut warned = false;
    let kv = loop {
        match open(&js, &ns).await {
            Ok(kv) => break kv,
            Err(e) => {
                if !warned {
                    tracing::warn!(error = %e, "cannot open the nodes bucket; remote nodes are not routed until it opens");
                    warned = true;
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    let mut live = LiveNodes::default();
    let mut prune = tokio::time::interval(PRUNE_EVERY);
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut watch = match kv.watch_with_history(">").await {
            Ok(watch) => watch,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the nodes bucket; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = prune.tick() => {
                    if live.prune(Instant::now()) {
                        on_change(live.list());
                    }
                }
                entry = watch.next() => match entry {
                    Some(Ok(entry)) => {
                        if live.apply_entry(&entry, Instant::now()) {
                            on_change(live.list());
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "watching the nodes bucket failed; re-watching");
                        break;
                    }
                    None => break,
                },
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::node::protocol::ServedModel;

    fn record(id: Uuid, in_flight: u32) -> NodeRecord {
        NodeRecord {
            id,
            name: "n".to_owned(),
            version: "v".to_owned(),
            models: vec![ServedModel {
                name: "m".to_owned(),
                upstream: "u".to_owned(),
            }],
            max_parallel: 2,
            in_flight,
            priority: 0,
            started_at_ms: 0,
            at_ms: 0,
        }
    }

    #[test]
    fn heartbeats_keep_nodes_alive_and_silence_drops_them() {
        let id = Uuid::now_v7();
        let key = node_key(id);
        let json = |r: &NodeRecord| serde_json::to_vec(r).unwrap();
        let mut live = LiveNodes::default();
        let t0 = Instant::now();
        assert!(
            live.apply(&key, Some(&json(&record(id, 0))), t0),
            "a new node"
        );
        assert!(
            !live.apply(
                &key,
                Some(&json(&record(id, 0))),
                t0 + Duration::from_secs(1)
            ),
            "same record"
        );
        assert!(
            live.apply(
                &key,
                Some(&json(&record(id, 1))),
                t0 + Duration::from_secs(2)
            ),
            "load changed"
        );
        assert!(!live.prune(t0 + Duration::from_secs(2) + STALE_AFTER));
        assert_eq!(live.list().len(), 1);
        assert!(
            live.prune(t0 + Duration::from_secs(3) + STALE_AFTER),
            "heartbeat stopped"
        );
        assert!(live.list().is_empty());

        assert!(live.apply(&key, Some(&json(&record(id, 0))), t0));
        assert!(live.apply(&key, None, t0));
        assert!(
            live.list().is_empty(),
            "a clean shutdown deletes the record"
        );

        let other = node_key(Uuid::now_v7());
        assert!(
            !live.apply(&other, Some(&json(&record(id, 0))), t0),
            "a record under another node's key"
        );
        assert!(!live.apply(&key, Some(b"junk"), t0));
    }
}
