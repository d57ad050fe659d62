//! Billing is exact and replayable: after 500 mixed requests (stream and not, usage asked
//! for or not, usage reported or estimated, failures, three models at different prices
//! including cached input, a price change half way, and a user whose monthly plan runs out
//! during the run), every ledger row equals usage × price — and its plan part the plan
//! rules — recomputed here from the raw `event_log` rows with `rust_decimal`, to the
//! nano-dollar; and replaying the billing projector from position 0 into a scratch schema
//! reproduces every billing read model row for row.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::process::Stdio;

use chrono::{DateTime, Datelike, Utc};
use common::{
    admin_key, admin_user, call, channel_yaml, grant_credit, mock, Stack, StackOptions,
    ADMIN_TOKEN, KEY, MODEL,
};
use futures::StreamExt;
use reqwest::{Method, StatusCode};
use rust_decimal::{Decimal, RoundingStrategy};
use serde_json::{json, Value};
use uuid::Uuid;

const OTHER: &str = "gpt-other";
const CLAUDE: &str = "claude-test";

async fn set_price(stack: &Stack, body: Value) {
    let (status, _, text) = call(
        stack,
        Method::POST,
        "/api/admin/prices",
        Some(ADMIN_TOKEN),
        Some(body),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{text}");
}

/// A price as read back from a `PriceSet` event: nano-dollars per million tokens.
#[derive(Clone, Copy)]
struct RawPrice {
    input: Decimal,
    output: Decimal,
    cached: Option<Decimal>,
    per_request: Decimal,
}

/// What a charge should be, recomputed from the events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Expected {
    amount: i64,
    plan_id: Option<Uuid>,
    plan_nanos: i64,
    key_id: Uuid,
    user_id: Option<Uuid>,
}

fn dec(v: &Value) -> Option<Decimal> {
    v.as_i64().map(Decimal::from)
}

/// Usage × price, written out with decimals: uncached prompt tokens at the input rate,
/// cached ones at the cached rate (the input rate when there is none), completion tokens
/// at the output rate, per million, rounded half up to a whole nano-dollar once, plus the
/// flat per-request amount (per image for image generations).
fn cost(p: &RawPrice, usage: &Value) -> i64 {
    let n = |f: &str| Decimal::from(usage[f].as_u64().unwrap_or(0));
    let prompt = n("prompt_tokens");
    let cached = n("cached_tokens").min(prompt);
    let per_million = (prompt - cached) * p.input
        + cached * p.cached.unwrap_or(p.input)
        + n("completion_tokens") * p.output;
    let charged = (per_million / Decimal::from(1_000_000))
        .round_dp_with_strategy(0, RoundingStrategy::MidpointAwayFromZero)
        + p.per_request * n("images").max(Decimal::ONE);
    i64::try_from(charged).unwrap()
}

