//! Rate limits and quota end to end on real Redis and Postgres: RPM and TPM give 429 with
//! `Retry-After` past the limit and admit again after the window; a tiny quota is refused
//! once spent; 50 concurrent requests cannot overspend a nearly empty key by more than one
//! estimate; a price change bills earlier requests at the old price; and after 500 mixed
//! requests the ledger equals usage × price recomputed from the raw events.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{
    admin_key, admin_user, call, grant_credit, hello, until_prices, Stack, StackOptions,
    ADMIN_TOKEN, KEY, MODEL,
};
use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Per token at the test prices ($0.15 and $0.60 per million), in nano-dollars.
const IN_NANOS: i64 = 150;
const OUT_NANOS: i64 = 600;
/// [`hello`]'s "hello there" as one user message: the mock upstream reports 3 + 2 words, tiktoken
/// estimates 3 + 1 (role) + 2 + 3 (reply priming).
const PROMPT_REAL: i64 = 5;
const PROMPT_ESTIMATE: i64 = 9;

async fn send(stack: &Stack, key: &str, body: &Value) -> reqwest::Response {
    stack
        .http
        .post(format!("{}/v1/chat/completions", stack.base))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// Sleeps until just after a window boundary, so a burst of requests stays in one window.
async fn align_to_window(window_secs: u64) {
    let window_ms = window_secs * 1000;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let into = now % window_ms;
    if into > 50 {
        tokio::time::sleep(Duration::from_millis(window_ms - into + 20)).await;
    }
}

async fn spent(stack: &Stack) -> i64 {
    sqlx::query_scalar("SELECT COALESCE(sum(spent_nanos), 0)::bigint FROM key_balances")
        .fetch_one(&stack.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn rpm_and_tpm_limits_refuse_then_admit_after_the_window() {
    let window = 3;
    let stack = Stack::start(StackOptions {
        key_rpm: Some(3),
        env: vec![("SLUICE_RATE_WINDOW_SECS", window.to_string())],
        ..Default::default()
    })
    .await;
    // Quota estimates are priced from the first request on.
    until_prices(&stack, 1).await;
    align_to_window(window).await;
    for _ in 0..3 {
        assert_eq!(
            send(&stack, KEY, &hello(MODEL, 5)).await.status(),
            StatusCode::OK
        );
    }
    let refused = send(&stack, KEY, &hello(MODEL, 5)).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=window).contains(&retry));
    let err: Value = refused.json().await.unwrap();
    assert_eq!(err["error"]["code"], "rate_limit_exceeded");
    // Two windows later the previous window no longer weighs in.
    tokio::time::sleep(Duration::from_secs(2 * window)).await;
    assert_eq!(
        send(&stack, KEY, &hello(MODEL, 5)).await.status(),
        StatusCode::OK
    );

    // TPM on a second key: 100 tokens per window. Each request is estimated at its prompt
    // (9 tokens by tiktoken) plus max_tokens 40, then corrected to the real 5 + 40: two fit.
    let created: Value = stack
        .http
        .post(format!("{}/api/admin/keys", stack.base))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"name": "tpm", "tpm": 100}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = created["key"].as_str().unwrap().to_owned();
    let tpm_body = json!({"model": MODEL, "max_tokens": 40, "mock": {"chunks": 40},
                          "messages": [{"role": "user", "content": "hello there"}]});
    align_to_window(window).await;
    assert_eq!(send(&stack, &key, &tpm_body).await.status(), StatusCode::OK);
    assert_eq!(send(&stack, &key, &tpm_body).await.status(), StatusCode::OK);
    let refused = send(&stack, &key, &tpm_body).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(refused.headers().contains_key("retry-after"));
    let err: Value = refused.json().await.unwrap();
    assert!(
        err["error"]["message"].as_str().unwrap().contains("tokens"),
        "{err}"
    );
    tokio::time::sleep(Duration::from_secs(2 * window)).await;
    assert_eq!(send(&stack, &key, &tpm_body).await.status(), StatusCode::OK);
    stack.stop().await;
}

