//! The HTTP routes, one file per surface.

pub mod admin_channels;
pub mod admin_credits;
pub mod admin_keys;
pub mod admin_nodes;
pub mod admin_prices;
pub mod admin_projections;
pub mod api;
pub mod auth;
pub mod body;
pub mod channels;
pub mod chat;
pub mod count_tokens;
pub mod health;
pub mod keys;
pub mod messages;
pub mod models;
pub mod named;
pub mod plans;
pub mod responses;
pub mod sessions;
pub mod streams;
pub mod usage;
