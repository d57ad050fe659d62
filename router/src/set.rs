//! The channels the workers route over, as one snapshot swapped atomically.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};

use uuid::Uuid;

use crate::channel::Channel;
use crate::health::{Health, HealthBook};

/// Enabled channels of one priority that serve one model.
#[derive(Debug)]
pub(crate) struct Tier {
    pub(crate) members: Vec<Member>,
}

/// What a pick needs of a channel, copied next to each other so scanning a tier of a
/// hundred channels touches one array, not a hundred `Channel`s.
#[derive(Debug)]
pub(crate) struct Member {
    /// Index into the snapshot's channels.
    pub(crate) index: usize,
    pub(crate) weight: u64,
    /// No group restriction: the group check can be skipped.
    pub(crate) open: bool,
    pub(crate) health: Arc<Health>,
}

/// Every channel of one configuration, with its health cell and an index from client
/// model name to priority tiers, built once per configuration change so a pick never
/// scans channels that do not serve the model.
#[derive(Debug, Default)]
pub struct Snapshot {
    channels: Vec<Arc<Channel>>,
    health: Vec<Arc<Health>>,
    /// Shared channels: tiers lowest priority first.
    by_model: HashMap<String, Vec<Tier>>,
    /// Personal channels (bring your own key), owner → model → tiers. Kept apart so other
    /// users' requests never even see them, and a request without personal channels pays
    /// one lookup in an empty map.
    personal: HashMap<Uuid, HashMap<String, Vec<Tier>>>,
}

impl Snapshot {
    /// Indexes `channels`, taking each one's health cell from `book` (created on first
    /// sight, kept across snapshots).
    pub fn build(channels: Vec<Arc<Channel>>, book: &HealthBook) -> Self {
        let health: Vec<Arc<Health>> = channels.iter().map(|c| book.cell(c.id)).collect();
        let mut shared = Vec::new();
        let mut owned: HashMap<Uuid, Vec<usize>> = HashMap::new();
        for (i, c) in channels.iter().enumerate().filter(|(_, c)| c.enabled) {
            match c.owner {
                None => shared.push(i),
                Some(owner) => owned.entry(owner).or_default().push(i),
            }
        }
        let by_model = index(&channels, &health, &shared);
        let personal = owned
            .into_iter()
            .map(|(owner, members)| (owner, index(&channels, &health, &members)))
            .collect();
        Self {
            channels,
            health,
            by_model,
            personal,
        }
    }

    pub fn channels(&self) -> &[Arc<Channel>] {
        &self.channels
    }

    /// The shared channels' tiers for `model`.
    pub(crate) fn tiers(&self, model: &str) -> &[Tier] {
        self.by_model.get(model).map_or(&[], Vec::as_slice)
    }

    /// The tiers of `owner`'s personal channels for `model`.
    pub(crate) fn personal_tiers(&self, owner: Uuid, model: &str) -> &[Tier] {
        self.personal
            .get(&owner)
            .and_then(|m| m.get(model))
            .map_or(&[], Vec::as_slice)
    }

    pub(crate) fn channel(&self, i: usize) -> &Arc<Channel> {
        &self.channels[i]
    }

    pub(crate) fn health(&self, i: usize) -> &Arc<Health> {
        &self.health[i]
    }
}

/// Model name → priority tiers (lowest first) over the enabled channels `members`
/// (indexes into `channels`, in ascending order).
fn index(
    channels: &[Arc<Channel>],
    health: &[Arc<Health>],
    members: &[usize],
) -> HashMap<String, Vec<Tier>> {
    let mut by_priority: HashMap<&str, Vec<(i32, usize)>> = HashMap::new();
    for &i in members {
        let c = &channels[i];
        for model in &c.models {
            by_priority.entry(model).or_default().push((c.priority, i));
        }
    }
    by_priority
        .into_iter()
        .map(|(model, mut members)| {
            members.sort_unstable();
            let mut tiers: Vec<(i32, Tier)> = Vec::new();
            for (priority, index) in members {
                let member = Member {
                    index,
                    weight: u64::from(channels[index].weight.max(1)),
                    open: channels[index].groups.is_empty(),
                    health: Arc::clone(&health[index]),
                };
                match tiers.last_mut() {
                    Some((p, tier)) if *p == priority => tier.members.push(member),
                    _ => tiers.push((
                        priority,
                        Tier {
                            members: vec![member],
                        },
                    )),
                }
            }
            (
                model.to_owned(),
                tiers.into_iter().map(|(_, t)| t).collect(),
            )
        })
        .collect()
}

