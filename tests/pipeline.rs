//! The pipeline end to end on the real services, each role a separate process:
//! ingress → JetStream → worker → mock upstream → SSE, and the event log, journal and
//! billing projector behind it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{
    channel_yaml, mock, mock_text, parse_sse, read_http_response, request_id, Stack, StackOptions,
    KEY, MODEL,
};
use futures::future::join_all;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::str::FromStr;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_and_plain_requests_cross_the_pipeline() {
    let stack = Stack::start(StackOptions::default()).await;

    // Non-streaming: one JSON body in OpenAI's shape, with the provider's usage.
    let resp = stack
        .chat(json!({"model": MODEL, "messages": [{"role": "user", "content": "hello there"}], "seed": 7}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    request_id(&resp);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], MODEL);
    assert_eq!(body["choices"][0]["message"]["content"], mock_text(20));
    assert_eq!(body["usage"]["completion_tokens"], 20);

    // Streaming without include_usage: chunks in order, ids increasing, no usage chunk.
    let resp = stack
        .chat(json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let text = resp.text().await.unwrap();
    let events = parse_sse(&text);
    assert_eq!(events.last().map(|e| e.1.as_str()), Some("[DONE]"));
    let ids: Vec<u64> = events.iter().filter_map(|e| e.0).collect();
    assert!(
        ids.windows(2).all(|w| w[1] == w[0] + 1),
        "SSE ids increase by one: {ids:?}"
    );
    let mut content = String::new();
    for (_, data) in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(data).unwrap();
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["model"], MODEL);
        assert!(
            chunk.get("usage").is_none_or(Value::is_null),
            "no usage unless asked: {chunk}"
        );
        if let Some(c) = chunk["choices"][0]["delta"]["content"].as_str() {
            content.push_str(c);
        }
    }
    assert_eq!(content, mock_text(20));

    // Streaming with include_usage: the final chunk carries usage and no choices.
    let resp = stack
        .chat(
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": true,
                     "stream_options": {"include_usage": true}, "mock": {"chunks": 5}}),
        )
        .send()
        .await
        .unwrap();
    let events = parse_sse(&resp.text().await.unwrap());
    let usage_chunk: Value = serde_json::from_str(&events[events.len() - 2].1).unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 5);

    stack.wait_projected("CompletionFinished", 3).await;
    let sources: Vec<String> = sqlx::query_scalar(
        "SELECT data->>'usage_source' FROM event_log WHERE type = 'CompletionFinished'",
    )
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    assert_eq!(sources, vec!["provider"; 3]);
    stack.stop().await;
}

/// N concurrent requests: exactly one CompletionFinished each in the log, and the ledger
/// equals usage × price computed here, independently of the billing code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_matches_usage_times_price() {
    let stack = Stack::start(StackOptions::default()).await;
    const N: usize = 40;
    let calls = (0..N).map(|i| {
        let stream = i % 2 == 0;
        let body = json!({"model": MODEL, "stream": stream,
            "messages": [{"role": "user", "content": "word ".repeat(i + 1)}],
            "mock": {"chunks": 3 + i % 7}});
        let req = stack.chat(body);
        async move {
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), 200);
            let id = request_id(&resp);
            let _ = resp.bytes().await.unwrap();
            id
        }
    });
    let ids: HashSet<uuid::Uuid> = join_all(calls).await.into_iter().collect();
    assert_eq!(ids.len(), N);
    stack.wait_projected("CompletionFinished", N as i64).await;

    let rows: Vec<(String, Value)> =
        sqlx::query_as("SELECT stream, data FROM event_log WHERE type = 'CompletionFinished'")
            .fetch_all(&stack.pool)
            .await
            .unwrap();
    assert_eq!(rows.len(), N, "exactly one CompletionFinished per request");
    let logged: HashSet<uuid::Uuid> = rows
        .iter()
        .map(|(stream, _)| uuid::Uuid::parse_str(stream.strip_prefix("request-").unwrap()).unwrap())
        .collect();
    assert_eq!(logged, ids);

    // usage × price in USD with decimals, rounded once per request to a nano-dollar.
    let input = Decimal::from_str(common::INPUT_PER_MTOK).unwrap() / Decimal::from(1_000_000);
    let output = Decimal::from_str(common::OUTPUT_PER_MTOK).unwrap() / Decimal::from(1_000_000);
    let mut expected = Decimal::ZERO;
    for (_, data) in &rows {
        let p = Decimal::from(data["usage"]["prompt_tokens"].as_u64().unwrap());
        let c = Decimal::from(data["usage"]["completion_tokens"].as_u64().unwrap());
        expected += ((p * input + c * output) * Decimal::from(1_000_000_000)).round();
    }
    let ledger: Decimal = sqlx::query_scalar::<_, i64>(
        "SELECT COALESCE(sum(amount_nanos), 0)::bigint FROM ledger_entries WHERE kind = 'usage'",
    )
    .fetch_one(&stack.pool)
    .await
    .map(Decimal::from)
    .unwrap();
    assert!(expected > Decimal::ZERO);
    assert_eq!(ledger, expected);
    let entries: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger_entries")
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    assert_eq!(entries, N as i64);
    let spent: i64 = sqlx::query_scalar("SELECT spent_nanos FROM key_balances")
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    assert_eq!(Decimal::from(spent), expected);
    stack.stop().await;
}

