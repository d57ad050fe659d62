//! End-to-end checks of the OpenAI surface over real HTTP, comparing JSON as `serde_json::Value`.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mock_upstream::{MockConfig, MockUpstream, Stats};
use serde_json::{json, Value};

async fn start(config: MockConfig) -> MockUpstream {
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    MockUpstream::start(addr, config).await.unwrap()
}

fn chat_url(m: &MockUpstream) -> String {
    format!("{}/chat/completions", m.base_url())
}

async fn post(m: &MockUpstream, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(chat_url(m))
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// Splits an SSE body into its `data:` payloads, checking the framing on the way.
fn sse_payloads(text: &str) -> Vec<&str> {
    assert!(text.ends_with("\n\n"), "unterminated event in {text:?}");
    text.split_terminator("\n\n")
        .map(|e| e.strip_prefix("data: ").unwrap())
        .collect()
}

fn usage(prompt: u64, completion: u64) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0, "audio_tokens": 0,
            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0
        }
    })
}

/// Two messages: 2 + 4 words, plus 3 per message.
const PROMPT_TOKENS: u64 = 12;

fn request(extra: Value) -> Value {
    let mut body = json!({
        "model": "gpt-test",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "say three words please"}]}
        ]
    });
    if let (Value::Object(b), Value::Object(e)) = (&mut body, extra) {
        b.extend(e);
    }
    body
}

/// The chunk OpenAI would send, given the stream's own id and created time.
fn chunk(head: &Value, choices: Value, with_usage: bool) -> Value {
    let mut c = json!({
        "id": head["id"], "object": "chat.completion.chunk", "created": head["created"],
        "model": "gpt-test", "service_tier": "default", "system_fingerprint": "fp_mock",
        "choices": choices
    });
    if with_usage {
        c["usage"] = Value::Null;
    }
    c
}

fn expected_stream(head: &Value, n: u32, reason: &str, usage_chunk: Option<Value>) -> Vec<Value> {
    let wu = usage_chunk.is_some();
    let delta = |d: Value, fr: Value| json!([{"index": 0, "delta": d, "logprobs": null, "finish_reason": fr}]);
    let mut v = vec![chunk(
        head,
        delta(json!({"role": "assistant", "content": ""}), Value::Null),
        wu,
    )];
    for i in 0..n {
        v.push(chunk(
            head,
            delta(json!({"content": format!("tok{i} ")}), Value::Null),
            wu,
        ));
    }
    v.push(chunk(head, delta(json!({}), json!(reason)), wu));
    if let Some(u) = usage_chunk {
        let mut c = chunk(head, json!([]), false);
        c["usage"] = u;
        v.push(c);
    }
    v
}

async fn read_stream(resp: reqwest::Response) -> Vec<Value> {
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "text/event-stream; charset=utf-8"
    );
    let text = resp.text().await.unwrap();
    let payloads = sse_payloads(&text);
    assert_eq!(payloads.last(), Some(&"[DONE]"));
    payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).unwrap())
        .collect()
}

#[tokio::test]
async fn non_stream_shape() {
    let m = start(MockConfig {
        chunks: 3,
        ..Default::default()
    })
    .await;
    let resp = post(&m, request(json!({}))).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert!(v["created"].as_u64().unwrap() > 1_700_000_000);
    let expected = json!({
        "id": v["id"], "object": "chat.completion", "created": v["created"], "model": "gpt-test",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": "tok0 tok1 tok2 ", "refusal": null, "annotations": []},
            "logprobs": null, "finish_reason": "stop"
        }],
        "usage": usage(PROMPT_TOKENS, 3),
        "service_tier": "default", "system_fingerprint": "fp_mock"
    });
    assert_eq!(v, expected);
    m.shutdown().await;
}

#[tokio::test]
async fn stream_sequence_without_usage() {
    let m = start(MockConfig {
        chunks: 4,
        ..Default::default()
    })
    .await;
    let events = read_stream(post(&m, request(json!({"stream": true}))).await).await;
    assert_eq!(events, expected_stream(&events[0], 4, "stop", None));
    // Same id and created time on every chunk.
    assert!(events.iter().all(|e| e["id"] == events[0]["id"]));
}

