//! The event log: `event_log` rows in position order. The journal is its only writer
//! ([`append_batch`]); projectors, replays and exports read it ([`read_after`],
//! [`read_range`]). Positions are JetStream stream sequences, so they are unique and
//! increasing but may have gaps (skipped or purged messages): readers always ask for
//! "after position N", never for "position N + 1".

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::types::Json;
use sqlx::PgExecutor;
use uuid::Uuid;

use schemas::events::Metadata;
use schemas::{Envelope, Event, Namespace};

use crate::runtime::ProjectionError;

/// One row of `event_log`: the envelope as published plus where and when it was stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    /// The JetStream stream sequence of the event; the log's total order.
    pub position: i64,
    pub envelope: Envelope,
    /// When the journal stored it. Not part of the fact: never use it in a projection,
    /// or a replay would give different results.
    pub recorded_at: DateTime<Utc>,
}

impl StoredEvent {
    /// The stored `type`, for matching before paying for a full decode.
    pub fn event_type(&self) -> &str {
        &self.envelope.event_type
    }

    /// Decodes the typed event, turning a failure into a [`ProjectionError::Decode`] that
    /// names the position and type but never the data (it may hold prompt text).
    pub fn decode(&self) -> Result<Event, ProjectionError> {
        self.envelope
            .decode()
            .map_err(|err| ProjectionError::decode(self.position, &self.envelope.event_type, &err))
    }
}

/// Appends `(position, envelope)` pairs in one multi-row insert and returns how many rows
/// were new. Idempotent: a position or an `event_id` already in the log is skipped, so a
/// batch retried after an unknown commit outcome, or an event republished outside
/// JetStream's dedupe window, is stored once. Callers pass positions in increasing order.
pub async fn append_batch<'e>(
    exec: impl PgExecutor<'e>,
    events: &[(i64, Envelope)],
) -> Result<u64, sqlx::Error> {
    if events.is_empty() {
        return Ok(0);
    }
    let n = events.len();
    let mut positions = Vec::with_capacity(n);
    let mut ids: Vec<Uuid> = Vec::with_capacity(n);
    let mut streams: Vec<&str> = Vec::with_capacity(n);
    let mut types: Vec<&str> = Vec::with_capacity(n);
    let mut versions: Vec<i16> = Vec::with_capacity(n);
    let mut data: Vec<Json<&Value>> = Vec::with_capacity(n);
    let mut metadata: Vec<Json<&Metadata>> = Vec::with_capacity(n);
    let mut occurred: Vec<DateTime<Utc>> = Vec::with_capacity(n);
    for (position, env) in events {
        let version = i16::try_from(env.schema_version).map_err(|_| {
            sqlx::Error::Encode(
                format!(
                    "event at position {position} has schema_version {} beyond smallint",
                    env.schema_version
                )
                .into(),
            )
        })?;
        positions.push(*position);
        ids.push(env.event_id);
        streams.push(&env.stream);
        types.push(&env.event_type);
        versions.push(version);
        data.push(Json(&env.data));
        metadata.push(Json(&env.metadata));
        occurred.push(env.occurred_at);
    }
    let result = sqlx::query(
        "INSERT INTO event_log (position, event_id, stream, type, schema_version, data, metadata, occurred_at) \
         SELECT * FROM UNNEST($1::bigint[], $2::uuid[], $3::text[], $4::text[], $5::smallint[], \
                              $6::jsonb[], $7::jsonb[], $8::timestamptz[]) \
         ON CONFLICT DO NOTHING",
    )
    .bind(positions)
    .bind(ids)
    .bind(streams)
    .bind(types)
    .bind(versions)
    .bind(data)
    .bind(metadata)
    .bind(occurred)
    .execute(exec)
    .await?;
    Ok(result.rows_affected())
}

/// Up to `limit` events after position `after`, in position order, from the `event_log`
/// that the connection's `search_path` resolves.
pub async fn read_after<'e>(
    exec: impl PgExecutor<'e>,
    after: i64,
    limit: i64,
) -> Result<Vec<StoredEvent>, sqlx::Error> {
    read_range(exec, None, after, i64::MAX, limit).await
}

