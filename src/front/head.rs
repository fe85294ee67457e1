//! Strict HTTP/1.1 request-head parser for the client-facing front.
//!
//! The front reads bytes into a buffer and calls [`parse_head`] after each
//! read until it returns a head or an error. The parser is pure (no I/O) and
//! deliberately stricter than RFC 9112 allows a server to be: anything a
//! proxy in front of us, or the target behind us, could read differently is
//! rejected (security.md point 10), and the caller closes the connection:
//!
//! - every line ends with CRLF; a bare LF or a lone CR is an error;
//! - the request line is `METHOD SP target SP HTTP/1.x` with single spaces;
//! - header names are tokens with no space before the colon; values are
//!   visible ASCII, space and tab; obs-fold is rejected;
//! - security-relevant headers may appear once only;
//! - a `CONNECT` must not carry a body (`Content-Length` or
//!   `Transfer-Encoding`).
//!
//! Bytes after the head (pipelined by the client) are never consumed: the
//! returned length covers the head only, so the caller can see them and
//! refuse to forward them.

/// Default cap on the request head, request line and final CRLF included.
pub const MAX_HEAD_BYTES: usize = 8192;
/// Default cap on the number of header lines.
pub const MAX_HEADERS: usize = 64;

/// Headers that may appear at most once. Two copies of any of them could be
/// read differently by two parties (request smuggling, credential
/// confusion), so a duplicate is an error rather than "first wins".
const SINGLETON_HEADERS: [&str; 7] = [
    "Proxy-Authorization",
    "Host",
    "Content-Length",
    "Transfer-Encoding",
    "Upgrade",
    "Sec-WebSocket-Key",
    "Authorization",
];

/// Resource caps applied while parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest head accepted, in bytes, terminating blank line included;
    /// bounds the buffer a slow or hostile client can make us hold.
    pub max_head_bytes: usize,
    /// Most header lines accepted; bounds the work per request.
    pub max_headers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_head_bytes: MAX_HEAD_BYTES,
            max_headers: MAX_HEADERS,
        }
    }
}

/// The HTTP version in the request line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// `HTTP/1.0`
    Http10,
    /// `HTTP/1.1`
    Http11,
}

impl Version {
    /// The version as it appears on the wire.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http10 => "HTTP/1.0",
            Self::Http11 => "HTTP/1.1",
        }
    }
}

/// A parsed request head. Owns its strings, so the read buffer can be
/// reused or dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// Method, case preserved (methods are case-sensitive).
    pub method: String,
    /// Request-target exactly as sent (authority-form for `CONNECT`).
    pub target: String,
    /// Protocol version.
    pub version: Version,
    /// Header lines in order: name as sent, value with surrounding
    /// whitespace removed. Private so lookups go through the
    /// case-insensitive accessors.
    headers: Vec<(String, String)>,
}

impl RequestHead {
    /// Whether this is a `CONNECT` request.
    #[must_use]
    pub fn is_connect(&self) -> bool {
        self.method == "CONNECT"
    }

    /// The value of the first header named `name` (case-insensitive).
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// All headers in order, as `(name, value)`.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &str)> {
        self.headers.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// How many headers are named `name` (case-insensitive).
    #[must_use]
    pub fn header_count(&self, name: &str) -> usize {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .count()
    }

    /// Number of header lines.
    #[must_use]
    pub fn len(&self) -> usize {
        self.headers.len()
    }

    /// Whether the head has no header lines.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.headers.is_empty()
    }
}

