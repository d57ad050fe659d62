//! Plans and shared balances end to end, on real Postgres, Redis and NATS: a plan's monthly
//! quota is consumed before credits; a model outside the plan's allow-list is paid from
//! credits (and refused only when there are none); admission counts what is left of the
//! plan; a user's keys share the user's balance with a key's quota as a cap; plans are
//! administered by admins only and picked by users only when public.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{
    admin_key, admin_user, call, channel_yaml, chat_as, hello, mock, until_prices, Stack,
    StackOptions, ADMIN_TOKEN, MODEL,
};
use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use uuid::Uuid;

const OTHER: &str = "gpt-other";

/// A stack with a second model, `gpt-other`, on a second mock (returned, to keep it up).
async fn stack() -> (Stack, mock_upstream::MockUpstream) {
    let other = mock(Default::default()).await;
    let stack = Stack::start(StackOptions {
        extra_channels: channel_yaml("mock-other", "openai", &other.base_url(), OTHER, 1),
        ..Default::default()
    })
    .await;
    (stack, other)
}

/// What [`hello`]`(model, 10)` costs: 5 prompt and 10 completion tokens (6,750 nanos at
/// $0.15 / $0.60 per million); tiktoken estimates 9 prompt tokens, so the quota estimate
/// is 7,350 nanos.
const COST: i64 = 5 * 150 + 10 * 600;
/// `gpt-other` at $1 and $2 per million: 5,000 + 20,000.
const OTHER_COST: i64 = 5 * 1_000 + 10 * 2_000;

/// A chat for `model` with `key`, 10 tokens at most (see [`COST`]).
async fn send(stack: &Stack, key: &str, model: &str) -> (StatusCode, Value) {
    chat_as(stack, key, &hello(model, 10)).await
}