#[tokio::test]
async fn a_tiny_quota_is_refused_once_spent() {
    // $0.00002 = 20,000 nanos. A request is estimated at 9 prompt tokens + 10 completion
    // tokens (7,350 nanos) and really costs 5 + 10 tokens (6,750 nanos): two fit.
    let stack = Stack::start(StackOptions {
        key_quota: Some("0.00002".into()),
        ..Default::default()
    })
    .await;
    // Quota estimates are priced from the first request on.
    until_prices(&stack, 1).await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let resp = send(&stack, KEY, &hello(MODEL, 10)).await;
        let status = resp.status();
        if status == StatusCode::TOO_MANY_REQUESTS {
            let err: Value = resp.json().await.unwrap();
            assert_eq!(err["error"]["code"], "insufficient_quota");
        }
        statuses.push(status);
    }
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    stack.wait_projected("CompletionFinished", 2).await;
    assert_eq!(
        spent(&stack).await,
        2 * (PROMPT_REAL * IN_NANOS + 10 * OUT_NANOS)
    );
    // Still refused once the projected balance (not just the holds) says so.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        send(&stack, KEY, &hello(MODEL, 10)).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    stack.stop().await;
}

#[tokio::test]
async fn fifty_concurrent_requests_overspend_by_at_most_one_estimate() {
    // Room for about six requests' estimates.
    let quota_nanos: i64 = 45_000;
    let stack = Stack::start(StackOptions {
        key_quota: Some(format!("0.{quota_nanos:09}")),
        workers: 2,
        ..Default::default()
    })
    .await;
    // Quota estimates are priced from the first request on.
    until_prices(&stack, 1).await;
    let b = hello(MODEL, 10);
    let results: Vec<StatusCode> = futures::stream::iter(0..50)
        .map(|_| async { send(&stack, KEY, &b).await.status() })
        .buffer_unordered(50)
        .collect()
        .await;
    let ok = results.iter().filter(|s| **s == StatusCode::OK).count();
    let refused = results
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!(ok + refused, 50, "{results:?}");
    assert!(ok >= 1 && refused >= 1, "{ok} admitted");
    stack.wait_projected("CompletionFinished", ok as i64).await;
    let spent = spent(&stack).await;
    // One request's estimate: tiktoken's prompt count (10) plus max_tokens, at the prices.
    let estimate = PROMPT_ESTIMATE * IN_NANOS + 10 * OUT_NANOS;
    eprintln!(
        "admitted {ok} of 50; spent {spent} of {quota_nanos} nanos (one estimate: {estimate})"
    );
    assert!(
        spent <= quota_nanos + estimate,
        "spent {spent} of {quota_nanos} with {ok} requests"
    );
    stack.stop().await;
}

