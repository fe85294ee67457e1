//! The site agent: `maintgate agent`.
//!
//! Keeps one outbound WebSocket to the broker, announces its version and
//! policy in a HELLO, and serves the streams the broker opens. For each
//! stream the agent applies its own policy, which is the check that
//! decides, then dials the parsed `SocketAddr` directly (never a resolver)
//! under a deadline. The link is re-established with exponential backoff
//! and full jitter, capped at `reconnect_max`.

pub mod config;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::SinkExt;
use rand::Rng;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

pub use config::{AgentOverrides, AgentSettings};

use crate::mux::session::ws_config;
use crate::mux::{relay, Frame, Incoming, Mux, OpenErrCode, RelayStats, Role, SessionEnd, Target};
use crate::policy::{forbidden_class, Enforcement, Hello};

/// Errors of one connection attempt.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("TLS setup: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("connecting to the broker: {0}")]
    Connect(std::io::Error),
    #[error("broker name {0:?} is not a valid TLS server name")]
    ServerName(String),
    #[error("WebSocket handshake: {0}")]
    Handshake(String),
    #[error("connect deadline passed")]
    Timeout,
}

/// The version announced in the HELLO.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Deadline for TCP + TLS + WebSocket handshake to the broker.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// A session that lasted this long resets the backoff.
const STABLE_AFTER: Duration = Duration::from_secs(30);

/// Log, once at startup, the configured tunnels the agent will refuse.
pub fn log_refused_tunnels(settings: &AgentSettings) {
    for t in &settings.policy.tunnels {
        if let Some(class) = forbidden_class(t.ip.into()) {
            warn!(ip = %t.ip, port = t.port, class, "configured tunnel will be refused: address class never allowed for co-located servers");
        }
    }
}

/// Run the agent until `cancel`: connect, serve, reconnect with backoff.
pub async fn run(settings: AgentSettings, cancel: CancellationToken) {
    log_refused_tunnels(&settings);
    let settings = Arc::new(settings);
    let mut attempt: u32 = 0;
    loop {
        let started = Instant::now();
        let result = tokio::select! {
            r = connect_and_serve(settings.clone(), cancel.child_token()) => r,
            _ = cancel.cancelled() => break,
        };
        match result {
            Ok(end) => info!(?end, "broker link ended"),
            Err(e) => warn!(error = %e, "broker link failed"),
        }
        if cancel.is_cancelled() {
            break;
        }
        if started.elapsed() >= STABLE_AFTER {
            attempt = 0;
        }
        let delay = backoff(settings.reconnect_min, settings.reconnect_max, attempt);
        attempt = attempt.saturating_add(1);
        debug!(?delay, attempt, "reconnecting after backoff");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = cancel.cancelled() => break,
        }
    }
    info!("agent stopped");
}

/// Full jitter: uniform in `[0, min(max, min * 2^attempt)]`.
pub fn backoff(min: Duration, max: Duration, attempt: u32) -> Duration {
    let cap = min
        .checked_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
        .unwrap_or(max)
        .min(max);
    let ms = cap.as_millis().min(u128::from(u64::MAX)) as u64;
    Duration::from_millis(rand::thread_rng().gen_range(0..=ms))
}

/// One link: connect, HELLO, serve streams until the session ends.
///
/// # Errors
/// [`AgentError`] when the link cannot be established.
pub async fn connect_and_serve(
    settings: Arc<AgentSettings>,
    cancel: CancellationToken,
) -> Result<SessionEnd, AgentError> {
    let tls_config = match settings.broker_tls {
        true => Some(Arc::new(crate::tls::client_config(settings.ca.as_deref())?)),
        false => None,
    };
    // One deadline for TCP, TLS, the upgrade and the HELLO together.
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    let timeout = |_| AgentError::Timeout;
    let tcp = tokio::time::timeout_at(
        deadline,
        TcpStream::connect((settings.broker_host.as_str(), settings.broker_port)),
    )
    .await
    .map_err(timeout)?
    .map_err(AgentError::Connect)?;
    crate::mux::session::tune_link_socket(&tcp, &settings.mux);
    let Some(tls_config) = tls_config else {
        // `ws://`: only ever to a loopback test listener (see
        // `parse_broker_link`).
        let ws = tokio::time::timeout_at(deadline, open_link(tcp, &settings))
            .await
            .map_err(timeout)??;
        return Ok(serve_link(ws, settings, cancel).await);
    };
    let ws = tokio::time::timeout_at(deadline, async {
        let name = rustls_pki_types::ServerName::try_from(settings.broker_host.clone())
            .map_err(|_| AgentError::ServerName(settings.broker_host.clone()))?;
        let tls = TlsConnector::from(tls_config)
            .connect(name, tcp)
            .await
            .map_err(AgentError::Connect)?;
        open_link(tls, &settings).await
    })
    .await
    .map_err(timeout)??;
    Ok(serve_link(ws, settings, cancel).await)
}

