//! Plans: monthly subscriptions with a quota (USD) and a model allow-list.
//!
//! - Admins: `GET/POST /api/admin/plans`, `GET/PATCH /api/admin/plans/{id}`, and
//!   `GET/PUT /api/admin/users/{id}/plan` to assign a plan to a user (`{"plan_id": null}`
//!   ends it).
//! - Users: `GET /api/plans` (the public plans, which users may pick themselves, and their
//!   own), `POST /api/plans/{id}/subscribe`, `GET /api/me/plan` (the plan, this month's
//!   period, used and remaining quota) and `DELETE /api/me/plan`.
//!
//! Plans are money, so every change is an event (`PlanConfigured`, `PlanSubscribed`,
//! `PlanUnsubscribed`) and the billing projector is the only writer of the plan tables: a
//! replay rebuilds them. A change answers once billing has applied it (then this ingress
//! uses it at once, others within one directory refresh), or with 202 if billing has not
//! caught up within a few seconds (it is then applied when it does).
//!
//! Rules (see `billing::plans`): the quota is per calendar month in UTC; a charge on a
//! model of the allow-list (empty = every model) is paid from the plan first, then from
//! the balance; a model outside the list is paid from the balance like any request of a
//! user without a plan. Sluice takes no payments: a public plan is free to whoever picks
//! it (a free tier); paid plans are assigned by an admin.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use uuid::Uuid;

use schemas::events::{Event, PlanConfigured, PlanSubscribed, PlanUnsubscribed};
use schemas::Nanos;

use crate::accounts::{db_error, AccountError, AuthUser};
use crate::auth::Admin;
use crate::error::ApiError;
use crate::routes::admin_credits::{publish_money_event, Published};
use crate::routes::body::{double_option, ApiJson};
use crate::routes::keys::usd;
use crate::state::AppState;

/// The id of a plan declared in `sluice.yaml`, derived from its name, so that running
/// `sluice migrate` again (even before billing projected the first run) updates the same
/// plan instead of creating a second one.
pub fn config_plan_id(name: &str) -> Uuid {
    let digest = Sha256::digest(format!("sluice plan {name}").as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// A plan as the API shows it.
#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct PlanView {
    #[sqlx(rename = "plan_id")]
    pub id: Uuid,
    pub name: String,
    /// USD per calendar month (UTC).
    #[sqlx(rename = "quota_nanos")]
    #[serde(serialize_with = "usd")]
    #[schema(value_type = String)]
    pub quota: i64,
    /// Models the plan pays for; empty = every model.
    pub models: Vec<String>,
    pub public: bool,
    /// Users on the plan now.
    pub subscribers: i64,
    pub updated_at: DateTime<Utc>,
}

const PLAN_SELECT: &str =
    "SELECT p.plan_id, p.name, p.quota_nanos, p.models, p.public, p.occurred_at AS updated_at, \
     (SELECT count(*) FROM current_subscriptions s WHERE s.plan_id = p.plan_id) AS subscribers \
     FROM current_plans p";

async fn load_plan(state: &AppState, id: Uuid) -> Result<Option<PlanView>, AccountError> {
    sqlx::query_as(&format!("{PLAN_SELECT} WHERE p.plan_id = $1"))
        .bind(id)
        .fetch_optional(&state.pool)
        .await
        .map_err(db_error)
}

/// A malformed id names nothing: 404 like any unknown plan.
fn parse_id(id: &str, what: &'static str) -> Result<Uuid, AccountError> {
    Uuid::parse_str(id).map_err(|_| AccountError::NotFound(what))
}

fn check_name(name: &str) -> Result<String, AccountError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 100 {
        return Err(AccountError::invalid(
            "name",
            "the name needs 1 to 100 characters",
        ));
    }
    Ok(name.to_owned())
}

/// A monthly quota: a decimal USD string, zero or more.
pub fn quota_nanos(quota: &str) -> Result<Nanos, AccountError> {
    match Nanos::from_usd_str(quota) {
        Ok(n) if n.0 >= 0 => Ok(n),
        Ok(_) => Err(AccountError::invalid(
            "quota",
            "`quota` must be zero or more",
        )),
        Err(e) => Err(AccountError::invalid("quota", e.to_string())),
    }
}