/// Killing the journal and the billing projector mid-load and restarting them loses
/// and duplicates nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_and_billing_survive_kill_and_restart() {
    let mut stack = Stack::start(StackOptions::default()).await;
    let send = |stack: &Stack, n: usize| {
        let calls: Vec<_> = (0..n)
            .map(|_| {
                let req = stack
                    .chat(json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}]}));
                async move {
                    let resp = req.send().await.unwrap();
                    assert_eq!(
                        resp.status(),
                        200,
                        "requests keep flowing without journal and billing"
                    );
                    request_id(&resp)
                }
            })
            .collect();
        join_all(calls)
    };
    let mut ids: Vec<uuid::Uuid> = send(&stack, 10).await;
    stack.kill("journal");
    stack.kill("billing");
    ids.extend(send(&stack, 15).await);
    stack.spawn("billing");
    ids.extend(send(&stack, 5).await);
    stack.spawn("journal");
    ids.extend(send(&stack, 10).await);
    stack.kill("billing");
    stack.spawn("billing");
    stack
        .wait_projected("CompletionFinished", ids.len() as i64)
        .await;

    let per_request: Vec<i64> = sqlx::query_scalar(
        "SELECT count(*) FROM event_log WHERE type = 'CompletionFinished' GROUP BY stream",
    )
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    assert_eq!(per_request.len(), ids.len());
    assert!(per_request.iter().all(|&n| n == 1));
    let accepted: i64 =
        sqlx::query_scalar("SELECT count(*) FROM event_log WHERE type = 'RequestAccepted'")
            .fetch_one(&stack.pool)
            .await
            .unwrap();
    assert_eq!(accepted, ids.len() as i64);
    // Positions are the JetStream sequence: no gaps means nothing was skipped.
    let (min, max, count): (i64, i64, i64) =
        sqlx::query_as("SELECT min(position), max(position), count(*) FROM event_log")
            .fetch_one(&stack.pool)
            .await
            .unwrap();
    assert_eq!(max - min + 1, count, "the log has no gaps");
    let ledger_rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ledger_entries WHERE kind = 'usage'")
            .fetch_one(&stack.pool)
            .await
            .unwrap();
    assert_eq!(
        ledger_rows,
        ids.len() as i64,
        "each request billed exactly once"
    );
    stack.stop().await;
}

