//! `/api/admin/channels`: create, list, get, update, delete, enable and disable upstream
//! channels, and test one with a tiny request through its adapter.
//!
//! The same operations serve users' personal channels (`/api/channels`, see
//! [`super::channels`]) through a [`Scope`]: an admin sees and changes every channel and
//! creates shared ones; a user only their own, which they create.
//!
//! Provider keys are sealed with `SLUICE_SECRET_KEY` before they reach Postgres and are
//! never returned (a view says only whether a key is set). Every change is committed
//! together with its audit event (`ChannelConfigured`, or `ChannelDeleted`): the row is
//! written in a transaction that commits only once JetStream stored the event. Workers and
//! the model directory reload the table every 2 s, so changes apply without a restart.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use schemas::events::{ChannelConfigured, ChannelDeleted, Metadata};
use schemas::work::{Api, ApiErrorInfo, ErrorKind};
use schemas::Event;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sqlx::{Postgres, Row, Transaction};
use uuid::Uuid;

use crate::auth::Admin;
use crate::error::error_response;
use crate::routes::body::{double_option, ApiJson, ApiQuery};
use crate::state::AppState;

/// How long `POST …/test` waits for the upstream.
const TEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Personal channels one user may have: enough for every provider they use, few enough
/// that nobody grows the workers' routing table at will.
pub const MAX_PERSONAL_CHANNELS: i64 = 50;

/// Whose channels a call sees and changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every channel (the admin API); what it creates is shared.
    Admin,
    /// Only this user's personal channels (`/api/channels`); what it creates is theirs.
    /// Anyone else's channel is "not found", never "forbidden", so ids do not leak.
    Owner(Uuid),
}

impl Scope {
    fn owner(self) -> Option<Uuid> {
        match self {
            Scope::Admin => None,
            Scope::Owner(user) => Some(user),
        }
    }

    /// The `source` of an audit event this scope's changes emit.
    fn source(self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::Owner(_) => "user",
        }
    }
}

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/admin/channels", get(list).post(create))
        .route(
            "/api/admin/channels/{id}",
            get(get_one).patch(update).put(update).delete(delete),
        )
        .route("/api/admin/channels/{id}/enable", post(enable))
        .route("/api/admin/channels/{id}/disable", post(disable))
        .route("/api/admin/channels/{id}/test", post(test))
}

#[derive(Debug, thiserror::Error)]
pub enum ChannelAdminError {
    #[error("channel not found")]
    NotFound,
    #[error("a channel named `{0}` already exists")]
    NameTaken(String),
    #[error("{message}")]
    Invalid {
        message: String,
        param: &'static str,
    },
    #[error("the gateway has no SLUICE_SECRET_KEY, so it cannot store or use provider keys")]
    NoSecretKey,
    #[error("the channel's stored key cannot be opened with this gateway's SLUICE_SECRET_KEY")]
    SealedKeyUnreadable,
    #[error("a user may have at most {MAX_PERSONAL_CHANNELS} personal channels; delete one first")]
    TooManyChannels,
    #[error("the audit log is unavailable; nothing was changed, try again shortly")]
    AuditUnavailable,
    #[error("an internal error occurred")]
    Internal,
}

impl ChannelAdminError {
    fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid {
            message: message.into(),
            param,
        }
    }

    fn info(&self) -> ApiErrorInfo {
        let (status, kind, code, param) = match self {
            Self::NotFound => (404, ErrorKind::BadRequest, Some("not_found"), None),
            Self::NameTaken(_) => (409, ErrorKind::BadRequest, Some("conflict"), Some("name")),
            Self::TooManyChannels => (409, ErrorKind::BadRequest, Some("channel_limit"), None),
            Self::Invalid { param, .. } => (400, ErrorKind::BadRequest, None, Some(*param)),
            Self::NoSecretKey | Self::SealedKeyUnreadable => (
                503,
                ErrorKind::Internal,
                Some("secret_key_unavailable"),
                None,
            ),
            Self::AuditUnavailable => (503, ErrorKind::Overloaded, Some("audit_unavailable"), None),
            Self::Internal => (500, ErrorKind::Internal, None, None),
        };
        ApiErrorInfo {
            status,
            kind,
            message: self.to_string(),
            code: code.map(str::to_owned),
            param: param.map(str::to_owned),
            retry_after: matches!(self, Self::AuditUnavailable).then_some(1),
        }
    }
}

