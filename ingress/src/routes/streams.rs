//! Streams that outlive their HTTP response:
//!
//! - `GET /v1/streams/{request_id}`: with `Last-Event-ID`, resumes a stream after the last
//!   event the client saw; without it, watches the stream from the start (a second device).
//!   Frames come from `<NS>_CHUNKS` (replayed, then live) through any ingress, in the
//!   framing of the API the request came in on (a session turn in session framing); the
//!   generation is never run twice.
//! - `POST /api/requests/{request_id}/cancel`: stops a generation (`<ns>.cancel.<id>`); the
//!   worker bills what was generated and ends the stream.
//!
//! Both are for the request's owner only: the key that made it, or that key's user (with
//! any of their keys or their session token). Anyone else gets 404, as for an unknown id.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::jetstream::stream::DirectGetErrorKind;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use tokio::time::Instant;
use uuid::Uuid;

use schemas::events::{request_stream, Envelope, Event};
use schemas::work::{Api, CancelReason, Frame};

use crate::accounts::AccountError;
use crate::error::ApiError;
use crate::relay::{self, Attachment, FrameReader, Framing};
use crate::state::AppState;

/// Who is asking: a key (and its user, if any) or a user's session token.
#[derive(Debug, Clone, Copy)]
pub struct Viewer {
    pub key_id: Option<Uuid>,
    pub user_id: Option<Uuid>,
}

impl Viewer {
    /// The key that made the request, or the user it belongs to.
    pub fn owns(&self, r: &RequestRecord) -> bool {
        self.key_id == Some(r.key_id) || (self.user_id.is_some() && self.user_id == r.user_id)
    }
}

/// Authenticates an API key (`Authorization: Bearer sk-…` or `x-api-key`) or a user's
/// session token (JWT).
pub async fn viewer(state: &AppState, headers: &HeaderMap) -> Result<Viewer, ApiError> {
    let bearer = crate::auth::bearer_token(headers);
    if let Some(token) = bearer.filter(|t| crate::jwt::looks_like_jwt(t)) {
        let user = crate::accounts::resolve(state, token).await?;
        return Ok(Viewer {
            key_id: user.key_id,
            user_id: Some(user.user_id),
        });
    }
    let caller = crate::auth::authenticate(&state.directory, headers)?;
    Ok(Viewer {
        key_id: Some(caller.key_id),
        user_id: caller.user_id,
    })
}

/// What `RequestAccepted` says about a request: who made it and how it answers.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub request_id: Uuid,
    pub api: Api,
    pub stream: bool,
    pub key_id: Uuid,
    pub user_id: Option<Uuid>,
    pub accepted_at: DateTime<Utc>,
    pub model: String,
    /// Set for a session turn, which resumes in session framing.
    pub session_id: Option<Uuid>,
}

impl RequestRecord {
    /// When nobody waits for the request any more (the worker drops it then too).
    pub fn deadline(&self, timeout: Duration) -> Instant {
        let left = (self.accepted_at + timeout - Utc::now())
            .to_std()
            .unwrap_or(Duration::ZERO);
        Instant::now() + left
    }
}

/// How many events of a request's stream are read looking for its `RequestAccepted`,
/// which is normally the first.
const ACCEPTED_WITHIN: usize = 8;

