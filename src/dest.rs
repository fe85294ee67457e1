//! Destination grammar: turns a `CONNECT` request-target into a [`Destination`].
//!
//! The target is `<name>.<maint-domain>:<port>`, where `<name>` is one of
//! `cid`, `cid-system`, `cid-ipv4` or `cid-system-ipv4`. Matching is
//! case-insensitive and one trailing dot on the host is allowed.
//!
//! This module is pure (no I/O) and is the only place that turns a
//! client-supplied string into routing data, so it is strict on purpose:
//! every malformed input maps to a specific [`DestError`] whose
//! [`DestError::reason`] is the HTTP reason phrase the client sees. In
//! particular the IPv4 address must be strict dotted decimal, because the
//! forms a resolver would also accept (`127.1`, `0x7f.1`, `0127.0.0.1`) are
//! ambiguous and would let a target slip past the site policy.

use std::fmt;
use std::net::Ipv4Addr;

/// Longest host name, without the optional trailing dot (RFC 1035).
pub const MAX_HOST_LEN: usize = 253;
/// Longest DNS label (RFC 1035).
pub const MAX_LABEL_LEN: usize = 63;
/// Longest customer id.
pub const MAX_CUSTOMER_LEN: usize = 64;
/// Longest system name.
pub const MAX_SYSTEM_LEN: usize = 63;

/// A parsed and canonicalised destination.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Destination {
    /// Customer id, lowercased; ASCII letters and digits only.
    pub customer: String,
    /// Named system, lowercased; letters, digits, `-` and `_`. `None` means
    /// the customer's primary system.
    pub system: Option<String>,
    /// Co-located server reached through the system; `None` means the
    /// system itself.
    pub ip: Option<Ipv4Addr>,
    /// Target port, never 0.
    pub port: u16,
}

impl Destination {
    /// The canonical host name for this destination under `maint_domain`,
    /// without the port, e.g. `1234-ipo2-10.0.0.5.maint.example.com`.
    #[must_use]
    pub fn host(&self, maint_domain: &str) -> String {
        let mut host = self.customer.clone();
        if let Some(system) = &self.system {
            host.push('-');
            host.push_str(system);
        }
        if let Some(ip) = &self.ip {
            host.push('-');
            host.push_str(&ip.to_string());
        }
        host.push('.');
        host.push_str(maint_domain);
        host
    }
}

impl fmt::Display for Destination {
    /// Short human form for logs: `customer[/system][/ip]:port`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.customer)?;
        if let Some(system) = &self.system {
            write!(f, "/{system}")?;
        }
        if let Some(ip) = &self.ip {
            write!(f, "/{ip}")?;
        }
        write!(f, ":{}", self.port)
    }
}

/// Why a request-target is not a valid destination. One variant per
/// distinct problem, so the reason phrase can say exactly what is wrong.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum DestError {
    /// The target is empty.
    #[error("empty destination")]
    Empty,
    /// A byte outside ASCII.
    #[error("non-ASCII character in destination")]
    NonAscii,
    /// A control character (C0 or DEL).
    #[error("control character in destination")]
    ControlChar,
    /// The target looks like a URL (scheme or path), not `host:port`.
    #[error("destination is a URL, expected host:port")]
    NotAuthority,
    /// A bracketed host or extra colons: IPv6 is not supported.
    #[error("IPv6 literal or extra ':' in destination")]
    Ipv6,
    /// No `:port` at all, or nothing after the colon.
    #[error("port missing")]
    MissingPort,
    /// The port has a sign or whitespace.
    #[error("port has a sign or spaces")]
    PortSignOrSpace,
    /// The port contains something other than decimal digits.
    #[error("port is not a number")]
    PortNotNumeric,
    /// The port has leading zeros.
    #[error("port has leading zeros")]
    PortLeadingZero,
    /// Port 0.
    #[error("port 0")]
    PortZero,
    /// Port above 65535.
    #[error("port above 65535")]
    PortTooLarge,
    /// The host is empty (`:22`).
    #[error("host missing")]
    EmptyHost,
    /// The host is longer than 253 characters.
    #[error("host longer than 253 characters")]
    HostTooLong,
    /// A character that cannot appear in a maint host name.
    #[error("invalid character in host")]
    BadChar,
    /// An empty DNS label (`a..b`, leading dot, two trailing dots).
    #[error("empty label in host")]
    EmptyLabel,
    /// A DNS label longer than 63 characters.
    #[error("label longer than 63 characters")]
    LabelTooLong,
    /// The host is not under the maint domain.
    #[error("host is not a maint name")]
    NotMaintDomain,
    /// The host is the maint domain itself, with no name before it.
    #[error("no name before the maint domain")]
    NameMissing,
    /// An empty part between dashes (`-x`, `1234-`, `1234--x`).
    #[error("empty part between dashes")]
    EmptyPart,
    /// The customer id has characters other than letters and digits.
    #[error("customer id must be letters and digits")]
    BadCustomer,
    /// The customer id is longer than 64 characters.
    #[error("customer id too long")]
    CustomerTooLong,
    /// The system name has characters other than letters, digits, `-`, `_`.
    #[error("system name must be letters, digits, '-' or '_'")]
    BadSystem,
    /// The system name is longer than 63 characters.
    #[error("system name too long")]
    SystemTooLong,
    /// The IPv4 has characters other than digits and dots (hex, letters).
    #[error("IPv4 must be dotted decimal")]
    Ipv4NotDecimal,
    /// The IPv4 does not have exactly four parts (`127.1`).
    #[error("IPv4 must have four parts")]
    Ipv4Parts,
    /// An IPv4 octet with a leading zero (`010.0.0.1`, read as octal by some).
    #[error("IPv4 octet has a leading zero")]
    Ipv4LeadingZero,
    /// An IPv4 octet above 255.
    #[error("IPv4 octet above 255")]
    Ipv4Range,
}