impl IntoResponse for ChannelAdminError {
    fn into_response(self) -> Response {
        error_response(&self.info())
    }
}

/// Logs a database failure (never with bound values); a duplicate name is a 409.
fn db_error(e: sqlx::Error, name: &str) -> ChannelAdminError {
    if let sqlx::Error::Database(db) = &e {
        if db.is_unique_violation() {
            return ChannelAdminError::NameTaken(name.to_owned());
        }
    }
    tracing::error!(error = %e, "channel admin query failed");
    ChannelAdminError::Internal
}

type Result<T> = std::result::Result<T, ChannelAdminError>;

/// A channel as the API shows it: everything but the secret.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ChannelView {
    id: Uuid,
    name: String,
    #[serde(rename = "type")]
    channel_type: String,
    base_url: Option<String>,
    has_api_key: bool,
    models: Vec<String>,
    /// Client model name → upstream model name.
    #[schema(value_type = Object)]
    model_map: Value,
    priority: i32,
    weight: i32,
    retry: i32,
    groups: Vec<String>,
    enabled: bool,
    source: String,
    /// The user whose personal channel this is; null = shared.
    owner_user_id: Option<Uuid>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    /// Live state from the workers' shared health bucket (list and get only).
    #[serde(skip_serializing_if = "Option::is_none")]
    health: Option<HealthView>,
}

/// What the workers currently know about a channel.
#[derive(Debug, Default, Serialize, utoipa::ToSchema)]
pub struct HealthView {
    /// Set while the circuit breaker keeps the channel out of routing.
    banned_until: Option<DateTime<Utc>>,
    /// The failure kind behind the current ban.
    #[schema(value_type = Option<crate::openapi::ErrorKindDoc>)]
    ban_kind: Option<ErrorKind>,
    /// Calls in flight on it across live workers.
    in_flight: u32,
}

/// Reads bans and in-flight counts from the health bucket. Best effort: without the
/// bucket (no worker ever ran) or while NATS is away, the views carry no health.
async fn attach_health(state: &AppState, views: &mut [ChannelView]) {
    use workers::health::{now_ms, BanRecord};
    let Ok(kv) = state
        .js
        .get_key_value(state.ns.channel_health_bucket())
        .await
    else {
        return;
    };
    let now = now_ms();
    let in_flight = workers::health::in_flight_by_channel(&kv)
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "channel in-flight counts left out of the listing");
            Default::default()
        });
    for view in views.iter_mut() {
        let mut health = HealthView {
            in_flight: in_flight.get(&view.id).copied().unwrap_or(0),
            ..HealthView::default()
        };
        if let Ok(Some(bytes)) = kv.get(format!("ban.{}", view.id.simple())).await {
            if let Ok(ban) = serde_json::from_slice::<BanRecord>(&bytes) {
                if ban.until_ms > now {
                    health.banned_until = i64::try_from(ban.until_ms)
                        .ok()
                        .and_then(DateTime::<Utc>::from_timestamp_millis);
                    health.ban_kind = ban.kind;
                }
            }
        }
        view.health = Some(health);
    }
}

const COLUMNS: &str = "id, name, channel_type, base_url, api_key_sealed, models, model_map, \
     priority, weight, retry, groups, enabled, source, owner_user_id, created_at, updated_at";

/// A row with its sealed key, which never leaves this module.
struct Stored {
    view: ChannelView,
    sealed: Option<String>,
}

fn stored(row: &sqlx::postgres::PgRow) -> std::result::Result<Stored, sqlx::Error> {
    let sealed: Option<String> = row.try_get("api_key_sealed")?;
    Ok(Stored {
        view: ChannelView {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            channel_type: row.try_get("channel_type")?,
            base_url: row.try_get("base_url")?,
            has_api_key: sealed.is_some(),
            models: row.try_get("models")?,
            model_map: row.try_get::<sqlx::types::Json<Value>, _>("model_map")?.0,
            priority: row.try_get("priority")?,
            weight: row.try_get("weight")?,
            retry: row.try_get("retry")?,
            groups: row.try_get("groups")?,
            enabled: row.try_get("enabled")?,
            source: row.try_get("source")?,
            owner_user_id: row.try_get("owner_user_id")?,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
            health: None,
        },
        sealed,
    })
}

