//! Anthropic Messages wire types Sluice must inspect: validation of `/v1/messages` bodies
//! for the fields Sluice relies on, Anthropic's error shape, and the stop-reason mapping
//! between Anthropic and OpenAI. Bodies themselves stay raw JSON.

use serde_json::Value;

use crate::openai::{ChatRequestView, InvalidRequest};
use crate::work::{ApiErrorInfo, ErrorKind};

/// Anthropic's error `type` for a status, as its API reports them.
pub fn error_type_for(status: u16, kind: ErrorKind) -> &'static str {
    match (status, kind) {
        (401, _) => "authentication_error",
        (403, _) => "permission_error",
        (404, _) => "not_found_error",
        (413, _) => "request_too_large",
        (429, _) => "rate_limit_error",
        (400..=499, _) => "invalid_request_error",
        (529, _) | (503, ErrorKind::Overloaded) => "overloaded_error",
        (504, _) => "timeout_error",
        _ => "api_error",
    }
}

/// Anthropic's error body: `{"type":"error","error":{"type","message"}}`.
pub fn error_json(info: &ApiErrorInfo) -> Value {
    serde_json::json!({
        "type": "error",
        "error": {"type": error_type_for(info.status, info.kind), "message": info.message},
    })
}

/// OpenAI's `finish_reason` for an Anthropic `stop_reason`.
pub fn finish_reason_of(stop_reason: &str) -> &'static str {
    match stop_reason {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        // end_turn, stop_sequence, pause_turn and anything new.
        _ => "stop",
    }
}

/// Anthropic's `stop_reason` for an OpenAI `finish_reason`.
pub fn stop_reason_of(finish_reason: &str) -> &'static str {
    match finish_reason {
        "length" => "max_tokens",
        "tool_calls" | "function_call" => "tool_use",
        "content_filter" => "refusal",
        _ => "end_turn",
    }
}

fn invalid(param: &str, message: impl Into<String>) -> InvalidRequest {
    InvalidRequest {
        message: message.into(),
        param: Some(param.to_owned()),
    }
}

/// Validates a `/v1/messages` body the way Anthropic does for the fields Sluice reads.
/// The view's `include_usage` is always true: Anthropic streams always carry usage.
pub fn validate_messages_request(body: &Value) -> Result<ChatRequestView, InvalidRequest> {
    let obj = body.as_object().ok_or_else(|| InvalidRequest {
        message: "the request body must be a JSON object".into(),
        param: None,
    })?;
    let model = match obj.get("model") {
        Some(Value::String(m)) if !m.trim().is_empty() => m.clone(),
        _ => {
            return Err(invalid(
                "model",
                "model: Field required (a non-empty string)",
            ))
        }
    };
    let max_tokens = match obj.get("max_tokens") {
        Some(Value::Number(n)) if n.as_u64().is_some_and(|n| n >= 1) => n.as_u64(),
        Some(_) => {
            return Err(invalid(
                "max_tokens",
                "max_tokens: must be a positive integer",
            ))
        }
        None => return Err(invalid("max_tokens", "max_tokens: Field required")),
    };
    validate_messages(obj.get("messages"))?;
    match obj.get("system") {
        None | Some(Value::Null) | Some(Value::String(_)) => {}
        Some(Value::Array(blocks)) if blocks.iter().all(Value::is_object) => {}
        Some(_) => {
            return Err(invalid(
                "system",
                "system: must be a string or an array of text blocks",
            ))
        }
    }
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(invalid("stream", "stream: must be a boolean")),
    };
    Ok(ChatRequestView {
        model,
        stream,
        include_usage: true,
        max_tokens,
    })
}

/// Validates the `messages` of a Messages body (also used by `count_tokens`).
pub fn validate_messages(messages: Option<&Value>) -> Result<(), InvalidRequest> {
    let messages = match messages {
        Some(Value::Array(m)) if !m.is_empty() => m,
        Some(Value::Array(_)) => {
            return Err(invalid(
                "messages",
                "messages: at least one message is required",
            ))
        }
        Some(_) => return Err(invalid("messages", "messages: must be an array")),
        None => return Err(invalid("messages", "messages: Field required")),
    };
    for (i, m) in messages.iter().enumerate() {
        let param = format!("messages.{i}");
        let m = m
            .as_object()
            .ok_or_else(|| invalid(&param, format!("{param}: must be an object")))?;
        match m.get("role").and_then(Value::as_str) {
            Some("user" | "assistant") => {}
            _ => {
                return Err(invalid(
                    &format!("{param}.role"),
                    format!("{param}.role: must be `user` or `assistant`"),
                ))
            }
        }
        match m.get("content") {
            Some(Value::String(_)) => {}
            Some(Value::Array(blocks)) if blocks.iter().all(Value::is_object) => {}
            _ => {
                return Err(invalid(
                    &format!("{param}.content"),
                    format!("{param}.content: must be a string or an array of content blocks"),
                ))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn validates_the_fields_sluice_reads() {
        let ok = json!({"model":"claude","max_tokens":16,"stream":true,"system":"be brief",
            "messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]});
        let view = validate_messages_request(&ok).expect("valid");
        assert_eq!(
            (view.model.as_str(), view.stream, view.max_tokens),
            ("claude", true, Some(16))
        );
        let no_max = json!({"model":"claude","messages":[{"role":"user","content":"hi"}]});
        assert_eq!(
            validate_messages_request(&no_max)
                .expect_err("max_tokens required")
                .param
                .as_deref(),
            Some("max_tokens")
        );
        let system_role =
            json!({"model":"c","max_tokens":1,"messages":[{"role":"system","content":"x"}]});
        assert_eq!(
            validate_messages_request(&system_role)
                .expect_err("bad role")
                .param
                .as_deref(),
            Some("messages.0.role")
        );
    }

    #[test]
    fn errors_and_stop_reasons_use_anthropic_names() {
        let info = ApiErrorInfo {
            status: 529,
            kind: ErrorKind::Overloaded,
            message: "busy".into(),
            code: None,
            param: None,
            retry_after: None,
        };
        assert_eq!(
            error_json(&info),
            json!({"type":"error","error":{"type":"overloaded_error","message":"busy"}})
        );
        assert_eq!(
            error_type_for(429, ErrorKind::RateLimited),
            "rate_limit_error"
        );
        assert_eq!(error_type_for(502, ErrorKind::Upstream5xx), "api_error");
        for (stop, finish) in [
            ("end_turn", "stop"),
            ("max_tokens", "length"),
            ("tool_use", "tool_calls"),
        ] {
            assert_eq!(finish_reason_of(stop), finish);
            assert_eq!(stop_reason_of(finish), stop);
        }
    }
}
