//! Load shedding at the door: when more requests wait in `<NS>_REQUESTS` than the workers
//! can take (`max_queue_depth`), new work is refused with 503 and `Retry-After` (529 on the
//! Anthropic surface, as Anthropic says "overloaded") instead of being queued behind the
//! others while its client connection holds ingress memory.
//!
//! The depth is the shared workers consumer's pending count (queued, not yet taken), or
//! the stream's message count before any worker created the consumer. It is read at most
//! once per `every` (~100 ms), off the request path: a request that finds the cached value
//! stale starts one background refresh and decides on the cached value. An idle gateway
//! asks nothing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use axum::extract::Request;
use axum::http::Method;
use axum::response::Response;
use schemas::work::{ApiErrorInfo, ErrorKind};
use schemas::Namespace;

/// Requests refused with 503 because the queue was over its limit.
pub const SHED: &str = "sluice_ingress_shed_total";

/// The queue depth, cached.
pub struct QueueGauge {
    js: jetstream::Context,
    stream: String,
    consumer: String,
    /// 0 = never shed.
    limit: u64,
    every: Duration,
    origin: Instant,
    depth: AtomicU64,
    /// Milliseconds since `origin` of the last refresh start (0 = never).
    refreshed_ms: AtomicU64,
    refreshing: AtomicBool,
}

impl QueueGauge {
    pub fn new(js: jetstream::Context, ns: &Namespace, limit: u64, every: Duration) -> Self {
        Self {
            js,
            stream: ns.requests_stream(),
            consumer: ns.workers_consumer(),
            limit,
            every,
            origin: Instant::now(),
            depth: AtomicU64::new(0),
            refreshed_ms: AtomicU64::new(0),
            refreshing: AtomicBool::new(false),
        }
    }

