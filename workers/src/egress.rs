//! Where personal channels may send requests.
//!
//! A personal channel's `base_url` is chosen by a user (`/api/channels`), and the gateway
//! calls it from inside the deployment: pointed at `127.0.0.1:5432`, `10.0.0.7`, or the
//! cloud metadata address `169.254.169.254`, it would be a server-side request forgery.
//! So a personal channel may only call public addresses, unless the operator allows
//! private ones with [`ALLOW_PRIVATE_ENV`] (a self-hosted deployment whose users run
//! Ollama on the LAN, or tests on a local mock upstream). Shared channels (admin API,
//! `sluice.yaml`) and remote nodes are the operator's own and are never restricted.
//!
//! Checked twice:
//! - **When the channel is created or its `base_url` changed** ([`check_base_url`]): the
//!   host is resolved and every address it resolves to must be public, so the user gets a
//!   400 naming `base_url` at once.
//! - **At every call** (through [`crate::adapters::Adapter::for_channel`], for the workers
//!   and the ingress' `/test` alike): a literal IP in the URL is checked without I/O, and
//!   host names are resolved by the client of [`public_client`], whose resolver drops
//!   non-public addresses. DNS can change after creation (rebinding); resolving in the
//!   connecting client leaves no window between check and connect. That client follows no
//!   redirects (a redirect to a literal private IP would bypass its resolver).
//!
//! Not restricted: a system HTTP(S) proxy (`HTTPS_PROXY`), when the operator sets one,
//! resolves the channel's host itself.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use router::Channel;

/// `true` lets personal channels call loopback, private and link-local addresses.
pub const ALLOW_PRIVATE_ENV: &str = "SLUICE_PERSONAL_CHANNELS_ALLOW_PRIVATE";

/// How long creating a channel waits for its host to resolve.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Connect timeout of [`public_client`] (the workers' default; personal channels have no
/// `timeouts:` of their own).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressError {
    #[error("`base_url` is not a valid http(s) URL with a host")]
    InvalidUrl,
    #[error("`base_url` points at {ip}, {what}; personal channels may only call public addresses (the operator can allow private ones with {ALLOW_PRIVATE_ENV}=true)")]
    NotPublic { ip: IpAddr, what: &'static str },
    #[error("`base_url` host `{host}` resolves to {ip}, {what}; personal channels may only call public addresses (the operator can allow private ones with {ALLOW_PRIVATE_ENV}=true)")]
    ResolvesNotPublic {
        host: String,
        ip: IpAddr,
        what: &'static str,
    },
    #[error("`base_url` host `{host}` does not resolve: {message}")]
    Unresolvable { host: String, message: String },
    #[error("cannot build the HTTP client for personal channels: {0}")]
    Client(String),
}

/// Whether `value` of [`ALLOW_PRIVATE_ENV`] allows private addresses: `true`/`1`/`yes`/`on`.
/// Anything else but unset, empty and `false`/`0`/`no`/`off` is ignored with a warning.
pub fn allow_private_from(value: Option<&str>) -> bool {
    let Some(v) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return false;
    };
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => true,
        "false" | "0" | "no" | "off" => false,
        _ => {
            tracing::warn!(setting = ALLOW_PRIVATE_ENV, value = %v, "not a boolean; personal channels stay restricted to public addresses");
            false
        }
    }
}

/// [`ALLOW_PRIVATE_ENV`] of this process, read once.
pub fn allow_private() -> bool {
    static ALLOW: OnceLock<bool> = OnceLock::new();
    *ALLOW.get_or_init(|| allow_private_from(std::env::var(ALLOW_PRIVATE_ENV).ok().as_deref()))
}

/// Whether calls to `channel` are restricted to public addresses in this process.
pub fn restricted(channel: &Channel) -> bool {
    channel.owner.is_some() && !allow_private()
}

/// Why `ip` is not public, or `None` when it is.
pub fn not_public(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => not_public_v4(v4),
        IpAddr::V6(v6) => not_public_v6(v6),
    }
}

