//! OpenAI's `POST /v1/embeddings` and `POST /v1/images/generations`, for the gateway's
//! embeddings and images routes. Embeddings are deterministic vectors (`dimensions`,
//! default 8) as floats or, when asked (`encoding_format: base64`, the Python SDK's
//! default), little-endian f32 in base64; usage counts words. Images are `n` fake URLs or
//! tiny base64 payloads. `fail_status` and `require_key` apply as on chat.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine as _;
use serde_json::{json, Value};

use crate::knobs::MockOverrides;
use crate::openai::{error_response, provider_error};
use crate::Shared;

pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/images/generations", post(images))
}

/// The request as JSON, or the error to answer with (bad JSON, bad key, `fail_status`).
fn admit(shared: &Shared, headers: &HeaderMap, body: &[u8]) -> Result<Value, Box<Response>> {
    let req: Value = serde_json::from_slice(body).map_err(|e| {
        Box::new(error_response(
            axum::http::StatusCode::BAD_REQUEST,
            &format!("We could not parse the JSON body of your request. ({e})"),
            "invalid_request_error",
            None,
            None,
        ))
    })?;
    let cfg = shared.config();
    if let Some(key) = cfg.require_key.as_deref() {
        let given = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key) {
            return Err(Box::new(provider_error(401)));
        }
    }
    let overrides: Option<MockOverrides> = req
        .get("mock")
        .and_then(|m| serde_json::from_value(m.clone()).ok());
    if let Some(status) = cfg.knobs(overrides.as_ref()).fail_status {
        return Err(Box::new(provider_error(status)));
    }
    Ok(req)
}

async fn embeddings(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = match admit(&shared, &headers, &body) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    let inputs: Vec<String> = match &req["input"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    let dims = req.get("dimensions").and_then(Value::as_u64).unwrap_or(8) as usize;
    let base64 = req.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let mut tokens = 0u64;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| {
            tokens += text.split_whitespace().count() as u64;
            let vector: Vec<f32> = (0..dims).map(|d| ((i + d) % 10) as f32 / 10.0).collect();
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|f| f.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Json(
        json!({"object": "list", "data": data, "model": req["model"],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}),
    )
    .into_response()
}

async fn images(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let req = match admit(&shared, &headers, &body) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    let n = req.get("n").and_then(Value::as_u64).unwrap_or(1);
    let b64 = req.get("response_format").and_then(Value::as_str) == Some("b64_json");
    let data: Vec<Value> = (0..n)
        .map(|i| {
            if b64 {
                json!({"b64_json": base64::engine::general_purpose::STANDARD.encode(format!("mock image {i}"))})
            } else {
                json!({"url": format!("https://mock-upstream.invalid/images/{i}.png"), "revised_prompt": req["prompt"]})
            }
        })
        .collect();
    Json(json!({"created": 1_700_000_000u64, "data": data})).into_response()
}
