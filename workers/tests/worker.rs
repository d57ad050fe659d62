//! End-to-end tests of the worker against real NATS and Postgres, with `MockUpstream`s as
//! the providers. Each test has its own namespace (schema and streams), removed at the end.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{chat, fast_options, mock, mock_text, mock_with, ChannelRow, Harness};
use mock_upstream::MockConfig;
use schemas::work::{ErrorKind, FrameKind};
use schemas::UsageSource;
use serde_json::{json, Value};

#[tokio::test]
async fn stream_reassembles_with_the_usage_chunk_the_client_asked_for() {
    let mut h = Harness::new().await;
    let up = mock().await;
    let mut row = ChannelRow::new("main", &up, &["gpt-test"]);
    row.model_map = json!({"gpt-test": "up-model"});
    h.add_channel(row).await;
    h.start_worker(fast_options());

    let a = h
        .send(
            "gpt-test",
            chat("gpt-test", true, true, json!({"chunks": 8})),
        )
        .await;
    a.assert_seq_contiguous();
    assert_eq!(a.text(), mock_text(8));
    let chunks = a.chunks();
    // The upstream model name never reaches the client.
    assert!(
        chunks.iter().all(|c| c["model"] == "gpt-test"),
        "{chunks:?}"
    );
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 8);
    assert_eq!(
        chunks.iter().filter(|c| c["choices"] == json!([])).count(),
        1
    );

    let done = a.done();
    assert_eq!(done.usage_source, UsageSource::Provider);
    assert_eq!(done.usage.completion_tokens, 8);
    assert_eq!(done.finish_reason.as_deref(), Some("stop"));

    assert_eq!(
        h.event_types(a.request_id).await,
        ["AttemptStarted", "CompletionFinished"]
    );
    let finished = h.event(a.request_id, "CompletionFinished").await;
    assert_eq!(finished["usage_source"], "provider");
    assert_eq!(finished["upstream_model"], "up-model");
    assert_eq!(finished["model"], "gpt-test");
    assert_eq!(finished["channel_name"], "main");
    assert_eq!(finished["attempts"], 1);
    assert_eq!(finished["usage"]["completion_tokens"], 8);
    assert!(finished["ttft_ms"].is_u64());
    h.cleanup().await;
}

#[tokio::test]
async fn a_burst_of_chunks_is_coalesced_into_few_messages() {
    let (h, _up) = Harness::with_main_channel(MockConfig::default()).await;

    // The mock sends 20 chunks back to back: the first content goes out at once (time to
    // first token), the rest travels in a batch or two, not one message per token.
    let a = h
        .send(
            "gpt-test",
            chat("gpt-test", true, false, json!({"chunks": 20})),
        )
        .await;
    a.assert_seq_contiguous();
    assert_eq!(a.text(), mock_text(20));
    assert!(a.messages <= 5, "{} messages for 20 chunks", a.messages);
    h.cleanup().await;
}

#[tokio::test]
async fn stream_without_include_usage_gets_no_usage() {
    let (h, _up) = Harness::with_main_channel(MockConfig::default()).await;

    let a = h
        .send(
            "gpt-test",
            chat("gpt-test", true, false, json!({"chunks": 5})),
        )
        .await;
    a.assert_seq_contiguous();
    assert_eq!(a.text(), mock_text(5));
    for c in a.chunks() {
        assert!(c.get("usage").is_none(), "usage leaked into {c}");
        assert_ne!(c["choices"], json!([]), "usage chunk sent unasked");
    }
    // Billing still gets the provider's numbers.
    let done = a.done();
    assert_eq!(
        (done.usage_source, done.usage.completion_tokens),
        (UsageSource::Provider, 5)
    );
    h.cleanup().await;
}