/// Trimmed, without blanks or duplicates, in the given order.
pub fn check_models(models: Vec<String>) -> Result<Vec<String>, AccountError> {
    if models.len() > 1000 {
        return Err(AccountError::invalid(
            "models",
            "a plan lists at most 1000 models",
        ));
    }
    let mut out: Vec<String> = Vec::with_capacity(models.len());
    for model in models {
        let model = model.trim();
        if model.is_empty() || model.len() > 200 {
            return Err(AccountError::invalid(
                "models",
                "each model name needs 1 to 200 characters",
            ));
        }
        if !out.iter().any(|m| m == model) {
            out.push(model.to_owned());
        }
    }
    Ok(out)
}

async fn name_taken(state: &AppState, name: &str, except: Option<Uuid>) -> Result<(), ApiError> {
    let other: Option<Uuid> = sqlx::query_scalar(
        "SELECT plan_id FROM current_plans WHERE lower(name) = lower($1) AND ($2::uuid IS NULL OR plan_id <> $2)",
    )
    .bind(name)
    .bind(except)
    .fetch_optional(&state.pool)
    .await
    .map_err(db_error)?;
    match other {
        Some(_) => {
            Err(AccountError::Conflict(format!("a plan named `{name}` exists already")).into())
        }
        None => Ok(()),
    }
}

/// Who made a change, for the event: an admin user, or none for the admin token.
fn admin_user(headers: &axum::http::HeaderMap, state: &AppState) -> Option<Uuid> {
    let bearer = crate::auth::bearer_token(headers)?;
    if !crate::jwt::looks_like_jwt(bearer) {
        return None;
    }
    crate::jwt::verify(state.opts.jwt_secret.as_deref(), bearer)
        .ok()
        .map(|claims| claims.sub)
}

/// The plan as it will be once billing applies the event (for a 202 answer).
fn pending_view(e: &PlanConfigured, subscribers: i64) -> PlanView {
    PlanView {
        id: e.plan_id,
        name: e.name.clone(),
        quota: e.monthly_quota.0,
        models: e.models.clone(),
        public: e.public,
        subscribers,
        updated_at: Utc::now(),
    }
}

/// Publishes a plan definition and answers with the plan as billing then shows it.
async fn configure(
    state: &AppState,
    event: PlanConfigured,
    by_user: Option<Uuid>,
    done: StatusCode,
    subscribers: i64,
) -> Result<(StatusCode, Json<PlanView>), ApiError> {
    let pending = pending_view(&event, subscribers);
    let published = publish_money_event(state, Event::PlanConfigured(event), by_user).await?;
    if published.projected {
        if let Some(view) = load_plan(state, pending.id).await? {
            refresh(state).await;
            return Ok((done, Json(view)));
        }
    }
    Ok((StatusCode::ACCEPTED, Json(pending)))
}

async fn refresh(state: &AppState) {
    if let Err(e) = state.directory.refresh(&state.pool).await {
        tracing::warn!(error = %e, "cannot refresh the key directory after a plan change");
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePlan {
    #[schema(min_length = 1, max_length = 100, pattern = r"\S")]
    name: String,
    /// USD per calendar month.
    #[schema(pattern = r"^[0-9]{1,9}(\.[0-9]{1,9})?$")]
    quota: String,
    #[serde(default)]
    models: Vec<String>,
    #[serde(default)]
    public: bool,
}

/// Create a plan
///
/// A monthly quota (USD) and a model allow-list (empty = every model). Public plans may be
/// picked by users themselves. 202 when billing has not applied it within a few seconds.
#[utoipa::path(
    post,
    path = "/api/admin/plans",
    operation_id = "adminCreatePlan",
    tag = "admin",
    request_body = CreatePlan,
    responses(
        (status = 201, description = "The plan", body = PlanView),
        (status = 202, description = "Recorded; billing applies it shortly", body = PlanView),
        (status = 400, description = "Invalid body"),
        (status = 401, description = "Missing credentials"),
        (status = 403, description = "Not an admin"),
        (status = 409, description = "A plan of that name exists"),
        (status = 503, description = "The event log is unavailable; nothing was recorded"),
    ),
    security(("admin_token" = [])),
)]
pub async fn create(
    _: Admin,
    State(state): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
    ApiJson(body): ApiJson<CreatePlan>,
) -> Result<(StatusCode, Json<PlanView>), ApiError> {
    let name = check_name(&body.name)?;
    let monthly_quota = quota_nanos(&body.quota)?;
    let models = check_models(body.models)?;
    name_taken(&state, &name, None).await?;
    let event = PlanConfigured {
        plan_id: schemas::new_id(),
        name,
        monthly_quota,
        models,
        public: body.public,
        source: "api".to_owned(),
        by_user: admin_user(&headers, &state),
    };
    let by = event.by_user;
    configure(&state, event, by, StatusCode::CREATED, 0).await
}

