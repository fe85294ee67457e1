//! A minimal HTTP/1.1 server side for the admin listener: one request per
//! connection, then close.
//!
//! The request head goes through the proxy port's strict parser
//! ([`crate::front::head`]): CRLF only, size and header-count caps,
//! duplicate security headers refused. A body needs `Content-Length`
//! (chunked bodies get 411) and is capped at [`Limits::max_body`]. The
//! whole request must arrive within [`Limits::read_timeout`] and the answer
//! leave within [`Limits::write_timeout`], so a slow client cannot hold a
//! connection slot.

use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::front::head::{parse_head, HeadError, Limits as HeadLimits, RequestHead};

/// Caps and deadlines of the admin HTTP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Head caps (bytes, header lines).
    pub head: HeadLimits,
    /// Largest request body accepted.
    pub max_body: usize,
    /// Deadline for the whole request, head and body.
    pub read_timeout: Duration,
    /// Deadline for writing the answer.
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            head: HeadLimits::default(),
            max_body: 64 * 1024,
            read_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// Why no request could be read.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// A malformed or oversized head.
    #[error("bad request head: {0}")]
    Head(#[from] HeadError),
    /// `Content-Length` above [`Limits::max_body`].
    #[error("request body too large")]
    BodyTooLarge,
    /// `Content-Length` is not a plain decimal number.
    #[error("malformed Content-Length")]
    BadLength,
    /// `Transfer-Encoding` (chunked bodies are not accepted).
    #[error("Transfer-Encoding is not accepted; send Content-Length")]
    Chunked,
    /// The request did not arrive within the deadline.
    #[error("request timed out")]
    Timeout,
    /// The client closed (or the socket failed) mid-request.
    #[error("connection closed")]
    Closed,
}

impl HttpError {
    /// The answer for this error, or `None` when nobody is listening.
    #[must_use]
    pub fn reply(&self) -> Option<Reply> {
        let (status, reason) = match self {
            HttpError::Head(HeadError::TooLarge | HeadError::TooManyHeaders) => {
                (431, "Request Header Fields Too Large")
            }
            HttpError::Head(h) => (400, h.reason()),
            HttpError::BodyTooLarge => (413, "Payload Too Large"),
            HttpError::BadLength => (400, "Bad Request"),
            HttpError::Chunked => (411, "Length Required"),
            HttpError::Timeout => (408, "Request Timeout"),
            HttpError::Closed => return None,
        };
        Some(Reply::error(status, reason, &self.to_string()))
    }
}

/// A complete request.
#[derive(Debug, Clone)]
pub struct Request {
    /// The parsed head (method, target, headers).
    pub head: RequestHead,
    /// The path part of the target, not yet percent-decoded.
    pub path: String,
    /// The query part of the target (after `?`), not yet decoded.
    pub query: String,
    /// The body (empty without `Content-Length`).
    pub body: Vec<u8>,
}

/// Read one request from `io`.
///
/// # Errors
/// [`HttpError`] naming what was wrong; [`HttpError::reply`] gives the
/// answer to send before closing.
pub async fn read_request<S>(io: &mut S, limits: &Limits) -> Result<Request, HttpError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let deadline = tokio::time::Instant::now() + limits.read_timeout;
    let mut buf = BytesMut::with_capacity(4096);
    let head = loop {
        if let Some((head, used)) = parse_head(&buf, &limits.head)? {
            buf.advance(used);
            break head;
        }
        if buf.len() >= limits.head.max_head_bytes {
            return Err(HeadError::TooLarge.into());
        }
        read_more(io, &mut buf, deadline).await?;
    };
    if head.header("transfer-encoding").is_some() {
        return Err(HttpError::Chunked);
    }
    let len = match head.header("content-length") {
        None => 0,
        Some(v) if !v.is_empty() && v.len() <= 12 && v.bytes().all(|b| b.is_ascii_digit()) => {
            v.parse::<usize>().map_err(|_| HttpError::BadLength)?
        }
        Some(_) => return Err(HttpError::BadLength),
    };
    if len > limits.max_body {
        return Err(HttpError::BodyTooLarge);
    }
    if len > buf.len()
        && head
            .header("expect")
            .is_some_and(|e| e.eq_ignore_ascii_case("100-continue"))
    {
        let write = async {
            io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
            io.flush().await
        };
        match tokio::time::timeout_at(deadline, write).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(HttpError::Closed),
            Err(_) => return Err(HttpError::Timeout),
        }
    }
    while buf.len() < len {
        read_more(io, &mut buf, deadline).await?;
    }
    // Bytes beyond the body (pipelining) are dropped with the connection.
    let body = buf[..len].to_vec();
    let (path, query) = match head.target.split_once('?') {
        Some((p, q)) => (p.to_owned(), q.to_owned()),
        None => (head.target.clone(), String::new()),
    };
    Ok(Request {
        head,
        path,
        query,
        body,
    })
}

