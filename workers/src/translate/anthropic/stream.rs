//! Streams between Anthropic's event sequence and OpenAI's `chat.completion.chunk`s.
//!
//! [`ToChunks`] reads an Anthropic upstream for an OpenAI client: text deltas become
//! `content`, thinking deltas `reasoning_content`, `tool_use` blocks `tool_calls` (numbered
//! in the order they start), `message_delta` the finish chunk plus the usage chunk.
//! [`ToEvents`] writes Anthropic events for an Anthropic client from OpenAI chunks, opening
//! and closing one content block per kind of delta; its closing events wait for the end of
//! the stream because `message_delta` carries the usage, which OpenAI sends last.

use schemas::anthropic::{finish_reason_of, stop_reason_of};
use schemas::Usage;
use serde_json::{json, Value};

/// Anthropic events → OpenAI chunks.
#[derive(Debug, Default)]
pub struct ToChunks {
    id: String,
    model: String,
    created: u64,
    /// Usage from `message_start` (input side), completed by `message_delta`.
    usage: Option<Value>,
    /// OpenAI tool-call index of each Anthropic content block index that is a `tool_use`.
    tools: Vec<(u64, usize)>,
}

impl ToChunks {
    fn chunk(&self, delta: Value, finish: Option<&str>) -> Value {
        json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
               "model": self.model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    }

    /// The chunks one Anthropic event becomes (often none).
    pub fn event(&mut self, event: &Value) -> Vec<Value> {
        let index = event.get("index").and_then(Value::as_u64).unwrap_or(0);
        match event.get("type").and_then(Value::as_str) {
            Some("message_start") => {
                let m = &event["message"];
                self.id = m["id"].as_str().unwrap_or_default().to_owned();
                self.model = m["model"].as_str().unwrap_or_default().to_owned();
                self.created = u64::try_from(chrono::Utc::now().timestamp()).unwrap_or(0);
                self.usage = m.get("usage").cloned();
                vec![self.chunk(json!({"role":"assistant","content":""}), None)]
            }
            Some("content_block_start") => {
                let block = &event["content_block"];
                match block.get("type").and_then(Value::as_str) {
                    Some("tool_use") => {
                        let n = self.tools.len();
                        self.tools.push((index, n));
                        vec![self.chunk(
                            json!({"tool_calls":[{"index":n,"id":block["id"],"type":"function",
                            "function":{"name":block["name"],"arguments":""}}]}),
                            None,
                        )]
                    }
                    Some("text") => match block["text"].as_str() {
                        Some(t) if !t.is_empty() => vec![self.chunk(json!({"content": t}), None)],
                        _ => Vec::new(),
                    },
                    _ => Vec::new(),
                }
            }
            Some("content_block_delta") => {
                let d = &event["delta"];
                match d.get("type").and_then(Value::as_str) {
                    Some("text_delta") => vec![self.chunk(json!({"content": d["text"]}), None)],
                    Some("thinking_delta") => {
                        vec![self.chunk(json!({"reasoning_content": d["thinking"]}), None)]
                    }
                    Some("input_json_delta") => {
                        let part = d["partial_json"].as_str().unwrap_or_default();
                        let tool = self
                            .tools
                            .iter()
                            .find(|(i, _)| *i == index)
                            .map(|(_, n)| *n);
                        match tool {
                            Some(n) if !part.is_empty() => vec![self.chunk(
                                json!({"tool_calls":[{"index":n,"function":{"arguments":part}}]}),
                                None,
                            )],
                            _ => Vec::new(),
                        }
                    }
                    _ => Vec::new(),
                }
            }
            Some("message_delta") => {
                let mut out = Vec::new();
                if let Some(stop) = event.pointer("/delta/stop_reason").and_then(Value::as_str) {
                    out.push(self.chunk(json!({}), Some(finish_reason_of(stop))));
                }
                let mut usage = self.usage.take().unwrap_or_else(|| json!({}));
                if let (Some(u), Some(delta)) = (
                    usage.as_object_mut(),
                    event.get("usage").and_then(Value::as_object),
                ) {
                    // message_delta's counts are cumulative: they replace message_start's.
                    for (k, v) in delta {
                        if !v.is_null() {
                            u.insert(k.clone(), v.clone());
                        }
                    }
                }
                if let Some(u) = Usage::from_anthropic(&usage) {
                    let mut c = self.chunk(json!({}), None);
                    c["choices"] = json!([]);
                    c["usage"] = u.to_openai();
                    out.push(c);
                }
                out
            }
            _ => Vec::new(),
        }
    }
}

