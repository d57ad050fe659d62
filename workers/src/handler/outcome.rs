//! How a request ends: the terminal event first (awaited until stored), then the last
//! frames with `Done` or `Error` in one message.

use std::time::Duration;

use router::Attempt;
use schemas::events::{CompletionFinished, RequestFailed};
use schemas::work::{ApiErrorInfo, DoneData, ErrorKind, FrameKind};
use schemas::{Event, Usage, UsageSource};
use serde::Serialize;
use uuid::Uuid;

use super::attempt::Answer;
use super::Request;
use crate::adapters::UpstreamError;
use crate::estimate;
use crate::tally::Tally;

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
                session_id: None,
                content: None,
            }))
            .await;
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
        self.send_last(FrameKind::Error, &info).await;
    }

    async fn send_last<T: Serialize>(&mut self, kind: FrameKind, data: &T) {
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
