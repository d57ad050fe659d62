//! A fake LLM provider for tests and benchmarks.
//!
//! It speaks the provider wire formats exactly (OpenAI chat completions, also behind Azure's
//! deployment URLs; Anthropic Messages; Gemini generateContent), answers with deterministic
//! text (`"tok0 tok1 ..."`) so tests can predict every byte, and misbehaves on demand through
//! [`MockConfig`] knobs, server-wide or per request (`"mock": {...}` in the body).
//!
//! It is also the baseline of the benchmarks (gateway overhead = gateway minus calling the mock
//! directly), so the hot path avoids logging, locks held across awaits and needless allocation.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub mod anthropic;
pub mod azure;
pub mod embeddings;
pub mod gemini;
pub mod knobs;
pub mod openai;
pub mod stats;

pub use knobs::{MockConfig, MockOverrides};
pub use stats::Stats;

use stats::Counters;

/// State shared by all handlers of one server.
pub(crate) struct Shared {
    /// Swapped whole by `set_config`; readers clone the `Arc` and drop the lock at once.
    config: RwLock<Arc<MockConfig>>,
    pub(crate) counters: Arc<Counters>,
    /// Cancelled on shutdown so hanging requests and slow streams end instead of blocking the
    /// graceful shutdown forever.
    pub(crate) shutdown: CancellationToken,
    /// Off by default, so the benchmark baseline pays one relaxed load per request.
    recording: AtomicBool,
    /// The last chat request body per model, while recording (tests check what the
    /// gateway sent upstream, e.g. a session's history).
    last_bodies: Mutex<HashMap<String, axum::body::Bytes>>,
    /// Requests that reached the `fail_status` check, for `fail_times` (reset with the stats).
    failures: AtomicU64,
    /// Off by default, like `recording`: arrival of each provider request while on.
    recording_calls: AtomicBool,
    calls: Mutex<Vec<Call>>,
}

/// One provider request as the mock received it (see [`MockUpstream::record_calls`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub path: String,
    /// When the request's head arrived.
    pub at: std::time::Instant,
}

impl Shared {
    fn new(config: MockConfig, shutdown: CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            config: RwLock::new(Arc::new(config)),
            counters: Arc::new(Counters::default()),
            shutdown,
            recording: AtomicBool::new(false),
            last_bodies: Mutex::new(HashMap::new()),
            failures: AtomicU64::new(0),
            recording_calls: AtomicBool::new(false),
            calls: Mutex::new(Vec::new()),
        })
    }

    /// Whether a request configured to fail with `fail_status` fails: always without
    /// `fail_times`, else only the first `fail_times` such requests.
    pub(crate) fn should_fail(&self, fail_times: Option<u32>) -> bool {
        match fail_times {
            None => true,
            Some(n) => self.failures.fetch_add(1, Ordering::Relaxed) < u64::from(n),
        }
    }

    fn reset(&self) {
        self.counters.reset();
        self.failures.store(0, Ordering::Relaxed);
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Keeps `body` as the last request for `model` when recording is on.
    pub(crate) fn record_body(&self, model: &str, body: &axum::body::Bytes) {
        if self.recording.load(Ordering::Relaxed) {
            self.last_bodies
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(model.to_owned(), body.clone());
        }
    }

    pub(crate) fn config(&self) -> Arc<MockConfig> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_config(&self, config: MockConfig) {
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
    }
}

/// A running mock server. Dropping the handle stops the server (like [`MockUpstream::shutdown`]
/// without waiting), so a test cannot leak it by accident.
pub struct MockUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: Option<JoinHandle<io::Result<()>>>,
}

