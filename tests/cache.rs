//! The opt-in response cache on a whole deployment (real NATS, Postgres and Redis): off by
//! default; with `x-sluice-cache: on` a repeated question is answered from Redis without an
//! upstream call, in either transport, recorded as `ResponseServedFromCache` and billed at
//! the cache price (zero); another user's identical question is not; and with Redis gone
//! requests are still served, upstream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};

use common::{
    admin_key, admin_user, grant_credit, parse_sse, request_id, until_chat, OwnRedis, Stack,
    StackOptions, KEY, MODEL,
};

fn question(text: &str) -> Value {
    json!({"model": MODEL, "temperature": 0, "mock": {"chunks": 6},
           "messages": [{"role": "user", "content": text}]})
}

async fn send(stack: &Stack, key: &str, body: &Value, cache: Option<&str>) -> reqwest::Response {
    let mut req = stack
        .http
        .post(format!("{}/v1/chat/completions", stack.base))
        .bearer_auth(key)
        .json(body);
    if let Some(cache) = cache {
        req = req.header("x-sluice-cache", cache);
    }
    req.send().await.unwrap()
}

/// Sends and returns the request id and the JSON body of a 200.
async fn ask(stack: &Stack, key: &str, body: &Value, cache: Option<&str>) -> (String, Value) {
    let resp = send(stack, key, body, cache).await;
    if resp.status() != StatusCode::OK {
        panic!("{}: {}", resp.status(), resp.text().await.unwrap());
    }
    let id = request_id(&resp).to_string();
    (id, resp.json().await.unwrap())
}

fn upstream_calls(stack: &Stack) -> u64 {
    stack.mock.stats().requests_total
}

