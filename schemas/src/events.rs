//! The event envelope and the domain events. Events are facts in the past tense; a
//! stored event must deserialize forever, so each type is explicitly named and a new
//! shape is a new `schema_version` with an upcaster in [`crate::upcast`].

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::money::{Nanos, Price};
use crate::usage::{Usage, UsageSource};
use crate::work::ErrorKind;

/// The envelope every event travels in, on JetStream and in `event_log`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub event_id: Uuid,
    /// `request-<id>`, `session-<id>`, `account-<id>`, `price-<model>`, `config-<kind>`.
    pub stream: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub schema_version: u16,
    pub occurred_at: DateTime<Utc>,
    pub data: serde_json::Value,
    #[serde(default)]
    pub metadata: Metadata,
}

/// Who and what caused an event; carried for tracing and scoping, never for money.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<Uuid>,
}

#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("event type `{0}` is unknown")]
    UnknownType(String),
    #[error("event `{event_type}` v{version} is newer than this build understands")]
    FutureVersion { event_type: String, version: u16 },
    #[error("event `{event_type}` has malformed data: {source}")]
    Malformed {
        event_type: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Every domain event. The serde tag is the stored `type`; never rename a variant's tag.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum Event {
    RequestAccepted(RequestAccepted),
    AttemptStarted(AttemptStarted),
    AttemptFailed(AttemptFailed),
    CompletionFinished(CompletionFinished),
    RequestFailed(RequestFailed),
    RequestCancelled(RequestCancelled),
    PriceSet(PriceSet),
    CreditGranted(CreditGranted),
    KeyCreated(KeyCreated),
    KeyUpdated(KeyUpdated),
    KeyRevoked(KeyRevoked),
    UserRegistered(UserRegistered),
    UserUpdated(UserUpdated),
    ChannelConfigured(ChannelConfigured),
    ChannelBanned(ChannelBanned),
    ChannelDeleted(ChannelDeleted),
    SessionCreated(SessionCreated),
    SessionRenamed(SessionRenamed),
    SessionDeleted(SessionDeleted),
    SessionMessageAppended(SessionMessageAppended),
    SessionReplyRegenerated(SessionReplyRegenerated),
    PlanConfigured(PlanConfigured),
    PlanSubscribed(PlanSubscribed),
    PlanUnsubscribed(PlanUnsubscribed),
    UserCreditGranted(UserCreditGranted),
    ResponseServedFromCache(ResponseServedFromCache),
}

/// The current schema version of each event type. Bump it together with an upcaster.
pub fn current_version(event_type: &str) -> Option<u16> {
    match event_type {
        "RequestAccepted" | "AttemptStarted" | "AttemptFailed" | "RequestFailed"
        | "RequestCancelled" | "PriceSet" | "CreditGranted" | "KeyCreated" | "KeyUpdated"
        | "KeyRevoked" | "UserRegistered" | "UserUpdated" | "ChannelConfigured"
        | "ChannelBanned" | "ChannelDeleted" => Some(1),
        "SessionCreated"
        | "SessionRenamed"
        | "SessionDeleted"
        | "SessionMessageAppended"
        | "SessionReplyRegenerated" => Some(1),
        "PlanConfigured" | "PlanSubscribed" | "PlanUnsubscribed" | "UserCreditGranted" => Some(1),
        "ResponseServedFromCache" => Some(1),
        // v2: `usage_source` and `attempts` required (see `upcast`).
        "CompletionFinished" => Some(2),
        _ => None,
    }
}

