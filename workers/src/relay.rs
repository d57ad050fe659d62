//! Relaying one streaming attempt: upstream chunks in, coalesced frames out.
//!
//! Coalescing rule: whatever is already readable is added to the open batch without
//! waiting; the first batch that carries content goes out at once (time to first token
//! is what clients feel); later batches wait at most `window` (~2 ms) for more chunks,
//! so a burst of tokens becomes one NATS message instead of one per token. Until the first
//! content is sent nothing reaches the client, so a failure up to then can still fail over.

use std::time::Duration;

use futures::{FutureExt, StreamExt};
use schemas::work::ErrorKind;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use crate::adapters::{ChunkStream, UpstreamError};
use crate::cancel::Signal;
use crate::frames::{FrameError, FrameOut};
use crate::tally::{Rewriter, Tally};
use crate::translate::Outbound;

/// Time limits of one attempt (the channel's `timeouts:` over the worker's defaults).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The request's deadline: nobody waits for the answer after it.
    pub deadline: Instant,
    /// When the attempt started: the origin of `first_token` and `total`.
    pub started: Instant,
    /// Longest wait from the start for the first generated token (headers included).
    pub first_token: Duration,
    /// Longest silence between two chunks once content has arrived.
    pub idle: Duration,
    /// Longest the whole attempt may take.
    pub total: Duration,
    /// Longest a batch waits for more chunks once content has been sent.
    pub window: Duration,
}

impl Limits {
    /// When the attempt must have ended, whatever the upstream does.
    pub fn end(&self) -> Instant {
        (self.started + self.total).min(self.deadline)
    }

    /// Until when the upstream may stay silent: `first_token` from the start before any
    /// content, `idle` after the last event once content has arrived.
    pub fn silent_until(&self, has_content: bool, last_event: Instant) -> Instant {
        let limit = if has_content {
            last_event + self.idle
        } else {
            self.started + self.first_token
        };
        limit.min(self.end())
    }
}

/// What may interrupt an attempt before the upstream finishes.
#[derive(Clone, Copy)]
pub struct Interrupts<'a> {
    /// The worker is shutting down past its grace period: hand the request back.
    pub abort: &'a CancellationToken,
    /// The request was cancelled: stop, bill what was made.
    pub cancel: &'a Signal,
}

/// How a stream attempt ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// The upstream finished; the last frames are still pending in the [`FrameOut`], so
    /// they can travel in one message with the `Done` frame.
    Finished,
    /// The upstream failed; whether anything was published decides failover.
    Failed(UpstreamError),
    /// The worker is shutting down past its grace period.
    Aborted,
    /// The request was cancelled; the upstream stream is dropped (closing its connection)
    /// as soon as the caller returns.
    Cancelled,
}

pub async fn relay(
    stream: &mut ChunkStream,
    out: &mut FrameOut,
    rewriter: Rewriter<'_>,
    outbound: &mut Outbound,
    tally: &mut Tally,
    limits: Limits,
    stop: Interrupts<'_>,
) -> Result<RelayEnd, FrameError> {
    let Interrupts { abort, cancel } = stop;
    let mut last_event = Instant::now();
    loop {
        // A fast upstream may always have a chunk ready: check the cancel on every turn.
        if cancel.is_cancelled() {
            return Ok(RelayEnd::Cancelled);
        }
        // Drain what is ready into the open batch before deciding to send it.
        let ready = if out.has_pending() {
            stream.next().now_or_never()
        } else {
            None
        };
        let item = match ready {
            Some(item) => item,
            None => {
                let flush_at = match out.opened_at() {
                    Some(opened) if out.published() => Some(opened + limits.window),
                    Some(opened) if tally.has_content() => Some(opened),
                    _ => None,
                };
                let now = Instant::now();
                if flush_at.is_some_and(|at| at <= now) {
                    out.flush().await?;
                    continue;
                }
                let silent_until = limits.silent_until(tally.has_content(), last_event);
                let wake = flush_at.map_or(silent_until, |at| at.min(silent_until));
                tokio::select! {
                    biased;
                    () = abort.cancelled() => return Ok(RelayEnd::Aborted),
                    () = cancel.cancelled() => return Ok(RelayEnd::Cancelled),
                    item = stream.next() => item,
                    () = sleep_until(wake) => {
                        if flush_at.is_some_and(|at| at <= Instant::now()) {
                            out.flush().await?;
                            continue;
                        }
                        return Ok(RelayEnd::Failed(timeout(stream.provider(), limits, tally.has_content(), Instant::now())));
                    }
                }
            }
        };
        last_event = Instant::now();
        match item {
            None if stream.finished_cleanly() || tally.finish_reason.is_some() => {
                return Ok(RelayEnd::Finished)
            }
            None => {
                return Ok(RelayEnd::Failed(UpstreamError::new(
                    stream.provider(),
                    ErrorKind::Connection,
                    "the upstream closed the stream before it finished",
                )))
            }
            Some(Err(e)) => return Ok(RelayEnd::Failed(e)),
            Some(Ok(chunk)) => {
                outbound.chunk(chunk, rewriter, tally, out)?;
                if out.full() {
                    out.flush().await?;
                }
            }
        }
    }
}

/// The timeout error for whichever limit ran out, naming it: the client and the
/// `AttemptFailed` event say what hung.
pub fn timeout(
    provider: &'static str,
    limits: Limits,
    has_content: bool,
    now: Instant,
) -> UpstreamError {
    let secs = |d: Duration| d.as_secs_f64();
    let message = if now >= limits.deadline {
        "the request's deadline passed before the upstream finished".to_owned()
    } else if now >= limits.started + limits.total {
        format!(
            "the upstream did not finish within the channel's total limit of {} s",
            secs(limits.total)
        )
    } else if has_content {
        format!(
            "the upstream sent nothing for {} s in the middle of its answer",
            secs(limits.idle)
        )
    } else {
        format!(
            "the upstream sent no first token within {} s",
            secs(limits.first_token)
        )
    };
    UpstreamError::new(provider, ErrorKind::Timeout, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_limits_follow_the_answer() {
        let started = Instant::now();
        let limits = Limits {
            deadline: started + Duration::from_secs(100),
            started,
            first_token: Duration::from_secs(20),
            idle: Duration::from_secs(5),
            total: Duration::from_secs(30),
            window: Duration::from_millis(2),
        };
        assert_eq!(limits.end(), started + Duration::from_secs(30));
        let later = started + Duration::from_secs(3);
        assert_eq!(
            limits.silent_until(false, later),
            started + Duration::from_secs(20)
        );
        assert_eq!(
            limits.silent_until(true, later),
            started + Duration::from_secs(8)
        );
        let near_end = started + Duration::from_secs(28);
        assert_eq!(limits.silent_until(true, near_end), limits.end());
        let msg = |has, at| timeout("openai", limits, has, at).message;
        assert!(
            msg(false, started + Duration::from_secs(20)).contains("no first token within 20 s")
        );
        assert!(msg(true, later + Duration::from_secs(5)).contains("nothing for 5 s"));
        assert!(msg(true, limits.end()).contains("total limit of 30 s"));
        let short = Limits {
            deadline: started + Duration::from_secs(10),
            ..limits
        };
        assert!(timeout("openai", short, true, short.deadline)
            .message
            .contains("deadline"));
    }
}
