-- Conversation read models, written only by the conversation projector
-- (`projector/src/conversations.rs`, run by `sluice projector`). No foreign keys: the
-- projector keeps the rows consistent, and an in-place replay swaps each table on its own.

-- One row per session. A session belongs to a user, or to a key that has no user.
-- A deleted session keeps its row (so late answers to it are recognised and dropped) but
-- loses its messages and is hidden from every read.
CREATE TABLE sessions (
    session_id     uuid        PRIMARY KEY,
    owner_user_id  uuid,
    owner_key_id   uuid,
    title          text        NOT NULL,
    model          text,
    system_prompt  text,
    created_at     timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL,
    deleted_at     timestamptz,
    last_position  bigint      NOT NULL,
    CHECK ((owner_user_id IS NULL) <> (owner_key_id IS NULL))
);
CREATE INDEX sessions_user_idx ON sessions (owner_user_id, updated_at DESC)
    WHERE deleted_at IS NULL AND owner_user_id IS NOT NULL;
CREATE INDEX sessions_key_idx ON sessions (owner_key_id, updated_at DESC)
    WHERE deleted_at IS NULL AND owner_key_id IS NOT NULL;

-- The turns of a session in log order. User turns come from SessionMessageAppended,
-- assistant turns from the CompletionFinished of a session's request (message_id =
-- request_id). A regenerated answer is `superseded` once its replacement completed.
CREATE TABLE messages (
    message_id         uuid        PRIMARY KEY,
    session_id         uuid        NOT NULL,
    position           bigint      NOT NULL,
    role               text        NOT NULL CHECK (role IN ('user', 'assistant')),
    content            text        NOT NULL,
    -- User turn: the request queued to answer it; assistant turn: the request that did.
    request_id         uuid        NOT NULL,
    model              text        NOT NULL,
    finish_reason      text,
    -- The regeneration request that is replacing this answer, while it runs.
    replaced_by        uuid,
    superseded         boolean     NOT NULL DEFAULT false,
    created_at         timestamptz NOT NULL
);
CREATE INDEX messages_session_idx ON messages (session_id, position);
-- A request answers at most once, whatever a redelivery produced.
CREATE UNIQUE INDEX messages_answer_once ON messages (request_id) WHERE role = 'assistant';

-- One row per request a session queued (a chat turn or a regeneration): how it ended and
-- what it used, for `GET /api/sessions/{id}/usage` and to tell a turn still in flight.
CREATE TABLE session_rounds (
    request_id         uuid        PRIMARY KEY,
    session_id         uuid        NOT NULL,
    kind               text        NOT NULL CHECK (kind IN ('chat', 'regenerate')),
    status             text        NOT NULL DEFAULT 'pending'
                                   CHECK (status IN ('pending', 'completed', 'failed', 'cancelled')),
    model              text        NOT NULL,
    prompt_tokens      bigint      NOT NULL DEFAULT 0,
    completion_tokens  bigint      NOT NULL DEFAULT 0,
    total_tokens       bigint      NOT NULL DEFAULT 0,
    usage_source       text,
    started_at         timestamptz NOT NULL,
    finished_at        timestamptz,
    position           bigint      NOT NULL
);
CREATE INDEX session_rounds_session_idx ON session_rounds (session_id, position);
