//! Failover, bans and shared channel health on real NATS and Postgres, with
//! `MockUpstream`s as the providers: a failing priority-1 channel is routed around, banned,
//! left alone until its probe, and the ban holds in every worker.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{chat, fast_options, mock, mock_with, ChannelRow, Harness, NATS_URL};
use mock_upstream::{MockConfig, MockUpstream};
use router::{Availability, Ban, BreakerConfig, HealthBook};
use schemas::work::{ErrorKind, FrameKind};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use workers::health::{now_ms, BanRecord, SharedHealth};
use workers::{WorkerError, WorkerOptions};

fn options(ban: Duration) -> WorkerOptions {
    WorkerOptions {
        breaker: BreakerConfig {
            failure_threshold: 3,
            ban,
            ..BreakerConfig::default()
        },
        ..fast_options()
    }
}

fn failing(status: u16) -> MockConfig {
    MockConfig {
        fail_status: Some(status),
        ..MockConfig::default()
    }
}

/// A worker with its own NATS connection and its own stop switch, like a separate process.
struct Worker {
    stop: CancellationToken,
    task: JoinHandle<Result<(), WorkerError>>,
}

impl Worker {
    async fn start(h: &Harness, opts: WorkerOptions) -> Worker {
        let nats = projector::bus::connect(NATS_URL, "routing-test-worker")
            .await
            .unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(workers::run_worker(
            nats,
            h.pool.clone(),
            h.ns.clone(),
            opts,
            stop.clone(),
        ));
        Worker { stop, task }
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("worker stops")
            .unwrap()
            .unwrap();
    }
}

/// Sends a plain request and returns the answer's `CompletionFinished` channel name.
async fn served_by(h: &Harness) -> (Uuid, String) {
    let a = h
        .send("m", chat("m", false, false, json!({"chunks": 2})))
        .await;
    assert_eq!(a.last().kind, FrameKind::Done, "{:?}", a.frames);
    let finished = h.event(a.request_id, "CompletionFinished").await;
    (
        a.request_id,
        finished["channel_name"].as_str().unwrap().to_owned(),
    )
}

fn calls(mock: &MockUpstream) -> u64 {
    mock.stats().requests_total
}

async fn ban_record(h: &Harness, channel: Uuid) -> Option<BanRecord> {
    let kv =
        h.js.get_key_value(h.ns.channel_health_bucket())
            .await
            .unwrap();
    kv.get(format!("ban.{}", channel.simple()))
        .await
        .unwrap()
        .map(|v| serde_json::from_slice(&v).unwrap())
}

async fn channels(h: &Harness, primary_url: String, backup: &MockUpstream) -> (Uuid, Uuid) {
    let mut row = ChannelRow::new("primary", backup, &["m"]);
    row.base_url = primary_url;
    row.priority = 1;
    let primary = h.add_channel(row).await;
    let mut row = ChannelRow::new("backup", backup, &["m"]);
    row.priority = 2;
    let backup = h.add_channel(row).await;
    (primary, backup)
}

#[tokio::test]
async fn a_primary_failing_with_500_fails_over_and_is_banned() {
    let mut h = Harness::new().await;
    let primary = mock_with(failing(500)).await;
    let backup = mock().await;
    let (primary_id, _) = channels(&h, primary.base_url(), &backup).await;
    h.start_worker(options(Duration::from_secs(60)));

    let mut first = None;
    for _ in 0..10 {
        let (request_id, channel) = served_by(&h).await;
        assert_eq!(channel, "backup");
        first.get_or_insert(request_id);
    }
    // Three failures in a row ban the primary; the other seven requests never call it.
    assert_eq!(calls(&primary), 3);
    assert_eq!(calls(&backup), 10);

    let first = first.unwrap();
    assert_eq!(
        h.event_types(first).await,
        [
            "AttemptStarted",
            "AttemptFailed",
            "AttemptStarted",
            "CompletionFinished"
        ]
    );
    let failed = h.event(first, "AttemptFailed").await;
    assert_eq!(failed["kind"], "upstream5xx");
    assert_eq!(failed["status"], 500);

    let bans = h.events_of("ChannelBanned").await;
    assert_eq!(bans.len(), 1);
    let ban = &bans[0].data;
    assert_eq!(ban["channel_id"], json!(primary_id));
    assert_eq!(ban["channel_name"], "primary");
    assert_eq!(ban["failures"], 3);
    assert_eq!(ban["kind"], "upstream5xx");
    let record = ban_record(&h, primary_id).await.expect("the ban is shared");
    assert!(record.until_ms > now_ms() + 50_000, "{record:?}");
    h.cleanup().await;
}

