//! Anthropic client on an Anthropic channel: events and messages pass through as the
//! provider sent them (thinking and redacted-thinking blocks, signatures, tool_use ids and
//! inputs byte for byte), only the model name is set back to the client's. On the way they
//! are read for billing: usage from `message_start` + `message_delta`, the stop reason, and
//! the generated text for the tokenizer's estimate.

use schemas::anthropic::finish_reason_of;
use schemas::Usage;
use serde_json::{Map, Value};
use tokio::time::Instant;

use crate::tally::Tally;

/// Reads one native stream for billing.
#[derive(Debug, Default)]
pub struct Native {
    /// `message_start`'s usage, merged with `message_delta`'s cumulative counts.
    usage: Map<String, Value>,
}

fn note_text(tally: &mut Tally, s: &str) {
    if s.is_empty() {
        return;
    }
    tally.first_content_at.get_or_insert_with(Instant::now);
    tally.text.push_str(s);
}

impl Native {
    /// Notes what an event carries and rewrites `message_start`'s model.
    pub fn event(&mut self, event: &mut Value, client_model: &str, tally: &mut Tally) {
        match event.get("type").and_then(Value::as_str) {
            Some("message_start") => {
                if let Some(m) = event.get_mut("message") {
                    if let Some(Value::Object(u)) = m.get("usage") {
                        self.usage = u.clone();
                    }
                    if let Some(model) = m.get_mut("model") {
                        *model = Value::String(client_model.to_owned());
                    }
                }
            }
            Some("content_block_start") => {
                let b = &event["content_block"];
                if b["type"] == "tool_use" {
                    note_text(tally, b["name"].as_str().unwrap_or_default());
                }
            }
            Some("content_block_delta") => {
                let d = &event["delta"];
                for field in ["text", "thinking", "partial_json"] {
                    if let Some(s) = d.get(field).and_then(Value::as_str) {
                        note_text(tally, s);
                    }
                }
            }
            Some("message_delta") => {
                if let Some(stop) = event.pointer("/delta/stop_reason").and_then(Value::as_str) {
                    tally.finish_reason = Some(finish_reason_of(stop).to_owned());
                }
                if let Some(Value::Object(u)) = event.get("usage") {
                    for (k, v) in u {
                        if !v.is_null() {
                            self.usage.insert(k.clone(), v.clone());
                        }
                    }
                    tally.usage = Usage::from_anthropic(&Value::Object(self.usage.clone()));
                }
            }
            _ => {}
        }
    }
}

/// Notes what a whole native message carries and rewrites its model.
pub fn message(body: &mut Value, client_model: &str, tally: &mut Tally) {
    for b in body
        .get("content")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        for field in ["text", "thinking", "name"] {
            if let Some(s) = b.get(field).and_then(Value::as_str) {
                note_text(tally, s);
            }
        }
        if let Some(input) = b.get("input") {
            note_text(tally, &input.to_string());
        }
    }
    if let Some(stop) = body.get("stop_reason").and_then(Value::as_str) {
        tally.finish_reason = Some(finish_reason_of(stop).to_owned());
    }
    tally.usage = body.get("usage").and_then(Usage::from_anthropic);
    if let Some(model) = body.get_mut("model") {
        *model = Value::String(client_model.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn passes_events_through_and_tallies_them() {
        let mut n = Native::default();
        let mut t = Tally::default();
        let mut start = json!({"type":"message_start","message":{"model":"claude-up","usage":{"input_tokens":7,"cache_read_input_tokens":3,"output_tokens":1}}});
        n.event(&mut start, "claude", &mut t);
        assert_eq!(start["message"]["model"], "claude");
        let sig = json!({"type":"content_block_delta","index":0,"delta":{"type":"signature_delta","signature":"EqX"}});
        let mut same = sig.clone();
        n.event(&mut same, "claude", &mut t);
        assert_eq!(same, sig, "signatures pass untouched");
        let mut delta = json!({"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":9}});
        n.event(&mut delta, "claude", &mut t);
        let u = t.usage.expect("usage");
        assert_eq!(
            (u.prompt_tokens, u.cached_tokens, u.completion_tokens),
            (10, 3, 9)
        );
        assert_eq!(t.finish_reason.as_deref(), Some("stop"));
    }
}
