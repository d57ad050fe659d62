//! One call on a node: its local provider is called through the worker's adapters, the
//! answer relayed as frames on the request's chunk subject by the worker's relay and frame
//! code, and the outcome summed up as a [`NodeEnd`] for the worker that called.
//!
//! The node writes no event and never sends `Done` or `Error`: it holds back the last
//! frames and hands them to the worker, which sends them after recording the terminal
//! event (see `super` for the whole protocol).

use std::time::Duration;

use chrono::Utc;
use router::Channel;
use schemas::work::{ErrorKind, FrameKind};
use schemas::{Usage, UsageSource};
use serde_json::value::RawValue;
use tokio::time::{sleep_until, Instant};

use super::protocol::{EndOutcome, NodeCall, NodeEnd, WireError, PROVIDER};
use super::serve::NodeCtx;
use crate::adapters::{Adapter, Reply, RequestBody, UpstreamError, UpstreamRequest};
use crate::cancel::Signal;
use crate::estimate;
use crate::frames::FrameOut;
use crate::relay::{self, Limits, RelayEnd};
use crate::tally::{Rewriter, Tally};
use crate::translate::{self, Outbound};

/// How long a finished stream's connection may take to reach EOF before it is dropped.
const RELEASE_LIMIT: Duration = Duration::from_millis(100);

/// What one call produced, before it becomes a [`NodeEnd`].
struct Served<'a> {
    call: &'a NodeCall,
    /// The provider's model name.
    local: &'a str,
    accepted_at: Instant,
    frames: FrameOut,
    tally: Tally,
}

/// Serves `call` on `channel` (one of the node's providers). `stop` is set when the worker
/// asks, or when it is gone; `ctx.abort` when the node shuts down past its grace period.
pub(super) async fn serve(
    ctx: &NodeCtx,
    call: &NodeCall,
    channel: &Channel,
    stop: &Signal,
    accepted_at: Instant,
) -> NodeEnd {
    let item = &call.item;
    let local = channel.upstream_model(&item.model);
    let mut served = Served {
        call,
        local,
        accepted_at,
        frames: FrameOut::new(
            ctx.nats.clone(),
            ctx.ns.chunk_subject(&item.request_id).into(),
        ),
        tally: Tally::default(),
    };
    // A Responses request becomes a chat request here, as in the worker.
    let translated = match translate::inbound(item) {
        Ok(translated) => translated,
        Err(e) => return served.failed(UpstreamError::translation(PROVIDER, e)),
    };
    let raw = translated.as_deref().unwrap_or(&item.body);
    let Ok(body) = RequestBody::parse(raw) else {
        return served.failed(UpstreamError::new(
            PROVIDER,
            ErrorKind::BadRequest,
            "the request body must be a JSON object",
        ));
    };
    let channel_limits = ctx.opts.limits_for(channel);
    let http = ctx.connect_clients.get(channel_limits.connect, &ctx.http);
    let adapter = match Adapter::for_channel(channel, &http) {
        Ok(adapter) => adapter,
        Err(e) => {
            return served.failed(UpstreamError::new(
                PROVIDER,
                ErrorKind::Internal,
                e.to_string(),
            ))
        }
    };
    let left = (item.deadline - Utc::now()).to_std().unwrap_or_default();
    let started = Instant::now();
    let limits = Limits {
        deadline: started + left,
        started,
        first_token: channel_limits.first_token,
        idle: channel_limits.idle,
        total: channel_limits.total,
        window: ctx.opts.coalesce_window,
    };
    let req = UpstreamRequest {
        body: &body,
        upstream_model: local,
        stream: item.stream,
        api: translate::adapter_api(item.api),
        forward_headers: &item.forward_headers,
    };
    let until = if item.stream {
        limits.silent_until(false, started)
    } else {
        limits.end()
    };
    let reply = tokio::select! {
        biased;
        () = ctx.abort.cancelled() => return served.stopped(None),
        () = stop.cancelled() => return served.stopped(None),
        reply = adapter.send(channel, req) => reply,
        () = sleep_until(until) => Err(relay::timeout(adapter.provider(), limits, false, Instant::now())),
    };
    let rewriter = Rewriter {
        client_model: &item.model,
        include_usage: item.include_usage,
    };
    let mut outbound = Outbound::new(item.api, adapter.speaks(item.api), &item.model);
    match reply {
        Err(e) => served.failed(e),
        Ok(Reply::Stream(mut stream)) if item.stream => {
            let relayed = relay::relay(
                &mut stream,
                &mut served.frames,
                rewriter,
                &mut outbound,
                &mut served.tally,
                limits,
                relay::Interrupts {
                    abort: &ctx.abort,
                    cancel: stop,
                },
            )
            .await;
            match relayed {
                Ok(RelayEnd::Finished) => {
                    let end = served.finished(rewriter, Last::Stream(&mut outbound));
                    stream.release(RELEASE_LIMIT).await;
                    end
                }
                Ok(RelayEnd::Failed(e)) => served.failed(e),
                Ok(RelayEnd::Aborted | RelayEnd::Cancelled) => {
                    served.stopped(Some((rewriter, &mut outbound)))
                }
                Err(e) => served.failed(UpstreamError::new(
                    PROVIDER,
                    ErrorKind::Connection,
                    format!("the node cannot publish frames: {e}"),
                )),
            }
        }
        Ok(Reply::Complete(mut body)) if !item.stream => {
            outbound.response(&mut body, rewriter, &mut served.tally);
            // For a plain answer the first token reaches the client with the whole body.
            served
                .tally
                .first_content_at
                .get_or_insert_with(Instant::now);
            served.finished(rewriter, Last::Body(body, &outbound))
        }
        Ok(_) => served.failed(UpstreamError::new(
            adapter.provider(),
            ErrorKind::Internal,
            "the adapter answered in the wrong shape (stream for a plain request, or the reverse)",
        )),
    }
}