/// A snapshot of every channel, shared by all requests of a worker. Readers clone the
/// inner `Arc` (one atomic increment under a read lock held for no more than that) and
/// plan over it without holding any lock; a refresh builds a whole new snapshot and swaps
/// it in, so a request never sees a half-updated configuration. Health lives in the
/// [`HealthBook`], outside the snapshots, so a refresh keeps bans and load counts.
///
/// `arc-swap` would make the read lock-free, but it is not a workspace dependency and a
/// read lock held for one `Arc::clone` is not contended in practice.
#[derive(Clone, Default)]
pub struct ChannelSet {
    inner: Arc<RwLock<Arc<Snapshot>>>,
    book: HealthBook,
    /// What snapshots are built from: the configured channels and the live remote nodes,
    /// each replaced by its own source. Held while a snapshot is built and swapped, so two
    /// sources replacing at once cannot undo each other.
    sources: Arc<Mutex<Sources>>,
}

#[derive(Debug, Default)]
struct Sources {
    configured: Vec<Arc<Channel>>,
    nodes: Vec<Arc<Channel>>,
}

impl ChannelSet {
    pub fn new(channels: Vec<Arc<Channel>>) -> Self {
        Self::with_book(channels, HealthBook::default())
    }

    pub fn with_book(channels: Vec<Arc<Channel>>, book: HealthBook) -> Self {
        let snapshot = Snapshot::build(channels.clone(), &book);
        Self {
            inner: Arc::new(RwLock::new(Arc::new(snapshot))),
            book,
            sources: Arc::new(Mutex::new(Sources {
                configured: channels,
                nodes: Vec::new(),
            })),
        }
    }

    /// The current channels. Cheap; hold it for the duration of one request.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        // A poisoned lock only means a writer panicked between two whole swaps; the
        // value inside is still a complete snapshot.
        self.inner.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces every configured channel at once (live nodes stay); requests already
    /// planned keep the old snapshot.
    pub fn replace(&self, channels: Vec<Arc<Channel>>) {
        let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        sources.configured = channels;
        self.rebuild(&sources);
    }

    /// Replaces the channels of live remote nodes (type `node`), keeping the configured ones.
    pub fn replace_nodes(&self, nodes: Vec<Arc<Channel>>) {
        let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        sources.nodes = nodes;
        self.rebuild(&sources);
    }

    /// The configured channels (from the `channels` table), without live nodes: what a
    /// reload compares against to see whether anything changed.
    pub fn configured(&self) -> Vec<Arc<Channel>> {
        let sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        sources.configured.clone()
    }

    /// The channels of live nodes, as last replaced.
    pub fn nodes(&self) -> Vec<Arc<Channel>> {
        let sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        sources.nodes.clone()
    }

    fn rebuild(&self, sources: &Sources) {
        let all = sources
            .configured
            .iter()
            .chain(&sources.nodes)
            .cloned()
            .collect();
        let snapshot = Arc::new(Snapshot::build(all, &self.book));
        *self.inner.write().unwrap_or_else(|e| e.into_inner()) = snapshot;
    }

    /// The health cells, shared with whatever keeps them in sync across workers.
    pub fn book(&self) -> &HealthBook {
        &self.book
    }

    /// The model names served by at least one enabled shared channel, sorted and
    /// deduplicated (what `GET /v1/models` lists).
    pub fn models(&self) -> Vec<String> {
        self.models_for(None)
    }

    /// [`ChannelSet::models`] plus the models of `user`'s enabled personal channels.
    pub fn models_for(&self, user: Option<Uuid>) -> Vec<String> {
        let snapshot = self.snapshot();
        let names: BTreeSet<&str> = snapshot
            .channels
            .iter()
            .filter(|c| c.enabled && (c.owner.is_none() || c.owner == user))
            .flat_map(|c| c.models.iter().map(String::as_str))
            .collect();
        names.into_iter().map(str::to_owned).collect()
    }
}

