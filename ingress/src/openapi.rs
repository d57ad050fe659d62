//! The OpenAPI 3.1 document of every route, served at `GET /openapi.json` (no auth).
//!
//! It is generated from the code: each handler carries a `#[utoipa::path]` annotation
//! (method, path, parameters, bodies, responses, security) and the request and response
//! types of the management API derive `ToSchema`. The OpenAI- and Anthropic-compatible
//! surfaces forward their bodies verbatim, so their schemas name only the fields Sluice
//! reads and checks, and allow any other.
//!
//! Modifiers finish the document: [`SecuritySchemes`] declares how callers authenticate,
//! [`ErrorShapes`] gives every error response (4xx, 5xx and `default`) its JSON body
//! (Anthropic's shape under `/v1/messages`, OpenAI's everywhere else), and
//! [`UniqueOperationIds`] names apart the methods one handler serves (`PUT` and `POST`).
//!
//! `route_table_matches_the_document` (below) checks that the routes registered in
//! [`crate::route_table`] and the operations of this document are the same set.

use std::sync::LazyLock;

use axum::http::{header, HeaderValue};
use axum::response::Response;
use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;
use serde_json::Value;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Content, OpenApi as Document, Ref, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi, ToSchema};
use uuid::Uuid;

use crate::routes;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Sluice",
        description = "An LLM API gateway: OpenAI- and Anthropic-compatible endpoints in front of \
                       many upstream channels, with keys, quotas, usage, plans and server-kept \
                       chat sessions.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        // OpenAI- and Anthropic-compatible surface.
        routes::chat::chat_completions,
        routes::messages::messages,
        routes::messages::count_tokens,
        routes::responses::responses,
        routes::responses::embeddings,
        routes::responses::images,
        routes::models::list,
        routes::models::get,
        routes::streams::resume,
        routes::streams::cancel,
        crate::ws::upgrade,
        // Operations.
        routes::health::healthz,
        routes::health::readyz,
        crate::metrics::scrape,
        serve,
        // Accounts.
        routes::auth::register,
        routes::auth::login,
        routes::auth::me,
        routes::auth::change_password,
        routes::keys::list_own,
        routes::keys::create_own,
        routes::keys::get_own,
        routes::keys::update_own,
        routes::keys::revoke_own,
        routes::usage::own,
        routes::usage::own_balance,
        routes::admin_prices::current,
        routes::admin_credits::redeem,
        routes::plans::offered,
        routes::plans::subscribe,
        routes::plans::mine,
        routes::plans::leave,
        // Sessions.
        routes::sessions::list,
        routes::sessions::create,
        routes::sessions::get,
        routes::sessions::rename,
        routes::sessions::delete,
        routes::sessions::messages,
        routes::sessions::chat,
        routes::sessions::regenerate,
        routes::sessions::usage,
        // Personal channels.
        routes::channels::list,
        routes::channels::create,
        routes::channels::get_one,
        routes::channels::update,
        routes::channels::delete,
        routes::channels::enable,
        routes::channels::disable,
        routes::channels::test,
        // Administration.
        routes::admin_keys::list,
        routes::admin_keys::create,
        routes::admin_keys::get,
        routes::admin_keys::update,
        routes::admin_keys::revoke,
        routes::admin_keys::list_users,
        routes::admin_keys::create_user_route,
        routes::admin_keys::update_user,
        routes::usage::admin,
        routes::usage::user_balance,
        routes::admin_prices::list,
        routes::admin_prices::set,
        routes::admin_credits::grant,
        routes::admin_credits::mint_codes,
        routes::plans::list,
        routes::plans::create,
        routes::plans::get,
        routes::plans::update,
        routes::plans::user_status,
        routes::plans::assign,
        routes::admin_channels::list,
        routes::admin_channels::create,
        routes::admin_channels::get_one,
        routes::admin_channels::update,
        routes::admin_channels::delete,
        routes::admin_channels::enable,
        routes::admin_channels::disable,
        routes::admin_channels::test,
        routes::admin_nodes::list,
        routes::admin_nodes::get_one,
        routes::admin_projections::list,
    ),
    components(schemas(OpenAiError, AnthropicError, ErrorKindDoc)),
    modifiers(&SecuritySchemes, &ErrorShapes, &UniqueOperationIds),
    tags(
        (name = "openai", description = "OpenAI-compatible endpoints (`Authorization: Bearer sk-…`)."),
        (name = "anthropic", description = "Anthropic-compatible endpoints (`x-api-key` or Bearer)."),
        (name = "streams", description = "Resuming, watching and cancelling running requests."),
        (name = "ops", description = "Health, readiness, metrics and this document."),
        (name = "accounts", description = "Users, their keys, usage, balance and plans."),
        (name = "sessions", description = "Conversations kept on the server."),
        (name = "channels", description = "A user's personal channels (bring your own key)."),
        (name = "admin", description = "Administration: `SLUICE_ADMIN_TOKEN` or an admin's session token."),
    ),
)]
pub struct ApiDoc;

