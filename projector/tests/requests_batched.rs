//! The batched `requests` projector folds exactly as the per-event upserts it replaced.
//!
//! The oracle below is that earlier implementation, kept verbatim as SQL: one upsert per
//! event, in log order, each column owned by the events that know it. Random logs (out of
//! order events, redelivered outcomes, attempts that arrive late, requests whose events are
//! split over batches) are folded by both, and the tables must be equal row for row,
//! whatever the batch size — a live projector's small batches, a replay's large ones.
#![allow(clippy::unwrap_used)]

mod common;

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use common::{t0, TestDb};
use projector::{append_batch, Projection, RequestsProjection, Runner, StoredEvent};
use schemas::events::{
    AttemptStarted, CompletionFinished, Metadata, RequestAccepted, RequestCancelled, RequestFailed,
};
use schemas::work::{Api, ErrorKind};
use schemas::{Envelope, Event, Usage, UsageSource};

/// A small deterministic generator (xorshift64*), so a failing log can be reproduced from
/// its seed without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

fn usage(rng: &mut Rng) -> Usage {
    let (p, c) = (rng.below(5_000), rng.below(2_000));
    Usage {
        prompt_tokens: p,
        completion_tokens: c,
        total_tokens: p + c,
        ..Usage::default()
    }
}

fn source(rng: &mut Rng) -> UsageSource {
    if rng.chance(50) {
        UsageSource::Provider
    } else {
        UsageSource::Estimated
    }
}

/// A terminal event of a random kind for `id`.
fn terminal(rng: &mut Rng, id: Uuid, key: Uuid, model: &str) -> Event {
    let channel = format!("ch{}", rng.below(4));
    match rng.below(3) {
        0 => Event::CompletionFinished(CompletionFinished {
            request_id: id,
            key_id: key,
            user_id: None,
            model: model.into(),
            channel_id: Uuid::now_v7(),
            channel_name: channel,
            upstream_model: format!("{model}-up{}", rng.below(3)),
            usage: usage(rng),
            usage_source: source(rng),
            finish_reason: Some("stop".into()),
            ttft_ms: rng.chance(80).then(|| rng.below(900)),
            duration_ms: rng.below(20_000),
            attempts: 1 + rng.below(3) as u32,
            session_id: None,
            content: None,
        }),
        1 => Event::RequestFailed(RequestFailed {
            request_id: id,
            key_id: key,
            user_id: None,
            model: model.into(),
            kind: [
                ErrorKind::RateLimited,
                ErrorKind::Timeout,
                ErrorKind::BadRequest,
            ][rng.below(3) as usize],
            status: 429,
            message: "failed".into(),
            attempts: rng.below(4) as u32,
            channel_id: rng.chance(50).then(Uuid::now_v7),
            usage: rng.chance(30).then(|| usage(rng)),
            usage_source: rng.chance(30).then(|| source(rng)),
        }),
        _ => Event::RequestCancelled(RequestCancelled {
            request_id: id,
            key_id: key,
            user_id: None,
            model: model.into(),
            channel_id: rng.chance(50).then(Uuid::now_v7),
            usage: usage(rng),
            usage_source: source(rng),
            reason: "client gone".into(),
        }),
    }
}

