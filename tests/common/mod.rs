//! A whole Sluice deployment for one test: its own namespace (Postgres schema, JetStream
//! streams, Redis keys), a mock upstream, and each role as a separate `sluice` process,
//! exactly as an operator would run them.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mock_upstream::{MockConfig, MockUpstream};
use schemas::Namespace;

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
        let mock = MockUpstream::start("127.0.0.1:0".parse().unwrap(), opts.mock)
            .await
            .expect("mock upstream");
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
            "channels:\n  - name: mock-main\n    type: openai\n    base_url: {base}\n    models: [{MODEL}]\n    priority: 1\n{extra}\
             prices:\n  - {{model: {MODEL}, input_per_mtok: \"{INPUT_PER_MTOK}\", output_per_mtok: \"{OUTPUT_PER_MTOK}\"}}\n\
             keys:\n  - {{name: test, key: \"{KEY}\", group: default{rpm}}}\n",
            base = mock.base_url(),
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
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = self.http.get(format!("{}/readyz", self.base)).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "ingress not ready within 30 s; logs in {}",
                self.dir.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
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
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
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
                return;
            }
            assert!(
                Instant::now() < deadline,
                "only {n} of {count} {event_type} events projected within 60 s; logs in {}",
                self.dir.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
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

/// Reads an SSE body into its `data:` payloads and `id:` values.
pub fn parse_sse(text: &str) -> Vec<(Option<u64>, String)> {
    let mut events = Vec::new();
    for block in text.split("\n\n") {
        let mut id = None;
        let mut data = None;
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("id: ") {
                id = v.trim().parse().ok();
            } else if let Some(v) = line.strip_prefix("data: ") {
                data = Some(v.to_owned());
            }
        }
        if let Some(d) = data {
            events.push((id, d));
        }
    }
    events
}
