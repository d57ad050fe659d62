//! Usage when the provider reports none: the prompt and the generated text counted with
//! the billing tokenizer, so the events can say `usage_source: estimated`.

use billing::tokenizer;
use schemas::Usage;
use serde_json::value::RawValue;

use crate::tally::Tally;

/// Provider usage when there is some, else a remote node's estimate, else the tokenizer's
/// estimate for `model`.
pub fn usage_of(tally: &Tally, model: &str, body: &RawValue) -> (Usage, schemas::UsageSource) {
    match (tally.usage, tally.estimated) {
        (Some(usage), _) => (usage, schemas::UsageSource::Provider),
        (None, Some(usage)) => (usage, schemas::UsageSource::Estimated),
        (None, None) => (
            estimate(model, body, &tally.text),
            schemas::UsageSource::Estimated,
        ),
    }
}

/// Estimates usage for a request body and the text generated for it. The body is only
/// parsed here, on this rare path, never on the hot path.
pub fn estimate(model: &str, body: &RawValue, completion: &str) -> Usage {
    let prompt = serde_json::from_str::<serde_json::Value>(body.get())
        .map(|v| tokenizer::estimate_prompt(model, &v))
        .unwrap_or(0);
    let completion = tokenizer::count_text(model, completion);
    Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
        cached_tokens: 0,
        reasoning_tokens: 0,
        cache_creation_tokens: 0,
        images: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_usage_wins_and_estimates_count_both_sides() {
        let body = RawValue::from_string(
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hello there, how are you?"}]}"#.to_owned(),
        )
        .expect("raw");
        let mut tally = Tally {
            text: "I am fine, thank you.".to_owned(),
            ..Tally::default()
        };
        let (usage, source) = usage_of(&tally, "gpt-4o", &body);
        assert_eq!(source, schemas::UsageSource::Estimated);
        assert!(
            usage.prompt_tokens > 6 && usage.completion_tokens > 3,
            "{usage:?}"
        );
        assert_eq!(
            usage.total_tokens,
            usage.prompt_tokens + usage.completion_tokens
        );

        tally.usage = Some(Usage {
            prompt_tokens: 1,
            completion_tokens: 2,
            total_tokens: 3,
            ..Usage::default()
        });
        assert_eq!(
            usage_of(&tally, "gpt-4o", &body),
            (tally.usage.expect("set"), schemas::UsageSource::Provider)
        );
    }
}
