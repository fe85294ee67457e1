//! The admin listener: a JSON API for operators, Prometheus metrics and
//! health checks, on its own port (`admin_listen`, default
//! `127.0.0.1:7080`), never on the proxy port.
//!
//! ## Authentication
//! Every endpoint except `/healthz`, `/readyz` and `/metrics` needs
//! `Authorization: Bearer <token>`, the token generated on first run into
//! `<data_dir>/admin.token` ([`token`]). A missing or wrong token gets 401.
//! `/metrics` is open on purpose: it carries counts only (no names, no
//! addresses, bounded labels), and a scraper should not hold a token that
//! can also disable accounts. Keep the listener on loopback or firewall it.
//!
//! ## Endpoints
//! State changes only via `POST`, `PUT` or `DELETE`; a `GET` never changes
//! anything. Bodies are JSON (at most 64 KiB, with `Content-Length`).
//!
//! | method and path | what it does |
//! |---|---|
//! | `GET /healthz` | 200 `ok` while the process serves requests |
//! | `GET /readyz` | 200 `ready` when the store answers, else 503 |
//! | `GET /metrics` | Prometheus text ([`crate::metrics`]) |
//! | `GET /accounts` | accounts with their state and customers |
//! | `POST /accounts` | create `{"name", "password"?}`; without a password one is generated and returned once |
//! | `GET /accounts/{name}` | one account |
//! | `PUT /accounts/{name}/password` | set `{"password"?}` (generated if absent) |
//! | `POST /accounts/{name}/disable` | disable; its live tunnels end at once |
//! | `POST /accounts/{name}/enable` | enable |
//! | `GET /customers` | customers with their accounts |
//! | `POST /customers` | create `{"id", "account", "name"?}` |
//! | `GET /customers/{id}` | one customer with its systems |
//! | `PUT /customers/{id}/accounts/{account}` | let an account manage the customer |
//! | `DELETE /customers/{id}/accounts/{account}` | stop it; its tunnels to the customer end |
//! | `GET /customers/{id}/systems` | the customer's systems, with `online` |
//! | `POST /customers/{id}/systems` | add `{"name", "primary"?}`; returns the agent token once |
//! | `POST /customers/{id}/systems/{name}/rotate-token` | new agent token (returned once); the old one and its session end |
//! | `POST /customers/{id}/systems/{name}/revoke-token` | no token works any more; the session ends |
//! | `GET /agents` | agents online: customer, system, version, policy, remote address, connected since, streams open |
//! | `GET /tunnels` | active tunnels with live byte counts |
//! | `POST /tunnels/{id}/kill` | end a tunnel (its audit record says `killed`) |
//! | `GET /audit?account=&customer=&since=&kind=&limit=` | the audit query (`since`: Unix seconds or RFC 3339) |
//! | `GET /connect-info/{customer}?system=&ip=&port=&format=` | `maintgate connect-info` for this broker (JSON, or `format=text`) |
//!
//! Errors are `{"error": "..."}` with 400 (bad input), 401, 404, 405
//! (with `Allow`), 409 (exists), 411, 413, 431 or 503 (store or audit
//! unavailable).
//!
//! ## Live control and audit
//! Every state-changing call is audited (`kind = admin`, `detail` = the
//! action) *before* it runs, and refused with 503 if that record cannot be
//! written; the record is then closed with the status answered. After a
//! successful change the broker re-checks every live tunnel and agent
//! session at once ([`crate::broker::revalidate_once`]), because writes
//! made in the broker's own process do not move SQLite's `data_version`.
//!
//! ## Limits
//! One request per connection; head caps from [`crate::front::head`];
//! 64 KiB bodies; 10 s to read a request and 10 s to write the answer; at
//! most [`MAX_CONNECTIONS`] connections at once.

pub mod api;
pub mod http;
pub mod token;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, Instrument};

use crate::broker::BrokerState;
use crate::logsafe::escape;

/// Most admin connections served at once.
pub const MAX_CONNECTIONS: usize = 64;

/// Accept admin connections until `cancel`, serving each in a task on
/// `tracker` (so the broker's drain waits for them).
pub async fn serve(
    state: Arc<BrokerState>,
    listener: TcpListener,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = cancel.cancelled() => return,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = cancel.cancelled() => return,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let state = state.clone();
                let cancel = cancel.clone();
                tracker.spawn(async move {
                    serve_one(state, tcp, peer, cancel).await;
                    drop(permit);
                });
            }
            Err(e) => {
                debug!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serve one admin connection. Shutdown interrupts a request still being
/// read; one being handled finishes (its store write is under way) and its
/// answer is written, both under deadlines.
async fn serve_one(
    state: Arc<BrokerState>,
    mut tcp: TcpStream,
    peer: SocketAddr,
    cancel: CancellationToken,
) {
    let span = tracing::info_span!("admin", %peer);
    async move {
        let _ = tcp.set_nodelay(true);
        let limits = http::Limits::default();
        let read = tokio::select! {
            r = http::read_request(&mut tcp, &limits) => r,
            () = cancel.cancelled() => return,
        };
        let reply = match read {
            Ok(req) => {
                let reply = api::handle(&state, &req, peer).await;
                info!(
                    method = %escape(&req.head.method, 16),
                    path = %escape(&req.path, 200),
                    status = reply.status,
                    "admin request"
                );
                reply
            }
            Err(e) => match e.reply() {
                Some(r) => {
                    info!(error = %e, status = r.status, "bad admin request");
                    r
                }
                None => return,
            },
        };
        http::write_reply(&mut tcp, &reply, &limits).await;
    }
    .instrument(span)
    .await;
}
