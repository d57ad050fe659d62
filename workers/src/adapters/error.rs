//! Upstream failures in one shape for every provider, classified into
//! [`schemas::work::ErrorKind`] so the handler decides failover without knowing the provider.

use schemas::work::ErrorKind;

/// How much of a non-JSON upstream error body is kept in the message.
const MAX_RAW_MESSAGE: usize = 512;

/// One failed call to an upstream. Keeps the provider's own status, message, code and
/// param so a caller's mistake (a 400) reaches the client as the provider worded it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{provider}: {}{message}", status.map(|s| format!("HTTP {s}: ")).unwrap_or_default())]
pub struct UpstreamError {
    /// The adapter's `PROVIDER_TYPE`, for logs and messages.
    pub provider: &'static str,
    pub kind: ErrorKind,
    /// The HTTP status the upstream answered with; `None` when no answer came
    /// (connection refused, timeout, a stream cut mid-way).
    pub status: Option<u16>,
    pub message: String,
    pub code: Option<String>,
    pub param: Option<String>,
    /// Seconds the upstream asked us to wait (`Retry-After`).
    pub retry_after: Option<u64>,
}

impl UpstreamError {
    pub fn new(provider: &'static str, kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            provider,
            kind,
            status: None,
            message: message.into(),
            code: None,
            param: None,
            retry_after: None,
        }
    }

    /// A request the channel's protocol cannot express: the caller's mistake (400).
    pub fn translation(provider: &'static str, e: crate::translate::TranslateError) -> Self {
        Self {
            provider,
            kind: ErrorKind::BadRequest,
            status: Some(400),
            message: e.message,
            code: Some("unsupported_by_channel".to_owned()),
            param: e.param,
            retry_after: None,
        }
    }

    /// A transport failure: connect errors are [`ErrorKind::Connection`], timeouts
    /// [`ErrorKind::Timeout`], anything else on the wire (a cut body) a connection error
    /// too. The URL is left out of the message: some providers put keys in query strings.
    /// An SSE stream that broke: transport errors keep their reqwest kind, anything else
    /// (invalid UTF-8, bad framing) is the upstream's fault.
    pub fn from_event_stream(
        provider: &'static str,
        e: eventsource_stream::EventStreamError<reqwest::Error>,
    ) -> Self {
        match e {
            eventsource_stream::EventStreamError::Transport(e) => Self::from_reqwest(provider, e),
            other => Self::new(
                provider,
                ErrorKind::Upstream5xx,
                format!("invalid event stream: {other}"),
            ),
        }
    }

    pub fn from_reqwest(provider: &'static str, e: reqwest::Error) -> Self {
        let kind = if e.is_timeout() {
            ErrorKind::Timeout
        } else {
            ErrorKind::Connection
        };
        let message = if e.is_connect() {
            format!("cannot connect to the upstream: {}", e.without_url())
        } else {
            e.without_url().to_string()
        };
        Self::new(provider, kind, message)
    }

    /// An error answer: the status picks the kind, the body (OpenAI's
    /// `{"error":{"message","type","param","code"}}`, or whatever else a compatible
    /// provider sends) gives the message.
    pub fn from_status(
        provider: &'static str,
        status: u16,
        retry_after: Option<u64>,
        body: &[u8],
    ) -> Self {
        let (message, code, param) = parse_error_body(body);
        let message = message.unwrap_or_else(|| format!("the upstream answered HTTP {status}"));
        let kind = match status {
            401 | 403 => ErrorKind::Auth,
            429 => ErrorKind::RateLimited,
            408 => ErrorKind::Timeout,
            400 if is_context_too_long(code.as_deref(), &message) => ErrorKind::ContextTooLong,
            400..=499 => ErrorKind::BadRequest,
            503 | 529 => ErrorKind::Overloaded,
            _ => ErrorKind::Upstream5xx,
        };
        Self {
            provider,
            kind,
            status: Some(status),
            message,
            code,
            param,
            retry_after,
        }
    }
}

fn is_context_too_long(code: Option<&str>, message: &str) -> bool {
    code == Some("context_length_exceeded")
        || message.contains("maximum context length")
        // Anthropic: "prompt is too long: 208000 tokens > 200000 maximum".
        || message.contains("prompt is too long")
}

