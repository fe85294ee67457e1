//! Agent configuration (TOML), validated into [`AgentSettings`].
//!
//! ```toml
//! broker = "wss://maint.example.com:6443/agent"
//! ca = "ca.pem"            # optional: trust this CA instead of the system roots
//! token_file = "agent.token"
//! self_address = "127.0.0.1"
//! remote_access = true
//! services = [22, 443, 3389, 7071, 8443, 9443, 52233]
//! co_located = false
//! [[tunnel]]
//! app = "rdp"              # ssh | rdp | https | tcp
//! ip = "10.0.0.5"
//! port = 3389
//! ```
//!
//! Optional tunables: `dial_timeout_ms`, `window_bytes`,
//! `max_window_bytes`, `max_streams`,
//! `ping_interval_ms`, `dead_after_ms`, `beats_per_ping` (one-way
//! heartbeats per ping on a silent link), `reconnect_min_ms`,
//! `reconnect_max_ms`, `link_notsent_lowat_bytes` (0: kernel default).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Most one-way heartbeats between two pings.
const MAX_BEATS_PER_PING: u32 = 100;

use serde::Deserialize;

use crate::config::{read_toml, ConfigError};
use crate::mux::MuxConfig;
use crate::policy::{Policy, Tunnel};
use crate::secret::Secret;

/// The agent's config file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    pub broker: Option<String>,
    pub ca: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    pub self_address: Option<IpAddr>,
    #[serde(default)]
    pub remote_access: bool,
    #[serde(default)]
    pub services: Vec<u16>,
    #[serde(default)]
    pub co_located: bool,
    #[serde(default, rename = "tunnel")]
    pub tunnels: Vec<Tunnel>,
    pub dial_timeout_ms: Option<u64>,
    pub window_bytes: Option<u32>,
    pub max_window_bytes: Option<u32>,
    pub max_streams: Option<usize>,
    pub ping_interval_ms: Option<u64>,
    pub dead_after_ms: Option<u64>,
    pub beats_per_ping: Option<u32>,
    pub reconnect_min_ms: Option<u64>,
    pub reconnect_max_ms: Option<u64>,
    pub link_notsent_lowat_bytes: Option<u32>,
}

/// Flags that override the file (`maintgate agent --broker … --token-file … --ca …`).
#[derive(Debug, Default, Clone)]
pub struct AgentOverrides {
    pub broker: Option<String>,
    pub token_file: Option<PathBuf>,
    pub ca: Option<PathBuf>,
}

/// Validated agent settings.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// `wss://host:port/agent`.
    pub broker: String,
    /// Host part of `broker`, for TCP and SNI.
    pub broker_host: String,
    /// Port part of `broker`.
    pub broker_port: u16,
    /// `wss://` (always, but for a `ws://` link to a loopback test
    /// listener).
    pub broker_tls: bool,
    /// CA to trust instead of the system roots.
    pub ca: Option<PathBuf>,
    /// The agent token (never logged).
    pub token: Secret,
    /// The system itself: where `SelfPort` targets are dialed.
    pub self_address: IpAddr,
    /// What this site allows.
    pub policy: Policy,
    /// Deadline for dialing a target.
    pub dial_timeout: Duration,
    /// Link tunables.
    pub mux: MuxConfig,
    /// Reconnect backoff: first cap and maximum cap (full jitter).
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

/// Split `wss://host[:port]/path` into host, port and `true` (TLS); or
/// `ws://<loopback IP>:port/path`, the broker's plain test listener, into
/// host, port and `false`. A plain link to any other host is refused: the
/// token and every tunnel's bytes would cross a network in the clear.
///
/// # Errors
/// [`ConfigError::Invalid`] for another scheme or a malformed URL.
pub fn parse_broker_link(url: &str) -> Result<(String, u16, bool), ConfigError> {
    let inv = |m: &str| ConfigError::Invalid {
        field: "broker",
        message: format!("{m}: expected wss://host:port/agent"),
    };
    let (rest, tls) = if let Some(rest) = url.strip_prefix("wss://") {
        (rest, true)
    } else if let Some(rest) = url.strip_prefix("ws://") {
        (rest, false)
    } else {
        return Err(inv("scheme must be wss"));
    };
    let authority = rest.split('/').next().unwrap_or("");
    if authority.is_empty() || authority.contains('@') {
        return Err(inv("missing host"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, p) = v6.split_once(']').ok_or_else(|| inv("bad IPv6 host"))?;
        (h.to_string(), p.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| inv("bad port"))?,
        None => 443,
    };
    if host.is_empty() {
        return Err(inv("missing host"));
    }
    if !tls && !host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback()) {
        return Err(inv(
            "ws:// (no TLS) is for a broker's plain test listener on this machine: the host must be a loopback IP",
        ));
    }
    Ok((host, port, tls))
}