    /// The last depth read.
    pub fn depth(&self) -> u64 {
        self.depth.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// `Some(depth)` when the queue is deeper than the limit and the request should be
    /// refused. Never waits: a stale value triggers a background refresh.
    pub fn over_limit(self: &Arc<Self>) -> Option<u64> {
        if self.limit == 0 {
            return None;
        }
        self.maybe_refresh();
        let depth = self.depth();
        (depth > self.limit).then_some(depth)
    }

    fn maybe_refresh(self: &Arc<Self>) {
        let now = u64::try_from(self.origin.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let last = self.refreshed_ms.load(Ordering::Relaxed);
        let every = u64::try_from(self.every.as_millis()).unwrap_or(u64::MAX);
        if last != 0 && now.saturating_sub(last) < every {
            return;
        }
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        self.refreshed_ms.store(now, Ordering::Relaxed);
        let gauge = Arc::clone(self);
        tokio::spawn(async move {
            match gauge.read().await {
                Ok(depth) => gauge.depth.store(depth, Ordering::Relaxed),
                // Unknown depth: keep the last value; the queue publish itself fails (503)
                // if JetStream is really gone.
                Err(e) => tracing::debug!(error = %e, "reading the request queue depth failed"),
            }
            gauge.refreshing.store(false, Ordering::Release);
        });
    }

    async fn read(&self) -> Result<u64, String> {
        let stream = self
            .js
            .get_stream_no_info(&self.stream)
            .await
            .map_err(|e| e.to_string())?;
        match stream.consumer_info(&self.consumer).await {
            Ok(info) => Ok(info.num_pending),
            Err(_) => stream
                .get_info()
                .await
                .map(|info| info.state.messages)
                .map_err(|e| e.to_string()),
        }
    }
}

/// Whether a request would add work to the queue: the generation routes and the
/// WebSocket upgrade. Reads, admin and health stay available under overload.
fn queues_work(method: &Method, path: &str) -> bool {
    if method == Method::GET {
        return path == "/ws";
    }
    if method != Method::POST {
        return false;
    }
    matches!(
        path,
        "/v1/chat/completions"
            | "/v1/messages"
            | "/v1/responses"
            | "/v1/embeddings"
            | "/v1/images/generations"
    ) || (path.starts_with("/api/sessions/")
        && (path.ends_with("/chat") || path.ends_with("/regenerate")))
}

/// The 503 to answer to a request that would queue work while the queue is over its
/// limit, if any.
pub fn shed_refusal(gauge: &Arc<QueueGauge>, req: &Request) -> Option<Response> {
    if queues_work(req.method(), req.uri().path()) {
        if let Some(depth) = gauge.over_limit() {
            tracing::debug!(
                depth,
                limit = gauge.limit(),
                "queue over its limit; refusing"
            );
            metrics::counter!(SHED).increment(1);
            let info = ApiErrorInfo {
                status: 503,
                kind: ErrorKind::Overloaded,
                message: format!(
                    "the gateway is overloaded ({depth} requests are waiting for a worker); retry shortly"
                ),
                code: Some("overloaded".to_owned()),
                param: None,
                retry_after: Some(RETRY_AFTER_SECS),
            };
            return Some(crate::request_id::shaped_error(req.uri().path(), &info));
        }
    }
    None
}

/// What a refused client is told to wait: the gauge refreshes far more often, so a short
/// pause is enough to see the queue again.
const RETRY_AFTER_SECS: u64 = 1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_work_that_queues_is_shed() {
        assert!(queues_work(&Method::POST, "/v1/chat/completions"));
        assert!(queues_work(&Method::POST, "/v1/messages"));
        assert!(queues_work(&Method::POST, "/api/sessions/abc/chat"));
        assert!(queues_work(&Method::GET, "/ws"));
        assert!(!queues_work(&Method::GET, "/v1/models"));
        assert!(!queues_work(&Method::POST, "/v1/messages/count_tokens"));
        assert!(!queues_work(&Method::POST, "/api/admin/channels"));
        assert!(!queues_work(&Method::GET, "/healthz"));
    }
}

/// The ingress's protective limits, with their environment overrides:
/// `SLUICE_MAX_QUEUE_DEPTH` (0 = never shed), `SLUICE_DRAIN_SECS`, `SLUICE_BODY_TIMEOUT_SECS`,
/// `SLUICE_HEADER_TIMEOUT_SECS`.
#[derive(Debug, Clone)]
pub struct IngressLimits {
    /// Queued requests (not yet taken by a worker) above which new work gets 503.
    pub max_queue_depth: u64,
    /// How stale the queue depth may be.
    pub queue_check_every: Duration,
    /// On SIGTERM, how long open responses (streams) may take to finish before their
    /// connections are closed.
    pub drain: Duration,
    /// Body size, arrival time and JSON depth.
    pub body: crate::routes::body::BodyLimits,
    /// Header count and size answered with a JSON 431.
    pub headers: crate::request_id::HeaderLimits,
    /// A connection must deliver a request's headers within this long (slowloris). hyper
    /// starts this clock as soon as a connection waits for a request, so it is also how
    /// long an idle keep-alive connection stays open: shorter than clients' pool idle
    /// times would make them race the close (60 s, like nginx's 75 s keep-alive).
    pub header_read_timeout: Duration,
}

impl IngressLimits {
    /// The defaults, overridden by the environment.
    pub fn from_env(max_body_bytes: usize) -> Self {
        Self::from_lookup(max_body_bytes, |k| std::env::var(k).ok())
    }

    pub fn from_lookup(max_body_bytes: usize, env: impl Fn(&str) -> Option<String>) -> Self {
        let num = |name: &str, default: u64| {
            env(name)
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(default)
        };
        Self {
            max_queue_depth: num("SLUICE_MAX_QUEUE_DEPTH", 10_000),
            queue_check_every: Duration::from_millis(100),
            drain: Duration::from_secs(num("SLUICE_DRAIN_SECS", 30)),
            body: crate::routes::body::BodyLimits {
                max_bytes: max_body_bytes,
                read_timeout: Duration::from_secs(num("SLUICE_BODY_TIMEOUT_SECS", 30).max(1)),
                max_depth: 64,
            },
            headers: crate::request_id::HeaderLimits {
                max_bytes: 32 * 1024,
                max_count: 128,
            },
            header_read_timeout: Duration::from_secs(num("SLUICE_HEADER_TIMEOUT_SECS", 60).max(1)),
        }
    }
}

#[cfg(test)]
mod limits_tests {
    use super::*;

    #[test]
    fn env_overrides_defaults() {
        let l = IngressLimits::from_lookup(1024, |k| match k {
            "SLUICE_MAX_QUEUE_DEPTH" => Some("5".into()),
            "SLUICE_DRAIN_SECS" => Some("x".into()),
            _ => None,
        });
        assert_eq!(l.max_queue_depth, 5);
        assert_eq!(l.drain, Duration::from_secs(30), "unparsable value ignored");
        assert_eq!(l.body.max_bytes, 1024);
    }
}
