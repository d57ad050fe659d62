//! What nodes and workers say to each other: the announcement a node keeps in the nodes
//! bucket, the call a worker makes, and the messages a node sends back while it serves it.
//! Everything is JSON; the subjects are in `schemas::names`.

use std::collections::BTreeMap;

use router::Channel;
use schemas::work::{ErrorKind, WorkItem};
use schemas::{Usage, UsageSource};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::adapters::UpstreamError;

/// The channel type of a live node in the router's snapshot.
pub const CHANNEL_TYPE: &str = "node";
/// `UpstreamError::provider` of failures a node reports or the worker sees around a call.
pub const PROVIDER: &str = "node";

/// The value of `node.<node id>` in `<NS>_NODES`, put by the node on every heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// New at every start of the node process: a restarted node is a new channel.
    pub id: Uuid,
    pub name: String,
    /// The `sluice` version the node runs.
    pub version: String,
    pub models: Vec<ServedModel>,
    pub max_parallel: u32,
    /// Calls running on the node now.
    pub in_flight: u32,
    /// Routing priority of the node's channel (lower is tried first).
    #[serde(default)]
    pub priority: i32,
    /// Unix ms, node clock.
    pub started_at_ms: u64,
    /// Unix ms of this heartbeat, node clock (informational: liveness is judged by when a
    /// heartbeat arrives, so a node's clock cannot keep it alive).
    pub at_ms: u64,
}

/// One model a node serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedModel {
    /// The name clients ask for.
    pub name: String,
    /// The node's provider's name for it.
    pub upstream: String,
}

impl NodeRecord {
    /// What logs, events and the admin API call the node's channel.
    pub fn channel_name(&self) -> String {
        format!("node:{}", self.name)
    }

    /// The node as the router sees it: a channel of type `node` serving its models, its
    /// weight its capacity (so "least loaded" means calls in flight per slot), tried once
    /// per request (the node's own provider is local; another node or channel is the
    /// better retry).
    pub fn to_channel(&self) -> Channel {
        Channel {
            id: self.id,
            name: self.channel_name(),
            channel_type: CHANNEL_TYPE.to_owned(),
            base_url: None,
            api_key: None,
            models: self.models.iter().map(|m| m.name.clone()).collect(),
            model_map: self
                .models
                .iter()
                .map(|m| (m.name.clone(), m.upstream.clone()))
                .collect::<BTreeMap<_, _>>(),
            priority: self.priority,
            weight: self.max_parallel.max(1),
            retry: 1,
            groups: Vec::new(),
            enabled: true,
            timeouts: Default::default(),
            owner: None,
        }
    }
}

/// The payload of `<ns>.nodes.<node id>.call`, as the worker sends it.
#[derive(Debug, Serialize)]
pub struct NodeCallOut<'a> {
    pub call_id: Uuid,
    /// The node's name for the model, as the worker's channel maps it.
    pub upstream_model: &'a str,
    pub item: &'a WorkItem,
}

/// The payload of `<ns>.nodes.<node id>.call`, as the node reads it.
#[derive(Debug, Deserialize)]
pub struct NodeCall {
    pub call_id: Uuid,
    pub upstream_model: String,
    pub item: WorkItem,
}

/// The node's answer to a call: it runs it, or refuses (full, shutting down, a model it
/// does not serve) so the worker tries elsewhere at once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallReply {
    Accepted,
    Refused(WireError),
}

/// An [`UpstreamError`] on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireError {
    pub kind: ErrorKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
}

impl From<&UpstreamError> for WireError {
    fn from(e: &UpstreamError) -> Self {
        Self {
            kind: e.kind,
            status: e.status,
            message: e.message.clone(),
            code: e.code.clone(),
            param: e.param.clone(),
            retry_after: e.retry_after,
        }
    }
}

impl WireError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self::from(&UpstreamError::new(PROVIDER, kind, message))
    }

    pub fn into_upstream(self) -> UpstreamError {
        UpstreamError {
            provider: PROVIDER,
            kind: self.kind,
            status: self.status,
            message: self.message,
            code: self.code,
            param: self.param,
            retry_after: self.retry_after,
        }
    }
}