/// Why a request head was rejected. Every variant means "answer 400 (or
/// 431 for the size caps) and close the connection".
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum HeadError {
    /// The head did not end within `max_head_bytes`.
    #[error("request head too large")]
    TooLarge,
    /// More than `max_headers` header lines.
    #[error("too many headers")]
    TooManyHeaders,
    /// An LF not preceded by CR.
    #[error("bare LF in request head")]
    BareLf,
    /// A CR not followed by LF.
    #[error("bare CR in request head")]
    BareCr,
    /// A byte >= 0x80 anywhere in the head.
    #[error("non-ASCII byte in request head")]
    NonAscii,
    /// A control character in a header value (tab excepted).
    #[error("control character in header value")]
    ControlChar,
    /// Malformed request line (spacing, method, target).
    #[error("malformed request line")]
    BadRequestLine,
    /// A version other than HTTP/1.0 or HTTP/1.1.
    #[error("unsupported HTTP version")]
    BadVersion,
    /// Malformed header line (no colon, bad name, space before colon).
    #[error("malformed header line")]
    BadHeader,
    /// A header line starting with whitespace (obsolete line folding).
    #[error("obsolete header line folding")]
    ObsFold,
    /// A header that must be unique appears more than once.
    #[error("duplicate {0} header")]
    DuplicateHeader(&'static str),
    /// Both `Content-Length` and `Transfer-Encoding` are present.
    #[error("both Content-Length and Transfer-Encoding")]
    LengthAndEncoding,
    /// A `CONNECT` carrying `Content-Length` or `Transfer-Encoding`.
    #[error("CONNECT with a body")]
    BodyOnConnect,
}

impl HeadError {
    /// A short ASCII HTTP reason phrase for the error answer.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge => "Bad request: header too large",
            Self::TooManyHeaders => "Bad request: too many headers",
            Self::BareLf => "Bad request: line must end with CRLF",
            Self::BareCr => "Bad request: CR without LF",
            Self::NonAscii => "Bad request: non-ASCII byte in head",
            Self::ControlChar => "Bad request: control character in header",
            Self::BadRequestLine => "Bad request: malformed request line",
            Self::BadVersion => "Bad request: HTTP/1.1 or HTTP/1.0 only",
            Self::BadHeader => "Bad request: malformed header line",
            Self::ObsFold => "Bad request: folded header line",
            Self::DuplicateHeader(name) => duplicate_reason(name),
            Self::LengthAndEncoding => "Bad request: both Content-Length and Transfer-Encoding",
            Self::BodyOnConnect => "Bad request: CONNECT must not have a body",
        }
    }
}

fn duplicate_reason(name: &str) -> &'static str {
    match name {
        "Proxy-Authorization" => "Bad request: duplicate Proxy-Authorization",
        "Host" => "Bad request: duplicate Host",
        "Content-Length" => "Bad request: duplicate Content-Length",
        "Transfer-Encoding" => "Bad request: duplicate Transfer-Encoding",
        "Upgrade" => "Bad request: duplicate Upgrade",
        "Sec-WebSocket-Key" => "Bad request: duplicate Sec-WebSocket-Key",
        "Authorization" => "Bad request: duplicate Authorization",
        _ => "Bad request: duplicate header",
    }
}

/// Index just after the first `\r\n\r\n` in `buf`, if any.
#[must_use]
pub fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Parses the request head at the start of `buf`.
///
/// Returns `Ok(None)` when the head is not complete yet and more bytes may
/// complete it, and `Ok(Some((head, consumed)))` once it is, where
/// `consumed` is the length of the head including the blank line. Bytes in
/// `buf[consumed..]` are left alone.
///
/// Line-ending problems are reported as soon as they are seen, even before
/// the head is complete, so a client that sends bare LFs is not left
/// waiting for a `\r\n\r\n` that will never come.
///
/// # Errors
///
/// [`HeadError::TooLarge`] when `buf` holds `limits.max_head_bytes` bytes or
/// more without a complete head; otherwise the [`HeadError`] naming the
/// first violation of the rules in the module documentation.
pub fn parse_head(buf: &[u8], limits: &Limits) -> Result<Option<(RequestHead, usize)>, HeadError> {
    let window = &buf[..buf.len().min(limits.max_head_bytes)];
    let Some(end) = find_head_end(window) else {
        check_line_endings(window)?;
        if buf.len() >= limits.max_head_bytes {
            return Err(HeadError::TooLarge);
        }
        return Ok(None);
    };
    let head = &window[..end];
    check_line_endings(head)?;
    if head.iter().any(|b| !b.is_ascii()) {
        return Err(HeadError::NonAscii);
    }
    // `head` ends with CRLF CRLF and has no other lone CR or LF, so
    // splitting on CRLF yields exactly the lines.
    let body = &head[..end - 4];
    let mut lines = split_crlf(body);
    let request_line = lines.next().ok_or(HeadError::BadRequestLine)?;
    let (method, target, version) = parse_request_line(request_line)?;

    let mut headers = Vec::new();
    for line in lines {
        if headers.len() >= limits.max_headers {
            return Err(HeadError::TooManyHeaders);
        }
        headers.push(parse_header_line(line)?);
    }
    let head = RequestHead {
        method,
        target,
        version,
        headers,
    };
    check_headers(&head)?;
    Ok(Some((head, end)))
}

