//! Upstreams that misbehave, on real NATS and Postgres with `MockUpstream`s as providers:
//! hung before the first token, stalled mid-stream, too slow overall, rate-limited,
//! failing with 5xx, or breaking a stream before its content. Each channel sets its own
//! short `timeouts` (1 s), so the tests stay fast; nothing here asserts how fast anything
//! is, only what happened and in which order ("not before" a delay the provider asked for).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{chat, fast_options, mock, mock_text, mock_with, ChannelRow, Harness};
use mock_upstream::{MockConfig, MockUpstream};
use router::BreakerConfig;
use schemas::work::{ErrorKind, FrameKind};
use serde_json::{json, Value};
use uuid::Uuid;
use workers::WorkerOptions;

const MODEL: &str = "gpt-test";

fn options(failure_threshold: u32) -> WorkerOptions {
    WorkerOptions {
        breaker: BreakerConfig {
            failure_threshold,
            ban: Duration::from_secs(60),
            ..BreakerConfig::default()
        },
        ..fast_options()
    }
}

/// A channel on `up` for [`MODEL`] with the given priority, retries and `timeouts`.
fn row<'a>(
    name: &'a str,
    up: &MockUpstream,
    priority: i32,
    retry: i32,
    timeouts: Value,
) -> ChannelRow<'a> {
    let mut row = ChannelRow::new(name, up, &[MODEL]);
    row.priority = priority;
    row.retry = retry;
    row.timeouts = timeouts;
    row
}

async fn attempt_failures(h: &Harness, request_id: Uuid) -> Vec<Value> {
    h.events(request_id)
        .await
        .into_iter()
        .filter(|e| e.event_type == "AttemptFailed")
        .map(|e| e.data)
        .collect()
}

