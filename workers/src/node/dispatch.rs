//! The worker's side of a call to a node: hand the attempt over, listen to the node while
//! it serves, and turn its report into the request's frames and tally, so the handler
//! ends the request as for any channel (see `super` for the protocol).

use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use router::Channel;
use schemas::work::{ErrorKind, Frame, WorkItem};
use schemas::{Namespace, UsageSource};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::protocol::{CallReply, EndOutcome, NodeCallOut, NodeEnd, NodeMsg, PROVIDER};
use super::SILENCE;
use crate::adapters::UpstreamError;
use crate::cancel::Signal;
use crate::frames::FrameOut;
use crate::tally::Tally;

/// How long the node may take to accept or refuse a call.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a node gets to report after it was asked to stop.
const STOP_WAIT: Duration = Duration::from_secs(2);
/// `seq` to number after when a node went silent and the stored frames cannot be read:
/// above anything the node can have sent, so the error frame is never taken for a
/// duplicate by the ingress.
const UNKNOWN_LAST_SEQ: u64 = 1 << 32;

/// What a node call needs from the worker.
pub(crate) struct Dispatch<'a> {
    pub nats: &'a async_nats::Client,
    pub ns: &'a Namespace,
    /// `<NS>_CHUNKS`, read to learn what a lost node published.
    pub chunks: &'a jetstream::stream::Stream,
    pub abort: &'a CancellationToken,
    pub cancel: &'a Signal,
}

/// How a node call ended. The frames and tally are updated in every case: what the node
/// published (no failover after it), its held-back frames, usage and finish reason.
#[derive(Debug)]
pub(crate) enum DispatchEnd {
    /// Answered; the last frames are pending in the `FrameOut`.
    Done,
    Failed(UpstreamError),
    /// The worker is shutting down past its grace period; the node was stopped.
    Aborted,
    /// The request was cancelled; the node was stopped.
    Cancelled,
}

/// Why the worker stopped a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopWhy {
    Aborted,
    Cancelled,
    Deadline,
}

