//! Upcasting: stored events keep the shape they were written with forever; when a type's
//! shape changes, its `schema_version` is bumped (in [`crate::events::current_version`])
//! and one [`Upcaster`] step is registered here that rewrites data of the old version
//! into the next one. [`crate::Envelope::decode`] runs the steps in order, so a replay of
//! a years-old log decodes every event into today's types.
//!
//! History of the production types:
//! - `CompletionFinished` v1 → v2: v1 is the shape of the first journal format, written
//!   before Sluice estimated usage with its own tokenizer and before failover was
//!   recorded: no `usage_source` (all usage then came from the provider), no `attempts`
//!   (one attempt), no `ttft_ms`, and `usage` with only `prompt_tokens` and
//!   `completion_tokens`. v2 is today's shape. Its JSON is a superset of v1's, so the
//!   step only fills what is missing: a v1-numbered event that already has a field keeps
//!   its value.
//!
//! The tests below prove the mechanism `decode` uses with a test-only event type stored
//! as v1 and read as v3, and the real step with stored v1 events.

use serde_json::Value;

/// One step of an event type's history: data stored as version `from` becomes `from + 1`.
/// Steps are pure functions of the stored data (no clock, no lookups), so upcasting is
/// deterministic and a replay stays exact.
#[derive(Debug, Clone, Copy)]
pub struct Upcaster {
    pub event_type: &'static str,
    pub from: u16,
    pub upgrade: fn(Value) -> Value,
}

/// Every registered step, for every event type. Add an entry here together with each
/// `current_version` bump.
pub const UPCASTERS: &[Upcaster] = &[Upcaster {
    event_type: "CompletionFinished",
    from: 1,
    upgrade: completion_finished_v1_to_v2,
}];

/// `CompletionFinished` v1 → v2 (see the module docs): fills `usage_source` (`provider`),
/// `attempts` (1) and `usage.total_tokens` (prompt + completion) where absent. Data that is
/// not an object is left for `decode` to reject as malformed.
pub fn completion_finished_v1_to_v2(mut data: Value) -> Value {
    let Some(fields) = data.as_object_mut() else {
        return data;
    };
    fields
        .entry("usage_source")
        .or_insert_with(|| Value::from("provider"));
    fields.entry("attempts").or_insert_with(|| Value::from(1));
    if let Some(usage) = fields.get_mut("usage").and_then(Value::as_object_mut) {
        if !usage.contains_key("total_tokens") {
            let count = |name: &str| usage.get(name).and_then(Value::as_u64).unwrap_or(0);
            let total = count("prompt_tokens").saturating_add(count("completion_tokens"));
            usage.insert("total_tokens".to_owned(), Value::from(total));
        }
    }
    data
}