#[tokio::test]
async fn stream_sequence_with_usage() {
    let m = start(MockConfig::default()).await;
    let body = request(json!({"stream": true, "stream_options": {"include_usage": true}}));
    let events = read_stream(post(&m, body).await).await;
    let want = expected_stream(&events[0], 20, "stop", Some(usage(PROMPT_TOKENS, 20)));
    assert_eq!(events, want);
}

#[tokio::test]
async fn usage_knob_off_never_reports_usage() {
    let m = start(MockConfig {
        chunks: 2,
        usage: false,
        ..Default::default()
    })
    .await;
    let v: Value = post(&m, request(json!({}))).await.json().await.unwrap();
    assert!(v.get("usage").is_none(), "{v}");
    let body = request(json!({"stream": true, "stream_options": {"include_usage": true}}));
    let events = read_stream(post(&m, body).await).await;
    assert_eq!(events, expected_stream(&events[0], 2, "stop", None));
}

#[tokio::test]
async fn max_tokens_cuts_with_length() {
    let m = start(MockConfig::default()).await;
    let body = request(
        json!({"stream": true, "max_tokens": 2, "stream_options": {"include_usage": true}}),
    );
    let events = read_stream(post(&m, body).await).await;
    assert_eq!(
        events,
        expected_stream(&events[0], 2, "length", Some(usage(PROMPT_TOKENS, 2)))
    );
    let v: Value = post(&m, request(json!({"max_completion_tokens": 1})))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "tok0 ");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 1);
}

#[tokio::test]
async fn fail_status_shapes() {
    let m = start(MockConfig {
        fail_status: Some(429),
        ..Default::default()
    })
    .await;
    let resp = post(&m, request(json!({}))).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "1");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "requests");
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert_eq!(v["error"]["param"], Value::Null);
    assert!(v["error"]["message"].is_string());

    for (status, kind, code) in [
        (500, "server_error", Value::Null),
        (503, "server_error", json!("overloaded")),
        (401, "invalid_request_error", json!("invalid_api_key")),
        (400, "invalid_request_error", Value::Null),
    ] {
        let resp = post(&m, request(json!({"mock": {"fail_status": status}}))).await;
        assert_eq!(resp.status(), status);
        assert!(resp.headers().get("retry-after").is_none());
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["type"], kind, "{status}");
        assert_eq!(v["error"]["code"], code, "{status}");
    }
}

#[tokio::test]
async fn bad_requests_are_openai_400s() {
    let m = start(MockConfig::default()).await;
    let client = reqwest::Client::new();
    let resp = client
        .post(chat_url(&m))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");

    let resp = post(&m, json!({"messages": []})).await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["message"], "you must provide a model parameter");

    let resp = post(&m, json!({"model": "x"})).await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["param"], "messages");
    assert_eq!(v["error"]["code"], "missing_required_parameter");

    let resp = client
        .post(format!("{}/nope", m.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["message"], "Invalid URL (POST /v1/nope)");
}

