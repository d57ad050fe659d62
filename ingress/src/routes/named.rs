//! Relaying frames to APIs whose SSE events are named (`event: message_start`,
//! `event: response.created`): Anthropic Messages and OpenAI Responses. The worker already
//! wrote each frame in the client's format with its event name; what differs per surface
//! is only how errors look and how an idle stream is kept alive.

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue};
use axum::response::Response;
use serde_json::value::RawValue;
use tokio::time::Instant;

use schemas::work::{ApiErrorInfo, FrameKind};

use crate::error::{anthropic_error_response, error_response, ApiError};
use crate::relay::{self, FrameReader, ReadError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// `/v1/messages`: Anthropic error shapes, `event: ping` keep-alives.
    Anthropic,
    /// `/v1/responses`: OpenAI error shapes, an `error` event mid-stream.
    Responses,
}

impl Surface {
    /// A whole error response in the surface's shape.
    pub fn error_response(self, info: &ApiErrorInfo) -> Response {
        match self {
            Surface::Anthropic => anthropic_error_response(info),
            Surface::Responses => error_response(info),
        }
    }

    fn error_event(self, seq: u64, info: &ApiErrorInfo) -> Bytes {
        let body = match self {
            Surface::Anthropic => schemas::anthropic::error_json(info),
            Surface::Responses => serde_json::json!({"type": "error",
                "code": info.code.clone().unwrap_or_else(|| schemas::openai::error_type_for(info.status, info.kind).to_owned()),
                "message": info.message, "param": info.param, "sequence_number": seq}),
        };
        named_event(seq, "error", &body.to_string())
    }

    fn keep_alive(self) -> &'static [u8] {
        match self {
            Surface::Anthropic => b"event: ping\ndata: {\"type\": \"ping\"}\n\n",
            Surface::Responses => relay::SSE_PING,
        }
    }
}

/// One named SSE event, with the `id:` a client resumes from.
fn named_event(seq: u64, event: &str, data: &str) -> Bytes {
    Bytes::from(format!("event: {event}\nid: {seq}\ndata: {data}\n\n"))
}

/// Waits for the first frame so a request failing before any content gets a real status.
pub async fn stream_response(
    surface: Surface,
    mut reader: FrameReader,
    deadline: Instant,
) -> Result<Response, ApiError> {
    let first = reader
        .next(deadline)
        .await
        .map_err(|e| ApiError::Upstream(relay::read_error_info(&e)))?;
    if first.kind == FrameKind::Error {
        return Ok(error_from_frame(surface, first.data.get()));
    }
    let body = async_stream::stream! {
        let mut frame = first;
        loop {
            match frame.kind {
                FrameKind::Chunk | FrameKind::Response => {
                    let event = frame.event.as_deref().unwrap_or("message");
                    yield Ok::<_, std::convert::Infallible>(named_event(frame.seq, event, frame.data.get()));
                }
                FrameKind::Done => return,
                FrameKind::Error => {
                    let info = serde_json::from_str::<ApiErrorInfo>(frame.data.get())
                        .unwrap_or_else(|_| ApiError::Internal.info());
                    yield Ok(surface.error_event(frame.seq, &info));
                    return;
                }
            }
            frame = loop {
                let wake = deadline.min(Instant::now() + relay::PING_EVERY);
                match reader.next(wake).await {
                    Ok(next) => break next,
                    Err(ReadError::Timeout) if Instant::now() < deadline => {
                        yield Ok(Bytes::from_static(surface.keep_alive()));
                    }
                    Err(e) => {
                        yield Ok(surface.error_event(reader.last_seq() + 1, &relay::read_error_info(&e)));
                        return;
                    }
                }
            };
        }
    };
    Ok(relay::sse_body(Body::from_stream(body)))
}

/// Folds the frames of a plain request into its one JSON body.
pub async fn plain_response(
    surface: Surface,
    mut reader: FrameReader,
    deadline: Instant,
) -> Result<Response, ApiError> {
    let mut body: Option<Box<RawValue>> = None;
    loop {
        let frame = reader
            .next(deadline)
            .await
            .map_err(|e| ApiError::Upstream(relay::read_error_info(&e)))?;
        match frame.kind {
            FrameKind::Response => body = Some(frame.data),
            FrameKind::Chunk => {}
            FrameKind::Error => return Ok(error_from_frame(surface, frame.data.get())),
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

fn error_from_frame(surface: Surface, data: &str) -> Response {
    let info =
        serde_json::from_str::<ApiErrorInfo>(data).unwrap_or_else(|_| ApiError::Internal.info());
    surface.error_response(&info)
}

/// A validated request of a non-chat route.
pub struct Submission<'a> {
    pub api: schemas::work::Api,
    pub view: &'a schemas::openai::ChatRequestView,
    /// The body as received (forwarded verbatim) and parsed (for the quota's estimate).
    pub body: &'a [u8],
    pub value: &'a serde_json::Value,
    pub surface: Surface,
    /// Provider headers to forward to a channel of the client's protocol.
    pub forward_headers: Vec<(String, String)>,
}

/// What the non-chat routes share after validation: admit (model, limits, quota), queue
/// the request for the workers, and relay the answer in the surface's shapes.
pub async fn submit(
    state: &std::sync::Arc<crate::state::AppState>,
    request_id: uuid::Uuid,
    caller: &crate::directory::Caller,
    s: Submission<'_>,
) -> Result<Response, ApiError> {
    let Submission {
        api,
        view,
        body,
        value,
        surface,
        forward_headers,
    } = s;
    super::chat::admit(state, caller, view).await?;
    let ask = crate::quota::Ask {
        model: &view.model,
        max_tokens: view.max_tokens,
        body: value,
    };
    let hold = crate::quota::admit(state, caller, request_id, ask).await?;
    let text =
        String::from_utf8(body.to_vec()).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    let raw = RawValue::from_string(text).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    let deadline = Instant::now() + state.opts.request_timeout;
    let now = chrono::Utc::now();
    let item = schemas::work::WorkItem {
        request_id,
        api,
        model: view.model.clone(),
        stream: view.stream,
        include_usage: view.include_usage,
        body: raw,
        key_id: caller.key_id,
        user_id: caller.user_id,
        group: caller.group.clone(),
        accepted_at: now,
        deadline: now + state.opts.request_timeout,
        trace_id: None,
        forward_headers,
        session_id: None,
    };
    let reader = hold
        .attach(super::chat::enqueue(state, caller, item).await)
        .await?;
    if view.stream {
        stream_response(surface, reader, deadline).await
    } else {
        plain_response(surface, reader, deadline).await
    }
}

/// Reads a JSON body, mapping a too-large or malformed one to the right error.
pub fn read_json(
    state: &crate::state::AppState,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<(Bytes, serde_json::Value), ApiError> {
    let body = body.map_err(|rejection| match rejection.status() {
        axum::http::StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge {
            limit: state.opts.max_body_bytes,
        },
        _ => ApiError::MalformedJson(rejection.body_text()),
    })?;
    let value =
        serde_json::from_slice(&body).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    Ok((body, value))
}
