//! `/metrics` after real traffic: the ingress's series on its API port, the worker's on
//! its SLUICE_METRICS_LISTEN, each counter and histogram with the labels the Grafana
//! dashboard (deploy/grafana/sluice.json) queries.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{channel_yaml, free_port, Stack, StackOptions, MODEL};
use serde_json::json;

/// One sample: metric name, labels, value.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("`series value`");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("value of {line}"));
        let (name, labels) = match series.split_once('{') {
            None => (series.to_owned(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("closing }");
                let mut labels = BTreeMap::new();
                // Our label values never contain `",`; split on it.
                for pair in body.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once("=\"").expect("k=\"v\"");
                    labels.insert(k.to_owned(), v.trim_end_matches('"').to_owned());
                }
                (name.to_owned(), labels)
            }
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

/// The sum of `name`'s samples whose labels include all of `want`.
fn total(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            want.iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

fn has(samples: &[Sample], name: &str) -> bool {
    samples.iter().any(|s| s.name == name)
}

async fn scrape(http: &reqwest::Client, url: &str) -> (String, Vec<Sample>) {
    let r = http.get(url).send().await.expect("scrape");
    assert_eq!(r.status(), 200, "{url}");
    let content_type = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let text = r.text().await.expect("body");
    let samples = parse(&text);
    (text, samples)
}

/// Scrapes `url` until `ready` holds (series are recorded as responses end, a moment
/// after the client has read them), or fails with the last scrape.
async fn scrape_until(
    http: &reqwest::Client,
    url: &str,
    ready: impl Fn(&[Sample]) -> bool,
) -> Vec<Sample> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (text, samples) = scrape(http, url).await;
        if ready(&samples) {
            return samples;
        }
        assert!(Instant::now() < deadline, "{url} never got there:\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn metrics_after_traffic_have_the_right_labels() {
    // A channel nobody listens on is tried first: its attempts fail (connection refused)
    // and, after `failure_threshold` of them, it is banned; `mock-main` answers.
    let dead = free_port();
    let mut stack = Stack::start(StackOptions {
        workers: 0,
        extra_channels: channel_yaml(
            "dead",
            "openai",
            &format!("http://127.0.0.1:{dead}/v1"),
            MODEL,
            0,
        ),
        ..Default::default()
    })
    .await;
    let worker_metrics = format!("127.0.0.1:{}", free_port());
    let worker = stack
        .command("worker")
        .env("SLUICE_METRICS_LISTEN", &worker_metrics)
        .spawn()
        .expect("spawn worker");
    stack.roles.insert("worker", worker);

    let rounds = 4;
    for _ in 0..rounds {
        let r = stack
            .chat(json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.text().await.unwrap();
        let r = stack
            .chat(json!({"model": MODEL, "stream": true,
                "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.text().await.unwrap().contains("[DONE]"));
    }
    let r = stack
        .chat(json!({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    stack
        .wait_projected("CompletionFinished", 2 * rounds as i64)
        .await;

    // The ingress: HTTP requests by route, model and status, timed.
    let http = stack.http.clone();
    let chat = [("route", "/v1/chat/completions"), ("model", MODEL)];
    let ingress = scrape_until(&http, &format!("{}/metrics", stack.base), |s| {
        total(
            s,
            "sluice_http_requests_total",
            &[chat[0], chat[1], ("status", "200")],
        ) >= f64::from(2 * rounds)
            && total(s, "sluice_http_requests_total", &[("status", "404")]) >= 1.0
    })
    .await;
    // An unknown model is no label: a client cannot mint series.
    assert_eq!(
        total(
            &ingress,
            "sluice_http_requests_total",
            &[("model", "no-such-model")]
        ),
        0.0
    );
    assert!(
        total(
            &ingress,
            "sluice_http_requests_total",
            &[chat[0], ("model", "none"), ("status", "404")]
        ) >= 1.0
    );
    assert!(
        total(
            &ingress,
            "sluice_http_request_duration_seconds_count",
            &chat
        ) >= f64::from(2 * rounds)
    );
    let buckets: Vec<&Sample> = ingress
        .iter()
        .filter(|s| s.name == "sluice_http_request_duration_seconds_bucket")
        .filter(|s| s.labels.get("route").map(String::as_str) == Some(chat[0].1))
        .collect();
    assert!(
        buckets
            .iter()
            .any(|s| s.labels.get("le").map(String::as_str) == Some("+Inf")),
        "a histogram with buckets: {buckets:?}"
    );
    // Sampled at scrape time: the queue is empty, the journal and projectors caught up
    // (wait_projected above), so the lags are 0 and the log head is positive.
    assert!(has(&ingress, "sluice_queue_depth"));
    assert_eq!(total(&ingress, "sluice_queue_depth", &[]), 0.0);
    assert!(total(&ingress, "sluice_event_log_head", &[]) > 0.0);
    assert!(has(&ingress, "sluice_journal_lag_events"));
    for projector in ["billing", "requests"] {
        assert!(
            ingress
                .iter()
                .any(|s| s.name == "sluice_projector_lag_events"
                    && s.labels.get("projector").map(String::as_str) == Some(projector)),
            "lag of {projector}"
        );
        assert!(ingress
            .iter()
            .any(|s| s.name == "sluice_projector_lag_seconds"
                && s.labels.get("projector").map(String::as_str) == Some(projector)));
    }

    // The worker: outcomes, latency and time to first token, tokens, by model and channel;
    // upstream errors and bans by channel and kind; requests in flight.
    let served = [("model", MODEL), ("channel", "mock-main")];
    let worker = scrape_until(&http, &format!("http://{worker_metrics}/metrics"), |s| {
        total(
            s,
            "sluice_worker_requests_total",
            &[
                served[0],
                served[1],
                ("outcome", "finished"),
                ("status", "200"),
            ],
        ) >= f64::from(2 * rounds)
    })
    .await;
    assert!(
        total(&worker, "sluice_request_duration_seconds_count", &served) >= f64::from(2 * rounds)
    );
    assert!(
        total(&worker, "sluice_time_to_first_token_seconds_count", &served)
            >= f64::from(2 * rounds)
    );
    assert!(worker
        .iter()
        .any(|s| s.name == "sluice_time_to_first_token_seconds_bucket"
            && s.labels.get("le").map(String::as_str) == Some("+Inf")));
    let tokens_in = total(
        &worker,
        "sluice_tokens_total",
        &[served[0], served[1], ("direction", "in")],
    );
    let tokens_out = total(
        &worker,
        "sluice_tokens_total",
        &[served[0], served[1], ("direction", "out")],
    );
    assert!(
        tokens_in > 0.0 && tokens_out > 0.0,
        "in {tokens_in}, out {tokens_out}"
    );
    // The billed usage and the counters agree.
    let billed: (i64, i64) = sqlx::query_as(
        "SELECT COALESCE(sum((data->'usage'->>'prompt_tokens')::bigint), 0)::bigint, \
                COALESCE(sum((data->'usage'->>'completion_tokens')::bigint), 0)::bigint \
         FROM event_log WHERE type = 'CompletionFinished'",
    )
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    assert_eq!((tokens_in as i64, tokens_out as i64), billed);
    assert!(
        total(
            &worker,
            "sluice_upstream_errors_total",
            &[("channel", "dead"), ("kind", "connection")]
        ) >= 1.0,
        "the dead channel's failed attempts"
    );
    assert!(
        total(&worker, "sluice_channel_bans_total", &[("channel", "dead")]) >= 1.0,
        "the dead channel was banned"
    );
    assert!(has(&worker, "sluice_worker_in_flight"));
    assert_eq!(total(&worker, "sluice_worker_in_flight", &[]), 0.0);
    assert!(
        total(
            &worker,
            "sluice_queue_wait_seconds_count",
            &[("model", MODEL)]
        ) >= f64::from(2 * rounds)
    );
    // Every series the Grafana dashboard queries exists, with the name it queries.
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana/sluice.json"
    ))
    .unwrap();
    serde_json::from_str::<serde_json::Value>(&dashboard).expect("the dashboard is JSON");
    let mut queried: Vec<&str> = dashboard
        .match_indices("sluice_")
        .map(|(i, _)| {
            let rest = &dashboard[i..];
            let end = rest
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect();
    queried.sort_unstable();
    queried.dedup();
    assert!(queried.len() >= 10, "{queried:?}");
    for name in queried {
        assert!(
            has(&ingress, name) || has(&worker, name),
            "the dashboard queries `{name}`, which no /metrics serves"
        );
    }
    // The worker's health check answers on the same listener.
    let health = http
        .get(format!("http://{worker_metrics}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    stack.stop().await;
}
