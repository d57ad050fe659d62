//! The shape of `sluice.yaml`. Loading (file, env overrides) happens in the binary; this
//! module is pure: parse text, substitute `${VAR}`, validate.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::money::{MoneyError, Nanos, Price};

/// A secret from the config file; `Debug` never shows it.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub database_url: Option<String>,
    pub nats_url: Option<String>,
    pub redis_url: Option<String>,
    pub namespace: Option<String>,
    pub admin_token: Option<Secret>,
    pub secret_key: Option<Secret>,
    #[serde(default)]
    pub channels: Vec<ChannelConfig>,
    #[serde(default)]
    pub prices: Vec<PriceConfig>,
    #[serde(default)]
    pub keys: Vec<KeyConfig>,
    /// Subscription plans (monthly quota and model allow-list), upserted by name.
    #[serde(default)]
    pub plans: Vec<PlanConfig>,
    /// Failover and circuit-breaker tuning of the workers.
    #[serde(default)]
    pub routing: RoutingConfig,
}

/// `routing:` in `sluice.yaml`; every field optional (the workers' defaults apply).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// Seconds a channel stays banned when the provider did not say how long (default 60).
    pub ban_secs: Option<u64>,
    /// Consecutive failures of a channel that ban it (default 3).
    pub failure_threshold: Option<u32>,
    /// Attempts per request over all channels and retries (default 6).
    pub max_attempts: Option<u32>,
}

/// One upstream channel: a provider account (or a mock) serving some models.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelConfig {
    pub name: String,
    #[serde(rename = "type")]
    pub channel_type: String,
    #[serde(default)]
    pub base_url: Option<String>,
    #[serde(default)]
    pub api_key: Option<Secret>,
    pub models: Vec<String>,
    /// Client model name → upstream model name.
    #[serde(default)]
    pub model_map: BTreeMap<String, String>,
    /// Lower is tried first.
    #[serde(default)]
    pub priority: i32,
    /// Share among channels of the same priority.
    #[serde(default = "one")]
    pub weight: u32,
    /// Attempts on this channel before moving on.
    #[serde(default = "one")]
    pub retry: u32,
    /// User groups allowed; empty = all.
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Time limits of calls to this channel; unset fields take the workers' defaults.
    #[serde(default)]
    pub timeouts: ChannelTimeouts,
}

/// `timeouts:` of a channel, in whole seconds; `None` = the workers' default. Stored as
/// JSON in the `channels.timeouts` column.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelTimeouts {
    /// Establishing the TCP (and TLS) connection (default 10 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_secs: Option<u64>,
    /// From sending the request to the first generated token of a stream (default 120 s:
    /// reasoning models think in silence).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_token_secs: Option<u64>,
    /// Longest silence between two chunks of a stream (default 60 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_secs: Option<u64>,
    /// One attempt from start to end (default 300 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_secs: Option<u64>,
}

impl ChannelTimeouts {
    /// The name of the first field set to an unusable value (0, or more than a day).
    pub fn invalid_field(&self) -> Option<&'static str> {
        [
            ("connect_secs", self.connect_secs),
            ("first_token_secs", self.first_token_secs),
            ("idle_secs", self.idle_secs),
            ("total_secs", self.total_secs),
        ]
        .into_iter()
        .find(|(_, v)| v.is_some_and(|s| s == 0 || s > 86_400))
        .map(|(name, _)| name)
    }
}

fn one() -> u32 {
    1
}
fn yes() -> bool {
    true
}

/// A price row: USD per million tokens, as decimal strings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceConfig {
    pub model: String,
    pub input_per_mtok: String,
    pub output_per_mtok: String,
    #[serde(default)]
    pub cached_input_per_mtok: Option<String>,
    #[serde(default)]
    pub per_request: Option<String>,
}