#[tokio::test]
async fn non_stream_gets_one_response_frame() {
    let (h, _up) = Harness::with_main_channel(MockConfig::default()).await;

    let a = h
        .send(
            "gpt-test",
            chat("gpt-test", false, false, json!({"chunks": 4})),
        )
        .await;
    a.assert_seq_contiguous();
    let kinds: Vec<FrameKind> = a.frames.iter().map(|f| f.kind).collect();
    assert_eq!(kinds, [FrameKind::Response, FrameKind::Done]);
    let body: Value = serde_json::from_str(a.frames[0].data.get()).unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "gpt-test");
    assert_eq!(body["choices"][0]["message"]["content"], mock_text(4));
    assert_eq!(body["usage"]["completion_tokens"], 4);
    assert_eq!(a.done().usage_source, UsageSource::Provider);
    h.cleanup().await;
}

#[tokio::test]
async fn a_failing_channel_fails_over_to_the_next_tier() {
    let mut h = Harness::new().await;
    let bad = mock_with(MockConfig {
        fail_status: Some(500),
        ..MockConfig::default()
    })
    .await;
    let good = mock().await;
    let mut first = ChannelRow::new("bad", &bad, &["gpt-test"]);
    first.priority = 1;
    first.retry = 2;
    let mut second = ChannelRow::new("good", &good, &["gpt-test"]);
    second.priority = 2;
    h.add_channel(first).await;
    h.add_channel(second).await;
    h.start_worker(fast_options());

    let a = h
        .send(
            "gpt-test",
            chat("gpt-test", true, true, json!({"chunks": 3})),
        )
        .await;
    assert_eq!(a.text(), mock_text(3));
    a.assert_seq_contiguous();
    // `retry: 2` tries the failing channel twice, then the next tier once.
    assert_eq!(bad.stats().requests_total, 2);
    assert_eq!(good.stats().requests_total, 1);

    let types = h.event_types(a.request_id).await;
    assert_eq!(
        types,
        [
            "AttemptStarted",
            "AttemptFailed",
            "AttemptStarted",
            "AttemptFailed",
            "AttemptStarted",
            "CompletionFinished"
        ]
    );
    let failures: Vec<Value> = h
        .events(a.request_id)
        .await
        .into_iter()
        .filter(|e| e.event_type == "AttemptFailed")
        .map(|e| e.data)
        .collect();
    assert!(
        failures
            .iter()
            .all(|f| f["kind"] == "upstream5xx" && f["status"] == 500),
        "{failures:?}"
    );
    let finished = h.event(a.request_id, "CompletionFinished").await;
    assert_eq!(finished["channel_name"], "good");
    assert_eq!(finished["attempts"], 3);
    h.cleanup().await;
}

#[tokio::test]
async fn an_upstream_400_is_passed_through_not_failed_over() {
    let mut h = Harness::new().await;
    let first_up = mock().await;
    let second_up = mock().await;
    let mut first = ChannelRow::new("first", &first_up, &["gpt-test"]);
    first.priority = 1;
    let mut second = ChannelRow::new("second", &second_up, &["gpt-test"]);
    second.priority = 2;
    h.add_channel(first).await;
    h.add_channel(second).await;
    h.start_worker(fast_options());

    let a = h
        .send(
            "gpt-test",
            chat("gpt-test", true, false, json!({"fail_status": 400})),
        )
        .await;
    let err = a.error();
    assert_eq!((err.status, err.kind), (400, ErrorKind::BadRequest));
    assert_eq!(err.message, "Invalid request (mock).");
    assert_eq!(first_up.stats().requests_total, 1);
    assert_eq!(
        second_up.stats().requests_total,
        0,
        "a caller's mistake is not failed over"
    );

    assert_eq!(
        h.event_types(a.request_id).await,
        ["AttemptStarted", "AttemptFailed", "RequestFailed"]
    );
    let failed = h.event(a.request_id, "RequestFailed").await;
    assert_eq!(
        (failed["status"].clone(), failed["kind"].clone()),
        (json!(400), json!("bad_request"))
    );
    h.cleanup().await;
}

