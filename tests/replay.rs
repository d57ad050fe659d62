//! Replay, re-pricing, audit and export, through the `sluice` binary on the real services:
//! live read models built by a whole deployment (`Stack`) or by the live projector code
//! over a synthetic log, then rebuilt, compared, tampered with and interrupted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use serde_json::{json, Value};
use sqlx::PgPool;

use common::{sluice_bin, Stack, StackOptions, ADMIN_TOKEN, DATABASE_URL, MODEL, NATS_URL};
use schemas::events::{CreditGranted, Metadata, PriceSet, RequestAccepted};
use schemas::work::Api;
use schemas::{Envelope, Event, Namespace, Nanos, Price};

/// Rows of `schema.table` as JSON, in a stable order.
async fn rows(pool: &PgPool, schema: &str, table: &str, order: &str) -> Vec<Value> {
    sqlx::query_scalar(&format!(
        "SELECT to_jsonb(t) FROM \"{schema}\".{table} t ORDER BY {order}"
    ))
    .fetch_all(pool)
    .await
    .unwrap()
}

const BILLING_TABLES: &[(&str, &str)] = &[
    ("ledger_entries", "position"),
    ("key_balances", "key_id"),
    ("daily_usage", "day, key_id, model"),
    ("prices", "model, effective_at, position"),
];

fn output(cmd: &mut Command) -> (Output, String) {
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("run sluice");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (out, stdout)
}

async fn drop_schema(pool: &PgPool, schema: &str) {
    sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .execute(pool)
        .await
        .unwrap();
}

