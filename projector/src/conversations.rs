//! The conversation projector: folds session events and the answers of session requests
//! into the `sessions`, `messages` and `session_rounds` read models (run by `sluice
//! projector`, next to [`crate::requests`]).
//!
//! - `SessionCreated` / `SessionRenamed` / `SessionDeleted` keep one `sessions` row; a
//!   deleted session loses its messages and is hidden from reads (its row stays, so a late
//!   answer to it is recognised and dropped).
//! - `SessionMessageAppended` adds a user turn and a pending round for the request queued
//!   to answer it; `SessionReplyRegenerated` adds a pending round that, once it completes,
//!   supersedes the answer it replaces (a failed regeneration leaves the old answer).
//! - `CompletionFinished` with a `session_id` settles its round and adds the assistant turn
//!   (message id = request id); `RequestFailed` and `RequestCancelled` settle a session
//!   round without an answer. As everywhere, the first terminal event of a request wins.
//!
//! The order of a session's messages is the log order: the ingress stores a user turn
//! (awaiting JetStream's ack) before it queues the request answering it, so the answer's
//! event always comes later. Failures of requests outside sessions are by far the most
//! common terminal events here; they are queued and settled in one statement per batch
//! (flushed before any later session event, so the log order still decides).

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use schemas::events::{
    CompletionFinished, SessionCreated, SessionMessageAppended, SessionReplyRegenerated,
};
use schemas::{Event, Usage, UsageSource};

use crate::log::StoredEvent;
use crate::runtime::{Projection, ProjectionError};

/// The event types the projection folds; the runner does not read the others.
const TYPES: &[&str] = &[
    "SessionCreated",
    "SessionRenamed",
    "SessionDeleted",
    "SessionMessageAppended",
    "SessionReplyRegenerated",
    "CompletionFinished",
    "RequestFailed",
    "RequestCancelled",
];

/// Folds conversations into `sessions`, `messages` and `session_rounds`. Its only state
/// is the batch's queue of request failures not yet written.
#[derive(Debug, Default, Clone)]
pub struct ConversationsProjection {
    ended: Vec<Ended>,
}

/// A request that ended without an answer (failed or cancelled), maybe a session's.
#[derive(Debug, Clone)]
struct Ended {
    request_id: Uuid,
    status: &'static str,
    usage: Option<Usage>,
    usage_source: Option<UsageSource>,
    at: DateTime<Utc>,
}

impl ConversationsProjection {
    pub const NAME: &'static str = "conversations";

    pub fn new() -> Self {
        Self::default()
    }

    /// Settles the queued failures, in one statement; rounds that already ended (or do
    /// not exist: most failed requests belong to no session) are left alone.
    async fn settle_ended(&mut self, tx: &mut PgConnection) -> Result<(), sqlx::Error> {
        if self.ended.is_empty() {
            return Ok(());
        }
        let ended = std::mem::take(&mut self.ended);
        // A request ends once; if a redelivery produced two failures in one batch, the
        // first wins, like everywhere else.
        let mut seen = std::collections::HashSet::with_capacity(ended.len());
        let ended: Vec<&Ended> = ended.iter().filter(|e| seen.insert(e.request_id)).collect();
        let col = |f: fn(&Ended) -> i64| ended.iter().map(|e| f(e)).collect::<Vec<i64>>();
        sqlx::query(
            "UPDATE session_rounds r SET status = e.status, prompt_tokens = e.prompt, \
               completion_tokens = e.completion, total_tokens = e.total, \
               usage_source = e.source, finished_at = e.at \
             FROM UNNEST($1::uuid[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[], \
                         $6::text[], $7::timestamptz[]) \
                  AS e(request_id, status, prompt, completion, total, source, at) \
             WHERE r.request_id = e.request_id AND r.status = 'pending'",
        )
        .bind(ended.iter().map(|e| e.request_id).collect::<Vec<_>>())
        .bind(ended.iter().map(|e| e.status).collect::<Vec<_>>())
        .bind(col(|e| e.usage.map_or(0, |u| big(u.prompt_tokens))))
        .bind(col(|e| e.usage.map_or(0, |u| big(u.completion_tokens))))
        .bind(col(|e| e.usage.map_or(0, |u| big(usage_total(&u)))))
        .bind(
            ended
                .iter()
                .map(|e| e.usage_source.map(source_tag))
                .collect::<Vec<_>>(),
        )
        .bind(ended.iter().map(|e| e.at).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
        Ok(())
    }
}

impl Projection for ConversationsProjection {
    fn name(&self) -> &str {
        Self::NAME
    }

