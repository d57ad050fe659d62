//! `POST /v1/chat/completions`: authenticate, validate, admit (model, rate limit, quota),
//! queue the request on JetStream, and relay the worker's frames back.

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
use crate::relay::{self, FrameReader, ReadError};
use crate::request_id::RequestId;
use crate::state::AppState;

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
    admit(&state, &caller, &view).await?;
    let ask = crate::quota::Ask {
        model: &view.model,
        max_tokens: view.max_tokens,
        body: &value,
    };
    let hold = crate::quota::admit(&state, &caller, request_id, ask).await?;
    // serde_json accepted the bytes, so they are valid UTF-8 JSON; forward them verbatim.
    let text =
        String::from_utf8(body.to_vec()).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    let raw = RawValue::from_string(text).map_err(|e| ApiError::MalformedJson(e.to_string()))?;

    let deadline = Instant::now() + state.opts.request_timeout;
    let item = WorkItem {
        request_id,
        api: Api::ChatCompletions,
        model: view.model.clone(),
        stream: view.stream,
        include_usage: view.include_usage,
        body: raw,
        key_id: caller.key_id,
        user_id: caller.user_id,
        group: caller.group.clone(),
        accepted_at: Utc::now(),
        deadline: Utc::now() + state.opts.request_timeout,
        trace_id: None,
        forward_headers: Vec::new(),
    };
    let reader = hold.attach(enqueue(&state, &caller, item).await).await?;
    if view.stream {
        stream_response(reader, deadline).await
    } else {
        plain_response(reader, deadline).await
    }
}

/// Admission before anything is queued: the model exists and is served. Key and user
/// limits and the quota are `quota::admit`'s.
pub(crate) async fn admit(
    state: &AppState,
    _caller: &Caller,
    view: &ChatRequestView,
) -> Result<(), ApiError> {
    match state.directory.model(&view.model) {
        ModelStatus::Unknown => return Err(ApiError::ModelNotFound(view.model.clone())),
        ModelStatus::NoEnabledChannel => return Err(ApiError::NoChannel(view.model.clone())),
        ModelStatus::Available => {}
    }
    Ok(())
}

/// Subscribes to the request's chunk subject first (so no frame is missed), then queues
/// the request and records `RequestAccepted`, awaiting both JetStream acks together.
pub(crate) async fn enqueue(
    state: &AppState,
    caller: &Caller,
    item: WorkItem,
) -> Result<FrameReader, ApiError> {
    let ns = &state.ns;
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
    })
    .into_envelope(
        item.accepted_at,
        Metadata {
            trace_id: None,
            key_id: Some(caller.key_id),
            user_id: caller.user_id,
        },
    );

    let publish = async_nats::jetstream::message::PublishMessage::build()
        .payload(payload.into())
        .message_id(item.request_id.to_string());
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

/// Waits for the first frame before answering, so a request that fails before any
/// content gets a real HTTP error status instead of a 200 with an error inside.
async fn stream_response(mut reader: FrameReader, deadline: Instant) -> Result<Response, ApiError> {
    let first = reader
        .next(deadline)
        .await
        .map_err(|e| ApiError::Upstream(relay::read_error_info(&e)))?;
    if first.kind == FrameKind::Error {
        return Ok(error_from_frame(first.data.get()));
    }
    let body = async_stream::stream! {
        let mut frame = first;
        loop {
            match frame.kind {
                FrameKind::Chunk | FrameKind::Response => {
                    yield Ok::<_, std::convert::Infallible>(relay::sse_event(frame.seq, frame.data.get()));
                }
                FrameKind::Done => {
                    yield Ok(Bytes::from_static(relay::SSE_DONE));
                    return;
                }
                FrameKind::Error => {
                    let info: Option<ApiErrorInfo> = serde_json::from_str(frame.data.get()).ok();
                    let body = info.map(|i| schemas::openai::error_json(&i)).unwrap_or_default();
                    yield Ok(relay::sse_event(frame.seq, &body.to_string()));
                    return;
                }
            }
            frame = loop {
                let wake = deadline.min(Instant::now() + relay::PING_EVERY);
                match reader.next(wake).await {
                    Ok(next) => break next,
                    Err(ReadError::Timeout) if Instant::now() < deadline => {
                        yield Ok(Bytes::from_static(relay::SSE_PING));
                    }
                    Err(e) => {
                        let info = relay::read_error_info(&e);
                        let body = schemas::openai::error_json(&info).to_string();
                        yield Ok(relay::sse_event(reader.last_seq() + 1, &body));
                        return;
                    }
                }
            };
        }
    };
    let mut response = Response::new(Body::from_stream(body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
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