/// Unknown ids and ids that are not UUIDs are both "not found".
fn parse_id(id: &str) -> Result<Uuid> {
    Uuid::parse_str(id).map_err(|_| ChannelAdminError::NotFound)
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateChannel {
    #[schema(min_length = 1, max_length = 100, pattern = r"\S")]
    name: String,
    #[serde(rename = "type", alias = "channel_type")]
    #[schema(schema_with = crate::openapi::channel_type)]
    channel_type: String,
    #[serde(default)]
    #[schema(pattern = r"^https?://\S+$")]
    base_url: Option<String>,
    #[serde(default)]
    api_key: Option<String>,
    #[schema(min_items = 1)]
    models: Vec<String>,
    #[serde(default)]
    model_map: BTreeMap<String, String>,
    #[serde(default)]
    priority: i32,
    #[serde(default = "one")]
    #[schema(minimum = 1, maximum = 1000000)]
    weight: i64,
    #[serde(default = "one")]
    #[schema(minimum = 1, maximum = 100)]
    retry: i64,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default = "yes")]
    enabled: bool,
}

fn one() -> i64 {
    1
}

fn yes() -> bool {
    true
}

/// PATCH body: absent fields stay; `base_url` and `api_key` can be cleared with `null`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateChannel {
    #[serde(default)]
    #[schema(min_length = 1, max_length = 100, pattern = r"\S")]
    name: Option<String>,
    #[serde(default, rename = "type", alias = "channel_type")]
    #[schema(schema_with = crate::openapi::channel_type)]
    channel_type: Option<String>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(pattern = r"^https?://\S+$")]
    base_url: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    api_key: Option<Option<String>>,
    #[serde(default)]
    #[schema(min_items = 1)]
    models: Option<Vec<String>>,
    #[serde(default)]
    model_map: Option<BTreeMap<String, String>>,
    #[serde(default)]
    priority: Option<i32>,
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1000000)]
    weight: Option<i64>,
    #[serde(default)]
    #[schema(minimum = 1, maximum = 100)]
    retry: Option<i64>,
    #[serde(default)]
    groups: Option<Vec<String>>,
    #[serde(default)]
    enabled: Option<bool>,
}

/// A channel's settings after validation, ready to write.
struct Settings {
    name: String,
    channel_type: String,
    base_url: Option<String>,
    models: Vec<String>,
    model_map: BTreeMap<String, String>,
    priority: i32,
    weight: i32,
    retry: i32,
    groups: Vec<String>,
    enabled: bool,
}

/// Checks what the table's constraints would reject, and more, with messages naming the
/// field: a bad channel must fail here, not as a 500 or in every worker.
fn validate(s: &mut Settings) -> Result<()> {
    s.name = s.name.trim().to_owned();
    if s.name.is_empty() || s.name.chars().count() > 100 {
        return Err(ChannelAdminError::invalid(
            "name",
            "`name` must be 1 to 100 characters",
        ));
    }
    if s.channel_type == "node" {
        return Err(ChannelAdminError::invalid(
            "type",
            "`node` channels are the live remote nodes themselves; they are not created here",
        ));
    }
    let probe = router::Channel {
        id: Uuid::nil(),
        name: s.name.clone(),
        channel_type: s.channel_type.clone(),
        base_url: None,
        api_key: None,
        models: Vec::new(),
        model_map: BTreeMap::new(),
        priority: 0,
        weight: 1,
        retry: 1,
        groups: Vec::new(),
        enabled: true,
        timeouts: Default::default(),
        owner: None,
    };
    let http = workers::adapters::http_client().map_err(|e| {
        tracing::error!(error = %e, "cannot build an HTTP client");
        ChannelAdminError::Internal
    })?;
    if let Err(e) = workers::adapters::Adapter::for_channel(&probe, &http) {
        return Err(ChannelAdminError::invalid("type", e.to_string()));
    }
    if let Some(url) = &s.base_url {
        let ok = (url.starts_with("http://") || url.starts_with("https://"))
            && url.len() > "https://".len()
            && !url.chars().any(char::is_whitespace);
        if !ok {
            return Err(ChannelAdminError::invalid(
                "base_url",
                "`base_url` must be an http:// or https:// URL",
            ));
        }
    }
    let mut seen = BTreeSet::new();
    for m in &s.models {
        if m.trim().is_empty() || m.len() > 200 {
            return Err(ChannelAdminError::invalid(
                "models",
                "model names must be 1 to 200 characters",
            ));
        }
        if !seen.insert(m.as_str()) {
            return Err(ChannelAdminError::invalid(
                "models",
                format!("model `{m}` is listed twice"),
            ));
        }
    }
    if s.models.is_empty() {
        return Err(ChannelAdminError::invalid(
            "models",
            "`models` must list at least one model",
        ));
    }
    if let Some(k) = s.model_map.keys().find(|k| !seen.contains(k.as_str())) {
        return Err(ChannelAdminError::invalid(
            "model_map",
            format!("`model_map` maps `{k}`, which is not in `models`"),
        ));
    }
    if s.groups.iter().any(|g| g.trim().is_empty()) {
        return Err(ChannelAdminError::invalid(
            "groups",
            "group names must not be empty",
        ));
    }
    Ok(())
}

