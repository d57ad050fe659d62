//! The `requests` read model: one row per request with how it ended, where it went and
//! how long it took, for analysts' latency and error queries.
//!
//! Events of one request come from different processes (the ingress accepts, workers
//! attempt and finish), so their log order is not guaranteed: every event upserts the row,
//! and each column is owned by the events that know it. The first terminal event wins
//! (as in billing, where a request is charged once); a redelivered request's later
//! terminal event leaves the row alone.
//!
//! Writes are batched like billing's: `apply` only decodes and queues each event, and
//! `flush` loads the batch's existing rows in one query, folds the queued events into them
//! in log order in memory (with exactly the rules above, see [`Row::fold`]), and writes the
//! new rows in one multi-row insert and the changed ones in one multi-row upsert. One round
//! trip per event capped a replay at about 7,000 events per second.

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sqlx::PgConnection;
use uuid::Uuid;

use schemas::events::{
    current_version, AttemptStarted, CompletionFinished, RequestAccepted, RequestCancelled,
    RequestFailed,
};
use schemas::upcast::{upcast_with, UPCASTERS};
use schemas::{EventError, Usage, UsageSource};

use crate::log::StoredEvent;
use crate::runtime::{Projection, ProjectionError};

/// The event types the projection folds; the runner does not even read the others.
const REQUEST_TYPES: &[&str] = &[
    "RequestAccepted",
    "AttemptStarted",
    "CompletionFinished",
    "RequestFailed",
    "RequestCancelled",
];

/// Folds `RequestAccepted`, `AttemptStarted`, `CompletionFinished`, `RequestFailed` and
/// `RequestCancelled` into `requests`. Its only state is the current batch's queue.
#[derive(Debug, Default, Clone)]
pub struct RequestsProjection {
    /// The batch's events, decoded, in log order; written by `flush`.
    pending: Vec<Change>,
}

impl RequestsProjection {
    pub const NAME: &'static str = "requests";

    pub fn new() -> Self {
        Self::default()
    }
}

impl Projection for RequestsProjection {
    fn name(&self) -> &str {
        Self::NAME
    }

    async fn init<'a>(&'a mut self, _conn: &'a mut PgConnection) -> Result<(), ProjectionError> {
        // Events queued by a batch that was rolled back must never be written.
        self.pending.clear();
        Ok(())
    }

    fn event_types(&self) -> Option<&'static [&'static str]> {
        Some(REQUEST_TYPES)
    }

    async fn apply<'a>(
        &'a mut self,
        _tx: &'a mut PgConnection,
        event: &'a StoredEvent,
    ) -> Result<(), ProjectionError> {
        let position = event.position;
        let at = event.envelope.occurred_at;
        let change = match event.event_type() {
            "RequestAccepted" => Change::accepted(position, at, decode(event)?),
            "AttemptStarted" => Change::attempt(position, decode(event)?),
            "CompletionFinished" => Change::completed(position, at, decode(event)?),
            "RequestFailed" => Change::failed(position, at, decode(event)?),
            "RequestCancelled" => Change::cancelled(position, at, decode(event)?),
            _ => return Ok(()),
        };
        self.pending.push(change);
        Ok(())
    }

    async fn flush<'a>(&'a mut self, tx: &'a mut PgConnection) -> Result<(), ProjectionError> {
        let mut pending = std::mem::take(&mut self.pending);
        if pending.is_empty() {
            return Ok(());
        }
        // Grouped by request, each group still in log order (the sort is stable): the fold
        // walks the groups and the stored rows side by side, with no hashing.
        pending.sort_by_key(|c| c.request_id);
        let mut ids: Vec<Uuid> = pending.iter().map(|c| c.request_id).collect();
        ids.dedup();
        let mut existing: Vec<Row> = sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM requests WHERE request_id = ANY($1::uuid[])"
        ))
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        existing.sort_unstable_by_key(|r| r.request_id);
        let mut stored = existing.into_iter().peekable();
        // New rows and changed ones go in separately: a plain insert costs the server less
        // than an upsert (no speculative insertion; a quarter less server CPU for a 1M-event
        // replay), and in a replay nearly every row is new. The checkpoint's row lock makes this the only writer of `requests`, so
        // the rows read above are all there are; a row inserted by anyone else would fail
        // the batch (which is then retried), never be overwritten.
        let (mut fresh, mut changed) = (Vec::new(), Vec::new());
        let mut changes = pending.into_iter().peekable();
        while let Some(first) = changes.next() {
            let id = first.request_id;
            let before = stored.next_if(|r| r.request_id == id);
            let mut row = before.clone();
            Row::fold(&mut row, first);
            while let Some(next) = changes.next_if(|c| c.request_id == id) {
                Row::fold(&mut row, next);
            }
            match (before, row) {
                (None, Some(row)) => fresh.push(row),
                (Some(before), Some(row)) if before != row => changed.push(row),
                _ => {}
            }
        }
        write_rows(tx, &fresh, Write::Insert).await?;
        write_rows(tx, &changed, Write::Update).await?;
        Ok(())
    }
}

