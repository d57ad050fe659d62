//! Zero-config start-up of the three servers Sluice needs: NATS (JetStream), Postgres and
//! Redis.
//!
//! `sluice up` must work on a fresh machine with no configuration (see "Start-up and tests
//! on a fresh machine" in the design). For each service we first try the URL we were given:
//! if something already listens there we use it and touch nothing. Only when the URL points
//! at this machine (loopback) and nothing answers do we start a private server from the
//! installed binary, listening on loopback only, with its data under `.sluice/`. A remote
//! URL that does not answer is an error: starting a local server in its place would
//! silently split the operator's data.
//!
//! The servers we start are our children: they are stopped (gracefully, then killed) when
//! [`LocalServices`] is stopped or dropped. They run in their own process group so that a
//! Ctrl-C in the terminal reaches only sluice, which drains its roles before stopping them.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tokio::process::{Child, Command};

/// How long a connect attempt may take before a service counts as unreachable.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a started server gets to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a server gets to exit after the polite signal before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

const INSTALL_HINT: &str = "install the servers from the distribution's packages \
     (Debian/Ubuntu: `sudo apt-get install -y nats-server postgresql redis-server`, or run `scripts/deps`), \
     or start them with `docker compose up`";

/// Where to reach NATS, Postgres and Redis.
#[derive(Clone, PartialEq, Eq)]
pub struct ServiceUrls {
    pub nats_url: String,
    pub database_url: String,
    pub redis_url: String,
}

/// The servers started by [`LocalServices::ensure`]; empty when all were already running.
pub struct LocalServices {
    children: Vec<Managed>,
}

impl LocalServices {
    /// Makes sure NATS, Postgres and Redis answer, starting local ones where needed, and
    /// returns the URLs to use (a started server's URL names its loopback IP instead of
    /// `localhost`, since it listens on that IP only).
    pub async fn ensure(
        urls: ServiceUrls,
        data_dir: &Path,
    ) -> Result<(LocalServices, ServiceUrls)> {
        // The three are independent; starting them together saves Postgres' initdb time.
        let (nats, pg, redis) = tokio::join!(
            ensure_one(Kind::Nats, &urls.nats_url, data_dir),
            ensure_one(Kind::Postgres, &urls.database_url, data_dir),
            ensure_one(Kind::Redis, &urls.redis_url, data_dir),
        );
        // On an error the servers already started are dropped here, which stops them.
        let ((nats, nats_url), (pg, database_url), (redis, redis_url)) = (nats?, pg?, redis?);
        let children = [nats, pg, redis].into_iter().flatten().collect();
        Ok((
            LocalServices { children },
            ServiceUrls {
                nats_url,
                database_url,
                redis_url,
            },
        ))
    }

    /// Stops the started servers, newest first, waiting for each to exit.
    pub async fn stop(mut self) {
        while let Some(child) = self.children.pop() {
            child.stop().await;
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Nats,
    Postgres,
    Redis,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Nats => "nats",
            Kind::Postgres => "postgres",
            Kind::Redis => "redis",
        }
    }
}

async fn ensure_one(kind: Kind, url: &str, data_dir: &Path) -> Result<(Option<Managed>, String)> {
    let target = Target::parse(url).with_context(|| format!("bad {} URL {url:?}", kind.name()))?;
    if reachable(&target.host, target.port, PROBE_TIMEOUT).await {
        return Ok((None, url.to_string()));
    }
    let Some(ip) = target.loopback_ip() else {
        bail!(
            "{} at {}:{} is not reachable; it is not on this machine, so sluice will not start one",
            kind.name(),
            target.host,
            target.port
        );
    };
    let data_dir = absolute_dir(data_dir)?;
    tracing::info!(service = kind.name(), port = target.port, data = %data_dir.display(), "not running; starting a local server");
    let child = match kind {
        Kind::Nats => start_nats(&target, &ip, &data_dir).await,
        Kind::Postgres => start_postgres(&target, &ip, &data_dir).await,
        Kind::Redis => start_redis(&target, &ip, &data_dir).await,
    }
    .with_context(|| format!("starting a local {} on {ip}:{}", kind.name(), target.port))?;
    Ok((Some(child), target.with_host(&ip)))
}

/// True when a TCP connection to `host:port` succeeds within `timeout`.
pub(crate) async fn reachable(host: &str, port: u16, timeout: Duration) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    matches!(
        tokio::time::timeout(timeout, tokio::net::TcpStream::connect((host, port))).await,
        Ok(Ok(_))
    )
}

