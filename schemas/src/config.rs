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
    fn substitutes_defaults() {
        assert_eq!(
            substitute_env("a ${X:-b} c", |_| None).expect("ok"),
            "a b c"
        );
    }
}