/// The document, rendered once.
static DOCUMENT: LazyLock<String> = LazyLock::new(|| {
    ApiDoc::openapi()
        .to_json()
        .unwrap_or_else(|e| format!(r#"{{"error":"cannot render the OpenAPI document: {e}"}}"#))
});

/// The OpenAPI document as JSON.
pub fn document_json() -> &'static str {
    &DOCUMENT
}

/// The OpenAPI 3.1 document of this API
///
/// Every route of the gateway with its parameters, bodies, responses and security.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi",
    tag = "ops",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json", body = Object)),
)]
pub async fn serve() -> Response {
    let mut response = Response::new(axum::body::Body::from(document_json()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

// ---------------------------------------------------------------------------------------
// Security schemes

/// Security scheme names, as operations' `security(...)` use them.
pub const API_KEY: &str = "api_key";
pub const X_API_KEY: &str = "x_api_key";
pub const SESSION_TOKEN: &str = "session_token";
pub const ADMIN_TOKEN: &str = "admin_token";

/// Declares how callers authenticate.
pub struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, doc: &mut Document) {
        let components = doc.components.get_or_insert_with(Default::default);
        let bearer = |format: Option<&str>, description: &str| {
            let mut b = HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some(description));
            if let Some(f) = format {
                b = b.bearer_format(f);
            }
            SecurityScheme::Http(b.build())
        };
        components.add_security_scheme(
            API_KEY,
            bearer(
                Some("API key"),
                "An API key (`sk-…`) as `Authorization: Bearer sk-…`.",
            ),
        );
        components.add_security_scheme(
            X_API_KEY,
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "x-api-key",
                "An API key (`sk-…`) in `x-api-key`, as Anthropic clients send it.",
            ))),
        );
        components.add_security_scheme(
            SESSION_TOKEN,
            bearer(
                Some("JWT"),
                "A user's session token from `POST /api/auth/login` or `/api/auth/register` \
                 (sign-in needs `SLUICE_JWT_SECRET`, or `SLUICE_SECRET_KEY` it derives from).",
            ),
        );
        components.add_security_scheme(
            ADMIN_TOKEN,
            bearer(
                None,
                "`SLUICE_ADMIN_TOKEN`, or the session token of a user whose role is `admin`. \
                 API keys never carry admin rights.",
            ),
        );
    }
}

// ---------------------------------------------------------------------------------------
// Error bodies

/// Gives every error response its JSON body, and every operation a `default` error.
pub struct ErrorShapes;

/// Which error shape a path answers with.
fn error_schema(path: &str) -> RefOr<utoipa::openapi::schema::Schema> {
    let openai = || RefOr::Ref(Ref::from_schema_name("OpenAiError"));
    let anthropic = || RefOr::Ref(Ref::from_schema_name("AnthropicError"));
    if path == "/v1/messages" || path.starts_with("/v1/messages/") {
        anthropic()
    } else if path.starts_with("/v1/streams/") {
        // In the shape of the API the stream's request came in on.
        utoipa::openapi::schema::AnyOfBuilder::new()
            .item(openai())
            .item(anthropic())
            .into()
    } else {
        openai()
    }
}

