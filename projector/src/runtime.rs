//! The projection runtime, shared by every projector (billing, requests, conversations)
//! and by replays: it folds `event_log` rows in position order into read models.
//!
//! Each batch is one transaction: lock the projector's `checkpoints` row (`FOR UPDATE`),
//! read the events after it, apply each, move the checkpoint, commit. The read models and
//! the checkpoint therefore always agree: a crash at any point leaves either the whole
//! batch or none of it, so no event is applied twice or skipped. The row lock also makes a
//! second live instance of the same projector wait for the first instead of double-applying;
//! when it gets the lock and sees that the checkpoint moved under it, it calls
//! [`Projection::init`] again before applying anything, so its caches are never stale.

use std::future::Future;
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use schemas::{EventError, Namespace};

use crate::backoff::Backoff;
use crate::log::{self, StoredEvent};

/// A fold of the event log into read models.
///
/// Contract: `apply` is deterministic and uses only the event and the database (never the
/// clock, `recorded_at`, or any external call), so a replay from position 0 rebuilds the
/// same read models. It matches only the event types it needs and ignores the rest
/// (including types this build does not know). It returns an error only for a real failure;
/// the runner then rolls the whole batch back, calls `init` again, and retries.
pub trait Projection: Send {
    /// Name under which the checkpoint is stored.
    fn name(&self) -> &str;

    /// Folds one event into the read models inside `tx`; must be deterministic and
    /// idempotent (no external calls).
    fn apply<'a>(
        &'a mut self,
        tx: &'a mut PgConnection,
        event: &'a StoredEvent,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send + 'a;

    /// Called after the checkpoint is locked and before any apply, and again whenever the
    /// in-memory state may not match the read models (after a rolled-back batch, or when
    /// another instance moved the checkpoint). It must rebuild caches from the read models
    /// from scratch, not add to them.
    fn init<'a>(
        &'a mut self,
        conn: &'a mut PgConnection,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send + 'a {
        let _ = conn;
        async { Ok(()) }
    }

    /// Called once per batch, after the last `apply` and before the checkpoint moves, in
    /// the same transaction: a projection that buffers writes in `apply` (to send a whole
    /// batch in one statement) writes them here. A projection that buffers must also drop
    /// its buffer in `init`, which runs again after a rolled-back batch.
    fn flush<'a>(
        &'a mut self,
        tx: &'a mut PgConnection,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send + 'a {
        let _ = tx;
        async { Ok(()) }
    }

    /// The event types `apply` acts on, when it ignores all others: the runner then reads
    /// only those rows from the log (the checkpoint still moves past the skipped ones).
    /// `None` reads every event.
    fn event_types(&self) -> Option<&'static [&'static str]> {
        None
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// An event of a type the projection needs could not be decoded. `reason` never
    /// quotes the event's data.
    #[error("event at position {position} (`{event_type}`) cannot be decoded: {reason}")]
    Decode {
        position: i64,
        event_type: String,
        reason: String,
    },
    /// An event decoded but breaks an invariant the read models rely on.
    #[error("event at position {position} (`{event_type}`) cannot be applied: {reason}")]
    Invalid {
        position: i64,
        event_type: String,
        reason: String,
    },
}

impl ProjectionError {
    /// A [`ProjectionError::Decode`] whose reason keeps the kind of failure but drops any
    /// value serde quoted from the data, which may be prompt text.
    pub fn decode(position: i64, event_type: &str, err: &EventError) -> Self {
        let reason = match err {
            EventError::UnknownType(_) => "unknown event type".to_owned(),
            EventError::FutureVersion { version, .. } => {
                format!(
                    "schema_version {version} is newer than this build understands; upgrade sluice"
                )
            }
            EventError::Malformed { source, .. } => {
                let msg = source.to_string();
                if msg.starts_with("missing field") {
                    format!("malformed data: {msg}")
                } else {
                    format!("malformed data ({:?} error)", source.classify())
                }
            }
        };
        Self::Decode {
            position,
            event_type: event_type.to_owned(),
            reason,
        }
    }

    /// Errors no retry can fix: the schema is not migrated (or is gone).
    fn is_fatal(&self) -> bool {
        match self {
            Self::Db(sqlx::Error::Database(db)) => {
                matches!(db.code().as_deref(), Some("42P01" | "3F000"))
            }
            _ => false,
        }
    }
}

