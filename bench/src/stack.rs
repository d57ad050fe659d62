//! The processes under test, each started from the release `sluice` binary exactly as an
//! operator would: the mock upstream, then — in a fresh namespace — `migrate`, `journal`,
//! `billing`, `projector`, `worker` and `ingress`. [`Stack::shutdown`] stops them and drops
//! the namespace (Postgres schema and JetStream streams); every child is also killed when
//! the stack is dropped, so an early error cannot leave processes behind.

use anyhow::{bail, Context as _};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use schemas::Namespace;
use tokio::process::{Child, Command};

pub const MODEL: &str = "bench-model";
pub const KEY: &str = "sk-bench-0123456789abcdef01234567";
const SECRET_KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

/// The roles started after `migrate`, in start order.
pub const ROLES: [&str; 5] = ["journal", "billing", "projector", "worker", "ingress"];

/// Where the servers are and how the mock behaves.
#[derive(Debug, Clone)]
pub struct StackConfig {
    pub sluice_bin: PathBuf,
    pub database_url: String,
    pub nats_url: String,
    pub redis_url: String,
    pub chunks: u32,
    pub chunk_delay_ms: u64,
    pub ttft_ms: u64,
    /// Worker processes (at least one), each started as `sluice worker <worker_args>`.
    pub workers: usize,
    pub worker_args: Vec<String>,
}

pub struct Stack {
    pub ns: Namespace,
    config: StackConfig,
    /// Holds `sluice.yaml` and one log file per process.
    pub dir: PathBuf,
    mock_port: u16,
    gateway_port: u16,
    mock: Option<Child>,
    roles: Vec<(&'static str, Child)>,
    pool: Option<sqlx::PgPool>,
    js: Option<jetstream::Context>,
}

/// A free loopback port (bound, read, released: the usual small race is acceptable here).
fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding a free port")?;
    Ok(l.local_addr()?.port())
}

/// The last lines of a process's log, to explain a failed start.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

impl Stack {
    /// Picks a fresh namespace `bench_<random>` and ports, writes `sluice.yaml`; starts nothing.
    pub fn new(config: StackConfig) -> anyhow::Result<Stack> {
        let suffix: u32 = rand::random();
        let ns =
            Namespace::new(&format!("bench_{suffix:08x}")).map_err(|e| anyhow::anyhow!("{e}"))?;
        let dir = std::env::temp_dir().join(format!("sluice-bench-{}", ns.as_str()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mock_port = free_port()?;
        let gateway_port = free_port()?;
        let yaml = format!(
            "channels:\n  - {{name: mock, type: openai, base_url: \"http://127.0.0.1:{mock_port}/v1\", models: [{MODEL}]}}\n\
             prices:\n  - {{model: {MODEL}, input_per_mtok: \"0.15\", output_per_mtok: \"0.60\"}}\n\
             keys:\n  - {{name: bench, key: \"{KEY}\", group: default}}\n"
        );
        std::fs::write(dir.join("sluice.yaml"), yaml).context("writing sluice.yaml")?;
        Ok(Stack {
            ns,
            config,
            dir,
            mock_port,
            gateway_port,
            mock: None,
            roles: Vec::new(),
            pool: None,
            js: None,
        })
    }

    /// `http://127.0.0.1:PORT/v1/chat/completions` of the mock (the baseline).
    pub fn direct_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1/chat/completions", self.mock_port)
    }

    /// The same path through the gateway.
    pub fn gateway_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1/chat/completions", self.gateway_port)
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            (
                "SLUICE_CONFIG",
                self.dir.join("sluice.yaml").display().to_string(),
            ),
            ("SLUICE_NAMESPACE", self.ns.as_str().to_owned()),
            ("SLUICE_LISTEN", format!("127.0.0.1:{}", self.gateway_port)),
            ("SLUICE_DATABASE_URL", self.config.database_url.clone()),
            ("SLUICE_NATS_URL", self.config.nats_url.clone()),
            ("SLUICE_REDIS_URL", self.config.redis_url.clone()),
            ("SLUICE_LOG", "warn".to_owned()),
            ("SLUICE_SECRET_KEY", SECRET_KEY.to_owned()),
        ]
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    fn command(&self, name: &str, args: &[&str]) -> anyhow::Result<Command> {
        let log = std::fs::File::create(self.log_path(name)).context("creating a log file")?;
        let mut cmd = Command::new(&self.config.sluice_bin);
        cmd.args(args)
            .env_remove("SLUICE_METRICS_LISTEN")
            .env_remove("SLUICE_ADMIN_TOKEN")
            .envs(self.env())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        Ok(cmd)
    }

