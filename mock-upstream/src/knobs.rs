//! Behaviour knobs of the mock provider.
//!
//! Tests steer the mock in two ways: server-wide defaults ([`MockConfig`], set at start, by
//! [`crate::MockUpstream::set_config`] or `POST /_mock/config`), and per request through an
//! extra `"mock": {...}` object in the request body ([`MockOverrides`]). The real providers
//! ignore unknown fields and the gateway passes them through, so a test talking to the gateway
//! can still choose how the upstream behind it misbehaves.

use serde::{Deserialize, Serialize};

/// Server-wide default knobs. Every field can be overridden per request by the same snake_case
/// name inside the request body's `"mock"` object. Missing fields in JSON take the defaults, so
/// `POST /_mock/config {"chunks": 5}` means "defaults, except 5 chunks".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MockConfig {
    /// Number of content chunks in a stream; the non-stream answer carries the same text.
    pub chunks: u32,
    /// Delay between two stream chunks, in milliseconds.
    pub chunk_delay_ms: u64,
    /// Delay before the first chunk (or before a non-stream response), in milliseconds.
    pub ttft_ms: u64,
    /// Answer every chat request with this status and the provider's error body.
    pub fail_status: Option<u16>,
    /// In a stream, cut the connection after this many content chunks: the body ends with an
    /// error, without `finish_reason` or `[DONE]`. At or past `chunks` the cut comes right after
    /// the last content chunk. Ignored by non-stream requests.
    pub disconnect_after: Option<u32>,
    /// Whether the provider reports usage at all (false simulates providers that never do).
    pub usage: bool,
    /// Accept the request and never answer, until the client goes away (timeout tests).
    pub hang: bool,
    /// When set, chat requests need `Authorization: Bearer <key>` (else 401).
    pub require_key: Option<String>,
    /// In a stream, send this many content chunks (after the role chunk) and then go silent
    /// without closing the connection, until the client goes away (idle and first-token
    /// timeout tests; `0` stalls before any content). Ignored by non-stream requests, so a
    /// retry without streaming gets the whole answer. OpenAI surface only.
    pub stall_after: Option<u32>,
    /// With `fail_status`: only the first this many chat requests this server receives (since
    /// start or the last reset) fail; later ones answer normally (retry tests). Unset: every
    /// request fails.
    pub fail_times: Option<u32>,
    /// The `Retry-After` header (seconds) of a `fail_status` of 429 or 503 on the OpenAI
    /// surface. Unset: `1` on a 429, none on a 503, as the real provider does.
    pub retry_after_secs: Option<u64>,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            chunks: 20,
            chunk_delay_ms: 0,
            ttft_ms: 0,
            fail_status: None,
            disconnect_after: None,
            usage: true,
            hang: false,
            require_key: None,
            stall_after: None,
            fail_times: None,
            retry_after_secs: None,
        }
    }
}

/// Per-request overrides, read from the request body's `"mock"` object. A field that is absent
/// (or `null`) keeps the server-wide value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MockOverrides {
    pub chunks: Option<u32>,
    pub chunk_delay_ms: Option<u64>,
    pub ttft_ms: Option<u64>,
    pub fail_status: Option<u16>,
    pub disconnect_after: Option<u32>,
    pub usage: Option<bool>,
    pub hang: Option<bool>,
    pub require_key: Option<String>,
    pub stall_after: Option<u32>,
    pub fail_times: Option<u32>,
    pub retry_after_secs: Option<u64>,
}

/// The knobs that apply to one request once overrides are merged. `Copy` and free of heap data
/// so the hot path never clones a `String` (the key check borrows instead).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Knobs {
    pub chunks: u32,
    pub chunk_delay_ms: u64,
    pub ttft_ms: u64,
    pub fail_status: Option<u16>,
    pub disconnect_after: Option<u32>,
    pub usage: bool,
    pub hang: bool,
    pub stall_after: Option<u32>,
    pub fail_times: Option<u32>,
    pub retry_after_secs: Option<u64>,
}

impl MockConfig {
    /// The server-wide knobs merged with a request's overrides (if any).
    pub fn knobs(&self, o: Option<&MockOverrides>) -> Knobs {
        let base = Knobs {
            chunks: self.chunks,
            chunk_delay_ms: self.chunk_delay_ms,
            ttft_ms: self.ttft_ms,
            fail_status: self.fail_status,
            disconnect_after: self.disconnect_after,
            usage: self.usage,
            hang: self.hang,
            stall_after: self.stall_after,
            fail_times: self.fail_times,
            retry_after_secs: self.retry_after_secs,
        };
        let Some(o) = o else { return base };
        Knobs {
            chunks: o.chunks.unwrap_or(base.chunks),
            chunk_delay_ms: o.chunk_delay_ms.unwrap_or(base.chunk_delay_ms),
            ttft_ms: o.ttft_ms.unwrap_or(base.ttft_ms),
            fail_status: o.fail_status.or(base.fail_status),
            disconnect_after: o.disconnect_after.or(base.disconnect_after),
            usage: o.usage.unwrap_or(base.usage),
            hang: o.hang.unwrap_or(base.hang),
            stall_after: o.stall_after.or(base.stall_after),
            fail_times: o.fail_times.or(base.fail_times),
            retry_after_secs: o.retry_after_secs.or(base.retry_after_secs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_json_takes_defaults() {
        let c: MockConfig = serde_json::from_str(r#"{"chunks":5}"#).expect("parse");
        assert_eq!(c.chunks, 5);
        assert!(c.usage);
        assert_eq!(c.fail_status, None);
    }

    #[test]
    fn overrides_win_over_config() {
        let c = MockConfig {
            fail_status: Some(500),
            ..MockConfig::default()
        };
        let o: MockOverrides =
            serde_json::from_str(r#"{"chunks":3,"usage":false,"fail_status":null}"#)
                .expect("parse");
        let k = c.knobs(Some(&o));
        assert_eq!(k.chunks, 3);
        assert!(!k.usage);
        // `null` means "not overridden", so the server-wide failure stays.
        assert_eq!(k.fail_status, Some(500));
        assert_eq!(c.knobs(None).chunks, 20);
    }
}
