//! Replays: a projection run over a namespace's `event_log` into another schema, with
//! the same code as the live projector ([`Runner`] with [`Runner::source_schema`]).
//!
//! A replay writes only to a *scratch* schema: one created for it (migrated with the same
//! migrations as a namespace) whose own `event_log` is empty. That rule is what keeps the
//! live read models safe: a replay cannot be pointed at a live namespace by mistake, and a
//! replay stopped half-way (Ctrl-C) leaves a half-built scratch schema and nothing else.
//! Rebuilding the live read models ("in place") is a replay into scratch followed by
//! [`InPlace::swap`], which replaces the live tables and checkpoint in one transaction
//! while holding the projector's live-instance lock exclusively.
//!
//! [`diff_table`] compares a table of two schemas row by row, for `sluice audit`.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde_json::Value;
use std::str::FromStr as _;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection as _, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use schemas::Namespace;

use crate::db::{self, DbError};
use crate::runtime::{CatchUp, Projection, ProjectionError, Runner, LIVE_LOCK_SQL_KEY};

/// Log positions per transaction in a replay: ten times live (500) because nobody waits
/// on a replay's individual batches, and each batch costs a few round trips. Measured with
/// `bench/replay.sh` (1M events): 5,000 replays as fast as 20,000 at a third of the memory
/// (a batch's events and rows are what a replay holds).
pub const REPLAY_BATCH_SIZE: i64 = 5_000;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("database error: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error(transparent)]
    Projection(#[from] ProjectionError),
    #[error(
        "`{0}` is the live namespace; a replay writes into a scratch schema \
         (omit --into, or pass --in-place to rebuild the live read models)"
    )]
    LiveTarget(String),
    #[error(
        "schema `{0}` has events of its own, so it is a namespace, not a scratch schema; \
         pick another --into name"
    )]
    NotScratch(String),
    #[error(
        "the live `{0}` projector is running; stop it (`sluice {0}` processes, or `sluice up`) \
         before an in-place replay"
    )]
    LiveRunning(String),
    #[error("an invalid scratch schema name was derived: {0}")]
    Name(#[from] schemas::names::InvalidNamespace),
}

/// A name for a scratch schema of `live`: `<ns>_<tag><UTC timestamp><4 hex>`, with the
/// namespace cut so the whole fits a namespace's 48 characters.
pub fn scratch_name(
    live: &Namespace,
    tag: &str,
    now: DateTime<Utc>,
) -> Result<Namespace, ReplayError> {
    let id = schemas::new_id().simple().to_string();
    let name = format!(
        "{}{}{}",
        scratch_prefix(live, tag),
        now.format("%Y%m%d%H%M%S"),
        &id[id.len() - 4..]
    );
    Ok(Namespace::new(&name)?)
}

/// What every [`scratch_name`] of `live` and `tag` starts with (to find or drop them).
pub fn scratch_prefix(live: &Namespace, tag: &str) -> String {
    // 14 digits of timestamp and 4 hex digits follow.
    let keep = 48usize
        .saturating_sub(tag.len() + 1 + 18)
        .min(live.as_str().len());
    format!("{}_{tag}", &live.as_str()[..keep])
}

/// A scratch schema ready for a replay: created and migrated if new, with a pool whose
/// `search_path` names it, so the projection's unqualified writes land there.
#[derive(Debug)]
pub struct Scratch {
    pub schema: Namespace,
    pub pool: PgPool,
    /// `false` when the schema existed (a resumed replay): its checkpoint is kept.
    pub created: bool,
}

impl Scratch {
    /// Opens (creating and migrating when absent) `schema` as the target of a replay of
    /// `live`'s log. Refuses the live namespace itself and any schema whose own
    /// `event_log` holds events.
    pub async fn open(
        database_url: &str,
        live: &Namespace,
        schema: Namespace,
    ) -> Result<Self, ReplayError> {
        if &schema == live {
            return Err(ReplayError::LiveTarget(schema.to_string()));
        }
        // Commits into a scratch schema need not wait for the WAL flush: a crash loses at
        // most the last batches, and the checkpoint, committed with them, says where to
        // resume. The live namespace is never written through this pool.
        let opts = PgConnectOptions::from_str(database_url)
            .map_err(DbError::BadUrl)?
            .options([
                ("search_path", schema.pg_schema()),
                ("synchronous_commit", "off"),
            ]);
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect_with(opts)
            .await
            .map_err(DbError::Connect)?;
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
                .bind(schema.pg_schema())
                .fetch_one(&pool)
                .await?;
        if exists {
            let table = format!("\"{}\".event_log", schema.pg_schema());
            let has_events: Option<bool> =
                sqlx::query_scalar(&format!("SELECT EXISTS (SELECT 1 FROM {table})"))
                    .fetch_one(&pool)
                    .await
                    .ok();
            if has_events != Some(false) {
                // Either events, or no event_log at all: not a schema we created.
                return Err(ReplayError::NotScratch(schema.to_string()));
            }
        }
        db::migrate(&pool, &schema).await?;
        Ok(Self {
            schema,
            pool,
            created: !exists,
        })
    }

