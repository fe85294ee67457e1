//! One client connection on the proxy port, from the TLS handshake to the
//! end of its tunnel.
//!
//! The handshake runs here, inside the connection's own task and under a
//! deadline, never in the accept loop. Then request heads are read under
//! their own deadline and size caps, and routed: `CONNECT` to a tunnel,
//! `GET /proxy.pac`, `GET /ca.pem`, and the agents' `GET /agent` upgrade.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::basic::decode_basic;
use super::head::{parse_head, HeadError, Limits as HeadLimits, RequestHead};
use super::io::ClientIo;
use super::status::{rescue, FrontError, ESTABLISHED};
use crate::broker::BrokerState;
use crate::dest::{parse_target, Destination};
use crate::logsafe::escape;
use crate::mux::{relay, RelayStats, Target};
use crate::policy::Enforcement;
use crate::registry::{AgentSession, TunnelInfo};

/// A client connection after the TLS handshake.
pub struct Conn {
    /// The TLS stream (plain TCP on the loopback test listener).
    pub io: ClientIo,
    /// Bytes read but not yet consumed (the rest of a read after a head).
    pub buf: BytesMut,
    /// The client's address.
    pub peer: SocketAddr,
}

/// Why reading a head stopped without a head.
enum ReadHead {
    /// The client closed before sending anything.
    Eof,
    /// The client broke the protocol or the deadline; answer and close.
    Bad(FrontError),
    /// The connection died mid-head, or the deadline passed: just close.
    Gone,
}