impl Modify for ErrorShapes {
    fn modify(&self, doc: &mut Document) {
        for (path, item) in doc.paths.paths.iter_mut() {
            let schema = error_schema(path);
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
                &mut item.head,
                &mut item.options,
                &mut item.trace,
            ];
            for op in operations.into_iter().flatten() {
                let responses = &mut op.responses.responses;
                for (status, response) in responses.iter_mut() {
                    let is_error = status.starts_with('4') || status.starts_with('5');
                    if let (true, RefOr::T(response)) = (is_error, response) {
                        if response.content.is_empty() {
                            response.content.insert(
                                "application/json".into(),
                                Content::new(Some(schema.clone())),
                            );
                        }
                    }
                }
                responses.entry("default".into()).or_insert_with(|| {
                    RefOr::T(
                        ResponseBuilder::new()
                            .description(
                                "An error: a refused request (4xx) or the gateway or upstream \
                                 failing (5xx). `Retry-After` is set when retrying may help.",
                            )
                            .content("application/json", Content::new(Some(schema.clone())))
                            .build(),
                    )
                });
            }
        }
    }
}

/// A handler serving several methods (`method(patch, put)`) gives each the same
/// `operationId`; the secondary ones get the method as a suffix (`adminUpdateChannel_put`).
pub struct UniqueOperationIds;

impl Modify for UniqueOperationIds {
    fn modify(&self, doc: &mut Document) {
        let mut seen = std::collections::HashSet::new();
        for item in doc.paths.paths.values_mut() {
            let operations = [
                ("get", &mut item.get),
                ("patch", &mut item.patch),
                ("put", &mut item.put),
                ("post", &mut item.post),
                ("delete", &mut item.delete),
                ("head", &mut item.head),
                ("options", &mut item.options),
                ("trace", &mut item.trace),
            ];
            for (method, op) in operations {
                let Some(op) = op else { continue };
                let Some(id) = op.operation_id.clone() else {
                    continue;
                };
                if !seen.insert(id.clone()) {
                    let unique = format!("{id}_{method}");
                    seen.insert(unique.clone());
                    op.operation_id = Some(unique);
                }
            }
        }
    }
}

/// OpenAI's error body, used by every route outside `/v1/messages`.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"error": {"message": "incorrect API key provided", "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}}))]
pub struct OpenAiError {
    pub error: OpenAiErrorObject,
}

#[derive(Serialize, ToSchema)]
pub struct OpenAiErrorObject {
    pub message: String,
    /// `invalid_request_error`, `permission_error`, `rate_limit_exceeded`,
    /// `overloaded_error`, `server_error`, ...
    #[serde(rename = "type")]
    pub error_type: String,
    /// The request field at fault, if any.
    #[schema(required = true)]
    pub param: Option<String>,
    /// A machine-readable code (`invalid_api_key`, `model_not_found`, ...), if any.
    #[schema(required = true)]
    pub code: Option<String>,
}

/// Anthropic's error body, used by `/v1/messages` and `/v1/messages/count_tokens`.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"type": "error", "error": {"type": "authentication_error", "message": "incorrect API key provided"}}))]
pub struct AnthropicError {
    /// Always `error`.
    #[serde(rename = "type")]
    pub kind: String,
    pub error: AnthropicErrorObject,
}

#[derive(Serialize, ToSchema)]
pub struct AnthropicErrorObject {
    #[serde(rename = "type")]
    pub error_type: String,
    pub message: String,
}

/// A failure kind, as the workers classify upstream failures.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = ErrorKind)]
pub enum ErrorKindDoc {
    RateLimited,
    Overloaded,
    Auth,
    BadRequest,
    ContextTooLong,
    Upstream5xx,
    Timeout,
    Connection,
    NoChannel,
    WorkerLost,
    Cancelled,
    Internal,
}