/// A user's channel may only call public addresses, unless the operator allows private
/// ones (`workers::egress`); shared channels are the operator's own. The workers check
/// again at every call, since DNS can change after this.
async fn check_egress(scope: Scope, s: &Settings) -> Result<()> {
    if scope.owner().is_none() || workers::egress::allow_private() {
        return Ok(());
    }
    let Some(url) = workers::egress::effective_base_url(&s.channel_type, s.base_url.as_deref())
    else {
        return Ok(());
    };
    workers::egress::check_base_url(url)
        .await
        .map_err(|e| ChannelAdminError::invalid("base_url", e.to_string()))
}

fn positive(param: &'static str, v: i64, max: i64) -> Result<i32> {
    if (1..=max).contains(&v) {
        i32::try_from(v).map_err(|_| ChannelAdminError::invalid(param, "out of range"))
    } else {
        Err(ChannelAdminError::invalid(
            param,
            format!("`{param}` must be between 1 and {max}"),
        ))
    }
}

fn seal(state: &AppState, api_key: &str) -> Result<String> {
    if api_key.trim().is_empty() {
        return Err(ChannelAdminError::invalid(
            "api_key",
            "`api_key` must not be empty; use null to remove it",
        ));
    }
    let key = state
        .opts
        .secret_key
        .as_ref()
        .ok_or(ChannelAdminError::NoSecretKey)?;
    Ok(key.seal(api_key))
}

/// Publishes the audit event and waits until JetStream stored it; the caller commits only
/// after that, so no change goes unaudited. A user's own change names them in the metadata.
async fn audit(state: &AppState, scope: Scope, event: Event) -> Result<()> {
    let metadata = Metadata {
        user_id: scope.owner(),
        ..Metadata::default()
    };
    let envelope = event.into_envelope(Utc::now(), metadata);
    let stored = match projector::bus::publish_event(&state.js, &state.ns, &envelope).await {
        Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    stored.map_err(|e| {
        tracing::warn!(error = %e, event = %envelope.event_type, "cannot store a channel audit event");
        ChannelAdminError::AuditUnavailable
    })
}

fn configured(scope: Scope, view: &ChannelView) -> Event {
    Event::ChannelConfigured(ChannelConfigured {
        channel_id: view.id,
        name: view.name.clone(),
        channel_type: view.channel_type.clone(),
        models: view.models.clone(),
        enabled: view.enabled,
        source: scope.source().to_owned(),
        owner_user_id: view.owner_user_id,
    })
}

async fn begin(state: &AppState) -> Result<Transaction<'static, Postgres>> {
    state.pool.begin().await.map_err(|e| db_error(e, ""))
}

/// Commits, then reloads this ingress's model directory so the change shows in
/// `/v1/models` here at once (other ingresses and the workers follow within a refresh).
async fn commit(state: &AppState, tx: Transaction<'static, Postgres>) -> Result<()> {
    tx.commit().await.map_err(|e| db_error(e, ""))?;
    if let Err(e) = state.directory.refresh(&state.pool).await {
        tracing::warn!(error = %e, "cannot refresh the model directory after a channel change; the periodic refresh will");
    }
    Ok(())
}