/// A log of `requests` requests whose events arrive in a shuffled order, some twice.
fn random_log(seed: u64, requests: usize) -> Vec<(i64, Envelope)> {
    let mut rng = Rng(seed);
    let keys: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
    let mut events: Vec<(Event, DateTime<Utc>)> = Vec::new();
    for n in 0..requests {
        let id = Uuid::now_v7();
        let key = keys[rng.below(3) as usize];
        let model = ["gpt-4o-mini", "claude-x"][rng.below(2) as usize];
        let at = t0() + Duration::seconds(n as i64 * 10);
        let mut own: Vec<(Event, DateTime<Utc>)> = Vec::new();
        if rng.chance(90) {
            own.push((
                Event::RequestAccepted(RequestAccepted {
                    request_id: id,
                    api: [Api::ChatCompletions, Api::Messages][rng.below(2) as usize],
                    model: model.into(),
                    stream: rng.chance(50),
                    key_id: key,
                    user_id: None,
                    group: "default".into(),
                    session_id: None,
                }),
                at,
            ));
        }
        for attempt in 1..=rng.below(4) {
            own.push((
                Event::AttemptStarted(AttemptStarted {
                    request_id: id,
                    attempt: attempt as u32,
                    channel_id: Uuid::now_v7(),
                    channel_name: format!("ch{}", rng.below(4)),
                    upstream_model: format!("{model}-up"),
                }),
                at + Duration::milliseconds(attempt as i64 * 100 + 7),
            ));
        }
        // None, one, or a redelivered second outcome.
        for k in 0..rng.below(3) {
            own.push((
                terminal(&mut rng, id, key, model),
                at + Duration::seconds(2 + k as i64),
            ));
        }
        // Events of one request come from several processes: any order is possible.
        if rng.chance(40) {
            rng.shuffle(&mut own);
        }
        events.extend(own);
    }
    // Interleave requests a little, as concurrent requests do, without losing the
    // per-request shuffles above.
    for i in 0..events.len() {
        if rng.chance(30) {
            let j = (i + rng.below(6) as usize).min(events.len() - 1);
            events.swap(i, j);
        }
    }
    events
        .into_iter()
        .enumerate()
        .map(|(i, (event, at))| {
            // Gaps in positions, as JetStream sequences may have.
            let position = i as i64 * 2 + 1;
            (position, event.into_envelope(at, Metadata::default()))
        })
        .collect()
}

/// The previous implementation: one upsert per event.
async fn oracle_apply(tx: &mut PgConnection, event: &StoredEvent) {
    let position = event.position;
    let at = event.envelope.occurred_at;
    let Ok(decoded) = event.envelope.decode() else {
        return;
    };
    match decoded {
        Event::RequestAccepted(e) => {
            sqlx::query(
                "INSERT INTO requests (request_id, key_id, model, api, stream, accepted_at, last_position) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) \
                 ON CONFLICT (request_id) DO UPDATE SET \
                   key_id = EXCLUDED.key_id, model = EXCLUDED.model, api = EXCLUDED.api, stream = EXCLUDED.stream, \
                   accepted_at = EXCLUDED.accepted_at, \
                   last_position = GREATEST(requests.last_position, EXCLUDED.last_position)",
            )
            .bind(e.request_id)
            .bind(e.key_id)
            .bind(&e.model)
            .bind(tag(&e.api))
            .bind(e.stream)
            .bind(at)
            .bind(position)
            .execute(&mut *tx)
            .await
            .unwrap();
        }
        Event::AttemptStarted(e) => {
            sqlx::query(
                "INSERT INTO requests (request_id, attempts, channel_id, channel_name, upstream_model, last_position) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (request_id) DO UPDATE SET \
                   attempts = EXCLUDED.attempts, channel_id = EXCLUDED.channel_id, \
                   channel_name = EXCLUDED.channel_name, upstream_model = EXCLUDED.upstream_model, \
                   last_position = GREATEST(requests.last_position, EXCLUDED.last_position) \
                 WHERE requests.status = 'accepted' AND EXCLUDED.attempts >= requests.attempts",
            )
            .bind(e.request_id)
            .bind(e.attempt as i32)
            .bind(e.channel_id)
            .bind(&e.channel_name)
            .bind(&e.upstream_model)
            .bind(position)
            .execute(&mut *tx)
            .await
            .unwrap();
        }
        Event::CompletionFinished(e) => {
            let t = OracleTerminal {
                request_id: e.request_id,
                key_id: e.key_id,
                model: e.model,
                status: "completed",
                channel_id: Some(e.channel_id),
                channel_name: Some(e.channel_name),
                upstream_model: Some(e.upstream_model),
                attempts: Some(e.attempts as i32),
                error_kind: None,
                usage: Some(e.usage),
                usage_source: Some(e.usage_source),
                ttft_ms: e.ttft_ms,
                duration_ms: Some(e.duration_ms),
            };
            oracle_finish(tx, position, at, t).await;
        }
        Event::RequestFailed(e) => {
            let t = OracleTerminal {
                request_id: e.request_id,
                key_id: e.key_id,
                model: e.model,
                status: "failed",
                channel_id: e.channel_id,
                channel_name: None,
                upstream_model: None,
                attempts: Some(e.attempts as i32),
                error_kind: tag(&e.kind),
                usage: e.usage,
                usage_source: e.usage_source,
                ttft_ms: None,
                duration_ms: None,
            };
            oracle_finish(tx, position, at, t).await;
        }
        Event::RequestCancelled(e) => {
            let t = OracleTerminal {
                request_id: e.request_id,
                key_id: e.key_id,
                model: e.model,
                status: "cancelled",
                channel_id: e.channel_id,
                channel_name: None,
                upstream_model: None,
                attempts: None,
                error_kind: None,
                usage: Some(e.usage),
                usage_source: Some(e.usage_source),
                ttft_ms: None,
                duration_ms: None,
            };
            oracle_finish(tx, position, at, t).await;
        }
        _ => {}
    }
}