/// Which content block is open in [`ToEvents`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    None,
    Text,
    Thinking,
    /// A tool call, by its OpenAI index.
    Tool(u64),
}

/// OpenAI chunks → Anthropic events, as `(event name, data)` pairs.
#[derive(Debug)]
pub struct ToEvents {
    model: String,
    started: bool,
    open: Open,
    /// Anthropic index of the next block.
    next: u64,
    stop_reason: Option<&'static str>,
}

impl ToEvents {
    pub fn new(client_model: &str) -> Self {
        Self {
            model: client_model.to_owned(),
            started: false,
            open: Open::None,
            next: 0,
            stop_reason: None,
        }
    }

    fn start(&mut self, chunk: &Value, out: &mut Vec<Value>) {
        if self.started {
            return;
        }
        self.started = true;
        let id = chunk.get("id").and_then(Value::as_str).unwrap_or_default();
        out.push(json!({"type":"message_start","message":{
            "id": format!("msg_{}", id.trim_start_matches("chatcmpl-")), "type":"message","role":"assistant",
            "model": self.model, "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 0, "output_tokens": 0}}}));
    }

    fn close(&mut self, out: &mut Vec<Value>) {
        if self.open != Open::None {
            out.push(json!({"type":"content_block_stop","index": self.next - 1}));
            self.open = Open::None;
        }
    }

    fn open(&mut self, kind: Open, block: Value, out: &mut Vec<Value>) {
        if self.open == kind {
            return;
        }
        self.close(out);
        out.push(json!({"type":"content_block_start","index": self.next, "content_block": block}));
        self.next += 1;
        self.open = kind;
    }

    fn delta(&self, delta: Value) -> Value {
        json!({"type":"content_block_delta","index": self.next - 1, "delta": delta})
    }

    /// The events one chunk becomes. The usage chunk becomes none: usage is sent by
    /// [`ToEvents::finish`].
    pub fn chunk(&mut self, chunk: &Value) -> Vec<Value> {
        let mut out = Vec::new();
        self.start(chunk, &mut out);
        let choices = chunk.get("choices").and_then(Value::as_array);
        for choice in choices.into_iter().flatten() {
            let d = &choice["delta"];
            if let Some(t) = d
                .get("reasoning_content")
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
            {
                self.open(
                    Open::Thinking,
                    json!({"type":"thinking","thinking":"","signature":""}),
                    &mut out,
                );
                out.push(self.delta(json!({"type":"thinking_delta","thinking":t})));
            }
            if let Some(t) = d
                .get("content")
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
            {
                self.open(Open::Text, json!({"type":"text","text":""}), &mut out);
                out.push(self.delta(json!({"type":"text_delta","text":t})));
            }
            for call in d
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let n = call.get("index").and_then(Value::as_u64).unwrap_or(0);
                let f = &call["function"];
                if self.open != Open::Tool(n) {
                    let block =
                        json!({"type":"tool_use","id":call["id"],"name":f["name"],"input":{}});
                    self.open(Open::Tool(n), block, &mut out);
                }
                if let Some(args) = f
                    .get("arguments")
                    .and_then(Value::as_str)
                    .filter(|a| !a.is_empty())
                {
                    out.push(self.delta(json!({"type":"input_json_delta","partial_json":args})));
                }
            }
            if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
                self.stop_reason = Some(stop_reason_of(reason));
            }
        }
        out
    }

    /// The closing events: the open block's stop, `message_delta` with the stop reason and
    /// the final usage, `message_stop`.
    pub fn finish(&mut self, usage: &Usage) -> Vec<Value> {
        let mut out = Vec::new();
        self.start(&Value::Null, &mut out);
        self.close(&mut out);
        out.push(json!({"type":"message_delta",
            "delta":{"stop_reason": self.stop_reason.unwrap_or("end_turn"), "stop_sequence": null},
            "usage": usage.to_anthropic()}));
        out.push(json!({"type":"message_stop"}));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn types(events: &[Value]) -> Vec<String> {
        events
            .iter()
            .map(|e| {
                let t = e["type"].as_str().unwrap_or_default();
                match e["delta"]["type"].as_str() {
                    Some(d) => format!("{t}:{d}"),
                    None => t.to_owned(),
                }
            })
            .collect()
    }

    #[test]
    fn anthropic_events_become_chunks() {
        let mut d = ToChunks::default();
        let events = [
            json!({"type":"message_start","message":{"id":"msg_1","model":"claude","usage":{"input_tokens":10,"cache_read_input_tokens":5,"output_tokens":1}}}),
            json!({"type":"ping"}),
            json!({"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}),
            json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"hi"}}),
            json!({"type":"content_block_stop","index":0}),
            json!({"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"tu","name":"f","input":{}}}),
            json!({"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"a\":1}"}}),
            json!({"type":"message_delta","delta":{"stop_reason":"tool_use"},"usage":{"output_tokens":7}}),
        ];
        let chunks: Vec<Value> = events.iter().flat_map(|e| d.event(e)).collect();
        assert_eq!(chunks.len(), 6);
        assert_eq!(chunks[1]["choices"][0]["delta"]["content"], "hi");
        assert_eq!(
            chunks[2]["choices"][0]["delta"]["tool_calls"][0]["id"],
            "tu"
        );
        assert_eq!(
            chunks[3]["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"],
            "{\"a\":1}"
        );
        assert_eq!(chunks[4]["choices"][0]["finish_reason"], "tool_calls");
        let usage = Usage::from_openai(&chunks[5]["usage"]).expect("usage");
        assert_eq!(
            (
                usage.prompt_tokens,
                usage.cached_tokens,
                usage.completion_tokens
            ),
            (15, 5, 7)
        );
    }

    #[test]
    fn chunks_become_anthropic_events() {
        let mut e = ToEvents::new("claude-client");
        let c = |delta: Value, finish: Value| json!({"id":"chatcmpl-1","choices":[{"index":0,"delta":delta,"finish_reason":finish}]});
        let mut out = Vec::new();
        out.extend(e.chunk(&c(json!({"role":"assistant","content":""}), Value::Null)));
        out.extend(e.chunk(&c(json!({"content":"hi"}), Value::Null)));
        out.extend(e.chunk(&c(json!({"tool_calls":[{"index":0,"id":"call_1","function":{"name":"f","arguments":""}}]}), Value::Null)));
        out.extend(e.chunk(&c(
            json!({"tool_calls":[{"index":0,"function":{"arguments":"{}"}}]}),
            Value::Null,
        )));
        out.extend(e.chunk(&c(json!({}), json!("tool_calls"))));
        out.extend(e.finish(&Usage {
            prompt_tokens: 4,
            completion_tokens: 2,
            total_tokens: 6,
            ..Usage::default()
        }));
        assert_eq!(
            types(&out),
            [
                "message_start",
                "content_block_start",
                "content_block_delta:text_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta:input_json_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(out[0]["message"]["model"], "claude-client");
        assert_eq!(out[4]["content_block"]["id"], "call_1");
        assert_eq!(out[7]["delta"]["stop_reason"], "tool_use");
        assert_eq!(out[7]["usage"]["output_tokens"], 2);
    }
}