    async fn init<'a>(&'a mut self, _conn: &'a mut PgConnection) -> Result<(), ProjectionError> {
        // Failures queued by a batch that was rolled back must never be written.
        self.ended.clear();
        Ok(())
    }

    fn event_types(&self) -> Option<&'static [&'static str]> {
        Some(TYPES)
    }

    async fn apply<'a>(
        &'a mut self,
        tx: &'a mut PgConnection,
        event: &'a StoredEvent,
    ) -> Result<(), ProjectionError> {
        let kind = event.event_type();
        if !TYPES.contains(&kind) {
            return Ok(());
        }
        // Most completions belong to no session: skip them before paying for a decode.
        if kind == "CompletionFinished"
            && event
                .envelope
                .data
                .get("session_id")
                .is_none_or(serde_json::Value::is_null)
        {
            return Ok(());
        }
        let position = event.position;
        let at = event.envelope.occurred_at;
        let decoded = event.decode()?;
        match decoded {
            Event::RequestFailed(e) => {
                self.ended.push(Ended {
                    request_id: e.request_id,
                    status: "failed",
                    usage: e.usage,
                    usage_source: e.usage_source,
                    at,
                });
                return Ok(());
            }
            Event::RequestCancelled(e) => {
                self.ended.push(Ended {
                    request_id: e.request_id,
                    status: "cancelled",
                    usage: Some(e.usage),
                    usage_source: Some(e.usage_source),
                    at,
                });
                return Ok(());
            }
            _ => {}
        }
        // Keep the log order between queued failures and this event.
        self.settle_ended(tx).await?;
        match decoded {
            Event::SessionCreated(e) => created(tx, position, at, e).await?,
            Event::SessionRenamed(e) => {
                sqlx::query(
                    "UPDATE sessions SET title = $2, updated_at = $3, last_position = $4 \
                     WHERE session_id = $1 AND deleted_at IS NULL",
                )
                .bind(e.session_id)
                .bind(&e.title)
                .bind(at)
                .bind(position)
                .execute(&mut *tx)
                .await?;
            }
            Event::SessionDeleted(e) => {
                sqlx::query(
                    "WITH s AS (UPDATE sessions SET deleted_at = $2, updated_at = $2, last_position = $3 \
                                WHERE session_id = $1 AND deleted_at IS NULL RETURNING session_id) \
                     DELETE FROM messages WHERE session_id = $1",
                )
                .bind(e.session_id)
                .bind(at)
                .bind(position)
                .execute(&mut *tx)
                .await?;
            }
            Event::SessionMessageAppended(e) => appended(tx, position, at, e).await?,
            Event::SessionReplyRegenerated(e) => regenerated(tx, position, at, e).await?,
            Event::CompletionFinished(e) => answered(tx, position, at, e).await?,
            _ => {}
        }
        Ok(())
    }

    async fn flush<'a>(&'a mut self, tx: &'a mut PgConnection) -> Result<(), ProjectionError> {
        self.settle_ended(tx).await?;
        Ok(())
    }
}

async fn created(
    tx: &mut PgConnection,
    position: i64,
    at: DateTime<Utc>,
    e: SessionCreated,
) -> Result<(), sqlx::Error> {
    if e.owner_user_id.is_some() == e.owner_key_id.is_some() {
        // The ingress never writes this; a hand-made event must not stall the projection.
        tracing::warn!(
            position,
            "SessionCreated without exactly one owner; ignored"
        );
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO sessions (session_id, owner_user_id, owner_key_id, title, model, system_prompt, \
                               created_at, updated_at, last_position) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $8) ON CONFLICT (session_id) DO NOTHING",
    )
    .bind(e.session_id)
    .bind(e.owner_user_id)
    .bind(e.owner_key_id)
    .bind(&e.title)
    .bind(&e.model)
    .bind(&e.system)
    .bind(at)
    .bind(position)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// A user turn and the pending round answering it, in a live session.
