//! `compose.yaml` and the `Dockerfile` checked without a container engine: the structure
//! an operator relies on (each role its own service from one image, health checks, the
//! JetStream volume, the 3-node NATS profile at replication 3), that the files they name
//! exist and parse, and that every role they start is a real `sluice` subcommand. Where the
//! Docker Compose v2 client exists, `docker compose config -q` must accept the file too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;

use serde_yaml::Value;

const ROLES: [&str; 5] = ["ingress", "worker", "journal", "billing", "projector"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// compose.yaml with anchors, aliases and `<<` merge keys resolved, as Compose sees it.
fn compose() -> Value {
    let mut doc: Value = serde_yaml::from_str(&read("compose.yaml")).expect("compose.yaml parses");
    doc.apply_merge().expect("merge keys resolve");
    // Merge keys nest (a service merges an anchor that itself merges another).
    doc.apply_merge().expect("merge keys resolve");
    doc
}

fn service<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc.get("services")
        .and_then(|s| s.get(name))
        .unwrap_or_else(|| panic!("compose.yaml has no service `{name}`"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn env_of(svc: &Value, key: &str) -> Option<String> {
    svc.get("environment")?
        .get(key)?
        .as_str()
        .map(str::to_owned)
}

/// `${VAR:-default}` as Compose would expand it with VAR unset.
fn default_of(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').expect("closed ${");
        let expr = &after[..end];
        if let Some((_, d)) = expr.split_once(":-") {
            out.push_str(d);
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

/// The host path of each bind mount (`./x:/y[:ro]`), defaults expanded.
fn bind_mounts(svc: &Value) -> Vec<(PathBuf, String)> {
    strings(svc.get("volumes").unwrap_or(&Value::Null))
        .into_iter()
        .filter_map(|v| {
            let v = default_of(&v);
            let mut parts = v.splitn(3, ':');
            let host = parts.next()?.to_owned();
            let target = parts.next()?.to_owned();
            host.starts_with("./")
                .then(|| (root().join(host.trim_start_matches("./")), target))
        })
        .collect()
}

fn subcommands() -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--help")
        .output()
        .expect("run sluice --help");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn is_subcommand(help: &str, name: &str) -> bool {
    help.lines()
        .any(|l| l.split_whitespace().next() == Some(name))
}

#[test]
fn every_role_is_its_own_service_from_one_image() {
    let doc = compose();
    let help = subcommands();
    let image = service(&doc, "migrate")
        .get("image")
        .and_then(Value::as_str)
        .expect("migrate names the image")
        .to_owned();
    for name in ROLES.iter().copied().chain(["migrate"]) {
        let svc = service(&doc, name);
        assert_eq!(
            svc.get("image").and_then(Value::as_str),
            Some(image.as_str()),
            "service `{name}` must run the one sluice image"
        );
        assert_eq!(
            svc.get("build").and_then(Value::as_str),
            Some("."),
            "service `{name}` builds the image from ./Dockerfile"
        );
        let command = strings(svc.get("command").expect("command"));
        assert_eq!(
            command.first().map(String::as_str),
            Some(name),
            "service `{name}` runs `sluice {name}`"
        );
        assert!(
            is_subcommand(&help, name),
            "`sluice {name}` is not a subcommand"
        );
        for key in [
            "SLUICE_DATABASE_URL",
            "SLUICE_NATS_URL",
            "SLUICE_REDIS_URL",
            "SLUICE_NAMESPACE",
            "SLUICE_CONFIG",
            "SLUICE_STREAM_REPLICAS",
        ] {
            assert!(env_of(svc, key).is_some(), "service `{name}` lacks {key}");
        }
        // The config file mounted is the one SLUICE_CONFIG names, and it exists.
        let config = env_of(svc, "SLUICE_CONFIG").expect("SLUICE_CONFIG");
        let mounted = bind_mounts(svc);
        let (host, _) = mounted
            .iter()
            .find(|(_, target)| *target == config)
            .unwrap_or_else(|| panic!("service `{name}` does not mount {config}"));
        assert!(host.is_file(), "{} does not exist", host.display());
    }
    for name in ROLES.iter().copied().chain(["mock-upstream"]) {
        let command = strings(
            service(&doc, name)
                .get("healthcheck")
                .and_then(|h| h.get("test"))
                .unwrap_or_else(|| panic!("service `{name}` has no health check")),
        );
        assert_eq!(command[..3], ["CMD", "sluice", "healthcheck"], "{name}");
        assert!(is_subcommand(&help, "healthcheck"));
    }
    // Roles without an API port expose /healthz and /metrics on SLUICE_METRICS_LISTEN.
    for name in ["worker", "journal", "billing", "projector"] {
        let listen = env_of(service(&doc, name), "SLUICE_METRICS_LISTEN").unwrap_or_default();
        assert!(
            listen.starts_with("0.0.0.0:"),
            "service `{name}` must listen for health checks and scrapes on all interfaces"
        );
    }
    let ingress = service(&doc, "ingress");
    assert!(env_of(ingress, "SLUICE_LISTEN").is_some_and(|l| l.starts_with("0.0.0.0:")));
    // The roles start after `migrate` has prepared the database.
    for name in ROLES {
        let cond = service(&doc, name)
            .get("depends_on")
            .and_then(|d| d.get("migrate"))
            .and_then(|m| m.get("condition"))
            .and_then(Value::as_str);
        assert_eq!(
            cond,
            Some("service_completed_successfully"),
            "service `{name}`"
        );
    }
}

#[test]
fn workers_scale_with_replicas_and_backing_services_have_health_checks() {
    let doc = compose();
    let replicas = service(&doc, "worker")
        .get("deploy")
        .and_then(|d| d.get("replicas"))
        .and_then(Value::as_u64)
        .expect("worker deploy.replicas");
    assert!(
        replicas >= 2,
        "at least two workers share the queue by default"
    );
    for name in ["nats", "postgres", "redis"] {
        let svc = service(&doc, name);
        assert!(
            svc.get("healthcheck").and_then(|h| h.get("test")).is_some(),
            "service `{name}` has no health check"
        );
        assert!(
            svc.get("profiles").is_none(),
            "`{name}` must start by default"
        );
    }
    for dep in ["nats", "postgres"] {
        let cond = service(&doc, "migrate")
            .get("depends_on")
            .and_then(|d| d.get(dep))
            .and_then(|m| m.get("condition"))
            .and_then(Value::as_str);
        assert_eq!(cond, Some("service_healthy"), "migrate waits for {dep}");
    }
}

/// NATS keeps JetStream on file storage in a named volume, in both profiles.
#[test]
fn jetstream_stores_files_on_a_volume() {
    let doc = compose();
    let declared: Vec<String> = doc
        .get("volumes")
        .and_then(Value::as_mapping)
        .expect("top-level volumes")
        .keys()
        .filter_map(|k| k.as_str().map(str::to_owned))
        .collect();
    for name in ["nats", "nats-2", "nats-3"] {
        let svc = service(&doc, name);
        let command = strings(svc.get("command").expect("nats command"));
        let conf = default_of(command.last().expect("config path"));
        let mounts = bind_mounts(svc);
        let (host_dir, target) = mounts
            .iter()
            .find(|(_, t)| conf.starts_with(&format!("{t}/")))
            .unwrap_or_else(|| panic!("`{name}` does not mount its config {conf}"));
        let file = host_dir.join(conf.trim_start_matches(&format!("{target}/")));
        let text =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(
            text.contains("jetstream"),
            "{} enables JetStream",
            file.display()
        );
        let store = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("store_dir:"))
            .map(str::trim)
            .expect("store_dir");
        let volume = strings(svc.get("volumes").expect("volumes"))
            .into_iter()
            .find_map(|v| {
                let (src, dst) = v.split_once(':')?;
                (dst.trim_end_matches(":ro") == store).then(|| src.to_owned())
            })
            .unwrap_or_else(|| panic!("`{name}` keeps {store} on no volume"));
        assert!(
            declared.contains(&volume),
            "`{name}` stores JetStream in `{volume}`, which is not a named volume"
        );
    }
}

/// `docker compose --env-file deploy/cluster.env up`: three NATS servers routed to each
/// other, and the streams created at replication 3.
#[test]
fn cluster_profile_runs_three_nats_and_replicates_streams() {
    let doc = compose();
    let env: Vec<(String, String)> = read("deploy/cluster.env")
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect();
    let get = |k: &str| {
        env.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("deploy/cluster.env lacks {k}"))
    };
    assert_eq!(get("COMPOSE_PROFILES"), "cluster");
    assert_eq!(get("SLUICE_STREAM_REPLICAS"), "3");
    assert_eq!(get("NATS_CONF"), "cluster");
    for name in ["nats-2", "nats-3"] {
        assert_eq!(
            strings(service(&doc, name).get("profiles").expect("profiles")),
            ["cluster"]
        );
    }
    // The compose file passes the variables on to every role.
    let worker = service(&doc, "worker");
    assert_eq!(
        env_of(worker, "SLUICE_STREAM_REPLICAS").as_deref(),
        Some("${SLUICE_STREAM_REPLICAS:-1}")
    );
    assert!(env_of(worker, "SLUICE_NATS_URL").is_some_and(|u| u.starts_with("${SLUICE_NATS_URL")));
    let nats_cmd = strings(service(&doc, "nats").get("command").expect("command")).join(" ");
    assert!(nats_cmd.contains("${NATS_CONF:-single}"), "{nats_cmd}");
    let conf = read("deploy/nats/cluster.conf");
    for peer in ["nats", "nats-2", "nats-3"] {
        assert!(
            conf.contains(&format!("nats://{peer}:6222")),
            "cluster.conf routes to {peer}"
        );
    }
    for url in get("SLUICE_NATS_URL").split(',') {
        let host = url
            .trim_start_matches("nats://")
            .split(':')
            .next()
            .expect("host");
        service(&doc, host);
    }
}

/// The demo configuration `docker compose up` starts with is a valid sluice.yaml.
#[test]
fn demo_config_is_valid() {
    let text = read("deploy/sluice.yaml");
    let cfg = schemas::config::FileConfig::parse(&text, |_| None).expect("deploy/sluice.yaml");
    assert!(!cfg.channels.is_empty() && !cfg.keys.is_empty());
    let doc = compose();
    let mock = strings(
        service(&doc, "mock-upstream")
            .get("command")
            .expect("command"),
    );
    let listen = mock
        .iter()
        .skip_while(|a| *a != "--listen")
        .nth(1)
        .expect("--listen");
    let port = listen.rsplit(':').next().expect("port");
    let base = cfg.channels[0].base_url.clone().expect("base_url");
    assert_eq!(base, format!("http://mock-upstream:{port}/v1"));
}

/// Multi-stage, non-root, on the toolchain rust-toolchain.toml pins.
#[test]
fn dockerfile_is_multi_stage_non_root_and_pinned() {
    let text = read("Dockerfile");
    let froms: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert!(froms.len() >= 2, "multi-stage: {froms:?}");
    let toolchain = read("rust-toolchain.toml");
    let channel = toolchain
        .lines()
        .find_map(|l| l.trim().strip_prefix("channel = "))
        .expect("channel")
        .trim_matches('"');
    assert!(
        froms[0].contains(&format!("rust:{channel}")),
        "the build stage uses the pinned toolchain {channel}: {}",
        froms[0]
    );
    let user = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("USER");
    assert!(
        !user.starts_with("root") && !user.starts_with("0"),
        "runs as {user}"
    );
    assert!(text.contains("ENTRYPOINT [\"sluice\"]"));
    let ignore = read(".dockerignore");
    assert!(
        ignore
            .lines()
            .any(|l| l.trim() == "target/" || l.trim() == "target"),
        "the build context leaves out target/"
    );
}

/// `docker compose config -q` where the Compose v2 client exists (skipped otherwise:
/// the checks above run everywhere).
#[test]
fn docker_compose_accepts_the_file_when_installed() {
    let has_compose = Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_compose {
        eprintln!("docker compose is not installed; structural checks only");
        return;
    }
    for extra in [&[][..], &["--env-file", "deploy/cluster.env"][..]] {
        let out = Command::new("docker")
            .arg("compose")
            .args(extra)
            .args(["config", "-q"])
            .current_dir(root())
            .output()
            .expect("docker compose config");
        assert!(
            out.status.success(),
            "docker compose {extra:?} config: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Every file or folder a service mounts from the repository exists, and Prometheus
/// scrapes services that exist on the ports they serve metrics on.
#[test]
fn mounts_exist_and_prometheus_scrapes_the_roles() {
    let doc = compose();
    let services = doc
        .get("services")
        .and_then(Value::as_mapping)
        .expect("services");
    for (name, svc) in services {
        for (host, target) in bind_mounts(svc) {
            assert!(
                host.exists(),
                "service {name:?} mounts {} at {target}, which does not exist",
                host.display()
            );
        }
    }
    let prometheus: Value =
        serde_yaml::from_str(&read("deploy/prometheus.yml")).expect("prometheus.yml");
    let mut scraped = Vec::new();
    for job in prometheus["scrape_configs"].as_sequence().expect("jobs") {
        for sd in job["dns_sd_configs"].as_sequence().expect("dns_sd_configs") {
            let port = sd["port"].as_u64().expect("port");
            for name in strings(&sd["names"]) {
                scraped.push((name, port));
            }
        }
    }
    for (name, port) in &scraped {
        let svc = service(&doc, name);
        let listen = if name == "ingress" {
            env_of(svc, "SLUICE_LISTEN")
        } else {
            env_of(svc, "SLUICE_METRICS_LISTEN")
        }
        .unwrap_or_default();
        assert!(
            listen.ends_with(&format!(":{port}")),
            "Prometheus scrapes {name} on {port}; it listens on {listen:?}"
        );
    }
    for role in ROLES {
        assert!(
            scraped.iter().any(|(n, _)| n == role),
            "Prometheus does not scrape {role}"
        );
    }
}
