//! Plans: monthly subscriptions with a quota and a model allow-list, and the rules by
//! which a charge is split between a plan and the balance.
//!
//! The rules, applied by the billing projector to every charge, from the event alone (so
//! a replay splits exactly as the live projector did):
//! - **Period.** A plan's quota is granted per calendar month in UTC. A charge belongs to
//!   the month of its event's `occurred_at` (when the request ended), not to the month in
//!   which it was projected.
//! - **Which plan.** The user's plan is the one set by the latest `PlanSubscribed` /
//!   `PlanUnsubscribed` before the charge in log order, with the plan's definition from the
//!   latest `PlanConfigured` before it. Keys without a user have no plan.
//! - **Order.** A charge on a model in the plan's allow-list (an empty list covers every
//!   model) is paid from what is left of the month's plan quota first; whatever the plan
//!   cannot pay, and every charge on another model, is paid from the balance (credits). A
//!   model outside the allow-list is therefore never refused because of the plan: it is
//!   simply paid from credits, like a request of a user without a plan.
//! - **Usage per user and month.** What plans paid is counted per user and month, whatever
//!   the plan: switching plans mid-month does not refill the quota; the new plan's quota
//!   applies minus what was already used that month. Changing a plan's quota takes effect
//!   for the charges after the change.
//! - **Record.** The ledger row of a covered charge names the plan (`plan_id`) and the part
//!   it paid (`plan_nanos`, possibly 0 when the month's quota is used up); the balance paid
//!   `amount_nanos - plan_nanos`.

use std::collections::HashMap;

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use schemas::Nanos;

/// A plan's definition as of some point in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanDef {
    pub plan_id: Uuid,
    pub name: String,
    pub monthly_quota: Nanos,
    /// Empty = every model.
    pub models: Vec<String>,
    pub public: bool,
}

impl PlanDef {
    /// Whether the plan pays for `model` (the name the client asked for).
    pub fn covers(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m == model)
    }
}

/// The plan covering one charge, captured when the charge is applied: later plan events
/// in the same batch must not change how an earlier charge is split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cover {
    pub plan_id: Uuid,
    pub monthly_quota: Nanos,
}

/// The first day (UTC) of the calendar month `at` falls in: the plan period of a charge.
pub fn period_of(at: DateTime<Utc>) -> NaiveDate {
    let day = at.date_naive();
    day.with_day(1).unwrap_or(day)
}

/// The first day of the period after `period`.
pub fn next_period(period: NaiveDate) -> NaiveDate {
    let (y, m) = if period.month() == 12 {
        (period.year() + 1, 1)
    } else {
        (period.year(), period.month() + 1)
    };
    NaiveDate::from_ymd_opt(y, m, 1).unwrap_or(period)
}

/// The part of a charge of `amount` that a plan pays when `used` of its `quota` is spent
/// this period: as much as is left, never more than the charge, never negative.
pub fn plan_part(amount: i64, quota: i64, used: i64) -> i64 {
    let left = quota.saturating_sub(used).max(0);
    amount.max(0).min(left)
}

/// The plans and subscriptions in force at the projector's position in the log.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PlanBook {
    plans: HashMap<Uuid, PlanDef>,
    /// User → plan.
    subscriptions: HashMap<Uuid, Uuid>,
}

impl PlanBook {
    /// The current plans and subscriptions from the read models.
    pub async fn load(conn: &mut PgConnection) -> Result<Self, sqlx::Error> {
        let plans: Vec<(Uuid, String, i64, Vec<String>, bool)> =
            sqlx::query_as("SELECT plan_id, name, quota_nanos, models, public FROM current_plans")
                .fetch_all(&mut *conn)
                .await?;
        let subscriptions: Vec<(Uuid, Uuid)> =
            sqlx::query_as("SELECT user_id, plan_id FROM current_subscriptions")
                .fetch_all(&mut *conn)
                .await?;
        Ok(Self {
            plans: plans
                .into_iter()
                .map(|(plan_id, name, quota, models, public)| {
                    let def = PlanDef {
                        plan_id,
                        name,
                        monthly_quota: Nanos(quota),
                        models,
                        public,
                    };
                    (plan_id, def)
                })
                .collect(),
            subscriptions: subscriptions.into_iter().collect(),
        })
    }

    pub fn configure(&mut self, plan: PlanDef) {
        self.plans.insert(plan.plan_id, plan);
    }

    pub fn subscribe(&mut self, user_id: Uuid, plan_id: Uuid) {
        self.subscriptions.insert(user_id, plan_id);
    }

