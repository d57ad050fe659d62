//! The `requests` read model: one row per request with how it ended, where it went and
//! how long it took, for analysts' latency and error queries.
//!
//! Events of one request come from different processes (the ingress accepts, workers
//! attempt and finish), so their log order is not guaranteed: every event upserts the row,
//! and each column is owned by the events that know it. The first terminal event wins
//! (as in billing, where a request is charged once); a redelivered request's later
//! terminal event leaves the row alone.

use serde::Serialize;
use sqlx::PgConnection;
use uuid::Uuid;

use schemas::events::{
    AttemptStarted, CompletionFinished, RequestAccepted, RequestCancelled, RequestFailed,
};
use schemas::{Event, Usage, UsageSource};

use crate::log::StoredEvent;
use crate::runtime::{Projection, ProjectionError};

/// Folds `RequestAccepted`, `AttemptStarted`, `CompletionFinished`, `RequestFailed` and
/// `RequestCancelled` into `requests`. Stateless, so `init` has nothing to load.
#[derive(Debug, Default, Clone)]
pub struct RequestsProjection;

impl RequestsProjection {
    pub const NAME: &'static str = "requests";

    pub fn new() -> Self {
        Self
    }
}

impl Projection for RequestsProjection {
    fn name(&self) -> &str {
        Self::NAME
    }

    async fn apply<'a>(
        &'a mut self,
        tx: &'a mut PgConnection,
        event: &'a StoredEvent,
    ) -> Result<(), ProjectionError> {
        if !matches!(
            event.event_type(),
            "RequestAccepted"
                | "AttemptStarted"
                | "CompletionFinished"
                | "RequestFailed"
                | "RequestCancelled"
        ) {
            return Ok(());
        }
        let position = event.position;
        let at = event.envelope.occurred_at;
        match event.decode()? {
            Event::RequestAccepted(e) => accepted(tx, position, at, &e).await?,
            Event::AttemptStarted(e) => attempt(tx, position, &e).await?,
            Event::CompletionFinished(e) => {
                finish(tx, position, Terminal::completed(&e, at)).await?
            }
            Event::RequestFailed(e) => finish(tx, position, Terminal::failed(&e, at)).await?,
            Event::RequestCancelled(e) => finish(tx, position, Terminal::cancelled(&e, at)).await?,
            _ => {}
        }
        Ok(())
    }
}

async fn accepted(
    tx: &mut PgConnection,
    position: i64,
    at: chrono::DateTime<chrono::Utc>,
    e: &RequestAccepted,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO requests (request_id, key_id, model, api, stream, accepted_at, last_position) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT (request_id) DO UPDATE SET \
           key_id = EXCLUDED.key_id, model = EXCLUDED.model, api = EXCLUDED.api, stream = EXCLUDED.stream, \
           accepted_at = EXCLUDED.accepted_at, \
           last_position = GREATEST(requests.last_position, EXCLUDED.last_position)",
    )
    .bind(e.request_id)
    .bind(e.key_id)
    .bind(&e.model)
    .bind(tag(&e.api))
    .bind(e.stream)
    .bind(at)
    .bind(position)
    .execute(tx)
    .await?;
    Ok(())
}

/// The latest attempt names the channel, until a terminal event settles it.
async fn attempt(
    tx: &mut PgConnection,
    position: i64,
    e: &AttemptStarted,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO requests (request_id, attempts, channel_id, channel_name, upstream_model, last_position) \
         VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (request_id) DO UPDATE SET \
           attempts = EXCLUDED.attempts, channel_id = EXCLUDED.channel_id, \
           channel_name = EXCLUDED.channel_name, upstream_model = EXCLUDED.upstream_model, \
           last_position = GREATEST(requests.last_position, EXCLUDED.last_position) \
         WHERE requests.status = 'accepted' AND EXCLUDED.attempts >= requests.attempts",
    )
    .bind(e.request_id)
    .bind(small(e.attempt))
    .bind(e.channel_id)
    .bind(&e.channel_name)
    .bind(&e.upstream_model)
    .bind(position)
    .execute(tx)
    .await?;
    Ok(())
}

