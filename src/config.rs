//! Broker configuration: an optional TOML file, overridden by flags, and
//! validated into [`BrokerSettings`] with typed fields.
//!
//! ```toml
//! listen = "0.0.0.0:6443"
//! admin_listen = "127.0.0.1:7080"
//! domain = "maint.example.com"
//! data_dir = "data"
//! certs_dir = "certs"
//! public_port = 6443          # the port the PAC and connect-info name
//! audit_retention_days = 0    # delete closed audit records older than this; 0 keeps all
//! # plain_test_listen = "127.0.0.1:6480"  # benchmarks only: no TLS, loopback only
//! [limits]
//! handshake_timeout_ms = 10000
//! head_timeout_ms = 10000
//! max_connections = 10000
//! max_concurrent_hashes = 2
//! auth_cache_ttl_secs = 60
//! window_bytes = 262144
//! max_window_bytes = 262144    # raise for long WAN links (up to 64 MiB)
//! max_streams_per_agent = 1024
//! max_memory_mb = 0            # 503 above this RSS; unset: 90% of the cgroup limit
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::front::auth::AuthConfig;
use crate::front::lockout::LockoutPolicy;
use crate::mux::session::MAX_DEAD_AFTER;
use crate::mux::MuxConfig;

/// Errors reading or validating configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid setting {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

/// The broker's config file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerFile {
    pub listen: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    pub domain: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub certs_dir: Option<PathBuf>,
    pub public_port: Option<u16>,
    pub audit_retention_days: Option<u32>,
    pub plain_test_listen: Option<SocketAddr>,
    #[serde(default)]
    pub limits: LimitsFile,
}

/// The `[limits]` table; every field optional with a safe default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    pub handshake_timeout_ms: Option<u64>,
    pub head_timeout_ms: Option<u64>,
    pub max_connections: Option<usize>,
    pub max_auth_attempts_per_connection: Option<u32>,
    pub max_concurrent_hashes: Option<usize>,
    pub auth_cache_ttl_secs: Option<u64>,
    pub auth_hashes_per_minute_per_source: Option<u32>,
    pub lockout_threshold: Option<u32>,
    pub lockout_window_secs: Option<u64>,
    pub lockout_base_secs: Option<u64>,
    pub lockout_max_secs: Option<u64>,
    pub hello_timeout_ms: Option<u64>,
    pub idle_timeout_secs: Option<u64>,
    pub max_tunnel_lifetime_secs: Option<u64>,
    pub max_tunnels: Option<usize>,
    pub max_tunnels_per_account: Option<usize>,
    pub max_connections_per_source: Option<usize>,
    pub revalidate_ms: Option<u64>,
    pub cert_reload_ms: Option<u64>,
    pub drain_timeout_ms: Option<u64>,
    pub window_bytes: Option<u32>,
    pub max_window_bytes: Option<u32>,
    pub max_streams_per_agent: Option<usize>,
    pub ping_interval_ms: Option<u64>,
    pub dead_after_ms: Option<u64>,
    pub open_timeout_ms: Option<u64>,
    pub link_notsent_lowat_bytes: Option<u32>,
    pub max_memory_mb: Option<u64>,
}

/// Deadlines and caps on everything a client or agent can hold.
#[derive(Debug, Clone)]
pub struct Limits {
    /// TLS handshake deadline (slowloris on the handshake).
    pub handshake_timeout: Duration,
    /// Deadline for a complete request head.
    pub head_timeout: Duration,
    /// Most concurrent client and agent connections.
    pub max_connections: usize,
    /// 407 retries allowed on one connection before it is closed.
    pub max_auth_attempts_per_connection: u32,
    /// Authentication: hash concurrency, cache, per-source budget, lockout.
    pub auth: AuthConfig,
    /// Deadline for the agent's HELLO after the upgrade.
    pub hello_timeout: Duration,
    /// A tunnel with no byte either way for this long is closed.
    pub idle_timeout: Duration,
    /// No tunnel lives longer than this.
    pub max_tunnel_lifetime: Duration,
    /// Most tunnels broker-wide; beyond, CONNECT gets 503.
    pub max_tunnels: usize,
    /// Most tunnels one account may hold; beyond, CONNECT gets 503.
    pub max_tunnels_per_account: usize,
    /// Most concurrent connections from one source address; beyond, new
    /// connections are closed before the TLS handshake.
    pub max_connections_per_source: usize,
    /// How often the broker checks the store for changes made elsewhere.
    pub revalidate_every: Duration,
    /// How often certificate files are checked for changes.
    pub cert_reload_every: Duration,
    /// How long shutdown waits for connections to drain.
    pub drain_timeout: Duration,
    /// Resident memory above which new CONNECTs get 503, in MiB; `None`:
    /// 90% of the cgroup's `memory.max` if there is one, `Some(0)`: off.
    /// See [`crate::memguard`].
    pub max_memory_mb: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(10),
            head_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            max_auth_attempts_per_connection: 3,
            auth: AuthConfig::default(),
            hello_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(2 * 3600),
            max_tunnel_lifetime: Duration::from_secs(24 * 3600),
            max_tunnels: 20_000,
            max_tunnels_per_account: 1_000,
            max_connections_per_source: 1_000,
            revalidate_every: Duration::from_secs(1),
            cert_reload_every: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(10),
            max_memory_mb: None,
        }
    }
}

