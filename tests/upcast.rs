//! Upcasting with a real stored v1 event: a log written by the first journal format (a
//! `CompletionFinished` without `usage_source`, `attempts` or `usage.total_tokens`, stored
//! as `schema_version` 1 with raw SQL, as that journal wrote it) next to today's events is
//! billed correctly by the live billing projector and by `sluice replay billing`, and the
//! two agree row for row.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};

use chrono::{TimeZone, Utc};
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

use billing::BillingProjection;
use common::{sluice_bin, DATABASE_URL, NATS_URL};
use projector::RequestsProjection;
use schemas::events::{CompletionFinished, Metadata, RequestAccepted};
use schemas::work::Api;
use schemas::{Event, Namespace, Usage, UsageSource};

const OLD_MODEL: &str = "gpt-old";

async fn insert_raw(pool: &PgPool, position: i64, event_type: &str, version: i16, data: Value) {
    let stream = match data.get("request_id").and_then(Value::as_str) {
        Some(id) => format!("request-{}", id.replace('-', "")),
        None => format!("price-{OLD_MODEL}"),
    };
    sqlx::query(
        "INSERT INTO event_log (position, event_id, stream, type, schema_version, data, metadata, occurred_at) \
         VALUES ($1, $2, $3, $4, $5, $6, '{}'::jsonb, $7)",
    )
    .bind(position)
    .bind(Uuid::now_v7())
    .bind(stream)
    .bind(event_type)
    .bind(version)
    .bind(data)
    .bind(Utc.with_ymd_and_hms(2025, 2, 1, 9, 0, 0).unwrap() + chrono::Duration::seconds(position))
    .execute(pool)
    .await
    .unwrap();
}

async fn ledger(pool: &PgPool, schema: &str) -> Vec<Value> {
    sqlx::query_scalar(&format!(
        "SELECT to_jsonb(l) FROM \"{schema}\".ledger_entries l ORDER BY position"
    ))
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_v1_completion_is_billed_by_live_billing_and_by_replay() {
    let ns = Namespace::new(&format!("t_{}", Uuid::now_v7().simple())).unwrap();
    let pool = projector::db::connect(DATABASE_URL, &ns, 4).await.unwrap();
    projector::db::migrate(&pool, &ns).await.unwrap();
    let (key, old_request, new_request) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());

    // $0.15 input and $0.60 output per million tokens, as the first journal stored prices.
    insert_raw(
        &pool,
        1,
        "PriceSet",
        1,
        json!({"model": OLD_MODEL, "effective_at": "2025-01-01T00:00:00Z",
               "price": {"input_per_mtok": 150_000_000, "output_per_mtok": 600_000_000,
                         "cached_input_per_mtok": null}}),
    )
    .await;
    insert_raw(
        &pool,
        2,
        "RequestAccepted",
        1,
        json!({"request_id": old_request, "api": "chat_completions", "model": OLD_MODEL,
               "stream": false, "key_id": key, "user_id": null, "group": "default"}),
    )
    .await;
    // The v1 shape: no usage_source, attempts, ttft_ms nor usage.total_tokens.
    insert_raw(
        &pool,
        3,
        "CompletionFinished",
        1,
        json!({"request_id": old_request, "key_id": key, "user_id": null, "model": OLD_MODEL,
               "channel_id": Uuid::now_v7(), "channel_name": "openai-main",
               "upstream_model": "gpt-old-2024", "usage": {"prompt_tokens": 1200, "completion_tokens": 300},
               "finish_reason": "stop", "duration_ms": 950}),
    )
    .await;
    // Today's events for a second request, appended as the journal appends them.
    let accepted = Event::RequestAccepted(RequestAccepted {
        request_id: new_request,
        api: Api::ChatCompletions,
        model: OLD_MODEL.into(),
        stream: true,
        key_id: key,
        user_id: None,
        group: "default".into(),
        session_id: None,
    });
    let finished = Event::CompletionFinished(CompletionFinished {
        request_id: new_request,
        key_id: key,
        user_id: None,
        model: OLD_MODEL.into(),
        channel_id: Uuid::now_v7(),
        channel_name: "openai-main".into(),
        upstream_model: "gpt-old-2024".into(),
        usage: Usage {
            prompt_tokens: 100,
            completion_tokens: 20,
            total_tokens: 120,
            ..Usage::default()
        },
        usage_source: UsageSource::Estimated,
        finish_reason: Some("stop".into()),
        ttft_ms: Some(80),
        duration_ms: 400,
        attempts: 2,
        session_id: None,
        content: None,
    });
    let at = Utc.with_ymd_and_hms(2025, 3, 1, 0, 0, 0).unwrap();
    let today = finished.into_envelope(at, Metadata::default());
    assert_eq!(today.schema_version, 2, "new events are written as v2");
    projector::append_batch(
        &pool,
        &[
            (4, accepted.into_envelope(at, Metadata::default())),
            (5, today),
        ],
    )
    .await
    .unwrap();

    // The live billing projector.
    let done = projector::catch_up(&pool, &mut BillingProjection::new(None), None)
        .await
        .unwrap();
    assert_eq!(done.position, 5);
    let live = ledger(&pool, ns.pg_schema()).await;
    assert_eq!(live.len(), 2, "{live:?}");
    let old = &live[0];
    assert_eq!(old["request_id"], json!(old_request));
    assert_eq!(
        (
            &old["prompt_tokens"],
            &old["completion_tokens"],
            &old["cached_tokens"]
        ),
        (&json!(1200), &json!(300), &json!(0))
    );
    // 1,200 × $0.15/M + 300 × $0.60/M = $0.00018 + $0.00018 = $0.00036.
    assert_eq!(old["amount_nanos"], json!(360_000));
    assert_eq!(old["priced"], json!(true));
    assert_eq!(old["usage_source"], json!("provider"));
    // 100 × $0.15/M + 20 × $0.60/M = $0.000015 + $0.000012.
    assert_eq!(live[1]["amount_nanos"], json!(27_000));
    assert_eq!(live[1]["usage_source"], json!("estimated"));
    let spent: i64 = sqlx::query_scalar("SELECT spent_nanos FROM key_balances WHERE key_id = $1")
        .bind(key)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(spent, 387_000);

    // The requests read model reads it too: one attempt, provider usage.
    projector::catch_up(&pool, &mut RequestsProjection::new(), None)
        .await
        .unwrap();
    let (attempts, source, status): (i32, Option<String>, String) =
        sqlx::query_as("SELECT attempts, usage_source, status FROM requests WHERE request_id = $1")
            .bind(old_request)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        (attempts, source.as_deref(), status.as_str()),
        (1, Some("provider"), "completed")
    );

    // `sluice replay billing` over the same log rebuilds the same ledger.
    let into = format!("{}_up", ns.as_str());
    let config = std::env::temp_dir().join(format!("sluice-{}.yaml", ns.as_str()));
    std::fs::write(&config, "").unwrap();
    let out = Command::new(sluice_bin())
        .args(["replay", "billing", "--into", &into, "--json"])
        .env("SLUICE_CONFIG", &config)
        .env("SLUICE_NAMESPACE", ns.as_str())
        .env("SLUICE_DATABASE_URL", DATABASE_URL)
        .env("SLUICE_NATS_URL", NATS_URL)
        .env("SLUICE_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run sluice replay");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["position"], json!(5));
    assert_eq!(ledger(&pool, &into).await, live);

    sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{into}\" CASCADE"))
        .execute(&pool)
        .await
        .unwrap();
    projector::db::drop_schema(&pool, &ns).await.unwrap();
    let _ = std::fs::remove_file(&config);
}