async fn read_more<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    deadline: tokio::time::Instant,
) -> Result<(), HttpError> {
    buf.reserve(4096);
    match tokio::time::timeout_at(deadline, io.read_buf(buf)).await {
        Ok(Ok(0) | Err(_)) => Err(HttpError::Closed),
        Ok(Ok(_)) => Ok(()),
        Err(_) => Err(HttpError::Timeout),
    }
}

/// An answer, written with `Content-Length` and `Connection: close`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Reason phrase (ASCII, no CR/LF).
    pub reason: &'static str,
    /// `Content-Type` of the body.
    pub content_type: &'static str,
    /// Extra headers (names and values are ours, never client text).
    pub headers: Vec<(&'static str, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Reply {
    /// A JSON answer.
    #[must_use]
    pub fn json(status: u16, reason: &'static str, value: &serde_json::Value) -> Reply {
        let mut body = serde_json::to_vec_pretty(value).unwrap_or_else(|_| b"null".to_vec());
        body.push(b'\n');
        Reply {
            status,
            reason,
            content_type: "application/json",
            headers: Vec::new(),
            body,
        }
    }

    /// A JSON error answer: `{"error": message}`.
    #[must_use]
    pub fn error(status: u16, reason: &'static str, message: &str) -> Reply {
        Reply::json(status, reason, &serde_json::json!({ "error": message }))
    }

    /// A plain-text answer.
    #[must_use]
    pub fn text(
        status: u16,
        reason: &'static str,
        content_type: &'static str,
        body: String,
    ) -> Reply {
        Reply {
            status,
            reason,
            content_type,
            headers: Vec::new(),
            body: body.into_bytes(),
        }
    }

    /// Add a header.
    #[must_use]
    pub fn with_header(mut self, name: &'static str, value: String) -> Reply {
        self.headers.push((name, value));
        self
    }

    /// The wire bytes.
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n",
            self.status,
            self.reason,
            self.content_type,
            self.body.len()
        );
        for (k, v) in &self.headers {
            out.push_str(k);
            out.push_str(": ");
            out.push_str(v);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
    }
}

/// Most bytes discarded after the answer (see [`write_reply`]).
const LINGER_BYTES: usize = 256 * 1024;
/// Longest wait for the client to close after the answer.
const LINGER_TIME: Duration = Duration::from_secs(1);

/// Write `reply` and close the write side, within the write deadline.
/// Then linger briefly, discarding what the client still sends (a body we
/// refused, say): closing with unread data would reset the connection and
/// the client could lose the answer.
pub async fn write_reply<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    reply: &Reply,
    limits: &Limits,
) {
    let bytes = reply.to_bytes();
    let written = tokio::time::timeout(limits.write_timeout, async {
        io.write_all(&bytes).await?;
        io.flush().await?;
        io.shutdown().await
    })
    .await;
    if !matches!(written, Ok(Ok(()))) {
        return;
    }
    let _ = tokio::time::timeout(LINGER_TIME, async {
        let mut buf = [0u8; 8192];
        let mut seen = 0usize;
        while seen < LINGER_BYTES {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => seen += n,
            }
        }
    })
    .await;
}

