//! The worker's Prometheus series, recorded through the `metrics` facade (the process
//! installs the exporter; without one every call is a no-op). The worker is where the
//! channel is known, so its series carry `model` and `channel` labels; the ingress counts
//! HTTP requests by route, model and status.
//!
//! Each function is one call at its point in the handler, so the hot path stays readable.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, PoisonError, RwLock};

use router::{Attempt, ChannelSet};
use schemas::work::{ApiErrorInfo, ErrorKind};
use schemas::Usage;
use tokio::time::Instant;
use uuid::Uuid;

use crate::tally::Tally;

pub const REQUESTS: &str = "sluice_worker_requests_total";
pub const DURATION: &str = "sluice_request_duration_seconds";
pub const TTFT: &str = "sluice_time_to_first_token_seconds";
pub const TOKENS: &str = "sluice_tokens_total";
pub const UPSTREAM_ERRORS: &str = "sluice_upstream_errors_total";
pub const CHANNEL_BANS: &str = "sluice_channel_bans_total";
pub const IN_FLIGHT: &str = "sluice_worker_in_flight";
pub const QUEUE_WAIT: &str = "sluice_queue_wait_seconds";

/// HELP lines of the worker's series (call once, after the recorder is installed).
pub fn describe() {
    metrics::describe_counter!(
        REQUESTS,
        "Requests a worker ended, by model, channel (none before any attempt), outcome (finished, failed, cancelled) and status"
    );
    metrics::describe_histogram!(
        DURATION,
        metrics::Unit::Seconds,
        "From a worker taking a request to its answer's end, by model and channel"
    );
    metrics::describe_histogram!(
        TTFT,
        metrics::Unit::Seconds,
        "From a worker taking a request to the first generated content, by model and channel"
    );
    metrics::describe_counter!(
        TOKENS,
        "Tokens of finished requests, by model, channel and direction (in = prompt, out = completion)"
    );
    metrics::describe_counter!(
        UPSTREAM_ERRORS,
        "Failed upstream attempts, by channel and error kind"
    );
    metrics::describe_counter!(
        CHANNEL_BANS,
        "Circuit-breaker bans started, by channel and error kind"
    );
    metrics::describe_gauge!(IN_FLIGHT, "Requests this worker process is handling");
    metrics::describe_histogram!(
        QUEUE_WAIT,
        metrics::Unit::Seconds,
        "From the ingress accepting a request to a worker taking it, by model"
    );
}

/// The series a finished request records into, for one `(model, channel)` pair.
struct Finished {
    requests: metrics::Counter,
    duration: metrics::Histogram,
    ttft: metrics::Histogram,
    tokens_in: metrics::Counter,
    tokens_out: metrics::Counter,
}

/// Handles resolved once per label set, so a request records without building label
/// strings and looking its series up in the registry (five times) on every answer. The
/// label sets are bounded like the series themselves: models the ingress admitted, by
/// configured channel.
static FINISHED: LazyLock<HandleCache<Arc<Finished>>> = LazyLock::new(HandleCache::default);
static QUEUE_WAITS: LazyLock<HandleCache<metrics::Histogram>> = LazyLock::new(HandleCache::default);
static IN_FLIGHT_GAUGE: LazyLock<metrics::Gauge> = LazyLock::new(|| metrics::gauge!(IN_FLIGHT));

/// Handles by one or two label values, looked up without allocating.
///
/// Handles are resolved by the global recorder when first asked for: every role installs
/// it at start, before any request (see `ingress::metrics::install`).
struct HandleCache<T> {
    by: RwLock<HashMap<String, HashMap<String, T>>>,
}

impl<T> Default for HandleCache<T> {
    fn default() -> Self {
        Self {
            by: RwLock::new(HashMap::new()),
        }
    }
}

impl<T: Clone> HandleCache<T> {
    fn get(&self, first: &str, second: &str, make: impl FnOnce() -> T) -> T {
        {
            let by = self.by.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(found) = by.get(first).and_then(|m| m.get(second)) {
                return found.clone();
            }
        }
        let mut by = self.by.write().unwrap_or_else(PoisonError::into_inner);
        by.entry(first.to_owned())
            .or_default()
            .entry(second.to_owned())
            .or_insert_with(make)
            .clone()
    }
}

