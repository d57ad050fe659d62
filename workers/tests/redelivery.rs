//! A request redelivered after its worker died: the worker looks at what the client
//! already got (the last stored frame batch) before running it again.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use async_nats::jetstream::{self, consumer::AckPolicy, AckKind};
use common::{chat, fast_options, mock, mock_text, ChannelRow, Harness};
use futures::StreamExt;
use schemas::work::{ErrorKind, FrameKind};
use serde_json::json;

#[tokio::test]
async fn redeliveries_resume_end_or_report_the_lost_worker() {
    let mut h = Harness::new().await;
    let up = mock().await;
    h.add_channel(ChannelRow::new("main", &up, &["gpt-test"]))
        .await;

    // A "dead worker" takes three requests from the shared consumer and never acks them.
    let requests = h.js.get_stream(h.ns.requests_stream()).await.unwrap();
    let consumer: jetstream::consumer::PullConsumer = requests
        .get_or_create_consumer(
            &h.ns.workers_consumer(),
            jetstream::consumer::pull::Config {
                durable_name: Some(h.ns.workers_consumer()),
                ack_policy: AckPolicy::Explicit,
                ack_wait: workers::ACK_WAIT,
                max_deliver: workers::MAX_DELIVER,
                max_ack_pending: workers::MAX_ACK_PENDING,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let fresh = h.work_item(
        "gpt-test",
        chat("gpt-test", true, false, json!({"chunks": 3})),
    );
    let started = h.work_item("gpt-test", chat("gpt-test", true, false, json!({})));
    let ended = h.work_item("gpt-test", chat("gpt-test", true, false, json!({})));
    let mut subs = Vec::new();
    for item in [&fresh, &started, &ended] {
        subs.push(
            h.nats
                .subscribe(h.ns.chunk_subject(&item.request_id))
                .await
                .unwrap(),
        );
        h.queue(item).await;
    }
    let mut taken = consumer.fetch().max_messages(3).messages().await.unwrap();
    let mut held = Vec::new();
    while let Some(msg) = taken.next().await {
        held.push(msg.unwrap());
    }
    assert_eq!(held.len(), 3);

    // Before dying it had sent two chunks of `started` and all of `ended`.
    let chunk = json!({"choices": [{"index": 0, "delta": {"content": "x"}}]});
    let stored = [
        (
            &started,
            json!([{"seq": 1, "kind": "chunk", "data": chunk}, {"seq": 2, "kind": "chunk", "data": chunk}]),
        ),
        (
            &ended,
            json!([{"seq": 1, "kind": "chunk", "data": chunk}, {"seq": 2, "kind": "done", "data": {}}]),
        ),
    ];
    for (item, frames) in stored {
        let payload = serde_json::to_vec(&frames).unwrap();
        h.js.publish(h.ns.chunk_subject(&item.request_id), payload.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    // Drain what the subscriptions saw of that, then hand the messages back.
    for sub in &mut subs[1..] {
        tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .unwrap()
            .unwrap();
    }
    for msg in held {
        msg.ack_with(AckKind::Nak(None)).await.unwrap();
    }
    h.start_worker(fast_options());

    let mut subs = subs.into_iter();
    // Nothing had been sent: it runs normally.
    let a = common::read_answer(fresh.request_id, &mut subs.next().unwrap()).await;
    assert_eq!(a.text(), mock_text(3));
    assert_eq!(a.last().kind, FrameKind::Done);

    // Content had been sent: the client learns the answer broke off, numbered after it.
    let a = common::read_answer(started.request_id, &mut subs.next().unwrap()).await;
    assert_eq!(a.frames.len(), 1);
    assert_eq!(a.frames[0].seq, 3);
    assert_eq!(
        (a.error().kind, a.error().status),
        (ErrorKind::WorkerLost, 502)
    );
    assert_eq!(h.event_types(started.request_id).await, ["RequestFailed"]);

    // It had ended: nothing more is sent, and it is acked.
    let mut ended_sub = subs.next().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut requests = requests;
    while requests.info().await.unwrap().state.messages > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "redelivered requests are acked"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), ended_sub.next())
            .await
            .is_err(),
        "an ended request gets no more frames"
    );
    assert!(h.events(ended.request_id).await.is_empty());
    assert_eq!(
        up.stats().requests_total,
        1,
        "only the fresh request reached the upstream"
    );
    h.cleanup().await;
}