/// What [`catch_up`] did: the checkpoint it reached and how many events it applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatchUp {
    pub position: i64,
    pub applied: u64,
}

/// Where and how a projection runs. The defaults fit a live projector in its namespace;
/// a replay changes the source schema (and its pool's `search_path` names the target).
#[derive(Debug, Clone)]
pub struct Runner {
    pool: PgPool,
    /// Events per transaction: large enough to amortize the commit, small enough that a
    /// failing batch is cheap to redo and locks are short.
    batch_size: i64,
    /// Schema whose `event_log` is read; `None` uses the pool's `search_path`. Checkpoint
    /// and read models are always written unqualified, i.e. to the `search_path`.
    source: Option<Namespace>,
    /// `LISTEN` channel the journal notifies after each appended batch; `None` = poll only.
    notify_channel: Option<String>,
    /// How often [`Runner::run`] looks at the log when no notification arrives (missed
    /// notifications, a listener that lost its connection).
    poll_interval: Duration,
}

pub const DEFAULT_BATCH_SIZE: i64 = 500;

impl Runner {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            batch_size: DEFAULT_BATCH_SIZE,
            source: None,
            notify_channel: None,
            poll_interval: Duration::from_secs(1),
        }
    }

    pub fn batch_size(mut self, batch_size: i64) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    pub fn source_schema(mut self, source: Namespace) -> Self {
        self.source = Some(source);
        self
    }

    pub fn notify_channel(mut self, channel: impl Into<String>) -> Self {
        self.notify_channel = Some(channel.into());
        self
    }

    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Folds every event currently in the log (up to position `until`, inclusive) and
    /// returns. A failing batch is rolled back and its error returned; calling again
    /// resumes from the last committed batch.
    pub async fn catch_up<P: Projection>(
        &self,
        projection: &mut P,
        until: Option<i64>,
    ) -> Result<CatchUp, ProjectionError> {
        let mut driver = Driver::new(self, projection);
        driver
            .drain(until.unwrap_or(i64::MAX), None, &mut |_| {})
            .await
    }

    /// [`Runner::catch_up`] for replays: `on_batch` sees the checkpoint and the events
    /// applied after every committed batch (progress), and `stop` ends it between two
    /// batches, leaving a consistent checkpoint to resume from.
    pub async fn catch_up_observed<P: Projection>(
        &self,
        projection: &mut P,
        until: i64,
        stop: &CancellationToken,
        on_batch: &mut (dyn FnMut(CatchUp) + Send),
    ) -> Result<CatchUp, ProjectionError> {
        let mut driver = Driver::new(self, projection);
        driver.drain(until, Some(stop), on_batch).await
    }

    /// Catches up, then follows the log (woken by `LISTEN`, with a poll fallback) until
    /// `shutdown`. Failures are logged and retried with backoff; only an unmigrated
    /// schema ends it with an error.
    pub async fn run<P: Projection>(
        &self,
        mut projection: P,
        shutdown: CancellationToken,
    ) -> Result<(), ProjectionError> {
        let name = projection.name().to_owned();
        let mut driver = Driver::new(self, &mut projection);
        let mut listener: Option<PgListener> = None;
        let mut backoff = Backoff::new();
        let Some(presence) = announce_live(&self.pool, &name, &shutdown).await? else {
            return Ok(());
        };
        tracing::info!(projector = %name, "projection started");
        while !shutdown.is_cancelled() {
            // Listen before reading, so a batch appended while we drain still wakes us.
            if listener.is_none() {
                if let Some(channel) = &self.notify_channel {
                    listener = listen(&self.pool, channel).await;
                }
            }
            match driver.drain(i64::MAX, Some(&shutdown), &mut |_| {}).await {
                Ok(done) => {
                    backoff.reset();
                    if done.applied > 0 {
                        tracing::debug!(projector = %name, position = done.position, applied = done.applied, "caught up");
                    }
                }
                Err(err) if err.is_fatal() => return Err(err),
                Err(err) => {
                    tracing::error!(projector = %name, error = %err, retry_in = ?backoff.delay(), "projection batch failed; retrying");
                    if !backoff.wait(&shutdown).await {
                        break;
                    }
                    continue;
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                woke = notified(&mut listener) => {
                    if let Err(err) = woke {
                        tracing::warn!(projector = %name, error = %err, "event log listener failed; polling until it reconnects");
                        listener = None;
                    }
                }
                () = tokio::time::sleep(self.poll_interval) => {}
            }
        }
        // Closing (rather than dropping) ends the session before we return, so an in-place
        // replay started right after this projector stops finds the lock free.
        use sqlx::Connection as _;
        let _ = presence.close().await;
        tracing::info!(projector = %name, "projection stopped");
        Ok(())
    }
}