/// Reads a body until the connection errors; panics if it ends cleanly.
async fn read_until_cut(mut resp: reqwest::Response) -> String {
    assert_eq!(resp.status(), 200);
    let mut got = Vec::new();
    let err = loop {
        match resp.chunk().await {
            Ok(Some(b)) => got.extend_from_slice(&b),
            Ok(None) => panic!("stream ended cleanly: {}", String::from_utf8_lossy(&got)),
            Err(e) => break e,
        }
    };
    assert!(err.is_body() || err.is_decode(), "{err:?}");
    String::from_utf8(got).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_after_cuts_the_stream() {
    let m = start(MockConfig {
        disconnect_after: Some(2),
        ..Default::default()
    })
    .await;
    let text = read_until_cut(post(&m, request(json!({"stream": true}))).await).await;
    let payloads = sse_payloads(&text);
    assert_eq!(payloads.len(), 3, "{text}"); // role + tok0 + tok1
    assert!(text.contains("tok1 ") && !text.contains("tok2") && !text.contains("[DONE]"));
    let s = m.stats();
    assert_eq!(
        (
            s.streams_disconnected,
            s.streams_completed,
            s.streams_aborted
        ),
        (1, 0, 0)
    );

    // Every event sent before the cut arrives, even with many of them and none after the last
    // content chunk (a cut at or past `chunks` drops finish_reason and [DONE]).
    for (chunks, k) in [(3000, 2500), (5, 0), (5, 5), (5, 9)] {
        let body =
            request(json!({"stream": true, "mock": {"chunks": chunks, "disconnect_after": k}}));
        let text = read_until_cut(post(&m, body).await).await;
        let payloads = sse_payloads(&text);
        assert_eq!(payloads.len() as u32, 1 + k.min(chunks), "{chunks} {k}");
        assert!(!text.contains("finish_reason\":\"stop") && !text.contains("[DONE]"));
    }
}

#[tokio::test]
async fn per_request_overrides() {
    let m = start(MockConfig::default()).await;
    let body = request(json!({"stream": true, "mock": {"chunks": 1, "chunk_delay_ms": 1}}));
    let events = read_stream(post(&m, body).await).await;
    assert_eq!(events, expected_stream(&events[0], 1, "stop", None));

    let started = Instant::now();
    let v: Value = post(&m, request(json!({"mock": {"ttft_ms": 150, "chunks": 2}})))
        .await
        .json()
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_eq!(v["choices"][0]["message"]["content"], "tok0 tok1 ");
    // The override applied to that request only.
    let v: Value = post(&m, request(json!({}))).await.json().await.unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 20);
}

