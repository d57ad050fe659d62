//! Prometheus metrics: the process-wide recorder (every role installs it at start and
//! serves it on `/metrics`: the ingress on its API listener, the others on
//! `SLUICE_METRICS_LISTEN`), the HTTP middleware that counts requests and times them and
//! opens each request's trace span, and the ingress's scrape-time gauges (queue depth,
//! journal and projector lag).
//!
//! Series of the ingress (the worker's are in `workers::metrics`):
//! - `sluice_http_requests_total{route, model, status}`: `route` is the matched route
//!   pattern (`/v1/streams/{id}`; `unmatched` for 404s, so random paths add no series),
//!   `model` the model asked for (`none` where there is none);
//! - `sluice_http_request_duration_seconds{route, model}`: until the last byte of the
//!   response body, streams included;
//! - `sluice_queue_depth`, `sluice_journal_lag_events`, `sluice_event_log_head`,
//!   `sluice_projector_lag_events{projector}`, `sluice_projector_lag_seconds{projector}`:
//!   read when `/metrics` is scraped (so as often as Prometheus scrapes, and only then).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, LazyLock, OnceLock, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing::Instrument as _;

use crate::request_id::RequestId;
use crate::state::AppState;
use crate::trace::{Scope, SCOPE};

pub const HTTP_REQUESTS: &str = "sluice_http_requests_total";
pub const HTTP_DURATION: &str = "sluice_http_request_duration_seconds";
pub const QUEUE_DEPTH: &str = "sluice_queue_depth";
pub const JOURNAL_LAG: &str = "sluice_journal_lag_events";
pub const LOG_HEAD: &str = "sluice_event_log_head";
pub const PROJECTOR_LAG_EVENTS: &str = "sluice_projector_lag_events";
pub const PROJECTOR_LAG_SECONDS: &str = "sluice_projector_lag_seconds";

/// Histogram buckets of every `*_seconds` series: from a cached answer (ms) to a long
/// reasoning generation (minutes).
pub const SECONDS_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// The scrape-time reads give up after this long: a slow Postgres must not hang scrapes.
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(2);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder the first time, and returns its handle.
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        // Only an empty bucket list fails; summaries are the exporter's fallback.
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("another metrics recorder is installed; /metrics will be empty");
        }
        describe();
        workers::metrics::describe();
        // Histograms buffer samples until drained: drain them even when nobody scrapes.
        let upkeep = handle.clone();
        let spawned = std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_secs(5));
                upkeep.run_upkeep();
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the metrics upkeep thread");
        }
        handle
    })
}

fn describe() {
    metrics::describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests answered by the ingress, by route pattern, model and status"
    );
    metrics::describe_histogram!(
        HTTP_DURATION,
        metrics::Unit::Seconds,
        "HTTP request time until the last byte of the response, by route pattern and model"
    );
    metrics::describe_gauge!(
        QUEUE_DEPTH,
        "Requests waiting in <NS>_REQUESTS for a worker, read at scrape time"
    );
    metrics::describe_gauge!(
        JOURNAL_LAG,
        "Events in <NS>_EVENTS not yet in the Postgres event log, read at scrape time"
    );
    metrics::describe_gauge!(LOG_HEAD, "Position of the last event in the event log");
    metrics::describe_gauge!(
        PROJECTOR_LAG_EVENTS,
        "Event log positions a projector has not applied yet, by projector"
    );
    metrics::describe_gauge!(
        PROJECTOR_LAG_SECONDS,
        "Age of the oldest event a projector has not applied (0 when caught up), by projector"
    );
}

/// The Prometheus text of this process's metrics.
pub fn render() -> String {
    install().render()
}