/// Folds everything currently in the log (up to `until`) with the default [`Runner`].
pub async fn catch_up<P: Projection>(
    pool: &PgPool,
    projection: &mut P,
    until: Option<i64>,
) -> Result<CatchUp, ProjectionError> {
    Runner::new(pool.clone()).catch_up(projection, until).await
}

/// Runs a projection live in `ns` until `shutdown`: catch up, then follow the journal's
/// notifications on `ns.pg_notify_channel()` with a 1 s poll fallback.
pub async fn run_live<P: Projection>(
    pool: PgPool,
    ns: Namespace,
    projection: P,
    shutdown: CancellationToken,
) -> Result<(), ProjectionError> {
    Runner::new(pool)
        .notify_channel(ns.pg_notify_channel())
        .run(projection, shutdown)
        .await
}

/// The stored checkpoint of a projector (`None` before its first batch); for lag reports.
pub async fn checkpoint<'e>(
    exec: impl sqlx::PgExecutor<'e>,
    projector: &str,
) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT position FROM checkpoints WHERE projector = $1")
        .bind(projector)
        .fetch_optional(exec)
        .await
}

/// One projection bound to a runner, remembering up to which checkpoint its in-memory
/// state is known to match the read models.
struct Driver<'r, P> {
    runner: &'r Runner,
    projection: &'r mut P,
    name: String,
    /// `Some(p)` when the projection's caches reflect exactly the read models at
    /// checkpoint `p`; otherwise `init` runs before the next apply.
    synced: Option<i64>,
}

struct Step {
    position: i64,
    applied: u64,
    /// The batch was full: more events may be waiting.
    more: bool,
}

impl<'r, P: Projection> Driver<'r, P> {
    fn new(runner: &'r Runner, projection: &'r mut P) -> Self {
        let name = projection.name().to_owned();
        Self {
            runner,
            projection,
            name,
            synced: None,
        }
    }

    /// Runs batches until the log (up to `until`) is exhausted or `shutdown` fires
    /// between two batches.
    async fn drain(
        &mut self,
        until: i64,
        shutdown: Option<&CancellationToken>,
        on_batch: &mut (dyn FnMut(CatchUp) + Send),
    ) -> Result<CatchUp, ProjectionError> {
        let mut applied = 0;
        loop {
            let step = self.step(until).await?;
            applied += step.applied;
            on_batch(CatchUp {
                position: step.position,
                applied: step.applied,
            });
            if !step.more || shutdown.is_some_and(CancellationToken::is_cancelled) {
                return Ok(CatchUp {
                    position: step.position,
                    applied,
                });
            }
        }
    }

    /// One transaction: lock the checkpoint, apply the next batch, move the checkpoint.
    async fn step(&mut self, until: i64) -> Result<Step, ProjectionError> {
        let mut tx = self.runner.pool.begin().await?;
        let position = lock_checkpoint(&mut tx, &self.name).await?;
        if position >= until {
            tx.commit().await?;
            return Ok(Step {
                position,
                applied: 0,
                more: false,
            });
        }
        if self.synced != Some(position) {
            self.projection.init(&mut tx).await?;
        }
        // From here until the commit succeeds the caches may run ahead of the database.
        self.synced = None;
        let scanned = log::read_range_of_types(
            &mut *tx,
            self.runner.source.as_ref(),
            position,
            until,
            self.runner.batch_size,
            self.projection.event_types(),
        )
        .await?;
        let (events, more) = (scanned.events, scanned.more);
        if scanned.covered <= position {
            tx.commit().await?;
            self.synced = Some(position);
            return Ok(Step {
                position,
                applied: 0,
                more: false,
            });
        }
        let last = scanned.covered;
        for event in &events {
            if let Err(err) = self.projection.apply(&mut tx, event).await {
                tracing::warn!(
                    projector = %self.name,
                    position = event.position,
                    event_type = %event.event_type(),
                    error = %err,
                    "apply failed; rolling the batch back"
                );
                return Err(err);
            }
        }
        if let Err(err) = self.projection.flush(&mut tx).await {
            tracing::warn!(projector = %self.name, position = last, error = %err, "flush failed; rolling the batch back");
            return Err(err);
        }
        sqlx::query(
            "UPDATE checkpoints SET position = $2, updated_at = now() WHERE projector = $1",
        )
        .bind(&self.name)
        .bind(last)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.synced = Some(last);
        let applied = events.len() as u64;
        Ok(Step {
            position: last,
            applied,
            more,
        })
    }
}

