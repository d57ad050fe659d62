//! Translation between client APIs and channel protocols.
//!
//! The worker knows both sides of a request: the client's API (`WorkItem.api`) and the
//! channel's protocol (its adapter). Frames leave the worker already in the client's wire
//! format, so the ingress only relays them. OpenAI chat completions is the canonical
//! form in between: an adapter whose protocol differs from the client's API turns its
//! upstream's answer into OpenAI chunks, and [`Outbound`] turns those into the client's
//! format. When both sides speak the same protocol (Anthropic client, Anthropic channel)
//! the adapter hands over native events and [`Outbound`] passes them through untouched
//! apart from the model name, so nothing the canonical form cannot express is lost.
//! See `workers/src/adapters/README.md`.

pub mod anthropic;
pub mod gemini;
mod outbound;
pub mod responses;

pub use outbound::Outbound;

use schemas::work::{Api, WorkItem};
use serde_json::value::RawValue;

/// The API adapters are told the body is in: Responses bodies reach them as chat bodies.
pub fn adapter_api(api: Api) -> Api {
    match api {
        Api::Responses => Api::ChatCompletions,
        other => other,
    }
}

/// The body in [`adapter_api`]'s format when it differs from the client's (`None`: the
/// client's body as is).
pub fn inbound(item: &WorkItem) -> Result<Option<Box<RawValue>>, TranslateError> {
    if item.api != Api::Responses {
        return Ok(None);
    }
    let body: serde_json::Value = serde_json::from_str(item.body.get()).map_err(|e| {
        TranslateError::new(format!("the request body is not valid JSON: {e}"), None)
    })?;
    let chat = responses::request_to_chat(&body)?;
    serde_json::value::to_raw_value(&chat)
        .map(Some)
        .map_err(|e| TranslateError::new(format!("cannot encode the request: {e}"), None))
}

/// A request that cannot be expressed in the channel's protocol: the client gets a 400
/// in its own API's shape, naming the offending field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct TranslateError {
    pub message: String,
    pub param: Option<String>,
}

impl TranslateError {
    pub fn new(message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            message: message.into(),
            param: param.map(str::to_owned),
        }
    }
}