/// Create a shared channel
///
/// The provider key (`api_key`) is sealed with `SLUICE_SECRET_KEY` and never returned.
#[utoipa::path(
    post,
    path = "/api/admin/channels",
    operation_id = "adminCreateChannel",
    tag = "admin",
    request_body = CreateChannel,
    responses(
        (status = 201, description = "The channel", body = ChannelView),
        (status = 400, description = "Invalid body"),
        (status = 401, description = "Missing credentials"),
        (status = 403, description = "Not an admin"),
        (status = 409, description = "A channel of that name exists"),
        (status = 503, description = "No `SLUICE_SECRET_KEY` to seal the key with, or the audit log is unavailable; nothing was changed"),
    ),
    security(("admin_token" = [])),
)]
pub async fn create(
    _: Admin,
    State(state): State<Arc<AppState>>,
    ApiJson(body): ApiJson<CreateChannel>,
) -> Result<(StatusCode, Json<ChannelView>)> {
    let view = create_in(&state, Scope::Admin, body).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// Creates a channel: shared for an admin, the user's own for [`Scope::Owner`].
pub(crate) async fn create_in(
    state: &AppState,
    scope: Scope,
    body: CreateChannel,
) -> Result<ChannelView> {
    let mut s = Settings {
        name: body.name,
        channel_type: body.channel_type,
        base_url: body.base_url,
        models: body.models,
        model_map: body.model_map,
        priority: body.priority,
        weight: positive("weight", body.weight, 1_000_000)?,
        retry: positive("retry", body.retry, 100)?,
        groups: body.groups,
        enabled: body.enabled,
    };
    validate(&mut s)?;
    check_egress(scope, &s).await?;
    let sealed = body
        .api_key
        .as_deref()
        .map(|k| seal(state, k))
        .transpose()?;
    let mut tx = begin(state).await?;
    if let Scope::Owner(user) = scope {
        // The user's row lock serializes their creates, so the cap holds under races.
        sqlx::query("SELECT 1 FROM users WHERE id = $1 FOR UPDATE")
            .bind(user)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error(e, ""))?;
        let owned: i64 =
            sqlx::query_scalar("SELECT count(*) FROM channels WHERE owner_user_id = $1")
                .bind(user)
                .fetch_one(&mut *tx)
                .await
                .map_err(|e| db_error(e, ""))?;
        if owned >= MAX_PERSONAL_CHANNELS {
            return Err(ChannelAdminError::TooManyChannels);
        }
    }
    let source = match scope {
        Scope::Admin => "api",
        Scope::Owner(_) => "user",
    };
    let row = sqlx::query(&format!(
        "INSERT INTO channels (id, name, channel_type, base_url, api_key_sealed, models, model_map, \
         priority, weight, retry, groups, enabled, source, owner_user_id) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) RETURNING {COLUMNS}"
    ))
    .bind(schemas::new_id())
    .bind(&s.name)
    .bind(&s.channel_type)
    .bind(&s.base_url)
    .bind(&sealed)
    .bind(&s.models)
    .bind(sqlx::types::Json(&s.model_map))
    .bind(s.priority)
    .bind(s.weight)
    .bind(s.retry)
    .bind(&s.groups)
    .bind(s.enabled)
    .bind(source)
    .bind(scope.owner())
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| db_error(e, &s.name))?;
    let view = stored(&row).map_err(|e| db_error(e, ""))?.view;
    audit(state, scope, configured(scope, &view)).await?;
    commit(state, tx).await?;
    Ok(view)
}

/// Every channel, with its live health
#[utoipa::path(
    get,
    path = "/api/admin/channels",
    operation_id = "adminListChannels",
    tag = "admin",
    responses(
        (status = 200, description = "The channels, by priority", body = crate::openapi::ChannelList),
        (status = 401, description = "Missing credentials"),
        (status = 403, description = "Not an admin"),
    ),
    security(("admin_token" = [])),
)]
pub async fn list(_: Admin, State(state): State<Arc<AppState>>) -> Result<Json<Value>> {
    let data = list_in(&state, Scope::Admin).await?;
    Ok(Json(json!({ "data": data })))
}

/// The channels `scope` sees, lowest priority first, with their live health.
pub(crate) async fn list_in(state: &AppState, scope: Scope) -> Result<Vec<ChannelView>> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM channels WHERE ($1::uuid IS NULL OR owner_user_id = $1) \
         ORDER BY priority, name, id"
    ))
    .bind(scope.owner())
    .fetch_all(&state.pool)
    .await
    .map_err(|e| db_error(e, ""))?;
    let mut data = rows
        .iter()
        .map(|r| stored(r).map(|s| s.view))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| db_error(e, ""))?;
    attach_health(state, &mut data).await;
    Ok(data)
}

/// One channel `scope` may see; any other is "not found".
async fn load(
    executor: impl sqlx::PgExecutor<'_>,
    scope: Scope,
    id: Uuid,
    for_update: bool,
) -> Result<Stored> {
    let lock = if for_update { " FOR UPDATE" } else { "" };
    let row = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM channels WHERE id = $1 AND ($2::uuid IS NULL OR owner_user_id = $2){lock}"
    ))
    .bind(id)
    .bind(scope.owner())
    .fetch_optional(executor)
    .await
    .map_err(|e| db_error(e, ""))?
    .ok_or(ChannelAdminError::NotFound)?;
    stored(&row).map_err(|e| db_error(e, ""))
}

