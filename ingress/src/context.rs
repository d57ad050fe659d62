//! The context budget of a session turn: how many tokens a model takes, and which turns
//! of a conversation fit into it.
//!
//! Tokens are counted with the billing tokenizer (tiktoken) by OpenAI's chat formula, the
//! same one the quota estimate uses: 3 tokens per message plus its role and content, and 3
//! priming the reply. The budget is the model's context limit minus what the reply may
//! use (`max_tokens`, else [`DEFAULT_REPLY_RESERVE`] or a quarter of the limit, whichever
//! is less). The system prompt and the newest turn are always kept; older turns are
//! dropped oldest first, and a kept history never starts with an assistant turn (some
//! providers refuse that).
//!
//! Context limits come from a small table of well-known model families, overridden and
//! extended by `SLUICE_CONTEXT_LIMITS` (`model=tokens,model=tokens`, exact names), with
//! `SLUICE_DEFAULT_CONTEXT_LIMIT` (default 8192) for models nobody named.

use std::collections::HashMap;

use billing::Encoding;

/// Tokens a chat message costs besides its role and content.
const TOKENS_PER_MESSAGE: u64 = 3;
/// Every reply is primed with `<|start|>assistant<|message|>`.
const REPLY_PRIMING: u64 = 3;
/// Reply tokens kept free when the turn sets no `max_tokens` (at most a quarter of the limit).
pub const DEFAULT_REPLY_RESERVE: u64 = 1024;
/// The limit of a model neither the table nor the configuration names: small enough to
/// fit every current chat model, so a cut history is never refused for its length.
pub const DEFAULT_CONTEXT_LIMIT: u64 = 8192;

/// Context windows of well-known model families, by name prefix (the longest match wins,
/// after any `provider/` prefix). Conservative where a family's members differ.
const KNOWN: &[(&str, u64)] = &[
    ("gpt-3.5-turbo", 16_385),
    ("gpt-4", 8_192),
    ("gpt-4-32k", 32_768),
    ("gpt-4-turbo", 128_000),
    ("gpt-4o", 128_000),
    ("gpt-4.1", 1_047_576),
    ("gpt-4.5", 128_000),
    ("gpt-5", 400_000),
    ("o1", 200_000),
    ("o3", 200_000),
    ("o4", 200_000),
    ("claude", 200_000),
    ("gemini", 1_048_576),
    ("deepseek", 65_536),
    ("qwen", 32_768),
    ("llama-3", 131_072),
    ("llama3", 131_072),
    ("mistral", 32_768),
    ("mistral-large", 131_072),
    ("grok", 131_072),
];

/// Context limits per model: the table above under the configured overrides.
#[derive(Debug, Clone)]
pub struct ContextLimits {
    exact: HashMap<String, u64>,
    default: u64,
}

impl Default for ContextLimits {
    fn default() -> Self {
        Self {
            exact: HashMap::new(),
            default: DEFAULT_CONTEXT_LIMIT,
        }
    }
}

impl ContextLimits {
    /// Reads `SLUICE_CONTEXT_LIMITS` and `SLUICE_DEFAULT_CONTEXT_LIMIT`; an entry that does
    /// not parse is skipped with a warning rather than stopping the gateway.
    pub fn from_env() -> Self {
        let mut limits = Self::default();
        if let Ok(v) = std::env::var("SLUICE_DEFAULT_CONTEXT_LIMIT") {
            match v.trim().parse::<u64>() {
                Ok(n) if n > 0 => limits.default = n,
                _ => tracing::warn!(
                    "SLUICE_DEFAULT_CONTEXT_LIMIT is not a positive number; using {}",
                    limits.default
                ),
            }
        }
        if let Ok(v) = std::env::var("SLUICE_CONTEXT_LIMITS") {
            limits.extend_from(&v);
        }
        limits
    }

