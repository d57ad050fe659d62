//! `ApiJson`: axum's `Json` with rejections in our error shape (400 naming the problem,
//! 413 for an oversized body) instead of axum's plain-text ones; `ApiQuery` likewise for
//! query strings. Both refuse text holding NUL characters, which Postgres cannot store.

use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use crate::accounts::AccountError;
use crate::error::ApiError;

pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        // `guard` has already read the body within the limits; this takes that buffer.
        let (parts, body) = req.into_parts();
        let bytes =
            axum::body::to_bytes(body, usize::MAX)
                .await
                .map_err(|e| AccountError::Invalid {
                    message: format!("the request body could not be read: {e}"),
                    param: None,
                })?;
        if has_nul_escape(&bytes) {
            return Err(nul_refused().into());
        }
        let req = Request::from_parts(parts, axum::body::Body::from(bytes));
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(ApiJson(value)),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::PayloadTooLarge {
                    limit: crate::state::IngressOptions::default().max_body_bytes,
                })
            }
            Err(rejection) => Err(AccountError::Invalid {
                message: rejection.body_text(),
                param: None,
            }
            .into()),
        }
    }
}

/// `ApiQuery`: axum's `Query` with a bad query string answered as a JSON 400 naming the
/// problem, like [`ApiJson`], instead of axum's plain-text rejection.
pub struct ApiQuery<T>(pub T);

impl<S, T> axum::extract::FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or_default();
        if query.contains("%00") {
            return Err(nul_refused().into());
        }
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(ApiQuery(value)),
            Err(rejection) => Err(AccountError::Invalid {
                message: rejection.body_text(),
                param: None,
            }
            .into()),
        }
    }
}

/// Text with a NUL character is refused (400) before it reaches Postgres, which cannot
/// store NUL in text and would fail the query (a 500).
fn nul_refused() -> AccountError {
    AccountError::Invalid {
        message: "text may not contain NUL characters (`\\u0000`)".into(),
        param: None,
    }
}

/// Whether a JSON text has a string holding a NUL character, i.e. the escape `\u0000`
/// inside a string (a raw NUL byte is not valid JSON at all). Escapes are followed pair
/// by pair, so an escaped backslash before `u0000` is not mistaken for one.
pub fn has_nul_escape(bytes: &[u8]) -> bool {
    let mut in_string = false;
    let mut i = 0;
    while i < bytes.len() {
        match (in_string, bytes[i]) {
            (true, b'\\') => {
                if bytes.get(i + 1) == Some(&b'u') && bytes.get(i + 2..i + 6) == Some(b"0000") {
                    return true;
                }
                i += 2;
                continue;
            }
            (true, b'"') => in_string = false,
            (false, b'"') => in_string = true,
            _ => {}
        }
        i += 1;
    }
    false
}

/// For PATCH bodies: tells "absent" (`None`) from "set to null" (`Some(None)`).
pub fn double_option<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    <Option<T> as serde::Deserialize>::deserialize(d).map(Some)
}

/// Limits applied to every request body before a route sees it.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Larger bodies get 413 (declared ones already in `request_id::reject_oversize`;
    /// this catches chunked bodies that grow past it).
    pub max_bytes: usize,
    /// The whole body must arrive within this long (408 otherwise): a client trickling a
    /// byte at a time cannot hold a connection and a buffer forever.
    pub read_timeout: std::time::Duration,
    /// JSON nested deeper than this is refused (400) before any parser recurses into it.
    pub max_depth: usize,
}

/// Reads the body within `limits` and, for JSON, checks that it is UTF-8 and not nested
/// too deep; every refusal is a JSON error in the caller's API shape. The route then gets
/// the body already in memory (one buffer: a single-frame body is not copied).
pub async fn guard(
    limits: BodyLimits,
    req: Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if !has_body(&req) {
        return next.run(req).await;
    }
    let path = req.uri().path().to_owned();
    let json = is_json(req.headers());
    let (parts, body) = req.into_parts();
    let bytes =
        match tokio::time::timeout(limits.read_timeout, read_limited(body, limits.max_bytes)).await
        {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(info)) => return crate::request_id::shaped_error(&path, &info),
            Err(_) => {
                let info = bad(
                    408,
                    "request_timeout",
                    format!(
                        "the request body did not arrive within {} s",
                        limits.read_timeout.as_secs()
                    ),
                );
                return crate::request_id::shaped_error(&path, &info);
            }
        };
    if json {
        if let Err(info) = check_json_text(&bytes, limits.max_depth) {
            return crate::request_id::shaped_error(&path, &info);
        }
    }
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