impl DestError {
    /// A short ASCII HTTP reason phrase for a `400` answer.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Empty => "Bad destination: empty",
            Self::NonAscii => "Bad destination: non-ASCII character",
            Self::ControlChar => "Bad destination: control character",
            Self::NotAuthority => "Bad destination: expected host:port, not a URL",
            Self::Ipv6 => "Bad destination: IPv6 or extra colon not supported",
            Self::MissingPort => "Bad destination: port missing",
            Self::PortSignOrSpace => "Bad destination: port has a sign or spaces",
            Self::PortNotNumeric => "Bad destination: port is not a number",
            Self::PortLeadingZero => "Bad destination: port has leading zeros",
            Self::PortZero => "Bad destination: port 0",
            Self::PortTooLarge => "Bad destination: port above 65535",
            Self::EmptyHost => "Bad destination: host missing",
            Self::HostTooLong => "Bad destination: host too long",
            Self::BadChar => "Bad destination: invalid character in host",
            Self::EmptyLabel => "Bad destination: empty label in host",
            Self::LabelTooLong => "Bad destination: label over 63 characters",
            Self::NotMaintDomain => "Bad destination: host is not a maint name",
            Self::NameMissing => "Bad destination: no name before the maint domain",
            Self::EmptyPart => "Bad destination: empty part between dashes",
            Self::BadCustomer => "Bad destination: customer id must be letters and digits",
            Self::CustomerTooLong => "Bad destination: customer id too long",
            Self::BadSystem => "Bad destination: system name must be letters, digits, - or _",
            Self::SystemTooLong => "Bad destination: system name too long",
            Self::Ipv4NotDecimal => "Bad destination: IPv4 must be dotted decimal",
            Self::Ipv4Parts => "Bad destination: IPv4 must have four parts",
            Self::Ipv4LeadingZero => "Bad destination: IPv4 octet has a leading zero",
            Self::Ipv4Range => "Bad destination: IPv4 octet above 255",
        }
    }
}

/// Parses a `CONNECT` request-target (`host:port`) under `maint_domain`.
///
/// `maint_domain` is the configured domain, e.g. `maint.example.com`,
/// lowercase and without a trailing dot. The result is lowercased.
///
/// # Errors
///
/// Returns the [`DestError`] variant that names the first problem found:
/// bad characters, a URL instead of `host:port`, IPv6, a missing or invalid
/// port, a malformed host, a host outside `maint_domain`, or a name that
/// does not follow `cid[-system][-ipv4]` with a strict dotted-decimal IPv4.
pub fn parse_target(target: &str, maint_domain: &str) -> Result<Destination, DestError> {
    if target.is_empty() {
        return Err(DestError::Empty);
    }
    for b in target.bytes() {
        if !b.is_ascii() {
            return Err(DestError::NonAscii);
        }
        if b.is_ascii_control() {
            return Err(DestError::ControlChar);
        }
    }
    if target.contains('/') {
        return Err(DestError::NotAuthority);
    }
    if target.starts_with('[') {
        return Err(DestError::Ipv6);
    }
    let Some((host, port)) = target.rsplit_once(':') else {
        return Err(DestError::MissingPort);
    };
    if host.contains(':') || host.contains('[') || host.contains(']') {
        return Err(DestError::Ipv6);
    }
    let port = parse_port(port)?;
    let name = parse_host(host, maint_domain)?;
    let (customer, system, ip) = parse_name(name)?;
    Ok(Destination {
        customer: customer.to_ascii_lowercase(),
        system: system.map(str::to_ascii_lowercase),
        ip,
        port,
    })
}