/// Validated broker settings.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    /// Proxy, PAC and agent port.
    pub listen: SocketAddr,
    /// Admin API, metrics, health (loopback by default).
    pub admin_listen: SocketAddr,
    /// The maint domain, e.g. `maint.example.com`: lowercase, no trailing dot.
    pub domain: String,
    /// Where the store lives.
    pub data_dir: PathBuf,
    /// Where certificates live (generated on first run).
    pub certs_dir: PathBuf,
    /// The port clients use, for the PAC and connect-info; `None` means
    /// the listening port.
    pub public_port: Option<u16>,
    /// Closed audit records older than this are deleted (checked hourly);
    /// `None` keeps them all.
    pub audit_retention: Option<Duration>,
    /// Deadlines and caps.
    pub limits: Limits,
    /// Agent-link tunables.
    pub mux: MuxConfig,
    /// A second listener that serves the proxy port's requests without
    /// TLS: the benchmark's "both legs plain" path. Loopback addresses
    /// only, so credentials and tunnel bytes never cross a network in
    /// the clear; `None` (the default) binds nothing.
    pub plain_test_listen: Option<SocketAddr>,
}

impl Default for BrokerSettings {
    fn default() -> Self {
        BrokerSettings {
            listen: SocketAddr::from(([0, 0, 0, 0], 6443)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 7080)),
            domain: "maint.localhost".into(),
            data_dir: PathBuf::from("data"),
            certs_dir: PathBuf::from("certs"),
            public_port: None,
            audit_retention: None,
            limits: Limits::default(),
            mux: MuxConfig::default(),
            plain_test_listen: None,
        }
    }
}

/// Read a TOML file into `T`, rejecting unknown fields.
///
/// # Errors
/// [`ConfigError::Read`] or [`ConfigError::Parse`].
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Normalise and check a maint domain: ASCII letters, digits, `-`, dots
/// between non-empty labels; lowercased, trailing dot removed.
///
/// # Errors
/// [`ConfigError::Invalid`] for anything else.
pub fn normalize_domain(domain: &str) -> Result<String, ConfigError> {
    let d = domain.trim_end_matches('.').to_ascii_lowercase();
    let ok = !d.is_empty()
        && d.len() <= 200
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if ok {
        Ok(d)
    } else {
        Err(ConfigError::Invalid {
            field: "domain",
            message: format!("{domain:?} is not a DNS name"),
        })
    }
}

/// Longest audit retention accepted, in days (100 years): anything larger
/// is a typo, and 0 already means "keep everything".
pub const MAX_AUDIT_RETENTION_DAYS: u32 = 36_500;

fn secs(v: Option<u64>, default: Duration) -> Duration {
    v.map(Duration::from_secs).unwrap_or(default)
}

fn ms(v: Option<u64>, default: Duration) -> Duration {
    v.map(Duration::from_millis).unwrap_or(default)
}