/// The parts of a service URL we need: `scheme://[user[:pass]@]host[:port][/path][?query]`.
/// Hand-parsed because the binary crate has no URL parser and these URLs are simple.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    url: String,
    scheme: String,
    user: Option<String>,
    password: Option<String>,
    host: String,
    port: u16,
    /// First path segment, percent-decoded (the Postgres database name).
    path: String,
    host_range: std::ops::Range<usize>,
}

impl Target {
    fn parse(url: &str) -> Result<Target> {
        // A NATS URL may list several servers; the first one decides.
        let url = url.split(',').next().unwrap_or_default().trim();
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| anyhow!("missing scheme://"))?;
        let start = scheme.len() + 3;
        let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (userinfo, hostport) = match rest[..auth_end].rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, &rest[..auth_end]),
        };
        let host_start = start + userinfo.map_or(0, |u| u.len() + 1);
        let (host, port) = if let Some(end) = hostport.strip_prefix('[').and_then(|h| h.find(']')) {
            (&hostport[..end + 2], hostport[end + 2..].strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        let port = match port {
            Some(p) => p.parse().with_context(|| format!("bad port {p:?}"))?,
            None => match scheme {
                "nats" | "tls" => 4222,
                "postgres" | "postgresql" => 5432,
                "redis" | "rediss" => 6379,
                other => bail!("unknown scheme {other:?} and no port"),
            },
        };
        let host_range = host_start..host_start + host.len();
        let host = if host.is_empty() { "localhost" } else { host };
        let (user, password) = match userinfo {
            Some(u) => match u.split_once(':') {
                Some((u, p)) => (Some(decode(u)), Some(decode(p))),
                None => (Some(decode(u)), None),
            },
            None => (None, None),
        };
        let path = rest[auth_end..].trim_start_matches('/');
        let path = decode(path.split(['/', '?', '#']).next().unwrap_or_default());
        Ok(Target {
            url: url.to_string(),
            scheme: scheme.to_string(),
            user: user.filter(|u| !u.is_empty()),
            password: password.filter(|p| !p.is_empty()),
            host: host.to_string(),
            port,
            path,
            host_range,
        })
    }

    /// The IP a local server should listen on, when this URL points at this machine.
    fn loopback_ip(&self) -> Option<String> {
        if self.scheme == "tls" || self.scheme == "rediss" {
            return None; // we cannot stand in for a TLS server
        }
        let bare = self.host.trim_start_matches('[').trim_end_matches(']');
        if bare.eq_ignore_ascii_case("localhost") {
            return Some("127.0.0.1".into());
        }
        let ip: std::net::IpAddr = bare.parse().ok()?;
        ip.is_loopback().then(|| bare.to_string())
    }

    /// The URL with its host replaced by `ip` (bracketed when IPv6).
    fn with_host(&self, ip: &str) -> String {
        let host = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip.to_string()
        };
        let mut url = self.url.clone();
        url.replace_range(self.host_range.clone(), &host);
        url
    }
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (b[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A server we started; stopped politely on [`Managed::stop`] or drop.
struct Managed {
    kind: Kind,
    child: Option<Child>,
}

impl Managed {
    /// Postgres treats SIGTERM as "smart" shutdown, which waits for every client to leave;
    /// SIGINT is its fast, still clean, shutdown. NATS and Redis exit cleanly on SIGTERM.
    fn signal(&self) -> &'static str {
        if self.kind == Kind::Postgres {
            "INT"
        } else {
            "TERM"
        }
    }

    fn send_signal(&self) -> Option<u32> {
        let pid = self.child.as_ref()?.id()?;
        // No libc here (and no unsafe): kill(1) sends the signal.
        let _ = std::process::Command::new("kill")
            .args(["-s", self.signal(), &pid.to_string()])
            .stderr(Stdio::null())
            .status();
        Some(pid)
    }

    async fn stop(mut self) {
        if self.send_signal().is_some() {
            if let Some(child) = self.child.as_mut() {
                if tokio::time::timeout(STOP_TIMEOUT, child.wait())
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        service = self.kind.name(),
                        "did not stop in time; killing it"
                    );
                    let _ = child.kill().await;
                }
            }
        }
        self.child = None;
    }
}