impl Dispatch<'_> {
    /// Runs one attempt of `item` on the node `node` (its router channel).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn call(
        &self,
        node: &Channel,
        upstream_model: &str,
        item: &WorkItem,
        frames: &mut FrameOut,
        tally: &mut Tally,
        deadline: Instant,
    ) -> DispatchEnd {
        let call_id = Uuid::now_v7();
        let lost = |message: String| {
            DispatchEnd::Failed(UpstreamError::new(PROVIDER, ErrorKind::Connection, message))
        };
        // Subscribed before the call goes out, on the same connection: nothing the node
        // sends can arrive before the subscription.
        let result_subject = self.ns.node_result_subject(&node.id, &call_id);
        let mut results = match self.nats.subscribe(result_subject).await {
            Ok(sub) => sub,
            Err(e) => return lost(format!("cannot listen for node `{}`: {e}", node.name)),
        };
        let payload = match serde_json::to_vec(&NodeCallOut {
            call_id,
            upstream_model,
            item,
        }) {
            Ok(payload) => payload,
            Err(e) => {
                return DispatchEnd::Failed(UpstreamError::new(
                    PROVIDER,
                    ErrorKind::Internal,
                    format!("cannot encode the call: {e}"),
                ))
            }
        };
        let sent_at = Instant::now();
        let request = async_nats::Request::new()
            .payload(payload.into())
            .timeout(Some(
                ACCEPT_TIMEOUT.min(deadline.saturating_duration_since(sent_at)),
            ));
        let answer = tokio::select! {
            biased;
            () = self.abort.cancelled() => Err(StopWhy::Aborted),
            () = self.cancel.cancelled() => Err(StopWhy::Cancelled),
            answer = self.nats.send_request(self.ns.node_call_subject(&node.id), request) => Ok(answer),
        };
        let refused = match answer {
            Err(why) => {
                // The node may have taken the call just now: make sure it stops.
                self.stop(node, call_id).await;
                return match why {
                    StopWhy::Cancelled => DispatchEnd::Cancelled,
                    _ => DispatchEnd::Aborted,
                };
            }
            Ok(Ok(msg)) => match serde_json::from_slice::<CallReply>(&msg.payload) {
                Ok(CallReply::Accepted) => None,
                Ok(CallReply::Refused(e)) => Some(e.into_upstream()),
                Err(e) => Some(UpstreamError::new(
                    PROVIDER,
                    ErrorKind::Upstream5xx,
                    format!("node `{}` answered the call unreadably: {e}", node.name),
                )),
            },
            Ok(Err(e)) => {
                self.stop(node, call_id).await;
                let message = match e.kind() {
                    async_nats::RequestErrorKind::NoResponders => {
                        format!("node `{}` is gone", node.name)
                    }
                    async_nats::RequestErrorKind::TimedOut => format!(
                        "node `{}` did not take the call within {} s",
                        node.name,
                        ACCEPT_TIMEOUT.as_secs()
                    ),
                    _ => format!("calling node `{}` failed: {e}", node.name),
                };
                Some(UpstreamError::new(PROVIDER, ErrorKind::Connection, message))
            }
        };
        if let Some(e) = refused {
            return DispatchEnd::Failed(e);
        }

        let mut last_heard = Instant::now();
        let mut stopping: Option<(StopWhy, Instant)> = None;
        loop {
            let wake = match stopping {
                Some((_, until)) => until,
                None => (last_heard + SILENCE).min(deadline),
            };
            tokio::select! {
                biased;
                () = self.abort.cancelled(), if stopping.is_none() => {
                    self.stop(node, call_id).await;
                    stopping = Some((StopWhy::Aborted, Instant::now() + STOP_WAIT));
                }
                () = self.cancel.cancelled(), if stopping.is_none() => {
                    self.stop(node, call_id).await;
                    stopping = Some((StopWhy::Cancelled, Instant::now() + STOP_WAIT));
                }
                msg = results.next() => {
                    let Some(msg) = msg else {
                        let end = lost(format!("lost the connection while node `{}` was serving", node.name));
                        return self.after_loss(item, frames, end).await;
                    };
                    last_heard = Instant::now();
                    if let Some(reply) = msg.reply.clone() {
                        // Answering tells the node its worker is still here.
                        if let Err(e) = self.nats.publish(reply, bytes::Bytes::new()).await {
                            tracing::debug!(error = %e, "answering a node's report failed");
                        }
                    }
                    match serde_json::from_slice::<NodeMsg>(&msg.payload) {
                        Ok(NodeMsg::Alive) => {}
                        Ok(NodeMsg::End(end)) => {
                            let why = stopping.map(|(why, _)| why);
                            return self.ended(node, *end, frames, tally, sent_at, why);
                        }
                        Err(e) => {
                            tracing::warn!(node = %node.name, error = %e, "undecodable message from a node; ignored");
                        }
                    }
                }
                () = sleep_until(wake) => {
                    if let Some((why, _)) = stopping {
                        tracing::warn!(node = %node.name, request_id = %item.request_id, "a stopped node call did not report");
                        let end = match why {
                            StopWhy::Aborted => DispatchEnd::Aborted,
                            StopWhy::Cancelled => DispatchEnd::Cancelled,
                            StopWhy::Deadline => deadline_passed(),
                        };
                        return self.after_loss(item, frames, end).await;
                    }
                    if Instant::now() >= deadline {
                        self.stop(node, call_id).await;
                        stopping = Some((StopWhy::Deadline, Instant::now() + STOP_WAIT));
                        continue;
                    }
                    // Nothing for SILENCE: the node died or lost NATS. Stop it in case it
                    // is only cut off, so it cannot go on publishing after a failover.
                    self.stop(node, call_id).await;
                    let end = lost(format!(
                        "node `{}` stopped answering for {} s while serving the request",
                        node.name,
                        SILENCE.as_secs()
                    ));
                    return self.after_loss(item, frames, end).await;
                }
            }
        }
    }

    /// Asks the node to stop a call. Best effort: a node that cannot hear it loses its
    /// worker's keepalive answers and stops by itself.
    async fn stop(&self, node: &Channel, call_id: Uuid) {
        let subject = self.ns.node_stop_subject(&node.id, &call_id);
        if let Err(e) = self.nats.publish(subject, bytes::Bytes::new()).await {
            tracing::debug!(error = %e, "asking a node to stop a call failed");
        }
    }

    /// Applies the node's report.
    fn ended(
        &self,
        node: &Channel,
        end: NodeEnd,
        frames: &mut FrameOut,
        tally: &mut Tally,
        sent_at: Instant,
        stopping: Option<StopWhy>,
    ) -> DispatchEnd {
        let pending = match &end.pending {
            Some(batch) if !valid_batch(batch.get(), end.next_seq) => {
                tracing::error!(node = %node.name, "a node handed over malformed frames; they are dropped");
                None
            }
            Some(batch) => Some(batch.get().as_bytes()),
            None => None,
        };
        frames.adopt(pending, end.next_seq, end.published);
        match (end.usage, end.usage_source) {
            (Some(usage), Some(UsageSource::Provider)) => tally.usage = Some(usage),
            (Some(usage), _) => tally.estimated = Some(usage),
            (None, _) => {}
        }
        if let Some(content) = &end.content {
            tally.note_remote_content(content);
        }
        tally.finish_reason = end.finish_reason;
        tally.first_content_at = end
            .first_content_ms
            .map(|ms| sent_at + Duration::from_millis(ms));
        match (end.outcome, stopping) {
            (EndOutcome::Finished, _) => DispatchEnd::Done,
            (EndOutcome::Failed(e), _) => DispatchEnd::Failed(e.into_upstream()),
            (EndOutcome::Stopped, Some(StopWhy::Aborted)) => DispatchEnd::Aborted,
            (EndOutcome::Stopped, Some(StopWhy::Cancelled)) => DispatchEnd::Cancelled,
            (EndOutcome::Stopped, Some(StopWhy::Deadline)) => deadline_passed(),
            (EndOutcome::Stopped, None) => DispatchEnd::Failed(UpstreamError::new(
                PROVIDER,
                ErrorKind::Connection,
                format!(
                    "node `{}` stopped the call (it is shutting down)",
                    node.name
                ),
            )),
        }
    }

    /// The node can no longer report: learn from the stored chunks whether it published
    /// anything. Its frames reached NATS before its end, so by now they are stored: if
    /// none are, nothing reached the client and the request may fail over.
    async fn after_loss(
        &self,
        item: &WorkItem,
        frames: &mut FrameOut,
        end: DispatchEnd,
    ) -> DispatchEnd {
        let subject = self.ns.chunk_subject(&item.request_id);
        let last_seq = match self
            .chunks
            .direct_get_last_for_subject(subject.as_str())
            .await
        {
            Ok(msg) => match serde_json::from_slice::<Vec<Frame>>(&msg.payload) {
                Ok(batch) => batch.last().map_or(UNKNOWN_LAST_SEQ, |f| f.seq),
                Err(_) => UNKNOWN_LAST_SEQ,
            },
            Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => 0,
            Err(e) => {
                tracing::warn!(request_id = %item.request_id, error = %e, "cannot read what a lost node published; assuming it did");
                UNKNOWN_LAST_SEQ
            }
        };
        if last_seq > 0 {
            frames.continue_after(last_seq);
        } else {
            frames.adopt(None, 1, false);
        }
        end
    }
}

