//! The attempts of one request: calling channels in the router's order, relaying the
//! answer, and deciding after each failure whether another channel may still help.

use router::Attempt;
use schemas::events::{AttemptFailed, AttemptStarted};
use schemas::work::{ApiErrorInfo, ErrorKind};
use schemas::Event;
use tokio::time::{sleep_until, Instant};
use uuid::Uuid;

use super::backoff;
use super::outcome::{error_info, exhausted, passthrough};
use super::{Disposition, Request};
use crate::adapters::{Adapter, ChunkStream, Reply, RequestBody, UpstreamError, UpstreamRequest};
use crate::estimate;
use crate::frames::FrameError;
use crate::relay::{self, Limits, RelayEnd};
use crate::tally::{Rewriter, Tally};
use crate::translate::Outbound;

/// A successful attempt's answer, before its last frames are sent.
pub(super) enum Answer {
    /// Relayed; the stream is kept to release its connection at the end, the encoder to
    /// write the client's closing frames.
    Stream(ChunkStream, Outbound),
    /// The whole body, sent (in the client's format) after the completion is recorded.
    Complete(serde_json::Value, Outbound),
    /// Relayed by a remote node, which left its last frames pending in the `FrameOut`.
    Relayed,
    /// A stream request's whole answer, already pushed as chunks (`whole`); the encoder
    /// writes the client's closing frames.
    Whole(Outbound),
}

/// How one attempt ended.
pub(super) enum AttemptEnd {
    Done(Answer),
    Failed(UpstreamError),
    Aborted,
    /// Frames could not be published: the NATS connection is gone.
    Lost(FrameError),
    /// Cancelled through `<ns>.cancel.<request_id>`; the upstream call is already dropped.
    /// Carries the client-side encoder once the answer had started streaming, to close it.
    Cancelled(Option<Outbound>),
}

