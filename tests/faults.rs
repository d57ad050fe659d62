//! Fault tests: each does the bad thing for real to a deployment whose roles run as
//! separate processes (see `common::Stack`), then checks what `docs/guarantees.md`
//! promises. A test that kills a server (NATS, Postgres) starts its own instance on a free
//! port and never touches the machine's shared ones.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    free_port, mock_text, parse_sse, read_http_response, request_id, signal_and_wait, wait_port,
    OwnRedis, Stack, StackOptions, KEY, MODEL,
};
use futures::future::join_all;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

/// How one client stream ended.
#[derive(Debug)]
enum Outcome {
    /// `[DONE]` after the whole answer.
    Completed { content: String },
    /// An error event (`{"error": {...}}`) as the last event.
    Errored { code: Option<String> },
}

/// Reads a finished SSE body: SSE ids must increase by one (no chunk twice, none skipped),
/// and the stream must end with `[DONE]` or an error event. Anything else panics.
fn outcome(text: &str) -> Outcome {
    let events = parse_sse(text);
    let ids: Vec<u64> = events.iter().filter_map(|e| e.0).collect();
    assert!(
        ids.windows(2).all(|w| w[1] == w[0] + 1),
        "SSE ids increase by one (no duplicate chunk): {ids:?}"
    );
    let (_, last) = events.last().expect("at least one event");
    let mut content = String::new();
    for (_, data) in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(data).expect("chunk is JSON");
        assert!(
            chunk.get("error").is_none(),
            "an error only at the end: {text}"
        );
        if let Some(c) = chunk["choices"][0]["delta"]["content"].as_str() {
            content.push_str(c);
        }
    }
    if last == "[DONE]" {
        return Outcome::Completed { content };
    }
    let err: Value = serde_json::from_str(last).expect("last event is JSON");
    assert!(
        err["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "the stream ends with [DONE] or an error event: {last}"
    );
    Outcome::Errored {
        code: err["error"]["code"].as_str().map(str::to_owned),
    }
}

async fn count(pool: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// Ledger rows per request and terminal events per request agree: every request in
/// `ids` has exactly one terminal event and at most one `usage` ledger row, and every
/// `CompletionFinished` is billed.
async fn assert_billed_once(stack: &Stack, ids: &HashSet<Uuid>) {
    let terminal: Vec<(String, i64)> = sqlx::query_as(
        "SELECT stream, count(*) FROM event_log
         WHERE type IN ('CompletionFinished', 'RequestFailed', 'RequestCancelled') GROUP BY stream",
    )
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    let terminal: HashMap<Uuid, i64> = terminal
        .into_iter()
        .map(|(s, n)| {
            (
                Uuid::parse_str(s.trim_start_matches("request-")).unwrap(),
                n,
            )
        })
        .collect();
    for id in ids {
        if terminal.get(id) != Some(&1) {
            let events: Vec<(String, Value)> = sqlx::query_as(
                "SELECT type, data FROM event_log WHERE stream = $1 ORDER BY position",
            )
            .bind(format!("request-{}", id.simple()))
            .fetch_all(&stack.pool)
            .await
            .unwrap();
            panic!("one terminal event for {id}: {events:#?}");
        }
    }
    let per_request: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT request_id, count(*) FROM ledger_entries WHERE kind = 'usage' GROUP BY request_id",
    )
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    assert!(
        per_request.iter().all(|(_, n)| *n == 1),
        "no request charged twice"
    );
    let billed: HashSet<Uuid> = per_request.into_iter().map(|(id, _)| id).collect();
    let finished: Vec<String> =
        sqlx::query_scalar("SELECT stream FROM event_log WHERE type = 'CompletionFinished'")
            .fetch_all(&stack.pool)
            .await
            .unwrap();
    for stream in finished {
        let id = Uuid::parse_str(stream.trim_start_matches("request-")).unwrap();
        assert!(billed.contains(&id), "completed request {id} is billed");
    }
}

/// Waits until `<type>` events number `n` and the projectors reached the head of the log.
async fn wait_all_projected(stack: &Stack, types: &[(&str, i64)]) {
    for (t, n) in types {
        stack.wait_projected(t, *n).await;
    }
}