/// Strict decimal port: digits only, no sign, no spaces, no leading zeros,
/// 1..=65535.
fn parse_port(port: &str) -> Result<u16, DestError> {
    if port.is_empty() {
        return Err(DestError::MissingPort);
    }
    if port.bytes().any(|b| matches!(b, b'+' | b'-' | b' ')) {
        return Err(DestError::PortSignOrSpace);
    }
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(DestError::PortNotNumeric);
    }
    if port == "0" {
        return Err(DestError::PortZero);
    }
    if port.starts_with('0') {
        return Err(DestError::PortLeadingZero);
    }
    if port.len() > 5 {
        return Err(DestError::PortTooLarge);
    }
    // At most five digits, so this cannot overflow a u32.
    let value = port
        .bytes()
        .fold(0u32, |acc, b| acc * 10 + u32::from(b - b'0'));
    u16::try_from(value).map_err(|_| DestError::PortTooLarge)
}

/// Checks the host as a DNS name and strips `.<maint_domain>` from it,
/// returning the name part (original case).
fn parse_host<'a>(host: &'a str, maint_domain: &str) -> Result<&'a str, DestError> {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() {
        return Err(DestError::EmptyHost);
    }
    if host.len() > MAX_HOST_LEN {
        return Err(DestError::HostTooLong);
    }
    if !host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(DestError::BadChar);
    }
    for label in host.split('.') {
        if label.is_empty() {
            return Err(DestError::EmptyLabel);
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(DestError::LabelTooLong);
        }
    }
    if host.eq_ignore_ascii_case(maint_domain) {
        return Err(DestError::NameMissing);
    }
    // `host` is ASCII, so any byte index is a char boundary.
    let suffix_len = maint_domain.len() + 1;
    if host.len() <= suffix_len {
        return Err(DestError::NotMaintDomain);
    }
    let (name, suffix) = host.split_at(host.len() - suffix_len);
    let under_domain = suffix
        .strip_prefix('.')
        .is_some_and(|domain| domain.eq_ignore_ascii_case(maint_domain));
    if !under_domain {
        return Err(DestError::NotMaintDomain);
    }
    Ok(name)
}

/// The parts of a name: customer, optional system, optional IPv4.
type NameParts<'a> = (&'a str, Option<&'a str>, Option<Ipv4Addr>);

/// Splits `cid[-system][-ipv4]`. Labels are already non-empty.
fn parse_name(name: &str) -> Result<NameParts<'_>, DestError> {
    // No empty part around any dash: covers `-x`, `1234-`, `1234--x` and a
    // system name that starts or ends with `-`.
    if name.split('-').any(str::is_empty) {
        return Err(DestError::EmptyPart);
    }
    let (customer, rest) = match name.split_once('-') {
        Some((customer, rest)) => (customer, Some(rest)),
        None => (name, None),
    };
    check_customer(customer)?;
    let Some(rest) = rest else {
        return Ok((customer, None, None));
    };
    if !rest.contains('.') {
        check_system(rest)?;
        return Ok((customer, Some(rest), None));
    }
    let (system, ip) = match rest.rsplit_once('-') {
        Some((system, ip)) => (Some(system), ip),
        None => (None, rest),
    };
    if let Some(system) = system {
        check_system(system)?;
    }
    let ip = parse_ipv4_strict(ip)?;
    Ok((customer, system, Some(ip)))
}

fn check_customer(customer: &str) -> Result<(), DestError> {
    if customer.is_empty() {
        return Err(DestError::EmptyPart);
    }
    if !customer.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(DestError::BadCustomer);
    }
    if customer.len() > MAX_CUSTOMER_LEN {
        return Err(DestError::CustomerTooLong);
    }
    Ok(())
}

fn check_system(system: &str) -> Result<(), DestError> {
    if system.is_empty() {
        return Err(DestError::EmptyPart);
    }
    if !system
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(DestError::BadSystem);
    }
    if system.len() > MAX_SYSTEM_LEN {
        return Err(DestError::SystemTooLong);
    }
    Ok(())
}

