//! The node process (`sluice node`): announces itself, takes calls addressed to it, runs
//! each on its local provider, and reports back to the calling worker.
//!
//! Shutdown: the record is deleted first (workers stop routing here at once) and no call
//! is accepted any more; running calls get `grace` to finish, then are stopped (their
//! workers fail over or end them with an error), and the NATS client is flushed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::StreamExt;
use router::Channel;
use schemas::config::NodeConfig;
use schemas::work::{CancelReason, ErrorKind};
use schemas::Namespace;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::bucket::{self, node_key, BucketError};
use super::protocol::{CallReply, NodeCall, NodeMsg, NodeRecord, ServedModel, WireError};
use super::{HEARTBEAT, KEEPALIVE};
use crate::adapters::{self, Adapter, ConnectClients};
use crate::cancel::Signal;
use crate::health::now_ms;
use crate::options::WorkerOptions;

/// How long a keepalive or the end report waits for the worker's answer.
const REPORT_TIMEOUT: Duration = Duration::from_secs(2);
/// Keepalives in a row the worker may leave unanswered before the call is stopped.
const MISSED_KEEPALIVES: u32 = 2;
/// Attempts to deliver the end report.
const END_ATTEMPTS: u32 = 3;
/// How long running calls may take to finish at shutdown before they are stopped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// How long stopped calls get to report before the process exits anyway.
const STOP_WAIT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("providers[{index}]: {message}")]
    Provider { index: usize, message: String },
    #[error(transparent)]
    Bucket(#[from] BucketError),
    #[error("cannot subscribe to `{subject}`: {source}")]
    Subscribe {
        subject: String,
        #[source]
        source: async_nats::SubscribeError,
    },
    #[error("cannot build the HTTP client for the providers: {0}")]
    Http(#[from] reqwest::Error),
}

/// What every call of a node shares.
pub(super) struct NodeCtx {
    pub nats: async_nats::Client,
    pub ns: Namespace,
    pub id: Uuid,
    pub name: String,
    pub http: reqwest::Client,
    pub connect_clients: ConnectClients,
    /// The worker's defaults for time limits and frame coalescing.
    pub opts: WorkerOptions,
    /// One channel per provider of `node.yaml`, as the adapters take it.
    providers: Vec<Channel>,
    /// Served model name → index into `providers`.
    served: HashMap<String, usize>,
    /// Cancelled when the shutdown grace period is over: running calls stop.
    pub abort: CancellationToken,
    /// Stop signals of the running calls, by call id.
    calls: Mutex<HashMap<Uuid, Signal>>,
    accepting: AtomicBool,
    max_parallel: u32,
    permits: Arc<Semaphore>,
}

impl NodeCtx {
    fn in_flight(&self) -> u32 {
        let free = u32::try_from(self.permits.available_permits()).unwrap_or(u32::MAX);
        self.max_parallel.saturating_sub(free)
    }

    fn calls(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Signal>> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The node's providers as channels for the adapters, and which serves each model.
fn providers(
    config: &NodeConfig,
    http: &reqwest::Client,
) -> Result<(Vec<Channel>, HashMap<String, usize>), NodeError> {
    let mut channels = Vec::with_capacity(config.providers.len());
    let mut served = HashMap::new();
    for (index, p) in config.providers.iter().enumerate() {
        let channel = Channel {
            id: Uuid::now_v7(),
            name: format!("{}/{}#{index}", config.name, p.provider_type),
            channel_type: p.provider_type.clone(),
            base_url: p.base_url.clone().filter(|u| !u.is_empty()),
            api_key: p.api_key.as_ref().map(|k| k.expose().to_owned()),
            models: p.models.iter().map(|m| m.served().to_owned()).collect(),
            model_map: p
                .models
                .iter()
                .map(|m| (m.served().to_owned(), m.local.clone()))
                .collect(),
            priority: 0,
            weight: 1,
            retry: 1,
            groups: Vec::new(),
            enabled: true,
            timeouts: p.timeouts,
            owner: None,
        };
        Adapter::for_channel(&channel, http).map_err(|e| NodeError::Provider {
            index,
            message: e.to_string(),
        })?;
        for m in &p.models {
            served.insert(m.served().to_owned(), index);
        }
        channels.push(channel);
    }
    Ok((channels, served))
}

/// Runs a node until `shutdown`. `nats` is connected to the gateway's NATS (directly, or
/// through a leaf node); `ns` is the gateway's namespace.
pub async fn run_node(
    nats: async_nats::Client,
    ns: Namespace,
    config: NodeConfig,
    shutdown: CancellationToken,
) -> Result<(), NodeError> {
    let opts = WorkerOptions::default();
    let http = adapters::http_client_with_connect(opts.connect_timeout)?;
    let (providers, served) = providers(&config, &http)?;
    let js = jetstream::new(nats.clone());
    let Some(kv) = open_bucket(&js, &ns, &shutdown).await? else {
        return Ok(());
    };
    let id = Uuid::now_v7();
    let call_subject = ns.node_call_subject(&id);
    let stop_subject = ns.node_stop_wildcard(&id);
    let subscribe = |subject: String| {
        let nats = nats.clone();
        async move {
            nats.subscribe(subject.clone())
                .await
                .map_err(|source| NodeError::Subscribe { subject, source })
        }
    };
    let mut calls_in = subscribe(call_subject.clone()).await?;
    let stops_in = subscribe(stop_subject).await?;
    let max_parallel = config.max_parallel.max(1);
    let ctx = Arc::new(NodeCtx {
        nats: nats.clone(),
        ns: ns.clone(),
        id,
        name: config.name.clone(),
        http,
        connect_clients: ConnectClients::new(opts.connect_timeout),
        opts,
        providers,
        served,
        abort: CancellationToken::new(),
        calls: Mutex::new(HashMap::new()),
        accepting: AtomicBool::new(true),
        max_parallel,
        permits: Arc::new(Semaphore::new(max_parallel as usize)),
    });
    let mut models: Vec<ServedModel> = config
        .providers
        .iter()
        .flat_map(|p| &p.models)
        .map(|m| ServedModel {
            name: m.served().to_owned(),
            upstream: m.local.clone(),
        })
        .collect();
    models.sort_by(|a, b| a.name.cmp(&b.name));
    let record = NodeRecord {
        id,
        name: config.name.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        models,
        max_parallel,
        in_flight: 0,
        priority: config.priority,
        started_at_ms: now_ms(),
        at_ms: 0,
    };

    // Listening before announcing: a worker that sees the record can call at once.
    let heartbeat_stop = CancellationToken::new();
    let heartbeat = tokio::spawn(heartbeat(
        kv,
        record.clone(),
        ctx.clone(),
        heartbeat_stop.clone(),
    ));
    let stops_stop = CancellationToken::new();
    let stops = tokio::spawn(dispatch_stops(stops_in, ctx.clone(), stops_stop.clone()));
    tracing::info!(node = %config.name, node_id = %id, namespace = %ns, models = ?record.models.iter().map(|m| &m.name).collect::<Vec<_>>(), max_parallel, "node serving");

    let calls = TaskTracker::new();
    loop {
        let msg = tokio::select! {
            () = shutdown.cancelled() => break,
            msg = calls_in.next() => match msg {
                Some(msg) => msg,
                None => {
                    tracing::error!("the call subscription ended; the node stops");
                    break;
                }
            },
        };
        take_call(&ctx, &calls, msg).await;
    }

    // No new calls, and the record goes at once so workers stop routing here.
    ctx.accepting.store(false, Ordering::Release);
    let _ = calls_in.unsubscribe().await;
    heartbeat_stop.cancel();
    let _ = heartbeat.await;
    calls.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, calls.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            running = ctx.in_flight(),
            "calls still running after the shutdown grace period; stopping them"
        );
        ctx.abort.cancel();
        let _ = tokio::time::timeout(STOP_WAIT, calls.wait()).await;
    }
    stops_stop.cancel();
    let _ = stops.await;
    if let Err(e) = nats.flush().await {
        tracing::warn!(error = %e, "flushing NATS at shutdown failed");
    }
    tracing::info!(node = %config.name, "node stopped");
    Ok(())
}

/// Opens the nodes bucket, retrying while NATS is unreachable; `None` on shutdown.
async fn open_bucket(
    js: &jetstream::Context,
    ns: &Namespace,
    shutdown: &CancellationToken,
) -> Result<Option<kv::Store>, NodeError> {
    let mut warned = false;
    loop {
        match bucket::open(js, ns).await {
            Ok(kv) => return Ok(Some(kv)),
            Err(e) => {
                if !warned {
                    tracing::warn!(error = %e, "cannot open the nodes bucket yet; retrying until NATS answers");
                    warned = true;
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(None),
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Puts the node's record every [`HEARTBEAT`] with its current load, and deletes it when
/// `stop` is cancelled.
async fn heartbeat(
    kv: kv::Store,
    mut record: NodeRecord,
    ctx: Arc<NodeCtx>,
    stop: CancellationToken,
) {
    let key = node_key(record.id);
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        record.in_flight = ctx.in_flight();
        record.at_ms = now_ms();
        let Ok(value) = serde_json::to_vec(&record) else {
            continue;
        };
        match kv.put(key.as_str(), value.into()).await {
            Ok(_) if failing => {
                tracing::info!("announcing the node works again");
                failing = false;
            }
            Ok(_) => {}
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "announcing the node failed; workers drop it until a heartbeat gets through");
                    failing = true;
                }
            }
        }
    }
    if let Err(e) = kv.delete(key.as_str()).await {
        tracing::debug!(error = %e, "removing the node's record failed; it ages out");
    }
}

/// Stops calls named by `<ns>.nodes.<id>.stop.<call id>`, until the last call ended.
async fn dispatch_stops(
    mut stops: async_nats::Subscriber,
    ctx: Arc<NodeCtx>,
    stop: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            () = stop.cancelled() => break,
            msg = stops.next() => match msg {
                Some(msg) => msg,
                None => break,
            },
        };
        let call = msg
            .subject
            .rsplit('.')
            .next()
            .and_then(|t| Uuid::try_parse(t).ok());
        if let Some(signal) = call.and_then(|id| ctx.calls().get(&id).cloned()) {
            signal.cancel(CancelReason::Stop);
        }
    }
    let _ = stops.unsubscribe().await;
}