#[tokio::test]
async fn a_stream_cut_after_content_ends_with_an_error_and_partial_usage() {
    let mut h = Harness::new().await;
    let cut = mock().await;
    let spare = mock().await;
    let mut first = ChannelRow::new("cut", &cut, &["gpt-test"]);
    first.priority = 1;
    let mut second = ChannelRow::new("spare", &spare, &["gpt-test"]);
    second.priority = 2;
    h.add_channel(first).await;
    h.add_channel(second).await;
    h.start_worker(fast_options());

    // Chunks 100 ms apart, so the first content is sent before the cut.
    let knobs = json!({"chunks": 10, "disconnect_after": 3, "chunk_delay_ms": 100});
    let a = h
        .send("gpt-test", chat("gpt-test", true, true, knobs))
        .await;
    a.assert_seq_contiguous();
    assert_eq!(a.text(), mock_text(3));
    let err = a.error();
    assert_eq!((err.kind, err.status), (ErrorKind::Connection, 502));
    assert_eq!(
        spare.stats().requests_total,
        0,
        "no failover once content went out"
    );

    let failed = h.event(a.request_id, "RequestFailed").await;
    assert_eq!(failed["kind"], "connection");
    assert_eq!(failed["usage_source"], "estimated");
    assert!(
        failed["usage"]["completion_tokens"].as_u64().unwrap() > 0,
        "{failed}"
    );
    h.cleanup().await;
}

#[tokio::test]
async fn a_provider_without_usage_is_estimated() {
    let (h, _up) = Harness::with_main_channel(MockConfig {
        usage: false,
        ..MockConfig::default()
    })
    .await;

    let a = h
        .send(
            "gpt-test",
            chat("gpt-test", true, true, json!({"chunks": 6})),
        )
        .await;
    a.assert_seq_contiguous();
    assert_eq!(a.text(), mock_text(6));
    let done = a.done();
    assert_eq!(done.usage_source, UsageSource::Estimated);
    assert!(
        done.usage.prompt_tokens > 0 && done.usage.completion_tokens > 0,
        "{done:?}"
    );
    // The client asked for usage: it gets the estimate where OpenAI puts usage.
    let usage_chunk = a.chunks().pop().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(
        usage_chunk["usage"]["completion_tokens"],
        done.usage.completion_tokens
    );
    let finished = h.event(a.request_id, "CompletionFinished").await;
    assert_eq!(finished["usage_source"], "estimated");

    let plain = h
        .send(
            "gpt-test",
            chat("gpt-test", false, false, json!({"chunks": 6})),
        )
        .await;
    let body: Value = serde_json::from_str(plain.frames[0].data.get()).unwrap();
    assert_eq!(plain.done().usage_source, UsageSource::Estimated);
    assert_eq!(
        body["usage"]["completion_tokens"],
        plain.done().usage.completion_tokens
    );
    h.cleanup().await;
}

#[tokio::test]
async fn two_workers_share_the_consumer_and_answer_each_request_once() {
    let (mut h, up) = Harness::with_main_channel(MockConfig {
        chunk_delay_ms: 5,
        ..MockConfig::default()
    })
    .await;
    h.start_worker(fast_options());

    let n = 40;
    let mut subs = Vec::new();
    for i in 0..n {
        let item = h.work_item(
            "gpt-test",
            chat("gpt-test", i % 2 == 0, false, json!({"chunks": 4})),
        );
        let sub = h.subscribe_and_queue(&item).await;
        subs.push((item.request_id, sub));
    }
    let mut leftovers = Vec::new();
    for (id, sub) in subs {
        let mut sub = sub;
        let a = common::read_answer(id, &mut sub).await;
        assert_eq!(a.done().usage.completion_tokens, 4);
        leftovers.push((id, sub));
    }
    // A second answer from another worker would arrive on the same subject.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (id, mut sub) in leftovers {
        use futures::FutureExt;
        use futures::StreamExt;
        assert!(
            sub.next().now_or_never().is_none(),
            "request {id} answered twice"
        );
        assert_eq!(
            h.event_types(id).await,
            ["AttemptStarted", "CompletionFinished"]
        );
    }
    assert_eq!(up.stats().requests_total, n);

    let mut requests = h.js.get_stream(h.ns.requests_stream()).await.unwrap();
    let info = requests.info().await.unwrap();
    assert_eq!(
        info.state.consumer_count, 1,
        "one consumer for every worker and request"
    );
    assert_eq!(info.state.messages, 0, "every request acked");
    h.cleanup().await;
}

