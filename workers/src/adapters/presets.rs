//! OpenAI-compatible providers as data: a preset is a channel `type`, a default base URL,
//! how the key is sent, how URLs are built, and the quirks that differ from OpenAI. Adding
//! a provider that speaks OpenAI's chat completions is one entry in [`PRESETS`].

/// How the channel's key is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// `Authorization: Bearer <key>` (sent only when the channel has a key).
    Bearer,
    /// The key in a header of its own (Azure: `api-key`).
    Header(&'static str),
}

/// How an endpoint's URL is built from the base URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Urls {
    /// `{base}/chat/completions`, `{base}/embeddings`, ...
    OpenAi,
    /// `{base}/openai/deployments/{deployment}/chat/completions?api-version=...`; the
    /// deployment is the upstream model name (the channel's `model_map` sets it), and an
    /// `api-version` query on the base URL overrides [`AZURE_API_VERSION`].
    AzureDeployment,
}

/// Azure OpenAI's GA data-plane API version, used when the base URL names none.
pub const AZURE_API_VERSION: &str = "2024-10-21";

/// What a provider does differently from OpenAI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quirks {
    /// Accepts `stream_options.include_usage`. When false the field is never sent (the
    /// provider rejects it) and usage comes from the provider's last chunk on its own.
    pub stream_options: bool,
    /// Accepts `max_completion_tokens`; when false it is renamed to `max_tokens`.
    pub max_completion_tokens: bool,
    /// Accepts image content parts; when false a request with images is a 400 before
    /// any call, instead of a confusing provider error.
    pub vision: bool,
}

const OPENAI_LIKE: Quirks = Quirks {
    stream_options: true,
    max_completion_tokens: true,
    vision: true,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preset {
    /// The channel `type` that selects it.
    pub name: &'static str,
    /// Used when the channel has no `base_url`; empty = the channel must set one.
    pub base_url: &'static str,
    pub auth: Auth,
    pub urls: Urls,
    pub quirks: Quirks,
}

const fn preset(name: &'static str, base_url: &'static str, quirks: Quirks) -> Preset {
    Preset {
        name,
        base_url,
        auth: Auth::Bearer,
        urls: Urls::OpenAi,
        quirks,
    }
}

/// Every OpenAI-compatible provider Sluice knows. `mock` is the built-in mock upstream.
pub const PRESETS: &[Preset] = &[
    preset("openai", "https://api.openai.com/v1", OPENAI_LIKE),
    preset("mock", "", OPENAI_LIKE),
    Preset {
        name: "azure",
        base_url: "",
        auth: Auth::Header("api-key"),
        urls: Urls::AzureDeployment,
        quirks: OPENAI_LIKE,
    },
    // deepseek-chat and deepseek-reasoner take text only.
    preset(
        "deepseek",
        "https://api.deepseek.com/v1",
        Quirks {
            vision: false,
            ..OPENAI_LIKE
        },
    ),
    preset(
        "qwen",
        "https://dashscope.aliyuncs.com/compatible-mode/v1",
        OPENAI_LIKE,
    ),
    preset("moonshot", "https://api.moonshot.cn/v1", OPENAI_LIKE),
    preset("zhipu", "https://open.bigmodel.cn/api/paas/v4", OPENAI_LIKE),
    preset("groq", "https://api.groq.com/openai/v1", OPENAI_LIKE),
    // Mistral rejects unknown fields (422 `extra_forbidden`) and reports usage by itself.
    preset(
        "mistral",
        "https://api.mistral.ai/v1",
        Quirks {
            stream_options: false,
            max_completion_tokens: false,
            vision: true,
        },
    ),
    preset("xai", "https://api.x.ai/v1", OPENAI_LIKE),
    preset("openrouter", "https://openrouter.ai/api/v1", OPENAI_LIKE),
    preset("siliconflow", "https://api.siliconflow.cn/v1", OPENAI_LIKE),
    preset("ollama", "http://127.0.0.1:11434/v1", OPENAI_LIKE),
    preset("vllm", "http://127.0.0.1:8000/v1", OPENAI_LIKE),
];

pub fn find(channel_type: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.name == channel_type)
}

impl Preset {
    /// The URL of `endpoint` (`chat/completions`, `embeddings`, `images/generations`).
    pub fn url(&self, base_url: Option<&str>, upstream_model: &str, endpoint: &str) -> String {
        let base = base_url.filter(|b| !b.is_empty()).unwrap_or(self.base_url);
        match self.urls {
            Urls::OpenAi => format!("{}/{endpoint}", base.trim_end_matches('/')),
            Urls::AzureDeployment => {
                let (root, query) = base.split_once('?').unwrap_or((base, ""));
                let version = query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("api-version="))
                    .unwrap_or(AZURE_API_VERSION);
                format!(
                    "{}/openai/deployments/{upstream_model}/{endpoint}?api-version={version}",
                    root.trim_end_matches('/')
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_per_style() {
        let openai = find("openai").expect("preset");
        assert_eq!(
            openai.url(None, "gpt-4o", "chat/completions"),
            "https://api.openai.com/v1/chat/completions"
        );
        let azure = find("azure").expect("preset");
        assert_eq!(
            azure.url(Some("https://res.openai.azure.com/"), "my-gpt4o", "chat/completions"),
            "https://res.openai.azure.com/openai/deployments/my-gpt4o/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(
            azure.url(Some("https://res.openai.azure.com?api-version=2025-01-01-preview"), "d", "embeddings"),
            "https://res.openai.azure.com/openai/deployments/d/embeddings?api-version=2025-01-01-preview"
        );
        assert_eq!(
            find("groq")
                .expect("preset")
                .url(None, "m", "chat/completions"),
            "https://api.groq.com/openai/v1/chat/completions"
        );
    }

    #[test]
    fn names_are_unique() {
        for (i, p) in PRESETS.iter().enumerate() {
            assert!(
                PRESETS[i + 1..].iter().all(|q| q.name != p.name),
                "{}",
                p.name
            );
        }
    }
}