/// A user's role.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Admin,
    User,
}

/// A channel's `type`: the provider protocols and presets the workers have adapters for.
pub fn channel_type() -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    let mut types = vec![
        workers::adapters::anthropic::PROVIDER_TYPE,
        workers::adapters::gemini::PROVIDER_TYPE,
    ];
    types.extend(workers::adapters::presets::PRESETS.iter().map(|p| p.name));
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(types))
        .description(Some(
            "The provider's protocol: `anthropic`, `gemini`, or an OpenAI-compatible preset.",
        ))
        .into()
}

// ---------------------------------------------------------------------------------------
// Operations

#[derive(Serialize, ToSchema)]
pub struct HealthStatus {
    /// Always `ok`.
    pub status: String,
}

#[derive(Serialize, ToSchema)]
pub struct Readiness {
    /// Connected to NATS.
    pub nats: bool,
    /// Keys and models loaded from Postgres at least once.
    pub directory: bool,
}

// ---------------------------------------------------------------------------------------
// The OpenAI- and Anthropic-compatible surface: the fields Sluice reads; any other field
// is forwarded to the upstream untouched.

/// A chat message author.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChatRole {
    System,
    Developer,
    User,
    Assistant,
    Tool,
    Function,
}

/// A message's content: text, or an array of content parts (objects).
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<serde_json::Map<String, Value>>),
}

#[derive(Serialize, ToSchema)]
pub struct ChatMessage {
    pub role: ChatRole,
    #[schema(nullable)]
    pub content: Option<MessageContent>,
}

#[derive(Serialize, ToSchema)]
pub struct StreamOptions {
    /// Adds a last chunk with the usage (only with `stream: true`).
    pub include_usage: Option<bool>,
}

/// `POST /v1/chat/completions`: OpenAI's body. Other fields (`temperature`, `tools`, ...)
/// are forwarded as they are.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}]}))]
pub struct ChatCompletionRequest {
    #[schema(min_length = 1)]
    pub model: String,
    #[schema(min_items = 1)]
    pub messages: Vec<ChatMessage>,
    /// Answer as server-sent events (`text/event-stream`).
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    #[schema(minimum = 1)]
    pub max_tokens: Option<u64>,
}

/// A chat completion as the upstream returned it (OpenAI's shape).
#[derive(Serialize, ToSchema)]
pub struct ChatCompletion {
    pub id: String,
    /// `chat.completion`.
    pub object: String,
    pub created: i64,
    pub model: String,
    pub choices: Vec<serde_json::Map<String, Value>>,
    pub usage: Option<serde_json::Map<String, Value>>,
}

/// An Anthropic message author.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AnthropicRole {
    User,
    Assistant,
}

/// An Anthropic message's content: text, or an array of content blocks (objects).
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum AnthropicContent {
    Text(String),
    Blocks(Vec<serde_json::Map<String, Value>>),
}

#[derive(Serialize, ToSchema)]
pub struct AnthropicMessageParam {
    pub role: AnthropicRole,
    pub content: AnthropicContent,
}

/// `POST /v1/messages`: Anthropic's body. Other fields are forwarded as they are.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"model": "claude-sonnet-4", "max_tokens": 256, "messages": [{"role": "user", "content": "Hello"}]}))]
pub struct MessagesRequest {
    #[schema(min_length = 1)]
    pub model: String,
    #[schema(minimum = 1)]
    pub max_tokens: u64,
    #[schema(min_items = 1)]
    pub messages: Vec<AnthropicMessageParam>,
    /// A string or an array of text blocks.
    #[schema(nullable)]
    pub system: Option<AnthropicContent>,
    /// Answer as server-sent events (`text/event-stream`).
    pub stream: Option<bool>,
}

/// A message as Anthropic returns it.
#[derive(Serialize, ToSchema)]
pub struct AnthropicMessage {
    pub id: String,
    /// `message`.
    #[serde(rename = "type")]
    pub kind: String,
    pub role: String,
    pub content: Vec<serde_json::Map<String, Value>>,
    pub model: String,
    pub stop_reason: Option<String>,
    pub usage: Option<serde_json::Map<String, Value>>,
}