/// kill -9 one of two workers while 50 slow streams run: every client stream completes or
/// ends with an error event (never hangs, never repeats a chunk), and every request is
/// billed exactly once (the lost ones for what was delivered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_mid_stream() {
    let mut stack = Stack::start(StackOptions {
        workers: 2,
        env: vec![("SLUICE_WORKER_ACK_WAIT_SECS", "4".to_owned())],
        ..Default::default()
    })
    .await;
    const N: usize = 50;
    const CHUNKS: usize = 20;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let calls: Vec<_> = (0..N)
        .map(|_| {
            let req = client
                .post(format!("{}/v1/chat/completions", stack.base))
                .bearer_auth(KEY)
                .json(&json!({"model": MODEL, "stream": true,
                    "messages": [{"role": "user", "content": "tell me a long story"}],
                    "mock": {"chunks": CHUNKS, "chunk_delay_ms": 150}}));
            tokio::spawn(async move {
                let resp = req.send().await.expect("response");
                assert_eq!(resp.status(), 200);
                let id = request_id(&resp);
                let text = resp.text().await.expect("the stream ends, not hangs");
                (id, outcome(&text))
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    stack.kill("worker");
    let results: Vec<(Uuid, Outcome)> = join_all(calls)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let mut completed = 0;
    let mut lost = 0;
    for (_, o) in &results {
        match o {
            Outcome::Completed { content } => {
                assert_eq!(
                    content,
                    &mock_text(CHUNKS),
                    "a completed answer is whole, once"
                );
                completed += 1;
            }
            Outcome::Errored { code } => {
                assert_eq!(code.as_deref(), Some("worker_lost"), "{o:?}");
                lost += 1;
            }
        }
    }
    eprintln!("worker_killed_mid_stream: {completed} completed, {lost} ended with worker_lost");
    assert!(lost > 0, "the kill hit streams in flight");
    assert!(completed > 0, "the surviving worker served its streams");
    wait_all_projected(
        &stack,
        &[("CompletionFinished", completed), ("RequestFailed", lost)],
    )
    .await;
    let ids: HashSet<Uuid> = results.iter().map(|(id, _)| *id).collect();
    assert_billed_once(&stack, &ids).await;
    // The lost requests are charged for what reached their clients, estimated.
    let lost_billed: Vec<(i64, Option<String>)> = sqlx::query_as(
        "SELECT l.completion_tokens, l.usage_source FROM ledger_entries l
         JOIN event_log e ON (e.data->>'request_id')::uuid = l.request_id
         WHERE e.type = 'RequestFailed'",
    )
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    let failed: Vec<Value> =
        sqlx::query_scalar("SELECT data FROM event_log WHERE type = 'RequestFailed' LIMIT 1")
            .fetch_all(&stack.pool)
            .await
            .unwrap();
    assert_eq!(lost_billed.len() as i64, lost, "RequestFailed: {failed:?}");
    assert!(
        lost_billed
            .iter()
            .all(|(c, s)| *c > 0 && s.as_deref() == Some("estimated")),
        "{lost_billed:?}"
    );
    stack.stop().await;
}

/// SIGTERM to the journal, 100 requests, restart: all 100 reach `event_log`, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_stopped_then_restarted() {
    let mut stack = Stack::start(StackOptions::default()).await;
    stack.terminate("journal");
    let calls: Vec<_> = (0..100)
        .map(|i| {
            let req = stack.chat(json!({"model": MODEL, "stream": i % 2 == 0,
                "messages": [{"role": "user", "content": "x"}], "mock": {"chunks": 3}}));
            async move {
                let resp = req.send().await.unwrap();
                assert_eq!(resp.status(), 200, "requests flow without a journal");
                let id = request_id(&resp);
                let _ = resp.bytes().await.unwrap();
                id
            }
        })
        .collect();
    let ids: HashSet<Uuid> = join_all(calls).await.into_iter().collect();
    assert_eq!(ids.len(), 100);
    assert_eq!(
        count(
            &stack.pool,
            "SELECT count(*) FROM event_log WHERE type = 'RequestAccepted'"
        )
        .await,
        0,
        "nothing was journaled while the journal was down"
    );
    stack.spawn("journal");
    stack.wait_projected("CompletionFinished", 100).await;
    let accepted: Vec<String> =
        sqlx::query_scalar("SELECT stream FROM event_log WHERE type = 'RequestAccepted'")
            .fetch_all(&stack.pool)
            .await
            .unwrap();
    assert_eq!(accepted.len(), 100, "each request accepted once");
    let logged: HashSet<Uuid> = accepted
        .iter()
        .map(|s| Uuid::parse_str(s.trim_start_matches("request-")).unwrap())
        .collect();
    assert_eq!(logged, ids);
    let (min, max, n): (i64, i64, i64) =
        sqlx::query_as("SELECT min(position), max(position), count(*) FROM event_log")
            .fetch_one(&stack.pool)
            .await
            .unwrap();
    assert_eq!(max - min + 1, n, "no gap in the log");
    assert_eq!(
        count(
            &stack.pool,
            "SELECT count(*) - count(DISTINCT event_id) FROM event_log"
        )
        .await,
        0,
        "no event twice"
    );
    assert_billed_once(&stack, &ids).await;
    stack.stop().await;
}

/// A NATS server of the test's own, which it may stop and start again (same port, same
/// JetStream store).
struct OwnNats {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl OwnNats {
    fn start() -> OwnNats {
        let dir =
            std::env::temp_dir().join(format!("sluice-faults-nats-{}", Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut nats = OwnNats {
            port: free_port(),
            dir,
            child: None,
        };
        nats.run();
        nats
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn run(&mut self) {
        let log = std::fs::File::create(self.dir.join("nats.log")).unwrap();
        let child = Command::new("nats-server")
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.dir.join("store"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server is installed (scripts/deps)");
        self.child = Some(child);
        wait_port(self.port, Duration::from_secs(10));
    }

    /// SIGTERM (a clean shutdown that flushes the store), then wait for the exit.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal_and_wait(&mut child, "-TERM");
        }
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Plain requests from `clients` loops until `stop`; returns the ids answered 200 and how
/// many calls failed (refused or timed out).
async fn load(
    stack: &Stack,
    clients: usize,
    stop: tokio_util::sync::CancellationToken,
) -> (Vec<Uuid>, usize) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let loops = (0..clients).map(|_| {
        let http = http.clone();
        let stop = stop.clone();
        let url = format!("{}/v1/chat/completions", stack.base);
        async move {
            let mut ok = Vec::new();
            let mut failed = 0;
            while !stop.is_cancelled() {
                let sent = http
                    .post(&url)
                    .bearer_auth(KEY)
                    .json(
                        &json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                  "mock": {"chunks": 3}}),
                    )
                    .send()
                    .await;
                match sent {
                    Ok(resp) if resp.status() == 200 => {
                        let id = request_id(&resp);
                        match resp.bytes().await {
                            Ok(_) => ok.push(id),
                            Err(_) => failed += 1,
                        }
                    }
                    Ok(resp) => {
                        assert!(
                            resp.status().as_u16() == 503 || resp.status().as_u16() == 504,
                            "an outage is a 503/504, not {}",
                            resp.status()
                        );
                        failed += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(_) => {
                        failed += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            (ok, failed)
        }
    });
    let mut ok = Vec::new();
    let mut failed = 0;
    for (o, f) in join_all(loops).await {
        ok.extend(o);
        failed += f;
    }
    (ok, failed)
}

/// Runs [`load`] from `clients` loops while `fault` runs, and stops it once `fault` is
/// done: the load's answered ids and failures, and what `fault` returned.
async fn load_during<T>(
    stack: &Stack,
    clients: usize,
    fault: impl std::future::Future<Output = T>,
) -> ((Vec<Uuid>, usize), T) {
    let stop = tokio_util::sync::CancellationToken::new();
    let loader = load(stack, clients, stop.clone());
    let fault = async {
        let out = fault.await;
        stop.cancel();
        out
    };
    tokio::join!(loader, fault)
}

/// nats-server restarted mid-load: every request answered 200 (its `CompletionFinished`
/// acknowledged by JetStream) is in the event log afterwards, and the gateway serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restarted_mid_load() {
    let mut nats = OwnNats::start();
    let stack = Stack::start(StackOptions {
        nats_url: Some(nats.url()),
        ..Default::default()
    })
    .await;
    let ((ok, failed), ()) = load_during(&stack, 4, async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        nats.stop();
        tokio::time::sleep(Duration::from_secs(1)).await;
        nats.run();
        tokio::time::sleep(Duration::from_secs(4)).await;
    })
    .await;
    eprintln!(
        "nats_restarted_mid_load: {} answered, {failed} failed during the restart",
        ok.len()
    );
    // Serving again once NATS is back.
    let after: Vec<_> = (0..10)
        .map(|_| {
            let req = stack
                .chat(json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}));
            async move {
                let resp = req.send().await.unwrap();
                assert_eq!(resp.status(), 200, "serving after the restart");
                let id = request_id(&resp);
                let _ = resp.bytes().await.unwrap();
                id
            }
        })
        .collect();
    let mut acknowledged: HashSet<Uuid> = join_all(after).await.into_iter().collect();
    acknowledged.extend(ok.iter().copied());
    stack
        .wait_projected("CompletionFinished", acknowledged.len() as i64)
        .await;
    let finished: HashSet<Uuid> = sqlx::query_scalar::<_, String>(
        "SELECT stream FROM event_log WHERE type = 'CompletionFinished'",
    )
    .fetch_all(&stack.pool)
    .await
    .unwrap()
    .into_iter()
    .map(|s| Uuid::parse_str(s.trim_start_matches("request-")).unwrap())
    .collect();
    let missing: Vec<&Uuid> = acknowledged.difference(&finished).collect();
    assert!(
        missing.is_empty(),
        "acknowledged but not in the log: {missing:?}"
    );
    assert_eq!(
        count(
            &stack.pool,
            "SELECT count(*) - count(DISTINCT event_id) FROM event_log"
        )
        .await,
        0
    );
    let ledger: HashSet<Uuid> =
        sqlx::query_scalar("SELECT request_id FROM ledger_entries WHERE kind = 'usage'")
            .fetch_all(&stack.pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    assert!(
        acknowledged.is_subset(&ledger),
        "every answered request is billed"
    );
    stack.stop().await;
}

/// A Postgres cluster of the test's own (initdb in a temp dir, run as the `postgres` user
/// when the test runs as root, as `src/local_services.rs` does), which it may stop.
struct OwnPostgres {
    port: u16,
    dir: PathBuf,
    bin: PathBuf,
    as_user: Option<(String, String)>,
    child: Option<Child>,
}

impl OwnPostgres {
    fn start() -> OwnPostgres {
        let bin = postgres_bin_dir();
        let dir =
            std::env::temp_dir().join(format!("sluice-faults-pg-{}", Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let as_user = root_as_postgres();
        if let Some((uid, gid)) = &as_user {
            let ok = Command::new("chown")
                .arg(format!("{uid}:{gid}"))
                .arg(&dir)
                .status()
                .unwrap();
            assert!(ok.success());
        }
        let ok = Self::command(&as_user, &bin.join("initdb"))
            .arg("-D")
            .arg(&dir)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "-N",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(ok.success(), "initdb failed");
        let mut pg = OwnPostgres {
            port: free_port(),
            dir,
            bin,
            as_user,
            child: None,
        };
        pg.run();
        pg
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn command(as_user: &Option<(String, String)>, bin: &Path) -> Command {
        match as_user {
            None => Command::new(bin),
            Some((uid, gid)) => {
                let mut c = Command::new("setpriv");
                c.args([
                    format!("--reuid={uid}"),
                    format!("--regid={gid}"),
                    "--clear-groups".into(),
                    "--".into(),
                ])
                .arg(bin);
                c
            }
        }
    }

    fn run(&mut self) {
        let child = Self::command(&self.as_user, &self.bin.join("postgres"))
            .arg("-D")
            .arg(&self.dir)
            .args([
                "-p",
                &self.port.to_string(),
                "-c",
                "listen_addresses=127.0.0.1",
            ])
            .args(["-c", "fsync=off", "-c", "max_connections=100"])
            .arg("-k")
            .arg(&self.dir)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("postgres runs");
        self.child = Some(child);
        wait_port(self.port, Duration::from_secs(20));
    }

    /// SIGINT: Postgres' fast shutdown (clients are disconnected at once).
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal_and_wait(&mut child, "-INT");
        }
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal_and_wait(&mut child, "-INT");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn postgres_bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, d)| d.join("initdb").is_file())
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, d)| d)
        .expect("the Postgres server is installed (scripts/deps)")
}

/// Postgres refuses to run as root: then run it as the `postgres` system user.
fn root_as_postgres() -> Option<(String, String)> {
    let id = |args: &[&str]| {
        let out = Command::new("id").args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    (id(&["-u"]) == "0").then(|| (id(&["-u", "postgres"]), id(&["-g", "postgres"])))
}

/// Postgres stopped for 10 s under load: requests keep flowing (nothing on the hot path
/// waits for it), and once it is back the journal and projectors catch up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_under_load() {
    let mut pg = OwnPostgres::start();
    let stack = Stack::start(StackOptions {
        database_url: Some(pg.url()),
        ..Default::default()
    })
    .await;
    let ((ok, failed), ()) = load_during(&stack, 3, async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        pg.stop();
        tokio::time::sleep(Duration::from_secs(10)).await;
    })
    .await;
    eprintln!(
        "postgres_down_under_load: {} answered while Postgres was down, {failed} failed",
        ok.len()
    );
    assert_eq!(failed, 0, "every request succeeded without Postgres");
    assert!(ok.len() >= 20, "requests kept flowing: {}", ok.len());
    pg.run();
    let ids: HashSet<Uuid> = ok.into_iter().collect();
    stack
        .wait_projected("CompletionFinished", ids.len() as i64)
        .await;
    assert_billed_once(&stack, &ids).await;
    assert_eq!(
        count(
            &stack.pool,
            "SELECT count(*) FROM ledger_entries WHERE kind = 'usage'"
        )
        .await,
        ids.len() as i64,
        "the billing read model caught up"
    );
    stack.stop().await;
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// One hostile request in flight: its status and body, or `None` when the connection dropped.
type Answer = std::pin::Pin<Box<dyn std::future::Future<Output = Option<(u16, String)>> + Send>>;

/// Sends raw bytes (headers and as much body as given) and reads the answer until the
/// server closes or `Content-Length` is satisfied. `None`: the server closed without one.
async fn raw(addr: &str, bytes: &[u8]) -> Option<(u16, String)> {
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The server may answer (and close) before everything was written.
    let _ = sock.write_all(bytes).await;
    read_answer(&mut sock).await
}

/// Uploads `mb` megabytes as a chunked body (no `Content-Length`) while reading the
/// answer: the server may refuse and close long before the upload is done.
async fn chunked_upload(addr: &str, mb: usize) -> Option<(u16, String)> {
    let sock = tokio::net::TcpStream::connect(addr).await.ok()?;
    let (mut rd, mut wr) = sock.into_split();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    let upload = tokio::spawn(async move {
        wr.write_all(head.as_bytes()).await?;
        let chunk = vec![b' '; 1024 * 1024];
        for _ in 0..mb {
            wr.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                .await?;
            wr.write_all(&chunk).await?;
            wr.write_all(b"\r\n").await?;
        }
        wr.write_all(b"0\r\n\r\n").await?;
        Ok::<_, std::io::Error>(wr)
    });
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), rd.read_to_end(&mut answer)).await;
    upload.abort();
    status_and_body(&String::from_utf8_lossy(&answer))
}

/// The status and body of a raw HTTP response; `None` without a whole head.
fn status_and_body(text: &str) -> Option<(u16, String)> {
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

async fn read_answer(sock: &mut tokio::net::TcpStream) -> Option<(u16, String)> {
    status_and_body(&read_http_response(sock, Duration::from_secs(30)).await)
}

/// 500 hostile requests: none gets a 5xx, every answer is a JSON error, nothing reaches the
/// upstream, the gateway stays healthy and its memory returns near where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_barrage() {
    let stack = Stack::start(StackOptions {
        env: vec![
            ("SLUICE_BODY_TIMEOUT_SECS", "2".to_owned()),
            ("SLUICE_HEADER_TIMEOUT_SECS", "5".to_owned()),
        ],
        ..Default::default()
    })
    .await;
    let pid = stack.roles["ingress"].id();
    let url = format!("{}/v1/chat/completions", stack.base);
    let addr = stack.base.trim_start_matches("http://").to_owned();
    // Warm up (connection pools, lazy statics) before the baseline.
    for _ in 0..5 {
        let r = stack
            .chat(json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await;
    }
    stack.mock.reset_stats();
    let baseline = rss_kb(pid);
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(baseline));
    let sampling = tokio_util::sync::CancellationToken::new();
    let sampler = {
        let peak = peak.clone();
        let stop = sampling.clone();
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                peak.fetch_max(rss_kb(pid), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let ok_messages = json!([{"role": "user", "content": "hi"}]);
    let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    let deep_body = format!(r#"{{"model":"{MODEL}","messages":{deep}}}"#);
    let huge = "x".repeat(64 * 1024);
    let json_bodies: Vec<(&str, Vec<u8>)> = vec![
        ("invalid json", b"{\"model\": ".to_vec()),
        ("not an object", b"[1,2,3]".to_vec()),
        (
            "invalid utf-8",
            vec![b'{', b'"', 0xff, 0xfe, b'"', b':', b'1', b'}'],
        ),
        ("deep json", deep_body.into_bytes()),
        (
            "wrong type messages",
            serde_json::to_vec(&json!({"model": MODEL, "messages": "hi"})).unwrap(),
        ),
        (
            "wrong type model",
            serde_json::to_vec(&json!({"model": 5, "messages": ok_messages})).unwrap(),
        ),
        (
            "wrong type stream",
            serde_json::to_vec(&json!({"model": MODEL, "messages": ok_messages, "stream": "yes"}))
                .unwrap(),
        ),
        (
            "negative max_tokens",
            serde_json::to_vec(&json!({"model": MODEL, "messages": ok_messages, "max_tokens": -1}))
                .unwrap(),
        ),
        (
            "empty messages",
            serde_json::to_vec(&json!({"model": MODEL, "messages": []})).unwrap(),
        ),
        (
            "unknown role",
            serde_json::to_vec(
                &json!({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}),
            )
            .unwrap(),
        ),
        ("null body", b"null".to_vec()),
    ];
    let mut cases: Vec<(String, Answer)> = Vec::new();
    let http = reqwest::Client::new();
    for i in 0..500usize {
        let kind = i % 16;
        let name;
        let fut: Answer = match kind {
            0..=10 => {
                let (n, body) = &json_bodies[kind];
                name = (*n).to_owned();
                let req = http
                    .post(&url)
                    .bearer_auth(KEY)
                    .header("content-type", "application/json")
                    .body(body.clone());
                Box::pin(async move {
                    let r = req.send().await.ok()?;
                    Some((r.status().as_u16(), r.text().await.ok()?))
                })
            }
            11 => {
                // A declared 20 MB body: refused from Content-Length, before it is read.
                name = "20 MB declared".into();
                let head = format!(
                    "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    20 * 1024 * 1024
                );
                let addr = addr.clone();
                Box::pin(async move { raw(&addr, head.as_bytes()).await })
            }
            12 if i % 64 == 12 => {
                // 20 MB really sent, chunked (no Content-Length): cut off at the limit.
                name = "20 MB chunked".into();
                let addr = addr.clone();
                Box::pin(async move { chunked_upload(&addr, 20).await })
            }
            12 => {
                name = "missing key".into();
                let req = http
                    .post(&url)
                    .json(&json!({"model": MODEL, "messages": ok_messages}));
                Box::pin(async move {
                    let r = req.send().await.ok()?;
                    Some((r.status().as_u16(), r.text().await.ok()?))
                })
            }
            13 => {
                name = "huge header".into();
                let req = http
                    .post(&url)
                    .bearer_auth(KEY)
                    .header("x-junk", huge.clone())
                    .json(&json!({"model": MODEL, "messages": ok_messages}));
                Box::pin(async move {
                    let r = req.send().await.ok()?;
                    Some((r.status().as_u16(), r.text().await.ok()?))
                })
            }
            14 => {
                name = "many headers".into();
                let mut req = http.post(&url).bearer_auth(KEY);
                for h in 0..150 {
                    req = req.header(format!("x-h{h}"), "v");
                }
                let req = req.json(&json!({"model": MODEL, "messages": ok_messages}));
                Box::pin(async move {
                    let r = req.send().await.ok()?;
                    Some((r.status().as_u16(), r.text().await.ok()?))
                })
            }
            _ => {
                // Slowloris on the body: headers at once, then a byte now and then.
                name = "trickled body".into();
                let addr = addr.clone();
                Box::pin(async move {
                    let mut sock = tokio::net::TcpStream::connect(&addr).await.ok()?;
                    let head = format!(
                        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n{{"
                    );
                    sock.write_all(head.as_bytes()).await.ok()?;
                    let trickle = async {
                        loop {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            if sock.write_all(b" ").await.is_err() {
                                break;
                            }
                        }
                    };
                    let _ = tokio::time::timeout(Duration::from_secs(3), trickle).await;
                    read_answer(&mut sock).await
                })
            }
        };
        cases.push((name, fut));
    }
    // Slowloris on the headers: never finishing them holds nothing for long.
    let slow_headers = {
        let addr = addr.clone();
        tokio::spawn(async move {
            let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let started = Instant::now();
            let mut buf = [0u8; 1024];
            for b in b"POST /v1/chat/completions HTTP/1.1\r\nX-Slow: "
                .iter()
                .cycle()
            {
                if sock.write_all(&[*b]).await.is_err() {
                    break;
                }
                match tokio::time::timeout(Duration::from_millis(500), sock.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    Ok(Ok(_)) => break,
                    Err(_) => {}
                }
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "a slowloris connection is dropped"
                );
            }
            started.elapsed()
        })
    };

    assert_eq!(cases.len(), 500);
    // The trickles take seconds each: all at once, beside the rest sent 32 at a time (a
    // barrage, not a connection-exhaustion test).
    let (slow, fast): (Vec<_>, Vec<_>) = cases.into_iter().partition(|(n, _)| n == "trickled body");
    let names: Vec<String> = slow
        .iter()
        .chain(fast.iter())
        .map(|(n, _)| n.clone())
        .collect();
    let slow_run = join_all(slow.into_iter().map(|(_, f)| f));
    let fast_run = async {
        let mut answers = Vec::new();
        let mut futs = fast.into_iter().map(|(_, f)| f);
        loop {
            let batch: Vec<_> = futs.by_ref().take(32).collect();
            if batch.is_empty() {
                break;
            }
            answers.extend(join_all(batch).await);
        }
        answers
    };
    let (mut answers, fast_answers) = tokio::join!(slow_run, fast_run);
    answers.extend(fast_answers);
    let mut by_status: HashMap<u16, usize> = HashMap::new();
    for (name, answer) in names.iter().zip(&answers) {
        let (status, body) = answer
            .as_ref()
            .unwrap_or_else(|| panic!("{name}: no answer"));
        assert!(
            *status >= 400 && *status < 500,
            "{name}: status {status}: {body}"
        );
        let v: Value = serde_json::from_str(body)
            .unwrap_or_else(|e| panic!("{name}: error body is JSON ({e}): {body}"));
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{name}: {body}"
        );
        *by_status.entry(*status).or_default() += 1;
    }
    let slow = slow_headers.await.unwrap();
    sampling.cancel();
    sampler.await.unwrap();
    eprintln!("hostile_barrage: statuses {by_status:?}; header slowloris dropped after {slow:?}");
    assert!(slow < Duration::from_secs(20));

    // Healthy afterwards, and nothing hostile reached the upstream.
    assert_eq!(
        stack
            .http
            .get(format!("{}/healthz", stack.base))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        stack.mock.stats().requests_total,
        0,
        "no hostile request reached the upstream"
    );
    let resp = stack
        .chat(json!({"model": MODEL, "messages": ok_messages}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let _ = resp.bytes().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kb(pid);
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "hostile_barrage: ingress VmRSS baseline {baseline} kB, peak {peak} kB, after {after} kB"
    );
    // Memory is reported, and only a gross leak fails: freed memory may stay with the
    // allocator, but a barrage must not leave the ingress holding bodies it refused.
    assert!(
        after < baseline + 64 * 1024,
        "ingress RSS {after} kB after vs {baseline} kB before"
    );
    stack.stop().await;
}

/// SIGTERM to the ingress and to a worker while streams run: both finish what they have
/// in flight (the streams complete) and exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_streams() {
    let mut stack = Stack::start(StackOptions::default()).await;
    let calls: Vec<_> = (0..5)
        .map(|_| {
            let req = stack.chat(json!({"model": MODEL, "stream": true,
                "messages": [{"role": "user", "content": "hi"}],
                "mock": {"chunks": 10, "chunk_delay_ms": 200}}));
            tokio::spawn(async move {
                let resp = req.send().await.unwrap();
                assert_eq!(resp.status(), 200);
                outcome(&resp.text().await.unwrap())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut ingress = stack.roles.remove("ingress").unwrap();
    let mut worker = stack.roles.remove("worker").unwrap();
    for pid in [ingress.id(), worker.id()] {
        Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .unwrap();
    }
    // New connections are refused while the open streams finish.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        stack
            .http
            .get(format!("{}/healthz", stack.base))
            .send()
            .await
            .is_err(),
        "a draining ingress accepts no new connection"
    );
    for call in join_all(calls).await {
        match call.unwrap() {
            Outcome::Completed { content } => assert_eq!(content, mock_text(10)),
            other => panic!("a stream in flight at SIGTERM completes: {other:?}"),
        }
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    for (name, child) in [("ingress", &mut ingress), ("worker", &mut worker)] {
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "{name} exits after draining");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(status.success(), "{name} exits cleanly: {status}");
    }
    stack.stop().await;
}

/// Redis stopped mid-run: rate limits fail open (requests keep flowing, each counted in
/// `sluice_rate_limit_fail_open_total` and warned about once) rather than turning a cache
/// outage into a full outage; the key's quota is checked against its projected balance
/// alone (no holds; counted in `sluice_quota_holds_unavailable_total`); with Redis back
/// the limits apply again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_open() {
    let mut redis = OwnRedis::start();
    let stack = Stack::start(StackOptions {
        key_rpm: Some(3),
        key_quota: Some("5.00".to_owned()),
        env: vec![("SLUICE_REDIS_URL", redis.url())],
        ..Default::default()
    })
    .await;
    let send = |n: usize| {
        let calls: Vec<_> = (0..n)
            .map(|_| {
                stack
                    .chat(json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}))
                    .send()
            })
            .collect();
        async move {
            let mut statuses = Vec::new();
            for r in join_all(calls).await {
                let r = r.unwrap();
                statuses.push(r.status().as_u16());
                let _ = r.bytes().await;
            }
            statuses.sort_unstable();
            statuses
        }
    };
    assert_eq!(
        send(4).await,
        [200, 200, 200, 429],
        "the limit applies with Redis up"
    );
    redis.stop();
    assert_eq!(send(5).await, [200; 5], "Redis down: limits fail open");
    let metrics = stack
        .http
        .get(format!("{}/metrics", stack.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let counter = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    assert!(
        counter("sluice_rate_limit_fail_open_total") >= 5.0,
        "every request let through unchecked is counted:\n{metrics}"
    );
    assert!(
        counter("sluice_quota_holds_unavailable_total") >= 5.0,
        "and every quota admitted without a hold:\n{metrics}"
    );
    redis.run();
    // The manager reconnects on its own; the window's counters died with Redis, so the
    // limit starts afresh and refuses again once 3 requests are counted.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if send(1).await == [429] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "limits apply again once Redis is back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    redis.stop();
    stack.stop().await;
}

/// A role process taken out of the stack: killed if the test ends before it is reaped.
struct Owned(Option<Child>);

impl Drop for Owned {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// SIGTERM to the journal and both projectors mid-load: each commits its batch and exits
/// 0, requests keep flowing without them, and once restarted they pick up where they
/// stopped: every event once in the log, every request billed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_and_projectors_exit_cleanly_on_sigterm() {
    let mut stack = Stack::start(StackOptions::default()).await;
    let roles: Vec<(&'static str, Owned)> = ["journal", "billing", "projector"]
        .into_iter()
        .map(|r| (r, Owned(stack.roles.remove(r))))
        .collect();
    let ((ok, failed), statuses) = load_during(&stack, 4, async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let statuses: Vec<(&str, std::process::ExitStatus)> =
            join_all(roles.into_iter().map(|(r, mut c)| async move {
                let status = tokio::task::spawn_blocking(move || {
                    signal_and_wait(c.0.as_mut().unwrap(), "-TERM")
                });
                (r, status.await.unwrap())
            }))
            .await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        statuses
    })
    .await;
    for (role, status) in statuses {
        assert!(
            status.success(),
            "{role} exits cleanly on SIGTERM: {status}"
        );
    }
    assert_eq!(
        failed, 0,
        "requests flow while the journal and projectors are down"
    );
    assert!(!ok.is_empty());
    for role in ["journal", "billing", "projector"] {
        stack.spawn(role);
    }
    stack
        .wait_projected("CompletionFinished", ok.len() as i64)
        .await;
    let ids: HashSet<Uuid> = ok.iter().copied().collect();
    assert_eq!(ids.len(), ok.len());
    assert_eq!(
        count(
            &stack.pool,
            "SELECT count(*) - count(DISTINCT event_id) FROM event_log"
        )
        .await,
        0,
        "no event twice"
    );
    let (min, max, n): (i64, i64, i64) =
        sqlx::query_as("SELECT min(position), max(position), count(*) FROM event_log")
            .fetch_one(&stack.pool)
            .await
            .unwrap();
    assert_eq!(max - min + 1, n, "no gap in the log");
    assert_billed_once(&stack, &ids).await;
    stack.stop().await;
}

/// Backpressure: with no worker taking requests and `SLUICE_MAX_QUEUE_DEPTH=3`, requests
/// queue until more than 3 wait; then new ones are refused at once with 503 and
/// `Retry-After` (529 on the Anthropic surface), in the API's error shape, and never reach
/// the queue. Once a worker is back the queued ones are answered and new ones admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_over_its_limit_is_shed_with_503_and_retry_after() {
    let mut stack = Stack::start(StackOptions {
        env: vec![("SLUICE_MAX_QUEUE_DEPTH", "3".to_owned())],
        ..Default::default()
    })
    .await;
    stack.terminate("worker");
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "mock": {"chunks": 2}});
    let mut waiting = Vec::new();
    let mut refused = None;
    for _ in 0..20 {
        let req = stack.chat(body.clone());
        let mut call = tokio::spawn(async move {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let retry_after = resp
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            let body: Value = resp.json().await.unwrap();
            (status, retry_after, body)
        });
        // The depth is read every 100 ms, off the request path.
        tokio::time::sleep(Duration::from_millis(250)).await;
        match tokio::time::timeout(Duration::from_millis(10), &mut call).await {
            Ok(answered) => {
                refused = Some(answered.unwrap());
                break;
            }
            Err(_) => waiting.push(call),
        }
    }
    let (status, retry_after, err) =
        refused.expect("a request is refused once the queue is over its limit");
    assert!(
        waiting.len() > 3,
        "{} queued before shedding",
        waiting.len()
    );
    assert_eq!(status, 503);
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert_eq!(err["error"]["code"], "overloaded", "{err}");
    assert!(err["error"]["message"]
        .as_str()
        .unwrap()
        .contains("overloaded"));
    let anthropic = stack
        .http
        .post(format!("{}/v1/messages", stack.base))
        .header("x-api-key", KEY)
        .header("anthropic-version", "2023-06-01")
        .json(&json!({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(anthropic.status(), 529);
    assert!(anthropic.headers().contains_key("retry-after"));
    let err: Value = anthropic.json().await.unwrap();
    assert_eq!(err["type"], "error", "{err}");
    assert_eq!(err["error"]["type"], "overloaded_error", "{err}");

    stack.spawn("worker");
    let queued = waiting.len();
    for call in waiting {
        let (status, _, body) = call.await.unwrap();
        assert_eq!(
            status, 200,
            "a queued request is answered once a worker is back: {body}"
        );
    }
    assert_eq!(
        stack.mock.stats().requests_total as usize,
        queued,
        "the refused requests never reached the queue"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let resp = stack.chat(body.clone()).send().await.unwrap();
        if resp.status() == 200 {
            break;
        }
        assert_eq!(resp.status(), 503);
        assert!(
            Instant::now() < deadline,
            "admitted again once the queue drained"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stack.stop().await;
}
