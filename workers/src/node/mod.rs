//! Remote worker nodes (`sluice node`): a machine with its own provider (Ollama, vLLM, an
//! OpenAI-compatible server, an API key) serves models to the gateway over NATS, with no
//! connection of its own to Postgres or the gateway's HTTP.
//!
//! Protocol (every name derives from the namespace, see `schemas::names`):
//! - **Announce.** The node puts its [`NodeRecord`] (id, name, served models, max parallel
//!   calls, calls in flight, version) under `node.<node id>` in the KV bucket `<NS>_NODES`
//!   every [`HEARTBEAT`], and deletes it when it stops cleanly. Workers and the ingress
//!   watch the bucket; a node not heard from for [`STALE_AFTER`] is gone (the bucket's
//!   `max_age` also drops its record). To the router a live node is a channel of type
//!   `node` (id = node id, weight = max parallel), so priority, least-load, bans and
//!   failover apply to it like to any channel.
//! - **Call.** The worker that routed a request to a node subscribes to
//!   `<ns>.nodes.<node id>.result.<call id>`, then sends a core NATS request on
//!   `<ns>.nodes.<node id>.call` with the [`protocol::NodeCall`] (the work item and the
//!   node's model name). The node answers at once: accepted, or refused (full, stopping,
//!   model not served), which the worker treats as a failed attempt and fails over.
//! - **Serve.** The node calls its provider through the same adapters, relay and frame
//!   code as a worker and publishes the frames on `<ns>.chunks.<request_id>` itself, so the
//!   ingress relays them as from any worker. It holds back the last frames (the closing
//!   chunks, or a plain answer's body).
//! - **Report.** While it runs, the node sends `alive` on the result subject every
//!   [`KEEPALIVE`], as a request the worker answers; at the end it sends `end` with the
//!   outcome, usage, finish reason, time to first token, whether it published anything,
//!   the next frame number and the held-back frames.
//! - **Terminal event.** Only the worker writes it (`CompletionFinished`, `RequestFailed`,
//!   `RequestCancelled`), then sends the held-back frames with `Done` or `Error` in one
//!   message, then acks: one terminal event per request, billed once, as for its own calls.
//! - **Failures.** A node that refuses, fails before publishing, or goes silent for
//!   [`SILENCE`] fails the attempt: the worker fails over when nothing reached the client
//!   (it checks the stored chunks to be sure), otherwise ends the request with an error
//!   frame numbered after the last one the client got. A worker that wants a call stopped
//!   (client cancel, deadline, shutdown) publishes `<ns>.nodes.<node id>.stop.<call id>`;
//!   a node whose keepalives go unanswered (its worker died) stops the call itself, so a
//!   redelivered request is never served twice at once.

pub mod bucket;
mod call;
pub(crate) mod dispatch;
pub mod protocol;
mod serve;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use router::ChannelSet;
use schemas::Namespace;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use protocol::{NodeRecord, ServedModel, CHANNEL_TYPE};
pub use serve::{run_node, NodeError};

/// How often a node puts its record.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A node whose heartbeat has not arrived for this long is gone.
pub const STALE_AFTER: Duration = Duration::from_secs(4);
/// How long the nodes bucket keeps a record that is not renewed.
pub const BUCKET_MAX_AGE: Duration = Duration::from_secs(5);
/// How often a node tells the worker that a call is still running.
pub const KEEPALIVE: Duration = Duration::from_secs(1);
/// How long a worker waits without a word from a node before the call counts as lost.
pub const SILENCE: Duration = Duration::from_secs(4);

/// Keeps the router's node channels equal to the live nodes of the bucket, until
/// `shutdown` (the worker side of announcing).
pub(crate) fn spawn_routing(
    tracker: &TaskTracker,
    js: jetstream::Context,
    ns: Namespace,
    channels: ChannelSet,
    shutdown: CancellationToken,
) {
    tracker.spawn(bucket::follow(js, ns, shutdown, move |live| {
        let next: Vec<Arc<router::Channel>> =
            live.iter().map(|r| Arc::new(r.to_channel())).collect();
        let current = channels.nodes();
        if current == next {
            return;
        }
        for gone in current.iter().filter(|c| !next.iter().any(|n| n.id == c.id)) {
            tracing::info!(node = %gone.name, node_id = %gone.id, "node left; no longer routed");
        }
        for new in next.iter().filter(|n| !current.iter().any(|c| c.id == n.id)) {
            tracing::info!(node = %new.name, node_id = %new.id, models = ?new.models, "node joined; routing to it");
        }
        channels.replace_nodes(next);
    }));
}
