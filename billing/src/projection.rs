//! The billing projector: folds usage, credits, prices and plans from the event log into
//! the ledger (`ledger_entries`), `key_balances`, `user_balances`, `daily_usage`,
//! `plan_usage` and the `prices`, `plans` and `plan_subscriptions` histories.
//!
//! Money rules:
//! - A request is charged once, by the first of its charging events in log order
//!   (`CompletionFinished`, `RequestCancelled`, or `RequestFailed` carrying usage): the
//!   ledger's unique index on `request_id` drops any later one (a redelivered request),
//!   and balances and daily usage move only when a ledger row was actually inserted.
//! - A charge is `Price::cost(usage)` at the price of the event's `model` (the name the
//!   client asked for) in force at the event's `occurred_at`. With no known price the charge
//!   is 0 and the row is marked `priced = false`, so it can be found and re-priced by replay.
//! - A charge of a subscribed user is split between the plan and the balance by the rules
//!   of [`crate::plans`]; the split is computed for the charges actually inserted (a
//!   redelivered request consumes no plan quota).
//! - `CreditGranted` moves a key's credit, `UserCreditGranted` a user's (shared by all the
//!   user's keys; the ingress adds the credits of a user's keys to it, see
//!   `ingress::directory`).
//! - Everything derives from the event (never the clock), so a replay from position 0
//!   yields the same ledger, row for row.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use projector::{Projection, ProjectionError, StoredEvent};
use schemas::events::{CreditGranted, PlanConfigured, PriceSet, UserCreditGranted};
use schemas::{Event, Nanos, Usage, UsageSource};

use crate::plans::{period_of, plan_part, Cover, PlanBook, PlanDef};
use crate::prices::PriceBook;

/// The billing projection. Its price book mirrors the `prices` read model (reloaded by
/// `init`), unless an override table was given for a re-pricing replay.
#[derive(Debug, Clone, Default)]
pub struct BillingProjection {
    prices: PriceBook,
    /// Set for re-pricing replays: `PriceSet` events are ignored and `prices` (the
    /// override) prices every event.
    fixed_prices: bool,
    /// Plans and subscriptions in force, mirroring their read models (reloaded by `init`).
    plans: PlanBook,
    /// Charges and credits priced by `apply` and written by `flush` in one statement per
    /// kind per batch: one round trip per event would cap a replay at a few thousand
    /// events per second. Amounts are computed when the event is applied, so a `PriceSet`
    /// in the middle of a batch prices exactly the events after it.
    pending: Pending,
}

#[derive(Debug, Clone, Default)]
struct Pending {
    charges: Vec<ChargeRow>,
    credits: Vec<CreditRow>,
}

/// A priced `usage` ledger row, waiting for the batch's flush (which decides the plan part).
#[derive(Debug, Clone)]
struct ChargeRow {
    position: i64,
    request_id: Uuid,
    key_id: Uuid,
    user_id: Option<Uuid>,
    model: String,
    prompt_tokens: i64,
    completion_tokens: i64,
    cached_tokens: i64,
    amount: i64,
    usage_source: Option<&'static str>,
    priced: bool,
    at: DateTime<Utc>,
    /// The plan that pays first, as subscribed when the charge was applied.
    cover: Option<Cover>,
}

/// A `credit` ledger row: `entry` is the ledger amount (negative), `granted` the balance
/// move. Exactly one of `key_id` (`CreditGranted`) and `user_id` (`UserCreditGranted`).
#[derive(Debug, Clone)]
struct CreditRow {
    position: i64,
    key_id: Option<Uuid>,
    user_id: Option<Uuid>,
    entry: i64,
    granted: i64,
    at: DateTime<Utc>,
}

/// One charge, from whichever terminal event carried the usage.
struct Charge<'e> {
    request_id: Uuid,
    key_id: Uuid,
    user_id: Option<Uuid>,
    model: &'e str,
    usage: Usage,
    usage_source: Option<UsageSource>,
}

impl BillingProjection {
    pub const NAME: &'static str = "billing";

    /// `price_override`: `None` for live billing (prices from `PriceSet` events); `Some`
    /// to bill every event at a fixed table instead (re-pricing replays).
    pub fn new(price_override: Option<PriceBook>) -> Self {
        match price_override {
            Some(prices) => Self {
                prices,
                fixed_prices: true,
                plans: PlanBook::default(),
                pending: Pending::default(),
            },
            None => Self::default(),
        }
    }

    /// The prices currently known to the projection.
    pub fn prices(&self) -> &PriceBook {
        &self.prices
    }

