//! The request consumer: one durable pull consumer on `<NS>_REQUESTS` shared by every
//! worker process (add processes to scale), each message handled in its own task.
//!
//! Shutdown phases:
//! 1. `shutdown` is cancelled: stop pulling; messages already fetched but not started are
//!    handed back at once (`Nak`) instead of waiting out the ack wait.
//! 2. In-flight requests get `opts.shutdown_grace` to finish normally.
//! 3. Then `abort` is cancelled: the rest stop and hand their message back; a redelivery
//!    that finds content already sent ends it with a `WorkerLost` error.
//! 4. The channel refresh task ends and the NATS client is flushed, so acks and the last
//!    frames leave before the process exits.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy, AckKind};
use futures::{FutureExt, StreamExt};
use router::ChannelSet;
use schemas::Namespace;
use sqlx::PgPool;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::adapters;
use crate::channels::{spawn_refresh, ChannelLoader};
use crate::error::WorkerError;
use crate::handler::{self, Ctx};
use crate::health::SharedHealth;
use crate::options::WorkerOptions;

/// A message not acked (or progressed) within this long is redelivered to another worker
/// (the default of `WorkerOptions::ack_wait`).
pub const ACK_WAIT: Duration = Duration::from_secs(30);
/// After this many deliveries a request is not redelivered again.
pub const MAX_DELIVER: i64 = 5;
/// Requests in flight across all workers; far above any one worker's `max_in_flight`.
pub const MAX_ACK_PENDING: i64 = 65_536;
/// How long phase 3 of the shutdown waits for aborted requests to hand their message back.
const ABORT_WAIT: Duration = Duration::from_secs(2);

/// Runs a worker until `shutdown` is cancelled: pulls requests from `<NS>_REQUESTS`,
/// routes each over the channels of the `channels` table (reloaded every
/// `opts.channel_refresh`), calls the upstream and publishes frames and events.
pub async fn run_worker(
    nats: async_nats::Client,
    pool: PgPool,
    ns: Namespace,
    opts: WorkerOptions,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let js = jetstream::new(nats.clone());
    projector::bus::ensure_streams(&js, &ns).await?;
    let get_stream = |name: String| {
        let js = js.clone();
        async move {
            js.get_stream(&name)
                .await
                .map_err(|source| WorkerError::Stream { name, source })
        }
    };
    let requests = get_stream(ns.requests_stream()).await?;
    let chunks = get_stream(ns.chunks_stream()).await?;
    let consumer_name = ns.workers_consumer();
    let consumer: jetstream::consumer::PullConsumer = requests
        .get_or_create_consumer(
            &consumer_name,
            pull::Config {
                durable_name: Some(consumer_name.clone()),
                description: Some("sluice workers (shared by every worker process)".to_owned()),
                ack_policy: AckPolicy::Explicit,
                ack_wait: opts.ack_wait,
                max_deliver: MAX_DELIVER,
                max_ack_pending: MAX_ACK_PENDING,
                ..Default::default()
            },
        )
        .await
        .map_err(|source| WorkerError::Consumer {
            name: consumer_name.clone(),
            source,
        })?;

    let mut loader = ChannelLoader::new(opts.secret_key.clone());
    let Some(initial) = initial_channels(&mut loader, &pool, &shutdown).await? else {
        return Ok(());
    };
    let channels = ChannelSet::new(initial);
    let health = Arc::new(
        SharedHealth::open(&js, &ns, channels.book().clone(), opts.breaker.clone()).await?,
    );
    let tracker = TaskTracker::new();
    // The tokenizer's vocabularies take a while to build; build them off the hot path now
    // rather than in the first request whose provider reports no usage.
    tracker.spawn_blocking(billing::tokenizer::preload);
    let refresh_stop = CancellationToken::new();
    spawn_refresh(
        &tracker,
        pool,
        loader,
        channels.clone(),
        opts.channel_refresh,
        refresh_stop.clone(),
    );
    health.spawn(&tracker, refresh_stop.clone());
    // Live remote nodes join the channel set as channels of type `node`.
    crate::node::spawn_routing(
        &tracker,
        js.clone(),
        ns.clone(),
        channels.clone(),
        refresh_stop.clone(),
    );
    let cancels = crate::cancel::Cancels::start(&nats, &ns, &tracker, refresh_stop.clone()).await?;

    let max_in_flight = opts.max_in_flight.max(1);
    let ctx = Arc::new(Ctx {
        nats: nats.clone(),
        js: js.clone(),
        ns,
        chunks,
        channels,
        health,
        http: adapters::http_client_with_connect(opts.connect_timeout)?,
        connect_clients: adapters::ConnectClients::new(opts.connect_timeout),
        opts: opts.clone(),
        abort: CancellationToken::new(),
        cancels,
    });

    // Small batches: a fetched message waits here while its ack wait runs, and a batch
    // taken by a saturated worker is one the other workers cannot take.
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(max_in_flight.clamp(1, 64))
        .messages()
        .await?;
    let permits = Arc::new(Semaphore::new(max_in_flight));
    tracing::info!(consumer = %consumer_name, max_in_flight, "worker pulling requests");
    loop {
        // Take a permit before a message, so a busy worker leaves requests to others.
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let msg = tokio::select! {
            () = shutdown.cancelled() => break,
            msg = messages.next() => msg,
        };
        match msg {
            Some(Ok(msg)) => {
                let ctx = ctx.clone();
                tracker.spawn(async move {
                    handler::handle(&ctx, msg).await;
                    drop(permit);
                });
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "pulling requests failed; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
            }
            None => {
                tracing::error!("the request stream ended; the worker stops");
                break;
            }
        }
    }

    // Phase 1: hand back what was fetched but not started.
    while let Some(Some(Ok(msg))) = messages.next().now_or_never() {
        let _ = msg.ack_with(AckKind::Nak(None)).await;
    }
    drop(messages);
    // Phase 2 and 3. The health tasks stop with the refresh; requests still running
    // keep recording outcomes locally, and the next worker to see them shares them.
    refresh_stop.cancel();
    tracker.close();
    if tokio::time::timeout(opts.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("requests still running after the shutdown grace period; handing them back");
        ctx.abort.cancel();
        let _ = tokio::time::timeout(ABORT_WAIT, tracker.wait()).await;
    }
    // Phase 4.
    if let Err(e) = nats.flush().await {
        tracing::warn!(error = %e, "flushing NATS at shutdown failed");
    }
    tracing::info!("worker stopped");
    Ok(())
}

/// The first channel load must succeed before requests are taken (routing over an empty
/// set would fail them all); while Postgres is unreachable it is retried.
async fn initial_channels(
    loader: &mut ChannelLoader,
    pool: &PgPool,
    shutdown: &CancellationToken,
) -> Result<Option<Vec<Arc<router::Channel>>>, WorkerError> {
    let mut warned = false;
    loop {
        match loader.load(pool).await {
            Ok(channels) => {
                tracing::info!(channels = channels.len(), "channels loaded");
                return Ok(Some(channels));
            }
            Err(e) => {
                if !warned {
                    tracing::warn!(error = %e, "loading channels failed; retrying until Postgres answers");
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