fn not_public_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    if ip.is_unspecified() || a == 0 {
        Some("an unspecified address")
    } else if ip.is_loopback() {
        Some("a loopback address")
    } else if ip.is_private() {
        Some("a private address")
    } else if ip.is_link_local() {
        Some("a link-local address")
    } else if a == 100 && (64..128).contains(&b) {
        // 100.64.0.0/10, carrier-grade NAT; some clouds serve metadata here.
        Some("a shared (carrier-grade NAT) address")
    } else if ip.is_multicast() || a >= 240 {
        Some("a multicast, reserved or broadcast address")
    } else {
        None
    }
}

fn not_public_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    // An IPv4 address carried in IPv6 (mapped ::ffff:a.b.c.d, compatible ::a.b.c.d, NAT64
    // 64:ff9b::/96) is judged as that IPv4 address.
    let embedded = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    if ip.is_unspecified() {
        Some("an unspecified address")
    } else if ip.is_loopback() {
        Some("a loopback address")
    } else if let Some(v4) = ip.to_ipv4_mapped() {
        not_public_v4(v4)
    } else if s[..6] == [0; 6] || (s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0; 4]) {
        not_public_v4(embedded(s[6], s[7]))
    } else if s[0] == 0x2002 {
        // 6to4: the IPv4 address is in the second and third segments.
        not_public_v4(embedded(s[1], s[2]))
    } else if s[0] & 0xfe00 == 0xfc00 {
        Some("a private (unique local) address")
    } else if s[0] & 0xffc0 == 0xfe80 {
        Some("a link-local address")
    } else if s[0] & 0xffc0 == 0xfec0 {
        Some("a site-local address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else {
        None
    }
}

/// The URL a channel of `channel_type` calls when its `base_url` is `base_url`: the
/// preset's default when it has none (`ollama` and `vllm` default to loopback).
pub fn effective_base_url<'a>(channel_type: &str, base_url: Option<&'a str>) -> Option<&'a str> {
    let set = base_url.filter(|b| !b.is_empty());
    match channel_type {
        crate::adapters::anthropic::PROVIDER_TYPE => {
            set.or(Some(crate::adapters::anthropic::DEFAULT_BASE_URL))
        }
        crate::adapters::gemini::PROVIDER_TYPE => {
            set.or(Some(crate::adapters::gemini::DEFAULT_BASE_URL))
        }
        other => set.or_else(|| {
            crate::adapters::presets::find(other)
                .map(|p| p.base_url)
                .filter(|b| !b.is_empty())
        }),
    }
}

/// The host and port of an http(s) URL, and its IP when the host is a literal one.
fn host_of(url: &str) -> Result<(String, u16, Option<IpAddr>), EgressError> {
    let parsed = reqwest::Url::parse(url).map_err(|_| EgressError::InvalidUrl)?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(EgressError::InvalidUrl);
    }
    let host = parsed
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or(EgressError::InvalidUrl)?;
    let port = parsed
        .port_or_known_default()
        .ok_or(EgressError::InvalidUrl)?;
    // The URL parser normalises IPv4 forms (`2130706433`, `0x7f.1`) to dotted quads and
    // keeps IPv6 in brackets.
    let ip = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .ok();
    Ok((host.to_owned(), port, ip))
}

/// The check without I/O: the URL parses and, when its host is a literal IP, that IP is
/// public. Host names are left to the resolver ([`check_base_url`], [`public_client`]).
pub fn check_literal(url: &str) -> Result<(), EgressError> {
    let (_, _, ip) = host_of(url)?;
    match ip.and_then(|ip| not_public(ip).map(|what| (ip, what))) {
        Some((ip, what)) => Err(EgressError::NotPublic { ip, what }),
        None => Ok(()),
    }
}

/// The check at creation: the URL's host, literal or resolved (within
/// [`RESOLVE_TIMEOUT`]), is public, every address of it.
pub async fn check_base_url(url: &str) -> Result<(), EgressError> {
    check_base_url_with(url, |host, port| async move {
        tokio::net::lookup_host((host.as_str(), port))
            .await
            .map(Iterator::collect)
    })
    .await
}