/// `POST /v1/messages/count_tokens`.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"model": "claude-sonnet-4", "messages": [{"role": "user", "content": "Hello"}]}))]
pub struct CountTokensRequest {
    #[schema(min_length = 1)]
    pub model: String,
    #[schema(min_items = 1)]
    pub messages: Vec<AnthropicMessageParam>,
    #[schema(nullable)]
    pub system: Option<AnthropicContent>,
}

#[derive(Serialize, ToSchema)]
pub struct InputTokens {
    pub input_tokens: u64,
}

/// `input` of the Responses API: text, or an array of input items (objects).
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum ResponsesInput {
    Text(String),
    Items(Vec<serde_json::Map<String, Value>>),
}

/// `POST /v1/responses`: OpenAI's Responses API body. Other fields are forwarded.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"model": "gpt-4o-mini", "input": "Hello"}))]
pub struct ResponsesRequest {
    #[schema(min_length = 1)]
    pub model: String,
    pub input: ResponsesInput,
    /// Answer as server-sent events (`text/event-stream`).
    pub stream: Option<bool>,
    #[schema(minimum = 1)]
    pub max_output_tokens: Option<u64>,
}

/// A response object of the Responses API.
#[derive(Serialize, ToSchema)]
pub struct ResponseObject {
    pub id: String,
    /// `response`.
    pub object: String,
    pub status: Option<String>,
    pub model: Option<String>,
    pub output: Option<Vec<serde_json::Map<String, Value>>>,
    pub usage: Option<serde_json::Map<String, Value>>,
}

/// `input` of an embeddings request: a non-empty string or a non-empty array.
fn embeddings_input() -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, SchemaType, Type};
    OneOfBuilder::new()
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1)),
        )
        .item(
            ArrayBuilder::new()
                .items(ObjectBuilder::new().schema_type(SchemaType::AnyValue))
                .min_items(Some(1)),
        )
        .into()
}

/// `POST /v1/embeddings`. Other fields are forwarded.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"model": "text-embedding-3-small", "input": "Hello"}))]
pub struct EmbeddingsRequest {
    #[schema(min_length = 1)]
    pub model: String,
    #[schema(schema_with = embeddings_input)]
    pub input: Value,
}

#[derive(Serialize, ToSchema)]
pub struct EmbeddingList {
    /// `list`.
    pub object: String,
    pub data: Vec<serde_json::Map<String, Value>>,
    pub model: Option<String>,
    pub usage: Option<serde_json::Map<String, Value>>,
}

/// `POST /v1/images/generations`. Other fields are forwarded.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"model": "gpt-image-1", "prompt": "A lighthouse at dusk"}))]
pub struct ImagesRequest {
    #[schema(min_length = 1)]
    pub model: String,
    #[schema(min_length = 1)]
    pub prompt: String,
}

#[derive(Serialize, ToSchema)]
pub struct ImagesResponse {
    pub created: Option<i64>,
    pub data: Vec<serde_json::Map<String, Value>>,
}

#[derive(Serialize, ToSchema)]
pub struct Model {
    pub id: String,
    /// `model`.
    pub object: String,
    pub created: i64,
    pub owned_by: String,
}

#[derive(Serialize, ToSchema)]
pub struct ModelList {
    /// `list`.
    pub object: String,
    pub data: Vec<Model>,
}

/// One server-sent event of a `text/event-stream` response (the schema describes each
/// event, as OpenAPI 3.1 tools read it). `data` is JSON, except chat's final `[DONE]`.
#[derive(Serialize, ToSchema)]
pub struct SseEvent {
    /// The event name (Anthropic, Responses and session streams name their events).
    pub event: Option<String>,
    /// The frame's sequence number: send it back as `Last-Event-ID` to resume.
    pub id: Option<String>,
    pub data: Option<String>,
    pub retry: Option<u64>,
}

