//! OpenAI's `chat.completion.chunk` event stream.
//!
//! Events are written straight into bytes from precomputed pieces (one allocation per event)
//! rather than through serde per chunk: the mock is the benchmark baseline.

use std::io;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, BytesMut};

use super::{pause, unix_now, Usage, FINGERPRINT};
use crate::knobs::Knobs;
use crate::stats::{StreamEnd, StreamGuard};
use crate::Shared;

/// What one stream will send.
pub(super) struct StreamPlan {
    pub(super) knobs: Knobs,
    pub(super) n: u32,
    pub(super) finish_reason: &'static str,
    /// `Some` when the client asked for usage and the provider reports it.
    pub(super) usage: Option<Usage>,
    /// `(call id, tool name)` of a tool call sent after the text.
    pub(super) tool: Option<(String, String)>,
}

/// Builds `chat.completion.chunk` events from a precomputed head (everything before
/// `"choices"`) and tail (`"usage":null` when usage was asked for, as OpenAI does).
pub(super) struct SseWriter {
    head: Vec<u8>,
    tail: &'static [u8],
}

impl SseWriter {
    pub(super) fn new(id: &str, model: &str, with_usage: bool) -> Self {
        let model = serde_json::to_string(model).unwrap_or_else(|_| "\"\"".into());
        let head = format!(
            "data: {{\"id\":\"{id}\",\"object\":\"chat.completion.chunk\",\"created\":{},\"model\":{model},\"service_tier\":\"default\",\"system_fingerprint\":\"{FINGERPRINT}\",\"choices\":",
            unix_now()
        );
        let tail: &[u8] = if with_usage {
            b",\"usage\":null}\n\n"
        } else {
            b"}\n\n"
        };
        Self {
            head: head.into_bytes(),
            tail,
        }
    }

    fn event(&self, parts: &[&[u8]]) -> Bytes {
        let len = self.head.len() + self.tail.len() + parts.iter().map(|p| p.len()).sum::<usize>();
        let mut buf = BytesMut::with_capacity(len);
        buf.put_slice(&self.head);
        for p in parts {
            buf.put_slice(p);
        }
        buf.put_slice(self.tail);
        buf.freeze()
    }

    fn role(&self) -> Bytes {
        self.event(&[br#"[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]"#])
    }

    fn content(&self, i: u32) -> Bytes {
        let mut num = [0u8; 10];
        let digits = format_u32(i, &mut num);
        self.event(&[
            br#"[{"index":0,"delta":{"content":"tok"#,
            digits,
            br#" "},"logprobs":null,"finish_reason":null}]"#,
        ])
    }

    fn finish(&self, reason: &str) -> Bytes {
        self.event(&[
            br#"[{"index":0,"delta":{},"logprobs":null,"finish_reason":""#,
            reason.as_bytes(),
            br#""}]"#,
        ])
    }

    /// The tool call's first delta (id, name) and then its arguments in two pieces.
    fn tool_call(&self, id: &str, name: &str) -> [Bytes; 3] {
        let head = serde_json::json!([{"index":0,"delta":{"tool_calls":[{"index":0,"id":id,"type":"function",
            "function":{"name":name,"arguments":""}}]},"logprobs":null,"finish_reason":null}]);
        let (a, b) = super::TOOL_ARGUMENTS.split_at(super::TOOL_ARGUMENTS.len() / 2);
        let args = |s: &str| {
            let v = serde_json::json!([{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":s}}]},
                "logprobs":null,"finish_reason":null}]);
            self.event(&[v.to_string().as_bytes()])
        };
        [self.event(&[head.to_string().as_bytes()]), args(a), args(b)]
    }

    fn usage(&self, usage: &Usage) -> Bytes {
        let json = serde_json::to_vec(usage).unwrap_or_default();
        let mut buf = BytesMut::with_capacity(self.head.len() + json.len() + 16);
        buf.put_slice(&self.head);
        buf.put_slice(b"[],\"usage\":");
        buf.put_slice(&json);
        buf.put_slice(b"}\n\n");
        buf.freeze()
    }
}

/// Decimal digits of `v` without a heap allocation.
fn format_u32(mut v: u32, buf: &mut [u8; 10]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            return &buf[i..];
        }
    }
}

fn cut() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "mock upstream cut the stream",
    )
}

pub(super) fn stream_response(shared: &Arc<Shared>, w: SseWriter, plan: StreamPlan) -> Response {
    // Created here, not inside the stream, so a body dropped before its first poll still counts.
    let mut guard = StreamGuard::new(shared.counters.clone());
    let shutdown = shared.shutdown.clone();
    let StreamPlan {
        knobs,
        n,
        finish_reason,
        usage,
        tool,
    } = plan;
    let body = async_stream::stream! {
        if !pause(&shutdown, knobs.ttft_ms).await {
            guard.finish(StreamEnd::Disconnected);
            yield Err(cut());
            return;
        }
        yield Ok(w.role());
        for i in 0..n {
            if knobs.disconnect_after == Some(i) {
                break;
            }
            if knobs.stall_after == Some(i) {
                // Silent, connection open, until the client gives up (or shutdown).
                shutdown.cancelled().await;
                guard.finish(StreamEnd::Disconnected);
                yield Err(cut());
                return;
            }
            if i > 0 && !pause(&shutdown, knobs.chunk_delay_ms).await {
                guard.finish(StreamEnd::Disconnected);
                yield Err(cut());
                return;
            }
            yield Ok(w.content(i));
        }
        if knobs.stall_after.is_some_and(|s| s >= n) && knobs.disconnect_after.is_none() {
            shutdown.cancelled().await;
            guard.finish(StreamEnd::Disconnected);
            yield Err(cut());
            return;
        }
        if knobs.disconnect_after.is_some() {
            // Let the server flush what was sent, then end the body with an error: the
            // client sees a connection cut mid-stream, without `finish_reason` or `[DONE]`.
            guard.finish(StreamEnd::Disconnected);
            tokio::task::yield_now().await;
            yield Err(cut());
            return;
        }
        if let Some((id, name)) = &tool {
            for event in w.tool_call(id, name) {
                yield Ok(event);
            }
        }
        yield Ok(w.finish(finish_reason));
        if let Some(u) = &usage {
            yield Ok(w.usage(u));
        }
        guard.finish(StreamEnd::Completed);
        yield Ok(Bytes::from_static(b"data: [DONE]\n\n"));
    };
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream; charset=utf-8"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits() {
        let mut b = [0u8; 10];
        assert_eq!(format_u32(0, &mut b), b"0");
        assert_eq!(format_u32(4_294_967_295, &mut b), b"4294967295");
        assert_eq!(format_u32(120, &mut b), b"120");
    }
}
