-- The append-only event log. `position` is the JetStream stream sequence of the event,
-- so the journal can append idempotently and projectors read in one total order.
CREATE TABLE event_log (
    position        bigint      PRIMARY KEY,
    event_id        uuid        NOT NULL UNIQUE,
    stream          text        NOT NULL,
    type            text        NOT NULL,
    schema_version  smallint    NOT NULL,
    data            jsonb       NOT NULL,
    metadata        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    occurred_at     timestamptz NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX event_log_stream_idx ON event_log (stream, position);
CREATE INDEX event_log_type_idx ON event_log (type, position);
CREATE INDEX event_log_occurred_idx ON event_log (occurred_at);

-- Facts never change: refuse UPDATE and DELETE on the log at the database level.
CREATE FUNCTION event_log_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'event_log is append-only';
END $$;
CREATE TRIGGER event_log_append_only BEFORE UPDATE OR DELETE ON event_log
    FOR EACH ROW EXECUTE FUNCTION event_log_is_append_only();

-- One row per projector: the last position folded into its read models, written in the
-- same transaction as those read models.
CREATE TABLE checkpoints (
    projector   text        PRIMARY KEY,
    position    bigint      NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