#[derive(Serialize, ToSchema)]
pub struct CancelResult {
    pub request_id: Uuid,
    /// `cancelling` (the worker stops it) or `finished` (nothing to stop).
    pub status: String,
}

// ---------------------------------------------------------------------------------------
// Management API answers built as JSON in the handlers

/// A session token and its user.
#[derive(Serialize, ToSchema)]
pub struct SessionToken {
    pub token: String,
    /// `Bearer`.
    pub token_type: String,
    /// Seconds.
    pub expires_in: i64,
    pub user: crate::accounts::UserView,
}

#[derive(Serialize, ToSchema)]
pub struct KeyList {
    pub data: Vec<routes::keys::KeyView>,
}

/// A key just created: its view plus the key itself, shown this once.
#[derive(Serialize, ToSchema)]
pub struct CreatedKey {
    #[serde(flatten)]
    pub view: routes::keys::KeyView,
    pub key: String,
}

#[derive(Serialize, ToSchema)]
pub struct UserList {
    pub data: Vec<crate::accounts::UserView>,
}

#[derive(Serialize, ToSchema)]
pub struct DateRange {
    pub from: NaiveDate,
    pub to: NaiveDate,
}

#[derive(Serialize, ToSchema)]
pub struct CachedTokens {
    pub cached_tokens: i64,
}

/// Totals of a usage report or of one of its breakdowns.
#[derive(Serialize, ToSchema)]
pub struct UsageSum {
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    pub prompt_tokens_details: CachedTokens,
    /// USD, decimal string.
    pub cost: String,
    /// USD paid by the user's plan, part of `cost`.
    pub plan_cost: String,
}

#[derive(Serialize, ToSchema)]
pub struct DayUsage {
    pub day: NaiveDate,
    #[serde(flatten)]
    pub sum: UsageSum,
}

#[derive(Serialize, ToSchema)]
pub struct ModelUsage {
    pub model: String,
    #[serde(flatten)]
    pub sum: UsageSum,
}

#[derive(Serialize, ToSchema)]
pub struct KeyUsage {
    pub key_id: Uuid,
    pub name: Option<String>,
    pub prefix: Option<String>,
    #[serde(flatten)]
    pub sum: UsageSum,
}

#[derive(Serialize, ToSchema)]
pub struct UserUsage {
    pub user_id: Option<Uuid>,
    #[serde(flatten)]
    pub sum: UsageSum,
}

/// A usage report over a range of UTC days.
#[derive(Serialize, ToSchema)]
pub struct UsageReport {
    pub range: DateRange,
    pub totals: UsageSum,
    pub by_day: Vec<DayUsage>,
    pub by_model: Vec<ModelUsage>,
    pub by_key: Vec<KeyUsage>,
    /// Admins only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub by_user: Option<Vec<UserUsage>>,
}

/// A user's money (USD, decimal strings) and plan this month.
#[derive(Serialize, ToSchema)]
pub struct Balance {
    /// Granted to the user or to any of their keys.
    pub credits: String,
    /// What the balance paid (plans paid the rest).
    pub spent: String,
    pub balance: String,
    pub plan: routes::plans::PlanStatus,
}

/// A price in force now (USD, decimal strings).
#[derive(Serialize, ToSchema)]
pub struct CurrentPrice {
    pub model: String,
    pub input_per_mtok: String,
    pub output_per_mtok: String,
    #[schema(required = true)]
    pub cached_input_per_mtok: Option<String>,
    pub per_request: String,
}

#[derive(Serialize, ToSchema)]
pub struct CurrentPriceList {
    pub data: Vec<CurrentPrice>,
}

#[derive(Serialize, ToSchema)]
pub struct PriceList {
    pub data: Vec<routes::admin_prices::PriceView>,
}

/// A price set from `effective_at` on (applied once billing projects the event).
#[derive(Serialize, ToSchema)]
pub struct PriceSetResult {
    pub event_id: Uuid,
    pub model: String,
    pub effective_at: DateTime<Utc>,
    pub input_per_mtok: String,
    pub output_per_mtok: String,
    #[schema(required = true)]
    pub cached_input_per_mtok: Option<String>,
    pub per_request: String,
}