/// How an answer's last frames are made.
enum Last<'o> {
    /// The stream's closing frames, from its encoder.
    Stream(&'o mut Outbound),
    /// A plain answer's whole body, in the client's format.
    Body(serde_json::Value, &'o Outbound),
}

impl Served<'_> {
    fn usage(&self) -> (Usage, UsageSource) {
        estimate::usage_of(&self.tally, self.local, &self.call.item.body)
    }

    /// The answer is complete: its last frames (closing chunks, or the plain body) are
    /// numbered and held back for the worker.
    fn finished(mut self, rewriter: Rewriter<'_>, last: Last<'_>) -> NodeEnd {
        let (usage, source) = self.usage();
        let estimated = source == UsageSource::Estimated;
        let item = &self.call.item;
        let pushed = match last {
            Last::Stream(outbound) => {
                outbound.finish(rewriter, &self.tally, &usage, estimated, &mut self.frames)
            }
            Last::Body(body, outbound) => {
                let body = outbound.final_body(body, &item.model, &usage, estimated);
                self.frames.push(FrameKind::Response, &body)
            }
        };
        if let Err(e) = pushed {
            tracing::error!(request_id = %item.request_id, error = %e, "cannot encode the answer's last frames");
        }
        self.end(EndOutcome::Finished, Some((usage, source)))
    }

    /// The provider failed. What was already relayed is sent (the client may have seen it:
    /// the worker cannot fail over), otherwise nothing is, and the worker may.
    fn failed(mut self, e: UpstreamError) -> NodeEnd {
        if !self.frames.published() {
            self.frames.discard();
            return self.end(EndOutcome::Failed(WireError::from(&e)), None);
        }
        // Chunks still held back go out with the worker's error frame, before it.
        let usage = self.usage();
        self.end(EndOutcome::Failed(WireError::from(&e)), Some(usage))
    }

    /// Stopped before the end. After content, the API's closing frames are held back so
    /// the worker can end the stream cleanly; the prompt was sent either way, so the usage
    /// so far goes back to be billed.
    fn stopped(mut self, encoder: Option<(Rewriter<'_>, &mut Outbound)>) -> NodeEnd {
        let usage = self.usage();
        if !self.frames.published() {
            self.frames.discard();
        } else if let Some((rewriter, outbound)) = encoder {
            let estimated = usage.1 == UsageSource::Estimated;
            if let Err(e) =
                outbound.finish(rewriter, &self.tally, &usage.0, estimated, &mut self.frames)
            {
                tracing::error!(request_id = %self.call.item.request_id, error = %e, "cannot encode a stopped stream's closing frames");
            }
        }
        self.end(EndOutcome::Stopped, Some(usage))
    }

    fn end(mut self, outcome: EndOutcome, usage: Option<(Usage, UsageSource)>) -> NodeEnd {
        let pending = self
            .frames
            .take_pending()
            .and_then(|batch| String::from_utf8(batch).ok())
            .and_then(|batch| RawValue::from_string(batch).ok());
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let item = &self.call.item;
        NodeEnd {
            outcome,
            published: self.frames.published(),
            next_seq: self.frames.next_seq(),
            pending,
            usage: usage.map(|(u, _)| u),
            usage_source: usage.map(|(_, s)| s),
            finish_reason: self.tally.finish_reason.clone(),
            first_content_ms: self
                .tally
                .first_content_at
                .map(|t| ms(t.saturating_duration_since(self.accepted_at))),
            content: item.session_id.map(|_| self.tally.content()),
        }
    }
}
