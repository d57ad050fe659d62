//! `POST /v1/chat/completions`: authenticate, validate, admit (model, rate limit, quota),
//! queue the request on JetStream, and relay the worker's frames back.
//!
//! [`submit`] is the admission path every transport shares (HTTP here and in
//! `messages`, the WebSocket in `crate::ws`): whatever carried the request, it is admitted,
//! held against the quota and queued the same way.

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use chrono::Utc;
use serde_json::value::RawValue;
use std::sync::Arc;
use tokio::time::Instant;

use schemas::events::{Event, Metadata, RequestAccepted};
use schemas::openai::{validate_chat_request, ChatRequestView};
use schemas::work::{Api, ApiErrorInfo, FrameKind, WorkItem};

use crate::auth::authenticate;
use crate::directory::{Caller, ModelStatus};
use crate::error::{error_response, ApiError};
use crate::relay::{self, Attachment, FrameReader, Framing};
use crate::request_id::RequestId;
use crate::state::AppState;

/// Create a chat completion (OpenAI-compatible)
///
/// The body is forwarded to the upstream verbatim; Sluice reads `model`, `messages`,
/// `stream`, `stream_options` and `max_tokens`. With `stream: true` the answer is
/// server-sent events (`data: {chunk}` lines, then `data: [DONE]`), resumable through
/// `GET /v1/streams/{id}` with the id from `x-sluice-request-id`.
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    operation_id = "createChatCompletion",
    tag = "openai",
    request_body = crate::openapi::ChatCompletionRequest,
    responses(
        (status = 200, description = "The completion, or its stream", content(
            (crate::openapi::ChatCompletion = "application/json"),
            (crate::openapi::SseEvent = "text/event-stream"),
        )),
        (status = 400, description = "Invalid body"),
        (status = 401, description = "Missing or invalid API key"),
        (status = 404, description = "Unknown model"),
        (status = 429, description = "Rate limit or quota reached"),
        (status = 503, description = "No channel serves the model now, or the queue is unavailable"),
    ),
    security(("api_key" = []), ("x_api_key" = [])),
)]
pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let caller = authenticate(&state.directory, &headers)?;
    let body = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge {
            limit: state.opts.max_body_bytes,
        },
        _ => ApiError::MalformedJson(rejection.body_text()),
    })?;
    let value: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    let view = validate_chat_request(&value)?;
    // serde_json accepted the bytes, so they are valid UTF-8 JSON; forward them verbatim.
    let text =
        String::from_utf8(body.to_vec()).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    let raw = RawValue::from_string(text).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    let submission = Submission {
        request_id,
        api: Api::ChatCompletions,
        view: &view,
        value: &value,
        raw,
        stream: view.stream,
        forward_headers: Vec::new(),
        session_id: None,
    };
    let queued = crate::cache::submit(&state, &caller, &headers, submission).await?;
    if view.stream {
        relay::sse_response(Framing::Chat, queued.attach(&state)).await
    } else {
        plain_response(queued.reader, queued.deadline).await
    }
}

/// A validated request, from whichever transport carried it.
pub struct Submission<'a> {
    pub request_id: uuid::Uuid,
    pub api: Api,
    pub view: &'a ChatRequestView,
    /// The body parsed (for the quota's prompt estimate) and as received (forwarded
    /// verbatim to the worker).
    pub value: &'a serde_json::Value,
    pub raw: Box<RawValue>,
    /// Whether the worker streams the answer (the WebSocket always streams).
    pub stream: bool,
    /// Provider headers to forward to a channel of the client's protocol.
    pub forward_headers: Vec<(String, String)>,
    /// Set for a session's chat turn.
    pub session_id: Option<uuid::Uuid>,
}

/// A queued request: its frames (the quota hold settles on the terminal one) and when
/// nobody waits for it any more.
pub struct Queued {
    pub request_id: uuid::Uuid,
    pub reader: FrameReader,
    pub deadline: Instant,
}

impl Queued {
    /// The request's own client starts reading: counted as attached until it reads the
    /// end or leaves (then the resume grace starts).
    pub fn attach(self, state: &AppState) -> Attachment {
        Attachment::new(
            state.presence.clone(),
            self.request_id,
            self.reader,
            self.deadline,
        )
    }
}

/// The admission path of every chat-like request: the model is served, the key's and
/// user's limits and the quota admit it (a hold is reserved), then it is queued with its
/// `RequestAccepted`. Nothing is queued when any step refuses.
pub async fn submit(
    state: &AppState,
    caller: &Caller,
    s: Submission<'_>,
) -> Result<Queued, ApiError> {
    let hold = admit_and_hold(state, caller, &s).await?;
    queue(state, caller, s, hold).await
}

/// [`submit`]'s admission alone: a caller that must record something between admission
/// and queueing (a session stores its user turn) calls this, then [`queue`], and releases
/// the hold if its own step fails.
pub async fn admit_and_hold(
    state: &AppState,
    caller: &Caller,
    s: &Submission<'_>,
) -> Result<crate::quota::Hold, ApiError> {
    admit(state, caller, s.view).await?;
    let ask = crate::quota::Ask {
        model: &s.view.model,
        max_tokens: s.view.max_tokens,
        body: s.value,
    };
    crate::quota::admit(state, caller, s.request_id, ask).await
}