/// Strict dotted decimal: exactly four parts of decimal digits, no leading
/// zeros except `0` itself, each at most 255.
fn parse_ipv4_strict(s: &str) -> Result<Ipv4Addr, DestError> {
    if !s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(DestError::Ipv4NotDecimal);
    }
    let mut octets = [0u8; 4];
    let mut count = 0usize;
    for part in s.split('.') {
        if part.is_empty() {
            return Err(DestError::Ipv4NotDecimal);
        }
        let Some(slot) = octets.get_mut(count) else {
            return Err(DestError::Ipv4Parts);
        };
        count += 1;
        if part.len() > 1 && part.starts_with('0') {
            return Err(DestError::Ipv4LeadingZero);
        }
        if part.len() > 3 {
            return Err(DestError::Ipv4Range);
        }
        let value = part
            .bytes()
            .fold(0u16, |acc, b| acc * 10 + u16::from(b - b'0'));
        *slot = u8::try_from(value).map_err(|_| DestError::Ipv4Range)?;
    }
    if count != 4 {
        return Err(DestError::Ipv4Parts);
    }
    Ok(Ipv4Addr::from(octets))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DOM: &str = "maint.example.com";

    fn dest(customer: &str, system: Option<&str>, ip: Option<[u8; 4]>, port: u16) -> Destination {
        Destination {
            customer: customer.to_owned(),
            system: system.map(str::to_owned),
            ip: ip.map(Ipv4Addr::from),
            port,
        }
    }

    #[test]
    fn good_targets() {
        let cases: &[(&str, Destination)] = &[
            // The examples in the product brief.
            ("1234.maint.example.com:22", dest("1234", None, None, 22)),
            (
                "1234-ipo2.maint.example.com:7071",
                dest("1234", Some("ipo2"), None, 7071),
            ),
            (
                "1234-10.0.0.5.maint.example.com:3389",
                dest("1234", None, Some([10, 0, 0, 5]), 3389),
            ),
            (
                "1234-ipo2-10.0.0.5.maint.example.com:22",
                dest("1234", Some("ipo2"), Some([10, 0, 0, 5]), 22),
            ),
            // Case-insensitive, lowercased on output.
            (
                "1234-IPO2.MAINT.EXAMPLE.COM:7071",
                dest("1234", Some("ipo2"), None, 7071),
            ),
            ("AbC9.Maint.Example.Com:443", dest("abc9", None, None, 443)),
            // One trailing dot.
            ("1234.maint.example.com.:22", dest("1234", None, None, 22)),
            (
                "1234-ipo2-10.0.0.5.maint.example.com.:22",
                dest("1234", Some("ipo2"), Some([10, 0, 0, 5]), 22),
            ),
            // System names with dashes and underscores.
            (
                "1234-ipo-2.maint.example.com:22",
                dest("1234", Some("ipo-2"), None, 22),
            ),
            (
                "1234-web_01.maint.example.com:22",
                dest("1234", Some("web_01"), None, 22),
            ),
            (
                "1234-ipo-2-192.168.1.10.maint.example.com:443",
                dest("1234", Some("ipo-2"), Some([192, 168, 1, 10]), 443),
            ),
            // No dots: a system called `10`, not an address.
            (
                "1234-10.maint.example.com:22",
                dest("1234", Some("10"), None, 22),
            ),
            (
                "1234-2130706433.maint.example.com:22",
                dest("1234", Some("2130706433"), None, 22),
            ),
            // Edge addresses and ports.
            (
                "1-0.0.0.0.maint.example.com:1",
                dest("1", None, Some([0, 0, 0, 0]), 1),
            ),
            (
                "1-255.255.255.255.maint.example.com:65535",
                dest("1", None, Some([255, 255, 255, 255]), 65535),
            ),
            (
                "c-s-100.20.3.0.maint.example.com:52233",
                dest("c", Some("s"), Some([100, 20, 3, 0]), 52233),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(
                parse_target(input, DOM).as_ref(),
                Ok(want),
                "input {input:?}"
            );
        }
        assert_eq!(cases.len(), 16);
    }

    #[test]
    fn bad_targets() {
        use DestError as E;
        let long_label = format!("{}.maint.example.com:22", "a".repeat(64));
        let long_host = format!("1234.{}.maint.example.com:22", ["abcdefghij"; 22].join("."));
        let cases: Vec<(&str, DestError)> = vec![
            ("", E::Empty),
            ("1234.maint.example.com", E::MissingPort),
            ("1234.maint.example.com:", E::MissingPort),
            ("1234.maint.example.com:ssh", E::PortNotNumeric),
            ("1234.maint.example.com:2x", E::PortNotNumeric),
            ("1234.maint.example.com:0", E::PortZero),
            ("1234.maint.example.com:00", E::PortLeadingZero),
            ("1234.maint.example.com:022", E::PortLeadingZero),
            ("1234.maint.example.com:65536", E::PortTooLarge),
            ("1234.maint.example.com:99999", E::PortTooLarge),
            (
                "1234.maint.example.com:123456789012345678901",
                E::PortTooLarge,
            ),
            ("1234.maint.example.com:+22", E::PortSignOrSpace),
            ("1234.maint.example.com:-22", E::PortSignOrSpace),
            ("1234.maint.example.com: 22", E::PortSignOrSpace),
            ("1234.maint.example.com:22 ", E::PortSignOrSpace),
            ("1234.maint.example.com:\t22", E::ControlChar),
            ("1234.maint.example.com\0:22", E::ControlChar),
            ("1234.maint.example.com\r\n:22", E::ControlChar),
            ("1234.mäint.example.com:22", E::NonAscii),
            ("http://1234.maint.example.com/", E::NotAuthority),
            ("http://1234.maint.example.com:22/", E::NotAuthority),
            ("1234.maint.example.com:22/x", E::NotAuthority),
            ("[::1]:22", E::Ipv6),
            ("[1234.maint.example.com]:22", E::Ipv6),
            ("::1:22", E::Ipv6),
            ("1234.maint.example.com:22:22", E::Ipv6),
            (":22", E::EmptyHost),
            (".:22", E::EmptyHost),
            ("1234..maint.example.com:22", E::EmptyLabel),
            (".1234.maint.example.com:22", E::EmptyLabel),
            ("1234.maint.example.com..:22", E::EmptyLabel),
            (&long_label, E::LabelTooLong),
            (&long_host, E::HostTooLong),
            ("1234 .maint.example.com:22", E::BadChar),
            ("user@1234.maint.example.com:22", E::BadChar),
            ("1234.maint.example.org:22", E::NotMaintDomain),
            ("1234.example.com:22", E::NotMaintDomain),
            ("1234maint.example.com:22", E::NotMaintDomain),
            ("1234.xmaint.example.com:22", E::NotMaintDomain),
            ("localhost:22", E::NotMaintDomain),
            ("127.0.0.1:22", E::NotMaintDomain),
            ("maint.example.com:22", E::NameMissing),
            ("MAINT.example.com.:22", E::NameMissing),
            ("-x.maint.example.com:22", E::EmptyPart),
            ("1234-.maint.example.com:22", E::EmptyPart),
            ("1234--x.maint.example.com:22", E::EmptyPart),
            ("1234-x--10.0.0.1.maint.example.com:22", E::EmptyPart),
            ("1234-x-.maint.example.com:22", E::EmptyPart),
            ("12_34.maint.example.com:22", E::BadCustomer),
            ("1234.x.maint.example.com:22", E::BadCustomer),
            ("1234-a.b-10.0.0.1.maint.example.com:22", E::BadSystem),
            ("1234-127.1.maint.example.com:22", E::Ipv4Parts),
            ("1234-1.2.3.maint.example.com:22", E::Ipv4Parts),
            ("1234-1.2.3.4.5.maint.example.com:22", E::Ipv4Parts),
            ("1234-0x7f.1.maint.example.com:22", E::Ipv4NotDecimal),
            ("1234-0x7f.0.0.1.maint.example.com:22", E::Ipv4NotDecimal),
            ("1234-ipo2.x.maint.example.com:22", E::Ipv4NotDecimal),
            ("1234-010.0.0.1.maint.example.com:22", E::Ipv4LeadingZero),
            ("1234-0127.0.0.1.maint.example.com:22", E::Ipv4LeadingZero),
            ("1234-10.0.0.00.maint.example.com:22", E::Ipv4LeadingZero),
            ("1234-1.2.3.256.maint.example.com:22", E::Ipv4Range),
            ("1234-1.2.3.1000.maint.example.com:22", E::Ipv4Range),
        ];
        for (input, want) in &cases {
            assert_eq!(
                parse_target(input, DOM),
                Err(want.clone()),
                "input {input:?}"
            );
        }
        assert_eq!(cases.len(), 62);
    }

    #[test]
    fn length_limits_are_inclusive() {
        // A 63-char label is fine, 64 is not.
        let label63 = format!("{}.maint.example.com:22", "a".repeat(63));
        assert!(parse_target(&label63, DOM).is_ok());
        // With a long configured domain, a 253-char host is fine (254 with
        // the trailing dot), and one more character is too long.
        let domain = ["d".repeat(63), "e".repeat(63), "f".repeat(62)].join(".");
        let name_len = 253 - domain.len() - 1;
        let name = format!("c-{}", "s".repeat(name_len - 2));
        let host = format!("{name}.{domain}");
        assert_eq!(host.len(), 253);
        let want = dest("c", Some(&"s".repeat(name_len - 2)), None, 22);
        assert_eq!(
            parse_target(&format!("{host}:22"), &domain).as_ref(),
            Ok(&want)
        );
        assert_eq!(
            parse_target(&format!("{host}.:22"), &domain).as_ref(),
            Ok(&want)
        );
        let too_long = format!("{name}.x{domain}:22");
        assert_eq!(
            parse_target(&too_long, &domain),
            Err(DestError::HostTooLong)
        );
    }

    #[test]
    fn host_is_canonical() {
        let d = dest("1234", Some("ipo2"), Some([10, 0, 0, 5]), 22);
        assert_eq!(d.host(DOM), "1234-ipo2-10.0.0.5.maint.example.com");
        assert_eq!(
            dest("1234", None, None, 22).host(DOM),
            "1234.maint.example.com"
        );
        assert_eq!(d.to_string(), "1234/ipo2/10.0.0.5:22");
    }

    #[test]
    fn reasons_are_ascii_phrases() {
        use DestError as E;
        let all = [
            E::Empty,
            E::NonAscii,
            E::ControlChar,
            E::NotAuthority,
            E::Ipv6,
            E::MissingPort,
            E::PortSignOrSpace,
            E::PortNotNumeric,
            E::PortLeadingZero,
            E::PortZero,
            E::PortTooLarge,
            E::EmptyHost,
            E::HostTooLong,
            E::BadChar,
            E::EmptyLabel,
            E::LabelTooLong,
            E::NotMaintDomain,
            E::NameMissing,
            E::EmptyPart,
            E::BadCustomer,
            E::CustomerTooLong,
            E::BadSystem,
            E::SystemTooLong,
            E::Ipv4NotDecimal,
            E::Ipv4Parts,
            E::Ipv4LeadingZero,
            E::Ipv4Range,
        ];
        let mut seen = std::collections::HashSet::new();
        for e in &all {
            let r = e.reason();
            assert!(r.starts_with("Bad destination: "), "{r}");
            assert!(r.bytes().all(|b| (0x20..0x7f).contains(&b)), "{r}");
            assert!(seen.insert(r), "duplicate reason {r}");
        }
        assert_eq!(seen.len(), 27);
    }

    fn arb_destination() -> impl Strategy<Value = Destination> {
        let customer = "[a-z0-9]{1,20}";
        let system = proptest::option::of("[a-z0-9_]{1,8}(-[a-z0-9_]{1,8}){0,3}");
        let ip = proptest::option::of(any::<u32>().prop_map(Ipv4Addr::from));
        (customer, system, ip, 1u16..=65535).prop_map(|(customer, system, ip, port)| Destination {
            customer,
            system,
            ip,
            port,
        })
    }

    proptest! {
        #[test]
        fn round_trip(d in arb_destination()) {
            let target = format!("{}:{}", d.host(DOM), d.port);
            prop_assert_eq!(parse_target(&target, DOM), Ok(d.clone()));
            // Upper case and a trailing dot parse to the same destination.
            let upper = format!("{}.:{}", d.host(DOM).to_ascii_uppercase(), d.port);
            prop_assert_eq!(parse_target(&upper, DOM), Ok(d));
        }

        #[test]
        fn never_panics(s in "\\PC*") {
            let _ = parse_target(&s, DOM);
        }

        #[test]
        fn never_panics_near_grammar(s in "[0-9a-zA-Z.:\\-_\\[\\]/ +]{0,80}") {
            if let Err(e) = parse_target(&s, DOM) {
                prop_assert!(e.reason().is_ascii());
            }
        }

        #[test]
        fn never_panics_any_chars(s in any::<String>()) {
            let _ = parse_target(&s, DOM);
        }
    }
}
