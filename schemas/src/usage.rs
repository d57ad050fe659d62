//! Token usage of one request, in OpenAI's names, and where the numbers came from.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// Prompt tokens served from the provider's cache; included in `prompt_tokens`.
    #[serde(default)]
    pub cached_tokens: u64,
    /// Reasoning tokens; included in `completion_tokens`.
    #[serde(default)]
    pub reasoning_tokens: u64,
    /// Prompt tokens written to the provider's cache (Anthropic's
    /// `cache_creation_input_tokens`); included in `prompt_tokens`.
    #[serde(default)]
    pub cache_creation_tokens: u64,
    /// Images generated (`/v1/images/generations`); each is charged the price's
    /// `per_request` amount.
    #[serde(default)]
    pub images: u64,
}

/// Whether usage was reported by the provider or estimated by Sluice's tokenizer.
/// Provider usage always wins when present; the event records which one was billed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageSource {
    Provider,
    Estimated,
}

impl Usage {
    /// Reads an OpenAI `usage` object (chat completions), keeping the cached and reasoning details.
    pub fn from_openai(v: &serde_json::Value) -> Option<Usage> {
        let prompt = v.get("prompt_tokens")?.as_u64()?;
        let completion = v
            .get("completion_tokens")
            .and_then(|x| x.as_u64())
            .unwrap_or(0);
        let total = v
            .get("total_tokens")
            .and_then(|x| x.as_u64())
            .unwrap_or(prompt + completion);
        let cached = v
            .pointer("/prompt_tokens_details/cached_tokens")
            .and_then(|x| x.as_u64())
            .unwrap_or(0);
        let reasoning = v
            .pointer("/completion_tokens_details/reasoning_tokens")
            .and_then(|x| x.as_u64())
            .unwrap_or(0);
        Some(Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: total,
            cached_tokens: cached,
            reasoning_tokens: reasoning,
            cache_creation_tokens: 0,
            images: 0,
        })
    }

    /// Reads an Anthropic `usage` object. Anthropic's `input_tokens` excludes cache reads
    /// and writes; `prompt_tokens` here includes both, as OpenAI's does.
    pub fn from_anthropic(v: &serde_json::Value) -> Option<Usage> {
        let n = |name: &str| v.get(name).and_then(serde_json::Value::as_u64).unwrap_or(0);
        if !v.is_object() {
            return None;
        }
        let (read, write) = (
            n("cache_read_input_tokens"),
            n("cache_creation_input_tokens"),
        );
        let prompt = n("input_tokens") + read + write;
        let completion = n("output_tokens");
        Some(Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            cached_tokens: read,
            reasoning_tokens: 0,
            cache_creation_tokens: write,
            images: 0,
        })
    }

    /// The Anthropic `usage` object for this usage.
    pub fn to_anthropic(&self) -> serde_json::Value {
        let uncached = self
            .prompt_tokens
            .saturating_sub(self.cached_tokens + self.cache_creation_tokens);
        serde_json::json!({
            "input_tokens": uncached,
            "cache_creation_input_tokens": self.cache_creation_tokens,
            "cache_read_input_tokens": self.cached_tokens,
            "output_tokens": self.completion_tokens,
        })
    }

    /// The OpenAI `usage` object for this usage.
    pub fn to_openai(&self) -> serde_json::Value {
        serde_json::json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
        })
    }
}
