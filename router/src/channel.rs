//! One upstream channel as the router sees it: what it serves, to whom, and how it ranks.

use std::collections::BTreeMap;

use uuid::Uuid;

/// An upstream the workers can call. Built by the worker from the `channels` table (or by
/// tests directly); immutable once built, shared as `Arc<Channel>` by every request.
#[derive(Clone, PartialEq, Eq)]
pub struct Channel {
    pub id: Uuid,
    /// Unique and human-chosen; what logs and events name.
    pub name: String,
    /// Picks the adapter (`openai`, `mock`, later `anthropic`, `node`, ...).
    pub channel_type: String,
    /// Provider base URL as its own SDK takes it; `None` means the provider's default.
    pub base_url: Option<String>,
    /// Already decrypted. Never printed: `Debug` redacts it.
    pub api_key: Option<String>,
    /// Model names clients ask for.
    pub models: Vec<String>,
    /// Client model name → upstream model name, for models this provider names differently.
    pub model_map: BTreeMap<String, String>,
    /// Lower is tried first; channels of one priority form a tier.
    pub priority: i32,
    /// Share of first picks within the tier.
    pub weight: u32,
    /// Consecutive attempts on this channel before moving on.
    pub retry: u32,
    /// User groups allowed; empty means every group.
    pub groups: Vec<String>,
    pub enabled: bool,
    /// Time limits of calls to this channel (unset = the workers' defaults).
    pub timeouts: schemas::config::ChannelTimeouts,
    /// The user whose personal channel this is (bring your own key): it serves only that
    /// user's requests, ahead of every shared channel. `None` = shared.
    pub owner: Option<Uuid>,
}

impl Channel {
    /// Whether this channel lists `model` and admits callers of `group`. Whether it is
    /// enabled is a separate question ([`Channel::enabled`]), answered by the policy.
    pub fn serves(&self, model: &str, group: &str) -> bool {
        self.models.iter().any(|m| m == model) && self.admits(group)
    }

    /// Whether callers of `group` may use this channel.
    #[inline]
    pub fn admits(&self, group: &str) -> bool {
        self.groups.is_empty() || self.groups.iter().any(|g| g == group)
    }

    /// The name to send upstream for the client's `model`.
    pub fn upstream_model<'a>(&'a self, model: &'a str) -> &'a str {
        self.model_map.get(model).map_or(model, String::as_str)
    }
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("channel_type", &self.channel_type)
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "***"))
            .field("models", &self.models)
            .field("model_map", &self.model_map)
            .field("priority", &self.priority)
            .field("weight", &self.weight)
            .field("retry", &self.retry)
            .field("groups", &self.groups)
            .field("enabled", &self.enabled)
            .field("timeouts", &self.timeouts)
            .field("owner", &self.owner)
            .finish()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A channel with test defaults: serves `models`, all groups, weight 1, retry 1.
    pub(crate) fn channel(name: &str, models: &[&str]) -> Channel {
        Channel {
            id: Uuid::now_v7(),
            name: name.to_owned(),
            channel_type: "mock".to_owned(),
            base_url: None,
            api_key: Some("sk-secret-value".to_owned()),
            models: models.iter().map(|m| (*m).to_owned()).collect(),
            model_map: BTreeMap::new(),
            priority: 0,
            weight: 1,
            retry: 1,
            groups: Vec::new(),
            enabled: true,
            timeouts: Default::default(),
            owner: None,
        }
    }

    #[test]
    fn serves_checks_model_and_group() {
        let mut c = channel("a", &["gpt-4o", "gpt-4o-mini"]);
        assert!(c.serves("gpt-4o", "anyone"));
        assert!(!c.serves("gpt-5", "anyone"));
        c.groups = vec!["vip".to_owned()];
        assert!(c.serves("gpt-4o", "vip"));
        assert!(!c.serves("gpt-4o", "default"));
    }

    #[test]
    fn upstream_model_follows_the_map() {
        let mut c = channel("a", &["gpt-4o", "gpt-4o-mini"]);
        c.model_map.insert(
            "gpt-4o-mini".to_owned(),
            "gpt-4o-mini-2024-07-18".to_owned(),
        );
        assert_eq!(c.upstream_model("gpt-4o-mini"), "gpt-4o-mini-2024-07-18");
        assert_eq!(c.upstream_model("gpt-4o"), "gpt-4o");
    }

    #[test]
    fn debug_hides_the_key() {
        let c = channel("a", &["m"]);
        let shown = format!("{c:?}");
        assert!(!shown.contains("sk-secret-value"), "{shown}");
        assert!(shown.contains("***"));
    }
}
