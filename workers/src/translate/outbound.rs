//! [`Outbound`]: what the worker does with each piece of an attempt's answer before it
//! becomes a frame, per client API: tally it for billing, rewrite the model name, and put
//! it in the client's wire format.

use schemas::work::{Api, FrameKind};
use schemas::Usage;
use serde_json::Value;

use super::anthropic::{native, response, stream};
use super::responses;
use crate::frames::{FrameError, FrameOut};
use crate::tally::{Rewriter, Tally};

/// The client side of one attempt.
#[derive(Debug)]
pub enum Outbound {
    /// An OpenAI chat client: canonical chunks are its format.
    Chat,
    /// An Anthropic client on an Anthropic channel: native events pass through.
    AnthropicNative(native::Native),
    /// An Anthropic client on any other channel: canonical chunks become Anthropic events.
    /// Boxed, like [`Outbound::Responses`]: encoders are large and most requests are chat.
    Anthropic(Box<stream::ToEvents>),
    /// A Responses client: canonical chunks become Responses events.
    Responses(Box<responses::ToEvents>),
    /// `/v1/images/generations`: the provider's body as is, billed per image.
    Images,
}

/// Anthropic and the Responses API name each SSE event after its `type`; Anthropic's
/// SDKs skip events without a name.
fn named_event(v: &Value) -> Option<&str> {
    v.get("type").and_then(Value::as_str)
}

impl Outbound {
    /// `native`: the adapter hands over its upstream's own format because it is the
    /// client's ([`crate::adapters::Adapter::speaks`]).
    pub fn new(api: Api, native: bool, client_model: &str) -> Self {
        match (api, native) {
            (Api::Messages, true) => Outbound::AnthropicNative(native::Native::default()),
            (Api::Messages, false) => {
                Outbound::Anthropic(Box::new(stream::ToEvents::new(client_model)))
            }
            (Api::Responses, _) => {
                Outbound::Responses(Box::new(responses::ToEvents::new(client_model)))
            }
            (Api::Images, _) => Outbound::Images,
            _ => Outbound::Chat,
        }
    }

    /// One streamed piece from the adapter: tallied, rewritten, and pushed as 0..n frames.
    pub fn chunk(
        &mut self,
        mut chunk: Value,
        rewriter: Rewriter<'_>,
        tally: &mut Tally,
        out: &mut FrameOut,
    ) -> Result<(), FrameError> {
        match self {
            Outbound::Chat | Outbound::Images => {
                if rewriter.chunk(&mut chunk, tally) {
                    out.push(FrameKind::Chunk, &chunk)?;
                }
            }
            Outbound::AnthropicNative(n) => {
                n.event(&mut chunk, rewriter.client_model, tally);
                out.push_event(FrameKind::Chunk, named_event(&chunk), &chunk)?;
            }
            Outbound::Anthropic(enc) => {
                // Usage chunks are kept so the tally sees them; `ToEvents` drops them.
                if rewriter.chunk(&mut chunk, tally) {
                    for event in enc.chunk(&chunk) {
                        out.push_event(FrameKind::Chunk, named_event(&event), &event)?;
                    }
                }
            }
            Outbound::Responses(enc) => {
                if rewriter.chunk(&mut chunk, tally) {
                    for event in enc.chunk(&chunk) {
                        out.push_event(FrameKind::Chunk, named_event(&event), &event)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The stream's last content frames, once the final usage is known: the usage chunk a
    /// chat client asked for when the provider reported none, or Anthropic's closing events.
    pub fn finish(
        &mut self,
        rewriter: Rewriter<'_>,
        tally: &Tally,
        usage: &Usage,
        estimated: bool,
        out: &mut FrameOut,
    ) -> Result<(), FrameError> {
        match self {
            Outbound::Chat if estimated && rewriter.include_usage => {
                out.push(FrameKind::Chunk, &rewriter.usage_chunk(tally, usage))
            }
            Outbound::Chat | Outbound::AnthropicNative(_) | Outbound::Images => Ok(()),
            Outbound::Anthropic(enc) => {
                for event in enc.finish(usage) {
                    out.push_event(FrameKind::Chunk, named_event(&event), &event)?;
                }
                Ok(())
            }
            Outbound::Responses(enc) => {
                for event in enc.finish(usage) {
                    out.push_event(FrameKind::Chunk, named_event(&event), &event)?;
                }
                Ok(())
            }
        }
    }

    /// Tallies a whole answer as the adapter returned it and rewrites its model.
    pub fn response(&self, body: &mut Value, rewriter: Rewriter<'_>, tally: &mut Tally) {
        match self {
            Outbound::AnthropicNative(_) => native::message(body, rewriter.client_model, tally),
            Outbound::Images => images_usage(body, tally),
            Outbound::Chat | Outbound::Anthropic(_) | Outbound::Responses(_) => {
                rewriter.response(body, tally)
            }
        }
    }

    /// The whole answer in the client's format, once the final usage is known.
    pub fn final_body(
        &self,
        mut body: Value,
        client_model: &str,
        usage: &Usage,
        estimated: bool,
    ) -> Value {
        match self {
            Outbound::Chat => {
                if estimated {
                    if let Some(obj) = body.as_object_mut() {
                        if obj.get("usage").is_none_or(Value::is_null) {
                            obj.insert("usage".to_owned(), usage.to_openai());
                        }
                    }
                }
                body
            }
            Outbound::AnthropicNative(_) | Outbound::Images => body,
            Outbound::Anthropic(_) => response::completion_to_message(&body, client_model, usage),
            Outbound::Responses(_) => responses::completion_to_response(&body, client_model, usage),
        }
    }
}

/// An image generation's usage: the images in `data` (what is billed), plus the tokens
/// `gpt-image-*` models report (`input_tokens`, `output_tokens`).
fn images_usage(body: &Value, tally: &mut Tally) {
    let images = body
        .get("data")
        .and_then(Value::as_array)
        .map_or(0, |d| d.len() as u64);
    let n = |k: &str| body.pointer(k).and_then(Value::as_u64).unwrap_or(0);
    let (prompt, completion) = (n("/usage/input_tokens"), n("/usage/output_tokens"));
    tally.usage = Some(Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
        images,
        ..Usage::default()
    });
    tally.finish_reason = Some("stop".to_owned());
}