/// Every plan
#[utoipa::path(
    get,
    path = "/api/admin/plans",
    operation_id = "adminListPlans",
    tag = "admin",
    responses(
        (status = 200, description = "The plans", body = crate::openapi::PlanList),
        (status = 401, description = "Missing credentials"),
        (status = 403, description = "Not an admin"),
    ),
    security(("admin_token" = [])),
)]
pub async fn list(_: Admin, State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let plans: Vec<PlanView> = sqlx::query_as(&format!("{PLAN_SELECT} ORDER BY p.name, p.plan_id"))
        .fetch_all(&state.pool)
        .await
        .map_err(db_error)?;
    Ok(Json(json!({ "data": plans })))
}

/// One plan
#[utoipa::path(
    get,
    path = "/api/admin/plans/{id}",
    operation_id = "adminGetPlan",
    tag = "admin",
    params(("id" = String, Path, description = "The plan id (a UUID)")),
    responses(
        (status = 200, description = "The plan", body = PlanView),
        (status = 401, description = "Missing credentials"),
        (status = 403, description = "Not an admin"),
        (status = 404, description = "No such plan"),
    ),
    security(("admin_token" = [])),
)]
pub async fn get(
    _: Admin,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<PlanView>, ApiError> {
    let id = parse_id(&id, "plan")?;
    let plan = load_plan(&state, id)
        .await?
        .ok_or(AccountError::NotFound("plan"))?;
    Ok(Json(plan))
}

/// A PATCH: absent fields stay.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdatePlan {
    #[serde(default)]
    #[schema(min_length = 1, max_length = 100, pattern = r"\S")]
    name: Option<String>,
    #[serde(default)]
    #[schema(pattern = r"^[0-9]{1,9}(\.[0-9]{1,9})?$")]
    quota: Option<String>,
    #[serde(default)]
    models: Option<Vec<String>>,
    #[serde(default)]
    public: Option<bool>,
}

/// Change a plan
///
/// Absent fields stay.
#[utoipa::path(
    patch,
    path = "/api/admin/plans/{id}",
    operation_id = "adminUpdatePlan",
    tag = "admin",
    params(("id" = String, Path, description = "The plan id (a UUID)")),
    request_body = UpdatePlan,
    responses(
        (status = 200, description = "The plan as changed", body = PlanView),
        (status = 202, description = "Recorded; billing applies it shortly", body = PlanView),
        (status = 400, description = "Invalid body"),
        (status = 401, description = "Missing credentials"),
        (status = 403, description = "Not an admin"),
        (status = 404, description = "No such plan"),
        (status = 409, description = "A plan of that name exists"),
        (status = 503, description = "The event log is unavailable; nothing was recorded"),
    ),
    security(("admin_token" = [])),
)]
pub async fn update(
    _: Admin,
    State(state): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<UpdatePlan>,
) -> Result<(StatusCode, Json<PlanView>), ApiError> {
    let id = parse_id(&id, "plan")?;
    let current = load_plan(&state, id)
        .await?
        .ok_or(AccountError::NotFound("plan"))?;
    let name = match body.name {
        Some(n) => {
            let n = check_name(&n)?;
            name_taken(&state, &n, Some(id)).await?;
            n
        }
        None => current.name.clone(),
    };
    let monthly_quota = match body.quota {
        Some(q) => quota_nanos(&q)?,
        None => Nanos(current.quota),
    };
    let models = match body.models {
        Some(m) => check_models(m)?,
        None => current.models.clone(),
    };
    let public = body.public.unwrap_or(current.public);
    if name == current.name
        && monthly_quota.0 == current.quota
        && models == current.models
        && public == current.public
    {
        return Ok((StatusCode::OK, Json(current)));
    }
    let by_user = admin_user(&headers, &state);
    let event = PlanConfigured {
        plan_id: id,
        name,
        monthly_quota,
        models,
        public,
        source: "api".to_owned(),
        by_user,
    };
    configure(&state, event, by_user, StatusCode::OK, current.subscribers).await
}