impl BrokerFile {
    /// Validate into settings, starting from the defaults.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] for an invalid domain or a zero limit.
    pub fn into_settings(self) -> Result<BrokerSettings, ConfigError> {
        let d = BrokerSettings::default();
        let l = self.limits;
        let dl = Limits::default();
        let dm = MuxConfig::default();
        let settings = BrokerSettings {
            listen: self.listen.unwrap_or(d.listen),
            plain_test_listen: self.plain_test_listen,
            admin_listen: self.admin_listen.unwrap_or(d.admin_listen),
            domain: normalize_domain(self.domain.as_deref().unwrap_or(&d.domain))?,
            data_dir: self.data_dir.unwrap_or(d.data_dir),
            certs_dir: self.certs_dir.unwrap_or(d.certs_dir),
            public_port: self.public_port,
            audit_retention: match self.audit_retention_days {
                None | Some(0) => None,
                Some(days) if days > MAX_AUDIT_RETENTION_DAYS => {
                    return Err(ConfigError::Invalid {
                        field: "audit_retention_days",
                        message: format!(
                            "{days} is more than {MAX_AUDIT_RETENTION_DAYS}; use 0 to keep everything"
                        ),
                    })
                }
                Some(days) => Some(Duration::from_secs(u64::from(days) * 86_400)),
            },
            limits: Limits {
                handshake_timeout: ms(l.handshake_timeout_ms, dl.handshake_timeout),
                head_timeout: ms(l.head_timeout_ms, dl.head_timeout),
                max_connections: l.max_connections.unwrap_or(dl.max_connections),
                max_auth_attempts_per_connection: l
                    .max_auth_attempts_per_connection
                    .unwrap_or(dl.max_auth_attempts_per_connection),
                auth: AuthConfig {
                    max_hashes: l.max_concurrent_hashes.unwrap_or(dl.auth.max_hashes),
                    cache_ttl: l
                        .auth_cache_ttl_secs
                        .map(Duration::from_secs)
                        .unwrap_or(dl.auth.cache_ttl),
                    hashes_per_minute_per_source: l
                        .auth_hashes_per_minute_per_source
                        .unwrap_or(dl.auth.hashes_per_minute_per_source),
                    lockout: LockoutPolicy {
                        threshold: l.lockout_threshold.unwrap_or(dl.auth.lockout.threshold),
                        window: secs(l.lockout_window_secs, dl.auth.lockout.window),
                        base: secs(l.lockout_base_secs, dl.auth.lockout.base),
                        max: secs(l.lockout_max_secs, dl.auth.lockout.max),
                    },
                },
                hello_timeout: ms(l.hello_timeout_ms, dl.hello_timeout),
                idle_timeout: secs(l.idle_timeout_secs, dl.idle_timeout),
                max_tunnel_lifetime: secs(l.max_tunnel_lifetime_secs, dl.max_tunnel_lifetime),
                max_tunnels: l.max_tunnels.unwrap_or(dl.max_tunnels),
                max_tunnels_per_account: l
                    .max_tunnels_per_account
                    .unwrap_or(dl.max_tunnels_per_account),
                max_connections_per_source: l
                    .max_connections_per_source
                    .unwrap_or(dl.max_connections_per_source),
                revalidate_every: ms(l.revalidate_ms, dl.revalidate_every),
                cert_reload_every: ms(l.cert_reload_ms, dl.cert_reload_every),
                drain_timeout: ms(l.drain_timeout_ms, dl.drain_timeout),
                max_memory_mb: l.max_memory_mb.or(dl.max_memory_mb),
            },
            mux: MuxConfig {
                window: l.window_bytes.unwrap_or(dm.window),
                // Unset: no growth beyond the initial window.
                max_window: l
                    .max_window_bytes
                    .unwrap_or_else(|| l.window_bytes.unwrap_or(dm.window).max(dm.max_window)),
                max_streams: l.max_streams_per_agent.unwrap_or(dm.max_streams),
                ping_interval: ms(l.ping_interval_ms, dm.ping_interval),
                beats_per_ping: dm.beats_per_ping,
                dead_after: ms(l.dead_after_ms, dm.dead_after),
                open_timeout: ms(l.open_timeout_ms, dm.open_timeout),
                data_queue: dm.data_queue,
                notsent_lowat: l.link_notsent_lowat_bytes.unwrap_or(dm.notsent_lowat),
            },
        };
        settings.validate()?;
        Ok(settings)
    }
}