    /// Starts the mock upstream and waits until it accepts connections.
    pub async fn start_mock(&mut self) -> anyhow::Result<()> {
        let listen = format!("127.0.0.1:{}", self.mock_port);
        let chunks = self.config.chunks.to_string();
        let delay = self.config.chunk_delay_ms.to_string();
        let ttft = self.config.ttft_ms.to_string();
        let args = [
            "mock-upstream",
            "--listen",
            &listen,
            "--chunks",
            &chunks,
            "--chunk-delay-ms",
            &delay,
            "--ttft-ms",
            &ttft,
        ];
        let child = self
            .command("mock-upstream", &args)?
            .spawn()
            .with_context(|| format!("starting {}", self.config.sluice_bin.display()))?;
        self.mock = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if tokio::net::TcpStream::connect(&listen).await.is_ok() {
                return Ok(());
            }
            if let Some(mock) = self.mock.as_mut() {
                if let Some(status) = mock.try_wait()? {
                    bail!(
                        "the mock upstream exited ({status}):\n{}",
                        log_tail(&self.log_path("mock-upstream"))
                    );
                }
            }
            if Instant::now() > deadline {
                bail!("the mock upstream did not listen on {listen} within 15 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `sluice migrate`, then every role, then waits for the ingress's `/readyz`.
    pub async fn start_gateway(&mut self, http: &reqwest::Client) -> anyhow::Result<()> {
        let mut migrate = self
            .command("migrate", &["migrate"])?
            .spawn()
            .context("starting sluice migrate")?;
        let status = tokio::time::timeout(Duration::from_secs(120), migrate.wait())
            .await
            .context("sluice migrate took over 120 s")??;
        if !status.success() {
            bail!(
                "sluice migrate failed ({status}):\n{}",
                log_tail(&self.log_path("migrate"))
            );
        }
        self.pool = Some(
            projector::db::connect(&self.config.database_url, &self.ns, 2)
                .await
                .context("connecting to Postgres")?,
        );
        let nats = async_nats::connect(&self.config.nats_url)
            .await
            .context("connecting to NATS")?;
        self.js = Some(jetstream::new(nats));

        for role in ROLES {
            let copies = if role == "worker" {
                self.config.workers.max(1)
            } else {
                1
            };
            for i in 0..copies {
                let mut args = vec![role];
                let log = if role == "worker" {
                    args.extend(self.config.worker_args.iter().map(String::as_str));
                    if i == 0 {
                        role.to_owned()
                    } else {
                        format!("{role}-{i}")
                    }
                } else {
                    role.to_owned()
                };
                let child = self
                    .command(&log, &args)?
                    .spawn()
                    .with_context(|| format!("starting sluice {role}"))?;
                self.roles.push((role, child));
            }
        }

        let readyz = format!("http://127.0.0.1:{}/readyz", self.gateway_port);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(resp) = http.get(&readyz).send().await {
                if resp.status() == reqwest::StatusCode::OK {
                    return Ok(());
                }
            }
            for (role, child) in &mut self.roles {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "sluice {role} exited ({status}):\n{}",
                        log_tail(&self.dir.join(format!("{role}.log")))
                    );
                }
            }
            if Instant::now() > deadline {
                bail!("{readyz} did not answer 200 within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Process id of a role (`"ingress"`, `"worker"`, …) or of `"mock"`.
    pub fn pid(&self, name: &str) -> Option<u32> {
        if name == "mock" {
            return self.mock.as_ref().and_then(Child::id);
        }
        self.roles
            .iter()
            .find(|(r, _)| *r == name)
            .and_then(|(_, c)| c.id())
    }

    /// Process ids of every process of a role (several workers), or of `"mock"`.
    pub fn pids(&self, name: &str) -> Vec<u32> {
        if name == "mock" {
            return self.pid("mock").into_iter().collect();
        }
        self.roles
            .iter()
            .filter(|(r, _)| *r == name)
            .filter_map(|(_, c)| c.id())
            .collect()
    }

    /// Fails when a process of the stack has exited (a crash under load).
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(mock) = self.mock.as_mut() {
            if let Some(status) = mock.try_wait()? {
                bail!(
                    "the mock upstream exited ({status}):\n{}",
                    log_tail(&self.log_path("mock-upstream"))
                );
            }
        }
        for (role, child) in &mut self.roles {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "sluice {role} exited ({status}):\n{}",
                    log_tail(&self.dir.join(format!("{role}.log")))
                );
            }
        }
        Ok(())
    }

    /// Waits until every event published so far is in the Postgres event log and every
    /// projector's checkpoint has reached it, so the CPU they spend on a phase is counted in
    /// that phase. Returns how long it took, or `None` when `timeout` passed first.
    pub async fn drain(&self, timeout: Duration) -> anyhow::Result<Option<Duration>> {
        let (Some(pool), Some(js)) = (&self.pool, &self.js) else {
            bail!("the gateway is not started")
        };
        let started = Instant::now();
        let mut stream = js
            .get_stream(self.ns.events_stream())
            .await
            .context("looking up the events stream")?;
        loop {
            let published = i64::try_from(
                stream
                    .info()
                    .await
                    .context("events stream info")?
                    .state
                    .last_sequence,
            )
            .unwrap_or(i64::MAX);
            let (logged, checkpoint, projectors): (Option<i64>, Option<i64>, i64) = sqlx::query_as(
                "SELECT (SELECT max(position) FROM event_log), (SELECT min(position) FROM checkpoints), \
                 (SELECT count(*) FROM checkpoints)",
            )
            .fetch_one(pool)
            .await
            .context("reading the journal and projector positions")?;
            let logged = logged.unwrap_or(0);
            let checkpoint = checkpoint.unwrap_or(0);
            if logged >= published && projectors > 0 && checkpoint >= published {
                return Ok(Some(started.elapsed()));
            }
            if started.elapsed() > timeout {
                eprintln!(
                    "warning: pipeline not drained after {timeout:?}: published {published}, journaled {logged}, \
                     slowest projector at {checkpoint} ({projectors} projectors)"
                );
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Terminal events (`CompletionFinished`, `RequestFailed`, `RequestCancelled`) in the
    /// Postgres event log so far.
    pub async fn recorded_terminal_events(&self) -> anyhow::Result<i64> {
        let Some(pool) = &self.pool else {
            bail!("the gateway is not started")
        };
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM event_log WHERE type IN ('CompletionFinished', 'RequestFailed', 'RequestCancelled')",
        )
        .fetch_one(pool)
        .await
        .context("counting terminal events")?;
        Ok(n)
    }

    /// Stops every process (SIGTERM, then SIGKILL after 5 s) and drops the namespace unless
    /// told to keep it; removes the logs unless told to keep them.
    pub async fn shutdown(&mut self, keep_namespace: bool, keep_logs: bool) -> anyhow::Result<()> {
        let mut children: Vec<(String, Child)> = self
            .roles
            .drain(..)
            .map(|(r, c)| (r.to_owned(), c))
            .rev()
            .collect();
        if let Some(mock) = self.mock.take() {
            children.push(("mock-upstream".to_owned(), mock));
        }
        for (_, child) in &children {
            if let Some(pid) = child.id() {
                // SIGTERM without `unsafe`: the roles shut down cleanly on it.
                let _ = Command::new("kill")
                    .arg("-TERM")
                    .arg(pid.to_string())
                    .status()
                    .await;
            }
        }
        for (name, mut child) in children {
            match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
                Ok(_) => {}
                Err(_) => {
                    eprintln!("warning: {name} ignored SIGTERM for 5 s; killing it");
                    let _ = child.kill().await;
                }
            }
        }
        if !keep_logs {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        if keep_namespace {
            eprintln!("keeping namespace {} (--keep)", self.ns);
            return Ok(());
        }
        let mut result = Ok(());
        if let Some(js) = self.js.take() {
            projector::bus::delete_streams(&js, &self.ns).await;
        } else if let Ok(nats) = async_nats::connect(&self.config.nats_url).await {
            projector::bus::delete_streams(&jetstream::new(nats), &self.ns).await;
        }
        let pool = match self.pool.take() {
            Some(p) => Ok(p),
            None => projector::db::connect(&self.config.database_url, &self.ns, 1).await,
        };
        match pool {
            Ok(pool) => {
                if let Err(e) = projector::db::drop_schema(&pool, &self.ns).await {
                    result = Err(anyhow::anyhow!("dropping schema {}: {e}", self.ns));
                }
                pool.close().await;
            }
            Err(e) => {
                result = Err(anyhow::anyhow!(
                    "connecting to drop schema {}: {e}",
                    self.ns
                ))
            }
        }
        result
    }
}

/// Drops a namespace left by a `--keep` run: its Postgres schema and JetStream streams.
/// Only `bench_…` namespaces, so a typo cannot drop a real deployment's data.
pub async fn drop_namespace(database_url: &str, nats_url: &str, name: &str) -> anyhow::Result<()> {
    if !name.starts_with("bench_") {
        bail!("refusing to drop `{name}`: only the benchmark's own `bench_…` namespaces");
    }
    let ns = Namespace::new(name).map_err(|e| anyhow::anyhow!("{e}"))?;
    let nats = async_nats::connect(nats_url)
        .await
        .context("connecting to NATS")?;
    projector::bus::delete_streams(&jetstream::new(nats), &ns).await;
    let pool = projector::db::connect(database_url, &ns, 1)
        .await
        .context("connecting to Postgres")?;
    projector::db::drop_schema(&pool, &ns)
        .await
        .context("dropping the schema")?;
    pool.close().await;
    Ok(())
}