/// Brings `data` of `event_type`, stored as `version`, up to `target` by applying the
/// steps of `table` one version at a time. A version with no step is left as is (an
/// additive change with `#[serde(default)]` fields needs none).
pub fn upcast_with(
    table: &[Upcaster],
    event_type: &str,
    version: u16,
    target: u16,
    mut data: Value,
) -> Value {
    for from in version..target {
        if let Some(step) = table
            .iter()
            .find(|u| u.event_type == event_type && u.from == from)
        {
            data = (step.upgrade)(data);
        }
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    /// A test-only event type at its current version, 3. v1 stored `{"name": "Ada Lovelace"}`;
    /// v2 split the name; v3 added `greeting` (older events said "hello").
    #[derive(Debug, PartialEq, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct GreetedV3 {
        first_name: String,
        last_name: String,
        greeting: String,
    }

    fn v1_to_v2(mut data: Value) -> Value {
        let name = data
            .as_object_mut()
            .and_then(|o| o.remove("name"))
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let (first, last) = name.split_once(' ').unwrap_or((&name, ""));
        data["first_name"] = Value::from(first);
        data["last_name"] = Value::from(last);
        data
    }

    fn v2_to_v3(mut data: Value) -> Value {
        data["greeting"] = Value::from("hello");
        data
    }

    const TEST_UPCASTERS: &[Upcaster] = &[
        Upcaster {
            event_type: "Greeted",
            from: 2,
            upgrade: v2_to_v3,
        },
        Upcaster {
            event_type: "Greeted",
            from: 1,
            upgrade: v1_to_v2,
        },
    ];

    fn read(stored: &str) -> GreetedV3 {
        // Exactly as an event sits in `event_log` / on JetStream.
        let env: crate::Envelope = serde_json::from_str(stored).expect("stored envelope");
        let data = upcast_with(
            TEST_UPCASTERS,
            &env.event_type,
            env.schema_version,
            3,
            env.data,
        );
        serde_json::from_value(data).expect("current shape")
    }

    #[test]
    fn a_stored_v1_event_is_read_as_the_current_version() {
        let stored = r#"{"event_id": "0193a4b2-7c00-7000-8000-000000000001", "stream": "test-1",
            "type": "Greeted", "schema_version": 1, "occurred_at": "2025-01-01T00:00:00Z",
            "data": {"name": "Ada Lovelace"}}"#;
        assert_eq!(
            read(stored),
            GreetedV3 {
                first_name: "Ada".into(),
                last_name: "Lovelace".into(),
                greeting: "hello".into(),
            }
        );
    }

    #[test]
    fn steps_run_from_the_stored_version_only() {
        let v2 = r#"{"event_id": "0193a4b2-7c00-7000-8000-000000000002", "stream": "test-1",
            "type": "Greeted", "schema_version": 2, "occurred_at": "2025-06-01T00:00:00Z",
            "data": {"first_name": "Grace", "last_name": "Hopper"}}"#;
        assert_eq!(read(v2).greeting, "hello");
        let v3 = r#"{"event_id": "0193a4b2-7c00-7000-8000-000000000003", "stream": "test-1",
            "type": "Greeted", "schema_version": 3, "occurred_at": "2026-01-01T00:00:00Z",
            "data": {"first_name": "Alan", "last_name": "Turing", "greeting": "hi"}}"#;
        assert_eq!(read(v3).greeting, "hi");
        // Another type's steps never apply.
        let other = upcast_with(
            TEST_UPCASTERS,
            "Other",
            1,
            3,
            serde_json::json!({"name": "x"}),
        );
        assert_eq!(other, serde_json::json!({"name": "x"}));
    }

    /// A `CompletionFinished` exactly as the first journal format stored it.
    const STORED_V1_COMPLETION: &str = r#"{"event_id": "0193a4b2-7c00-7000-8000-0000000000c1",
        "stream": "request-0193a4b27c0070008000000000000aa1", "type": "CompletionFinished",
        "schema_version": 1, "occurred_at": "2025-02-01T09:30:00Z",
        "data": {"request_id": "0193a4b2-7c00-7000-8000-000000000aa1",
                 "key_id": "0193a4b2-7c00-7000-8000-000000000bb1", "user_id": null,
                 "model": "gpt-4o-mini", "channel_id": "0193a4b2-7c00-7000-8000-000000000cc1",
                 "channel_name": "openai-main", "upstream_model": "gpt-4o-mini-2024-07-18",
                 "usage": {"prompt_tokens": 1200, "completion_tokens": 300},
                 "finish_reason": "stop", "duration_ms": 950}}"#;

    #[test]
    fn a_stored_v1_completion_decodes_as_today_s_completion_finished() {
        use crate::events::Event;
        let env: crate::Envelope = serde_json::from_str(STORED_V1_COMPLETION).expect("envelope");
        let Ok(Event::CompletionFinished(e)) = env.decode() else {
            panic!("v1 CompletionFinished did not decode: {:?}", env.decode());
        };
        assert_eq!(e.usage_source, crate::UsageSource::Provider);
        assert_eq!(e.attempts, 1);
        assert_eq!(e.ttft_ms, None);
        assert_eq!(
            (
                e.usage.prompt_tokens,
                e.usage.completion_tokens,
                e.usage.total_tokens
            ),
            (1200, 300, 1500)
        );
        assert_eq!((e.usage.cached_tokens, e.usage.reasoning_tokens), (0, 0));
        assert_eq!(e.duration_ms, 950);
    }

    #[test]
    fn the_v1_completion_step_keeps_fields_that_are_present() {
        // Events numbered v1 by builds that already wrote today's shape stay as they were.
        let written = serde_json::json!({"usage_source": "estimated", "attempts": 3,
            "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 99}});
        assert_eq!(completion_finished_v1_to_v2(written.clone()), written);
        assert_eq!(
            completion_finished_v1_to_v2(Value::from("not an object")),
            Value::from("not an object")
        );
        // Today's events are written as the current version and pass no step.
        assert_eq!(
            crate::events::current_version("CompletionFinished"),
            Some(2)
        );
    }

    #[test]
    fn every_registered_step_targets_a_known_type_below_its_current_version() {
        for step in UPCASTERS {
            let current = crate::events::current_version(step.event_type);
            assert!(
                current.is_some_and(|c| step.from < c),
                "upcaster for `{}` v{} has no newer version to reach",
                step.event_type,
                step.from
            );
        }
    }
}