impl AgentSettings {
    /// Load the file (if any), apply overrides, read the token, validate.
    ///
    /// # Errors
    /// [`ConfigError`] naming what is missing or invalid.
    pub fn load(file: Option<&Path>, o: &AgentOverrides) -> Result<AgentSettings, ConfigError> {
        let f: AgentFile = match file {
            Some(p) => read_toml(p)?,
            None => toml::from_str("").map_err(|e| ConfigError::Parse {
                path: PathBuf::new(),
                message: e.to_string(),
            })?,
        };
        // Relative paths in the file are relative to the file.
        let base = file.and_then(Path::parent).map(Path::to_path_buf);
        let rel = |p: PathBuf| match &base {
            Some(b) if p.is_relative() => b.join(p),
            _ => p,
        };
        let broker = o
            .broker
            .clone()
            .or(f.broker.clone())
            .ok_or(ConfigError::Invalid {
                field: "broker",
                message: "missing (config `broker` or --broker)".into(),
            })?;
        let token_file = o
            .token_file
            .clone()
            .or(f.token_file.clone().map(rel))
            .ok_or(ConfigError::Invalid {
                field: "token_file",
                message: "missing (config `token_file` or --token-file)".into(),
            })?;
        let token = std::fs::read_to_string(&token_file).map_err(|source| ConfigError::Read {
            path: token_file.clone(),
            source,
        })?;
        let ca = o.ca.clone().or(f.ca.clone().map(rel));
        Self::from_parts(f, broker, Secret::new(token.trim().to_string()), ca)
    }

