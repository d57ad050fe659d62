//! The sessions API end to end on the real services: server-kept history sent upstream on
//! the next turn, the context cut to the model's budget, regeneration, usage that matches
//! the events, SSE event names and order, ownership (someone else's session is a 404), and
//! the bounded wait for the conversation projector.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{
    admin_key, call, grant_credit, mock_text, register, sse_fields, until_chat, Stack,
    StackOptions, KEY, MODEL,
};
use mock_upstream::MockConfig;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// A registered user's session token, and an API key of theirs with credit on it.
async fn user(stack: &Stack, name: &str) -> (String, String) {
    let (jwt, user_id) = register(stack, name, "password-123").await;
    let key = admin_key(
        stack,
        json!({"name": format!("{name}-key"), "user_id": user_id}),
    )
    .await;
    grant_credit(
        stack,
        json!({"key_id": key["id"], "amount": "10.00", "note": "test"}),
    )
    .await;
    let key = key["key"].as_str().unwrap().to_owned();
    // Usable once the ledger has the credit and the gateway's directory has seen it.
    let ping =
        json!({"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "ping"}]});
    until_chat(stack, &key, &ping, StatusCode::OK).await;
    (jwt, key)
}

/// One SSE event: `id:`, `event:` and the parsed `data:`.
#[derive(Debug)]
struct Sse {
    id: Option<u64>,
    event: String,
    data: Value,
}

/// The events of an SSE body, and how many `: ping` comments it had.
fn parse(text: &str) -> (Vec<Sse>, usize) {
    let mut events = Vec::new();
    let mut pings = 0;
    for block in text.split("\n\n").filter(|b| !b.trim().is_empty()) {
        if block.trim() == ": ping" {
            pings += 1;
            continue;
        }
        let f = sse_fields(block);
        events.push(Sse {
            id: f.id.map(|v| v.parse().unwrap()),
            event: f.event.unwrap_or_default().to_owned(),
            data: f
                .data
                .map_or(Value::Null, |v| serde_json::from_str(v).unwrap()),
        });
    }
    (events, pings)
}

/// A finished turn: its events, the answer's text and its message id.
struct Turn {
    events: Vec<Sse>,
    pings: usize,
    text: String,
    message_id: String,
}

async fn turn(stack: &Stack, session: &str, action: &str, bearer: &str, body: Value) -> Turn {
    let resp = stack
        .http
        .post(format!("{}/api/sessions/{session}/{action}", stack.base))
        .bearer_auth(bearer)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    assert_eq!(status, StatusCode::OK, "{}", resp.text().await.unwrap());
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let (events, pings) = parse(&resp.text().await.unwrap());
    let text = events
        .iter()
        .filter(|e| e.event == "content")
        .map(|e| e.data["delta"].as_str().unwrap())
        .collect();
    let message_id = events[0].data["message_id"].as_str().unwrap().to_owned();
    Turn {
        events,
        pings,
        text,
        message_id,
    }
}

/// The upstream request's messages as `(role, content)`.
fn sent(stack: &Stack) -> Vec<(String, String)> {
    let body = stack.mock.last_body(MODEL).expect("the mock saw a request");
    body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap().to_owned(),
                m["content"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(r, c)| ((*r).to_owned(), (*c).to_owned()))
        .collect()
}

async fn stored_messages(stack: &Stack, session: &str, bearer: &str) -> Vec<Value> {
    let (status, body, _) = call(
        stack,
        Method::GET,
        &format!("/api/sessions/{session}/messages"),
        Some(bearer),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["data"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_regeneration_usage_and_sse_order() {
    let stack = Stack::start(StackOptions {
        mock: MockConfig {
            chunks: 4,
            chunk_delay_ms: 120,
            ..MockConfig::default()
        },
        env: vec![("SLUICE_SESSION_PING_MS", "50".to_owned())],
        ..StackOptions::default()
    })
    .await;
    stack.mock.record_bodies(true);
    let (jwt, key) = user(&stack, "alice").await;

    // Created with the key, owned by its user; readable at once.
    let (status, created, _) = call(
        &stack,
        Method::POST,
        "/api/sessions",
        Some(&key),
        Some(json!({"title": "Trip", "model": MODEL, "system": "be brief"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    let (status, got, _) = call(
        &stack,
        Method::GET,
        &format!("/api/sessions/{id}"),
        Some(&jwt),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (&got["title"], &got["model"], &got["system"]),
        (&json!("Trip"), &json!(MODEL), &json!("be brief"))
    );

    // Turn 1 with the session token: the user's only key pays.
    let t1 = turn(
        &stack,
        &id,
        "chat",
        &jwt,
        json!({"content": "first question"}),
    )
    .await;
    assert_eq!(t1.text, mock_text(4));
    assert_eq!(
        sent(&stack),
        pairs(&[("system", "be brief"), ("user", "first question")])
    );
    // Event names and order; ids are frame sequences, after `start` at 0.
    let names: Vec<&str> = t1.events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(names.first(), Some(&"start"));
    assert_eq!(&names[names.len() - 3..], ["usage", "end", "complete"]);
    assert!(
        names[1..names.len() - 3].iter().all(|n| *n == "content"),
        "{names:?}"
    );
    assert_eq!(names.len(), 4 + 4);
    let ids: Vec<u64> = t1.events.iter().map(|e| e.id.unwrap()).collect();
    assert_eq!(ids[0], 0);
    assert!(
        ids[..ids.len() - 2].windows(2).all(|w| w[0] < w[1]),
        "{ids:?}"
    );
    assert_eq!(ids[ids.len() - 1], ids[ids.len() - 3]);
    assert!(t1.pings > 0, "an idle stream gets `: ping` comments");
    let start = &t1.events[0].data;
    assert_eq!(start["session_id"], json!(id));
    assert_eq!(start["context"]["dropped_messages"], 0);
    let usage1 = &t1.events[t1.events.len() - 3].data;
    let end = &t1.events[t1.events.len() - 2].data;
    let complete = &t1.events[t1.events.len() - 1].data;
    assert_eq!(end["finish_reason"], "stop");
    assert_eq!(end["message_id"], json!(t1.message_id));
    assert_eq!(complete["stored"], true, "{complete}");
    assert_eq!(usage1["completion_tokens"], 4);
    let limit = usage1["context_limit"].as_u64().unwrap();
    assert_eq!(
        usage1["context_remaining"].as_u64().unwrap(),
        limit - usage1["total_tokens"].as_u64().unwrap()
    );

    // Turn 2, sent the moment turn 1 ended, with the key: turn 1's answer is in the history.
    let t2 = turn(
        &stack,
        &id,
        "chat",
        &key,
        json!({"content": "second question"}),
    )
    .await;
    assert_eq!(
        sent(&stack),
        pairs(&[
            ("system", "be brief"),
            ("user", "first question"),
            ("assistant", &mock_text(4)),
            ("user", "second question"),
        ])
    );
    let stored = stored_messages(&stack, &id, &jwt).await;
    let roles: Vec<&str> = stored.iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["user", "assistant", "user", "assistant"]);
    assert_eq!(stored[1]["id"], json!(t1.message_id));
    assert_eq!(stored[3]["content"], json!(mock_text(4)));

    // Regenerate with another answer length: the last answer is replaced, the rest stays.
    stack.mock.set_config(MockConfig {
        chunks: 2,
        ..MockConfig::default()
    });
    let t3 = turn(&stack, &id, "regenerate", &key, json!({})).await;
    assert_eq!(t3.text, mock_text(2));
    assert_eq!(t3.events[0].data["replaces"], json!(t2.message_id));
    assert_eq!(
        sent(&stack),
        pairs(&[
            ("system", "be brief"),
            ("user", "first question"),
            ("assistant", &mock_text(4)),
            ("user", "second question"),
        ]),
        "the replaced answer is not sent"
    );
    let stored = stored_messages(&stack, &id, &key).await;
    assert_eq!(stored.len(), 4);
    assert_eq!(stored[3]["id"], json!(t3.message_id));
    assert_eq!(stored[3]["content"], json!(mock_text(2)));
    assert!(stored.iter().all(|m| m["id"] != json!(t2.message_id)));

    // Usage: totals over the three rounds equal the session's CompletionFinished events.
    let (status, usage, _) = call(
        &stack,
        Method::GET,
        &format!("/api/sessions/{id}/usage"),
        Some(&jwt),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{usage}");
    let sums: (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(*)::bigint, sum((data->'usage'->>'prompt_tokens')::bigint)::bigint, \
                sum((data->'usage'->>'completion_tokens')::bigint)::bigint, \
                sum((data->'usage'->>'total_tokens')::bigint)::bigint \
         FROM event_log WHERE type = 'CompletionFinished' AND data->>'session_id' = $1",
    )
    .bind(&id)
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    assert_eq!(sums.0, 3);
    let totals = &usage["totals"];
    assert_eq!(totals["rounds"], 3);
    assert_eq!(totals["prompt_tokens"], sums.1);
    assert_eq!(totals["completion_tokens"], sums.2);
    assert_eq!(totals["completion_tokens"], 4 + 4 + 2);
    assert_eq!(totals["total_tokens"], sums.3);
    let last = &usage["last_round"];
    assert_eq!(last["request_id"], json!(t3.message_id));
    assert_eq!(last["kind"], "regenerate");
    assert_eq!(last["status"], "completed");
    let finished: Value = sqlx::query_scalar(
        "SELECT data FROM event_log WHERE type = 'CompletionFinished' AND data->>'request_id' = $1",
    )
    .bind(&t3.message_id)
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    assert_eq!(last["prompt_tokens"], finished["usage"]["prompt_tokens"]);
    assert_eq!(
        last["completion_tokens"],
        finished["usage"]["completion_tokens"]
    );
    assert_eq!(
        finished["content"],
        json!(mock_text(2)),
        "the event carries the answer"
    );
    let usage3 = &t3.events[t3.events.len() - 3].data;
    assert_eq!(usage3["prompt_tokens"], finished["usage"]["prompt_tokens"]);
    let context = &usage["context"];
    assert_eq!(context["context_limit"].as_u64(), Some(limit));
    assert_eq!(context["messages"], 4);
    assert_eq!(context["messages_in_context"], 4);
    let used = context["used_tokens"].as_u64().unwrap();
    assert!(used > 0);
    assert_eq!(context["remaining_tokens"].as_u64(), Some(limit - used));

    // Plain API calls never store their text.
    let plain: Vec<(bool, bool)> = sqlx::query_as(
        "SELECT data ? 'content', data ? 'session_id' FROM event_log \
         WHERE type = 'CompletionFinished' AND data->>'session_id' IS DISTINCT FROM $1",
    )
    .bind(&id)
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    assert!(!plain.is_empty(), "the credit check made plain calls");
    assert!(plain.iter().all(|p| *p == (false, false)), "{plain:?}");

    // Rename and delete; a deleted session disappears from every read.
    let (status, renamed, _) = call(
        &stack,
        Method::PATCH,
        &format!("/api/sessions/{id}"),
        Some(&jwt),
        Some(json!({"title": "Trip to Rome"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(renamed["title"], "Trip to Rome");
    let (_, list, _) = call(&stack, Method::GET, "/api/sessions", Some(&key), None).await;
    assert_eq!(list["data"][0]["title"], "Trip to Rome");
    let (status, _, _) = call(
        &stack,
        Method::DELETE,
        &format!("/api/sessions/{id}"),
        Some(&jwt),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, list, _) = call(&stack, Method::GET, "/api/sessions", Some(&jwt), None).await;
    assert_eq!(list["data"], json!([]));
    for path in ["", "/messages", "/usage"] {
        let (status, _, _) = call(
            &stack,
            Method::GET,
            &format!("/api/sessions/{id}{path}"),
            Some(&jwt),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM messages WHERE session_id = $1::uuid")
        .bind(&id)
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "a deleted session's messages leave the read model");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_context_cut_drops_the_oldest_turns() {
    // Every user turn costs the same, as does every answer (2 chunks); the limit leaves
    // room for the reply reserve (max_tokens) and exactly two turns plus the newest.
    let enc = billing::Encoding::for_model(MODEL);
    let q = |n: usize| format!("question {n}: how far is it from here to the sea by train");
    let asked = ingress::context::message_tokens(enc, "user", &q(1));
    let reply = ingress::context::message_tokens(enc, "assistant", &mock_text(2));
    let max_tokens = 5;
    let limit = max_tokens + 3 + asked + reply + asked + 1;
    assert!(reply > 1, "the slack is smaller than an answer");
    let stack = Stack::start(StackOptions {
        mock: MockConfig {
            chunks: 2,
            ..MockConfig::default()
        },
        env: vec![("SLUICE_CONTEXT_LIMITS", format!("{MODEL}={limit}"))],
        ..StackOptions::default()
    })
    .await;
    stack.mock.record_bodies(true);
    let (_, key) = user(&stack, "carol").await;
    let (status, created, _) = call(
        &stack,
        Method::POST,
        "/api/sessions",
        Some(&key),
        Some(json!({"model": MODEL})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    let body = |n: usize| json!({"content": q(n), "max_tokens": max_tokens});

    let t1 = turn(&stack, &id, "chat", &key, body(1)).await;
    assert_eq!(t1.text, mock_text(2));
    let t2 = turn(&stack, &id, "chat", &key, body(2)).await;
    assert_eq!(t2.events[0].data["context"]["dropped_messages"], 0);
    assert_eq!(sent(&stack).len(), 3, "everything still fits");
    let t3 = turn(&stack, &id, "chat", &key, body(3)).await;
    let start = &t3.events[0].data["context"];
    assert_eq!(start["dropped_messages"], 2, "{start}");
    assert_eq!(start["context_limit"].as_u64(), Some(limit));
    assert!(start["prompt_tokens"].as_u64().unwrap() <= limit - max_tokens);
    assert_eq!(
        sent(&stack),
        pairs(&[
            ("user", &q(2)),
            ("assistant", &mock_text(2)),
            ("user", &q(3)),
        ]),
        "the oldest turn and its answer were dropped"
    );
    // The stored history keeps everything; only what is sent is cut.
    assert_eq!(stored_messages(&stack, &id, &key).await.len(), 6);

    // A message that cannot fit even alone is refused before anything is stored.
    let long = "far ".repeat(limit as usize);
    let (status, err, _) = call(
        &stack,
        Method::POST,
        &format!("/api/sessions/{id}/chat"),
        Some(&key),
        Some(json!({"content": long})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    assert_eq!(err["error"]["code"], "context_length_exceeded");
    assert_eq!(stored_messages(&stack, &id, &key).await.len(), 6);

    // A replay of the log into a scratch schema rebuilds the same read models.
    let scratch = format!("{}_cv", stack.ns.as_str());
    let out = stack
        .command("replay")
        .args(["conversations", "--into", &scratch])
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (table, order) in [
        ("sessions", "session_id"),
        ("messages", "message_id"),
        ("session_rounds", "request_id"),
    ] {
        let rows = |schema: String| {
            let pool = stack.pool.clone();
            async move {
                sqlx::query_scalar::<_, Value>(&format!(
                    "SELECT to_jsonb(t) FROM \"{schema}\".{table} t ORDER BY {order}"
                ))
                .fetch_all(&pool)
                .await
                .unwrap()
            }
        };
        let live = rows(stack.ns.as_str().to_owned()).await;
        assert!(!live.is_empty(), "{table}");
        assert_eq!(
            live,
            rows(scratch.clone()).await,
            "{table} differs after replay"
        );
    }
    sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{scratch}\" CASCADE"))
        .execute(&stack.pool)
        .await
        .unwrap();
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_private_validated_and_wait_for_the_projector() {
    let mut stack = Stack::start(StackOptions {
        mock: MockConfig {
            chunks: 3,
            ..MockConfig::default()
        },
        env: vec![("SLUICE_SESSION_SYNC_MS", "1000".to_owned())],
        ..StackOptions::default()
    })
    .await;
    let (alice_jwt, alice_key) = user(&stack, "alice").await;
    let (bob_jwt, bob_key) = user(&stack, "bob").await;

    let (status, _, _) = call(&stack, Method::GET, "/api/sessions", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (_, created, _) = call(
        &stack,
        Method::POST,
        "/api/sessions",
        Some(&alice_jwt),
        Some(json!({})),
    )
    .await;
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["title"], "New chat");

    // Someone else's session, an unknown one and a malformed id: all 404, for every route.
    let unknown = uuid::Uuid::now_v7().to_string();
    for (who, sid) in [
        (bob_jwt.as_str(), id.as_str()),
        (bob_key.as_str(), id.as_str()),
        (KEY, id.as_str()),
        (alice_jwt.as_str(), unknown.as_str()),
        (alice_jwt.as_str(), "not-a-uuid"),
    ] {
        for (method, path, body) in [
            (Method::GET, "", None),
            (Method::PATCH, "", Some(json!({"title": "mine"}))),
            (Method::DELETE, "", None),
            (Method::GET, "/messages", None),
            (Method::GET, "/usage", None),
            (
                Method::POST,
                "/chat",
                Some(json!({"content": "hi", "model": MODEL})),
            ),
            (Method::POST, "/regenerate", Some(json!({}))),
        ] {
            let (status, err, _) = call(
                &stack,
                method.clone(),
                &format!("/api/sessions/{sid}{path}"),
                Some(who),
                body,
            )
            .await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{method} {sid}{path}: {err}");
        }
    }
    let (_, list, _) = call(&stack, Method::GET, "/api/sessions", Some(&bob_jwt), None).await;
    assert_eq!(list["data"], json!([]));
    // The session is untouched by all that.
    let (status, got, _) = call(
        &stack,
        Method::GET,
        &format!("/api/sessions/{id}"),
        Some(&alice_key),
        None,
    )
    .await;
    assert_eq!(
        (status, &got["title"]),
        (StatusCode::OK, &json!("New chat"))
    );

    // A key of no user owns its own sessions.
    let (status, own, _) = call(
        &stack,
        Method::POST,
        "/api/sessions",
        Some(KEY),
        Some(json!({"title": "svc"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, list, _) = call(&stack, Method::GET, "/api/sessions", Some(KEY), None).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    assert_eq!(list["data"][0]["id"], own["id"]);
    let (_, list, _) = call(&stack, Method::GET, "/api/sessions", Some(&alice_jwt), None).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);

    // Bad input: typed errors naming the field, nothing stored.
    let chat = format!("/api/sessions/{id}/chat");
    let bad = StatusCode::BAD_REQUEST;
    for (path, body, want, param) in [
        ("/api/sessions", json!({"title": " "}), bad, "title"),
        ("/api/sessions", json!({"titel": "x"}), bad, ""),
        (
            "/api/sessions",
            json!({"model": "no-such-model"}),
            StatusCode::NOT_FOUND,
            "model",
        ),
        (
            chat.as_str(),
            json!({"content": "  ", "model": MODEL}),
            bad,
            "content",
        ),
        (chat.as_str(), json!({"content": "hi"}), bad, "model"),
        (
            chat.as_str(),
            json!({"content": "hi", "model": MODEL, "max_tokens": "x"}),
            bad,
            "",
        ),
        (
            chat.as_str(),
            json!({"content": "hi", "model": "no-such-model"}),
            StatusCode::NOT_FOUND,
            "model",
        ),
    ] {
        let (status, err, _) = call(
            &stack,
            Method::POST,
            path,
            Some(&alice_jwt),
            Some(body.clone()),
        )
        .await;
        assert_eq!(status, want, "{body}: {err}");
        assert!(err["error"]["message"].is_string(), "{err}");
        if !param.is_empty() {
            assert_eq!(err["error"]["param"], param, "{err}");
        }
    }
    let (status, err, _) = call(
        &stack,
        Method::POST,
        &format!("/api/sessions/{id}/regenerate"),
        Some(&alice_jwt),
        None,
    )
    .await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "nothing to regenerate yet: {err}"
    );
    assert!(stored_messages(&stack, &id, &alice_jwt).await.is_empty());

    // With the projector down, a create still succeeds (answered from its event) and a
    // chat is refused with 503 before anything is stored; both recover once it is back.
    stack.kill("projector");
    let began = Instant::now();
    let (status, late, _) = call(
        &stack,
        Method::POST,
        "/api/sessions",
        Some(&alice_jwt),
        Some(json!({"title": "late"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{late}");
    assert!(
        began.elapsed() >= Duration::from_millis(900),
        "waited for the projector"
    );
    let (status, err, _) = call(
        &stack,
        Method::POST,
        &chat,
        Some(&alice_jwt),
        Some(json!({"content": "hi", "model": MODEL})),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{err}");
    assert_eq!(err["error"]["code"], "history_not_ready");
    stack.spawn("projector");
    let late_id = late["id"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _, _) = call(
            &stack,
            Method::GET,
            &format!("/api/sessions/{late_id}"),
            Some(&alice_jwt),
            None,
        )
        .await;
        if status == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "the projector never caught up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t = turn(
        &stack,
        &id,
        "chat",
        &alice_jwt,
        json!({"content": "hi", "model": MODEL}),
    )
    .await;
    assert_eq!(t.text, mock_text(3));
    let stored = stored_messages(&stack, &id, &alice_jwt).await;
    assert_eq!(
        stored.len(),
        2,
        "only the turn that went through: {stored:?}"
    );
    stack.stop().await;
}

/// A session turn cut after 5 content events resumes through `GET /v1/streams/{id}` in
/// session framing (`content` … `usage`, `end`, `complete`): the rest of the answer once,
/// in order, from the one upstream call, and the answer is stored whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_session_turn_resumes_in_session_framing() {
    const N: usize = 30;
    let stack = Stack::start(StackOptions {
        mock: MockConfig {
            chunks: N as u32,
            chunk_delay_ms: 60,
            ..MockConfig::default()
        },
        ..StackOptions::default()
    })
    .await;
    let (_, key) = user(&stack, "carol").await;
    let calls_before = stack.mock.stats().requests_total;
    let (status, created, _) = call(
        &stack,
        Method::POST,
        "/api/sessions",
        Some(&key),
        Some(json!({"title": "Long", "model": MODEL})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let session = created["id"].as_str().unwrap().to_owned();

    let mut resp = stack
        .http
        .post(format!("{}/api/sessions/{session}/chat", stack.base))
        .bearer_auth(&key)
        .json(&json!({"content": "tell me a long story"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let request_id = resp.headers()["x-sluice-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    // Read up to the fifth complete `content` event, then hang up.
    let mut raw = String::new();
    let seen = loop {
        let chunk = resp
            .chunk()
            .await
            .unwrap()
            .expect("the stream is still open");
        raw.push_str(std::str::from_utf8(&chunk).unwrap());
        let complete = &raw[..raw.rfind("\n\n").map_or(0, |i| i + 2)];
        let (events, _) = parse(complete);
        if events.iter().filter(|e| e.event == "content").count() >= 5 {
            break events;
        }
    };
    drop(resp);
    let last = seen.iter().filter_map(|e| e.id).max().unwrap();

    let resp = stack
        .http
        .get(format!("{}/v1/streams/{request_id}", stack.base))
        .bearer_auth(&key)
        .header("Last-Event-ID", last.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let (resumed, _) = parse(&resp.text().await.unwrap());
    let names: Vec<&str> = resumed.iter().map(|e| e.event.as_str()).collect();
    assert!(!names.contains(&"start"), "{names:?}");
    assert_eq!(names[names.len() - 3..], ["usage", "end", "complete"]);
    assert!(names[..names.len() - 3].iter().all(|n| *n == "content"));

    let contents = seen
        .iter()
        .chain(&resumed)
        .filter(|e| e.event == "content")
        .collect::<Vec<_>>();
    let ids: Vec<u64> = contents.iter().filter_map(|e| e.id).collect();
    assert!(
        ids.windows(2).all(|w| w[1] > w[0]),
        "in order, no repeats: {ids:?}"
    );
    let text: String = contents
        .iter()
        .map(|e| e.data["delta"].as_str().unwrap())
        .collect();
    assert_eq!(text, mock_text(N));
    assert_eq!(stack.mock.stats().requests_total - calls_before, 1);

    let complete = &resumed.last().unwrap().data;
    assert_eq!(complete["request_id"], json!(request_id));
    assert_eq!(complete["stored"], json!(true));
    let stored = stored_messages(&stack, &session, &key).await;
    assert_eq!(stored.last().unwrap()["content"], json!(mock_text(N)));
    stack.stop().await;
}
