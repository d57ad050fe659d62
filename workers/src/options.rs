//! Tuning of one worker process. The consumer's own settings (ack wait, max deliveries)
//! are shared by every worker and live as constants in [`crate::consumer`].

use std::time::Duration;

use router::{BreakerConfig, Channel, Policy};
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
    /// the consumer's ack wait.
    pub progress_interval: Duration,
    /// How long a taken request may go without an ack or progress before JetStream hands
    /// it to another worker: how soon a dead worker's requests are redelivered. A setting
    /// of the shared consumer, so the first worker to create it decides.
    pub ack_wait: Duration,
    /// Default of a channel's `timeouts.connect_secs`.
    pub connect_timeout: Duration,
    /// Default of a channel's `timeouts.first_token_secs`: from sending a stream request to
    /// its first generated token (headers included).
    pub first_token_timeout: Duration,
    /// Default of a channel's `timeouts.idle_secs`: longest silence between two chunks
    /// once the answer has started.
    pub stream_idle_timeout: Duration,
    /// Default of a channel's `timeouts.total_secs`: one attempt from start to end.
    pub attempt_timeout: Duration,
    /// First wait before retrying a channel that failed with a 5xx, overload or connection
    /// error (doubled per retry, with jitter, at most [`MAX_BACKOFF`]).
    pub retry_backoff: Duration,
    /// Longest `Retry-After` of a 429 the worker waits out to retry the same channel; a
    /// longer one moves on to the next channel at once.
    pub max_retry_after: Duration,
    /// Longest a batch of frames waits for more chunks once content has been sent.
    pub coalesce_window: Duration,
    /// When a channel is banned and for how long (shared by all workers).
    pub breaker: BreakerConfig,
    /// Attempts per request, over all channels and retries.
    pub policy: Policy,
}

/// Upper bound of the exponential backoff between retries of one channel.
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The time limits of one channel: its `timeouts:` over the worker's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelLimits {
    pub connect: Duration,
    pub first_token: Duration,
    pub idle: Duration,
    pub total: Duration,
}

impl WorkerOptions {
    /// The limits that apply to calls to `channel`.
    pub fn limits_for(&self, channel: &Channel) -> ChannelLimits {
        let t = &channel.timeouts;
        let or = |secs: Option<u64>, default: Duration| secs.map_or(default, Duration::from_secs);
        ChannelLimits {
            connect: or(t.connect_secs, self.connect_timeout),
            first_token: or(t.first_token_secs, self.first_token_timeout),
            idle: or(t.idle_secs, self.stream_idle_timeout),
            total: or(t.total_secs, self.attempt_timeout),
        }
    }

    /// Applies `SLUICE_WORKER_*` environment settings over these options:
    /// `SLUICE_WORKER_ACK_WAIT_SECS` (redelivery of a dead worker's requests; the progress
    /// interval follows at a third of it) and `SLUICE_WORKER_SHUTDOWN_GRACE_SECS`.
    /// Unparsable values are ignored with a warning, not fatal.
    pub fn with_env(mut self, env: impl Fn(&str) -> Option<String>) -> Self {
        let secs = |name: &str| {
            let v = env(name)?;
            match v.trim().parse::<u64>() {
                Ok(n) => Some(n),
                Err(_) => {
                    tracing::warn!(setting = name, value = %v, "not a whole number of seconds; ignored");
                    None
                }
            }
        };
        if let Some(n) = secs("SLUICE_WORKER_ACK_WAIT_SECS") {
            self.ack_wait = Duration::from_secs(n.max(1));
        }
        // Progress must reach JetStream well inside the ack wait, or long generations would
        // be redelivered while still running.
        self.progress_interval = self.progress_interval.min(self.ack_wait / 3);
        if let Some(n) = secs("SLUICE_WORKER_SHUTDOWN_GRACE_SECS") {
            self.shutdown_grace = Duration::from_secs(n);
        }
        self
    }

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
            ack_wait: crate::consumer::ACK_WAIT,
            connect_timeout: Duration::from_secs(10),
            first_token_timeout: Duration::from_secs(120),
            stream_idle_timeout: Duration::from_secs(60),
            attempt_timeout: Duration::from_secs(300),
            retry_backoff: Duration::from_millis(200),
            max_retry_after: Duration::from_secs(5),
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

    #[test]
    fn env_sets_ack_wait_and_keeps_progress_inside_it() {
        let env = |k: &str| match k {
            "SLUICE_WORKER_ACK_WAIT_SECS" => Some("3".to_owned()),
            "SLUICE_WORKER_SHUTDOWN_GRACE_SECS" => Some("oops".to_owned()),
            _ => None,
        };
        let opts = WorkerOptions::default().with_env(env);
        assert_eq!(opts.ack_wait, Duration::from_secs(3));
        assert_eq!(opts.progress_interval, Duration::from_secs(1));
        assert_eq!(
            opts.shutdown_grace,
            Duration::from_secs(30),
            "bad value ignored"
        );
        let untouched = WorkerOptions::default().with_env(|_| None);
        assert_eq!(untouched.ack_wait, crate::consumer::ACK_WAIT);
        assert_eq!(untouched.progress_interval, Duration::from_secs(10));
    }

    #[test]
    fn channel_timeouts_override_the_defaults_field_by_field() {
        let opts = WorkerOptions::default();
        let mut channel = Channel {
            id: uuid::Uuid::nil(),
            name: "c".into(),
            channel_type: "mock".into(),
            base_url: None,
            api_key: None,
            models: vec!["m".into()],
            model_map: Default::default(),
            priority: 0,
            weight: 1,
            retry: 1,
            groups: Vec::new(),
            enabled: true,
            timeouts: Default::default(),
            owner: None,
        };
        let defaults = opts.limits_for(&channel);
        assert_eq!(defaults.idle, Duration::from_secs(60));
        assert_eq!(defaults.total, Duration::from_secs(300));
        channel.timeouts.idle_secs = Some(2);
        channel.timeouts.connect_secs = Some(1);
        let limits = opts.limits_for(&channel);
        assert_eq!(limits.idle, Duration::from_secs(2));
        assert_eq!(limits.connect, Duration::from_secs(1));
        assert_eq!(limits.first_token, defaults.first_token);
        assert_eq!(limits.total, defaults.total);
    }
}