/// Waits until the mock saw `n` streams dropped by their client (the worker closed the
/// upstream connection of an attempt it gave up on).
async fn wait_aborted(up: &MockUpstream, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while up.stats().streams_aborted < n {
        assert!(
            Instant::now() < deadline,
            "the worker closes the upstream stream it gave up on: {:?}",
            up.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A provider that accepts the call and never answers: each request ends its attempt after
/// the channel's `first_token_secs`, fails over to the next channel (nothing reached the
/// client), and the failures count against the hung channel until the breaker bans it;
/// then it is not called at all.
#[tokio::test]
async fn a_hung_upstream_times_out_fails_over_and_is_banned() {
    let mut h = Harness::new().await;
    let hung = mock_with(MockConfig {
        hang: true,
        ..MockConfig::default()
    })
    .await;
    let backup = mock().await;
    let hung_id = h
        .add_channel(row("hung", &hung, 1, 1, json!({"first_token_secs": 1})))
        .await;
    h.add_channel(row("backup", &backup, 2, 1, json!({}))).await;
    h.start_worker(options(3));

    for i in 0..4 {
        let a = h
            .send(MODEL, chat(MODEL, true, true, json!({"chunks": 3})))
            .await;
        assert_eq!(a.text(), mock_text(3), "request {i}");
        a.assert_seq_contiguous();
        assert_eq!(a.done().usage.completion_tokens, 3);
        let finished = h.event(a.request_id, "CompletionFinished").await;
        assert_eq!(finished["channel_name"], "backup");
        let types = h.event_types(a.request_id).await;
        if i < 3 {
            assert_eq!(
                types,
                [
                    "AttemptStarted",
                    "AttemptFailed",
                    "AttemptStarted",
                    "CompletionFinished"
                ]
            );
            let failed = &attempt_failures(&h, a.request_id).await[0];
            assert_eq!(failed["kind"], "timeout");
            assert_eq!(failed["channel_id"], json!(hung_id));
            assert!(
                failed["message"]
                    .as_str()
                    .unwrap()
                    .contains("no first token within 1 s"),
                "{failed}"
            );
        } else {
            // Banned after three timeouts in a row: not even tried.
            assert_eq!(types, ["AttemptStarted", "CompletionFinished"]);
        }
    }
    assert_eq!(hung.stats().requests_total, 3);
    assert_eq!(backup.stats().requests_total, 4);
    let bans = h.events_of("ChannelBanned").await;
    assert_eq!(bans.len(), 1);
    assert_eq!(bans[0].data["channel_name"], "hung");
    assert_eq!(bans[0].data["kind"], "timeout");
    assert_eq!(bans[0].data["failures"], 3);
    h.cleanup().await;
}

/// With nowhere to fail over to, the hung request ends with a clear timeout error event
/// (504) that names the limit, and bills nothing: nothing was produced.
#[tokio::test]
async fn a_hung_upstream_with_no_other_channel_ends_with_a_timeout_error() {
    let mut h = Harness::new().await;
    let hung = mock().await;
    h.add_channel(row("only", &hung, 1, 1, json!({"first_token_secs": 1})))
        .await;
    h.start_worker(options(3));

    // The head arrives, then nothing: the first-token limit still applies.
    let a = h
        .send(MODEL, chat(MODEL, true, false, json!({"stall_after": 0})))
        .await;
    let err = a.error();
    assert_eq!((err.kind, err.status), (ErrorKind::Timeout, 504));
    assert!(
        err.message.contains("no first token within 1 s"),
        "{}",
        err.message
    );
    assert!(a.chunks().is_empty(), "no content reached the client");
    assert_eq!(
        h.event_types(a.request_id).await,
        ["AttemptStarted", "AttemptFailed", "RequestFailed"]
    );
    let failed = h.event(a.request_id, "RequestFailed").await;
    assert_eq!(failed["kind"], "timeout");
    assert_eq!(failed["status"], 504);
    assert_eq!(
        failed["usage"],
        Value::Null,
        "nothing produced, nothing billed"
    );
    wait_aborted(&hung, 1).await;
    h.cleanup().await;
}

/// A stream that stops mid-way without closing: after the channel's `idle_secs` the client
/// gets what was generated and then a timeout error event; the request is not failed over
/// (content went out), its terminal event carries the usage of what was produced, and the
/// failure counts against the channel (banned here, at a threshold of one).
#[tokio::test]
async fn a_stream_stalled_midway_ends_after_idle_secs_and_bills_what_it_produced() {
    let mut h = Harness::new().await;
    let stalls = mock().await;
    let spare = mock().await;
    let stalls_id = h
        .add_channel(row("stalls", &stalls, 1, 1, json!({"idle_secs": 1})))
        .await;
    h.add_channel(row("spare", &spare, 2, 1, json!({}))).await;
    h.start_worker(options(1));

    let body = chat(MODEL, true, true, json!({"chunks": 10, "stall_after": 3}));
    let a = h.send(MODEL, body).await;
    a.assert_seq_contiguous();
    assert_eq!(
        a.text(),
        mock_text(3),
        "what was generated reached the client"
    );
    let err = a.error();
    assert_eq!((err.kind, err.status), (ErrorKind::Timeout, 504));
    assert!(err.message.contains("nothing for 1 s"), "{}", err.message);
    assert_eq!(
        spare.stats().requests_total,
        0,
        "no failover once content went out"
    );

    assert_eq!(
        h.event_types(a.request_id).await,
        ["AttemptStarted", "AttemptFailed", "RequestFailed"]
    );
    let failed = h.event(a.request_id, "RequestFailed").await;
    assert_eq!(failed["kind"], "timeout");
    assert_eq!(failed["channel_id"], json!(stalls_id));
    assert_eq!(failed["usage_source"], "estimated");
    assert_eq!(
        failed["usage"]["completion_tokens"],
        billing::tokenizer::count_text(MODEL, &mock_text(3)),
        "billed for the three chunks produced: {failed}"
    );
    assert!(failed["usage"]["prompt_tokens"].as_u64().unwrap() > 0);

    let bans = h.events_of("ChannelBanned").await;
    assert_eq!(bans.len(), 1);
    assert_eq!(bans[0].data["channel_id"], json!(stalls_id));
    assert_eq!(bans[0].data["kind"], "timeout");
    wait_aborted(&stalls, 1).await;
    h.cleanup().await;
}

/// `total_secs` caps an attempt however steadily the upstream sends: a slow stream is cut
/// at the limit (what was sent is billed), a slow plain answer is given up on.
#[tokio::test]
async fn total_secs_caps_an_attempt() {
    let mut h = Harness::new().await;
    let slow = mock().await;
    h.add_channel(row("slow", &slow, 1, 1, json!({"total_secs": 1})))
        .await;
    h.start_worker(options(3));

    // 50 chunks 100 ms apart would take 5 s; never silent for long, so only `total` ends it.
    let knobs = json!({"chunks": 50, "chunk_delay_ms": 100});
    let a = h.send(MODEL, chat(MODEL, true, false, knobs)).await;
    a.assert_seq_contiguous();
    let err = a.error();
    assert_eq!((err.kind, err.status), (ErrorKind::Timeout, 504));
    assert!(
        err.message.contains("total limit of 1 s"),
        "{}",
        err.message
    );
    let text = a.text();
    assert!(
        !text.is_empty() && mock_text(50).starts_with(&text) && text != mock_text(50),
        "a prefix of the answer: {text:?}"
    );
    let failed = h.event(a.request_id, "RequestFailed").await;
    assert_eq!(
        failed["usage"]["completion_tokens"],
        billing::tokenizer::count_text(MODEL, &text)
    );
    wait_aborted(&slow, 1).await;

    // A plain call that would answer after 3 s.
    let a = h
        .send(MODEL, chat(MODEL, false, false, json!({"ttft_ms": 3000})))
        .await;
    let err = a.error();
    assert_eq!((err.kind, err.status), (ErrorKind::Timeout, 504));
    assert!(
        err.message.contains("total limit of 1 s"),
        "{}",
        err.message
    );
    let failed = &attempt_failures(&h, a.request_id).await[0];
    assert_eq!(failed["kind"], "timeout");
    h.cleanup().await;
}

/// A 429 with `Retry-After: 1` on a channel with `retry: 2`: the same channel is tried
/// again, not before the second the provider asked for, and answers; the next channel is
/// never called. A `Retry-After` longer than the worker waits out fails over at once.
#[tokio::test]
async fn a_429_is_retried_on_the_same_channel_after_its_retry_after() {
    let mut h = Harness::new().await;
    let limited = mock_with(MockConfig {
        fail_status: Some(429),
        fail_times: Some(1),
        retry_after_secs: Some(1),
        ..MockConfig::default()
    })
    .await;
    let backup = mock().await;
    limited.record_calls(true);
    h.add_channel(row("limited", &limited, 1, 2, json!({})))
        .await;
    h.add_channel(row("backup", &backup, 2, 1, json!({}))).await;
    h.start_worker(options(3));

    let a = h
        .send(MODEL, chat(MODEL, true, false, json!({"chunks": 3})))
        .await;
    assert_eq!(a.text(), mock_text(3));
    let calls = limited.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    let waited = calls[1].at - calls[0].at;
    assert!(
        waited >= Duration::from_secs(1),
        "retried after {waited:?}, before the provider's Retry-After"
    );
    assert_eq!(backup.stats().requests_total, 0);
    assert_eq!(
        h.event_types(a.request_id).await,
        [
            "AttemptStarted",
            "AttemptFailed",
            "AttemptStarted",
            "CompletionFinished"
        ]
    );
    let failed = &attempt_failures(&h, a.request_id).await[0];
    assert_eq!(
        (failed["kind"].clone(), failed["status"].clone()),
        (json!("rate_limited"), json!(429))
    );
    let finished = h.event(a.request_id, "CompletionFinished").await;
    assert_eq!(finished["channel_name"], "limited");
    assert_eq!(finished["attempts"], 2);

    // Retry-After 30 s is beyond the worker's `max_retry_after` (5 s): next channel now.
    let mut h2 = Harness::new().await;
    let long = mock_with(MockConfig {
        fail_status: Some(429),
        retry_after_secs: Some(30),
        ..MockConfig::default()
    })
    .await;
    let backup2 = mock().await;
    h2.add_channel(row("long", &long, 1, 2, json!({}))).await;
    h2.add_channel(row("backup", &backup2, 2, 1, json!({})))
        .await;
    h2.start_worker(options(3));
    let a = h2
        .send(MODEL, chat(MODEL, true, false, json!({"chunks": 3})))
        .await;
    assert_eq!(a.text(), mock_text(3));
    assert_eq!(long.stats().requests_total, 1, "its second try skipped");
    let finished = h2.event(a.request_id, "CompletionFinished").await;
    assert_eq!(finished["channel_name"], "backup");
    h2.cleanup().await;
    h.cleanup().await;
}

/// 5xx without `Retry-After`: the channel's retries are spaced by the exponential backoff
/// (200 ms doubled, jittered down to at most half), and only then does the request fail
/// over to the next channel.
#[tokio::test]
async fn a_5xx_backs_off_between_retries_before_failing_over() {
    let mut h = Harness::new().await;
    let failing = mock_with(MockConfig {
        fail_status: Some(500),
        ..MockConfig::default()
    })
    .await;
    let backup = mock().await;
    failing.record_calls(true);
    backup.record_calls(true);
    h.add_channel(row("failing", &failing, 1, 3, json!({})))
        .await;
    h.add_channel(row("backup", &backup, 2, 1, json!({}))).await;
    h.start_worker(options(5));

    let a = h
        .send(MODEL, chat(MODEL, true, false, json!({"chunks": 3})))
        .await;
    assert_eq!(a.text(), mock_text(3));
    let tried = failing.calls();
    let served = backup.calls();
    assert_eq!((tried.len(), served.len()), (3, 1), "{tried:?} {served:?}");
    assert!(
        tried[1].at - tried[0].at >= Duration::from_millis(100),
        "{tried:?}"
    );
    assert!(
        tried[2].at - tried[1].at >= Duration::from_millis(200),
        "{tried:?}"
    );
    assert!(
        served[0].at > tried[2].at,
        "failover only after the retries"
    );
    let failures = attempt_failures(&h, a.request_id).await;
    assert_eq!(failures.len(), 3);
    assert!(
        failures.iter().all(|f| f["kind"] == "upstream5xx"),
        "{failures:?}"
    );
    h.cleanup().await;
}

/// A stream that breaks before any content — silent after its head, or cut — on a channel
/// with `retry: 2`: the retry asks the same channel for the whole answer without streaming
/// (once), and the client still gets a normal stream with the provider's usage. With
/// `retry: 1` there is no second attempt on that channel.
#[tokio::test]
async fn a_stream_broken_before_content_is_retried_once_without_streaming() {
    let mut h = Harness::new().await;
    let up = mock().await;
    let spare = mock().await;
    h.add_channel(row("flaky", &up, 1, 2, json!({"first_token_secs": 1})))
        .await;
    h.add_channel(row("spare", &spare, 2, 1, json!({}))).await;
    let mut once = ChannelRow::new("once", &up, &["once-model"]);
    once.retry = 1;
    h.add_channel(once).await;
    h.start_worker(options(5));

    for (knobs, kind) in [
        (json!({"chunks": 4, "stall_after": 0}), "timeout"),
        (json!({"chunks": 4, "disconnect_after": 0}), "connection"),
    ] {
        up.reset_stats();
        let a = h.send(MODEL, chat(MODEL, true, true, knobs.clone())).await;
        a.assert_seq_contiguous();
        assert_eq!(a.text(), mock_text(4), "{knobs}");
        let done = a.done();
        assert_eq!(done.usage.completion_tokens, 4);
        assert_eq!(done.usage_source, schemas::UsageSource::Provider);
        let chunks = a.chunks();
        assert_eq!(
            chunks.last().unwrap()["usage"]["completion_tokens"],
            4,
            "the usage chunk the client asked for"
        );
        assert!(chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk" && c["model"] == MODEL));
        let stats = up.stats();
        assert_eq!(
            (stats.requests_total, stats.streams_started),
            (2, 1),
            "one stream, then one plain call: {stats:?}"
        );
        assert_eq!(spare.stats().requests_total, 0);
        assert_eq!(
            h.event_types(a.request_id).await,
            [
                "AttemptStarted",
                "AttemptFailed",
                "AttemptStarted",
                "CompletionFinished"
            ]
        );
        assert_eq!(attempt_failures(&h, a.request_id).await[0]["kind"], kind);
        let finished = h.event(a.request_id, "CompletionFinished").await;
        assert_eq!(finished["channel_name"], "flaky");
        assert_eq!(finished["usage_source"], "provider");
    }

    up.reset_stats();
    let a = h
        .send(
            "once-model",
            chat(
                "once-model",
                true,
                false,
                json!({"chunks": 4, "disconnect_after": 0}),
            ),
        )
        .await;
    assert_eq!(a.error().kind, ErrorKind::Connection);
    assert_eq!(
        up.stats().requests_total,
        1,
        "retry: 1 allows no second attempt"
    );
    assert!(a.frames.iter().all(|f| f.kind != FrameKind::Chunk));
    h.cleanup().await;
}

/// Backpressure inside the worker: with `max_in_flight: 2`, five slow streams queued at
/// once never have more than two upstream calls open together; the others wait in the
/// queue (not in the worker's memory) and are all answered in turn.
#[tokio::test]
async fn a_worker_calls_upstreams_at_most_max_in_flight_at_once() {
    let mut h = Harness::new().await;
    let up = mock().await;
    h.add_channel(row("only", &up, 1, 1, json!({}))).await;
    h.start_worker(WorkerOptions {
        max_in_flight: 2,
        ..options(3)
    });
    let mut subs = Vec::new();
    for _ in 0..5 {
        let item = h.work_item(
            MODEL,
            chat(
                MODEL,
                true,
                false,
                json!({"chunks": 4, "chunk_delay_ms": 100}),
            ),
        );
        let sub = h.subscribe_and_queue(&item).await;
        subs.push((item.request_id, sub));
    }
    let readers: Vec<_> = subs
        .into_iter()
        .map(|(id, mut sub)| tokio::spawn(async move { common::read_answer(id, &mut sub).await }))
        .collect();
    let mut most = 0;
    while !readers.iter().all(|r| r.is_finished()) {
        let s = up.stats();
        let open =
            s.streams_started - s.streams_completed - s.streams_aborted - s.streams_disconnected;
        most = most.max(open);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for r in readers {
        assert_eq!(r.await.unwrap().text(), mock_text(4));
    }
    assert_eq!(up.stats().streams_completed, 5);
    assert!(
        (1..=2).contains(&most),
        "at most 2 upstream streams at once, saw {most}"
    );
    h.cleanup().await;
}
