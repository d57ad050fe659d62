//! The event log and everything that reads it: the journal (the single writer that
//! appends JetStream `EVENTS` to Postgres `event_log`), the projection runtime
//! (checkpointed folds of the log into read models), and the non-money projectors.

pub mod bus;
pub mod db;
