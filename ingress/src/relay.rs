//! Relays a worker's frames (`<ns>.chunks.<request_id>`) to the client: as SSE events
//! for streams, or folded into one JSON body for plain calls.

use async_nats::Subscriber;
use bytes::Bytes;
use futures::StreamExt;
use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

use schemas::work::{ApiErrorInfo, ErrorKind, Frame, FrameKind};

/// Reads frames one by one from the batches a worker publishes.
pub struct FrameReader {
    sub: Subscriber,
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
            sub,
            pending: VecDeque::new(),
            last_seq: 0,
            hold: None,
        }
    }

    /// Settles `hold` when the terminal frame (`Done` or `Error`) is read.
    pub fn settle_on_end(&mut self, hold: crate::quota::Hold) {
        self.hold = Some(hold);
    }

    /// The next frame in order; frames at or below the last seen `seq` are duplicates and
    /// skipped, so a client never sees a chunk twice.
    pub async fn next(&mut self, deadline: Instant) -> Result<Frame, ReadError> {
        loop {
            while let Some(frame) = self.pending.pop_front() {
                if frame.seq > self.last_seq {
                    self.last_seq = frame.seq;
                    if is_terminal(frame.kind) {
                        if let Some(hold) = self.hold.take() {
                            hold.finish(&frame).await;
                        }
                    }
                    return Ok(frame);
                }
            }
            let msg = tokio::time::timeout_at(deadline, self.sub.next())
                .await
                .map_err(|_| ReadError::Timeout)?
                .ok_or(ReadError::Closed)?;
            match serde_json::from_slice::<Vec<Frame>>(&msg.payload) {
                Ok(frames) => self.pending.extend(frames),
                Err(e) => {
                    tracing::error!(error = %e, "undecodable frame batch on a chunk subject; skipped")
                }
            }
        }
    }

    pub fn last_seq(&self) -> u64 {
        self.last_seq
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

pub const SSE_DONE: &[u8] = b"data: [DONE]\n\n";
pub const SSE_PING: &[u8] = b": ping\n\n";

/// How often an idle stream gets a `: ping` comment, so proxies keep it open.
pub const PING_EVERY: Duration = Duration::from_secs(15);

/// Whether a frame ends the request.
pub fn is_terminal(kind: FrameKind) -> bool {
    matches!(kind, FrameKind::Done | FrameKind::Error)
}
