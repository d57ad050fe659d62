//! Tuning of one worker process. The consumer's own settings (ack wait, max deliveries)
//! are shared by every worker and live as constants in [`crate::consumer`].

use std::time::Duration;

use router::{BreakerConfig, Policy};
use schemas::sealed::SecretKey;

/// How a worker process runs. `Default` gives the production values.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Requests handled at once by this process; a permit is taken before a message is
    /// pulled, so a saturated worker leaves queued requests to other workers.
    pub max_in_flight: usize,
    /// Opens the channels' sealed API keys (`SLUICE_SECRET_KEY`). Without it, channels
    /// that have a key are skipped (and logged); channels without one still work.
    pub secret_key: Option<SecretKey>,
    /// How often the `channels` table is reloaded, so admin changes reach running workers.
    pub channel_refresh: Duration,
    /// On shutdown, how long in-flight requests may take to finish before they are
    /// abandoned (and handed back to the queue).
    pub shutdown_grace: Duration,
    /// How often a long request tells JetStream it is still being worked on, well inside
    /// the consumer's 30 s ack wait.
    pub progress_interval: Duration,
    /// Longest silence from an upstream before the attempt counts as timed out: before the
    /// response headers of a stream, and between two chunks.
    pub stream_idle_timeout: Duration,
    /// Longest a batch of frames waits for more chunks once content has been sent.
    pub coalesce_window: Duration,
    /// When a channel is banned and for how long (shared by all workers).
    pub breaker: BreakerConfig,
    /// Attempts per request, over all channels and retries.
    pub policy: Policy,
}

impl WorkerOptions {
    /// Applies the `routing:` section of `sluice.yaml` over these options.
    pub fn with_routing(mut self, routing: &schemas::config::RoutingConfig) -> Self {
        if let Some(secs) = routing.ban_secs {
            self.breaker.ban = Duration::from_secs(secs.max(1));
        }
        if let Some(n) = routing.failure_threshold {
            self.breaker.failure_threshold = n.max(1);
        }
        if let Some(n) = routing.max_attempts {
            self.policy.max_attempts = n.max(1);
        }
        self
    }
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            max_in_flight: 256,
            secret_key: None,
            channel_refresh: Duration::from_secs(2),
            shutdown_grace: Duration::from_secs(30),
            progress_interval: Duration::from_secs(10),
            stream_idle_timeout: Duration::from_secs(120),
            coalesce_window: Duration::from_millis(2),
            breaker: BreakerConfig::default(),
            policy: Policy::default(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use schemas::config::RoutingConfig;

    #[test]
    fn routing_config_overrides_only_what_it_sets() {
        let opts = WorkerOptions::default().with_routing(&RoutingConfig {
            ban_secs: Some(5),
            failure_threshold: None,
            max_attempts: Some(0),
        });
        assert_eq!(opts.breaker.ban, Duration::from_secs(5));
        assert_eq!(opts.breaker.failure_threshold, 3);
        assert_eq!(opts.policy.max_attempts, 1, "at least one attempt");
        let yaml = "routing: {ban_secs: 90, failure_threshold: 5, max_attempts: 2}\n";
        let file = schemas::config::FileConfig::parse(yaml, |_| None).expect("valid yaml");
        let opts = WorkerOptions::default().with_routing(&file.routing);
        assert_eq!(opts.breaker.ban, Duration::from_secs(90));
        assert_eq!(opts.breaker.failure_threshold, 5);
        assert_eq!(opts.policy.max_attempts, 2);
        assert!(
            schemas::config::FileConfig::parse("routing: {ban: 1}\n", |_| None).is_err(),
            "a misspelt setting is an error, not silently ignored"
        );
        let same = WorkerOptions::default().with_routing(&RoutingConfig::default());
        assert_eq!(same.breaker, BreakerConfig::default());
        assert_eq!(same.policy, Policy::default());
    }
}