impl Drop for Managed {
    /// Drop cannot await, so it polls: this blocks the thread for at most `STOP_TIMEOUT`,
    /// which only happens at shutdown or after a failed start. Dropping the child then
    /// kills it (`kill_on_drop`) if it is still running.
    fn drop(&mut self) {
        if self.send_signal().is_none() {
            return;
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while let Some(child) = self.child.as_mut() {
            if !matches!(child.try_wait(), Ok(None)) || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Finds an executable named `name` on PATH or in `extra` directories.
fn find_binary(name: &str, extra: &[&str]) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(extra.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

fn require_binary(name: &str, extra: &[&str]) -> Result<PathBuf> {
    find_binary(name, extra).ok_or_else(|| {
        anyhow!(
            "`{name}` is not installed (looked on PATH and in {}); {INSTALL_HINT}",
            extra.join(", ")
        )
    })
}

fn absolute_dir(dir: &Path) -> Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::canonicalize(dir).with_context(|| format!("resolving {}", dir.display()))
}

fn subdir(data_dir: &Path, name: &str) -> Result<PathBuf> {
    let dir = data_dir.join(name);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Opens `DATA/logs/<name>.log` (appending) for a child's stdout and stderr.
fn log_file(data_dir: &Path, name: &str) -> Result<(PathBuf, File, File)> {
    let path = subdir(data_dir, "logs")?.join(format!("{name}.log"));
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let err = out.try_clone()?;
    Ok((path, out, err))
}

fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Spawns `cmd` with output to `DATA/logs/<name>.log` and waits until `ip:port` accepts
/// connections, failing early (with the log's tail) if the server exits.
async fn spawn_and_wait(
    kind: Kind,
    mut cmd: Command,
    data_dir: &Path,
    ip: &str,
    port: u16,
) -> Result<Managed> {
    let (log, out, err) = log_file(data_dir, kind.name())?;
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .process_group(0);
    let child = cmd
        .spawn()
        .with_context(|| format!("running {:?}", cmd.as_std().get_program()))?;
    let mut managed = Managed {
        kind,
        child: Some(child),
    };
    let started = Instant::now();
    loop {
        if reachable(ip, port, PROBE_TIMEOUT).await {
            return Ok(managed);
        }
        if let Some(child) = managed.child.as_mut() {
            if let Some(status) = child.try_wait()? {
                managed.child = None;
                bail!(
                    "{} exited ({status}) before accepting connections; end of {}:\n{}",
                    kind.name(),
                    log.display(),
                    log_tail(&log)
                );
            }
        }
        if started.elapsed() > START_TIMEOUT {
            bail!(
                "{} did not accept connections on {ip}:{port} within {START_TIMEOUT:?}; see {}",
                kind.name(),
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn start_nats(t: &Target, ip: &str, data_dir: &Path) -> Result<Managed> {
    let bin = require_binary("nats-server", &["/usr/sbin", "/usr/local/bin"])?;
    let store = subdir(data_dir, "nats")?;
    let mut cmd = Command::new(bin);
    cmd.arg("-js")
        .args(["-a", ip, "-p", &t.port.to_string()])
        .arg("-sd")
        .arg(&store);
    match (&t.user, &t.password) {
        (Some(user), Some(pass)) => cmd.args(["--user", user, "--pass", pass]),
        (Some(token), None) => cmd.args(["--auth", token]),
        _ => &mut cmd,
    };
    spawn_and_wait(Kind::Nats, cmd, data_dir, ip, t.port).await
}

async fn start_redis(t: &Target, ip: &str, data_dir: &Path) -> Result<Managed> {
    let bin = require_binary("redis-server", &["/usr/sbin", "/usr/local/bin"])?;
    let dir = subdir(data_dir, "redis")?;
    let mut cmd = Command::new(bin);
    // Redis holds only rate-limit counters and caches here: no persistence.
    cmd.args([
        "--bind",
        ip,
        "--port",
        &t.port.to_string(),
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
    ])
    .arg("--dir")
    .arg(&dir);
    if let Some(pass) = &t.password {
        cmd.args(["--requirepass", pass]);
    }
    spawn_and_wait(Kind::Redis, cmd, data_dir, ip, t.port).await
}

/// The directory holding `initdb`, `postgres`, `psql` and `createdb` of one installation:
/// the version that initialised `pg_dir` if it is installed, else the one on PATH, else the
/// highest under `/usr/lib/postgresql` (Debian does not put the server tools on PATH).
fn postgres_bin_dir(pg_dir: &Path) -> Result<PathBuf> {
    let has_tools = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Ok(v) = fs::read_to_string(pg_dir.join("PG_VERSION")) {
        let d = PathBuf::from(format!("/usr/lib/postgresql/{}/bin", v.trim()));
        if has_tools(&d) {
            return Ok(d);
        }
    }
    if let Some(d) = find_binary("initdb", &[])
        .and_then(|p| fs::canonicalize(p).ok())
        .and_then(|p| p.parent().map(Path::to_path_buf))
    {
        if has_tools(&d) {
            return Ok(d);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, d)| has_tools(d))
        .collect();
    versions.sort();
    versions.pop().map(|(_, d)| d).ok_or_else(|| {
        anyhow!("the Postgres server (`initdb`, `postgres`) is not installed (looked on PATH and in /usr/lib/postgresql/*/bin); {INSTALL_HINT}")
    })
}

/// Postgres refuses to run as root. Running as root we run it as the `postgres` system
/// user instead: this is its uid and gid, read from /etc/passwd.
fn postgres_user_ids() -> Result<Option<(String, String)>> {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1));
    if euid != Some("0") {
        return Ok(None);
    }
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    let entry = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[0] == "postgres");
    match entry {
        Some(f) => Ok(Some((f[2].to_string(), f[3].to_string()))),
        None => bail!(
            "Postgres refuses to run as root and there is no `postgres` system user to run it as; \
             create one (`useradd --system --home /var/lib/postgresql postgres`), run sluice as a normal user, or {INSTALL_HINT}"
        ),
    }
}

/// A command for a Postgres tool, run as the `postgres` user when we are root. `setpriv`
/// execs the tool directly, so signals and `kill_on_drop` reach Postgres itself; `runuser`
/// (which stays in between as a parent) is the fallback.
fn pg_command(bin: &Path, as_user: &Option<(String, String)>, cwd: &Path) -> Command {
    let mut cmd = match as_user {
        None => Command::new(bin),
        Some((uid, gid)) => match find_binary("setpriv", &["/usr/bin", "/bin"]) {
            Some(setpriv) => {
                let mut c = Command::new(setpriv);
                c.args([
                    format!("--reuid={uid}"),
                    format!("--regid={gid}"),
                    "--clear-groups".into(),
                    "--".into(),
                ])
                .arg(bin);
                c
            }
            None => {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(bin);
                c
            }
        },
    };
    cmd.current_dir(cwd);
    cmd
}

async fn run_checked(mut cmd: Command, what: &str) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Does `user` (as uid) own and reach `dir`? Checked by asking the shell as that user,
/// since a home directory like /root is closed to other users.
async fn user_can_write(ids: &(String, String), dir: &Path) -> bool {
    let mut cmd = pg_command(Path::new("/bin/sh"), &Some(ids.clone()), Path::new("/"));
    cmd.args(["-c", "test -w \"$1\" && test -x \"$1\"", "sh"])
        .arg(dir);
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    matches!(cmd.status().await, Ok(s) if s.success())
}

async fn start_postgres(t: &Target, ip: &str, data_dir: &Path) -> Result<Managed> {
    let as_user = postgres_user_ids()?;
    let mut pg_dir = subdir(data_dir, "pg")?;
    if let Some(ids) = &as_user {
        let owner = format!("{}:{}", ids.0, ids.1);
        let mut chown = Command::new("chown");
        chown.args(["-R", &owner]).arg(&pg_dir);
        run_checked(chown, "chown").await?;
        if !user_can_write(ids, &pg_dir).await {
            // e.g. the clone lives under /root: keep the cluster in the postgres user's own
            // area instead, one per data dir, and leave a pointer to it.
            let parent = Path::new("/var/lib/postgresql/sluice");
            let home = parent.join(format!(
                "{:016x}",
                fnv1a(data_dir.as_os_str().as_encoded_bytes())
            ));
            fs::create_dir_all(&home).with_context(|| format!("creating {}", home.display()))?;
            let mut chown = Command::new("chown");
            chown.arg(&owner).arg(parent).arg(&home);
            run_checked(chown, "chown").await?;
            fs::write(
                data_dir.join("pg-location"),
                format!("{}\n", home.display()),
            )?;
            tracing::info!(dir = %home.display(), "the postgres user cannot reach the data dir; keeping the cluster here");
            pg_dir = home;
        }
    }
    let bin = postgres_bin_dir(&pg_dir)?;
    if !pg_dir.join("PG_VERSION").exists() {
        let mut cmd = pg_command(&bin.join("initdb"), &as_user, &pg_dir);
        cmd.arg("-D").arg(&pg_dir).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
        ]);
        run_checked(cmd, "initdb").await?;
    }
    let mut cmd = pg_command(&bin.join("postgres"), &as_user, &pg_dir);
    cmd.arg("-D").arg(&pg_dir).args([
        "-p",
        &t.port.to_string(),
        "-c",
        &format!("listen_addresses={ip}"),
    ]);
    // The socket lives in the data dir (not /var/run/postgresql, where a system cluster
    // keeps its own); a path too long for a Unix socket disables the socket instead.
    let socket_dir = pg_dir.to_string_lossy().into_owned();
    cmd.arg("-k").arg(if socket_dir.len() < 90 {
        socket_dir.as_str()
    } else {
        ""
    });
    let managed = spawn_and_wait(Kind::Postgres, cmd, data_dir, ip, t.port).await?;
    ensure_role_and_database(t, ip, &bin).await?;
    Ok(managed)
}

/// Creates the URL's user (as a superuser; auth is trust on loopback) and database when
/// missing. Retries briefly: the port opens before Postgres finishes starting up.
async fn ensure_role_and_database(t: &Target, ip: &str, bin: &Path) -> Result<()> {
    let user = t.user.clone().unwrap_or_else(|| "postgres".into());
    let db = if t.path.is_empty() {
        user.clone()
    } else {
        t.path.clone()
    };
    let psql_bin = Some(bin.join("psql"))
        .filter(|p| p.is_file())
        .or_else(|| find_binary("psql", &[]));
    let psql_bin = psql_bin.ok_or_else(|| anyhow!("`psql` is not installed; {INSTALL_HINT}"))?;
    let psql = |sql: String| {
        let mut cmd = Command::new(&psql_bin);
        cmd.args([
            "-h",
            ip,
            "-p",
            &t.port.to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
            "-Atc",
            &sql,
        ])
        .env("PGCONNECT_TIMEOUT", "5");
        cmd
    };
    let lit = |s: &str| format!("'{}'", s.replace('\'', "''"));
    let ident = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    let started = Instant::now();
    let role_exists = loop {
        match run_checked(
            psql(format!(
                "select 1 from pg_roles where rolname = {}",
                lit(&user)
            )),
            "psql",
        )
        .await
        {
            Ok(out) => break out == "1",
            Err(e) if started.elapsed() > START_TIMEOUT => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    if !role_exists {
        run_checked(
            psql(format!("create role {} login superuser", ident(&user))),
            "psql create role",
        )
        .await?;
    }
    let db_exists = run_checked(
        psql(format!(
            "select 1 from pg_database where datname = {}",
            lit(&db)
        )),
        "psql",
    )
    .await?
        == "1";
    if !db_exists {
        run_checked(
            psql(format!(
                "create database {} owner {}",
                ident(&db),
                ident(&user)
            )),
            "psql create database",
        )
        .await?;
    }
    Ok(())
}

/// FNV-1a: a hash that, unlike std's, is the same across Rust releases.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> Result<u16> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    }

    /// A scratch data dir under the system temp dir, removed on drop.
    struct TempDir(PathBuf);
    impl TempDir {
        fn new(name: &str) -> Result<TempDir> {
            let dir = std::env::temp_dir().join(format!("sluice-ls-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir)?;
            Ok(TempDir(dir))
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn installed(name: &str) -> bool {
        let found = find_binary(name, &["/usr/sbin", "/usr/local/bin"]).is_some();
        if !found {
            eprintln!("skipping: {name} is not installed (scripts/deps installs it)");
        }
        found
    }

    #[test]
    fn parses_urls() -> Result<()> {
        let t = Target::parse("postgres://sluice:p%40ss@127.0.0.1:5433/my%20db?sslmode=disable")?;
        assert_eq!(
            (t.user.as_deref(), t.password.as_deref()),
            (Some("sluice"), Some("p@ss"))
        );
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("127.0.0.1", 5433, "my db")
        );
        assert_eq!(
            t.with_host("127.0.0.1"),
            "postgres://sluice:p%40ss@127.0.0.1:5433/my%20db?sslmode=disable"
        );

        let t = Target::parse("nats://localhost")?;
        assert_eq!((t.host.as_str(), t.port), ("localhost", 4222));
        assert_eq!(t.loopback_ip().as_deref(), Some("127.0.0.1"));
        assert_eq!(t.with_host("127.0.0.1"), "nats://127.0.0.1");

        let t = Target::parse("redis://localhost:6380/0")?;
        assert_eq!(t.with_host("127.0.0.1"), "redis://127.0.0.1:6380/0");
        let t = Target::parse("redis://[::1]:6390")?;
        assert_eq!(
            (t.host.as_str(), t.port, t.loopback_ip().as_deref()),
            ("[::1]", 6390, Some("::1"))
        );
        let t = Target::parse("nats://a:4222,nats://b:4223")?;
        assert_eq!(
            (t.host.as_str(), t.port, t.loopback_ip()),
            ("a", 4222, None)
        );
        assert_eq!(
            Target::parse("postgres://db.example.com/x")?.loopback_ip(),
            None
        );
        assert_eq!(Target::parse("rediss://127.0.0.1")?.loopback_ip(), None);
        assert!(Target::parse("127.0.0.1:4222").is_err());
        assert!(Target::parse("redis://127.0.0.1:notaport").is_err());
        Ok(())
    }

    #[tokio::test]
    async fn detects_reachable() -> Result<()> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        assert!(reachable("127.0.0.1", port, PROBE_TIMEOUT).await);
        // A bound socket that does not listen keeps the port ours (no other test can take
        // it) while refusing connections.
        let closed = tokio::net::TcpSocket::new_v4()?;
        closed.bind("127.0.0.1:0".parse()?)?;
        let closed_port = closed.local_addr()?.port();
        assert!(!reachable("127.0.0.1", closed_port, PROBE_TIMEOUT).await);
        Ok(())
    }

    #[tokio::test]
    async fn refuses_to_stand_in_for_a_remote_server() {
        let err = ensure_one(
            Kind::Redis,
            "redis://192.0.2.1:1",
            Path::new("/nonexistent"),
        )
        .await;
        assert!(err.is_err_and(|e| e.to_string().contains("not on this machine")));
    }

    #[tokio::test]
    async fn starts_and_stops_redis_and_nats() -> Result<()> {
        if !installed("redis-server") || !installed("nats-server") {
            return Ok(());
        }
        let dir = TempDir::new("rn")?;
        for (kind, scheme) in [(Kind::Redis, "redis"), (Kind::Nats, "nats")] {
            let port = free_port()?;
            let (child, url) =
                ensure_one(kind, &format!("{scheme}://localhost:{port}"), &dir.0).await?;
            assert_eq!(url, format!("{scheme}://127.0.0.1:{port}"));
            let child = child.ok_or_else(|| anyhow!("{scheme} was not started"))?;
            assert!(reachable("127.0.0.1", port, PROBE_TIMEOUT).await);
            // A second ensure finds it running and starts nothing.
            assert!(ensure_one(kind, &url, &dir.0).await?.0.is_none());
            child.stop().await;
            assert!(!reachable("127.0.0.1", port, PROBE_TIMEOUT).await);
        }
        assert!(dir.0.join("logs/redis.log").is_file() && dir.0.join("nats").is_dir());
        Ok(())
    }

    #[tokio::test]
    async fn ensure_starts_all_three_and_creates_the_database() -> Result<()> {
        if !installed("redis-server")
            || !installed("nats-server")
            || postgres_bin_dir(Path::new("/nonexistent")).is_err()
        {
            return Ok(());
        }
        let dir = TempDir::new("all")?;
        let (pn, pp, pr) = (free_port()?, free_port()?, free_port()?);
        let urls = ServiceUrls {
            nats_url: format!("nats://127.0.0.1:{pn}"),
            database_url: format!("postgres://sluice_test@127.0.0.1:{pp}/sluice_ls_test"),
            redis_url: format!("redis://127.0.0.1:{pr}"),
        };
        let (services, got) = LocalServices::ensure(urls.clone(), &dir.0).await?;
        assert!(got == urls);
        assert_eq!(services.children.len(), 3);
        let bin = postgres_bin_dir(&dir.0.join("pg"))?;
        let mut psql = Command::new(bin.join("psql"));
        psql.args([
            "-h",
            "127.0.0.1",
            "-p",
            &pp.to_string(),
            "-U",
            "sluice_test",
            "-d",
            "sluice_ls_test",
            "-Atc",
            "select current_database()",
        ]);
        assert_eq!(run_checked(psql, "psql").await?, "sluice_ls_test");
        services.stop().await;
        for port in [pn, pp, pr] {
            assert!(
                !reachable("127.0.0.1", port, PROBE_TIMEOUT).await,
                "port {port} still open"
            );
        }
        Ok(())
    }
}