#[tokio::test]
async fn channel_changes_reach_a_running_worker() {
    let mut h = Harness::new().await;
    let up = mock().await;
    h.start_worker(fast_options());

    let a = h
        .send("late", chat("late", true, false, json!({"chunks": 2})))
        .await;
    let err = a.error();
    assert_eq!((err.kind, err.status), (ErrorKind::NoChannel, 503));
    assert_eq!(err.message, "no channel available for model `late`");

    h.add_channel(ChannelRow::new("late", &up, &["late"])).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let a = h
        .send("late", chat("late", true, false, json!({"chunks": 2})))
        .await;
    assert_eq!(a.text(), mock_text(2));

    sqlx::query("UPDATE channels SET enabled = false")
        .execute(&h.pool)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let a = h.send("late", chat("late", true, false, json!({}))).await;
    assert_eq!(a.error().kind, ErrorKind::NoChannel);
    h.cleanup().await;
}

#[tokio::test]
async fn sealed_keys_are_opened_and_unopenable_channels_skipped() {
    use schemas::sealed::SecretKey;
    let mut h = Harness::new().await;
    let key = SecretKey::from_base64(&SecretKey::generate_base64()).unwrap();
    let other = SecretKey::from_base64(&SecretKey::generate_base64()).unwrap();
    let up = mock_with(MockConfig {
        require_key: Some("sk-upstream-123".into()),
        ..MockConfig::default()
    })
    .await;
    let mut wrong = ChannelRow::new("wrong-key", &up, &["gpt-test"]);
    wrong.priority = 1;
    wrong.api_key_sealed = Some(other.seal("sk-upstream-123"));
    let mut right = ChannelRow::new("right-key", &up, &["gpt-test"]);
    right.priority = 2;
    right.api_key_sealed = Some(key.seal("sk-upstream-123"));
    h.add_channel(wrong).await;
    h.add_channel(right).await;
    h.start_worker(workers::WorkerOptions {
        secret_key: Some(key),
        ..fast_options()
    });

    let a = h
        .send(
            "gpt-test",
            chat("gpt-test", false, false, json!({"chunks": 2})),
        )
        .await;
    assert_eq!(a.done().usage.completion_tokens, 2);
    assert_eq!(
        up.stats().requests_total,
        1,
        "the channel whose key cannot be opened is never called"
    );
    let started = h.event(a.request_id, "AttemptStarted").await;
    assert_eq!(started["channel_name"], "right-key");
    h.cleanup().await;
}

#[tokio::test]
async fn a_request_past_its_deadline_is_not_sent_upstream() {
    let (h, up) = Harness::with_main_channel(MockConfig::default()).await;

    let mut item = h.work_item("gpt-test", chat("gpt-test", true, false, json!({})));
    item.deadline = chrono::Utc::now() - chrono::Duration::seconds(1);
    let mut sub = h.subscribe_and_queue(&item).await;
    let a = common::read_answer(item.request_id, &mut sub).await;
    assert_eq!(
        (a.error().kind, a.error().status),
        (ErrorKind::Timeout, 504)
    );
    assert_eq!(up.stats().requests_total, 0);
    assert_eq!(h.event_types(item.request_id).await, ["RequestFailed"]);
    h.cleanup().await;
}
