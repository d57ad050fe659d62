//! Every request gets a UUID v7 id, returned as `x-sluice-request-id` on every response
//! (errors included) and used as the id of the queued request and its events. The
//! cheapest refusals live here too, before a byte of the body is read: oversized bodies
//! (from `Content-Length`) and oversized headers.

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use schemas::work::{ApiErrorInfo, ErrorKind};
use uuid::Uuid;

pub const HEADER: &str = "x-sluice-request-id";

#[derive(Debug, Clone, Copy)]
pub struct RequestId(pub Uuid);

/// Assigns the id, then runs [`crate::metrics::observe`] in the same middleware: every
/// layer costs a boxed future and a service clone per request.
pub async fn assign_observed(mut req: Request, next: Next) -> Response {
    let id = insert(&mut req);
    let mut response = crate::metrics::observe(req, next).await;
    stamp(&mut response, id);
    response
}

fn insert(req: &mut Request) -> Uuid {
    let id = schemas::new_id();
    req.extensions_mut().insert(RequestId(id));
    id
}

fn stamp(response: &mut Response, id: Uuid) {
    let mut buf = Uuid::encode_buffer();
    if let Ok(v) = HeaderValue::from_str(id.hyphenated().encode_lower(&mut buf)) {
        response.headers_mut().insert(HEADER, v);
    }
}

/// An error in the shape of the API the path belongs to: Anthropic's for `/v1/messages`,
/// OpenAI's everywhere else. For refusals made before any route runs.
pub fn shaped_error(path: &str, info: &ApiErrorInfo) -> Response {
    if path == "/v1/messages" || path.starts_with("/v1/messages/") {
        crate::error::anthropic_error_response(info)
    } else {
        crate::error::error_response(info)
    }
}

/// The 413 to answer from `Content-Length` alone, before reading a byte of the body: a
/// client sending 20 MB learns at once, and the gateway never buffers what it will refuse.
pub fn oversize_refusal(limit: usize, req: &Request) -> Option<Response> {
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        let info = crate::error::ApiError::PayloadTooLarge { limit }.info();
        return Some(shaped_error(req.uri().path(), &info));
    }
    None
}

/// Limits on a request's headers. Far larger headers never get here: the HTTP server
/// refuses them itself (431 without a body), see `crate::serve`.
#[derive(Debug, Clone, Copy)]
pub struct HeaderLimits {
    /// Sum of names and values, plus 4 bytes of framing per header.
    pub max_bytes: usize,
    pub max_count: usize,
}

/// The 431 to answer, in the API's error shape, when the headers are too many or too
/// large, so a client stuffing kilobytes of cookies is told which limit it hit.
pub fn header_refusal(limits: HeaderLimits, req: &Request) -> Option<Response> {
    let headers = req.headers();
    let count = headers.len();
    let bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    let message = if count > limits.max_count {
        Some(format!(
            "the request has {count} headers; at most {} are accepted",
            limits.max_count
        ))
    } else if bytes > limits.max_bytes {
        Some(format!(
            "the request headers take {bytes} bytes; at most {} are accepted",
            limits.max_bytes
        ))
    } else {
        None
    };
    if let Some(message) = message {
        let info = ApiErrorInfo {
            status: 431,
            kind: ErrorKind::BadRequest,
            message,
            code: Some("request_header_fields_too_large".to_owned()),
            param: None,
            retry_after: None,
        };
        return Some(shaped_error(req.uri().path(), &info));
    }
    None
}