struct OracleTerminal {
    request_id: Uuid,
    key_id: Uuid,
    model: String,
    status: &'static str,
    channel_id: Option<Uuid>,
    channel_name: Option<String>,
    upstream_model: Option<String>,
    attempts: Option<i32>,
    error_kind: Option<String>,
    usage: Option<Usage>,
    usage_source: Option<UsageSource>,
    ttft_ms: Option<u64>,
    duration_ms: Option<u64>,
}

async fn oracle_finish(tx: &mut PgConnection, position: i64, at: DateTime<Utc>, t: OracleTerminal) {
    sqlx::query(
        "INSERT INTO requests (request_id, key_id, model, status, channel_id, channel_name, upstream_model, \
                               attempts, error_kind, prompt_tokens, completion_tokens, usage_source, \
                               ttft_ms, duration_ms, finished_at, last_position) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, COALESCE($8, 0), $9, $10, $11, $12, $13, $14, $15, $16) \
         ON CONFLICT (request_id) DO UPDATE SET \
           status = EXCLUDED.status, \
           key_id = COALESCE(requests.key_id, EXCLUDED.key_id), \
           model = COALESCE(requests.model, EXCLUDED.model), \
           channel_id = COALESCE(EXCLUDED.channel_id, requests.channel_id), \
           channel_name = COALESCE(EXCLUDED.channel_name, requests.channel_name), \
           upstream_model = COALESCE(EXCLUDED.upstream_model, requests.upstream_model), \
           attempts = GREATEST(requests.attempts, COALESCE($8, 0)), \
           error_kind = EXCLUDED.error_kind, \
           prompt_tokens = EXCLUDED.prompt_tokens, \
           completion_tokens = EXCLUDED.completion_tokens, \
           usage_source = EXCLUDED.usage_source, \
           ttft_ms = EXCLUDED.ttft_ms, \
           duration_ms = EXCLUDED.duration_ms, \
           finished_at = EXCLUDED.finished_at, \
           last_position = GREATEST(requests.last_position, EXCLUDED.last_position) \
         WHERE requests.status = 'accepted'",
    )
    .bind(t.request_id)
    .bind(t.key_id)
    .bind(&t.model)
    .bind(t.status)
    .bind(t.channel_id)
    .bind(t.channel_name)
    .bind(t.upstream_model)
    .bind(t.attempts)
    .bind(t.error_kind)
    .bind(t.usage.map(|u| u.prompt_tokens as i64))
    .bind(t.usage.map(|u| u.completion_tokens as i64))
    .bind(t.usage_source.and_then(|s| tag(&s)))
    .bind(t.ttft_ms.map(|n| n as i64))
    .bind(t.duration_ms.map(|n| n as i64))
    .bind(at)
    .bind(position)
    .execute(&mut *tx)
    .await
    .unwrap();
}