impl Conn {
    async fn read_head(&mut self, state: &BrokerState) -> Result<RequestHead, ReadHead> {
        let limits = HeadLimits::default();
        let deadline = tokio::time::Instant::now() + state.settings.limits.head_timeout;
        loop {
            match parse_head(&self.buf, &limits) {
                Ok(Some((head, consumed))) => {
                    self.buf.advance(consumed);
                    return Ok(head);
                }
                Ok(None) => {}
                Err(e) => return Err(ReadHead::Bad(e.into())),
            }
            if self.buf.len() >= limits.max_head_bytes {
                return Err(ReadHead::Bad(HeadError::TooLarge.into()));
            }
            self.buf.reserve(4096);
            let read = tokio::time::timeout_at(deadline, self.io.read_buf(&mut self.buf)).await;
            match read {
                Ok(Ok(0)) if self.buf.is_empty() => return Err(ReadHead::Eof),
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Err(ReadHead::Gone),
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Write a complete response and flush it.
    pub async fn respond(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.io.write_all(bytes).await?;
        self.io.flush().await
    }

    /// Send a rejection; returns whether the connection may continue.
    async fn reject(&mut self, e: &FrontError) -> bool {
        let r = rescue(e);
        let ok = self.respond(&r.to_bytes()).await.is_ok();
        if !r.keep_open {
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(1), self.io.shutdown()).await;
        }
        ok && r.keep_open
    }
}

/// How a listener's connections start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// The proxy port: a TLS handshake first.
    Tls,
    /// The loopback-only test listener (`plain_test_listen`): none.
    Plain,
}

/// Serve one accepted TCP connection to the end.
pub async fn serve(
    state: Arc<BrokerState>,
    tcp: TcpStream,
    peer: SocketAddr,
    transport: Transport,
    cancel: CancellationToken,
) {
    let span = tracing::info_span!("conn", %peer);
    async move {
        let _ = tcp.set_nodelay(true);
        let io = match transport {
            Transport::Plain => ClientIo::Plain(tcp),
            Transport::Tls => {
                let handshake = tokio::time::timeout(
                    state.settings.limits.handshake_timeout,
                    state.acceptor().accept(tcp),
                );
                tokio::select! {
                    r = handshake => match r {
                        Ok(Ok(io)) => ClientIo::Tls(io),
                        Ok(Err(e)) => {
                            state.metrics().tls_handshake_failures.inc();
                            debug!(error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            state.metrics().tls_handshake_failures.inc();
                            debug!("TLS handshake deadline passed");
                            return;
                        }
                    },
                    _ = cancel.cancelled() => return,
                }
            }
        };
        let mut conn = Conn {
            io,
            buf: BytesMut::with_capacity(4096),
            peer,
        };
        let mut auth_failures = 0u32;
        loop {
            let head = tokio::select! {
                h = conn.read_head(&state) => h,
                _ = cancel.cancelled() => return,
            };
            let head = match head {
                Ok(h) => h,
                Err(ReadHead::Eof | ReadHead::Gone) => return,
                Err(ReadHead::Bad(e)) => {
                    info!(error = %e, "bad request head");
                    conn.reject(&e).await;
                    return;
                }
            };
            match route(&head) {
                Route::Connect => {
                    match prepare_connect(&state, &head, conn.peer).await {
                        Ok(ready) => {
                            // Boxed, like the agent link below: each path's
                            // state is allocated only by connections that take
                            // it (one inline future for both cost every
                            // connection the larger of them, twice over).
                            Box::pin(run_tunnel(&state, conn, ready, cancel)).await;
                            return;
                        }
                        Err(e) => {
                            // Logs (client text escaped), counts and audits it.
                            crate::audit::connect_refused(&state, &head, conn.peer, &e).await;
                            if matches!(
                                e,
                                FrontError::AuthRequired | FrontError::Throttled | FrontError::Basic(_)
                            ) {
                                auth_failures += 1;
                            }
                            let more = conn.reject(&e).await;
                            if !more
                                || auth_failures > state.settings.limits.max_auth_attempts_per_connection
                            {
                                return;
                            }
                        }
                    }
                }
                Route::Pac => {
                    let _ = conn
                        .respond(&document("application/x-ns-proxy-autoconfig", state.pac().as_bytes()))
                        .await;
                    return;
                }
                Route::CaPem => {
                    let reply = match std::fs::read(state.cert_paths().ca()) {
                        Ok(pem) => document("application/x-pem-file", &pem),
                        Err(_) => rescue(&FrontError::NoSuchPath).to_bytes(),
                    };
                    let _ = conn.respond(&reply).await;
                    return;
                }
                Route::Agent => {
                    Box::pin(crate::broker::agent_link::serve(state, conn, head, cancel)).await;
                    return;
                }
                Route::Reject(e) => {
                    info!(method = %escape(&head.method, 32), target = %escape(&head.target, 200), "request refused");
                    conn.reject(&e).await;
                    return;
                }
            }
        }
    }
    .instrument(span)
    .await
}

enum Route {
    Connect,
    Pac,
    CaPem,
    Agent,
    Reject(FrontError),
}

fn route(head: &RequestHead) -> Route {
    match head.method.as_str() {
        "CONNECT" => Route::Connect,
        "GET" | "HEAD" if head.target.starts_with('/') => {
            let path = head.target.split('?').next().unwrap_or("");
            match path {
                "/proxy.pac" => Route::Pac,
                "/ca.pem" => Route::CaPem,
                "/agent" => Route::Agent,
                _ => Route::Reject(FrontError::NoSuchPath),
            }
        }
        _ => Route::Reject(FrontError::MethodNotAllowed),
    }
}

/// A small document response (PAC, CA), then close.
fn document(content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// Everything a CONNECT needs before the 200.
struct Ready {
    account_id: i64,
    account: String,
    dest: Destination,
    target: Target,
    agent: Arc<AgentSession>,
    /// When the CONNECT head was complete (latency metric).
    since: Instant,
    /// The revalidation epoch before the store was read.
    epoch: u64,
}

/// Steps 1-4 of routing (product.md): authenticate, authorize, find the
/// agent, check the announced policy.
async fn prepare_connect(
    state: &BrokerState,
    head: &RequestHead,
    peer: SocketAddr,
) -> Result<Ready, FrontError> {
    let since = Instant::now();
    let dest = parse_target(&head.target, &state.settings.domain)?;
    let creds = match head.header("proxy-authorization") {
        Some(v) => decode_basic(v)?,
        None => return Err(FrontError::AuthRequired),
    };
    // Everything this CONNECT reads, in one trip to the store. Read before
    // the revalidation epoch below is compared: see `run_tunnel`.
    let epoch = state.registry().revalidation_epoch();
    let found = state
        .store()
        .connect_lookup(&creds.user, &dest.customer, dest.system.as_deref())
        .await
        .map_err(|e| FrontError::Store(e.to_string()))?;
    let account = state
        .auth()
        .verify_account(&creds, peer.ip(), found.account)
        .await
        .map_err(|e| match e {
            super::auth::AuthError::BadCredentials => FrontError::AuthRequired,
            super::auth::AuthError::Throttled => FrontError::Throttled,
            super::auth::AuthError::Store(e) => FrontError::Store(e.to_string()),
        })?;
    if !found.managed {
        return Err(FrontError::NotFound);
    }
    let system = found.system.ok_or(FrontError::NotFound)?;
    let agent = state
        .registry()
        .agent(system.id)
        .ok_or(FrontError::Offline)?;
    let target = match dest.ip {
        Some(ip) => Target::CoLocated(ip, dest.port),
        None => Target::SelfPort(dest.port),
    };
    agent.hello.policy.check(&target, Enforcement::Broker)?;
    let limits = &state.settings.limits;
    let (tunnels, mine) = state.registry().tunnel_counts(account.id);
    if tunnels >= limits.max_tunnels || state.overloaded() {
        return Err(FrontError::Overloaded);
    }
    if mine >= limits.max_tunnels_per_account {
        return Err(FrontError::Busy("too many tunnels for this account"));
    }
    Ok(Ready {
        account_id: account.id,
        account: account.name,
        dest,
        target,
        agent,
        since,
        epoch,
    })
}

/// Step 5: open the stream, answer 200, carry the bytes.
async fn run_tunnel(
    state: &Arc<BrokerState>,
    mut conn: Conn,
    ready: Ready,
    cancel: CancellationToken,
) {
    // Fail closed: no audit record, no open, no 200.
    let start = crate::audit::TunnelStart {
        account: &ready.account,
        client: conn.peer,
        dest: &ready.dest,
        agent: &ready.agent,
        target: ready.target,
        since: ready.since,
    };
    let record = match crate::audit::TunnelRecord::open(state, start).await {
        Ok(r) => r,
        Err(e) => {
            conn.reject(&e).await;
            return;
        }
    };
    let stream = match ready.agent.mux.open(ready.target).await {
        Ok(s) => s,
        Err(e) => {
            let e = FrontError::from(e);
            info!(dest = %ready.dest, error = %e, "agent could not open the target");
            record.refused(state, &e).await;
            conn.reject(&e).await;
            return;
        }
    };
    if conn.respond(ESTABLISHED).await.is_err() {
        record.client_gone(state).await;
        return;
    }
    record.established(state);
    let registry = state.registry();
    let tunnel_cancel = cancel.child_token();
    let guard = registry.add_tunnel(TunnelInfo {
        id: record.tunnel_id(),
        account_id: ready.account_id,
        account: ready.account.clone(),
        customer: ready.dest.customer.clone(),
        system_id: ready.agent.system_id,
        target: ready.target,
        client: conn.peer,
        started: SystemTime::now(),
        stats: Arc::new(RelayStats::default()),
        cancel: tunnel_cancel.clone(),
        end_reason: std::sync::OnceLock::new(),
    });
    let info = guard.info.clone();
    // A revalidation that started after this CONNECT read the store did
    // not see the tunnel if it began before the registration: then the
    // epoch moved in between, and the tunnel checks itself once.
    if guard.epoch != ready.epoch {
        crate::broker::recheck_tunnel(state, &info).await;
    }
    let span =
        tracing::info_span!("tunnel", id = info.id, account = %ready.account, dest = %ready.dest);
    async move {
        info!(target = %ready.target, "tunnel up");
        // Copy what the client sent early and free the head buffer: it
        // would otherwise live as long as the tunnel.
        let Conn { io, buf, .. } = conn;
        let leftover = bytes::Bytes::copy_from_slice(&buf);
        drop(buf);
        let limits = &state.settings.limits;
        let relay_fut = relay(stream, io, leftover, tunnel_cancel.clone(), info.stats.clone());
        tokio::pin!(relay_fut);
        let (end, reason) = tokio::select! {
            end = &mut relay_fut => {
                let reason = end.label();
                (end, reason)
            }
            why = crate::mux::expiry(&info.stats, limits.idle_timeout, limits.max_tunnel_lifetime) => {
                tunnel_cancel.cancel();
                (relay_fut.await, why.label())
            }
        };
        let (sent, received) = info.stats.get();
        if matches!(end, crate::mux::RelayEnd::LocalError(_)) {
            warn!(?end, sent, received, "tunnel ended with an error");
        } else {
            info!(
                end = reason,
                client_to_target = sent,
                target_to_client = received,
                "tunnel closed"
            );
        }
        drop(guard);
        record
            .finish(state, &info, &end, cancel.is_cancelled(), reason)
            .await;
    }
    .instrument(span)
    .await
}
