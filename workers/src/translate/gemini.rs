//! Gemini `generateContent` ↔ OpenAI chat completions: the request one way, answers
//! (whole and streamed) the other. No client speaks Gemini, so there is no native path.

use schemas::Usage;
use serde_json::{json, Map, Value};

use super::TranslateError;

fn unsupported(param: &str, message: impl Into<String>) -> TranslateError {
    TranslateError::new(message, Some(param))
}

fn text_of(content: Option<&Value>) -> String {
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

/// JSON Schema keywords Gemini's `parameters` (an OpenAPI subset) rejects; removing them
/// loses no constraint a model honours.
fn strip_schema(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.remove("$schema");
            m.remove("additionalProperties");
            m.values_mut().for_each(strip_schema);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_schema),
        _ => {}
    }
}

fn push(contents: &mut Vec<Value>, role: &str, parts: Vec<Value>) {
    if parts.is_empty() {
        return;
    }
    if let Some(last) = contents.last_mut() {
        if last["role"] == role {
            if let Some(Value::Array(p)) = last.get_mut("parts") {
                p.extend(parts);
                return;
            }
        }
    }
    contents.push(json!({"role": role, "parts": parts}));
}

/// OpenAI chat completions request → Gemini `GenerateContentRequest`.
pub fn openai_to_gemini(req: &Value) -> Result<Value, TranslateError> {
    let obj = req
        .as_object()
        .ok_or_else(|| TranslateError::new("the request must be a JSON object", None))?;
    if obj.get("n").and_then(Value::as_u64).is_some_and(|n| n > 1) {
        return Err(unsupported(
            "n",
            "`n` > 1 is not supported on Gemini channels",
        ));
    }
    let mut system = Vec::new();
    let mut contents = Vec::new();
    // Gemini answers a function by name; OpenAI tool results name the call id.
    let mut call_names: Vec<(String, String)> = Vec::new();
    let messages = obj.get("messages").and_then(Value::as_array);
    for (i, m) in messages.into_iter().flatten().enumerate() {
        match m.get("role").and_then(Value::as_str).unwrap_or("user") {
            "system" | "developer" => system.push(json!({"text": text_of(m.get("content"))})),
            "assistant" => {
                let mut parts = Vec::new();
                let text = text_of(m.get("content"));
                if !text.is_empty() {
                    parts.push(json!({"text": text}));
                }
                for call in m
                    .get("tool_calls")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let f = &call["function"];
                    let args: Value = serde_json::from_str(f["arguments"].as_str().unwrap_or("{}"))
                        .map_err(|_| {
                            unsupported(
                                &format!("messages[{i}].tool_calls"),
                                "tool call arguments must be a JSON object",
                            )
                        })?;
                    let name = f["name"].as_str().unwrap_or_default().to_owned();
                    call_names.push((
                        call["id"].as_str().unwrap_or_default().to_owned(),
                        name.clone(),
                    ));
                    parts.push(json!({"functionCall": {"name": name, "args": args}}));
                }
                push(&mut contents, "model", parts);
            }
            "tool" | "function" => {
                let id = m
                    .get("tool_call_id")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let name = call_names
                    .iter()
                    .find(|(c, _)| c == id)
                    .map(|(_, n)| n.clone())
                    .or_else(|| m.get("name").and_then(Value::as_str).map(str::to_owned))
                    .unwrap_or_default();
                let part = json!({"functionResponse": {"name": name, "response": {"content": text_of(m.get("content"))}}});
                push(&mut contents, "user", vec![part]);
            }
            _ => {
                let parts = match m.get("content") {
                    Some(Value::String(s)) => vec![json!({"text": s})],
                    Some(Value::Array(parts)) => parts
                        .iter()
                        .map(|p| user_part(p, i))
                        .collect::<Result<_, _>>()?,
                    _ => Vec::new(),
                };
                push(&mut contents, "user", parts);
            }
        }
    }
    let mut out = Map::new();
    out.insert("contents".into(), Value::Array(contents));
    if !system.is_empty() {
        out.insert("systemInstruction".into(), json!({"parts": system}));
    }
    let mut config = Map::new();
    if let Some(n) = obj
        .get("max_completion_tokens")
        .or_else(|| obj.get("max_tokens"))
        .and_then(Value::as_u64)
    {
        config.insert("maxOutputTokens".into(), json!(n));
    }
    for (from, to) in [
        ("temperature", "temperature"),
        ("top_p", "topP"),
        ("seed", "seed"),
    ] {
        if let Some(v) = obj.get(from).filter(|v| !v.is_null()) {
            config.insert(to.into(), v.clone());
        }
    }
    match obj.get("stop") {
        Some(Value::String(s)) => {
            config.insert("stopSequences".into(), json!([s]));
        }
        Some(Value::Array(a)) => {
            config.insert("stopSequences".into(), Value::Array(a.clone()));
        }
        _ => {}
    }
    match req.pointer("/response_format/type").and_then(Value::as_str) {
        Some("json_object") => {
            config.insert("responseMimeType".into(), json!("application/json"));
        }
        Some("json_schema") => {
            config.insert("responseMimeType".into(), json!("application/json"));
            if let Some(schema) = req.pointer("/response_format/json_schema/schema") {
                config.insert("responseJsonSchema".into(), schema.clone());
            }
        }
        _ => {}
    }
    if !config.is_empty() {
        out.insert("generationConfig".into(), Value::Object(config));
    }
    if let Some(tools) = obj
        .get("tools")
        .and_then(Value::as_array)
        .filter(|t| !t.is_empty())
    {
        let decls = tools
            .iter()
            .enumerate()
            .map(|(i, t)| {
                if t.get("type")
                    .and_then(Value::as_str)
                    .is_some_and(|k| k != "function")
                {
                    return Err(unsupported(
                        &format!("tools[{i}].type"),
                        "only `function` tools can be sent to a Gemini channel",
                    ));
                }
                let f = &t["function"];
                let mut decl = json!({"name": f["name"]});
                if let Some(d) = f.get("description").filter(|d| d.is_string()) {
                    decl["description"] = d.clone();
                }
                if let Some(p) = f.get("parameters") {
                    let mut p = p.clone();
                    strip_schema(&mut p);
                    decl["parameters"] = p;
                }
                Ok(decl)
            })
            .collect::<Result<Vec<_>, _>>()?;
        out.insert("tools".into(), json!([{"functionDeclarations": decls}]));
        let mode = match obj.get("tool_choice") {
            Some(Value::String(s)) if s == "required" => json!({"mode": "ANY"}),
            Some(Value::String(s)) if s == "none" => json!({"mode": "NONE"}),
            Some(Value::Object(c)) => {
                json!({"mode": "ANY", "allowedFunctionNames": [c.get("function").and_then(|f| f.get("name")).cloned().unwrap_or(Value::Null)]})
            }
            _ => json!({"mode": "AUTO"}),
        };
        out.insert("toolConfig".into(), json!({"functionCallingConfig": mode}));
    }
    if let Some(mock) = obj.get("mock") {
        out.insert("mock".into(), mock.clone());
    }
    Ok(Value::Object(out))
}

