//! The one place that turns front-end errors into HTTP responses.
//!
//! proxytunnel shows its user only the status line, so every reason phrase
//! is plain ASCII that says what went wrong. Only a 407 keeps the
//! connection open (browsers retry on it); every other rejection closes it,
//! so bytes a client pipelined behind a refused CONNECT are never
//! forwarded.

use super::basic::BasicError;
use super::head::HeadError;
use crate::dest::DestError;
use crate::mux::{OpenErrCode, OpenError};
use crate::policy::Denied;

/// The realm in `Proxy-Authenticate`.
pub const REALM: &str = "maintgate";

/// Everything that can stop a request on the proxy port.
#[derive(Debug, thiserror::Error)]
pub enum FrontError {
    #[error("bad request head: {0}")]
    Head(#[from] HeadError),
    #[error("bad destination: {0}")]
    Dest(#[from] DestError),
    #[error("malformed Proxy-Authorization: {0}")]
    Basic(#[from] BasicError),
    #[error("proxy authentication required")]
    AuthRequired,
    /// The source is over its authentication budget. Answered exactly like
    /// `AuthRequired`; kept apart so floods are counted, not audited row by
    /// row (a flood must not be able to fill the audit store's disk).
    #[error("proxy authentication required (source throttled)")]
    Throttled,
    #[error("no such customer or system for this account")]
    NotFound,
    #[error("denied by the announced policy: {0}")]
    Forbidden(#[from] Denied),
    #[error("denied by the site agent: {0}")]
    AgentForbidden(String),
    #[error("no agent connected for this system")]
    Offline,
    #[error("agent link busy: {0}")]
    Busy(&'static str),
    #[error("target refused the connection: {0}")]
    TargetRefused(String),
    #[error("target unreachable: {0}")]
    TargetUnreachable(String),
    #[error("target did not answer in time")]
    TargetTimeout,
    #[error("agent did not answer the open in time")]
    AgentNoAnswer,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("not found")]
    NoSuchPath,
    #[error("server overloaded")]
    Overloaded,
    #[error("store unavailable: {0}")]
    Store(String),
    /// The tunnel's audit record could not be written (fail closed).
    #[error("audit store unavailable")]
    AuditUnavailable,
}

impl From<OpenError> for FrontError {
    fn from(e: OpenError) -> FrontError {
        match e {
            OpenError::Agent(OpenErrCode::Refused, m) => FrontError::TargetRefused(m),
            OpenError::Agent(OpenErrCode::Timeout, _) => FrontError::TargetTimeout,
            OpenError::Agent(OpenErrCode::Forbidden, m) => FrontError::AgentForbidden(m),
            OpenError::Agent(OpenErrCode::Busy, _) => FrontError::Busy("agent at its stream limit"),
            OpenError::Agent(OpenErrCode::Unreachable | OpenErrCode::Other, m) => {
                FrontError::TargetUnreachable(m)
            }
            OpenError::NoAnswer => FrontError::AgentNoAnswer,
            OpenError::TooManyStreams => FrontError::Busy("too many tunnels on this agent link"),
            OpenError::Closed => FrontError::Offline,
        }
    }
}

/// A response head, ready to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Reason phrase: ASCII, no CR/LF.
    pub reason: &'static str,
    /// Extra headers.
    pub headers: Vec<(&'static str, String)>,
    /// Whether the connection may carry another request.
    pub keep_open: bool,
}

impl Response {
    fn new(status: u16, reason: &'static str) -> Response {
        Response {
            status,
            reason,
            headers: Vec::new(),
            keep_open: false,
        }
    }

    /// The wire bytes of this (body-less) response.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!("HTTP/1.1 {} {}\r\n", self.status, self.reason);
        for (k, v) in &self.headers {
            out.push_str(k);
            out.push_str(": ");
            out.push_str(v);
            out.push_str("\r\n");
        }
        out.push_str("Content-Length: 0\r\n");
        if !self.keep_open {
            out.push_str("Connection: close\r\n");
        }
        out.push_str("\r\n");
        out.into_bytes()
    }
}

/// The 200 that starts a tunnel: exactly this, with no length or encoding
/// headers (clients.md: proxytunnel needs a reason phrase, Chromium fails on
/// anything after the head).
pub const ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";

/// Map an error to its response.
pub fn rescue(e: &FrontError) -> Response {
    match e {
        FrontError::Head(h) => Response::new(400, h.reason()),
        FrontError::Dest(d) => Response::new(400, d.reason()),
        FrontError::Basic(_) | FrontError::AuthRequired | FrontError::Throttled => {
            let mut r = Response::new(407, "Proxy Authentication Required");
            r.headers.push((
                "Proxy-Authenticate",
                format!("Basic realm=\"{REALM}\", charset=\"UTF-8\""),
            ));
            r.keep_open = true;
            r
        }
        // One answer for "not yours" and "does not exist".
        FrontError::NotFound => Response::new(404, "No such customer or system"),
        FrontError::Forbidden(d) => Response::new(403, d.reason()),
        FrontError::AgentForbidden(_) => Response::new(403, "Forbidden by the site agent's policy"),
        FrontError::Offline => Response::new(503, "System offline: no agent connected"),
        FrontError::Busy(what) if what.contains("account") => {
            Response::new(503, "Too many tunnels for this account")
        }
        FrontError::Busy(_) => Response::new(503, "Agent busy: too many tunnels"),
        FrontError::TargetRefused(_) => Response::new(502, "Target refused the connection"),
        FrontError::TargetUnreachable(_) => Response::new(502, "Target unreachable from the site"),
        FrontError::TargetTimeout => Response::new(504, "Target did not answer in time"),
        FrontError::AgentNoAnswer => Response::new(504, "Site agent did not answer in time"),
        FrontError::MethodNotAllowed => {
            let mut r = Response::new(405, "Only CONNECT is supported: use https URLs");
            r.headers.push(("Allow", "CONNECT".into()));
            r
        }
        FrontError::NoSuchPath => Response::new(404, "Not found"),
        FrontError::Overloaded => Response::new(503, "Broker overloaded, try again"),
        FrontError::Store(_) => Response::new(503, "Broker store unavailable"),
        FrontError::AuditUnavailable => Response::new(503, "Audit store unavailable"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_table() {
        let cases: Vec<(FrontError, u16, bool)> = vec![
            (FrontError::Head(HeadError::BareLf), 400, false),
            (FrontError::AuthRequired, 407, true),
            (FrontError::NotFound, 404, false),
            (FrontError::Forbidden(Denied::RemoteAccessOff), 403, false),
            (FrontError::Offline, 503, false),
            (
                OpenError::Agent(OpenErrCode::Refused, "x".into()).into(),
                502,
                false,
            ),
            (
                OpenError::Agent(OpenErrCode::Timeout, "x".into()).into(),
                504,
                false,
            ),
            (
                OpenError::Agent(OpenErrCode::Forbidden, "x".into()).into(),
                403,
                false,
            ),
            (OpenError::Closed.into(), 503, false),
            (FrontError::MethodNotAllowed, 405, false),
            (FrontError::AuditUnavailable, 503, false),
        ];
        for (e, status, keep) in cases {
            let r = rescue(&e);
            assert_eq!((r.status, r.keep_open), (status, keep), "{e}");
            let bytes = r.to_bytes();
            assert!(bytes.is_ascii());
            assert!(bytes.ends_with(b"\r\n\r\n"));
            assert!(!r.reason.contains(['\r', '\n']));
        }
    }

    #[test]
    fn exact_407() {
        assert_eq!(
            rescue(&FrontError::AuthRequired).to_bytes(),
            b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"maintgate\", charset=\"UTF-8\"\r\nContent-Length: 0\r\n\r\n"
        );
    }
}
