-- Billing read models, written only by the billing projector.

-- Price history from PriceSet events: the price in force for an event is the latest row
-- with effective_at <= the event's occurred_at.
CREATE TABLE prices (
    model                  text        NOT NULL,
    effective_at           timestamptz NOT NULL,
    position               bigint      NOT NULL,
    input_per_mtok         bigint      NOT NULL CHECK (input_per_mtok >= 0),
    output_per_mtok        bigint      NOT NULL CHECK (output_per_mtok >= 0),
    cached_input_per_mtok  bigint      CHECK (cached_input_per_mtok >= 0),
    per_request            bigint      NOT NULL DEFAULT 0 CHECK (per_request >= 0),
    PRIMARY KEY (model, effective_at, position)
);

-- One row per charge or credit. `amount_nanos` > 0 is money spent, < 0 money granted.
CREATE TABLE ledger_entries (
    position           bigint      PRIMARY KEY,
    request_id         uuid,
    key_id             uuid        NOT NULL,
    user_id            uuid,
    model              text,
    kind               text        NOT NULL CHECK (kind IN ('usage', 'credit')),
    prompt_tokens      bigint      NOT NULL DEFAULT 0 CHECK (prompt_tokens >= 0),
    completion_tokens  bigint      NOT NULL DEFAULT 0 CHECK (completion_tokens >= 0),
    cached_tokens      bigint      NOT NULL DEFAULT 0 CHECK (cached_tokens >= 0),
    amount_nanos       bigint      NOT NULL,
    usage_source       text,
    priced             boolean     NOT NULL DEFAULT true,
    occurred_at        timestamptz NOT NULL
);
-- A request is charged once, whatever events a redelivery produced.
CREATE UNIQUE INDEX ledger_entries_request_once ON ledger_entries (request_id) WHERE request_id IS NOT NULL;
CREATE INDEX ledger_entries_key_idx ON ledger_entries (key_id, occurred_at);

CREATE TABLE key_balances (
    key_id         uuid        PRIMARY KEY,
    granted_nanos  bigint      NOT NULL DEFAULT 0,
    spent_nanos    bigint      NOT NULL DEFAULT 0 CHECK (spent_nanos >= 0),
    requests       bigint      NOT NULL DEFAULT 0,
    updated_at     timestamptz NOT NULL
);

CREATE TABLE daily_usage (
    day                date    NOT NULL,
    key_id             uuid    NOT NULL,
    model              text    NOT NULL,
    requests           bigint  NOT NULL DEFAULT 0,
    prompt_tokens      bigint  NOT NULL DEFAULT 0,
    completion_tokens  bigint  NOT NULL DEFAULT 0,
    cached_tokens      bigint  NOT NULL DEFAULT 0,
    cost_nanos         bigint  NOT NULL DEFAULT 0,
    PRIMARY KEY (day, key_id, model)
);
