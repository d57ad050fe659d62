//! Money is never a float. Amounts are integer nano-dollars (1e-9 USD): one token of a
//! model priced at $0.01 per million tokens is 10 units, so nothing is rounded away.
//! Prices are stored per million tokens, also in nano-dollars, and a request's cost is
//! rounded once, half up, to a whole nano-dollar.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::str::FromStr;

use crate::usage::Usage;

const NANOS_PER_USD: i64 = 1_000_000_000;

/// An amount of money in nano-dollars. Serialized as an integer in events; shown on the
/// API as a decimal USD string via [`Nanos::to_usd_string`].
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Nanos(pub i64);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MoneyError {
    #[error("`{0}` is not a decimal amount of USD (e.g. \"0.15\")")]
    NotDecimal(String),
    #[error("`{0}` has more than 9 decimal places; amounts are kept in nano-dollars")]
    TooPrecise(String),
    #[error("`{0}` is out of range")]
    OutOfRange(String),
    #[error("`{0}` is negative; prices must be zero or more")]
    Negative(String),
}

impl Nanos {
    pub const ZERO: Nanos = Nanos(0);

    /// Parses a decimal USD string exactly (`"0.15"` → 150,000,000).
    pub fn from_usd_str(s: &str) -> Result<Self, MoneyError> {
        let d = Decimal::from_str(s.trim()).map_err(|_| MoneyError::NotDecimal(s.to_owned()))?;
        let scaled = d
            .checked_mul(Decimal::from(NANOS_PER_USD))
            .ok_or_else(|| MoneyError::OutOfRange(s.to_owned()))?;
        if !scaled.fract().is_zero() {
            return Err(MoneyError::TooPrecise(s.to_owned()));
        }
        i64::try_from(scaled)
            .map(Nanos)
            .map_err(|_| MoneyError::OutOfRange(s.to_owned()))
    }

    /// Exact decimal USD string, trailing zeros trimmed (`150000000` → `"0.15"`).
    pub fn to_usd_string(self) -> String {
        let d = Decimal::new(self.0, 9).normalize();
        if d.is_zero() {
            "0".to_owned()
        } else {
            d.to_string()
        }
    }

    pub fn saturating_add(self, other: Nanos) -> Nanos {
        Nanos(self.0.saturating_add(other.0))
    }
}

/// A model's price: per million tokens for input, cached input and output, plus a flat
/// per-request amount (per image for image generations). All in nano-dollars.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Price {
    pub input_per_mtok: Nanos,
    pub output_per_mtok: Nanos,
    /// Cached prompt tokens; when a provider reports no cache price the input price applies.
    pub cached_input_per_mtok: Option<Nanos>,
    #[serde(default)]
    pub per_request: Nanos,
}

impl Price {
    /// The cost of one request's usage. Cached tokens are part of `prompt_tokens` (OpenAI's
    /// convention) and are priced at the cached rate, the rest at the input rate; a
    /// provider reporting more cached than prompt tokens is clamped, never negative.
    pub fn cost(&self, usage: &Usage) -> Nanos {
        let cached = usage.cached_tokens.min(usage.prompt_tokens);
        let uncached = usage.prompt_tokens - cached;
        let cached_rate = self.cached_input_per_mtok.unwrap_or(self.input_per_mtok);
        let micro = i128::from(uncached) * i128::from(self.input_per_mtok.0)
            + i128::from(cached) * i128::from(cached_rate.0)
            + i128::from(usage.completion_tokens) * i128::from(self.output_per_mtok.0);
        // Round half up to whole nano-dollars, once per request.
        let rounded = (micro + 500_000) / 1_000_000;
        // An image generation is charged per image; any other request once.
        let requests = i128::from(usage.images.max(1));
        let total = rounded + i128::from(self.per_request.0) * requests;
        Nanos(i64::try_from(total).unwrap_or(i64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_exactly() {
        assert_eq!(Nanos::from_usd_str("0.15"), Ok(Nanos(150_000_000)));
        assert_eq!(Nanos::from_usd_str("5.00"), Ok(Nanos(5_000_000_000)));
        assert_eq!(Nanos::from_usd_str("0.000000001"), Ok(Nanos(1)));
        assert!(matches!(
            Nanos::from_usd_str("0.0000000001"),
            Err(MoneyError::TooPrecise(_))
        ));
        assert!(matches!(
            Nanos::from_usd_str("abc"),
            Err(MoneyError::NotDecimal(_))
        ));
        assert_eq!(Nanos(150_000_000).to_usd_string(), "0.15");
        assert_eq!(Nanos(123).to_usd_string(), "0.000000123");
        assert_eq!(Nanos(0).to_usd_string(), "0");
    }

    #[test]
    fn cost_prices_cached_tokens_once() {
        let price = Price {
            input_per_mtok: Nanos::from_usd_str("0.15").expect("price"),
            output_per_mtok: Nanos::from_usd_str("0.60").expect("price"),
            cached_input_per_mtok: Some(Nanos::from_usd_str("0.075").expect("price")),
            per_request: Nanos::ZERO,
        };
        let usage = Usage {
            prompt_tokens: 1000,
            completion_tokens: 500,
            cached_tokens: 400,
            ..Usage::default()
        };
        // 600 * 150 + 400 * 75 + 500 * 600 nanos.
        assert_eq!(price.cost(&usage), Nanos(90_000 + 30_000 + 300_000));
        let silly = Usage {
            prompt_tokens: 10,
            cached_tokens: 50,
            ..Usage::default()
        };
        assert_eq!(price.cost(&silly), Nanos(750)); // all 10 prompt tokens cached, at 75 nanos each
    }

    #[test]
    fn image_generations_pay_per_image() {
        let price = Price {
            per_request: Nanos::from_usd_str("0.04").expect("price"),
            ..Price::default()
        };
        let three = Usage {
            images: 3,
            ..Usage::default()
        };
        assert_eq!(price.cost(&three), Nanos(120_000_000));
        assert_eq!(price.cost(&Usage::default()), Nanos(40_000_000));
    }
}
