//! `count_tokens` on an Anthropic channel: the provider's own count, so Claude Code's
//! context accounting through Sluice matches Anthropic's exactly. The channel is read from
//! Postgres (this is not the completion hot path) and its sealed key opened with
//! `SLUICE_SECRET_KEY`, as the admin channel test does.

use std::sync::OnceLock;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use serde_json::Value;
use sqlx::Row;

use schemas::work::ErrorKind;

use crate::error::anthropic_error_response;
use crate::state::AppState;

fn http() -> Option<&'static reqwest::Client> {
    static CLIENT: OnceLock<Option<reqwest::Client>> = OnceLock::new();
    CLIENT
        .get_or_init(|| workers::adapters::http_client().ok())
        .as_ref()
}

/// The first enabled Anthropic channel (by priority) serving `model` to `group`.
async fn channel(
    state: &AppState,
    group: &str,
    model: &str,
) -> Result<Option<(String, Option<String>, String)>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT base_url, api_key_sealed, model_map FROM channels \
         WHERE enabled AND channel_type = 'anthropic' AND $1 = ANY(models) \
           AND (cardinality(groups) = 0 OR $2 = ANY(groups)) \
           AND owner_user_id IS NULL \
         ORDER BY priority LIMIT 1",
    )
    .bind(model)
    .bind(group)
    .fetch_optional(&state.pool)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let base: Option<String> = row.try_get("base_url")?;
    let sealed: Option<String> = row.try_get("api_key_sealed")?;
    let map: sqlx::types::Json<Value> = row.try_get("model_map")?;
    let upstream = map
        .0
        .get(model)
        .and_then(Value::as_str)
        .unwrap_or(model)
        .to_owned();
    let base = base.unwrap_or_else(|| workers::adapters::anthropic::DEFAULT_BASE_URL.to_owned());
    Ok(Some((base, sealed, upstream)))
}

/// The provider's answer, or `None` to fall back to the tokenizer (no Anthropic channel,
/// or it could not be reached).
pub async fn upstream(
    state: &AppState,
    group: &str,
    model: &str,
    body: &Value,
    headers: &HeaderMap,
) -> Option<Response> {
    // No channel serves a name with NUL in it (and Postgres cannot even compare one).
    if model.contains('\0') {
        return None;
    }
    let (base, sealed, upstream_model) = match channel(state, group, model).await {
        Ok(found) => found?,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read channels for count_tokens; estimating");
            return None;
        }
    };
    let key = match sealed {
        None => None,
        Some(sealed) => Some(state.opts.secret_key.as_ref()?.open(&sealed).ok()?),
    };
    let mut body = body.clone();
    body["model"] = Value::String(upstream_model);
    let mut call = http()?
        .post(format!(
            "{}/v1/messages/count_tokens",
            base.trim_end_matches('/')
        ))
        .header(
            "anthropic-version",
            workers::adapters::anthropic::API_VERSION,
        )
        .json(&body);
    if let Some(key) = key {
        call = call.header("x-api-key", key);
    }
    for beta in headers.get_all("anthropic-beta") {
        call = call.header("anthropic-beta", beta.clone());
    }
    let resp = match call.send().await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::warn!(error = %e.without_url(), "count_tokens upstream unreachable; estimating");
            return None;
        }
    };
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.ok()?;
    if matches!(status, 401 | 403) {
        // The channel's key was refused: the gateway's problem, not the caller's.
        let info = schemas::work::ApiErrorInfo {
            status: 502,
            kind: ErrorKind::Auth,
            message: "the upstream refused the channel's credentials".into(),
            code: None,
            param: None,
            retry_after: None,
        };
        return Some(anthropic_error_response(&info));
    }
    let mut response = Response::new(Body::from(bytes));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Some(response)
}
