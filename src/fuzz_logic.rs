//! Fuzz target bodies, kept in the library so they build and are checked
//! with the rest of the crate (the linkerd habit). The `fuzz/` package only
//! forwards bytes here.
//!
//! Each function feeds arbitrary bytes to a network-facing parser and
//! asserts invariants that must hold for every input. A failed assertion
//! is a bug in the parser, which is why these functions panic on purpose.
//! Not part of the public API.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use crate::dest::{parse_target, Destination};
use crate::front::basic::{decode_basic, Credentials, MAX_CREDENTIAL_BYTES};
use crate::front::head::{find_head_end, parse_head, Limits, RequestHead};

/// The maint domain the fuzzers use.
const DOMAIN: &str = "maint.example.com";

/// Destination grammar: any parse result is canonical and stable.
pub fn dest(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    check_dest(&text);
}

fn check_dest(text: &str) {
    match parse_target(text, DOMAIN) {
        Ok(d) => check_destination(&d, text),
        Err(e) => {
            let reason = e.reason();
            assert!(reason.starts_with("Bad destination: "), "{reason}");
            assert!(reason.bytes().all(|b| (0x20..0x7f).contains(&b)));
            // Case never changes the verdict.
            assert_eq!(
                parse_target(&text.to_ascii_uppercase(), DOMAIN).err(),
                parse_target(&text.to_ascii_lowercase(), DOMAIN).err(),
                "{text:?}"
            );
        }
    }
}

fn check_destination(d: &Destination, text: &str) {
    assert!(!d.customer.is_empty());
    assert!(d
        .customer
        .bytes()
        .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase()));
    if let Some(system) = &d.system {
        assert!(!system.is_empty());
        assert!(system
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase() || b == b'-' || b == b'_'));
        assert!(!system.starts_with('-') && !system.ends_with('-'));
    }
    assert_ne!(d.port, 0);
    let host = d.host(DOMAIN);
    assert!(host.ends_with(".maint.example.com"));
    // The canonical form re-parses to the same destination, in any case
    // and with a trailing dot.
    let canonical = format!("{host}:{}", d.port);
    assert_eq!(parse_target(&canonical, DOMAIN).as_ref(), Ok(d), "{text:?}");
    let upper = format!("{}.:{}", host.to_ascii_uppercase(), d.port);
    assert_eq!(parse_target(&upper, DOMAIN).as_ref(), Ok(d), "{text:?}");
    // The input differs from the canonical form only in case and the
    // trailing dot: no other spelling reaches the same destination.
    let plain = text.to_ascii_lowercase().replacen(".:", ":", 1);
    assert_eq!(plain, canonical, "{text:?}");
}

/// CONNECT head: complete heads are stable under re-parsing, splitting and
/// trailing bytes, and never hold CR or LF in their fields.
pub fn connect_head(data: &[u8]) {
    let limits = Limits::default();
    match parse_head(data, &limits) {
        Ok(None) => {
            assert!(data.len() < limits.max_head_bytes);
            assert_eq!(find_head_end(data), None);
        }
        Ok(Some((head, consumed))) => {
            check_head(data, &head, consumed, &limits);
            if head.is_connect() {
                check_dest(&head.target);
            }
            if let Some(value) = head.header("Proxy-Authorization") {
                check_basic_value(value);
            }
        }
        Err(e) => {
            let reason = e.reason();
            assert!(reason.starts_with("Bad request: "), "{reason}");
            assert!(reason.bytes().all(|b| (0x20..0x7f).contains(&b)));
        }
    }
    // Tight limits must never panic either.
    let tight = Limits {
        max_head_bytes: 64,
        max_headers: 2,
    };
    if let Ok(Some((_, consumed))) = parse_head(data, &tight) {
        assert!(consumed <= 64);
    }
}

fn check_head(data: &[u8], head: &RequestHead, consumed: usize, limits: &Limits) {
    assert!(consumed <= data.len() && consumed <= limits.max_head_bytes);
    assert_eq!(find_head_end(data), Some(consumed));
    let raw = &data[..consumed];
    assert!(head.len() <= limits.max_headers);
    for field in [head.method.as_str(), head.target.as_str()] {
        assert!(!field.is_empty());
        assert!(field.bytes().all(|b| (0x21..0x7f).contains(&b)));
    }
    for (name, value) in head.headers() {
        assert!(!name.is_empty());
        assert!(name.bytes().all(|b| (0x21..0x7f).contains(&b) && b != b':'));
        assert!(value
            .bytes()
            .all(|b| b == b'\t' || (0x20..0x7f).contains(&b)));
        assert!(!value.starts_with([' ', '\t']) && !value.ends_with([' ', '\t']));
    }
    // Re-parsing the head alone, or with trailing bytes, gives the same.
    assert_eq!(parse_head(raw, limits), Ok(Some((head.clone(), consumed))));
    let mut extended = raw.to_vec();
    extended.extend_from_slice(b"\n\r\0garbage\r\n\r\n");
    assert_eq!(
        parse_head(&extended, limits),
        Ok(Some((head.clone(), consumed)))
    );
    // Any strict prefix is incomplete, never an error: the parser does not
    // reject early what it would accept later.
    for cut in [consumed - 1, consumed / 2, 1] {
        assert_eq!(parse_head(&raw[..cut], limits), Ok(None), "cut {cut}");
    }
    // Serialising the parsed head and parsing it again is a fixed point.
    let mut again = format!(
        "{} {} {}\r\n",
        head.method,
        head.target,
        head.version.as_str()
    );
    for (name, value) in head.headers() {
        again.push_str(name);
        again.push_str(": ");
        again.push_str(value);
        again.push_str("\r\n");
    }
    again.push_str("\r\n");
    if again.len() <= limits.max_head_bytes {
        let reparsed = parse_head(again.as_bytes(), limits);
        assert_eq!(reparsed, Ok(Some((head.clone(), again.len()))));
    }
}

