//! `GET /api/usage` (the caller's keys) and `GET /api/admin/usage` (everyone, or one user
//! or key): totals and breakdowns by day, model and key, read from the billing projector's
//! `daily_usage`. Token counts use OpenAI's names; money is a decimal USD string (`cost`,
//! of which `plan_cost` was paid by the user's plan and the rest by the balance).
//! Query: `from`, `to` (UTC days, inclusive; default the last 30 days), `key_id`, and for
//! admins `user_id`.
//!
//! `GET /api/me/balance` (and `GET /api/admin/users/{id}/balance`): the caller's money —
//! credits granted to them or to any of their keys, what the balance paid, what is left —
//! and their plan this month.

use axum::extract::State;
use axum::Json;
use chrono::{Duration, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use uuid::Uuid;

use schemas::Nanos;

use crate::accounts::{db_error, AccountError, AuthUser};
use crate::auth::Admin;
use crate::error::ApiError;
use crate::routes::body::ApiQuery;
use crate::state::AppState;

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    #[serde(default)]
    from: Option<NaiveDate>,
    #[serde(default)]
    to: Option<NaiveDate>,
    #[serde(default)]
    key_id: Option<Uuid>,
    #[serde(default)]
    user_id: Option<Uuid>,
}

#[derive(sqlx::FromRow)]
struct Row {
    day: NaiveDate,
    key_id: Uuid,
    model: String,
    requests: i64,
    prompt_tokens: i64,
    completion_tokens: i64,
    cached_tokens: i64,
    cost_nanos: i64,
    plan_nanos: i64,
    key_name: Option<String>,
    key_prefix: Option<String>,
    user_id: Option<Uuid>,
}

#[derive(Default, Clone, Copy)]
struct Sum {
    requests: i64,
    prompt: i64,
    completion: i64,
    cached: i64,
    cost: i64,
    plan: i64,
}

impl Sum {
    fn add(&mut self, r: &Row) {
        self.requests += r.requests;
        self.prompt += r.prompt_tokens;
        self.completion += r.completion_tokens;
        self.cached += r.cached_tokens;
        self.cost += r.cost_nanos;
        self.plan += r.plan_nanos;
    }

    fn json(&self) -> serde_json::Map<String, Value> {
        let v = json!({
            "requests": self.requests,
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
            "prompt_tokens_details": {"cached_tokens": self.cached},
            "cost": Nanos(self.cost).to_usd_string(),
            "plan_cost": Nanos(self.plan).to_usd_string(),
        });
        match v {
            Value::Object(m) => m,
            _ => serde_json::Map::new(),
        }
    }
}

#[derive(Serialize)]
struct Range {
    from: NaiveDate,
    to: NaiveDate,
}

/// The caller's usage
///
/// Totals and breakdowns by day, model and key over UTC days `from`..=`to` (default: the
/// last 30 days). Money is a decimal USD string.
#[utoipa::path(
    get,
    path = "/api/usage",
    operation_id = "getUsage",
    tag = "accounts",
    params(UsageQuery),
    responses(
        (status = 200, description = "The usage report", body = crate::openapi::UsageReport),
        (status = 400, description = "Invalid query (`from` after `to`, unknown parameter)"),
        (status = 401, description = "Missing or invalid credentials"),
        (status = 403, description = "The API key belongs to no user"),
        (status = 404, description = "`key_id` or `user_id` is not the caller's"),
    ),
    security(("session_token" = []), ("api_key" = [])),
)]
pub async fn own(
    State(state): State<Arc<AppState>>,
    caller: AuthUser,
    ApiQuery(q): ApiQuery<UsageQuery>,
) -> Result<Json<Value>, ApiError> {
    if q.user_id.is_some_and(|u| u != caller.user_id) {
        return Err(AccountError::NotFound("user").into());
    }
    if let Some(key) = q.key_id {
        let owned: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM api_keys WHERE id = $1 AND user_id = $2")
                .bind(key)
                .bind(caller.user_id)
                .fetch_optional(&state.pool)
                .await
                .map_err(db_error)?;
        owned.ok_or(AccountError::NotFound("key"))?;
    }
    report(&state, Some(caller.user_id), q, false).await
}

/// Usage of everyone, one user or one key
#[utoipa::path(
    get,
    path = "/api/admin/usage",
    operation_id = "adminGetUsage",
    tag = "admin",
    params(UsageQuery),
    responses(
        (status = 200, description = "The usage report, with `by_user`", body = crate::openapi::UsageReport),
        (status = 400, description = "Invalid query"),
        (status = 401, description = "Missing credentials"),
        (status = 403, description = "Not an admin"),
    ),
    security(("admin_token" = [])),
)]
pub async fn admin(
    _: Admin,
    State(state): State<Arc<AppState>>,
    ApiQuery(q): ApiQuery<UsageQuery>,
) -> Result<Json<Value>, ApiError> {
    let user = q.user_id;
    report(&state, user, q, true).await
}

