//! The projection runtime on a real Postgres: read models and checkpoint move together,
//! a failing batch leaves nothing behind, a crash never double-applies or skips, and two
//! live instances of one projector never apply an event twice.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use common::{noise, wait_until, TestDb};
use projector::{append_batch, checkpoint, Projection, ProjectionError, Runner, StoredEvent};

/// Records every applied position in `test_applied` (no unique key, so a double apply
/// shows up as a duplicate row) and can be told to fail at one position.
struct Recorder {
    name: &'static str,
    fail_at: Option<i64>,
    /// Slows each apply, so a test can crash the runner in the middle of a batch.
    delay: Duration,
    inits: u32,
}

impl Recorder {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            fail_at: None,
            delay: Duration::ZERO,
            inits: 0,
        }
    }
}

impl Projection for Recorder {
    fn name(&self) -> &str {
        self.name
    }

    async fn init<'a>(&'a mut self, _conn: &'a mut PgConnection) -> Result<(), ProjectionError> {
        self.inits += 1;
        Ok(())
    }

    async fn apply<'a>(
        &'a mut self,
        tx: &'a mut PgConnection,
        event: &'a StoredEvent,
    ) -> Result<(), ProjectionError> {
        sqlx::query("INSERT INTO test_applied (projector, position) VALUES ($1, $2)")
            .bind(self.name)
            .bind(event.position)
            .execute(&mut *tx)
            .await?;
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        if self.fail_at == Some(event.position) {
            return Err(ProjectionError::Invalid {
                position: event.position,
                event_type: event.event_type().to_owned(),
                reason: "told to fail".into(),
            });
        }
        Ok(())
    }
}

async fn setup() -> TestDb {
    let db = TestDb::new().await;
    // A test-only read model, created in the test's own schema.
    sqlx::query("CREATE TABLE test_applied (projector text NOT NULL, position bigint NOT NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    db
}

/// Appends `n` events at positions 2, 4, 6, ... (gaps, as after skipped messages).
async fn append_even(pool: &PgPool, from: u32, n: u32) {
    let batch: Vec<_> = (from..from + n)
        .map(|i| (i64::from(i) * 2, noise(i)))
        .collect();
    assert_eq!(append_batch(pool, &batch).await.unwrap(), u64::from(n));
}

async fn applied(pool: &PgPool, projector: &str) -> (i64, i64) {
    sqlx::query_as(
        "SELECT count(*), count(DISTINCT position) FROM test_applied WHERE projector = $1",
    )
    .bind(projector)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn failing_batch_rolls_back_and_resumes_after_the_fix() {
    let db = setup().await;
    append_even(&db.pool, 1, 10).await; // positions 2..=20
    let runner = Runner::new(db.pool.clone()).batch_size(3);
    let mut rec = Recorder::new("rec");
    rec.fail_at = Some(10); // second event of the second batch [8, 10, 12]

    let err = runner.catch_up(&mut rec, None).await.unwrap_err();
    assert!(
        matches!(err, ProjectionError::Invalid { position: 10, .. }),
        "{err}"
    );
    // The first batch is committed, the second left nothing: not even position 8.
    assert_eq!(checkpoint(&db.pool, "rec").await.unwrap(), Some(6));
    let positions: Vec<i64> =
        sqlx::query_scalar("SELECT position FROM test_applied ORDER BY position")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(positions, vec![2, 4, 6]);

    rec.fail_at = None;
    let inits_before = rec.inits;
    let done = runner.catch_up(&mut rec, None).await.unwrap();
    assert_eq!((done.position, done.applied), (20, 7));
    assert!(
        rec.inits > inits_before,
        "caches are rebuilt after a rolled-back batch"
    );
    assert_eq!(applied(&db.pool, "rec").await, (10, 10));

    // Up to a bound, and nothing left to do afterwards.
    append_even(&db.pool, 11, 5).await; // 22..=30
    let done = runner.catch_up(&mut rec, Some(26)).await.unwrap();
    assert_eq!((done.position, done.applied), (26, 3));
    let done = runner.catch_up(&mut rec, None).await.unwrap();
    assert_eq!((done.position, done.applied), (30, 2));
    let done = runner.catch_up(&mut rec, None).await.unwrap();
    assert_eq!((done.position, done.applied), (30, 0));
    assert_eq!(applied(&db.pool, "rec").await, (15, 15));
    db.cleanup().await;
}

#[tokio::test]
async fn crash_mid_batch_then_restart_applies_each_event_once() {
    let db = setup().await;
    append_even(&db.pool, 1, 60).await;
    let runner = Runner::new(db.pool.clone()).batch_size(8);
    let mut rec = Recorder::new("crashy");
    rec.delay = Duration::from_millis(5);

    // Crash: drop the future while it is inside some batch.
    let crashed =
        tokio::time::timeout(Duration::from_millis(150), runner.catch_up(&mut rec, None)).await;
    assert!(
        crashed.is_err(),
        "the catch-up should still have been running"
    );
    let at = checkpoint(&db.pool, "crashy").await.unwrap().unwrap_or(0);
    assert!(at < 120, "crashed before the end (checkpoint {at})");
    // Exactly the events up to the checkpoint are in the read model: the open batch left nothing.
    let (rows, distinct) = applied(&db.pool, "crashy").await;
    assert_eq!((rows, distinct), (at / 2, at / 2));

    rec.delay = Duration::ZERO;
    let done = runner.catch_up(&mut rec, None).await.unwrap();
    assert_eq!(done.position, 120);
    assert_eq!(applied(&db.pool, "crashy").await, (60, 60));
    db.cleanup().await;
}

#[tokio::test]
async fn live_instances_of_one_projector_never_double_apply() {
    let db = setup().await;
    let shutdown = CancellationToken::new();
    let channel = db.ns.pg_notify_channel();
    // Poll rarely: catching up promptly proves the LISTEN wake-up works.
    let runner = Runner::new(db.pool.clone())
        .batch_size(7)
        .notify_channel(&channel)
        .poll_interval(Duration::from_secs(60));
    let a = tokio::spawn({
        let (runner, shutdown) = (runner.clone(), shutdown.clone());
        async move { runner.run(Recorder::new("live"), shutdown).await }
    });
    let b = tokio::spawn({
        let (runner, shutdown) = (runner.clone(), shutdown.clone());
        async move { runner.run(Recorder::new("live"), shutdown).await }
    });
    for round in 0..10 {
        append_even(&db.pool, round * 10 + 1, 10).await;
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(&channel)
            .bind(((round + 1) * 20).to_string())
            .execute(&db.pool)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    let pool = db.pool.clone();
    wait_until(
        "both live instances to catch up",
        Duration::from_secs(20),
        || {
            let pool = pool.clone();
            async move { checkpoint(&pool, "live").await.unwrap() == Some(200) }
        },
    )
    .await;
    assert_eq!(applied(&db.pool, "live").await, (100, 100));

    shutdown.cancel();
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    db.cleanup().await;
}
