//! Personal channels (bring your own key) end to end, every role a separate `sluice`
//! process: a user adds a channel with their own provider key through `/api/channels`;
//! it serves only their requests, ahead of the shared channels; nobody else can see, change
//! or use it (404), nor its models (`model_not_found` in the caller's API shape); the key
//! is sealed and never returned; every change is audited with its owner.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Stack, StackOptions, ADMIN_TOKEN, KEY, MODEL};
use mock_upstream::{MockConfig, MockUpstream};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const ALICE_PROVIDER_KEY: &str = "sk-alice-own-provider-key-0123456789";
const BOB_PROVIDER_KEY: &str = "sk-bob-own-provider-key-0123456789";
/// Served only by Alice's channel.
const PRIVATE_MODEL: &str = "alice-private";
/// Served only by Bob's channel.
const BOB_MODEL: &str = "bob-only";

async fn call(
    stack: &Stack,
    method: Method,
    path: &str,
    bearer: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value, String) {
    let mut req = stack.http.request(method, format!("{}{path}", stack.base));
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    if let Some(body) = body {
        req = req.json(&body);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
    )
}

async fn mock(config: MockConfig) -> MockUpstream {
    MockUpstream::start("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap()
}

/// Registers a user; returns their session token and id.
async fn register(stack: &Stack, name: &str) -> (String, String) {
    let (status, body, text) = call(
        stack,
        Method::POST,
        "/api/auth/register",
        None,
        Some(json!({"name": name, "email": format!("{name}@example.com"), "password": format!("{name}-password-1")})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    (
        body["token"].as_str().unwrap().to_owned(),
        body["user"]["id"].as_str().unwrap().to_owned(),
    )
}

/// Creates an API key for the user and grants it credit (a user's requests are billed
/// whichever channel serves them); returns the key once it is usable.
async fn funded_key(stack: &Stack, jwt: &str) -> String {
    let (status, key, text) = call(
        stack,
        Method::POST,
        "/api/keys",
        Some(jwt),
        Some(json!({"name": "main"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    let (status, _, text) = call(
        stack,
        Method::POST,
        "/api/admin/credits",
        Some(ADMIN_TOKEN),
        Some(json!({"key_id": key["id"], "amount": "1.00"})),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{text}");
    let key = key["key"].as_str().unwrap().to_owned();
    until_chat(stack, &key, MODEL, StatusCode::OK).await;
    key
}

async fn chat(stack: &Stack, key: &str, model: &str) -> (StatusCode, Value) {
    let resp = stack
        .http
        .post(format!("{}/v1/chat/completions", stack.base))
        .bearer_auth(key)
        .json(&json!({"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Polls until a chat answers `want`: workers reload channels every 2 s and credit
/// reaches keys once projected. Fails after 30 s.
async fn until_chat(stack: &Stack, key: &str, model: &str, want: StatusCode) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (got, body) = chat(stack, key, model).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "chat for {model} still answers {got} ({body}), not {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn model_ids(stack: &Stack, key: &str) -> Vec<String> {
    let (status, list, text) = call(stack, Method::GET, "/v1/models", Some(key), None).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn personal_channels_serve_only_their_owner_ahead_of_shared_ones() {
    let stack = Stack::start(StackOptions::default()).await;
    let alice_up = mock(MockConfig {
        require_key: Some(ALICE_PROVIDER_KEY.to_owned()),
        ..MockConfig::default()
    })
    .await;
    alice_up.record_bodies(true);
    let bob_up = mock(MockConfig {
        require_key: Some(BOB_PROVIDER_KEY.to_owned()),
        ..MockConfig::default()
    })
    .await;
    let (alice_jwt, alice_id) = register(&stack, "alice").await;
    let (bob_jwt, _bob_id) = register(&stack, "bob").await;
    let alice_key = funded_key(&stack, &alice_jwt).await;
    let bob_key = funded_key(&stack, &bob_jwt).await;
    let alice_channel = json!({
        "name": "mine",
        "type": "openai",
        "base_url": alice_up.base_url(),
        "api_key": ALICE_PROVIDER_KEY,
        "models": [MODEL, PRIVATE_MODEL],
        "model_map": {PRIVATE_MODEL: "upstream-private"},
        "priority": 5,
    });

    // Signed-in users only.
    let (status, _, _) = call(&stack, Method::GET, "/api/channels", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Create, with a session token or the user's own API key: the owner is the caller, the
    // provider key is sealed at rest and never shown.
    let (status, created, text) = call(
        &stack,
        Method::POST,
        "/api/channels",
        Some(&alice_jwt),
        Some(alice_channel.clone()),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    assert!(!text.contains(ALICE_PROVIDER_KEY), "{text}");
    assert_eq!(created["has_api_key"], true);
    assert_eq!(created["owner_user_id"], json!(alice_id));
    assert_eq!(created["source"], "user");
    let alice_ch = created["id"].as_str().unwrap().to_owned();
    let sealed: String = sqlx::query_scalar("SELECT api_key_sealed FROM channels WHERE id = $1")
        .bind(uuid::Uuid::parse_str(&alice_ch).unwrap())
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    assert!(!sealed.contains(ALICE_PROVIDER_KEY));
    let (status, bobs, text) = call(
        &stack,
        Method::POST,
        "/api/channels",
        Some(&bob_key),
        // Names are per owner: Bob may call his "mine" too.
        Some(json!({
            "name": "mine", "type": "openai", "base_url": bob_up.base_url(),
            "api_key": BOB_PROVIDER_KEY, "models": [BOB_MODEL],
        })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    let bob_ch = bobs["id"].as_str().unwrap().to_owned();

    // Same checks as the admin API: 400 naming the field, 409 for a name taken by the
    // same owner.
    for (body, param) in [
        (
            json!({"name": "x", "type": "openai", "models": []}),
            "models",
        ),
        (
            json!({"name": "x", "type": "nope", "models": ["m"]}),
            "type",
        ),
        (
            json!({"name": "x", "type": "node", "models": ["m"]}),
            "type",
        ),
        (
            json!({"name": "x", "type": "openai", "models": ["m"], "api_key": " "}),
            "api_key",
        ),
    ] {
        let (status, err, text) = call(
            &stack,
            Method::POST,
            "/api/channels",
            Some(&alice_jwt),
            Some(body),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
        assert_eq!(err["error"]["param"], param, "{text}");
    }
    let (status, err, _) = call(
        &stack,
        Method::POST,
        "/api/channels",
        Some(&alice_jwt),
        Some(alice_channel),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(err["error"]["code"], "conflict");

    // Each user lists only their own; the admin sees every channel and its owner.
    let (_, list, text) = call(&stack, Method::GET, "/api/channels", Some(&alice_key), None).await;
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [alice_ch.as_str()], "{text}");
    assert!(!text.contains(ALICE_PROVIDER_KEY), "{text}");
    let (_, list, _) = call(&stack, Method::GET, "/api/channels", Some(&bob_jwt), None).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    assert_eq!(list["data"][0]["id"], json!(bob_ch));
    let (_, list, text) = call(
        &stack,
        Method::GET,
        "/api/admin/channels",
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert!(
        !text.contains(ALICE_PROVIDER_KEY) && !text.contains(BOB_PROVIDER_KEY),
        "{text}"
    );
    let all = list["data"].as_array().unwrap();
    assert_eq!(all.len(), 3, "{text}");
    let shown = all.iter().find(|c| c["id"] == json!(alice_ch)).unwrap();
    assert_eq!(shown["owner_user_id"], json!(alice_id));
    let shared = all.iter().find(|c| c["name"] == "mock-main").unwrap();
    assert!(shared["owner_user_id"].is_null());

    // Someone else's channel does not exist for them, whatever the verb; nothing changes.
    for (method, path, body) in [
        (Method::GET, format!("/api/channels/{alice_ch}"), None),
        (
            Method::PATCH,
            format!("/api/channels/{alice_ch}"),
            Some(json!({"base_url": "http://127.0.0.1:9/v1"})),
        ),
        (
            Method::POST,
            format!("/api/channels/{alice_ch}/disable"),
            None,
        ),
        (
            Method::POST,
            format!("/api/channels/{alice_ch}/enable"),
            None,
        ),
        (Method::POST, format!("/api/channels/{alice_ch}/test"), None),
        (Method::DELETE, format!("/api/channels/{alice_ch}"), None),
        // An admin-created shared channel is not a user's to change either.
        (
            Method::DELETE,
            format!("/api/channels/{}", shared["id"].as_str().unwrap()),
            None,
        ),
    ] {
        let (status, err, text) = call(&stack, method.clone(), &path, Some(&bob_jwt), body).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {text}");
        assert_eq!(err["error"]["code"], "not_found", "{text}");
    }
    let (status, one, _) = call(
        &stack,
        Method::GET,
        &format!("/api/channels/{alice_ch}"),
        Some(&alice_jwt),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(one["base_url"], json!(alice_up.base_url()));
    assert_eq!(one["enabled"], true);

    // Model visibility: the owner sees their models; nobody else does.
    let alice_models = model_ids(&stack, &alice_key).await;
    assert!(
        alice_models.contains(&PRIVATE_MODEL.to_owned()),
        "{alice_models:?}"
    );
    assert!(
        !alice_models.contains(&BOB_MODEL.to_owned()),
        "{alice_models:?}"
    );
    let bob_models = model_ids(&stack, &bob_key).await;
    assert!(bob_models.contains(&BOB_MODEL.to_owned()), "{bob_models:?}");
    assert!(
        !bob_models.contains(&PRIVATE_MODEL.to_owned()),
        "{bob_models:?}"
    );
    assert_eq!(model_ids(&stack, KEY).await, [MODEL]);
    let path = format!("/v1/models/{PRIVATE_MODEL}");
    assert_eq!(
        call(&stack, Method::GET, &path, Some(&alice_key), None)
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        call(&stack, Method::GET, &path, Some(&bob_key), None)
            .await
            .0,
        StatusCode::NOT_FOUND
    );

    // The owner's requests for the private model reach their channel, mapped, with their
    // own provider key (the mock refuses any other).
    until_chat(&stack, &alice_key, PRIVATE_MODEL, StatusCode::OK).await;
    assert_eq!(
        alice_up.last_body("upstream-private").unwrap()["model"],
        "upstream-private"
    );
    // Anyone else asking for it is told the model does not exist, in their API's shape.
    for key in [bob_key.as_str(), KEY] {
        let (status, err) = chat(&stack, key, PRIVATE_MODEL).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{err}");
        assert_eq!(err["error"]["code"], "model_not_found", "{err}");
        let resp = stack
            .http
            .post(format!("{}/v1/messages", stack.base))
            .header("x-api-key", key)
            .header("anthropic-version", "2023-06-01")
            .json(&json!({"model": PRIVATE_MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["type"], "error", "{err}");
        assert_eq!(err["error"]["type"], "not_found_error", "{err}");
    }
    let (status, _) = chat(&stack, &alice_key, BOB_MODEL).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    until_chat(&stack, &bob_key, BOB_MODEL, StatusCode::OK).await;

    // A model both serve: the owner's own channel goes first, everyone else's requests go
    // to the shared channel only.
    let (alice_before, shared_before) = (
        alice_up.stats().requests_total,
        stack.mock.stats().requests_total,
    );
    for _ in 0..5 {
        assert_eq!(chat(&stack, &alice_key, MODEL).await.0, StatusCode::OK);
    }
    assert_eq!(alice_up.stats().requests_total, alice_before + 5);
    assert_eq!(stack.mock.stats().requests_total, shared_before);
    for key in [bob_key.as_str(), KEY] {
        for _ in 0..3 {
            assert_eq!(chat(&stack, key, MODEL).await.0, StatusCode::OK);
        }
    }
    assert_eq!(alice_up.stats().requests_total, alice_before + 5);
    assert_eq!(stack.mock.stats().requests_total, shared_before + 6);

    // The owner's test call works like the admin's.
    let (status, report, text) = call(
        &stack,
        Method::POST,
        &format!("/api/channels/{alice_ch}/test?model={PRIVATE_MODEL}"),
        Some(&alice_jwt),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(report["ok"], true, "{text}");
    assert_eq!(report["upstream_model"], "upstream-private");

    // Update keeps the owner; disable takes the channel out: the owner's shared model falls
    // back to the shared channel, the private one is "no channel" (503) for the owner and
    // still unknown (404) for others.
    let (status, changed, text) = call(
        &stack,
        Method::PATCH,
        &format!("/api/channels/{alice_ch}"),
        Some(&alice_jwt),
        Some(json!({"name": "mine-renamed", "weight": 3})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(changed["owner_user_id"], json!(alice_id));
    assert_eq!(changed["name"], "mine-renamed");
    let (status, off, _) = call(
        &stack,
        Method::POST,
        &format!("/api/channels/{alice_ch}/disable"),
        Some(&alice_key),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(off["enabled"], false);
    until_chat(
        &stack,
        &alice_key,
        PRIVATE_MODEL,
        StatusCode::SERVICE_UNAVAILABLE,
    )
    .await;
    assert!(!model_ids(&stack, &alice_key)
        .await
        .contains(&PRIVATE_MODEL.to_owned()));
    assert_eq!(
        chat(&stack, &bob_key, PRIVATE_MODEL).await.0,
        StatusCode::NOT_FOUND
    );
    // Workers drop it within their 2 s reload: poll until the shared channel answers her,
    // then it answers all of her requests.
    let shared_before = stack.mock.stats().requests_total;
    let deadline = Instant::now() + Duration::from_secs(20);
    while stack.mock.stats().requests_total == shared_before {
        assert!(
            Instant::now() < deadline,
            "the disabled channel still takes her traffic"
        );
        assert_eq!(chat(&stack, &alice_key, MODEL).await.0, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let alice_after_disable = alice_up.stats().requests_total;
    for _ in 0..3 {
        assert_eq!(chat(&stack, &alice_key, MODEL).await.0, StatusCode::OK);
    }
    assert_eq!(alice_up.stats().requests_total, alice_after_disable);
    let (status, _, _) = call(
        &stack,
        Method::POST,
        &format!("/api/channels/{alice_ch}/enable"),
        Some(&alice_jwt),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    until_chat(&stack, &alice_key, PRIVATE_MODEL, StatusCode::OK).await;

    // Delete: gone for the owner too, and so is its model.
    let (status, _, _) = call(
        &stack,
        Method::DELETE,
        &format!("/api/channels/{alice_ch}"),
        Some(&alice_jwt),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _, _) = call(
        &stack,
        Method::GET,
        &format!("/api/channels/{alice_ch}"),
        Some(&alice_jwt),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, err) = chat(&stack, &alice_key, PRIVATE_MODEL).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{err}");
    assert_eq!(err["error"]["code"], "model_not_found");

    // Every change is audited like an admin's, naming the owner, never the secret.
    stack.wait_projected("ChannelDeleted", 1).await;
    let audit: Vec<(String, Value, Value)> = sqlx::query_as(
        "SELECT type, data, metadata FROM event_log WHERE stream = $1 ORDER BY position",
    )
    .bind(format!(
        "config-{}",
        uuid::Uuid::parse_str(&alice_ch).unwrap().simple()
    ))
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    let types: Vec<&str> = audit.iter().map(|(t, _, _)| t.as_str()).collect();
    assert_eq!(
        types,
        [
            "ChannelConfigured", // create
            "ChannelConfigured", // rename
            "ChannelConfigured", // disable
            "ChannelConfigured", // enable
            "ChannelDeleted"
        ]
    );
    for (_, data, metadata) in &audit {
        assert_eq!(data["owner_user_id"], json!(alice_id), "{data}");
        assert_eq!(data["source"], "user", "{data}");
        assert_eq!(metadata["user_id"], json!(alice_id), "{metadata}");
        assert!(!data.to_string().contains(ALICE_PROVIDER_KEY));
    }
    stack.stop().await;
}