    pub fn unsubscribe(&mut self, user_id: Uuid) {
        self.subscriptions.remove(&user_id);
    }

    pub fn plan(&self, plan_id: Uuid) -> Option<&PlanDef> {
        self.plans.get(&plan_id)
    }

    /// The plan of `user`, if any (a subscription to a plan never configured is none).
    pub fn plan_of(&self, user_id: Uuid) -> Option<&PlanDef> {
        self.subscriptions
            .get(&user_id)
            .and_then(|p| self.plans.get(p))
    }

    /// The plan that pays first for a charge of `user` on `model`, if any.
    pub fn cover(&self, user_id: Option<Uuid>, model: &str) -> Option<Cover> {
        let plan = self.plan_of(user_id?)?;
        plan.covers(model).then_some(Cover {
            plan_id: plan.plan_id,
            monthly_quota: plan.monthly_quota,
        })
    }
}

/// Prepares a scratch schema for a billing replay that starts at log position `from` > 0
/// (`sluice replay billing --from`): the plans and subscriptions recorded up to `from`, and
/// what plans paid per user and month for the charges up to it, are copied from the live
/// namespace, so the charges after `from` are split as the live projector split them.
pub async fn seed_window(
    scratch: &sqlx::PgPool,
    live: &schemas::Namespace,
    from: i64,
) -> Result<(), sqlx::Error> {
    let live = live.pg_schema();
    for sql in [
        format!("INSERT INTO plans SELECT * FROM \"{live}\".plans WHERE position <= $1 ON CONFLICT DO NOTHING"),
        format!(
            "INSERT INTO plan_subscriptions SELECT * FROM \"{live}\".plan_subscriptions \
             WHERE position <= $1 ON CONFLICT DO NOTHING"
        ),
        format!(
            "INSERT INTO plan_usage (user_id, period, used_nanos, requests) \
             SELECT user_id, date_trunc('month', occurred_at AT TIME ZONE 'UTC')::date, sum(plan_nanos)::bigint, count(*) \
             FROM \"{live}\".ledger_entries WHERE kind = 'usage' AND plan_nanos > 0 AND position <= $1 \
             GROUP BY 1, 2 ON CONFLICT DO NOTHING"
        ),
    ] {
        sqlx::query(&sql).bind(from).execute(scratch).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn period_is_the_utc_calendar_month() {
        let at = |y, m, d, h| {
            Utc.with_ymd_and_hms(y, m, d, h, 59, 59)
                .single()
                .expect("time")
        };
        let first = |y, m| NaiveDate::from_ymd_opt(y, m, 1).expect("date");
        assert_eq!(period_of(at(2026, 1, 31, 23)), first(2026, 1));
        assert_eq!(period_of(at(2026, 2, 1, 0)), first(2026, 2));
        assert_eq!(period_of(at(2024, 2, 29, 12)), first(2024, 2));
        assert_eq!(next_period(first(2026, 12)), first(2027, 1));
        assert_eq!(next_period(first(2026, 2)), first(2026, 3));
    }

    #[test]
    fn plan_pays_what_is_left_and_never_more() {
        assert_eq!(plan_part(30, 100, 0), 30);
        assert_eq!(plan_part(30, 100, 80), 20);
        assert_eq!(plan_part(30, 100, 100), 0);
        assert_eq!(plan_part(30, 100, 150), 0, "over-used by a quota cut");
        assert_eq!(plan_part(0, 100, 0), 0);
    }

    #[test]
    fn cover_follows_subscription_and_allow_list() {
        let (user, other, plan_id) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let mut book = PlanBook::default();
        book.subscribe(user, plan_id);
        assert_eq!(book.cover(Some(user), "a"), None, "plan not configured yet");
        book.configure(PlanDef {
            plan_id,
            name: "pro".into(),
            monthly_quota: Nanos(500),
            models: vec!["a".into()],
            public: false,
        });
        let cover = Some(Cover {
            plan_id,
            monthly_quota: Nanos(500),
        });
        assert_eq!(book.cover(Some(user), "a"), cover);
        assert_eq!(book.cover(Some(user), "b"), None, "outside the allow-list");
        assert_eq!(book.cover(Some(other), "a"), None);
        assert_eq!(book.cover(None, "a"), None);
        book.configure(PlanDef {
            plan_id,
            name: "pro".into(),
            monthly_quota: Nanos(500),
            models: vec![],
            public: true,
        });
        assert!(
            book.cover(Some(user), "b").is_some(),
            "empty list = every model"
        );
        book.unsubscribe(user);
        assert_eq!(book.cover(Some(user), "a"), None);
    }
}