/// Up to `limit` events with `after < position <= until`, in position order. `source`
/// names the schema whose `event_log` is read; `None` leaves it to the `search_path`.
/// A replay into a scratch schema reads the live namespace's log this way while writing
/// its read models (and checkpoint) unqualified into the scratch schema.
pub async fn read_range<'e>(
    exec: impl PgExecutor<'e>,
    source: Option<&Namespace>,
    after: i64,
    until: i64,
    limit: i64,
) -> Result<Vec<StoredEvent>, sqlx::Error> {
    // A namespace is validated to [a-z0-9_] and cannot be bound as a parameter, so it
    // is the one piece of SQL built by formatting.
    let table = match source {
        Some(ns) => format!("\"{}\".event_log", ns.pg_schema()),
        None => "event_log".to_owned(),
    };
    let sql = format!(
        "SELECT position, event_id, stream, type, schema_version, data, metadata, occurred_at, recorded_at \
         FROM {table} WHERE position > $1 AND position <= $2 ORDER BY position LIMIT $3"
    );
    let rows: Vec<LogRow> = sqlx::query_as(&sql)
        .bind(after)
        .bind(until)
        .bind(limit)
        .fetch_all(exec)
        .await?;
    Ok(rows.into_iter().map(LogRow::into_stored).collect())
}

/// Events of a range read by [`read_range_of_types`], and how far the read covered the
/// log: every event in `(after, covered]` of a wanted type is in `events`.
#[derive(Debug, Clone, PartialEq)]
pub struct Scanned {
    pub events: Vec<StoredEvent>,
    /// The highest position the read accounts for, skipped types included, so a
    /// checkpoint moves past ignored events too (`after` when the range was empty).
    pub covered: i64,
    /// The range goes on after `covered`: read again.
    pub more: bool,
}

/// With `types`, the events of those types in the next stretch of `limit` positions after
/// `after` (up to `until`); with `None`, the next `limit` events, as [`read_range`]. Reading a fixed stretch of positions rather
/// than "the next N rows" keeps every query a bounded primary-key range scan whatever
/// the planner's statistics say (right after a bulk load they are stale, and an
/// unbounded `ORDER BY position LIMIT n` then sorts the whole rest of the log). A
/// projection that ignores much of the log (billing skips `RequestAccepted`, half of all
/// events) never pays for sending and parsing the rows it would skip.
pub async fn read_range_of_types<'e>(
    exec: impl PgExecutor<'e>,
    source: Option<&Namespace>,
    after: i64,
    until: i64,
    limit: i64,
    types: Option<&[&str]>,
) -> Result<Scanned, sqlx::Error> {
    let Some(types) = types else {
        // Every event wanted: the next `limit` rows, as `read_range` reads them.
        let events = read_range(exec, source, after, until, limit).await?;
        let covered = events.last().map_or(after, |e| e.position);
        let more = i64::try_from(events.len()).unwrap_or(i64::MAX) >= limit;
        return Ok(Scanned {
            events,
            covered,
            more,
        });
    };
    let table = match source {
        Some(ns) => format!("\"{}\".event_log", ns.pg_schema()),
        None => "event_log".to_owned(),
    };
    // One statement, so the stretch's end and its rows come from one snapshot. The end
    // never passes the log's head: the journal commits batches in position order, so
    // every position up to the visible head that will ever exist is already visible.
    let sql = format!(
        "WITH bound AS ( \
           SELECT LEAST($2, (SELECT COALESCE(max(position), 0) FROM {table})) AS top \
         ), stretch AS ( \
           SELECT top, GREATEST($1, LEAST($1 + $3, top)) AS hi FROM bound \
         ) \
         SELECT s.top, s.hi, e.position, e.event_id, e.stream, e.type, e.schema_version, e.data, e.metadata, \
                e.occurred_at, e.recorded_at \
         FROM stretch s LEFT JOIN LATERAL ( \
           SELECT * FROM {table} WHERE position > $1 AND position <= s.hi AND type = ANY($4) \
           ORDER BY position \
         ) e ON true \
         ORDER BY e.position"
    );
    let rows: Vec<ScanRow> = sqlx::query_as(&sql)
        .bind(after)
        .bind(until)
        .bind(limit.max(1))
        .bind(types)
        .fetch_all(exec)
        .await?;
    let (top, hi) = rows.first().map_or((after, after), |r| {
        (r.top.unwrap_or(after), r.hi.unwrap_or(after))
    });
    let events: Vec<StoredEvent> = rows.into_iter().filter_map(ScanRow::into_stored).collect();
    Ok(Scanned {
        events,
        covered: hi.max(after),
        more: hi < top,
    })
}

/// The highest position in the log, or 0 when it is empty. The journal resumes from the
/// JetStream sequence after it.
pub async fn head<'e>(exec: impl PgExecutor<'e>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT COALESCE(MAX(position), 0)::bigint FROM event_log")
        .fetch_one(exec)
        .await
}

