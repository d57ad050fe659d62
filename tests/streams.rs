//! Streams beyond one HTTP response, on the real services: stop (cancel), a client gone
//! for good (resume grace), resume with `Last-Event-ID` (on another ingress), watchers,
//! and the WebSocket, plus hostile input on each.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::pin::Pin;
use std::process::Child;
use std::str::FromStr;
use std::time::{Duration, Instant};

use common::{eventually, mock_text, request_id, Stack, StackOptions, KEY, MODEL};
use futures::{SinkExt, Stream, StreamExt};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::bytes::Bytes;
use uuid::Uuid;

fn stream_body(chunks: u32, delay_ms: u64) -> Value {
    json!({"model": MODEL, "stream": true,
           "messages": [{"role": "user", "content": "tell me a long story"}],
           "mock": {"chunks": chunks, "chunk_delay_ms": delay_ms}})
}

/// One SSE event as a client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Event {
    id: Option<u64>,
    /// The `event:` name (Anthropic's streams name every event; chat's none).
    event: Option<String>,
    data: String,
}

impl Event {
    /// The text a chat chunk adds.
    fn content(&self) -> String {
        serde_json::from_str::<Value>(&self.data)
            .ok()
            .and_then(|v| {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_owned)
            })
            .unwrap_or_default()
    }
}

/// Reads an SSE body event by event, as it arrives (comments and pings skipped).
struct Sse {
    body: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    buf: String,
}

impl Sse {
    fn new(resp: reqwest::Response) -> Self {
        Self {
            body: Box::pin(resp.bytes_stream()),
            buf: String::new(),
        }
    }

    async fn next(&mut self) -> Option<Event> {
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let f = common::sse_fields(&block);
                if let (Some(data), false) = (f.data, f.event == Some("ping")) {
                    return Some(Event {
                        id: f.seq(),
                        event: f.event.map(str::to_owned),
                        data: data.to_owned(),
                    });
                }
            }
            let chunk = tokio::time::timeout(Duration::from_secs(30), self.body.next())
                .await
                .expect("the stream stalled for 30 s")?;
            self.buf
                .push_str(std::str::from_utf8(&chunk.expect("stream body")).unwrap());
        }
    }

    async fn rest(mut self) -> Vec<Event> {
        let mut events = Vec::new();
        while let Some(e) = self.next().await {
            events.push(e);
        }
        events
    }
}

/// Polls `check` until it holds; fails after 20 s.
async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    eventually(Duration::from_secs(20), what, async || {
        check().then_some(()).ok_or_else(String::new)
    })
    .await
}

/// `(type, data)` of every event of a request, in log order.
async fn events_of(stack: &Stack, id: Uuid) -> Vec<(String, Value)> {
    sqlx::query_as("SELECT type, data FROM event_log WHERE stream = $1 ORDER BY position")
        .bind(format!("request-{}", id.simple()))
        .fetch_all(&stack.pool)
        .await
        .unwrap()
}

/// The ledger's usage rows of a request, and the charge its usage implies at the test
/// prices, computed here independently of the billing code.
async fn charges(stack: &Stack, id: Uuid, usage: &Value) -> (Vec<i64>, i64) {
    let rows: Vec<i64> = sqlx::query_scalar(
        "SELECT amount_nanos FROM ledger_entries WHERE request_id = $1 AND kind = 'usage'",
    )
    .bind(id)
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    let input = Decimal::from_str(common::INPUT_PER_MTOK).unwrap() / Decimal::from(1_000_000);
    let output = Decimal::from_str(common::OUTPUT_PER_MTOK).unwrap() / Decimal::from(1_000_000);
    let p = Decimal::from(usage["prompt_tokens"].as_u64().unwrap());
    let c = Decimal::from(usage["completion_tokens"].as_u64().unwrap());
    let expected = ((p * input + c * output) * Decimal::from(1_000_000_000)).round();
    (rows, i64::try_from(expected).unwrap())
}

