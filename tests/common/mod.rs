//! A whole Sluice deployment for one test: its own namespace (Postgres schema, JetStream
//! streams, Redis keys), a mock upstream, and each role as a separate `sluice` process,
//! exactly as an operator would run them.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use mock_upstream::{MockConfig, MockUpstream};
use reqwest::{Method, StatusCode};
use schemas::Namespace;
use serde_json::{json, Value};
use uuid::Uuid;

pub const DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
pub const NATS_URL: &str = "nats://127.0.0.1:4222";
pub const REDIS_URL: &str = "redis://127.0.0.1:6379";
pub const MODEL: &str = "gpt-test";
pub const KEY: &str = "sk-test-0123456789abcdef0123456789";
/// USD per million tokens in the test price table.
pub const INPUT_PER_MTOK: &str = "0.15";
pub const OUTPUT_PER_MTOK: &str = "0.60";
/// `SLUICE_ADMIN_TOKEN` of every test stack.
pub const ADMIN_TOKEN: &str = "admin-test-token-0123456789";

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    l.local_addr().expect("addr").port()
}

pub struct Stack {
    pub ns: Namespace,
    pub base: String,
    pub mock: MockUpstream,
    pub pool: sqlx::PgPool,
    pub dir: PathBuf,
    /// The NATS and Postgres this stack uses (the shared ones unless the options named others).
    pub nats_url: String,
    pub database_url: String,
    env: HashMap<String, String>,
    pub roles: HashMap<&'static str, Child>,
    pub http: reqwest::Client,
}

pub struct StackOptions {
    pub mock: MockConfig,
    /// Extra YAML appended under `channels:` (each entry indented by two spaces).
    pub extra_channels: String,
    pub key_rpm: Option<u32>,
    /// USD quota of the test key; unset = unlimited.
    pub key_quota: Option<String>,
    /// Extra environment for every role (e.g. `SLUICE_RATE_WINDOW_SECS`).
    pub env: Vec<(&'static str, String)>,
    pub workers: usize,
    /// Another NATS server (a fault test's own, which it may restart); default [`NATS_URL`].
    pub nats_url: Option<String>,
    /// Another Postgres (a fault test's own, which it may stop); default [`DATABASE_URL`].
    pub database_url: Option<String>,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            mock: MockConfig::default(),
            extra_channels: String::new(),
            key_rpm: None,
            key_quota: None,
            env: Vec::new(),
            workers: 1,
            nats_url: None,
            database_url: None,
        }
    }
}

pub fn sluice_bin() -> &'static str {
    env!("CARGO_BIN_EXE_sluice")
}

impl Stack {
    pub async fn start(opts: StackOptions) -> Stack {
        let ns = Namespace::new(&format!("t_{}", uuid::Uuid::now_v7().simple())).unwrap();
        let mock = mock(opts.mock).await;
        let dir = std::env::temp_dir().join(format!("sluice-test-{}", ns.as_str()));
        std::fs::create_dir_all(&dir).unwrap();
        let rpm = opts
            .key_rpm
            .map(|r| format!(", rpm: {r}"))
            .unwrap_or_default();
        let rpm = match &opts.key_quota {
            Some(q) => format!("{rpm}, quota: \"{q}\""),
            None => rpm,
        };
        let yaml = format!(
            "channels:\n{main}{extra}\
             prices:\n  - {{model: {MODEL}, input_per_mtok: \"{INPUT_PER_MTOK}\", output_per_mtok: \"{OUTPUT_PER_MTOK}\"}}\n\
             keys:\n  - {{name: test, key: \"{KEY}\", group: default{rpm}}}\n",
            main = channel_yaml("mock-main", "openai", &mock.base_url(), MODEL, 1),
            extra = opts.extra_channels,
        );
        std::fs::write(dir.join("sluice.yaml"), yaml).unwrap();
        let port = free_port();
        let nats_url = opts.nats_url.clone().unwrap_or_else(|| NATS_URL.to_owned());
        let database_url = opts
            .database_url
            .clone()
            .unwrap_or_else(|| DATABASE_URL.to_owned());
        let env: HashMap<String, String> = [
            (
                "SLUICE_CONFIG",
                dir.join("sluice.yaml").display().to_string(),
            ),
            ("SLUICE_NAMESPACE", ns.as_str().to_owned()),
            ("SLUICE_DATABASE_URL", database_url.clone()),
            ("SLUICE_NATS_URL", nats_url.clone()),
            ("SLUICE_REDIS_URL", REDIS_URL.to_owned()),
            ("SLUICE_LISTEN", format!("127.0.0.1:{port}")),
            (
                "SLUICE_SECRET_KEY",
                "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=".to_owned(),
            ),
            ("SLUICE_LOG", "warn".to_owned()),
            ("SLUICE_ADMIN_TOKEN", ADMIN_TOKEN.to_owned()),
        ]
        .into_iter()
        .chain(opts.env.iter().cloned())
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let pool = projector::db::connect(&database_url, &ns, 4)
            .await
            .expect("postgres");
        let mut stack = Stack {
            ns,
            base: format!("http://127.0.0.1:{port}"),
            mock,
            pool,
            dir,
            nats_url,
            database_url,
            env,
            roles: HashMap::new(),
            http: reqwest::Client::new(),
        };
        let status = stack
            .command("migrate")
            .status()
            .expect("run sluice migrate");
        assert!(status.success(), "sluice migrate failed");
        for role in ["journal", "billing", "projector", "ingress"] {
            stack.spawn(role);
        }
        for i in 0..opts.workers {
            let child = stack.command("worker").spawn().expect("spawn worker");
            stack
                .roles
                .insert(["worker", "worker2", "worker3", "worker4"][i.min(3)], child);
        }
        stack.wait_ready().await;
        stack
    }

