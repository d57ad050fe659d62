-- Plans, user balances, and which part of each charge a plan paid. All of it is written
-- only by the billing projector, from `PlanConfigured`, `PlanSubscribed`,
-- `PlanUnsubscribed` and `UserCreditGranted` events, so a replay rebuilds it.
--
-- Rules (see billing/src/plans.rs): a plan grants `quota_nanos` per calendar month (UTC,
-- by the charge's occurred_at) for the models in `models` (empty = every model). A charge
-- of a subscribed user on a covered model is paid by what is left of that month's plan
-- quota first; the rest (and every charge on another model) is paid from the balance.

-- Every version of every plan, in log order; a plan's definition is its latest row.
CREATE TABLE plans (
    plan_id      uuid        NOT NULL,
    position     bigint      NOT NULL,
    name         text        NOT NULL,
    quota_nanos  bigint      NOT NULL CHECK (quota_nanos >= 0),
    models       text[]      NOT NULL DEFAULT '{}',
    -- Users may pick a public plan themselves; others are assigned by an admin.
    public       boolean     NOT NULL DEFAULT false,
    event_id     uuid        NOT NULL,
    occurred_at  timestamptz NOT NULL,
    PRIMARY KEY (plan_id, position)
);

-- Subscription history; `plan_id` NULL = the user left their plan. A user has at most one
-- plan: the latest row.
CREATE TABLE plan_subscriptions (
    user_id      uuid        NOT NULL,
    position     bigint      NOT NULL,
    plan_id      uuid,
    occurred_at  timestamptz NOT NULL,
    PRIMARY KEY (user_id, position)
);

CREATE VIEW current_plans AS
SELECT DISTINCT ON (plan_id) plan_id, position, name, quota_nanos, models, public, event_id, occurred_at
FROM plans ORDER BY plan_id, position DESC;

CREATE VIEW current_subscriptions AS
SELECT user_id, plan_id, position, occurred_at AS since
FROM (SELECT DISTINCT ON (user_id) user_id, plan_id, position, occurred_at
      FROM plan_subscriptions ORDER BY user_id, position DESC) latest
WHERE plan_id IS NOT NULL;

-- What the plans paid per user and month (`period` = the month's first day, UTC),
-- whichever plan the user had: switching plans mid-month does not refill the quota.
CREATE TABLE plan_usage (
    user_id     uuid    NOT NULL,
    period      date    NOT NULL,
    used_nanos  bigint  NOT NULL DEFAULT 0 CHECK (used_nanos >= 0),
    requests    bigint  NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, period)
);

-- Credits granted to a user (not to one key): shared by all the user's keys.
CREATE TABLE user_balances (
    user_id        uuid        PRIMARY KEY,
    granted_nanos  bigint      NOT NULL DEFAULT 0,
    updated_at     timestamptz NOT NULL
);

-- A charge records the plan that covered it and the part the plan paid; the balance paid
-- `amount_nanos - plan_nanos`. A user credit has no key.
ALTER TABLE ledger_entries
    ADD COLUMN plan_id    uuid,
    ADD COLUMN plan_nanos bigint NOT NULL DEFAULT 0 CHECK (plan_nanos >= 0),
    ALTER COLUMN key_id DROP NOT NULL,
    ADD CONSTRAINT ledger_entries_owner CHECK (key_id IS NOT NULL OR user_id IS NOT NULL),
    ADD CONSTRAINT ledger_entries_plan_part CHECK (plan_nanos <= GREATEST(amount_nanos, 0));

-- The part of `spent_nanos` / `cost_nanos` that plans paid.
ALTER TABLE key_balances ADD COLUMN plan_nanos bigint NOT NULL DEFAULT 0 CHECK (plan_nanos >= 0);
ALTER TABLE daily_usage ADD COLUMN plan_nanos bigint NOT NULL DEFAULT 0 CHECK (plan_nanos >= 0);
