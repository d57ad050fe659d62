//! Personal channels (bring your own key) end to end, every role a separate `sluice`
//! process: a user adds a channel with their own provider key through `/api/channels`;
//! it serves only their requests, ahead of the shared channels; nobody else can see, change
//! or use it (404), nor its models (`model_not_found` in the caller's API shape); the key
//! is sealed and never returned; every change is audited with its owner.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{
    call, chat_as, grant_credit, mock, model_ids, register, until_chat, Stack, StackOptions,
    ADMIN_TOKEN, KEY, MODEL,
};
use mock_upstream::MockConfig;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const ALICE_PROVIDER_KEY: &str = "sk-alice-own-provider-key-0123456789";
const BOB_PROVIDER_KEY: &str = "sk-bob-own-provider-key-0123456789";
/// Served only by Alice's channel.
const PRIVATE_MODEL: &str = "alice-private";
/// Served only by Bob's channel.
const BOB_MODEL: &str = "bob-only";

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
    grant_credit(stack, json!({"key_id": key["id"], "amount": "1.00"})).await;
    let key = key["key"].as_str().unwrap().to_owned();
    until_chat(stack, &key, &hi(MODEL), StatusCode::OK).await;
    key
}

/// "hi" to `model`, 5 tokens at most.
fn hi(model: &str) -> Value {
    json!({"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
}

/// Lets personal channels call the local mock upstreams these tests run (a deployment
/// refuses loopback and private addresses for them by default).
const ALLOW_PRIVATE: (&str, &str) = ("SLUICE_PERSONAL_CHANNELS_ALLOW_PRIVATE", "true");

#[tokio::test]
async fn personal_channels_serve_only_their_owner_ahead_of_shared_ones() {
    let stack = Stack::start(StackOptions {
        env: vec![(ALLOW_PRIVATE.0, ALLOW_PRIVATE.1.to_owned())],
        ..StackOptions::default()
    })
    .await;
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
    let (alice_jwt, alice_id) = register(&stack, "alice", "alice-password-1").await;
    let (bob_jwt, _bob_id) = register(&stack, "bob", "bob-password-1").await;
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
    until_chat(&stack, &alice_key, &hi(PRIVATE_MODEL), StatusCode::OK).await;
    assert_eq!(
        alice_up.last_body("upstream-private").unwrap()["model"],
        "upstream-private"
    );
    // Anyone else asking for it is told the model does not exist, in their API's shape.
    for key in [bob_key.as_str(), KEY] {
        let (status, err) = chat_as(&stack, key, &hi(PRIVATE_MODEL)).await;
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
    let (status, _) = chat_as(&stack, &alice_key, &hi(BOB_MODEL)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    until_chat(&stack, &bob_key, &hi(BOB_MODEL), StatusCode::OK).await;

    // A model both serve: the owner's own channel goes first, everyone else's requests go
    // to the shared channel only.
    let (alice_before, shared_before) = (
        alice_up.stats().requests_total,
        stack.mock.stats().requests_total,
    );
    for _ in 0..5 {
        assert_eq!(
            chat_as(&stack, &alice_key, &hi(MODEL)).await.0,
            StatusCode::OK
        );
    }
    assert_eq!(alice_up.stats().requests_total, alice_before + 5);
    assert_eq!(stack.mock.stats().requests_total, shared_before);
    for key in [bob_key.as_str(), KEY] {
        for _ in 0..3 {
            assert_eq!(chat_as(&stack, key, &hi(MODEL)).await.0, StatusCode::OK);
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
        &hi(PRIVATE_MODEL),
        StatusCode::SERVICE_UNAVAILABLE,
    )
    .await;
    assert!(!model_ids(&stack, &alice_key)
        .await
        .contains(&PRIVATE_MODEL.to_owned()));
    assert_eq!(
        chat_as(&stack, &bob_key, &hi(PRIVATE_MODEL)).await.0,
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
        assert_eq!(
            chat_as(&stack, &alice_key, &hi(MODEL)).await.0,
            StatusCode::OK
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let alice_after_disable = alice_up.stats().requests_total;
    for _ in 0..3 {
        assert_eq!(
            chat_as(&stack, &alice_key, &hi(MODEL)).await.0,
            StatusCode::OK
        );
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
    until_chat(&stack, &alice_key, &hi(PRIVATE_MODEL), StatusCode::OK).await;

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
    let (status, err) = chat_as(&stack, &alice_key, &hi(PRIVATE_MODEL)).await;
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

/// A user's `base_url` is called from inside the deployment, so by default a personal
/// channel may only call public addresses: creating or re-pointing one at loopback,
/// private, link-local or unspecified addresses is a 400 naming `base_url`, and a channel
/// that points there anyway (created while the operator allowed it, or a name whose DNS
/// changed) is refused by the workers and the test call at call time, without a
/// connection. Shared channels are the operator's and are not restricted.
#[tokio::test]
async fn personal_channels_may_not_call_private_addresses() {
    let stack = Stack::start(StackOptions::default()).await;
    let (alice_jwt, alice_id) = register(&stack, "alice", "alice-password-1").await;
    let alice_key = funded_key(&stack, &alice_jwt).await;
    let channel = |base_url: Option<&str>, channel_type: &str| {
        let mut c = json!({"name": "mine", "type": channel_type, "models": [PRIVATE_MODEL]});
        if let Some(url) = base_url {
            c["base_url"] = json!(url);
        }
        c
    };

    for (base_url, channel_type) in [
        (Some("http://127.0.0.1:5432/v1"), "openai"),
        (Some("http://169.254.169.254/latest/meta-data"), "openai"),
        (Some("http://10.0.0.7/v1"), "openai"),
        (Some("http://192.168.1.20:8000/v1"), "vllm"),
        (Some("http://[::1]:8080/v1"), "openai"),
        (Some("http://[::ffff:127.0.0.1]/v1"), "openai"),
        (Some("http://0.0.0.0:11434/v1"), "openai"),
        (Some("http://2130706433/v1"), "openai"),
        // A name is judged by what it resolves to.
        (Some("http://localhost:11434/v1"), "ollama"),
        // No base_url: the preset's default, loopback for Ollama.
        (None, "ollama"),
    ] {
        let (status, err, text) = call(
            &stack,
            Method::POST,
            "/api/channels",
            Some(&alice_jwt),
            Some(channel(base_url, channel_type)),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{base_url:?}: {text}");
        assert_eq!(err["error"]["param"], "base_url", "{text}");
        let message = err["error"]["message"].as_str().unwrap();
        assert!(message.contains("public addresses"), "{message}");
    }

    // A public address is accepted (nothing is called at creation); re-pointing it at a
    // private one is refused, while changes that keep the address are not checked again.
    let (status, created, text) = call(
        &stack,
        Method::POST,
        "/api/channels",
        Some(&alice_jwt),
        Some(channel(Some("https://203.0.113.10/v1"), "openai")),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    let public_ch = created["id"].as_str().unwrap().to_owned();
    let path = format!("/api/channels/{public_ch}");
    let (status, err, text) = call(
        &stack,
        Method::PATCH,
        &path,
        Some(&alice_jwt),
        Some(json!({"base_url": "http://127.0.0.1:9/v1"})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert_eq!(err["error"]["param"], "base_url", "{text}");
    let (status, _, text) = call(
        &stack,
        Method::PATCH,
        &path,
        Some(&alice_jwt),
        Some(json!({"name": "renamed", "enabled": false})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");

    // Shared channels may point anywhere: the operator runs them.
    let (status, _, text) = call(
        &stack,
        Method::POST,
        "/api/admin/channels",
        Some(ADMIN_TOKEN),
        Some(
            json!({"name": "lan-vllm", "type": "vllm", "models": ["lan-model"],
                    "base_url": "http://10.0.0.7:8000/v1"}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{text}");

    // Channels that point at loopback anyway, written past the API: a literal IP, and a
    // name that resolves to loopback. Alice's requests try them first (her own channels
    // go before shared ones), and neither upstream is ever reached: her requests are
    // served by the shared channel.
    let literal_up = mock(MockConfig::default()).await;
    let named_up = mock(MockConfig::default()).await;
    let mut ids = Vec::new();
    for (name, base_url) in [
        ("literal", literal_up.base_url()),
        (
            "named",
            named_up.base_url().replace("127.0.0.1", "localhost"),
        ),
    ] {
        let id = uuid::Uuid::now_v7();
        sqlx::query(
            "INSERT INTO channels (id, name, channel_type, base_url, models, source, owner_user_id) \
             VALUES ($1, $2, 'openai', $3, $4, 'user', $5)",
        )
        .bind(id)
        .bind(name)
        .bind(&base_url)
        .bind(vec![MODEL.to_owned()])
        .bind(uuid::Uuid::parse_str(&alice_id).unwrap())
        .execute(&stack.pool)
        .await
        .unwrap();
        ids.push(id);
    }
    let failed_on = |id: uuid::Uuid| {
        let pool = stack.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT data->>'kind' FROM event_log WHERE type = 'AttemptFailed' \
                 AND data->>'channel_id' = $1 ORDER BY position LIMIT 1",
            )
            .bind(id.to_string())
            .fetch_optional(&pool)
            .await
            .unwrap()
        }
    };
    // Until the workers reloaded their channels and tried both (the journal records it).
    let deadline = Instant::now() + Duration::from_secs(30);
    let kinds = loop {
        let (status, body) = chat_as(&stack, &alice_key, &hi(MODEL)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        if let (Some(literal), Some(named)) = (failed_on(ids[0]).await, failed_on(ids[1]).await) {
            break (literal, named);
        }
        assert!(
            Instant::now() < deadline,
            "the workers never tried alice's loopback channels"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The literal IP is refused before any I/O (a channel configuration problem); the name
    // fails to resolve to any address the worker may call.
    assert_eq!(kinds.0, "internal");
    assert_eq!(kinds.1, "connection");
    assert_eq!(literal_up.stats().requests_total, 0);
    assert_eq!(named_up.stats().requests_total, 0);

    // The owner's test call is refused the same way.
    let (status, report, text) = call(
        &stack,
        Method::POST,
        &format!("/api/channels/{}/test", ids[0]),
        Some(&alice_jwt),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(report["ok"], false, "{text}");
    assert!(
        report["error"]["message"]
            .as_str()
            .unwrap()
            .contains("public addresses"),
        "{text}"
    );
    assert_eq!(literal_up.stats().requests_total, 0);
    stack.stop().await;
}