#[tokio::test]
async fn require_key() {
    let m = start(MockConfig {
        require_key: Some("sk-up".into()),
        ..Default::default()
    })
    .await;
    let client = reqwest::Client::new();
    let resp = client
        .post(chat_url(&m))
        .json(&request(json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");

    let resp = client
        .post(chat_url(&m))
        .bearer_auth("sk-wrong")
        .json(&request(json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_api_key");

    let resp = client
        .post(chat_url(&m))
        .bearer_auth("sk-up")
        .json(&request(json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // A per-request key works too (server-wide one switched off).
    m.set_config(MockConfig::default());
    let resp = post(&m, request(json!({"mock": {"require_key": "k2"}}))).await;
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn stats_count_requests_and_aborted_streams() {
    let m = start(MockConfig::default()).await;
    let client = reqwest::Client::new();
    post(&m, request(json!({}))).await.bytes().await.unwrap();
    read_stream(post(&m, request(json!({"stream": true}))).await).await;
    let models: Value = client
        .get(format!("{}/models", m.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "mock-model");

    // A slow stream the client leaves after the first event.
    let body = request(json!({"stream": true, "mock": {"chunk_delay_ms": 30}}));
    let mut resp = post(&m, body).await;
    resp.chunk().await.unwrap().unwrap();
    drop(resp);
    let deadline = Instant::now() + Duration::from_secs(5);
    while m.stats().streams_aborted == 0 {
        assert!(
            Instant::now() < deadline,
            "abort never seen: {:?}",
            m.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let s = m.stats();
    assert_eq!(s.requests_total, 4);
    assert_eq!(s.by_path.get("/v1/chat/completions"), Some(&3));
    assert_eq!(s.by_path.get("/v1/models"), Some(&1));
    assert_eq!(
        (s.streams_started, s.streams_completed, s.streams_aborted),
        (2, 1, 1)
    );

    // The HTTP view matches and is not counted itself.
    let url = format!("http://{}/_mock/stats", m.addr());
    let over_http: Stats = client.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(over_http, s);
    let reset = format!("http://{}/_mock/reset", m.addr());
    assert_eq!(client.post(&reset).send().await.unwrap().status(), 204);
    assert_eq!(m.stats(), Stats::default());
}

#[tokio::test]
async fn config_over_http() {
    let m = start(MockConfig::default()).await;
    let client = reqwest::Client::new();
    let url = format!("http://{}/_mock/config", m.addr());
    let resp = client
        .post(&url)
        .json(&json!({"chunks": 2, "fail_status": 503}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(post(&m, request(json!({}))).await.status(), 503);
    let cfg: MockConfig = client.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(
        cfg,
        MockConfig {
            chunks: 2,
            fail_status: Some(503),
            ..Default::default()
        }
    );
}

#[tokio::test]
async fn hang_until_client_gives_up_and_shutdown_still_works() {
    let m = start(MockConfig {
        hang: true,
        ..Default::default()
    })
    .await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let err = client
        .post(chat_url(&m))
        .json(&request(json!({})))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");

    // A request still hanging must not block shutdown.
    let url = chat_url(&m);
    let pending = tokio::spawn(async move {
        reqwest::Client::new()
            .post(url)
            .json(&request(json!({})))
            .send()
            .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    tokio::time::timeout(Duration::from_secs(5), m.shutdown())
        .await
        .unwrap();
    pending.abort();
}

#[tokio::test]
async fn serve_stops_on_cancel() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let token = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(mock_upstream::serve(
        listener,
        MockConfig::default(),
        token.clone(),
    ));
    let resp = reqwest::get(format!("http://{addr}/v1/models/anything"))
        .await
        .unwrap();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["id"], "anything");
    token.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// `stall_after`: the stream sends that many content chunks, then stays open and silent
/// until the client leaves (counted as aborted); a non-stream request ignores it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stall_after_goes_silent_without_closing() {
    let m = start(MockConfig::default()).await;
    let mut resp = post(
        &m,
        request(json!({"stream": true, "mock": {"stall_after": 2}})),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let mut got = Vec::new();
    // role + tok0 + tok1 arrive, then nothing: reading times out instead of ending.
    while !String::from_utf8_lossy(&got).contains("tok1 ") {
        let chunk = tokio::time::timeout(Duration::from_secs(5), resp.chunk())
            .await
            .expect("the chunks before the stall arrive")
            .unwrap()
            .expect("not ended");
        got.extend_from_slice(&chunk);
    }
    let silent = tokio::time::timeout(Duration::from_millis(300), resp.chunk()).await;
    assert!(silent.is_err(), "silent after the stall: {silent:?}");
    drop(resp);
    let deadline = Instant::now() + Duration::from_secs(5);
    while m.stats().streams_aborted == 0 {
        assert!(Instant::now() < deadline, "{:?}", m.stats());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let v: Value = post(
        &m,
        request(json!({"mock": {"stall_after": 0, "chunks": 2}})),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "tok0 tok1 ");
}

/// `fail_times` fails only the first requests; `retry_after_secs` sets the header; the
/// call log records arrivals while on, and a reset starts the count again.
#[tokio::test]
async fn fail_times_then_answer_and_calls_are_recorded() {
    let m = start(MockConfig {
        fail_status: Some(429),
        fail_times: Some(2),
        retry_after_secs: Some(7),
        ..Default::default()
    })
    .await;
    m.record_calls(true);
    for _ in 0..2 {
        let resp = post(&m, request(json!({}))).await;
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["retry-after"], "7");
    }
    assert_eq!(post(&m, request(json!({}))).await.status(), 200);
    let calls = m.calls();
    assert_eq!(calls.len(), 3);
    assert!(calls.iter().all(|c| c.path == "/v1/chat/completions"));
    assert!(calls.windows(2).all(|w| w[0].at <= w[1].at));
    m.reset_stats();
    assert!(m.calls().is_empty());
    assert_eq!(post(&m, request(json!({}))).await.status(), 429);
    let resp = post(&m, request(json!({"mock": {"fail_times": 0}}))).await;
    assert_eq!(resp.status(), 200, "fail_times 0 fails nothing");

    // A 503 gets the header only when asked.
    let m = start(MockConfig {
        fail_status: Some(503),
        ..Default::default()
    })
    .await;
    let resp = post(&m, request(json!({}))).await;
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().get("retry-after").is_none());
    let resp = post(&m, request(json!({"mock": {"retry_after_secs": 3}}))).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "3");
}
