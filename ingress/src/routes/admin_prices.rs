//! `/api/admin/prices`: the price history (GET) and setting a model's price from an
//! instant on (PUT or POST), which appends a `PriceSet` event. The billing projector turns
//! it into the `prices` read model, so requests are billed at the price in force when they
//! happened, and the ingress picks it up for quota estimates at its next refresh.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::sync::Arc;

use schemas::config::PriceConfig;
use schemas::events::{Event, PriceSet};
use schemas::Nanos;

use crate::accounts::{db_error, AccountError};
use crate::auth::Admin;
use crate::error::ApiError;
use crate::routes::body::{ApiJson, ApiQuery};
use crate::routes::keys::{usd, usd_opt};
use crate::state::AppState;

#[derive(Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct PriceView {
    model: String,
    effective_at: DateTime<Utc>,
    #[serde(serialize_with = "usd")]
    #[schema(value_type = String)]
    input_per_mtok: i64,
    #[serde(serialize_with = "usd")]
    #[schema(value_type = String)]
    output_per_mtok: i64,
    #[serde(serialize_with = "usd_opt")]
    #[schema(value_type = Option<String>, required = true)]
    cached_input_per_mtok: Option<i64>,
    #[serde(serialize_with = "usd")]
    #[schema(value_type = String)]
    per_request: i64,
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PriceFilter {
    #[serde(default)]
    model: Option<String>,
}

/// Every price row, newest first per model.
#[utoipa::path(
    get,
    path = "/api/admin/prices",
    operation_id = "adminListPrices",
    tag = "admin",
    params(PriceFilter),
    responses(
        (status = 200, description = "Every price row (USD, decimal strings)", body = crate::openapi::PriceList),
        (status = 400, description = "Invalid query"),
        (status = 401, description = "Missing credentials"),
        (status = 403, description = "Not an admin"),
    ),
    security(("admin_token" = [])),
)]
pub async fn list(
    _: Admin,
    State(state): State<Arc<AppState>>,
    ApiQuery(filter): ApiQuery<PriceFilter>,
) -> Result<Json<Value>, ApiError> {
    let prices: Vec<PriceView> = sqlx::query_as(
        "SELECT model, effective_at, input_per_mtok, output_per_mtok, cached_input_per_mtok, per_request
         FROM prices WHERE ($1::text IS NULL OR model = $1)
         ORDER BY model, effective_at DESC, position DESC",
    )
    .bind(&filter.model)
    .fetch_all(&state.pool)
    .await
    .map_err(db_error)?;
    Ok(Json(json!({ "data": prices })))
}

/// `GET /api/prices` for any signed-in caller: the prices this gateway charges now (as
/// its quota estimates see them; billing uses the price in force when a request ran).
#[utoipa::path(
    get,
    path = "/api/prices",
    operation_id = "listPrices",
    tag = "accounts",
    responses(
        (status = 200, description = "The prices in force now (USD, decimal strings)", body = crate::openapi::CurrentPriceList),
        (status = 401, description = "Missing or invalid credentials"),
    ),
    security(("api_key" = []), ("x_api_key" = []), ("session_token" = [])),
)]
pub async fn current(
    State(state): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
) -> Result<Json<Value>, ApiError> {
    // Any API key (with or without an owner) or session token may read prices.
    let bearer = crate::auth::bearer_token(&headers).unwrap_or_default();
    if crate::jwt::looks_like_jwt(bearer) {
        crate::accounts::resolve(&state, bearer).await?;
    } else {
        crate::auth::authenticate(&state.directory, &headers)?;
    }
    let usd = |n: Nanos| n.to_usd_string();
    let data: Vec<Value> = state
        .directory
        .prices()
        .into_iter()
        .map(|(model, p)| {
            json!({
                "model": model,
                "input_per_mtok": usd(p.input_per_mtok),
                "output_per_mtok": usd(p.output_per_mtok),
                "cached_input_per_mtok": p.cached_input_per_mtok.map(usd),
                "per_request": usd(p.per_request),
            })
        })
        .collect();
    Ok(Json(json!({ "data": data })))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetPrice {
    #[schema(min_length = 1, pattern = r"\S")]
    model: String,
    /// USD per million tokens, decimal strings.
    #[schema(pattern = r"^[0-9]{1,9}(\.[0-9]{1,9})?$")]
    input_per_mtok: String,
    #[schema(pattern = r"^[0-9]{1,9}(\.[0-9]{1,9})?$")]
    output_per_mtok: String,
    #[serde(default)]
    #[schema(pattern = r"^[0-9]{1,9}(\.[0-9]{1,9})?$")]
    cached_input_per_mtok: Option<String>,
    /// USD per request.
    #[serde(default)]
    #[schema(pattern = r"^[0-9]{1,9}(\.[0-9]{1,9})?$")]
    per_request: Option<String>,
    /// Default: now.
    #[serde(default)]
    effective_at: Option<DateTime<Utc>>,
}

/// Set a model's price from an instant on
///
/// Appends a `PriceSet` event; billing applies it. Prices are decimal USD strings per
/// million tokens (`per_request`: per request).
#[utoipa::path(
    method(put, post),
    path = "/api/admin/prices",
    operation_id = "adminSetPrice",
    tag = "admin",
    request_body = SetPrice,
    responses(
        (status = 202, description = "Recorded; billing applies it", body = crate::openapi::PriceSetResult),
        (status = 400, description = "Invalid body"),
        (status = 401, description = "Missing credentials"),
        (status = 403, description = "Not an admin"),
        (status = 503, description = "The event log is unavailable; nothing was recorded"),
    ),
    security(("admin_token" = [])),
)]
pub async fn set(
    _: Admin,
    State(state): State<Arc<AppState>>,
    ApiJson(body): ApiJson<SetPrice>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let model = body.model.trim().to_owned();
    if model.is_empty() {
        return Err(AccountError::invalid("model", "`model` is required").into());
    }
    let config = PriceConfig {
        model: model.clone(),
        input_per_mtok: body.input_per_mtok,
        output_per_mtok: body.output_per_mtok,
        cached_input_per_mtok: body.cached_input_per_mtok,
        per_request: body.per_request,
    };
    let price = config
        .to_price()
        .map_err(|e| AccountError::invalid("price", e.to_string()))?;
    let effective_at = body.effective_at.unwrap_or_else(Utc::now);
    let event = Event::PriceSet(PriceSet {
        model: model.clone(),
        price,
        effective_at,
    });
    let envelope = event.into_envelope(Utc::now(), schemas::events::Metadata::default());
    let event_id = envelope.event_id;
    // Money: unlike audit events, the answer waits for JetStream's ack and fails without it.
    projector::bus::publish_event(&state.js, &state.ns, &envelope)
        .await
        .map_err(|_| ApiError::QueueUnavailable)?
        .await
        .map_err(|_| ApiError::QueueUnavailable)?;
    let usd = |n: Nanos| n.to_usd_string();
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "event_id": event_id,
            "model": model,
            "effective_at": effective_at,
            "input_per_mtok": usd(price.input_per_mtok),
            "output_per_mtok": usd(price.output_per_mtok),
            "cached_input_per_mtok": price.cached_input_per_mtok.map(usd),
            "per_request": usd(price.per_request),
        })),
    ))
}
