//! The HTTP server loop: axum's `serve` plus what it does not offer, all for surviving
//! hostile clients and shutting down cleanly:
//! - a deadline for a request's headers (a slowloris client trickling a header a minute
//!   is dropped after `header_read_timeout`, which hyper also applies to idle keep-alive
//!   connections waiting for their next request);
//! - header count and size limits above the JSON 431 of `request_id::header_refusal`, so
//!   that middleware sees every request it should answer, and only absurd ones (hundreds
//!   of kilobytes of headers) are refused by the server itself;
//! - `TCP_NODELAY` on every accepted socket (Nagle plus delayed ACKs costs tens of ms);
//! - a graceful shutdown with a deadline: on the signal the listener closes, idle
//!   keep-alive connections close, open responses (SSE streams) may finish for `drain`,
//!   and connections still open after that are closed.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Connection-level settings of the server.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    pub header_read_timeout: Duration,
    /// hyper's own limits, answered with a bare 431: set well above the JSON ones.
    pub max_headers: usize,
    pub max_header_buf: usize,
    /// How long open responses may run after the shutdown signal.
    pub drain: Duration,
}

impl ServeOptions {
    pub fn new(limits: &crate::backpressure::IngressLimits) -> Self {
        Self {
            header_read_timeout: limits.header_read_timeout,
            max_headers: limits.headers.max_count.saturating_mul(2).max(100),
            max_header_buf: limits.headers.max_bytes.saturating_mul(8).max(64 * 1024),
            drain: limits.drain,
        }
    }
}

/// Serves `app` on `listener` until `signal` completes, then drains (see module docs).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    opts: ServeOptions,
    signal: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(opts.header_read_timeout)
        .max_headers(opts.max_headers)
        .max_buf_size(opts.max_header_buf);
    // WebSockets over HTTP/2 need the CONNECT protocol, as axum's own server enables.
    builder.http2().enable_connect_protocol();
    let builder = Arc::new(builder);
    // `graceful`: finish what is running, accept no new request on open connections.
    // `hard`: the drain deadline passed; drop the connection.
    let graceful = CancellationToken::new();
    let hard = CancellationToken::new();
    let tracker = TaskTracker::new();
    let mut signal = std::pin::pin!(signal);
    loop {
        let (tcp, _remote) = tokio::select! {
            () = &mut signal => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let builder = builder.clone();
        let graceful = graceful.clone();
        let hard = hard.clone();
        tracker.spawn(async move {
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                () = graceful.cancelled() => conn.as_mut().graceful_shutdown(),
            }
            tokio::select! {
                _ = conn.as_mut() => {}
                () = hard.cancelled() => {}
            }
        });
    }
    drop(listener);
    tracker.close();
    graceful.cancel();
    if !tracker.is_empty() {
        tracing::info!(
            connections = tracker.len(),
            drain_secs = opts.drain.as_secs(),
            "draining open connections"
        );
    }
    if tokio::time::timeout(opts.drain, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            connections = tracker.len(),
            "connections still open after the drain deadline; closing them"
        );
        hard.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), tracker.wait()).await;
    }
    Ok(())
}
