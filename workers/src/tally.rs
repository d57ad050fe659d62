//! What the worker does to each upstream chunk on its way to the client, and what it
//! learns from it: the model name is rewritten to the one the client asked for, the usage
//! chunk is kept only when the client asked for it, and usage, finish reason and the
//! generated text are noted for billing (the text only to estimate usage when the
//! provider reports none; it is never logged).

use schemas::Usage;
use serde_json::{Map, Value};
use tokio::time::Instant;

/// What one attempt's answer produced so far.
#[derive(Debug, Default)]
pub struct Tally {
    /// Usage as the provider reported it, if it did.
    pub usage: Option<Usage>,
    pub finish_reason: Option<String>,
    /// Generated text (content, refusals, reasoning, tool names and arguments), for the
    /// tokenizer's estimate.
    pub text: String,
    /// When the first non-empty piece of content arrived (time to first token).
    pub first_content_at: Option<Instant>,
    /// `id` and `created` of the stream's chunks, for a usage chunk the worker has to
    /// make itself when the provider reports no usage.
    pub chunk_id: Option<String>,
    pub created: Option<u64>,
    /// Usage a remote node already estimated for this attempt (it has the generated text,
    /// the worker does not); used when the provider reported none.
    pub estimated: Option<Usage>,
    /// Byte ranges of `text` that are answer content (not reasoning or tool calls), merged
    /// when adjacent: a session's answer is read from them, without a second copy of the
    /// text for the requests that belong to no session.
    pub(crate) content_spans: Vec<(usize, usize)>,
}

impl Tally {
    pub fn has_content(&self) -> bool {
        self.first_content_at.is_some()
    }

    fn note_text(&mut self, s: &str) {
        if s.is_empty() {
            return;
        }
        if self.first_content_at.is_none() {
            self.first_content_at = Some(Instant::now());
        }
        self.text.push_str(s);
    }

    /// Notes answer content generated elsewhere (a remote node's, for a session's turn).
    pub fn note_remote_content(&mut self, s: &str) {
        self.note_content(s);
    }

    /// The answer's content so far: the generated text without reasoning or tool calls.
    pub fn content(&self) -> String {
        let mut out = String::with_capacity(self.content_spans.iter().map(|(a, b)| b - a).sum());
        for &(start, end) in &self.content_spans {
            out.push_str(&self.text[start..end]);
        }
        out
    }

    fn note_content(&mut self, s: &str) {
        let start = self.text.len();
        self.note_text(s);
        let end = self.text.len();
        if end > start {
            match self.content_spans.last_mut() {
                Some(last) if last.1 == start => last.1 = end,
                _ => self.content_spans.push((start, end)),
            }
        }
    }

    fn note_message(&mut self, message: &Map<String, Value>) {
        if let Some(Value::String(s)) = message.get("content") {
            self.note_content(s);
        }
        for field in ["refusal", "reasoning_content"] {
            if let Some(Value::String(s)) = message.get(field) {
                self.note_text(s);
            }
        }
        if let Some(Value::Array(calls)) = message.get("tool_calls") {
            for call in calls {
                if let Some(f) = call.get("function") {
                    for field in ["name", "arguments"] {
                        if let Some(Value::String(s)) = f.get(field) {
                            self.note_text(s);
                        }
                    }
                }
            }
        }
    }

    fn note_choices(&mut self, choices: &[Value], message_field: &str) {
        for choice in choices {
            if let Some(Value::Object(m)) = choice.get(message_field) {
                self.note_message(m);
            }
            if let Some(Value::String(reason)) = choice.get("finish_reason") {
                self.finish_reason = Some(reason.clone());
            }
        }
    }

    fn note_usage(&mut self, obj: &Map<String, Value>) -> bool {
        match obj.get("usage") {
            Some(u) if !u.is_null() => {
                if let Some(usage) = Usage::from_openai(u) {
                    self.usage = Some(usage);
                }
                true
            }
            _ => false,
        }
    }
}

/// How chunks of one request are rewritten.
#[derive(Debug, Clone, Copy)]
pub struct Rewriter<'a> {
    /// The model name the client asked for; the upstream's name never reaches the client.
    pub client_model: &'a str,
    /// The client asked for `stream_options.include_usage`.
    pub include_usage: bool,
}