/// Every LF must follow a CR and every CR must precede an LF. A CR as the
/// very last byte is allowed: its LF may still be on the way.
fn check_line_endings(buf: &[u8]) -> Result<(), HeadError> {
    let mut prev_cr = false;
    for &b in buf {
        match b {
            b'\n' if !prev_cr => return Err(HeadError::BareLf),
            _ if prev_cr && b != b'\n' => return Err(HeadError::BareCr),
            _ => {}
        }
        prev_cr = b == b'\r';
    }
    Ok(())
}

/// Splits on CRLF. An empty input yields one empty line.
fn split_crlf(buf: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(buf);
    std::iter::from_fn(move || {
        let cur = rest?;
        match cur.windows(2).position(|w| w == b"\r\n") {
            Some(i) => {
                rest = cur.get(i + 2..);
                cur.get(..i)
            }
            None => {
                rest = None;
                Some(cur)
            }
        }
    })
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_token(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().copied().all(is_tchar)
}

/// Bytes are ASCII here (checked by the caller), so this cannot fail in
/// practice; it still returns an error rather than panicking.
fn ascii_string(bytes: &[u8], err: HeadError) -> Result<String, HeadError> {
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| err)
}

fn parse_request_line(line: &[u8]) -> Result<(String, String, Version), HeadError> {
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HeadError::BadRequestLine);
    };
    if !is_token(method) {
        return Err(HeadError::BadRequestLine);
    }
    if target.is_empty() || !target.iter().all(|&b| (0x21..0x7f).contains(&b)) {
        return Err(HeadError::BadRequestLine);
    }
    let version = match version {
        b"HTTP/1.1" => Version::Http11,
        b"HTTP/1.0" => Version::Http10,
        _ => return Err(HeadError::BadVersion),
    };
    Ok((
        ascii_string(method, HeadError::BadRequestLine)?,
        ascii_string(target, HeadError::BadRequestLine)?,
        version,
    ))
}

fn parse_header_line(line: &[u8]) -> Result<(String, String), HeadError> {
    if matches!(line.first(), Some(b' ' | b'\t')) {
        return Err(HeadError::ObsFold);
    }
    let colon = line
        .iter()
        .position(|&b| b == b':')
        .ok_or(HeadError::BadHeader)?;
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    if !is_token(name) {
        return Err(HeadError::BadHeader);
    }
    if value.iter().any(|&b| b != b'\t' && b.is_ascii_control()) {
        return Err(HeadError::ControlChar);
    }
    let value = trim_ows(value);
    Ok((
        ascii_string(name, HeadError::BadHeader)?,
        ascii_string(value, HeadError::BadHeader)?,
    ))
}

fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