    /// The plans and subscriptions currently known to the projection.
    pub fn plans(&self) -> &PlanBook {
        &self.plans
    }

    async fn configure_plan(
        &mut self,
        tx: &mut PgConnection,
        event: &StoredEvent,
        e: PlanConfigured,
    ) -> Result<(), ProjectionError> {
        if e.monthly_quota.0 < 0 {
            // The admin API never emits one; storing it would break the table's CHECK and
            // stall billing for good. The previous definition stays in force.
            tracing::warn!(
                position = event.position,
                "PlanConfigured with a negative quota ignored"
            );
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO plans (plan_id, position, name, quota_nanos, models, public, event_id, occurred_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
        )
        .bind(e.plan_id)
        .bind(event.position)
        .bind(&e.name)
        .bind(e.monthly_quota.0)
        .bind(&e.models)
        .bind(e.public)
        .bind(event.envelope.event_id)
        .bind(event.envelope.occurred_at)
        .execute(tx)
        .await?;
        self.plans.configure(PlanDef {
            plan_id: e.plan_id,
            name: e.name,
            monthly_quota: e.monthly_quota,
            models: e.models,
            public: e.public,
        });
        Ok(())
    }

    /// Records a user's plan (`None`: no plan) from this position on.
    async fn set_subscription(
        &mut self,
        tx: &mut PgConnection,
        event: &StoredEvent,
        user_id: Uuid,
        plan_id: Option<Uuid>,
    ) -> Result<(), ProjectionError> {
        sqlx::query(
            "INSERT INTO plan_subscriptions (user_id, position, plan_id, occurred_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        )
        .bind(user_id)
        .bind(event.position)
        .bind(plan_id)
        .bind(event.envelope.occurred_at)
        .execute(tx)
        .await?;
        match plan_id {
            Some(plan_id) => self.plans.subscribe(user_id, plan_id),
            None => self.plans.unsubscribe(user_id),
        }
        Ok(())
    }

    async fn set_price(
        &mut self,
        tx: &mut PgConnection,
        position: i64,
        e: PriceSet,
    ) -> Result<(), ProjectionError> {
        let p = e.price;
        let fields = [
            Some(p.input_per_mtok),
            Some(p.output_per_mtok),
            p.cached_input_per_mtok,
            Some(p.per_request),
        ];
        if fields.iter().flatten().any(|n| n.0 < 0) {
            // The admin API never emits one; storing it would break the table's CHECKs and
            // stall billing for good. Skipping leaves the previous price in force.
            tracing::warn!(position, "PriceSet with a negative amount ignored");
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO prices (model, effective_at, position, input_per_mtok, output_per_mtok, \
                                 cached_input_per_mtok, per_request) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
        )
        .bind(&e.model)
        .bind(e.effective_at)
        .bind(position)
        .bind(p.input_per_mtok.0)
        .bind(p.output_per_mtok.0)
        .bind(p.cached_input_per_mtok.map(|n| n.0))
        .bind(p.per_request.0)
        .execute(tx)
        .await?;
        self.prices.insert(&e.model, e.effective_at, position, p);
        Ok(())
    }

    /// Prices one charge and queues its ledger row for the batch's flush.
    fn charge(&mut self, position: i64, at: DateTime<Utc>, c: Charge<'_>) {
        let price = self.prices.price_at(c.model, at);
        let amount = price.map_or(Nanos::ZERO, |p| p.cost(&c.usage));
        // What was billed: cached tokens beyond the prompt are priced as prompt tokens.
        let cached = c.usage.cached_tokens.min(c.usage.prompt_tokens);
        let cover = self.plans.cover(c.user_id, c.model);
        self.pending.charges.push(ChargeRow {
            position,
            request_id: c.request_id,
            key_id: c.key_id,
            user_id: c.user_id,
            model: c.model.to_owned(),
            prompt_tokens: big(c.usage.prompt_tokens),
            completion_tokens: big(c.usage.completion_tokens),
            cached_tokens: big(cached),
            amount: amount.0,
            usage_source: c.usage_source.map(source_name),
            priced: price.is_some(),
            at,
            cover,
        });
    }

    fn credit(&mut self, position: i64, at: DateTime<Utc>, e: CreditGranted) {
        // Ledger sign convention: positive is spent, negative is granted.
        let Some(entry) = e.amount.0.checked_neg() else {
            tracing::warn!(position, key_id = %e.key_id, "CreditGranted amount out of range ignored");
            return;
        };
        self.pending.credits.push(CreditRow {
            position,
            key_id: Some(e.key_id),
            user_id: None,
            entry,
            granted: e.amount.0,
            at,
        });
    }

    fn user_credit(&mut self, position: i64, at: DateTime<Utc>, e: UserCreditGranted) {
        let Some(entry) = e.amount.0.checked_neg() else {
            tracing::warn!(position, user_id = %e.user_id, "UserCreditGranted amount out of range ignored");
            return;
        };
        self.pending.credits.push(CreditRow {
            position,
            key_id: None,
            user_id: Some(e.user_id),
            entry,
            granted: e.amount.0,
            at,
        });
    }

    /// Drops the charges of requests already charged (before this batch, or earlier in it:
    /// the first charging event in log order counts), then splits each remaining charge
    /// between its plan and the balance, in log order, from the plan usage recorded so far.
    /// Returns the plan part of each kept row.
    async fn split(
        tx: &mut PgConnection,
        rows: &mut Vec<ChargeRow>,
    ) -> Result<Vec<i64>, sqlx::Error> {
        let ids: Vec<Uuid> = rows.iter().map(|r| r.request_id).collect();
        let charged: HashSet<Uuid> = sqlx::query_scalar(
            "SELECT request_id FROM ledger_entries WHERE request_id = ANY($1::uuid[])",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();
        let mut seen = HashSet::with_capacity(rows.len());
        rows.retain(|r| !charged.contains(&r.request_id) && seen.insert(r.request_id));

        let mut used: HashMap<(Uuid, NaiveDate), i64> = HashMap::new();
        for r in rows.iter() {
            if let (Some(_), Some(user)) = (r.cover, r.user_id) {
                used.insert((user, period_of(r.at)), 0);
            }
        }
        if !used.is_empty() {
            let (users, periods): (Vec<Uuid>, Vec<NaiveDate>) = used.keys().copied().unzip();
            let recorded: Vec<(Uuid, NaiveDate, i64)> = sqlx::query_as(
                "SELECT u.user_id, u.period, u.used_nanos FROM plan_usage u \
                 JOIN UNNEST($1::uuid[], $2::date[]) AS k(user_id, period) USING (user_id, period)",
            )
            .bind(&users)
            .bind(&periods)
            .fetch_all(&mut *tx)
            .await?;
            for (user, period, nanos) in recorded {
                used.insert((user, period), nanos);
            }
        }
        Ok(rows
            .iter()
            .map(|r| match (r.cover, r.user_id) {
                (Some(cover), Some(user)) => {
                    let spent = used.entry((user, period_of(r.at))).or_insert(0);
                    let part = plan_part(r.amount, cover.monthly_quota.0, *spent);
                    *spent += part;
                    part
                }
                _ => 0,
            })
            .collect())
    }

    /// Inserts the batch's new ledger rows and moves the keys' balances, the days' usage
    /// and the months' plan usage accordingly, all in one statement.
    async fn write_charges(
        tx: &mut PgConnection,
        mut rows: Vec<ChargeRow>,
    ) -> Result<(), sqlx::Error> {
        if rows.is_empty() {
            return Ok(());
        }
        let plan_parts = Self::split(tx, &mut rows).await?;
        if rows.is_empty() {
            return Ok(());
        }
        // ON CONFLICT stays as a guard; `split` already dropped every known request.
        sqlx::query(
            "WITH input AS ( \
               SELECT * FROM UNNEST($1::bigint[], $2::uuid[], $3::uuid[], $4::uuid[], $5::text[], $6::bigint[], \
                                    $7::bigint[], $8::bigint[], $9::bigint[], $10::text[], $11::bool[], $12::timestamptz[], \
                                    $13::uuid[], $14::bigint[], $15::date[]) \
                 WITH ORDINALITY AS t(position, request_id, key_id, user_id, model, prompt_tokens, completion_tokens, \
                                      cached_tokens, amount_nanos, usage_source, priced, occurred_at, plan_id, plan_nanos, \
                                      period, ord) \
             ), entry AS ( \
               INSERT INTO ledger_entries (position, request_id, key_id, user_id, model, kind, prompt_tokens, \
                                           completion_tokens, cached_tokens, amount_nanos, usage_source, priced, occurred_at, \
                                           plan_id, plan_nanos) \
               SELECT position, request_id, key_id, user_id, model, 'usage', prompt_tokens, completion_tokens, \
                      cached_tokens, amount_nanos, usage_source, priced, occurred_at, plan_id, plan_nanos \
               FROM input ORDER BY ord \
               ON CONFLICT DO NOTHING \
               RETURNING position, key_id, model, prompt_tokens, completion_tokens, cached_tokens, amount_nanos, \
                         plan_nanos, occurred_at \
             ), balance AS ( \
               INSERT INTO key_balances (key_id, spent_nanos, plan_nanos, requests, updated_at) \
               SELECT key_id, sum(amount_nanos)::bigint, sum(plan_nanos)::bigint, count(*), max(occurred_at) \
               FROM entry GROUP BY key_id \
               ON CONFLICT (key_id) DO UPDATE SET \
                 spent_nanos = key_balances.spent_nanos + EXCLUDED.spent_nanos, \
                 plan_nanos = key_balances.plan_nanos + EXCLUDED.plan_nanos, \
                 requests = key_balances.requests + EXCLUDED.requests, \
                 updated_at = GREATEST(key_balances.updated_at, EXCLUDED.updated_at) \
             ), plan AS ( \
               INSERT INTO plan_usage (user_id, period, used_nanos, requests) \
               SELECT i.user_id, i.period, sum(e.plan_nanos)::bigint, count(*) \
               FROM entry e JOIN input i USING (position) WHERE e.plan_nanos > 0 \
               GROUP BY i.user_id, i.period \
               ON CONFLICT (user_id, period) DO UPDATE SET \
                 used_nanos = plan_usage.used_nanos + EXCLUDED.used_nanos, \
                 requests = plan_usage.requests + EXCLUDED.requests \
             ) \
             INSERT INTO daily_usage (day, key_id, model, requests, prompt_tokens, completion_tokens, cached_tokens, \
                                      cost_nanos, plan_nanos) \
             SELECT (occurred_at AT TIME ZONE 'UTC')::date AS day, key_id, model, count(*), sum(prompt_tokens)::bigint, \
                    sum(completion_tokens)::bigint, sum(cached_tokens)::bigint, sum(amount_nanos)::bigint, \
                    sum(plan_nanos)::bigint \
             FROM entry GROUP BY day, key_id, model \
             ON CONFLICT (day, key_id, model) DO UPDATE SET \
               requests = daily_usage.requests + EXCLUDED.requests, \
               prompt_tokens = daily_usage.prompt_tokens + EXCLUDED.prompt_tokens, \
               completion_tokens = daily_usage.completion_tokens + EXCLUDED.completion_tokens, \
               cached_tokens = daily_usage.cached_tokens + EXCLUDED.cached_tokens, \
               cost_nanos = daily_usage.cost_nanos + EXCLUDED.cost_nanos, \
               plan_nanos = daily_usage.plan_nanos + EXCLUDED.plan_nanos",
        )
        .bind(rows.iter().map(|r| r.position).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.request_id).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.key_id).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.user_id).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.model.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.prompt_tokens).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.completion_tokens).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.cached_tokens).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.amount).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.usage_source).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.priced).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.at).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.cover.map(|c| c.plan_id)).collect::<Vec<_>>())
        .bind(&plan_parts)
        .bind(rows.iter().map(|r| period_of(r.at)).collect::<Vec<_>>())
        .execute(tx)
        .await?;
        Ok(())
    }

    async fn write_credits(tx: &mut PgConnection, rows: &[CreditRow]) -> Result<(), sqlx::Error> {
        if rows.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "WITH input AS ( \
               SELECT * FROM UNNEST($1::bigint[], $2::uuid[], $3::uuid[], $4::bigint[], $5::bigint[], \
                                    $6::timestamptz[]) \
                 WITH ORDINALITY AS t(position, key_id, user_id, entry, granted, occurred_at, ord) \
             ), entry AS ( \
               INSERT INTO ledger_entries (position, key_id, user_id, kind, amount_nanos, occurred_at) \
               SELECT position, key_id, user_id, 'credit', entry, occurred_at FROM input ORDER BY ord \
               ON CONFLICT DO NOTHING \
               RETURNING position \
             ), keyed AS ( \
               INSERT INTO key_balances (key_id, granted_nanos, updated_at) \
               SELECT i.key_id, sum(i.granted)::bigint, max(i.occurred_at) \
               FROM input i JOIN entry USING (position) WHERE i.key_id IS NOT NULL GROUP BY i.key_id \
               ON CONFLICT (key_id) DO UPDATE SET \
                 granted_nanos = key_balances.granted_nanos + EXCLUDED.granted_nanos, \
                 updated_at = GREATEST(key_balances.updated_at, EXCLUDED.updated_at) \
             ) \
             INSERT INTO user_balances (user_id, granted_nanos, updated_at) \
             SELECT i.user_id, sum(i.granted)::bigint, max(i.occurred_at) \
             FROM input i JOIN entry USING (position) WHERE i.key_id IS NULL GROUP BY i.user_id \
             ON CONFLICT (user_id) DO UPDATE SET \
               granted_nanos = user_balances.granted_nanos + EXCLUDED.granted_nanos, \
               updated_at = GREATEST(user_balances.updated_at, EXCLUDED.updated_at)",
        )
        .bind(rows.iter().map(|r| r.position).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.key_id).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.user_id).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.entry).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.granted).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.at).collect::<Vec<_>>())
        .execute(tx)
        .await?;
        Ok(())
    }
}

