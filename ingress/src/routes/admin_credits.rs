//! Money into keys: `POST /api/admin/credits` grants (or, negative, debits) a key with a
//! note; `POST /api/admin/redemption-codes` mints one-time codes (shown once, stored as a
//! SHA-256 hash); `POST /api/redeem` lets a user turn a code into credit on one of their
//! keys. Each movement is a `CreditGranted` event, which the billing projector folds into
//! the key's balance.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use uuid::Uuid;

use schemas::events::{CreditGranted, Event, Metadata};
use schemas::Nanos;

use crate::accounts::{db_error, AccountError, AuthUser};
use crate::auth::Admin;
use crate::directory::hash_key;
use crate::error::ApiError;
use crate::routes::body::ApiJson;
use crate::state::AppState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreditBody {
    key_id: Uuid,
    /// USD, decimal string; negative debits.
    amount: String,
    #[serde(default)]
    note: String,
}

fn amount(s: &str) -> Result<Nanos, AccountError> {
    let n = Nanos::from_usd_str(s).map_err(|e| AccountError::invalid("amount", e.to_string()))?;
    if n.0 == 0 {
        return Err(AccountError::invalid("amount", "`amount` must not be zero"));
    }
    Ok(n)
}

/// Publishes a `CreditGranted` and waits for JetStream's ack: money is never "probably" moved.
async fn publish_credit(
    state: &AppState,
    credit: CreditGranted,
    user_id: Option<Uuid>,
) -> Result<Uuid, ApiError> {
    let envelope = Event::CreditGranted(credit).into_envelope(
        Utc::now(),
        Metadata {
            trace_id: None,
            key_id: None,
            user_id,
        },
    );
    let id = envelope.event_id;
    projector::bus::publish_event(&state.js, &state.ns, &envelope)
        .await
        .map_err(|_| ApiError::QueueUnavailable)?
        .await
        .map_err(|_| ApiError::QueueUnavailable)?;
    Ok(id)
}

pub async fn grant(
    _: Admin,
    State(state): State<Arc<AppState>>,
    ApiJson(body): ApiJson<CreditBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let amount = amount(&body.amount)?;
    let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM api_keys WHERE id = $1")
        .bind(body.key_id)
        .fetch_optional(&state.pool)
        .await
        .map_err(db_error)?;
    exists.ok_or(AccountError::NotFound("key"))?;
    let note = body.note.chars().take(500).collect::<String>();
    let event_id = publish_credit(
        &state,
        CreditGranted {
            key_id: body.key_id,
            amount,
            note: note.clone(),
        },
        None,
    )
    .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "event_id": event_id,
            "key_id": body.key_id,
            "amount": amount.to_usd_string(),
            "note": note,
        })),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodesBody {
    /// USD per code.
    amount: String,
    #[serde(default = "one")]
    count: u32,
    #[serde(default)]
    note: String,
    #[serde(default)]
    expires_at: Option<DateTime<Utc>>,
}

fn one() -> u32 {
    1
}

/// Mints `count` codes worth `amount` each; the codes are in this answer only.
pub async fn mint_codes(
    _: Admin,
    State(state): State<Arc<AppState>>,
    ApiJson(body): ApiJson<CodesBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let amount = amount(&body.amount)?;
    if amount.0 < 0 {
        return Err(AccountError::invalid("amount", "a code's `amount` must be positive").into());
    }
    if body.count == 0 || body.count > 1000 {
        return Err(AccountError::invalid("count", "`count` must be 1 to 1000").into());
    }
    let mut tx = state.pool.begin().await.map_err(db_error)?;
    let mut codes = Vec::with_capacity(body.count as usize);
    for _ in 0..body.count {
        let bytes: [u8; 20] = rand::random();
        let code = format!("rc-{}", hex::encode(bytes));
        let id = schemas::new_id();
        sqlx::query(
            "INSERT INTO redemption_codes (id, code_hash, prefix, amount_nanos, note, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(id)
        .bind(hash_key(&code))
        .bind(format!("{}…", &code[..9]))
        .bind(amount.0)
        .bind(&body.note)
        .bind(body.expires_at)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        codes.push(json!({"id": id, "code": code}));
    }
    tx.commit().await.map_err(db_error)?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"amount": amount.to_usd_string(), "codes": codes})),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedeemBody {
    code: String,
    /// One of the caller's keys; default: the key making the call.
    #[serde(default)]
    key_id: Option<Uuid>,
}

/// Marks the code used and publishes the credit inside one transaction: the row commits
/// only after JetStream acknowledged the credit, so a code is never spent without credit.
pub async fn redeem(
    State(state): State<Arc<AppState>>,
    caller: AuthUser,
    ApiJson(body): ApiJson<RedeemBody>,
) -> Result<Json<Value>, ApiError> {
    let key_id = body
        .key_id
        .or(caller.key_id)
        .ok_or_else(|| AccountError::invalid("key_id", "`key_id` is required"))?;
    let owned: Option<i32> = sqlx::query_scalar(
        "SELECT 1 FROM api_keys WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL",
    )
    .bind(key_id)
    .bind(caller.user_id)
    .fetch_optional(&state.pool)
    .await
    .map_err(db_error)?;
    owned.ok_or(AccountError::NotFound("key"))?;
    let mut tx = state.pool.begin().await.map_err(db_error)?;
    let row: Option<(Uuid, i64, String)> = sqlx::query_as(
        "UPDATE redemption_codes SET redeemed_at = now(), redeemed_by = $2, redeemed_key = $3
         WHERE code_hash = $1 AND redeemed_at IS NULL AND (expires_at IS NULL OR expires_at > now())
         RETURNING id, amount_nanos, prefix",
    )
    .bind(hash_key(body.code.trim()))
    .bind(caller.user_id)
    .bind(key_id)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db_error)?;
    let (code_id, nanos, prefix) = row.ok_or(AccountError::NotFound(
        "redemption code (or it was already used)",
    ))?;
    let event_id = publish_credit(
        &state,
        CreditGranted {
            key_id,
            amount: Nanos(nanos),
            note: format!("redemption code {prefix} ({code_id})"),
        },
        Some(caller.user_id),
    )
    .await?;
    tx.commit().await.map_err(db_error)?;
    Ok(Json(json!({
        "event_id": event_id,
        "key_id": key_id,
        "amount": Nanos(nanos).to_usd_string(),
    })))
}