impl Rewriter<'_> {
    /// Rewrites a `chat.completion.chunk` in place and notes what it carries. Returns
    /// whether the chunk goes to the client: the usage-only chunk (`choices: []`) does only
    /// when the client asked for usage, and without that request the `usage` field is
    /// removed from every chunk, as OpenAI itself would not send it.
    pub fn chunk(&self, chunk: &mut Value, tally: &mut Tally) -> bool {
        let Value::Object(obj) = chunk else {
            return true;
        };
        if tally.chunk_id.is_none() {
            tally.chunk_id = obj.get("id").and_then(Value::as_str).map(str::to_owned);
            tally.created = obj.get("created").and_then(Value::as_u64);
        }
        let had_usage = tally.note_usage(obj);
        let no_choices = match obj.get("choices") {
            Some(Value::Array(choices)) => {
                tally.note_choices(choices, "delta");
                choices.is_empty()
            }
            _ => true,
        };
        if !self.include_usage {
            if had_usage && no_choices {
                return false;
            }
            obj.remove("usage");
        }
        self.set_model(obj);
        true
    }

    /// Rewrites a whole `chat.completion` body in place and notes what it carries.
    pub fn response(&self, body: &mut Value, tally: &mut Tally) {
        let Value::Object(obj) = body else {
            return;
        };
        tally.note_usage(obj);
        if let Some(Value::Array(choices)) = obj.get("choices") {
            tally.note_choices(choices, "message");
        }
        self.set_model(obj);
    }

    /// The usage-only chunk OpenAI ends a stream with, for a client that asked for usage
    /// from a provider that reported none: the usage is then the worker's estimate.
    pub fn usage_chunk(&self, tally: &Tally, usage: &Usage) -> Value {
        serde_json::json!({
            "id": tally.chunk_id.as_deref().unwrap_or_default(),
            "object": "chat.completion.chunk",
            "created": tally.created.unwrap_or_default(),
            "model": self.client_model,
            "choices": [],
            "usage": usage.to_openai(),
        })
    }

    fn set_model(&self, obj: &mut Map<String, Value>) {
        if let Some(model) = obj.get_mut("model") {
            *model = Value::String(self.client_model.to_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ASKED: Rewriter<'static> = Rewriter {
        client_model: "gpt-4o-mini",
        include_usage: true,
    };
    const NOT_ASKED: Rewriter<'static> = Rewriter {
        client_model: "gpt-4o-mini",
        include_usage: false,
    };

    fn chunk(delta: Value, finish: Value) -> Value {
        json!({"id":"c","object":"chat.completion.chunk","model":"gpt-4o-mini-2024-07-18",
               "choices":[{"index":0,"delta":delta,"finish_reason":finish}],"usage":null})
    }

    fn usage_chunk() -> Value {
        json!({"id":"c","object":"chat.completion.chunk","model":"up","choices":[],
               "usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}})
    }

    #[test]
    fn rewrites_model_and_tallies_content() {
        let mut t = Tally::default();
        let mut role = chunk(json!({"role":"assistant","content":""}), Value::Null);
        assert!(ASKED.chunk(&mut role, &mut t));
        assert!(!t.has_content(), "an empty role delta is not content");
        let mut c = chunk(json!({"content":"tok0 "}), Value::Null);
        assert!(ASKED.chunk(&mut c, &mut t));
        assert_eq!(c["model"], "gpt-4o-mini");
        assert_eq!(
            c["usage"],
            Value::Null,
            "kept when the client asked for usage"
        );
        let mut tool = chunk(
            json!({"tool_calls":[{"index":0,"function":{"name":"f","arguments":"{\"a\":1}"}}]}),
            json!("tool_calls"),
        );
        assert!(ASKED.chunk(&mut tool, &mut t));
        assert!(t.has_content());
        assert_eq!(t.text, "tok0 f{\"a\":1}");
        let mut more = chunk(json!({"content":"tok1 "}), Value::Null);
        assert!(ASKED.chunk(&mut more, &mut t));
        assert_eq!(t.content(), "tok0 tok1 ", "content without the tool call");
        assert_eq!(t.finish_reason.as_deref(), Some("tool_calls"));
    }

    #[test]
    fn usage_chunk_only_when_asked() {
        let mut t = Tally::default();
        let mut u = usage_chunk();
        assert!(ASKED.chunk(&mut u, &mut t));
        assert_eq!(u["model"], "gpt-4o-mini");
        assert_eq!(t.usage.map(|u| u.total_tokens), Some(7));

        let mut t = Tally::default();
        let mut u = usage_chunk();
        assert!(!NOT_ASKED.chunk(&mut u, &mut t));
        assert_eq!(t.usage.map(|u| u.prompt_tokens), Some(5), "still billed");
        let mut c = chunk(json!({"content":"x"}), Value::Null);
        assert!(NOT_ASKED.chunk(&mut c, &mut t));
        assert!(
            c.get("usage").is_none(),
            "usage field removed when not asked"
        );
    }

    #[test]
    fn response_is_rewritten_and_tallied() {
        let mut t = Tally::default();
        let mut body = json!({"id":"x","object":"chat.completion","model":"up",
            "choices":[{"index":0,"message":{"role":"assistant","content":"tok0 tok1 "},"finish_reason":"stop"}],
            "usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}});
        NOT_ASKED.response(&mut body, &mut t);
        assert_eq!(body["model"], "gpt-4o-mini");
        assert_eq!(t.text, "tok0 tok1 ");
        assert_eq!(t.finish_reason.as_deref(), Some("stop"));
        assert_eq!(t.usage.map(|u| u.completion_tokens), Some(2));
        // A non-stream body keeps its usage: OpenAI always sends it there.
        assert!(body.get("usage").is_some());
    }
}