fn content(body: &Value) -> String {
    body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// A user with one key and some credit, created by the admin; returns the key once the
/// ingress admits its requests.
async fn user_key(stack: &Stack, name: &str) -> String {
    let user_id = admin_user(stack, name).await;
    let key = admin_key(stack, json!({"name": name, "user_id": user_id})).await;
    let key = key["key"].as_str().unwrap().to_owned();
    grant_credit(
        stack,
        json!({"user_id": user_id, "amount": "5.00", "note": "cache test"}),
    )
    .await;
    until_chat(
        stack,
        &key,
        &question(&format!("warm-up of {name}")),
        StatusCode::OK,
    )
    .await;
    key
}

/// Waits until `n` entries of the namespace are stored in Redis at `url`.
async fn wait_cached(url: &str, stack: &Stack, n: usize) {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let pattern = format!("{}:cache:*", stack.ns.as_str());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(&pattern)
            .query_async(&mut conn)
            .await
            .unwrap();
        if keys.len() >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {n} answers were cached",
            keys.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn events_of(stack: &Stack, event_type: &str) -> Vec<Value> {
    sqlx::query_scalar("SELECT data FROM event_log WHERE type = $1 ORDER BY position")
        .bind(event_type)
        .fetch_all(&stack.pool)
        .await
        .unwrap()
}

async fn ledger_row(stack: &Stack, request_id: &str) -> Value {
    sqlx::query_scalar("SELECT to_jsonb(l) FROM ledger_entries l WHERE request_id = $1::text::uuid")
        .bind(request_id)
        .fetch_one(&stack.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_answer_replays_without_upstream_and_costs_the_cache_price() {
    let stack = Stack::start(StackOptions::default()).await;
    let alice = user_key(&stack, "alice").await;
    let bob = user_key(&stack, "bob").await;

    // Off by default: the same question twice goes upstream twice.
    let before = upstream_calls(&stack);
    let plain = question("is the cache off by default?");
    ask(&stack, &alice, &plain, None).await;
    ask(&stack, &alice, &plain, None).await;
    assert_eq!(upstream_calls(&stack), before + 2);
    // A nonsense switch is the caller's mistake, in OpenAI's error shape.
    let bad = send(&stack, &alice, &plain, Some("sometimes")).await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let err: Value = bad.json().await.unwrap();
    assert_eq!(err["error"]["param"], json!("x-sluice-cache"));

    // Alice asks with the cache on: the first answer comes from upstream and is stored.
    let q = question("what is a sluice?");
    let before = upstream_calls(&stack);
    let (first_id, first) = ask(&stack, &alice, &q, Some("on")).await;
    assert_eq!(upstream_calls(&stack), before + 1);
    wait_cached(common::REDIS_URL, &stack, 1).await;

    // The same question again: the same answer, and upstream never hears of it.
    let (hit_id, hit) = ask(&stack, &alice, &q, Some("on")).await;
    assert_eq!(hit, first);
    assert_ne!(hit_id, first_id);
    assert_eq!(upstream_calls(&stack), before + 1);

    // Streamed this time (keys in another order, usage asked for): the same text, framed as
    // a live stream, still without an upstream call.
    let resp = stack
        .http
        .post(format!("{}/v1/chat/completions", stack.base))
        .bearer_auth(&alice)
        .header("x-sluice-cache", "on")
        .json(
            &json!({"messages": q["messages"], "mock": {"chunks": 6}, "temperature": 0,
                      "model": MODEL, "stream": true, "stream_options": {"include_usage": true}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let stream_id = request_id(&resp).to_string();
    let events = parse_sse(&resp.text().await.unwrap());
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let ids: Vec<u64> = events.iter().filter_map(|(id, _)| *id).collect();
    assert_eq!(ids, (1..=ids.len() as u64).collect::<Vec<_>>());
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, content(&first));
    assert_eq!(chunks.last().unwrap()["usage"], first["usage"]);
    assert_eq!(upstream_calls(&stack), before + 1);

    // Bob asks the very same question: Alice's answer is not his to see.
    let (bob_id, _) = ask(&stack, &bob, &q, Some("on")).await;
    assert_eq!(upstream_calls(&stack), before + 2);
    // Nor is a question that differs in one sampling parameter a hit.
    let mut warmer = q.clone();
    warmer["temperature"] = json!(0.5);
    ask(&stack, &alice, &warmer, Some("on")).await;
    assert_eq!(upstream_calls(&stack), before + 3);

    // Each hit is its own event, pointing at the answer it replayed, never a completion.
    stack.wait_projected("ResponseServedFromCache", 2).await;
    let hits = events_of(&stack, "ResponseServedFromCache").await;
    assert_eq!(hits.len(), 2, "{hits:?}");
    let hit_ids: Vec<&str> = hits
        .iter()
        .map(|h| h["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(hit_ids, vec![hit_id.as_str(), stream_id.as_str()]);
    for h in &hits {
        assert_eq!(h["source_request_id"], json!(first_id));
        assert_eq!(h["usage"]["prompt_tokens"], first["usage"]["prompt_tokens"]);
        assert_eq!(
            h["usage"]["completion_tokens"],
            first["usage"]["completion_tokens"]
        );
    }
    let finished: Vec<String> = events_of(&stack, "CompletionFinished")
        .await
        .iter()
        .map(|e| e["request_id"].as_str().unwrap().to_owned())
        .collect();
    assert!(finished.contains(&first_id) && finished.contains(&bob_id));
    assert!(!finished.contains(&hit_id) && !finished.contains(&stream_id));

    // Billed: the first answer at the model's price, each hit at the cache price (zero).
    let paid = ledger_row(&stack, &first_id).await;
    assert!(paid["amount_nanos"].as_i64().unwrap() > 0, "{paid}");
    for id in [&hit_id, &stream_id] {
        let row = ledger_row(&stack, id).await;
        assert_eq!(row["amount_nanos"], json!(0), "{row}");
        assert_eq!(row["usage_source"], json!("cache"));
        assert_eq!(row["kind"], json!("usage"));
        assert_eq!(
            (&row["prompt_tokens"], &row["completion_tokens"]),
            (&json!(0), &json!(0))
        );
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_gone_cached_requests_are_still_served_upstream() {
    let mut redis = OwnRedis::start();
    let stack = Stack::start(StackOptions {
        env: vec![("SLUICE_REDIS_URL", redis.url())],
        ..Default::default()
    })
    .await;
    let q = question("and when Redis is gone?");
    let before = upstream_calls(&stack);
    let (_, first) = ask(&stack, KEY, &q, Some("on")).await;
    wait_cached(&redis.url(), &stack, 1).await;
    let (_, again) = ask(&stack, KEY, &q, Some("on")).await;
    assert_eq!(again, first);
    assert_eq!(upstream_calls(&stack), before + 1, "the second was a hit");

    redis.stop();
    for _ in 0..2 {
        let (_, live) = ask(&stack, KEY, &q, Some("on")).await;
        assert_eq!(content(&live), content(&first));
    }
    assert_eq!(
        upstream_calls(&stack),
        before + 3,
        "without Redis every request goes upstream"
    );
    stack.wait_projected("CompletionFinished", 3).await;
    assert_eq!(events_of(&stack, "ResponseServedFromCache").await.len(), 1);
    stack.stop().await;
}