    /// Adds `model=tokens` entries separated by commas.
    pub fn extend_from(&mut self, spec: &str) {
        for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            match entry.rsplit_once('=') {
                Some((model, n)) if !model.trim().is_empty() => match n.trim().parse::<u64>() {
                    Ok(n) if n > 0 => {
                        self.exact.insert(model.trim().to_owned(), n);
                    }
                    _ => tracing::warn!(
                        entry,
                        "SLUICE_CONTEXT_LIMITS entry without a positive token count; skipped"
                    ),
                },
                _ => tracing::warn!(
                    entry,
                    "SLUICE_CONTEXT_LIMITS entry is not `model=tokens`; skipped"
                ),
            }
        }
    }

    /// The context window of `model` in tokens.
    pub fn limit(&self, model: &str) -> u64 {
        if let Some(n) = self.exact.get(model) {
            return *n;
        }
        let name = model
            .rsplit('/')
            .next()
            .unwrap_or(model)
            .to_ascii_lowercase();
        KNOWN
            .iter()
            .filter(|(prefix, _)| name.starts_with(prefix))
            .max_by_key(|(prefix, _)| prefix.len())
            .map_or(self.default, |(_, n)| *n)
    }
}

/// One turn of a conversation as the model sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Turn<'a> {
    pub role: &'a str,
    pub content: &'a str,
}

/// Which turns fit: `turns[first..]`, costing `prompt_tokens` with the system prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    pub first: usize,
    pub prompt_tokens: u64,
    /// The budget the turns were cut to (context limit minus the reply's reserve).
    pub budget: u64,
}

