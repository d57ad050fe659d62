//! The channels the workers route over, as one snapshot swapped atomically.

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};

use crate::channel::Channel;

/// A snapshot of every channel, shared by all requests of a worker. Readers clone the
/// inner `Arc` (one atomic increment under a read lock held for no more than that) and
/// plan over it without holding any lock; a refresh builds a whole new list and swaps it
/// in, so a request never sees a half-updated configuration.
///
/// `arc-swap` would make the read lock-free, but it is not a workspace dependency and a
/// read lock held for one `Arc::clone` is not contended in practice.
#[derive(Clone, Default)]
pub struct ChannelSet {
    inner: Arc<RwLock<Arc<Vec<Arc<Channel>>>>>,
}

impl ChannelSet {
    pub fn new(channels: Vec<Arc<Channel>>) -> Self {
        Self {
            inner: Arc::new(RwLock::new(Arc::new(channels))),
        }
    }

    /// The current channels. Cheap; hold it for the duration of one request.
    pub fn snapshot(&self) -> Arc<Vec<Arc<Channel>>> {
        // A poisoned lock only means a writer panicked between two whole swaps; the
        // value inside is still a complete snapshot.
        self.inner.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces every channel at once; requests already planned keep the old snapshot.
    pub fn replace(&self, channels: Vec<Arc<Channel>>) {
        *self.inner.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(channels);
    }

    /// The model names served by at least one enabled channel, sorted and deduplicated
    /// (what `GET /v1/models` lists).
    pub fn models(&self) -> Vec<String> {
        let snapshot = self.snapshot();
        let names: BTreeSet<&str> = snapshot
            .iter()
            .filter(|c| c.enabled)
            .flat_map(|c| c.models.iter().map(String::as_str))
            .collect();
        names.into_iter().map(str::to_owned).collect()
    }
}

impl std::fmt::Debug for ChannelSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelSet")
            .field("channels", &self.snapshot().len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::tests::channel;

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
        assert_eq!(before.len(), 3);
    }
}