async fn reply(nats: &async_nats::Client, to: Option<&async_nats::Subject>, answer: &CallReply) {
    let Some(to) = to else {
        return;
    };
    let Ok(payload) = serde_json::to_vec(answer) else {
        return;
    };
    if let Err(e) = nats.publish(to.clone(), payload.into()).await {
        tracing::warn!(error = %e, "answering a call failed; the worker times out and tries elsewhere");
    }
}

/// Accepts or refuses one call, and runs an accepted one in its own task.
async fn take_call(ctx: &Arc<NodeCtx>, calls: &TaskTracker, msg: async_nats::Message) {
    let call: NodeCall = match serde_json::from_slice(&msg.payload) {
        Ok(call) => call,
        Err(e) => {
            tracing::warn!(error = %e, "undecodable call; refused");
            let refusal = WireError::new(
                ErrorKind::Internal,
                format!("the node cannot read the call: {e}"),
            );
            reply(&ctx.nats, msg.reply.as_ref(), &CallReply::Refused(refusal)).await;
            return;
        }
    };
    let refuse = |kind: ErrorKind, message: String, retry_after: Option<u64>| {
        let mut e = WireError::new(kind, message);
        e.retry_after = retry_after;
        CallReply::Refused(e)
    };
    if !ctx.accepting.load(Ordering::Acquire) {
        let answer = refuse(
            ErrorKind::Overloaded,
            format!("node `{}` is shutting down", ctx.name),
            None,
        );
        reply(&ctx.nats, msg.reply.as_ref(), &answer).await;
        return;
    }
    let Some(&index) = ctx.served.get(&call.item.model) else {
        let answer = refuse(
            ErrorKind::Upstream5xx,
            format!(
                "node `{}` does not serve model `{}`",
                ctx.name, call.item.model
            ),
            None,
        );
        reply(&ctx.nats, msg.reply.as_ref(), &answer).await;
        return;
    };
    let Ok(permit) = ctx.permits.clone().try_acquire_owned() else {
        // A 429 with Retry-After: the workers' breaker keeps the node out for a second,
        // and the request goes to another channel at once.
        let answer = refuse(
            ErrorKind::RateLimited,
            format!(
                "node `{}` is running its maximum of {} calls",
                ctx.name, ctx.max_parallel
            ),
            Some(1),
        );
        reply(&ctx.nats, msg.reply.as_ref(), &answer).await;
        return;
    };
    let signal = Signal::default();
    ctx.calls().insert(call.call_id, signal.clone());
    reply(&ctx.nats, msg.reply.as_ref(), &CallReply::Accepted).await;
    let ctx = ctx.clone();
    calls.spawn(async move {
        run_call(&ctx, &call, index, &signal).await;
        ctx.calls().remove(&call.call_id);
        drop(permit);
    });
}