/// A user's plan this month, as `GET /api/me/plan` shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PlanStatus {
    pub plan: Option<PlanView>,
    /// When the user got this plan.
    pub since: Option<DateTime<Utc>>,
    pub period: Period,
    /// What plans paid for the user this month (USD), whichever plan.
    #[serde(serialize_with = "usd")]
    #[schema(value_type = String)]
    pub used: i64,
    /// What is left of the plan's quota this month (USD); "0" without a plan.
    #[serde(serialize_with = "usd")]
    #[schema(value_type = String)]
    pub remaining: i64,
}

/// The current plan period: a calendar month in UTC, `end` exclusive.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Period {
    pub start: NaiveDate,
    pub end: NaiveDate,
}

/// The plan status of `user` now, from the projected read models.
pub async fn status(state: &AppState, user: Uuid) -> Result<PlanStatus, ApiError> {
    let start = billing::plans::period_of(Utc::now());
    let period = Period {
        start,
        end: billing::plans::next_period(start),
    };
    let current: Option<(Uuid, DateTime<Utc>)> =
        sqlx::query_as("SELECT plan_id, since FROM current_subscriptions WHERE user_id = $1")
            .bind(user)
            .fetch_optional(&state.pool)
            .await
            .map_err(db_error)?;
    let used: i64 = sqlx::query_scalar(
        "SELECT COALESCE((SELECT used_nanos FROM plan_usage WHERE user_id = $1 AND period = $2), 0)::bigint",
    )
    .bind(user)
    .bind(start)
    .fetch_one(&state.pool)
    .await
    .map_err(db_error)?;
    let (plan, since) = match current {
        Some((plan_id, since)) => (load_plan(state, plan_id).await?, Some(since)),
        None => (None, None),
    };
    let remaining = plan.as_ref().map_or(0, |p| (p.quota - used).max(0));
    Ok(PlanStatus {
        since: plan.as_ref().and(since),
        plan,
        period,
        used,
        remaining,
    })
}