async fn cancel(stack: &Stack, key: &str, id: &str) -> reqwest::Response {
    stack
        .http
        .post(format!("{}/api/requests/{id}/cancel", stack.base))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
}

fn watch(stack: &Stack, base: &str, id: Uuid) -> reqwest::RequestBuilder {
    let _ = stack;
    reqwest::Client::new()
        .get(format!("{base}/v1/streams/{id}"))
        .bearer_auth(KEY)
}

/// A second ingress process on its own port, same namespace: resumes must work on any
/// instance. Killed when dropped.
struct SecondIngress {
    base: String,
    child: Child,
}

impl SecondIngress {
    async fn start(stack: &Stack) -> SecondIngress {
        let port = common::free_port();
        let child = stack
            .command("ingress")
            .env("SLUICE_LISTEN", format!("127.0.0.1:{port}"))
            .spawn()
            .expect("spawn a second ingress");
        let base = format!("http://127.0.0.1:{port}");
        common::wait_ready(&stack.http, &base, &stack.dir).await;
        SecondIngress { base, child }
    }
}

impl Drop for SecondIngress {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_the_upstream_and_bills_the_partial_usage_once() {
    let stack = Stack::start(StackOptions::default()).await;
    let resp = stack.chat(stream_body(400, 50)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    let mut sse = Sse::new(resp);
    let mut content = 0;
    while content < 5 {
        if !sse.next().await.unwrap().content().is_empty() {
            content += 1;
        }
    }

    let pressed = Instant::now();
    let resp = cancel(&stack, KEY, &id.to_string()).await;
    let answered = pressed.elapsed();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body, json!({"request_id": id, "status": "cancelling"}));
    // Informational (timing is measured, not asserted): how long until the mock saw the
    // upstream connection close.
    while stack.mock.stats().streams_aborted == 0 && pressed.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let aborted = pressed.elapsed();

    // The client's stream ends cleanly, long before the 400 chunks.
    let rest = sse.rest().await;
    let ended_after = pressed.elapsed();
    assert_eq!(rest.last().map(|e| e.data.as_str()), Some("[DONE]"));
    content += rest.iter().filter(|e| !e.content().is_empty()).count();
    assert!(content < 100, "{content} chunks arrived after the cancel");

    // The mock saw its connection close: the upstream call was aborted.
    wait_for("the upstream to see the connection close", || {
        stack.mock.stats().streams_aborted == 1
    })
    .await;
    let stats = stack.mock.stats();
    assert_eq!((stats.requests_total, stats.streams_completed), (1, 0));
    eprintln!(
        "cancel: answered {answered:?}, upstream closed {aborted:?}, client stream ended {ended_after:?} after the press"
    );