/// Sends `n` completions with different lengths and waits until both projectors have them.
async fn traffic(stack: &Stack, n: usize) {
    for i in 0..n {
        let resp = stack
            .chat(json!({"model": MODEL, "messages": [{"role": "user", "content": format!("question {i}")}],
                         "mock": {"chunks": 3 + i}}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    }
    stack.wait_projected("CompletionFinished", n as i64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_zero_equals_live_and_repricing_doubles_the_output_part() {
    let stack = Stack::start(StackOptions::default()).await;
    traffic(&stack, 6).await;
    let live = stack.ns.as_str().to_owned();

    // Billing and requests, replayed from 0 into scratch schemas, equal the live read
    // models row for row.
    let billing_into = format!("{live}_rb");
    let (out, stdout) =
        output(
            stack
                .command("replay")
                .args(["billing", "--into", &billing_into, "--json"]),
        );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_str(&stdout).unwrap();
    let head: i64 = sqlx::query_scalar("SELECT max(position) FROM event_log")
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    assert_eq!(summary["position"], head);
    assert_eq!(summary["interrupted"], false);
    for (table, order) in BILLING_TABLES {
        let a = rows(&stack.pool, &live, table, order).await;
        let b = rows(&stack.pool, &billing_into, table, order).await;
        assert!(!a.is_empty(), "{table} has rows");
        assert_eq!(a, b, "{table} differs after replay");
    }
    let requests_into = format!("{live}_rq");
    let (out, _) = output(
        stack
            .command("replay")
            .args(["requests", "--into", &requests_into]),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        rows(&stack.pool, &live, "requests", "request_id").await,
        rows(&stack.pool, &requests_into, "requests", "request_id").await
    );

    // Doubling the output price adds exactly the output part to every charge.
    let prices = stack.dir.join("doubled.yaml");
    std::fs::write(
        &prices,
        format!("prices:\n  - {{model: {MODEL}, input_per_mtok: \"0.15\", output_per_mtok: \"1.20\"}}\n"),
    )
    .unwrap();
    let repriced_into = format!("{live}_rp");
    let (out, stdout) = output(stack.command("replay").args([
        "billing",
        "--into",
        &repriced_into,
        "--prices",
        prices.to_str().unwrap(),
        "--json",
    ]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_str(&stdout).unwrap();
    let pairs: Vec<(i64, i64, i64, i64)> = sqlx::query_as(&format!(
        "SELECT l.position, l.completion_tokens, l.amount_nanos, r.amount_nanos \
         FROM \"{live}\".ledger_entries l JOIN \"{repriced_into}\".ledger_entries r USING (position) \
         WHERE l.kind = 'usage' ORDER BY l.position"
    ))
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    assert_eq!(pairs.len(), 6);
    let mut expected_difference = 0;
    for (position, completion, billed, repriced) in &pairs {
        assert!(*completion > 0);
        // 0.60 USD per million output tokens is 600 nano-USD per token.
        let output_part = completion * 600;
        assert_eq!(
            *repriced,
            billed + output_part,
            "charge at position {position}"
        );
        expected_difference += output_part;
    }
    let total = &summary["repricing"]["total"];
    assert_eq!(total["difference_nanos"], expected_difference);
    assert_eq!(total["requests"], 6);
    assert_eq!(summary["repricing"]["by_model"][0]["name"], MODEL);
    assert_eq!(
        summary["repricing"]["by_model"][0]["difference_nanos"],
        expected_difference
    );
    assert_eq!(summary["repricing"]["by_key"].as_array().unwrap().len(), 1);

    for schema in [&billing_into, &requests_into, &repriced_into] {
        drop_schema(&stack.pool, schema).await;
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_passes_on_a_clean_log_and_names_a_tampered_ledger_row() {
    let stack = Stack::start(StackOptions::default()).await;
    // `events tail` follows JetStream live: it sees the completions as they happen.
    let mut tail = stack
        .command("events")
        // `--all`: from the stream's start, so no event is missed while it connects.
        .args(["tail", "--all", "--type", "CompletionFinished"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let tail_out = tail.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(tail_out)
            .lines()
            .map_while(Result::ok)
        {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    traffic(&stack, 3).await;
    for _ in 0..3 {
        let line = lines_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("a tailed event");
        let event: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(event["type"], "CompletionFinished");
        assert!(event["position"].as_u64().unwrap() > 0);
        assert_eq!(event["data"]["model"], MODEL);
    }
    let _ = tail.kill();
    let _ = tail.wait();

    // Caught up: both projectors at the head, no lag.
    let url = format!("{}/api/admin/projections", stack.base);
    let resp = stack.http.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let resp = stack
        .http
        .get(&url)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let lag: Value = resp.json().await.unwrap();
    let head = lag["head"]["position"].as_i64().unwrap();
    assert!(head > 0);
    for name in ["billing", "requests"] {
        let p = lag["projections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("{name} listed: {lag}"));
        assert_eq!(p["position"], head, "{lag}");
        assert_eq!(p["lag_events"], 0);
        assert_eq!(p["lag_seconds"], 0.0);
    }

    let (out, stdout) = output(&mut stack.command("audit"));
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("audit passed"), "{stdout}");

    let position: i64 = sqlx::query_scalar(
        "UPDATE ledger_entries SET amount_nanos = amount_nanos + 7 \
         WHERE position = (SELECT min(position) FROM ledger_entries WHERE kind = 'usage') RETURNING position",
    )
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    let (out, stdout) = output(stack.command("audit").arg("--json"));
    assert!(!out.status.success(), "audit must fail after tampering");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    let diffs = report["differences"].as_array().unwrap();
    let ledger = diffs
        .iter()
        .find(|d| d["table"] == "ledger_entries")
        .expect("the ledger row is named");
    assert_eq!(ledger["key"], format!("position={position}"));
    assert_eq!(ledger["kind"], "changed");
    let [live, rebuilt] = [
        &ledger["detail"]["amount_nanos"][0],
        &ledger["detail"]["amount_nanos"][1],
    ];
    assert_eq!(live.as_i64().unwrap(), rebuilt.as_i64().unwrap() + 7);
    // The human-readable form names it too.
    let (out, stdout) = output(&mut stack.command("audit"));
    assert!(!out.status.success());
    assert!(
        stdout.contains(&format!("ledger_entries position={position}"))
            && stdout.contains("amount_nanos"),
        "{stdout}"
    );
    // Scratch schemas are dropped afterwards.
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_namespace WHERE nspname LIKE $1")
        .bind(format!(
            "{}%",
            projector::replay::scratch_prefix(&stack.ns, "a").replace('_', "\\_")
        ))
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
    stack.stop().await;
}

/// A migrated namespace of its own, for tests that write the log directly.
struct Scratch {
    ns: Namespace,
    pool: PgPool,
    config: std::path::PathBuf,
}

impl Scratch {
    async fn new() -> Self {
        let ns = Namespace::new(&format!("t_{}", uuid::Uuid::now_v7().simple())).unwrap();
        let pool = projector::db::connect(DATABASE_URL, &ns, 4).await.unwrap();
        projector::db::migrate(&pool, &ns).await.unwrap();
        let config = std::env::temp_dir().join(format!("sluice-{}.yaml", ns.as_str()));
        std::fs::write(&config, "").unwrap();
        Self { ns, pool, config }
    }

    fn sluice(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(sluice_bin());
        cmd.args(args)
            .env("SLUICE_CONFIG", &self.config)
            .env("SLUICE_NAMESPACE", self.ns.as_str())
            .env("SLUICE_DATABASE_URL", DATABASE_URL)
            .env("SLUICE_NATS_URL", NATS_URL)
            .env("SLUICE_LOG", "warn")
            .stdin(Stdio::null());
        cmd
    }

    async fn cleanup(self) {
        for tag in ["r", "i", "a"] {
            let like = format!(
                "{}%",
                projector::replay::scratch_prefix(&self.ns, tag).replace('_', "\\_")
            );
            let extra: Vec<String> =
                sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE nspname LIKE $1")
                    .bind(like)
                    .fetch_all(&self.pool)
                    .await
                    .unwrap();
            for schema in extra {
                drop_schema(&self.pool, &schema).await;
            }
        }
        projector::db::drop_schema(&self.pool, &self.ns)
            .await
            .unwrap();
        let _ = std::fs::remove_file(&self.config);
    }
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).single().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_of_a_time_range_holds_exactly_its_events() {
    let db = Scratch::new().await;
    // Events one minute apart, appended out of time order (as several processes would):
    // the range is on occurred_at, whatever the positions.
    let key = schemas::new_id();
    let mut log: Vec<(i64, Envelope)> = Vec::new();
    for i in 0..30i64 {
        let minute = if i % 5 == 0 { 29 - i } else { i };
        let at = t0() + chrono::Duration::minutes(minute);
        let event = if i % 2 == 0 {
            Event::CreditGranted(CreditGranted {
                key_id: key,
                amount: Nanos(i),
                note: format!("n{i}"),
            })
        } else {
            Event::RequestAccepted(RequestAccepted {
                request_id: schemas::new_id(),
                api: Api::ChatCompletions,
                model: "m".into(),
                stream: false,
                key_id: key,
                user_id: None,
                group: "default".into(),
                session_id: None,
            })
        };
        log.push((i + 1, event.into_envelope(at, Metadata::default())));
    }
    projector::append_batch(&db.pool, &log).await.unwrap();
    let (since, until) = (
        t0() + chrono::Duration::minutes(5),
        t0() + chrono::Duration::minutes(12),
    );
    let in_range = |e: &Envelope| e.occurred_at >= since && e.occurred_at < until;
    let expected: Vec<i64> = log
        .iter()
        .filter(|(_, e)| in_range(e))
        .map(|(p, _)| *p)
        .collect();
    assert!(expected.len() >= 5);

    let (out, stdout) = output(&mut db.sluice(&[
        "events",
        "export",
        "--since",
        &since.to_rfc3339(),
        "--until",
        &until.to_rfc3339(),
        "--format",
        "jsonl",
    ]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let got: Vec<i64> = lines
        .iter()
        .map(|l| l["position"].as_i64().unwrap())
        .collect();
    assert_eq!(got, expected);
    for line in &lines {
        let (_, env) = &log[(line["position"].as_i64().unwrap() - 1) as usize];
        assert_eq!(line["event_id"], json!(env.event_id));
        assert_eq!(line["type"], env.event_type);
        assert_eq!(line["data"], env.data);
    }

    // CSV, one type, to a file.
    let file = db.config.with_extension("csv");
    let (out, _) = output(&mut db.sluice(&[
        "events",
        "export",
        "--since",
        &since.to_rfc3339(),
        "--until",
        &until.to_rfc3339(),
        "--format",
        "csv",
        "--type",
        "CreditGranted",
        "--out",
        file.to_str().unwrap(),
    ]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut reader = csv::Reader::from_path(&file).unwrap();
    let positions: Vec<i64> = reader
        .records()
        .map(|r| r.unwrap()[0].parse().unwrap())
        .collect();
    let expected_credits: Vec<i64> = log
        .iter()
        .filter(|(_, e)| in_range(e) && e.event_type == "CreditGranted")
        .map(|(p, _)| *p)
        .collect();
    assert_eq!(positions, expected_credits);
    let _ = std::fs::remove_file(&file);
    db.cleanup().await;
}

/// Everything the live billing read model holds, to prove it did not change.
async fn billing_snapshot(pool: &PgPool, schema: &str) -> Vec<Vec<Value>> {
    let mut all = Vec::new();
    for (table, order) in BILLING_TABLES {
        all.push(rows(pool, schema, table, order).await);
    }
    all.push(rows(pool, schema, "checkpoints", "projector").await);
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_in_place_replay_leaves_the_live_read_models_untouched() {
    let db = Scratch::new().await;
    let (out, _) = output(&mut db.sluice(&["events", "synth", "--count", "100000"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The live read model, built by the live projector's code.
    let mut live = billing::BillingProjection::new(None);
    projector::Runner::new(db.pool.clone())
        .catch_up(&mut live, None)
        .await
        .unwrap();
    let before = billing_snapshot(&db.pool, db.ns.as_str()).await;
    assert!(before[0].len() > 40_000, "the ledger is built");

    // While a live billing projector runs, an in-place replay is refused.
    let shutdown = tokio_util::sync::CancellationToken::new();
    let runner = projector::Runner::new(db.pool.clone());
    let live_task = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            runner
                .run(billing::BillingProjection::new(None), shutdown)
                .await
        })
    };
    // Wait until it holds its live-instance lock (bigint key: objid is the low 32 bits).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let held: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND mode = 'ShareLock' \
             AND granted AND objid::bigint = (hashtext($1)::bigint & 4294967295))",
        )
        .bind(format!("{}.projector.billing", db.ns.as_str()))
        .fetch_one(&db.pool)
        .await
        .unwrap();
        if held {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the live projector never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (out, _) = output(&mut db.sluice(&["replay", "billing", "--in-place"]));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "refused while the live projector runs"
        );
        if stderr.contains("is running") {
            break;
        }
        // The live task may not hold its lock yet.
        assert!(Instant::now() < deadline, "{stderr}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown.cancel();
    live_task.await.unwrap().unwrap();

    // Stopped: the in-place replay starts; Ctrl-C once it is under way.
    let child = db
        .sluice(&["replay", "billing", "--in-place"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let like = format!(
        "{}%",
        projector::replay::scratch_prefix(&db.ns, "i").replace('_', "\\_")
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let schemas: Vec<String> =
            sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE nspname LIKE $1")
                .bind(&like)
                .fetch_all(&db.pool)
                .await
                .unwrap();
        let mut moving = false;
        for schema in &schemas {
            let position: Option<i64> = sqlx::query_scalar(&format!(
                "SELECT position FROM \"{schema}\".checkpoints WHERE projector = 'billing'"
            ))
            .fetch_optional(&db.pool)
            .await
            .unwrap_or(None);
            moving |= position.unwrap_or(0) > 0;
        }
        if moving {
            break;
        }
        assert!(Instant::now() < deadline, "the replay never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "an interrupted replay exits non-zero"
    );
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert_eq!(
        billing_snapshot(&db.pool, db.ns.as_str()).await,
        before,
        "the live read models are untouched"
    );
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synth_refuses_a_namespace_with_real_traffic() {
    let db = Scratch::new().await;
    let real = Event::RequestAccepted(RequestAccepted {
        request_id: schemas::new_id(),
        api: Api::ChatCompletions,
        model: "m".into(),
        stream: false,
        key_id: schemas::new_id(),
        user_id: None,
        group: "default".into(),
        session_id: None,
    })
    .into_envelope(t0(), Metadata::default());
    let price = Event::PriceSet(PriceSet {
        model: "m".into(),
        price: Price::default(),
        effective_at: t0(),
    })
    .into_envelope(t0(), Metadata::default());
    projector::append_batch(&db.pool, &[(1, price), (2, real)])
        .await
        .unwrap();
    let (out, _) = output(&mut db.sluice(&["events", "synth", "--count", "10"]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("real request events"));
    let (out, _) = output(&mut db.sluice(&["events", "synth", "--count", "10", "--force"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM event_log")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(n, 12);
    db.cleanup().await;
}
