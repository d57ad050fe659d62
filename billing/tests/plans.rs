//! Plans in the billing projector on a real Postgres: a subscribed user's charges on the
//! plan's models are paid from the month's plan quota first and from the balance after;
//! other models are paid from the balance; the month is the UTC calendar month of the
//! charge; redeliveries consume no quota; switching plans does not refill the month; and
//! the result is the same whatever the batch size or however often the projector restarts.
#![allow(clippy::unwrap_used)]

mod common;

use common::TestDb;

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use billing::BillingProjection;
use projector::{append_batch, Runner};
use schemas::events::{
    CompletionFinished, CreditGranted, Metadata, PlanConfigured, PlanSubscribed, PlanUnsubscribed,
    PriceSet, UserCreditGranted,
};
use schemas::{Envelope, Event, Namespace, Nanos, Price, Usage, UsageSource};

const MODEL: &str = "model-a";
const OTHER: &str = "model-b";

/// 31 January 2026, `h:m:s` UTC; hours past 23 run into February.
fn jan31(h: u32, m: u32, s: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 31, 0, 0, 0).unwrap()
        + chrono::Duration::seconds(i64::from(h * 3600 + m * 60 + s))
}

fn usage(prompt: u64, completion: u64) -> Usage {
    Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
        ..Usage::default()
    }
}

fn finished(request_id: Uuid, key_id: Uuid, user_id: Option<Uuid>, model: &str, u: Usage) -> Event {
    Event::CompletionFinished(CompletionFinished {
        request_id,
        key_id,
        user_id,
        model: model.into(),
        channel_id: Uuid::nil(),
        channel_name: "main".into(),
        upstream_model: model.into(),
        usage: u,
        usage_source: UsageSource::Provider,
        finish_reason: Some("stop".into()),
        ttft_ms: Some(1),
        duration_ms: 2,
        attempts: 1,
        session_id: None,
        content: None,
    })
}

fn price(model: &str, input: i64, output: i64) -> Event {
    Event::PriceSet(PriceSet {
        model: model.into(),
        price: Price {
            input_per_mtok: Nanos(input),
            output_per_mtok: Nanos(output),
            cached_input_per_mtok: None,
            per_request: Nanos(0),
        },
        effective_at: Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap(),
    })
}

fn plan(plan_id: Uuid, quota: i64, models: &[&str]) -> Event {
    Event::PlanConfigured(PlanConfigured {
        plan_id,
        name: format!("plan {quota}"),
        monthly_quota: Nanos(quota),
        models: models.iter().map(|m| (*m).to_owned()).collect(),
        public: false,
        source: "test".into(),
        by_user: None,
    })
}

fn subscribe(user_id: Uuid, plan_id: Uuid) -> Event {
    Event::PlanSubscribed(PlanSubscribed {
        user_id,
        plan_id,
        by_user: None,
    })
}

struct Scenario {
    log: Vec<(i64, Envelope)>,
    user: Uuid,
    keys: [Uuid; 2],
    plans: [Uuid; 2],
    /// Per charged request in log order: (request, amount, plan, plan part).
    expected: Vec<(Uuid, i64, Option<Uuid>, i64)>,
}