impl Event {
    pub fn type_name(&self) -> &'static str {
        match self {
            Event::RequestAccepted(_) => "RequestAccepted",
            Event::AttemptStarted(_) => "AttemptStarted",
            Event::AttemptFailed(_) => "AttemptFailed",
            Event::CompletionFinished(_) => "CompletionFinished",
            Event::RequestFailed(_) => "RequestFailed",
            Event::RequestCancelled(_) => "RequestCancelled",
            Event::PriceSet(_) => "PriceSet",
            Event::CreditGranted(_) => "CreditGranted",
            Event::KeyCreated(_) => "KeyCreated",
            Event::KeyUpdated(_) => "KeyUpdated",
            Event::KeyRevoked(_) => "KeyRevoked",
            Event::UserRegistered(_) => "UserRegistered",
            Event::UserUpdated(_) => "UserUpdated",
            Event::ChannelConfigured(_) => "ChannelConfigured",
            Event::ChannelBanned(_) => "ChannelBanned",
            Event::ChannelDeleted(_) => "ChannelDeleted",
            Event::SessionCreated(_) => "SessionCreated",
            Event::SessionRenamed(_) => "SessionRenamed",
            Event::SessionDeleted(_) => "SessionDeleted",
            Event::SessionMessageAppended(_) => "SessionMessageAppended",
            Event::SessionReplyRegenerated(_) => "SessionReplyRegenerated",
            Event::PlanConfigured(_) => "PlanConfigured",
            Event::PlanSubscribed(_) => "PlanSubscribed",
            Event::PlanUnsubscribed(_) => "PlanUnsubscribed",
            Event::UserCreditGranted(_) => "UserCreditGranted",
            Event::ResponseServedFromCache(_) => "ResponseServedFromCache",
        }
    }

    /// The stream this event belongs to.
    pub fn stream(&self) -> String {
        match self {
            Event::RequestAccepted(e) => request_stream(&e.request_id),
            Event::AttemptStarted(e) => request_stream(&e.request_id),
            Event::AttemptFailed(e) => request_stream(&e.request_id),
            Event::CompletionFinished(e) => request_stream(&e.request_id),
            Event::RequestFailed(e) => request_stream(&e.request_id),
            Event::RequestCancelled(e) => request_stream(&e.request_id),
            Event::PriceSet(e) => format!("price-{}", e.model),
            Event::CreditGranted(e) => format!("account-{}", e.key_id.simple()),
            Event::KeyCreated(e) => format!("account-{}", e.key_id.simple()),
            Event::KeyUpdated(e) => format!("account-{}", e.key_id.simple()),
            Event::KeyRevoked(e) => format!("account-{}", e.key_id.simple()),
            Event::UserRegistered(e) => format!("user-{}", e.user_id.simple()),
            Event::UserUpdated(e) => format!("user-{}", e.user_id.simple()),
            Event::ChannelConfigured(e) => format!("config-{}", e.channel_id.simple()),
            Event::ChannelBanned(e) => format!("channel-{}", e.channel_id.simple()),
            Event::ChannelDeleted(e) => format!("config-{}", e.channel_id.simple()),
            Event::SessionCreated(e) => session_stream(&e.session_id),
            Event::SessionRenamed(e) => session_stream(&e.session_id),
            Event::SessionDeleted(e) => session_stream(&e.session_id),
            Event::SessionMessageAppended(e) => session_stream(&e.session_id),
            Event::SessionReplyRegenerated(e) => session_stream(&e.session_id),
            Event::PlanConfigured(e) => format!("plan-{}", e.plan_id.simple()),
            Event::PlanSubscribed(e) => format!("user-{}", e.user_id.simple()),
            Event::PlanUnsubscribed(e) => format!("user-{}", e.user_id.simple()),
            Event::UserCreditGranted(e) => format!("user-{}", e.user_id.simple()),
            Event::ResponseServedFromCache(e) => request_stream(&e.request_id),
        }
    }

    /// Wraps the event in a new envelope with a fresh UUID v7 id.
    pub fn into_envelope(self, occurred_at: DateTime<Utc>, metadata: Metadata) -> Envelope {
        let stream = self.stream();
        let event_type = self.type_name().to_owned();
        let schema_version = current_version(&event_type).unwrap_or(1);
        // Serializing a derived, string-keyed enum into a Value cannot fail.
        let mut tagged = serde_json::to_value(&self).unwrap_or(serde_json::Value::Null);
        let data = tagged
            .get_mut("data")
            .map(serde_json::Value::take)
            .unwrap_or(serde_json::Value::Null);
        Envelope {
            event_id: crate::new_id(),
            stream,
            event_type,
            schema_version,
            occurred_at,
            data,
            metadata,
        }
    }
}

impl Envelope {
    /// Decodes the typed event, upgrading older schema versions first.
    pub fn decode(&self) -> Result<Event, EventError> {
        let current = current_version(&self.event_type)
            .ok_or_else(|| EventError::UnknownType(self.event_type.clone()))?;
        if self.schema_version > current {
            return Err(EventError::FutureVersion {
                event_type: self.event_type.clone(),
                version: self.schema_version,
            });
        }
        let data = crate::upcast::upcast_with(
            crate::upcast::UPCASTERS,
            &self.event_type,
            self.schema_version,
            current,
            self.data.clone(),
        );
        let tagged = serde_json::json!({ "type": self.event_type, "data": data });
        serde_json::from_value(tagged).map_err(|source| EventError::Malformed {
            event_type: self.event_type.clone(),
            source,
        })
    }

    /// The request id of a `request-<id>` stream.
    pub fn request_id(&self) -> Option<Uuid> {
        self.stream
            .strip_prefix("request-")
            .and_then(|id| Uuid::parse_str(id).ok())
    }
}

