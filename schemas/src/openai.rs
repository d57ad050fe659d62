//! OpenAI wire types Sluice must inspect. Request bodies stay raw JSON and are forwarded
//! untouched; this module only validates the fields Sluice relies on and builds OpenAI's
//! error shape.

use serde::Serialize;
use serde_json::Value;

use crate::work::{ApiErrorInfo, ErrorKind};

/// OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorBody<'a> {
    pub error: ErrorObject<'a>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ErrorObject<'a> {
    pub message: &'a str,
    #[serde(rename = "type")]
    pub error_type: &'a str,
    pub param: Option<&'a str>,
    pub code: Option<&'a str>,
}

/// OpenAI's `type` for a status, as its API reports them.
pub fn error_type_for(status: u16, kind: ErrorKind) -> &'static str {
    match (status, kind) {
        (401, _) => "invalid_request_error",
        (403, _) => "permission_error",
        (404, _) => "invalid_request_error",
        (429, _) => "rate_limit_exceeded",
        (400..=499, _) => "invalid_request_error",
        (503, ErrorKind::Overloaded) => "overloaded_error",
        _ => "server_error",
    }
}

pub fn error_json(info: &ApiErrorInfo) -> Value {
    let body = ErrorBody {
        error: ErrorObject {
            message: &info.message,
            error_type: error_type_for(info.status, info.kind),
            param: info.param.as_deref(),
            code: info.code.as_deref(),
        },
    };
    serde_json::to_value(body).unwrap_or(Value::Null)
}

/// What Sluice needs to know about a chat completion request.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequestView {
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    pub max_tokens: Option<u64>,
}

/// A request the API rejects, naming the offending field as OpenAI's `param`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidRequest {
    pub message: String,
    pub param: Option<String>,
}

fn invalid(param: &str, message: impl Into<String>) -> InvalidRequest {
    InvalidRequest {
        message: message.into(),
        param: Some(param.to_owned()),
    }
}

const ROLES: &[&str] = &[
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];

/// Validates a `/v1/chat/completions` body the way OpenAI does for the fields Sluice reads.
pub fn validate_chat_request(body: &Value) -> Result<ChatRequestView, InvalidRequest> {
    let obj = body.as_object().ok_or_else(|| InvalidRequest {
        message: "the request body must be a JSON object".into(),
        param: None,
    })?;
    let model = match obj.get("model") {
        Some(Value::String(m)) if !m.trim().is_empty() => m.clone(),
        Some(Value::String(_)) => return Err(invalid("model", "`model` must not be empty")),
        Some(_) => return Err(invalid("model", "`model` must be a string")),
        None => return Err(invalid("model", "you must provide a model parameter")),
    };
    let messages = match obj.get("messages") {
        Some(Value::Array(m)) => m,
        Some(_) => return Err(invalid("messages", "`messages` must be an array")),
        None => {
            return Err(invalid(
                "messages",
                "missing required parameter: `messages`",
            ))
        }
    };
    if messages.is_empty() {
        return Err(invalid(
            "messages",
            "`messages` must contain at least one message",
        ));
    }
    for (i, m) in messages.iter().enumerate() {
        let param = format!("messages[{i}]");
        let m = m
            .as_object()
            .ok_or_else(|| invalid(&param, format!("`{param}` must be an object")))?;
        match m.get("role").and_then(Value::as_str) {
            Some(role) if ROLES.contains(&role) => {}
            Some(role) => {
                return Err(invalid(
                    &format!("{param}.role"),
                    format!("`{param}.role` `{role}` is not one of {ROLES:?}"),
                ))
            }
            None => {
                return Err(invalid(
                    &format!("{param}.role"),
                    format!("`{param}.role` is required"),
                ))
            }
        }
        match m.get("content") {
            None | Some(Value::Null) | Some(Value::String(_)) => {}
            Some(Value::Array(parts)) => {
                if parts.iter().any(|p| !p.is_object()) {
                    return Err(invalid(
                        &format!("{param}.content"),
                        "content parts must be objects",
                    ));
                }
            }
            Some(_) => {
                return Err(invalid(
                    &format!("{param}.content"),
                    format!("`{param}.content` must be a string or an array of parts"),
                ))
            }
        }
    }
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(invalid("stream", "`stream` must be a boolean")),
    };
    let include_usage = match obj.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => {
            if !stream {
                return Err(invalid(
                    "stream_options",
                    "`stream_options` is only allowed when `stream` is true",
                ));
            }
            match o.get("include_usage") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(invalid(
                        "stream_options.include_usage",
                        "`include_usage` must be a boolean",
                    ))
                }
            }
        }
        Some(_) => {
            return Err(invalid(
                "stream_options",
                "`stream_options` must be an object",
            ))
        }
    };
    let mut max_tokens = None;
    for field in ["max_tokens", "max_completion_tokens"] {
        match obj.get(field) {
            None | Some(Value::Null) => {}
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => max_tokens = Some(n),
                _ => {
                    return Err(invalid(
                        field,
                        format!("`{field}` must be a positive integer"),
                    ))
                }
            },
        }
    }
    if let Some(t) = obj.get("temperature").filter(|v| !v.is_null()) {
        match t.as_f64() {
            Some(t) if (0.0..=2.0).contains(&t) => {}
            _ => {
                return Err(invalid(
                    "temperature",
                    "`temperature` must be a number between 0 and 2",
                ))
            }
        }
    }
    if let Some(n) = obj.get("n").filter(|v| !v.is_null()) {
        match n.as_u64() {
            Some(n) if (1..=128).contains(&n) => {}
            _ => return Err(invalid("n", "`n` must be an integer between 1 and 128")),
        }
    }
    Ok(ChatRequestView {
        model,
        stream,
        include_usage,
        max_tokens,
    })
}

/// The text of every message, for token estimates: string content and the `text` of parts.
pub fn message_texts(body: &Value) -> impl Iterator<Item = &str> {
    body.get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .flat_map(|m| match m.get("content") {
            Some(Value::String(s)) => vec![s.as_str()],
            Some(Value::Array(parts)) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect(),
            _ => Vec::new(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn accepts_a_normal_request() {
        let v = validate_chat_request(&json!({
            "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
            "stream": true, "stream_options": {"include_usage": true}, "max_tokens": 5, "seed": 1
        }))
        .expect("valid");
        assert_eq!(
            v,
            ChatRequestView {
                model: "gpt-4o-mini".into(),
                stream: true,
                include_usage: true,
                max_tokens: Some(5)
            }
        );
    }

    #[test]
    fn names_the_offending_field() {
        let cases = [
            (json!([]), None),
            (json!({"messages": []}), Some("model")),
            (json!({"model": 3, "messages": []}), Some("model")),
            (json!({"model": "m", "messages": []}), Some("messages")),
            (json!({"model": "m", "messages": "hi"}), Some("messages")),
            (
                json!({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}),
                Some("messages[0].role"),
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": 5}]}),
                Some("messages[0].content"),
            ),
            (
                json!({"model": "m", "messages": [{"role": "user"}], "stream": "yes"}),
                Some("stream"),
            ),
            (
                json!({"model": "m", "messages": [{"role": "user"}], "max_tokens": -1}),
                Some("max_tokens"),
            ),
            (
                json!({"model": "m", "messages": [{"role": "user"}], "temperature": 9}),
                Some("temperature"),
            ),
        ];
        for (body, param) in cases {
            let err = validate_chat_request(&body).expect_err("invalid");
            assert_eq!(err.param.as_deref(), param, "{body}");
        }
    }
}
