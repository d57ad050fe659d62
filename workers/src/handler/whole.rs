//! The one non-streaming retry of a stream request.
//!
//! When a streaming attempt breaks before any content reached the client — no first token
//! within the channel's `timeouts.first_token_secs`, or the stream started and then died
//! (cut, error event, silence) before its first content — and the channel allows another
//! attempt (its `retry` is at least 2), that next attempt asks the same channel for the
//! whole answer without streaming. Some upstreams (and proxies in front of them) fail at
//! streaming while plain calls go through; a plain call is only bound by the channel's
//! `timeouts.total_secs`, not by the first-token limit. The answer then goes to the client
//! as a stream after all, in its API's format: the same chunks it would have received,
//! just all at once. This happens at most once per request; further retries stream again,
//! and an HTTP error status (429, 5xx) is not a broken stream (it gets the usual backoff).
//! Channels of remote nodes relay their streams themselves and are not retried this way.

use router::Attempt;
use schemas::work::{Api, ErrorKind};
use serde_json::{json, Value};

use super::attempt::{Answer, AttemptEnd};
use super::Request;
use crate::adapters::{Adapter, Reply, UpstreamError, UpstreamRequest};
use crate::tally::Tally;
use crate::translate::anthropic::response::message_to_completion;
use crate::translate::Outbound;

/// Content is cut into chunks of about this many bytes, so no frame batch grows past the
/// NATS payload limit however long the answer.
const PIECE: usize = 8 * 1024;

impl Request<'_> {
    /// Asks for the whole answer and relays it as the client's stream.
    pub(super) async fn whole_attempt(
        &mut self,
        adapter: &Adapter,
        attempt: &Attempt,
        req: UpstreamRequest<'_>,
        tally: &mut Tally,
    ) -> AttemptEnd {
        tracing::info!(request_id = %self.item.request_id, channel = %attempt.channel.name, "the stream broke before any content; retrying once without streaming");
        let limits = self.limits(&attempt.channel);
        let plain = UpstreamRequest {
            stream: false,
            ..req
        };
        let body = match self.call(adapter, attempt, plain, limits).await {
            Ok(Reply::Complete(body)) => body,
            Ok(Reply::Stream(_)) => {
                return AttemptEnd::Failed(UpstreamError::new(
                    adapter.provider(),
                    ErrorKind::Internal,
                    "the adapter answered a plain request with a stream",
                ))
            }
            Err(end) => return end,
        };
        // An Anthropic client on an Anthropic channel got Anthropic's own `message`; every
        // other answer is already the canonical `chat.completion`.
        let body = if adapter.speaks(self.item.api) && self.item.api == Api::Messages {
            message_to_completion(&body)
        } else {
            body
        };
        let rewriter = self.rewriter();
        let mut outbound = Outbound::new(self.item.api, false, &self.item.model);
        for chunk in completion_chunks(&body) {
            if let Err(e) = outbound.chunk(chunk, rewriter, tally, &mut self.frames) {
                return AttemptEnd::Lost(e);
            }
            if self.frames.full() {
                if let Err(e) = self.frames.flush().await {
                    return AttemptEnd::Lost(e);
                }
            }
        }
        AttemptEnd::Done(Answer::Whole(outbound))
    }
}

