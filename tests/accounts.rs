//! Users and keys end to end: register, log in, keys shown once and stored hashed, a
//! user sees only their own keys and usage (404 otherwise), revocation takes effect at
//! once, admin rights by token or admin JWT only, and no secret in any answer or log.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{call, chat_as, hello, register, until_chat, Stack, StackOptions, ADMIN_TOKEN, MODEL};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

#[tokio::test]
async fn users_keys_isolation_revocation_and_no_secrets() {
    let stack = Stack::start(StackOptions::default()).await;
    let mut seen_secrets: Vec<String> = Vec::new();

    // Register and log in.
    let alice_pw = "alice-password-1";
    let (alice_jwt, alice_id) = register(&stack, "alice", alice_pw).await;
    seen_secrets.push(alice_pw.into());
    let (status, _, _) = call(
        &stack,
        Method::POST,
        "/api/auth/login",
        None,
        Some(json!({"email": "alice@example.com", "password": "wrong-password"})),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, login, _) = call(
        &stack,
        Method::POST,
        "/api/auth/login",
        None,
        Some(json!({"login": "alice", "password": alice_pw})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(login["user"]["id"], json!(alice_id));
    let (status, me, _) = call(&stack, Method::GET, "/api/me", Some(&alice_jwt), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(me["name"], "alice");
    assert_eq!(me["role"], "user");
    let (status, _, _) = call(&stack, Method::GET, "/api/me", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, _) = call(
        &stack,
        Method::GET,
        "/api/me",
        Some("eyJhbGciOiJIUzI1NiJ9.e30.bad"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // A key is shown once; only its hash and prefix are stored.
    let (status, created, text) = call(
        &stack,
        Method::POST,
        "/api/keys",
        Some(&alice_jwt),
        Some(json!({"name": "laptop", "rpm": 100})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    let alice_key = created["key"].as_str().unwrap().to_owned();
    let alice_key_id = created["id"].as_str().unwrap().to_owned();
    seen_secrets.push(alice_key.clone());
    assert!(alice_key.starts_with("sk-") && alice_key.len() > 40);
    // No cap of its own: a user's keys draw on the user's balance.
    assert_eq!(created["quota"], Value::Null);
    let stored: (String, String) =
        sqlx::query_as("SELECT key_hash, prefix FROM api_keys WHERE id = $1::uuid")
            .bind(&alice_key_id)
            .fetch_one(&stack.pool)
            .await
            .unwrap();
    assert_eq!(stored.0, ingress::hash_key(&alice_key));
    assert!(alice_key.starts_with(stored.1.trim_end_matches('…')));
    let (_, listed, text) = call(&stack, Method::GET, "/api/keys", Some(&alice_jwt), None).await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 1);
    assert!(!text.contains(&alice_key) && !text.contains(&stored.0));
    // A user may not give their key money or another group.
    let (status, _, _) = call(
        &stack,
        Method::POST,
        "/api/keys",
        Some(&alice_jwt),
        Some(json!({"name": "rich", "quota": "100"})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // The new key has no credit yet: OpenAI's insufficient_quota.
    let (status, err) = chat_as(&stack, &alice_key, &hello(MODEL, 5)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(err["error"]["code"], "insufficient_quota");
    // An admin grants credit; once projected the key works.
    let (status, _, text) = call(
        &stack,
        Method::POST,
        "/api/admin/credits",
        Some(ADMIN_TOKEN),
        Some(json!({"key_id": alice_key_id, "amount": "1.00", "note": "welcome"})),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{text}");
    until_chat(&stack, &alice_key, &hello(MODEL, 5), StatusCode::OK).await;
    // A key authenticates /api as its owner.
    let (status, me, _) = call(&stack, Method::GET, "/api/me", Some(&alice_key), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(me["id"], json!(alice_id));

    // Bob sees nothing of Alice's.
    let (bob_jwt, _) = register(&stack, "bob", "bob-password-1").await;
    let (_, listed, _) = call(&stack, Method::GET, "/api/keys", Some(&bob_jwt), None).await;
    assert_eq!(listed["data"], json!([]));
    let path = format!("/api/keys/{alice_key_id}");
    for method in [Method::GET, Method::DELETE] {
        let (status, _, _) = call(&stack, method, &path, Some(&bob_jwt), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
    let (status, _, _) = call(
        &stack,
        Method::PATCH,
        &path,
        Some(&bob_jwt),
        Some(json!({"name": "mine now"})),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let usage_path = format!("/api/usage?key_id={alice_key_id}");
    let (status, _, _) = call(&stack, Method::GET, &usage_path, Some(&bob_jwt), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, usage, _) = call(&stack, Method::GET, "/api/usage", Some(&bob_jwt), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(usage["totals"]["requests"], 0);
    // A user's JWT is not an admin's.
    let (status, _, _) = call(&stack, Method::GET, "/api/admin/keys", Some(&bob_jwt), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Alice's usage shows her request once projected.
    stack.wait_projected("CompletionFinished", 1).await;
    let (_, usage, _) = call(&stack, Method::GET, "/api/usage", Some(&alice_jwt), None).await;
    assert_eq!(usage["totals"]["requests"], 1, "{usage}");
    assert_eq!(usage["by_key"][0]["key_id"], json!(alice_key_id));
    assert!(usage["totals"]["cost"].as_str().unwrap().starts_with("0.0"));

    // Revocation works at once on this ingress.
    let (status, revoked, _) = call(&stack, Method::DELETE, &path, Some(&alice_jwt), None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(revoked["revoked_at"].is_string());
    let (status, _) = chat_as(&stack, &alice_key, &hello(MODEL, 5)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let revoked_events: i64 = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM event_log WHERE type IN ('KeyRevoked', 'KeyCreated', 'UserRegistered', 'CreditGranted')",
            )
            .fetch_one(&stack.pool)
            .await
            .unwrap();
            if n >= 5 || Instant::now() > deadline {
                break n;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    // alice, bob registered; one key created (the config key too); credit; revoked.
    assert!(revoked_events >= 5, "{revoked_events} audit events");

    // Admins: by token, or an admin user's JWT.
    let (status, carol, text) = call(
        &stack,
        Method::POST,
        "/api/admin/users",
        Some(ADMIN_TOKEN),
        Some(json!({"name": "carol", "email": "carol@example.com", "password": "carol-password", "role": "admin"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    assert_eq!(carol["role"], "admin");
    let (_, login, _) = call(
        &stack,
        Method::POST,
        "/api/auth/login",
        None,
        Some(json!({"email": "carol@example.com", "password": "carol-password"})),
    )
    .await;
    let carol_jwt = login["token"].as_str().unwrap().to_owned();
    let admin_keys = format!("/api/admin/keys?user_id={alice_id}");
    let (status, keys, _) = call(&stack, Method::GET, &admin_keys, Some(&carol_jwt), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(keys["data"][0]["id"], json!(alice_key_id));

    // A password change invalidates older session tokens.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, changed, _) = call(
        &stack,
        Method::PUT,
        "/api/me/password",
        Some(&alice_jwt),
        Some(json!({"current_password": alice_pw, "new_password": "alice-password-2"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    seen_secrets.push("alice-password-2".into());
    let (status, _, _) = call(&stack, Method::GET, "/api/me", Some(&alice_jwt), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let fresh = changed["token"].as_str().unwrap();
    let (status, _, _) = call(&stack, Method::GET, "/api/me", Some(fresh), None).await;
    assert_eq!(status, StatusCode::OK);

    // No key, password or hash in any log line.
    let hashes: Vec<String> =
        sqlx::query_scalar("SELECT password_hash FROM users WHERE password_hash IS NOT NULL")
            .fetch_all(&stack.pool)
            .await
            .unwrap();
    seen_secrets.extend(hashes);
    seen_secrets.push(ingress::hash_key(&alice_key));
    for entry in std::fs::read_dir(&stack.dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        for secret in &seen_secrets {
            assert!(
                !text.contains(secret.as_str()),
                "a secret appears in {}",
                path.display()
            );
        }
    }
    stack.stop().await;
}

#[tokio::test]
async fn cli_creates_the_first_admin() {
    let stack = Stack::start(StackOptions::default()).await;
    let status = stack
        .command("admin")
        .args([
            "create-user",
            "--name",
            "root",
            "--email",
            "root@example.com",
        ])
        .env("SLUICE_ADMIN_PASSWORD", "root-password-1")
        .status()
        .unwrap();
    assert!(status.success());
    let (status, login, _) = call(
        &stack,
        Method::POST,
        "/api/auth/login",
        None,
        Some(json!({"email": "root@example.com", "password": "root-password-1"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(login["user"]["role"], "admin");
    let jwt = login["token"].as_str().unwrap();
    // An admin JWT passes the admin routes; it can create keys for nobody with a quota.
    let (status, key, text) = call(
        &stack,
        Method::POST,
        "/api/admin/keys",
        Some(jwt),
        Some(json!({"name": "svc", "quota": "2.50", "allowed_models": ["other-model"]})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    assert_eq!(key["quota"], "2.5");
    // The key may not use a model outside its allow-list.
    let (status, err) = chat_as(&stack, key["key"].as_str().unwrap(), &hello(MODEL, 5)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(err["error"]["code"], "model_not_found");
    // Widen it; the change applies at once.
    let path = format!("/api/admin/keys/{}", key["id"].as_str().unwrap());
    let (status, _, _) = call(
        &stack,
        Method::PATCH,
        &path,
        Some(jwt),
        Some(json!({"allowed_models": []})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = chat_as(&stack, key["key"].as_str().unwrap(), &hello(MODEL, 5)).await;
    assert_eq!(status, StatusCode::OK);
    stack.stop().await;
}

#[tokio::test]
async fn redemption_codes_and_debits_move_a_keys_credit() {
    let stack = Stack::start(StackOptions::default()).await;
    let (dave, _) = register(&stack, "dave", "dave-password-1").await;
    let (eve, _) = register(&stack, "eve", "eve-password-1").await;
    let (_, key, _) = call(
        &stack,
        Method::POST,
        "/api/keys",
        Some(&dave),
        Some(json!({"name": "k"})),
    )
    .await;
    let key_id = key["id"].as_str().unwrap().to_owned();
    let (status, minted, text) = call(
        &stack,
        Method::POST,
        "/api/admin/redemption-codes",
        Some(ADMIN_TOKEN),
        Some(json!({"amount": "0.50", "count": 2, "note": "promo"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    let code = minted["codes"][0]["code"].as_str().unwrap().to_owned();
    // Someone else's key is not found; a used code is not found either.
    let (status, _, _) = call(
        &stack,
        Method::POST,
        "/api/redeem",
        Some(&eve),
        Some(json!({"code": code, "key_id": key_id})),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, redeemed, text) = call(
        &stack,
        Method::POST,
        "/api/redeem",
        Some(&dave),
        Some(json!({"code": code, "key_id": key_id})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(redeemed["amount"], "0.5");
    let (status, _, _) = call(
        &stack,
        Method::POST,
        "/api/redeem",
        Some(&dave),
        Some(json!({"code": code, "key_id": key_id})),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // An admin debit, with a note.
    let (status, _, _) = call(
        &stack,
        Method::POST,
        "/api/admin/credits",
        Some(ADMIN_TOKEN),
        Some(json!({"key_id": key_id, "amount": "-0.2", "note": "correction"})),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, _, _) = call(
        &stack,
        Method::POST,
        "/api/admin/credits",
        Some(ADMIN_TOKEN),
        Some(json!({"key_id": key_id, "amount": "zero"})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    stack.wait_projected("CreditGranted", 2).await;
    let path = format!("/api/keys/{key_id}");
    let (_, key, _) = call(&stack, Method::GET, &path, Some(&dave), None).await;
    assert_eq!(key["credits"], "0.3");
    assert_eq!(key["spent"], "0");
    stack.stop().await;
}
