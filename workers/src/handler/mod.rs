//! One request, from the queued message to its terminal event and ack.
//!
//! Order of effects, which the ingress, billing and redelivery rely on:
//! 1. `AttemptStarted` per attempt (not awaited), `AttemptFailed` when one fails;
//! 2. chunk frames as they come (stream) — nothing before the first content, so an attempt
//!    can fail over until then;
//! 3. the terminal event (`CompletionFinished`, `RequestFailed` or `RequestCancelled`),
//!    awaited until stored;
//! 4. the last frames with `Done` or `Error` in one message;
//! 5. the ack of the work message.
//!
//! All of it goes over one NATS connection, which keeps this order on the server: when the
//! ack arrives, the terminal event and frame are already there. A redelivered request
//! (the worker died) is recognised from the last stored frame instead of run twice.

mod attempt;
mod backoff;
mod breaker;
mod lost;
mod node;
mod outcome;
mod whole;

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use chrono::Utc;
use schemas::work::{ErrorKind, Frame, FrameKind, WorkItem};
use schemas::Namespace;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::adapters::RequestBody;
use crate::events::EventOut;
use crate::frames::FrameOut;
use crate::options::WorkerOptions;

use outcome::error_info;

/// What every request of a worker shares.
pub struct Ctx {
    pub nats: async_nats::Client,
    pub js: jetstream::Context,
    pub ns: Namespace,
    /// `<NS>_CHUNKS`, read on redelivery to see what the client already got.
    pub chunks: jetstream::stream::Stream,
    pub channels: router::ChannelSet,
    /// Bans and in-flight counts shared with the other workers.
    pub health: std::sync::Arc<crate::health::SharedHealth>,
    pub http: reqwest::Client,
    /// Clients for channels with their own `timeouts.connect_secs`.
    pub connect_clients: crate::adapters::ConnectClients,
    pub opts: WorkerOptions,
    /// Cancelled when the shutdown grace period is over: requests still running stop and
    /// hand their message back to the queue.
    pub abort: CancellationToken,
    /// Stop signals of the requests in flight, fed by `<ns>.cancel.*`.
    pub cancels: std::sync::Arc<crate::cancel::Cancels>,
}

/// What to tell JetStream about the work message.
enum Disposition {
    Ack,
    /// Give it back: another worker (or this one later) takes it.
    Nak(Option<Duration>),
}

/// What an earlier delivery of this request left on the chunk subject.
enum Prior {
    Nothing,
    Ended,
    Started { last_seq: u64 },
}

/// Handles one work message, ack included.
pub async fn handle(ctx: &Ctx, msg: jetstream::Message) {
    let taken_at = Instant::now();
    let item: WorkItem = match serde_json::from_slice(&msg.payload) {
        Ok(item) => item,
        Err(e) => {
            tracing::error!(subject = %msg.subject, error = %e, "undecodable work item; terminated");
            if let Err(e) = msg.ack_with(AckKind::Term).await {
                tracing::warn!(error = %e, "terminating an undecodable work item failed");
            }
            return;
        }
    };
    let delivered = msg.info().map_or(1, |i| i.delivered);
    let _in_flight = crate::metrics::in_flight();
    crate::metrics::queue_wait(&item.model, item.accepted_at);
    let registration = ctx.cancels.register(item.request_id);
    let work = Request::new(ctx, &item, taken_at, registration.signal().clone()).run(delivered);
    // Every line logged for this request carries its id and the trace id from the ingress.
    let span = tracing::info_span!("request", request_id = %item.request_id, trace_id = item.trace_id.as_deref().unwrap_or_default());
    let work = tracing::Instrument::instrument(work, span);
    let disposition = with_progress(&msg, ctx.opts.progress_interval, work).await;
    let acked = match disposition {
        Disposition::Ack => msg.ack().await,
        Disposition::Nak(delay) => msg.ack_with(AckKind::Nak(delay)).await,
    };
    if let Err(e) = acked {
        tracing::warn!(request_id = %item.request_id, error = %e, "acknowledging a request failed; it may be redelivered");
    }
}

/// Runs `work`, telling JetStream every `every` that the message is still being worked
/// on, so a long generation is not redelivered to another worker after the ack wait.
async fn with_progress<F: Future>(msg: &jetstream::Message, every: Duration, work: F) -> F::Output {
    let mut work = std::pin::pin!(work);
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    loop {
        tokio::select! {
            biased;
            out = &mut work => return out,
            _ = tick.tick() => {
                if let Err(e) = msg.ack_with(AckKind::Progress).await {
                    tracing::debug!(error = %e, "sending an in-progress ack failed");
                }
            }
        }
    }
}