fn user_part(p: &Value, i: usize) -> Result<Value, TranslateError> {
    match p.get("type").and_then(Value::as_str) {
        Some("text") => Ok(json!({"text": p["text"]})),
        Some("image_url") => {
            let url = p
                .pointer("/image_url/url")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let (mime, data) = url
                .strip_prefix("data:")
                .and_then(|r| r.split_once(";base64,"))
                .ok_or_else(|| {
                    unsupported(
                        &format!("messages[{i}].content"),
                        "Gemini channels take images as `data:` URLs (base64) only",
                    )
                })?;
            Ok(json!({"inlineData": {"mimeType": mime, "data": data}}))
        }
        other => Err(unsupported(
            &format!("messages[{i}].content"),
            format!(
                "content part type `{}` cannot be sent to a Gemini channel",
                other.unwrap_or("?")
            ),
        )),
    }
}

/// OpenAI's `finish_reason` for a Gemini `finishReason` (`tool` when a function was called).
pub fn finish_reason_of(reason: &str, called: bool) -> &'static str {
    match reason {
        "MAX_TOKENS" => "length",
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY" => {
            "content_filter"
        }
        _ if called => "tool_calls",
        _ => "stop",
    }
}

/// `usageMetadata` → usage. Thinking tokens are output Gemini counts apart.
pub fn usage_of(u: &Value) -> Option<Usage> {
    let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
    let prompt = u.get("promptTokenCount")?.as_u64()?;
    let thoughts = n("thoughtsTokenCount");
    let completion = n("candidatesTokenCount") + thoughts;
    Some(Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
        cached_tokens: n("cachedContentTokenCount"),
        reasoning_tokens: thoughts,
        cache_creation_tokens: 0,
        images: 0,
    })
}

/// Gemini stream chunks → OpenAI chunks.
#[derive(Debug, Default)]
pub struct ToChunks {
    id: String,
    created: i64,
    started: bool,
    calls: usize,
}

impl ToChunks {
    fn chunk(&self, model: &Value, delta: Value, finish: Option<&str>) -> Value {
        json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    }

