//! A namespace of its own per test (schema + streams), real NATS and Postgres, channels
//! pointing at `MockUpstream`s, and helpers to send a request and read what came back.
#![allow(clippy::unwrap_used, dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use async_nats::jetstream;
use chrono::Utc;
use futures::StreamExt;
use mock_upstream::{MockConfig, MockUpstream};
use schemas::work::{Api, ApiErrorInfo, DoneData, Frame, FrameKind, WorkItem};
use schemas::{Envelope, Namespace};
use serde_json::Value;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use workers::{WorkerError, WorkerOptions};

pub const NATS_URL: &str = "nats://127.0.0.1:4222";
pub const DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

pub struct Harness {
    pub ns: Namespace,
    pub nats: async_nats::Client,
    pub js: jetstream::Context,
    pub pool: PgPool,
    shutdown: CancellationToken,
    workers: Vec<JoinHandle<Result<(), WorkerError>>>,
}

/// A channel row to insert.
pub struct ChannelRow<'a> {
    pub name: &'a str,
    pub base_url: String,
    pub models: &'a [&'a str],
    pub model_map: Value,
    pub priority: i32,
    pub weight: i32,
    pub retry: i32,
    pub api_key_sealed: Option<String>,
    /// The `timeouts` column (`{"first_token_secs": 1, ...}`); `{}` = the workers' defaults.
    pub timeouts: Value,
}

impl<'a> ChannelRow<'a> {
    pub fn new(name: &'a str, mock: &MockUpstream, models: &'a [&'a str]) -> Self {
        Self {
            name,
            base_url: mock.base_url(),
            models,
            model_map: serde_json::json!({}),
            priority: 0,
            weight: 1,
            retry: 1,
            api_key_sealed: None,
            timeouts: serde_json::json!({}),
        }
    }
}

/// What came back for one request.
#[derive(Debug)]
pub struct Answer {
    pub request_id: Uuid,
    pub frames: Vec<Frame>,
    /// NATS messages the frames came in (the worker coalesces chunks).
    pub messages: usize,
}

impl Answer {
    pub fn last(&self) -> &Frame {
        self.frames.last().unwrap()
    }
    pub fn chunks(&self) -> Vec<Value> {
        self.frames
            .iter()
            .filter(|f| f.kind == FrameKind::Chunk)
            .map(|f| serde_json::from_str(f.data.get()).unwrap())
            .collect()
    }
    /// The streamed text, reassembled from the chunks' deltas.
    pub fn text(&self) -> String {
        self.chunks()
            .iter()
            .filter_map(|c| {
                c.pointer("/choices/0/delta/content")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .collect()
    }
    pub fn done(&self) -> DoneData {
        assert_eq!(
            self.last().kind,
            FrameKind::Done,
            "expected Done, got {:?}",
            self.frames
        );
        serde_json::from_str(self.last().data.get()).unwrap()
    }
    pub fn error(&self) -> ApiErrorInfo {
        assert_eq!(
            self.last().kind,
            FrameKind::Error,
            "expected Error, got {:?}",
            self.frames
        );
        serde_json::from_str(self.last().data.get()).unwrap()
    }
    /// Every frame numbered 1, 2, 3, ... with no gap or repeat.
    pub fn assert_seq_contiguous(&self) {
        let seqs: Vec<u64> = self.frames.iter().map(|f| f.seq).collect();
        let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, expected);
    }
}

pub async fn mock() -> MockUpstream {
    mock_with(MockConfig::default()).await
}

pub async fn mock_with(config: MockConfig) -> MockUpstream {
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    MockUpstream::start(addr, config).await.unwrap()
}

/// Options that keep tests fast: channel changes are seen within 200 ms.
pub fn fast_options() -> WorkerOptions {
    WorkerOptions {
        channel_refresh: Duration::from_millis(200),
        shutdown_grace: Duration::from_secs(5),
        ..WorkerOptions::default()
    }
}

impl Harness {
    pub async fn new() -> Harness {
        let ns = Namespace::new(&format!("t_{}", Uuid::now_v7().simple())).unwrap();
        let pool = projector::db::connect(DATABASE_URL, &ns, 4).await.unwrap();
        projector::db::migrate(&pool, &ns).await.unwrap();
        let nats = projector::bus::connect(NATS_URL, "workers-test")
            .await
            .unwrap();
        let js = jetstream::new(nats.clone());
        projector::bus::ensure_streams(&js, &ns).await.unwrap();
        Harness {
            ns,
            nats,
            js,
            pool,
            shutdown: CancellationToken::new(),
            workers: Vec::new(),
        }
    }

    /// A harness with one channel, `main`, serving `gpt-test` from a mock with `config`,
    /// and one worker with [`fast_options`]; the mock is returned to keep it up.
    pub async fn with_main_channel(config: MockConfig) -> (Harness, MockUpstream) {
        let mut h = Harness::new().await;
        let up = mock_with(config).await;
        h.add_channel(ChannelRow::new("main", &up, &["gpt-test"]))
            .await;
        h.start_worker(fast_options());
        (h, up)
    }

