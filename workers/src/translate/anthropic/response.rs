//! Whole (non-streaming) answers between an Anthropic `message` and an OpenAI
//! `chat.completion`, both ways.

use schemas::anthropic::{finish_reason_of, stop_reason_of};
use schemas::Usage;
use serde_json::{json, Value};

/// Anthropic `message` → OpenAI `chat.completion`.
pub fn message_to_completion(m: &Value) -> Value {
    let mut text = String::new();
    let mut reasoning = String::new();
    let mut calls = Vec::new();
    for b in m
        .get("content")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        match b.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(b["text"].as_str().unwrap_or_default()),
            Some("thinking") => reasoning.push_str(b["thinking"].as_str().unwrap_or_default()),
            Some("tool_use") => calls.push(json!({"id":b["id"],"type":"function",
                "function":{"name":b["name"],"arguments":b.get("input").unwrap_or(&json!({})).to_string()}})),
            _ => {}
        }
    }
    let mut message = json!({"role":"assistant","content": if text.is_empty() && !calls.is_empty() { Value::Null } else { json!(text) }});
    if !reasoning.is_empty() {
        message["reasoning_content"] = json!(reasoning);
    }
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    let finish = m
        .get("stop_reason")
        .and_then(Value::as_str)
        .map_or("stop", finish_reason_of);
    let mut out = json!({
        "id": format!("chatcmpl-{}", m["id"].as_str().unwrap_or_default().trim_start_matches("msg_")),
        "object": "chat.completion",
        "created": chrono::Utc::now().timestamp(),
        "model": m["model"],
        "choices": [{"index":0,"message":message,"logprobs":null,"finish_reason":finish}],
    });
    if let Some(u) = m.get("usage").and_then(Usage::from_anthropic) {
        out["usage"] = u.to_openai();
    }
    out
}

/// OpenAI `chat.completion` → Anthropic `message`, with the final `usage` (the
/// provider's, or the estimate when it reported none).
pub fn completion_to_message(c: &Value, client_model: &str, usage: &Usage) -> Value {
    let choice = &c["choices"][0];
    let msg = &choice["message"];
    let mut content = Vec::new();
    if let Some(r) = msg
        .get("reasoning_content")
        .and_then(Value::as_str)
        .filter(|r| !r.is_empty())
    {
        content.push(json!({"type":"thinking","thinking":r,"signature":""}));
    }
    if let Some(t) = msg
        .get("content")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
    {
        content.push(json!({"type":"text","text":t}));
    }
    for call in msg
        .get("tool_calls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let args = call
            .pointer("/function/arguments")
            .and_then(Value::as_str)
            .unwrap_or("{}");
        let input: Value = serde_json::from_str(args).unwrap_or_else(|_| json!({}));
        content.push(json!({"type":"tool_use","id":call["id"],"name":call["function"]["name"],"input":input}));
    }
    let stop = choice
        .get("finish_reason")
        .and_then(Value::as_str)
        .map_or("end_turn", stop_reason_of);
    json!({
        "id": format!("msg_{}", c["id"].as_str().unwrap_or_default().trim_start_matches("chatcmpl-")),
        "type": "message", "role": "assistant", "model": client_model,
        "content": content, "stop_reason": stop, "stop_sequence": null,
        "usage": usage.to_anthropic(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_text_tools_and_usage() {
        let m = json!({"id":"msg_1","type":"message","role":"assistant","model":"claude","content":[
            {"type":"text","text":"hi"},{"type":"tool_use","id":"tu","name":"f","input":{"a":1}}],
            "stop_reason":"tool_use","usage":{"input_tokens":3,"cache_creation_input_tokens":2,"output_tokens":4}});
        let c = message_to_completion(&m);
        assert_eq!(c["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(
            c["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
            "{\"a\":1}"
        );
        assert_eq!(c["usage"]["prompt_tokens"], 5);
        let usage = Usage::from_anthropic(&m["usage"]).expect("usage");
        let back = completion_to_message(&c, "claude-client", &usage);
        assert_eq!(back["content"], m["content"]);
        assert_eq!(back["stop_reason"], "tool_use");
        assert_eq!(
            back["usage"],
            json!({"input_tokens":3,"cache_creation_input_tokens":2,"cache_read_input_tokens":0,"output_tokens":4})
        );
    }
}
