//! OpenAI's Responses API on chat-style channels: the request becomes a chat completions
//! request before any adapter sees it, and canonical chunks become the Responses event
//! sequence (`response.created`, `response.in_progress`, `response.output_item.added`,
//! `response.content_part.added`, `response.output_text.delta`, ..., `response.completed`
//! with usage), or one `response` object for plain calls.

use schemas::Usage;
use serde_json::{json, Map, Value};

use super::TranslateError;

fn unsupported(param: &str, message: impl Into<String>) -> TranslateError {
    TranslateError::new(message, Some(param))
}

fn content_part(p: &Value, i: usize) -> Result<Value, TranslateError> {
    match p.get("type").and_then(Value::as_str) {
        Some("input_text" | "output_text" | "text") => {
            Ok(json!({"type": "text", "text": p["text"]}))
        }
        Some("input_image") => match p.get("image_url").and_then(Value::as_str) {
            Some(url) => Ok(
                json!({"type": "image_url", "image_url": {"url": url, "detail": p.get("detail").cloned().unwrap_or(json!("auto"))}}),
            ),
            None => Err(unsupported(
                &format!("input[{i}].content"),
                "only `image_url` images are supported (no `file_id`)",
            )),
        },
        other => Err(unsupported(
            &format!("input[{i}].content"),
            format!(
                "content type `{}` is not supported by Sluice's Responses API",
                other.unwrap_or("?")
            ),
        )),
    }
}

/// A Responses request → a chat completions request (with `model`, without `stream`,
/// which the adapters set).
pub fn request_to_chat(req: &Value) -> Result<Value, TranslateError> {
    let obj = req
        .as_object()
        .ok_or_else(|| TranslateError::new("the request body must be a JSON object", None))?;
    if obj
        .get("previous_response_id")
        .is_some_and(|v| !v.is_null())
    {
        return Err(unsupported(
            "previous_response_id",
            "`previous_response_id` is not supported: Sluice stores no responses; send the whole conversation in `input`",
        ));
    }
    let mut messages = Vec::new();
    if let Some(s) = obj.get("instructions").and_then(Value::as_str) {
        messages.push(json!({"role": "system", "content": s}));
    }
    match obj.get("input") {
        Some(Value::String(s)) => messages.push(json!({"role": "user", "content": s})),
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                match item.get("type").and_then(Value::as_str) {
                    Some("function_call") => {
                        let call = json!({"id": item["call_id"], "type": "function",
                            "function": {"name": item["name"], "arguments": item["arguments"]}});
                        // Consecutive calls belong to one assistant turn.
                        match messages.last_mut() {
                            Some(last)
                                if last["role"] == "assistant"
                                    && last.get("tool_calls").is_some() =>
                            {
                                if let Some(Value::Array(calls)) = last.get_mut("tool_calls") {
                                    calls.push(call);
                                }
                            }
                            _ => messages.push(
                                json!({"role": "assistant", "content": null, "tool_calls": [call]}),
                            ),
                        }
                    }
                    Some("function_call_output") => {
                        let output = match &item["output"] {
                            Value::String(s) => s.clone(),
                            other => other.to_string(),
                        };
                        messages.push(json!({"role": "tool", "tool_call_id": item["call_id"], "content": output}));
                    }
                    Some("message") | None => {
                        let role = item.get("role").and_then(Value::as_str).unwrap_or("user");
                        let content = match item.get("content") {
                            Some(Value::String(s)) => json!(s),
                            Some(Value::Array(parts)) => {
                                let parts = parts
                                    .iter()
                                    .map(|p| content_part(p, i))
                                    .collect::<Result<Vec<_>, _>>()?;
                                if role == "assistant" {
                                    json!(parts
                                        .iter()
                                        .filter_map(|p| p["text"].as_str())
                                        .collect::<String>())
                                } else {
                                    Value::Array(parts)
                                }
                            }
                            _ => Value::Null,
                        };
                        messages.push(json!({"role": role, "content": content}));
                    }
                    Some(other) => {
                        return Err(unsupported(
                            &format!("input[{i}].type"),
                            format!(
                            "input item type `{other}` is not supported by Sluice's Responses API"
                        ),
                        ))
                    }
                }
            }
        }
        _ => {
            return Err(unsupported(
                "input",
                "`input` is required: a string or an array of input items",
            ))
        }
    }
    let mut out = Map::new();
    out.insert(
        "model".into(),
        obj.get("model").cloned().unwrap_or(Value::Null),
    );
    out.insert("messages".into(), Value::Array(messages));
    if let Some(n) = obj.get("max_output_tokens").filter(|v| !v.is_null()) {
        out.insert("max_completion_tokens".into(), n.clone());
    }
    for field in [
        "temperature",
        "top_p",
        "user",
        "parallel_tool_calls",
        "metadata",
        "mock",
    ] {
        if let Some(v) = obj.get(field).filter(|v| !v.is_null()) {
            out.insert(field.into(), v.clone());
        }
    }
    if let Some(tools) = obj
        .get("tools")
        .and_then(Value::as_array)
        .filter(|t| !t.is_empty())
    {
        let tools = tools
            .iter()
            .enumerate()
            .map(|(i, t)| {
                if t["type"] != "function" {
                    return Err(unsupported(&format!("tools[{i}].type"), "only `function` tools are supported by Sluice's Responses API"));
                }
                let mut f = json!({"name": t["name"], "parameters": t.get("parameters").cloned().unwrap_or(json!({"type": "object"}))});
                for k in ["description", "strict"] {
                    if let Some(v) = t.get(k).filter(|v| !v.is_null()) {
                        f[k] = v.clone();
                    }
                }
                Ok(json!({"type": "function", "function": f}))
            })
            .collect::<Result<Vec<_>, _>>()?;
        out.insert("tools".into(), Value::Array(tools));
    }
    match obj.get("tool_choice") {
        Some(Value::String(s)) => {
            out.insert("tool_choice".into(), json!(s));
        }
        Some(Value::Object(c)) if c.get("type") == Some(&json!("function")) => {
            out.insert(
                "tool_choice".into(),
                json!({"type": "function", "function": {"name": c["name"]}}),
            );
        }
        _ => {}
    }
    match req.pointer("/text/format/type").and_then(Value::as_str) {
        Some("json_object") => {
            out.insert("response_format".into(), json!({"type": "json_object"}));
        }
        Some("json_schema") => {
            let f = &req["text"]["format"];
            let mut schema = json!({"name": f["name"], "schema": f["schema"]});
            if let Some(strict) = f.get("strict") {
                schema["strict"] = strict.clone();
            }
            out.insert(
                "response_format".into(),
                json!({"type": "json_schema", "json_schema": schema}),
            );
        }
        _ => {}
    }
    Ok(Value::Object(out))
}