impl<'a> Request<'a> {
    pub(super) async fn attempt_all(
        &mut self,
        plan: &[Attempt],
        body: &RequestBody<'_>,
    ) -> Disposition {
        let mut last_error: Option<UpstreamError> = None;
        let mut unsupported: Option<Uuid> = None;
        // The channel that failed last and how many retries it has had since.
        let mut failed_on: Option<(Uuid, u32)> = None;
        for attempt in plan {
            if unsupported == Some(attempt.channel.id) {
                continue;
            }
            // Whether this attempt is the stream's one retry without streaming (`whole`).
            let mut whole = false;
            match (failed_on, &last_error) {
                (Some((channel, retries)), Some(e)) if channel == attempt.channel.id => {
                    failed_on = Some((channel, retries + 1));
                    whole = self.stream_broke && !self.whole_retried;
                    match backoff::before_retry(e, retries + 1, &self.ctx.opts) {
                        backoff::Retry::Now => {}
                        backoff::Retry::NextChannel => continue,
                        backoff::Retry::After(wait) => match self.back_off(attempt, wait).await {
                            Ok(true) => {}
                            Ok(false) => continue,
                            Err(disposition) => return disposition,
                        },
                    }
                }
                _ => failed_on = None,
            }
            if Instant::now() >= self.deadline {
                break;
            }
            if self.cancel.is_cancelled() {
                self.cancelled(None, None).await;
                return Disposition::Ack;
            }
            if !self.may_try(attempt).await {
                continue;
            }
            self.attempts += 1;
            self.events
                .emit(Event::AttemptStarted(AttemptStarted {
                    request_id: self.item.request_id,
                    attempt: self.attempts,
                    channel_id: attempt.channel.id,
                    channel_name: attempt.channel.name.clone(),
                    upstream_model: attempt.upstream_model.clone(),
                }))
                .await;
            let connect = self.ctx.opts.limits_for(&attempt.channel).connect;
            let http = self.ctx.connect_clients.get(connect, &self.ctx.http);
            let is_node = attempt.channel.channel_type == crate::node::CHANNEL_TYPE;
            let adapter = match Adapter::for_channel(&attempt.channel, &http) {
                Ok(adapter) => Some(adapter),
                // A remote node is called over NATS (`handler::node`), not by an adapter.
                Err(_) if is_node => None,
                Err(e) => {
                    // A configuration problem of this channel, not of the request: skip
                    // the channel (all its retries) and go on with the next one.
                    let e = UpstreamError::new("router", ErrorKind::Internal, e.to_string());
                    self.attempt_failed(attempt, &e).await;
                    unsupported = Some(attempt.channel.id);
                    last_error = Some(e);
                    continue;
                }
            };
            let req = UpstreamRequest {
                body,
                upstream_model: &attempt.upstream_model,
                stream: self.item.stream,
                api: crate::translate::adapter_api(self.item.api),
                forward_headers: &self.item.forward_headers,
            };
            let mut tally = Tally::default();
            let in_flight = attempt.health.start();
            self.stream_broke = false;
            let end = match &adapter {
                None => self.node_attempt(attempt, &mut tally).await,
                Some(adapter) if self.item.stream && whole => {
                    self.whole_retried = true;
                    self.whole_attempt(adapter, attempt, req, &mut tally).await
                }
                Some(adapter) if self.item.stream => {
                    self.stream_attempt(adapter, attempt, req, &mut tally).await
                }
                Some(adapter) => {
                    self.complete_attempt(adapter, attempt, req, &mut tally)
                        .await
                }
            };
            drop(in_flight);
            match end {
                AttemptEnd::Done(answer) => {
                    self.channel_answered(attempt).await;
                    self.finish(attempt, &tally, answer).await;
                    return Disposition::Ack;
                }
                AttemptEnd::Aborted => return Disposition::Nak(None),
                AttemptEnd::Cancelled(outbound) => {
                    self.cancelled(Some((attempt, &tally)), outbound).await;
                    return Disposition::Ack;
                }
                AttemptEnd::Lost(e) => {
                    tracing::error!(request_id = %self.item.request_id, error = %e, "cannot publish frames; handing the request back");
                    return Disposition::Nak(None);
                }
                AttemptEnd::Failed(e) => {
                    self.attempt_failed(attempt, &e).await;
                    if self.frames.published() {
                        // The client saw part of the answer: no failover, bill what was made.
                        let usage =
                            estimate::usage_of(&tally, &attempt.upstream_model, &self.item.body);
                        let info = ApiErrorInfo {
                            status: e.kind.status(),
                            kind: e.kind,
                            message: format!("the answer broke off: {e}"),
                            code: None,
                            param: None,
                            retry_after: None,
                        };
                        self.fail(info, Some(attempt.channel.id), Some(usage)).await;
                        return Disposition::Ack;
                    }
                    if !e.kind.retryable() {
                        self.fail(passthrough(&e), Some(attempt.channel.id), None)
                            .await;
                        return Disposition::Ack;
                    }
                    self.frames.discard();
                    if failed_on.is_none() {
                        failed_on = Some((attempt.channel.id, 0));
                    }
                    last_error = Some(e);
                }
            }
        }
        let info = match &last_error {
            Some(e) => exhausted(self.attempts, e),
            None => error_info(
                ErrorKind::Timeout,
                "the request's deadline passed before an upstream answered",
            ),
        };
        self.fail(info, None, None).await;
        Disposition::Ack
    }

    /// Calls the upstream until its answer starts, racing the given limit and the abort.
    pub(super) async fn call(
        &self,
        adapter: &Adapter,
        attempt: &Attempt,
        req: UpstreamRequest<'_>,
        limits: Limits,
    ) -> Result<Reply, AttemptEnd> {
        // A stream's headers count against its first token; a plain answer has only its
        // total limit (a long generation arrives in one piece).
        let until = if req.stream {
            limits.silent_until(false, limits.started)
        } else {
            limits.end()
        };
        tokio::select! {
            biased;
            () = self.ctx.abort.cancelled() => Err(AttemptEnd::Aborted),
            () = self.cancel.cancelled() => Err(AttemptEnd::Cancelled(None)),
            reply = adapter.send(&attempt.channel, req) => reply.map_err(AttemptEnd::Failed),
            () = sleep_until(until) => Err(AttemptEnd::Failed(relay::timeout(adapter.provider(), limits, false, Instant::now()))),
        }
    }