/// [`check_base_url`] with the resolver given (tests).
pub async fn check_base_url_with<F, Fut>(url: &str, resolve: F) -> Result<(), EgressError>
where
    F: FnOnce(String, u16) -> Fut,
    Fut: Future<Output = std::io::Result<Vec<SocketAddr>>>,
{
    let (host, port, ip) = host_of(url)?;
    if ip.is_some() {
        return check_literal(url);
    }
    let unresolvable = |message: String| EgressError::Unresolvable {
        host: host.clone(),
        message,
    };
    let addrs = match tokio::time::timeout(RESOLVE_TIMEOUT, resolve(host.clone(), port)).await {
        Ok(Ok(addrs)) => addrs,
        Ok(Err(e)) => return Err(unresolvable(e.to_string())),
        Err(_) => {
            return Err(unresolvable(format!(
                "no answer within {RESOLVE_TIMEOUT:?}"
            )))
        }
    };
    if addrs.is_empty() {
        return Err(unresolvable("no addresses".to_owned()));
    }
    for addr in addrs {
        if let Some(what) = not_public(addr.ip()) {
            return Err(EgressError::ResolvesNotPublic {
                host,
                ip: addr.ip(),
                what,
            });
        }
    }
    Ok(())
}

/// Resolves like the system resolver, then keeps only public addresses; a name with none
/// left fails to resolve, so the connection is never attempted.
#[derive(Debug, Default)]
struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> = all
                .iter()
                .copied()
                .filter(|a| not_public(a.ip()).is_none())
                .collect();
            if public.is_empty() {
                let refused = all.first().map_or_else(
                    || EgressError::Unresolvable {
                        host: host.clone(),
                        message: "no addresses".to_owned(),
                    },
                    |a| EgressError::ResolvesNotPublic {
                        host: host.clone(),
                        ip: a.ip(),
                        what: not_public(a.ip()).unwrap_or("not public"),
                    },
                );
                tracing::warn!(error = %refused, "a personal channel's call refused");
                return Err(refused.into());
            }
            let addrs: reqwest::dns::Addrs = Box::new(public.into_iter());
            Ok(addrs)
        })
    }
}

