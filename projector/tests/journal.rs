//! The journal and the log on real NATS and Postgres: events land in stream order with
//! position = stream sequence, a restart loses and duplicates nothing, appends are
//! idempotent, junk is skipped without blocking, and a second journal waits as a standby.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use common::{noise, wait_until, TestBus, TestDb};
use projector::{append_batch, bus, head, read_after, run_journal};
use schemas::{Envelope, Namespace};

async fn publish_all(bus: &TestBus, ns: &Namespace, events: &[Envelope]) {
    for env in events {
        let ack = bus::publish_event(&bus.js, ns, env).await.unwrap();
        ack.await.unwrap();
    }
}

async fn wait_for_head(pool: &PgPool, at_least: i64) {
    let pool = pool.clone();
    wait_until(
        &format!("event_log head >= {at_least}"),
        Duration::from_secs(15),
        || {
            let pool = pool.clone();
            async move { head(&pool).await.unwrap() >= at_least }
        },
    )
    .await;
}

fn spawn_journal(
    bus: &TestBus,
    db: &TestDb,
    shutdown: &CancellationToken,
) -> tokio::task::JoinHandle<Result<(), projector::JournalError>> {
    tokio::spawn(run_journal(
        bus.js.clone(),
        db.pool.clone(),
        db.ns.clone(),
        shutdown.clone(),
    ))
}

