//! Anthropic Messages ↔ OpenAI chat completions: requests ([`request`]), streams
//! ([`stream`]), whole answers ([`response`]), and the native pass-through ([`native`]).

pub mod native;
pub mod request;
pub mod response;
pub mod stream;