impl Cut {
    pub fn dropped(&self) -> usize {
        self.first
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CutError {
    #[error("the reply's reserve of {reserve} tokens leaves nothing of the model's context of {limit} tokens; lower `max_tokens`")]
    NoRoom { reserve: u64, limit: u64 },
    #[error("the system prompt and the message need {needed} tokens, more than the {budget} the model's context leaves for them")]
    TooLong { needed: u64, budget: u64 },
}

/// The tokens the reply may use: `max_tokens`, else the default reserve (at most a
/// quarter of the limit, so small contexts keep room for history).
pub fn reply_reserve(limit: u64, max_tokens: Option<u64>) -> u64 {
    max_tokens.unwrap_or_else(|| DEFAULT_REPLY_RESERVE.min(limit / 4))
}

/// The prompt tokens of one message of `enc`.
pub fn message_tokens(enc: Encoding, role: &str, content: &str) -> u64 {
    TOKENS_PER_MESSAGE + enc.count(role) + enc.count(content)
}

/// Keeps the newest turns that fit, with the system prompt, into `limit` minus the
/// reply's reserve. The last turn (the one being answered) is always kept: if it does not
/// fit with the system prompt, the turn cannot be sent at all.
pub fn cut(
    model: &str,
    system: Option<&str>,
    turns: &[Turn<'_>],
    limit: u64,
    max_tokens: Option<u64>,
) -> Result<Cut, CutError> {
    let reserve = reply_reserve(limit, max_tokens);
    let budget = limit
        .checked_sub(reserve)
        .filter(|b| *b > 0)
        .ok_or(CutError::NoRoom { reserve, limit })?;
    let enc = Encoding::for_model(model);
    let mut used = REPLY_PRIMING + system.map_or(0, |s| message_tokens(enc, "system", s));
    let mut first = turns.len();
    for (i, turn) in turns.iter().enumerate().rev() {
        let cost = message_tokens(enc, turn.role, turn.content);
        if used + cost > budget {
            if i + 1 == turns.len() {
                return Err(CutError::TooLong {
                    needed: used + cost,
                    budget,
                });
            }
            break;
        }
        used += cost;
        first = i;
    }
    // A history that starts with the model's answer to a dropped question confuses
    // models and is refused by some providers: drop it too.
    while first + 1 < turns.len() && turns[first].role == "assistant" {
        used -= message_tokens(enc, turns[first].role, turns[first].content);
        first += 1;
    }
    Ok(Cut {
        first,
        prompt_tokens: used,
        budget,
    })
}

/// The `messages` array of the request: the system prompt, then the kept turns.
pub fn messages(system: Option<&str>, turns: &[Turn<'_>]) -> Vec<serde_json::Value> {
    let mut out = Vec::with_capacity(turns.len() + 1);
    if let Some(system) = system {
        out.push(serde_json::json!({"role": "system", "content": system}));
    }
    for t in turns {
        out.push(serde_json::json!({"role": t.role, "content": t.content}));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turns(texts: &[(&'static str, &'static str)]) -> Vec<Turn<'static>> {
        texts
            .iter()
            .map(|(role, content)| Turn { role, content })
            .collect()
    }

    #[test]
    fn everything_fits_in_a_large_context() {
        let t = turns(&[
            ("user", "hello"),
            ("assistant", "hi there"),
            ("user", "again"),
        ]);
        let cut = cut("gpt-4o", Some("be brief"), &t, 128_000, None).expect("fits");
        assert_eq!(cut.first, 0);
        assert_eq!(cut.budget, 128_000 - DEFAULT_REPLY_RESERVE);
        // The same count the quota estimate makes for the request body.
        let body = serde_json::json!({"messages": messages(Some("be brief"), &t)});
        assert_eq!(cut.prompt_tokens, billing::estimate_prompt("gpt-4o", &body));
    }

    #[test]
    fn oldest_turns_go_first_and_never_leave_an_assistant_turn_first() {
        let t = turns(&[
            ("user", "one two three four five six seven eight"),
            ("assistant", "nine ten eleven twelve"),
            ("user", "thirteen"),
            (
                "assistant",
                "fourteen fifteen sixteen seventeen eighteen nineteen twenty",
            ),
            ("user", "last"),
        ]);
        let enc = Encoding::for_model("gpt-4o");
        let tail: u64 = t[3..]
            .iter()
            .map(|x| message_tokens(enc, x.role, x.content))
            .sum();
        let system = message_tokens(enc, "system", "sys");
        // Room for the last two turns and the system prompt, not for the third-last.
        let limit = REPLY_PRIMING + system + tail + 2 + 10;
        let cut = cut("gpt-4o", Some("sys"), &t, limit, Some(10)).expect("fits");
        // Turns 3.. fit, but turn 3 is an answer whose question was dropped.
        assert_eq!(cut.first, 4);
        assert_eq!(
            cut.prompt_tokens,
            REPLY_PRIMING + system + message_tokens(enc, "user", "last")
        );
        assert!(cut.prompt_tokens <= cut.budget);
    }

    #[test]
    fn the_last_turn_must_fit() {
        let t = turns(&[("user", "a long message that does not fit at all")]);
        assert!(matches!(
            cut("gpt-4o", None, &t, 12, Some(1)),
            Err(CutError::TooLong { .. })
        ));
        assert!(matches!(
            cut("gpt-4o", None, &t, 100, Some(100)),
            Err(CutError::NoRoom { .. })
        ));
    }

    #[test]
    fn limits_by_family_and_configuration() {
        let mut limits = ContextLimits::default();
        assert_eq!(limits.limit("gpt-4o-mini"), 128_000);
        assert_eq!(limits.limit("gpt-4"), 8_192);
        assert_eq!(limits.limit("gpt-4-turbo-preview"), 128_000);
        assert_eq!(limits.limit("openai/gpt-4.1-mini"), 1_047_576);
        assert_eq!(limits.limit("claude-sonnet-4"), 200_000);
        assert_eq!(limits.limit("something-new"), DEFAULT_CONTEXT_LIMIT);
        limits.extend_from("something-new=300, gpt-4o = 1000,bad,x=0");
        assert_eq!(limits.limit("something-new"), 300);
        assert_eq!(limits.limit("gpt-4o"), 1000);
        assert_eq!(limits.limit("x"), DEFAULT_CONTEXT_LIMIT);
    }
}