    /// Validate a parsed file with the broker URL, token and CA chosen.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`].
    pub fn from_parts(
        f: AgentFile,
        broker: String,
        token: Secret,
        ca: Option<PathBuf>,
    ) -> Result<AgentSettings, ConfigError> {
        let (broker_host, broker_port, broker_tls) = parse_broker_link(&broker)?;
        if token.expose().is_empty() || token.expose().len() > 128 {
            return Err(ConfigError::Invalid {
                field: "token_file",
                message: "token is empty or too long".into(),
            });
        }
        let policy = Policy {
            remote_access: f.remote_access,
            services: f.services,
            co_located: f.co_located,
            tunnels: f.tunnels,
        };
        policy.validate().map_err(|e| ConfigError::Invalid {
            field: "services/tunnel",
            message: e.to_string(),
        })?;
        let dm = MuxConfig::agent_default();
        let ms = |v: Option<u64>, d: Duration| v.map(Duration::from_millis).unwrap_or(d);
        let mux = MuxConfig {
            window: f.window_bytes.unwrap_or(dm.window),
            // Unset: no growth beyond the initial window.
            max_window: f
                .max_window_bytes
                .unwrap_or_else(|| f.window_bytes.unwrap_or(dm.window).max(dm.max_window)),
            max_streams: f.max_streams.unwrap_or(dm.max_streams),
            ping_interval: ms(f.ping_interval_ms, dm.ping_interval),
            beats_per_ping: f.beats_per_ping.unwrap_or(dm.beats_per_ping),
            dead_after: ms(f.dead_after_ms, dm.dead_after),
            open_timeout: dm.open_timeout,
            data_queue: dm.data_queue,
            notsent_lowat: f.link_notsent_lowat_bytes.unwrap_or(dm.notsent_lowat),
        };
        if mux.window < 16 * 1024
            || mux.max_window < mux.window
            || mux.max_window > 64 * 1024 * 1024
            || mux.max_streams == 0
            || mux.dead_after <= mux.ping_interval
            || mux.dead_after > crate::mux::session::MAX_DEAD_AFTER
            || mux.beats_per_ping > MAX_BEATS_PER_PING
        {
            return Err(ConfigError::Invalid {
                field: "window_bytes/max_window_bytes/max_streams/dead_after_ms/beats_per_ping",
                message: "window >= 16384, window <= max_window <= 64 MiB, max_streams >= 1, ping_interval < dead_after <= 1 day, beats_per_ping <= 100".into(),
            });
        }
        let reconnect_min = ms(f.reconnect_min_ms, Duration::from_secs(1));
        let reconnect_max = ms(f.reconnect_max_ms, Duration::from_secs(60));
        Ok(AgentSettings {
            broker,
            broker_host,
            broker_port,
            broker_tls,
            ca,
            token,
            self_address: f
                .self_address
                .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
            policy,
            dial_timeout: ms(f.dial_timeout_ms, Duration::from_secs(10)),
            mux,
            reconnect_min: reconnect_min.max(Duration::from_millis(10)),
            reconnect_max: reconnect_max.max(reconnect_min),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_example_parses() {
        let f: AgentFile = toml::from_str(include_str!("../../deploy/agent.toml")).unwrap();
        let s = AgentSettings::from_parts(
            f,
            "wss://maint.example.com:6443/agent".into(),
            Secret::new("t".into()),
            None,
        )
        .unwrap();
        assert!(s.policy.remote_access);
        assert_eq!(s.policy.services.len(), 7);
    }

    #[test]
    fn broker_urls() {
        assert_eq!(
            parse_broker_link("wss://maint.example.com:6443/agent").unwrap(),
            ("maint.example.com".into(), 6443, true)
        );
        assert_eq!(
            parse_broker_link("wss://127.0.0.1/agent").unwrap(),
            ("127.0.0.1".into(), 443, true)
        );
        assert_eq!(
            parse_broker_link("wss://[::1]:7/agent").unwrap(),
            ("::1".into(), 7, true)
        );
        // Plain links: only to a loopback IP (a test listener).
        assert_eq!(
            parse_broker_link("ws://127.0.0.1:6480/agent").unwrap(),
            ("127.0.0.1".into(), 6480, false)
        );
        assert_eq!(
            parse_broker_link("ws://[::1]:6480/agent").unwrap(),
            ("::1".into(), 6480, false)
        );
        for bad in [
            "ws://x/agent",
            "ws://localhost:6480/agent",
            "ws://10.0.0.1:6480/agent",
            "ws://maint.example.com/agent",
            "https://x",
            "wss://",
            "wss://x:0/",
            "wss://u@x/",
            "wss://x:99999/",
        ] {
            assert!(parse_broker_link(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn brief_example_parses_and_unknown_fields_fail() {
        let text = r#"
broker = "wss://maint.example.com:6443/agent"
ca = "ca.pem"
token_file = "agent.token"
self_address = "127.0.0.1"
remote_access = true
services = [22, 443, 3389, 7071, 8443, 9443, 52233]
co_located = false
[[tunnel]]
app = "rdp"
ip = "10.0.0.5"
port = 3389
"#;
        let f: AgentFile = toml::from_str(text).unwrap();
        assert_eq!(f.tunnels.len(), 1);
        let s = AgentSettings::from_parts(
            f,
            "wss://maint.example.com:6443/agent".into(),
            Secret::new("t".into()),
            None,
        )
        .unwrap();
        assert_eq!(s.policy.services.len(), 7);
        assert!(toml::from_str::<AgentFile>("brokr = \"x\"").is_err());
        // Strict address parsing: no octal, no short forms.
        assert!(toml::from_str::<AgentFile>("self_address = \"0127.0.0.1\"").is_err());
        assert!(
            toml::from_str::<AgentFile>("[[tunnel]]\napp=\"ssh\"\nip=\"127.1\"\nport=22").is_err()
        );
    }
}