/// Decodes the data of an event whose type is known into that type, exactly as
/// [`StoredEvent::decode`] would (older schema versions upcast first, newer ones refused),
/// but straight from the stored JSON: without copying it and without going through the
/// [`schemas::Event`] enum, which dominated a replay's CPU (every event of the log is one of ours).
fn decode<T: DeserializeOwned>(event: &StoredEvent) -> Result<T, ProjectionError> {
    let env = &event.envelope;
    let fail = |err: EventError| ProjectionError::decode(event.position, &env.event_type, &err);
    let current = current_version(&env.event_type)
        .ok_or_else(|| fail(EventError::UnknownType(env.event_type.clone())))?;
    if env.schema_version > current {
        return Err(fail(EventError::FutureVersion {
            event_type: env.event_type.clone(),
            version: env.schema_version,
        }));
    }
    let malformed = |source| {
        fail(EventError::Malformed {
            event_type: env.event_type.clone(),
            source,
        })
    };
    if env.schema_version == current {
        return T::deserialize(&env.data).map_err(malformed);
    }
    let data = upcast_with(
        UPCASTERS,
        &env.event_type,
        env.schema_version,
        current,
        env.data.clone(),
    );
    T::deserialize(data).map_err(malformed)
}

/// The `requests` columns, in [`Row`]'s order.
macro_rules! columns {
    () => {
        "request_id, key_id, model, api, stream, status, channel_id, channel_name, \
         upstream_model, attempts, error_kind, prompt_tokens, completion_tokens, usage_source, \
         ttft_ms, duration_ms, accepted_at, finished_at, last_position"
    };
}
const COLUMNS: &str = columns!();

/// A batch's rows as one relation, bound column by column in [`Row`]'s order.
macro_rules! rows_input {
    () => {
        "SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::bool[], \
         $6::text[], $7::uuid[], $8::text[], $9::text[], $10::int[], $11::text[], $12::bigint[], \
         $13::bigint[], $14::text[], $15::bigint[], $16::bigint[], $17::timestamptz[], \
         $18::timestamptz[], $19::bigint[])"
    };
}

/// Rows no earlier batch wrote.
const INSERT_ROWS: &str = concat!("INSERT INTO requests (", columns!(), ") ", rows_input!());

/// Rows that exist, with every column replaced by the folded value.
const UPSERT_ROWS: &str = concat!(
    "INSERT INTO requests (",
    columns!(),
    ") ",
    rows_input!(),
    " ON CONFLICT (request_id) DO UPDATE SET \
       key_id = EXCLUDED.key_id, model = EXCLUDED.model, api = EXCLUDED.api, \
       stream = EXCLUDED.stream, status = EXCLUDED.status, channel_id = EXCLUDED.channel_id, \
       channel_name = EXCLUDED.channel_name, upstream_model = EXCLUDED.upstream_model, \
       attempts = EXCLUDED.attempts, error_kind = EXCLUDED.error_kind, \
       prompt_tokens = EXCLUDED.prompt_tokens, completion_tokens = EXCLUDED.completion_tokens, \
       usage_source = EXCLUDED.usage_source, ttft_ms = EXCLUDED.ttft_ms, \
       duration_ms = EXCLUDED.duration_ms, accepted_at = EXCLUDED.accepted_at, \
       finished_at = EXCLUDED.finished_at, last_position = EXCLUDED.last_position"
);

#[derive(Debug, Clone, Copy)]
enum Write {
    Insert,
    Update,
}

/// One `requests` row, as stored.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
struct Row {
    request_id: Uuid,
    key_id: Option<Uuid>,
    model: Option<String>,
    api: Option<String>,
    stream: Option<bool>,
    status: String,
    channel_id: Option<Uuid>,
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
    last_position: i64,
}

/// A status no terminal event has set yet (the table's default).
const ACCEPTED: &str = "accepted";

impl Row {
    /// A row no event has written yet: the table's defaults.
    fn empty(request_id: Uuid, last_position: i64) -> Self {
        Self {
            request_id,
            key_id: None,
            model: None,
            api: None,
            stream: None,
            status: ACCEPTED.to_owned(),
            channel_id: None,
            channel_name: None,
            upstream_model: None,
            attempts: 0,
            error_kind: None,
            prompt_tokens: None,
            completion_tokens: None,
            usage_source: None,
            ttft_ms: None,
            duration_ms: None,
            accepted_at: None,
            finished_at: None,
            last_position,
        }
    }