async fn appended(
    tx: &mut PgConnection,
    position: i64,
    at: DateTime<Utc>,
    e: SessionMessageAppended,
) -> Result<(), sqlx::Error> {
    if e.role != "user" {
        tracing::warn!(
            position,
            "SessionMessageAppended with a role other than `user`; ignored"
        );
        return Ok(());
    }
    sqlx::query(
        "WITH s AS (UPDATE sessions SET updated_at = $7, last_position = $6 \
                    WHERE session_id = $1 AND deleted_at IS NULL RETURNING session_id), \
              m AS (INSERT INTO messages (message_id, session_id, position, role, content, request_id, \
                                          model, created_at) \
                    SELECT $2, s.session_id, $6, 'user', $3, $4, $5, $7 FROM s \
                    ON CONFLICT DO NOTHING) \
         INSERT INTO session_rounds (request_id, session_id, kind, model, started_at, position) \
         SELECT $4, s.session_id, 'chat', $5, $7, $6 FROM s ON CONFLICT DO NOTHING",
    )
    .bind(e.session_id)
    .bind(e.message_id)
    .bind(&e.content)
    .bind(e.request_id)
    .bind(&e.model)
    .bind(position)
    .bind(at)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// A pending regeneration round; the answer it replaces is marked, not yet superseded.
async fn regenerated(
    tx: &mut PgConnection,
    position: i64,
    at: DateTime<Utc>,
    e: SessionReplyRegenerated,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "WITH s AS (UPDATE sessions SET updated_at = $5, last_position = $4 \
                    WHERE session_id = $1 AND deleted_at IS NULL RETURNING session_id), \
              r AS (UPDATE messages SET replaced_by = $2 \
                    WHERE message_id = $6 AND session_id = $1 AND role = 'assistant' \
                      AND NOT superseded AND EXISTS (SELECT 1 FROM s)) \
         INSERT INTO session_rounds (request_id, session_id, kind, model, started_at, position) \
         SELECT $2, s.session_id, 'regenerate', $3, $5, $4 FROM s ON CONFLICT DO NOTHING",
    )
    .bind(e.session_id)
    .bind(e.request_id)
    .bind(&e.model)
    .bind(position)
    .bind(at)
    .bind(e.replaces)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// A session request's answer: settles its round and, if the round was still pending
/// and the session is alive, adds the assistant turn and supersedes what it replaces.
async fn answered(
    tx: &mut PgConnection,
    position: i64,
    at: DateTime<Utc>,
    e: CompletionFinished,
) -> Result<(), sqlx::Error> {
    let Some(session_id) = e.session_id else {
        return Ok(());
    };
    sqlx::query(
        "WITH r AS (UPDATE session_rounds SET status = 'completed', prompt_tokens = $6, \
                      completion_tokens = $7, total_tokens = $8, usage_source = $9, finished_at = $10 \
                    WHERE request_id = $2 AND session_id = $1 AND status = 'pending' RETURNING request_id), \
              s AS (UPDATE sessions SET updated_at = $10, last_position = $11 \
                    WHERE session_id = $1 AND deleted_at IS NULL AND EXISTS (SELECT 1 FROM r) \
                    RETURNING session_id), \
              m AS (INSERT INTO messages (message_id, session_id, position, role, content, request_id, \
                                          model, finish_reason, created_at) \
                    SELECT $2, s.session_id, $11, 'assistant', $3, $2, $4, $5, $10 FROM s \
                    ON CONFLICT DO NOTHING RETURNING message_id) \
         UPDATE messages SET superseded = true \
         WHERE session_id = $1 AND replaced_by = $2 AND EXISTS (SELECT 1 FROM m)",
    )
    .bind(session_id)
    .bind(e.request_id)
    .bind(e.content.as_deref().unwrap_or_default())
    .bind(&e.model)
    .bind(&e.finish_reason)
    .bind(big(e.usage.prompt_tokens))
    .bind(big(e.usage.completion_tokens))
    .bind(big(usage_total(&e.usage)))
    .bind(source_tag(e.usage_source))
    .bind(at)
    .bind(position)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Providers' totals may leave out some parts; never report less than prompt + completion.
fn usage_total(u: &Usage) -> u64 {
    u.total_tokens.max(u.prompt_tokens + u.completion_tokens)
}

fn source_tag(s: UsageSource) -> &'static str {
    match s {
        UsageSource::Provider => "provider",
        UsageSource::Estimated => "estimated",
    }
}

fn big(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