/// The Responses `usage` object.
pub fn usage_json(u: &Usage) -> Value {
    json!({"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": u.cached_tokens},
           "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
           "total_tokens": u.total_tokens})
}

fn response_object(
    id: &str,
    created: i64,
    model: &str,
    status: &str,
    output: Vec<Value>,
    usage: Option<&Usage>,
) -> Value {
    json!({"id": id, "object": "response", "created_at": created, "status": status, "error": null,
           "incomplete_details": if status == "incomplete" { json!({"reason": "max_output_tokens"}) } else { Value::Null },
           "instructions": null, "max_output_tokens": null, "model": model, "output": output,
           "parallel_tool_calls": true, "previous_response_id": null, "reasoning": {"effort": null, "summary": null},
           "store": false, "temperature": null, "text": {"format": {"type": "text"}}, "tool_choice": "auto",
           "tools": [], "top_p": null, "truncation": "disabled", "usage": usage.map(usage_json), "metadata": {}})
}

/// The item open in [`ToEvents`].
#[derive(Debug)]
enum Open {
    None,
    Message {
        text: String,
    },
    Call {
        index: u64,
        call_id: String,
        name: String,
        arguments: String,
    },
}

/// Canonical chunks → Responses events.
#[derive(Debug)]
pub struct ToEvents {
    model: String,
    id: String,
    created: i64,
    seq: u64,
    started: bool,
    open: Open,
    /// Finished output items, in order.
    done: Vec<Value>,
    finish: Option<String>,
}

impl ToEvents {
    pub fn new(client_model: &str) -> Self {
        Self {
            model: client_model.to_owned(),
            id: format!("resp_{}", uuid::Uuid::now_v7().simple()),
            created: chrono::Utc::now().timestamp(),
            seq: 0,
            started: false,
            open: Open::None,
            done: Vec::new(),
            finish: None,
        }
    }

