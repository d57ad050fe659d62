//! Messages between the ingress and the workers: the queued request (`<ns>.requests.*`)
//! and the frames a worker publishes on `<ns>.chunks.<request_id>`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::usage::{Usage, UsageSource};

/// Which client API a request came in on; decides how the worker frames its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Api {
    ChatCompletions,
    /// Anthropic's `POST /v1/messages`.
    Messages,
    /// OpenAI's `POST /v1/responses`.
    Responses,
    Embeddings,
    Images,
}

/// A request queued on `<NS>_REQUESTS` for any worker to take.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkItem {
    pub request_id: Uuid,
    pub api: Api,
    /// The model the client asked for (before any channel's `model_map`).
    pub model: String,
    pub stream: bool,
    /// The client asked for a final usage chunk (`stream_options.include_usage`).
    pub include_usage: bool,
    /// The client's body, forwarded as is apart from the fields the adapter must set.
    pub body: Box<RawValue>,
    pub key_id: Uuid,
    pub user_id: Option<Uuid>,
    pub group: String,
    pub accepted_at: DateTime<Utc>,
    /// After this instant nobody waits for the answer; a worker drops the request.
    pub deadline: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// Provider headers the client sent that an adapter of the same protocol forwards
    /// (`anthropic-beta`, which Claude Code uses to turn on beta features).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forward_headers: Vec<(String, String)>,
    /// Set for a session's chat turn: the worker then puts the answer's text in
    /// `CompletionFinished.content` (plain API calls never store their text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<Uuid>,
}

/// What a frame carries. Frames are numbered from 1 per request (`seq`), which is the
/// SSE `id:` a client resumes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FrameKind {
    /// One `chat.completion.chunk`, ready to send as an SSE `data:` line.
    Chunk,
    /// The whole non-streaming response body.
    Response,
    /// The end of a successful request: `data` is a [`DoneData`].
    Done,
    /// The end of a failed request: `data` is an [`ApiErrorInfo`].
    Error,
}

/// One frame; a NATS message on the chunk subject carries a JSON array of them, because
/// workers coalesce chunks that arrive within a few milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Frame {
    pub seq: u64,
    pub kind: FrameKind,
    /// The SSE `event:` name, for client APIs that name their events (Anthropic's
    /// `message_start`, the Responses API's `response.created`); OpenAI chat has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// Raw JSON so the ingress relays it without parsing.
    pub data: Box<RawValue>,
}

/// Why a request is stopped: the JSON payload of `<ns>.cancel.<request_id>`
/// (`{"reason":"stop"}`). An empty or unreadable payload means [`CancelReason::Stop`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelReason {
    /// The client asked (`POST /api/requests/{id}/cancel`, a WebSocket `cancel` frame).
    Stop,
    /// The client went away and nobody resumed or watched within the resume grace.
    ClientGone,
}

impl CancelReason {
    /// The name `RequestCancelled.reason` records.
    pub fn as_str(self) -> &'static str {
        match self {
            CancelReason::Stop => "stop",
            CancelReason::ClientGone => "client_gone",
        }
    }

    /// Reads a cancel message's payload.
    pub fn from_payload(payload: &[u8]) -> Self {
        serde_json::from_slice::<CancelNotice>(payload).map_or(CancelReason::Stop, |n| n.reason)
    }
}

/// The payload of a cancel message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelNotice {
    pub reason: CancelReason,
}

/// `DoneData.finish_reason` of a request stopped after its answer had started.
pub const FINISH_CANCELLED: &str = "cancelled";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DoneData {
    pub usage: Usage,
    pub usage_source: UsageSource,
    pub finish_reason: Option<String>,
}

/// Why an attempt or request failed: one kind for every provider, used by the router to
/// decide on failover and by the ingress to pick the status the client sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    RateLimited,
    Overloaded,
    Auth,
    BadRequest,
    ContextTooLong,
    Upstream5xx,
    Timeout,
    Connection,
    /// No enabled channel serves the model for the caller's group.
    NoChannel,
    /// The worker that held the request died after content reached the client.
    WorkerLost,
    Cancelled,
    Internal,
}

impl ErrorKind {
    /// Worth trying another channel (or the same again) before the first byte went out.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::RateLimited
                | ErrorKind::Overloaded
                | ErrorKind::Auth
                | ErrorKind::Upstream5xx
                | ErrorKind::Timeout
                | ErrorKind::Connection
        )
    }

    /// The status a client sees when a request ends with this kind and no upstream
    /// status should pass through.
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::RateLimited => 429,
            ErrorKind::BadRequest | ErrorKind::ContextTooLong => 400,
            ErrorKind::NoChannel | ErrorKind::Overloaded => 503,
            ErrorKind::Timeout => 504,
            ErrorKind::Cancelled => 499,
            ErrorKind::Auth
            | ErrorKind::Upstream5xx
            | ErrorKind::Connection
            | ErrorKind::WorkerLost
            | ErrorKind::Internal => 502,
        }
    }
}

/// A failure as the client will see it, before it is put in an API's error shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiErrorInfo {
    pub status: u16,
    pub kind: ErrorKind,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
    /// Seconds, for 429 and 503 answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
}