/// Subscribes (`Some`) or unsubscribes (`None`) a user and answers with their status.
async fn set_plan(
    state: &AppState,
    user: Uuid,
    plan: Option<Uuid>,
    by_user: Option<Uuid>,
) -> Result<(StatusCode, Json<PlanStatus>), ApiError> {
    let event = match plan {
        Some(plan_id) => Event::PlanSubscribed(PlanSubscribed {
            user_id: user,
            plan_id,
            by_user,
        }),
        None => Event::PlanUnsubscribed(PlanUnsubscribed {
            user_id: user,
            by_user,
        }),
    };
    let Published { projected, .. } = publish_money_event(state, event, Some(user)).await?;
    if projected {
        refresh(state).await;
    }
    let code = if projected {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((code, Json(status(state, user).await?)))
}

async fn user_exists(state: &AppState, user: Uuid) -> Result<(), ApiError> {
    let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM users WHERE id = $1")
        .bind(user)
        .fetch_optional(&state.pool)
        .await
        .map_err(db_error)?;
    exists.ok_or(AccountError::NotFound("user"))?;
    Ok(())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AssignPlan {
    /// The plan, or null to end the user's plan.
    #[serde(default, deserialize_with = "double_option")]
    plan_id: Option<Option<Uuid>>,
}

/// `PUT /api/admin/users/{id}/plan`: an admin may assign any plan, public or not.
#[utoipa::path(
    put,
    path = "/api/admin/users/{id}/plan",
    operation_id = "adminAssignPlan",
    tag = "admin",
    params(("id" = String, Path, description = "The user id (a UUID)")),
    request_body = AssignPlan,
    responses(
        (status = 200, description = "The user's plan status", body = PlanStatus),
        (status = 202, description = "Recorded; billing applies it shortly", body = PlanStatus),
        (status = 400, description = "Invalid body (`plan_id` is required; null ends the plan)"),
        (status = 401, description = "Missing credentials"),
        (status = 403, description = "Not an admin"),
        (status = 404, description = "No such user or plan"),
        (status = 503, description = "The event log is unavailable; nothing was recorded"),
    ),
    security(("admin_token" = [])),
)]
pub async fn assign(
    _: Admin,
    State(state): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
    Path(user): Path<String>,
    ApiJson(body): ApiJson<AssignPlan>,
) -> Result<(StatusCode, Json<PlanStatus>), ApiError> {
    let user = parse_id(&user, "user")?;
    user_exists(&state, user).await?;
    let plan = body.plan_id.ok_or_else(|| {
        AccountError::invalid("plan_id", "`plan_id` is required (null ends the plan)")
    })?;
    if let Some(plan_id) = plan {
        load_plan(&state, plan_id)
            .await?
            .ok_or(AccountError::NotFound("plan"))?;
    }
    let by_user = admin_user(&headers, &state);
    set_plan(&state, user, plan, by_user).await
}

/// A user's plan this month
#[utoipa::path(
    get,
    path = "/api/admin/users/{id}/plan",
    operation_id = "adminGetUserPlan",
    tag = "admin",
    params(("id" = String, Path, description = "The user id (a UUID)")),
    responses(
        (status = 200, description = "The plan status", body = PlanStatus),
        (status = 401, description = "Missing credentials"),
        (status = 403, description = "Not an admin"),
        (status = 404, description = "No such user"),
    ),
    security(("admin_token" = [])),
)]
pub async fn user_status(
    _: Admin,
    State(state): State<Arc<AppState>>,
    Path(user): Path<String>,
) -> Result<Json<PlanStatus>, ApiError> {
    let user = parse_id(&user, "user")?;
    user_exists(&state, user).await?;
    Ok(Json(status(&state, user).await?))
}

/// `GET /api/plans`: what the caller may pick, and the plan they have (even if not public).
#[utoipa::path(
    get,
    path = "/api/plans",
    operation_id = "listPlans",
    tag = "accounts",
    responses(
        (status = 200, description = "The public plans and the caller's", body = crate::openapi::OfferedPlans),
        (status = 401, description = "Missing or invalid credentials"),
        (status = 403, description = "The API key belongs to no user"),
    ),
    security(("session_token" = []), ("api_key" = [])),
)]
pub async fn offered(
    State(state): State<Arc<AppState>>,
    caller: AuthUser,
) -> Result<Json<Value>, ApiError> {
    let plans: Vec<PlanView> = sqlx::query_as(&format!(
        "{PLAN_SELECT} WHERE p.public OR p.plan_id IN \
           (SELECT plan_id FROM current_subscriptions WHERE user_id = $1) \
         ORDER BY p.quota_nanos, p.name"
    ))
    .bind(caller.user_id)
    .fetch_all(&state.pool)
    .await
    .map_err(db_error)?;
    let current: Option<Uuid> =
        sqlx::query_scalar("SELECT plan_id FROM current_subscriptions WHERE user_id = $1")
            .bind(caller.user_id)
            .fetch_optional(&state.pool)
            .await
            .map_err(db_error)?;
    // Subscriber counts are the admin's business.
    let data: Vec<Value> = plans
        .into_iter()
        .map(|p| {
            json!({
                "id": p.id,
                "name": p.name,
                "quota": Nanos(p.quota).to_usd_string(),
                "models": p.models,
                "public": p.public,
                "current": Some(p.id) == current,
            })
        })
        .collect();
    Ok(Json(json!({ "data": data, "current": current })))
}

