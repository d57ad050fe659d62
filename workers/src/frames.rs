//! Publishing a request's frames on `<ns>.chunks.<request_id>`, coalesced.
//!
//! Frames are written straight into the outgoing message as JSON (`[{"seq":..,"kind":..,
//! "data":..},..]`, the shape of `Vec<schemas::work::Frame>`), so a chunk is serialized
//! exactly once, and everything that is ready goes out as one core NATS message instead
//! of one per token. Core publish (not JetStream) keeps the hot path free of acks; the
//! `<NS>_CHUNKS` stream still stores a copy for resumed streams and redelivery checks.

use std::io::Write as _;

use async_nats::Subject;
use bytes::Bytes;
use schemas::work::FrameKind;
use serde::Serialize;
use tokio::time::Instant;

/// A batch is sent once it reaches this size even if more is ready, keeping messages
/// far below NATS's default 1 MiB payload limit.
const MAX_BATCH_BYTES: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("encoding a frame failed: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("publishing frames failed: {0}")]
    Publish(#[from] async_nats::PublishError),
}

/// The frames of one request: numbering, the batch being built, and whether anything
/// has been published yet (after which the client may have seen part of an answer and
/// failover is no longer possible).
pub struct FrameOut {
    client: async_nats::Client,
    subject: Subject,
    /// The open batch without its closing `]`; empty when nothing is pending.
    buf: Vec<u8>,
    /// `seq` of the next frame; frames are numbered from 1 per request.
    next_seq: u64,
    /// When the open batch got its first frame, for the coalescing window.
    opened_at: Option<Instant>,
    published: bool,
}

impl FrameOut {
    pub fn new(client: async_nats::Client, subject: Subject) -> Self {
        Self {
            client,
            subject,
            buf: Vec::new(),
            next_seq: 1,
            opened_at: None,
            published: false,
        }
    }

    /// Continues the numbering after frames an earlier delivery already published.
    pub fn continue_after(&mut self, last_seq: u64) {
        self.next_seq = last_seq + 1;
        self.published = last_seq > 0;
    }

    /// Whether a message went out: from then on the client may have seen content.
    pub fn published(&self) -> bool {
        self.published
    }

    pub fn has_pending(&self) -> bool {
        !self.buf.is_empty()
    }

    pub fn opened_at(&self) -> Option<Instant> {
        self.opened_at
    }

    /// Whether the open batch is big enough to send without waiting for more.
    pub fn full(&self) -> bool {
        self.buf.len() >= MAX_BATCH_BYTES
    }

    /// Adds a frame to the open batch; `data` is serialized straight into it.
    pub fn push<T: Serialize + ?Sized>(
        &mut self,
        kind: FrameKind,
        data: &T,
    ) -> Result<(), FrameError> {
        self.push_event(kind, None, data)
    }

    /// Like [`FrameOut::push`], with the SSE event name the client's API gives this frame.
    pub fn push_event<T: Serialize + ?Sized>(
        &mut self,
        kind: FrameKind,
        event: Option<&str>,
        data: &T,
    ) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            self.buf.reserve(1024);
            self.buf.push(b'[');
            self.opened_at = Some(Instant::now());
        } else {
            self.buf.push(b',');
        }
        let kind = match kind {
            FrameKind::Chunk => "chunk",
            FrameKind::Response => "response",
            FrameKind::Done => "done",
            FrameKind::Error => "error",
        };
        // Writing to a Vec cannot fail.
        let _ = write!(self.buf, "{{\"seq\":{},\"kind\":\"{kind}\",", self.next_seq);
        if let Some(event) = event {
            self.buf.extend_from_slice(b"\"event\":");
            serde_json::to_writer(&mut self.buf, event)?;
            self.buf.push(b',');
        }
        self.buf.extend_from_slice(b"\"data\":");
        serde_json::to_writer(&mut self.buf, data)?;
        self.buf.push(b'}');
        self.next_seq += 1;
        Ok(())
    }

    /// Sends the open batch as one message, if any.
    pub async fn flush(&mut self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.buf.push(b']');
        let payload = Bytes::from(std::mem::take(&mut self.buf));
        self.opened_at = None;
        self.published = true;
        self.client.publish(self.subject.clone(), payload).await?;
        Ok(())
    }

    /// The `seq` the next frame gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Takes the open batch as a JSON array of frames (`None` when nothing is pending),
    /// keeping the numbering. A remote node hands its last frames to the worker this way:
    /// the worker sends them with `Done` once it recorded the terminal event.
    pub fn take_pending(&mut self) -> Option<Vec<u8>> {
        if self.buf.is_empty() {
            return None;
        }
        let mut batch = std::mem::take(&mut self.buf);
        batch.push(b']');
        self.opened_at = None;
        Some(batch)
    }

    /// Takes over frames another process numbered (a remote node): `pending`, a batch from
    /// [`FrameOut::take_pending`], goes out with the next flush; numbering goes on at
    /// `next_seq`; `published` says whether that process already sent some.
    pub fn adopt(&mut self, pending: Option<&[u8]>, next_seq: u64, published: bool) {
        self.buf.clear();
        self.opened_at = None;
        if let Some(open) = pending
            .and_then(|batch| batch.strip_suffix(b"]"))
            .filter(|open| open.len() > 1 && open.starts_with(b"["))
        {
            self.buf.extend_from_slice(open);
            self.opened_at = Some(Instant::now());
        }
        self.next_seq = next_seq.max(1);
        self.published = published;
    }

    /// Drops the open batch and its numbers: an attempt failed before anything was sent,
    /// and the next attempt starts the answer afresh.
    pub fn discard(&mut self) {
        if self.published {
            return;
        }
        self.buf.clear();
        self.opened_at = None;
        self.next_seq = 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::work::Frame;

    #[tokio::test]
    async fn batches_decode_as_frames() {
        // A client that never connected: publish only queues, so this runs without a server.
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect("127.0.0.1:1")
            .await
            .expect("lazy client");
        let mut out = FrameOut::new(client, Subject::from("t.chunks.x"));
        out.push(
            FrameKind::Chunk,
            &serde_json::json!({"choices": [{"delta": {"content": "a\"b"}}]}),
        )
        .expect("push");
        out.push(FrameKind::Done, &serde_json::json!({"x": 1}))
            .expect("push");
        let mut batch = out.buf.clone();
        batch.push(b']');
        let frames: Vec<Frame> = serde_json::from_slice(&batch).expect("frames");
        assert_eq!(frames.len(), 2);
        assert_eq!((frames[0].seq, frames[0].kind), (1, FrameKind::Chunk));
        assert_eq!((frames[1].seq, frames[1].kind), (2, FrameKind::Done));
        assert_eq!(
            frames[0].data.get(),
            r#"{"choices":[{"delta":{"content":"a\"b"}}]}"#
        );
        out.discard();
        assert!(!out.has_pending());
        out.push(FrameKind::Chunk, &1).expect("push");
        assert!(out.buf.starts_with(b"[{\"seq\":1,"));
    }

    #[tokio::test]
    async fn pending_frames_move_between_processes() {
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect("127.0.0.1:1")
            .await
            .expect("lazy client");
        let mut node = FrameOut::new(client.clone(), Subject::from("t.chunks.x"));
        node.push(FrameKind::Chunk, &1).expect("push");
        node.push(FrameKind::Response, &2).expect("push");
        let batch = node.take_pending().expect("pending");
        assert!(!node.has_pending());
        assert_eq!(node.next_seq(), 3);
        let frames: Vec<Frame> = serde_json::from_slice(&batch).expect("a frame array");
        assert_eq!(frames.len(), 2);

        let mut worker = FrameOut::new(client, Subject::from("t.chunks.x"));
        worker.adopt(Some(&batch), node.next_seq(), true);
        assert!(worker.published() && worker.has_pending());
        worker.push(FrameKind::Done, &3).expect("push");
        let mut all = worker.buf.clone();
        all.push(b']');
        let frames: Vec<Frame> = serde_json::from_slice(&all).expect("frames");
        let seqs: Vec<u64> = frames.iter().map(|f| f.seq).collect();
        assert_eq!(seqs, [1, 2, 3]);

        worker.adopt(None, 7, false);
        assert!(!worker.has_pending() && !worker.published());
        assert_eq!(worker.next_seq(), 7);
    }
}
