//! `GET /ws`: chat completions over one WebSocket, several at once.
//!
//! Frames are JSON text. The client sends `{"type":"chat","id":"c1","body":{…chat
//! completion request…}}`, `{"type":"cancel","id":"c1"}` and optionally
//! `{"type":"ping"}`; the server answers per request `{"type":"accepted","id","request_id"}`
//! (the id to resume with `GET /v1/streams/{request_id}` or cancel over HTTP),
//! `{"type":"chunk","id","data":{…chat.completion.chunk…}}` and one of
//! `{"type":"done","id","usage":{…},"finish_reason"}` or
//! `{"type":"error","id","status","error":{…OpenAI error object…}}`; plus
//! `{"type":"ping"}` every [`HEARTBEAT`] (with a protocol ping) and `{"type":"pong"}`.
//!
//! Each `chat` goes through the same admission as `POST /v1/chat/completions`
//! ([`crate::routes::chat::submit`]: limits, quota, queueing) and always streams. A frame
//! that cannot be read gets an `error` frame (with the request's `id` when it has one) and
//! the socket stays usable. Per connection: at most `ws_max_requests` requests in flight
//! and messages of at most `max_body_bytes` (larger ones up to twice that get an error
//! frame; beyond that the socket closes with 1009). Close codes: 1000 when the client
//! closes, 1001 at server shutdown or when the client stopped answering pings, 1009 for a
//! message too big, 1002 for a broken protocol.
//!
//! When the socket goes away, its requests in flight get the resume grace like a dropped
//! SSE stream: they can be resumed over HTTP, and are cancelled if nobody does.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{close_code, CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use uuid::Uuid;

use schemas::openai::validate_chat_request;
use schemas::work::{Api, ApiErrorInfo, CancelReason, DoneData, ErrorKind, FrameKind};

use crate::auth::authenticate;
use crate::directory::Caller;
use crate::error::ApiError;
use crate::relay;
use crate::routes::chat;
use crate::state::AppState;

/// How often the server pings (a protocol ping and a `{"type":"ping"}` frame).
pub const HEARTBEAT: Duration = Duration::from_secs(15);
/// A client that sent nothing (not even a pong) for this long is gone.
const SILENCE_LIMIT: Duration = Duration::from_secs(45);
/// Client ids are echoed in every frame of their request; keep them short.
const MAX_ID_LEN: usize = 128;
/// Frames waiting for the socket writer; request relays wait when it is full.
const OUTBOX: usize = 256;

/// Chat completions over a WebSocket
///
/// Upgrade to a WebSocket carrying JSON text frames: the client sends
/// `{"type":"chat","id","body":{…chat completion request…}}`, `{"type":"cancel","id"}` and
/// `{"type":"ping"}`; the server answers `accepted`, `chunk`, `done` or `error` frames per
/// request, and pings. Several requests may run at once on one socket.
#[utoipa::path(
    get,
    path = "/ws",
    operation_id = "websocket",
    tag = "openai",
    params(
        ("Upgrade" = String, Header, description = "`websocket`"),
        ("Connection" = String, Header, description = "`Upgrade`"),
        ("Sec-WebSocket-Version" = String, Header, description = "`13`"),
        ("Sec-WebSocket-Key" = String, Header, description = "The client's nonce"),
    ),
    responses(
        (status = 101, description = "Switched to the WebSocket protocol"),
        (status = 401, description = "Missing or invalid API key"),
        (status = 426, description = "Not a WebSocket upgrade request"),
    ),
    security(("api_key" = []), ("x_api_key" = [])),
)]
pub async fn upgrade(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let caller = match authenticate(&state.directory, &headers) {
        Ok(caller) => caller,
        Err(e) => return e.into_response(),
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => {
            return ApiError::Upstream(ApiErrorInfo {
                status: rejection.status().as_u16(),
                kind: ErrorKind::BadRequest,
                message: format!("`/ws` needs a WebSocket upgrade: {}", rejection.body_text()),
                code: Some("websocket_upgrade_required".into()),
                param: None,
                retry_after: None,
            })
            .into_response()
        }
    };
    let soft = state.opts.max_body_bytes;
    ws.max_message_size(soft.saturating_mul(2))
        .max_frame_size(soft.saturating_mul(2))
        .on_upgrade(move |socket| serve(state, caller, socket))
}

