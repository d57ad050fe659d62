//! Request bodies between Anthropic Messages and OpenAI chat completions, both ways.
//! Fields with no equivalent are dropped when harmless (`top_k`, `metadata` other than the
//! user id) and refused with a 400 when dropping them would change the answer (server
//! tools, documents, `n > 1`).

use serde_json::{json, Map, Value};

use crate::translate::TranslateError;

/// Anthropic requires `max_tokens`; an OpenAI request without one gets this.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

fn unsupported(param: &str, message: impl Into<String>) -> TranslateError {
    TranslateError::new(message, Some(param))
}

/// The text of an OpenAI `content` (string or parts), for system prompts and tool results.
fn openai_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// An OpenAI image URL as an Anthropic image source (`data:` URLs become base64 sources).
fn image_source(url: &str) -> Value {
    if let Some(rest) = url.strip_prefix("data:") {
        if let Some((media_type, data)) = rest.split_once(";base64,") {
            return json!({"type":"base64","media_type":media_type,"data":data});
        }
    }
    json!({"type":"url","url":url})
}

/// Appends `blocks` as a turn of `role`, merging with the previous turn of the same role:
/// Anthropic wants user and assistant turns to alternate, OpenAI does not.
fn push_turn(out: &mut Vec<Value>, role: &str, blocks: Vec<Value>) {
    if blocks.is_empty() {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last["role"] == role {
            if let Some(Value::Array(existing)) = last.get_mut("content") {
                existing.extend(blocks);
                return;
            }
        }
    }
    out.push(json!({"role": role, "content": blocks}));
}

/// OpenAI chat completions request → Anthropic Messages request.
pub fn openai_to_anthropic(
    req: &Value,
    upstream_model: &str,
    stream: bool,
) -> Result<Value, TranslateError> {
    let obj = req
        .as_object()
        .ok_or_else(|| TranslateError::new("the request must be a JSON object", None))?;
    if obj.get("n").and_then(Value::as_u64).is_some_and(|n| n > 1) {
        return Err(unsupported(
            "n",
            "`n` > 1 is not supported by this model's provider (Anthropic)",
        ));
    }
    let mut system = Vec::new();
    let mut turns: Vec<Value> = Vec::new();
    let messages = obj
        .get("messages")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for (i, m) in messages.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
        match role {
            "system" | "developer" => {
                let text = openai_text(m.get("content"));
                if !text.is_empty() {
                    system.push(json!({"type":"text","text":text}));
                }
            }
            "tool" | "function" => {
                let id = m
                    .get("tool_call_id")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let block = json!({"type":"tool_result","tool_use_id":id,"content":openai_text(m.get("content"))});
                push_turn(&mut turns, "user", vec![block]);
            }
            "assistant" => {
                let mut blocks = Vec::new();
                let text = openai_text(m.get("content"));
                if !text.is_empty() {
                    blocks.push(json!({"type":"text","text":text}));
                }
                for call in m
                    .get("tool_calls")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let f = &call["function"];
                    let args = f.get("arguments").and_then(Value::as_str).unwrap_or("{}");
                    let input: Value =
                        serde_json::from_str(if args.trim().is_empty() { "{}" } else { args })
                            .map_err(|_| {
                                unsupported(
                                    &format!("messages[{i}].tool_calls"),
                                    "tool call arguments must be a JSON object",
                                )
                            })?;
                    blocks.push(
                        json!({"type":"tool_use","id":call["id"],"name":f["name"],"input":input}),
                    );
                }
                push_turn(&mut turns, "assistant", blocks);
            }
            _ => {
                let blocks = match m.get("content") {
                    Some(Value::String(s)) => vec![json!({"type":"text","text":s})],
                    Some(Value::Array(parts)) => parts
                        .iter()
                        .map(|p| user_part(p, i))
                        .collect::<Result<Vec<_>, _>>()?,
                    _ => Vec::new(),
                };
                push_turn(&mut turns, "user", blocks);
            }
        }
    }
    let max_tokens = obj
        .get("max_completion_tokens")
        .or_else(|| obj.get("max_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(DEFAULT_MAX_TOKENS);
    let mut out = Map::new();
    out.insert("model".into(), json!(upstream_model));
    out.insert("max_tokens".into(), json!(max_tokens));
    if !system.is_empty() {
        out.insert("system".into(), Value::Array(system));
    }
    out.insert("messages".into(), Value::Array(turns));
    for field in ["temperature", "top_p"] {
        if let Some(v) = obj.get(field).filter(|v| !v.is_null()) {
            out.insert(field.into(), v.clone());
        }
    }
    match obj.get("stop") {
        Some(Value::String(s)) => {
            out.insert("stop_sequences".into(), json!([s]));
        }
        Some(Value::Array(a)) => {
            out.insert("stop_sequences".into(), Value::Array(a.clone()));
        }
        _ => {}
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
                if t.get("type").and_then(Value::as_str).is_some_and(|k| k != "function") {
                    return Err(unsupported(&format!("tools[{i}].type"), "only `function` tools can be sent to this model's provider (Anthropic)"));
                }
                let f = &t["function"];
                let mut tool = json!({"name": f["name"], "input_schema": f.get("parameters").cloned().unwrap_or_else(|| json!({"type":"object","properties":{}}))});
                if let Some(d) = f.get("description").filter(|d| d.is_string()) {
                    tool["description"] = d.clone();
                }
                Ok(tool)
            })
            .collect::<Result<Vec<_>, _>>()?;
        out.insert("tools".into(), Value::Array(tools));
        let parallel = obj.get("parallel_tool_calls").and_then(Value::as_bool);
        let mut choice = match obj.get("tool_choice") {
            Some(Value::String(s)) if s == "required" => json!({"type":"any"}),
            Some(Value::String(s)) if s == "none" => json!({"type":"none"}),
            Some(Value::Object(c)) => {
                json!({"type":"tool","name":c.get("function").and_then(|f| f.get("name")).cloned().unwrap_or(Value::Null)})
            }
            _ => json!({"type":"auto"}),
        };
        if parallel == Some(false) && choice["type"] != "none" {
            choice["disable_parallel_tool_use"] = json!(true);
        }
        out.insert("tool_choice".into(), choice);
    }
    if let Some(user) = obj.get("user").and_then(Value::as_str) {
        out.insert("metadata".into(), json!({"user_id": user}));
    }
    if let Some(mock) = obj.get("mock") {
        // The test mock's knobs travel with the request, as with OpenAI channels.
        out.insert("mock".into(), mock.clone());
    }
    if stream {
        out.insert("stream".into(), json!(true));
    }
    Ok(Value::Object(out))
}