/// $1 and $2 per million tokens for MODEL (1,000 and 2,000 nanos per token), $3 and $3
/// for OTHER; plan 1 pays 10,000 nanos a month for MODEL only.
fn scenario() -> Scenario {
    let (user, other_user) = (Uuid::now_v7(), Uuid::now_v7());
    let (k1, k2, k3, k0) = (
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
    );
    let (p1, p2, unknown) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let r: Vec<Uuid> = (0..12).map(|_| Uuid::now_v7()).collect();
    let u = Some(user);
    let t = jan31(20, 0, 0);
    let events: Vec<(Event, DateTime<Utc>)> = vec![
        (price(MODEL, 1_000_000_000, 2_000_000_000), t),
        (price(OTHER, 3_000_000_000, 3_000_000_000), t),
        (plan(p1, 10_000, &[MODEL]), t),
        (subscribe(user, p1), t),
        // 6,000: all from the plan (January: 6,000 used).
        (finished(r[0], k1, u, MODEL, usage(2, 2)), jan31(21, 0, 0)),
        // 6,000 on the other key: 4,000 from the plan, 2,000 from the balance.
        (finished(r[1], k2, u, MODEL, usage(2, 2)), jan31(21, 1, 0)),
        // A redelivery of r0: not charged again, and no quota consumed.
        (finished(r[0], k1, u, MODEL, usage(50, 50)), jan31(21, 2, 0)),
        // Outside the allow-list: from the balance, no plan named.
        (finished(r[2], k1, u, OTHER, usage(1, 1)), jan31(21, 3, 0)),
        // Covered but January is used up: the plan is named, it pays 0.
        (finished(r[3], k1, u, MODEL, usage(1, 0)), jan31(21, 4, 0)),
        // February: a fresh month (3,000 from the plan).
        (finished(r[4], k1, u, MODEL, usage(1, 1)), jan31(24, 0, 1)),
        // Ended in January although logged after a February charge: January's quota.
        (finished(r[5], k2, u, MODEL, usage(1, 0)), jan31(23, 59, 59)),
        // Switching plans mid-month does not refill it: plan 2 (5,000, every model) has
        // 5,000 − 3,000 left.
        (plan(p2, 5_000, &[]), jan31(24, 10, 0)),
        (subscribe(user, p2), jan31(24, 10, 0)),
        (finished(r[6], k1, u, OTHER, usage(1, 0)), jan31(24, 11, 0)),
        // A quota raised mid-month applies to the charges after it.
        (plan(p2, 20_000, &[]), jan31(24, 12, 0)),
        (finished(r[7], k1, u, OTHER, usage(1, 0)), jan31(24, 13, 0)),
        (
            Event::PlanUnsubscribed(PlanUnsubscribed {
                user_id: user,
                by_user: None,
            }),
            jan31(24, 14, 0),
        ),
        (finished(r[8], k1, u, MODEL, usage(1, 0)), jan31(24, 15, 0)),
        // Another user without a plan, and a key without a user.
        (
            finished(r[9], k3, Some(other_user), MODEL, usage(1, 0)),
            jan31(24, 16, 0),
        ),
        (
            finished(r[10], k0, None, MODEL, usage(1, 0)),
            jan31(24, 17, 0),
        ),
        // A subscription to a plan never configured pays nothing.
        (subscribe(other_user, unknown), jan31(24, 18, 0)),
        (
            finished(r[11], k3, Some(other_user), MODEL, usage(1, 0)),
            jan31(24, 19, 0),
        ),
        (
            Event::UserCreditGranted(UserCreditGranted {
                user_id: user,
                amount: Nanos(1_000_000),
                note: "welcome".into(),
            }),
            jan31(24, 20, 0),
        ),
        (
            Event::CreditGranted(CreditGranted {
                key_id: k1,
                amount: Nanos(500),
                note: "key".into(),
            }),
            jan31(24, 21, 0),
        ),
    ];
    let expected = vec![
        (r[0], 6_000, Some(p1), 6_000),
        (r[1], 6_000, Some(p1), 4_000),
        (r[2], 6_000, None, 0),
        (r[3], 1_000, Some(p1), 0),
        (r[4], 3_000, Some(p1), 3_000),
        (r[5], 1_000, Some(p1), 0),
        (r[6], 3_000, Some(p2), 2_000),
        (r[7], 3_000, Some(p2), 3_000),
        (r[8], 1_000, None, 0),
        (r[9], 1_000, None, 0),
        (r[10], 1_000, None, 0),
        (r[11], 1_000, None, 0),
    ];
    let log = events
        .into_iter()
        .enumerate()
        .map(|(i, (e, at))| (i as i64 * 2 + 1, e.into_envelope(at, Metadata::default())))
        .collect();
    Scenario {
        log,
        user,
        keys: [k1, k2],
        plans: [p1, p2],
        expected,
    }
}

/// Every billing read model as JSON rows, in a fixed order, for exact comparison.
/// The read models compared between runs.
const TABLES: &[&str] = &[
    "SELECT to_jsonb(t) FROM ledger_entries t ORDER BY position",
    "SELECT to_jsonb(t) FROM key_balances t ORDER BY key_id",
    "SELECT to_jsonb(t) FROM user_balances t ORDER BY user_id",
    "SELECT to_jsonb(t) FROM daily_usage t ORDER BY day, key_id, model",
    "SELECT to_jsonb(t) FROM plan_usage t ORDER BY user_id, period",
    "SELECT to_jsonb(t) FROM plans t ORDER BY plan_id, position",
    "SELECT to_jsonb(t) FROM plan_subscriptions t ORDER BY user_id, position",
    "SELECT to_jsonb(t) FROM prices t ORDER BY model, effective_at, position",
];

async fn snapshot(pool: &PgPool) -> Vec<serde_json::Value> {
    common::snapshot(pool, TABLES).await
}