async fn report(
    state: &AppState,
    user: Option<Uuid>,
    q: UsageQuery,
    by_user: bool,
) -> Result<Json<Value>, ApiError> {
    let to = q.to.unwrap_or_else(|| Utc::now().date_naive());
    let from = q.from.unwrap_or(to - Duration::days(29));
    if from > to {
        return Err(AccountError::invalid("from", "`from` is after `to`").into());
    }
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT d.day, d.key_id, d.model, d.requests, d.prompt_tokens, d.completion_tokens, d.cached_tokens,
                d.cost_nanos, d.plan_nanos, k.name AS key_name, k.prefix AS key_prefix, k.user_id
         FROM daily_usage d LEFT JOIN api_keys k ON k.id = d.key_id
         WHERE d.day >= $1 AND d.day <= $2
           AND ($3::uuid IS NULL OR k.user_id = $3) AND ($4::uuid IS NULL OR d.key_id = $4)",
    )
    .bind(from)
    .bind(to)
    .bind(user)
    .bind(q.key_id)
    .fetch_all(&state.pool)
    .await
    .map_err(db_error)?;

    let mut totals = Sum::default();
    let mut days: BTreeMap<NaiveDate, Sum> = BTreeMap::new();
    let mut models: BTreeMap<String, Sum> = BTreeMap::new();
    let mut keys: BTreeMap<Uuid, (Sum, Option<String>, Option<String>)> = BTreeMap::new();
    let mut users: BTreeMap<Option<Uuid>, Sum> = BTreeMap::new();
    for r in &rows {
        totals.add(r);
        days.entry(r.day).or_default().add(r);
        models.entry(r.model.clone()).or_default().add(r);
        let k = keys
            .entry(r.key_id)
            .or_insert_with(|| (Sum::default(), r.key_name.clone(), r.key_prefix.clone()));
        k.0.add(r);
        users.entry(r.user_id).or_default().add(r);
    }
    let with = |mut m: serde_json::Map<String, Value>, k: &str, v: Value| {
        m.insert(k.to_owned(), v);
        Value::Object(m)
    };
    let mut out = json!({
        "range": Range { from, to },
        "totals": Value::Object(totals.json()),
        "by_day": days.iter().map(|(d, s)| with(s.json(), "day", json!(d))).collect::<Vec<_>>(),
        "by_model": models.iter().map(|(m, s)| with(s.json(), "model", json!(m))).collect::<Vec<_>>(),
        "by_key": keys.iter().map(|(id, (s, name, prefix))| {
            let mut m = s.json();
            m.insert("name".into(), json!(name));
            m.insert("prefix".into(), json!(prefix));
            with(m, "key_id", json!(id))
        }).collect::<Vec<_>>(),
    });
    if by_user {
        if let Value::Object(map) = &mut out {
            map.insert(
                "by_user".into(),
                users
                    .iter()
                    .map(|(u, s)| with(s.json(), "user_id", json!(u)))
                    .collect(),
            );
        }
    }
    Ok(Json(out))
}

/// A user's money: `credits` (granted to the user or to any of their keys), `spent` (what
/// the balance paid; plans paid the rest), `balance` (what is left), and the plan status.
async fn balance(state: &AppState, user: Uuid) -> Result<Json<Value>, ApiError> {
    let (user_credits, key_credits, spent): (i64, i64, i64) = sqlx::query_as(
        "SELECT COALESCE((SELECT granted_nanos FROM user_balances WHERE user_id = $1), 0)::bigint,
                COALESCE(sum(b.granted_nanos), 0)::bigint,
                COALESCE(sum(b.spent_nanos - b.plan_nanos), 0)::bigint
         FROM api_keys k JOIN key_balances b ON b.key_id = k.id WHERE k.user_id = $1",
    )
    .bind(user)
    .fetch_one(&state.pool)
    .await
    .map_err(db_error)?;
    let credits = user_credits.saturating_add(key_credits);
    let plan = crate::routes::plans::status(state, user).await?;
    Ok(Json(json!({
        "credits": Nanos(credits).to_usd_string(),
        "spent": Nanos(spent).to_usd_string(),
        "balance": Nanos(credits.saturating_sub(spent)).to_usd_string(),
        "plan": plan,
    })))
}

/// The caller's balance and plan
#[utoipa::path(
    get,
    path = "/api/me/balance",
    operation_id = "getBalance",
    tag = "accounts",
    responses(
        (status = 200, description = "Credits, spent, balance (USD) and the plan this month", body = crate::openapi::Balance),
        (status = 401, description = "Missing or invalid credentials"),
        (status = 403, description = "The API key belongs to no user"),
    ),
    security(("session_token" = []), ("api_key" = [])),
)]
pub async fn own_balance(
    State(state): State<Arc<AppState>>,
    caller: AuthUser,
) -> Result<Json<Value>, ApiError> {
    balance(&state, caller.user_id).await
}

/// A user's balance and plan
#[utoipa::path(
    get,
    path = "/api/admin/users/{id}/balance",
    operation_id = "adminGetUserBalance",
    tag = "admin",
    params(("id" = String, Path, description = "The user id (a UUID)")),
    responses(
        (status = 200, description = "Credits, spent, balance (USD) and the plan this month", body = crate::openapi::Balance),
        (status = 401, description = "Missing credentials"),
        (status = 403, description = "Not an admin"),
        (status = 404, description = "No such user"),
    ),
    security(("admin_token" = [])),
)]
pub async fn user_balance(
    _: Admin,
    State(state): State<Arc<AppState>>,
    axum::extract::Path(user): axum::extract::Path<String>,
) -> Result<Json<Value>, ApiError> {
    let user = Uuid::parse_str(&user).map_err(|_| AccountError::NotFound("user"))?;
    let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM users WHERE id = $1")
        .bind(user)
        .fetch_optional(&state.pool)
        .await
        .map_err(db_error)?;
    exists.ok_or(AccountError::NotFound("user"))?;
    balance(&state, user).await
}
