//! The HTTP routes, one file per surface.

pub mod chat;
pub mod health;
pub mod models;