/// A credit (or debit) recorded.
#[derive(Serialize, ToSchema)]
pub struct CreditGranted {
    pub event_id: Uuid,
    /// USD, decimal string.
    pub amount: String,
    pub note: String,
    /// Set when a user's balance was credited.
    pub user_id: Option<Uuid>,
    /// Set when a key was credited.
    pub key_id: Option<Uuid>,
}

#[derive(Serialize, ToSchema)]
pub struct MintedCode {
    pub id: Uuid,
    /// The code, shown this once.
    pub code: String,
}

#[derive(Serialize, ToSchema)]
pub struct MintedCodes {
    /// USD per code.
    pub amount: String,
    pub codes: Vec<MintedCode>,
}

#[derive(Serialize, ToSchema)]
pub struct Redeemed {
    pub event_id: Uuid,
    /// The key credited; null = the caller's balance.
    #[schema(required = true)]
    pub key_id: Option<Uuid>,
    pub user_id: Uuid,
    /// USD, decimal string.
    pub amount: String,
}

#[derive(Serialize, ToSchema)]
pub struct PlanList {
    pub data: Vec<routes::plans::PlanView>,
}

/// A plan the caller may pick (or has).
#[derive(Serialize, ToSchema)]
pub struct OfferedPlan {
    pub id: Uuid,
    pub name: String,
    /// USD per calendar month.
    pub quota: String,
    pub models: Vec<String>,
    pub public: bool,
    /// The caller's plan.
    pub current: bool,
}

#[derive(Serialize, ToSchema)]
pub struct OfferedPlans {
    pub data: Vec<OfferedPlan>,
    /// The caller's plan, if any.
    #[schema(required = true)]
    pub current: Option<Uuid>,
}

#[derive(Serialize, ToSchema)]
pub struct SessionList {
    /// `list`.
    pub object: String,
    pub data: Vec<routes::sessions::SessionView>,
}

#[derive(Serialize, ToSchema)]
pub struct MessageList {
    /// `list`.
    pub object: String,
    pub data: Vec<routes::sessions::MessageView>,
}

#[derive(Serialize, ToSchema)]
pub struct SessionTotals {
    pub rounds: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    /// USD, as charged so far.
    pub cost: String,
}

#[derive(Serialize, ToSchema)]
pub struct SessionRound {
    pub request_id: Uuid,
    /// `chat` or `regenerate`.
    pub kind: String,
    pub status: String,
    pub model: String,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    pub usage_source: Option<String>,
    /// USD; null until billed.
    pub cost: Option<String>,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// What the history takes of the model's context now.
#[derive(Serialize, ToSchema)]
pub struct ContextUse {
    pub model: String,
    pub context_limit: u64,
    pub used_tokens: u64,
    pub remaining_tokens: u64,
    pub messages: u64,
    pub messages_in_context: u64,
}

#[derive(Serialize, ToSchema)]
pub struct SessionUsage {
    /// `session.usage`.
    pub object: String,
    pub session_id: Uuid,
    pub totals: SessionTotals,
    #[schema(required = true)]
    pub last_round: Option<SessionRound>,
    /// Null while the session has no model.
    #[schema(required = true)]
    pub context: Option<ContextUse>,
}

#[derive(Serialize, ToSchema)]
pub struct ChannelList {
    pub data: Vec<routes::admin_channels::ChannelView>,
}

#[derive(Serialize, ToSchema)]
pub struct ChannelTestFailure {
    pub kind: ErrorKindDoc,
    /// The upstream's HTTP status, if it answered.
    pub status: Option<u16>,
    pub message: String,
}

/// The outcome of a channel test: a failing channel is a successful test whose `ok` is false.
#[derive(Serialize, ToSchema)]
pub struct ChannelTestReport {
    pub channel_id: Uuid,
    pub model: String,
    pub upstream_model: String,
    pub ok: bool,
    pub latency_ms: u64,
    /// Set when `ok` is false.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ChannelTestFailure>,
}

#[derive(Serialize, ToSchema)]
pub struct NodeList {
    pub data: Vec<routes::admin_nodes::NodeView>,
}

/// A model a remote node serves.
#[derive(Serialize, ToSchema)]
pub struct ServedModel {
    /// The name clients ask for.
    pub name: String,
    /// The node's provider's name for it.
    pub upstream: String,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::collections::BTreeSet;

