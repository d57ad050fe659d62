-- One row per request, folded from its events by the `requests` projector: how it
-- ended, where it went and how long it took. Analysts query it for latency and errors.
CREATE TABLE requests (
    request_id         uuid        PRIMARY KEY,
    key_id             uuid,
    model              text,
    api                text,
    stream             boolean,
    status             text        NOT NULL DEFAULT 'accepted'
                                   CHECK (status IN ('accepted', 'completed', 'failed', 'cancelled')),
    channel_id         uuid,
    channel_name       text,
    upstream_model     text,
    attempts           integer     NOT NULL DEFAULT 0,
    error_kind         text,
    prompt_tokens      bigint,
    completion_tokens  bigint,
    usage_source       text,
    ttft_ms            bigint,
    duration_ms        bigint,
    accepted_at        timestamptz,
    finished_at        timestamptz,
    last_position      bigint      NOT NULL
);
CREATE INDEX requests_channel_idx ON requests (channel_id, finished_at);