    pub fn command(&self, role: &str) -> Command {
        let mut cmd = Command::new(sluice_bin());
        cmd.arg(role)
            .envs(&self.env)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let log = std::fs::File::create(
            self.dir
                .join(format!("{role}-{}.log", uuid::Uuid::now_v7().simple())),
        )
        .unwrap();
        cmd.stderr(log);
        cmd
    }

    pub fn spawn(&mut self, role: &'static str) {
        let child = self.command(role).spawn().expect("spawn role");
        self.roles.insert(role, child);
    }

    /// Everything the processes of `role` have logged so far (stderr, restarts included).
    pub fn logs(&self, role: &str) -> String {
        let prefix = format!("{role}-");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".log"))
                    })
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .collect()
    }

    /// SIGKILL: the process gets no chance to clean up.
    pub fn kill(&mut self, role: &str) {
        if let Some(mut child) = self.roles.remove(role) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then wait for the process to exit.
    pub fn terminate(&mut self, role: &str) {
        if let Some(mut child) = self.roles.remove(role) {
            signal_and_wait(&mut child, "-TERM");
        }
    }

    async fn wait_ready(&self) {
        wait_ready(&self.http, &self.base, &self.dir).await;
    }

    pub fn chat(&self, body: serde_json::Value) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}/v1/chat/completions", self.base))
            .bearer_auth(KEY)
            .json(&body)
    }

    /// Waits until the journal has recorded `count` events of `event_type` and every
    /// projector's checkpoint has reached the head of the log.
    pub async fn wait_projected(&self, event_type: &str, count: i64) {
        let what = format!(
            "{count} {event_type} events projected (logs in {})",
            self.dir.display()
        );
        eventually(Duration::from_secs(60), &what, async || {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM event_log WHERE type = $1")
                .bind(event_type)
                .fetch_one(&self.pool)
                .await
                .unwrap();
            let head: i64 = sqlx::query_scalar("SELECT COALESCE(max(position), 0) FROM event_log")
                .fetch_one(&self.pool)
                .await
                .unwrap();
            let behind: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM (VALUES ('billing'), ('requests')) p(name)
                 LEFT JOIN checkpoints c ON c.projector = p.name WHERE COALESCE(c.position, 0) < $1",
            )
            .bind(head)
            .fetch_one(&self.pool)
            .await
            .unwrap();
            if n >= count && behind == 0 {
                Ok(())
            } else {
                Err(format!("{n} recorded, {behind} projectors behind the head"))
            }
        })
        .await
    }

    /// Stops every role and removes the namespace's schema and streams.
    pub async fn stop(mut self) {
        let names: Vec<&'static str> = self.roles.keys().copied().collect();
        for role in names {
            self.kill(role);
        }
        let _ = projector::db::drop_schema(&self.pool, &self.ns).await;
        if let Ok(client) = async_nats::connect(&self.nats_url).await {
            let js = async_nats::jetstream::new(client);
            projector::bus::delete_streams(&js, &self.ns).await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for (_, child) in self.roles.iter_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The fields of one SSE event (a block between blank lines), as sent; the last line of
/// each kind wins.
#[derive(Debug, Default)]
pub struct SseFields<'a> {
    pub id: Option<&'a str>,
    pub event: Option<&'a str>,
    pub data: Option<&'a str>,
}

impl SseFields<'_> {
    /// The `id:` as a number; `None` when there is none or it is not a number.
    pub fn seq(&self) -> Option<u64> {
        self.id.and_then(|v| v.trim().parse().ok())
    }
}

