//! What every role sets up before it starts: logs (text or JSON, `SLUICE_LOG`,
//! `SLUICE_LOG_FORMAT`) and the Prometheus recorder, plus `sluice healthcheck`, the probe
//! container health checks run (the runtime image has no curl).

use anyhow::{bail, Context as _};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

/// Logs to stderr: human-readable text, or one JSON object per line with
/// `SLUICE_LOG_FORMAT=json` (span fields such as `request_id` and `trace_id` included).
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,async_nats=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match std::env::var("SLUICE_LOG_FORMAT").as_deref() {
        Ok("json") => builder
            .json()
            .flatten_event(true)
            // Every enclosing span (request, attempt...) with its fields, so each line
            // carries the request's `trace_id` whichever span logged it.
            .with_current_span(false)
            .with_span_list(true)
            .init(),
        _ => builder.init(),
    }
}

/// Installs the Prometheus recorder every role records into (`/metrics` renders it).
pub fn init_metrics() {
    ingress::metrics::install();
}

/// Whether this process already serves `/healthz` and `/metrics` on SLUICE_METRICS_LISTEN:
/// under `sluice up` several roles ask, and one listener serves the one recorder.
static SERVING: AtomicBool = AtomicBool::new(false);

/// Serves `/healthz` and `/metrics` on `addr` until `shutdown` (once per process).
pub async fn serve_metrics(addr: &str, shutdown: CancellationToken) -> anyhow::Result<()> {
    if SERVING.swap(true, Ordering::AcqRel) {
        return Ok(());
    }
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            SERVING.store(false, Ordering::Release);
            return Err(e)
                .with_context(|| format!("cannot listen on SLUICE_METRICS_LISTEN {addr}"));
        }
    };
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route(
            "/metrics",
            axum::routing::get(|| async {
                ingress::metrics::text_response(ingress::metrics::render())
            }),
        );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    });
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct HealthcheckArgs {
    /// Address to probe; default SLUICE_METRICS_LISTEN, else SLUICE_LISTEN, else
    /// 127.0.0.1:8080. A wildcard host (0.0.0.0, [::]) is probed on loopback.
    #[arg(long)]
    pub addr: Option<String>,
    /// Path that must answer 200.
    #[arg(long, default_value = "/healthz")]
    pub path: String,
    /// Seconds before giving up.
    #[arg(long, default_value_t = 3)]
    pub timeout: u64,
}

/// `sluice healthcheck`: exits 0 when `GET <path>` on the role's own listener answers 200.
pub async fn healthcheck(args: HealthcheckArgs) -> anyhow::Result<()> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let addr = args
        .addr
        .or_else(|| env("SLUICE_METRICS_LISTEN"))
        .or_else(|| env("SLUICE_LISTEN"))
        .unwrap_or_else(|| crate::settings::DEFAULT_LISTEN.to_owned());
    let addr = loopback(&addr);
    let probe = async {
        let mut conn = tokio::net::TcpStream::connect(&addr)
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n",
            args.path
        );
        conn.write_all(request.as_bytes()).await?;
        let mut head = Vec::with_capacity(256);
        // The status line is all that matters; stop reading once it is in.
        while !head.contains(&b'\n') && head.len() < 4096 {
            let mut buf = [0u8; 256];
            let n = conn.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        anyhow::Ok(head)
    };
    let head = tokio::time::timeout(Duration::from_secs(args.timeout.max(1)), probe)
        .await
        .with_context(|| format!("{addr} did not answer within {} s", args.timeout))??;
    let line = String::from_utf8_lossy(&head);
    let status = line.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        bail!("GET {} on {addr}: {status}", args.path);
    }
    Ok(())
}

/// `0.0.0.0:9100` → `127.0.0.1:9100`, `[::]:9100` → `[::1]:9100`.
fn loopback(addr: &str) -> String {
    if let Some(port) = addr.strip_prefix("0.0.0.0:") {
        format!("127.0.0.1:{port}")
    } else if let Some(port) = addr.strip_prefix("[::]:") {
        format!("[::1]:{port}")
    } else {
        addr.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_listeners_are_probed_on_loopback() {
        assert_eq!(loopback("0.0.0.0:9100"), "127.0.0.1:9100");
        assert_eq!(loopback("[::]:8080"), "[::1]:8080");
        assert_eq!(loopback("10.1.2.3:80"), "10.1.2.3:80");
    }

    #[tokio::test]
    async fn healthcheck_passes_on_200_and_fails_otherwise() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let app = axum::Router::new()
            .route("/healthz", axum::routing::get(|| async { "ok" }))
            .route(
                "/readyz",
                axum::routing::get(|| async { axum::http::StatusCode::SERVICE_UNAVAILABLE }),
            );
        tokio::spawn(async move { axum::serve(listener, app).await });
        let args = |path: &str| HealthcheckArgs {
            addr: Some(addr.clone()),
            path: path.to_owned(),
            timeout: 3,
        };
        healthcheck(args("/healthz")).await.expect("200 passes");
        let err = healthcheck(args("/readyz")).await.expect_err("503 fails");
        assert!(err.to_string().contains("503"), "{err}");
        let closed = common_free_addr();
        let err = healthcheck(HealthcheckArgs {
            addr: Some(closed.clone()),
            path: "/healthz".into(),
            timeout: 3,
        })
        .await
        .expect_err("nothing listening fails");
        assert!(format!("{err:#}").contains(&closed), "{err:#}");
    }

    fn common_free_addr() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").to_string()
    }
}