/// A request answered by `attempt`; times count from `taken_at`, when the worker took it.
/// Also its debug log line.
pub(crate) fn finished(
    model: &str,
    attempt: &Attempt,
    tally: &Tally,
    taken_at: Instant,
    usage: &Usage,
) {
    let ttft = tally.first_content_at.map(|t| t - taken_at);
    let duration = taken_at.elapsed();
    // Inside the request's span: the line carries its request and trace ids.
    tracing::debug!(channel = %attempt.channel.name, ttft_ms = ttft.map(|t| t.as_millis() as u64), duration_ms = duration.as_millis() as u64, prompt_tokens = usage.prompt_tokens, completion_tokens = usage.completion_tokens, "request finished");
    let channel = attempt.channel.name.as_str();
    let series = FINISHED.get(model, channel, || {
        let (model, channel) = (model.to_owned(), channel.to_owned());
        Arc::new(Finished {
            requests: metrics::counter!(REQUESTS, "model" => model.clone(), "channel" => channel.clone(), "outcome" => "finished", "status" => "200"),
            duration: metrics::histogram!(DURATION, "model" => model.clone(), "channel" => channel.clone()),
            ttft: metrics::histogram!(TTFT, "model" => model.clone(), "channel" => channel.clone()),
            tokens_in: metrics::counter!(TOKENS, "model" => model.clone(), "channel" => channel.clone(), "direction" => "in"),
            tokens_out: metrics::counter!(TOKENS, "model" => model, "channel" => channel, "direction" => "out"),
        })
    });
    series.requests.increment(1);
    series.duration.record(duration.as_secs_f64());
    if let Some(ttft) = ttft {
        series.ttft.record(ttft.as_secs_f64());
    }
    series.tokens_in.increment(usage.prompt_tokens);
    series.tokens_out.increment(usage.completion_tokens);
}

/// A request that ended with an error on `channel_id` (where it broke off), if any.
pub(crate) fn failed(
    model: &str,
    channels: &ChannelSet,
    channel_id: Option<Uuid>,
    info: &ApiErrorInfo,
) {
    // Failures are rare next to answers: finding the name here keeps call sites short.
    let channel = channel_id
        .and_then(|id| {
            let snapshot = channels.snapshot();
            let name = snapshot
                .channels()
                .iter()
                .find(|c| c.id == id)?
                .name
                .clone();
            Some(name)
        })
        .unwrap_or_else(|| "none".to_owned());
    metrics::counter!(REQUESTS, "model" => model.to_owned(), "channel" => channel, "outcome" => "failed", "status" => info.status.to_string()).increment(1);
}

/// A request cancelled by its client (status 499, as nginx counts a client gone).
pub(crate) fn cancelled(model: &str, served: Option<&Attempt>) {
    let channel = served.map_or_else(|| "none".to_owned(), |a| a.channel.name.clone());
    metrics::counter!(REQUESTS, "model" => model.to_owned(), "channel" => channel, "outcome" => "cancelled", "status" => "499").increment(1);
}

/// One failed upstream attempt.
pub(crate) fn upstream_error(channel: &str, kind: ErrorKind) {
    metrics::counter!(UPSTREAM_ERRORS, "channel" => channel.to_owned(), "kind" => kind_label(kind))
        .increment(1);
}

/// A ban this worker started on `channel`.
pub(crate) fn banned(channel: &str, kind: ErrorKind) {
    metrics::counter!(CHANNEL_BANS, "channel" => channel.to_owned(), "kind" => kind_label(kind))
        .increment(1);
}

/// How long a request waited in the queue.
pub(crate) fn queue_wait(model: &str, accepted_at: chrono::DateTime<chrono::Utc>) {
    let waited = (chrono::Utc::now() - accepted_at)
        .to_std()
        .unwrap_or_default();
    QUEUE_WAITS
        .get(
            model,
            "",
            || metrics::histogram!(QUEUE_WAIT, "model" => model.to_owned()),
        )
        .record(waited.as_secs_f64());
}

/// Counts a request in flight for as long as it lives.
pub(crate) struct InFlight(());

pub(crate) fn in_flight() -> InFlight {
    IN_FLIGHT_GAUGE.increment(1.0);
    InFlight(())
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT_GAUGE.decrement(1.0);
    }
}

/// The `kind` label: the same snake_case names events and errors use.
pub fn kind_label(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::RateLimited => "rate_limited",
        ErrorKind::Overloaded => "overloaded",
        ErrorKind::Auth => "auth",
        ErrorKind::BadRequest => "bad_request",
        ErrorKind::ContextTooLong => "context_too_long",
        ErrorKind::Upstream5xx => "upstream5xx",
        ErrorKind::Timeout => "timeout",
        ErrorKind::Connection => "connection",
        ErrorKind::NoChannel => "no_channel",
        ErrorKind::WorkerLost => "worker_lost",
        ErrorKind::Cancelled => "cancelled",
        ErrorKind::Internal => "internal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_labels_match_the_serde_names() {
        for kind in [
            ErrorKind::RateLimited,
            ErrorKind::Overloaded,
            ErrorKind::Auth,
            ErrorKind::BadRequest,
            ErrorKind::ContextTooLong,
            ErrorKind::Upstream5xx,
            ErrorKind::Timeout,
            ErrorKind::Connection,
            ErrorKind::NoChannel,
            ErrorKind::WorkerLost,
            ErrorKind::Cancelled,
            ErrorKind::Internal,
        ] {
            let serde = serde_json::to_value(kind).expect("serialize");
            assert_eq!(serde.as_str(), Some(kind_label(kind)), "{kind:?}");
        }
    }
}