/// Sets `gpt-other`'s price and waits until this ingress estimates with it.
async fn price_other(stack: &Stack) {
    let (status, _, text) = call(
        stack,
        Method::PUT,
        "/api/admin/prices",
        Some(ADMIN_TOKEN),
        Some(
            json!({"model": OTHER, "input_per_mtok": "1", "output_per_mtok": "2",
                    "effective_at": "2020-01-01T00:00:00Z"}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{text}");
    until_prices(stack, 2).await;
}

/// A user made by an admin, and a key of theirs (made by the admin, with `key` settings).
async fn user_with_key(stack: &Stack, name: &str, key: Value) -> (String, String, String) {
    let user_id = admin_user(stack, name).await;
    let mut body = key;
    body["user_id"] = json!(user_id);
    body["name"] = json!(format!("{name}-key"));
    let created = admin_key(stack, body).await;
    (
        user_id,
        created["key"].as_str().unwrap().to_owned(),
        created["id"].as_str().unwrap().to_owned(),
    )
}

async fn create_plan(stack: &Stack, body: Value) -> Value {
    let (status, plan, text) = call(
        stack,
        Method::POST,
        "/api/admin/plans",
        Some(ADMIN_TOKEN),
        Some(body),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    plan
}

/// The usage rows of `user` in log order: (model, amount, plan, plan part).
async fn ledger(stack: &Stack, user: &str) -> Vec<(String, i64, Option<Uuid>, i64)> {
    sqlx::query_as(
        "SELECT model, amount_nanos, plan_id, plan_nanos FROM ledger_entries
         WHERE kind = 'usage' AND user_id = $1::uuid ORDER BY position",
    )
    .bind(user)
    .fetch_all(&stack.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_plans_quota_is_consumed_before_credits() {
    let (stack, _other) = stack().await;
    price_other(&stack).await;
    let (user, key, _) = user_with_key(&stack, "pat", json!({})).await;
    // Room for two requests' real cost (13,500) but not a third estimate (7,350).
    let plan = create_plan(
        &stack,
        json!({"name": "starter", "quota": "0.000015", "models": [MODEL]}),
    )
    .await;
    let plan_id: Uuid = plan["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(plan["quota"], "0.000015");
    assert_eq!(plan["models"], json!([MODEL]));
    let (status, assigned, text) = call(
        &stack,
        Method::PUT,
        &format!("/api/admin/users/{user}/plan"),
        Some(ADMIN_TOKEN),
        Some(json!({"plan_id": plan_id})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(assigned["plan"]["id"], json!(plan_id));
    assert_eq!(assigned["remaining"], "0.000015");

    // No credits: the plan pays for its model, and only for it.
    let (status, err) = send(&stack, &key, OTHER).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{err}");
    assert_eq!(err["error"]["code"], "insufficient_quota");
    for _ in 0..2 {
        let (status, body) = send(&stack, &key, MODEL).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let (status, err) = send(&stack, &key, MODEL).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{err}");
    assert_eq!(err["error"]["code"], "insufficient_quota");

    // Credits: the rest of the plan goes first, then the balance; the other model is paid
    // from the balance (not refused by the plan).
    let (status, _, text) = call(
        &stack,
        Method::POST,
        "/api/admin/credits",
        Some(ADMIN_TOKEN),
        Some(json!({"user_id": user, "amount": "0.01", "note": "top-up"})),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{text}");
    for model in [MODEL, MODEL, OTHER] {
        let (status, body) = send(&stack, &key, model).await;
        assert_eq!(status, StatusCode::OK, "{model}: {body}");
    }
    stack.wait_projected("CompletionFinished", 5).await;
    let quota = 15_000;
    assert_eq!(
        ledger(&stack, &user).await,
        vec![
            (MODEL.to_owned(), COST, Some(plan_id), COST),
            (MODEL.to_owned(), COST, Some(plan_id), COST),
            (MODEL.to_owned(), COST, Some(plan_id), quota - 2 * COST),
            (MODEL.to_owned(), COST, Some(plan_id), 0),
            (OTHER.to_owned(), OTHER_COST, None, 0),
        ]
    );

    // What the user sees.
    let (status, mine, text) = call(&stack, Method::GET, "/api/me/plan", Some(&key), None).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(mine["plan"]["name"], "starter");
    assert_eq!(mine["used"], "0.000015");
    assert_eq!(mine["remaining"], "0");
    let today = chrono::Utc::now().date_naive();
    let start: chrono::NaiveDate = mine["period"]["start"].as_str().unwrap().parse().unwrap();
    let end: chrono::NaiveDate = mine["period"]["end"].as_str().unwrap().parse().unwrap();
    assert!(start <= today && today < end && start.format("%d").to_string() == "01");
    let from_balance = 4 * COST + OTHER_COST - quota;
    let (_, balance, _) = call(&stack, Method::GET, "/api/me/balance", Some(&key), None).await;
    assert_eq!(balance["credits"], "0.01");
    assert_eq!(
        balance["spent"],
        schemas::Nanos(from_balance).to_usd_string()
    );
    assert_eq!(
        balance["balance"],
        schemas::Nanos(10_000_000 - from_balance).to_usd_string()
    );
    let (_, usage, _) = call(&stack, Method::GET, "/api/usage", Some(&key), None).await;
    assert_eq!(usage["totals"]["requests"], 5);
    assert_eq!(usage["totals"]["plan_cost"], "0.000015");
    assert_eq!(
        usage["totals"]["cost"],
        schemas::Nanos(4 * COST + OTHER_COST).to_usd_string()
    );
    let month: (i64, i64) =
        sqlx::query_as("SELECT used_nanos, requests FROM plan_usage WHERE user_id = $1::uuid")
            .bind(&user)
            .fetch_one(&stack.pool)
            .await
            .unwrap();
    assert_eq!(month, (quota, 3));
    stack.stop().await;
}

#[tokio::test]
async fn a_users_keys_share_the_balance_and_a_key_quota_caps_one_key() {
    let (stack, _other) = stack().await;
    // A key capped at 10,000 nanos: room for one request's estimate, not two.
    let (user, capped, capped_id) =
        user_with_key(&stack, "quinn", json!({"quota": "0.00001"})).await;
    // The user's own key (made with the key itself as credential) has no cap.
    let (status, own, text) = call(
        &stack,
        Method::POST,
        "/api/keys",
        Some(&capped),
        Some(json!({"name": "laptop"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    assert_eq!(own["quota"], Value::Null);
    let own_key = own["key"].as_str().unwrap().to_owned();
    // Nothing to spend yet, on either key.
    for key in [&capped, &own_key] {
        let (status, err) = send(&stack, key, MODEL).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{err}");
    }
    // A redemption code without a key credits the user's balance.
    let (status, minted, text) = call(
        &stack,
        Method::POST,
        "/api/admin/redemption-codes",
        Some(ADMIN_TOKEN),
        Some(json!({"amount": "0.00005"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    let code = minted["codes"][0]["code"].as_str().unwrap();
    let (status, redeemed, text) = call(
        &stack,
        Method::POST,
        "/api/redeem",
        Some(&own_key),
        Some(json!({"code": code})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(redeemed["key_id"], Value::Null);
    // Both keys draw on it; the capped key stops at its cap while the other goes on.
    assert_eq!(send(&stack, &capped, MODEL).await.0, StatusCode::OK);
    let (status, err) = send(&stack, &capped, MODEL).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{err}");
    assert_eq!(err["error"]["code"], "insufficient_quota");
    for _ in 0..4 {
        assert_eq!(send(&stack, &own_key, MODEL).await.0, StatusCode::OK);
    }
    // 50,000 nanos: five requests spent 33,750; the 7,350 estimate still fits twice (16,250
    // and 9,500 left), then not (2,750 left).
    assert_eq!(send(&stack, &own_key, MODEL).await.0, StatusCode::OK);
    assert_eq!(send(&stack, &own_key, MODEL).await.0, StatusCode::OK);
    let (status, err) = send(&stack, &own_key, MODEL).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{err}");
    stack.wait_projected("CompletionFinished", 7).await;

    // Credit granted to one key of a user counts for all of them.
    let (status, _, text) = call(
        &stack,
        Method::POST,
        "/api/admin/credits",
        Some(ADMIN_TOKEN),
        Some(json!({"key_id": capped_id, "amount": "0.00001"})),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{text}");
    assert_eq!(send(&stack, &own_key, MODEL).await.0, StatusCode::OK);
    stack.wait_projected("CompletionFinished", 8).await;
    let (_, balance, _) = call(&stack, Method::GET, "/api/me/balance", Some(&own_key), None).await;
    assert_eq!(balance["credits"], "0.00006");
    assert_eq!(balance["spent"], schemas::Nanos(8 * COST).to_usd_string());
    assert_eq!(
        balance["balance"],
        schemas::Nanos(60_000 - 8 * COST).to_usd_string()
    );
    assert_eq!(balance["plan"]["plan"], Value::Null);
    // Spent per key: one request on the capped key, seven on the other.
    let spent: Vec<i64> = sqlx::query_scalar(
        "SELECT b.spent_nanos FROM key_balances b JOIN api_keys k ON k.id = b.key_id
         WHERE k.user_id = $1::uuid ORDER BY b.spent_nanos",
    )
    .bind(&user)
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    assert_eq!(spent, vec![COST, 7 * COST]);
    // Another user sees none of it, and may not ask for it.
    let (_, sam_key, _) = user_with_key(&stack, "sam", json!({})).await;
    let (_, theirs, _) = call(&stack, Method::GET, "/api/me/balance", Some(&sam_key), None).await;
    assert_eq!(theirs["credits"], "0");
    let (status, _, _) = call(
        &stack,
        Method::GET,
        &format!("/api/admin/users/{user}/balance"),
        Some(&sam_key),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    stack.stop().await;
}

#[tokio::test]
async fn plans_are_administered_by_admins_and_picked_by_users_when_public() {
    let (stack, _other) = stack().await;
    let mut answers: Vec<String> = Vec::new();
    let (user, key, _) = user_with_key(&stack, "uma", json!({})).await;
    let free = create_plan(
        &stack,
        json!({"name": "free", "quota": "0.5", "public": true}),
    )
    .await;
    let pro = create_plan(
        &stack,
        json!({"name": "pro", "quota": "20", "models": [MODEL, OTHER, MODEL]}),
    )
    .await;
    assert_eq!(pro["models"], json!([MODEL, OTHER]), "duplicates dropped");
    let (free_id, pro_id) = (
        free["id"].as_str().unwrap().to_owned(),
        pro["id"].as_str().unwrap().to_owned(),
    );

    // Bad input is a 400 naming the field, a duplicate name a 409, an unknown plan a 404.
    for (body, param) in [
        (json!({"name": "x", "quota": "-1"}), "quota"),
        (json!({"name": "x", "quota": "ten"}), "quota"),
        (json!({"name": " ", "quota": "1"}), "name"),
        (json!({"name": "x", "quota": "1", "models": [""]}), "models"),
    ] {
        let (status, err, text) = call(
            &stack,
            Method::POST,
            "/api/admin/plans",
            Some(ADMIN_TOKEN),
            Some(body),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
        assert_eq!(err["error"]["param"], param, "{text}");
    }
    let (status, _, _) = call(
        &stack,
        Method::POST,
        "/api/admin/plans",
        Some(ADMIN_TOKEN),
        Some(json!({"name": "PRO", "quota": "1"})),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    for path in [
        format!("/api/admin/plans/{}", Uuid::now_v7()),
        "/api/admin/plans/not-an-id".to_owned(),
    ] {
        let (status, _, _) = call(&stack, Method::GET, &path, Some(ADMIN_TOKEN), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    // Users: admin routes are forbidden; only public plans (and their own) are listed.
    for (method, path, body) in [
        (Method::GET, "/api/admin/plans".to_owned(), None),
        (
            Method::POST,
            "/api/admin/plans".to_owned(),
            Some(json!({"name": "mine", "quota": "100"})),
        ),
        (
            Method::PATCH,
            format!("/api/admin/plans/{pro_id}"),
            Some(json!({"public": true})),
        ),
        (
            Method::PUT,
            format!("/api/admin/users/{user}/plan"),
            Some(json!({"plan_id": pro_id})),
        ),
    ] {
        let (status, _, _) = call(&stack, method, &path, Some(&key), body).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}");
    }
    let (_, offered, text) = call(&stack, Method::GET, "/api/plans", Some(&key), None).await;
    answers.push(text);
    let names: Vec<&str> = offered["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["free"]);
    assert!(offered["data"][0].get("subscribers").is_none());
    // A plan that is not public cannot be picked: not found, as if it did not exist.
    let (status, _, _) = call(
        &stack,
        Method::POST,
        &format!("/api/plans/{pro_id}/subscribe"),
        Some(&key),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, mine, text) = call(
        &stack,
        Method::POST,
        &format!("/api/plans/{free_id}/subscribe"),
        Some(&key),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    answers.push(text);
    assert_eq!(mine["plan"]["name"], "free");
    assert_eq!(mine["remaining"], "0.5");

    // An admin moves the user to the private plan; the user sees it as theirs.
    let (status, _, text) = call(
        &stack,
        Method::PUT,
        &format!("/api/admin/users/{user}/plan"),
        Some(ADMIN_TOKEN),
        Some(json!({"plan_id": pro_id})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let (_, offered, _) = call(&stack, Method::GET, "/api/plans", Some(&key), None).await;
    assert_eq!(offered["current"], json!(pro_id));
    assert_eq!(offered["data"].as_array().unwrap().len(), 2);
    // Editing a plan: only the given fields change; subscribers are counted.
    let (status, edited, text) = call(
        &stack,
        Method::PATCH,
        &format!("/api/admin/plans/{pro_id}"),
        Some(ADMIN_TOKEN),
        Some(json!({"quota": "25.50"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(edited["quota"], "25.5");
    assert_eq!(edited["models"], json!([MODEL, OTHER]));
    assert_eq!(edited["subscribers"], 1);
    let (status, _, _) = call(
        &stack,
        Method::PATCH,
        &format!("/api/admin/plans/{pro_id}"),
        Some(ADMIN_TOKEN),
        Some(json!({"name": "Free"})),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (_, mine, text) = call(&stack, Method::GET, "/api/me/plan", Some(&key), None).await;
    answers.push(text);
    assert_eq!(mine["plan"]["quota"], "25.5");
    let (_, listed, text) = call(
        &stack,
        Method::GET,
        "/api/admin/plans",
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    answers.push(text);
    assert_eq!(listed["data"].as_array().unwrap().len(), 2);
    // Leaving the plan, then an admin ends a plan with null.
    let (status, left, _) = call(&stack, Method::DELETE, "/api/me/plan", Some(&key), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(left["plan"], Value::Null);
    assert_eq!(left["remaining"], "0");
    let (status, _, _) = call(
        &stack,
        Method::PUT,
        &format!("/api/admin/users/{user}/plan"),
        Some(ADMIN_TOKEN),
        Some(json!({"plan_id": null})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = call(
        &stack,
        Method::PUT,
        &format!("/api/admin/users/{}/plan", Uuid::now_v7()),
        Some(ADMIN_TOKEN),
        Some(json!({"plan_id": pro_id})),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Plans declared in sluice.yaml: `sluice migrate` upserts them by name, so running it
    // twice (even before billing caught up) leaves one plan, and a change updates it.
    let config = stack.dir.join("plans.yaml");
    let declared = |quota: &str| {
        format!("plans:\n  - {{name: gold, quota: \"{quota}\", models: [{MODEL}], public: true}}\n")
    };
    std::fs::write(&config, declared("3")).unwrap();
    for _ in 0..2 {
        let status = stack
            .command("migrate")
            .env("SLUICE_CONFIG", &config)
            .status()
            .unwrap();
        assert!(status.success());
    }
    std::fs::write(&config, declared("4.5")).unwrap();
    let status = stack
        .command("migrate")
        .env("SLUICE_CONFIG", &config)
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let gold = loop {
        let (_, listed, _) = call(
            &stack,
            Method::GET,
            "/api/admin/plans",
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
        let golds: Vec<Value> = listed["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["name"] == "gold")
            .cloned()
            .collect();
        if golds.len() == 1 && golds[0]["quota"] == "4.5" {
            break golds[0].clone();
        }
        assert!(golds.len() <= 1, "{golds:?}");
        assert!(Instant::now() < deadline, "{golds:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(gold["models"], json!([MODEL]));
    assert_eq!(gold["public"], true);

    // Every change is an event; the read models were built from them.
    let kinds: Vec<(String, i64)> = sqlx::query_as(
        "SELECT type, count(*) FROM event_log WHERE type LIKE 'Plan%' GROUP BY type ORDER BY type",
    )
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    // free, pro, pro edited, and gold two or three times (its second migrate may run
    // before billing projected the first, and then publishes the same definition again).
    assert_eq!(kinds[0].0, "PlanConfigured");
    assert!((5..=6).contains(&kinds[0].1), "{kinds:?}");
    assert_eq!(
        kinds[1..],
        [
            ("PlanSubscribed".to_owned(), 2),
            ("PlanUnsubscribed".to_owned(), 2),
        ]
    );
    // No key or hash in any answer.
    let hashes: Vec<String> = sqlx::query_scalar("SELECT key_hash FROM api_keys")
        .fetch_all(&stack.pool)
        .await
        .unwrap();
    for text in &answers {
        assert!(!text.contains(&key), "{text}");
        for hash in &hashes {
            assert!(!text.contains(hash.as_str()), "{text}");
        }
    }
    stack.stop().await;
}

#[tokio::test]
async fn fifty_concurrent_requests_over_a_users_keys_overspend_by_at_most_one_estimate() {
    let (stack, _other) = stack().await;
    let (user, first, _) = user_with_key(&stack, "val", json!({})).await;
    let mut keys = vec![first.clone()];
    for name in ["b", "c"] {
        let (status, key, text) = call(
            &stack,
            Method::POST,
            "/api/keys",
            Some(&first),
            Some(json!({"name": name})),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{text}");
        keys.push(key["key"].as_str().unwrap().to_owned());
    }
    // 20,000 from the plan and 25,000 of credit: room for about six requests.
    let plan = create_plan(
        &stack,
        json!({"name": "small", "quota": "0.00002", "models": [MODEL]}),
    )
    .await;
    let (status, _, text) = call(
        &stack,
        Method::PUT,
        &format!("/api/admin/users/{user}/plan"),
        Some(ADMIN_TOKEN),
        Some(json!({"plan_id": plan["id"]})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let (status, _, text) = call(
        &stack,
        Method::POST,
        "/api/admin/credits",
        Some(ADMIN_TOKEN),
        Some(json!({"user_id": user, "amount": "0.000025"})),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{text}");
    let results: Vec<StatusCode> = futures::stream::iter(0..50)
        .map(|i| {
            let key = keys[i % keys.len()].clone();
            let stack = &stack;
            async move { send(stack, &key, MODEL).await.0 }
        })
        .buffer_unordered(50)
        .collect()
        .await;
    let ok = results.iter().filter(|s| **s == StatusCode::OK).count();
    let refused = results
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!(ok + refused, 50, "{results:?}");
    assert!(ok >= 5 && refused >= 1, "{ok} admitted");
    stack.wait_projected("CompletionFinished", ok as i64).await;
    let rows = ledger(&stack, &user).await;
    assert_eq!(rows.len(), ok);
    let spent: i64 = rows.iter().map(|r| r.1).sum();
    let from_plan: i64 = rows.iter().map(|r| r.3).sum();
    let estimate = 9 * 150 + 10 * 600;
    eprintln!("admitted {ok} of 50 over 3 keys; spent {spent} of 45000 (plan {from_plan})");
    assert!(spent <= 45_000 + estimate, "spent {spent}");
    assert_eq!(from_plan, 20_000, "the plan paid first, all of it");
    stack.stop().await;
}