/// Reads the `id:`, `event:` and `data:` lines of one SSE block.
pub fn sse_fields(block: &str) -> SseFields<'_> {
    let mut fields = SseFields::default();
    for line in block.lines() {
        if let Some(v) = line.strip_prefix("id: ") {
            fields.id = Some(v);
        } else if let Some(v) = line.strip_prefix("event: ") {
            fields.event = Some(v);
        } else if let Some(v) = line.strip_prefix("data: ") {
            fields.data = Some(v);
        }
    }
    fields
}

/// Reads an SSE body into its `data:` payloads and `id:` values.
pub fn parse_sse(text: &str) -> Vec<(Option<u64>, String)> {
    text.split("\n\n")
        .map(sse_fields)
        .filter_map(|f| Some((f.seq(), f.data?.to_owned())))
        .collect()
}

/// A mock upstream on a free port.
pub async fn mock(config: MockConfig) -> MockUpstream {
    MockUpstream::start("127.0.0.1:0".parse().unwrap(), config)
        .await
        .expect("mock upstream")
}

/// One entry of the config file's `channels:` list, for [`StackOptions::extra_channels`].
pub fn channel_yaml(name: &str, kind: &str, base_url: &str, model: &str, priority: i32) -> String {
    format!(
        "  - name: {name}\n    type: {kind}\n    base_url: {base_url}\n    models: [{model}]\n    priority: {priority}\n"
    )
}

/// `tok0 tok1 ... tok{n-1} `: what the mock upstream generates for `chunks: n`.
pub fn mock_text(chunks: usize) -> String {
    (0..chunks).map(|i| format!("tok{i} ")).collect()
}

/// The id the gateway gave a request (`x-sluice-request-id`).
pub fn request_id(resp: &reqwest::Response) -> Uuid {
    let id = resp
        .headers()
        .get("x-sluice-request-id")
        .expect("x-sluice-request-id header");
    Uuid::parse_str(id.to_str().unwrap()).expect("request id is a uuid")
}