/// One channel, with its live health
#[utoipa::path(
    get,
    path = "/api/admin/channels/{id}",
    operation_id = "adminGetChannel",
    tag = "admin",
    params(("id" = String, Path, description = "The channel id (a UUID)")),
    responses(
        (status = 200, description = "The channel", body = ChannelView),
        (status = 401, description = "Missing credentials"),
        (status = 403, description = "Not an admin"),
        (status = 404, description = "No such channel"),
    ),
    security(("admin_token" = [])),
)]
pub async fn get_one(
    _: Admin,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<ChannelView>> {
    get_in(&state, Scope::Admin, &id).await.map(Json)
}

/// One channel with its live health.
pub(crate) async fn get_in(state: &AppState, scope: Scope, id: &str) -> Result<ChannelView> {
    let mut view = [load(&state.pool, scope, parse_id(id)?, false).await?.view];
    attach_health(state, &mut view).await;
    let [view] = view;
    Ok(view)
}

/// Change a channel
///
/// Absent fields stay; `base_url` and `api_key` can be cleared with `null`.
#[utoipa::path(
    method(patch, put),
    path = "/api/admin/channels/{id}",
    operation_id = "adminUpdateChannel",
    tag = "admin",
    params(("id" = String, Path, description = "The channel id (a UUID)")),
    request_body = UpdateChannel,
    responses(
        (status = 200, description = "The channel as changed", body = ChannelView),
        (status = 400, description = "Invalid body"),
        (status = 401, description = "Missing credentials"),
        (status = 403, description = "Not an admin"),
        (status = 404, description = "No such channel"),
        (status = 409, description = "A channel of that name exists"),
        (status = 503, description = "No `SLUICE_SECRET_KEY`, or the audit log is unavailable; nothing was changed"),
    ),
    security(("admin_token" = [])),
)]
pub async fn update(
    _: Admin,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<UpdateChannel>,
) -> Result<Json<ChannelView>> {
    change(&state, Scope::Admin, &id, body).await.map(Json)
}

