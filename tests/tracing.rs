//! One request followed by its trace id: the ingress's JSON log, the NATS headers of its
//! events, the worker's JSON log, and the metadata of every event it left in `event_log`
//! (which the projectors read). With a caller's W3C `traceparent` the trace id is the
//! caller's; without one it is the request id's hex. Neither the prompt nor the key is
//! ever logged.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Stack, StackOptions, KEY, MODEL};
use serde_json::{json, Value};

const PROMPT: &str = "tell-nobody-this-prompt-7f3a";

/// The JSON log lines whose enclosing spans carry `trace_id`.
fn lines_with_trace(log: &str, trace_id: &str) -> Vec<Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|line| {
            line["spans"].as_array().is_some_and(|spans| {
                spans
                    .iter()
                    .any(|s| s["trace_id"].as_str() == Some(trace_id))
            })
        })
        .collect()
}

fn span_field(line: &Value, field: &str) -> Option<String> {
    line["spans"]
        .as_array()?
        .iter()
        .find_map(|s| s[field].as_str().map(str::to_owned))
}

async fn follow(stack: &Stack, request_id: &str, trace_id: &str) {
    let id = uuid::Uuid::parse_str(request_id).unwrap();
    // The ingress logged the request inside its span.
    let ingress = lines_with_trace(&stack.logs("ingress"), trace_id);
    let finished = ingress
        .iter()
        .find(|l| l["message"] == "request finished")
        .unwrap_or_else(|| {
            panic!(
                "no ingress line with trace {trace_id}; logs in {}",
                stack.dir.display()
            )
        });
    assert_eq!(
        span_field(finished, "request_id").as_deref(),
        Some(request_id)
    );
    assert_eq!(finished["route"], "/v1/chat/completions");
    assert_eq!(finished["status"], 200);

    // So did the worker, with the same request id.
    let worker = lines_with_trace(&stack.logs("worker"), trace_id);
    let done = worker
        .iter()
        .find(|l| l["message"] == "request finished")
        .unwrap_or_else(|| {
            panic!(
                "no worker line with trace {trace_id}; logs in {}",
                stack.dir.display()
            )
        });
    assert_eq!(span_field(done, "request_id").as_deref(), Some(request_id));
    assert_eq!(done["channel"], "mock-main");

    // Every event of the request carries it, from the ingress (RequestAccepted) and the
    // worker (AttemptStarted, CompletionFinished) alike.
    let rows: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT type, metadata->>'trace_id' FROM event_log WHERE stream = $1 ORDER BY position",
    )
    .bind(schemas::events::request_stream(&id))
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    let types: Vec<&str> = rows.iter().map(|(t, _)| t.as_str()).collect();
    for expected in ["RequestAccepted", "AttemptStarted", "CompletionFinished"] {
        assert!(types.contains(&expected), "{expected} in {types:?}");
    }
    for (event_type, trace) in &rows {
        assert_eq!(trace.as_deref(), Some(trace_id), "{event_type}");
    }

    // On NATS the events carry it as a W3C header.
    let client = async_nats::connect(&stack.nats_url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let events = js.get_stream(stack.ns.events_stream()).await.unwrap();
    let subject = stack
        .ns
        .event_subject(&schemas::events::request_stream(&id));
    let last = events
        .direct_get_last_for_subject(subject.as_str())
        .await
        .unwrap();
    let header = last
        .headers
        .get("traceparent")
        .map(|v| v.as_str().to_owned())
        .expect("traceparent header");
    assert!(
        header.starts_with(&format!("00-{trace_id}-")) && header.ends_with("-01"),
        "{header}"
    );
}

#[tokio::test]
async fn one_request_is_followed_by_its_trace_id() {
    let stack = Stack::start(StackOptions {
        env: vec![
            ("SLUICE_LOG", "info,ingress=debug,workers=debug".to_owned()),
            ("SLUICE_LOG_FORMAT", "json".to_owned()),
        ],
        ..Default::default()
    })
    .await;

    // The caller's trace: Sluice joins it.
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let r = stack
        .chat(json!({"model": MODEL, "messages": [{"role": "user", "content": PROMPT}]}))
        .header(
            "traceparent",
            format!("00-{caller_trace}-00f067aa0ba902b7-01"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let first = r.headers()["x-sluice-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    r.text().await.unwrap();

    // No (or a malformed) traceparent: the request id is the trace id.
    let r = stack
        .chat(json!({"model": MODEL, "stream": true,
            "messages": [{"role": "user", "content": PROMPT}]}))
        .header("traceparent", "00-not-a-trace-01")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let second = r.headers()["x-sluice-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    r.text().await.unwrap();
    let derived = uuid::Uuid::parse_str(&second).unwrap().simple().to_string();

    stack.wait_projected("CompletionFinished", 2).await;
    follow(&stack, &first, caller_trace).await;
    follow(&stack, &second, &derived).await;

    // The logs are JSON throughout, and hold neither the prompt nor the key.
    for role in ["ingress", "worker", "journal", "billing", "projector"] {
        let log = stack.logs(role);
        for line in log.lines().filter(|l| !l.trim().is_empty()) {
            assert!(
                serde_json::from_str::<Value>(line).is_ok(),
                "{role} logged a non-JSON line: {line}"
            );
        }
        assert!(!log.contains(PROMPT), "{role} logged the prompt");
        assert!(!log.contains(KEY), "{role} logged the API key");
    }
    stack.stop().await;
}