/// Runs an accepted call with keepalives to its worker, then reports how it ended.
async fn run_call(ctx: &Arc<NodeCtx>, call: &NodeCall, provider: usize, signal: &Signal) {
    let accepted_at = Instant::now();
    let subject = ctx.ns.node_result_subject(&ctx.id, &call.call_id);
    tracing::debug!(request_id = %call.item.request_id, call_id = %call.call_id, model = %call.item.model, "call accepted");
    let keepalive_stop = CancellationToken::new();
    let keepalive = tokio::spawn(keepalive(
        ctx.nats.clone(),
        subject.clone(),
        signal.clone(),
        keepalive_stop.clone(),
    ));
    let end = super::call::serve(ctx, call, &ctx.providers[provider], signal, accepted_at).await;
    keepalive_stop.cancel();
    let _ = keepalive.await;
    let payload: Bytes = match serde_json::to_vec(&NodeMsg::End(Box::new(end))) {
        Ok(payload) => payload.into(),
        Err(e) => {
            tracing::error!(request_id = %call.item.request_id, error = %e, "cannot encode a call's end; its worker treats the node as lost");
            return;
        }
    };
    for attempt in 1..=END_ATTEMPTS {
        let request = async_nats::Request::new()
            .payload(payload.clone())
            .timeout(Some(REPORT_TIMEOUT));
        match ctx.nats.send_request(subject.clone(), request).await {
            Ok(_) => return,
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                tracing::warn!(request_id = %call.item.request_id, "the worker of a call is gone; its end is not reported");
                return;
            }
            Err(e) => {
                tracing::warn!(request_id = %call.item.request_id, attempt, error = %e, "reporting a call's end failed");
            }
        }
    }
}

/// Tells the worker every [`KEEPALIVE`] that the call still runs; when the worker stops
/// answering, stops the call (its request will be redelivered to another worker, which
/// must not find this call still publishing).
async fn keepalive(
    nats: async_nats::Client,
    subject: String,
    signal: Signal,
    stop: CancellationToken,
) {
    let Ok(payload) = serde_json::to_vec(&NodeMsg::Alive) else {
        return;
    };
    let payload = Bytes::from(payload);
    let mut tick = tokio::time::interval_at(Instant::now() + KEEPALIVE, KEEPALIVE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut missed = 0;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let request = async_nats::Request::new()
            .payload(payload.clone())
            .timeout(Some(REPORT_TIMEOUT));
        let answered = tokio::select! {
            () = stop.cancelled() => return,
            answer = nats.send_request(subject.clone(), request) => answer.is_ok(),
        };
        missed = if answered { 0 } else { missed + 1 };
        if missed >= MISSED_KEEPALIVES {
            tracing::warn!("the worker of a call stopped answering; stopping the call");
            signal.cancel(CancelReason::ClientGone);
            return;
        }
    }
}