    /// Starts `projector`'s checkpoint at `from` (a fresh schema only): the replay folds
    /// the events after it.
    pub async fn start_at(&self, projector: &str, from: i64) -> Result<(), ReplayError> {
        sqlx::query(
            "INSERT INTO checkpoints (projector, position) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(projector)
        .bind(from)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Folds `live`'s log up to `until` into this schema with the live projector's own
    /// code. Stops between two batches when `stop` fires (the checkpoint then says how far
    /// it got, and the same call resumes). `on_batch` sees each committed batch.
    pub async fn replay<P: Projection>(
        &self,
        live: &Namespace,
        projection: &mut P,
        until: i64,
        stop: &CancellationToken,
        on_batch: &mut (dyn FnMut(CatchUp) + Send),
    ) -> Result<CatchUp, ReplayError> {
        let runner = Runner::new(self.pool.clone())
            .source_schema(live.clone())
            .batch_size(REPLAY_BATCH_SIZE);
        Ok(runner
            .catch_up_observed(projection, until, stop, on_batch)
            .await?)
    }

    /// Drops the scratch schema and closes its pool.
    pub async fn drop_schema(self) -> Result<(), ReplayError> {
        db::drop_schema(&self.pool, &self.schema).await?;
        self.pool.close().await;
        Ok(())
    }
}

/// The head of `live`'s log and the number of events in `(from, until]`, for progress.
pub async fn log_span(
    pool: &PgPool,
    live: &Namespace,
    from: i64,
    until: i64,
) -> Result<(i64, i64), sqlx::Error> {
    let table = format!("\"{}\".event_log", live.pg_schema());
    sqlx::query_as(&format!(
        "SELECT COALESCE((SELECT max(position) FROM {table}), 0)::bigint, \
                (SELECT count(*) FROM {table} WHERE position > $1 AND position <= $2)::bigint"
    ))
    .bind(from)
    .bind(until)
    .fetch_one(pool)
    .await
}

/// The last position recorded at or before `at`: "the log as it stood then".
pub async fn position_at(
    pool: &PgPool,
    live: &Namespace,
    at: DateTime<Utc>,
) -> Result<i64, sqlx::Error> {
    let table = format!("\"{}\".event_log", live.pg_schema());
    sqlx::query_scalar(&format!(
        "SELECT COALESCE(max(position), 0)::bigint FROM {table} WHERE recorded_at <= $1"
    ))
    .bind(at)
    .fetch_one(pool)
    .await
}

/// The exclusive claim on a projector's live read models for an in-place replay: while
/// it is held no live instance of the projector runs (they hold the same advisory lock
/// shared, and a starting one waits).
pub struct InPlace {
    conn: PgConnection,
    projector: String,
}

impl InPlace {
    /// Claims `projector` in the namespace of `live_pool`, or says that a live instance
    /// runs. Checks both the live-instance lock and the checkpoint row (`NOWAIT`), the
    /// latter catching a batch in flight from a build older than the live-instance lock.
    pub async fn claim(live_pool: &PgPool, projector: &str) -> Result<Self, ReplayError> {
        let mut conn = PgConnection::connect_with(&live_pool.connect_options()).await?;
        let locked: bool =
            sqlx::query_scalar(&format!("SELECT pg_try_advisory_lock({LIVE_LOCK_SQL_KEY})"))
                .bind(projector)
                .fetch_one(&mut conn)
                .await?;
        if !locked {
            return Err(ReplayError::LiveRunning(projector.to_owned()));
        }
        let mut claim = Self {
            conn,
            projector: projector.to_owned(),
        };
        let mut tx = claim.conn.begin().await?;
        lock_checkpoint_nowait(&mut tx, projector).await?;
        tx.rollback().await?;
        Ok(claim)
    }

    /// Replaces the live `tables` and the projector's checkpoint with the scratch
    /// schema's, in one transaction: readers see the old read models or the new ones.
    pub async fn swap(mut self, scratch: &Namespace, tables: &[&str]) -> Result<i64, ReplayError> {
        let mut tx = self.conn.begin().await?;
        lock_checkpoint_nowait(&mut tx, &self.projector).await?;
        let position: i64 = sqlx::query_scalar(&format!(
            "SELECT COALESCE((SELECT position FROM \"{}\".checkpoints WHERE projector = $1), 0)",
            scratch.pg_schema()
        ))
        .bind(&self.projector)
        .fetch_one(&mut *tx)
        .await?;
        for table in tables {
            // Table names come from the caller's constant list, never from input.
            sqlx::query(&format!("TRUNCATE {table}"))
                .execute(&mut *tx)
                .await?;
            sqlx::query(&format!(
                "INSERT INTO {table} SELECT * FROM \"{}\".{table}",
                scratch.pg_schema()
            ))
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "INSERT INTO checkpoints (projector, position) VALUES ($1, $2) \
             ON CONFLICT (projector) DO UPDATE SET position = EXCLUDED.position, updated_at = now()",
        )
        .bind(&self.projector)
        .bind(position)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        // Closing the connection releases the live-instance lock.
        self.conn.close().await?;
        Ok(position)
    }
}

async fn lock_checkpoint_nowait(
    conn: &mut PgConnection,
    projector: &str,
) -> Result<(), ReplayError> {
    let res = sqlx::query("SELECT 1 FROM checkpoints WHERE projector = $1 FOR UPDATE NOWAIT")
        .bind(projector)
        .execute(&mut *conn)
        .await;
    match res {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03") => {
            Err(ReplayError::LiveRunning(projector.to_owned()))
        }
        Err(e) => Err(e.into()),
    }
}

/// How one row differs between the live read model and a rebuilt one.
#[derive(Debug, Clone, PartialEq)]
pub enum RowDiff {
    /// In the live table only (an extra row).
    OnlyLive { key: String, row: Value },
    /// In the rebuilt table only (a missing row).
    OnlyRebuilt { key: String, row: Value },
    /// Same key, different columns: `(column, live, rebuilt)`.
    Changed {
        key: String,
        columns: Vec<(String, Value, Value)>,
    },
}

/// The rows of `table` that differ between schemas `live` and `rebuilt`, keyed by the
/// `key` columns; at most `limit` rows per side are fetched (memory stays bounded however
/// broken a ledger is). Runs on `conn`, so a caller holding locks sees a stable table.
pub async fn diff_table(
    conn: &mut PgConnection,
    live: &Namespace,
    rebuilt: &Namespace,
    table: &str,
    key: &[&str],
    limit: i64,
) -> Result<Vec<RowDiff>, sqlx::Error> {
    let side = |a: &Namespace, b: &Namespace| {
        format!(
            "SELECT to_jsonb(d) FROM (SELECT * FROM \"{}\".{table} EXCEPT ALL SELECT * FROM \"{}\".{table}) d LIMIT $1",
            a.pg_schema(),
            b.pg_schema()
        )
    };
    let only_live: Vec<Value> = sqlx::query_scalar(&side(live, rebuilt))
        .bind(limit)
        .fetch_all(&mut *conn)
        .await?;
    let only_rebuilt: Vec<Value> = sqlx::query_scalar(&side(rebuilt, live))
        .bind(limit)
        .fetch_all(&mut *conn)
        .await?;
    let key_of = |row: &Value| {
        key.iter()
            .map(|k| format!("{k}={}", plain(&row[*k])))
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut rebuilt_by_key: BTreeMap<String, Value> =
        only_rebuilt.into_iter().map(|r| (key_of(&r), r)).collect();
    let mut diffs = Vec::new();
    for row in only_live {
        let k = key_of(&row);
        match rebuilt_by_key.remove(&k) {
            Some(other) => {
                let mut columns = Vec::new();
                if let (Value::Object(a), Value::Object(b)) = (&row, &other) {
                    for (col, va) in a {
                        let vb = b.get(col).cloned().unwrap_or(Value::Null);
                        if *va != vb {
                            columns.push((col.clone(), va.clone(), vb));
                        }
                    }
                }
                diffs.push(RowDiff::Changed { key: k, columns });
            }
            None => diffs.push(RowDiff::OnlyLive { key: k, row }),
        }
    }
    diffs.extend(
        rebuilt_by_key
            .into_iter()
            .map(|(key, row)| RowDiff::OnlyRebuilt { key, row }),
    );
    Ok(diffs)
}

/// A JSON scalar as an analyst would write it (strings without quotes).
pub fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