impl BrokerSettings {
    /// Check that no limit is zero and the window is usable.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let inv = |field, message: &str| ConfigError::Invalid {
            field,
            message: message.into(),
        };
        if let Some(a) = self.plain_test_listen {
            if !a.ip().is_loopback() {
                return Err(inv(
                    "plain_test_listen",
                    "must be a loopback address (127.0.0.0/8 or ::1): it serves without TLS",
                ));
            }
        }
        let l = &self.limits;
        if l.max_tunnels == 0
            || l.max_tunnels_per_account == 0
            || l.max_connections_per_source == 0
            || l.idle_timeout.is_zero()
            || l.max_tunnel_lifetime.is_zero()
        {
            return Err(inv(
                "limits",
                "tunnel and connection limits must be above zero",
            ));
        }
        if l.max_connections == 0 {
            return Err(inv("max_connections", "must be at least 1"));
        }
        if l.auth.max_hashes == 0 {
            return Err(inv("max_concurrent_hashes", "must be at least 1"));
        }
        if l.auth.lockout.threshold == 0 || l.auth.hashes_per_minute_per_source == 0 {
            return Err(inv("lockout_threshold", "limits must be at least 1"));
        }
        if l.handshake_timeout.is_zero() || l.head_timeout.is_zero() {
            return Err(inv("timeouts", "must be above zero"));
        }
        if self.mux.window < 16 * 1024 {
            return Err(inv("window_bytes", "must be at least 16384"));
        }
        if self.mux.max_window < self.mux.window || self.mux.max_window > 64 * 1024 * 1024 {
            return Err(inv(
                "max_window_bytes",
                "must be at least window_bytes and at most 67108864",
            ));
        }
        if self.mux.max_streams == 0 {
            return Err(inv("max_streams_per_agent", "must be at least 1"));
        }
        if self.mux.dead_after <= self.mux.ping_interval || self.mux.dead_after > MAX_DEAD_AFTER {
            return Err(inv(
                "dead_after_ms",
                "must exceed ping_interval_ms and be at most 86400000 (a day)",
            ));
        }
        Ok(())
    }

    /// The port clients connect to.
    pub fn client_port(&self, bound: SocketAddr) -> u16 {
        self.public_port.unwrap_or(bound.port())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plain_test_listener_is_loopback_only() {
        for (addr, ok) in [
            ("127.0.0.1:6480", true),
            ("127.0.0.2:0", true),
            ("[::1]:6480", true),
            ("0.0.0.0:6480", false),
            ("10.0.0.1:6480", false),
            ("[::]:6480", false),
        ] {
            let f: BrokerFile = toml::from_str(&format!("plain_test_listen = \"{addr}\"")).unwrap();
            assert_eq!(f.into_settings().is_ok(), ok, "{addr}");
        }
        let f: BrokerFile = toml::from_str("").unwrap();
        assert_eq!(f.into_settings().unwrap().plain_test_listen, None);
    }

    #[test]
    fn defaults_and_overrides() {
        let f: BrokerFile = toml::from_str(
            "domain = \"Maint.Example.COM.\"\nlisten = \"127.0.0.1:0\"\n[limits]\nwindow_bytes = 65536\n",
        )
        .unwrap();
        let s = f.into_settings().unwrap();
        assert_eq!(s.domain, "maint.example.com");
        assert_eq!(s.mux.window, 65536);
        assert_eq!(s.admin_listen.to_string(), "127.0.0.1:7080");
    }

    #[test]
    fn shipped_example_parses() {
        let f: BrokerFile = toml::from_str(include_str!("../deploy/broker.toml")).unwrap();
        let s = f.into_settings().unwrap();
        assert_eq!(s.domain, "maint.example.com");
        assert_eq!(s.listen.port(), 6443);
    }

    #[test]
    fn rejects_unknown_and_invalid() {
        assert!(toml::from_str::<BrokerFile>("listen_addr = \"x\"").is_err());
        assert!(toml::from_str::<BrokerFile>("[limits]\nmax_conns = 1").is_err());
        for bad in ["", "a..b", "-x.com", "ex ample.com", "a_b.com"] {
            assert!(normalize_domain(bad).is_err(), "{bad}");
        }
        let f: BrokerFile = toml::from_str("[limits]\nmax_connections = 0").unwrap();
        assert!(f.into_settings().is_err());
    }

    #[test]
    fn audit_retention_in_days_zero_keeps_all() {
        let days = |text: &str| toml::from_str::<BrokerFile>(text).unwrap().into_settings();
        assert_eq!(days("").unwrap().audit_retention, None);
        assert_eq!(
            days("audit_retention_days = 0").unwrap().audit_retention,
            None
        );
        assert_eq!(
            days("audit_retention_days = 90").unwrap().audit_retention,
            Some(Duration::from_secs(90 * 86_400))
        );
        let e = days("audit_retention_days = 100000").unwrap_err();
        assert!(e.to_string().contains("audit_retention_days"), "{e}");
        assert!(toml::from_str::<BrokerFile>("audit_retention_days = -1").is_err());
    }
}