    pub async fn add_channel(&self, row: ChannelRow<'_>) -> Uuid {
        let id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO channels (id, name, channel_type, base_url, api_key_sealed, models, model_map, priority, weight, retry, timeouts) \
             VALUES ($1, $2, 'mock', $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(id)
        .bind(row.name)
        .bind(&row.base_url)
        .bind(&row.api_key_sealed)
        .bind(row.models.iter().map(|m| (*m).to_owned()).collect::<Vec<_>>())
        .bind(sqlx::types::Json(&row.model_map))
        .bind(row.priority)
        .bind(row.weight)
        .bind(row.retry)
        .bind(sqlx::types::Json(&row.timeouts))
        .execute(&self.pool)
        .await
        .unwrap();
        id
    }

    pub fn start_worker(&mut self, opts: WorkerOptions) {
        let task = tokio::spawn(workers::run_worker(
            self.nats.clone(),
            self.pool.clone(),
            self.ns.clone(),
            opts,
            self.shutdown.clone(),
        ));
        self.workers.push(task);
    }

    pub fn work_item(&self, model: &str, body: Value) -> WorkItem {
        let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
        let include_usage = body
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        WorkItem {
            request_id: Uuid::now_v7(),
            api: Api::ChatCompletions,
            model: model.to_owned(),
            stream,
            include_usage,
            body: serde_json::value::to_raw_value(&body).unwrap(),
            key_id: Uuid::now_v7(),
            user_id: None,
            group: "default".to_owned(),
            accepted_at: Utc::now(),
            deadline: Utc::now() + chrono::Duration::seconds(30),
            trace_id: None,
            forward_headers: Vec::new(),
            session_id: None,
        }
    }

    /// Subscribes to the request's chunk subject, then queues it, as the ingress does.
    pub async fn subscribe_and_queue(&self, item: &WorkItem) -> async_nats::Subscriber {
        let sub = self
            .nats
            .subscribe(self.ns.chunk_subject(&item.request_id))
            .await
            .unwrap();
        self.queue(item).await;
        sub
    }

    pub async fn queue(&self, item: &WorkItem) {
        let payload = serde_json::to_vec(item).unwrap();
        self.js
            .publish(self.ns.request_subject(&item.model), payload.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// Sends a request and reads frames until a terminal one.
    pub async fn send(&self, model: &str, body: Value) -> Answer {
        let item = self.work_item(model, body);
        let mut sub = self.subscribe_and_queue(&item).await;
        read_answer(item.request_id, &mut sub).await
    }

    /// Every stored event of the namespace whose subject passes `keep`, in stream order.
    async fn stored_events(&self, keep: impl Fn(&str) -> bool) -> Vec<Envelope> {
        let stream = self.js.get_stream(self.ns.events_stream()).await.unwrap();
        let last = stream.get_info().await.unwrap().state.last_sequence;
        let mut out = Vec::new();
        for seq in 1..=last {
            if let Ok(msg) = stream.direct_get(seq).await {
                if keep(msg.subject.as_str()) {
                    out.push(serde_json::from_slice(&msg.payload).unwrap());
                }
            }
        }
        out
    }

    /// Every event of a request, in stream order.
    pub async fn events(&self, request_id: Uuid) -> Vec<Envelope> {
        let subject = self
            .ns
            .event_subject(&schemas::events::request_stream(&request_id));
        self.stored_events(|s| s == subject).await
    }

    /// Every stored event of `event_type` in the namespace, whatever its stream (bans are
    /// on their channel's), in stream order.
    pub async fn events_of(&self, event_type: &str) -> Vec<Envelope> {
        let mut all = self.stored_events(|_| true).await;
        all.retain(|e| e.event_type == event_type);
        all
    }

    pub async fn event_types(&self, request_id: Uuid) -> Vec<String> {
        self.events(request_id)
            .await
            .into_iter()
            .map(|e| e.event_type)
            .collect()
    }

    /// The one event of `event_type` for the request, decoded data.
    pub async fn event(&self, request_id: Uuid, event_type: &str) -> Value {
        let mut found: Vec<Value> = self
            .events(request_id)
            .await
            .into_iter()
            .filter(|e| e.event_type == event_type)
            .map(|e| e.data)
            .collect();
        assert_eq!(found.len(), 1, "expected one {event_type}");
        found.pop().unwrap()
    }

    /// Stops the workers and removes the namespace's streams and schema.
    pub async fn cleanup(self) {
        self.shutdown.cancel();
        for w in self.workers {
            tokio::time::timeout(Duration::from_secs(10), w)
                .await
                .expect("worker stops on shutdown")
                .unwrap()
                .expect("worker ends cleanly");
        }
        projector::bus::delete_streams(&self.js, &self.ns).await;
        projector::db::drop_schema(&self.pool, &self.ns)
            .await
            .unwrap();
    }
}

pub async fn read_answer(request_id: Uuid, sub: &mut async_nats::Subscriber) -> Answer {
    let mut frames: Vec<Frame> = Vec::new();
    let mut messages = 0;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(15), sub.next())
            .await
            .expect("frames arrive in time")
            .expect("subscription open");
        let batch: Vec<Frame> = serde_json::from_slice(&msg.payload).expect("a batch of frames");
        let end = batch
            .iter()
            .any(|f| matches!(f.kind, FrameKind::Done | FrameKind::Error));
        frames.extend(batch);
        messages += 1;
        if end {
            return Answer {
                request_id,
                frames,
                messages,
            };
        }
    }
}

/// A chat body for `model`, with the mock's knobs.
pub fn chat(model: &str, stream: bool, include_usage: bool, mock: Value) -> Value {
    let mut body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "say something predictable"}],
        "mock": mock,
    });
    if stream {
        body["stream"] = Value::Bool(true);
        if include_usage {
            body["stream_options"] = serde_json::json!({"include_usage": true});
        }
    }
    body
}

/// `tok0 tok1 ... tok{n-1} `, what the mock generates.
pub fn mock_text(n: u32) -> String {
    (0..n).map(|i| format!("tok{i} ")).collect()
}
