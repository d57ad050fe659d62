//! The billing projector: folds usage, credits and prices from the event log into the
//! ledger (`ledger_entries`), `key_balances` and `daily_usage`.
//!
//! Money rules:
//! - A request is charged once, by the first of its charging events in log order
//!   (`CompletionFinished`, `RequestCancelled`, or `RequestFailed` carrying usage): the
//!   ledger's unique index on `request_id` drops any later one (a redelivered request),
//!   and balances and daily usage move only when a ledger row was actually inserted.
//! - A charge is `Price::cost(usage)` at the price of the event's `model` (the name the
//!   client asked for) in force at the event's `occurred_at`. With no known price the charge
//!   is 0 and the row is marked `priced = false`, so it can be found and re-priced by replay.
//! - Everything derives from the event (never the clock), so a replay from position 0
//!   yields the same ledger, row for row.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use projector::{Projection, ProjectionError, StoredEvent};
use schemas::events::{CreditGranted, PriceSet};
use schemas::{Event, Nanos, Usage, UsageSource};

use crate::prices::PriceBook;

/// The billing projection. Its price book mirrors the `prices` read model (reloaded by
/// `init`), unless an override table was given for a re-pricing replay.
#[derive(Debug, Clone, Default)]
pub struct BillingProjection {
    prices: PriceBook,
    /// Set for re-pricing replays: `PriceSet` events are ignored and `prices` (the
    /// override) prices every event.
    fixed_prices: bool,
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

/// A priced `usage` ledger row, waiting for the batch's flush.
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
}

/// A `credit` ledger row: `entry` is the ledger amount (negative), `granted` the balance move.
#[derive(Debug, Clone)]
struct CreditRow {
    position: i64,
    key_id: Uuid,
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
                pending: Pending::default(),
            },
            None => Self::default(),
        }
    }

    /// The prices currently known to the projection.
    pub fn prices(&self) -> &PriceBook {
        &self.prices
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
            key_id: e.key_id,
            entry,
            granted: e.amount.0,
            at,
        });
    }

    /// Inserts the batch's ledger rows and, for the rows that are new (a request already
    /// charged, in this batch or before, is skipped by the unique index), moves the keys'
    /// balances and the days' usage, all in one statement. Rows go in in log order, so
    /// the first charging event of a request is the one that counts.
    async fn write_charges(tx: &mut PgConnection, rows: &[ChargeRow]) -> Result<(), sqlx::Error> {
        if rows.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "WITH input AS ( \
               SELECT * FROM UNNEST($1::bigint[], $2::uuid[], $3::uuid[], $4::uuid[], $5::text[], $6::bigint[], \
                                    $7::bigint[], $8::bigint[], $9::bigint[], $10::text[], $11::bool[], $12::timestamptz[]) \
                 WITH ORDINALITY AS t(position, request_id, key_id, user_id, model, prompt_tokens, completion_tokens, \
                                      cached_tokens, amount_nanos, usage_source, priced, occurred_at, ord) \
             ), entry AS ( \
               INSERT INTO ledger_entries (position, request_id, key_id, user_id, model, kind, prompt_tokens, \
                                           completion_tokens, cached_tokens, amount_nanos, usage_source, priced, occurred_at) \
               SELECT position, request_id, key_id, user_id, model, 'usage', prompt_tokens, completion_tokens, \
                      cached_tokens, amount_nanos, usage_source, priced, occurred_at FROM input ORDER BY ord \
               ON CONFLICT DO NOTHING \
               RETURNING key_id, model, prompt_tokens, completion_tokens, cached_tokens, amount_nanos, occurred_at \
             ), balance AS ( \
               INSERT INTO key_balances (key_id, spent_nanos, requests, updated_at) \
               SELECT key_id, sum(amount_nanos)::bigint, count(*), max(occurred_at) FROM entry GROUP BY key_id \
               ON CONFLICT (key_id) DO UPDATE SET \
                 spent_nanos = key_balances.spent_nanos + EXCLUDED.spent_nanos, \
                 requests = key_balances.requests + EXCLUDED.requests, \
                 updated_at = GREATEST(key_balances.updated_at, EXCLUDED.updated_at) \
             ) \
             INSERT INTO daily_usage (day, key_id, model, requests, prompt_tokens, completion_tokens, cached_tokens, cost_nanos) \
             SELECT (occurred_at AT TIME ZONE 'UTC')::date AS day, key_id, model, count(*), sum(prompt_tokens)::bigint, \
                    sum(completion_tokens)::bigint, sum(cached_tokens)::bigint, sum(amount_nanos)::bigint \
             FROM entry GROUP BY day, key_id, model \
             ON CONFLICT (day, key_id, model) DO UPDATE SET \
               requests = daily_usage.requests + EXCLUDED.requests, \
               prompt_tokens = daily_usage.prompt_tokens + EXCLUDED.prompt_tokens, \
               completion_tokens = daily_usage.completion_tokens + EXCLUDED.completion_tokens, \
               cached_tokens = daily_usage.cached_tokens + EXCLUDED.cached_tokens, \
               cost_nanos = daily_usage.cost_nanos + EXCLUDED.cost_nanos",
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
               SELECT * FROM UNNEST($1::bigint[], $2::uuid[], $3::bigint[], $4::bigint[], $5::timestamptz[]) \
                 WITH ORDINALITY AS t(position, key_id, entry, granted, occurred_at, ord) \
             ), entry AS ( \
               INSERT INTO ledger_entries (position, key_id, kind, amount_nanos, occurred_at) \
               SELECT position, key_id, 'credit', entry, occurred_at FROM input ORDER BY ord \
               ON CONFLICT DO NOTHING \
               RETURNING position \
             ) \
             INSERT INTO key_balances (key_id, granted_nanos, updated_at) \
             SELECT i.key_id, sum(i.granted)::bigint, max(i.occurred_at) \
             FROM input i JOIN entry USING (position) GROUP BY i.key_id \
             ON CONFLICT (key_id) DO UPDATE SET \
               granted_nanos = key_balances.granted_nanos + EXCLUDED.granted_nanos, \
               updated_at = GREATEST(key_balances.updated_at, EXCLUDED.updated_at)",
        )
        .bind(rows.iter().map(|r| r.position).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.key_id).collect::<Vec<_>>())
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
];

impl Projection for BillingProjection {
    fn name(&self) -> &str {
        Self::NAME
    }

    async fn init<'a>(&'a mut self, conn: &'a mut PgConnection) -> Result<(), ProjectionError> {
        // Rows queued by a batch that was rolled back must never be written.
        self.pending = Pending::default();
        if !self.fixed_prices {
            self.prices = PriceBook::load(conn).await?;
        }
        Ok(())
    }

    async fn flush<'a>(&'a mut self, tx: &'a mut PgConnection) -> Result<(), ProjectionError> {
        let pending = std::mem::take(&mut self.pending);
        Self::write_charges(tx, &pending.charges).await?;
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
            Event::CreditGranted(e) => self.credit(position, at, e),
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