    fn event(&mut self, kind: &str, mut body: Value) -> Value {
        body["type"] = json!(kind);
        body["sequence_number"] = json!(self.seq);
        self.seq += 1;
        body
    }

    fn item_id(&self) -> String {
        format!(
            "{}_{}",
            if matches!(self.open, Open::Call { .. }) {
                "fc"
            } else {
                "msg"
            },
            self.done.len()
        )
    }

    fn start(&mut self, out: &mut Vec<Value>) {
        if self.started {
            return;
        }
        self.started = true;
        for kind in ["response.created", "response.in_progress"] {
            let r = response_object(
                &self.id,
                self.created,
                &self.model,
                "in_progress",
                Vec::new(),
                None,
            );
            out.push(self.event(kind, json!({"response": r})));
        }
    }

    fn close(&mut self, out: &mut Vec<Value>) {
        let item_id = self.item_id();
        let output_index = self.done.len();
        let item = match std::mem::replace(&mut self.open, Open::None) {
            Open::None => return,
            Open::Message { text } => {
                let at =
                    json!({"item_id": item_id, "output_index": output_index, "content_index": 0});
                let mut e = at.clone();
                e["text"] = json!(text);
                e["logprobs"] = json!([]);
                out.push(self.event("response.output_text.done", e));
                let part = json!({"type": "output_text", "text": text, "annotations": []});
                let mut e = at;
                e["part"] = part.clone();
                out.push(self.event("response.content_part.done", e));
                json!({"id": item_id, "type": "message", "status": "completed", "role": "assistant", "content": [part]})
            }
            Open::Call {
                call_id,
                name,
                arguments,
                ..
            } => {
                out.push(self.event("response.function_call_arguments.done",
                    json!({"item_id": item_id, "output_index": output_index, "name": name, "arguments": arguments})));
                json!({"id": item_id, "type": "function_call", "status": "completed", "call_id": call_id, "name": name, "arguments": arguments})
            }
        };
        out.push(self.event(
            "response.output_item.done",
            json!({"output_index": output_index, "item": item.clone()}),
        ));
        self.done.push(item);
    }

