//! The conversation projector: turns and answers in log order, the first outcome of a
//! request wins, a failed regeneration keeps the old answer, a deleted session loses its
//! messages, and the result does not depend on how the log is cut into batches.
#![allow(clippy::unwrap_used)]

mod common;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use common::{cancelled, env, failed, finished, t0, usage, TestDb};
use projector::{append_batch, ConversationsProjection, Runner};
use schemas::events::{
    SessionCreated, SessionDeleted, SessionMessageAppended, SessionRenamed, SessionReplyRegenerated,
};
use schemas::{Envelope, Event, Usage};

fn answer(request_id: Uuid, session: Uuid, content: &str, usage: Usage) -> Event {
    let Event::CompletionFinished(mut e) = finished(request_id, Uuid::nil(), "a", usage) else {
        unreachable!()
    };
    e.session_id = Some(session);
    e.content = Some(content.into());
    Event::CompletionFinished(e)
}

fn asked(session: Uuid, message_id: Uuid, request_id: Uuid, content: &str) -> Event {
    Event::SessionMessageAppended(SessionMessageAppended {
        session_id: session,
        message_id,
        role: "user".into(),
        content: content.into(),
        request_id,
        model: "gpt-4o-mini".into(),
    })
}

fn again(session: Uuid, request_id: Uuid, user_message_id: Uuid, replaces: Option<Uuid>) -> Event {
    Event::SessionReplyRegenerated(SessionReplyRegenerated {
        session_id: session,
        request_id,
        user_message_id,
        replaces,
        model: "gpt-4o-mini".into(),
    })
}

fn created(session: Uuid, user: Option<Uuid>, key: Option<Uuid>) -> Event {
    Event::SessionCreated(SessionCreated {
        session_id: session,
        owner_user_id: user,
        owner_key_id: key,
        title: "a".into(),
        model: Some("gpt-4o-mini".into()),
        system: None,
    })
}

struct Ids {
    s1: Uuid,
    s2: Uuid,
    m: [Uuid; 4],
    r: [Uuid; 8],
}

fn log(ids: &Ids) -> Vec<(i64, Envelope)> {
    let (s1, s2, m, r) = (ids.s1, ids.s2, ids.m, ids.r);
    let key = Uuid::nil();
    let events = vec![
        created(s1, Some(Uuid::now_v7()), None),
        asked(s1, m[0], r[0], "first"),
        answer(r[0], s1, "answer one", usage(10, 5)),
        // A redelivered request's second outcome changes nothing.
        answer(r[0], s1, "duplicate", usage(99, 99)),
        // Requests outside sessions are not conversations.
        finished(Uuid::now_v7(), key, "a", usage(1, 1)),
        failed(Uuid::now_v7(), key),
        asked(s1, m[1], r[1], "second"),
        failed(r[1], key),
        // The failed turn is answered by a regeneration that replaces nothing...
        again(s1, r[2], m[1], None),
        answer(r[2], s1, "answer two", usage(20, 6)),
        // ...then regenerated again: the failure keeps the old answer...
        again(s1, r[3], m[1], Some(r[2])),
        failed(r[3], key),
        // ...and a success supersedes it.
        again(s1, r[4], m[1], Some(r[2])),
        answer(r[4], s1, "answer two, again", usage(20, 7)),
        asked(s1, m[2], r[5], "third"),
        cancelled(r[5], key, usage(7, 3)),
        Event::SessionRenamed(SessionRenamed {
            session_id: s1,
            title: "b".into(),
        }),
        // A key's session, deleted while its answer is running.
        created(s2, None, Some(Uuid::now_v7())),
        asked(s2, m[3], r[6], "secret"),
        Event::SessionDeleted(SessionDeleted { session_id: s2 }),
        answer(r[6], s2, "too late", usage(1, 1)),
        // A malformed creation is skipped rather than stalling the projection.
        created(Uuid::now_v7(), None, None),
        asked(Uuid::now_v7(), Uuid::now_v7(), r[7], "no such session"),
    ];
    events
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            (
                i as i64 + 1,
                env(e, t0() + chrono::Duration::seconds(i as i64)),
            )
        })
        .collect()
}

