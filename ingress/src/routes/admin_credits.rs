//! Money into accounts: `POST /api/admin/credits` grants (or, negative, debits) a user or
//! a key with a note; `POST /api/admin/redemption-codes` mints one-time codes (shown once,
//! stored as a SHA-256 hash); `POST /api/redeem` lets a user turn a code into credit on
//! their balance (or, naming one, on one of their keys). Each movement is an event
//! (`UserCreditGranted`, `CreditGranted`) that the billing projector folds into
//! `user_balances` / `key_balances`.
//!
//! Whose money it is: a user's balance is shared by all their keys, and credit granted to
//! a key that has a user counts towards that user's balance too (the key is recorded, and
//! its own quota, if any, stays a cap on that key). A key without a user spends only its
//! own quota and credits.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use uuid::Uuid;

use schemas::events::{CreditGranted, Event, Metadata, UserCreditGranted};
use schemas::Nanos;

use crate::accounts::{db_error, AccountError, AuthUser};
use crate::auth::Admin;
use crate::directory::hash_key;
use crate::error::ApiError;
use crate::routes::body::ApiJson;
use crate::state::AppState;

/// Exactly one of `user_id` and `key_id`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreditBody {
    #[serde(default)]
    user_id: Option<Uuid>,
    #[serde(default)]
    key_id: Option<Uuid>,
    /// USD, decimal string; negative debits.
    #[schema(pattern = r"^-?[0-9]{1,9}(\.[0-9]{1,9})?$")]
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

/// How long a money change waits for billing to apply it before answering 202.
const PROJECTION_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// A money event published to the log.
#[derive(Debug, Clone, Copy)]
pub struct Published {
    pub event_id: Uuid,
    /// Its log position (the JetStream stream sequence the journal stores it at).
    pub position: i64,
    /// Whether billing had applied it when the call returned.
    pub projected: bool,
}

/// Publishes a money event and waits for JetStream's ack (money is never "probably"
/// moved), then up to a few seconds for the billing projector to apply it, so the caller
/// usually reads its own write; the read models are billing's alone to write.
pub async fn publish_money_event(
    state: &AppState,
    event: Event,
    user_id: Option<Uuid>,
) -> Result<Published, ApiError> {
    let envelope = event.into_envelope(
        Utc::now(),
        Metadata {
            trace_id: None,
            key_id: None,
            user_id,
        },
    );
    let ack = projector::bus::publish_event(&state.js, &state.ns, &envelope)
        .await
        .map_err(|_| ApiError::QueueUnavailable)?
        .await
        .map_err(|_| ApiError::QueueUnavailable)?;
    let position = i64::try_from(ack.sequence).unwrap_or(i64::MAX);
    let deadline = tokio::time::Instant::now() + PROJECTION_WAIT;
    let projected = loop {
        let billed: Option<i64> =
            sqlx::query_scalar("SELECT position FROM checkpoints WHERE projector = $1")
                .bind(billing::BillingProjection::NAME)
                .fetch_optional(&state.pool)
                .await
                .ok()
                .flatten();
        if billed.is_some_and(|p| p >= position) {
            break true;
        }
        if tokio::time::Instant::now() >= deadline {
            break false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    Ok(Published {
        event_id: envelope.event_id,
        position,
        projected,
    })
}

/// Publishes a credit; once billing applied it, this ingress admits with it at once.
async fn publish_credit(
    state: &AppState,
    event: Event,
    user_id: Option<Uuid>,
) -> Result<Uuid, ApiError> {
    let published = publish_money_event(state, event, user_id).await?;
    if published.projected {
        if let Err(e) = state.directory.refresh(&state.pool).await {
            tracing::warn!(error = %e, "cannot refresh the key directory after a credit");
        }
    }
    Ok(published.event_id)
}

/// Grant (or, negative, debit) credit to a user or a key
///
/// Name exactly one of `user_id` and `key_id`. Answers once JetStream stored the event.
#[utoipa::path(
    post,
    path = "/api/admin/credits",
    operation_id = "adminGrantCredit",
    tag = "admin",
    request_body = CreditBody,
    responses(
        (status = 202, description = "Recorded", body = crate::openapi::CreditGranted),
        (status = 400, description = "Invalid body"),
        (status = 401, description = "Missing credentials"),
        (status = 403, description = "Not an admin"),
        (status = 404, description = "No such user or key"),
        (status = 503, description = "The event log is unavailable; nothing was recorded"),
    ),
    security(("admin_token" = [])),
)]
pub async fn grant(
    _: Admin,
    State(state): State<Arc<AppState>>,
    ApiJson(body): ApiJson<CreditBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let amount = amount(&body.amount)?;
    let note = body.note.chars().take(500).collect::<String>();
    let (event, target) = match (body.user_id, body.key_id) {
        (Some(user_id), None) => {
            let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM users WHERE id = $1")
                .bind(user_id)
                .fetch_optional(&state.pool)
                .await
                .map_err(db_error)?;
            exists.ok_or(AccountError::NotFound("user"))?;
            let event = Event::UserCreditGranted(UserCreditGranted {
                user_id,
                amount,
                note: note.clone(),
            });
            (event, json!({"user_id": user_id}))
        }
        (None, Some(key_id)) => {
            let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM api_keys WHERE id = $1")
                .bind(key_id)
                .fetch_optional(&state.pool)
                .await
                .map_err(db_error)?;
            exists.ok_or(AccountError::NotFound("key"))?;
            let event = Event::CreditGranted(CreditGranted {
                key_id,
                amount,
                note: note.clone(),
            });
            (event, json!({"key_id": key_id}))
        }
        _ => {
            return Err(AccountError::invalid(
                "user_id",
                "name exactly one of `user_id` (the user's balance) and `key_id`",
            )
            .into())
        }
    };
    let event_id = publish_credit(&state, event, None).await?;
    let mut answer = json!({
        "event_id": event_id,
        "amount": amount.to_usd_string(),
        "note": note,
    });
    if let (Value::Object(a), Value::Object(t)) = (&mut answer, target) {
        a.extend(t);
    }
    Ok((StatusCode::ACCEPTED, Json(answer)))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CodesBody {
    /// USD per code.
    #[schema(pattern = r"^[0-9]{1,9}(\.[0-9]{1,9})?$")]
    amount: String,
    #[serde(default = "one")]
    #[schema(minimum = 1, maximum = 1000)]
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
#[utoipa::path(
    post,
    path = "/api/admin/redemption-codes",
    operation_id = "adminMintRedemptionCodes",
    tag = "admin",
    request_body = CodesBody,
    responses(
        (status = 201, description = "The codes, shown this once", body = crate::openapi::MintedCodes),
        (status = 400, description = "Invalid body (`count` 1 to 1000, positive `amount`)"),
        (status = 401, description = "Missing credentials"),
        (status = 403, description = "Not an admin"),
    ),
    security(("admin_token" = [])),
)]
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

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RedeemBody {
    code: String,
    /// One of the caller's keys; default: the caller's balance, shared by all their keys.
    #[serde(default)]
    key_id: Option<Uuid>,
}

