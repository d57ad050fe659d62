//! Relays a worker's frames (`<ns>.chunks.<request_id>`) to the client: as SSE events
//! for streams (in the framing of the API the request came in on), or folded into one
//! JSON body for plain calls.
//!
//! A [`FrameReader`] reads the frames of one request either live (a core subscription
//! taken before the request was queued: the request's own client) or from
//! `<NS>_CHUNKS` (an ordered consumer that replays what is stored and then follows live:
//! resumed streams and watchers). An [`Attachment`] is one client reading a stream; when
//! the client leaves before the end, it hands its reader to [`crate::presence`], which
//! decides after the resume grace whether to cancel the generation.

use async_nats::jetstream::consumer::pull::Ordered;
use async_nats::Subscriber;
use axum::body::Body;
use axum::http::{header, HeaderValue};
use axum::response::Response;
use bytes::Bytes;
use futures::StreamExt;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use uuid::Uuid;

use schemas::work::{Api, ApiErrorInfo, ErrorKind, Frame, FrameKind};

use crate::error::{anthropic_error_response, error_response, ApiError};
use crate::presence::Presence;

/// Where a reader's frames come from.
enum Source {
    /// The chunk subject, live only.
    Live(Subscriber),
    /// `<NS>_CHUNKS` filtered to the request: everything stored, then live.
    Stored(Box<Ordered>),
}

/// Reads frames one by one from the batches a worker publishes.
pub struct FrameReader {
    source: Source,
    pending: VecDeque<Frame>,
    last_seq: u64,
    /// Settled with the terminal frame (quota hold and token counters).
    hold: Option<crate::quota::Hold>,
}

#[derive(Debug)]
pub enum ReadError {
    /// Nothing arrived before the deadline.
    Timeout,
    /// The subscription ended (NATS connection closed for good).
    Closed,
}

impl FrameReader {
    pub fn new(sub: Subscriber) -> Self {
        Self {
            source: Source::Live(sub),
            pending: VecDeque::new(),
            last_seq: 0,
            hold: None,
        }
    }

    /// Frames from `<NS>_CHUNKS`, skipping those up to `after` (the client's
    /// `Last-Event-ID`; 0 = from the start).
    pub fn stored(ordered: Ordered, after: u64) -> Self {
        Self {
            source: Source::Stored(Box::new(ordered)),
            pending: VecDeque::new(),
            last_seq: after,
            hold: None,
        }
    }

    /// Settles `hold` when the terminal frame (`Done` or `Error`) is read.
    pub fn settle_on_end(&mut self, hold: crate::quota::Hold) {
        self.hold = Some(hold);
    }

    /// The next frame in order; frames at or below the last seen `seq` are duplicates (or
    /// were seen before a resume) and skipped, so a client never sees a chunk twice. The
    /// terminal frame always passes: it ends the stream whatever `Last-Event-ID` said.
    pub async fn next(&mut self, deadline: Instant) -> Result<Frame, ReadError> {
        loop {
            while let Some(frame) = self.pending.pop_front() {
                let terminal = is_terminal(frame.kind);
                if frame.seq > self.last_seq || terminal {
                    self.last_seq = self.last_seq.max(frame.seq);
                    if terminal {
                        self.pending.clear();
                        if let Some(hold) = self.hold.take() {
                            hold.finish(&frame).await;
                        }
                    }
                    return Ok(frame);
                }
            }
            let payload = tokio::time::timeout_at(deadline, self.receive())
                .await
                .map_err(|_| ReadError::Timeout)??;
            match serde_json::from_slice::<Vec<Frame>>(&payload) {
                Ok(frames) => self.pending.extend(frames),
                Err(e) => {
                    tracing::error!(error = %e, "undecodable frame batch on a chunk subject; skipped")
                }
            }
        }
    }

    async fn receive(&mut self) -> Result<Bytes, ReadError> {
        match &mut self.source {
            Source::Live(sub) => sub.next().await.map(|m| m.payload).ok_or(ReadError::Closed),
            Source::Stored(ordered) => loop {
                match ordered.next().await {
                    Some(Ok(msg)) => return Ok(msg.message.payload),
                    // The ordered consumer recreates itself after gaps and missed
                    // heartbeats; an error it reports is worth a line, not the stream.
                    Some(Err(e)) => tracing::debug!(error = %e, "reading stored frames"),
                    None => return Err(ReadError::Closed),
                }
            },
        }
    }

    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }
}

