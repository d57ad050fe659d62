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

    /// Inserts the ledger row and, only if it is new, moves the key's balance and the
    /// day's usage, all in one statement (one round trip per charged request).
    async fn charge(
        &self,
        tx: &mut PgConnection,
        position: i64,
        at: DateTime<Utc>,
        c: Charge<'_>,
    ) -> Result<(), sqlx::Error> {
        let price = self.prices.price_at(c.model, at);
        let amount = price.map_or(Nanos::ZERO, |p| p.cost(&c.usage));
        // What was billed: cached tokens beyond the prompt are priced as prompt tokens.
        let cached = c.usage.cached_tokens.min(c.usage.prompt_tokens);
        sqlx::query(
            "WITH entry AS ( \
               INSERT INTO ledger_entries (position, request_id, key_id, user_id, model, kind, prompt_tokens, \
                                           completion_tokens, cached_tokens, amount_nanos, usage_source, priced, occurred_at) \
               VALUES ($1, $2, $3, $4, $5, 'usage', $6, $7, $8, $9, $10, $11, $12) \
               ON CONFLICT DO NOTHING \
               RETURNING key_id, model, prompt_tokens, completion_tokens, cached_tokens, amount_nanos, occurred_at \
             ), balance AS ( \
               INSERT INTO key_balances (key_id, spent_nanos, requests, updated_at) \
               SELECT key_id, amount_nanos, 1, occurred_at FROM entry \
               ON CONFLICT (key_id) DO UPDATE SET \
                 spent_nanos = key_balances.spent_nanos + EXCLUDED.spent_nanos, \
                 requests = key_balances.requests + 1, \
                 updated_at = GREATEST(key_balances.updated_at, EXCLUDED.updated_at) \
             ) \
             INSERT INTO daily_usage (day, key_id, model, requests, prompt_tokens, completion_tokens, cached_tokens, cost_nanos) \
             SELECT (occurred_at AT TIME ZONE 'UTC')::date, key_id, model, 1, prompt_tokens, completion_tokens, \
                    cached_tokens, amount_nanos FROM entry \
             ON CONFLICT (day, key_id, model) DO UPDATE SET \
               requests = daily_usage.requests + 1, \
               prompt_tokens = daily_usage.prompt_tokens + EXCLUDED.prompt_tokens, \
               completion_tokens = daily_usage.completion_tokens + EXCLUDED.completion_tokens, \
               cached_tokens = daily_usage.cached_tokens + EXCLUDED.cached_tokens, \
               cost_nanos = daily_usage.cost_nanos + EXCLUDED.cost_nanos",
        )
        .bind(position)
        .bind(c.request_id)
        .bind(c.key_id)
        .bind(c.user_id)
        .bind(c.model)
        .bind(big(c.usage.prompt_tokens))
        .bind(big(c.usage.completion_tokens))
        .bind(big(cached))
        .bind(amount.0)
        .bind(c.usage_source.map(source_name))
        .bind(price.is_some())
        .bind(at)
        .execute(tx)
        .await?;
        Ok(())
    }

    async fn credit(
        &self,
        tx: &mut PgConnection,
        position: i64,
        at: DateTime<Utc>,
        e: CreditGranted,
    ) -> Result<(), sqlx::Error> {
        // Ledger sign convention: positive is spent, negative is granted.
        let Some(entry_amount) = e.amount.0.checked_neg() else {
            tracing::warn!(position, key_id = %e.key_id, "CreditGranted amount out of range ignored");
            return Ok(());
        };
        sqlx::query(
            "WITH entry AS ( \
               INSERT INTO ledger_entries (position, key_id, kind, amount_nanos, occurred_at) \
               VALUES ($1, $2, 'credit', $3, $4) \
               ON CONFLICT DO NOTHING \
               RETURNING key_id, occurred_at \
             ) \
             INSERT INTO key_balances (key_id, granted_nanos, updated_at) \
             SELECT key_id, $5, occurred_at FROM entry \
             ON CONFLICT (key_id) DO UPDATE SET \
               granted_nanos = key_balances.granted_nanos + EXCLUDED.granted_nanos, \
               updated_at = GREATEST(key_balances.updated_at, EXCLUDED.updated_at)",
        )
        .bind(position)
        .bind(e.key_id)
        .bind(entry_amount)
        .bind(at)
        .bind(e.amount.0)
        .execute(tx)
        .await?;
        Ok(())
    }
}

impl Projection for BillingProjection {
    fn name(&self) -> &str {
        Self::NAME
    }

    async fn init<'a>(&'a mut self, conn: &'a mut PgConnection) -> Result<(), ProjectionError> {
        if !self.fixed_prices {
            self.prices = PriceBook::load(conn).await?;
        }
        Ok(())
    }

    async fn apply<'a>(
        &'a mut self,
        tx: &'a mut PgConnection,
        event: &'a StoredEvent,
    ) -> Result<(), ProjectionError> {
        if !matches!(
            event.event_type(),
            "PriceSet"
                | "CompletionFinished"
                | "RequestCancelled"
                | "RequestFailed"
                | "CreditGranted"
        ) {
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
                self.charge(tx, position, at, charge).await?;
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
                self.charge(tx, position, at, charge).await?;
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
                    self.charge(tx, position, at, charge).await?;
                }
            }
            Event::CreditGranted(e) => self.credit(tx, position, at, e).await?,
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
