//! The billing projector on a real Postgres: ledger totals equal a hand computation, each
//! request is charged once at the price in force when it happened, balances and daily
//! usage agree with the ledger, and a replay into a fresh schema is identical.
#![allow(clippy::unwrap_used)]

mod common;

use common::TestDb;

use chrono::{DateTime, Duration, TimeZone, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use billing::{BillingProjection, PriceBook};
use projector::{append_batch, Runner};
use schemas::config::PriceConfig;
use schemas::events::{
    CompletionFinished, CreditGranted, Metadata, PriceSet, RequestCancelled, RequestFailed,
};
use schemas::work::ErrorKind;
use schemas::{Envelope, Event, Nanos, Price, Usage, UsageSource};

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 10, 0, 0).unwrap()
}

fn env(event: Event, at: DateTime<Utc>) -> Envelope {
    event.into_envelope(at, Metadata::default())
}

fn usage(prompt: u64, completion: u64, cached: u64) -> Usage {
    Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
        cached_tokens: cached,
        reasoning_tokens: 0,
        cache_creation_tokens: 0,
        images: 0,
    }
}

fn finished(request_id: Uuid, key_id: Uuid, model: &str, usage: Usage) -> Event {
    Event::CompletionFinished(CompletionFinished {
        request_id,
        key_id,
        user_id: None,
        model: model.into(),
        channel_id: Uuid::now_v7(),
        channel_name: "main".into(),
        upstream_model: format!("{model}-upstream"),
        usage,
        usage_source: UsageSource::Provider,
        finish_reason: Some("stop".into()),
        ttft_ms: Some(10),
        duration_ms: 100,
        attempts: 1,
        session_id: None,
        content: None,
    })
}

fn cancelled(request_id: Uuid, key_id: Uuid, usage: Usage) -> Event {
    Event::RequestCancelled(RequestCancelled {
        request_id,
        key_id,
        user_id: None,
        model: MODEL.into(),
        channel_id: None,
        usage,
        usage_source: UsageSource::Estimated,
        reason: "client gone".into(),
    })
}

fn failed(request_id: Uuid, key_id: Uuid, usage: Option<Usage>) -> Event {
    Event::RequestFailed(RequestFailed {
        request_id,
        key_id,
        user_id: None,
        model: MODEL.into(),
        kind: ErrorKind::Upstream5xx,
        status: 502,
        message: "upstream broke mid-stream".into(),
        attempts: 1,
        channel_id: None,
        usage,
        usage_source: usage.map(|_| UsageSource::Provider),
    })
}

fn price_set(price: Price, effective_at: DateTime<Utc>) -> Event {
    Event::PriceSet(PriceSet {
        model: MODEL.into(),
        price,
        effective_at,
    })
}

const MODEL: &str = "gpt-4o-mini";

/// Odd per-million prices, so that rounding to whole nano-dollars matters.
const OLD: Price = Price {
    input_per_mtok: Nanos(2_500_001),
    output_per_mtok: Nanos(7_777_777),
    cached_input_per_mtok: Some(Nanos(1_250_003)),
    per_request: Nanos(0),
};
const NEW: Price = Price {
    input_per_mtok: Nanos(3_333_333),
    output_per_mtok: Nanos(9_999_999),
    cached_input_per_mtok: None,
    per_request: Nanos(1_000),
};

/// The same arithmetic as the price rules, written out by hand: uncached prompt tokens at
/// the input rate, cached ones at the cached rate (input rate if none), completion at the
/// output rate, all per million and rounded half up once, plus the flat per-request amount.
fn by_hand(
    input: i64,
    output: i64,
    cached_rate: i64,
    per_request: i64,
    prompt: i64,
    completion: i64,
    cached: i64,
) -> i64 {
    let micro = (prompt - cached) * input + cached * cached_rate + completion * output;
    (micro + 500_000) / 1_000_000 + per_request
}

struct Scenario {
    log: Vec<(i64, Envelope)>,
    key_a: Uuid,
    key_b: Uuid,
    /// Expected charge per request, computed by hand.
    expected: Vec<(Uuid, i64)>,
}

