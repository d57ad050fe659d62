//! Channel model and selection policy.
//!
//! Pure logic with no I/O, so every routing rule is unit-tested without a server: a
//! [`Channel`] is one upstream (a provider account, a mock, later a node), [`plan`] turns
//! the enabled channels into the ordered list of [`Attempt`]s a worker goes through for one
//! request, and [`ChannelSet`] is the snapshot of channels the workers route over, swapped
//! whole when the configuration changes.

pub mod channel;
pub mod policy;
pub mod set;

pub use channel::Channel;
pub use policy::{plan, Attempt};
pub use set::ChannelSet;