/// Two deployments on the same servers in different namespaces never see each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_are_isolated() {
    let (a, b) = tokio::join!(
        Stack::start(StackOptions::default()),
        Stack::start(StackOptions::default())
    );
    let resp = a
        .chat(json!({"model": MODEL, "messages": [{"role": "user", "content": "only in a"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    a.wait_projected("CompletionFinished", 1).await;
    b.wait_projected("RequestAccepted", 0).await;
    let in_b: i64 = sqlx::query_scalar("SELECT count(*) FROM event_log")
        .fetch_one(&b.pool)
        .await
        .unwrap();
    let b_requests: i64 =
        sqlx::query_scalar("SELECT count(*) FROM event_log WHERE type = 'RequestAccepted'")
            .fetch_one(&b.pool)
            .await
            .unwrap();
    assert!(in_b > 0, "b has its own config events");
    assert_eq!(b_requests, 0, "b saw none of a's requests");
    assert_eq!(b.mock.stats().requests_total, 0, "b's upstream got nothing");
    a.stop().await;
    b.stop().await;
}

/// Bad input gets the right 4xx in OpenAI's error shape, never a 5xx, and the gateway
/// stays healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_openai_shaped_4xx() {
    let stack = Stack::start(StackOptions::default()).await;
    let url = format!("{}/v1/chat/completions", stack.base);
    let ok_messages = json!([{"role": "user", "content": "hi"}]);
    let cases: Vec<(&str, reqwest::RequestBuilder, u16, Option<&str>)> = vec![
        (
            "malformed json",
            stack.http.post(&url).bearer_auth(KEY).body("{\"model\": "),
            400,
            None,
        ),
        (
            "not an object",
            stack.http.post(&url).bearer_auth(KEY).body("[1,2]"),
            400,
            None,
        ),
        (
            "wrong type",
            stack.chat(json!({"model": MODEL, "messages": "hi"})),
            400,
            Some("messages"),
        ),
        (
            "empty messages",
            stack.chat(json!({"model": MODEL, "messages": []})),
            400,
            Some("messages"),
        ),
        (
            "bad role",
            stack.chat(json!({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]})),
            400,
            Some("messages[0].role"),
        ),
        (
            "negative max_tokens",
            stack.chat(json!({"model": MODEL, "messages": ok_messages, "max_tokens": -5})),
            400,
            Some("max_tokens"),
        ),
        (
            "unknown model",
            stack.chat(json!({"model": "no-such-model", "messages": ok_messages})),
            404,
            Some("model"),
        ),
        (
            "missing key",
            stack
                .http
                .post(&url)
                .json(&json!({"model": MODEL, "messages": ok_messages})),
            401,
            None,
        ),
        (
            "wrong key",
            stack
                .http
                .post(&url)
                .bearer_auth("sk-wrong-key-000000000000")
                .json(&json!({"model": MODEL, "messages": ok_messages})),
            401,
            None,
        ),
        (
            "invalid utf-8",
            stack
                .http
                .post(&url)
                .bearer_auth(KEY)
                .body(vec![b'{', 0xff, 0xfe, b'}']),
            400,
            None,
        ),
        (
            "unknown route",
            stack
                .http
                .get(format!("{}/v1/nope", stack.base))
                .bearer_auth(KEY),
            404,
            None,
        ),
    ];
    for (name, req, status, param) in cases {
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{name}");
        assert!(
            resp.headers().contains_key("x-sluice-request-id"),
            "{name}: request id on errors too"
        );
        let body: Value = resp
            .json()
            .await
            .unwrap_or_else(|e| panic!("{name}: error body is JSON: {e}"));
        let err = &body["error"];
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{name}: {body}"
        );
        assert!(err["type"].is_string(), "{name}: {body}");
        if let Some(p) = param {
            assert_eq!(err["param"], p, "{name}: {body}");
        }
    }
    // Oversize body: the gateway answers 413 from `Content-Length` alone, before reading
    // the body. A raw socket sends only the headers, so the client cannot race the server
    // closing the connection while a 5 MB body is still being written.
    {
        use tokio::io::AsyncWriteExt;
        let addr = stack.base.trim_start_matches("http://").to_owned();
        let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            20 * 1024 * 1024
        );
        sock.write_all(head.as_bytes()).await.unwrap();
        // Read until the whole response is in: the server need not close the socket.
        let answer = read_http_response(&mut sock, std::time::Duration::from_secs(10)).await;
        assert!(
            answer.starts_with("HTTP/1.1 413"),
            "oversize body: {answer}"
        );
        assert!(
            answer.contains("x-sluice-request-id"),
            "oversize body: {answer}"
        );
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
        let body: Value = serde_json::from_str(body).expect("413 body is JSON");
        assert!(body["error"]["message"].is_string(), "{body}");
    }
    // Still healthy and serving.
    assert_eq!(
        stack
            .http
            .get(format!("{}/healthz", stack.base))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let resp = stack
        .chat(json!({"model": MODEL, "messages": ok_messages}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        stack.mock.stats().requests_total,
        1,
        "no bad request reached the upstream"
    );
    stack.stop().await;
}

/// The official `openai` Python SDK streams through the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_sdk_streams_through_the_gateway() {
    let stack = Stack::start(StackOptions::default()).await;
    let script = r#"
import os, sys, openai
client = openai.OpenAI(base_url=os.environ["BASE"] + "/v1", api_key=os.environ["KEY"])
text = ""
usage = None
with client.chat.completions.create(model=os.environ["MODEL"], messages=[{"role": "user", "content": "hi"}],
                                    stream=True, stream_options={"include_usage": True}) as stream:
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
plain = client.chat.completions.create(model=os.environ["MODEL"], messages=[{"role": "user", "content": "hi"}])
try:
    client.chat.completions.create(model="missing-model", messages=[{"role": "user", "content": "hi"}])
    status = 0
except openai.NotFoundError as e:
    status = e.status_code
print(text)
print(usage.completion_tokens)
print(plain.choices[0].message.content)
print(status)
"#;
    let out = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .env("BASE", &stack.base)
        .env("KEY", KEY)
        .env("MODEL", MODEL)
        .output()
        .await
        .expect("python3 runs (scripts/deps installs the openai package)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "openai SDK failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0].trim_end(), mock_text(20).trim_end());
    assert_eq!(lines[1], "20");
    assert_eq!(lines[2].trim_end(), mock_text(20).trim_end());
    assert_eq!(lines[3], "404");
    stack.stop().await;
}

/// A failing priority-1 channel sends the request to priority 2 before any byte reached
/// the client; the client never notices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_channel_fails_over_before_the_first_byte() {
    let backup = mock(Default::default()).await;
    let extra = channel_yaml("mock-backup", "openai", &backup.base_url(), MODEL, 2);
    let mock = mock_upstream::MockConfig {
        fail_status: Some(500),
        ..Default::default()
    };
    let stack = Stack::start(StackOptions {
        mock,
        extra_channels: extra,
        ..Default::default()
    })
    .await;
    for stream in [false, true] {
        let resp = stack
            .chat(json!({"model": MODEL, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let _ = resp.bytes().await.unwrap();
    }
    assert_eq!(
        stack.mock.stats().requests_total,
        2,
        "each request tried priority 1 once"
    );
    assert_eq!(
        backup.stats().requests_total,
        2,
        "and was served by priority 2"
    );
    stack.wait_projected("CompletionFinished", 2).await;
    let failed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM event_log WHERE type = 'AttemptFailed'")
            .fetch_one(&stack.pool)
            .await
            .unwrap();
    assert_eq!(failed, 2);
    stack.stop().await;
}