pub fn request_stream(id: &Uuid) -> String {
    format!("request-{}", id.simple())
}

pub fn session_stream(id: &Uuid) -> String {
    format!("session-{}", id.simple())
}

/// The ingress accepted a request and queued it for the workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestAccepted {
    pub request_id: Uuid,
    pub api: crate::work::Api,
    pub model: String,
    pub stream: bool,
    pub key_id: Uuid,
    pub user_id: Option<Uuid>,
    pub group: String,
    /// The session whose turn this is: a resumed stream is then framed as session chat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<Uuid>,
}

/// A worker started calling a channel for a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptStarted {
    pub request_id: Uuid,
    pub attempt: u32,
    pub channel_id: Uuid,
    pub channel_name: String,
    pub upstream_model: String,
}

/// One attempt failed; the router decided from `kind` whether to try another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptFailed {
    pub request_id: Uuid,
    pub attempt: u32,
    pub channel_id: Uuid,
    pub kind: ErrorKind,
    pub status: Option<u16>,
    pub message: String,
}

/// A request completed. This is the fact billing charges for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionFinished {
    pub request_id: Uuid,
    pub key_id: Uuid,
    pub user_id: Option<Uuid>,
    pub model: String,
    pub channel_id: Uuid,
    pub channel_name: String,
    pub upstream_model: String,
    pub usage: Usage,
    pub usage_source: UsageSource,
    pub finish_reason: Option<String>,
    /// Milliseconds from the worker taking the request to the first content byte.
    pub ttft_ms: Option<u64>,
    pub duration_ms: u64,
    pub attempts: u32,
    /// Set when the request belongs to a session; then `content` holds the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// A request ended with an error; nothing is charged unless `usage` is set (tokens
/// generated before a mid-stream failure).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestFailed {
    pub request_id: Uuid,
    pub key_id: Uuid,
    pub user_id: Option<Uuid>,
    pub model: String,
    pub kind: ErrorKind,
    pub status: u16,
    pub message: String,
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_source: Option<UsageSource>,
}

/// A request was stopped (client cancel or gone); the partial usage is charged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestCancelled {
    pub request_id: Uuid,
    pub key_id: Uuid,
    pub user_id: Option<Uuid>,
    pub model: String,
    pub channel_id: Option<Uuid>,
    pub usage: Usage,
    pub usage_source: UsageSource,
    pub reason: String,
}

/// A model's price from `effective_at` on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PriceSet {
    pub model: String,
    pub price: Price,
    pub effective_at: DateTime<Utc>,
}

/// Money added to (or, when negative, taken from) a key's balance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreditGranted {
    pub key_id: Uuid,
    pub amount: Nanos,
    pub note: String,
}

/// A subscription plan was created or changed: its whole definition from this event on.
/// Billing applies plans in log order; see `billing::plans` for the money rules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanConfigured {
    pub plan_id: Uuid,
    pub name: String,
    /// What the plan pays per calendar month (UTC).
    pub monthly_quota: Nanos,
    /// Models the plan pays for (the names clients ask for); empty = every model.
    #[serde(default)]
    pub models: Vec<String>,
    /// Whether users may subscribe themselves (otherwise an admin assigns it).
    #[serde(default)]
    pub public: bool,
    /// `api` or `config`.
    pub source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by_user: Option<Uuid>,
}

/// A user's plan is `plan_id` from this event on, replacing any plan they had.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanSubscribed {
    pub user_id: Uuid,
    pub plan_id: Uuid,
    /// Who did it: the user themselves, an admin user, or none for the admin token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by_user: Option<Uuid>,
}

/// A user has no plan from this event on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanUnsubscribed {
    pub user_id: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by_user: Option<Uuid>,
}

/// A request was answered from the response cache with the answer recorded for
/// `source_request_id`: no worker or upstream was involved. `usage` is the original
/// answer's (what the client saw); billing charges the cache price, never these tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseServedFromCache {
    pub request_id: Uuid,
    pub key_id: Uuid,
    pub user_id: Option<Uuid>,
    pub model: String,
    pub api: crate::work::Api,
    pub stream: bool,
    pub source_request_id: Uuid,
    pub usage: Usage,
    pub usage_source: UsageSource,
}

/// Money added to (or, when negative, taken from) a user's balance, which all the user's
/// keys draw on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserCreditGranted {
    pub user_id: Uuid,
    pub amount: Nanos,
    pub note: String,
}