#[tokio::test]
async fn refused_connections_fail_over_and_the_probe_brings_the_primary_back() {
    let mut h = Harness::new().await;
    // A port nothing listens on (yet): connections are refused.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let backup = mock().await;
    let (primary_id, _) = channels(&h, format!("http://{addr}/v1"), &backup).await;
    h.start_worker(options(Duration::from_secs(4)));

    for _ in 0..3 {
        let (request_id, channel) = served_by(&h).await;
        assert_eq!(channel, "backup");
        let failed = h.event(request_id, "AttemptFailed").await;
        assert_eq!(failed["kind"], "connection");
    }
    let record = ban_record(&h, primary_id).await.expect("banned");

    // The primary comes back, but is banned: it gets no traffic until the ban runs out.
    let primary = MockUpstream::start(addr, MockConfig::default())
        .await
        .unwrap();
    for _ in 0..3 {
        let (request_id, channel) = served_by(&h).await;
        assert_eq!(channel, "backup");
        assert_eq!(
            h.event_types(request_id).await,
            ["AttemptStarted", "CompletionFinished"],
            "a banned channel is not even attempted"
        );
    }
    assert_eq!(calls(&primary), 0);

    let wait = record.until_ms.saturating_sub(now_ms()) + 100;
    tokio::time::sleep(Duration::from_millis(wait)).await;
    // The next request probes the primary, which answers: the ban is lifted everywhere.
    let (_, channel) = served_by(&h).await;
    assert_eq!(channel, "primary");
    assert_eq!(calls(&primary), 1);
    assert_eq!(ban_record(&h, primary_id).await.unwrap().until_ms, 0);
    for _ in 0..2 {
        assert_eq!(served_by(&h).await.1, "primary");
    }
    assert_eq!(calls(&primary), 3);
    assert_eq!(calls(&backup), 6);
    h.cleanup().await;
}

#[tokio::test]
async fn a_429_with_retry_after_bans_at_once_for_as_long_as_asked() {
    let mut h = Harness::new().await;
    let primary = mock_with(failing(429)).await;
    let backup = mock().await;
    let (primary_id, _) = channels(&h, primary.base_url(), &backup).await;
    h.start_worker(options(Duration::from_secs(60)));

    let before = now_ms();
    let (_, channel) = served_by(&h).await;
    assert_eq!(channel, "backup");
    assert_eq!(calls(&primary), 1);
    let bans = h.events_of("ChannelBanned").await;
    assert_eq!(bans.len(), 1);
    assert_eq!(bans[0].data["kind"], "rate_limited");
    assert_eq!(bans[0].data["retry_after"], 1);
    assert_eq!(bans[0].data["failures"], 1);
    // The mock asks for 1 s: the ban is that, not the 60 s default.
    let record = ban_record(&h, primary_id).await.unwrap();
    assert!(record.until_ms >= before + 1_000, "{record:?}");
    assert!(record.until_ms <= now_ms() + 1_000, "{record:?}");
    h.cleanup().await;
}