fn user_part(p: &Value, i: usize) -> Result<Value, TranslateError> {
    match p.get("type").and_then(Value::as_str) {
        Some("text") => Ok(json!({"type":"text","text":p["text"]})),
        Some("image_url") => {
            let url = p
                .pointer("/image_url/url")
                .and_then(Value::as_str)
                .unwrap_or_default();
            Ok(json!({"type":"image","source":image_source(url)}))
        }
        other => Err(unsupported(
            &format!("messages[{i}].content"),
            format!(
                "content part type `{}` cannot be sent to this model's provider (Anthropic)",
                other.unwrap_or("?")
            ),
        )),
    }
}

/// The text of Anthropic content (string or blocks), for system prompts and tool results.
fn anthropic_text(content: Option<&Value>) -> String {
    openai_text(content)
}

/// Anthropic Messages request → OpenAI chat completions request (without `model` and
/// `stream`, which the OpenAI adapter sets). Thinking blocks are dropped: an OpenAI-format
/// upstream cannot verify their signatures and would reject unknown content types.
pub fn anthropic_to_openai(req: &Value) -> Result<Value, TranslateError> {
    let obj = req
        .as_object()
        .ok_or_else(|| TranslateError::new("the request must be a JSON object", None))?;
    let mut messages = Vec::new();
    match obj.get("system") {
        Some(Value::String(s)) => messages.push(json!({"role":"system","content":s})),
        Some(v @ Value::Array(_)) => {
            messages.push(json!({"role":"system","content":anthropic_text(Some(v))}))
        }
        _ => {}
    }
    let turns = obj
        .get("messages")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for (i, m) in turns.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
        let blocks = match m.get("content") {
            Some(Value::String(s)) => {
                messages.push(json!({"role":role,"content":s}));
                continue;
            }
            Some(Value::Array(b)) => b,
            _ => continue,
        };
        let mut parts = Vec::new();
        let mut calls = Vec::new();
        for (j, b) in blocks.iter().enumerate() {
            let param = format!("messages.{i}.content.{j}");
            match b.get("type").and_then(Value::as_str) {
                Some("text") => parts.push(json!({"type":"text","text":b["text"]})),
                Some("image") => {
                    let src = &b["source"];
                    let url = match src.get("type").and_then(Value::as_str) {
                        Some("base64") => format!(
                            "data:{};base64,{}",
                            src["media_type"].as_str().unwrap_or("image/png"),
                            src["data"].as_str().unwrap_or_default()
                        ),
                        Some("url") => src["url"].as_str().unwrap_or_default().to_owned(),
                        _ => return Err(unsupported(&param, "this image source cannot be sent to an OpenAI-format channel")),
                    };
                    parts.push(json!({"type":"image_url","image_url":{"url":url}}));
                }
                Some("tool_use") => calls.push(json!({"id":b["id"],"type":"function",
                    "function":{"name":b["name"],"arguments":b.get("input").unwrap_or(&json!({})).to_string()}})),
                Some("tool_result") => {
                    let content = anthropic_text(b.get("content"));
                    messages.push(json!({"role":"tool","tool_call_id":b["tool_use_id"],"content":content}));
                }
                Some("thinking" | "redacted_thinking") => {}
                other => {
                    return Err(unsupported(
                        &param,
                        format!("content block type `{}` cannot be sent to an OpenAI-format channel", other.unwrap_or("?")),
                    ))
                }
            }
        }
        if role == "assistant" {
            let text = parts
                .iter()
                .filter_map(|p| p["text"].as_str())
                .collect::<Vec<_>>()
                .concat();
            let mut msg = json!({"role":"assistant","content": if text.is_empty() { Value::Null } else { json!(text) }});
            if !calls.is_empty() {
                msg["tool_calls"] = Value::Array(calls);
            }
            messages.push(msg);
        } else if !parts.is_empty() {
            let only_text = parts.iter().all(|p| p["type"] == "text");
            let content = if only_text {
                json!(parts
                    .iter()
                    .filter_map(|p| p["text"].as_str())
                    .collect::<Vec<_>>()
                    .join("\n"))
            } else {
                Value::Array(parts)
            };
            messages.push(json!({"role":"user","content":content}));
        }
    }
    let mut out = Map::new();
    out.insert("messages".into(), Value::Array(messages));
    if let Some(v) = obj.get("max_tokens") {
        out.insert("max_tokens".into(), v.clone());
    }
    for field in ["temperature", "top_p"] {
        if let Some(v) = obj.get(field).filter(|v| !v.is_null()) {
            out.insert(field.into(), v.clone());
        }
    }
    if let Some(stop) = obj.get("stop_sequences").filter(|s| s.is_array()) {
        out.insert("stop".into(), stop.clone());
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
                if t.get("type").and_then(Value::as_str).is_some_and(|k| k != "custom") {
                    return Err(unsupported(&format!("tools.{i}.type"), format!("server tool `{}` is only available on Anthropic channels", t["type"].as_str().unwrap_or("?"))));
                }
                let mut f = json!({"name":t["name"],"parameters":t.get("input_schema").cloned().unwrap_or_else(|| json!({"type":"object"}))});
                if let Some(d) = t.get("description").filter(|d| d.is_string()) {
                    f["description"] = d.clone();
                }
                Ok(json!({"type":"function","function":f}))
            })
            .collect::<Result<Vec<_>, _>>()?;
        out.insert("tools".into(), Value::Array(tools));
        if let Some(choice) = obj.get("tool_choice") {
            let mapped = match choice.get("type").and_then(Value::as_str) {
                Some("any") => json!("required"),
                Some("none") => json!("none"),
                Some("tool") => json!({"type":"function","function":{"name":choice["name"]}}),
                _ => json!("auto"),
            };
            out.insert("tool_choice".into(), mapped);
            if choice
                .get("disable_parallel_tool_use")
                .and_then(Value::as_bool)
                == Some(true)
            {
                out.insert("parallel_tool_calls".into(), json!(false));
            }
        }
    }
    if let Some(user) = req.pointer("/metadata/user_id").and_then(Value::as_str) {
        out.insert("user".into(), json!(user));
    }
    if let Some(mock) = obj.get("mock") {
        out.insert("mock".into(), mock.clone());
    }
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_history_becomes_alternating_anthropic_turns() {
        let req = json!({"model":"gpt","max_tokens":50,"stop":"END","messages":[
            {"role":"system","content":"be brief"},
            {"role":"user","content":[{"type":"text","text":"look"},{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]},
            {"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{\"a\":1}"}}]},
            {"role":"tool","tool_call_id":"c1","content":"42"},
            {"role":"user","content":"thanks"}],
            "tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}],"tool_choice":"required"});
        let out = openai_to_anthropic(&req, "claude-x", true).expect("translates");
        assert_eq!(out["system"], json!([{"type":"text","text":"be brief"}]));
        assert_eq!(
            out["messages"][0]["content"][1]["source"],
            json!({"type":"base64","media_type":"image/png","data":"AAAA"})
        );
        assert_eq!(
            out["messages"][1]["content"][0],
            json!({"type":"tool_use","id":"c1","name":"f","input":{"a":1}})
        );
        // The tool result and the next user text share one user turn.
        assert_eq!(
            out["messages"][2]["content"],
            json!([{"type":"tool_result","tool_use_id":"c1","content":"42"},{"type":"text","text":"thanks"}])
        );
        assert_eq!(
            (out["max_tokens"].clone(), out["stop_sequences"].clone()),
            (json!(50), json!(["END"]))
        );
        assert_eq!(out["tool_choice"], json!({"type":"any"}));
        assert_eq!(
            (out["model"].clone(), out["stream"].clone()),
            (json!("claude-x"), json!(true))
        );
    }

    #[test]
    fn anthropic_history_becomes_openai_messages() {
        let req = json!({"model":"c","max_tokens":9,"system":[{"type":"text","text":"sys"}],"messages":[
            {"role":"user","content":"q"},
            {"role":"assistant","content":[{"type":"thinking","thinking":"t","signature":"s"},{"type":"text","text":"let me"},
                {"type":"tool_use","id":"tu1","name":"f","input":{"a":1}}]},
            {"role":"user","content":[{"type":"tool_result","tool_use_id":"tu1","content":[{"type":"text","text":"42"}]}]}],
            "tools":[{"name":"f","description":"d","input_schema":{"type":"object"}}],"tool_choice":{"type":"tool","name":"f"}});
        let out = anthropic_to_openai(&req).expect("translates");
        assert_eq!(out["messages"][0], json!({"role":"system","content":"sys"}));
        assert_eq!(
            out["messages"][2]["tool_calls"][0]["function"],
            json!({"name":"f","arguments":"{\"a\":1}"})
        );
        assert_eq!(out["messages"][2]["content"], json!("let me"));
        assert_eq!(
            out["messages"][3],
            json!({"role":"tool","tool_call_id":"tu1","content":"42"})
        );
        assert_eq!(
            out["tools"][0]["function"]["parameters"],
            json!({"type":"object"})
        );
        assert_eq!(
            out["tool_choice"],
            json!({"type":"function","function":{"name":"f"}})
        );
    }

    #[test]
    fn untranslatable_requests_are_refused() {
        let server_tool = json!({"messages":[{"role":"user","content":"q"}],"tools":[{"type":"web_search_20250305","name":"web_search"}]});
        assert_eq!(
            anthropic_to_openai(&server_tool)
                .expect_err("refused")
                .param
                .as_deref(),
            Some("tools.0.type")
        );
        let doc = json!({"messages":[{"role":"user","content":[{"type":"document","source":{}}]}]});
        assert!(anthropic_to_openai(&doc).is_err());
        let audio = json!({"messages":[{"role":"user","content":[{"type":"input_audio","input_audio":{}}]}]});
        assert!(openai_to_anthropic(&audio, "c", false).is_err());
    }
}