/// Audit: a key was created (its secret never appears in an event).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyCreated {
    pub key_id: Uuid,
    pub name: String,
    pub prefix: String,
    pub group: String,
    pub source: String,
}

/// Audit: a key's settings changed; `changes` names each changed field with its new value
/// (never a secret).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyUpdated {
    pub key_id: Uuid,
    pub changes: serde_json::Value,
    /// Who changed it: a user id, or none for the admin token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by_user: Option<Uuid>,
}

/// Audit: a key was revoked and stops authenticating.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyRevoked {
    pub key_id: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by_user: Option<Uuid>,
}

/// Audit: a user account was created (its password hash never appears in an event).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserRegistered {
    pub user_id: Uuid,
    pub name: String,
    pub role: String,
    /// `register`, `admin` (created by an admin) or `cli`.
    pub source: String,
}

/// Audit: a user's role, group, limits, status or password changed; `changes` names each
/// field with its new value (a password only as `"changed"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserUpdated {
    pub user_id: Uuid,
    pub changes: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by_user: Option<Uuid>,
}

/// Audit: a channel was created or changed (secrets never appear in an event).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChannelConfigured {
    pub channel_id: Uuid,
    pub name: String,
    pub channel_type: String,
    pub models: Vec<String>,
    pub enabled: bool,
    pub source: String,
    /// The user whose personal channel (bring your own key) this is; absent = shared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_user_id: Option<Uuid>,
}

/// Audit: a channel was deleted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChannelDeleted {
    pub channel_id: Uuid,
    pub name: String,
    pub source: String,
    /// The user whose personal channel this was; absent = shared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_user_id: Option<Uuid>,
}

/// A worker's circuit breaker took a channel out of routing until `until` (every worker
/// honours it through the shared health bucket); a probe follows when it runs out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChannelBanned {
    pub channel_id: Uuid,
    pub channel_name: String,
    pub until: DateTime<Utc>,
    /// The failure that tipped it.
    pub kind: ErrorKind,
    /// Failures in a row that led to the ban (1 for a `Retry-After` or a failed probe).
    pub failures: u32,
    /// Seconds the provider asked for, when the ban honours a `Retry-After`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
    /// The request whose attempt failed last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<Uuid>,
}

/// A conversation was started. It belongs to a user, or to a key that has no user (what
/// a user's key creates belongs to the user); exactly one of the two owners is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionCreated {
    pub session_id: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_user_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_key_id: Option<Uuid>,
    pub title: String,
    /// The model turns use when the chat request names none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The system prompt sent first with every turn unless a turn brings its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRenamed {
    pub session_id: Uuid,
    pub title: String,
}

/// The session and its messages disappear from every read; its events stay in the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionDeleted {
    pub session_id: Uuid,
}

/// A user turn was added to a session and `request_id` was queued to answer it. The
/// answer arrives as that request's `CompletionFinished` (with `session_id` and `content`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionMessageAppended {
    pub session_id: Uuid,
    pub message_id: Uuid,
    /// `user` (assistant turns come from `CompletionFinished`).
    pub role: String,
    pub content: String,
    pub request_id: Uuid,
    pub model: String,
}

/// The last answer of a session is being generated again by `request_id`. The answer
/// `replaces` (if any) is superseded once the new one completes, so a failed
/// regeneration leaves the old answer in place.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionReplyRegenerated {
    pub session_id: Uuid,
    pub request_id: Uuid,
    /// The user turn being answered again.
    pub user_message_id: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<Uuid>,
    pub model: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trips() {
        let ev = Event::PriceSet(PriceSet {
            model: "gpt-4o-mini".into(),
            price: Price::default(),
            effective_at: Utc::now(),
        });
        let env = ev.clone().into_envelope(Utc::now(), Metadata::default());
        assert_eq!(env.event_type, "PriceSet");
        assert_eq!(env.stream, "price-gpt-4o-mini");
        let json = serde_json::to_string(&env).expect("serialize");
        let back: Envelope = serde_json::from_str(&json).expect("parse");
        assert_eq!(back.decode().expect("decode"), ev);
    }

    #[test]
    fn unknown_and_future_events_are_errors() {
        let mut env = Event::CreditGranted(CreditGranted {
            key_id: crate::new_id(),
            amount: Nanos(5),
            note: String::new(),
        })
        .into_envelope(Utc::now(), Metadata::default());
        env.schema_version = 99;
        assert!(matches!(
            env.decode(),
            Err(EventError::FutureVersion { .. })
        ));
        env.event_type = "Nope".into();
        assert!(matches!(env.decode(), Err(EventError::UnknownType(_))));
    }
}
