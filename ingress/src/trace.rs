//! One trace id per request, so a request can be followed through every process it
//! crosses: the ingress log, the NATS messages (`traceparent` header), the worker log, and
//! the metadata of its events in `event_log`.
//!
//! The id is the caller's W3C `traceparent` trace id when it sent a valid one (so Sluice
//! joins the caller's own trace), else the request id's 32 hex digits (a UUID v7 is a valid
//! W3C trace id). [`crate::metrics::observe`] decides it per HTTP request and keeps it in a
//! task-local [`Scope`] that the admission path reads; a request submitted outside an HTTP
//! request's task (a WebSocket frame) derives it from its own request id.

use std::sync::{Arc, OnceLock};

use axum::http::HeaderMap;
use uuid::Uuid;

/// What the middleware learns about a request while it is handled.
#[derive(Debug)]
pub struct Scope {
    pub trace_id: String,
    /// The model asked for, once admission has read it (for the `model` label).
    pub model: OnceLock<String>,
}

tokio::task_local! {
    pub(crate) static SCOPE: Arc<Scope>;
}

/// The trace id of a valid W3C `traceparent` header (`00-<32 hex>-<16 hex>-<2 hex>`).
pub fn from_headers(headers: &HeaderMap) -> Option<String> {
    parse_traceparent(headers.get("traceparent")?.to_str().ok()?)
}

pub fn parse_traceparent(value: &str) -> Option<String> {
    let mut parts = value.trim().split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let zero = |s: &str| s.bytes().all(|b| b == b'0');
    // Version 00 has exactly four fields; later versions may append more.
    let valid = hex(version, 2)
        && version != "ff"
        && (version != "00" || parts.next().is_none())
        && hex(trace, 32)
        && !zero(trace)
        && hex(parent, 16)
        && !zero(parent)
        && hex(flags, 2);
    valid.then(|| trace.to_owned())
}

/// The trace id of a request without a caller-provided one.
pub fn from_request_id(request_id: Uuid) -> String {
    request_id.simple().to_string()
}

/// The trace id of the request being handled: the HTTP request's (caller's or derived),
/// or else derived from `request_id`.
pub fn current(request_id: Uuid) -> String {
    SCOPE
        .try_with(|scope| scope.trace_id.clone())
        .unwrap_or_else(|_| from_request_id(request_id))
}

/// Notes the model of the request being handled, for the HTTP metrics' `model` label.
pub fn note_model(model: &str) {
    let _ = SCOPE.try_with(|scope| scope.model.set(model.to_owned()));
}

/// A `traceparent` header value carrying `trace_id` on to the next hop; the parent id is
/// taken from `span_of` (a request or event id), whose last 16 hex digits are random.
pub fn traceparent(trace_id: &str, span_of: Uuid) -> String {
    let span = span_of.simple().to_string();
    format!("00-{trace_id}-{}-01", &span[16..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_traceparents_only() {
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        assert_eq!(
            parse_traceparent(&format!("00-{trace}-00f067aa0ba902b7-01")).as_deref(),
            Some(trace)
        );
        // A future version may add fields.
        assert!(parse_traceparent(&format!("01-{trace}-00f067aa0ba902b7-01-extra")).is_some());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
    }

    #[test]
    fn derived_ids_are_valid_trace_ids_and_round_trip() {
        let id = schemas::new_id();
        let trace = from_request_id(id);
        let header = traceparent(&trace, schemas::new_id());
        assert_eq!(parse_traceparent(&header), Some(trace));
    }

    #[tokio::test]
    async fn the_scope_carries_the_trace_id_and_model() {
        let id = schemas::new_id();
        assert_eq!(current(id), from_request_id(id), "outside a request");
        let scope = Arc::new(Scope {
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            model: OnceLock::new(),
        });
        let seen = SCOPE
            .scope(scope.clone(), async move {
                note_model("gpt-x");
                current(id)
            })
            .await;
        assert_eq!(seen, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(scope.model.get().map(String::as_str), Some("gpt-x"));
    }
}