impl PriceConfig {
    pub fn to_price(&self) -> Result<Price, MoneyError> {
        Ok(Price {
            input_per_mtok: non_negative(&self.input_per_mtok)?,
            output_per_mtok: non_negative(&self.output_per_mtok)?,
            cached_input_per_mtok: self
                .cached_input_per_mtok
                .as_deref()
                .map(non_negative)
                .transpose()?,
            per_request: self
                .per_request
                .as_deref()
                .map(non_negative)
                .transpose()?
                .unwrap_or(Nanos::ZERO),
        })
    }
}

fn non_negative(s: &str) -> Result<Nanos, MoneyError> {
    let n = Nanos::from_usd_str(s)?;
    if n.0 < 0 {
        return Err(MoneyError::Negative(s.to_owned()));
    }
    Ok(n)
}

/// A plan: `quota` is USD per calendar month (UTC) as a decimal string; `models` the
/// models it pays for (empty = every model); `public` whether users may pick it themselves.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanConfig {
    pub name: String,
    pub quota: String,
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub public: bool,
}

impl PlanConfig {
    pub fn monthly_quota(&self) -> Result<Nanos, MoneyError> {
        non_negative(&self.quota)
    }
}

/// A bootstrap API key (stored hashed).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    pub name: String,
    pub key: Secret,
    #[serde(default = "default_group")]
    pub group: String,
    /// USD; unset = unlimited.
    #[serde(default)]
    pub quota: Option<String>,
    /// Requests per minute; unset = unlimited.
    #[serde(default)]
    pub rpm: Option<u32>,
}

fn default_group() -> String {
    "default".to_owned()
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("`{path}`: {message}")]
    Invalid { path: String, message: String },
    #[error("`${{{0}}}` is used in the config but the environment variable is not set")]
    MissingEnv(String),
}

