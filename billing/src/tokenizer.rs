//! Token estimates with OpenAI's tokenizers (tiktoken-rs), used when a provider reports no
//! usage and for quota reservations before a request runs. Provider usage always wins;
//! events record `usage_source: estimated` when these numbers were billed.
//!
//! Building a BPE table takes tens of milliseconds and megabytes, so each encoding is built
//! once per process (lazily, on first use) and shared; counting is then pure CPU.

use std::sync::LazyLock;

use serde_json::Value;
use tiktoken_rs::CoreBPE;

/// The BPE vocabulary a model uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// GPT-4o, GPT-4.1, GPT-4.5, GPT-5, the o-series, and unknown models (the current
    /// vocabulary is the best guess for anything new).
    O200kBase,
    /// GPT-3.5, GPT-4 (not `4o`, not `4.x`), and the OpenAI embedding models.
    Cl100kBase,
}

// `None` only if the vocabulary embedded in tiktoken-rs fails to parse; counting then
// falls back to a byte heuristic rather than panicking on the hot path.
static O200K: LazyLock<Option<CoreBPE>> = LazyLock::new(|| tiktoken_rs::o200k_base().ok());
static CL100K: LazyLock<Option<CoreBPE>> = LazyLock::new(|| tiktoken_rs::cl100k_base().ok());

/// Tokens added per chat message by the chat format (`<|start|>{role}\n{content}<|end|>\n`).
const TOKENS_PER_MESSAGE: u64 = 3;
/// A `name` field costs its own tokens plus one.
const TOKENS_PER_NAME: u64 = 1;
/// Every reply is primed with `<|start|>assistant<|message|>`.
const REPLY_PRIMING: u64 = 3;

impl Encoding {
    pub fn for_model(model: &str) -> Self {
        let m = model
            .rsplit('/')
            .next()
            .unwrap_or(model)
            .to_ascii_lowercase();
        let gpt4_classic = m
            .strip_prefix("gpt-4")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'));
        if m.starts_with("gpt-3.5")
            || m.starts_with("gpt-35")
            || gpt4_classic
            || m.starts_with("text-embedding-")
        {
            Encoding::Cl100kBase
        } else {
            Encoding::O200kBase
        }
    }

    fn bpe(self) -> Option<&'static CoreBPE> {
        match self {
            Encoding::O200kBase => O200K.as_ref(),
            Encoding::Cl100kBase => CL100K.as_ref(),
        }
    }

    /// Tokens in `text`. Special-token markers in user text count as plain text, as the
    /// OpenAI API treats them.
    pub fn count(self, text: &str) -> u64 {
        if text.is_empty() {
            return 0;
        }
        match self.bpe() {
            Some(bpe) => bpe.encode_ordinary(text).len() as u64,
            // About four bytes per token for English text.
            None => (text.len() as u64).div_ceil(4),
        }
    }
}

/// Builds both vocabularies now, so the first request does not pay for it; roles that
/// estimate tokens call this at start-up (counting works without it, lazily).
pub fn preload() {
    LazyLock::force(&O200K);
    LazyLock::force(&CL100K);
}

/// Tokens in `text` for `model`'s encoding.
pub fn count_text(model: &str, text: &str) -> u64 {
    Encoding::for_model(model).count(text)
}

/// Estimated prompt tokens of a request body. Chat bodies (`messages`) follow OpenAI's
/// published formula: per message 3 tokens plus its role, content and name (name + 1),
/// plus 3 for the reply priming; tool calls and tool definitions add their text. Bodies
/// with `input` or `prompt` (responses, embeddings, completions) count that text. Images
/// and audio parts are not counted: this is an estimate, and provider usage wins.
pub fn estimate_prompt(model: &str, body: &Value) -> u64 {
    let enc = Encoding::for_model(model);
    let Some(messages) = body.get("messages").and_then(Value::as_array) else {
        return ["input", "prompt"]
            .iter()
            .filter_map(|field| body.get(*field))
            .map(|v| count_value_text(enc, v))
            .sum();
    };
    let mut tokens = REPLY_PRIMING;
    for message in messages {
        tokens += TOKENS_PER_MESSAGE;
        if let Some(role) = message.get("role").and_then(Value::as_str) {
            tokens += enc.count(role);
        }
        if let Some(content) = message.get("content") {
            tokens += count_value_text(enc, content);
        }
        if let Some(name) = message.get("name").and_then(Value::as_str) {
            tokens += enc.count(name) + TOKENS_PER_NAME;
        }
        for call in message
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(function) = call.get("function") {
                tokens += str_field(enc, function, "name") + str_field(enc, function, "arguments");
            }
        }
    }
    for tool in body
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(function) = tool.get("function") {
            tokens += enc.count(&function.to_string());
        }
    }
    tokens
}

fn str_field(enc: Encoding, v: &Value, field: &str) -> u64 {
    v.get(field)
        .and_then(Value::as_str)
        .map_or(0, |s| enc.count(s))
}

/// The text of a content value: a string, or an array of strings or parts with `text`
/// (OpenAI content parts, or the `input` array of the responses API).
fn count_value_text(enc: Encoding, v: &Value) -> u64 {
    match v {
        Value::String(s) => enc.count(s),
        Value::Array(parts) => parts
            .iter()
            .map(|part| match part {
                Value::String(s) => enc.count(s),
                Value::Object(_) => {
                    str_field(enc, part, "text")
                        + part.get("content").map_or(0, |c| count_value_text(enc, c))
                }
                _ => 0,
            })
            .sum(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn picks_the_encoding_by_model() {
        for m in [
            "gpt-4o",
            "gpt-4o-mini",
            "gpt-4.1-nano",
            "o3-mini",
            "o1",
            "gpt-5",
            "llama-3.1-8b",
            "openai/gpt-4o",
        ] {
            assert_eq!(Encoding::for_model(m), Encoding::O200kBase, "{m}");
        }
        for m in [
            "gpt-4",
            "gpt-4-turbo",
            "gpt-4-0613",
            "gpt-3.5-turbo",
            "gpt-35-turbo",
            "text-embedding-3-small",
        ] {
            assert_eq!(Encoding::for_model(m), Encoding::Cl100kBase, "{m}");
        }
    }

    #[test]
    fn counts_known_strings() {
        // Reference values from OpenAI's tiktoken.
        assert_eq!(count_text("gpt-4", "hello world"), 2);
        assert_eq!(count_text("gpt-4o", "hello world"), 2);
        assert_eq!(count_text("gpt-4o", ""), 0);
        assert_eq!(count_text("gpt-3.5-turbo", "tiktoken is great!"), 6);
    }

    #[test]
    fn chat_overhead_matches_openai_formula() {
        // OpenAI cookbook example: these two messages are 3 + (1 + 2) + 3 + (1 + 2) + 3
        // with "system"/"user" 1 token each and "hello world" 2 tokens.
        let body = json!({"model": "gpt-4o", "messages": [
            {"role": "system", "content": "hello world"},
            {"role": "user", "content": [{"type": "text", "text": "hello world"}]},
        ]});
        assert_eq!(estimate_prompt("gpt-4o", &body), 3 + 3 + 3 + 1 + 2 + 1 + 2);
        let named =
            json!({"messages": [{"role": "user", "name": "bob", "content": "hello world"}]});
        assert_eq!(estimate_prompt("gpt-4o", &named), 3 + 3 + 1 + 2 + 1 + 1);
        assert_eq!(
            estimate_prompt(
                "text-embedding-3-small",
                &json!({"input": ["hello world", "hello world"]})
            ),
            4
        );
    }
}
