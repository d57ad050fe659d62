//! Settings in layers: defaults, then `sluice.yaml` (path from `SLUICE_CONFIG`, or
//! `./sluice.yaml` when present), then `SLUICE_*` environment variables.

use anyhow::{bail, Context as _};
use std::path::PathBuf;

use schemas::config::{FileConfig, Secret};
use schemas::Namespace;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: String,
    pub database_url: String,
    pub nats_url: String,
    pub redis_url: String,
    pub namespace: Namespace,
    /// Bootstrap admin bearer for `/api/admin/*` (`SLUICE_ADMIN_TOKEN`).
    pub admin_token: Option<Secret>,
    /// Base64 AES-256 key sealing provider secrets (`SLUICE_SECRET_KEY`).
    pub secret_key: Option<Secret>,
    /// Where a role other than `ingress` serves `/healthz` and `/metrics`, when set.
    pub metrics_listen: Option<String>,
    pub file: FileConfig,
}

impl Settings {
    pub fn load() -> anyhow::Result<Settings> {
        Self::load_with(|k| std::env::var(k).ok())
    }

    pub fn load_with(env: impl Fn(&str) -> Option<String>) -> anyhow::Result<Settings> {
        let path = match env("SLUICE_CONFIG") {
            Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
            _ => Some(PathBuf::from("sluice.yaml")).filter(|p| p.exists()),
        };
        let file = match &path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read config file {}", p.display()))?;
                FileConfig::parse(&text, &env).with_context(|| format!("in {}", p.display()))?
            }
            None => FileConfig::default(),
        };
        let pick = |var: &str, from_file: &Option<String>, default: &str| -> String {
            env(var)
                .filter(|v| !v.is_empty())
                .or_else(|| from_file.clone())
                .unwrap_or_else(|| default.to_owned())
        };
        let ns_name = pick("SLUICE_NAMESPACE", &file.namespace, "sluice");
        let namespace = match Namespace::new(&ns_name) {
            Ok(ns) => ns,
            Err(e) => bail!("SLUICE_NAMESPACE: {e}"),
        };
        let secret = |var: &str, from_file: &Option<Secret>| {
            env(var)
                .filter(|v| !v.is_empty())
                .map(Secret)
                .or_else(|| from_file.clone())
        };
        Ok(Settings {
            listen: pick("SLUICE_LISTEN", &file.listen, DEFAULT_LISTEN),
            database_url: pick(
                "SLUICE_DATABASE_URL",
                &file.database_url,
                DEFAULT_DATABASE_URL,
            ),
            nats_url: pick("SLUICE_NATS_URL", &file.nats_url, DEFAULT_NATS_URL),
            redis_url: pick("SLUICE_REDIS_URL", &file.redis_url, DEFAULT_REDIS_URL),
            namespace,
            admin_token: secret("SLUICE_ADMIN_TOKEN", &file.admin_token),
            secret_key: secret("SLUICE_SECRET_KEY", &file.secret_key),
            metrics_listen: env("SLUICE_METRICS_LISTEN").filter(|v| !v.is_empty()),
            file,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn env_overrides_file_and_defaults() {
        let dir =
            std::env::temp_dir().join(format!("sluice-settings-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let path = dir.join("sluice.yaml");
        std::fs::write(&path, "namespace: fromfile\nnats_url: nats://file:4222\n").expect("write");
        let env: HashMap<&str, String> = HashMap::from([
            ("SLUICE_CONFIG", path.display().to_string()),
            ("SLUICE_NAMESPACE", "fromenv".to_owned()),
        ]);
        let s = Settings::load_with(|k| env.get(k).cloned()).expect("load");
        assert_eq!(s.namespace.as_str(), "fromenv");
        assert_eq!(s.nats_url, "nats://file:4222");
        assert_eq!(s.listen, DEFAULT_LISTEN);
        let bad: HashMap<&str, String> =
            HashMap::from([("SLUICE_NAMESPACE", "Bad.Name".to_owned())]);
        assert!(Settings::load_with(|k| bad.get(k).cloned()).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }
}
