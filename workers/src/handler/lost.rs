//! A redelivered request: the worker that had it died (or lost NATS for longer than the
//! ack wait). What the client already got decides what happens:
//!
//! - Nothing was published and nothing recorded: the request runs again, cleanly (the
//!   client never knew).
//! - Its last frames (with `Done` or `Error`) were published: it had ended; just ack.
//! - Part of the answer was published: a new attempt would generate a different answer,
//!   so it cannot continue without duplicating or contradicting what was shown. It ends
//!   with a `worker_lost` error frame numbered after the last one the client got (no
//!   duplicate chunk reaches it), and `RequestFailed` carries the usage of what was
//!   delivered: the prompt plus the text of the stored frames, counted by the tokenizer
//!   (`usage_source: estimated`).
//! - Its terminal event was already stored (the worker died between recording it and
//!   publishing the last frames): the outcome is decided and billed once already; the
//!   client gets the `worker_lost` error frame and no second terminal event is recorded.
//!
//! Either way one request has one terminal event, and the ledger's one-row-per-request
//! index would hold even if a race produced two.

use std::time::Duration;

use async_nats::jetstream::stream::DirectGetErrorKind;
use schemas::work::{ApiErrorInfo, ErrorKind, Frame, FrameKind};
use schemas::{Usage, UsageSource};
use serde_json::Value;

use super::outcome::error_info;
use super::{Disposition, Prior, Request};
use crate::estimate;

const TERMINAL: [&str; 3] = ["CompletionFinished", "RequestFailed", "RequestCancelled"];

/// At most this many stored batches are read back to count what was delivered; a longer
/// answer is counted up to there (an under-charge, never an over-charge).
const MAX_BATCHES: usize = 4096;