/// Replaces `${VAR}` and `${VAR:-default}` using `lookup`. A missing variable without a
/// default is an error, so a forgotten key never becomes an empty string silently.
pub fn substitute_env(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let expr = &after[..end];
        let (name, default) = match expr.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (expr, None),
        };
        match (lookup(name), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => return Err(ConfigError::MissingEnv(name.to_owned())),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

impl FileConfig {
    /// Parses YAML after `${VAR}` substitution; errors name the field path.
    pub fn parse(
        text: &str,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<FileConfig, ConfigError> {
        let text = substitute_env(text, lookup)?;
        if text.trim().is_empty() {
            return Ok(FileConfig::default());
        }
        let de = serde_yaml::Deserializer::from_str(&text);
        let cfg: FileConfig =
            serde_path_to_error::deserialize(de).map_err(|e| ConfigError::Invalid {
                path: e.path().to_string(),
                message: e.inner().to_string(),
            })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |path: String, message: String| Err(ConfigError::Invalid { path, message });
        let mut names = std::collections::HashSet::new();
        for (i, c) in self.channels.iter().enumerate() {
            if c.name.trim().is_empty() {
                return bad(format!("channels[{i}].name"), "must not be empty".into());
            }
            if !names.insert(c.name.as_str()) {
                return bad(
                    format!("channels[{i}].name"),
                    format!("duplicate channel name `{}`", c.name),
                );
            }
            if c.models.is_empty() {
                return bad(
                    format!("channels[{i}].models"),
                    "list at least one model".into(),
                );
            }
            if c.weight == 0 {
                return bad(format!("channels[{i}].weight"), "must be at least 1".into());
            }
            if c.retry == 0 {
                return bad(format!("channels[{i}].retry"), "must be at least 1".into());
            }
            if let Some(field) = c.timeouts.invalid_field() {
                return bad(
                    format!("channels[{i}].timeouts.{field}"),
                    "must be between 1 and 86400 seconds".into(),
                );
            }
            for from in c.model_map.keys() {
                if !c.models.contains(from) {
                    return bad(
                        format!("channels[{i}].model_map.{from}"),
                        format!("`{from}` is not in this channel's `models`"),
                    );
                }
            }
        }
        for (i, p) in self.prices.iter().enumerate() {
            if let Err(e) = p.to_price() {
                return bad(format!("prices[{i}]"), e.to_string());
            }
        }
        let mut plan_names = std::collections::HashSet::new();
        for (i, p) in self.plans.iter().enumerate() {
            if p.name.trim().is_empty() {
                return bad(format!("plans[{i}].name"), "must not be empty".into());
            }
            if !plan_names.insert(p.name.trim().to_lowercase()) {
                return bad(
                    format!("plans[{i}].name"),
                    format!("duplicate plan name `{}`", p.name),
                );
            }
            if let Err(e) = p.monthly_quota() {
                return bad(format!("plans[{i}].quota"), e.to_string());
            }
        }
        for (i, k) in self.keys.iter().enumerate() {
            if k.key.expose().len() < 16 {
                return bad(
                    format!("keys[{i}].key"),
                    "must be at least 16 characters".into(),
                );
            }
            if let Some(q) = &k.quota {
                if let Err(e) = non_negative(q) {
                    return bad(format!("keys[{i}].quota"), e.to_string());
                }
            }
        }
        Ok(())
    }
}

/// `node.yaml`, the configuration of a remote worker node (`sluice node --config FILE`):
/// where the gateway's NATS is, what the node is called, how many calls it takes at once,
/// and the local providers whose models it serves under which names.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The gateway's NATS (`nats://user:pass@host:4222`, `tls://host:4222`, or a leaf
    /// node's local URL); `SLUICE_NATS_URL` overrides it.
    pub nats_url: Option<String>,
    /// A NATS credentials file (`.creds`: JWT and NKey seed) for decentralised auth.
    #[serde(default)]
    pub nats_credentials: Option<String>,
    /// PEM root certificates to trust for a `tls://` NATS URL signed by a private CA.
    #[serde(default)]
    pub nats_ca_file: Option<String>,
    /// Shown in `/api/admin/nodes`, logs and events (as channel `node:<name>`).
    pub name: String,
    /// Calls this node runs at once; more are refused so the worker tries elsewhere.
    #[serde(default = "default_max_parallel")]
    pub max_parallel: u32,
    /// `SLUICE_NAMESPACE` overrides it; default `sluice`.
    pub namespace: Option<String>,
    /// Routing priority of the node's channel (lower is tried first), as for channels.
    #[serde(default)]
    pub priority: i32,
    pub providers: Vec<NodeProviderConfig>,
}

/// One local provider of a node: like a channel (`type`, `base_url`, `api_key`), with the
/// models it serves.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeProviderConfig {
    #[serde(rename = "type")]
    pub provider_type: String,
    #[serde(default)]
    pub base_url: Option<String>,
    #[serde(default)]
    pub api_key: Option<Secret>,
    pub models: Vec<NodeModelConfig>,
    /// Time limits of calls to this provider; unset fields take the defaults.
    #[serde(default)]
    pub timeouts: ChannelTimeouts,
}

/// A model of a node's provider: `local` is the provider's name for it, `serve_as` the
/// name clients ask for (default: the same).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeModelConfig {
    pub local: String,
    #[serde(default)]
    pub serve_as: Option<String>,
}

impl NodeModelConfig {
    /// The name clients ask for.
    pub fn served(&self) -> &str {
        self.serve_as.as_deref().unwrap_or(&self.local)
    }
}

fn default_max_parallel() -> u32 {
    4
}

/// The most calls one node may announce; beyond it is surely a typo.
pub const NODE_MAX_PARALLEL: u32 = 10_000;

