//! Site policy: what an agent allows to be reached, and the agent's HELLO.
//!
//! Pure code. The agent announces its [`Policy`] in the HELLO; the broker
//! uses that copy for an early 403, but the agent's own check
//! ([`Policy::check`] with [`Enforcement::Agent`]) is the one that decides.

use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};

use crate::mux::frame::Target;

/// Most services a policy may list.
pub const MAX_SERVICES: usize = 64;
/// Most co-located tunnels a policy may list.
pub const MAX_TUNNELS: usize = 1024;
/// Longest version string in a HELLO.
pub const MAX_VERSION_LEN: usize = 64;

/// The application a co-located tunnel is for (informational: the policy
/// is the `(ip, port)` pair).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum App {
    Ssh,
    Rdp,
    Https,
    Tcp,
}

/// One co-located server the agent may dial.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tunnel {
    /// What runs there; shown to operators.
    pub app: App,
    /// The server's address: parsed, never resolved.
    pub ip: Ipv4Addr,
    /// The one port allowed on that server.
    pub port: u16,
}

/// What a site allows. Deny by default: an empty policy allows nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Master switch: off means nothing at all may be reached.
    pub remote_access: bool,
    /// Ports of the system itself that may be reached.
    pub services: Vec<u16>,
    /// Whether co-located tunnels are allowed at all.
    pub co_located: bool,
    /// The co-located `(ip, port)` pairs.
    #[serde(default)]
    pub tunnels: Vec<Tunnel>,
}

/// The agent's first frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// The agent's software version, for operators.
    pub version: String,
    /// The site policy as the agent enforces it.
    pub policy: Policy,
}

/// Why a HELLO was refused.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    #[error("HELLO is not valid JSON for this version: {0}")]
    Json(#[from] serde_json::Error),
    #[error("HELLO version string is empty, too long or not printable ASCII")]
    BadVersion,
    #[error("HELLO lists too many services or tunnels")]
    TooMany,
    #[error("HELLO lists port 0")]
    PortZero,
}

impl Hello {
    /// Parse and validate a HELLO payload.
    ///
    /// # Errors
    /// [`HelloError`] for bad JSON, unknown fields, and values outside the
    /// limits.
    pub fn parse(bytes: &[u8]) -> Result<Hello, HelloError> {
        let hello: Hello = serde_json::from_slice(bytes)?;
        if hello.version.is_empty()
            || hello.version.len() > MAX_VERSION_LEN
            || !hello.version.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(HelloError::BadVersion);
        }
        hello.policy.validate()?;
        Ok(hello)
    }
}

/// Who is applying the policy. The agent applies the address-class rules
/// on top; the broker cannot know the agent's `self_address`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforcement {
    /// Early check on the broker, from the announced policy.
    Broker,
    /// The deciding check, on the agent.
    Agent,
}

/// Why a target is not allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("remote access is off at this site")]
    RemoteAccessOff,
    #[error("port {0} is not a service of this system")]
    ServiceNotListed(u16),
    #[error("co-located servers are off at this site")]
    CoLocatedOff,
    #[error("{0}:{1} is not a configured tunnel")]
    TunnelNotListed(Ipv4Addr, u16),
    #[error("{0} is a {1} address, never allowed for a co-located tunnel")]
    ForbiddenAddress(Ipv4Addr, &'static str),
}

impl Denied {
    /// A short ASCII reason phrase for the HTTP status line.
    pub fn reason(&self) -> &'static str {
        match self {
            Denied::RemoteAccessOff => "Forbidden: remote access is off at this site",
            Denied::ServiceNotListed(_) => "Forbidden: port not allowed on this system",
            Denied::CoLocatedOff => "Forbidden: co-located servers are off at this site",
            Denied::TunnelNotListed(..) => "Forbidden: ip:port is not a configured tunnel",
            Denied::ForbiddenAddress(..) => "Forbidden: address class not allowed",
        }
    }
}

impl Policy {
    /// Check limits on a policy (from a HELLO or a config file).
    ///
    /// # Errors
    /// [`HelloError::TooMany`] or [`HelloError::PortZero`].
    pub fn validate(&self) -> Result<(), HelloError> {
        if self.services.len() > MAX_SERVICES || self.tunnels.len() > MAX_TUNNELS {
            return Err(HelloError::TooMany);
        }
        if self.services.contains(&0) || self.tunnels.iter().any(|t| t.port == 0) {
            return Err(HelloError::PortZero);
        }
        Ok(())
    }

    /// Decide whether `target` may be dialed.
    ///
    /// # Errors
    /// [`Denied`] with the first rule that refuses.
    pub fn check(&self, target: &Target, who: Enforcement) -> Result<(), Denied> {
        if !self.remote_access {
            return Err(Denied::RemoteAccessOff);
        }
        match *target {
            Target::SelfPort(port) => {
                if self.services.contains(&port) {
                    Ok(())
                } else {
                    Err(Denied::ServiceNotListed(port))
                }
            }
            Target::CoLocated(ip, port) => {
                if !self.co_located {
                    return Err(Denied::CoLocatedOff);
                }
                if who == Enforcement::Agent {
                    if let Some(class) = forbidden_class(IpAddr::V4(ip)) {
                        return Err(Denied::ForbiddenAddress(ip, class));
                    }
                }
                if self.tunnels.iter().any(|t| t.ip == ip && t.port == port) {
                    Ok(())
                } else {
                    Err(Denied::TunnelNotListed(ip, port))
                }
            }
        }
    }
}