#[tokio::test]
async fn when_every_channel_is_banned_the_client_gets_503_with_retry_after() {
    let mut h = Harness::new().await;
    let only = mock_with(failing(500)).await;
    h.add_channel(ChannelRow::new("only", &only, &["m"])).await;
    h.start_worker(options(Duration::from_secs(60)));
    for _ in 0..3 {
        let a = h.send("m", chat("m", false, false, json!({}))).await;
        assert_eq!(a.error().kind, ErrorKind::Upstream5xx);
    }
    let a = h.send("m", chat("m", false, false, json!({}))).await;
    let e = a.error();
    assert_eq!(e.kind, ErrorKind::NoChannel);
    assert_eq!(e.status, 503);
    assert!(
        e.retry_after.is_some_and(|s| (1..=60).contains(&s)),
        "{e:?}"
    );
    assert!(e.message.contains("temporarily banned"), "{}", e.message);
    assert_eq!(calls(&only), 3);
    h.cleanup().await;
}

#[tokio::test]
async fn a_second_worker_honours_the_first_workers_ban() {
    let h = Harness::new().await;
    let primary = mock_with(failing(500)).await;
    let backup = mock().await;
    channels(&h, primary.base_url(), &backup).await;

    let a = Worker::start(&h, options(Duration::from_secs(60))).await;
    for _ in 0..3 {
        assert_eq!(served_by(&h).await.1, "backup");
    }
    assert_eq!(calls(&primary), 3, "worker A banned the primary");

    // Worker B has its own connection and its own health state; only the shared bucket
    // can tell it about A's ban. A stops, so B serves everything from here on.
    let b = Worker::start(&h, options(Duration::from_secs(60))).await;
    a.stop().await;
    for _ in 0..10 {
        assert_eq!(served_by(&h).await.1, "backup");
    }
    assert_eq!(
        calls(&primary),
        3,
        "worker B never called the banned primary"
    );
    assert_eq!(calls(&backup), 13);
    b.stop().await;
    h.cleanup().await;
}

/// Polls `check` until it holds; fails after 10 s (a liveness bound, not a speed claim).
async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn bans_probes_and_load_propagate_between_live_workers() {
    let h = Harness::new().await;
    let stop = CancellationToken::new();
    let tracker = tokio_util::task::TaskTracker::new();
    let open = |book: HealthBook| {
        let js = h.js.clone();
        let ns = h.ns.clone();
        async move {
            Arc::new(
                SharedHealth::open(&js, &ns, book, BreakerConfig::default())
                    .await
                    .unwrap(),
            )
        }
    };
    let (book_a, book_b) = (HealthBook::default(), HealthBook::default());
    let a = open(book_a.clone()).await;
    let b = open(book_b.clone()).await;
    a.spawn(&tracker, stop.clone());
    b.spawn(&tracker, stop.clone());
    let channel = Uuid::now_v7();
    let cell_b = book_b.cell(channel);

    // A bans: B sees it.
    let until = now_ms() + 60_000;
    let ban = Ban {
        until_ms: until,
        kind: ErrorKind::Upstream5xx,
        failures: 3,
        retry_after: None,
    };
    book_a.cell(channel).apply_remote(until, 0);
    a.banned(channel, &ban).await;
    eventually("B sees A's ban", || {
        cell_b.availability(now_ms()) == Availability::Banned(until)
    })
    .await;

    // A lifts it: B sees that too.
    a.recovered(channel).await;
    eventually("B sees the ban lifted", || {
        cell_b.availability(now_ms()) == Availability::Closed
    })
    .await;

    // A ban that ran out: one probe in the whole deployment.
    let past = Ban {
        until_ms: now_ms() - 1,
        ..ban
    };
    book_a.cell(channel).apply_remote(past.until_ms, 0);
    a.banned(channel, &past).await;
    eventually("B sees the expired ban", || {
        matches!(cell_b.availability(now_ms()), Availability::HalfOpen { .. })
    })
    .await;
    assert!(a.claim_probe(channel, &book_a.cell(channel)).await);
    assert!(!b.claim_probe(channel, &cell_b).await);

    // Calls in flight on A count as load on B, and stop counting when they end.
    let call = book_a.cell(channel).start();
    eventually("B counts A's call", || cell_b.load() == 1).await;
    drop(call);
    eventually("B sees A's call end", || cell_b.load() == 0).await;

    stop.cancel();
    tracker.close();
    tracker.wait().await;
    h.cleanup().await;
}