impl std::fmt::Debug for ChannelSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelSet")
            .field("channels", &self.snapshot().channels.len())
            .finish()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::channel::tests::channel;
    use schemas::work::ErrorKind;

    #[test]
    fn models_lists_enabled_channels_and_swaps_whole() {
        let mut off = channel("off", &["hidden"]);
        off.enabled = false;
        let set = ChannelSet::new(vec![
            Arc::new(channel("a", &["m2", "m1"])),
            Arc::new(channel("b", &["m1"])),
            Arc::new(off),
        ]);
        assert_eq!(set.models(), ["m1", "m2"]);
        let before = set.snapshot();
        set.replace(vec![Arc::new(channel("c", &["m3"]))]);
        assert_eq!(set.models(), ["m3"]);
        // A snapshot taken before the swap is unaffected.
        assert_eq!(before.channels().len(), 3);
    }

    #[test]
    fn index_groups_enabled_channels_by_model_and_tier() {
        let mut a = channel("a", &["m"]);
        a.priority = 2;
        let mut b = channel("b", &["m", "n"]);
        b.priority = 1;
        let mut c = channel("c", &["m"]);
        c.priority = 2;
        let mut off = channel("off", &["m"]);
        off.enabled = false;
        let snap = Snapshot::build(
            vec![Arc::new(a), Arc::new(b), Arc::new(c), Arc::new(off)],
            &HealthBook::default(),
        );
        let tiers: Vec<Vec<&str>> = snap
            .tiers("m")
            .iter()
            .map(|t| {
                t.members
                    .iter()
                    .map(|m| snap.channel(m.index).name.as_str())
                    .collect()
            })
            .collect();
        assert_eq!(tiers, [vec!["b"], vec!["a", "c"]]);
        assert_eq!(snap.tiers("n").len(), 1);
        assert!(snap.tiers("nope").is_empty());
    }

    #[test]
    fn nodes_and_configured_channels_are_replaced_independently() {
        let set = ChannelSet::new(vec![Arc::new(channel("a", &["m1"]))]);
        let mut node = channel("node:gpu", &["m2"]);
        node.channel_type = "node".to_owned();
        set.replace_nodes(vec![Arc::new(node)]);
        assert_eq!(set.models(), ["m1", "m2"]);
        set.replace(vec![Arc::new(channel("b", &["m3"]))]);
        assert_eq!(set.models(), ["m2", "m3"], "a reload keeps the nodes");
        assert_eq!(set.configured().len(), 1);
        assert_eq!(set.nodes().len(), 1);
        set.replace_nodes(Vec::new());
        assert_eq!(set.models(), ["m3"], "a node gone is dropped");
        assert_eq!(set.snapshot().tiers("m2").len(), 0);
    }

    #[test]
    fn personal_models_are_listed_for_their_owner_only() {
        let owner = Uuid::now_v7();
        let mut own = channel("own", &["byok", "m1"]);
        own.owner = Some(owner);
        let mut own_off = channel("own-off", &["off"]);
        own_off.owner = Some(owner);
        own_off.enabled = false;
        let set = ChannelSet::new(vec![
            Arc::new(channel("shared", &["m1"])),
            Arc::new(own),
            Arc::new(own_off),
        ]);
        assert_eq!(set.models(), ["m1"]);
        assert_eq!(set.models_for(Some(Uuid::now_v7())), ["m1"]);
        assert_eq!(set.models_for(Some(owner)), ["byok", "m1"]);
        let snap = set.snapshot();
        assert_eq!(snap.tiers("byok").len(), 0, "not a shared tier");
        assert_eq!(snap.tiers("m1")[0].members.len(), 1);
        assert_eq!(snap.personal_tiers(owner, "byok").len(), 1);
        assert_eq!(snap.personal_tiers(owner, "off").len(), 0);
    }

    #[test]
    fn a_refresh_keeps_bans() {
        let a = Arc::new(channel("a", &["m"]));
        let set = ChannelSet::new(vec![Arc::clone(&a)]);
        let cfg = crate::BreakerConfig {
            failure_threshold: 1,
            ..Default::default()
        };
        set.snapshot()
            .health(0)
            .record_failure(ErrorKind::Upstream5xx, None, 1, &cfg);
        set.replace(vec![Arc::clone(&a)]);
        assert_ne!(set.snapshot().health(0).banned_until_ms(), 0);
    }
}