async fn logged_ids(pool: &PgPool) -> Vec<(i64, Uuid)> {
    sqlx::query_as("SELECT position, event_id FROM event_log ORDER BY position")
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn journal_copies_the_stream_in_order_and_skips_junk() {
    let db = TestDb::new().await;
    let bus = TestBus::new(&db.ns).await;
    let first: Vec<Envelope> = (0..20).map(noise).collect();
    publish_all(&bus, &db.ns, &first).await;
    // Junk (seq 21) must not block the log; a NUL (seq 22) is stored, replaced.
    bus.js
        .publish(db.ns.event_subject("test-junk"), "not an envelope".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let mut nul = noise(99);
    nul.data = serde_json::json!({"text": "a\u{0}b"});
    publish_all(&bus, &db.ns, std::slice::from_ref(&nul)).await;

    let shutdown = CancellationToken::new();
    let journal = spawn_journal(&bus, &db, &shutdown);
    wait_for_head(&db.pool, 22).await;

    let stored = read_after(&db.pool, 0, 100).await.unwrap();
    let positions: Vec<i64> = stored.iter().map(|e| e.position).collect();
    let expected: Vec<i64> = (1..=20).chain([22]).collect();
    assert_eq!(positions, expected);
    for (got, sent) in stored.iter().zip(&first) {
        assert_eq!(&got.envelope, sent, "stored exactly as published");
    }
    assert_eq!(
        stored[20].envelope.data,
        serde_json::json!({"text": "a\u{FFFD}b"})
    );

    // Live: later events arrive while the journal runs.
    let more: Vec<Envelope> = (100..105).map(noise).collect();
    publish_all(&bus, &db.ns, &more).await;
    wait_for_head(&db.pool, 27).await;

    shutdown.cancel();
    journal.await.unwrap().unwrap();
    bus.cleanup(&db.ns).await;
    db.cleanup().await;
}

#[tokio::test]
async fn killed_journal_restarts_without_loss_or_duplicates() {
    let db = TestDb::new().await;
    let bus = TestBus::new(&db.ns).await;
    let events: Vec<Envelope> = (0..300).map(noise).collect();
    // Events keep arriving while the journal is killed and restarted several times.
    let publisher = tokio::spawn({
        let (js, ns, events) = (bus.js.clone(), db.ns.clone(), events.clone());
        async move {
            for chunk in events.chunks(10) {
                for env in chunk {
                    bus::publish_event(&js, &ns, env)
                        .await
                        .unwrap()
                        .await
                        .unwrap();
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
    let shutdown = CancellationToken::new();
    let mut heads_at_crash = Vec::new();
    for _ in 0..4 {
        let journal = spawn_journal(&bus, &db, &shutdown);
        tokio::time::sleep(Duration::from_millis(60)).await;
        journal.abort(); // a crash: no graceful anything
        let _ = journal.await;
        heads_at_crash.push(head(&db.pool).await.unwrap());
    }
    assert!(
        heads_at_crash.iter().any(|h| *h > 0 && *h < 300),
        "at least one crash happened mid-way: {heads_at_crash:?}"
    );
    publisher.await.unwrap();
    let journal = spawn_journal(&bus, &db, &shutdown);
    wait_for_head(&db.pool, 300).await;
    shutdown.cancel();
    journal.await.unwrap().unwrap();

    let logged = logged_ids(&db.pool).await;
    let expected: Vec<(i64, Uuid)> = events
        .iter()
        .enumerate()
        .map(|(i, e)| (i as i64 + 1, e.event_id))
        .collect();
    assert_eq!(
        logged, expected,
        "every event once, at its stream sequence (heads at crashes {heads_at_crash:?})"
    );
    bus.cleanup(&db.ns).await;
    db.cleanup().await;
}

#[tokio::test]
async fn append_batch_is_idempotent() {
    let db = TestDb::new().await;
    let batch: Vec<(i64, Envelope)> = (1..=5).map(|i| (i64::from(i), noise(i))).collect();
    assert_eq!(append_batch(&db.pool, &batch).await.unwrap(), 5);
    // The same batch again (an unknown commit outcome retried).
    assert_eq!(append_batch(&db.pool, &batch).await.unwrap(), 0);
    // The same event republished outside JetStream's dedupe window: a new sequence, same id.
    let republished = vec![(9, batch[2].1.clone()), (10, noise(10))];
    assert_eq!(append_batch(&db.pool, &republished).await.unwrap(), 1);
    // Duplicates inside one batch.
    let twice = noise(11);
    assert_eq!(
        append_batch(&db.pool, &[(11, twice.clone()), (12, twice)])
            .await
            .unwrap(),
        1
    );
    assert_eq!(append_batch(&db.pool, &[]).await.unwrap(), 0);

    let positions: Vec<i64> = read_after(&db.pool, 0, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.position)
        .collect();
    assert_eq!(positions, vec![1, 2, 3, 4, 5, 10, 11]);
    assert_eq!(
        read_after(&db.pool, 3, 2)
            .await
            .unwrap()
            .iter()
            .map(|e| e.position)
            .collect::<Vec<_>>(),
        vec![4, 5]
    );
    assert_eq!(head(&db.pool).await.unwrap(), 11);
    // The log is append-only at the database level.
    assert!(sqlx::query("DELETE FROM event_log")
        .execute(&db.pool)
        .await
        .is_err());
    db.cleanup().await;
}

#[tokio::test]
async fn second_journal_waits_as_standby_and_takes_over() {
    let db = TestDb::new().await;
    let bus = TestBus::new(&db.ns).await;
    let shutdown_a = CancellationToken::new();
    let shutdown_b = CancellationToken::new();
    let a = spawn_journal(&bus, &db, &shutdown_a);
    publish_all(&bus, &db.ns, &[noise(1)]).await;
    wait_for_head(&db.pool, 1).await;

    let b = spawn_journal(&bus, &db, &shutdown_b);
    let key = format!("{}.journal", db.ns.as_str());
    let lock_free: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1))")
        .bind(&key)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(!lock_free, "the active journal holds the lock");
    publish_all(&bus, &db.ns, &[noise(2), noise(3)]).await;
    wait_for_head(&db.pool, 3).await;
    tokio::time::sleep(Duration::from_millis(700)).await; // more than one standby poll
    let mut stream = bus.js.get_stream(db.ns.events_stream()).await.unwrap();
    assert_eq!(
        stream.info().await.unwrap().state.consumer_count,
        1,
        "the standby consumes nothing"
    );
    assert!(!b.is_finished());

    // The active one stops; the standby takes over and continues where it left off.
    shutdown_a.cancel();
    a.await.unwrap().unwrap();
    publish_all(&bus, &db.ns, &[noise(4), noise(5)]).await;
    wait_for_head(&db.pool, 5).await;
    assert_eq!(
        logged_ids(&db.pool)
            .await
            .iter()
            .map(|(p, _)| *p)
            .collect::<HashSet<_>>(),
        (1..=5).collect()
    );

    shutdown_b.cancel();
    b.await.unwrap().unwrap();
    bus.cleanup(&db.ns).await;
    db.cleanup().await;
}