/// `POST /api/plans/{id}/subscribe`: a user picks a public plan (replacing theirs). A plan
/// that is not public is not found, as if it did not exist.
#[utoipa::path(
    post,
    path = "/api/plans/{id}/subscribe",
    operation_id = "subscribePlan",
    tag = "accounts",
    params(("id" = String, Path, description = "The plan id (a UUID)")),
    responses(
        (status = 200, description = "The caller's plan status", body = PlanStatus),
        (status = 202, description = "Recorded; billing applies it shortly", body = PlanStatus),
        (status = 401, description = "Missing or invalid credentials"),
        (status = 403, description = "The API key belongs to no user"),
        (status = 404, description = "No such public plan"),
        (status = 503, description = "The event log is unavailable; nothing was recorded"),
    ),
    security(("session_token" = []), ("api_key" = [])),
)]
pub async fn subscribe(
    State(state): State<Arc<AppState>>,
    caller: AuthUser,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<PlanStatus>), ApiError> {
    let id = parse_id(&id, "plan")?;
    let plan = load_plan(&state, id)
        .await?
        .filter(|p| p.public)
        .ok_or(AccountError::NotFound("plan"))?;
    set_plan(&state, caller.user_id, Some(plan.id), Some(caller.user_id)).await
}

/// The caller's plan this month
///
/// The plan, this month's period (UTC), used and remaining quota (USD).
#[utoipa::path(
    get,
    path = "/api/me/plan",
    operation_id = "getMyPlan",
    tag = "accounts",
    responses(
        (status = 200, description = "The plan status", body = PlanStatus),
        (status = 401, description = "Missing or invalid credentials"),
        (status = 403, description = "The API key belongs to no user"),
    ),
    security(("session_token" = []), ("api_key" = [])),
)]
pub async fn mine(
    State(state): State<Arc<AppState>>,
    caller: AuthUser,
) -> Result<Json<PlanStatus>, ApiError> {
    Ok(Json(status(&state, caller.user_id).await?))
}

/// `DELETE /api/me/plan`: ends the caller's plan (nothing to do without one).
#[utoipa::path(
    delete,
    path = "/api/me/plan",
    operation_id = "leavePlan",
    tag = "accounts",
    responses(
        (status = 200, description = "The caller's plan status", body = PlanStatus),
        (status = 202, description = "Recorded; billing applies it shortly", body = PlanStatus),
        (status = 401, description = "Missing or invalid credentials"),
        (status = 403, description = "The API key belongs to no user"),
        (status = 503, description = "The event log is unavailable; nothing was recorded"),
    ),
    security(("session_token" = []), ("api_key" = [])),
)]
pub async fn leave(
    State(state): State<Arc<AppState>>,
    caller: AuthUser,
) -> Result<(StatusCode, Json<PlanStatus>), ApiError> {
    let current = status(&state, caller.user_id).await?;
    if current.plan.is_none() {
        return Ok((StatusCode::OK, Json(current)));
    }
    set_plan(&state, caller.user_id, None, Some(caller.user_id)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_plan_ids_are_stable_and_distinct() {
        assert_eq!(config_plan_id("pro"), config_plan_id("pro"));
        assert_ne!(config_plan_id("pro"), config_plan_id("free"));
        assert_eq!(config_plan_id("pro").get_version_num(), 8);
    }

    #[test]
    fn quotas_and_models_are_checked() {
        assert_eq!(quota_nanos("5.00").ok(), Some(Nanos(5_000_000_000)));
        assert!(quota_nanos("-1").is_err());
        assert!(quota_nanos("lots").is_err());
        assert_eq!(
            check_models(vec![" a ".into(), "b".into(), "a".into()]).ok(),
            Some(vec!["a".to_owned(), "b".to_owned()])
        );
        assert!(check_models(vec![" ".into()]).is_err());
    }
}
