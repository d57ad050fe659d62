//! Channels end to end, every role a separate `sluice` process: the admin API creates,
//! changes, tests and deletes channels (secrets sealed, never returned, every change
//! audited) and running workers pick the changes up without a restart; a ban started by
//! one worker process is honoured by another (a later one, and one live at the same time)
//! until its probe; a channel refusing connections fails over and is banned.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{
    call, channel_yaml, chat_as, mock, until_chat, Stack, StackOptions, ADMIN_TOKEN, KEY, MODEL,
};
use mock_upstream::MockConfig;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const PROVIDER_KEY: &str = "sk-provider-secret-0123456789";

async fn admin(
    stack: &Stack,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value, String) {
    call(stack, method, path, Some(ADMIN_TOKEN), body).await
}

/// "hi" to `model`.
fn hi(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
}

/// A chat for `model` with the test key; its status.
async fn chat_status(stack: &Stack, model: &str) -> StatusCode {
    chat_as(stack, KEY, &hi(model)).await.0
}

#[tokio::test]
async fn admin_manages_channels_and_workers_follow_without_restart() {
    let stack = Stack::start(StackOptions::default()).await;
    let second = mock(MockConfig {
        require_key: Some(PROVIDER_KEY.to_owned()),
        ..MockConfig::default()
    })
    .await;
    let new_channel = json!({
        "name": "second",
        "type": "openai",
        "base_url": second.base_url(),
        "api_key": PROVIDER_KEY,
        "models": ["only-second"],
        "model_map": {"only-second": "upstream-second"},
        "priority": 1,
        "weight": 2,
    });

    // Admin rights only.
    let (status, _, _) = call(&stack, Method::GET, "/api/admin/channels", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, _) = call(&stack, Method::GET, "/api/admin/channels", Some(KEY), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, _) = call(
        &stack,
        Method::POST,
        "/api/admin/channels",
        Some(KEY),
        Some(new_channel.clone()),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Create: the key is sealed at rest and never shown.
    let (status, created, text) = admin(
        &stack,
        Method::POST,
        "/api/admin/channels",
        Some(new_channel.clone()),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    assert!(!text.contains(PROVIDER_KEY), "{text}");
    assert_eq!(created["has_api_key"], true);
    assert_eq!(created["weight"], 2);
    assert_eq!(created["source"], "api");
    let id = created["id"].as_str().unwrap().to_owned();
    let sealed: String =
        sqlx::query_scalar("SELECT api_key_sealed FROM channels WHERE name = 'second'")
            .fetch_one(&stack.pool)
            .await
            .unwrap();
    assert!(!sealed.contains(PROVIDER_KEY));

    let (status, list, text) = admin(&stack, Method::GET, "/api/admin/channels", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!text.contains(PROVIDER_KEY), "{text}");
    let names: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["mock-main", "second"]);
    let (status, one, _) = admin(
        &stack,
        Method::GET,
        &format!("/api/admin/channels/{id}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(one["model_map"], json!({"only-second": "upstream-second"}));

    // Bad input is a 400 naming the field, a duplicate name a 409, an unknown id a 404.
    for (body, param) in [
        (
            json!({"name": "x", "type": "nope", "models": ["m"]}),
            "type",
        ),
        (
            json!({"name": "x", "type": "openai", "models": []}),
            "models",
        ),
        (
            json!({"name": "x", "type": "openai", "models": ["m"], "weight": 0}),
            "weight",
        ),
        (
            json!({"name": " ", "type": "openai", "models": ["m"]}),
            "name",
        ),
        (
            json!({"name": "x", "type": "openai", "models": ["m"], "base_url": "ftp://x"}),
            "base_url",
        ),
        (
            json!({"name": "x", "type": "openai", "models": ["m"], "model_map": {"z": "y"}}),
            "model_map",
        ),
    ] {
        let (status, err, text) =
            admin(&stack, Method::POST, "/api/admin/channels", Some(body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
        assert_eq!(err["error"]["param"], param, "{text}");
    }
    let (status, _, text) = admin(
        &stack,
        Method::POST,
        "/api/admin/channels",
        Some(json!({"name": "x", "type": "openai", "models": ["m"], "secret": 1})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    let (status, err, _) = admin(
        &stack,
        Method::POST,
        "/api/admin/channels",
        Some(new_channel),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(err["error"]["code"], "conflict");
    for path in [
        format!("/api/admin/channels/{}", uuid::Uuid::now_v7()),
        "/api/admin/channels/not-a-uuid".to_owned(),
    ] {
        let (status, _, _) = admin(&stack, Method::GET, &path, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    // Running workers route to it (with the opened key) without a restart.
    until_chat(&stack, KEY, &hi("only-second"), StatusCode::OK).await;

    // The test call reports latency, or the error.
    let test_path = format!("/api/admin/channels/{id}/test");
    let (status, report, text) = admin(&stack, Method::POST, &test_path, None).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(report["ok"], true, "{text}");
    assert!(report["latency_ms"].is_u64());
    assert_eq!(report["upstream_model"], "upstream-second");
    let (status, changed, text) = admin(
        &stack,
        Method::PATCH,
        &format!("/api/admin/channels/{id}"),
        Some(json!({"api_key": "sk-wrong-key", "priority": 3})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(changed["priority"], 3);
    assert!(!text.contains("sk-wrong-key"));
    let (_, report, text) = admin(&stack, Method::POST, &test_path, None).await;
    assert_eq!(report["ok"], false, "{text}");
    assert_eq!(report["error"]["status"], 401, "{text}");
    assert_eq!(report["error"]["kind"], "auth", "{text}");
    admin(
        &stack,
        Method::PATCH,
        &format!("/api/admin/channels/{id}"),
        Some(json!({"api_key": PROVIDER_KEY})),
    )
    .await;

    // Disable takes it out of routing and the model list; enable puts it back.
    let (status, off, _) = admin(
        &stack,
        Method::POST,
        &format!("/api/admin/channels/{id}/disable"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(off["enabled"], false);
    // The model still exists (a channel lists it) but nothing serves it: 503, not 404.
    until_chat(
        &stack,
        KEY,
        &hi("only-second"),
        StatusCode::SERVICE_UNAVAILABLE,
    )
    .await;
    let (status, on, _) = admin(
        &stack,
        Method::POST,
        &format!("/api/admin/channels/{id}/enable"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(on["enabled"], true);
    until_chat(&stack, KEY, &hi("only-second"), StatusCode::OK).await;

    // Delete.
    let (status, _, _) = admin(
        &stack,
        Method::DELETE,
        &format!("/api/admin/channels/{id}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _, _) = admin(
        &stack,
        Method::GET,
        &format!("/api/admin/channels/{id}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = admin(
        &stack,
        Method::DELETE,
        &format!("/api/admin/channels/{id}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    until_chat(&stack, KEY, &hi("only-second"), StatusCode::NOT_FOUND).await;
    assert_eq!(chat_status(&stack, MODEL).await, StatusCode::OK);

    // Every change is in the audit log, without the secret.
    stack.wait_projected("ChannelDeleted", 1).await;
    let audit: Vec<(String, String)> = sqlx::query_as(
        "SELECT type, data::text FROM event_log WHERE stream = $1 ORDER BY position",
    )
    .bind(format!(
        "config-{}",
        uuid::Uuid::parse_str(&id).unwrap().simple()
    ))
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    let types: Vec<&str> = audit.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        types,
        [
            "ChannelConfigured", // create
            "ChannelConfigured", // wrong key
            "ChannelConfigured", // right key
            "ChannelConfigured", // disable
            "ChannelConfigured", // enable
            "ChannelDeleted"
        ]
    );
    assert!(audit.iter().all(|(_, data)| !data.contains(PROVIDER_KEY)));
    stack.stop().await;
}

#[tokio::test]
async fn a_ban_by_one_worker_process_is_honoured_by_another() {
    let backup = mock(MockConfig::default()).await;
    let mut stack = Stack::start(StackOptions {
        extra_channels: channel_yaml("backup", "openai", &backup.base_url(), MODEL, 2),
        ..StackOptions::default()
    })
    .await;
    // The priority-1 channel fails: three failures in a row ban it (for 60 s).
    stack.mock.set_config(MockConfig {
        fail_status: Some(500),
        ..MockConfig::default()
    });
    for _ in 0..3 {
        assert_eq!(chat_status(&stack, MODEL).await, StatusCode::OK);
    }
    assert_eq!(stack.mock.stats().requests_total, 3);
    assert_eq!(backup.stats().requests_total, 3);

    // A second worker process starts; the first stops. Only the shared health bucket
    // can tell the new one about the ban.
    let child = stack.command("worker").spawn().expect("spawn worker");
    stack.roles.insert("worker2", child);
    stack.terminate("worker");
    for _ in 0..10 {
        assert_eq!(chat_status(&stack, MODEL).await, StatusCode::OK);
    }
    assert_eq!(
        stack.mock.stats().requests_total,
        3,
        "the banned channel got traffic"
    );
    assert_eq!(backup.stats().requests_total, 13);

    // Operators see the ban in the channel list.
    let (status, list, _) = admin(&stack, Method::GET, "/api/admin/channels", None).await;
    assert_eq!(status, StatusCode::OK);
    let channels = list["data"].as_array().unwrap();
    let main = channels.iter().find(|c| c["name"] == "mock-main").unwrap();
    assert!(main["health"]["banned_until"].is_string(), "{main}");
    assert_eq!(main["health"]["ban_kind"], "upstream5xx");
    let backup_view = channels.iter().find(|c| c["name"] == "backup").unwrap();
    assert!(
        backup_view["health"]["banned_until"].is_null(),
        "{backup_view}"
    );
    stack.wait_projected("ChannelBanned", 1).await;
    stack.stop().await;
}

/// Reads a channel's record in the shared health bucket.
async fn ban_record(
    kv: &async_nats::jetstream::kv::Store,
    channel: uuid::Uuid,
) -> Option<workers::health::BanRecord> {
    let bytes = kv.get(format!("ban.{}", channel.simple())).await.unwrap()?;
    Some(serde_json::from_slice(&bytes).unwrap())
}

/// The ids of the workers that have a load record in the health bucket, from the
/// stream's subject list (`Store::keys` may wait forever while workers keep putting).
async fn live_workers(kv: &async_nats::jetstream::kv::Store) -> BTreeSet<uuid::Uuid> {
    use futures::StreamExt;
    let bucket = format!("$KV.{}.", kv.name);
    let Ok(subjects) = kv
        .stream
        .info_with_subjects(format!("{bucket}load.>"))
        .await
    else {
        return BTreeSet::new();
    };
    let keys: Vec<String> = subjects
        .filter_map(|s| {
            let key = s
                .ok()
                .and_then(|(subject, _)| subject.strip_prefix(&bucket).map(str::to_owned));
            async move { key }
        })
        .collect()
        .await;
    let mut live = BTreeSet::new();
    for key in keys {
        // A stopped worker deletes its record: the subject stays, the value is gone.
        if let Ok(Some(_)) = kv.get(&key).await {
            live.insert(uuid::Uuid::parse_str(&key["load.".len()..]).unwrap());
        }
    }
    live
}

async fn channel_id(stack: &Stack, name: &str) -> uuid::Uuid {
    sqlx::query_scalar("SELECT id FROM channels WHERE name = $1")
        .bind(name)
        .fetch_one(&stack.pool)
        .await
        .unwrap()
}

/// Two worker processes live at once: the ban one worker's breaker starts reaches the other
/// through the shared health bucket within a second, so neither sends the failing channel
/// any traffic until its ban runs out; then exactly one probe (claimed once across both
/// workers) tries it, and once it answers again it gets its traffic back.
#[tokio::test]
async fn two_live_workers_honour_one_ban_until_its_probe() {
    use futures::StreamExt;
    const BAN_SECS: u64 = 6;
    // The backup answers slowly, so whichever worker serves a request shows it in flight in
    // its load record (published every 250 ms): that is how the test knows both workers
    // took part.
    let backup = mock(MockConfig {
        ttft_ms: 400,
        ..MockConfig::default()
    })
    .await;
    let stack = Stack::start(StackOptions {
        extra_channels: format!(
            "{}routing:\n  ban_secs: {BAN_SECS}\n  failure_threshold: 1\n",
            channel_yaml("backup", "openai", &backup.base_url(), MODEL, 2)
        ),
        workers: 2,
        ..StackOptions::default()
    })
    .await;
    let main_id = channel_id(&stack, "mock-main").await;
    let backup_id = channel_id(&stack, "backup").await;
    let js = async_nats::jetstream::new(async_nats::connect(common::NATS_URL).await.unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    let kv = loop {
        if let Ok(kv) = js.get_key_value(stack.ns.channel_health_bucket()).await {
            if live_workers(&kv).await.len() == 2 {
                break kv;
            }
        }
        assert!(Instant::now() < deadline, "two workers never went live");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let serving = std::sync::Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let mut watch = kv.watch("load.>").await.unwrap();
    let collector = tokio::spawn({
        let serving = serving.clone();
        async move {
            while let Some(Ok(entry)) = watch.next().await {
                let Some(worker) = entry
                    .key
                    .strip_prefix("load.")
                    .and_then(|w| uuid::Uuid::parse_str(w).ok())
                else {
                    continue;
                };
                if let Ok(load) =
                    serde_json::from_slice::<workers::health::LoadRecord>(&entry.value)
                {
                    if load.in_flight.get(&backup_id).copied().unwrap_or(0) > 0 {
                        serving.lock().unwrap().insert(worker);
                    }
                }
            }
        }
    });

    // The priority-1 channel fails with 500: the first failure bans it (threshold 1) and the
    // request succeeds on priority 2.
    stack.mock.set_config(MockConfig {
        fail_status: Some(500),
        ..MockConfig::default()
    });
    assert_eq!(chat_status(&stack, MODEL).await, StatusCode::OK);
    let banned_at = Instant::now();
    assert_eq!(stack.mock.stats().requests_total, 1);
    let ban = ban_record(&kv, main_id).await.expect("the ban is shared");
    let until_ms = ban.until_ms;
    let others: Vec<uuid::Uuid> = live_workers(&kv)
        .await
        .into_iter()
        .filter(|w| *w != ban.by)
        .collect();
    assert_eq!(others.len(), 1, "the banning worker is one of two");
    let other = others[0];

    // One second later the other worker knows: batches of concurrent requests (both
    // workers pull from the queue) until the other worker was seen serving, all while the
    // ban lasts; the failing channel gets nothing from either.
    tokio::time::sleep_until((banned_at + Duration::from_secs(1)).into()).await;
    let mut batches = 0;
    while !serving.lock().unwrap().contains(&other) {
        assert!(
            workers::health::now_ms() + 2_000 < until_ms,
            "the other worker took no request while the ban lasted ({batches} batches)"
        );
        let statuses = futures::future::join_all((0..6).map(|_| chat_status(&stack, MODEL))).await;
        assert!(
            statuses.iter().all(|s| *s == StatusCode::OK),
            "{statuses:?}"
        );
        batches += 1;
        // Let the last load records arrive.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        stack.mock.stats().requests_total,
        1,
        "a worker sent traffic to the banned channel"
    );
    let backup_during_ban = backup.stats().requests_total;
    assert_eq!(backup_during_ban, 1 + 6 * batches);

    // The ban runs out while it still fails: of concurrent requests on both workers exactly
    // one probes it, fails, and bans it again; every request still succeeds.
    let wait = until_ms.saturating_sub(workers::health::now_ms()) + 200;
    tokio::time::sleep(Duration::from_millis(wait)).await;
    let statuses = futures::future::join_all((0..6).map(|_| chat_status(&stack, MODEL))).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    assert_eq!(stack.mock.stats().requests_total, 2, "exactly one probe");
    let again = ban_record(&kv, main_id).await.unwrap();
    assert!(again.until_ms > until_ms, "the failed probe bans again");

    // Healed: after the new ban the probe succeeds and the channel takes traffic again,
    // from both workers.
    stack.mock.set_config(MockConfig::default());
    let wait = again.until_ms.saturating_sub(workers::health::now_ms()) + 200;
    tokio::time::sleep(Duration::from_millis(wait)).await;
    assert_eq!(chat_status(&stack, MODEL).await, StatusCode::OK);
    assert_eq!(stack.mock.stats().requests_total, 3, "the probe");
    let healed = ban_record(&kv, main_id).await.unwrap();
    assert_eq!(healed.until_ms, 0, "the recovery is shared");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let backup_before = backup.stats().requests_total;
    let statuses = futures::future::join_all((0..6).map(|_| chat_status(&stack, MODEL))).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    assert_eq!(stack.mock.stats().requests_total, 9);
    assert_eq!(backup.stats().requests_total, backup_before);
    stack.wait_projected("ChannelBanned", 2).await;
    collector.abort();
    stack.stop().await;
}

/// A priority-0 channel whose address refuses connections: every request still succeeds on
/// the next tier, the breaker bans the channel after its failures in a row (default 3),
/// and from then on no request even tries it.
#[tokio::test]
async fn a_channel_refusing_connections_fails_over_and_is_then_skipped() {
    // Bound and released at once: nothing listens there.
    let dead_port = common::free_port();
    let stack = Stack::start(StackOptions {
        extra_channels: channel_yaml(
            "refusing",
            "openai",
            &format!("http://127.0.0.1:{dead_port}/v1"),
            MODEL,
            0,
        ),
        ..StackOptions::default()
    })
    .await;
    for _ in 0..10 {
        assert_eq!(chat_status(&stack, MODEL).await, StatusCode::OK);
    }
    assert_eq!(stack.mock.stats().requests_total, 10);
    stack.wait_projected("ChannelBanned", 1).await;
    let refusing = channel_id(&stack, "refusing").await;
    let failed: Vec<String> = sqlx::query_scalar(
        "SELECT data->>'kind' FROM event_log WHERE type = 'AttemptFailed' \
         AND (data->>'channel_id')::uuid = $1 ORDER BY position",
    )
    .bind(refusing)
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    assert_eq!(failed, ["connection", "connection", "connection"]);
    let ban: (String, i64) = sqlx::query_as(
        "SELECT data->>'kind', (data->>'failures')::bigint FROM event_log \
         WHERE type = 'ChannelBanned' AND (data->>'channel_id')::uuid = $1",
    )
    .bind(refusing)
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    assert_eq!(ban, ("connection".to_owned(), 3));
    let (_, list, _) = admin(&stack, Method::GET, "/api/admin/channels", None).await;
    let view = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "refusing")
        .unwrap()
        .clone();
    assert_eq!(view["health"]["ban_kind"], "connection", "{view}");
    stack.stop().await;
}
