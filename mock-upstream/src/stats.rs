//! Request and stream counters.
//!
//! Tests use them to check what actually reached the provider (retries, fallbacks, aborted
//! streams after a client left). Counters are atomics; the per-path map sits behind a mutex that
//! is held for one hash lookup and only allocates the first time a path is seen.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// A snapshot of the counters. `/_mock/*` control requests are not counted, so reading the
/// stats never changes them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Every provider request received (any path other than `/_mock/*`).
    pub requests_total: u64,
    /// Requests per URI path, e.g. `"/v1/chat/completions"`.
    pub by_path: BTreeMap<String, u64>,
    /// Streams whose body started.
    pub streams_started: u64,
    /// Streams that sent their last event (`[DONE]`).
    pub streams_completed: u64,
    /// Streams whose body was dropped before the end: the client went away.
    pub streams_aborted: u64,
    /// Streams the mock cut on purpose (`disconnect_after`).
    pub streams_disconnected: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    requests_total: AtomicU64,
    by_path: Mutex<HashMap<String, u64>>,
    streams_started: AtomicU64,
    streams_completed: AtomicU64,
    streams_aborted: AtomicU64,
    streams_disconnected: AtomicU64,
}

impl Counters {
    pub(crate) fn record_request(&self, path: &str) {
        self.requests_total.fetch_add(1, Ordering::Relaxed);
        let mut map = self.by_path.lock().unwrap_or_else(|e| e.into_inner());
        match map.get_mut(path) {
            Some(n) => *n += 1,
            None => {
                map.insert(path.to_owned(), 1);
            }
        }
    }

    pub(crate) fn snapshot(&self) -> Stats {
        let by_path = self
            .by_path
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        Stats {
            requests_total: self.requests_total.load(Ordering::Relaxed),
            by_path,
            streams_started: self.streams_started.load(Ordering::Relaxed),
            streams_completed: self.streams_completed.load(Ordering::Relaxed),
            streams_aborted: self.streams_aborted.load(Ordering::Relaxed),
            streams_disconnected: self.streams_disconnected.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn reset(&self) {
        self.requests_total.store(0, Ordering::Relaxed);
        self.by_path
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.streams_started.store(0, Ordering::Relaxed);
        self.streams_completed.store(0, Ordering::Relaxed);
        self.streams_aborted.store(0, Ordering::Relaxed);
        self.streams_disconnected.store(0, Ordering::Relaxed);
    }
}

/// How a stream ended, recorded by [`StreamGuard`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamEnd {
    /// Still running; if dropped like this, the client went away.
    Open,
    Completed,
    Disconnected,
}

/// Lives inside a stream body. The body is dropped when the response finishes or when the
/// connection dies, so dropping the guard before [`StreamGuard::finish`] means the client went
/// away. `finish` counts at once (not on drop) so a client that has read `[DONE]` already sees
/// the stream counted as completed.
pub(crate) struct StreamGuard {
    counters: Arc<Counters>,
    end: StreamEnd,
}

impl StreamGuard {
    pub(crate) fn new(counters: Arc<Counters>) -> Self {
        counters.streams_started.fetch_add(1, Ordering::Relaxed);
        Self {
            counters,
            end: StreamEnd::Open,
        }
    }

    pub(crate) fn finish(&mut self, end: StreamEnd) {
        if self.end != StreamEnd::Open {
            return;
        }
        self.end = end;
        let c = &self.counters;
        let counter = match end {
            StreamEnd::Open => return,
            StreamEnd::Completed => &c.streams_completed,
            StreamEnd::Disconnected => &c.streams_disconnected,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.end == StreamEnd::Open {
            self.counters
                .streams_aborted
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_counts_by_end() {
        let c = Arc::new(Counters::default());
        drop(StreamGuard::new(c.clone()));
        let mut g = StreamGuard::new(c.clone());
        g.finish(StreamEnd::Completed);
        drop(g);
        c.record_request("/a");
        c.record_request("/a");
        let s = c.snapshot();
        assert_eq!((s.streams_started, s.streams_aborted), (2, 1));
        assert_eq!(s.streams_completed, 1);
        assert_eq!(s.by_path.get("/a"), Some(&2));
        c.reset();
        assert_eq!(c.snapshot(), Stats::default());
    }
}