fn scenario() -> Scenario {
    let (key_a, key_b) = (Uuid::now_v7(), Uuid::now_v7());
    let r: Vec<Uuid> = (0..7).map(|_| Uuid::now_v7()).collect();
    let m = |mins: i64| t0() + Duration::minutes(mins);
    let events = vec![
        env(price_set(OLD, m(-60)), m(-60)),
        // The price change is in the log before the older events: they still get OLD.
        env(price_set(NEW, m(60)), m(-30)),
        env(finished(r[0], key_a, MODEL, usage(1_000, 500, 400)), m(0)),
        env(finished(r[1], key_a, MODEL, usage(3, 1, 0)), m(30)),
        // Redelivery: the same request finishes again; charged once (the first).
        env(finished(r[0], key_a, MODEL, usage(9_999, 9_999, 0)), m(90)),
        env(cancelled(r[2], key_b, usage(50, 20, 10)), m(90)),
        env(failed(r[3], key_b, Some(usage(123, 45, 0))), m(120)),
        env(failed(r[4], key_b, None), m(120)),
        env(
            finished(r[5], key_a, "unpriced-model", usage(10, 10, 0)),
            m(130),
        ),
        env(
            Event::CreditGranted(CreditGranted {
                key_id: key_a,
                amount: Nanos(5_000_000_000),
                note: "welcome".into(),
            }),
            m(140),
        ),
        // The next UTC day.
        env(
            finished(r[6], key_a, MODEL, usage(777, 333, 111)),
            m(24 * 60),
        ),
    ];
    let expected = vec![
        (
            r[0],
            by_hand(2_500_001, 7_777_777, 1_250_003, 0, 1_000, 500, 400),
        ),
        (r[1], by_hand(2_500_001, 7_777_777, 1_250_003, 0, 3, 1, 0)),
        (
            r[2],
            by_hand(3_333_333, 9_999_999, 3_333_333, 1_000, 50, 20, 10),
        ),
        (
            r[3],
            by_hand(3_333_333, 9_999_999, 3_333_333, 1_000, 123, 45, 0),
        ),
        (r[5], 0),
        (
            r[6],
            by_hand(3_333_333, 9_999_999, 3_333_333, 1_000, 777, 333, 111),
        ),
    ];
    // Positions with gaps, as the journal may leave.
    let log = events
        .into_iter()
        .enumerate()
        .map(|(i, e)| (i as i64 * 3 + 1, e))
        .collect();
    Scenario {
        log,
        key_a,
        key_b,
        expected,
    }
}