impl MockUpstream {
    /// Binds `addr` (use `127.0.0.1:0` for a free port), spawns the server on the current tokio
    /// runtime and returns at once; the socket is already listening.
    pub async fn start(addr: SocketAddr, config: MockConfig) -> io::Result<MockUpstream> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Shared::new(config, CancellationToken::new());
        let task = tokio::spawn(run(listener, shared.clone(), false));
        Ok(MockUpstream {
            addr,
            shared,
            task: Some(task),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// OpenAI-style base URL, including `/v1`: what a channel's `base_url` takes.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The host root, without `/v1`: what an Anthropic or Gemini channel's `base_url` takes.
    pub fn root_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        self.shared.counters.snapshot()
    }

    /// Zeroes the counters (and the `fail_times` count, and the recorded calls).
    pub fn reset_stats(&self) {
        self.shared.reset();
    }

    /// Starts (or stops) recording when each provider request arrives, for
    /// [`MockUpstream::calls`] (retry and backoff tests compare arrival times).
    pub fn record_calls(&self, on: bool) {
        self.shared.recording_calls.store(on, Ordering::Relaxed);
    }

    /// The provider requests received while recording, in arrival order.
    pub fn calls(&self) -> Vec<Call> {
        self.shared
            .calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Starts (or stops) keeping the last chat request body per model, for
    /// [`MockUpstream::last_body`]. Stopping forgets what was kept.
    pub fn record_bodies(&self, on: bool) {
        self.shared.recording.store(on, Ordering::Relaxed);
        if !on {
            self.shared
                .last_bodies
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
        }
    }

    /// The last chat request body received for `model` (as the client named it in the
    /// body) while recording, parsed.
    pub fn last_body(&self, model: &str) -> Option<serde_json::Value> {
        let bodies = self
            .shared
            .last_bodies
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        serde_json::from_slice(bodies.get(model)?).ok()
    }

    /// Replaces the server-wide knobs; requests already running keep the old ones.
    pub fn set_config(&self, config: MockConfig) {
        self.shared.set_config(config);
    }

    /// Stops accepting, ends hanging requests and slow streams, and waits for the server task.
    pub async fn shutdown(mut self) {
        self.shared.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

/// Runs the mock on `listener` until ctrl-c or until `shutdown` is cancelled; used by
/// `sluice mock-upstream --listen ADDR [flags]`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: MockConfig,
    shutdown: CancellationToken,
) -> io::Result<()> {
    run(listener, Shared::new(config, shutdown.child_token()), true).await
}

async fn run(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    ctrl_c: bool,
) -> io::Result<()> {
    let token = shared.shutdown.clone();
    // Nagle plus delayed ACK costs ~40 ms per keep-alive request; a benchmark baseline cannot
    // afford that.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let signal = async move {
        if ctrl_c {
            tokio::select! {
                () = token.cancelled() => {}
                r = tokio::signal::ctrl_c() => match r {
                    Ok(()) => token.cancel(),
                    // No signal support: only the token can stop us.
                    Err(_) => token.cancelled().await,
                },
            }
        } else {
            token.cancelled().await;
        }
    };
    axum::serve(listener, router(shared))
        .with_graceful_shutdown(signal)
        .await
}

/// All routes: the provider surfaces plus the `/_mock/*` control routes.
fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .merge(openai::routes())
        .merge(anthropic::routes())
        .merge(azure::routes())
        .merge(gemini::routes())
        .merge(embeddings::routes())
        .route("/_mock/stats", get(get_stats))
        .route("/_mock/config", get(get_config).post(post_config))
        .route("/_mock/reset", post(post_reset))
        .fallback(openai::not_found)
        .layer(axum::middleware::map_request_with_state(
            shared.clone(),
            count_request,
        ))
        .with_state(shared)
}

/// Counts every provider request; control routes are left out so reading stats is neutral.
async fn count_request(State(shared): State<Arc<Shared>>, req: Request) -> Request {
    let path = req.uri().path();
    if !path.starts_with("/_mock/") {
        shared.counters.record_request(path);
        if shared.recording_calls.load(Ordering::Relaxed) {
            let call = Call {
                path: path.to_owned(),
                at: std::time::Instant::now(),
            };
            shared
                .calls
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(call);
        }
    }
    req
}

async fn get_stats(State(shared): State<Arc<Shared>>) -> Json<Stats> {
    Json(shared.counters.snapshot())
}

async fn get_config(State(shared): State<Arc<Shared>>) -> Json<MockConfig> {
    Json((*shared.config()).clone())
}

async fn post_config(
    State(shared): State<Arc<Shared>>,
    Json(config): Json<MockConfig>,
) -> Json<MockConfig> {
    shared.set_config(config.clone());
    Json(config)
}

async fn post_reset(State(shared): State<Arc<Shared>>) -> StatusCode {
    shared.reset();
    StatusCode::NO_CONTENT
}