    /// Folds one event into the row (`None`: no row yet). The rules per event:
    /// - accepted: sets who, what and when it was accepted, whatever the row's state;
    /// - attempt: names the latest attempt's channel while the request has not ended and
    ///   the attempt is not older than the one recorded;
    /// - terminal: settles the request unless it already ended, keeping what earlier
    ///   events knew where the terminal event does not say.
    ///
    /// `last_position` only moves when the event changed the row.
    fn fold(row: &mut Option<Row>, change: Change) {
        let Change {
            request_id,
            position,
            kind,
        } = change;
        match kind {
            ChangeKind::Accepted {
                key_id,
                model,
                api,
                stream,
                at,
            } => {
                let r = row.get_or_insert_with(|| Row::empty(request_id, position));
                r.key_id = Some(key_id);
                r.model = Some(model);
                r.api = api;
                r.stream = Some(stream);
                r.accepted_at = Some(at);
                r.last_position = r.last_position.max(position);
            }
            ChangeKind::Attempt {
                attempt,
                channel_id,
                channel_name,
                upstream_model,
            } => {
                let r = match row {
                    None => row.insert(Row::empty(request_id, position)),
                    Some(r) if r.status == ACCEPTED && attempt >= r.attempts => r,
                    Some(_) => return,
                };
                r.attempts = attempt;
                r.channel_id = Some(channel_id);
                r.channel_name = Some(channel_name);
                r.upstream_model = Some(upstream_model);
                r.last_position = r.last_position.max(position);
            }
            ChangeKind::Terminal(t) => match row {
                None => {
                    *row = Some(Row {
                        key_id: Some(t.key_id),
                        model: Some(t.model),
                        status: t.status.to_owned(),
                        channel_id: t.channel_id,
                        channel_name: t.channel_name,
                        upstream_model: t.upstream_model,
                        attempts: t.attempts.unwrap_or(0),
                        error_kind: t.error_kind,
                        prompt_tokens: t.usage.map(|u| big(u.prompt_tokens)),
                        completion_tokens: t.usage.map(|u| big(u.completion_tokens)),
                        usage_source: t.usage_source.and_then(|s| tag(&s)),
                        ttft_ms: t.ttft_ms.map(big),
                        duration_ms: t.duration_ms.map(big),
                        finished_at: Some(t.finished_at),
                        ..Row::empty(request_id, position)
                    });
                }
                Some(r) if r.status == ACCEPTED => {
                    r.status = t.status.to_owned();
                    r.key_id = r.key_id.or(Some(t.key_id));
                    if r.model.is_none() {
                        r.model = Some(t.model);
                    }
                    r.channel_id = t.channel_id.or(r.channel_id);
                    if t.channel_name.is_some() {
                        r.channel_name = t.channel_name;
                    }
                    if t.upstream_model.is_some() {
                        r.upstream_model = t.upstream_model;
                    }
                    r.attempts = r.attempts.max(t.attempts.unwrap_or(0));
                    r.error_kind = t.error_kind;
                    r.prompt_tokens = t.usage.map(|u| big(u.prompt_tokens));
                    r.completion_tokens = t.usage.map(|u| big(u.completion_tokens));
                    r.usage_source = t.usage_source.and_then(|s| tag(&s));
                    r.ttft_ms = t.ttft_ms.map(big);
                    r.duration_ms = t.duration_ms.map(big);
                    r.finished_at = Some(t.finished_at);
                    r.last_position = r.last_position.max(position);
                }
                Some(_) => {}
            },
        }
    }
}

/// One event of the batch, reduced to what the row needs.
#[derive(Debug, Clone)]
struct Change {
    request_id: Uuid,
    position: i64,
    kind: ChangeKind,
}

#[derive(Debug, Clone)]
enum ChangeKind {
    Accepted {
        key_id: Uuid,
        model: String,
        api: Option<String>,
        stream: bool,
        at: DateTime<Utc>,
    },
    Attempt {
        attempt: i32,
        channel_id: Uuid,
        channel_name: String,
        upstream_model: String,
    },
    Terminal(Terminal),
}

/// The columns a terminal event sets; `None` keeps what earlier events wrote where the
/// rules say so.
#[derive(Debug, Clone)]
struct Terminal {
    key_id: Uuid,
    model: String,
    status: &'static str,
    channel_id: Option<Uuid>,
    channel_name: Option<String>,
    upstream_model: Option<String>,
    attempts: Option<i32>,
    error_kind: Option<String>,
    usage: Option<Usage>,
    usage_source: Option<UsageSource>,
    ttft_ms: Option<u64>,
    duration_ms: Option<u64>,
    finished_at: DateTime<Utc>,
}