struct Request<'a> {
    ctx: &'a Ctx,
    item: &'a WorkItem,
    /// When this worker took the request: the origin of `ttft_ms` and `duration_ms`.
    taken_at: Instant,
    deadline: Instant,
    chunk_subject: String,
    frames: FrameOut,
    events: EventOut<'a>,
    attempts: u32,
    /// Set by `<ns>.cancel.<request_id>`: stop the upstream call and bill what was made.
    cancel: crate::cancel::Signal,
    /// The last stream attempt broke before any content (see `whole`).
    stream_broke: bool,
    /// The one non-streaming retry of a stream request was made.
    whole_retried: bool,
}

impl<'a> Request<'a> {
    fn new(
        ctx: &'a Ctx,
        item: &'a WorkItem,
        taken_at: Instant,
        cancel: crate::cancel::Signal,
    ) -> Self {
        let left = (item.deadline - Utc::now())
            .to_std()
            .unwrap_or(Duration::ZERO);
        let chunk_subject = ctx.ns.chunk_subject(&item.request_id);
        Self {
            ctx,
            item,
            taken_at,
            deadline: taken_at + left,
            frames: FrameOut::new(ctx.nats.clone(), chunk_subject.clone().into()),
            chunk_subject,
            events: EventOut::new(&ctx.js, &ctx.ns, item),
            attempts: 0,
            cancel,
            stream_broke: false,
            whole_retried: false,
        }
    }

    async fn run(mut self, delivered: i64) -> Disposition {
        if delivered > 1 {
            // The worker that had it died (or lost NATS past the ack wait): see `lost`.
            if let Some(disposition) = self.redelivered().await {
                return disposition;
            }
        }
        if self.item.deadline <= Utc::now() {
            let info = error_info(
                ErrorKind::Timeout,
                "the request waited in the queue past its deadline",
            );
            self.fail(info, None, None).await;
            return Disposition::Ack;
        }
        // A client API no adapter speaks (Responses) becomes a chat request once, here.
        let translated = match crate::translate::inbound(self.item) {
            Ok(translated) => translated,
            Err(e) => {
                let mut info = error_info(ErrorKind::BadRequest, e.message);
                info.param = e.param;
                self.fail(info, None, None).await;
                return Disposition::Ack;
            }
        };
        let raw = translated.as_deref().unwrap_or(&self.item.body);
        let Ok(body) = RequestBody::parse(raw) else {
            let info = error_info(
                ErrorKind::BadRequest,
                "the request body must be a JSON object",
            );
            self.fail(info, None, None).await;
            return Disposition::Ack;
        };
        let now_ms = crate::health::now_ms();
        let plan = router::plan(
            &self.ctx.channels.snapshot(),
            router::Route {
                model: &self.item.model,
                group: &self.item.group,
                user: self.item.user_id,
            },
            &self.ctx.opts.policy,
            now_ms,
            &mut rand::rng(),
        );
        if plan.attempts.is_empty() {
            let mut info = match plan.banned_until_ms {
                Some(_) => error_info(ErrorKind::NoChannel, format!("every channel for model `{}` is temporarily banned after failing; try again later", self.item.model)),
                None => error_info(ErrorKind::NoChannel, format!("no channel available for model `{}`", self.item.model)),
            };
            info.retry_after = plan
                .banned_until_ms
                .map(|until| until.saturating_sub(now_ms).div_ceil(1000).max(1));
            self.fail(info, None, None).await;
            return Disposition::Ack;
        }
        self.attempt_all(&plan.attempts, &body).await
    }

    /// Goes through the plan until an attempt answers, one fails in a way another channel
    /// cannot fix, content already reached the client, or the deadline passes.
    async fn prior_frames(&self) -> Result<Prior, jetstream::stream::DirectGetError> {
        match self
            .ctx
            .chunks
            .direct_get_last_for_subject(self.chunk_subject.as_str())
            .await
        {
            Ok(msg) => match serde_json::from_slice::<Vec<Frame>>(&msg.payload) {
                Ok(frames)
                    if frames
                        .iter()
                        .any(|f| matches!(f.kind, FrameKind::Done | FrameKind::Error)) =>
                {
                    Ok(Prior::Ended)
                }
                Ok(frames) => Ok(Prior::Started {
                    last_seq: frames.last().map_or(0, |f| f.seq),
                }),
                Err(e) => {
                    tracing::error!(request_id = %self.item.request_id, error = %e, "undecodable stored frames; treating the request as ended");
                    Ok(Prior::Ended)
                }
            },
            Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => {
                Ok(Prior::Nothing)
            }
            Err(e) => Err(e),
        }
    }
}
