//! The journal: the single writer of `event_log`. It copies the namespace's JetStream
//! `EVENTS` stream into Postgres in stream order, so a row's `position` is the message's
//! stream sequence and every projector sees one total order.
//!
//! Invariants, and how they hold:
//! - **One writer.** A session-level advisory lock on a dedicated connection; a second
//!   journal waits as a standby. Appends go through that same connection, so if it dies
//!   the lock dies with it and this journal can no longer write: it starts over.
//! - **No gap, no reordering.** An ordered consumer delivers the stream in sequence and
//!   recreates itself on any mismatch; each batch is one transaction whose positions are
//!   all above the previous batch's, so a reader never sees N + k committed before N.
//! - **No loss, no duplicate.** On start (and after any Postgres error) the journal reads
//!   the log's head and consumes from the next sequence; appends skip known positions and
//!   event ids. Events simply wait in JetStream while Postgres is down.
//! - **No poison message.** A payload that is not an envelope is logged (sequence only)
//!   and skipped; NULs, which Postgres cannot store, are replaced.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull::OrderedConfig, consumer::DeliverPolicy};
use futures::StreamExt;
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use schemas::{Envelope, Namespace};

use crate::backoff::{sleep_or_cancel, Backoff};
use crate::log;

/// At most this many messages go into one insert: whatever is ready at once, so a quiet
/// system appends each event alone (lowest latency) and a busy one batches (throughput).
pub const MAX_BATCH: usize = 1000;
/// How often a standby journal retries the lock.
const STANDBY_POLL: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("the Postgres schema `{0}` is not migrated; run `sluice migrate` first")]
    NotMigrated(String),
    #[error("JetStream: {context}: {source}")]
    Nats {
        context: &'static str,
        #[source]
        source: async_nats::Error,
    },
}

impl JournalError {
    fn nats(context: &'static str) -> impl FnOnce(async_nats::Error) -> Self {
        move |source| Self::Nats { context, source }
    }
}

/// Runs the journal of `ns` until `shutdown`. Waits as a standby while another journal
/// holds the lock; retries Postgres and NATS failures with backoff, never skipping an
/// event. Returns an error only when the schema is not migrated.
pub async fn run_journal(
    js: jetstream::Context,
    pool: PgPool,
    ns: Namespace,
    shutdown: CancellationToken,
) -> Result<(), JournalError> {
    let mut backoff = Backoff::new();
    while !shutdown.is_cancelled() {
        match session(&js, &pool, &ns, &shutdown, &mut backoff).await {
            Ok(()) => break,
            Err(err @ JournalError::NotMigrated(_)) => return Err(err),
            Err(err) => {
                tracing::error!(namespace = %ns, error = %err, retry_in = ?backoff.delay(), "journal failed; restarting from the log's head");
                if !backoff.wait(&shutdown).await {
                    break;
                }
            }
        }
    }
    tracing::info!(namespace = %ns, "journal stopped");
    Ok(())
}

/// Holds the lock for as long as its connection works. NATS trouble is retried inside
/// the session (keeping the lock); a Postgres error ends it, dropping the connection.
async fn session(
    js: &jetstream::Context,
    pool: &PgPool,
    ns: &Namespace,
    shutdown: &CancellationToken,
    backoff: &mut Backoff,
) -> Result<(), JournalError> {
    let Some(mut conn) = acquire_lock(pool, ns, shutdown).await? else {
        return Ok(());
    };
    let result = loop {
        match follow(js, &mut conn, ns, shutdown, backoff).await {
            Err(err @ JournalError::Nats { .. }) => {
                tracing::warn!(namespace = %ns, error = %err, retry_in = ?backoff.delay(), "journal lost its JetStream consumer; recreating it");
                if !backoff.wait(shutdown).await {
                    break Ok(());
                }
            }
            other => break other,
        }
    };
    // Closing (rather than returning to a pool) releases the lock for a standby at once.
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.close()).await;
    result
}

/// A connection of its own holding `pg_advisory_lock(hashtext('<ns>.journal'))`, or
/// `None` if `shutdown` fired while waiting as a standby.
async fn acquire_lock(
    pool: &PgPool,
    ns: &Namespace,
    shutdown: &CancellationToken,
) -> Result<Option<PgConnection>, JournalError> {
    // Detached: the lock lives as long as this session, never in a pooled connection.
    let mut conn = pool.acquire().await?.detach();
    let key = format!("{}.journal", ns.as_str());
    let mut waiting = false;
    loop {
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1))")
            .bind(&key)
            .fetch_one(&mut conn)
            .await?;
        if locked {
            if waiting {
                tracing::info!(namespace = %ns, "journal lock acquired; standby taking over");
            }
            return Ok(Some(conn));
        }
        if !waiting {
            tracing::info!(namespace = %ns, "another journal holds the lock; waiting as standby");
            waiting = true;
        }
        if !sleep_or_cancel(STANDBY_POLL, shutdown).await {
            let _ = conn.close().await;
            return Ok(None);
        }
    }
}

