//! Remote worker nodes end to end: `sluice node` processes (each with a mock upstream as
//! its local provider) attach to a stack over the shared NATS, their models are listed and
//! served through them, and when one is killed (SIGKILL) it drops out within seconds: its
//! calls that had sent nothing fail over, its call that had started streaming ends with an
//! error event, and its traffic moves to another node or a normal channel.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    call, mock, model_ids, parse_sse, request_id, sluice_bin, Stack, StackOptions, ADMIN_TOKEN,
    KEY, MODEL, NATS_URL,
};
use futures::StreamExt;
use mock_upstream::{MockConfig, MockUpstream};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use uuid::Uuid;

/// A model only nodes serve, and what node A's provider calls it.
const NODE_MODEL: &str = "llama-3.1-8b";
const LOCAL_MODEL: &str = "llama3.1:8b";
/// A model only node A serves: listed while A heartbeats, gone once A is killed.
const A_ONLY_MODEL: &str = "phi-a-only";

/// Starts `sluice node` with a generated node.yaml: one provider per `(mock, local,
/// served)` entry.
fn spawn_node(stack: &Stack, name: &str, providers: &[(&MockUpstream, &str, &str)]) -> Child {
    let mut yaml = format!("name: {name}\nmax_parallel: 4\nproviders:\n");
    for (mock, local, served) in providers {
        yaml.push_str(&format!(
            "  - type: vllm\n    base_url: {}\n    models:\n      - {{local: \"{local}\", serve_as: \"{served}\"}}\n",
            mock.base_url()
        ));
    }
    let path = stack.dir.join(format!("node-{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    let log = std::fs::File::create(stack.dir.join(format!("node-{name}.log"))).unwrap();
    Command::new(sluice_bin())
        .arg("node")
        .arg("--config")
        .arg(&path)
        .env("SLUICE_NAMESPACE", stack.ns.as_str())
        .env("SLUICE_NATS_URL", NATS_URL)
        .env("SLUICE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn sluice node")
}

async fn admin_nodes(stack: &Stack) -> Vec<Value> {
    let (status, body, text) = call(
        stack,
        Method::GET,
        "/api/admin/nodes",
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    body["data"].as_array().unwrap().clone()
}

/// Polls `/api/admin/nodes` until `check` holds for the listed names; returns how long it
/// took. Fails after `within`.
async fn until_nodes(
    stack: &Stack,
    within: Duration,
    what: &str,
    check: impl Fn(&[String]) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let names: Vec<String> = admin_nodes(stack)
            .await
            .iter()
            .map(|n| n["name"].as_str().unwrap().to_owned())
            .collect();
        if check(&names) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "{what}: nodes listed are {names:?} after {within:?}; logs in {}",
            stack.dir.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn text_of_stream(events: &[(Option<u64>, String)]) -> String {
    events
        .iter()
        .filter(|(_, d)| d != "[DONE]")
        .filter_map(|(_, d)| serde_json::from_str::<Value>(d).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

/// The request's terminal events as `(type, data)`, once the journal has them all.
async fn terminal_events(stack: &Stack, id: Uuid) -> Vec<(String, Value)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rows: Vec<(String, Value)> = sqlx::query_as(
            "SELECT type, data FROM event_log WHERE data->>'request_id' = $1 \
             AND type IN ('CompletionFinished', 'RequestFailed', 'RequestCancelled') ORDER BY position",
        )
        .bind(id.to_string())
        .fetch_all(&stack.pool)
        .await
        .unwrap();
        if !rows.is_empty() {
            // Anything recorded twice would have arrived with the first.
            return rows;
        }
        assert!(
            Instant::now() < deadline,
            "no terminal event for request {id}; logs in {}",
            stack.dir.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The one terminal event of a request.
async fn terminal(stack: &Stack, id: Uuid) -> (String, Value) {
    let mut rows = terminal_events(stack, id).await;
    assert_eq!(rows.len(), 1, "one terminal event per request: {rows:?}");
    rows.remove(0)
}

/// Sends a chat and returns the status, request id and body text.
async fn chat(stack: &Stack, body: Value) -> (StatusCode, Uuid, String) {
    let resp = stack.chat(body).send().await.unwrap();
    let status = resp.status();
    let id = request_id(&resp);
    (status, id, resp.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_attach_serve_and_fail_over_when_killed() {
    let stack = Stack::start(StackOptions::default()).await;
    // Node A's providers: one for the node-only model, one serving the stack's model
    // (ahead of the stack's own channel: a node's priority 0 beats the channel's 1).
    let mock_a = mock(MockConfig::default()).await;
    let mock_a_main = mock(MockConfig::default()).await;
    let mut node_a = spawn_node(
        &stack,
        "node-a",
        &[
            (&mock_a, LOCAL_MODEL, NODE_MODEL),
            (&mock_a_main, "gpt-local", MODEL),
            (&mock_a, "phi-local", A_ONLY_MODEL),
        ],
    );
    let price = stack
        .http
        .post(format!("{}/api/admin/prices", stack.base))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"model": NODE_MODEL, "input_per_mtok": "1.00", "output_per_mtok": "2.00"}))
        .send()
        .await
        .unwrap();
    assert!(
        price.status().is_success(),
        "{}",
        price.text().await.unwrap()
    );

    // Attach: listed for admins only, with its models and load.
    until_nodes(&stack, Duration::from_secs(20), "node-a attaches", |n| {
        n == ["node-a"]
    })
    .await;
    let nodes = admin_nodes(&stack).await;
    let a = &nodes[0];
    let a_id = a["id"].as_str().unwrap().to_owned();
    assert_eq!(a["channel"], "node:node-a");
    assert_eq!(a["max_parallel"], 4);
    assert_eq!(a["health"]["status"], "healthy");
    // Load: nothing runs on an idle node.
    assert_eq!(a["in_flight"], 0, "{a}");
    assert_eq!(a["load"], 0.0, "{a}");
    assert_eq!(a["health"]["routed_in_flight"], 0, "{a}");
    let served: Vec<(&str, &str)> = a["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["name"].as_str().unwrap(), m["upstream"].as_str().unwrap()))
        .collect();
    assert_eq!(
        served,
        [
            (MODEL, "gpt-local"),
            (NODE_MODEL, LOCAL_MODEL),
            (A_ONLY_MODEL, "phi-local")
        ]
    );
    for (bearer, want) in [
        (None, StatusCode::UNAUTHORIZED),
        (Some(KEY), StatusCode::FORBIDDEN),
    ] {
        let (status, _, _) = call(&stack, Method::GET, "/api/admin/nodes", bearer, None).await;
        assert_eq!(status, want);
    }
    for (id, want) in [
        (a_id.clone(), StatusCode::OK),
        (Uuid::now_v7().to_string(), StatusCode::NOT_FOUND),
    ] {
        let path = format!("/api/admin/nodes/{id}");
        let (status, _, text) = call(&stack, Method::GET, &path, Some(ADMIN_TOKEN), None).await;
        assert_eq!(status, want, "{path}: {text}");
    }
    let listed = model_ids(&stack, KEY).await;
    assert!(listed.contains(&NODE_MODEL.to_owned()), "{listed:?}");
    assert!(listed.contains(&A_ONLY_MODEL.to_owned()), "{listed:?}");

    // Served through the node, plain and streamed. The worker learns of the node from the
    // same bucket as the ingress, within milliseconds; allow for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (status, plain_id, text) = loop {
        let (status, id, text) = chat(
            &stack,
            json!({"model": NODE_MODEL, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
        if status == StatusCode::OK || Instant::now() > deadline {
            break (status, id, text);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status, StatusCode::OK, "{text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["model"], NODE_MODEL);
    assert!(body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .starts_with("tok0 tok1 "));
    assert_eq!(body["usage"]["completion_tokens"], 20);

    let (status, stream_id, text) = chat(
        &stack,
        json!({"model": NODE_MODEL, "stream": true, "stream_options": {"include_usage": true},
               "messages": [{"role": "user", "content": "hi"}], "mock": {"chunks": 5}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let events = parse_sse(&text);
    assert_eq!(events.last().unwrap().1, "[DONE]");
    assert_eq!(text_of_stream(&events), "tok0 tok1 tok2 tok3 tok4 ");
    let ids: Vec<u64> = events.iter().filter_map(|(id, _)| *id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
    let usage_chunk: Value = serde_json::from_str(&events[events.len() - 2].1).unwrap();
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 5);
    assert_eq!(usage_chunk["model"], NODE_MODEL);
    assert_eq!(
        mock_a.stats().requests_total,
        2,
        "both reached node A's provider"
    );
    assert_eq!(stack.mock.stats().requests_total, 0);

    // Billed through the normal events: one CompletionFinished each, naming the node.
    for (id, completion_tokens) in [(plain_id, 20), (stream_id, 5)] {
        let (kind, data) = terminal(&stack, id).await;
        assert_eq!(kind, "CompletionFinished");
        assert_eq!(data["channel_name"], "node:node-a");
        assert_eq!(data["channel_id"], a_id.as_str());
        assert_eq!(data["upstream_model"], LOCAL_MODEL);
        assert_eq!(data["usage_source"], "provider");
        assert_eq!(data["usage"]["completion_tokens"], completion_tokens);
    }
    stack.wait_projected("CompletionFinished", 2).await;
    let charged: Vec<(i64, i64, i64)> = sqlx::query_as(
        "SELECT prompt_tokens, completion_tokens, amount_nanos FROM ledger_entries \
         WHERE request_id = ANY($1) ORDER BY completion_tokens",
    )
    .bind(vec![plain_id, stream_id])
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    assert_eq!(charged.len(), 2, "each request charged once");
    assert_eq!((charged[0].1, charged[1].1), (5, 20));
    for (prompt, completion, nanos) in &charged {
        // USD 1 and 2 per million tokens: 1,000 and 2,000 nano-USD per token.
        assert_eq!(*nanos, prompt * 1_000 + completion * 2_000, "{charged:?}");
    }

    // The stack's model goes to node A first (priority 0 before the channel's 1).
    let (status, id, text) = chat(
        &stack,
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(terminal(&stack, id).await.1["channel_name"], "node:node-a");
    assert_eq!(mock_a_main.stats().requests_total, 1);

    // Calls in flight on node A when it dies: a stream of the node-only model that has
    // started (slow chunks), and a plain and a stream call of the stack's model whose
    // provider has not answered yet.
    mock_a.set_config(MockConfig {
        chunks: 200,
        chunk_delay_ms: 100,
        ..MockConfig::default()
    });
    mock_a_main.set_config(MockConfig {
        hang: true,
        ..MockConfig::default()
    });
    let started = stack
        .chat(json!({"model": NODE_MODEL, "stream": true,
                     "messages": [{"role": "user", "content": "long"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), StatusCode::OK);
    let started_id = request_id(&started);
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    let started_body = tokio::spawn(async move {
        let mut body = started.bytes_stream();
        let mut text = String::new();
        let mut first = Some(first_tx);
        while let Some(Ok(bytes)) = body.next().await {
            text.push_str(&String::from_utf8_lossy(&bytes));
            if text.contains("tok1 ") {
                if let Some(tx) = first.take() {
                    let _ = tx.send(());
                }
            }
        }
        (text, Instant::now())
    });
    tokio::time::timeout(Duration::from_secs(10), first_rx)
        .await
        .expect("the long stream starts")
        .unwrap();
    let waiting: Vec<_> = [false, true]
        .into_iter()
        .map(|stream| {
            let req = stack.chat(json!({"model": MODEL, "stream": stream,
                                        "messages": [{"role": "user", "content": "wait"}]}));
            tokio::spawn(async move {
                let resp = req.send().await.unwrap();
                let status = resp.status();
                let id = request_id(&resp);
                (stream, status, id, resp.text().await.unwrap())
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while mock_a_main.stats().requests_total < 3 {
        assert!(
            Instant::now() < deadline,
            "both waiting calls reach node A's provider"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The admin list shows the load: three calls on node A (of its 4), as the node reports
    // it in its heartbeat and as the workers that routed them count them.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let nodes = admin_nodes(&stack).await;
        let a = nodes
            .iter()
            .find(|n| n["name"] == "node-a")
            .expect("node-a");
        if a["in_flight"] == 3 && a["load"] == 0.75 && a["health"]["routed_in_flight"] == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node A's three calls are not shown as its load: {a}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A second node serving the node-only model, then node A dies without a word.
    let mock_b = mock(MockConfig::default()).await;
    let mut node_b = spawn_node(&stack, "node-b", &[(&mock_b, "llama-b", NODE_MODEL)]);
    until_nodes(&stack, Duration::from_secs(20), "node-b attaches", |n| {
        n == ["node-a", "node-b"]
    })
    .await;
    node_a.kill().unwrap();
    let killed_at = Instant::now();
    node_a.wait().unwrap();

    // Gone from the list within a few seconds.
    let gone_after = until_nodes(&stack, Duration::from_secs(10), "node-a drops out", |n| {
        n == ["node-b"]
    })
    .await;
    assert!(
        gone_after < Duration::from_secs(8),
        "dropped after {gone_after:?}"
    );
    // Its heartbeats stopped: the model only it served leaves /v1/models (the ingress
    // follows the same bucket as the admin list); the one node B serves stays.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let listed = model_ids(&stack, KEY).await;
        assert!(listed.contains(&NODE_MODEL.to_owned()), "{listed:?}");
        if !listed.contains(&A_ONLY_MODEL.to_owned()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{A_ONLY_MODEL} still listed after node A died: {listed:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, _, text) = chat(
        &stack,
        json!({"model": A_ONLY_MODEL, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{text}");

    // The started stream ends with an error event (not [DONE]), without repeated chunks;
    // one RequestFailed bills what was generated.
    let (text, ended_at) = tokio::time::timeout(Duration::from_secs(20), started_body)
        .await
        .expect("the interrupted stream ends")
        .unwrap();
    assert!(
        ended_at.duration_since(killed_at) < Duration::from_secs(10),
        "ended {:?} after the kill",
        ended_at.duration_since(killed_at)
    );
    let events = parse_sse(&text);
    let last: Value = serde_json::from_str(&events.last().unwrap().1).expect("an error event");
    assert!(last["error"]["message"].is_string(), "{last}");
    assert!(!text.contains("[DONE]"));
    let ids: Vec<u64> = events.iter().filter_map(|(id, _)| *id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
    let streamed = text_of_stream(&events[..events.len() - 1]);
    let expected: String = (0..streamed.split_whitespace().count())
        .map(|i| format!("tok{i} "))
        .collect();
    assert_eq!(streamed, expected, "each chunk once, in order");
    let (kind, data) = terminal(&stack, started_id).await;
    assert_eq!(kind, "RequestFailed");
    assert_eq!(data["channel_id"], a_id.as_str());
    // The dead node never reported its usage: the prompt is billed, estimated.
    assert_eq!(data["usage_source"], "estimated");
    assert!(
        data["usage"]["prompt_tokens"].as_u64().unwrap() > 0,
        "{data}"
    );

    // The calls that had sent nothing fail over to the stack's own channel.
    for call in waiting {
        let (stream, status, id, text) = tokio::time::timeout(Duration::from_secs(30), call)
            .await
            .expect("the waiting call ends")
            .unwrap();
        assert_eq!(status, StatusCode::OK, "{text}");
        if stream {
            let events = parse_sse(&text);
            assert_eq!(events.last().unwrap().1, "[DONE]");
            assert!(text_of_stream(&events).starts_with("tok0 tok1 "));
        } else {
            let body: Value = serde_json::from_str(&text).unwrap();
            assert!(body["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .starts_with("tok0 "));
        }
        let (kind, data) = terminal(&stack, id).await;
        assert_eq!(kind, "CompletionFinished");
        assert_eq!(data["channel_name"], "mock-main");
        assert_eq!(data["attempts"], 2, "node A, then the channel");
        let failed: Vec<(Value,)> = sqlx::query_as(
            "SELECT data FROM event_log WHERE type = 'AttemptFailed' AND data->>'request_id' = $1",
        )
        .bind(id.to_string())
        .fetch_all(&stack.pool)
        .await
        .unwrap();
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].0["channel_id"], a_id.as_str());
        assert_eq!(failed[0].0["kind"], "connection");
    }

    // Traffic moved: the node-only model to node B, the stack's model to its channel.
    let before_b = mock_b.stats().requests_total;
    for _ in 0..3 {
        let (status, id, text) = chat(
            &stack,
            json!({"model": NODE_MODEL, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{text}");
        let (_, data) = terminal(&stack, id).await;
        assert_eq!(data["channel_name"], "node:node-b");
        assert_eq!(data["upstream_model"], "llama-b");
        let (status, id, text) = chat(
            &stack,
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{text}");
        assert_eq!(terminal(&stack, id).await.1["channel_name"], "mock-main");
    }
    assert_eq!(mock_b.stats().requests_total, before_b + 3);

    // A node that stops cleanly leaves at once, and a model nobody serves is unknown.
    Command::new("kill")
        .arg("-TERM")
        .arg(node_b.id().to_string())
        .status()
        .unwrap();
    let left_after = until_nodes(&stack, Duration::from_secs(10), "node-b leaves", |n| {
        n.is_empty()
    })
    .await;
    assert!(
        left_after < Duration::from_secs(3),
        "left after {left_after:?}"
    );
    assert!(node_b.wait().unwrap().success(), "clean exit");
    assert!(!model_ids(&stack, KEY)
        .await
        .contains(&NODE_MODEL.to_owned()));
    let (status, _, _) = chat(
        &stack,
        json!({"model": NODE_MODEL, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    stack.stop().await;
}

/// A node whose provider fails is banned by the workers' circuit breaker like any channel:
/// its requests fail over to the stack's channel, and after the failure threshold it gets
/// no more traffic until its ban runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_node_is_banned_like_a_channel() {
    let stack = Stack::start(StackOptions::default()).await;
    let broken = mock(MockConfig {
        fail_status: Some(500),
        ..MockConfig::default()
    })
    .await;
    let mut node = spawn_node(&stack, "node-broken", &[(&broken, "local-x", MODEL)]);
    until_nodes(&stack, Duration::from_secs(20), "the node attaches", |n| {
        n == ["node-broken"]
    })
    .await;
    let node_id = admin_nodes(&stack).await[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Wait until the worker routes to the node (the first attempt of a request names it).
    let deadline = Instant::now() + Duration::from_secs(10);
    while broken.stats().requests_total == 0 {
        assert!(Instant::now() < deadline, "the worker never tried the node");
        let (status, _, text) = chat(
            &stack,
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{text}");
    }
    for _ in 0..8 {
        let (status, id, text) = chat(
            &stack,
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{text}");
        assert_eq!(terminal(&stack, id).await.1["channel_name"], "mock-main");
    }
    // Three failures in a row ban it (the default threshold); then it is skipped.
    assert_eq!(broken.stats().requests_total, 3);
    let nodes = admin_nodes(&stack).await;
    assert_eq!(nodes[0]["id"], node_id.as_str());
    assert_eq!(nodes[0]["health"]["status"], "banned", "{}", nodes[0]);
    assert_eq!(nodes[0]["health"]["ban_kind"], "upstream5xx");
    let bans: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM event_log WHERE type = 'ChannelBanned' AND data->>'channel_id' = $1",
    )
    .bind(&node_id)
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    assert_eq!(bans, 1);
    let _ = node.kill();
    let _ = node.wait();
    stack.stop().await;
}
