-- Configuration that is not money. Each change also appends an audit event.
CREATE TABLE users (
    id          uuid        PRIMARY KEY,
    name        text        NOT NULL UNIQUE,
    role        text        NOT NULL DEFAULT 'user' CHECK (role IN ('admin', 'user')),
    user_group  text        NOT NULL DEFAULT 'default',
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- API keys are stored as a SHA-256 hash (they are random 256-bit secrets, so a fast
-- hash is enough) plus a short display prefix.
CREATE TABLE api_keys (
    id           uuid        PRIMARY KEY,
    user_id      uuid        REFERENCES users (id) ON DELETE CASCADE,
    name         text        NOT NULL,
    key_hash     text        NOT NULL UNIQUE,
    prefix       text        NOT NULL,
    key_group    text        NOT NULL DEFAULT 'default',
    quota_nanos  bigint      CHECK (quota_nanos IS NULL OR quota_nanos >= 0),
    rpm          integer     CHECK (rpm IS NULL OR rpm > 0),
    source       text        NOT NULL DEFAULT 'api',
    expires_at   timestamptz,
    revoked_at   timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- Upstream channels. `api_key_sealed` is AES-256-GCM under SLUICE_SECRET_KEY.
CREATE TABLE channels (
    id              uuid        PRIMARY KEY,
    name            text        NOT NULL UNIQUE,
    channel_type    text        NOT NULL,
    base_url        text,
    api_key_sealed  text,
    models          text[]      NOT NULL,
    model_map       jsonb       NOT NULL DEFAULT '{}'::jsonb,
    priority        integer     NOT NULL DEFAULT 0,
    weight          integer     NOT NULL DEFAULT 1 CHECK (weight > 0),
    retry           integer     NOT NULL DEFAULT 1 CHECK (retry > 0),
    groups          text[]      NOT NULL DEFAULT '{}',
    enabled         boolean     NOT NULL DEFAULT true,
    source          text        NOT NULL DEFAULT 'api',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