/// A client frame, read loosely so every mistake gets a precise error frame.
#[derive(Deserialize)]
struct Incoming {
    #[serde(rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    id: Option<serde_json::Value>,
    #[serde(default)]
    body: Option<Box<RawValue>>,
}

/// How the connection ended, as the close frame says.
struct Closing(u16, &'static str);

async fn serve(state: Arc<AppState>, caller: Arc<Caller>, socket: WebSocket) {
    let (mut sink, mut incoming) = socket.split();
    let (out, mut outbox) = mpsc::channel::<Message>(OUTBOX);
    // One task writes, so a slow client never blocks reading its cancel frames.
    let writer = tokio::spawn(async move {
        while let Some(msg) = outbox.recv().await {
            let close = matches!(msg, Message::Close(_));
            if sink.send(msg).await.is_err() || close {
                break;
            }
        }
        let _ = sink.close().await;
    });
    let mut conn = Connection {
        state: state.clone(),
        caller,
        out: out.clone(),
        inflight: HashMap::new(),
        tasks: JoinSet::new(),
    };
    let mut heartbeat = tokio::time::interval_at(Instant::now() + HEARTBEAT, HEARTBEAT);
    let mut last_heard = Instant::now();
    let stopping = state.presence.stopping().clone();
    let closing = loop {
        tokio::select! {
            () = stopping.cancelled() => break Some(Closing(close_code::AWAY, "server shutting down")),
            _ = heartbeat.tick() => {
                if last_heard.elapsed() > SILENCE_LIMIT {
                    break Some(Closing(close_code::AWAY, "no answer to pings"));
                }
                let _ = out.send(Message::Ping(bytes::Bytes::from_static(b"sluice"))).await;
                let _ = out.send(text(r#"{"type":"ping"}"#.to_owned())).await;
            }
            Some(done) = conn.tasks.join_next(), if !conn.tasks.is_empty() => {
                if let Ok(id) = done {
                    conn.inflight.remove(&id);
                }
            }
            msg = incoming.next() => {
                last_heard = Instant::now();
                match msg {
                    None => break None,
                    Some(Ok(Message::Text(t))) => conn.on_text(&t).await,
                    Some(Ok(Message::Binary(_))) => {
                        conn.error(None, invalid("binary frames are not supported; send JSON text frames", "invalid_frame")).await;
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Ok(Message::Close(_))) => break Some(Closing(close_code::NORMAL, "")),
                    Some(Err(e)) => {
                        let too_big = e.to_string().contains("too long");
                        tracing::debug!(error = %e, "WebSocket read failed");
                        break Some(if too_big {
                            Closing(close_code::SIZE, "message too big")
                        } else {
                            Closing(close_code::PROTOCOL, "unreadable frame")
                        });
                    }
                }
            }
        }
    };
    // Requests still in flight keep running for the resume grace (their attachments
    // detach as the tasks are dropped).
    conn.tasks.abort_all();
    drop(conn);
    if let Some(Closing(code, reason)) = closing {
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        };
        let _ = out.send(Message::Close(Some(frame))).await;
    }
    drop(out);
    let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
}

struct Connection {
    state: Arc<AppState>,
    caller: Arc<Caller>,
    out: mpsc::Sender<Message>,
    /// Client id → request id of the requests in flight.
    inflight: HashMap<String, Uuid>,
    /// The relays of those requests; each returns its client id.
    tasks: JoinSet<String>,
}

impl Connection {
    async fn on_text(&mut self, t: &str) {
        if t.len() > self.state.opts.max_body_bytes {
            let message = format!(
                "the frame is larger than the limit of {} bytes",
                self.state.opts.max_body_bytes
            );
            self.error(None, invalid(message, "request_too_large"))
                .await;
            return;
        }
        let frame: Incoming = match serde_json::from_str(t) {
            Ok(frame) => frame,
            Err(e) => {
                let message =
                    format!("the frame is not a JSON object of the WebSocket protocol: {e}");
                self.error(None, invalid(message, "invalid_frame")).await;
                return;
            }
        };
        let id = match &frame.id {
            Some(serde_json::Value::String(id)) if !id.is_empty() && id.len() <= MAX_ID_LEN => {
                Some(id.clone())
            }
            _ => None,
        };
        match (frame.kind.as_deref(), id) {
            (Some("ping"), _) => {
                let _ = self.out.send(text(r#"{"type":"pong"}"#.to_owned())).await;
            }
            (Some("pong"), _) => {}
            (Some("chat"), Some(id)) => self.chat(id, frame.body).await,
            (Some("cancel"), Some(id)) => self.cancel(id).await,
            (Some("chat" | "cancel"), None) => {
                let message =
                    format!("`id` must be a non-empty string of at most {MAX_ID_LEN} characters");
                self.error(None, invalid(message, "invalid_frame")).await;
            }
            (other, id) => {
                let message = match other {
                    Some(kind) => {
                        format!("unknown frame type `{kind}`; use `chat`, `cancel` or `ping`")
                    }
                    None => "the frame has no `type`; use `chat`, `cancel` or `ping`".to_owned(),
                };
                self.error(id.as_deref(), invalid(message, "invalid_frame"))
                    .await;
            }
        }
    }

    async fn chat(&mut self, id: String, body: Option<Box<RawValue>>) {
        if self.inflight.contains_key(&id) {
            let message = format!("a request with id `{id}` is still in flight on this socket");
            self.error(Some(&id), invalid(message, "duplicate_id"))
                .await;
            return;
        }
        if self.inflight.len() >= self.state.opts.ws_max_requests {
            let info = ApiErrorInfo {
                status: 429,
                kind: ErrorKind::RateLimited,
                message: format!(
                    "at most {} requests may be in flight on one WebSocket",
                    self.state.opts.ws_max_requests
                ),
                code: Some("too_many_requests".into()),
                param: None,
                retry_after: None,
            };
            self.error(Some(&id), info).await;
            return;
        }
        let Some(body) = body else {
            let info = ApiError::InvalidRequest(schemas::openai::InvalidRequest {
                message: "a `chat` frame needs a `body`: a chat completion request".into(),
                param: Some("body".into()),
            })
            .info();
            self.error(Some(&id), info).await;
            return;
        };
        let request_id = schemas::new_id();
        self.inflight.insert(id.clone(), request_id);
        let relay = Relay {
            state: self.state.clone(),
            caller: self.caller.clone(),
            out: self.out.clone(),
            id_json: serde_json::to_string(&id).unwrap_or_default(),
            request_id,
        };
        self.tasks.spawn(async move {
            relay.run(body).await;
            id
        });
    }

    async fn cancel(&mut self, id: String) {
        match self.inflight.get(&id) {
            Some(request_id) => {
                // The relay goes on: it forwards the stream's end (`done` or `error`).
                if let Err(e) = self
                    .state
                    .presence
                    .cancel(*request_id, CancelReason::Stop)
                    .await
                {
                    tracing::warn!(error = %e, "publishing a cancel failed");
                    self.error(Some(&id), ApiError::QueueUnavailable.info())
                        .await;
                }
            }
            None => {
                let info = ApiErrorInfo {
                    status: 404,
                    kind: ErrorKind::BadRequest,
                    message: format!("no request with id `{id}` is in flight on this socket"),
                    code: Some("unknown_id".into()),
                    param: Some("id".into()),
                    retry_after: None,
                };
                self.error(Some(&id), info).await;
            }
        }
    }

    async fn error(&self, id: Option<&str>, info: ApiErrorInfo) {
        let id_json = id.map_or_else(
            || "null".to_owned(),
            |id| serde_json::to_string(id).unwrap_or_default(),
        );
        let _ = self.out.send(error_frame(&id_json, &info)).await;
    }
}

/// One request of a socket: admission, then its frames as WebSocket frames.
struct Relay {
    state: Arc<AppState>,
    caller: Arc<Caller>,
    out: mpsc::Sender<Message>,
    /// The client's id as a JSON string, ready to splice into frames.
    id_json: String,
    request_id: Uuid,
}

impl Relay {
    async fn run(self, body: Box<RawValue>) {
        let queued = match self.submit(body).await {
            Ok(queued) => queued,
            Err(e) => {
                let _ = self.out.send(error_frame(&self.id_json, &e.info())).await;
                return;
            }
        };
        // Attached before anything is sent: if the socket is already gone, dropping the
        // attachment starts the resume grace like any other departure.
        let mut att = queued.attach(&self.state);
        let accepted = format!(
            r#"{{"type":"accepted","id":{},"request_id":"{}"}}"#,
            self.id_json, self.request_id
        );
        if self.out.send(text(accepted)).await.is_err() {
            return;
        }
        let deadline = att.deadline();
        loop {
            let msg = match att.next(deadline).await {
                Ok(frame) => match frame.kind {
                    FrameKind::Chunk | FrameKind::Response => text(format!(
                        r#"{{"type":"chunk","id":{},"data":{}}}"#,
                        self.id_json,
                        frame.data.get()
                    )),
                    FrameKind::Done => {
                        let done: Option<DoneData> = serde_json::from_str(frame.data.get()).ok();
                        let body = serde_json::json!({
                            "type": "done",
                            "usage": done.as_ref().map(|d| d.usage.to_openai()),
                            "finish_reason": done.and_then(|d| d.finish_reason),
                        });
                        let _ = self.out.send(with_id(body, &self.id_json)).await;
                        return;
                    }
                    FrameKind::Error => {
                        let info = serde_json::from_str::<ApiErrorInfo>(frame.data.get())
                            .unwrap_or_else(|_| ApiError::Internal.info());
                        let _ = self.out.send(error_frame(&self.id_json, &info)).await;
                        return;
                    }
                },
                Err(e) => {
                    let _ = self
                        .out
                        .send(error_frame(&self.id_json, &relay::read_error_info(&e)))
                        .await;
                    return;
                }
            };
            if self.out.send(msg).await.is_err() {
                // The socket is gone; dropping `att` starts the resume grace.
                return;
            }
        }
    }

    async fn submit(&self, body: Box<RawValue>) -> Result<chat::Queued, ApiError> {
        let value: serde_json::Value =
            serde_json::from_str(body.get()).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
        let view = validate_chat_request(&value)?;
        let submission = chat::Submission {
            request_id: self.request_id,
            api: Api::ChatCompletions,
            view: &view,
            value: &value,
            raw: body,
            // Chunks are what a socket carries, whatever the body says.
            stream: true,
            forward_headers: Vec::new(),
            session_id: None,
        };
        chat::submit(&self.state, &self.caller, submission).await
    }
}

fn text(s: String) -> Message {
    Message::Text(Utf8Bytes::from(s))
}

/// Adds `"id"` (already JSON) to a frame object without re-encoding the rest.
fn with_id(body: serde_json::Value, id_json: &str) -> Message {
    let rest = body.to_string();
    let inner = rest.strip_prefix('{').unwrap_or(&rest);
    text(format!(r#"{{"id":{id_json},{inner}"#))
}

fn error_frame(id_json: &str, info: &ApiErrorInfo) -> Message {
    let error = schemas::openai::error_json(info)
        .get_mut("error")
        .map(serde_json::Value::take)
        .unwrap_or_default();
    with_id(
        serde_json::json!({"type": "error", "status": info.status, "error": error}),
        id_json,
    )
}

fn invalid(message: impl Into<String>, code: &str) -> ApiErrorInfo {
    ApiErrorInfo {
        status: 400,
        kind: ErrorKind::BadRequest,
        message: message.into(),
        code: Some(code.to_owned()),
        param: None,
        retry_after: None,
    }
}