/// Folds the raw log the way the documented rules say, independently of the projector.
fn recompute(events: &[(i64, String, Value, DateTime<Utc>)]) -> HashMap<Uuid, Expected> {
    let mut prices: HashMap<String, Vec<(DateTime<Utc>, i64, RawPrice)>> = HashMap::new();
    let mut plans: HashMap<Uuid, (Decimal, Vec<String>)> = HashMap::new();
    let mut subscriptions: HashMap<Uuid, Uuid> = HashMap::new();
    let mut used: HashMap<(Uuid, i32, u32), Decimal> = HashMap::new();
    let mut expected: HashMap<Uuid, Expected> = HashMap::new();
    let id = |v: &Value| v.as_str().and_then(|s| s.parse::<Uuid>().ok());
    for (position, kind, data, at) in events {
        match kind.as_str() {
            "PriceSet" => {
                let p = &data["price"];
                prices
                    .entry(data["model"].as_str().unwrap().to_owned())
                    .or_default()
                    .push((
                        data["effective_at"].as_str().unwrap().parse().unwrap(),
                        *position,
                        RawPrice {
                            input: dec(&p["input_per_mtok"]).unwrap(),
                            output: dec(&p["output_per_mtok"]).unwrap(),
                            cached: dec(&p["cached_input_per_mtok"]),
                            per_request: dec(&p["per_request"]).unwrap_or_default(),
                        },
                    ));
            }
            "PlanConfigured" => {
                let models = data["models"]
                    .as_array()
                    .map(|m| m.iter().map(|v| v.as_str().unwrap().to_owned()).collect())
                    .unwrap_or_default();
                let plan = (dec(&data["monthly_quota"]).unwrap(), models);
                plans.insert(id(&data["plan_id"]).unwrap(), plan);
            }
            "PlanSubscribed" => {
                subscriptions.insert(id(&data["user_id"]).unwrap(), id(&data["plan_id"]).unwrap());
            }
            "PlanUnsubscribed" => {
                subscriptions.remove(&id(&data["user_id"]).unwrap());
            }
            "CompletionFinished"
            | "RequestCancelled"
            | "RequestFailed"
            | "ResponseServedFromCache" => {
                let usage = &data["usage"];
                if usage.is_null() {
                    continue; // a failure before any output is not charged
                }
                let request = id(&data["request_id"]).unwrap();
                if expected.contains_key(&request) {
                    continue; // charged once, by the first charging event
                }
                let model = data["model"].as_str().unwrap();
                let price = prices.get(model).and_then(|history| {
                    history
                        .iter()
                        .filter(|(effective, _, _)| effective <= at)
                        .max_by_key(|(effective, pos, _)| (*effective, *pos))
                        .map(|(_, _, p)| *p)
                });
                let amount = match (kind.as_str(), price) {
                    ("ResponseServedFromCache", _) | (_, None) => 0,
                    (_, Some(p)) => cost(&p, usage),
                };
                let user = id(&data["user_id"]);
                let plan = user
                    .and_then(|u| subscriptions.get(&u).map(|p| (u, *p)))
                    .and_then(|(u, p)| plans.get(&p).map(|def| (u, p, def)))
                    .filter(|(_, _, (_, models))| {
                        models.is_empty() || models.iter().any(|m| m == model)
                    });
                let (plan_id, plan_nanos) = match plan {
                    Some((user, plan_id, (quota, _))) => {
                        let month = used.entry((user, at.year(), at.month())).or_default();
                        let left = (*quota - *month).max(Decimal::ZERO);
                        let part = Decimal::from(amount).min(left);
                        *month += part;
                        (Some(plan_id), i64::try_from(part).unwrap())
                    }
                    None => (None, 0),
                };
                expected.insert(
                    request,
                    Expected {
                        amount,
                        plan_id,
                        plan_nanos,
                        key_id: id(&data["key_id"]).unwrap(),
                        user_id: user,
                    },
                );
            }
            _ => {}
        }
    }
    expected
}

/// A usage row: request, amount, plan, plan part, key, user.
type LedgerRow = (Uuid, i64, Option<Uuid>, i64, Uuid, Option<Uuid>);

const BILLING_TABLES: &[(&str, &str)] = &[
    ("ledger_entries", "position"),
    ("key_balances", "key_id"),
    ("user_balances", "user_id"),
    ("daily_usage", "day, key_id, model"),
    ("plan_usage", "user_id, period"),
    ("plans", "plan_id, position"),
    ("plan_subscriptions", "user_id, position"),
    ("prices", "model, effective_at, position"),
];

