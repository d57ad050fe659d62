//! Every error the ingress answers with, mapped in one place to a status and OpenAI's
//! error shape. Client errors are expected and not logged as errors.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use schemas::openai::InvalidRequest;
use schemas::work::{ApiErrorInfo, ErrorKind};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing API key: send `Authorization: Bearer sk-…`")]
    MissingKey,
    #[error("incorrect API key provided")]
    InvalidKey,
    #[error("this route needs admin rights")]
    Forbidden,
    #[error("{0}")]
    InvalidRequest(#[from] InvalidRequest),
    #[error("the request body is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("the request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("the model `{0}` does not exist or you do not have access to it")]
    ModelNotFound(String),
    #[error("no channel is available for the model `{0}`; try again later")]
    NoChannel(String),
    #[error("rate limit reached for this key: {limit} requests per minute")]
    RateLimited { limit: u32, retry_after: u64 },
    #[error("you exceeded your current quota; add credit to this key")]
    InsufficientQuota,
    #[error("the gateway timed out waiting for the model's answer")]
    Timeout,
    #[error("the gateway's queue is unavailable; try again shortly")]
    QueueUnavailable,
    #[error("{}", .0.message)]
    Upstream(ApiErrorInfo),
    #[error("unknown route")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("an internal error occurred")]
    Internal,
    #[error(transparent)]
    Account(#[from] crate::accounts::AccountError),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::MissingKey | ApiError::InvalidKey => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::InvalidRequest(_) | ApiError::MalformedJson(_) => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::ModelNotFound(_) | ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::NoChannel(_) | ApiError::QueueUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::RateLimited { .. } | ApiError::InsufficientQuota => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Upstream(info) => {
                StatusCode::from_u16(info.status).unwrap_or(StatusCode::BAD_GATEWAY)
            }
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Account(e) => e.status(),
        }
    }

    /// The error as the worker frames carry it, so streams and plain responses share one shape.
    pub fn info(&self) -> ApiErrorInfo {
        if let ApiError::Upstream(info) = self {
            return info.clone();
        }
        let (kind, code, param, retry_after) = match self {
            ApiError::MissingKey | ApiError::InvalidKey => {
                (ErrorKind::Auth, Some("invalid_api_key"), None, None)
            }
            ApiError::Forbidden => (ErrorKind::Auth, Some("forbidden"), None, None),
            ApiError::InvalidRequest(e) => (ErrorKind::BadRequest, None, e.param.clone(), None),
            ApiError::MalformedJson(_) => (ErrorKind::BadRequest, None, None, None),
            ApiError::PayloadTooLarge { .. } => {
                (ErrorKind::BadRequest, Some("request_too_large"), None, None)
            }
            ApiError::ModelNotFound(_) => (
                ErrorKind::BadRequest,
                Some("model_not_found"),
                Some("model".to_owned()),
                None,
            ),
            ApiError::NoChannel(_) => (
                ErrorKind::NoChannel,
                Some("no_channel_available"),
                None,
                Some(1),
            ),
            ApiError::RateLimited { retry_after, .. } => (
                ErrorKind::RateLimited,
                Some("rate_limit_exceeded"),
                None,
                Some(*retry_after),
            ),
            ApiError::InsufficientQuota => (
                ErrorKind::RateLimited,
                Some("insufficient_quota"),
                None,
                None,
            ),
            ApiError::Timeout => (ErrorKind::Timeout, Some("timeout"), None, None),
            ApiError::QueueUnavailable => (
                ErrorKind::Overloaded,
                Some("queue_unavailable"),
                None,
                Some(1),
            ),
            ApiError::NotFound => (ErrorKind::BadRequest, Some("unknown_url"), None, None),
            ApiError::MethodNotAllowed => (
                ErrorKind::BadRequest,
                Some("method_not_allowed"),
                None,
                None,
            ),
            ApiError::Internal | ApiError::Upstream(_) => (ErrorKind::Internal, None, None, None),
            ApiError::Account(e) => e.parts(),
        };
        ApiErrorInfo {
            status: self.status().as_u16(),
            kind,
            message: self.to_string(),
            code: code.map(str::to_owned),
            param,
            retry_after,
        }
    }
}

/// Builds the OpenAI-shaped error response for an error as frames carry it.
pub fn error_response(info: &ApiErrorInfo) -> Response {
    let status = StatusCode::from_u16(info.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut response = (status, Json(schemas::openai::error_json(info))).into_response();
    if let Some(secs) = info.retry_after {
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    response
}

/// The same error in Anthropic's shape (`{"type":"error","error":{"type","message"}}`),
/// for the `/v1/messages` surface.
pub fn anthropic_error_response(info: &ApiErrorInfo) -> Response {
    // Anthropic says "overloaded" with 529, where the OpenAI surface uses 503.
    let info = &match (info.status, info.kind) {
        (503, ErrorKind::Overloaded) => ApiErrorInfo {
            status: 529,
            ..info.clone()
        },
        _ => info.clone(),
    };
    let status = StatusCode::from_u16(info.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut response = (status, Json(schemas::anthropic::error_json(info))).into_response();
    if let Some(secs) = info.retry_after {
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    response
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error_response(&self.info())
    }
}