/// One client reading a request's stream. Counted in [`Presence`] while it lives; dropped
/// before the terminal frame (the client went away), it hands its reader to the grace
/// task, which keeps reading and cancels the generation if nobody comes back in time.
pub struct Attachment {
    presence: Arc<Presence>,
    request_id: Uuid,
    /// `None` only while being dropped.
    reader: Option<FrameReader>,
    deadline: Instant,
    ended: bool,
}

impl Attachment {
    pub fn new(
        presence: Arc<Presence>,
        request_id: Uuid,
        reader: FrameReader,
        deadline: Instant,
    ) -> Self {
        presence.attach(request_id);
        Self {
            presence,
            request_id,
            reader: Some(reader),
            deadline,
            ended: false,
        }
    }

    pub fn request_id(&self) -> Uuid {
        self.request_id
    }

    /// When nobody waits for this request any more.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The next frame, waiting at most until `wake`. A terminal frame or a closed reader
    /// ends the attachment; a timeout at the request's deadline does too.
    pub async fn next(&mut self, wake: Instant) -> Result<Frame, ReadError> {
        let Some(reader) = self.reader.as_mut() else {
            return Err(ReadError::Closed);
        };
        let read = reader.next(wake).await;
        match &read {
            Ok(frame) if is_terminal(frame.kind) => self.ended = true,
            Ok(_) => {}
            Err(ReadError::Closed) => self.ended = true,
            Err(ReadError::Timeout) if Instant::now() >= self.deadline => self.ended = true,
            Err(ReadError::Timeout) => {}
        }
        read
    }

    pub fn last_seq(&self) -> u64 {
        self.reader.as_ref().map_or(0, FrameReader::last_seq)
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        let rest = match (self.ended, self.reader.take()) {
            (false, Some(reader)) => Some((reader, self.deadline)),
            _ => None,
        };
        self.presence.detach(self.request_id, rest);
    }
}

/// The error as a frame would carry it, for a stream that ended without an answer.
pub fn read_error_info(e: &ReadError) -> ApiErrorInfo {
    match e {
        ReadError::Timeout => ApiErrorInfo {
            status: 504,
            kind: ErrorKind::Timeout,
            message: "the gateway timed out waiting for the model's answer".into(),
            code: Some("timeout".into()),
            param: None,
            retry_after: None,
        },
        ReadError::Closed => ApiErrorInfo {
            status: 503,
            kind: ErrorKind::Connection,
            message: "the gateway lost its connection to the queue".into(),
            code: None,
            param: None,
            retry_after: Some(1),
        },
    }
}

/// One SSE event in OpenAI's framing, with an `id:` a client can resume from.
pub fn sse_event(seq: u64, data: &str) -> Bytes {
    let mut out = String::with_capacity(data.len() + 32);
    out.push_str("id: ");
    let _ = std::fmt::Write::write_fmt(&mut out, format_args!("{seq}"));
    out.push_str("\ndata: ");
    out.push_str(data);
    out.push_str("\n\n");
    Bytes::from(out)
}

/// One named SSE event (Anthropic, Responses), with the `id:` a client resumes from.
pub fn named_event(seq: u64, event: &str, data: &str) -> Bytes {
    let mut out = String::with_capacity(data.len() + event.len() + 32);
    out.push_str("event: ");
    out.push_str(event);
    out.push_str("\nid: ");
    let _ = std::fmt::Write::write_fmt(&mut out, format_args!("{seq}"));
    out.push_str("\ndata: ");
    out.push_str(data);
    out.push_str("\n\n");
    Bytes::from(out)
}

pub const SSE_DONE: &[u8] = b"data: [DONE]\n\n";
pub const SSE_PING: &[u8] = b": ping\n\n";
const ANTHROPIC_PING: &[u8] = b"event: ping\ndata: {\"type\": \"ping\"}\n\n";

/// How often an idle stream gets a `: ping` comment, so proxies keep it open.
pub const PING_EVERY: Duration = Duration::from_secs(15);

/// Whether a frame ends the request.
pub fn is_terminal(kind: FrameKind) -> bool {
    matches!(kind, FrameKind::Done | FrameKind::Error)
}