/// `(message, code, param)` from an error body, tolerant of the shapes compatible
/// providers use: `{"error":{...}}`, `{"error":"text"}`, `{"message":"text"}`, or text.
fn parse_error_body(body: &[u8]) -> (Option<String>, Option<String>, Option<String>) {
    let text_of = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Null => None,
        other => Some(other.to_string()),
    };
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        let err = v.get("error").unwrap_or(&v);
        if let Some(s) = err.as_str() {
            return (Some(s.to_owned()), None, None);
        }
        let message = err
            .get("message")
            .or_else(|| err.get("detail"))
            .and_then(text_of);
        if message.is_some() {
            return (
                message,
                err.get("code").and_then(text_of),
                err.get("param").and_then(text_of),
            );
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return (None, None, None);
    }
    let cut = text
        .char_indices()
        .nth(MAX_RAW_MESSAGE)
        .map_or(text.len(), |(i, _)| i);
    (Some(text[..cut].to_owned()), None, None)
}

/// `Retry-After` in whole seconds (rounded up), from `retry-after-ms` or `retry-after`.
/// An HTTP-date value is ignored: no provider we speak to sends one.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<u64> {
    let number = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|n| n.is_finite() && *n >= 0.0)
    };
    if let Some(ms) = number("retry-after-ms") {
        return Some((ms / 1000.0).ceil() as u64);
    }
    number("retry-after").map(|s| s.ceil() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify(status: u16, body: &str) -> UpstreamError {
        UpstreamError::from_status("openai", status, None, body.as_bytes())
    }

    #[test]
    fn statuses_map_to_kinds() {
        let cases = [
            (401, ErrorKind::Auth),
            (403, ErrorKind::Auth),
            (429, ErrorKind::RateLimited),
            (400, ErrorKind::BadRequest),
            (404, ErrorKind::BadRequest),
            (408, ErrorKind::Timeout),
            (422, ErrorKind::BadRequest),
            (500, ErrorKind::Upstream5xx),
            (502, ErrorKind::Upstream5xx),
            (503, ErrorKind::Overloaded),
            (529, ErrorKind::Overloaded),
        ];
        for (status, kind) in cases {
            let e = classify(status, "");
            assert_eq!((e.kind, e.status), (kind, Some(status)), "{status}");
        }
    }

    #[test]
    fn openai_error_body_is_kept() {
        let e = classify(
            400,
            r#"{"error":{"message":"This model's maximum context length is 8192 tokens.","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#,
        );
        assert_eq!(e.kind, ErrorKind::ContextTooLong);
        assert_eq!(e.code.as_deref(), Some("context_length_exceeded"));
        assert_eq!(e.param.as_deref(), Some("messages"));
        assert!(e.message.starts_with("This model's maximum context length"));
        let e = classify(
            400,
            r#"{"error":{"message":"bad temperature","type":"invalid_request_error","param":null,"code":null}}"#,
        );
        assert_eq!(
            (e.kind, e.message.as_str(), e.code),
            (ErrorKind::BadRequest, "bad temperature", None)
        );
    }

    #[test]
    fn other_bodies_still_give_a_message() {
        assert_eq!(classify(500, r#"{"error":"boom"}"#).message, "boom");
        assert_eq!(classify(500, r#"{"message":"down"}"#).message, "down");
        assert_eq!(
            classify(502, "<html>bad gateway</html>").message,
            "<html>bad gateway</html>"
        );
        assert_eq!(classify(500, "").message, "the upstream answered HTTP 500");
        let long = "x".repeat(2000);
        assert_eq!(classify(500, &long).message.len(), MAX_RAW_MESSAGE);
    }

    #[test]
    fn retry_after_reads_seconds_and_millis() {
        let mut h = reqwest::header::HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(
            "retry-after",
            reqwest::header::HeaderValue::from_static("2"),
        );
        assert_eq!(retry_after(&h), Some(2));
        h.insert(
            "retry-after-ms",
            reqwest::header::HeaderValue::from_static("1500"),
        );
        assert_eq!(retry_after(&h), Some(2));
    }
}