fn check_headers(head: &RequestHead) -> Result<(), HeadError> {
    for name in SINGLETON_HEADERS {
        if head.header_count(name) > 1 {
            return Err(HeadError::DuplicateHeader(name));
        }
    }
    let has_length = head.header_count("Content-Length") > 0;
    let has_encoding = head.header_count("Transfer-Encoding") > 0;
    if head.is_connect() && (has_length || has_encoding) {
        return Err(HeadError::BodyOnConnect);
    }
    if has_length && has_encoding {
        return Err(HeadError::LengthAndEncoding);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(buf: &[u8]) -> Result<Option<(RequestHead, usize)>, HeadError> {
        parse_head(buf, &Limits::default())
    }

    const PROXYTUNNEL: &[u8] = b"CONNECT 1234.maint.example.com:22 HTTP/1.1\r\n\
Host: maint.example.com\r\n\
Proxy-Authorization: Basic dXNlcjpwYXNz\r\n\
Proxy-Connection: Keep-Alive\r\n\r\n";

    #[test]
    fn proxytunnel_head() {
        let (head, consumed) = parse(PROXYTUNNEL).unwrap().unwrap();
        assert_eq!(consumed, PROXYTUNNEL.len());
        assert_eq!(head.method, "CONNECT");
        assert!(head.is_connect());
        assert_eq!(head.target, "1234.maint.example.com:22");
        assert_eq!(head.version, Version::Http11);
        assert_eq!(head.header("host"), Some("maint.example.com"));
        assert_eq!(
            head.header("PROXY-AUTHORIZATION"),
            Some("Basic dXNlcjpwYXNz")
        );
        assert_eq!(head.header("X-Missing"), None);
        assert_eq!(head.len(), 3);
        let names: Vec<&str> = head.headers().map(|(n, _)| n).collect();
        assert_eq!(names, ["Host", "Proxy-Authorization", "Proxy-Connection"]);
    }

    /// `Ok(Some(n))` = complete with `n` header lines and `consumed` equal to
    /// the head length, `Ok(None)` = partial.
    type Want = Result<Option<usize>, HeadError>;

    #[test]
    fn table() {
        use HeadError as E;
        let cases: &[(&[u8], Want)] = &[
            // Good heads.
            (b"CONNECT a:1 HTTP/1.1\r\n\r\n", Ok(Some(0))),
            (b"CONNECT a:1 HTTP/1.0\r\n\r\n", Ok(Some(0))),
            (b"CONNECT a:1 HTTP/1.1\r\nHost: a\r\n\r\n", Ok(Some(1))),
            (b"CONNECT a:1 HTTP/1.1\r\nHost:a\r\n\r\n", Ok(Some(1))),
            (b"CONNECT a:1 HTTP/1.1\r\nHost: \t a \t\r\n\r\n", Ok(Some(1))),
            (b"CONNECT a:1 HTTP/1.1\r\nX-Empty:\r\n\r\n", Ok(Some(1))),
            (b"CONNECT a:1 HTTP/1.1\r\nX: a\tb c\r\n\r\n", Ok(Some(1))),
            (b"GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n", Ok(Some(1))),
            (b"POST /x HTTP/1.1\r\nContent-Length: 3\r\n\r\n", Ok(Some(1))),
            (b"CONNECT a:1 HTTP/1.1\r\nVia: 1\r\nVia: 2\r\n\r\n", Ok(Some(2))),
            // Partial.
            (b"", Ok(None)),
            (b"C", Ok(None)),
            (b"CONNECT a:1 HTTP/1.1\r", Ok(None)),
            (b"CONNECT a:1 HTTP/1.1\r\n", Ok(None)),
            (b"CONNECT a:1 HTTP/1.1\r\nHost: a\r\n\r", Ok(None)),
            // Line endings.
            (b"CONNECT a:1 HTTP/1.1\n\n", Err(E::BareLf)),
            (b"CONNECT a:1 HTTP/1.1\n", Err(E::BareLf)),
            (b"CONNECT a:1 HTTP/1.1\r\nHost: a\n\r\n", Err(E::BareLf)),
            (b"CONNECT a:1 HTTP/1.1\r\nHost: a\r\n\n", Err(E::BareLf)),
            (b"CONNECT a:1 HTTP/1.1\r\r\n\r\n", Err(E::BareCr)),
            (b"CONNECT a:1 HTTP/1.1\r\nHost: a\rb\r\n\r\n", Err(E::BareCr)),
            (b"CONNECT a:1\rHTTP/1.1", Err(E::BareCr)),
            // Request line.
            (b"\r\n\r\n", Err(E::BadRequestLine)),
            (b"\r\nCONNECT a:1 HTTP/1.1\r\n\r\n", Err(E::BadRequestLine)),
            (b"CONNECT  a:1 HTTP/1.1\r\n\r\n", Err(E::BadRequestLine)),
            (b"CONNECT a:1  HTTP/1.1\r\n\r\n", Err(E::BadRequestLine)),
            (b" CONNECT a:1 HTTP/1.1\r\n\r\n", Err(E::BadRequestLine)),
            (b"CONNECT a:1 HTTP/1.1 \r\n\r\n", Err(E::BadRequestLine)),
            (b"CONNECT\ta:1 HTTP/1.1\r\n\r\n", Err(E::BadRequestLine)),
            (b"CONNECT a:1\r\n\r\n", Err(E::BadRequestLine)),
            (b"CONNECT a 1 HTTP/1.1\r\n\r\n", Err(E::BadRequestLine)),
            (b"CONN(ECT a:1 HTTP/1.1\r\n\r\n", Err(E::BadRequestLine)),
            (b"CONNECT a\x01:1 HTTP/1.1\r\n\r\n", Err(E::BadRequestLine)),
            (b"CONNECT \xc3\xa9:1 HTTP/1.1\r\n\r\n", Err(E::NonAscii)),
            (b"CONNECT a:1 HTTP/2.0\r\n\r\n", Err(E::BadVersion)),
            (b"CONNECT a:1 HTTP/1.2\r\n\r\n", Err(E::BadVersion)),
            (b"CONNECT a:1 http/1.1\r\n\r\n", Err(E::BadVersion)),
            (b"CONNECT a:1 HTTP/1.10\r\n\r\n", Err(E::BadVersion)),
            // Header lines.
            (b"CONNECT a:1 HTTP/1.1\r\nHost a\r\n\r\n", Err(E::BadHeader)),
            (b"CONNECT a:1 HTTP/1.1\r\nHost : a\r\n\r\n", Err(E::BadHeader)),
            (b"CONNECT a:1 HTTP/1.1\r\n: a\r\n\r\n", Err(E::BadHeader)),
            (b"CONNECT a:1 HTTP/1.1\r\nHo(st: a\r\n\r\n", Err(E::BadHeader)),
            (b"CONNECT a:1 HTTP/1.1\r\nHo\x01st: a\r\n\r\n", Err(E::BadHeader)),
            (b"CONNECT a:1 HTTP/1.1\r\nHost: a\x00b\r\n\r\n", Err(E::ControlChar)),
            (b"CONNECT a:1 HTTP/1.1\r\nHost: a\x7f\r\n\r\n", Err(E::ControlChar)),
            (b"CONNECT a:1 HTTP/1.1\r\nHost: \xff\r\n\r\n", Err(E::NonAscii)),
            (b"CONNECT a:1 HTTP/1.1\r\nH\xc3\xa9: a\r\n\r\n", Err(E::NonAscii)),
            (b"CONNECT a:1 HTTP/1.1\r\nX: a\r\n b\r\n\r\n", Err(E::ObsFold)),
            (b"CONNECT a:1 HTTP/1.1\r\nX: a\r\n\tb\r\n\r\n", Err(E::ObsFold)),
            (b"CONNECT a:1 HTTP/1.1\r\n Host: a\r\n\r\n", Err(E::ObsFold)),
            // Duplicates (case-insensitive).
            (
                b"CONNECT a:1 HTTP/1.1\r\nProxy-Authorization: Basic a\r\nproxy-authorization: Basic b\r\n\r\n",
                Err(E::DuplicateHeader("Proxy-Authorization")),
            ),
            (
                b"CONNECT a:1 HTTP/1.1\r\nHost: a\r\nHOST: a\r\n\r\n",
                Err(E::DuplicateHeader("Host")),
            ),
            (
                b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
                Err(E::DuplicateHeader("Content-Length")),
            ),
            (
                b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                Err(E::DuplicateHeader("Transfer-Encoding")),
            ),
            (
                b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nUpgrade: h2c\r\n\r\n",
                Err(E::DuplicateHeader("Upgrade")),
            ),
            (
                b"GET / HTTP/1.1\r\nSec-WebSocket-Key: a\r\nsec-websocket-key: b\r\n\r\n",
                Err(E::DuplicateHeader("Sec-WebSocket-Key")),
            ),
            (
                b"GET / HTTP/1.1\r\nAuthorization: a\r\nAuthorization: a\r\n\r\n",
                Err(E::DuplicateHeader("Authorization")),
            ),
            // Bodies.
            (
                b"CONNECT a:1 HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
                Err(E::BodyOnConnect),
            ),
            (
                b"CONNECT a:1 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                Err(E::BodyOnConnect),
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                Err(E::LengthAndEncoding),
            ),
        ];
        for (input, want) in cases {
            let got = parse(input).map(|r| {
                r.map(|(head, consumed)| {
                    assert_eq!(
                        consumed,
                        input.len(),
                        "{:?}",
                        String::from_utf8_lossy(input)
                    );
                    head.len()
                })
            });
            assert_eq!(&got, want, "input {:?}", String::from_utf8_lossy(input));
        }
        assert_eq!(cases.len(), 60);
    }

    #[test]
    fn split_across_two_reads() {
        let (first, second) = PROXYTUNNEL.split_at(30);
        let mut buf = first.to_vec();
        assert_eq!(parse(&buf), Ok(None));
        buf.extend_from_slice(second);
        let (head, consumed) = parse(&buf).unwrap().unwrap();
        assert_eq!(consumed, PROXYTUNNEL.len());
        assert_eq!(head.target, "1234.maint.example.com:22");
        // Every split point gives Partial, then the same head.
        for i in 0..PROXYTUNNEL.len() {
            assert_eq!(parse(&PROXYTUNNEL[..i]), Ok(None), "prefix {i}");
        }
    }

    #[test]
    fn pipelined_bytes_are_not_consumed() {
        let mut buf = PROXYTUNNEL.to_vec();
        buf.extend_from_slice(b"SSH-2.0-OpenSSH_9.2\r\n");
        let (_, consumed) = parse(&buf).unwrap().unwrap();
        assert_eq!(consumed, PROXYTUNNEL.len());
        assert_eq!(&buf[consumed..], b"SSH-2.0-OpenSSH_9.2\r\n");
        // Garbage after the head, even bare LFs, is not looked at.
        let mut buf = PROXYTUNNEL.to_vec();
        buf.extend_from_slice(b"\n\x00\xff");
        assert_eq!(parse(&buf).unwrap().unwrap().1, PROXYTUNNEL.len());
    }

    #[test]
    fn size_limits() {
        let limits = Limits::default();
        // A head of exactly max_head_bytes is accepted.
        let prefix = b"CONNECT a:1 HTTP/1.1\r\nX: ";
        let filler = MAX_HEAD_BYTES - prefix.len() - 4;
        let mut exact = prefix.to_vec();
        exact.extend(std::iter::repeat_n(b'a', filler));
        exact.extend_from_slice(b"\r\n\r\n");
        assert_eq!(exact.len(), MAX_HEAD_BYTES);
        assert!(parse_head(&exact, &limits).unwrap().is_some());
        // One byte more is too large, complete or not.
        let mut over = prefix.to_vec();
        over.extend(std::iter::repeat_n(b'a', filler + 1));
        over.extend_from_slice(b"\r\n\r\n");
        assert_eq!(parse_head(&over, &limits), Err(HeadError::TooLarge));
        assert_eq!(
            parse_head(&over[..MAX_HEAD_BYTES], &limits),
            Err(HeadError::TooLarge)
        );
        assert_eq!(parse_head(&over[..MAX_HEAD_BYTES - 1], &limits), Ok(None));
        // A huge unterminated buffer.
        let huge = vec![b'a'; 1 << 20];
        assert_eq!(parse_head(&huge, &limits), Err(HeadError::TooLarge));
        // Small custom limit.
        let small = Limits {
            max_head_bytes: 16,
            max_headers: 1,
        };
        assert_eq!(parse_head(PROXYTUNNEL, &small), Err(HeadError::TooLarge));
    }

    #[test]
    fn header_count_limit() {
        let limits = Limits {
            max_head_bytes: MAX_HEAD_BYTES,
            max_headers: 3,
        };
        let ok = b"CONNECT a:1 HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n";
        assert_eq!(parse_head(ok, &limits).unwrap().unwrap().0.len(), 3);
        let over = b"CONNECT a:1 HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n";
        assert_eq!(parse_head(over, &limits), Err(HeadError::TooManyHeaders));
        let mut many = b"CONNECT a:1 HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(parse(&many), Err(HeadError::TooManyHeaders));
    }

    #[test]
    fn header_lookup() {
        let (head, _) = parse(b"CONNECT a:1 HTTP/1.1\r\nVia: 1\r\nvia: 2\r\nHost: h \r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(head.header("VIA"), Some("1"));
        assert_eq!(head.header_count("Via"), 2);
        assert_eq!(head.header_count("host"), 1);
        assert_eq!(head.header("Host"), Some("h"));
        assert_eq!(head.header_count("Nope"), 0);
    }

    #[test]
    fn reasons_are_ascii_phrases() {
        use HeadError as E;
        let mut all = vec![
            E::TooLarge,
            E::TooManyHeaders,
            E::BareLf,
            E::BareCr,
            E::NonAscii,
            E::ControlChar,
            E::BadRequestLine,
            E::BadVersion,
            E::BadHeader,
            E::ObsFold,
            E::LengthAndEncoding,
            E::BodyOnConnect,
        ];
        all.extend(SINGLETON_HEADERS.iter().map(|n| E::DuplicateHeader(n)));
        let mut seen = std::collections::HashSet::new();
        for e in &all {
            let r = e.reason();
            assert!(r.starts_with("Bad request: "), "{r}");
            assert!(r.bytes().all(|b| (0x20..0x7f).contains(&b)), "{r}");
            assert!(seen.insert(r), "duplicate reason {r}");
        }
        assert_eq!(seen.len(), 19);
    }

    proptest! {
        #[test]
        fn never_panics(buf in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse(&buf);
        }

        #[test]
        fn never_panics_near_grammar(
            buf in proptest::collection::vec(
                proptest::sample::select(b"CONECT a:1HTP/.\r\n \t:x\x00\xff".to_vec()),
                0..200,
            )
        ) {
            if let Ok(Some((_, consumed))) = parse(&buf) {
                prop_assert!(buf[..consumed].ends_with(b"\r\n\r\n"));
            }
        }

        #[test]
        fn any_split_gives_same_head(split in 0usize..PROXYTUNNEL.len()) {
            let mut buf = PROXYTUNNEL[..split].to_vec();
            prop_assert_eq!(parse(&buf), Ok(None));
            buf.extend_from_slice(&PROXYTUNNEL[split..]);
            prop_assert!(parse(&buf).unwrap().is_some());
        }
    }
}
