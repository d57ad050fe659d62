//! Every request gets a UUID v7 id, returned as `x-sluice-request-id` on every response
//! (errors included) and used as the id of the queued request and its events.

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use uuid::Uuid;

pub const HEADER: &str = "x-sluice-request-id";

#[derive(Debug, Clone, Copy)]
pub struct RequestId(pub Uuid);

pub async fn assign(mut req: Request, next: Next) -> Response {
    let id = schemas::new_id();
    req.extensions_mut().insert(RequestId(id));
    let mut response = next.run(req).await;
    if let Ok(v) = HeaderValue::from_str(&id.to_string()) {
        response.headers_mut().insert(HEADER, v);
    }
    response
}

/// Answers 413 from `Content-Length` alone, before reading a byte of the body: a client
/// sending 20 MB learns at once, and the gateway never buffers what it will refuse.
pub async fn reject_oversize(limit: usize, req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        use axum::response::IntoResponse;
        return crate::error::ApiError::PayloadTooLarge { limit }.into_response();
    }
    next.run(req).await
}
