-- Accounts: users sign in with a password (argon2 PHC string, never returned by the API),
-- keys carry their own restrictions, and users may have their own request/token limits.
ALTER TABLE users
    ADD COLUMN email               text UNIQUE,
    ADD COLUMN password_hash       text,
    ADD COLUMN rpm                 integer CHECK (rpm IS NULL OR rpm > 0),
    ADD COLUMN tpm                 integer CHECK (tpm IS NULL OR tpm > 0),
    -- Tokens issued before this instant are refused (set on password change).
    ADD COLUMN password_changed_at timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN disabled            boolean NOT NULL DEFAULT false;

-- Empty `allowed_models` = every model; `tpm` = tokens per minute (prompt estimate plus
-- the completion budget), unset = unlimited.
ALTER TABLE api_keys
    ADD COLUMN allowed_models text[]  NOT NULL DEFAULT '{}',
    ADD COLUMN tpm            integer CHECK (tpm IS NULL OR tpm > 0),
    ADD COLUMN updated_at     timestamptz NOT NULL DEFAULT now();
CREATE INDEX api_keys_user_idx ON api_keys (user_id, created_at);

-- Redemption codes: stored as a SHA-256 hash like keys; redeeming one appends a
-- `CreditGranted` to the chosen key, and the row records who redeemed it (once).
CREATE TABLE redemption_codes (
    id           uuid        PRIMARY KEY,
    code_hash    text        NOT NULL UNIQUE,
    prefix       text        NOT NULL,
    amount_nanos bigint      NOT NULL CHECK (amount_nanos > 0),
    note         text        NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    redeemed_at  timestamptz,
    redeemed_by  uuid        REFERENCES users (id) ON DELETE SET NULL,
    redeemed_key uuid
);