fn tag<T: Serialize>(value: &T) -> Option<String> {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => Some(s),
        _ => None,
    }
}

/// Every row of `requests` as JSON, in request order.
async fn table(pool: &PgPool) -> Vec<serde_json::Value> {
    sqlx::query_scalar("SELECT to_jsonb(r) FROM requests r ORDER BY request_id")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Folds the log with the oracle into `db`, one upsert per event, in one transaction.
async fn fold_with_oracle(db: &TestDb, log: &[(i64, Envelope)]) {
    let mut tx = db.pool.begin().await.unwrap();
    for (position, envelope) in log {
        let stored = StoredEvent {
            position: *position,
            envelope: envelope.clone(),
            recorded_at: Utc::now(),
        };
        oracle_apply(&mut tx, &stored).await;
    }
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn batched_requests_equal_the_per_event_upserts_at_every_batch_size() {
    let oracle = TestDb::new().await;
    let batched = TestDb::new().await;
    for seed in [0x9E37_79B9_7F4A_7C15u64, 42, 7_777_777] {
        let log = random_log(seed, 150);
        // The oracle folds into its own schema; the projection reads the log from the
        // `batched` schema, starting over for each batch size.
        sqlx::query("TRUNCATE requests")
            .execute(&oracle.pool)
            .await
            .unwrap();
        fold_with_oracle(&oracle, &log).await;
        let expected = table(&oracle.pool).await;
        assert!(expected.len() > 100, "the log covers many requests");
        let statuses: std::collections::BTreeSet<String> = expected
            .iter()
            .map(|r| r["status"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            statuses.len(),
            4,
            "every outcome appears (seed {seed}): {statuses:?}"
        );

        sqlx::query("TRUNCATE event_log, requests, checkpoints")
            .execute(&batched.pool)
            .await
            .unwrap();
        append_batch(&batched.pool, &log).await.unwrap();
        // 1 and 7 split a request's events over many batches (rows read back and folded
        // on); 20,000 is a replay's batch: the whole log at once.
        for batch_size in [1, 7, 64, 20_000] {
            sqlx::query("TRUNCATE requests, checkpoints")
                .execute(&batched.pool)
                .await
                .unwrap();
            let mut projection = RequestsProjection::new();
            let done = Runner::new(batched.pool.clone())
                .batch_size(batch_size)
                .catch_up(&mut projection, None)
                .await
                .unwrap();
            assert_eq!(done.position, log.last().unwrap().0);
            assert_eq!(
                table(&batched.pool).await,
                expected,
                "seed {seed}, batch size {batch_size}"
            );
        }
    }
    oracle.cleanup().await;
    batched.cleanup().await;
}

#[tokio::test]
async fn a_rolled_back_batch_leaves_nothing_queued() {
    let db = TestDb::new().await;
    let log = random_log(5, 20);
    let mut projection = RequestsProjection::new();
    // Queue a batch, then drop it as the runner does after a failed transaction.
    {
        let mut tx = db.pool.begin().await.unwrap();
        for (position, envelope) in &log {
            let stored = StoredEvent {
                position: *position,
                envelope: envelope.clone(),
                recorded_at: Utc::now(),
            };
            projection.apply(&mut tx, &stored).await.unwrap();
        }
        tx.rollback().await.unwrap();
    }
    let mut conn = db.pool.acquire().await.unwrap();
    projection.init(&mut conn).await.unwrap();
    projection.flush(&mut conn).await.unwrap();
    drop(conn);
    assert!(table(&db.pool).await.is_empty());
    db.cleanup().await;
}
