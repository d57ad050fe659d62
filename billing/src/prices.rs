//! The price history billing charges by. Prices change over time and events are billed at
//! the price in force when they occurred, so a replay months later charges exactly what the
//! live projector charged; a late `PriceSet` with an earlier `effective_at` re-prices only
//! events applied after it (events are never re-billed retroactively).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

use schemas::config::PriceConfig;
use schemas::money::MoneyError;
use schemas::{Nanos, Price};

/// One price of a model, in force from `effective_at` until the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PriceEntry {
    pub effective_at: DateTime<Utc>,
    /// Log position of the `PriceSet`; orders two prices with the same `effective_at`
    /// (the later event wins).
    pub position: i64,
    pub price: Price,
}

#[derive(Debug, thiserror::Error)]
pub enum PriceError {
    #[error("`prices[{index}]` (model `{model}`): {source}")]
    Invalid {
        index: usize,
        model: String,
        #[source]
        source: MoneyError,
    },
    #[error("`prices[{index}]`: model `{model}` is listed twice; keep one entry")]
    Duplicate { index: usize, model: String },
}

/// In-memory price history per model, sorted by `(effective_at, position)`. Lookups are
/// a hash and a binary search, so billing never queries `prices` per event.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PriceBook {
    models: HashMap<String, Vec<PriceEntry>>,
}

impl PriceBook {
    pub fn new() -> Self {
        Self::default()
    }

    /// A flat table, in force since forever: the `prices:` list of `sluice.yaml` or of a
    /// re-pricing replay's `--prices` file.
    pub fn from_configs(configs: &[PriceConfig]) -> Result<Self, PriceError> {
        let mut book = Self::new();
        for (index, config) in configs.iter().enumerate() {
            if book.models.contains_key(&config.model) {
                return Err(PriceError::Duplicate {
                    index,
                    model: config.model.clone(),
                });
            }
            let price = config.to_price().map_err(|source| PriceError::Invalid {
                index,
                model: config.model.clone(),
                source,
            })?;
            book.insert(&config.model, DateTime::<Utc>::MIN_UTC, 0, price);
        }
        Ok(book)
    }

    /// Loads the whole history from the `prices` table.
    pub async fn load<'e>(exec: impl PgExecutor<'e>) -> Result<Self, sqlx::Error> {
        let rows: Vec<PriceRow> = sqlx::query_as(
            "SELECT model, effective_at, position, input_per_mtok, output_per_mtok, cached_input_per_mtok, per_request \
             FROM prices",
        )
        .fetch_all(exec)
        .await?;
        let mut book = Self::new();
        for row in rows {
            let price = Price {
                input_per_mtok: Nanos(row.input_per_mtok),
                output_per_mtok: Nanos(row.output_per_mtok),
                cached_input_per_mtok: row.cached_input_per_mtok.map(Nanos),
                per_request: Nanos(row.per_request),
            };
            book.insert(&row.model, row.effective_at, row.position, price);
        }
        Ok(book)
    }

    /// Adds a price; an entry with the same `(effective_at, position)` is replaced, so
    /// inserting the same event twice changes nothing.
    pub fn insert(
        &mut self,
        model: &str,
        effective_at: DateTime<Utc>,
        position: i64,
        price: Price,
    ) {
        let entries = self.models.entry(model.to_owned()).or_default();
        let entry = PriceEntry {
            effective_at,
            position,
            price,
        };
        match entries
            .binary_search_by_key(&(effective_at, position), |e| (e.effective_at, e.position))
        {
            Ok(i) => entries[i] = entry,
            Err(i) => entries.insert(i, entry),
        }
    }

    /// The price of `model` in force at `at`: the latest entry with `effective_at <= at`.
    pub fn price_at(&self, model: &str, at: DateTime<Utc>) -> Option<Price> {
        let entries = self.models.get(model)?;
        let after = entries.partition_point(|e| e.effective_at <= at);
        after.checked_sub(1).map(|i| entries[i].price)
    }

    /// A model's history, oldest first.
    pub fn history(&self, model: &str) -> &[PriceEntry] {
        self.models.get(model).map_or(&[], Vec::as_slice)
    }

    pub fn models(&self) -> impl Iterator<Item = &str> {
        self.models.keys().map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }
}

#[derive(sqlx::FromRow)]
struct PriceRow {
    model: String,
    effective_at: DateTime<Utc>,
    position: i64,
    input_per_mtok: i64,
    output_per_mtok: i64,
    cached_input_per_mtok: Option<i64>,
    per_request: i64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn price(input: i64) -> Price {
        Price {
            input_per_mtok: Nanos(input),
            ..Price::default()
        }
    }

    #[test]
    fn price_at_picks_the_latest_effective_entry() {
        let t = |h| {
            Utc.with_ymd_and_hms(2026, 1, 1, h, 0, 0)
                .single()
                .expect("valid time")
        };
        let mut book = PriceBook::new();
        book.insert("m", t(10), 5, price(2));
        book.insert("m", t(8), 3, price(1));
        book.insert("m", t(10), 9, price(3)); // same instant, later event wins
        assert_eq!(book.price_at("m", t(7)), None);
        assert_eq!(book.price_at("m", t(8)), Some(price(1)));
        assert_eq!(book.price_at("m", t(9)), Some(price(1)));
        assert_eq!(book.price_at("m", t(10)), Some(price(3)));
        assert_eq!(book.price_at("other", t(10)), None);
        book.insert("m", t(8), 3, price(1));
        assert_eq!(book.history("m").len(), 3);
    }

    #[test]
    fn configs_apply_since_forever_and_reject_duplicates() {
        let cfg = |model: &str, input: &str| PriceConfig {
            model: model.into(),
            input_per_mtok: input.into(),
            output_per_mtok: "0.60".into(),
            cached_input_per_mtok: None,
            per_request: None,
        };
        let book = PriceBook::from_configs(&[cfg("a", "0.15")]).expect("valid");
        let p = book
            .price_at("a", DateTime::<Utc>::MIN_UTC)
            .expect("priced");
        assert_eq!(p.input_per_mtok, Nanos(150_000_000));
        assert!(matches!(
            PriceBook::from_configs(&[cfg("a", "1"), cfg("a", "2")]),
            Err(PriceError::Duplicate { index: 1, .. })
        ));
        assert!(matches!(
            PriceBook::from_configs(&[cfg("a", "x")]),
            Err(PriceError::Invalid { index: 0, .. })
        ));
    }
}