fn deadline_passed() -> DispatchEnd {
    DispatchEnd::Failed(UpstreamError::new(
        PROVIDER,
        ErrorKind::Timeout,
        "the request's deadline passed before the node finished",
    ))
}

/// Whether `batch` is a JSON array of frames numbered consecutively up to `next_seq - 1`.
fn valid_batch(batch: &str, next_seq: u64) -> bool {
    let Ok(frames) = serde_json::from_str::<Vec<Frame>>(batch) else {
        return false;
    };
    let Some(first) = frames.first() else {
        return false;
    };
    first.seq >= 1
        && frames
            .iter()
            .enumerate()
            .all(|(i, f)| f.seq == first.seq + i as u64)
        && first.seq + frames.len() as u64 == next_seq
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_back_frames_must_continue_the_numbering() {
        let ok = r#"[{"seq":4,"kind":"chunk","data":{}},{"seq":5,"kind":"response","data":1}]"#;
        assert!(valid_batch(ok, 6));
        assert!(!valid_batch(ok, 7), "a gap before the next frame");
        assert!(!valid_batch("[]", 1), "empty");
        assert!(!valid_batch(
            r#"[{"seq":4,"kind":"chunk","data":{}},{"seq":6,"kind":"chunk","data":{}}]"#,
            7
        ));
        assert!(!valid_batch(r#"{"seq":1}"#, 2), "not an array");
        assert!(
            !valid_batch(r#"[{"seq":0,"kind":"chunk","data":{}}]"#, 1),
            "seq starts at 1"
        );
    }
}
