//! Types shared by every Sluice role: the event envelope and event types, the messages
//! on the wire between ingress and workers, OpenAI wire types, names derived from the
//! namespace, money and token units, and the configuration file's shape.
//!
//! This crate does no I/O, so every other crate can depend on it and tests can
//! construct any message without a server.

pub mod anthropic;
pub mod config;
pub mod events;
pub mod money;
pub mod names;
pub mod openai;
pub mod sealed;
pub mod upcast;
pub mod usage;
pub mod work;

pub use events::{Envelope, Event, EventError};
pub use money::{Nanos, Price};
pub use names::Namespace;
pub use usage::{Usage, UsageSource};

/// A new time-ordered id (UUID v7). Every id Sluice mints is one, so ids sort by creation.
pub fn new_id() -> uuid::Uuid {
    uuid::Uuid::now_v7()
}