/// Polls `check` every 100 ms until it returns `Ok`; fails after `within`, naming `what`
/// and the last `Err` (what was seen instead). A liveness bound, not a speed claim.
pub async fn eventually<T>(
    within: Duration,
    what: &str,
    mut check: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        match check().await {
            Ok(done) => return done,
            Err(seen) => assert!(
                Instant::now() < deadline,
                "{what}: not within {within:?}; {seen}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `base/readyz` until it answers 2xx; fails after 30 s.
pub async fn wait_ready(http: &reqwest::Client, base: &str, logs: &Path) {
    let what = format!("{base} ready (logs in {})", logs.display());
    eventually(Duration::from_secs(30), &what, async || {
        match http.get(format!("{base}/readyz")).send().await {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(format!("answers {}", r.status())),
            Err(e) => Err(e.to_string()),
        }
    })
    .await
}

/// Sends `signal` (`-TERM`, `-INT`, ...) to `child` and waits for it to exit; kills it after
/// 15 s. Its exit status.
pub fn signal_and_wait(child: &mut Child, signal: &str) -> ExitStatus {
    let _ = Command::new("kill")
        .arg(signal)
        .arg(child.id().to_string())
        .status();
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    child.wait().expect("wait for the killed process")
}

/// Waits until something listens on `port` (blocking); fails after `within`.
pub fn wait_port(port: u16, within: Duration) {
    let deadline = Instant::now() + within;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A Redis server of the test's own on a free port, which it may stop and start again
/// (same port, same directory; nothing is persisted). Killed when dropped.
pub struct OwnRedis {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl OwnRedis {
    pub fn start() -> OwnRedis {
        let dir = std::env::temp_dir().join(format!("sluice-redis-{}", Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut redis = OwnRedis {
            port: free_port(),
            dir,
            child: None,
        };
        redis.run();
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again).
    pub fn run(&mut self) {
        let bin = [
            "/usr/bin/redis-server",
            "/usr/sbin/redis-server",
            "/usr/local/bin/redis-server",
        ]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("redis-server");
        let child = Command::new(bin)
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/deps)");
        self.child = Some(child);
        wait_port(self.port, Duration::from_secs(10));
    }

    /// SIGTERM, then wait for the exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal_and_wait(&mut child, "-TERM");
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Reads a raw HTTP/1.1 response from `sock` as text: until its `Content-Length` is in
/// (the server need not close the socket), the server closes, or nothing arrives for
/// `idle`.
pub async fn read_http_response(sock: &mut tokio::net::TcpStream, idle: Duration) -> String {
    use tokio::io::AsyncReadExt;
    let mut answer = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let text = String::from_utf8_lossy(&answer).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_owned())
                })
                .and_then(|v| v.parse::<usize>().ok());
            if len.is_some_and(|n| body.len() >= n) {
                return text;
            }
        }
        match tokio::time::timeout(idle, sock.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => answer.extend_from_slice(&buf[..n]),
            _ => return text,
        }
    }
}

/// `method path` on the stack's ingress with an optional bearer and JSON body: the status,
/// the answer as JSON (`Null` when it is not JSON) and as text.
pub async fn call(
    stack: &Stack,
    method: Method,
    path: &str,
    bearer: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value, String) {
    let mut req = stack.http.request(method, format!("{}{path}", stack.base));
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    if let Some(body) = body {
        req = req.json(&body);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
    )
}

/// `hello there` to `model` with `max_tokens`: the mock reports 5 prompt tokens (3 + 2
/// words) and `max_tokens` completion tokens; tiktoken estimates 9 prompt tokens.
pub fn hello(model: &str, max_tokens: u64) -> Value {
    json!({"model": model, "max_tokens": max_tokens,
           "messages": [{"role": "user", "content": "hello there"}]})
}

/// A chat completion with `key`: the status and the answer as JSON (`Null` when not JSON).
pub async fn chat_as(stack: &Stack, key: &str, body: &Value) -> (StatusCode, Value) {
    let resp = stack
        .http
        .post(format!("{}/v1/chat/completions", stack.base))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Polls until a chat with `key` and `body` answers `want`: workers reload channels every
/// 2 s, and credit reaches a key once projected. Fails after 30 s.
pub async fn until_chat(stack: &Stack, key: &str, body: &Value, want: StatusCode) {
    let what = format!("a chat for {} answers {want}", body["model"]);
    eventually(Duration::from_secs(30), &what, async || {
        let (got, answer) = chat_as(stack, key, body).await;
        if got == want {
            Ok(())
        } else {
            Err(format!("it still answers {got} ({answer})"))
        }
    })
    .await
}

/// The model ids `GET /v1/models` lists for `key`.
pub async fn model_ids(stack: &Stack, key: &str) -> Vec<String> {
    let (status, list, text) = call(stack, Method::GET, "/v1/models", Some(key), None).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Polls `/api/prices` until the ingress knows `n` prices (projected from their `PriceSet`,
/// then picked up by its directory refresh). Fails after 30 s.
pub async fn until_prices(stack: &Stack, n: usize) {
    let what = format!("{n} prices reach the ingress");
    eventually(Duration::from_secs(30), &what, async || {
        let (_, prices, text) = call(stack, Method::GET, "/api/prices", Some(KEY), None).await;
        match prices["data"].as_array() {
            Some(known) if known.len() >= n => Ok(()),
            _ => Err(text),
        }
    })
    .await
}

/// Registers a user through `/api/auth/register`; their session token and id. The answer
/// holds neither the password nor its hash.
pub async fn register(stack: &Stack, name: &str, password: &str) -> (String, String) {
    let (status, body, text) = call(
        stack,
        Method::POST,
        "/api/auth/register",
        None,
        Some(json!({"name": name, "email": format!("{name}@example.com"), "password": password})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    assert!(
        !text.contains("argon2") && !text.contains(password),
        "{text}"
    );
    (
        body["token"].as_str().unwrap().to_owned(),
        body["user"]["id"].as_str().unwrap().to_owned(),
    )
}

/// Creates a user as the admin; its id.
pub async fn admin_user(stack: &Stack, name: &str) -> String {
    let (status, user, text) = call(
        stack,
        Method::POST,
        "/api/admin/users",
        Some(ADMIN_TOKEN),
        Some(json!({"name": name})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    user["id"].as_str().unwrap().to_owned()
}

/// Creates a key as the admin (`body`: its `name`, and `user_id`, limits, ... as wanted);
/// the answer: the secret in `key`, the key's id in `id`.
pub async fn admin_key(stack: &Stack, body: Value) -> Value {
    let (status, created, text) = call(
        stack,
        Method::POST,
        "/api/admin/keys",
        Some(ADMIN_TOKEN),
        Some(body),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    created
}

/// Grants credit as the admin (`body`: `key_id` or `user_id`, `amount`, maybe a `note`).
pub async fn grant_credit(stack: &Stack, body: Value) {
    let (status, _, text) = call(
        stack,
        Method::POST,
        "/api/admin/credits",
        Some(ADMIN_TOKEN),
        Some(body),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{text}");
}
