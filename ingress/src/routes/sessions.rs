//! `/api/sessions`: conversations kept on the server.
//!
//! A session belongs to a user (signed in with a session token, or through one of their
//! API keys) or, for a key that has no user, to that key; anyone else gets 404.
//!
//! Writes append events (`SessionCreated`, `SessionRenamed`, `SessionDeleted`, a user turn
//! as `SessionMessageAppended`, `SessionReplyRegenerated`) to JetStream; reads come from
//! the conversation projector's read models. Consistency, read-your-writes:
//! - a write waits (bounded, `SLUICE_SESSION_SYNC_MS`, default 5000) until the projector's
//!   checkpoint passes its event's position (the JetStream sequence is the log position),
//!   and then answers from the read model; if the projector is slower than that, the write
//!   stands and a create is answered from the event itself;
//! - a chat turn first waits until the projector has passed the head of the event stream
//!   as it was when the turn arrived. The previous turn's `CompletionFinished` was stored
//!   before its stream ended, so the history always holds the previous answer; if the
//!   projector does not get there in time, the turn is refused with 503 and nothing is
//!   appended;
//! - the `complete` event of a chat stream is sent once the answer is in the read model
//!   (or the wait ran out: `stored` says which).
//!
//! `POST /api/sessions/{id}/chat` appends the user turn, sends the history cut to the
//! model's context budget ([`crate::context`]) through the same admission as
//! `/v1/chat/completions` (model, key and user limits, quota), and streams SSE events
//! `start`, `content`, `usage`, `end`, `complete` (or `error`), with `: ping` comments
//! while idle (`SLUICE_SESSION_PING_MS`, default 15000). `start` goes out at once; an
//! upstream failure is then an `error` event. Content events carry the worker's frame
//! sequence as their `id:`.
//!
//! Who pays: the API key the caller used; with a session token, the key named by
//! `key_id`, or the user's only live key.

use std::borrow::Cow;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::Response;
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::time::Instant;
use uuid::Uuid;

use schemas::events::{
    Event, Metadata, RequestFailed, SessionCreated, SessionDeleted, SessionMessageAppended,
    SessionRenamed, SessionReplyRegenerated,
};
use schemas::openai::validate_chat_request;
use schemas::work::{Api, ApiErrorInfo, DoneData, ErrorKind, FrameKind};
use schemas::Nanos;

use crate::accounts::{self, db_error, AccountError};
use crate::context::{self, ContextLimits, Turn};
use crate::directory::Caller;
use crate::error::ApiError;
use crate::relay::{self, Attachment, ReadError};
use crate::request_id::RequestId;
use crate::routes::body::ApiJson;
use crate::routes::chat::{self, Submission};
use crate::state::AppState;

/// The projector whose checkpoint session reads wait for.
const PROJECTOR: &str = projector::ConversationsProjection::NAME;
/// How often a waiting write looks at the projector's checkpoint.
const SYNC_POLL: Duration = Duration::from_millis(10);
const MAX_TITLE_CHARS: usize = 200;
const DEFAULT_TITLE: &str = "New chat";

/// Settings of the sessions API, read once from the environment.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// `: ping` comments on an idle chat stream (`SLUICE_SESSION_PING_MS`).
    pub ping: Duration,
    /// How long a write waits for the projector (`SLUICE_SESSION_SYNC_MS`).
    pub sync_wait: Duration,
    pub limits: ContextLimits,
}

impl SessionOptions {
    pub fn from_env() -> Self {
        let ms = |name: &str, default: u64| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .filter(|v| *v > 0)
                .map_or(Duration::from_millis(default), Duration::from_millis)
        };
        Self {
            ping: ms("SLUICE_SESSION_PING_MS", 15_000),
            sync_wait: ms("SLUICE_SESSION_SYNC_MS", 5_000),
            limits: ContextLimits::from_env(),
        }
    }
}

static OPTIONS: LazyLock<SessionOptions> = LazyLock::new(SessionOptions::from_env);

// ---------------------------------------------------------------------------------------
// Who is calling

/// Who a session belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    User(Uuid),
    /// A key that belongs to no user (bootstrap keys from `sluice.yaml`).
    Key(Uuid),
}

impl Owner {
    fn column(self) -> &'static str {
        match self {
            Owner::User(_) => "owner_user_id",
            Owner::Key(_) => "owner_key_id",
        }
    }
    fn id(self) -> Uuid {
        match self {
            Owner::User(id) | Owner::Key(id) => id,
        }
    }
    fn user(self) -> Option<Uuid> {
        match self {
            Owner::User(id) => Some(id),
            Owner::Key(_) => None,
        }
    }
    fn key(self) -> Option<Uuid> {
        match self {
            Owner::Key(id) => Some(id),
            Owner::User(_) => None,
        }
    }
}

/// The caller of a sessions route: a user's session token or any live API key
/// (`Authorization: Bearer` or `x-api-key`).
pub struct SessionCaller {
    pub owner: Owner,
    /// The key the caller authenticated with; it pays for chat turns.
    pub key: Option<Arc<Caller>>,
}

impl SessionCaller {
    fn metadata(&self) -> Metadata {
        Metadata {
            trace_id: None,
            key_id: self.key.as_ref().map(|k| k.key_id),
            user_id: self.owner.user(),
        }
    }
}