/// The request's `RequestAccepted`, read from `<NS>_EVENTS` (direct get by subject: one
/// round trip, no consumer). `None`: no such request, or it is older than the stream keeps.
pub async fn find_request(state: &AppState, id: Uuid) -> Result<Option<RequestRecord>, ApiError> {
    let events = state
        .js
        .get_stream_no_info(state.ns.events_stream())
        .await
        .map_err(|_| ApiError::QueueUnavailable)?;
    let subject = state.ns.event_subject(&request_stream(&id));
    let mut next = events.direct_get_first_for_subject(subject.as_str()).await;
    for _ in 0..ACCEPTED_WITHIN {
        let msg = match next {
            Ok(msg) => msg,
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => return Ok(None),
            Err(e) => {
                tracing::warn!(error = %e, "reading a request's events failed");
                return Err(ApiError::QueueUnavailable);
            }
        };
        let envelope: Option<Envelope> = serde_json::from_slice(&msg.payload).ok();
        if let Some(Ok(Event::RequestAccepted(e))) = envelope.as_ref().map(Envelope::decode) {
            return Ok(Some(RequestRecord {
                request_id: id,
                api: e.api,
                stream: e.stream,
                key_id: e.key_id,
                user_id: e.user_id,
                accepted_at: envelope.map_or_else(Utc::now, |env| env.occurred_at),
                model: e.model,
                session_id: e.session_id,
            }));
        }
        next = events
            .direct_get_next_for_subject(subject.as_str(), Some(msg.sequence + 1))
            .await;
    }
    Ok(None)
}

fn not_found() -> ApiError {
    AccountError::NotFound("request").into()
}

/// The caller's request `id`, or 404: a malformed id, an unknown one and someone else's
/// all look the same.
pub async fn owned_request(
    state: &AppState,
    viewer: &Viewer,
    id: &str,
) -> Result<RequestRecord, ApiError> {
    let id = Uuid::try_parse(id).map_err(|_| not_found())?;
    match find_request(state, id).await? {
        Some(record) if viewer.owns(&record) => Ok(record),
        _ => Err(not_found()),
    }
}

/// What `<NS>_CHUNKS` holds of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// No frame (still queued, or expired from the stream).
    Nothing,
    /// Frames up to `last_seq`, no terminal one yet.
    Running { last_seq: u64 },
    /// The terminal frame is stored.
    Ended,
}

/// The request's last stored batch of frames (direct get: one round trip).
pub async fn stored(state: &AppState, id: Uuid) -> Result<Stored, ApiError> {
    let chunks = state
        .js
        .get_stream_no_info(state.ns.chunks_stream())
        .await
        .map_err(|_| ApiError::QueueUnavailable)?;
    match chunks
        .direct_get_last_for_subject(state.ns.chunk_subject(&id))
        .await
    {
        Ok(msg) => Ok(match serde_json::from_slice::<Vec<Frame>>(&msg.payload) {
            Ok(frames) if frames.iter().any(|f| relay::is_terminal(f.kind)) => Stored::Ended,
            Ok(frames) => Stored::Running {
                last_seq: frames.last().map_or(0, |f| f.seq),
            },
            Err(_) => Stored::Ended,
        }),
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(Stored::Nothing),
        Err(e) => {
            tracing::warn!(error = %e, "reading a request's stored frames failed");
            Err(ApiError::QueueUnavailable)
        }
    }
}

/// Attaches to a request's frames after `after` (0 = from the start): what `<NS>_CHUNKS`
/// stored, then live, through an ephemeral ordered consumer (off the hot path: only
/// resumes and watchers create one). 404 when there is nothing left to attach to.
pub async fn open(
    state: &AppState,
    record: &RequestRecord,
    after: u64,
) -> Result<Attachment, ApiError> {
    let deadline = record.deadline(state.opts.request_timeout);
    if stored(state, record.request_id).await? == Stored::Nothing && Instant::now() >= deadline {
        // Long over, and its frames have expired: nothing to replay.
        return Err(not_found());
    }
    let consumer = state
        .js
        .create_consumer_on_stream(
            pull::OrderedConfig {
                filter_subject: state.ns.chunk_subject(&record.request_id),
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            },
            state.ns.chunks_stream(),
        )
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "creating a consumer for a resumed stream failed");
            ApiError::QueueUnavailable
        })?;
    let ordered = consumer.messages().await.map_err(|e| {
        tracing::warn!(error = %e, "reading a resumed stream failed");
        ApiError::QueueUnavailable
    })?;
    Ok(Attachment::new(
        state.presence.clone(),
        record.request_id,
        FrameReader::stored(ordered, after),
        deadline,
    ))
}

