//! The agents' endpoint: `GET /agent` upgraded to a WebSocket.
//!
//! The agent presents `Authorization: Bearer <token>`. The broker hashes
//! the token and looks the system up by that hash: the token alone decides
//! which customer and system this is, never anything the agent says. The
//! first message must be a HELLO (version and policy) within the deadline.
//! A second session for the same system replaces the first.

use std::sync::Arc;
use std::time::SystemTime;

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role as WsRole;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use super::BrokerState;
use crate::front::conn::Conn;
use crate::front::head::RequestHead;
use crate::mux::frame::Frame;
use crate::mux::session::ws_config;
use crate::mux::{Mux, Role};
use crate::policy::Hello;
use crate::registry::AgentSession;
use crate::secret::token_hash;
use crate::store::audit::AuditKind;

/// Longest bearer token accepted (ours are 47 bytes).
const MAX_TOKEN_LEN: usize = 128;

fn has_token(value: Option<&str>, token: &str) -> bool {
    value.is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

async fn refuse(conn: &mut Conn, status: &str) {
    let extra = if status.starts_with("401") {
        "WWW-Authenticate: Bearer realm=\"maintgate-agent\"\r\n"
    } else {
        ""
    };
    let msg = format!("HTTP/1.1 {status}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n");
    let _ = conn.respond(msg.as_bytes()).await;
}

/// Serve one agent connection to its end.
///
/// The setup (upgrade, token, HELLO, registration) runs in its own boxed
/// future and is freed once the session is up: what stays allocated for
/// the life of an idle session is only the small wait below. (One future
/// for both made every idle agent hold the setup's peak state, about
/// 7 KiB.)
pub async fn serve(
    state: Arc<BrokerState>,
    conn: Conn,
    head: RequestHead,
    cancel: CancellationToken,
) {
    let Some(live) = Box::pin(establish(&state, conn, head, cancel)).await else {
        return;
    };
    let Live {
        session,
        done,
        incoming,
        span,
    } = live;
    async move {
        let end = done.await;
        drop(incoming);
        state
            .registry()
            .unregister(session.system_id, session.session_id);
        info!(?end, "agent disconnected");
        let why = crate::logsafe::escape(&format!("{end:?}"), 200);
        let event = crate::audit::event(
            &state,
            AuditKind::AgentDisconnect,
            subject(&session, Some(why)),
        );
        let _ = Box::pin(event).await;
    }
    .instrument(span)
    .await
}

/// A registered session, for [`serve`] to wait on.
struct Live {
    session: Arc<AgentSession>,
    done: tokio::task::JoinHandle<crate::mux::SessionEnd>,
    /// Streams the agent would open: none (only the broker opens), but
    /// the session ends if this is dropped.
    incoming: tokio::sync::mpsc::Receiver<crate::mux::Incoming>,
    span: tracing::Span,
}

/// The audit subject of a session's events.
fn subject(session: &AgentSession, reason: Option<String>) -> crate::audit::Event {
    crate::audit::Event {
        client: Some(session.remote),
        customer: Some(session.customer.clone()),
        system: Some(session.system.clone()),
        reason,
        detail: Some(format!("version {}", session.hello.version)),
        ..Default::default()
    }
}

/// Upgrade, authenticate, read the HELLO and register the session.
async fn establish(
    state: &Arc<BrokerState>,
    mut conn: Conn,
    head: RequestHead,
    cancel: CancellationToken,
) -> Option<Live> {
    if head.method != "GET"
        || !has_token(head.header("upgrade"), "websocket")
        || !has_token(head.header("connection"), "upgrade")
        || head.header("sec-websocket-version") != Some("13")
    {
        refuse(&mut conn, "400 Bad WebSocket upgrade").await;
        return None;
    }
    let Some(key) = head.header("sec-websocket-key").map(str::trim) else {
        refuse(&mut conn, "400 Bad WebSocket upgrade").await;
        return None;
    };
    let token = head
        .header("authorization")
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
        .filter(|t| !t.is_empty() && t.len() <= MAX_TOKEN_LEN);
    let Some(token) = token else {
        refuse(&mut conn, "401 Agent token required").await;
        return None;
    };
    let hash = token_hash(token);
    let system = match state.store().system_by_token_hash(&hash).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            info!(peer = %conn.peer, "agent token not accepted");
            let _ = crate::audit::event(
                state,
                AuditKind::AgentRefused,
                crate::audit::Event {
                    client: Some(conn.peer),
                    status: Some(401),
                    reason: Some("agent token not accepted".into()),
                    ..Default::default()
                },
            )
            .await;
            refuse(&mut conn, "401 Agent token not accepted").await;
            return None;
        }
        Err(e) => {
            warn!(error = %e, "store unavailable for agent login");
            refuse(&mut conn, "503 Broker store unavailable").await;
            return None;
        }
    };
    let accept = derive_accept_key(key.as_bytes());
    let reply = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    if conn.respond(reply.as_bytes()).await.is_err() {
        return None;
    }
    let peer = conn.peer;
    crate::mux::session::tune_link_socket(conn.io.tcp(), &state.settings.mux);
    let leftover = conn.buf.split().to_vec();
    let mut ws =
        WebSocketStream::from_partially_read(conn.io, leftover, WsRole::Server, Some(ws_config()))
            .await;

    let span =
        tracing::info_span!("agent", customer = %system.customer_id, system = %system.name, %peer);
    async move {
        let hello = match tokio::time::timeout(state.settings.limits.hello_timeout, ws.next()).await {
            Ok(Some(Ok(Message::Binary(mut b)))) => match Frame::decode(&mut b) {
                Ok(Some(Frame::Hello(json))) if b.is_empty() => Hello::parse(&json).map_err(|e| e.to_string()),
                Ok(_) => Err("first frame is not a lone HELLO".to_string()),
                Err(e) => Err(e.to_string()),
            },
            Ok(_) => Err("no HELLO message".to_string()),
            Err(_) => Err("HELLO deadline passed".to_string()),
        };
        let hello = match hello {
            Ok(h) => h,
            Err(e) => {
                warn!(error = %e, "agent refused");
                let _ = ws.close(None).await;
                return None;
            }
        };
        let (mux, incoming, done) = Mux::start(ws, Role::Broker, state.settings.mux.clone(), cancel.child_token());
        let registry = state.registry();
        let session = Arc::new(AgentSession {
            session_id: registry.next_id(),
            system_id: system.id,
            customer: system.customer_id.clone(),
            system: system.name.clone(),
            token_hash: hash,
            mux,
            hello,
            remote: peer,
            connected_at: SystemTime::now(),
        });
        info!(version = %session.hello.version, policy = ?session.hello.policy, "agent connected");
        let replaced = registry.register(session.clone());
        if let Some(old) = &replaced {
            info!(old_peer = %old.remote, "agent session replaced by a new connection with the same token");
            old.mux.close();
        }
        let (kind, reason) = match &replaced {
            Some(old) => (AuditKind::AgentReplace, Some(format!("replaced the session from {}", old.remote))),
            None => (AuditKind::AgentConnect, None),
        };
        let _ = crate::audit::event(state, kind, subject(&session, reason)).await;
        // A rotation that raced with this login: check once now.
        if let Ok(false) = state
            .store()
            .system_token_hash_is_current(session.system_id, &session.token_hash)
            .await
        {
            session.mux.close();
        }
        Some(Live {
            session,
            done,
            incoming,
            span: tracing::Span::current(),
        })
    }
    .instrument(span)
    .await
}