#[tokio::test]
async fn plans_pay_first_per_utc_month_then_the_balance() {
    let db = TestDb::new().await;
    let s = scenario();
    append_batch(&db.pool, &s.log).await.unwrap();
    Runner::new(db.pool.clone())
        .catch_up(&mut BillingProjection::new(None), None)
        .await
        .unwrap();

    let ledger: Vec<(Uuid, i64, Option<Uuid>, i64)> = sqlx::query_as(
        "SELECT request_id, amount_nanos, plan_id, plan_nanos FROM ledger_entries \
         WHERE kind = 'usage' ORDER BY position",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(ledger, s.expected);

    let months: Vec<(Uuid, NaiveDate, i64, i64)> = sqlx::query_as(
        "SELECT user_id, period, used_nanos, requests FROM plan_usage ORDER BY period",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let first = |m| NaiveDate::from_ymd_opt(2026, m, 1).unwrap();
    assert_eq!(
        months,
        vec![(s.user, first(1), 10_000, 2), (s.user, first(2), 8_000, 3),]
    );

    // Key balances: everything the key spent, and the part plans paid.
    let keys: Vec<(i64, i64, i64)> = sqlx::query_as(
        "SELECT granted_nanos, spent_nanos, plan_nanos FROM key_balances WHERE key_id = ANY($1) \
         ORDER BY array_position($1, key_id)",
    )
    .bind(&s.keys[..])
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        keys,
        vec![
            (
                500,
                6_000 + 6_000 + 1_000 + 3_000 + 3_000 + 3_000 + 1_000,
                14_000
            ),
            (0, 7_000, 4_000)
        ]
    );
    let user_credit: (i64,) =
        sqlx::query_as("SELECT granted_nanos FROM user_balances WHERE user_id = $1")
            .bind(s.user)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(user_credit.0, 1_000_000);
    let credit_row: (Option<Uuid>, Option<Uuid>, i64) = sqlx::query_as(
        "SELECT key_id, user_id, amount_nanos FROM ledger_entries WHERE kind = 'credit' AND user_id IS NOT NULL",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(credit_row, (None, Some(s.user), -1_000_000));

    // Daily usage and the ledger agree on the plan part.
    let (daily_plan, ledger_plan): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT sum(plan_nanos) FROM daily_usage)::bigint, (SELECT sum(plan_nanos) FROM ledger_entries)::bigint",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((daily_plan, ledger_plan), (18_000, 18_000));

    // The read models show the plans as they stand now.
    let current: Vec<(Uuid, i64)> =
        sqlx::query_as("SELECT plan_id, quota_nanos FROM current_plans ORDER BY plan_id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(current, vec![(s.plans[0], 10_000), (s.plans[1], 20_000)]);
    let subscribed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM current_subscriptions WHERE user_id = $1")
            .bind(s.user)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(subscribed, 0, "unsubscribed");
    db.cleanup().await;
}

#[tokio::test]
async fn batch_sizes_and_restarts_do_not_change_the_split() {
    let s = scenario();
    let mut snapshots = Vec::new();
    for batch_size in [1, 3, 500] {
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
    // A projector restarted at every few positions: each new instance loads the plans,
    // subscriptions and month usage from the read models.
    let db = TestDb::new().await;
    append_batch(&db.pool, &s.log).await.unwrap();
    let head = s.log.last().unwrap().0;
    let mut until = 0;
    while until < head {
        until += 5;
        Runner::new(db.pool.clone())
            .batch_size(2)
            .catch_up(&mut BillingProjection::new(None), Some(until))
            .await
            .unwrap();
    }
    snapshots.push(snapshot(&db.pool).await);
    db.cleanup().await;
    assert!(
        snapshots[0].len() > 30,
        "the snapshot covers the read models"
    );
    for other in &snapshots[1..] {
        assert_eq!(&snapshots[0], other);
    }
}

#[tokio::test]
async fn a_replay_from_a_later_position_splits_as_the_live_projector_did() {
    let live = TestDb::new().await;
    let s = scenario();
    append_batch(&live.pool, &s.log).await.unwrap();
    Runner::new(live.pool.clone())
        .catch_up(&mut BillingProjection::new(None), None)
        .await
        .unwrap();
    // From just after r1 (plan 1 half used in January) and after r4 (February started).
    for from in [11, 19] {
        let id = Uuid::now_v7().simple().to_string();
        let target = Namespace::new(&format!("t_{}_w", &id[id.len() - 12..])).unwrap();
        let url = std::env::var("SLUICE_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let scratch = projector::replay::Scratch::open(&url, &live.ns, target)
            .await
            .unwrap();
        scratch
            .start_at(BillingProjection::NAME, from)
            .await
            .unwrap();
        sqlx::query(&format!(
            "INSERT INTO prices SELECT * FROM \"{}\".prices WHERE position <= $1",
            live.ns.pg_schema()
        ))
        .bind(from)
        .execute(&scratch.pool)
        .await
        .unwrap();
        billing::plans::seed_window(&scratch.pool, &live.ns, from)
            .await
            .unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        scratch
            .replay(
                &live.ns,
                &mut BillingProjection::new(None),
                i64::MAX,
                &stop,
                &mut |_| {},
            )
            .await
            .unwrap();
        let sql = "SELECT request_id, amount_nanos, plan_id, plan_nanos FROM ledger_entries \
                   WHERE kind = 'usage' AND position > $1 ORDER BY position";
        let want: Vec<(Uuid, i64, Option<Uuid>, i64)> = sqlx::query_as(sql)
            .bind(from)
            .fetch_all(&live.pool)
            .await
            .unwrap();
        let got: Vec<(Uuid, i64, Option<Uuid>, i64)> = sqlx::query_as(sql)
            .bind(from)
            .fetch_all(&scratch.pool)
            .await
            .unwrap();
        assert!(want.len() >= 5, "from {from}");
        // The window replay charges r0 again (the ledger before `from` is not copied), so
        // compare the charges the live ledger made after `from`.
        let got: Vec<_> = got
            .into_iter()
            .filter(|r| want.iter().any(|w| w.0 == r.0))
            .collect();
        assert_eq!(got, want, "from {from}");
        scratch.drop_schema().await.unwrap();
    }
    live.cleanup().await;
}