impl Request<'_> {
    /// Decides a redelivered request (see the module docs); `None` runs it normally.
    pub(super) async fn redelivered(&mut self) -> Option<Disposition> {
        let prior = match self.prior_frames().await {
            Ok(prior) => prior,
            Err(e) => {
                tracing::warn!(request_id = %self.item.request_id, error = %e, "cannot read a redelivered request's frames; retrying later");
                return Some(Disposition::Nak(Some(Duration::from_secs(1))));
            }
        };
        if matches!(prior, Prior::Ended) {
            return Some(Disposition::Ack);
        }
        let recorded = match self.recorded_end().await {
            Ok(recorded) => recorded,
            Err(e) => {
                tracing::warn!(request_id = %self.item.request_id, error = %e, "cannot read a redelivered request's events; retrying later");
                return Some(Disposition::Nak(Some(Duration::from_secs(1))));
            }
        };
        match (prior, recorded) {
            (Prior::Nothing, None) => None,
            (Prior::Nothing, Some(_)) => {
                self.lost_after_recording().await;
                Some(Disposition::Ack)
            }
            (Prior::Started { last_seq }, recorded) => {
                self.frames.continue_after(last_seq);
                match recorded {
                    Some(_) => self.lost_after_recording().await,
                    None => self.worker_lost().await,
                }
                Some(Disposition::Ack)
            }
            (Prior::Ended, _) => Some(Disposition::Ack),
        }
    }

    /// The type of the request's terminal event, if one was stored: the last event on the
    /// request's subject of `<NS>_EVENTS`.
    async fn recorded_end(&self) -> Result<Option<String>, String> {
        let stream = self
            .ctx
            .js
            .get_stream_no_info(self.ctx.ns.events_stream())
            .await
            .map_err(|e| e.to_string())?;
        let subject = self
            .ctx
            .ns
            .event_subject(&schemas::events::request_stream(&self.item.request_id));
        match stream.direct_get_last_for_subject(subject).await {
            Ok(msg) => {
                let kind = serde_json::from_slice::<Value>(&msg.payload)
                    .ok()
                    .and_then(|v| v.get("type").and_then(Value::as_str).map(str::to_owned));
                Ok(kind.filter(|k| TERMINAL.contains(&k.as_str())))
            }
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    fn lost_info() -> ApiErrorInfo {
        let message = "the worker serving this request stopped after the answer had started; the answer is incomplete, send the request again";
        let mut info = error_info(ErrorKind::WorkerLost, message);
        info.code = Some("worker_lost".to_owned());
        info
    }

    /// Part of the answer reached the client: end it, billing what was delivered.
    async fn worker_lost(&mut self) {
        let text = self.delivered_text().await;
        let usage = estimate::estimate(&self.item.model, &self.item.body, &text);
        let usage: Option<(Usage, UsageSource)> = Some((usage, UsageSource::Estimated));
        self.fail(Self::lost_info(), None, usage).await;
    }

    /// The outcome is recorded (and billed) already; only the client's stream is ended.
    async fn lost_after_recording(&mut self) {
        tracing::warn!(request_id = %self.item.request_id, "the worker died after recording the request's end; ending the client's stream");
        self.send_last(FrameKind::Error, &Self::lost_info()).await;
    }

    /// The generated text of the frames stored for this request, in order.
    async fn delivered_text(&self) -> String {
        let mut text = String::new();
        let mut next = 1;
        for _ in 0..MAX_BATCHES {
            let msg = match self
                .ctx
                .chunks
                .direct_get_next_for_subject(self.chunk_subject.as_str(), Some(next))
                .await
            {
                Ok(msg) => msg,
                Err(e) => {
                    if e.kind() != DirectGetErrorKind::NotFound {
                        tracing::warn!(request_id = %self.item.request_id, error = %e, "cannot read back a lost request's frames; billing what was read");
                    }
                    break;
                }
            };
            next = msg.sequence + 1;
            if let Ok(frames) = serde_json::from_slice::<Vec<Frame>>(&msg.payload) {
                for frame in frames {
                    if let Ok(data) = serde_json::from_str::<Value>(frame.data.get()) {
                        collect_deltas(&data, false, &mut text);
                    }
                }
            }
        }
        text
    }
}

/// Appends the generated text of one chunk in any of the client APIs: the strings inside a
/// `delta` (OpenAI `choices[].delta.content`, tool-call arguments, Anthropic
/// `delta.text` / `partial_json` / `thinking`, the Responses API's `delta` string), minus
/// the bookkeeping fields. Summaries that repeat the text (`*.done` events) carry no delta.
fn collect_deltas(v: &Value, in_delta: bool, out: &mut String) {
    match v {
        Value::String(s) if in_delta => out.push_str(s),
        Value::Array(items) => {
            for item in items {
                collect_deltas(item, in_delta, out);
            }
        }
        Value::Object(map) => {
            for (key, value) in map {
                match key.as_str() {
                    "role" | "type" | "id" | "index" | "stop_reason" | "finish_reason"
                    | "stop_sequence" | "signature" => {}
                    "delta" => collect_deltas(value, true, out),
                    _ => collect_deltas(value, in_delta, out),
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn text_of(chunks: &[Value]) -> String {
        let mut out = String::new();
        for c in chunks {
            collect_deltas(c, false, &mut out);
        }
        out
    }

    #[test]
    fn delivered_text_in_every_api() {
        let openai = [
            json!({"id": "c1", "object": "chat.completion.chunk", "model": "m",
                   "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
            json!({"choices": [{"index": 0, "delta": {"content": "Hello "}}]}),
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "t",
                   "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]}}]}),
            json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
        ];
        assert_eq!(text_of(&openai), "Hello f{\"a\":1}");
        let anthropic = [
            json!({"type": "message_start", "message": {"id": "msg", "role": "assistant", "content": []}}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}}),
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}}),
        ];
        assert_eq!(text_of(&anthropic), "Hi");
        let responses = [
            json!({"type": "response.output_text.delta", "delta": "one "}),
            json!({"type": "response.output_text.delta", "delta": "two"}),
            json!({"type": "response.output_text.done", "text": "one two"}),
        ];
        assert_eq!(text_of(&responses), "one two");
    }
}