    /// `(METHOD, path)` of every operation in the document.
    fn documented() -> BTreeSet<(String, String)> {
        let doc: Value = serde_json::from_str(document_json()).expect("the document is JSON");
        let mut ops = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for method in item.as_object().expect("path item").keys() {
                ops.insert((method.to_ascii_uppercase(), path.clone()));
            }
        }
        ops
    }

    /// `(METHOD, path)` of every route registered in the router, read from axum's `Debug`
    /// of it (axum has no API to list routes): the route ids map to paths in the node's
    /// `paths`, and to method routers whose slots are `None` when that method is not set.
    fn registered() -> BTreeSet<(String, String)> {
        let text = format!("{:?}", crate::route_table());
        // Only the path router: the fallback router lists axum's own catch-all paths.
        let text = text.split("fallback_router").next().expect("a path router");
        let (routes_part, node_part) = text.split_once("node: Node").expect("a route node");
        let mut paths = std::collections::HashMap::new();
        // `RouteId(3): "/v1/models"`
        for piece in node_part.split("RouteId(").skip(1) {
            let (id, rest) = piece.split_once(')').expect("route id");
            let path = rest
                .split('"')
                .nth(1)
                .expect("a quoted path after the route id");
            paths.insert(id.to_owned(), path.to_owned());
        }
        let mut ops = BTreeSet::new();
        for piece in routes_part.split("RouteId(").skip(1) {
            let (id, rest) = piece.split_once(')').expect("route id");
            let path = paths.get(id).expect("every route id has a path");
            for method in [
                "get", "head", "delete", "options", "patch", "post", "put", "trace",
            ] {
                let slot = rest
                    .split_once(&format!(" {method}: "))
                    .map(|(_, after)| after)
                    .expect("every method slot is printed");
                if !slot.starts_with("None") {
                    ops.insert((method.to_ascii_uppercase(), path.clone()));
                }
            }
        }
        ops
    }

    #[test]
    fn route_table_matches_the_document() {
        let registered = registered();
        let documented = documented();
        assert!(
            registered.len() > 50,
            "reading the router's routes failed (axum's Debug output changed?): {registered:?}"
        );
        let undocumented: Vec<_> = registered.difference(&documented).collect();
        let unrouted: Vec<_> = documented.difference(&registered).collect();
        assert!(
            undocumented.is_empty() && unrouted.is_empty(),
            "routes missing from the OpenAPI document: {undocumented:?}\n\
             documented operations without a route: {unrouted:?}"
        );
    }

    #[test]
    fn document_is_openapi_3_1_with_unique_operation_ids() {
        let doc: Value = serde_json::from_str(document_json()).expect("JSON");
        assert!(doc["openapi"].as_str().expect("version").starts_with("3.1"));
        let mut ids = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("item") {
                let id = op["operationId"].as_str().expect("operationId").to_owned();
                assert!(ids.insert(id.clone()), "duplicate operationId {id}");
                assert!(
                    op["responses"]["default"]["content"]["application/json"].is_object(),
                    "{method} {path} has no default error body"
                );
            }
        }
        // Every `$ref` names a schema of the document.
        let text = document_json();
        for piece in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = piece.split('"').next().expect("name");
            assert!(
                doc["components"]["schemas"][name].is_object(),
                "dangling $ref to {name}"
            );
        }
        for scheme in [API_KEY, X_API_KEY, SESSION_TOKEN, ADMIN_TOKEN] {
            assert!(doc["components"]["securitySchemes"][scheme].is_object());
        }
    }
}
