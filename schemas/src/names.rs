//! Every NATS subject and stream, Redis key and the Postgres schema derive from one
//! namespace, so tests and tenants can share servers without seeing each other.

use std::fmt::Write as _;

/// The namespace all names derive from (`SLUICE_NAMESPACE`, default `sluice`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid namespace `{0}`: use 1-48 characters of a-z, 0-9 and `_`, starting with a letter")]
pub struct InvalidNamespace(pub String);

impl Namespace {
    /// A namespace is also a Postgres schema name and a NATS subject token, so it is kept
    /// to the characters valid in both without quoting.
    pub fn new(name: &str) -> Result<Self, InvalidNamespace> {
        let ok = !name.is_empty()
            && name.len() <= 48
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if ok {
            Ok(Self(name.to_owned()))
        } else {
            Err(InvalidNamespace(name.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The Postgres schema holding this namespace's tables.
    pub fn pg_schema(&self) -> &str {
        &self.0
    }

    fn upper(&self) -> String {
        self.0.to_ascii_uppercase()
    }

    pub fn requests_stream(&self) -> String {
        format!("{}_REQUESTS", self.upper())
    }
    pub fn chunks_stream(&self) -> String {
        format!("{}_CHUNKS", self.upper())
    }
    pub fn events_stream(&self) -> String {
        format!("{}_EVENTS", self.upper())
    }
    /// The one durable consumer all worker processes share.
    pub fn workers_consumer(&self) -> String {
        format!("{}_WORKERS", self.upper())
    }
    /// The KV bucket where workers share channel bans and in-flight counts.
    pub fn channel_health_bucket(&self) -> String {
        format!("{}_CHANNEL_HEALTH", self.upper())
    }
    /// The KV bucket where remote worker nodes (`sluice node`) announce themselves, one
    /// key per node, heartbeated; entries age out when a node stops.
    pub fn nodes_bucket(&self) -> String {
        format!("{}_NODES", self.upper())
    }

    /// `<ns>.requests.<model>`, the model encoded into one subject token.
    pub fn request_subject(&self, model: &str) -> String {
        format!("{}.requests.{}", self.0, encode_token(model))
    }
    pub fn requests_wildcard(&self) -> String {
        format!("{}.requests.>", self.0)
    }
    pub fn chunk_subject(&self, request_id: &uuid::Uuid) -> String {
        format!("{}.chunks.{}", self.0, request_id.simple())
    }
    pub fn chunks_wildcard(&self) -> String {
        format!("{}.chunks.>", self.0)
    }
    /// `<ns>.events.<kind>.<id>` for an event stream named `<kind>-<id>`.
    pub fn event_subject(&self, stream: &str) -> String {
        match stream.split_once('-') {
            Some((kind, id)) => format!("{}.events.{}.{}", self.0, kind, encode_token(id)),
            None => format!("{}.events.{}", self.0, encode_token(stream)),
        }
    }
    pub fn events_wildcard(&self) -> String {
        format!("{}.events.>", self.0)
    }
    pub fn cancel_subject(&self, request_id: &uuid::Uuid) -> String {
        format!("{}.cancel.{}", self.0, request_id.simple())
    }
    /// What each worker process subscribes to once, dispatching to its requests in flight.
    pub fn cancel_wildcard(&self) -> String {
        format!("{}.cancel.*", self.0)
    }
    /// `<ns>.watchers.<request_id>` (core NATS request): "is a client still attached to
    /// this stream, or did one leave within the resume grace?" Every ingress answers for
    /// the clients it relays to.
    pub fn watchers_subject(&self, request_id: &uuid::Uuid) -> String {
        format!("{}.watchers.{}", self.0, request_id.simple())
    }
    pub fn watchers_wildcard(&self) -> String {
        format!("{}.watchers.*", self.0)
    }
    /// `<ns>.nodes.<node_id>.call` (core NATS request): a worker hands one attempt to a node.
    pub fn node_call_subject(&self, node: &uuid::Uuid) -> String {
        format!("{}.nodes.{}.call", self.0, node.simple())
    }
    /// `<ns>.nodes.<node_id>.result.<call_id>`: the node's keepalives and the attempt's
    /// outcome, to the worker that made the call (which alone writes the terminal event).
    pub fn node_result_subject(&self, node: &uuid::Uuid, call: &uuid::Uuid) -> String {
        format!(
            "{}.nodes.{}.result.{}",
            self.0,
            node.simple(),
            call.simple()
        )
    }
    /// `<ns>.nodes.<node_id>.stop.<call_id>`: the worker stops a call it no longer wants.
    pub fn node_stop_subject(&self, node: &uuid::Uuid, call: &uuid::Uuid) -> String {
        format!("{}.nodes.{}.stop.{}", self.0, node.simple(), call.simple())
    }
    pub fn node_stop_wildcard(&self, node: &uuid::Uuid) -> String {
        format!("{}.nodes.{}.stop.*", self.0, node.simple())
    }
    /// Prefix of every Redis key of this namespace.
    pub fn redis_key(&self, parts: &[&str]) -> String {
        let mut key = self.0.clone();
        for part in parts {
            key.push(':');
            key.push_str(part);
        }
        key
    }
    /// Channel used by the journal to wake projectors after each appended batch.
    pub fn pg_notify_channel(&self) -> String {
        format!("{}_event_log", self.0)
    }
}

impl Default for Namespace {
    fn default() -> Self {
        Self("sluice".to_owned())
    }
}

impl std::fmt::Display for Namespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Model names contain dots (`llama3.1:8b`), which separate NATS subject tokens; they
/// are percent-encoded, along with wildcards, whitespace and `%` itself.
pub fn encode_token(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for b in raw.bytes() {
        if b == b'.' || b == b'*' || b == b'>' || b == b'%' || b <= b' ' || b >= 0x7f {
            let _ = write!(out, "%{b:02X}");
        } else {
            out.push(b as char);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_derive_from_namespace() {
        let ns = Namespace::new("t_1").expect("valid");
        assert_eq!(ns.requests_stream(), "T_1_REQUESTS");
        assert_eq!(
            ns.request_subject("llama3.1:8b"),
            "t_1.requests.llama3%2E1:8b"
        );
        assert_eq!(ns.event_subject("request-abc"), "t_1.events.request.abc");
        assert_eq!(ns.redis_key(&["rpm", "k1"]), "t_1:rpm:k1");
    }

    #[test]
    fn namespace_rejects_unsafe_names() {
        for bad in ["", "A", "1a", "a.b", "a-b", "a b"] {
            assert!(Namespace::new(bad).is_err(), "{bad}");
        }
    }
}