/// Locks (creating if needed) the projector's checkpoint row for this transaction and
/// returns its position. A concurrent instance blocks here until this one commits.
async fn lock_checkpoint(conn: &mut PgConnection, projector: &str) -> Result<i64, sqlx::Error> {
    const SELECT: &str = "SELECT position FROM checkpoints WHERE projector = $1 FOR UPDATE";
    if let Some(position) = sqlx::query_scalar(SELECT)
        .bind(projector)
        .fetch_optional(&mut *conn)
        .await?
    {
        return Ok(position);
    }
    sqlx::query(
        "INSERT INTO checkpoints (projector, position) VALUES ($1, 0) ON CONFLICT DO NOTHING",
    )
    .bind(projector)
    .execute(&mut *conn)
    .await?;
    sqlx::query_scalar(SELECT)
        .bind(projector)
        .fetch_one(&mut *conn)
        .await
}

/// The advisory-lock key under which live instances of `projector` announce themselves
/// in the connection's schema. Live instances hold it shared (several may run; the
/// checkpoint row lock serializes them); an in-place replay takes it exclusively, so it
/// can tell that no live instance runs and none starts until it is done.
pub const LIVE_LOCK_SQL_KEY: &str =
    "hashtext(COALESCE(current_schema(), '') || '.projector.' || $1)";

/// Holds the shared "live instance" lock of `projector` on a connection of its own (not
/// the pool's: a session lock must die with its holder, not linger in an idle pooled
/// connection) for as long as the returned connection lives. Waits, without blocking
/// shutdown, while an in-place replay holds it exclusively; `None` if `shutdown` fired.
async fn announce_live(
    pool: &PgPool,
    projector: &str,
    shutdown: &CancellationToken,
) -> Result<Option<PgConnection>, ProjectionError> {
    use sqlx::Connection as _;
    let mut conn = PgConnection::connect_with(&pool.connect_options()).await?;
    let sql = format!("SELECT pg_try_advisory_lock_shared({LIVE_LOCK_SQL_KEY})");
    let mut waiting = false;
    loop {
        let locked: bool = sqlx::query_scalar(&sql)
            .bind(projector)
            .fetch_one(&mut conn)
            .await?;
        if locked {
            return Ok(Some(conn));
        }
        if !waiting {
            tracing::info!(
                projector,
                "an in-place replay is rebuilding this projection; waiting for it"
            );
            waiting = true;
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(None),
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

async fn listen(pool: &PgPool, channel: &str) -> Option<PgListener> {
    let result = async {
        let mut listener = PgListener::connect_with(pool).await?;
        listener.listen(channel).await?;
        Ok::<_, sqlx::Error>(listener)
    }
    .await;
    match result {
        Ok(listener) => Some(listener),
        Err(err) => {
            tracing::warn!(error = %err, "cannot LISTEN for new events; polling instead");
            None
        }
    }
}

/// Resolves when the journal announces new events (or the listener reconnected, after
/// which notifications may have been missed). Never resolves without a listener.
async fn notified(listener: &mut Option<PgListener>) -> Result<(), sqlx::Error> {
    let Some(listener) = listener.as_mut() else {
        return std::future::pending().await;
    };
    listener.try_recv().await?;
    // Several batches may have been announced; one drain covers them all.
    while listener.next_buffered().is_some() {}
    Ok(())
}