#[derive(Debug, PartialEq, sqlx::FromRow)]
struct Message {
    message_id: Uuid,
    role: String,
    content: String,
    request_id: Uuid,
    superseded: bool,
}

#[derive(Debug, PartialEq, sqlx::FromRow)]
struct Round {
    request_id: Uuid,
    kind: String,
    status: String,
    prompt_tokens: i64,
    completion_tokens: i64,
    total_tokens: i64,
}

#[derive(Debug, PartialEq, sqlx::FromRow)]
struct Session {
    session_id: Uuid,
    title: String,
    deleted_at: Option<DateTime<Utc>>,
}

async fn read(pool: &PgPool) -> (Vec<Session>, Vec<Message>, Vec<Round>) {
    let sessions =
        sqlx::query_as("SELECT session_id, title, deleted_at FROM sessions ORDER BY session_id")
            .fetch_all(pool)
            .await
            .unwrap();
    let messages = sqlx::query_as(
        "SELECT message_id, role, content, request_id, superseded FROM messages ORDER BY position",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let rounds = sqlx::query_as(
        "SELECT request_id, kind, status, prompt_tokens, completion_tokens, total_tokens \
         FROM session_rounds ORDER BY position",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    (sessions, messages, rounds)
}

#[tokio::test]
async fn conversations_fold_turns_answers_regenerations_and_deletions() {
    let ids = Ids {
        s1: Uuid::now_v7(),
        s2: Uuid::now_v7(),
        m: [(); 4].map(|()| Uuid::now_v7()),
        r: [(); 8].map(|()| Uuid::now_v7()),
    };
    let events = log(&ids);
    let (m, r) = (ids.m, ids.r);

    // Once in one batch, once one event per batch: the same read models.
    let mut results = Vec::new();
    for batch_size in [500, 1] {
        let db = TestDb::new().await;
        append_batch(&db.pool, &events).await.unwrap();
        let done = Runner::new(db.pool.clone())
            .batch_size(batch_size)
            .catch_up(&mut ConversationsProjection::new(), None)
            .await
            .unwrap();
        assert_eq!(done.position, events.len() as i64);
        results.push(read(&db.pool).await);
        db.cleanup().await;
    }
    assert_eq!(results[0], results[1]);
    let (sessions, messages, rounds) = &results[0];

    assert_eq!(sessions.len(), 2, "the malformed creation is skipped");
    let s1 = sessions.iter().find(|s| s.session_id == ids.s1).unwrap();
    assert_eq!((s1.title.as_str(), s1.deleted_at), ("b", None));
    let s2 = sessions.iter().find(|s| s.session_id == ids.s2).unwrap();
    assert!(s2.deleted_at.is_some());

    let msg = |id, role: &str, content: &str, request_id, superseded| Message {
        message_id: id,
        role: role.into(),
        content: content.into(),
        request_id,
        superseded,
    };
    assert_eq!(
        messages,
        &vec![
            msg(m[0], "user", "first", r[0], false),
            msg(r[0], "assistant", "answer one", r[0], false),
            msg(m[1], "user", "second", r[1], false),
            msg(r[2], "assistant", "answer two", r[2], true),
            msg(r[4], "assistant", "answer two, again", r[4], false),
            msg(m[2], "user", "third", r[5], false),
        ],
        "a deleted session's messages are gone, and so is the answer that came after"
    );

    let round = |id, kind: &str, status: &str, p, c| Round {
        request_id: id,
        kind: kind.into(),
        status: status.into(),
        prompt_tokens: p,
        completion_tokens: c,
        total_tokens: p + c,
    };
    assert_eq!(
        rounds,
        &vec![
            round(r[0], "chat", "completed", 10, 5),
            round(r[1], "chat", "failed", 0, 0),
            round(r[2], "regenerate", "completed", 20, 6),
            round(r[3], "regenerate", "failed", 0, 0),
            round(r[4], "regenerate", "completed", 20, 7),
            round(r[5], "chat", "cancelled", 7, 3),
            round(r[6], "chat", "completed", 1, 1),
        ]
    );
}