impl FromRequestParts<Arc<AppState>> for SessionCaller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let token = accounts::bearer(parts)
            .or_else(|| {
                parts
                    .headers
                    .get("x-api-key")
                    .and_then(|v| v.to_str().ok())
                    .map(str::trim)
                    .filter(|k| !k.is_empty())
            })
            .ok_or(ApiError::MissingKey)?;
        if crate::jwt::looks_like_jwt(token) {
            let user = accounts::resolve(state, token).await?;
            return Ok(SessionCaller {
                owner: Owner::User(user.user_id),
                key: None,
            });
        }
        let caller = state.directory.caller(token).ok_or(ApiError::InvalidKey)?;
        let owner = match caller.user_id {
            // Checks that the owner is not disabled.
            Some(_) => Owner::User(accounts::resolve(state, token).await?.user_id),
            None => Owner::Key(caller.key_id),
        };
        Ok(SessionCaller {
            owner,
            key: Some(caller),
        })
    }
}

// ---------------------------------------------------------------------------------------
// Read models

#[derive(Debug, Clone, sqlx::FromRow)]
struct SessionRow {
    session_id: Uuid,
    title: String,
    model: Option<String>,
    system_prompt: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

const SESSION_COLUMNS: &str = "session_id, title, model, system_prompt, created_at, updated_at";

/// A session as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SessionView {
    pub id: Uuid,
    pub object: &'static str,
    pub title: String,
    pub model: Option<String>,
    pub system: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<SessionRow> for SessionView {
    fn from(r: SessionRow) -> Self {
        SessionView {
            id: r.session_id,
            object: "session",
            title: r.title,
            model: r.model,
            system: r.system_prompt,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
struct MessageRow {
    message_id: Uuid,
    role: String,
    content: String,
    request_id: Uuid,
    model: String,
    finish_reason: Option<String>,
    created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct MessageView {
    pub id: Uuid,
    pub object: &'static str,
    pub role: String,
    pub content: String,
    pub model: String,
    pub request_id: Uuid,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl From<MessageRow> for MessageView {
    fn from(m: MessageRow) -> Self {
        MessageView {
            id: m.message_id,
            object: "session.message",
            role: m.role,
            content: m.content,
            model: m.model,
            request_id: m.request_id,
            finish_reason: m.finish_reason,
            created_at: m.created_at,
        }
    }
}

/// Path ids that are not UUIDs name no session: 404, like an unknown one.
fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| AccountError::NotFound("session").into())
}

/// The caller's live session `id`, or 404.
async fn find_session(state: &AppState, owner: Owner, id: Uuid) -> Result<SessionRow, ApiError> {
    sqlx::query_as::<_, SessionRow>(&format!(
        "SELECT {SESSION_COLUMNS} FROM sessions \
         WHERE session_id = $1 AND {} = $2 AND deleted_at IS NULL",
        owner.column()
    ))
    .bind(id)
    .bind(owner.id())
    .fetch_optional(&state.pool)
    .await
    .map_err(db_error)?
    .ok_or_else(|| AccountError::NotFound("session").into())
}

/// The session's turns in order, without superseded answers.
async fn history(state: &AppState, session_id: Uuid) -> Result<Vec<MessageRow>, ApiError> {
    Ok(sqlx::query_as::<_, MessageRow>(
        "SELECT message_id, role, content, request_id, model, finish_reason, created_at \
         FROM messages WHERE session_id = $1 AND NOT superseded ORDER BY position",
    )
    .bind(session_id)
    .fetch_all(&state.pool)
    .await
    .map_err(db_error)?)
}

// ---------------------------------------------------------------------------------------
// Writing events and waiting for the projection

/// Appends an event and waits for JetStream to store it; returns its log position.
async fn append(
    state: &AppState,
    event: Event,
    metadata: Metadata,
) -> Result<(u64, DateTime<Utc>), ApiError> {
    let kind = event.type_name();
    let envelope = event.into_envelope(Utc::now(), metadata);
    let stored = async {
        projector::bus::publish_event(&state.js, &state.ns, &envelope)
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())
    }
    .await;
    match stored {
        Ok(ack) => Ok((ack.sequence, envelope.occurred_at)),
        Err(error) => {
            tracing::warn!(kind, %error, "a session event was not stored");
            Err(ApiError::QueueUnavailable)
        }
    }
}

/// The last position of the event stream now: every event stored so far is at or below.
async fn events_head(state: &AppState) -> Result<u64, ApiError> {
    let stream = state
        .js
        .get_stream(state.ns.events_stream())
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "cannot read the event stream's head");
            ApiError::QueueUnavailable
        })?;
    Ok(stream.cached_info().state.last_sequence)
}

/// Waits (bounded) until the conversation projector has passed `position`.
async fn projected(state: &AppState, position: u64) -> Result<bool, ApiError> {
    let target = i64::try_from(position).unwrap_or(i64::MAX);
    let deadline = Instant::now() + OPTIONS.sync_wait;
    loop {
        let at = projector::checkpoint(&state.pool, PROJECTOR)
            .await
            .map_err(db_error)?
            .unwrap_or(0);
        if at >= target {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                checkpoint = at,
                wanted = target,
                "the conversation projector is behind; is `sluice projector` running?"
            );
            return Ok(false);
        }
        tokio::time::sleep(SYNC_POLL).await;
    }
}

fn history_not_ready() -> ApiError {
    ApiError::Upstream(ApiErrorInfo {
        status: 503,
        kind: ErrorKind::Overloaded,
        message: "the conversation history is still being recorded; try again in a moment".into(),
        code: Some("history_not_ready".into()),
        param: None,
        retry_after: Some(1),
    })
}

// ---------------------------------------------------------------------------------------
// CRUD

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSession {
    #[serde(default)]
    #[schema(min_length = 1, max_length = 200, pattern = r"\S")]
    title: Option<String>,
    #[serde(default)]
    #[schema(min_length = 1, pattern = r"\S")]
    model: Option<String>,
    #[serde(default)]
    system: Option<String>,
}