/// The WebSocket upgrade with the token, then the HELLO.
async fn open_link<S>(io: S, settings: &AgentSettings) -> Result<WebSocketStream<S>, AgentError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut req = settings
        .broker
        .as_str()
        .into_client_request()
        .map_err(|e| AgentError::Handshake(e.to_string()))?;
    let auth = HeaderValue::from_str(&format!("Bearer {}", settings.token.expose()))
        .map_err(|_| AgentError::Handshake("token has invalid characters".into()))?;
    req.headers_mut().insert("authorization", auth);
    let (mut ws, _resp) = tokio_tungstenite::client_async_with_config(req, io, Some(ws_config()))
        .await
        .map_err(|e| AgentError::Handshake(e.to_string()))?;
    let hello = Hello {
        version: VERSION.to_string(),
        policy: settings.policy.clone(),
    };
    let json = serde_json::to_vec(&hello).map_err(|e| AgentError::Handshake(e.to_string()))?;
    let mut buf = BytesMut::new();
    Frame::Hello(Bytes::from(json)).encode(&mut buf);
    ws.send(Message::Binary(buf.freeze()))
        .await
        .map_err(|e| AgentError::Handshake(e.to_string()))?;
    Ok(ws)
}

/// Serve streams over an established link until the session ends.
async fn serve_link<S>(
    ws: WebSocketStream<S>,
    settings: Arc<AgentSettings>,
    cancel: CancellationToken,
) -> SessionEnd
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    info!(broker = %settings.broker, "connected to broker");
    let (mux, mut incoming, done) =
        Mux::start(ws, Role::Agent, settings.mux.clone(), cancel.clone());
    let streams = CancellationToken::new();
    let serve = async {
        while let Some(inc) = incoming.recv().await {
            let settings = settings.clone();
            let cancel = streams.clone();
            tokio::spawn(serve_stream(settings, mux.clone(), inc, cancel));
        }
    };
    tokio::select! {
        _ = serve => {}
        _ = cancel.cancelled() => mux.close(),
    }
    let end = done.await.unwrap_or(SessionEnd::Closed);
    streams.cancel();
    end
}

/// Check, dial and relay one stream.
async fn serve_stream(
    settings: Arc<AgentSettings>,
    mux: Mux,
    inc: Incoming,
    cancel: CancellationToken,
) {
    let Incoming { stream, target } = inc;
    let span = tracing::info_span!("stream", id = stream.id(), %target);
    async move {
        if let Err(denied) = settings.policy.check(&target, Enforcement::Agent) {
            warn!(reason = %denied, "refused by local policy");
            mux.refuse(stream, OpenErrCode::Forbidden, &denied.to_string());
            return;
        }
        let addr = match target {
            Target::SelfPort(port) => SocketAddr::new(settings.self_address, port),
            Target::CoLocated(ip, port) => SocketAddr::new(ip.into(), port),
        };
        // A SocketAddr: no resolver is involved.
        let tcp = match tokio::time::timeout(settings.dial_timeout, TcpStream::connect(addr)).await
        {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => {
                let code = if e.kind() == std::io::ErrorKind::ConnectionRefused {
                    OpenErrCode::Refused
                } else {
                    OpenErrCode::Unreachable
                };
                info!(%addr, error = %e, "dial failed");
                mux.refuse(stream, code, &e.to_string());
                return;
            }
            Err(_) => {
                info!(%addr, "dial timed out");
                mux.refuse(stream, OpenErrCode::Timeout, "dial timed out");
                return;
            }
        };
        let _ = tcp.set_nodelay(true);
        mux.accept(&stream);
        let stats = Arc::new(RelayStats::default());
        let end = relay(stream, tcp, Bytes::new(), cancel, stats.clone()).await;
        let (sent, received) = stats.get();
        debug!(end = end.label(), sent, received, "stream closed");
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_full_jitter() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(60);
        for attempt in 0..64 {
            let d = backoff(min, max, attempt);
            let cap = (min * 2u32.saturating_pow(attempt.min(20))).min(max);
            assert!(d <= cap, "attempt {attempt}: {d:?} > {cap:?}");
        }
        // Jitter: many draws at a high attempt are not all equal.
        let draws: std::collections::HashSet<_> = (0..50).map(|_| backoff(min, max, 10)).collect();
        assert!(draws.len() > 10);
    }
}