#[tokio::test]
async fn a_price_change_bills_earlier_requests_at_the_old_price() {
    let stack = Stack::start(StackOptions::default()).await;
    assert_eq!(
        send(&stack, KEY, &hello(MODEL, 10)).await.status(),
        StatusCode::OK
    );
    stack.wait_projected("CompletionFinished", 1).await;
    let resp = stack
        .http
        .put(format!("{}/api/admin/prices", stack.base))
        .bearer_auth(ADMIN_TOKEN)
        .json(
            &json!({"model": MODEL, "input_per_mtok": "1.00", "output_per_mtok": "2.00",
                      "cached_input_per_mtok": "0.5"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    stack.wait_projected("PriceSet", 2).await;
    assert_eq!(
        send(&stack, KEY, &hello(MODEL, 10)).await.status(),
        StatusCode::OK
    );
    stack.wait_projected("CompletionFinished", 2).await;
    let rows: Vec<(i64, i64, i64)> = sqlx::query_as(
        "SELECT prompt_tokens, completion_tokens, amount_nanos FROM ledger_entries
         WHERE kind = 'usage' ORDER BY position",
    )
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 2);
    let (p, c, amount) = rows[0];
    assert_eq!(amount, p * IN_NANOS + c * OUT_NANOS, "old price");
    let (p, c, amount) = rows[1];
    assert_eq!(amount, p * 1000 + c * 2000, "new price");
    // The admin list shows both, newest first, as decimal USD.
    let prices: Value = stack
        .http
        .get(format!("{}/api/admin/prices?model={MODEL}", stack.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(prices["data"][0]["input_per_mtok"], "1");
    assert_eq!(prices["data"][1]["input_per_mtok"], "0.15");
    stack.stop().await;
}

/// A price as read back from a `PriceSet` event.
#[derive(Clone, Copy)]
struct RawPrice {
    input: i128,
    output: i128,
    cached: Option<i128>,
    per_request: i128,
}

/// The cost of one usage, written out independently of `schemas::Price::cost`.
fn cost(p: RawPrice, prompt: i128, completion: i128, cached: i128) -> i64 {
    let cached = cached.min(prompt);
    let micro =
        (prompt - cached) * p.input + cached * p.cached.unwrap_or(p.input) + completion * p.output;
    i64::try_from((micro + 500_000) / 1_000_000 + p.per_request).unwrap()
}

#[tokio::test]
async fn five_hundred_mixed_requests_ledger_equals_usage_times_price() {
    let stack = Stack::start(StackOptions {
        workers: 2,
        ..Default::default()
    })
    .await;
    let bodies: Vec<Value> = (0..500u64)
        .map(|i| {
            let mut b = json!({"model": MODEL, "messages": [{"role": "user",
                "content": "word ".repeat((i % 37) as usize + 1)}]});
            let m = b.as_object_mut().unwrap();
            if i % 2 == 0 {
                m.insert("stream".into(), json!(true));
                m.insert(
                    "stream_options".into(),
                    json!({"include_usage": i % 4 == 0}),
                );
            }
            if i % 3 == 0 {
                m.insert("max_tokens".into(), json!(i % 13 + 1));
            }
            let mut mock = serde_json::Map::new();
            mock.insert("chunks".into(), json!(i % 29 + 1));
            if i % 7 == 0 {
                mock.insert("usage".into(), json!(false)); // billed from the tokenizer's estimate
            }
            if i % 11 == 0 {
                mock.insert("fail_status".into(), json!(500)); // never charged
            }
            m.insert("mock".into(), Value::Object(mock));
            b
        })
        .collect();
    let half = bodies.len() / 2;
    let run = |slice: Vec<Value>| {
        let stack = &stack;
        async move {
            futures::stream::iter(slice)
                .map(|b| async move {
                    let resp = send(stack, KEY, &b).await;
                    let status = resp.status();
                    let _ = resp.bytes().await;
                    status
                })
                .buffer_unordered(25)
                .collect::<Vec<_>>()
                .await
        }
    };
    let mut statuses = run(bodies[..half].to_vec()).await;
    // A price change half way: later requests are billed at the new price.
    let resp = stack
        .http
        .post(format!("{}/api/admin/prices", stack.base))
        .bearer_auth(ADMIN_TOKEN)
        .json(
            &json!({"model": MODEL, "input_per_mtok": "0.30", "output_per_mtok": "1.25",
                      "per_request": "0.000001"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    statuses.extend(run(bodies[half..].to_vec()).await);
    let ok = statuses.iter().filter(|s| s.is_success()).count() as i64;
    assert!(ok >= 400, "{ok} of 500 succeeded");
    stack.wait_projected("CompletionFinished", ok).await;
    stack.wait_projected("PriceSet", 2).await;

    // Recompute from the raw events, in log order.
    let events: Vec<(i64, String, Value, chrono::DateTime<chrono::Utc>)> =
        sqlx::query_as("SELECT position, type, data, occurred_at FROM event_log ORDER BY position")
            .fetch_all(&stack.pool)
            .await
            .unwrap();
    let mut prices: Vec<(chrono::DateTime<chrono::Utc>, i64, RawPrice)> = Vec::new();
    let mut charged: HashSet<String> = HashSet::new();
    let mut expected: HashMap<String, i64> = HashMap::new();
    for (position, kind, data, at) in &events {
        match kind.as_str() {
            "PriceSet" => {
                let p = &data["price"];
                let n = |v: &Value| v.as_i64().map(i128::from);
                prices.push((
                    data["effective_at"].as_str().unwrap().parse().unwrap(),
                    *position,
                    RawPrice {
                        input: n(&p["input_per_mtok"]).unwrap(),
                        output: n(&p["output_per_mtok"]).unwrap(),
                        cached: n(&p["cached_input_per_mtok"]),
                        per_request: n(&p["per_request"]).unwrap_or(0),
                    },
                ));
            }
            "CompletionFinished" | "RequestCancelled" | "RequestFailed" => {
                let usage = &data["usage"];
                if usage.is_null() {
                    continue;
                }
                let id = data["request_id"].as_str().unwrap().to_owned();
                if !charged.insert(id.clone()) {
                    continue; // charged once, by the first charging event
                }
                let price = prices
                    .iter()
                    .filter(|(eff, _, _)| eff <= at)
                    .max_by_key(|(eff, pos, _)| (*eff, *pos))
                    .map(|(_, _, p)| *p)
                    .unwrap();
                let t = |f: &str| i128::from(usage[f].as_u64().unwrap_or(0));
                let amount = cost(
                    price,
                    t("prompt_tokens"),
                    t("completion_tokens"),
                    t("cached_tokens"),
                );
                expected.insert(id.replace('-', ""), amount);
            }
            _ => {}
        }
    }
    let ledger: Vec<(uuid::Uuid, i64)> =
        sqlx::query_as("SELECT request_id, amount_nanos FROM ledger_entries WHERE kind = 'usage'")
            .fetch_all(&stack.pool)
            .await
            .unwrap();
    assert_eq!(ledger.len(), expected.len());
    for (id, amount) in &ledger {
        assert_eq!(
            expected.get(&id.simple().to_string()),
            Some(amount),
            "request {id}"
        );
    }
    let total: i64 = expected.values().sum();
    assert_eq!(spent(&stack).await, total);
    let daily: i64 =
        sqlx::query_scalar("SELECT COALESCE(sum(cost_nanos), 0)::bigint FROM daily_usage")
            .fetch_one(&stack.pool)
            .await
            .unwrap();
    assert_eq!(daily, total);
    // Both prices were in force for some request.
    assert_eq!(prices.len(), 2);
    // The admin usage report agrees, as a decimal USD string.
    let usage: Value = stack
        .http
        .get(format!("{}/api/admin/usage", stack.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        usage["totals"]["cost"],
        schemas::Nanos(total).to_usd_string()
    );
    assert_eq!(usage["totals"]["requests"], json!(ledger.len()));
    stack.stop().await;
}

/// Not an assertion (timings vary): prints the latency a quota hold and RPM/TPM limits add
/// per request. `cargo test --release --test quota measure -- --ignored --nocapture`.
#[tokio::test]
#[ignore]
async fn measure_admission_overhead() {
    let stack = Stack::start(StackOptions::default()).await;
    // Quota estimates are priced from the first request on.
    until_prices(&stack, 1).await;
    let mut variants = vec![("unlimited".to_owned(), KEY.to_owned())];
    for (name, settings) in [
        ("rpm", json!({"rpm": 1_000_000})),
        ("quota", json!({"quota": "1000"})),
        (
            "quota+rpm+tpm",
            json!({"quota": "1000", "rpm": 1_000_000, "tpm": 1_000_000_000}),
        ),
    ] {
        let mut body = settings;
        body["name"] = json!(name);
        let created: Value = stack
            .http
            .post(format!("{}/api/admin/keys", stack.base))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        variants.push((name.to_owned(), created["key"].as_str().unwrap().to_owned()));
    }
    let b = hello(MODEL, 10);
    for round in 0..2 {
        for (name, key) in &variants {
            let n = 300;
            let start = std::time::Instant::now();
            for _ in 0..n {
                assert_eq!(send(&stack, key, &b).await.status(), StatusCode::OK);
            }
            let per = start.elapsed() / n;
            eprintln!("round {round} {name}: {per:?} per sequential non-stream request");
        }
    }
    stack.stop().await;
}

#[tokio::test]
async fn a_users_rpm_is_shared_by_all_their_keys() {
    let window = 3;
    let stack = Stack::start(StackOptions {
        env: vec![("SLUICE_RATE_WINDOW_SECS", window.to_string())],
        ..Default::default()
    })
    .await;
    let user_id = admin_user(&stack, "frank").await;
    // A user's keys spend the user's balance: give frank some.
    grant_credit(&stack, json!({"user_id": user_id, "amount": "1"})).await;
    let (status, _, text) = call(
        &stack,
        Method::PATCH,
        &format!("/api/admin/users/{user_id}"),
        Some(ADMIN_TOKEN),
        Some(json!({"rpm": 2})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let mut keys = Vec::new();
    for name in ["a", "b"] {
        let key = admin_key(&stack, json!({"name": name, "user_id": user_id})).await;
        keys.push(key["key"].as_str().unwrap().to_owned());
    }
    align_to_window(window).await;
    assert_eq!(
        send(&stack, &keys[0], &hello(MODEL, 5)).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        send(&stack, &keys[1], &hello(MODEL, 5)).await.status(),
        StatusCode::OK
    );
    let refused = send(&stack, &keys[0], &hello(MODEL, 5)).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let err: Value = refused.json().await.unwrap();
    assert!(
        err["error"]["message"].as_str().unwrap().contains("user"),
        "{err}"
    );
    stack.stop().await;
}
