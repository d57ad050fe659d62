//! The event log and everything that reads it.
//!
//! - [`journal`]: the single writer that appends JetStream `<NS>_EVENTS` to Postgres
//!   `event_log` in stream order (position = stream sequence), idempotently, one active
//!   instance per namespace (advisory lock) with any others waiting as standbys.
//! - [`log`]: appending to and reading the log ([`StoredEvent`], [`append_batch`],
//!   [`read_after`], [`head`]).
//! - [`runtime`]: the projection runtime: a [`Projection`] folds events into read models
//!   and its checkpoint moves in the same transaction, so a crash never double-applies or
//!   skips. [`catch_up`] folds what is in the log; [`run_live`] then follows the journal's
//!   notifications. Live projection and replay are the same code.
//! - [`replay`]: replays into scratch schemas (and in-place rebuilds), and row diffs
//!   between a live read model and a rebuilt one, for `sluice replay` and `sluice audit`.
//! - [`requests`]: the `requests` read model (one row per request: outcome, channel,
//!   latency), run by `sluice projector`.
//! - [`conversations`]: the `sessions`, `messages` and `session_rounds` read models of
//!   the sessions API, run by `sluice projector` too.
//! - [`bus`] and [`db`]: NATS streams and Postgres connections of a namespace.
//!
//! Nothing here logs event data (it may hold prompt text): positions, types and ids only.

mod backoff;
pub mod bus;
pub mod conversations;
pub mod db;
pub mod journal;
pub mod log;
pub mod replay;
pub mod requests;
pub mod runtime;

pub use conversations::ConversationsProjection;
pub use journal::{run_journal, JournalError};
pub use log::{append_batch, head, read_after, read_range, StoredEvent};
pub use requests::RequestsProjection;
pub use runtime::{catch_up, checkpoint, run_live, CatchUp, Projection, ProjectionError, Runner};
