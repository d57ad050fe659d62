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
use crate::frames::{FrameError, FrameOut};
use crate::tally::{Rewriter, Tally};
use crate::translate::Outbound;

/// Time limits of one attempt.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The request's deadline: nobody waits for the answer after it.
    pub deadline: Instant,
    /// Longest silence allowed from the upstream (before the first chunk and between two).
    pub idle: Duration,
    /// Longest a batch waits for more chunks once content has been sent.
    pub window: Duration,
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
}

pub async fn relay(
    stream: &mut ChunkStream,
    out: &mut FrameOut,
    rewriter: Rewriter<'_>,
    outbound: &mut Outbound,
    tally: &mut Tally,
    limits: Limits,
    abort: &CancellationToken,
) -> Result<RelayEnd, FrameError> {
    let mut last_event = Instant::now();
    loop {
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
                let silent_until = (last_event + limits.idle).min(limits.deadline);
                let wake = flush_at.map_or(silent_until, |at| at.min(silent_until));
                tokio::select! {
                    biased;
                    () = abort.cancelled() => return Ok(RelayEnd::Aborted),
                    item = stream.next() => item,
                    () = sleep_until(wake) => {
                        if flush_at.is_some_and(|at| at <= Instant::now()) {
                            out.flush().await?;
                            continue;
                        }
                        return Ok(RelayEnd::Failed(timeout(stream.provider(), limits, Instant::now())));
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

/// The timeout error for whichever limit ran out.
pub fn timeout(provider: &'static str, limits: Limits, now: Instant) -> UpstreamError {
    let message = if now >= limits.deadline {
        "the request's deadline passed before the upstream finished".to_owned()
    } else {
        format!("the upstream sent nothing for {} s", limits.idle.as_secs())
    };
    UpstreamError::new(provider, ErrorKind::Timeout, message)
}