/// How a stream is written for the API its request came in on. The worker already wrote
/// each frame's data (and event name) in that API's format; what differs here is the end
/// marker, errors and keep-alives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `/v1/chat/completions`: unnamed `data:` events, `data: [DONE]`, `: ping`.
    Chat,
    /// `/v1/messages`: named events, `event: error`, `event: ping`.
    Anthropic,
    /// `/v1/responses`: named events, an `error` event mid-stream.
    Responses,
}

impl Framing {
    /// The framing of a request's API, if it streams as SSE.
    pub fn for_api(api: Api) -> Option<Framing> {
        match api {
            Api::ChatCompletions => Some(Framing::Chat),
            Api::Messages => Some(Framing::Anthropic),
            Api::Responses => Some(Framing::Responses),
            Api::Embeddings | Api::Images => None,
        }
    }

    /// A whole error response in the API's shape.
    pub fn error_response(self, info: &ApiErrorInfo) -> Response {
        match self {
            Framing::Anthropic => anthropic_error_response(info),
            Framing::Chat | Framing::Responses => error_response(info),
        }
    }

    fn event(self, frame: &Frame) -> Bytes {
        match self {
            Framing::Chat => sse_event(frame.seq, frame.data.get()),
            Framing::Anthropic | Framing::Responses => named_event(
                frame.seq,
                frame.event.as_deref().unwrap_or("message"),
                frame.data.get(),
            ),
        }
    }

    fn error_event(self, seq: u64, info: &ApiErrorInfo) -> Bytes {
        match self {
            Framing::Chat => sse_event(seq, &schemas::openai::error_json(info).to_string()),
            Framing::Anthropic => named_event(
                seq,
                "error",
                &schemas::anthropic::error_json(info).to_string(),
            ),
            Framing::Responses => {
                let code = info.code.clone().unwrap_or_else(|| {
                    schemas::openai::error_type_for(info.status, info.kind).to_owned()
                });
                let body = serde_json::json!({"type": "error", "code": code,
                    "message": info.message, "param": info.param, "sequence_number": seq});
                named_event(seq, "error", &body.to_string())
            }
        }
    }

    /// What follows the last frame of a successful stream.
    pub fn end_marker(self) -> Option<Bytes> {
        match self {
            Framing::Chat => Some(Bytes::from_static(SSE_DONE)),
            Framing::Anthropic | Framing::Responses => None,
        }
    }

    fn keep_alive(self) -> &'static [u8] {
        match self {
            Framing::Anthropic => ANTHROPIC_PING,
            Framing::Chat | Framing::Responses => SSE_PING,
        }
    }
}

/// An SSE response with the headers every stream carries.
pub fn sse_body(body: Body) -> Response {
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// Streams an attachment's frames as SSE. Waits for the first frame before answering, so
/// a request that fails before any content gets a real HTTP error status instead of a 200
/// with an error inside.
pub async fn sse_response(framing: Framing, mut att: Attachment) -> Result<Response, ApiError> {
    let deadline = att.deadline();
    let first = att
        .next(deadline)
        .await
        .map_err(|e| ApiError::Upstream(read_error_info(&e)))?;
    if first.kind == FrameKind::Error {
        let info = serde_json::from_str::<ApiErrorInfo>(first.data.get())
            .unwrap_or_else(|_| ApiError::Internal.info());
        return Ok(framing.error_response(&info));
    }
    let body = async_stream::stream! {
        let mut frame = first;
        loop {
            match frame.kind {
                FrameKind::Chunk | FrameKind::Response => {
                    yield Ok::<_, std::convert::Infallible>(framing.event(&frame));
                }
                FrameKind::Done => {
                    if let Some(end) = framing.end_marker() {
                        yield Ok(end);
                    }
                    return;
                }
                FrameKind::Error => {
                    let info = serde_json::from_str::<ApiErrorInfo>(frame.data.get())
                        .unwrap_or_else(|_| ApiError::Internal.info());
                    yield Ok(framing.error_event(frame.seq, &info));
                    return;
                }
            }
            frame = loop {
                let wake = deadline.min(Instant::now() + PING_EVERY);
                match att.next(wake).await {
                    Ok(next) => break next,
                    Err(ReadError::Timeout) if Instant::now() < deadline => {
                        yield Ok(Bytes::from_static(framing.keep_alive()));
                    }
                    Err(e) => {
                        yield Ok(framing.error_event(att.last_seq() + 1, &read_error_info(&e)));
                        return;
                    }
                }
            };
        }
    };
    Ok(sse_body(Body::from_stream(body)))
}
