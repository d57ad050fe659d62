//! Channel model and selection policy.
//!
//! Pure logic with no I/O, so every routing rule is unit-tested without a server: a
//! [`Channel`] is one upstream (a provider account, a mock, later a node); [`Health`] is
//! its in-flight count and circuit breaker; a [`ChannelSet`] holds the [`Snapshot`] of
//! channels the workers route over (swapped whole when the configuration changes) and the
//! [`HealthBook`] that outlives snapshots; [`plan`] turns a snapshot into the ordered
//! [`Attempt`]s a worker goes through for one request.

pub mod channel;
pub mod health;
pub mod policy;
pub mod set;

pub use channel::Channel;
pub use health::{
    counts_against_channel, Availability, Ban, BreakerConfig, Health, HealthBook, InFlight,
};
pub use policy::{plan, Attempt, Plan, Policy, Route};
pub use set::{ChannelSet, Snapshot};
