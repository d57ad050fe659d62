//! `sluice node --config node.yaml`: a remote worker node. It needs only the gateway's
//! NATS (credentials or TLS through the URL or `node.yaml`, or a local leaf node), never
//! Postgres or `sluice.yaml`; see `workers::node` for the protocol.

use std::path::PathBuf;

use anyhow::Context as _;
use schemas::config::NodeConfig;
use schemas::Namespace;
use tokio_util::sync::CancellationToken;

use crate::settings::DEFAULT_NATS_URL;

#[derive(clap::Args, Debug)]
pub struct NodeArgs {
    /// The node's configuration (`nats_url`, `name`, `max_parallel`, `providers`).
    #[arg(long, env = "SLUICE_NODE_CONFIG", default_value = "node.yaml")]
    pub config: PathBuf,
}

/// Where the node connects and in which namespace: `node.yaml`, overridden by
/// `SLUICE_NATS_URL` and `SLUICE_NAMESPACE` as for every role.
fn resolve(
    config: &NodeConfig,
    env: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<(String, Namespace)> {
    let pick = |var: &str, from_file: &Option<String>, default: &str| {
        env(var)
            .filter(|v| !v.is_empty())
            .or_else(|| from_file.clone())
            .unwrap_or_else(|| default.to_owned())
    };
    let nats_url = pick("SLUICE_NATS_URL", &config.nats_url, DEFAULT_NATS_URL);
    let ns = pick("SLUICE_NAMESPACE", &config.namespace, "sluice");
    let ns = Namespace::new(&ns).map_err(|e| anyhow::anyhow!("SLUICE_NAMESPACE: {e}"))?;
    Ok((nats_url, ns))
}

pub async fn run(args: NodeArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let path = &args.config;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the node config {}", path.display()))?;
    let config = NodeConfig::parse(&text, |k| std::env::var(k).ok())
        .with_context(|| format!("in {}", path.display()))?;
    let (nats_url, ns) = resolve(&config, |k| std::env::var(k).ok())?;
    let mut options = async_nats::ConnectOptions::new()
        .name(format!("sluice-node-{}", config.name))
        .retry_on_initial_connect()
        .connection_timeout(std::time::Duration::from_secs(5));
    if let Some(creds) = &config.nats_credentials {
        options = options
            .credentials_file(creds)
            .await
            .with_context(|| format!("cannot read the NATS credentials file {creds}"))?;
    }
    if let Some(ca) = &config.nats_ca_file {
        options = options
            .add_root_certificates(PathBuf::from(ca))
            .require_tls(true);
    }
    let client = options
        .connect(&nats_url)
        .await
        .with_context(|| format!("cannot connect to NATS at {nats_url}"))?;
    workers::node::run_node(client, ns, config, shutdown).await?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn the_example_parses() {
        let text = include_str!("../node.example.yaml");
        let config = NodeConfig::parse(text, |_| None).expect("node.example.yaml");
        assert_eq!(config.nats_url.as_deref(), Some("nats://127.0.0.1:4222"));
        assert_eq!(config.providers[0].models[0].served(), "llama-3.1-8b");
    }

    #[test]
    fn env_overrides_the_node_file() {
        let config = NodeConfig::parse(
            "nats_url: nats://gw:4222\nnamespace: fromfile\nname: n\nproviders: [{type: vllm, models: [{local: m}]}]\n",
            |_| None,
        )
        .unwrap();
        let (url, ns) = resolve(&config, |_| None).unwrap();
        assert_eq!((url.as_str(), ns.as_str()), ("nats://gw:4222", "fromfile"));
        let env: HashMap<&str, &str> = HashMap::from([
            ("SLUICE_NATS_URL", "nats://other:4222"),
            ("SLUICE_NAMESPACE", "fromenv"),
        ]);
        let (url, ns) = resolve(&config, |k| env.get(k).map(|v| (*v).to_owned())).unwrap();
        assert_eq!(
            (url.as_str(), ns.as_str()),
            ("nats://other:4222", "fromenv")
        );
        let bad: HashMap<&str, &str> = HashMap::from([("SLUICE_NAMESPACE", "Bad.Name")]);
        assert!(resolve(&config, |k| bad.get(k).map(|v| (*v).to_owned())).is_err());
        let bare = NodeConfig::parse(
            "name: n\nproviders: [{type: vllm, models: [{local: m}]}]\n",
            |_| None,
        )
        .unwrap();
        let (url, ns) = resolve(&bare, |_| None).unwrap();
        assert_eq!((url.as_str(), ns.as_str()), (DEFAULT_NATS_URL, "sluice"));
    }
}