fn check_title(title: &str) -> Result<String, ApiError> {
    let title = title.trim();
    if title.is_empty() || title.chars().count() > MAX_TITLE_CHARS {
        return Err(AccountError::invalid(
            "title",
            format!("the title needs 1 to {MAX_TITLE_CHARS} characters"),
        )
        .into());
    }
    Ok(title.to_owned())
}

/// A model named by the caller must be one the gateway serves.
fn check_model(
    state: &AppState,
    user: Option<Uuid>,
    model: Option<String>,
) -> Result<Option<String>, ApiError> {
    let Some(model) = model else { return Ok(None) };
    let model = model.trim().to_owned();
    if model.is_empty() {
        return Err(AccountError::invalid("model", "`model` must not be empty").into());
    }
    match state.directory.model_for(&model, user) {
        crate::directory::ModelStatus::Unknown => Err(ApiError::ModelNotFound(model)),
        _ => Ok(Some(model)),
    }
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.trim().is_empty())
}

/// `POST /api/sessions` `{"title"?, "model"?, "system"?}` → 201 and the session.
#[utoipa::path(
    post,
    path = "/api/sessions",
    operation_id = "createSession",
    tag = "sessions",
    request_body = CreateSession,
    responses(
        (status = 201, description = "The session", body = SessionView),
        (status = 400, description = "Invalid body"),
        (status = 401, description = "Missing or invalid credentials"),
        (status = 404, description = "Unknown model"),
        (status = 503, description = "The event log is unavailable; nothing was recorded"),
    ),
    security(("session_token" = []), ("api_key" = []), ("x_api_key" = [])),
)]
pub async fn create(
    caller: SessionCaller,
    State(state): State<Arc<AppState>>,
    ApiJson(body): ApiJson<CreateSession>,
) -> Result<(StatusCode, Json<SessionView>), ApiError> {
    let title = match body.title.as_deref() {
        Some(t) => check_title(t)?,
        None => DEFAULT_TITLE.to_owned(),
    };
    let model = check_model(&state, caller.owner.user(), body.model)?;
    let system = non_empty(body.system);
    let id = schemas::new_id();
    let event = Event::SessionCreated(SessionCreated {
        session_id: id,
        owner_user_id: caller.owner.user(),
        owner_key_id: caller.owner.key(),
        title: title.clone(),
        model: model.clone(),
        system: system.clone(),
    });
    let (position, at) = append(&state, event, caller.metadata()).await?;
    if projected(&state, position).await? {
        let row = find_session(&state, caller.owner, id).await?;
        return Ok((StatusCode::CREATED, Json(row.into())));
    }
    // The projector is behind: the session exists all the same, as the event says.
    Ok((
        StatusCode::CREATED,
        Json(SessionView {
            id,
            object: "session",
            title,
            model,
            system,
            created_at: at,
            updated_at: at,
        }),
    ))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    #[serde(default)]
    #[param(minimum = 1, maximum = 200)]
    limit: Option<i64>,
    #[serde(default)]
    #[param(minimum = 0)]
    offset: Option<i64>,
}

/// `GET /api/sessions?limit=&offset=`: the caller's sessions, most recently active first.
#[utoipa::path(
    get,
    path = "/api/sessions",
    operation_id = "listSessions",
    tag = "sessions",
    params(ListParams),
    responses(
        (status = 200, description = "The caller's sessions, most recently active first", body = crate::openapi::SessionList),
        (status = 400, description = "Invalid query (`limit` 1 to 200, `offset` 0 or more)"),
        (status = 401, description = "Missing or invalid credentials"),
    ),
    security(("session_token" = []), ("api_key" = []), ("x_api_key" = [])),
)]
pub async fn list(
    caller: SessionCaller,
    State(state): State<Arc<AppState>>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(params) = params.map_err(|e| AccountError::Invalid {
        message: e.body_text(),
        param: None,
    })?;
    let limit = params.limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(AccountError::invalid("limit", "`limit` must be 1 to 200").into());
    }
    let offset = params.offset.unwrap_or(0);
    if offset < 0 {
        return Err(AccountError::invalid("offset", "`offset` must not be negative").into());
    }
    let rows: Vec<SessionRow> = sqlx::query_as(&format!(
        "SELECT {SESSION_COLUMNS} FROM sessions WHERE {} = $1 AND deleted_at IS NULL \
         ORDER BY updated_at DESC, session_id DESC LIMIT $2 OFFSET $3",
        caller.owner.column()
    ))
    .bind(caller.owner.id())
    .bind(limit)
    .bind(offset)
    .fetch_all(&state.pool)
    .await
    .map_err(db_error)?;
    let data: Vec<SessionView> = rows.into_iter().map(SessionView::from).collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

/// `GET /api/sessions/{id}`.
#[utoipa::path(
    get,
    path = "/api/sessions/{id}",
    operation_id = "getSession",
    tag = "sessions",
    params(("id" = String, Path, description = "The session id (a UUID)")),
    responses(
        (status = 200, description = "The session", body = SessionView),
        (status = 401, description = "Missing or invalid credentials"),
        (status = 404, description = "No such session of the caller's"),
    ),
    security(("session_token" = []), ("api_key" = []), ("x_api_key" = [])),
)]
pub async fn get(
    caller: SessionCaller,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<SessionView>, ApiError> {
    let row = find_session(&state, caller.owner, parse_id(&id)?).await?;
    Ok(Json(row.into()))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenameSession {
    #[schema(min_length = 1, max_length = 200, pattern = r"\S")]
    title: String,
}

/// `PATCH /api/sessions/{id}` `{"title"}`.
#[utoipa::path(
    patch,
    path = "/api/sessions/{id}",
    operation_id = "renameSession",
    tag = "sessions",
    params(("id" = String, Path, description = "The session id (a UUID)")),
    request_body = RenameSession,
    responses(
        (status = 200, description = "The session, renamed", body = SessionView),
        (status = 400, description = "Invalid body"),
        (status = 401, description = "Missing or invalid credentials"),
        (status = 404, description = "No such session of the caller's"),
        (status = 503, description = "The event log is unavailable; nothing was recorded"),
    ),
    security(("session_token" = []), ("api_key" = []), ("x_api_key" = [])),
)]
pub async fn rename(
    caller: SessionCaller,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<RenameSession>,
) -> Result<Json<SessionView>, ApiError> {
    let id = parse_id(&id)?;
    let before = find_session(&state, caller.owner, id).await?;
    let title = check_title(&body.title)?;
    let event = Event::SessionRenamed(SessionRenamed {
        session_id: id,
        title: title.clone(),
    });
    let (position, at) = append(&state, event, caller.metadata()).await?;
    if projected(&state, position).await? {
        let row = find_session(&state, caller.owner, id).await?;
        return Ok(Json(row.into()));
    }
    Ok(Json(SessionView {
        title,
        updated_at: at,
        ..SessionView::from(before)
    }))
}

