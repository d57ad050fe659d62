//! Billing: what requests cost and who paid.
//!
//! - [`tokenizer`]: token estimates with OpenAI's BPE vocabularies (built once per
//!   process), for requests whose provider reports no usage and for quota reservations.
//! - [`prices`]: [`PriceBook`], the price history per model, answering "what did this
//!   model cost at that instant".
//! - [`projection`]: [`BillingProjection`], the `billing` projector run by
//!   `sluice billing` on the [`projector`] runtime: it folds `PriceSet`, the terminal
//!   request events and `CreditGranted` into the ledger, key balances and daily usage,
//!   charging each request once. With a price override it re-prices history for a replay.
//! - [`plans`]: monthly plans with a quota and a model allow-list, and the rules by which a
//!   charge is split between a user's plan and their balance (credits).
//!
//! Money is integer nano-dollars ([`schemas::Nanos`]) throughout; nothing here is a float.

pub mod plans;
pub mod prices;
pub mod projection;
pub mod tokenizer;

pub use plans::{PlanBook, PlanDef};
pub use prices::{PriceBook, PriceEntry, PriceError};
pub use projection::BillingProjection;
pub use tokenizer::{count_text, estimate_prompt, Encoding};