    /// The limits of an attempt on `channel` starting now.
    pub(super) fn limits(&self, channel: &router::Channel) -> Limits {
        let c = self.ctx.opts.limits_for(channel);
        Limits {
            deadline: self.deadline,
            started: Instant::now(),
            first_token: c.first_token,
            idle: c.idle,
            total: c.total,
            window: self.ctx.opts.coalesce_window,
        }
    }

    pub(super) fn rewriter(&self) -> Rewriter<'a> {
        Rewriter {
            client_model: &self.item.model,
            include_usage: self.item.include_usage,
        }
    }

    async fn stream_attempt(
        &mut self,
        adapter: &Adapter,
        attempt: &Attempt,
        req: UpstreamRequest<'_>,
        tally: &mut Tally,
    ) -> AttemptEnd {
        let limits = self.limits(&attempt.channel);
        let mut stream = match self.call(adapter, attempt, req, limits).await {
            Ok(Reply::Stream(stream)) => stream,
            Ok(Reply::Complete(_)) => {
                return AttemptEnd::Failed(UpstreamError::new(
                    adapter.provider(),
                    ErrorKind::Internal,
                    "the adapter answered a stream request without a stream",
                ))
            }
            Err(end) => {
                // No first token (not even the response head) within the limit: the stream
                // broke before any content. An error status is the upstream's answer, not that.
                self.stream_broke =
                    matches!(&end, AttemptEnd::Failed(e) if e.kind == ErrorKind::Timeout);
                return end;
            }
        };
        let rewriter = self.rewriter();
        let mut outbound = Outbound::new(
            self.item.api,
            adapter.speaks(self.item.api),
            &self.item.model,
        );
        match relay::relay(
            &mut stream,
            &mut self.frames,
            rewriter,
            &mut outbound,
            tally,
            limits,
            relay::Interrupts {
                abort: &self.ctx.abort,
                cancel: &self.cancel,
            },
        )
        .await
        {
            Ok(RelayEnd::Finished) => AttemptEnd::Done(Answer::Stream(stream, outbound)),
            Ok(RelayEnd::Failed(e)) => {
                // The stream started and died (cut, error event, silence) before content.
                self.stream_broke = !tally.has_content();
                AttemptEnd::Failed(e)
            }
            Ok(RelayEnd::Aborted) => AttemptEnd::Aborted,
            Ok(RelayEnd::Cancelled) => AttemptEnd::Cancelled(Some(outbound)),
            Err(e) => AttemptEnd::Lost(e),
        }
    }

    async fn complete_attempt(
        &mut self,
        adapter: &Adapter,
        attempt: &Attempt,
        req: UpstreamRequest<'_>,
        tally: &mut Tally,
    ) -> AttemptEnd {
        let limits = self.limits(&attempt.channel);
        let mut body = match self.call(adapter, attempt, req, limits).await {
            Ok(Reply::Complete(body)) => body,
            Ok(Reply::Stream(_)) => {
                return AttemptEnd::Failed(UpstreamError::new(
                    adapter.provider(),
                    ErrorKind::Internal,
                    "the adapter answered a plain request with a stream",
                ))
            }
            Err(end) => return end,
        };
        let outbound = Outbound::new(
            self.item.api,
            adapter.speaks(self.item.api),
            &self.item.model,
        );
        outbound.response(&mut body, self.rewriter(), tally);
        // For a plain answer the first token reaches the client with the whole body.
        tally.first_content_at.get_or_insert_with(Instant::now);
        AttemptEnd::Done(Answer::Complete(body, outbound))
    }

    async fn attempt_failed(&self, attempt: &Attempt, e: &UpstreamError) {
        crate::metrics::upstream_error(&attempt.channel.name, e.kind);
        tracing::info!(request_id = %self.item.request_id, channel = %attempt.channel.name, attempt = self.attempts, kind = ?e.kind, status = ?e.status, error = %e, "attempt failed");
        self.events
            .emit(Event::AttemptFailed(AttemptFailed {
                request_id: self.item.request_id,
                attempt: self.attempts,
                channel_id: attempt.channel.id,
                kind: e.kind,
                status: e.status,
                message: e.message.clone(),
            }))
            .await;
        self.channel_failed(attempt, e).await;
    }
}