/// `DELETE /api/sessions/{id}` → 204; the session and its messages leave every read.
#[utoipa::path(
    delete,
    path = "/api/sessions/{id}",
    operation_id = "deleteSession",
    tag = "sessions",
    params(("id" = String, Path, description = "The session id (a UUID)")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "Missing or invalid credentials"),
        (status = 404, description = "No such session of the caller's"),
        (status = 503, description = "The event log is unavailable; nothing was recorded"),
    ),
    security(("session_token" = []), ("api_key" = []), ("x_api_key" = [])),
)]
pub async fn delete(
    caller: SessionCaller,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_id(&id)?;
    find_session(&state, caller.owner, id).await?;
    let event = Event::SessionDeleted(SessionDeleted { session_id: id });
    let (position, _) = append(&state, event, caller.metadata()).await?;
    // Deleted either way; waiting only makes an immediate read agree.
    projected(&state, position).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /api/sessions/{id}/messages`: the turns in order (regenerated answers replace
/// the ones they superseded).
#[utoipa::path(
    get,
    path = "/api/sessions/{id}/messages",
    operation_id = "listSessionMessages",
    tag = "sessions",
    params(("id" = String, Path, description = "The session id (a UUID)")),
    responses(
        (status = 200, description = "The turns in order", body = crate::openapi::MessageList),
        (status = 401, description = "Missing or invalid credentials"),
        (status = 404, description = "No such session of the caller's"),
    ),
    security(("session_token" = []), ("api_key" = []), ("x_api_key" = [])),
)]
pub async fn messages(
    caller: SessionCaller,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let session = find_session(&state, caller.owner, parse_id(&id)?).await?;
    let data: Vec<MessageView> = history(&state, session.session_id)
        .await?
        .into_iter()
        .map(MessageView::from)
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

// ---------------------------------------------------------------------------------------
// Usage

#[derive(Debug, sqlx::FromRow)]
struct RoundRow {
    request_id: Uuid,
    kind: String,
    status: String,
    model: String,
    prompt_tokens: i64,
    completion_tokens: i64,
    total_tokens: i64,
    usage_source: Option<String>,
    started_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
    cost: Option<i64>,
}

#[derive(Debug, sqlx::FromRow)]
struct Totals {
    rounds: i64,
    prompt_tokens: i64,
    completion_tokens: i64,
    total_tokens: i64,
    cost: i64,
}

/// What the history takes of `model`'s context now (the system prompt and the turns the
/// next turn would send, before its own message).
fn context_use(model: &str, system: Option<&str>, rows: &[MessageRow]) -> Value {
    let limit = OPTIONS.limits.limit(model);
    let turns: Vec<Turn<'_>> = rows
        .iter()
        .map(|m| Turn {
            role: &m.role,
            content: &m.content,
        })
        .collect();
    let (used, in_context) = match context::cut(model, system, &turns, limit, None) {
        Ok(cut) => (cut.prompt_tokens, turns.len() - cut.first),
        // The newest turn alone is over the budget: all of it would not fit.
        Err(_) => {
            let enc = billing::Encoding::for_model(model);
            let all = system.map_or(0, |s| context::message_tokens(enc, "system", s))
                + turns
                    .iter()
                    .map(|t| context::message_tokens(enc, t.role, t.content))
                    .sum::<u64>();
            (all, 0)
        }
    };
    json!({
        "model": model,
        "context_limit": limit,
        "used_tokens": used,
        "remaining_tokens": limit.saturating_sub(used),
        "messages": turns.len(),
        "messages_in_context": in_context,
    })
}

/// `GET /api/sessions/{id}/usage`: totals over every round (chat turns and
/// regenerations, cost as charged by the ledger so far), the last round, and the context
/// the history uses now.
#[utoipa::path(
    get,
    path = "/api/sessions/{id}/usage",
    operation_id = "getSessionUsage",
    tag = "sessions",
    params(("id" = String, Path, description = "The session id (a UUID)")),
    responses(
        (status = 200, description = "Totals, the last round and the context used", body = crate::openapi::SessionUsage),
        (status = 401, description = "Missing or invalid credentials"),
        (status = 404, description = "No such session of the caller's"),
    ),
    security(("session_token" = []), ("api_key" = []), ("x_api_key" = [])),
)]
pub async fn usage(
    caller: SessionCaller,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let session = find_session(&state, caller.owner, parse_id(&id)?).await?;
    let totals: Totals = sqlx::query_as(
        "SELECT count(*)::bigint AS rounds, \
                COALESCE(sum(r.prompt_tokens), 0)::bigint AS prompt_tokens, \
                COALESCE(sum(r.completion_tokens), 0)::bigint AS completion_tokens, \
                COALESCE(sum(r.total_tokens), 0)::bigint AS total_tokens, \
                COALESCE(sum(l.amount_nanos), 0)::bigint AS cost \
         FROM session_rounds r LEFT JOIN ledger_entries l ON l.request_id = r.request_id \
         WHERE r.session_id = $1",
    )
    .bind(session.session_id)
    .fetch_one(&state.pool)
    .await
    .map_err(db_error)?;
    let last: Option<RoundRow> = sqlx::query_as(
        "SELECT r.request_id, r.kind, r.status, r.model, r.prompt_tokens, r.completion_tokens, \
                r.total_tokens, r.usage_source, r.started_at, r.finished_at, l.amount_nanos AS cost \
         FROM session_rounds r LEFT JOIN ledger_entries l ON l.request_id = r.request_id \
         WHERE r.session_id = $1 ORDER BY r.position DESC LIMIT 1",
    )
    .bind(session.session_id)
    .fetch_optional(&state.pool)
    .await
    .map_err(db_error)?;
    let rows = history(&state, session.session_id).await?;
    let model = last
        .as_ref()
        .map(|r| r.model.clone())
        .or_else(|| session.model.clone());
    let context = model.as_deref().map_or(Value::Null, |m| {
        context_use(m, session.system_prompt.as_deref(), &rows)
    });
    let last_round = last.map(|r| {
        json!({
            "request_id": r.request_id,
            "kind": r.kind,
            "status": r.status,
            "model": r.model,
            "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens,
            "total_tokens": r.total_tokens,
            "usage_source": r.usage_source,
            "cost": r.cost.map(|c| Nanos(c).to_usd_string()),
            "started_at": r.started_at,
            "finished_at": r.finished_at,
        })
    });
    Ok(Json(json!({
        "object": "session.usage",
        "session_id": session.session_id,
        "totals": {
            "rounds": totals.rounds,
            "prompt_tokens": totals.prompt_tokens,
            "completion_tokens": totals.completion_tokens,
            "total_tokens": totals.total_tokens,
            "cost": Nanos(totals.cost).to_usd_string(),
        },
        "last_round": last_round,
        "context": context,
    })))
}

// ---------------------------------------------------------------------------------------
// Chat and regenerate

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TurnOptions {
    /// The model of this turn; else the session's (for a regeneration, the answer's).
    #[serde(default)]
    model: Option<String>,
    /// Replaces the session's system prompt for this turn.
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    #[schema(minimum = 1)]
    max_tokens: Option<u64>,
    /// With a session token: which of the user's keys pays.
    #[serde(default)]
    key_id: Option<Uuid>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatBody {
    #[schema(min_length = 1, pattern = r"\S")]
    content: String,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    #[schema(minimum = 1)]
    max_tokens: Option<u64>,
    #[serde(default)]
    key_id: Option<Uuid>,
}

/// `POST /api/sessions/{id}/chat` `{"content", "model"?, "system"?, "max_tokens"?, "key_id"?}`.
#[utoipa::path(
    post,
    path = "/api/sessions/{id}/chat",
    operation_id = "sessionChat",
    tag = "sessions",
    params(("id" = String, Path, description = "The session id (a UUID)")),
    request_body = ChatBody,
    responses(
        (status = 200, description = "Server-sent events `start`, `content`, `usage`, `end`, `complete` (or `error`)", content_type = "text/event-stream", body = crate::openapi::SseEvent),
        (status = 400, description = "Invalid body"),
        (status = 401, description = "Missing or invalid credentials"),
        (status = 404, description = "No such session of the caller's, or unknown model"),
        (status = 429, description = "Rate limit or quota reached"),
        (status = 503, description = "The history is still being recorded, or no channel serves the model now"),
    ),
    security(("session_token" = []), ("api_key" = []), ("x_api_key" = [])),
)]
pub async fn chat(
    caller: SessionCaller,
    State(state): State<Arc<AppState>>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let body: ChatBody = parse_body(&body)?.ok_or_else(|| {
        AccountError::invalid("content", "the body must be a JSON object with `content`")
    })?;
    if body.content.trim().is_empty() {
        return Err(AccountError::invalid("content", "`content` must not be empty").into());
    }
    let options = TurnOptions {
        model: body.model,
        system: body.system,
        max_tokens: body.max_tokens,
        key_id: body.key_id,
    };
    let turn = TurnKind::Chat {
        content: body.content,
    };
    run_turn(state, caller, request_id, id, turn, options).await
}

/// `POST /api/sessions/{id}/regenerate` `{"model"?, "system"?, "max_tokens"?, "key_id"?}`
/// (or no body): answers the last user turn again; the new answer supersedes the last
/// one once it completes.
#[utoipa::path(
    post,
    path = "/api/sessions/{id}/regenerate",
    operation_id = "sessionRegenerate",
    tag = "sessions",
    params(("id" = String, Path, description = "The session id (a UUID)")),
    request_body(content = Option<TurnOptions>, description = "Optional; an empty body regenerates with the session's settings"),
    responses(
        (status = 200, description = "Server-sent events, as for a chat turn", content_type = "text/event-stream", body = crate::openapi::SseEvent),
        (status = 400, description = "Invalid body, or nothing to regenerate"),
        (status = 401, description = "Missing or invalid credentials"),
        (status = 404, description = "No such session of the caller's, or unknown model"),
        (status = 429, description = "Rate limit or quota reached"),
        (status = 503, description = "The history is still being recorded, or no channel serves the model now"),
    ),
    security(("session_token" = []), ("api_key" = []), ("x_api_key" = [])),
)]
pub async fn regenerate(
    caller: SessionCaller,
    State(state): State<Arc<AppState>>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let options: TurnOptions = parse_body(&body)?.unwrap_or_default();
    run_turn(state, caller, request_id, id, TurnKind::Regenerate, options).await
}

/// An optional JSON body: `None` when empty.
fn parse_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<Option<T>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(body)
        .map(Some)
        .map_err(|e| AccountError::invalid("body", format!("invalid JSON body: {e}")).into())
}

/// What a turn asks for.
enum TurnKind {
    Chat { content: String },
    Regenerate,
}

/// A turn ready to send: the turns answered and which stored turn it answers.
struct Planned<'h> {
    turns: Vec<Turn<'h>>,
    user_message_id: Uuid,
    /// A regeneration's answer being replaced.
    replaces: Option<Uuid>,
    /// The model the replaced answer came from.
    replaced_model: Option<&'h str>,
}

fn plan<'h>(rows: &'h [MessageRow], turn: &'h TurnKind) -> Result<Planned<'h>, ApiError> {
    let as_turn = |m: &'h MessageRow| Turn {
        role: &m.role,
        content: &m.content,
    };
    match turn {
        TurnKind::Chat { content } => {
            let mut turns: Vec<Turn<'h>> = rows.iter().map(as_turn).collect();
            turns.push(Turn {
                role: "user",
                content,
            });
            Ok(Planned {
                turns,
                user_message_id: schemas::new_id(),
                replaces: None,
                replaced_model: None,
            })
        }
        TurnKind::Regenerate => {
            let Some(last_user) = rows.iter().rposition(|m| m.role == "user") else {
                return Err(AccountError::Conflict(
                    "the session has no turn to answer again".into(),
                )
                .into());
            };
            // Only the last answer is replaced; a user turn without one is answered.
            let replaced = rows.get(last_user + 1);
            Ok(Planned {
                turns: rows[..=last_user].iter().map(as_turn).collect(),
                user_message_id: rows[last_user].message_id,
                replaces: replaced.map(|m| m.message_id),
                replaced_model: replaced.map(|m| m.model.as_str()),
            })
        }
    }
}

/// The key that pays for a turn: the one the caller used, else (session token) the key
/// named by `key_id` or the user's only live key.
async fn paying_key(
    state: &AppState,
    caller: &SessionCaller,
    key_id: Option<Uuid>,
) -> Result<Arc<Caller>, ApiError> {
    if let Some(key) = &caller.key {
        if key_id.is_some_and(|k| k != key.key_id) {
            return Err(AccountError::invalid(
                "key_id",
                "a call with an API key is paid by that key; `key_id` is for session tokens",
            )
            .into());
        }
        return Ok(key.clone());
    }
    let Owner::User(user) = caller.owner else {
        return Err(ApiError::InvalidKey);
    };
    let keys: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT id, key_hash FROM api_keys \
         WHERE user_id = $1 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now()) \
           AND ($2::uuid IS NULL OR id = $2) \
         ORDER BY created_at LIMIT 2",
    )
    .bind(user)
    .bind(key_id)
    .fetch_all(&state.pool)
    .await
    .map_err(db_error)?;
    let hash =
        match (key_id, keys.as_slice()) {
            (Some(_), []) => return Err(AccountError::NotFound("key").into()),
            (None, []) => return Err(AccountError::invalid(
                "key_id",
                "session chats are paid by one of your API keys: create one with POST /api/keys",
            )
            .into()),
            (None, [_, _, ..]) => {
                return Err(AccountError::invalid(
                    "key_id",
                    "you have several API keys: name the one that pays with `key_id`",
                )
                .into())
            }
            (_, [(_, hash), ..]) => hash,
        };
    state.directory.caller_by_hash(hash).ok_or_else(|| {
        // Created a moment ago on another ingress: the directory refreshes within seconds.
        ApiError::Upstream(ApiErrorInfo {
            status: 503,
            kind: ErrorKind::Overloaded,
            message: "this key is not active on the gateway yet; try again in a moment".into(),
            code: Some("key_not_ready".into()),
            param: Some("key_id".into()),
            retry_after: Some(1),
        })
    })
}

async fn run_turn(
    state: Arc<AppState>,
    caller: SessionCaller,
    request_id: Uuid,
    session_id: Uuid,
    turn: TurnKind,
    options: TurnOptions,
) -> Result<Response, ApiError> {
    // Everything stored before this turn arrived, the previous answer included, must be
    // in the read model before the history is read from it.
    let head = events_head(&state).await?;
    if !projected(&state, head).await? {
        return Err(history_not_ready());
    }
    let session = find_session(&state, caller.owner, session_id).await?;
    let busy_since = Utc::now()
        - chrono::Duration::from_std(state.opts.request_timeout).unwrap_or(chrono::Duration::MAX);
    let busy: Option<Uuid> = sqlx::query_scalar(
        "SELECT request_id FROM session_rounds \
         WHERE session_id = $1 AND status = 'pending' AND started_at > $2 LIMIT 1",
    )
    .bind(session_id)
    .bind(busy_since)
    .fetch_optional(&state.pool)
    .await
    .map_err(db_error)?;
    if let Some(busy) = busy {
        return Err(AccountError::Conflict(format!(
            "an answer is still being generated in this session (request {busy}); wait for it or cancel it"
        ))
        .into());
    }
    let rows = history(&state, session_id).await?;
    let planned = plan(&rows, &turn)?;
    let model = check_model(&state, caller.owner.user(), options.model)?
        .or_else(|| planned.replaced_model.map(str::to_owned))
        .or_else(|| session.model.clone())
        .ok_or_else(|| {
            AccountError::invalid(
                "model",
                "name the `model`: the session has no default model",
            )
        })?;
    let system = non_empty(options.system).or_else(|| session.system_prompt.clone());
    let limit = OPTIONS.limits.limit(&model);
    let cut = context::cut(
        &model,
        system.as_deref(),
        &planned.turns,
        limit,
        options.max_tokens,
    )
    .map_err(|e| {
        ApiError::Upstream(ApiErrorInfo {
            status: 400,
            kind: ErrorKind::ContextTooLong,
            message: e.to_string(),
            code: Some("context_length_exceeded".into()),
            param: Some("content".into()),
            retry_after: None,
        })
    })?;
    let mut body = json!({
        "model": model,
        "messages": context::messages(system.as_deref(), &planned.turns[cut.first..]),
        "stream": true,
    });
    if let Some(max) = options.max_tokens {
        body["max_tokens"] = json!(max);
    }

    // The same admission as `/v1/chat/completions` (never its response cache: a cached
    // answer would not become the session's turn).
    let view = validate_chat_request(&body)?;
    let payer = paying_key(&state, &caller, options.key_id).await?;
    let raw = serde_json::value::to_raw_value(&body).map_err(|_| ApiError::Internal)?;
    let submission = Submission {
        request_id,
        api: Api::ChatCompletions,
        view: &view,
        value: &body,
        raw,
        stream: true,
        forward_headers: Vec::new(),
        session_id: Some(session_id),
    };
    let hold = chat::admit_and_hold(&state, &payer, &submission).await?;

    // The turn is stored before its request is queued, so its answer always comes later
    // in the log.
    let event = match &turn {
        TurnKind::Chat { content } => Event::SessionMessageAppended(SessionMessageAppended {
            session_id,
            message_id: planned.user_message_id,
            role: "user".into(),
            content: content.clone(),
            request_id,
            model: model.clone(),
        }),
        TurnKind::Regenerate => Event::SessionReplyRegenerated(SessionReplyRegenerated {
            session_id,
            request_id,
            user_message_id: planned.user_message_id,
            replaces: planned.replaces,
            model: model.clone(),
        }),
    };
    let metadata = Metadata {
        trace_id: None,
        key_id: Some(payer.key_id),
        user_id: caller.owner.user().or(payer.user_id),
    };
    if let Err(e) = append(&state, event, metadata).await {
        hold.release().await;
        return Err(e);
    }
    let queued = match chat::queue(&state, &payer, submission, hold).await {
        Ok(queued) => queued,
        Err(e) => {
            never_queued(&state, &payer, request_id, &model).await;
            return Err(e);
        }
    };
    // Counted as attached while this client reads: if it leaves, the generation keeps
    // running for the resume grace (and its answer is still stored if it completes).
    let reader = queued.attach(&state);
    let start = json!({
        "session_id": session_id,
        "message_id": request_id,
        "request_id": request_id,
        "user_message_id": planned.user_message_id,
        "replaces": planned.replaces,
        "model": model,
        "context": {
            "context_limit": limit,
            "prompt_tokens": cut.prompt_tokens,
            "dropped_messages": cut.dropped(),
        },
    });
    let ctx = StreamCtx {
        state,
        session_id,
        request_id,
        limit,
    };
    Ok(stream_turn(ctx, reader, Some(start)))
}

/// The turn was stored but its request never reached the queue: record that it failed,
/// so the session does not wait for an answer that will never come.
async fn never_queued(state: &AppState, payer: &Caller, request_id: Uuid, model: &str) {
    let event = Event::RequestFailed(RequestFailed {
        request_id,
        key_id: payer.key_id,
        user_id: payer.user_id,
        model: model.to_owned(),
        kind: ErrorKind::Overloaded,
        status: 503,
        message: "the request could not be queued".into(),
        attempts: 0,
        channel_id: None,
        usage: None,
        usage_source: None,
    });
    let metadata = Metadata {
        trace_id: None,
        key_id: Some(payer.key_id),
        user_id: payer.user_id,
    };
    // Best effort: the queue is what just failed.
    let _ = append(state, event, metadata).await;
}

// ---------------------------------------------------------------------------------------
// The turn's SSE stream

struct StreamCtx {
    state: Arc<AppState>,
    session_id: Uuid,
    request_id: Uuid,
    limit: u64,
}

/// One named SSE event; `id` is the frame sequence a client resumes after.
fn sse(id: Option<u64>, event: &str, data: &Value) -> Bytes {
    let data = data.to_string();
    let mut out = String::with_capacity(data.len() + event.len() + 32);
    if let Some(id) = id {
        out.push_str("id: ");
        out.push_str(&id.to_string());
        out.push('\n');
    }
    out.push_str("event: ");
    out.push_str(event);
    out.push_str("\ndata: ");
    out.push_str(&data);
    out.push_str("\n\n");
    Bytes::from(out)
}

#[derive(Deserialize)]
struct ChunkView<'a> {
    #[serde(borrow, default)]
    choices: Vec<ChoiceView<'a>>,
}

#[derive(Deserialize)]
struct ChoiceView<'a> {
    #[serde(borrow, default)]
    delta: Option<DeltaView<'a>>,
}

#[derive(Deserialize)]
struct DeltaView<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
}

/// The text a `chat.completion.chunk` adds to the answer, if any.
fn content_of(chunk: &str) -> Option<String> {
    let view: ChunkView<'_> = serde_json::from_str(chunk).ok()?;
    let mut out = String::new();
    for choice in view.choices {
        if let Some(content) = choice.delta.and_then(|d| d.content) {
            out.push_str(&content);
        }
    }
    (!out.is_empty()).then_some(out)
}

fn error_event(id: u64, info: &ApiErrorInfo) -> Bytes {
    sse(Some(id), "error", &schemas::openai::error_json(info))
}

/// `GET /v1/streams/{id}` of a session turn: the rest of the turn in session framing,
/// `start` included only when watching from the beginning.
pub fn resume_turn(
    state: Arc<AppState>,
    session_id: Uuid,
    request_id: Uuid,
    model: &str,
    after: u64,
    reader: Attachment,
) -> Response {
    let start = (after == 0).then(|| {
        json!({"session_id": session_id, "message_id": request_id, "request_id": request_id, "model": model})
    });
    let ctx = StreamCtx {
        state,
        session_id,
        request_id,
        limit: OPTIONS.limits.limit(model),
    };
    stream_turn(ctx, reader, start)
}

fn stream_turn(ctx: StreamCtx, mut reader: Attachment, start: Option<Value>) -> Response {
    let ping = OPTIONS.ping;
    let deadline = reader.deadline();
    let body = async_stream::stream! {
        if let Some(start) = start {
            yield Ok::<_, std::convert::Infallible>(sse(Some(0), "start", &start));
        }
        loop {
            let wake = deadline.min(Instant::now() + ping);
            let frame = match reader.next(wake).await {
                Ok(frame) => frame,
                Err(ReadError::Timeout) if Instant::now() < deadline => {
                    yield Ok(Bytes::from_static(relay::SSE_PING));
                    continue;
                }
                Err(e) => {
                    yield Ok(error_event(reader.last_seq() + 1, &relay::read_error_info(&e)));
                    return;
                }
            };
            match frame.kind {
                FrameKind::Chunk | FrameKind::Response => {
                    if let Some(delta) = content_of(frame.data.get()) {
                        yield Ok(sse(Some(frame.seq), "content", &json!({"delta": delta})));
                    }
                }
                FrameKind::Error => {
                    let info = serde_json::from_str::<ApiErrorInfo>(frame.data.get())
                        .unwrap_or_else(|_| ApiError::Internal.info());
                    yield Ok(error_event(frame.seq, &info));
                    return;
                }
                FrameKind::Done => {
                    let done: Option<DoneData> = serde_json::from_str(frame.data.get()).ok();
                    let (usage, source, finish) = match &done {
                        Some(d) => (d.usage, Some(d.usage_source), d.finish_reason.clone()),
                        None => (schemas::Usage::default(), None, None),
                    };
                    let total = usage.total_tokens.max(usage.prompt_tokens + usage.completion_tokens);
                    yield Ok(sse(Some(frame.seq), "usage", &json!({
                        "prompt_tokens": usage.prompt_tokens,
                        "completion_tokens": usage.completion_tokens,
                        "total_tokens": total,
                        "usage_source": source,
                        "context_limit": ctx.limit,
                        "context_remaining": ctx.limit.saturating_sub(total),
                    })));
                    yield Ok(sse(Some(frame.seq), "end", &json!({
                        "message_id": ctx.request_id,
                        "finish_reason": finish,
                    })));
                    let stored = answer_stored(&ctx).await;
                    yield Ok(sse(Some(frame.seq), "complete", &json!({
                        "session_id": ctx.session_id,
                        "message_id": ctx.request_id,
                        "request_id": ctx.request_id,
                        "stored": stored,
                    })));
                    return;
                }
            }
        }
    };
    relay::sse_body(Body::from_stream(body))
}

/// Waits (bounded) until the answer is in the read model; whether it is.
async fn answer_stored(ctx: &StreamCtx) -> bool {
    let state = &ctx.state;
    let Ok(head) = events_head(state).await else {
        return false;
    };
    if !matches!(projected(state, head).await, Ok(true)) {
        return false;
    }
    sqlx::query_scalar::<_, bool>(
        "SELECT EXISTS (SELECT 1 FROM messages WHERE message_id = $1 AND session_id = $2)",
    )
    .bind(ctx.request_id)
    .bind(ctx.session_id)
    .fetch_one(&state.pool)
    .await
    .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_deltas_are_read_from_chunks() {
        let chunk = r#"{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"tok\"0 "},"finish_reason":null}]}"#;
        assert_eq!(content_of(chunk).as_deref(), Some("tok\"0 "));
        let role = r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#;
        assert_eq!(content_of(role), None);
        assert_eq!(content_of(r#"{"choices":[],"usage":{}}"#), None);
    }

    #[test]
    fn sse_events_are_named_and_numbered() {
        let e = sse(Some(7), "content", &json!({"delta": "a\nb"}));
        assert_eq!(
            std::str::from_utf8(&e).expect("utf8"),
            "id: 7\nevent: content\ndata: {\"delta\":\"a\\nb\"}\n\n"
        );
    }

    fn row(role: &str, content: &str) -> MessageRow {
        MessageRow {
            message_id: schemas::new_id(),
            role: role.into(),
            content: content.into(),
            request_id: schemas::new_id(),
            model: "m".into(),
            finish_reason: None,
            created_at: Utc::now(),
        }
    }

    #[test]
    fn regeneration_answers_the_last_user_turn() {
        let rows = vec![
            row("user", "q1"),
            row("assistant", "a1"),
            row("user", "q2"),
            row("assistant", "a2"),
        ];
        let turn = TurnKind::Regenerate;
        let p = plan(&rows, &turn).expect("plan");
        assert_eq!(p.turns.len(), 3);
        assert_eq!(p.user_message_id, rows[2].message_id);
        assert_eq!(p.replaces, Some(rows[3].message_id));
        // A user turn whose answer failed is answered, nothing replaced.
        let p = plan(&rows[..3], &turn).expect("plan");
        assert_eq!((p.turns.len(), p.replaces), (3, None));
        assert!(plan(&[], &turn).is_err());
        let chat = TurnKind::Chat {
            content: "q3".into(),
        };
        let p = plan(&rows, &chat).expect("plan");
        assert_eq!(p.turns.last().map(|t| t.content), Some("q3"));
        assert_eq!(p.turns.len(), 5);
    }
}