/// `Last-Event-ID`: the `id:` of the last event the client saw. Absent = from the start.
fn last_event_id(headers: &HeaderMap) -> Result<u64, ApiError> {
    let Some(value) = headers.get("last-event-id") else {
        return Ok(0);
    };
    value
        .to_str()
        .ok()
        .map(str::trim)
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| {
            ApiError::InvalidRequest(schemas::openai::InvalidRequest {
                message:
                    "Last-Event-ID must be the `id:` of an event of this stream (a whole number)"
                        .into(),
                param: Some("Last-Event-ID".into()),
            })
        })
}

/// `GET /v1/streams/{request_id}`: resume (with `Last-Event-ID`) or watch a stream.
#[utoipa::path(
    get,
    path = "/v1/streams/{id}",
    operation_id = "resumeStream",
    tag = "streams",
    params(
        ("id" = String, Path, description = "The request id (`x-sluice-request-id` of the request)"),
        ("Last-Event-ID" = Option<u64>, Header, description = "The `id:` of the last event seen; absent = from the start"),
    ),
    responses(
        (status = 200, description = "The stream's events after `Last-Event-ID`, then live, in the framing of the API the request came in on", content_type = "text/event-stream", body = crate::openapi::SseEvent),
        (status = 400, description = "`Last-Event-ID` is not a whole number"),
        (status = 401, description = "Missing or invalid credentials"),
        (status = 404, description = "No such streaming request of the caller's, or nothing left to replay"),
    ),
    security(("api_key" = []), ("x_api_key" = []), ("session_token" = [])),
)]
pub async fn resume(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let mut framing = Framing::Chat;
    let answer = async {
        let viewer = viewer(&state, &headers).await?;
        let after = last_event_id(&headers)?;
        let record = owned_request(&state, &viewer, &id).await?;
        framing = Framing::for_api(record.api)
            .filter(|_| record.stream)
            .ok_or_else(|| ApiError::from(AccountError::NotFound("stream")))?;
        let att = open(&state, &record, after).await?;
        if let Some(session_id) = record.session_id {
            return Ok(super::sessions::resume_turn(
                state.clone(),
                session_id,
                record.request_id,
                &record.model,
                after,
                att,
            ));
        }
        relay::sse_response(framing, att).await
    }
    .await;
    answer.unwrap_or_else(|e| framing.error_response(&e.info()))
}

/// `POST /api/requests/{request_id}/cancel`: `{"request_id", "status"}` where status is
/// `cancelling` (the worker stops it and ends the stream) or `finished` (nothing to stop).
#[utoipa::path(
    post,
    path = "/api/requests/{id}/cancel",
    operation_id = "cancelRequest",
    tag = "streams",
    params(("id" = String, Path, description = "The request id")),
    responses(
        (status = 200, description = "Cancelling, or already finished", body = crate::openapi::CancelResult),
        (status = 401, description = "Missing or invalid credentials"),
        (status = 404, description = "No such request of the caller's"),
    ),
    security(("api_key" = []), ("x_api_key" = []), ("session_token" = [])),
)]
pub async fn cancel(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let viewer = viewer(&state, &headers).await?;
    let record = owned_request(&state, &viewer, &id).await?;
    let over = Instant::now() >= record.deadline(state.opts.request_timeout);
    let status = match stored(&state, record.request_id).await? {
        Stored::Ended => "finished",
        Stored::Nothing if over => "finished",
        Stored::Nothing | Stored::Running { .. } => {
            state
                .presence
                .cancel(record.request_id, CancelReason::Stop)
                .await
                .map_err(|_| ApiError::QueueUnavailable)?;
            "cancelling"
        }
    };
    Ok(Json(serde_json::json!({
        "request_id": record.request_id,
        "status": status,
    }))
    .into_response())
}