/// Consumes `<NS>_EVENTS` from the log's head + 1 and appends batch after batch until
/// `shutdown` (`Ok`) or an error.
async fn follow(
    js: &jetstream::Context,
    conn: &mut PgConnection,
    ns: &Namespace,
    shutdown: &CancellationToken,
    backoff: &mut Backoff,
) -> Result<(), JournalError> {
    let head = log::head(&mut *conn)
        .await
        .map_err(|err| not_migrated(err, ns))?;
    let stream = js.get_stream(ns.events_stream()).await.map_err(|err| {
        JournalError::nats("cannot open the events stream (run `sluice migrate`?)")(err.into())
    })?;
    let start = u64::try_from(head).unwrap_or(0) + 1;
    let consumer = stream
        .create_consumer(OrderedConfig {
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            description: Some("sluice journal".to_owned()),
            ..Default::default()
        })
        .await
        .map_err(|err| JournalError::nats("cannot create the ordered consumer")(err.into()))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|err| JournalError::nats("cannot start the ordered consumer")(err.into()))?
        .ready_chunks(MAX_BATCH);
    tracing::info!(namespace = %ns, from = start, "journal following events");

    // The highest sequence seen (appended or skipped): positions must only grow.
    let mut seen = head;
    loop {
        let chunk = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            chunk = messages.next() => chunk,
        };
        let Some(chunk) = chunk else {
            return Err(JournalError::nats("ordered consumer ended")(
                "stream closed".into(),
            ));
        };
        let mut batch: Vec<(i64, Envelope)> = Vec::with_capacity(chunk.len());
        let mut failure = None;
        for item in chunk {
            let message = match item {
                Ok(message) => message,
                Err(err) => {
                    // Append what arrived before the error; the rest is read again.
                    failure = Some(JournalError::nats("reading the events stream failed")(
                        err.into(),
                    ));
                    break;
                }
            };
            let position = match message.info() {
                Ok(info) => i64::try_from(info.stream_sequence).unwrap_or(i64::MAX),
                Err(err) => {
                    failure = Some(JournalError::nats("message without JetStream info")(err));
                    break;
                }
            };
            if position <= seen {
                tracing::debug!(position, "journal ignored an already seen sequence");
                continue;
            }
            seen = position;
            if let Some(envelope) = prepare(position, &message.payload) {
                batch.push((position, envelope));
            }
        }
        if let Some((last, _)) = batch.last() {
            let last = *last;
            let inserted = append(conn, ns, &batch, last).await?;
            backoff.reset();
            tracing::debug!(namespace = %ns, events = batch.len(), inserted, last, "journal appended");
        }
        if let Some(err) = failure {
            return Err(err);
        }
    }
}

/// Parses a message into a storable envelope, or `None` (logged) for a payload that can
/// never be one. Logs carry the position and error category only, never payload text.
fn prepare(position: i64, payload: &[u8]) -> Option<Envelope> {
    let mut envelope: Envelope = match serde_json::from_slice(payload) {
        Ok(envelope) => envelope,
        Err(err) => {
            tracing::warn!(position, category = ?err.classify(), line = err.line(), column = err.column(), "message is not an event envelope; skipped");
            return None;
        }
    };
    if i16::try_from(envelope.schema_version).is_err() {
        tracing::warn!(position, event_id = %envelope.event_id, "event schema_version beyond smallint; skipped");
        return None;
    }
    if log::scrub_nul(&mut envelope) {
        tracing::warn!(position, event_id = %envelope.event_id, "event contained NUL characters; stored with U+FFFD instead");
    }
    Some(envelope)
}

/// One transaction: the rows, then a notification carrying the last position, so
/// projectors wake only once the rows are visible.
async fn append(
    conn: &mut PgConnection,
    ns: &Namespace,
    batch: &[(i64, Envelope)],
    last: i64,
) -> Result<u64, JournalError> {
    let mut tx = conn.begin().await?;
    let inserted = log::append_batch(&mut *tx, batch).await?;
    if inserted > 0 {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(ns.pg_notify_channel())
            .bind(last.to_string())
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(inserted)
}

fn not_migrated(err: sqlx::Error, ns: &Namespace) -> JournalError {
    match &err {
        sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("42P01" | "3F000")) => {
            JournalError::NotMigrated(ns.pg_schema().to_owned())
        }
        _ => JournalError::Db(err),
    }
}