/// The client of restricted personal channels: the workers' client settings, a resolver
/// that drops non-public addresses, and no redirects. Built once per process.
pub fn public_client() -> Result<reqwest::Client, EgressError> {
    static CLIENT: OnceLock<Result<reqwest::Client, String>> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            reqwest::Client::builder()
                .tcp_nodelay(true)
                .connect_timeout(CONNECT_TIMEOUT)
                .pool_idle_timeout(Duration::from_secs(90))
                .tcp_keepalive(Duration::from_secs(30))
                .dns_resolver(Arc::new(PublicOnly))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(EgressError::Client)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn non_public_addresses_are_named() {
        for (addr, what) in [
            ("127.0.0.1", "a loopback address"),
            ("127.1.2.3", "a loopback address"),
            ("10.0.0.7", "a private address"),
            ("172.16.0.1", "a private address"),
            ("192.168.1.1", "a private address"),
            ("169.254.169.254", "a link-local address"),
            ("0.0.0.0", "an unspecified address"),
            ("0.1.2.3", "an unspecified address"),
            ("100.100.100.200", "a shared (carrier-grade NAT) address"),
            (
                "255.255.255.255",
                "a multicast, reserved or broadcast address",
            ),
            ("::1", "a loopback address"),
            ("::", "an unspecified address"),
            ("::ffff:127.0.0.1", "a loopback address"),
            ("::ffff:169.254.169.254", "a link-local address"),
            ("::10.0.0.1", "a private address"),
            ("64:ff9b::a9fe:a9fe", "a link-local address"),
            ("2002:7f00:1::", "a loopback address"),
            ("fd00::1", "a private (unique local) address"),
            ("fe80::1", "a link-local address"),
            ("ff02::1", "a multicast address"),
        ] {
            assert_eq!(not_public(ip(addr)), Some(what), "{addr}");
        }
        for addr in [
            "8.8.8.8",
            "1.1.1.1",
            "100.128.0.1",
            "172.32.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert_eq!(not_public(ip(addr)), None, "{addr}");
        }
    }

    #[test]
    fn literal_hosts_are_checked_without_io_in_every_spelling() {
        for url in [
            "http://127.0.0.1:5432/v1",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]:8080/v1",
            "http://[::ffff:7f00:1]/v1",
            "http://2130706433/v1",
            "http://0x7f.1/v1",
            "http://0.0.0.0:11434/v1",
        ] {
            assert!(
                matches!(check_literal(url), Err(EgressError::NotPublic { .. })),
                "{url}"
            );
        }
        assert_eq!(check_literal("https://8.8.8.8/v1"), Ok(()));
        assert_eq!(check_literal("https://api.openai.com/v1"), Ok(()));
        assert_eq!(
            check_literal("ftp://1.1.1.1/"),
            Err(EgressError::InvalidUrl)
        );
        assert_eq!(check_literal("not a url"), Err(EgressError::InvalidUrl));
    }

    #[test]
    fn presets_that_default_to_loopback_are_checked_by_their_default() {
        assert_eq!(
            effective_base_url("ollama", None),
            Some("http://127.0.0.1:11434/v1")
        );
        assert_eq!(
            effective_base_url("ollama", Some("")),
            Some("http://127.0.0.1:11434/v1")
        );
        assert_eq!(
            effective_base_url("openai", Some("https://x.example/v1")),
            Some("https://x.example/v1")
        );
        assert_eq!(
            effective_base_url("anthropic", None),
            Some("https://api.anthropic.com")
        );
        assert_eq!(effective_base_url("mock", None), None);
    }

    #[test]
    fn the_switch_is_a_boolean() {
        for (v, allow) in [
            (None, false),
            (Some(""), false),
            (Some("true"), true),
            (Some(" TRUE "), true),
            (Some("1"), true),
            (Some("on"), true),
            (Some("false"), false),
            (Some("0"), false),
            (Some("maybe"), false),
        ] {
            assert_eq!(allow_private_from(v), allow, "{v:?}");
        }
    }

    #[tokio::test]
    async fn a_host_is_refused_when_any_of_its_addresses_is_not_public() {
        let resolves_to = |addrs: &'static [&'static str]| {
            move |_host: String, port: u16| async move {
                Ok(addrs
                    .iter()
                    .map(|a| SocketAddr::new(a.parse().unwrap(), port))
                    .collect())
            }
        };
        let url = "https://llm.example.com/v1";
        assert_eq!(
            check_base_url_with(url, resolves_to(&["93.184.216.34"])).await,
            Ok(())
        );
        let err = check_base_url_with(url, resolves_to(&["93.184.216.34", "10.1.2.3"]))
            .await
            .unwrap_err();
        assert_eq!(
            err,
            EgressError::ResolvesNotPublic {
                host: "llm.example.com".to_owned(),
                ip: ip("10.1.2.3"),
                what: "a private address"
            }
        );
        assert!(err.to_string().contains(ALLOW_PRIVATE_ENV));
        assert!(matches!(
            check_base_url_with(url, |_, _| async { Err(std::io::Error::other("NXDOMAIN")) }).await,
            Err(EgressError::Unresolvable { .. })
        ));
        // Literal hosts never reach the resolver.
        assert!(matches!(
            check_base_url_with("http://127.0.0.1:9/v1", |_, _| async {
                Err(std::io::Error::other("a literal IP is not resolved"))
            })
            .await,
            Err(EgressError::NotPublic { .. })
        ));
    }

    #[tokio::test]
    async fn the_public_client_refuses_names_that_resolve_to_private_addresses() {
        // `localhost` resolves to loopback only: the connection is never attempted.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let err = public_client()
            .unwrap()
            .get(format!("http://localhost:{port}/"))
            .send()
            .await
            .unwrap_err();
        assert!(err.is_connect(), "{err:?}");
        let chain = format!("{err:?}");
        assert!(chain.contains("loopback"), "{chain}");
    }
}