/// Enable a channel
#[utoipa::path(
    post,
    path = "/api/admin/channels/{id}/enable",
    operation_id = "adminEnableChannel",
    tag = "admin",
    params(("id" = String, Path, description = "The channel id (a UUID)")),
    responses(
        (status = 200, description = "The channel", body = ChannelView),
        (status = 401, description = "Missing credentials"),
        (status = 403, description = "Not an admin"),
        (status = 404, description = "No such channel"),
        (status = 503, description = "The audit log is unavailable; nothing was changed"),
    ),
    security(("admin_token" = [])),
)]
pub async fn enable(
    _: Admin,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<ChannelView>> {
    switch(&state, Scope::Admin, &id, true).await.map(Json)
}

/// Disable a channel
#[utoipa::path(
    post,
    path = "/api/admin/channels/{id}/disable",
    operation_id = "adminDisableChannel",
    tag = "admin",
    params(("id" = String, Path, description = "The channel id (a UUID)")),
    responses(
        (status = 200, description = "The channel", body = ChannelView),
        (status = 401, description = "Missing credentials"),
        (status = 403, description = "Not an admin"),
        (status = 404, description = "No such channel"),
        (status = 503, description = "The audit log is unavailable; nothing was changed"),
    ),
    security(("admin_token" = [])),
)]
pub async fn disable(
    _: Admin,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<ChannelView>> {
    switch(&state, Scope::Admin, &id, false).await.map(Json)
}

/// Enables or disables a channel.
pub(crate) async fn switch(
    state: &AppState,
    scope: Scope,
    id: &str,
    enabled: bool,
) -> Result<ChannelView> {
    let body = UpdateChannel {
        enabled: Some(enabled),
        ..UpdateChannel::default()
    };
    change(state, scope, id, body).await
}

/// Applies a partial update under a row lock, validates the result as a whole, writes it
/// and its audit event. The owner never changes.
pub(crate) async fn change(
    state: &AppState,
    scope: Scope,
    id: &str,
    body: UpdateChannel,
) -> Result<ChannelView> {
    let id = parse_id(id)?;
    let mut tx = begin(state).await?;
    let current = load(&mut *tx, scope, id, true).await?;
    let v = current.view;
    // Where the channel calls changes only with these; a rename or disable must not fail
    // on a base_url accepted before.
    let target_changed = body.base_url.is_some() || body.channel_type.is_some();
    let model_map: BTreeMap<String, String> =
        serde_json::from_value(v.model_map).unwrap_or_default();
    let mut s = Settings {
        name: body.name.unwrap_or(v.name),
        channel_type: body.channel_type.unwrap_or(v.channel_type),
        base_url: body.base_url.unwrap_or(v.base_url),
        models: body.models.unwrap_or(v.models),
        model_map: body.model_map.unwrap_or(model_map),
        priority: body.priority.unwrap_or(v.priority),
        weight: match body.weight {
            Some(w) => positive("weight", w, 1_000_000)?,
            None => v.weight,
        },
        retry: match body.retry {
            Some(r) => positive("retry", r, 100)?,
            None => v.retry,
        },
        groups: body.groups.unwrap_or(v.groups),
        enabled: body.enabled.unwrap_or(v.enabled),
    };
    validate(&mut s)?;
    if target_changed {
        check_egress(scope, &s).await?;
    }
    let sealed = match body.api_key {
        None => current.sealed,
        Some(None) => None,
        Some(Some(k)) => Some(seal(state, &k)?),
    };
    let row = sqlx::query(&format!(
        "UPDATE channels SET name = $2, channel_type = $3, base_url = $4, api_key_sealed = $5, \
         models = $6, model_map = $7, priority = $8, weight = $9, retry = $10, groups = $11, \
         enabled = $12, updated_at = now() WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(&s.name)
    .bind(&s.channel_type)
    .bind(&s.base_url)
    .bind(&sealed)
    .bind(&s.models)
    .bind(sqlx::types::Json(&s.model_map))
    .bind(s.priority)
    .bind(s.weight)
    .bind(s.retry)
    .bind(&s.groups)
    .bind(s.enabled)
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| db_error(e, &s.name))?;
    let view = stored(&row).map_err(|e| db_error(e, ""))?.view;
    audit(state, scope, configured(scope, &view)).await?;
    commit(state, tx).await?;
    Ok(view)
}

/// Delete a channel
#[utoipa::path(
    delete,
    path = "/api/admin/channels/{id}",
    operation_id = "adminDeleteChannel",
    tag = "admin",
    params(("id" = String, Path, description = "The channel id (a UUID)")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "Missing credentials"),
        (status = 403, description = "Not an admin"),
        (status = 404, description = "No such channel"),
        (status = 503, description = "The audit log is unavailable; nothing was changed"),
    ),
    security(("admin_token" = [])),
)]
pub async fn delete(
    _: Admin,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    delete_in(&state, Scope::Admin, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Deletes a channel `scope` may see, with its audit event.
pub(crate) async fn delete_in(state: &AppState, scope: Scope, id: &str) -> Result<()> {
    let id = parse_id(id)?;
    let mut tx = begin(state).await?;
    let (name, owner_user_id): (String, Option<Uuid>) = sqlx::query_as(
        "DELETE FROM channels WHERE id = $1 AND ($2::uuid IS NULL OR owner_user_id = $2) \
         RETURNING name, owner_user_id",
    )
    .bind(id)
    .bind(scope.owner())
    .fetch_optional(&mut *tx)
    .await
    .map_err(|e| db_error(e, ""))?
    .ok_or(ChannelAdminError::NotFound)?;
    audit(
        state,
        scope,
        Event::ChannelDeleted(ChannelDeleted {
            channel_id: id,
            name,
            source: scope.source().to_owned(),
            owner_user_id,
        }),
    )
    .await?;
    commit(state, tx).await
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TestParams {
    /// The client model name to test; the channel's first model by default.
    #[serde(default)]
    model: Option<String>,
}

/// Sends a one-token chat request through the channel's adapter and reports how long the
/// answer took, or why it failed. A failing channel is a successful test (200) whose
/// `ok` is false: the test itself worked.
#[utoipa::path(
    post,
    path = "/api/admin/channels/{id}/test",
    operation_id = "adminTestChannel",
    tag = "admin",
    params(("id" = String, Path, description = "The channel id (a UUID)"), TestParams),
    responses(
        (status = 200, description = "The test's outcome (`ok` false when the channel failed)", body = crate::openapi::ChannelTestReport),
        (status = 400, description = "The channel does not serve `model`"),
        (status = 401, description = "Missing credentials"),
        (status = 403, description = "Not an admin"),
        (status = 404, description = "No such channel"),
        (status = 503, description = "The channel's key cannot be opened (no or another `SLUICE_SECRET_KEY`)"),
    ),
    security(("admin_token" = [])),
)]
pub async fn test(
    _: Admin,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    ApiQuery(params): ApiQuery<TestParams>,
) -> Result<Json<Value>> {
    test_in(&state, Scope::Admin, &id, params).await.map(Json)
}

/// The test call of a channel `scope` may see (see [`test`]).
pub(crate) async fn test_in(
    state: &AppState,
    scope: Scope,
    id: &str,
    params: TestParams,
) -> Result<Value> {
    let current = load(&state.pool, scope, parse_id(id)?, false).await?;
    let v = current.view;
    let api_key = match &current.sealed {
        None => None,
        Some(sealed) => {
            let key = state
                .opts
                .secret_key
                .as_ref()
                .ok_or(ChannelAdminError::NoSecretKey)?;
            Some(
                key.open(sealed)
                    .map_err(|_| ChannelAdminError::SealedKeyUnreadable)?,
            )
        }
    };
    let model = match params.model {
        Some(m) if v.models.contains(&m) => m,
        Some(m) => {
            return Err(ChannelAdminError::invalid(
                "model",
                format!("the channel does not serve `{m}`"),
            ))
        }
        None => v.models.first().cloned().unwrap_or_default(),
    };
    let channel = router::Channel {
        id: v.id,
        name: v.name.clone(),
        channel_type: v.channel_type.clone(),
        base_url: v.base_url.clone(),
        api_key,
        models: v.models.clone(),
        model_map: serde_json::from_value(v.model_map.clone()).unwrap_or_default(),
        priority: v.priority,
        weight: u32::try_from(v.weight).unwrap_or(1),
        retry: u32::try_from(v.retry).unwrap_or(1),
        groups: v.groups.clone(),
        enabled: v.enabled,
        timeouts: Default::default(),
        owner: v.owner_user_id,
    };
    let upstream_model = channel.upstream_model(&model).to_owned();
    let outcome = call(&channel, &model, &upstream_model).await;
    let mut report = json!({
        "channel_id": v.id,
        "model": model,
        "upstream_model": upstream_model,
    });
    match outcome {
        Ok(latency) => {
            report["ok"] = json!(true);
            report["latency_ms"] = json!(latency);
        }
        Err((latency, error)) => {
            report["ok"] = json!(false);
            report["latency_ms"] = json!(latency);
            report["error"] = error;
        }
    }
    Ok(report)
}

/// The test call: milliseconds to a whole answer, or to the failure and what it was.
async fn call(
    channel: &router::Channel,
    model: &str,
    upstream_model: &str,
) -> std::result::Result<u64, (u64, Value)> {
    let started = tokio::time::Instant::now();
    let ms = || u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let failure = |kind: ErrorKind, status: Option<u16>, message: String| json!({"kind": kind, "status": status, "message": message});
    let http = workers::adapters::http_client()
        .map_err(|e| (0, failure(ErrorKind::Internal, None, e.to_string())))?;
    let adapter = workers::adapters::Adapter::for_channel(channel, &http)
        .map_err(|e| (0, failure(ErrorKind::Internal, None, e.to_string())))?;
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": "ping"}],
        "max_tokens": 1,
    });
    let raw = serde_json::value::to_raw_value(&body)
        .map_err(|e| (0, failure(ErrorKind::Internal, None, e.to_string())))?;
    let parsed = workers::adapters::RequestBody::parse(&raw)
        .map_err(|e| (0, failure(ErrorKind::Internal, None, e.to_string())))?;
    let req = workers::adapters::UpstreamRequest {
        body: &parsed,
        upstream_model,
        stream: false,
        api: Api::ChatCompletions,
        forward_headers: &[],
    };
    match tokio::time::timeout(TEST_TIMEOUT, adapter.send(channel, req)).await {
        Ok(Ok(_reply)) => Ok(ms()),
        Ok(Err(e)) => Err((ms(), failure(e.kind, e.status, e.message))),
        Err(_) => Err((
            ms(),
            failure(
                ErrorKind::Timeout,
                None,
                format!("no answer within {} s", TEST_TIMEOUT.as_secs()),
            ),
        )),
    }
}