    fn open(&mut self, open: Open, out: &mut Vec<Value>) {
        self.close(out);
        let output_index = self.done.len();
        let is_message = matches!(open, Open::Message { .. });
        let item = match &open {
            Open::Message { .. } => {
                json!({"type": "message", "status": "in_progress", "role": "assistant", "content": []})
            }
            Open::Call { call_id, name, .. } => {
                json!({"type": "function_call", "status": "in_progress", "call_id": call_id, "name": name, "arguments": ""})
            }
            Open::None => return,
        };
        self.open = open;
        let item_id = self.item_id();
        let mut item = item;
        item["id"] = json!(item_id);
        out.push(self.event(
            "response.output_item.added",
            json!({"output_index": output_index, "item": item}),
        ));
        if is_message {
            out.push(self.event("response.content_part.added", json!({"item_id": item_id, "output_index": output_index,
                "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}})));
        }
    }

    pub fn chunk(&mut self, chunk: &Value) -> Vec<Value> {
        let mut out = Vec::new();
        self.start(&mut out);
        for choice in chunk
            .get("choices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let d = &choice["delta"];
            if let Some(t) = d
                .get("content")
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
            {
                if !matches!(self.open, Open::Message { .. }) {
                    self.open(
                        Open::Message {
                            text: String::new(),
                        },
                        &mut out,
                    );
                }
                if let Open::Message { text } = &mut self.open {
                    text.push_str(t);
                }
                let e = json!({"item_id": self.item_id(), "output_index": self.done.len(), "content_index": 0, "delta": t, "logprobs": []});
                out.push(self.event("response.output_text.delta", e));
            }
            for call in d
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let index = call.get("index").and_then(Value::as_u64).unwrap_or(0);
                let same = matches!(&self.open, Open::Call { index: i, .. } if *i == index);
                if !same {
                    let open = Open::Call {
                        index,
                        call_id: call["id"].as_str().unwrap_or_default().to_owned(),
                        name: call
                            .pointer("/function/name")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_owned(),
                        arguments: String::new(),
                    };
                    self.open(open, &mut out);
                }
                if let Some(a) = call
                    .pointer("/function/arguments")
                    .and_then(Value::as_str)
                    .filter(|a| !a.is_empty())
                {
                    if let Open::Call { arguments, .. } = &mut self.open {
                        arguments.push_str(a);
                    }
                    let e = json!({"item_id": self.item_id(), "output_index": self.done.len(), "delta": a});
                    out.push(self.event("response.function_call_arguments.delta", e));
                }
            }
            if let Some(r) = choice.get("finish_reason").and_then(Value::as_str) {
                self.finish = Some(r.to_owned());
            }
        }
        out
    }

    /// Closes the open item and ends with `response.completed` (or `response.incomplete`
    /// when the answer was cut by the token limit), carrying the whole output and usage.
    pub fn finish(&mut self, usage: &Usage) -> Vec<Value> {
        let mut out = Vec::new();
        self.start(&mut out);
        self.close(&mut out);
        let (kind, status) = match self.finish.as_deref() {
            Some("length") => ("response.incomplete", "incomplete"),
            _ => ("response.completed", "completed"),
        };
        let r = response_object(
            &self.id,
            self.created,
            &self.model,
            status,
            self.done.clone(),
            Some(usage),
        );
        out.push(self.event(kind, json!({"response": r})));
        out
    }
}

/// A whole `chat.completion` → a `response` object.
pub fn completion_to_response(c: &Value, client_model: &str, usage: &Usage) -> Value {
    let mut enc = ToEvents::new(client_model);
    let choice = &c["choices"][0];
    let m = &choice["message"];
    let mut delta = json!({"content": m["content"]});
    if let Some(calls) = m.get("tool_calls").and_then(Value::as_array) {
        let indexed: Vec<Value> = calls
            .iter()
            .enumerate()
            .map(|(i, call)| {
                let mut call = call.clone();
                call["index"] = json!(i);
                call
            })
            .collect();
        delta["tool_calls"] = Value::Array(indexed);
    }
    enc.chunk(&json!({"choices": [{"delta": delta, "finish_reason": choice["finish_reason"]}]}));
    let events = enc.finish(usage);
    events
        .last()
        .map(|e| e["response"].clone())
        .unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_becomes_chat() {
        let req = json!({"model": "m", "instructions": "be brief", "max_output_tokens": 9, "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "42"}],
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
            "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}}});
        let c = request_to_chat(&req).expect("translates");
        assert_eq!(
            c["messages"][0],
            json!({"role": "system", "content": "be brief"})
        );
        assert_eq!(
            c["messages"][1]["content"],
            json!([{"type": "text", "text": "hi"}])
        );
        assert_eq!(c["messages"][2]["tool_calls"][0]["id"], "c1");
        assert_eq!(
            c["messages"][3],
            json!({"role": "tool", "tool_call_id": "c1", "content": "42"})
        );
        assert_eq!(c["tools"][0]["function"]["name"], "f");
        assert_eq!(c["response_format"]["json_schema"]["name"], "x");
        assert_eq!(c["max_completion_tokens"], 9);
        assert!(request_to_chat(
            &json!({"model": "m", "input": "x", "previous_response_id": "resp_1"})
        )
        .is_err());
    }

    #[test]
    fn chunks_become_the_event_sequence() {
        let mut e = ToEvents::new("m");
        let c = |delta: Value, finish: Value| json!({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        let mut out = e.chunk(&c(json!({"role": "assistant", "content": ""}), Value::Null));
        out.extend(e.chunk(&c(json!({"content": "hi"}), Value::Null)));
        out.extend(e.chunk(&c(json!({"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "f", "arguments": "{}"}}]}), Value::Null)));
        out.extend(e.chunk(&c(json!({}), json!("tool_calls"))));
        out.extend(e.finish(&Usage {
            prompt_tokens: 3,
            completion_tokens: 2,
            total_tokens: 5,
            ..Usage::default()
        }));
        let kinds: Vec<&str> = out
            .iter()
            .map(|e| e["type"].as_str().unwrap_or_default())
            .collect();
        assert_eq!(
            kinds,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed"
            ]
        );
        let seqs: Vec<u64> = out
            .iter()
            .filter_map(|e| e["sequence_number"].as_u64())
            .collect();
        assert_eq!(seqs, (0..out.len() as u64).collect::<Vec<_>>());
        let done = &out[out.len() - 1]["response"];
        assert_eq!(done["output"][0]["content"][0]["text"], "hi");
        assert_eq!(done["output"][1]["call_id"], "call_1");
        assert_eq!(done["usage"]["output_tokens"], 2);
    }
}