/// The event types billing folds; the runner does not even read the others.
const BILLED_TYPES: &[&str] = &[
    "PriceSet",
    "CompletionFinished",
    "RequestCancelled",
    "RequestFailed",
    "CreditGranted",
    "UserCreditGranted",
    "PlanConfigured",
    "PlanSubscribed",
    "PlanUnsubscribed",
    "ResponseServedFromCache",
];

impl Projection for BillingProjection {
    fn name(&self) -> &str {
        Self::NAME
    }

    async fn init<'a>(&'a mut self, conn: &'a mut PgConnection) -> Result<(), ProjectionError> {
        // Rows queued by a batch that was rolled back must never be written.
        self.pending = Pending::default();
        if !self.fixed_prices {
            self.prices = PriceBook::load(&mut *conn).await?;
        }
        self.plans = PlanBook::load(conn).await?;
        Ok(())
    }

    async fn flush<'a>(&'a mut self, tx: &'a mut PgConnection) -> Result<(), ProjectionError> {
        let pending = std::mem::take(&mut self.pending);
        Self::write_charges(tx, pending.charges).await?;
        Self::write_credits(tx, &pending.credits).await?;
        Ok(())
    }

    fn event_types(&self) -> Option<&'static [&'static str]> {
        Some(BILLED_TYPES)
    }

    async fn apply<'a>(
        &'a mut self,
        tx: &'a mut PgConnection,
        event: &'a StoredEvent,
    ) -> Result<(), ProjectionError> {
        if !BILLED_TYPES.contains(&event.event_type()) {
            return Ok(());
        }
        let (position, at) = (event.position, event.envelope.occurred_at);
        match event.decode()? {
            Event::PriceSet(e) if !self.fixed_prices => self.set_price(tx, position, e).await?,
            Event::CompletionFinished(e) => {
                let charge = Charge {
                    request_id: e.request_id,
                    key_id: e.key_id,
                    user_id: e.user_id,
                    model: &e.model,
                    usage: e.usage,
                    usage_source: Some(e.usage_source),
                };
                self.charge(position, at, charge);
            }
            Event::RequestCancelled(e) => {
                let charge = Charge {
                    request_id: e.request_id,
                    key_id: e.key_id,
                    user_id: e.user_id,
                    model: &e.model,
                    usage: e.usage,
                    usage_source: Some(e.usage_source),
                };
                self.charge(position, at, charge);
            }
            Event::RequestFailed(e) => {
                if let Some(usage) = e.usage {
                    let charge = Charge {
                        request_id: e.request_id,
                        key_id: e.key_id,
                        user_id: e.user_id,
                        model: &e.model,
                        usage,
                        usage_source: e.usage_source,
                    };
                    self.charge(position, at, charge);
                }
            }
            Event::ResponseServedFromCache(e) => {
                // Answered from the response cache: no tokens were generated for it, and it
                // costs the cache price, which is zero (one ledger row, so it counts as a
                // request and is charged once like any other).
                let charge = Charge {
                    request_id: e.request_id,
                    key_id: e.key_id,
                    user_id: e.user_id,
                    model: &e.model,
                    usage: Usage::default(),
                    usage_source: None,
                };
                self.charge(position, at, charge);
                if let Some(row) = self.pending.charges.last_mut() {
                    (row.amount, row.priced, row.usage_source) = (0, true, Some("cache"));
                }
            }
            Event::CreditGranted(e) => self.credit(position, at, e),
            Event::UserCreditGranted(e) => self.user_credit(position, at, e),
            Event::PlanConfigured(e) => self.configure_plan(tx, event, e).await?,
            Event::PlanSubscribed(e) => {
                self.set_subscription(tx, event, e.user_id, Some(e.plan_id))
                    .await?;
            }
            Event::PlanUnsubscribed(e) => {
                self.set_subscription(tx, event, e.user_id, None).await?;
            }
            _ => {}
        }
        Ok(())
    }
}

fn source_name(source: UsageSource) -> &'static str {
    match source {
        UsageSource::Provider => "provider",
        UsageSource::Estimated => "estimated",
    }
}

fn big(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