/// A `/metrics` response.
pub fn text_response(body: String) -> Response {
    let mut response = Response::new(Body::from(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// `GET /metrics` on the ingress: samples the deployment-wide gauges, then renders.
#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    tag = "ops",
    responses((status = 200, description = "Prometheus text exposition format", content_type = "text/plain; version=0.0.4", body = String)),
)]
pub async fn scrape(State(state): State<Arc<AppState>>) -> Response {
    if tokio::time::timeout(SAMPLE_TIMEOUT, sample(&state))
        .await
        .is_err()
    {
        tracing::debug!("sampling queue depth and lags timed out; last values kept");
    }
    text_response(render()).into_response()
}

/// Projectors every deployment runs, reported before their first checkpoint.
const PROJECTORS: &[&str] = &["billing", "requests", "conversations"];

async fn sample(state: &AppState) {
    let ns = &state.ns;
    // Queued and not yet taken: the shared workers consumer's pending count, or the
    // stream's message count before any worker created the consumer.
    if let Ok(stream) = state.js.get_stream_no_info(ns.requests_stream()).await {
        let depth = match stream.consumer_info(ns.workers_consumer()).await {
            Ok(info) => Some(info.num_pending),
            Err(_) => stream.get_info().await.ok().map(|i| i.state.messages),
        };
        if let Some(depth) = depth {
            metrics::gauge!(QUEUE_DEPTH).set(depth as f64);
        }
    }
    let head: Result<i64, sqlx::Error> =
        sqlx::query_scalar("SELECT COALESCE(max(position), 0)::bigint FROM event_log")
            .fetch_one(&state.pool)
            .await;
    let Ok(head) = head else {
        return;
    };
    metrics::gauge!(LOG_HEAD).set(head as f64);
    if let Ok(events) = state.js.get_stream_no_info(ns.events_stream()).await {
        if let Ok(info) = events.get_info().await {
            let behind = info.state.last_sequence.saturating_sub(head.max(0) as u64);
            metrics::gauge!(JOURNAL_LAG).set(behind as f64);
        }
    }
    // Positions are JetStream sequences, so head minus checkpoint counts the events left.
    let rows: Result<Vec<(String, i64, f64)>, sqlx::Error> = sqlx::query_as(
        "WITH p AS ( \
           SELECT projector AS name, position FROM checkpoints \
           UNION ALL \
           SELECT name, 0 FROM unnest($1::text[]) AS e(name) \
            WHERE NOT EXISTS (SELECT 1 FROM checkpoints c WHERE c.projector = e.name) \
         ) \
         SELECT p.name, p.position, \
                COALESCE(EXTRACT(EPOCH FROM now() - ( \
                  SELECT e.recorded_at FROM event_log e WHERE e.position > p.position \
                  ORDER BY e.position LIMIT 1)), 0)::float8 \
         FROM p",
    )
    .bind(PROJECTORS)
    .fetch_all(&state.pool)
    .await;
    if let Ok(rows) = rows {
        for (name, position, seconds) in rows {
            let behind = (head - position).max(0);
            metrics::gauge!(PROJECTOR_LAG_EVENTS, "projector" => name.clone()).set(behind as f64);
            metrics::gauge!(PROJECTOR_LAG_SECONDS, "projector" => name).set(seconds.max(0.0));
        }
    }
}

/// The middleware around every route: opens the request's span (request id, trace id),
/// keeps its [`Scope`] for the handler, and counts and times it when its response body
/// ends (or is dropped, when the client leaves mid-stream).
pub async fn observe(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = req.extensions().get::<MatchedPath>().cloned();
    let request_id = req
        .extensions()
        .get::<RequestId>()
        .map_or_else(schemas::new_id, |r| r.0);
    let trace_id = crate::trace::from_headers(req.headers())
        .unwrap_or_else(|| crate::trace::from_request_id(request_id));
    let span = tracing::info_span!("request", request_id = %request_id, trace_id = %trace_id);
    let scope = Arc::new(Scope {
        trace_id,
        model: OnceLock::new(),
    });
    let response = SCOPE
        .scope(scope.clone(), next.run(req))
        .instrument(span.clone())
        .await;
    let (parts, body) = response.into_parts();
    let record = Record {
        started,
        route,
        status: parts.status.as_u16(),
        scope,
        span: span.clone(),
    };
    let body = Observed {
        inner: body,
        span,
        record: Some(record),
    };
    Response::from_parts(parts, Body::new(body))
}

struct Record {
    started: Instant,
    /// `None` for a request no route matched (`unmatched`).
    route: Option<MatchedPath>,
    status: u16,
    scope: Arc<Scope>,
    span: tracing::Span,
}

impl Record {
    fn finish(self) {
        let elapsed = self.started.elapsed();
        let route = self.route.as_ref().map_or("unmatched", MatchedPath::as_str);
        let model = self.scope.model.get().map_or("none", String::as_str);
        // The access log line: debug, so the default `info` costs nothing per request.
        self.span.in_scope(|| {
            tracing::debug!(route = %route, model = %model, status = self.status, duration_ms = elapsed.as_millis() as u64, "request finished");
        });
        let series = http_series(route, model);
        series.requests(self.status).increment(1);
        series.duration.record(elapsed.as_secs_f64());
    }
}

/// The HTTP series of one `(route, model)` label pair, resolved once: a request records
/// without building label strings or looking its series up in the registry. Label sets
/// are bounded like the series themselves (route patterns, models the directory knows).
struct HttpSeries {
    route: String,
    model: String,
    duration: metrics::Histogram,
    by_status: RwLock<Vec<(u16, metrics::Counter)>>,
}

impl HttpSeries {
    fn requests(&self, status: u16) -> metrics::Counter {
        {
            let by = self
                .by_status
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some((_, counter)) = by.iter().find(|(s, _)| *s == status) {
                return counter.clone();
            }
        }
        let mut by = self
            .by_status
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some((_, counter)) = by.iter().find(|(s, _)| *s == status) {
            return counter.clone();
        }
        let counter = metrics::counter!(HTTP_REQUESTS, "route" => self.route.clone(), "model" => self.model.clone(), "status" => status.to_string());
        by.push((status, counter.clone()));
        counter
    }
}

type SeriesByRoute = HashMap<String, HashMap<String, Arc<HttpSeries>>>;

/// Handles are resolved by the recorder [`install`] put in place at the process's start.
static HTTP_SERIES: LazyLock<RwLock<SeriesByRoute>> = LazyLock::new(Default::default);

fn http_series(route: &str, model: &str) -> Arc<HttpSeries> {
    {
        let by = HTTP_SERIES.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(series) = by.get(route).and_then(|m| m.get(model)) {
            return series.clone();
        }
    }
    let mut by = HTTP_SERIES.write().unwrap_or_else(PoisonError::into_inner);
    by.entry(route.to_owned())
        .or_default()
        .entry(model.to_owned())
        .or_insert_with(|| {
            Arc::new(HttpSeries {
                route: route.to_owned(),
                model: model.to_owned(),
                duration: metrics::histogram!(HTTP_DURATION, "route" => route.to_owned(), "model" => model.to_owned()),
                by_status: RwLock::new(Vec::new()),
            })
        })
        .clone()
}

/// A response body that records its request when it ends, and polls the inner body
/// inside the request's span (so a stream's log lines carry the trace id too).
struct Observed {
    inner: Body,
    span: tracing::Span,
    record: Option<Record>,
}

impl http_body::Body for Observed {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        let polled = {
            let _entered = this.span.enter();
            Pin::new(&mut this.inner).poll_frame(cx)
        };
        if let Poll::Ready(None) = polled {
            if let Some(record) = this.record.take() {
                record.finish();
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        // A body hyper never polled to its end: an empty body hyper skips, or a client
        // that left mid-stream. Either way the request is over.
        if let Some(record) = self.record.take() {
            record.finish();
        }
    }
}
