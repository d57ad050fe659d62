//! Test isolation: each test gets its own namespace, hence its own Postgres schema and
//! JetStream streams on the shared servers, and removes them at the end.
#![allow(dead_code, clippy::unwrap_used)]

use std::future::Future;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use schemas::events::{
    AttemptStarted, CompletionFinished, Metadata, RequestAccepted, RequestCancelled, RequestFailed,
};
use schemas::work::{Api, ErrorKind};
use schemas::{Envelope, Event, Namespace, Usage, UsageSource};

pub fn database_url() -> String {
    std::env::var("SLUICE_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn nats_url() -> String {
    std::env::var("SLUICE_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

pub fn unique_ns() -> Namespace {
    let id = Uuid::now_v7().simple().to_string();
    // The random tail of a v7 id, so parallel tests never collide.
    Namespace::new(&format!("t_{}", &id[id.len() - 12..])).unwrap()
}

pub struct TestDb {
    pub ns: Namespace,
    pub pool: PgPool,
}

impl TestDb {
    pub async fn new() -> Self {
        let ns = unique_ns();
        let pool = projector::db::connect(&database_url(), &ns, 8)
            .await
            .unwrap();
        projector::db::migrate(&pool, &ns).await.unwrap();
        Self { ns, pool }
    }

    pub async fn cleanup(self) {
        projector::db::drop_schema(&self.pool, &self.ns)
            .await
            .unwrap();
        self.pool.close().await;
    }
}

pub struct TestBus {
    pub js: async_nats::jetstream::Context,
}

impl TestBus {
    pub async fn new(ns: &Namespace) -> Self {
        let client = projector::bus::connect(&nats_url(), "projector-tests")
            .await
            .unwrap();
        let js = async_nats::jetstream::new(client);
        projector::bus::ensure_streams(&js, ns).await.unwrap();
        Self { js }
    }

    pub async fn cleanup(self, ns: &Namespace) {
        projector::bus::delete_streams(&self.js, ns).await;
    }
}

/// Polls `check` until it returns true, failing the test after `limit`.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 10, 0, 0).unwrap()
}

pub fn env(event: Event, at: DateTime<Utc>) -> Envelope {
    event.into_envelope(at, Metadata::default())
}

/// A generic event nobody projects, for log-only tests.
pub fn noise(i: u32) -> Envelope {
    Envelope {
        event_id: Uuid::now_v7(),
        stream: format!("test-{i}"),
        event_type: "TestNoise".into(),
        schema_version: 1,
        occurred_at: t0(),
        data: serde_json::json!({"i": i}),
        metadata: Metadata::default(),
    }
}

pub fn accepted(request_id: Uuid, key_id: Uuid) -> Event {
    Event::RequestAccepted(RequestAccepted {
        request_id,
        api: Api::ChatCompletions,
        model: "gpt-4o-mini".into(),
        stream: true,
        key_id,
        user_id: None,
        group: "default".into(),
        session_id: None,
    })
}

pub fn attempt(request_id: Uuid, attempt: u32, channel: &str) -> Event {
    Event::AttemptStarted(AttemptStarted {
        request_id,
        attempt,
        channel_id: Uuid::now_v7(),
        channel_name: channel.into(),
        upstream_model: "gpt-4o-mini-2024-07-18".into(),
    })
}

pub fn usage(prompt: u64, completion: u64) -> Usage {
    Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
        ..Usage::default()
    }
}

pub fn finished(request_id: Uuid, key_id: Uuid, channel: &str, usage: Usage) -> Event {
    Event::CompletionFinished(CompletionFinished {
        request_id,
        key_id,
        user_id: None,
        model: "gpt-4o-mini".into(),
        channel_id: Uuid::now_v7(),
        channel_name: channel.into(),
        upstream_model: "gpt-4o-mini-2024-07-18".into(),
        usage,
        usage_source: UsageSource::Provider,
        finish_reason: Some("stop".into()),
        ttft_ms: Some(42),
        duration_ms: 420,
        attempts: 2,
        session_id: None,
        content: None,
    })
}

pub fn failed(request_id: Uuid, key_id: Uuid) -> Event {
    Event::RequestFailed(RequestFailed {
        request_id,
        key_id,
        user_id: None,
        model: "gpt-4o-mini".into(),
        kind: ErrorKind::RateLimited,
        status: 429,
        message: "slow down".into(),
        attempts: 3,
        channel_id: None,
        usage: None,
        usage_source: None,
    })
}

pub fn cancelled(request_id: Uuid, key_id: Uuid, usage: Usage) -> Event {
    Event::RequestCancelled(RequestCancelled {
        request_id,
        key_id,
        user_id: None,
        model: "gpt-4o-mini".into(),
        channel_id: None,
        usage,
        usage_source: UsageSource::Estimated,
        reason: "client gone".into(),
    })
}