impl Change {
    fn accepted(position: i64, at: DateTime<Utc>, e: RequestAccepted) -> Self {
        Self {
            request_id: e.request_id,
            position,
            kind: ChangeKind::Accepted {
                key_id: e.key_id,
                api: tag(&e.api),
                model: e.model,
                stream: e.stream,
                at,
            },
        }
    }

    fn attempt(position: i64, e: AttemptStarted) -> Self {
        Self {
            request_id: e.request_id,
            position,
            kind: ChangeKind::Attempt {
                attempt: small(e.attempt),
                channel_id: e.channel_id,
                channel_name: e.channel_name,
                upstream_model: e.upstream_model,
            },
        }
    }

    fn terminal(request_id: Uuid, position: i64, t: Terminal) -> Self {
        Self {
            request_id,
            position,
            kind: ChangeKind::Terminal(t),
        }
    }

    fn completed(position: i64, at: DateTime<Utc>, e: CompletionFinished) -> Self {
        let t = Terminal {
            key_id: e.key_id,
            model: e.model,
            status: "completed",
            channel_id: Some(e.channel_id),
            channel_name: Some(e.channel_name),
            upstream_model: Some(e.upstream_model),
            attempts: Some(small(e.attempts)),
            error_kind: None,
            usage: Some(e.usage),
            usage_source: Some(e.usage_source),
            ttft_ms: e.ttft_ms,
            duration_ms: Some(e.duration_ms),
            finished_at: at,
        };
        Self::terminal(e.request_id, position, t)
    }

    fn failed(position: i64, at: DateTime<Utc>, e: RequestFailed) -> Self {
        let t = Terminal {
            key_id: e.key_id,
            model: e.model,
            status: "failed",
            channel_id: e.channel_id,
            channel_name: None,
            upstream_model: None,
            attempts: Some(small(e.attempts)),
            error_kind: tag(&e.kind),
            usage: e.usage,
            usage_source: e.usage_source,
            ttft_ms: None,
            duration_ms: None,
            finished_at: at,
        };
        Self::terminal(e.request_id, position, t)
    }

    fn cancelled(position: i64, at: DateTime<Utc>, e: RequestCancelled) -> Self {
        let t = Terminal {
            key_id: e.key_id,
            model: e.model,
            status: "cancelled",
            channel_id: e.channel_id,
            channel_name: None,
            upstream_model: None,
            attempts: None,
            error_kind: None,
            usage: Some(e.usage),
            usage_source: Some(e.usage_source),
            ttft_ms: None,
            duration_ms: None,
            finished_at: at,
        };
        Self::terminal(e.request_id, position, t)
    }
}

/// Writes rows of the batch in one statement. Each request appears once (the rows are
/// folded per request), as `ON CONFLICT DO UPDATE` requires.
async fn write_rows(tx: &mut PgConnection, rows: &[Row], how: Write) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    fn col<'r, T, F: Fn(&'r Row) -> T>(rows: &'r [Row], f: F) -> Vec<T> {
        rows.iter().map(f).collect()
    }
    let sql = match how {
        Write::Insert => INSERT_ROWS,
        Write::Update => UPSERT_ROWS,
    };
    sqlx::query(sql)
        .bind(col(rows, |r| r.request_id))
        .bind(col(rows, |r| r.key_id))
        .bind(col(rows, |r| r.model.as_deref()))
        .bind(col(rows, |r| r.api.as_deref()))
        .bind(col(rows, |r| r.stream))
        .bind(col(rows, |r| r.status.as_str()))
        .bind(col(rows, |r| r.channel_id))
        .bind(col(rows, |r| r.channel_name.as_deref()))
        .bind(col(rows, |r| r.upstream_model.as_deref()))
        .bind(col(rows, |r| r.attempts))
        .bind(col(rows, |r| r.error_kind.as_deref()))
        .bind(col(rows, |r| r.prompt_tokens))
        .bind(col(rows, |r| r.completion_tokens))
        .bind(col(rows, |r| r.usage_source.as_deref()))
        .bind(col(rows, |r| r.ttft_ms))
        .bind(col(rows, |r| r.duration_ms))
        .bind(col(rows, |r| r.accepted_at))
        .bind(col(rows, |r| r.finished_at))
        .bind(col(rows, |r| r.last_position))
        .execute(tx)
        .await?;
    Ok(())
}

/// The serde name of a unit enum variant (`chat_completions`, `rate_limited`), which is
/// what analysts see in the events too.
fn tag<T: Serialize>(value: &T) -> Option<String> {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => Some(s),
        _ => None,
    }
}

fn big(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn small(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}