/// A `chat.completion` as the `chat.completion.chunk`s a stream of it would have had: per
/// choice the role with the first piece of content, the rest of the content, reasoning,
/// refusal and tool calls, then the finish reason; last the usage-only chunk when the
/// answer carries usage (the rewriter keeps it only for a client that asked for usage).
pub(crate) fn completion_chunks(body: &Value) -> Vec<Value> {
    let chunk = |choices: Value| {
        json!({
            "id": body.get("id").cloned().unwrap_or(Value::Null),
            "object": "chat.completion.chunk",
            "created": body.get("created").cloned().unwrap_or(Value::Null),
            "model": body.get("model").cloned().unwrap_or(Value::Null),
            "choices": choices,
        })
    };
    let delta = |index: &Value, delta: Value| {
        chunk(json!([{"index": index, "delta": delta, "logprobs": null, "finish_reason": null}]))
    };
    let mut out = Vec::new();
    for (i, choice) in body
        .get("choices")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let index = choice.get("index").cloned().unwrap_or_else(|| json!(i));
        let message = choice.get("message").unwrap_or(&Value::Null);
        let text = |field: &str| message.get(field).and_then(Value::as_str).unwrap_or("");
        let content = pieces(text("content"));
        let first = content.first().copied();
        let head = match first {
            Some(piece) => json!({"role": "assistant", "content": piece}),
            None if message.get("tool_calls").is_some() => {
                json!({"role": "assistant", "content": null})
            }
            None => json!({"role": "assistant", "content": ""}),
        };
        out.push(delta(&index, head));
        for piece in content.iter().skip(1) {
            out.push(delta(&index, json!({"content": piece})));
        }
        for field in ["reasoning_content", "refusal"] {
            for piece in pieces(text(field)) {
                out.push(delta(&index, json!({ field: piece })));
            }
        }
        if let Some(calls) = message.get("tool_calls").and_then(Value::as_array) {
            for (k, call) in calls.iter().enumerate() {
                let mut call = call.clone();
                if let Some(obj) = call.as_object_mut() {
                    obj.insert("index".to_owned(), json!(k));
                }
                out.push(delta(&index, json!({"tool_calls": [call]})));
            }
        }
        let finish = choice
            .get("finish_reason")
            .cloned()
            .filter(|f| !f.is_null())
            .unwrap_or_else(|| json!("stop"));
        out.push(chunk(
            json!([{"index": index, "delta": {}, "logprobs": null, "finish_reason": finish}]),
        ));
    }
    if let Some(usage) = body.get("usage").filter(|u| !u.is_null()) {
        let mut last = chunk(json!([]));
        last["usage"] = usage.clone();
        out.push(last);
    }
    out
}

/// `s` cut into pieces of about [`PIECE`] bytes at character boundaries (none when empty).
fn pieces(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let mut end = rest.len().min(PIECE);
        while !rest.is_char_boundary(end) {
            end += 1;
        }
        out.push(&rest[..end]);
        rest = &rest[end..];
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::tally::{Rewriter, Tally};

    #[test]
    fn a_completion_becomes_the_chunks_of_its_stream() {
        let body = json!({"id": "chatcmpl-1", "object": "chat.completion", "created": 7, "model": "up",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "tok0 tok1 ",
                "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                "finish_reason": "tool_calls"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}});
        let chunks = completion_chunks(&body);
        assert_eq!(chunks.len(), 4, "{chunks:#?}");
        assert!(chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == "chatcmpl-1"));
        assert_eq!(
            chunks[0]["choices"][0]["delta"],
            json!({"role": "assistant", "content": "tok0 tok1 "})
        );
        assert_eq!(
            chunks[1]["choices"][0]["delta"]["tool_calls"][0]["index"],
            0
        );
        assert_eq!(chunks[2]["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(chunks[3]["choices"], json!([]));

        // Tallied as the stream would have been: text, finish reason, provider usage; the
        // usage chunk reaches only a client that asked for it.
        let mut tally = Tally::default();
        let rewriter = Rewriter {
            client_model: "m",
            include_usage: false,
        };
        let sent: Vec<Value> = chunks
            .into_iter()
            .filter_map(|mut c| rewriter.chunk(&mut c, &mut tally).then_some(c))
            .collect();
        assert_eq!(sent.len(), 3);
        assert_eq!(tally.content(), "tok0 tok1 ");
        assert_eq!(tally.finish_reason.as_deref(), Some("tool_calls"));
        assert_eq!(tally.usage.map(|u| u.total_tokens), Some(5));
        assert!(sent.iter().all(|c| c["model"] == "m"));
    }

    #[test]
    fn long_content_is_cut_at_character_boundaries() {
        let text = "é".repeat(PIECE);
        let parts = pieces(&text);
        assert!(parts.len() >= 2);
        assert_eq!(parts.concat(), text);
        assert!(pieces("").is_empty());
        let body = json!({"choices": [{"message": {"content": text}, "finish_reason": null}]});
        let chunks = completion_chunks(&body);
        assert_eq!(chunks.len(), parts.len() + 1);
        assert_eq!(
            chunks.last().unwrap()["choices"][0]["finish_reason"],
            "stop"
        );
    }
}