async fn rows(pool: &sqlx::PgPool, schema: &str, table: &str, order: &str) -> Vec<Value> {
    sqlx::query_scalar(&format!(
        "SELECT to_jsonb(t) FROM \"{schema}\".{table} t ORDER BY {order}"
    ))
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_mixed_requests_bill_to_the_nano_and_replay_identically() {
    let upstream = mock(Default::default()).await;
    let extra = channel_yaml("mock-other", "openai", &upstream.base_url(), OTHER, 1)
        + &channel_yaml("mock-claude", "anthropic", &upstream.root_url(), CLAUDE, 1);
    let stack = Stack::start(StackOptions {
        extra_channels: extra,
        workers: 2,
        ..Default::default()
    })
    .await;
    // Odd prices, so rounding to whole nano-dollars matters; in force since long ago.
    set_price(
        &stack,
        json!({"model": OTHER, "input_per_mtok": "1.1", "output_per_mtok": "4.4",
               "per_request": "0.000002", "effective_at": "2020-01-01T00:00:00Z"}),
    )
    .await;
    set_price(
        &stack,
        json!({"model": CLAUDE, "input_per_mtok": "3.000007", "output_per_mtok": "15",
               "cached_input_per_mtok": "0.3", "effective_at": "2020-01-01T00:00:00Z"}),
    )
    .await;

    // A user whose plan pays for two of the three models and runs out during the run.
    let user_id = admin_user(&stack, "vic").await;
    let key = admin_key(&stack, json!({"name": "vic", "user_id": user_id})).await;
    let user_key = key["key"].as_str().unwrap().to_owned();
    let (status, plan, text) = call(
        &stack,
        Method::POST,
        "/api/admin/plans",
        Some(ADMIN_TOKEN),
        Some(json!({"name": "team", "quota": "0.01", "models": [MODEL, CLAUDE]})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    let (status, _, text) = call(
        &stack,
        Method::PUT,
        &format!("/api/admin/users/{user_id}/plan"),
        Some(ADMIN_TOKEN),
        Some(json!({"plan_id": plan["id"]})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    grant_credit(
        &stack,
        json!({"user_id": user_id, "amount": "10", "note": "run"}),
    )
    .await;

    let models = [MODEL, OTHER, CLAUDE];
    let requests: Vec<(String, Value)> = (0..500u64)
        .map(|i| {
            let model = models[(i % 3) as usize];
            let mut b = json!({"model": model, "messages": [{"role": "user",
                "content": "word ".repeat((i % 37) as usize + 1)}]});
            let m = b.as_object_mut().unwrap();
            if i % 2 == 0 {
                m.insert("stream".into(), json!(true));
                m.insert(
                    "stream_options".into(),
                    json!({"include_usage": (i / 2) % 2 == 0}),
                );
            }
            if i % 3 == 1 || i % 5 == 0 {
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
            if model == CLAUDE {
                mock.insert("cache_read".into(), json!((i % 4) * 3)); // cached prompt tokens
            }
            m.insert("mock".into(), Value::Object(mock));
            let key = if i % 5 < 2 {
                user_key.clone()
            } else {
                KEY.to_owned()
            };
            (key, b)
        })
        .collect();
    let run = |slice: Vec<(String, Value)>| {
        let stack = &stack;
        async move {
            futures::stream::iter(slice)
                .map(|(key, body)| async move {
                    let resp = stack
                        .http
                        .post(format!("{}/v1/chat/completions", stack.base))
                        .bearer_auth(&key)
                        .json(&body)
                        .send()
                        .await
                        .unwrap();
                    let status = resp.status();
                    let _ = resp.bytes().await;
                    status
                })
                .buffer_unordered(25)
                .collect::<Vec<_>>()
                .await
        }
    };
    let started = std::time::Instant::now();
    let mut statuses = run(requests[..250].to_vec()).await;
    // Half way, two prices change: later requests are billed at the new ones.
    set_price(
        &stack,
        json!({"model": MODEL, "input_per_mtok": "0.30", "output_per_mtok": "1.25",
               "per_request": "0.000001"}),
    )
    .await;
    set_price(
        &stack,
        json!({"model": CLAUDE, "input_per_mtok": "2.5", "output_per_mtok": "12.5",
               "cached_input_per_mtok": "0.25"}),
    )
    .await;
    statuses.extend(run(requests[250..].to_vec()).await);
    eprintln!("500 requests in {:?}", started.elapsed());
    let ok = statuses.iter().filter(|s| s.is_success()).count() as i64;
    let refused = statuses
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!(refused, 0, "nobody ran out of money");
    assert!(ok >= 400, "{ok} of 500 succeeded");
    // Every accepted request has ended (a client's error answer does not mean the worker
    // stopped), and billing has everything up to the head of the log.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FILTER (WHERE type = 'RequestAccepted')
                  - count(*) FILTER (WHERE type IN ('CompletionFinished', 'RequestFailed', 'RequestCancelled'))
             FROM event_log",
        )
        .fetch_one(&stack.pool)
        .await
        .unwrap();
        if open == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{open} requests never ended"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    stack.wait_projected("CompletionFinished", ok).await;
    stack.wait_projected("PriceSet", 5).await;

    // Recompute every charge from the raw log.
    let events: Vec<(i64, String, Value, DateTime<Utc>)> =
        sqlx::query_as("SELECT position, type, data, occurred_at FROM event_log ORDER BY position")
            .fetch_all(&stack.pool)
            .await
            .unwrap();
    let expected = recompute(&events);
    let ledger: Vec<LedgerRow> = sqlx::query_as(
        "SELECT request_id, amount_nanos, plan_id, plan_nanos, key_id, user_id FROM ledger_entries
         WHERE kind = 'usage' ORDER BY position",
    )
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    assert_eq!(ledger.len(), expected.len());
    let completed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM event_log WHERE type = 'CompletionFinished'")
            .fetch_one(&stack.pool)
            .await
            .unwrap();
    assert_eq!(
        ledger.len() as i64,
        completed,
        "one charge per completed request"
    );
    assert!(ok <= completed);
    for (request, amount, plan_id, plan_nanos, key_id, user_id) in &ledger {
        let got = Expected {
            amount: *amount,
            plan_id: *plan_id,
            plan_nanos: *plan_nanos,
            key_id: *key_id,
            user_id: *user_id,
        };
        assert_eq!(expected.get(request), Some(&got), "request {request}");
    }

    // The run exercised what it claims to: estimated and cached usage, both prices of a
    // model, charges paid wholly by the plan, split, and wholly by the balance.
    let (estimated, cached, distinct_model_prices): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE usage_source = 'estimated'),
                COALESCE(sum(cached_tokens), 0)::bigint,
                (SELECT count(DISTINCT (input_per_mtok, output_per_mtok)) FROM prices WHERE model = $1)
         FROM ledger_entries WHERE kind = 'usage'",
    )
    .bind(MODEL)
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    assert!(estimated > 10 && cached > 100 && distinct_model_prices == 2);
    let plan_rows: Vec<&Expected> = expected.values().filter(|e| e.plan_id.is_some()).collect();
    let whole = plan_rows
        .iter()
        .filter(|e| e.plan_nanos == e.amount && e.amount > 0)
        .count();
    let split = plan_rows
        .iter()
        .filter(|e| e.plan_nanos > 0 && e.plan_nanos < e.amount)
        .count();
    let none = plan_rows.iter().filter(|e| e.plan_nanos == 0).count();
    eprintln!("plan-covered charges: {whole} by the plan, {split} split, {none} by the balance");
    // At most one charge straddles the end of the quota (none if one ends exactly on it).
    assert!(
        whole >= 5 && split <= 1 && none >= 5,
        "{whole} {split} {none}"
    );

    // Totals: balances, days and months all agree with the recomputation.
    let total: i64 = expected.values().map(|e| e.amount).sum();
    let plan_total: i64 = expected.values().map(|e| e.plan_nanos).sum();
    assert_eq!(plan_total, 10_000_000, "the plan paid its whole quota");
    let sums: (i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT sum(spent_nanos) FROM key_balances)::bigint,
                (SELECT sum(plan_nanos) FROM key_balances)::bigint,
                (SELECT sum(cost_nanos) FROM daily_usage)::bigint,
                (SELECT sum(plan_nanos) FROM daily_usage)::bigint,
                (SELECT sum(used_nanos) FROM plan_usage)::bigint",
    )
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    assert_eq!(sums, (total, plan_total, total, plan_total, plan_total));
    let mut by_key: HashMap<Uuid, (i64, i64)> = HashMap::new();
    for e in expected.values() {
        let k = by_key.entry(e.key_id).or_default();
        k.0 += e.amount;
        k.1 += e.plan_nanos;
    }
    let balances: Vec<(Uuid, i64, i64)> =
        sqlx::query_as("SELECT key_id, spent_nanos, plan_nanos FROM key_balances")
            .fetch_all(&stack.pool)
            .await
            .unwrap();
    assert_eq!(balances.len(), by_key.len());
    for (key, spent, plan) in balances {
        assert_eq!(by_key.get(&key), Some(&(spent, plan)), "key {key}");
    }
    // What the user is told agrees too.
    let me: Value = stack
        .http
        .get(format!("{}/api/me/balance", stack.base))
        .bearer_auth(&user_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let user_uuid: Uuid = user_id.parse().unwrap();
    let from_balance: i64 = expected
        .values()
        .filter(|e| e.user_id == Some(user_uuid))
        .map(|e| e.amount - e.plan_nanos)
        .sum();
    assert_eq!(me["spent"], schemas::Nanos(from_balance).to_usd_string());
    assert_eq!(me["plan"]["remaining"], "0");

    // Replaying billing from position 0 into a scratch schema rebuilds it row for row.
    let live = stack.ns.as_str().to_owned();
    let scratch = format!("{live}_bx");
    let out = stack
        .command("replay")
        .args(["billing", "--into", &scratch, "--json"])
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "replay failed; logs in {}",
        stack.dir.display()
    );
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(summary["position"].as_i64().unwrap() >= events.last().unwrap().0);
    let mut seen_tables = HashSet::new();
    for (table, order) in BILLING_TABLES {
        let a = rows(&stack.pool, &live, table, order).await;
        let b = rows(&stack.pool, &scratch, table, order).await;
        assert!(!a.is_empty(), "{table} has rows");
        assert_eq!(a, b, "{table} differs after replay");
        seen_tables.insert(*table);
    }
    sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{scratch}\" CASCADE"))
        .execute(&stack.pool)
        .await
        .unwrap();
    assert_eq!(seen_tables.len(), BILLING_TABLES.len());
    stack.stop().await;
}