/// The address classes a co-located tunnel may never reach, even when
/// configured: returns the class name, or `None` when the address is fine.
///
/// The address is canonicalised first, so `::ffff:127.0.0.1` is loopback.
pub fn forbidden_class(ip: IpAddr) -> Option<&'static str> {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            if v4.is_loopback() {
                Some("loopback")
            } else if v4.is_link_local() {
                Some("link-local")
            } else if v4.is_multicast() {
                Some("multicast")
            } else if v4.is_broadcast() {
                Some("broadcast")
            } else if v4.is_unspecified() {
                Some("unspecified")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if v6.is_multicast() {
                Some("multicast")
            } else if (v6.segments()[0] & 0xffc0) == 0xfe80 {
                Some("link-local")
            } else {
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            remote_access: true,
            services: vec![22, 443],
            co_located: true,
            tunnels: vec![
                Tunnel {
                    app: App::Rdp,
                    ip: Ipv4Addr::new(10, 0, 0, 5),
                    port: 3389,
                },
                Tunnel {
                    app: App::Ssh,
                    ip: Ipv4Addr::LOCALHOST,
                    port: 22,
                },
            ],
        }
    }

    #[test]
    fn decisions() {
        use Enforcement::*;
        let p = policy();
        let ip = Ipv4Addr::new(10, 0, 0, 5);
        let cases = [
            (Target::SelfPort(22), Agent, Ok(())),
            (
                Target::SelfPort(80),
                Agent,
                Err(Denied::ServiceNotListed(80)),
            ),
            (Target::CoLocated(ip, 3389), Agent, Ok(())),
            (
                Target::CoLocated(ip, 22),
                Agent,
                Err(Denied::TunnelNotListed(ip, 22)),
            ),
            // configured, but loopback: refused by the agent even so
            (
                Target::CoLocated(Ipv4Addr::LOCALHOST, 22),
                Agent,
                Err(Denied::ForbiddenAddress(Ipv4Addr::LOCALHOST, "loopback")),
            ),
            // the broker cannot apply address classes; the agent will
            (Target::CoLocated(Ipv4Addr::LOCALHOST, 22), Broker, Ok(())),
        ];
        for (t, who, want) in cases {
            assert_eq!(p.check(&t, who), want, "{t} {who:?}");
        }
        let off = Policy {
            remote_access: false,
            ..policy()
        };
        assert_eq!(
            off.check(&Target::SelfPort(22), Enforcement::Agent),
            Err(Denied::RemoteAccessOff)
        );
        let no_co = Policy {
            co_located: false,
            ..policy()
        };
        assert_eq!(
            no_co.check(&Target::CoLocated(ip, 3389), Enforcement::Agent),
            Err(Denied::CoLocatedOff)
        );
    }

    #[test]
    fn address_classes_after_canonicalisation() {
        let cases: &[(&str, Option<&str>)] = &[
            ("127.0.0.1", Some("loopback")),
            ("127.8.9.10", Some("loopback")),
            ("::ffff:127.0.0.1", Some("loopback")),
            ("169.254.169.254", Some("link-local")),
            ("::ffff:169.254.169.254", Some("link-local")),
            ("224.0.0.1", Some("multicast")),
            ("255.255.255.255", Some("broadcast")),
            ("0.0.0.0", Some("unspecified")),
            ("::1", Some("loopback")),
            ("::", Some("unspecified")),
            ("fe80::1", Some("link-local")),
            ("10.0.0.5", None),
            ("192.168.1.10", None),
            ("::ffff:10.0.0.5", None),
        ];
        for (s, want) in cases {
            let ip: IpAddr = s.parse().unwrap();
            assert_eq!(forbidden_class(ip), *want, "{s}");
        }
    }

    #[test]
    fn hello_parsing_is_strict() {
        let good = br#"{"version":"0.1.0","policy":{"remote_access":true,"services":[22],"co_located":false}}"#;
        assert!(Hello::parse(good).is_ok());
        let bad: &[&[u8]] = &[
            br#"{"version":"0.1.0","policy":{"remote_access":true,"services":[22],"co_located":false},"customer":"9999"}"#,
            br#"{"version":"","policy":{"remote_access":true,"services":[22],"co_located":false}}"#,
            br#"{"version":"a b","policy":{"remote_access":true,"services":[22],"co_located":false}}"#,
            br#"{"version":"1","policy":{"remote_access":true,"services":[0],"co_located":false}}"#,
            br#"{"version":"1","policy":{"remote_access":true,"services":[70000],"co_located":false}}"#,
            br#"{"version":"1","policy":{"remote_access":true,"services":[22],"co_located":true,"tunnels":[{"app":"ssh","ip":"0x7f.1","port":22}]}}"#,
            b"not json",
        ];
        for b in bad {
            assert!(Hello::parse(b).is_err(), "{}", String::from_utf8_lossy(b));
        }
        let many = Policy {
            remote_access: true,
            services: (1..=65).collect(),
            co_located: false,
            tunnels: vec![],
        };
        assert!(matches!(many.validate(), Err(HelloError::TooMany)));
    }
}
