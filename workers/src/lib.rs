//! The workers: they take queued requests from JetStream, route each to a channel, call
//! the channel's upstream through its adapter, and turn the answer into chunk frames and
//! domain events.
//!
//! - [`run_worker`] is the role's entry point (`sluice worker`): one durable pull consumer
//!   shared by every worker process, each request in its own task, bounded.
//! - [`channels`] loads the `channels` table into the router's `ChannelSet` and keeps it
//!   fresh.
//! - [`adapters`] speak the providers' protocols (OpenAI and its compatible presets,
//!   Azure, Anthropic, Gemini); [`translate`] converts between the client's API and the
//!   channel's protocol (see `adapters/README.md`).
//! - [`health`] shares channel bans and in-flight counts with the other workers through
//!   NATS KV, so the router's circuit breaker acts deployment-wide.
//! - [`egress`] keeps personal channels (a user's own `base_url`) off private addresses.
//! - [`kv_keys`] lists the keys of a KV bucket with a deadline (never `Store::keys`).
//! - `handler` runs one request: attempts and failover, relaying, terminal events, acks.
//!   `relay` and `frames` stream and coalesce chunks; `tally` rewrites chunks and notes
//!   usage; `estimate` counts tokens when the provider reports none.
//! - [`node`] is remote worker nodes: the `sluice node` process, the nodes bucket the
//!   router learns them from, and the worker's side of a call to one.
//! - `cancel` stops requests in flight on `<ns>.cancel.<request_id>` (one wildcard
//!   subscription per process); the request ends with `RequestCancelled` and its
//!   partial usage.

pub mod adapters;
mod cancel;
pub mod channels;
mod consumer;
pub mod egress;
mod error;
mod estimate;
mod events;
mod frames;
mod handler;
pub mod health;
pub mod kv_keys;
pub mod metrics;
pub mod node;
mod options;
mod relay;
mod tally;
pub mod translate;

pub use consumer::{run_worker, ACK_WAIT, MAX_ACK_PENDING, MAX_DELIVER};
pub use error::WorkerError;
pub use options::WorkerOptions;