/// What a node sends on `<ns>.nodes.<node id>.result.<call id>`, each as a request: the
/// worker answers every one with an empty reply, which is how the node knows its worker
/// is still there.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeMsg {
    /// Sent every [`super::KEEPALIVE`] while the call runs.
    Alive,
    End(Box<NodeEnd>),
}

/// How a call ended on the node, with everything the worker needs to write the terminal
/// event and the last frames.
#[derive(Debug, Serialize, Deserialize)]
pub struct NodeEnd {
    pub outcome: EndOutcome,
    /// Whether the node published frames on the chunk subject (the client may have seen
    /// part of the answer: no failover).
    pub published: bool,
    /// The `seq` the next frame of the request gets.
    pub next_seq: u64,
    /// Frames the node numbered but did not send (the answer's closing frames, or a plain
    /// answer's whole body): the worker sends them with `Done` after recording the
    /// terminal event. A JSON array of `schemas::work::Frame`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<Box<RawValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_source: Option<UsageSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    /// Milliseconds from the call's acceptance to the first generated token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_content_ms: Option<u64>,
    /// The answer's text, only for a session's turn (the conversation keeps it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndOutcome {
    /// The answer is complete; its last frames are `pending`.
    Finished,
    /// The provider failed; anything published was sent (the node flushed it first).
    Failed(WireError),
    /// Stopped on the worker's request (or the node's shutdown, or losing its worker);
    /// after content, the answer's closing frames are `pending`.
    Stopped,
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn record() -> NodeRecord {
        NodeRecord {
            id: Uuid::now_v7(),
            name: "gpu-1".to_owned(),
            version: "0.1.0".to_owned(),
            models: vec![ServedModel {
                name: "llama-3.1-8b".to_owned(),
                upstream: "llama3.1:8b".to_owned(),
            }],
            max_parallel: 8,
            in_flight: 2,
            priority: 0,
            started_at_ms: 1,
            at_ms: 2,
        }
    }

    #[test]
    fn a_node_is_a_channel_of_type_node() {
        let r = record();
        let c = r.to_channel();
        assert_eq!(c.id, r.id);
        assert_eq!(c.channel_type, CHANNEL_TYPE);
        assert_eq!(c.name, "node:gpu-1");
        assert!(c.serves("llama-3.1-8b", "any-group"));
        assert_eq!(c.upstream_model("llama-3.1-8b"), "llama3.1:8b");
        assert_eq!(c.weight, 8);
        assert_eq!(c.retry, 1);
    }

    #[test]
    fn messages_round_trip() {
        let end = NodeMsg::End(Box::new(NodeEnd {
            outcome: EndOutcome::Failed(WireError::new(ErrorKind::Upstream5xx, "boom")),
            published: true,
            next_seq: 4,
            pending: Some(
                RawValue::from_string(r#"[{"seq":3,"kind":"chunk","data":{}}]"#.to_owned())
                    .unwrap(),
            ),
            usage: Some(Usage::default()),
            usage_source: Some(UsageSource::Estimated),
            finish_reason: None,
            first_content_ms: Some(12),
            content: None,
        }));
        let bytes = serde_json::to_vec(&end).unwrap();
        let NodeMsg::End(back) = serde_json::from_slice(&bytes).unwrap() else {
            panic!("not an end");
        };
        assert_eq!(back.next_seq, 4);
        assert_eq!(
            back.pending.unwrap().get(),
            r#"[{"seq":3,"kind":"chunk","data":{}}]"#
        );
        let EndOutcome::Failed(e) = back.outcome else {
            panic!("not failed")
        };
        assert_eq!(e.into_upstream().kind, ErrorKind::Upstream5xx);
        assert!(matches!(
            serde_json::from_slice::<NodeMsg>(&serde_json::to_vec(&NodeMsg::Alive).unwrap())
                .unwrap(),
            NodeMsg::Alive
        ));
        let refused = CallReply::Refused(WireError::new(ErrorKind::RateLimited, "full"));
        let back: CallReply =
            serde_json::from_slice(&serde_json::to_vec(&refused).unwrap()).unwrap();
        assert_eq!(back, refused);
    }
}