/// Marks the code used and publishes the credit inside one transaction: the row commits
/// only after JetStream acknowledged the credit, so a code is never spent without credit.
#[utoipa::path(
    post,
    path = "/api/redeem",
    operation_id = "redeemCode",
    tag = "accounts",
    request_body = RedeemBody,
    responses(
        (status = 200, description = "Credited", body = crate::openapi::Redeemed),
        (status = 400, description = "Invalid body"),
        (status = 401, description = "Missing or invalid credentials"),
        (status = 403, description = "The API key belongs to no user"),
        (status = 404, description = "No such code (or it was used or expired), or no such key of the caller's"),
        (status = 503, description = "The event log is unavailable; the code was not spent"),
    ),
    security(("session_token" = []), ("api_key" = [])),
)]
pub async fn redeem(
    State(state): State<Arc<AppState>>,
    caller: AuthUser,
    ApiJson(body): ApiJson<RedeemBody>,
) -> Result<Json<Value>, ApiError> {
    if let Some(key_id) = body.key_id {
        let owned: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM api_keys WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL",
        )
        .bind(key_id)
        .bind(caller.user_id)
        .fetch_optional(&state.pool)
        .await
        .map_err(db_error)?;
        owned.ok_or(AccountError::NotFound("key"))?;
    }
    let mut tx = state.pool.begin().await.map_err(db_error)?;
    let row: Option<(Uuid, i64, String)> = sqlx::query_as(
        "UPDATE redemption_codes SET redeemed_at = now(), redeemed_by = $2, redeemed_key = $3
         WHERE code_hash = $1 AND redeemed_at IS NULL AND (expires_at IS NULL OR expires_at > now())
         RETURNING id, amount_nanos, prefix",
    )
    .bind(hash_key(body.code.trim()))
    .bind(caller.user_id)
    .bind(body.key_id)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db_error)?;
    let (code_id, nanos, prefix) = row.ok_or(AccountError::NotFound(
        "redemption code (or it was already used)",
    ))?;
    let note = format!("redemption code {prefix} ({code_id})");
    let event = match body.key_id {
        Some(key_id) => Event::CreditGranted(CreditGranted {
            key_id,
            amount: Nanos(nanos),
            note,
        }),
        None => Event::UserCreditGranted(UserCreditGranted {
            user_id: caller.user_id,
            amount: Nanos(nanos),
            note,
        }),
    };
    let event_id = publish_credit(&state, event, Some(caller.user_id)).await?;
    tx.commit().await.map_err(db_error)?;
    Ok(Json(json!({
        "event_id": event_id,
        "key_id": body.key_id,
        "user_id": caller.user_id,
        "amount": Nanos(nanos).to_usd_string(),
    })))
}
