//! How a request ends: the terminal event first (awaited until stored), then the last
//! frames with `Done` or `Error` in one message.

use std::time::Duration;

use router::Attempt;
use schemas::events::{CompletionFinished, RequestCancelled, RequestFailed};
use schemas::work::{ApiErrorInfo, DoneData, ErrorKind, FrameKind, FINISH_CANCELLED};
use schemas::{Event, Usage, UsageSource};
use serde::Serialize;
use uuid::Uuid;

use super::attempt::Answer;
use super::Request;
use crate::adapters::UpstreamError;
use crate::estimate;
use crate::tally::Tally;
use crate::translate::Outbound;

/// How long a finished stream's connection may take to reach EOF before it is dropped.
const RELEASE_LIMIT: Duration = Duration::from_millis(100);

impl Request<'_> {
    /// Records the completion, then sends the last frames with `Done`. When the provider
    /// reported no usage, the client still gets it where OpenAI would put it (the body's
    /// `usage`, or the usage chunk it asked for), from the estimate.
    pub(super) async fn finish(&mut self, attempt: &Attempt, tally: &Tally, answer: Answer) {
        let (usage, usage_source) =
            estimate::usage_of(tally, &attempt.upstream_model, &self.item.body);
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.events
            .record(Event::CompletionFinished(CompletionFinished {
                request_id: self.item.request_id,
                key_id: self.item.key_id,
                user_id: self.item.user_id,
                model: self.item.model.clone(),
                channel_id: attempt.channel.id,
                channel_name: attempt.channel.name.clone(),
                upstream_model: attempt.upstream_model.clone(),
                usage,
                usage_source,
                finish_reason: tally.finish_reason.clone(),
                ttft_ms: tally.first_content_at.map(|t| ms(t - self.taken_at)),
                duration_ms: ms(self.taken_at.elapsed()),
                attempts: self.attempts,
                // Only a session's turn keeps its text: it is the conversation's history.
                session_id: self.item.session_id,
                content: self.item.session_id.map(|_| tally.content()),
            }))
            .await;
        crate::metrics::finished(&self.item.model, attempt, tally, self.taken_at, &usage);
        let estimated = usage_source == UsageSource::Estimated;
        let (pushed, stream) = match answer {
            Answer::Complete(body, outbound) => {
                let body = outbound.final_body(body, &self.item.model, &usage, estimated);
                (self.frames.push(FrameKind::Response, &body), None)
            }
            Answer::Stream(stream, mut outbound) => {
                let rewriter = self.rewriter();
                let pushed = outbound.finish(rewriter, tally, &usage, estimated, &mut self.frames);
                (pushed, Some(stream))
            }
            Answer::Whole(mut outbound) => {
                let rewriter = self.rewriter();
                let pushed = outbound.finish(rewriter, tally, &usage, estimated, &mut self.frames);
                (pushed, None)
            }
            Answer::Relayed => (Ok(()), None),
        };
        if let Err(e) = pushed {
            tracing::error!(request_id = %self.item.request_id, error = %e, "cannot encode the answer's last frames");
        }
        let done = DoneData {
            usage,
            usage_source,
            finish_reason: tally.finish_reason.clone(),
        };
        self.send_last(FrameKind::Done, &done).await;
        if let Some(stream) = stream {
            stream.release(RELEASE_LIMIT).await;
        }
    }

    /// Records the failure, then sends the last frames with `Error`.
    pub(super) async fn fail(
        &mut self,
        info: ApiErrorInfo,
        channel_id: Option<Uuid>,
        usage: Option<(Usage, UsageSource)>,
    ) {
        if info.kind.retryable() || matches!(info.kind, ErrorKind::WorkerLost | ErrorKind::Internal)
        {
            tracing::warn!(request_id = %self.item.request_id, kind = ?info.kind, status = info.status, message = %info.message, "request failed");
        } else {
            tracing::debug!(request_id = %self.item.request_id, kind = ?info.kind, status = info.status, message = %info.message, "request failed");
        }
        self.events
            .record(Event::RequestFailed(RequestFailed {
                request_id: self.item.request_id,
                key_id: self.item.key_id,
                user_id: self.item.user_id,
                model: self.item.model.clone(),
                kind: info.kind,
                status: info.status,
                message: info.message.clone(),
                attempts: self.attempts,
                channel_id,
                usage: usage.map(|(u, _)| u),
                usage_source: usage.map(|(_, s)| s),
            }))
            .await;
        crate::metrics::failed(&self.item.model, &self.ctx.channels, channel_id, &info);
        self.send_last(FrameKind::Error, &info).await;
    }

    /// Records `RequestCancelled` with the usage made so far, then ends the client's stream.
    /// `served`: the attempt that was running (its prompt was sent, so it is billed with
    /// what was generated: the provider's usage if it arrived, else the tokenizer's count);
    /// `None` when no upstream call had started, which bills nothing.
    ///
    /// Once content went out the stream ends cleanly: the API's closing frames (the usage
    /// chunk a chat client asked for, Anthropic's `message_stop`) and `Done` with
    /// `finish_reason: "cancelled"`. Before any content it ends with a `cancelled` error
    /// (status 499), so a client still waiting for its first byte gets an error status.
    pub(super) async fn cancelled(
        &mut self,
        served: Option<(&Attempt, &Tally)>,
        outbound: Option<Outbound>,
    ) {
        let reason = self.cancel.reason();
        let (usage, usage_source) = match served {
            Some((_, tally)) if tally.usage.is_some() => {
                (tally.usage.unwrap_or_default(), UsageSource::Provider)
            }
            Some((attempt, tally)) => {
                // Tokenizing is CPU work (and on a fresh worker waits for the vocabulary
                // to load): off the async threads, so nothing else of this process, such
                // as the dropped upstream connection closing, waits behind it.
                let (model, body, text) = (
                    attempt.upstream_model.clone(),
                    self.item.body.clone(),
                    tally.text.clone(),
                );
                let counted =
                    tokio::task::spawn_blocking(move || estimate::estimate(&model, &body, &text))
                        .await;
                match counted {
                    Ok(usage) => (usage, UsageSource::Estimated),
                    Err(e) => {
                        tracing::error!(request_id = %self.item.request_id, error = %e, "estimating a cancelled request's usage failed; billing none");
                        (Usage::default(), UsageSource::Estimated)
                    }
                }
            }
            None => (Usage::default(), UsageSource::Estimated),
        };
        tracing::debug!(request_id = %self.item.request_id, reason = reason.as_str(), "request cancelled");
        self.events
            .record(Event::RequestCancelled(RequestCancelled {
                request_id: self.item.request_id,
                key_id: self.item.key_id,
                user_id: self.item.user_id,
                model: self.item.model.clone(),
                channel_id: served.map(|(attempt, _)| attempt.channel.id),
                usage,
                usage_source,
                reason: reason.as_str().to_owned(),
            }))
            .await;
        crate::metrics::cancelled(&self.item.model, served.map(|(attempt, _)| attempt));
        if !self.frames.published() {
            self.frames.discard();
            let mut info = error_info(
                ErrorKind::Cancelled,
                "the request was cancelled before the answer started",
            );
            info.code = Some("request_cancelled".to_owned());
            self.send_last(FrameKind::Error, &info).await;
            return;
        }
        if let (Some(mut outbound), Some((_, tally))) = (outbound, served) {
            let estimated = usage_source == UsageSource::Estimated;
            let rewriter = self.rewriter();
            if let Err(e) = outbound.finish(rewriter, tally, &usage, estimated, &mut self.frames) {
                tracing::error!(request_id = %self.item.request_id, error = %e, "cannot encode a cancelled stream's closing frames");
            }
        }
        let done = DoneData {
            usage,
            usage_source,
            finish_reason: Some(FINISH_CANCELLED.to_owned()),
        };
        self.send_last(FrameKind::Done, &done).await;
    }

    pub(super) async fn send_last<T: Serialize>(&mut self, kind: FrameKind, data: &T) {
        let sent = match self.frames.push(kind, data) {
            Ok(()) => self.frames.flush().await,
            Err(e) => Err(e),
        };
        if let Err(e) = sent {
            tracing::error!(request_id = %self.item.request_id, error = %e, "cannot publish the last frame; the client will time out");
        }
    }
}

pub(super) fn error_info(kind: ErrorKind, message: impl Into<String>) -> ApiErrorInfo {
    ApiErrorInfo {
        status: kind.status(),
        kind,
        message: message.into(),
        code: None,
        param: None,
        retry_after: None,
    }
}

/// A caller's mistake as the provider worded it, with the provider's status.
pub(super) fn passthrough(e: &UpstreamError) -> ApiErrorInfo {
    ApiErrorInfo {
        status: e.status.unwrap_or_else(|| e.kind.status()),
        kind: e.kind,
        message: e.message.clone(),
        code: e.code.clone(),
        param: e.param.clone(),
        retry_after: e.retry_after,
    }
}

/// Every attempt failed in a way worth retrying: the gateway's status for the last
/// failure's kind (a provider's 500 is the client's 502), and what it was.
pub(super) fn exhausted(attempts: u32, last: &UpstreamError) -> ApiErrorInfo {
    let message = if attempts == 1 {
        format!("the upstream failed: {last}")
    } else {
        format!("all {attempts} attempts failed; the last one: {last}")
    };
    ApiErrorInfo {
        status: last.kind.status(),
        kind: last.kind,
        message,
        code: None,
        param: None,
        retry_after: last.retry_after,
    }
}