/// The columns a terminal event sets; `None` keeps what earlier events wrote.
struct Terminal<'e> {
    request_id: Uuid,
    key_id: Uuid,
    model: &'e str,
    status: &'static str,
    channel_id: Option<Uuid>,
    channel_name: Option<&'e str>,
    upstream_model: Option<&'e str>,
    attempts: Option<i32>,
    error_kind: Option<String>,
    usage: Option<Usage>,
    usage_source: Option<UsageSource>,
    ttft_ms: Option<u64>,
    duration_ms: Option<u64>,
    finished_at: chrono::DateTime<chrono::Utc>,
}

impl<'e> Terminal<'e> {
    fn completed(e: &'e CompletionFinished, at: chrono::DateTime<chrono::Utc>) -> Self {
        Self {
            request_id: e.request_id,
            key_id: e.key_id,
            model: &e.model,
            status: "completed",
            channel_id: Some(e.channel_id),
            channel_name: Some(&e.channel_name),
            upstream_model: Some(&e.upstream_model),
            attempts: Some(small(e.attempts)),
            error_kind: None,
            usage: Some(e.usage),
            usage_source: Some(e.usage_source),
            ttft_ms: e.ttft_ms,
            duration_ms: Some(e.duration_ms),
            finished_at: at,
        }
    }

    fn failed(e: &'e RequestFailed, at: chrono::DateTime<chrono::Utc>) -> Self {
        Self {
            request_id: e.request_id,
            key_id: e.key_id,
            model: &e.model,
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
        }
    }

    fn cancelled(e: &'e RequestCancelled, at: chrono::DateTime<chrono::Utc>) -> Self {
        Self {
            request_id: e.request_id,
            key_id: e.key_id,
            model: &e.model,
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
        }
    }
}

/// Applies a terminal event unless the request already ended.
async fn finish(tx: &mut PgConnection, position: i64, t: Terminal<'_>) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO requests (request_id, key_id, model, status, channel_id, channel_name, upstream_model, \
                               attempts, error_kind, prompt_tokens, completion_tokens, usage_source, \
                               ttft_ms, duration_ms, finished_at, last_position) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, COALESCE($8, 0), $9, $10, $11, $12, $13, $14, $15, $16) \
         ON CONFLICT (request_id) DO UPDATE SET \
           status = EXCLUDED.status, \
           key_id = COALESCE(requests.key_id, EXCLUDED.key_id), \
           model = COALESCE(requests.model, EXCLUDED.model), \
           channel_id = COALESCE(EXCLUDED.channel_id, requests.channel_id), \
           channel_name = COALESCE(EXCLUDED.channel_name, requests.channel_name), \
           upstream_model = COALESCE(EXCLUDED.upstream_model, requests.upstream_model), \
           attempts = GREATEST(requests.attempts, COALESCE($8, 0)), \
           error_kind = EXCLUDED.error_kind, \
           prompt_tokens = EXCLUDED.prompt_tokens, \
           completion_tokens = EXCLUDED.completion_tokens, \
           usage_source = EXCLUDED.usage_source, \
           ttft_ms = EXCLUDED.ttft_ms, \
           duration_ms = EXCLUDED.duration_ms, \
           finished_at = EXCLUDED.finished_at, \
           last_position = GREATEST(requests.last_position, EXCLUDED.last_position) \
         WHERE requests.status = 'accepted'",
    )
    .bind(t.request_id)
    .bind(t.key_id)
    .bind(t.model)
    .bind(t.status)
    .bind(t.channel_id)
    .bind(t.channel_name)
    .bind(t.upstream_model)
    .bind(t.attempts)
    .bind(t.error_kind)
    .bind(t.usage.map(|u| big(u.prompt_tokens)))
    .bind(t.usage.map(|u| big(u.completion_tokens)))
    .bind(t.usage_source.and_then(|s| tag(&s)))
    .bind(t.ttft_ms.map(big))
    .bind(t.duration_ms.map(big))
    .bind(t.finished_at)
    .bind(position)
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