    // One RequestCancelled with the usage made so far (estimated: the provider reports
    // usage only at the end), billed exactly once.
    stack.wait_projected("RequestCancelled", 1).await;
    let events = events_of(&stack, id).await;
    // The ingress's and the worker's first events may land in either order.
    let mut types: Vec<&str> = events.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(types.pop(), Some("RequestCancelled"));
    types.sort_unstable();
    assert_eq!(types, ["AttemptStarted", "RequestAccepted"]);
    let cancelled = &events[2].1;
    assert_eq!(cancelled["reason"], "stop");
    assert_eq!(cancelled["usage_source"], "estimated");
    let completion = cancelled["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(
        (5..400 * 3).contains(&completion),
        "completion tokens {completion}"
    );
    assert!(cancelled["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    let (rows, expected) = charges(&stack, id, &cancelled["usage"]).await;
    assert_eq!(rows, [expected]);
    assert!(expected > 0);

    // Pressing stop again: nothing left to stop, nothing billed twice.
    let again: Value = cancel(&stack, KEY, &id.to_string())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(again["status"], "finished");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(events_of(&stack, id).await.len(), 3);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_for_good_has_its_upstream_aborted_after_the_grace() {
    let stack = Stack::start(StackOptions {
        env: vec![("SLUICE_RESUME_GRACE_SECS", "1".to_owned())],
        ..StackOptions::default()
    })
    .await;
    let resp = stack.chat(stream_body(400, 50)).send().await.unwrap();
    let id = request_id(&resp);
    let mut sse = Sse::new(resp);
    for _ in 0..3 {
        sse.next().await.unwrap();
    }
    drop(sse);
    let left = Instant::now();

    // Within the grace the generation goes on: the client may come back.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        stack.mock.stats().streams_aborted,
        0,
        "cancelled inside the grace"
    );
    wait_for("the upstream to be aborted after the grace", || {
        stack.mock.stats().streams_aborted == 1
    })
    .await;
    let aborted_after = left.elapsed();
    assert!(aborted_after >= Duration::from_secs(1), "{aborted_after:?}");
    eprintln!("client left -> upstream aborted: {aborted_after:?} (grace 1 s)");

    stack.wait_projected("RequestCancelled", 1).await;
    let events = events_of(&stack, id).await;
    let (kind, cancelled) = events.last().unwrap();
    assert_eq!(kind, "RequestCancelled");
    assert_eq!(cancelled["reason"], "client_gone");
    assert!(cancelled["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    let (rows, expected) = charges(&stack, id, &cancelled["usage"]).await;
    assert_eq!(rows, [expected]);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_stream_resumes_on_another_ingress_without_a_second_upstream_call() {
    // A grace shorter than the rest of the stream: the original ingress's grace check must
    // find the resumed client on the other ingress and leave the generation running.
    let stack = Stack::start(StackOptions {
        env: vec![("SLUICE_RESUME_GRACE_SECS", "1".to_owned())],
        ..StackOptions::default()
    })
    .await;
    let second = SecondIngress::start(&stack).await;
    const N: usize = 40;
    let resp = stack.chat(stream_body(N as u32, 75)).send().await.unwrap();
    let id = request_id(&resp);
    let mut sse = Sse::new(resp);
    let mut seen = Vec::new();
    for _ in 0..5 {
        seen.push(sse.next().await.unwrap());
    }
    drop(sse);
    let last = seen.last().unwrap().id.unwrap();

    let resp = watch(&stack, &second.base, id)
        .header("Last-Event-ID", last.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let resumed = Sse::new(resp).rest().await;
    assert_eq!(resumed.last().map(|e| e.data.as_str()), Some("[DONE]"));
    assert!(resumed.len() > 2);
    seen.extend(resumed);

    // In order, no duplicates, nothing missing: the whole answer exactly once.
    let ids: Vec<u64> = seen.iter().filter_map(|e| e.id).collect();
    assert!(
        ids.windows(2).all(|w| w[1] == w[0] + 1),
        "ids in order without gaps or repeats: {ids:?}"
    );
    let text: String = seen.iter().map(Event::content).collect();
    assert_eq!(text, mock_text(N));

    // One upstream call, completed; billed once as a completion, never cancelled.
    let stats = stack.mock.stats();
    assert_eq!(
        (
            stats.requests_total,
            stats.streams_completed,
            stats.streams_aborted
        ),
        (1, 1, 0)
    );
    stack.wait_projected("CompletionFinished", 1).await;
    let events = events_of(&stack, id).await;
    assert!(events.iter().all(|(t, _)| t != "RequestCancelled"));
    let finished = &events
        .iter()
        .find(|(t, _)| t == "CompletionFinished")
        .unwrap()
        .1;
    let (rows, expected) = charges(&stack, id, &finished["usage"]).await;
    assert_eq!(rows, [expected]);
    drop(second);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anthropic_stream_resumes_in_anthropic_framing() {
    let stack = Stack::start(StackOptions::default()).await;
    const N: usize = 12;
    let resp = stack
        .http
        .post(format!("{}/v1/messages", stack.base))
        .header("x-api-key", KEY)
        .header("anthropic-version", "2023-06-01")
        .json(&json!({"model": MODEL, "max_tokens": 500, "stream": true,
                      "messages": [{"role": "user", "content": "hi"}],
                      "mock": {"chunks": N, "chunk_delay_ms": 60}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    let mut sse = Sse::new(resp);
    let mut seen = Vec::new();
    for _ in 0..5 {
        seen.push(sse.next().await.unwrap());
    }
    drop(sse);
    let resp = stack
        .http
        .get(format!("{}/v1/streams/{id}", stack.base))
        .header("x-api-key", KEY)
        .header(
            "Last-Event-ID",
            seen.last().unwrap().id.unwrap().to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    seen.extend(Sse::new(resp).rest().await);

    let ids: Vec<u64> = seen
        .iter()
        .map(|e| e.id.expect("every event has an id"))
        .collect();
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "{ids:?}");
    let names: Vec<&str> = seen.iter().map(|e| e.event.as_deref().unwrap()).collect();
    assert_eq!(names.first(), Some(&"message_start"));
    assert_eq!(names.last(), Some(&"message_stop"));
    let text: String = seen
        .iter()
        .filter_map(|e| {
            let v: Value = serde_json::from_str(&e.data).unwrap();
            assert_eq!(
                v["type"],
                e.event.as_deref().unwrap(),
                "named after its type"
            );
            v["delta"]["text"].as_str().map(str::to_owned)
        })
        .collect();
    assert_eq!(text, mock_text(N));
    assert_eq!(stack.mock.stats().requests_total, 1);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_watchers_receive_the_same_chunks_as_the_client() {
    let stack = Stack::start(StackOptions::default()).await;
    let resp = stack.chat(stream_body(30, 40)).send().await.unwrap();
    let id = request_id(&resp);
    let original = Sse::new(resp);
    // The owner's credentials, either header.
    let first = watch(&stack, &stack.base, id).send().await.unwrap();
    let second = stack
        .http
        .get(format!("{}/v1/streams/{id}", stack.base))
        .header("x-api-key", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    let (original, first, second) = tokio::join!(
        original.rest(),
        Sse::new(first).rest(),
        Sse::new(second).rest()
    );
    assert_eq!(original.last().map(|e| e.data.as_str()), Some("[DONE]"));
    assert_eq!(first, original);
    assert_eq!(second, original);
    let text: String = original.iter().map(Event::content).collect();
    assert_eq!(text, mock_text(30));
    assert_eq!(stack.mock.stats().requests_total, 1);

    // A finished stream can still be replayed while its chunks are kept.
    let late = watch(&stack, &stack.base, id).send().await.unwrap();
    assert_eq!(Sse::new(late).rest().await, original);
    stack.stop().await;
}

/// Another key, of no user: someone who must not see or stop the test key's requests.
async fn stranger_key(stack: &Stack) -> String {
    let created = common::admin_key(stack, json!({"name": "stranger"})).await;
    let key = created["key"].as_str().unwrap().to_owned();
    eventually(Duration::from_secs(10), "the new key works", async || {
        let (status, _, text) =
            common::call(stack, reqwest::Method::GET, "/v1/models", Some(&key), None).await;
        if status == 200 {
            Ok(())
        } else {
            Err(format!("{status}: {text}"))
        }
    })
    .await;
    key
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_and_cancel_are_for_the_owner_only() {
    let stack = Stack::start(StackOptions::default()).await;
    let stranger = stranger_key(&stack).await;
    let resp = stack.chat(stream_body(40, 50)).send().await.unwrap();
    let id = request_id(&resp);
    let sse = Sse::new(resp);

    let get = |path: String, key: Option<&str>| {
        let mut req = stack.http.get(format!("{}{path}", stack.base));
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        req.send()
    };
    // Bogus, unknown and someone else's ids all look the same: 404 in OpenAI's shape.
    for (path, key) in [
        (format!("/v1/streams/{}", Uuid::now_v7()), KEY),
        ("/v1/streams/not-a-request".to_owned(), KEY),
        (format!("/v1/streams/{id}"), stranger.as_str()),
    ] {
        let r = get(path.clone(), Some(key)).await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
        let err: Value = r.json().await.unwrap();
        assert_eq!(err["error"]["code"], "not_found", "{path}: {err}");
    }
    assert_eq!(
        get(format!("/v1/streams/{id}"), None)
            .await
            .unwrap()
            .status(),
        401
    );
    let r = stack
        .http
        .get(format!("{}/v1/streams/{id}", stack.base))
        .bearer_auth(KEY)
        .header("Last-Event-ID", "three")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    for (who, target) in [
        (stranger.as_str(), id.to_string()),
        (KEY, Uuid::now_v7().to_string()),
        (KEY, "1234".to_owned()),
    ] {
        assert_eq!(cancel(&stack, who, &target).await.status(), 404);
    }
    // The stranger's attempts changed nothing: the stream completes.
    let events = sse.rest().await;
    assert_eq!(events.last().map(|e| e.data.as_str()), Some("[DONE]"));
    let text: String = events.iter().map(Event::content).collect();
    assert_eq!(text, mock_text(40));
    stack.stop().await;
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(stack: &Stack, key: &str) -> Socket {
    let url = stack.base.replace("http://", "ws://") + "/ws";
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    let (socket, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.status(), 101);
    socket
}

/// The next JSON text frame (server pings skipped).
async fn recv(socket: &mut Socket) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), socket.next())
            .await
            .expect("no frame for 30 s")
            .expect("socket open")
            .expect("readable frame");
        if let Message::Text(t) = msg {
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["type"] != "ping" {
                return v;
            }
        }
    }
}

async fn send(socket: &mut Socket, v: Value) {
    socket.send(Message::text(v.to_string())).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_websocket_carries_two_requests_at_once_and_cancels_by_message() {
    let stack = Stack::start(StackOptions::default()).await;
    let mut socket = connect(&stack, KEY).await;
    let chat = |n: u32| {
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
               "mock": {"chunks": n, "chunk_delay_ms": 40}})
    };
    send(
        &mut socket,
        json!({"type": "chat", "id": "a", "body": chat(12)}),
    )
    .await;
    send(
        &mut socket,
        json!({"type": "chat", "id": "b", "body": chat(8)}),
    )
    .await;
    let mut frames = Vec::new();
    let mut done = 0;
    while done < 2 {
        let frame = recv(&mut socket).await;
        if frame["type"] == "done" {
            done += 1;
        }
        assert_ne!(frame["type"], "error", "{frame}");
        frames.push(frame);
    }
    for (id, n) in [("a", 12), ("b", 8)] {
        let mine: Vec<&Value> = frames.iter().filter(|f| f["id"] == id).collect();
        assert_eq!(mine[0]["type"], "accepted");
        Uuid::parse_str(mine[0]["request_id"].as_str().unwrap()).unwrap();
        let text: String = mine
            .iter()
            .filter(|f| f["type"] == "chunk")
            .map(|f| {
                assert_eq!(f["data"]["object"], "chat.completion.chunk");
                f["data"]["choices"][0]["delta"]["content"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect();
        assert_eq!(text, mock_text(n));
        let last = mine.last().unwrap();
        assert_eq!(last["type"], "done");
        assert_eq!(last["usage"]["completion_tokens"], n);
        assert_eq!(last["finish_reason"], "stop");
    }
    // Multiplexed, not one after the other: b's chunks arrive before a is done.
    let position = |pred: &dyn Fn(&Value) -> bool| frames.iter().position(pred).unwrap();
    let first_b_chunk = position(&|f| f["id"] == "b" && f["type"] == "chunk");
    let a_done = position(&|f| f["id"] == "a" && f["type"] == "done");
    assert!(first_b_chunk < a_done);

    // Cancel by message: the stream ends with `done`, finish_reason `cancelled`.
    send(
        &mut socket,
        json!({"type": "chat", "id": "c", "body": chat(400)}),
    )
    .await;
    let mut chunks = 0;
    while chunks < 3 {
        if recv(&mut socket).await["type"] == "chunk" {
            chunks += 1;
        }
    }
    send(&mut socket, json!({"type": "cancel", "id": "c"})).await;
    let end = loop {
        let frame = recv(&mut socket).await;
        if frame["type"] != "chunk" {
            break frame;
        }
    };
    assert_eq!(end["type"], "done", "{end}");
    assert_eq!(end["id"], "c");
    assert_eq!(end["finish_reason"], "cancelled");
    assert!(end["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    wait_for("the cancelled upstream to close", || {
        stack.mock.stats().streams_aborted == 1
    })
    .await;

    // A clean close.
    socket.close(None).await.unwrap();
    while let Some(Ok(msg)) = socket.next().await {
        if let Message::Close(Some(frame)) = msg {
            assert_eq!(frame.code, CloseCode::Normal);
        }
    }
    stack.wait_projected("RequestCancelled", 1).await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_websocket_frames_get_error_frames_and_the_socket_stays_usable() {
    let stack = Stack::start(StackOptions::default()).await;
    // No key: refused before the upgrade.
    let url = stack.base.replace("http://", "ws://") + "/ws";
    assert!(tokio_tungstenite::connect_async(url).await.is_err());

    let mut socket = connect(&stack, KEY).await;
    let hostile: Vec<(Message, Value, &str)> = vec![
        (Message::text("not json"), Value::Null, "invalid_frame"),
        (Message::text("[1,2]"), Value::Null, "invalid_frame"),
        (
            Message::text(r#"{"type":"chat","body":{}}"#),
            Value::Null,
            "invalid_frame",
        ),
        (
            Message::text(r#"{"type":"warp","id":"w"}"#),
            json!("w"),
            "invalid_frame",
        ),
        (
            Message::binary(vec![0u8, 159, 146, 150]),
            Value::Null,
            "invalid_frame",
        ),
        (
            Message::text(r#"{"type":"cancel","id":"nobody"}"#),
            json!("nobody"),
            "unknown_id",
        ),
        (
            Message::text(
                json!({"type": "chat", "id": "m", "body": {"model": "no-such-model",
                       "messages": [{"role": "user", "content": "hi"}]}})
                .to_string(),
            ),
            json!("m"),
            "model_not_found",
        ),
        (
            Message::text(r#"{"type":"chat","id":"n","body":{"model":"x"}}"#),
            json!("n"),
            "",
        ),
        (
            Message::text(format!(
                r#"{{"type":"chat","id":"big","body":{{"pad":"{}"}}}}"#,
                "x".repeat(4 * 1024 * 1024 + 16)
            )),
            Value::Null,
            "request_too_large",
        ),
    ];
    for (msg, id, code) in hostile {
        socket.send(msg).await.unwrap();
        let frame = recv(&mut socket).await;
        assert_eq!(frame["type"], "error", "{frame}");
        assert_eq!(frame["id"], id, "{frame}");
        assert!(frame["error"]["message"].as_str().is_some(), "{frame}");
        if !code.is_empty() {
            assert_eq!(frame["error"]["code"], code, "{frame}");
        }
    }
    // Still usable.
    send(&mut socket, json!({"type": "ping"})).await;
    assert_eq!(recv(&mut socket).await["type"], "pong");
    send(
        &mut socket,
        json!({"type": "chat", "id": "ok", "body": {"model": MODEL, "mock": {"chunks": 3},
               "messages": [{"role": "user", "content": "hi"}]}}),
    )
    .await;
    let end = loop {
        let frame = recv(&mut socket).await;
        if frame["type"] == "done" || frame["type"] == "error" {
            break frame;
        }
    };
    assert_eq!(end["type"], "done", "{end}");
    assert_eq!(end["id"], "ok");
    stack.stop().await;
}
