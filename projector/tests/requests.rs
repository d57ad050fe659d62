//! The `requests` read model: order-independent upserts, first terminal event wins, and
//! the whole pipeline (publish → journal → LISTEN → projection) on real servers.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use common::{
    accepted, attempt, cancelled, env, failed, finished, t0, usage, wait_until, TestBus, TestDb,
};
use projector::{append_batch, bus, catch_up, checkpoint, run_journal, RequestsProjection, Runner};

#[derive(Debug, PartialEq, sqlx::FromRow)]
struct Row {
    key_id: Option<Uuid>,
    model: Option<String>,
    api: Option<String>,
    stream: Option<bool>,
    status: String,
    channel_name: Option<String>,
    upstream_model: Option<String>,
    attempts: i32,
    error_kind: Option<String>,
    prompt_tokens: Option<i64>,
    completion_tokens: Option<i64>,
    usage_source: Option<String>,
    ttft_ms: Option<i64>,
    duration_ms: Option<i64>,
    accepted_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
}

async fn row(pool: &PgPool, id: Uuid) -> Row {
    sqlx::query_as(
        "SELECT key_id, model, api, stream, status, channel_name, upstream_model, attempts, error_kind, \
                prompt_tokens, completion_tokens, usage_source, ttft_ms, duration_ms, accepted_at, finished_at \
         FROM requests WHERE request_id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn requests_fold_in_any_order_and_the_first_outcome_wins() {
    let db = TestDb::new().await;
    let key = Uuid::now_v7();
    let (ok, late, fail, gone) = (
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
    );
    let s = |secs| t0() + chrono::Duration::seconds(secs);
    let events = vec![
        env(accepted(ok, key), s(0)),
        env(attempt(ok, 1, "a"), s(1)),
        env(attempt(ok, 2, "b"), s(2)),
        env(finished(ok, key, "b", usage(10, 5)), s(3)),
        // A redelivered request's second outcome changes nothing.
        env(finished(ok, key, "c", usage(99, 99)), s(9)),
        // The worker's events reached the log before the ingress's.
        env(attempt(late, 1, "a"), s(1)),
        env(finished(late, key, "a", usage(1, 1)), s(2)),
        env(accepted(late, key), s(0)),
        env(accepted(fail, key), s(0)),
        env(failed(fail, key), s(4)),
        env(accepted(gone, key), s(0)),
        env(attempt(gone, 1, "a"), s(1)),
        env(cancelled(gone, key, usage(7, 3)), s(5)),
    ];
    let batch: Vec<_> = events
        .into_iter()
        .enumerate()
        .map(|(i, e)| (i as i64 + 1, e))
        .collect();
    append_batch(&db.pool, &batch).await.unwrap();
    let done = catch_up(&db.pool, &mut RequestsProjection::new(), None)
        .await
        .unwrap();
    assert_eq!((done.position, done.applied), (13, 13));

    let completed = Row {
        key_id: Some(key),
        model: Some("gpt-4o-mini".into()),
        api: Some("chat_completions".into()),
        stream: Some(true),
        status: "completed".into(),
        channel_name: Some("b".into()),
        upstream_model: Some("gpt-4o-mini-2024-07-18".into()),
        attempts: 2,
        error_kind: None,
        prompt_tokens: Some(10),
        completion_tokens: Some(5),
        usage_source: Some("provider".into()),
        ttft_ms: Some(42),
        duration_ms: Some(420),
        accepted_at: Some(s(0)),
        finished_at: Some(s(3)),
    };
    assert_eq!(row(&db.pool, ok).await, completed);
    let late_row = row(&db.pool, late).await;
    assert_eq!(
        (
            late_row.status.as_str(),
            late_row.accepted_at,
            late_row.api.as_deref()
        ),
        ("completed", Some(s(0)), Some("chat_completions"))
    );
    assert_eq!(late_row.channel_name.as_deref(), Some("a"));

    let fail_row = row(&db.pool, fail).await;
    assert_eq!(
        (
            fail_row.status.as_str(),
            fail_row.error_kind.as_deref(),
            fail_row.attempts
        ),
        ("failed", Some("rate_limited"), 3)
    );
    assert_eq!(fail_row.prompt_tokens, None);

    let gone_row = row(&db.pool, gone).await;
    assert_eq!(gone_row.status, "cancelled");
    assert_eq!(
        (gone_row.prompt_tokens, gone_row.usage_source.as_deref()),
        (Some(7), Some("estimated"))
    );
    assert_eq!(
        (gone_row.channel_name.as_deref(), gone_row.finished_at),
        (Some("a"), Some(s(5)))
    );
    db.cleanup().await;
}

#[tokio::test]
async fn pipeline_from_jetstream_to_requests_is_live() {
    let db = TestDb::new().await;
    let bus = TestBus::new(&db.ns).await;
    let shutdown = CancellationToken::new();
    let journal = tokio::spawn(run_journal(
        bus.js.clone(),
        db.pool.clone(),
        db.ns.clone(),
        shutdown.clone(),
    ));
    // A poll interval far beyond the test's patience: only the journal's NOTIFY can wake it.
    let runner = Runner::new(db.pool.clone())
        .notify_channel(db.ns.pg_notify_channel())
        .poll_interval(Duration::from_secs(600));
    let projection = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { runner.run(RequestsProjection::new(), shutdown).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await; // let both go idle

    let (key, id) = (Uuid::now_v7(), Uuid::now_v7());
    for event in [
        accepted(id, key),
        attempt(id, 1, "a"),
        finished(id, key, "a", usage(3, 4)),
    ] {
        bus::publish_event(&bus.js, &db.ns, &env(event, Utc::now()))
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let pool = db.pool.clone();
    wait_until(
        "the request to be projected",
        Duration::from_secs(10),
        || {
            let pool = pool.clone();
            async move { checkpoint(&pool, "requests").await.unwrap() == Some(3) }
        },
    )
    .await;
    assert_eq!(row(&db.pool, id).await.status, "completed");

    shutdown.cancel();
    journal.await.unwrap().unwrap();
    projection.await.unwrap().unwrap();
    bus.cleanup(&db.ns).await;
    db.cleanup().await;
}