/// [`submit`]'s second half: queues an admitted request; its hold settles on the
/// terminal frame (or is released if queueing fails).
pub async fn queue(
    state: &AppState,
    caller: &Caller,
    s: Submission<'_>,
    hold: crate::quota::Hold,
) -> Result<Queued, ApiError> {
    let deadline = Instant::now() + state.opts.request_timeout;
    let now = Utc::now();
    let item = WorkItem {
        request_id: s.request_id,
        api: s.api,
        model: s.view.model.clone(),
        stream: s.stream,
        include_usage: s.view.include_usage,
        body: s.raw,
        key_id: caller.key_id,
        user_id: caller.user_id,
        group: caller.group.clone(),
        accepted_at: now,
        deadline: now + state.opts.request_timeout,
        trace_id: None,
        forward_headers: s.forward_headers,
        session_id: s.session_id,
    };
    let reader = hold.attach(enqueue(state, caller, item).await).await?;
    Ok(Queued {
        request_id: s.request_id,
        reader,
        deadline,
    })
}

/// Admission before anything is queued: the model exists and is served to this caller
/// (shared channels or their own). Key and user limits and the quota are `quota::admit`'s.
pub(crate) async fn admit(
    state: &AppState,
    caller: &Caller,
    view: &ChatRequestView,
) -> Result<(), ApiError> {
    match state.directory.model_for(&view.model, caller.user_id) {
        ModelStatus::Unknown => return Err(ApiError::ModelNotFound(view.model.clone())),
        ModelStatus::NoEnabledChannel => return Err(ApiError::NoChannel(view.model.clone())),
        ModelStatus::Available => {}
    }
    // Only a model the directory knows becomes a label: client-chosen names would not.
    crate::trace::note_model(&view.model);
    Ok(())
}

/// Subscribes to the request's chunk subject first (so no frame is missed), then queues
/// the request and records `RequestAccepted`, awaiting both JetStream acks together.
pub(crate) async fn enqueue(
    state: &AppState,
    caller: &Caller,
    mut item: WorkItem,
) -> Result<FrameReader, ApiError> {
    let ns = &state.ns;
    let trace_id = item
        .trace_id
        .get_or_insert_with(|| crate::trace::current(item.request_id))
        .clone();
    let sub = state
        .nats
        .subscribe(ns.chunk_subject(&item.request_id))
        .await
        .map_err(|_| ApiError::QueueUnavailable)?;
    let payload = serde_json::to_vec(&item).map_err(|_| ApiError::Internal)?;
    let accepted = Event::RequestAccepted(RequestAccepted {
        request_id: item.request_id,
        api: item.api,
        model: item.model.clone(),
        stream: item.stream,
        key_id: caller.key_id,
        user_id: caller.user_id,
        group: caller.group.clone(),
        session_id: item.session_id,
    })
    .into_envelope(
        item.accepted_at,
        Metadata {
            trace_id: Some(trace_id.clone()),
            key_id: Some(caller.key_id),
            user_id: caller.user_id,
        },
    );

    let publish = async_nats::jetstream::message::PublishMessage::build()
        .payload(payload.into())
        .message_id(item.request_id.to_string())
        .header(
            "traceparent",
            crate::trace::traceparent(&trace_id, item.request_id),
        );
    let work_ack = state
        .js
        .send_publish(ns.request_subject(&item.model), publish)
        .await
        .map_err(|_| ApiError::QueueUnavailable)?;
    let event_ack = projector::bus::publish_event(&state.js, ns, &accepted)
        .await
        .map_err(|_| ApiError::QueueUnavailable)?;
    let (work, event) = tokio::join!(work_ack, event_ack);
    work.map_err(|_| ApiError::QueueUnavailable)?;
    if let Err(e) = event {
        // The request is queued and will be served; its other events still record it.
        tracing::warn!(error = %e, "RequestAccepted was not acknowledged by JetStream");
    }
    Ok(FrameReader::new(sub))
}

/// Folds the frames of a non-streaming request into its one JSON body.
async fn plain_response(mut reader: FrameReader, deadline: Instant) -> Result<Response, ApiError> {
    let mut body: Option<Box<RawValue>> = None;
    loop {
        let frame = reader
            .next(deadline)
            .await
            .map_err(|e| ApiError::Upstream(relay::read_error_info(&e)))?;
        match frame.kind {
            FrameKind::Response => body = Some(frame.data),
            FrameKind::Chunk => {}
            FrameKind::Error => return Ok(error_from_frame(frame.data.get())),
            FrameKind::Done => {
                let body = body.ok_or(ApiError::Internal)?;
                let mut response = Response::new(Body::from(body.get().to_owned()));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                return Ok(response);
            }
        }
    }
}

fn error_from_frame(data: &str) -> Response {
    match serde_json::from_str::<ApiErrorInfo>(data) {
        Ok(info) => error_response(&info),
        Err(_) => ApiError::Internal.into_response(),
    }
}