fn has_body(req: &Request) -> bool {
    use axum::http::header;
    let headers = req.headers();
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    declared.is_some_and(|n| n > 0) || headers.contains_key(header::TRANSFER_ENCODING)
}

/// JSON unless the client says otherwise (multipart uploads, form posts).
fn is_json(headers: &axum::http::HeaderMap) -> bool {
    match headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        None => true,
        Some(ct) => ct.contains("json") || ct.starts_with("text/plain"),
    }
}

fn bad(status: u16, code: &str, message: String) -> schemas::work::ApiErrorInfo {
    schemas::work::ApiErrorInfo {
        status,
        kind: schemas::work::ErrorKind::BadRequest,
        message,
        code: Some(code.to_owned()),
        param: None,
        retry_after: None,
    }
}

async fn read_limited(
    body: axum::body::Body,
    max: usize,
) -> Result<axum::body::Bytes, schemas::work::ApiErrorInfo> {
    use futures::StreamExt;
    let too_large = || ApiError::PayloadTooLarge { limit: max }.info();
    let mut stream = body.into_data_stream();
    let mut first: Option<axum::body::Bytes> = None;
    let mut rest: Vec<u8> = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            bad(
                400,
                "invalid_body",
                format!("the request body could not be read: {e}"),
            )
        })?;
        match &first {
            None => {
                if chunk.len() > max {
                    return Err(too_large());
                }
                first = Some(chunk);
            }
            Some(head) => {
                if head.len() + rest.len() + chunk.len() > max {
                    return Err(too_large());
                }
                if rest.is_empty() {
                    rest.reserve(head.len() + chunk.len());
                    rest.extend_from_slice(head);
                }
                rest.extend_from_slice(&chunk);
            }
        }
    }
    Ok(if rest.is_empty() {
        first.unwrap_or_default()
    } else {
        axum::body::Bytes::from(rest)
    })
}

/// UTF-8 and nesting depth of a JSON text, checked in one cheap pass before parsing. The
/// errors say where: the byte offset of bad UTF-8, the depth limit that was crossed.
pub fn check_json_text(bytes: &[u8], max_depth: usize) -> Result<(), schemas::work::ApiErrorInfo> {
    if let Err(e) = std::str::from_utf8(bytes) {
        return Err(bad(
            400,
            "invalid_utf8",
            format!(
                "the request body is not valid UTF-8 (invalid byte at offset {})",
                e.valid_up_to()
            ),
        ));
    }
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for (offset, &b) in bytes.iter().enumerate() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max_depth {
                    return Err(bad(
                        400,
                        "json_too_deep",
                        format!(
                            "the request body nests JSON deeper than {max_depth} levels (at byte {offset})"
                        ),
                    ));
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_escapes_are_found_in_strings_only() {
        assert!(has_nul_escape(br#"{"name":"a\u0000b"}"#));
        assert!(has_nul_escape(br#"{"a\u0000":1}"#));
        assert!(!has_nul_escape(br#"{"name":"a\\u0000b"}"#));
        assert!(has_nul_escape(br#"{"name":"a\\\u0000b"}"#));
        assert!(has_nul_escape(br#"{"name":"\u00001"}"#));
        assert!(!has_nul_escape(br#"{"name":"\u0001","n":0}"#));
        assert!(!has_nul_escape(br#"{"s":"\"","u0000":0}"#));
    }

    #[test]
    fn json_text_checks_name_the_problem() {
        assert!(check_json_text(br#"{"a":[1,{"b":"[[[[{{"}]}"#, 3).is_ok());
        let deep = "[".repeat(65) + &"]".repeat(65);
        let e = check_json_text(deep.as_bytes(), 64).expect_err("too deep");
        assert_eq!(e.code.as_deref(), Some("json_too_deep"));
        assert!(e.message.contains("64 levels"), "{}", e.message);
        assert!(check_json_text("[".repeat(64).as_bytes(), 64).is_ok());
        // Brackets inside strings, escaped quotes included, do not count.
        assert!(check_json_text(br#"{"s":"\"[[[[[["}"#, 1).is_ok());
        let e = check_json_text(b"{\"a\":\"\xff\"}", 64).expect_err("utf-8");
        assert_eq!(e.code.as_deref(), Some("invalid_utf8"));
        assert!(e.message.contains("offset 6"), "{}", e.message);
    }
}