/// Basic decoder: anything accepted has a clean user and round-trips
/// through a fresh encoding; raw `user:password` bytes encode and decode
/// back to themselves.
pub fn basic(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    check_basic_value(&text);
    // The input as the raw credential text.
    if let Ok(raw) = std::str::from_utf8(data) {
        let header = format!("Basic {}", STANDARD.encode(raw));
        match decode_basic(&header) {
            Ok(c) => {
                assert_eq!(format!("{}:{}", c.user, c.password), raw);
            }
            Err(_) => {
                let clean_user = raw
                    .split_once(':')
                    .is_some_and(|(u, _)| !u.is_empty() && !u.chars().any(char::is_control));
                assert!(!clean_user || raw.len() > MAX_CREDENTIAL_BYTES, "{raw:?}");
            }
        }
    }
}

fn check_basic_value(value: &str) {
    match decode_basic(value) {
        Ok(c) => check_credentials(&c),
        Err(e) => assert!(e.reason().bytes().all(|b| (0x20..0x7f).contains(&b))),
    }
}

fn check_credentials(c: &Credentials) {
    assert!(!c.user.is_empty());
    assert!(!c.user.contains(':'));
    assert!(!c.user.chars().any(char::is_control));
    assert!(c.user.len() + 1 + c.password.len() <= MAX_CREDENTIAL_BYTES);
    let debug = format!("{c:?}");
    assert!(debug.contains("MASKED"));
    let reencoded = format!(
        "basic {}",
        STANDARD.encode(format!("{}:{}", c.user, c.password))
    );
    let again = decode_basic(&reencoded);
    assert!(
        again
            .as_ref()
            .is_ok_and(|a| a.user == c.user && a.password == c.password),
        "{again:?}"
    );
}

/// Mux frames: decoding never panics, and whatever decodes re-encodes to
/// the same bytes and decodes to the same frames.
pub fn mux_frames(data: &[u8]) {
    use crate::mux::frame::Frame;
    let msg = bytes::Bytes::copy_from_slice(data);
    if let Ok(frames) = Frame::decode_all(msg) {
        let mut out = bytes::BytesMut::new();
        for f in &frames {
            f.encode(&mut out);
        }
        let again = Frame::decode_all(out.freeze()).expect("re-encoded frames decode");
        assert_eq!(again, frames);
    }
}

/// Agent control messages: a HELLO parses or is refused; a parsed HELLO
/// respects every limit and round-trips through JSON.
pub fn hello(data: &[u8]) {
    use crate::policy::{Hello, MAX_SERVICES, MAX_TUNNELS, MAX_VERSION_LEN};
    if let Ok(h) = Hello::parse(data) {
        assert!(!h.version.is_empty() && h.version.len() <= MAX_VERSION_LEN);
        assert!(h.policy.services.len() <= MAX_SERVICES);
        assert!(h.policy.tunnels.len() <= MAX_TUNNELS);
        assert!(!h.policy.services.contains(&0));
        let json = serde_json::to_vec(&h).expect("serializes");
        assert_eq!(Hello::parse(&json).expect("re-parses"), h);
    }
}

/// Config loaders: broker and agent TOML either fail cleanly or validate
/// into settings within their limits.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(file) = toml::from_str::<crate::config::BrokerFile>(text) {
        if let Ok(s) = file.into_settings() {
            assert!(s.limits.max_connections > 0);
            assert!(s.mux.window >= 16 * 1024);
            assert!(!s.domain.is_empty() && s.domain == s.domain.to_ascii_lowercase());
        }
    }
    if let Ok(file) = toml::from_str::<crate::agent::config::AgentFile>(text) {
        let token = crate::secret::Secret::new("t".into());
        if let Ok(s) = crate::agent::AgentSettings::from_parts(
            file,
            "wss://maint.example.com:6443/agent".into(),
            token,
            None,
        ) {
            assert!(s.policy.validate().is_ok());
            assert!(s.reconnect_max >= s.reconnect_min);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seed corpus runs through the fuzz logic as an ordinary test, so
    /// the invariants are checked without a nightly toolchain.
    fn run_corpus(target: &str, f: fn(&[u8])) -> usize {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target);
        let mut count = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            f(&std::fs::read(&path).unwrap());
            count += 1;
        }
        count
    }

    #[test]
    fn seed_corpus_dest() {
        assert!(run_corpus("dest", dest) >= 5);
    }

    #[test]
    fn seed_corpus_connect_head() {
        assert!(run_corpus("connect_head", connect_head) >= 5);
    }

    #[test]
    fn seed_corpus_basic() {
        assert!(run_corpus("basic", basic) >= 5);
    }

    #[test]
    fn seed_corpus_mux_frames() {
        assert!(run_corpus("mux_frames", mux_frames) >= 5);
    }

    #[test]
    fn seed_corpus_hello() {
        assert!(run_corpus("hello", hello) >= 4);
    }

    #[test]
    fn seed_corpus_config() {
        assert!(run_corpus("config", config) >= 4);
    }

    #[test]
    fn small_inputs() {
        for data in [&b""[..], b"\r\n\r\n", b"\xff", b":", b"a:1"] {
            dest(data);
            connect_head(data);
            basic(data);
            mux_frames(data);
            hello(data);
            config(data);
        }
    }
}