/// Percent-decodes a path segment or query component (`+` is a space in
/// queries only, so callers pass `plus_is_space`). `None` for a malformed
/// escape or a result that is not UTF-8.
#[must_use]
pub fn percent_decode(s: &str, plus_is_space: bool) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Splits and decodes a query string into `(name, value)` pairs.
/// `None` if any component is malformed.
#[must_use]
pub fn parse_query(q: &str) -> Option<Vec<(String, String)>> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Some((percent_decode(k, true)?, percent_decode(v, true)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_test::io::Builder;

    fn run(mock: tokio_test::io::Mock) -> Result<Request, HttpError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut mock = mock;
            read_request(&mut mock, &Limits::default()).await
        })
    }

    #[test]
    fn body_split_across_reads() {
        let req = run(Builder::new()
            .read(b"POST /accounts?x=1 HTTP/1.1\r\nContent-Length: 11\r\n\r\n{\"na")
            .read(b"me\":1}")
            .read(b"!")
            .build())
        .unwrap();
        assert_eq!(req.path, "/accounts");
        assert_eq!(req.query, "x=1");
        assert_eq!(req.body, b"{\"name\":1}!");
    }

    #[test]
    fn expect_continue_is_answered() {
        let req = run(Builder::new()
            .read(b"PUT /a HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
            .write(b"HTTP/1.1 100 Continue\r\n\r\n")
            .read(b"{}")
            .build())
        .unwrap();
        assert_eq!(req.body, b"{}");
    }

    #[test]
    fn refusals() {
        let big = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            64 * 1024 + 1
        );
        assert!(matches!(
            run(Builder::new().read(big.as_bytes()).build()),
            Err(HttpError::BodyTooLarge)
        ));
        assert!(matches!(
            run(Builder::new()
                .read(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
                .build()),
            Err(HttpError::Chunked)
        ));
        assert!(matches!(
            run(Builder::new()
                .read(b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n")
                .build()),
            Err(HttpError::BadLength)
        ));
        assert!(matches!(
            run(Builder::new().read(b"GET / HTTP/1.1\nHost: x\n\n").build()),
            Err(HttpError::Head(HeadError::BareLf))
        ));
        assert!(matches!(
            run(Builder::new()
                .read(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nab")
                .build()),
            Err(HttpError::Closed)
        ));
        assert_eq!(HttpError::BodyTooLarge.reply().map(|r| r.status), Some(413));
        assert_eq!(HttpError::Closed.reply(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_client_times_out() {
        let mut mock = Builder::new()
            .read(b"GET / HT")
            .wait(Duration::from_secs(11))
            .read(b"TP/1.1\r\n\r\n")
            .build();
        let r = read_request(&mut mock, &Limits::default()).await;
        assert!(matches!(r, Err(HttpError::Timeout)), "{r:?}");
        // Drain the mock so it does not panic on drop.
        let mut rest = Vec::new();
        let _ = mock.read_to_end(&mut rest).await;
    }

    #[test]
    fn decoding() {
        assert_eq!(percent_decode("a%20b+c", true).as_deref(), Some("a b c"));
        assert_eq!(percent_decode("a+b", false).as_deref(), Some("a+b"));
        assert_eq!(percent_decode("%2", true), None);
        assert_eq!(percent_decode("%zz", true), None);
        assert_eq!(percent_decode("%ff", true), None);
        assert_eq!(
            parse_query("since=2024-05-01T14%3A00%3A00%2B02%3A00&account=alice&&x"),
            Some(vec![
                ("since".into(), "2024-05-01T14:00:00+02:00".into()),
                ("account".into(), "alice".into()),
                ("x".into(), String::new()),
            ])
        );
        let r = Reply::error(401, "Unauthorized", "token required")
            .with_header("WWW-Authenticate", "Bearer".into());
        let text = String::from_utf8(r.to_bytes()).unwrap();
        assert!(text.starts_with("HTTP/1.1 401 Unauthorized\r\n"));
        assert!(text.contains("\r\nWWW-Authenticate: Bearer\r\n"));
        assert!(text.ends_with("{\n  \"error\": \"token required\"\n}\n"));
    }
}