async fn sum(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// Every billing read model as JSON rows, in a fixed order, for exact comparison.
/// The read models compared between runs.
const TABLES: &[&str] = &[
    "SELECT to_jsonb(t) FROM ledger_entries t ORDER BY position",
    "SELECT to_jsonb(t) FROM key_balances t ORDER BY key_id",
    "SELECT to_jsonb(t) FROM daily_usage t ORDER BY day, key_id, model",
    "SELECT to_jsonb(t) FROM prices t ORDER BY model, effective_at, position",
];

async fn snapshot(pool: &PgPool) -> Vec<serde_json::Value> {
    common::snapshot(pool, TABLES).await
}

#[tokio::test]
async fn ledger_equals_the_hand_computed_charges() {
    let db = TestDb::new().await;
    let s = scenario();
    append_batch(&db.pool, &s.log).await.unwrap();
    let mut billing = BillingProjection::new(None);
    let done = Runner::new(db.pool.clone())
        .catch_up(&mut billing, None)
        .await
        .unwrap();
    assert_eq!(done.applied, 11);

    // Per request: the hand-computed amount, and one row each (the duplicate charged once).
    let charged: Vec<(Uuid, i64, bool)> = sqlx::query_as(
        "SELECT request_id, amount_nanos, priced FROM ledger_entries WHERE kind = 'usage' ORDER BY position",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let got: Vec<(Uuid, i64)> = charged
        .iter()
        .map(|(id, amount, _)| (*id, *amount))
        .collect();
    assert_eq!(got, s.expected);
    assert_eq!(
        charged.iter().filter(|(_, _, priced)| !priced).count(),
        1,
        "the unknown model is unpriced"
    );
    let first: (i64, i64) = sqlx::query_as(
        "SELECT prompt_tokens, completion_tokens FROM ledger_entries WHERE request_id = $1",
    )
    .bind(s.expected[0].0)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        first,
        (1_000, 500),
        "the first completion of a redelivered request is the one charged"
    );

    let total: i64 = s.expected.iter().map(|(_, amount)| amount).sum();
    assert_eq!(
        sum(
            &db.pool,
            "SELECT sum(amount_nanos)::bigint FROM ledger_entries WHERE kind = 'usage'"
        )
        .await,
        total
    );
    assert_eq!(
        sum(
            &db.pool,
            "SELECT sum(amount_nanos)::bigint FROM ledger_entries WHERE kind = 'credit'"
        )
        .await,
        -5_000_000_000
    );

    // Balances agree with the ledger, key by key.
    let a_spent: i64 = s
        .expected
        .iter()
        .filter(|(id, _)| *id != s.expected[2].0 && *id != s.expected[3].0)
        .map(|(_, a)| a)
        .sum();
    let b_spent = s.expected[2].1 + s.expected[3].1;
    let balance = |key: Uuid| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_as::<_, (i64, i64, i64)>(
                "SELECT granted_nanos, spent_nanos, requests FROM key_balances WHERE key_id = $1",
            )
            .bind(key)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(balance(s.key_a).await, (5_000_000_000, a_spent, 4));
    assert_eq!(balance(s.key_b).await, (0, b_spent, 2));
    assert_eq!(
        sum(
            &db.pool,
            "SELECT sum(spent_nanos)::bigint FROM key_balances"
        )
        .await,
        sum(
            &db.pool,
            "SELECT sum(amount_nanos)::bigint FROM ledger_entries WHERE kind = 'usage'"
        )
        .await
    );

    // Daily usage: split by UTC day and model, and summing to the ledger.
    let days: Vec<(chrono::NaiveDate, Uuid, String, i64, i64, i64)> = sqlx::query_as(
        "SELECT day, key_id, model, requests, cached_tokens, cost_nanos FROM daily_usage ORDER BY day, key_id, model",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let day1 = t0().date_naive();
    let day2 = day1.succ_opt().unwrap();
    let mut expected_days = vec![
        (
            day1,
            s.key_a,
            MODEL.to_owned(),
            2,
            400,
            s.expected[0].1 + s.expected[1].1,
        ),
        (day1, s.key_a, "unpriced-model".to_owned(), 1, 0, 0),
        (day1, s.key_b, MODEL.to_owned(), 2, 10, b_spent),
        (day2, s.key_a, MODEL.to_owned(), 1, 111, s.expected[5].1),
    ];
    expected_days.sort();
    let mut days_sorted = days.clone();
    days_sorted.sort();
    assert_eq!(days_sorted, expected_days);
    assert_eq!(
        sum(&db.pool, "SELECT sum(cost_nanos)::bigint FROM daily_usage").await,
        total
    );

    // The price history is a read model too.
    assert_eq!(billing.prices().history(MODEL).len(), 2);
    db.cleanup().await;
}

#[tokio::test]
async fn replays_into_fresh_schemas_are_identical() {
    let s = scenario();
    let mut snapshots = Vec::new();
    // Different batch sizes: batch boundaries must not change the result.
    for batch_size in [1, 500] {
        let db = TestDb::new().await;
        append_batch(&db.pool, &s.log).await.unwrap();
        Runner::new(db.pool.clone())
            .batch_size(batch_size)
            .catch_up(&mut BillingProjection::new(None), None)
            .await
            .unwrap();
        snapshots.push(snapshot(&db.pool).await);
        db.cleanup().await;
    }
    assert!(
        snapshots[0].len() >= 15,
        "the snapshot covers the read models"
    );
    assert_eq!(snapshots[0], snapshots[1]);
}

#[tokio::test]
async fn a_price_override_reprices_every_event() {
    let db = TestDb::new().await;
    let s = scenario();
    append_batch(&db.pool, &s.log).await.unwrap();
    let book = PriceBook::from_configs(&[PriceConfig {
        model: MODEL.into(),
        input_per_mtok: "1".into(),
        output_per_mtok: "2".into(),
        cached_input_per_mtok: None,
        per_request: None,
    }])
    .unwrap();
    Runner::new(db.pool.clone())
        .catch_up(&mut BillingProjection::new(Some(book)), None)
        .await
        .unwrap();

    // $1 and $2 per million tokens are 1,000 and 2,000 nanos per token.
    let expected = [
        1_000 * 1_000 + 500 * 2_000,
        3 * 1_000 + 2_000,
        50 * 1_000 + 20 * 2_000,
        123 * 1_000 + 45 * 2_000,
        0,
        777 * 1_000 + 333 * 2_000,
    ];
    let amounts: Vec<i64> = sqlx::query_scalar(
        "SELECT amount_nanos FROM ledger_entries WHERE kind = 'usage' ORDER BY position",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(amounts, expected);
    assert_eq!(
        sum(&db.pool, "SELECT count(*) FROM prices").await,
        0,
        "PriceSet events are ignored"
    );
    db.cleanup().await;
}

#[tokio::test]
async fn an_instance_that_was_idle_reloads_prices_before_billing() {
    let db = TestDb::new().await;
    let key = Uuid::now_v7();
    let runner = Runner::new(db.pool.clone());
    // The standby loads its (empty) prices, then another instance moves on.
    let mut standby = BillingProjection::new(None);
    runner.catch_up(&mut standby, None).await.unwrap();
    let mut active = BillingProjection::new(None);
    let first = vec![
        (1, env(price_set(OLD, t0()), t0())),
        (
            2,
            env(
                finished(Uuid::now_v7(), key, MODEL, usage(1_000_000, 0, 0)),
                t0(),
            ),
        ),
    ];
    append_batch(&db.pool, &first).await.unwrap();
    runner.catch_up(&mut active, None).await.unwrap();

    // The standby takes over: it must bill at the price the other instance stored.
    let later = vec![(
        3,
        env(
            finished(Uuid::now_v7(), key, MODEL, usage(1_000_000, 0, 0)),
            t0(),
        ),
    )];
    append_batch(&db.pool, &later).await.unwrap();
    runner.catch_up(&mut standby, None).await.unwrap();
    let amounts: Vec<i64> =
        sqlx::query_scalar("SELECT amount_nanos FROM ledger_entries ORDER BY position")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(amounts, vec![2_500_001, 2_500_001]);
    db.cleanup().await;
}