#[derive(sqlx::FromRow)]
struct LogRow {
    position: i64,
    event_id: Uuid,
    stream: String,
    #[sqlx(rename = "type")]
    event_type: String,
    schema_version: i16,
    data: Value,
    metadata: Value,
    occurred_at: DateTime<Utc>,
    recorded_at: DateTime<Utc>,
}

/// A row of a stretch read: where the range ends (`top`) and where this stretch ends
/// (`hi`), and an event if one of the wanted types was in it.
#[derive(sqlx::FromRow)]
struct ScanRow {
    top: Option<i64>,
    hi: Option<i64>,
    position: Option<i64>,
    event_id: Option<Uuid>,
    stream: Option<String>,
    #[sqlx(rename = "type")]
    event_type: Option<String>,
    schema_version: Option<i16>,
    data: Option<Value>,
    metadata: Option<Value>,
    occurred_at: Option<DateTime<Utc>>,
    recorded_at: Option<DateTime<Utc>>,
}

impl ScanRow {
    fn into_stored(self) -> Option<StoredEvent> {
        Some(
            LogRow {
                position: self.position?,
                event_id: self.event_id?,
                stream: self.stream?,
                event_type: self.event_type?,
                schema_version: self.schema_version?,
                data: self.data?,
                metadata: self.metadata?,
                occurred_at: self.occurred_at?,
                recorded_at: self.recorded_at?,
            }
            .into_stored(),
        )
    }
}

impl LogRow {
    fn into_stored(self) -> StoredEvent {
        // Metadata is only ever written from a parsed `Metadata`, so this cannot fail in
        // practice; if it did, losing trace ids beats stopping every projector.
        let metadata = serde_json::from_value(self.metadata).unwrap_or_else(|_| {
            tracing::debug!(
                position = self.position,
                "event metadata unreadable; using empty metadata"
            );
            Metadata::default()
        });
        StoredEvent {
            position: self.position,
            envelope: Envelope {
                event_id: self.event_id,
                stream: self.stream,
                event_type: self.event_type,
                // Written from a u16 that fit a smallint, so never negative.
                schema_version: u16::try_from(self.schema_version).unwrap_or(0),
                occurred_at: self.occurred_at,
                data: self.data,
                metadata,
            },
            recorded_at: self.recorded_at,
        }
    }
}

/// Postgres `text` and `jsonb` cannot hold U+0000, which JSON and Rust strings allow: one
/// such event would otherwise fail its batch forever and stall the whole log. The journal
/// replaces each NUL with U+FFFD before appending. Returns whether anything changed.
pub fn scrub_nul(env: &mut Envelope) -> bool {
    let mut changed = scrub_str(&mut env.stream) | scrub_str(&mut env.event_type);
    if let Some(trace) = env.metadata.trace_id.as_mut() {
        changed |= scrub_str(trace);
    }
    changed | scrub_value(&mut env.data)
}

fn scrub_str(s: &mut String) -> bool {
    if s.contains('\0') {
        *s = s.replace('\0', "\u{FFFD}");
        true
    } else {
        false
    }
}

fn scrub_value(v: &mut Value) -> bool {
    match v {
        Value::String(s) => scrub_str(s),
        Value::Array(items) => items
            .iter_mut()
            .fold(false, |acc, item| scrub_value(item) | acc),
        Value::Object(map) => {
            let mut changed = false;
            if map.keys().any(|k| k.contains('\0')) {
                let old = std::mem::take(map);
                for (mut k, val) in old {
                    scrub_str(&mut k);
                    map.insert(k, val);
                }
                changed = true;
            }
            map.values_mut()
                .fold(changed, |acc, item| scrub_value(item) | acc)
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_replaces_nul_everywhere() {
        let mut env = Envelope {
            event_id: schemas::new_id(),
            stream: "request-a\0".into(),
            event_type: "X".into(),
            schema_version: 1,
            occurred_at: Utc::now(),
            data: serde_json::json!({"a\0": ["x\0y", {"k": "\0"}], "n": 1}),
            metadata: Metadata::default(),
        };
        assert!(scrub_nul(&mut env));
        assert_eq!(env.stream, "request-a\u{FFFD}");
        assert_eq!(
            env.data,
            serde_json::json!({"a\u{FFFD}": ["x\u{FFFD}y", {"k": "\u{FFFD}"}], "n": 1})
        );
        assert!(!scrub_nul(&mut env));
    }
}