impl NodeConfig {
    /// Parses `node.yaml` after `${VAR}` substitution; errors name the field path.
    pub fn parse(
        text: &str,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<NodeConfig, ConfigError> {
        let text = substitute_env(text, lookup)?;
        let de = serde_yaml::Deserializer::from_str(&text);
        let cfg: NodeConfig =
            serde_path_to_error::deserialize(de).map_err(|e| ConfigError::Invalid {
                path: e.path().to_string(),
                message: e.inner().to_string(),
            })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |path: String, message: &str| {
            Err(ConfigError::Invalid {
                path,
                message: message.to_owned(),
            })
        };
        let name = self.name.trim();
        if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
            return bad("name".into(), "use 1-64 printable characters");
        }
        if self.max_parallel == 0 || self.max_parallel > NODE_MAX_PARALLEL {
            return bad("max_parallel".into(), "must be between 1 and 10000");
        }
        if self.providers.is_empty() {
            return bad("providers".into(), "list at least one provider");
        }
        let mut served = std::collections::HashSet::new();
        for (i, p) in self.providers.iter().enumerate() {
            if p.provider_type == "node" {
                return bad(
                    format!("providers[{i}].type"),
                    "a node's provider cannot itself be a node",
                );
            }
            if p.models.is_empty() {
                return bad(format!("providers[{i}].models"), "list at least one model");
            }
            if let Some(field) = p.timeouts.invalid_field() {
                return bad(
                    format!("providers[{i}].timeouts.{field}"),
                    "must be between 1 and 86400 seconds",
                );
            }
            for (j, m) in p.models.iter().enumerate() {
                if m.local.trim().is_empty() || m.served().trim().is_empty() {
                    return bad(
                        format!("providers[{i}].models[{j}]"),
                        "`local` and `serve_as` must not be empty",
                    );
                }
                if !served.insert(m.served()) {
                    return bad(
                        format!("providers[{i}].models[{j}].serve_as"),
                        "another model of this node is already served under this name",
                    );
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod node_tests {
    use super::*;

    const NODE: &str = r#"
nats_url: nats://gateway:4222
name: gpu-box-1
max_parallel: 8
providers:
  - type: ollama
    base_url: http://127.0.0.1:11434/v1
    models:
      - {local: "llama3.1:8b", serve_as: llama-3.1-8b}
      - {local: qwen2.5}
  - type: openai
    api_key: ${KEY}
    models: [{local: gpt-4o-mini}]
"#;

    #[test]
    fn parses_a_node_config() {
        let cfg =
            NodeConfig::parse(NODE, |k| (k == "KEY").then(|| "sk-x".to_owned())).expect("parse");
        assert_eq!(cfg.name, "gpu-box-1");
        assert_eq!(cfg.max_parallel, 8);
        assert_eq!(cfg.priority, 0);
        assert_eq!(cfg.providers[0].models[0].served(), "llama-3.1-8b");
        assert_eq!(cfg.providers[0].models[1].served(), "qwen2.5");
        assert!(!format!("{cfg:?}").contains("sk-x"));
        let defaults = NodeConfig::parse(
            "name: n\nproviders: [{type: vllm, models: [{local: m}]}]\n",
            |_| None,
        )
        .expect("defaults");
        assert_eq!((defaults.max_parallel, defaults.nats_url), (4, None));
    }

    #[test]
    fn rejects_bad_node_configs() {
        let cases = [
            ("name: ''\nproviders: [{type: vllm, models: [{local: m}]}]\n", "name"),
            ("name: n\nmax_parallel: 0\nproviders: [{type: vllm, models: [{local: m}]}]\n", "max_parallel"),
            ("name: n\nproviders: []\n", "providers"),
            ("name: n\nproviders: [{type: node, models: [{local: m}]}]\n", "providers[0].type"),
            (
                "name: n\nproviders: [{type: vllm, models: [{local: a, serve_as: x}, {local: b, serve_as: x}]}]\n",
                "providers[0].models[1].serve_as",
            ),
            ("name: n\nproviders: [{type: vllm, models: [{locl: m}]}]\n", "providers[0].models[0]"),
        ];
        for (yaml, path) in cases {
            let err = NodeConfig::parse(yaml, |_| None).expect_err(yaml);
            assert!(err.to_string().contains(path), "{yaml}: {err}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
channels:
  - name: openai-main
    type: openai
    base_url: https://api.openai.com/v1
    api_key: ${OPENAI_API_KEY}
    models: [gpt-4o, gpt-4o-mini]
    model_map: {gpt-4o-mini: gpt-4o-mini-2024-07-18}
    priority: 1
    weight: 5
    retry: 2
    groups: []
prices:
  - {model: gpt-4o-mini, input_per_mtok: "0.15", output_per_mtok: "0.60"}
keys:
  - {name: demo, key: "sk-demo-0123456789abcdef", group: default, quota: "5.00", rpm: 600}
"#;

    #[test]
    fn parses_the_documented_example() {
        let cfg = FileConfig::parse(SAMPLE, |k| {
            (k == "OPENAI_API_KEY").then(|| "sk-live".to_owned())
        })
        .expect("parse");
        assert_eq!(
            cfg.channels[0].api_key.as_ref().map(Secret::expose),
            Some("sk-live")
        );
        assert_eq!(cfg.channels[0].retry, 2);
        assert_eq!(
            cfg.prices[0].to_price().expect("price").output_per_mtok,
            Nanos(600_000_000)
        );
        assert_eq!(cfg.keys[0].rpm, Some(600));
        assert!(!format!("{cfg:?}").contains("sk-live"));
    }

    #[test]
    fn plans_parse_and_validate() {
        let cfg = FileConfig::parse(
            "plans:\n  - {name: pro, quota: \"20.00\", models: [gpt-4o-mini]}\n  - {name: free, quota: \"0.5\", public: true}\n",
            |_| None,
        )
        .expect("parse");
        assert_eq!(cfg.plans[0].monthly_quota(), Ok(Nanos(20_000_000_000)));
        assert_eq!(cfg.plans[0].models, ["gpt-4o-mini"]);
        assert!(!cfg.plans[0].public && cfg.plans[1].public && cfg.plans[1].models.is_empty());
        for (yaml, path) in [
            ("plans:\n  - {name: a, quota: \"-1\"}\n", "plans[0].quota"),
            (
                "plans:\n  - {name: a, quota: \"1\"}\n  - {name: A, quota: \"2\"}\n",
                "plans[1].name",
            ),
            (
                "plans:\n  - {name: a, quota: \"1\", modles: []}\n",
                "plans[0]",
            ),
        ] {
            let err = FileConfig::parse(yaml, |_| None).expect_err(yaml);
            assert!(err.to_string().contains(path), "{err}");
        }
    }

    #[test]
    fn errors_name_the_path() {
        let err = FileConfig::parse(SAMPLE, |_| None).expect_err("missing env");
        assert!(err.to_string().contains("OPENAI_API_KEY"), "{err}");
        let err = FileConfig::parse(
            "channels:\n  - {name: a, type: openai, models: [m], wieght: 2}\n",
            |_| None,
        )
        .expect_err("typo");
        assert!(err.to_string().contains("channels[0]"), "{err}");
        let err = FileConfig::parse(
            "prices:\n  - {model: m, input_per_mtok: x, output_per_mtok: '1'}\n",
            |_| None,
        )
        .expect_err("bad price");
        assert!(err.to_string().contains("prices[0]"), "{err}");
    }

    #[test]
    fn channel_timeouts_parse_and_validate() {
        let cfg = FileConfig::parse(
            "channels:\n  - {name: a, type: openai, models: [m], timeouts: {idle_secs: 5, total_secs: 30}}\n",
            |_| None,
        )
        .expect("parse");
        let t = cfg.channels[0].timeouts;
        assert_eq!(
            (t.idle_secs, t.total_secs, t.connect_secs),
            (Some(5), Some(30), None)
        );
        assert_eq!(
            serde_json::to_string(&t).expect("json"),
            r#"{"idle_secs":5,"total_secs":30}"#
        );
        let err = FileConfig::parse(
            "channels:\n  - {name: a, type: openai, models: [m], timeouts: {idle_secs: 0}}\n",
            |_| None,
        )
        .expect_err("zero");
        assert!(
            err.to_string().contains("channels[0].timeouts.idle_secs"),
            "{err}"
        );
        let err = FileConfig::parse(
            "channels:\n  - {name: a, type: openai, models: [m], timeouts: {idle: 3}}\n",
            |_| None,
        )
        .expect_err("typo");
        assert!(err.to_string().contains("channels[0]"), "{err}");
    }

    #[test]
    fn substitutes_defaults() {
        assert_eq!(
            substitute_env("a ${X:-b} c", |_| None).expect("ok"),
            "a b c"
        );
    }
}