    pub fn event(&mut self, r: &Value) -> Vec<Value> {
        let model = &r["modelVersion"];
        let mut out = Vec::new();
        if !self.started {
            self.started = true;
            self.id = format!("chatcmpl-{}", r["responseId"].as_str().unwrap_or_default());
            self.created = chrono::Utc::now().timestamp();
            out.push(self.chunk(model, json!({"role": "assistant", "content": ""}), None));
        }
        let candidate = &r["candidates"][0];
        for part in candidate
            .pointer("/content/parts")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(t) = part
                .get("text")
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
            {
                let field = if part["thought"] == true {
                    "reasoning_content"
                } else {
                    "content"
                };
                out.push(self.chunk(model, json!({ field: t }), None));
            }
            if let Some(call) = part.get("functionCall") {
                let delta = json!({"tool_calls": [{"index": self.calls, "id": format!("call_{}_{}", self.id, self.calls), "type": "function",
                    "function": {"name": call["name"], "arguments": call.get("args").unwrap_or(&json!({})).to_string()}}]});
                self.calls += 1;
                out.push(self.chunk(model, delta, None));
            }
        }
        if let Some(reason) = candidate.get("finishReason").and_then(Value::as_str) {
            out.push(self.chunk(
                model,
                json!({}),
                Some(finish_reason_of(reason, self.calls > 0)),
            ));
            if let Some(u) = r.get("usageMetadata").and_then(usage_of) {
                let mut c = self.chunk(model, json!({}), None);
                c["choices"] = json!([]);
                c["usage"] = u.to_openai();
                out.push(c);
            }
        }
        out
    }
}

/// A whole `GenerateContentResponse` → `chat.completion`.
pub fn response_to_completion(r: &Value) -> Value {
    let mut chunks = ToChunks::default();
    let mut text = String::new();
    let mut reasoning = String::new();
    let mut calls = Vec::new();
    let mut finish = Value::Null;
    for c in chunks.event(r) {
        let Some(choice) = c["choices"].get(0) else {
            continue;
        };
        let d = &choice["delta"];
        text.push_str(d["content"].as_str().unwrap_or_default());
        reasoning.push_str(d["reasoning_content"].as_str().unwrap_or_default());
        if let Some(tc) = d["tool_calls"].get(0) {
            calls.push(tc.clone());
        }
        if !choice["finish_reason"].is_null() {
            finish = choice["finish_reason"].clone();
        }
    }
    for call in &mut calls {
        if let Some(o) = call.as_object_mut() {
            o.remove("index");
        }
    }
    let mut message = json!({"role": "assistant", "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { json!(text) }});
    if !reasoning.is_empty() {
        message["reasoning_content"] = json!(reasoning);
    }
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    let mut out = json!({"id": chunks.id, "object": "chat.completion", "created": chunks.created, "model": r["modelVersion"],
        "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish}]});
    if let Some(u) = r.get("usageMetadata").and_then(usage_of) {
        out["usage"] = u.to_openai();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_request_becomes_gemini() {
        let req = json!({"model":"m","max_tokens":7,"messages":[
            {"role":"system","content":"sys"},
            {"role":"user","content":"q"},
            {"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{\"a\":1}"}}]},
            {"role":"tool","tool_call_id":"c1","content":"42"}],
            "tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object","additionalProperties":false,"properties":{}}}}]});
        let g = openai_to_gemini(&req).expect("translates");
        assert_eq!(g["systemInstruction"], json!({"parts":[{"text":"sys"}]}));
        assert_eq!(
            g["contents"][1],
            json!({"role":"model","parts":[{"functionCall":{"name":"f","args":{"a":1}}}]})
        );
        assert_eq!(
            g["contents"][2]["parts"][0]["functionResponse"]["name"],
            "f"
        );
        assert_eq!(g["generationConfig"]["maxOutputTokens"], 7);
        assert_eq!(
            g["tools"][0]["functionDeclarations"][0]["parameters"],
            json!({"type":"object","properties":{}})
        );
        let remote_image = json!({"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://x/y.png"}}]}]});
        assert!(openai_to_gemini(&remote_image).is_err());
    }

    #[test]
    fn gemini_answers_become_openai() {
        let r = json!({"candidates":[{"content":{"parts":[{"text":"hi "},{"functionCall":{"name":"f","args":{"a":1}}}],"role":"model"},"finishReason":"STOP"}],
            "usageMetadata":{"promptTokenCount":4,"candidatesTokenCount":3,"thoughtsTokenCount":2,"totalTokenCount":9},"modelVersion":"gemini-x","responseId":"r1"});
        let c = response_to_completion(&r);
        assert_eq!(c["choices"][0]["message"]["content"], "hi ");
        assert_eq!(
            c["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
            "{\"a\":1}"
        );
        assert_eq!(c["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(
            (
                c["usage"]["completion_tokens"].clone(),
                c["usage"]["prompt_tokens"].clone()
            ),
            (json!(5), json!(4))
        );
        assert_eq!(finish_reason_of("MAX_TOKENS", false), "length");
    }
}
