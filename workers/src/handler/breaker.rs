//! The circuit breaker around each attempt: skipping channels banned while the request
//! ran, claiming half-open probes, and recording outcomes (locally, in the shared health
//! bucket, and as a `ChannelBanned` event when a ban starts).

use chrono::{TimeZone, Utc};
use router::{Attempt, Availability};
use schemas::events::ChannelBanned;
use schemas::Event;

use super::Request;
use crate::adapters::UpstreamError;
use crate::health::now_ms;

impl Request<'_> {
    /// Whether `attempt` should still be made: its channel may have been banned since the
    /// plan was made (by this request's own earlier attempt, or by another worker), and a
    /// probe needs its claim. A retry that waited out its channel's short ban (a 429's
    /// `Retry-After`) finds it half-open and becomes the probe if nobody else holds it.
    pub(super) async fn may_try(&self, attempt: &Attempt) -> bool {
        if attempt.probe {
            return self
                .ctx
                .health
                .claim_probe(attempt.channel.id, &attempt.health)
                .await;
        }
        match attempt.health.availability(now_ms()) {
            Availability::Closed => true,
            Availability::Banned(_) | Availability::HalfOpen { probe_free: false } => false,
            Availability::HalfOpen { probe_free: true } => {
                self.ctx
                    .health
                    .claim_probe(attempt.channel.id, &attempt.health)
                    .await
            }
        }
    }

    /// The channel answered: close its breaker, and tell the other workers if it was open.
    pub(super) async fn channel_answered(&self, attempt: &Attempt) {
        if attempt.health.record_success(now_ms()) {
            tracing::info!(channel = %attempt.channel.name, "channel answered again; ban lifted");
            self.ctx.health.recovered(attempt.channel.id).await;
        }
    }

    /// Counts a failure against the channel; a ban it starts is shared and recorded.
    pub(super) async fn channel_failed(&self, attempt: &Attempt, e: &UpstreamError) {
        let Some(ban) = attempt.health.record_failure(
            e.kind,
            e.retry_after,
            now_ms(),
            &self.ctx.health.breaker,
        ) else {
            return;
        };
        tracing::warn!(channel = %attempt.channel.name, kind = ?ban.kind, failures = ban.failures, until_ms = ban.until_ms, "channel banned");
        self.ctx.health.banned(attempt.channel.id, &ban).await;
        crate::metrics::banned(&attempt.channel.name, ban.kind);
        let until = i64::try_from(ban.until_ms)
            .ok()
            .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
            .unwrap_or_else(Utc::now);
        self.events
            .emit(Event::ChannelBanned(ChannelBanned {
                channel_id: attempt.channel.id,
                channel_name: attempt.channel.name.clone(),
                until,
                kind: ban.kind,
                failures: ban.failures,
                retry_after: ban.retry_after,
                request_id: Some(self.item.request_id),
            }))
            .await;
    }
}
