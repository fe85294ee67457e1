//! Admin API handlers: routing, the bearer check, JSON in and out, and the
//! one [`rescue`] that maps [`AdminError`] to an answer. The endpoint
//! table is in the [module docs](super).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};
use tracing::warn;

use super::http::{parse_query, percent_decode, Reply, Request};
use crate::audit::{AuditArgs, AuditCliError, AuditJson};
use crate::broker::{revalidate_once, BrokerState};
use crate::logsafe::escape;
use crate::metrics::Live;
use crate::secret::{self, SecretError, MAX_PASSWORD_BYTES};
use crate::store::audit::{AuditEnd, AuditKind, NewAudit};
use crate::store::StoreError;
use crate::timefmt::{format_rfc3339_ms, now_ms, system_time_ms};

/// Everything an admin request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No bearer token, or the wrong one.
    #[error("admin token required")]
    Unauthorized,
    /// No such endpoint.
    #[error("no such endpoint")]
    NoRoute,
    /// The endpoint exists but not with this method.
    #[error("method not allowed")]
    MethodNotAllowed(&'static str),
    /// Unusable input.
    #[error("{0}")]
    BadRequest(String),
    /// The body is not the JSON this endpoint takes.
    #[error("bad JSON body: {0}")]
    BadJson(#[from] serde_json::Error),
    /// No running tunnel has this id.
    #[error("no such tunnel")]
    NoSuchTunnel,
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The password is unusable or hashing failed.
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// The audit record of a change could not be written (fail closed).
    #[error("audit store unavailable")]
    AuditUnavailable,
    /// A worker task failed.
    #[error("internal error")]
    Internal,
}

impl From<AuditCliError> for AdminError {
    fn from(e: AuditCliError) -> Self {
        match e {
            AuditCliError::Store(s) => AdminError::Store(s),
            other => AdminError::BadRequest(other.to_string().replace("--", "")),
        }
    }
}

/// Map an error to its answer.
#[must_use]
pub fn rescue(e: &AdminError) -> Reply {
    let msg = e.to_string();
    match e {
        AdminError::Unauthorized => Reply::error(401, "Unauthorized", &msg).with_header(
            "WWW-Authenticate",
            "Bearer realm=\"maintgate-admin\"".to_owned(),
        ),
        AdminError::NoRoute | AdminError::NoSuchTunnel => Reply::error(404, "Not Found", &msg),
        AdminError::MethodNotAllowed(allow) => {
            Reply::error(405, "Method Not Allowed", &msg).with_header("Allow", (*allow).to_owned())
        }
        AdminError::BadRequest(_) | AdminError::BadJson(_) => {
            Reply::error(400, "Bad Request", &msg)
        }
        AdminError::Store(StoreError::NotFound(_)) => Reply::error(404, "Not Found", &msg),
        AdminError::Store(StoreError::Conflict(_)) => Reply::error(409, "Conflict", &msg),
        AdminError::Store(StoreError::Invalid(_)) => Reply::error(400, "Bad Request", &msg),
        AdminError::Store(_) => Reply::error(503, "Service Unavailable", "store unavailable"),
        AdminError::Secret(SecretError::Hash(_)) | AdminError::Internal => {
            Reply::error(500, "Internal Server Error", "internal error")
        }
        AdminError::Secret(_) => Reply::error(400, "Bad Request", &msg),
        AdminError::AuditUnavailable => Reply::error(503, "Service Unavailable", &msg),
    }
}

/// Answer one request.
pub async fn handle(state: &Arc<BrokerState>, req: &Request, peer: SocketAddr) -> Reply {
    match route(state, req, peer).await {
        Ok(r) => r,
        Err(e) => rescue(&e),
    }
}

/// The `Allow` value of a known path, for 405 answers.
fn allowed(path: &[&str]) -> Option<&'static str> {
    Some(match path {
        ["healthz" | "readyz" | "metrics" | "agents" | "tunnels" | "audit"]
        | ["connect-info", _] => "GET",
        ["accounts" | "customers"] | ["customers", _, "systems"] => "GET, POST",
        ["accounts", _] | ["customers", _] => "GET",
        ["accounts", _, "password"] => "PUT",
        ["accounts", _, "disable" | "enable"]
        | ["customers", _, "systems", _, "rotate-token" | "revoke-token"]
        | ["tunnels", _, "kill"] => "POST",
        ["customers", _, "accounts", _] => "PUT, DELETE",
        _ => return None,
    })
}

fn authorize(state: &BrokerState, req: &Request) -> Result<(), AdminError> {
    let token = req
        .head
        .header("authorization")
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim());
    match token {
        Some(t) if state.admin_token().verify(t) => Ok(()),
        _ => Err(AdminError::Unauthorized),
    }
}

async fn route(
    state: &Arc<BrokerState>,
    req: &Request,
    peer: SocketAddr,
) -> Result<Reply, AdminError> {
    let Some(rest) = req.path.strip_prefix('/') else {
        return Err(AdminError::NoRoute);
    };
    let segs: Vec<String> = rest
        .split('/')
        .map(|s| percent_decode(s, false).filter(|s| !s.is_empty()))
        .collect::<Option<_>>()
        .ok_or(AdminError::NoRoute)?;
    let path: Vec<&str> = segs.iter().map(String::as_str).collect();
    let method = req.head.method.as_str();
    match (method, path.as_slice()) {
        ("GET", ["healthz"]) => return Ok(Reply::text(200, "OK", "text/plain", "ok\n".into())),
        ("GET", ["readyz"]) => return Ok(readyz(state).await),
        ("GET", ["metrics"]) => return Ok(metrics(state)),
        (_, ["healthz" | "readyz" | "metrics"]) => return Err(AdminError::MethodNotAllowed("GET")),
        _ => {}
    }
    authorize(state, req)?;
    let body = &req.body;
    match (method, path.as_slice()) {
        ("GET", ["accounts"]) => list_accounts(state).await,
        ("POST", ["accounts"]) => create_account(state, peer, body).await,
        ("GET", ["accounts", name]) => get_account(state, name).await,
        ("PUT", ["accounts", name, "password"]) => set_password(state, peer, name, body).await,
        ("POST", ["accounts", name, "disable"]) => set_enabled(state, peer, name, false).await,
        ("POST", ["accounts", name, "enable"]) => set_enabled(state, peer, name, true).await,
        ("GET", ["customers"]) => list_customers(state).await,
        ("POST", ["customers"]) => create_customer(state, peer, body).await,
        ("GET", ["customers", id]) => get_customer(state, id).await,
        ("PUT", ["customers", id, "accounts", account]) => {
            grant(state, peer, id, account, true).await
        }
        ("DELETE", ["customers", id, "accounts", account]) => {
            grant(state, peer, id, account, false).await
        }
        ("GET", ["customers", id, "systems"]) => {
            Ok(ok_json(&json!(systems_json(state, id).await?)))
        }
        ("POST", ["customers", id, "systems"]) => add_system(state, peer, id, body).await,
        ("POST", ["customers", id, "systems", name, "rotate-token"]) => {
            rotate_token(state, peer, id, name).await
        }
        ("POST", ["customers", id, "systems", name, "revoke-token"]) => {
            revoke_token(state, peer, id, name).await
        }
        ("GET", ["agents"]) => Ok(ok_json(&agents(state))),
        ("GET", ["tunnels"]) => Ok(ok_json(&tunnels(state))),
        ("POST", ["tunnels", id, "kill"]) => kill(state, peer, id).await,
        ("GET", ["audit"]) => audit(state, &req.query).await,
        ("GET", ["connect-info", customer]) => connect_info(state, customer, &req.query).await,
        (_, p) => Err(allowed(p).map_or(AdminError::NoRoute, AdminError::MethodNotAllowed)),
    }
}

fn ok_json(v: &Value) -> Reply {
    Reply::json(200, "OK", v)
}

fn created_json(v: &Value) -> Reply {
    Reply::json(201, "Created", v)
}

/// Parse a JSON body into `T` (unknown fields refused by `T`). An empty
/// body reads as `{}`.
fn body_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, AdminError> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    Ok(serde_json::from_slice(body)?)
}

/// What a state-changing call is about, for its audit record.
#[derive(Debug, Default, Clone, Copy)]
struct Action<'a> {
    /// `account.disable`, `system.rotate-token`, ...
    name: &'static str,
    /// Account concerned.
    account: Option<&'a str>,
    /// Customer concerned.
    customer: Option<&'a str>,
    /// System concerned.
    system: Option<&'a str>,
    /// Appended to the action name in the record, e.g. a tunnel id.
    object: Option<&'a str>,
}

/// Run a state change: audit it first (503 and no change if that fails),
/// run it, close the record with the status, and on success end whatever
/// the change revoked (tunnels, agent sessions) right away.
async fn audited<T>(
    state: &Arc<BrokerState>,
    peer: SocketAddr,
    action: Action<'_>,
    ok_status: u16,
    change: impl Future<Output = Result<T, AdminError>>,
) -> Result<T, AdminError> {
    let text = |s: Option<&str>| s.map(|s| escape(s, 64));
    let rec = NewAudit {
        kind: Some(AuditKind::Admin),
        account: text(action.account),
        client: Some(peer.to_string()),
        customer: text(action.customer),
        system: text(action.system),
        started_ms: now_ms(),
        detail: Some(match action.object {
            Some(o) => format!("{} {}", action.name, escape(o, 64)),
            None => action.name.to_owned(),
        }),
        ..NewAudit::default()
    };
    let id = match state.store().audit_insert(rec).await {
        Ok(id) => id,
        Err(e) => {
            state.metrics().audit_write_failures.inc();
            warn!(error = %e, action = action.name, "admin action refused: audit store unavailable");
            return Err(AdminError::AuditUnavailable);
        }
    };
    let res = change.await;
    let (status, reason) = match &res {
        Ok(_) => (ok_status, "ok".to_owned()),
        Err(e) => (rescue(e).status, escape(&e.to_string(), 200)),
    };
    let end = AuditEnd {
        ended_ms: now_ms(),
        status: Some(status),
        bytes: None,
        reason,
    };
    if let Err(e) = state.store().audit_finish(id, end).await {
        state.metrics().audit_write_failures.inc();
        warn!(error = %e, action = action.name, "admin audit record could not be closed");
    }
    if res.is_ok() {
        revalidate_once(state).await;
    }
    res
}

async fn readyz(state: &BrokerState) -> Reply {
    match state.store().data_version().await {
        Ok(_) => Reply::text(200, "OK", "text/plain", "ready\n".into()),
        Err(_) => Reply::text(
            503,
            "Service Unavailable",
            "text/plain",
            "not ready: store unavailable\n".into(),
        ),
    }
}

fn metrics(state: &BrokerState) -> Reply {
    let registry = state.registry();
    let (up, down) = registry.bytes_total();
    let counters = &state.auth().counters;
    let live = Live {
        tunnels_active: registry.tunnels().len() as u64,
        agents_connected: registry
            .agents()
            .iter()
            .filter(|a| !a.mux.is_closed())
            .count() as u64,
        bytes_client_to_target: up,
        bytes_target_to_client: down,
        auth_failures: counters.failures.load(Ordering::Relaxed),
        lockouts: counters.lockouts.load(Ordering::Relaxed),
    };
    Reply::text(
        200,
        "OK",
        "text/plain; version=0.0.4; charset=utf-8",
        state.metrics().render(&live),
    )
}

// ---- accounts ----

async fn list_accounts(state: &BrokerState) -> Result<Reply, AdminError> {
    let accounts = state.store().list_accounts().await?;
    let v: Vec<Value> = accounts
        .iter()
        .map(|a| json!({ "name": a.name, "enabled": a.enabled, "customers": a.customers }))
        .collect();
    Ok(ok_json(&json!(v)))
}

async fn get_account(state: &BrokerState, name: &str) -> Result<Reply, AdminError> {
    let accounts = state.store().list_accounts().await?;
    let a = accounts
        .iter()
        .find(|a| a.name.eq_ignore_ascii_case(name))
        .ok_or_else(|| StoreError::NotFound(format!("account '{}'", escape(name, 64))))?;
    Ok(ok_json(
        &json!({ "name": a.name, "enabled": a.enabled, "customers": a.customers }),
    ))
}

/// `{"password": ...}` or `{}` to generate one.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PasswordBody {
    /// The new password; generated when absent.
    #[serde(default)]
    password: Option<String>,
}

/// `POST /accounts` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewAccount {
    /// User name.
    name: String,
    /// Password; generated when absent.
    #[serde(default)]
    password: Option<String>,
}

/// The password to set and whether it was generated; the Argon2 hash runs
/// on the blocking pool.
async fn password_hash(given: Option<String>) -> Result<(String, Option<String>), AdminError> {
    let (password, generated) = match given {
        Some(p) => {
            if p.contains(['\r', '\n']) {
                return Err(AdminError::BadRequest(
                    "password must not contain a line break".into(),
                ));
            }
            if p.len() > MAX_PASSWORD_BYTES {
                return Err(SecretError::PasswordTooLong.into());
            }
            (p, false)
        }
        None => (secret::generate_password(), true),
    };
    let pw = password.clone();
    let hash = tokio::task::spawn_blocking(move || secret::hash_password(&pw))
        .await
        .map_err(|_| AdminError::Internal)??;
    Ok((hash, generated.then_some(password)))
}

fn check_user(name: &str) -> Result<(), AdminError> {
    if secret::valid_user_name(name) {
        Ok(())
    } else {
        Err(StoreError::Invalid("account name (use 1-64 of A-Z a-z 0-9 . _ -)".into()).into())
    }
}

async fn create_account(
    state: &Arc<BrokerState>,
    peer: SocketAddr,
    body: &[u8],
) -> Result<Reply, AdminError> {
    let req: NewAccount = body_json(body)?;
    check_user(&req.name)?;
    let action = Action {
        name: "account.create",
        account: Some(&req.name),
        ..Action::default()
    };
    let (account, password) = audited(state, peer, action, 201, async {
        let (hash, generated) = password_hash(req.password.clone()).await?;
        Ok((
            state.store().add_account(&req.name, &hash).await?,
            generated,
        ))
    })
    .await?;
    let mut v = json!({ "name": account.name, "enabled": account.enabled, "customers": [] });
    if let Some(p) = password {
        v["password"] = json!(p);
    }
    Ok(created_json(&v))
}

async fn set_password(
    state: &Arc<BrokerState>,
    peer: SocketAddr,
    name: &str,
    body: &[u8],
) -> Result<Reply, AdminError> {
    let req: PasswordBody = body_json(body)?;
    let action = Action {
        name: "account.password",
        account: Some(name),
        ..Action::default()
    };
    let generated = audited(state, peer, action, 200, async {
        // Check the account first so a typo does not cost a hash.
        if state.store().account_by_name(name).await?.is_none() {
            return Err(StoreError::NotFound(format!("account '{}'", escape(name, 64))).into());
        }
        let (hash, generated) = password_hash(req.password.clone()).await?;
        state.store().set_password(name, &hash).await?;
        Ok(generated)
    })
    .await?;
    let mut v = json!({ "name": name, "password_changed": true });
    if let Some(p) = generated {
        v["password"] = json!(p);
    }
    Ok(ok_json(&v))
}

async fn set_enabled(
    state: &Arc<BrokerState>,
    peer: SocketAddr,
    name: &str,
    enabled: bool,
) -> Result<Reply, AdminError> {
    let action = Action {
        name: if enabled {
            "account.enable"
        } else {
            "account.disable"
        },
        account: Some(name),
        ..Action::default()
    };
    audited(state, peer, action, 200, async {
        Ok(state.store().set_account_enabled(name, enabled).await?)
    })
    .await?;
    Ok(ok_json(&json!({ "name": name, "enabled": enabled })))
}

// ---- customers and systems ----

async fn list_customers(state: &BrokerState) -> Result<Reply, AdminError> {
    let customers = state.store().list_customers().await?;
    let v: Vec<Value> = customers
        .iter()
        .map(|c| json!({ "id": c.id, "name": c.name, "accounts": c.accounts }))
        .collect();
    Ok(ok_json(&json!(v)))
}

async fn get_customer(state: &BrokerState, id: &str) -> Result<Reply, AdminError> {
    let c = state
        .store()
        .customer(id)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("customer '{}'", escape(id, 64))))?;
    let systems = systems_json(state, &c.id).await?;
    Ok(ok_json(
        &json!({ "id": c.id, "name": c.name, "accounts": c.accounts, "systems": systems }),
    ))
}

async fn systems_json(state: &BrokerState, customer: &str) -> Result<Vec<Value>, AdminError> {
    let systems = state.store().list_systems(customer).await?;
    Ok(systems
        .iter()
        .map(|s| {
            json!({
                "customer": s.customer_id,
                "name": s.name,
                "primary": s.is_primary,
                "online": state.registry().agent(s.id).is_some(),
            })
        })
        .collect())
}

/// `POST /customers` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewCustomer {
    /// Customer id.
    id: String,
    /// The account that manages it.
    account: String,
    /// Display name.
    #[serde(default)]
    name: Option<String>,
}

async fn create_customer(
    state: &Arc<BrokerState>,
    peer: SocketAddr,
    body: &[u8],
) -> Result<Reply, AdminError> {
    let req: NewCustomer = body_json(body)?;
    let action = Action {
        name: "customer.create",
        account: Some(&req.account),
        customer: Some(&req.id),
        ..Action::default()
    };
    let c = audited(state, peer, action, 201, async {
        Ok(state
            .store()
            .add_customer(&req.id, &req.account, req.name.as_deref())
            .await?)
    })
    .await?;
    Ok(created_json(
        &json!({ "id": c.id, "name": c.name, "accounts": c.accounts }),
    ))
}

async fn grant(
    state: &Arc<BrokerState>,
    peer: SocketAddr,
    customer: &str,
    account: &str,
    allow: bool,
) -> Result<Reply, AdminError> {
    let action = Action {
        name: if allow {
            "customer.grant"
        } else {
            "customer.revoke"
        },
        account: Some(account),
        customer: Some(customer),
        ..Action::default()
    };
    let changed = audited(state, peer, action, 200, async {
        let store = state.store();
        Ok(if allow {
            store.grant_customer(customer, account).await?
        } else {
            store.revoke_customer(customer, account).await?
        })
    })
    .await?;
    Ok(ok_json(&json!({
        "customer": customer.to_ascii_lowercase(),
        "account": account,
        "managed": allow,
        "changed": changed,
    })))
}

/// `POST /customers/{id}/systems` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewSystem {
    /// System name.
    name: String,
    /// Make it the customer's primary system.
    #[serde(default)]
    primary: bool,
}

async fn add_system(
    state: &Arc<BrokerState>,
    peer: SocketAddr,
    customer: &str,
    body: &[u8],
) -> Result<Reply, AdminError> {
    let req: NewSystem = body_json(body)?;
    let action = Action {
        name: "system.create",
        customer: Some(customer),
        system: Some(&req.name),
        ..Action::default()
    };
    let token = secret::generate_token();
    let sys = audited(state, peer, action, 201, async {
        Ok(state
            .store()
            .add_system(
                customer,
                &req.name,
                req.primary,
                &secret::token_hash(&token),
            )
            .await?)
    })
    .await?;
    Ok(created_json(&json!({
        "customer": sys.customer_id,
        "name": sys.name,
        "primary": sys.is_primary,
        "token": token,
    })))
}

async fn rotate_token(
    state: &Arc<BrokerState>,
    peer: SocketAddr,
    customer: &str,
    name: &str,
) -> Result<Reply, AdminError> {
    let action = Action {
        name: "system.rotate-token",
        customer: Some(customer),
        system: Some(name),
        ..Action::default()
    };
    let token = secret::generate_token();
    let sys = audited(state, peer, action, 200, async {
        Ok(state
            .store()
            .rotate_token(customer, name, &secret::token_hash(&token))
            .await?)
    })
    .await?;
    Ok(ok_json(&json!({
        "customer": sys.customer_id,
        "name": sys.name,
        "token": token,
    })))
}

async fn revoke_token(
    state: &Arc<BrokerState>,
    peer: SocketAddr,
    customer: &str,
    name: &str,
) -> Result<Reply, AdminError> {
    let action = Action {
        name: "system.revoke-token",
        customer: Some(customer),
        system: Some(name),
        ..Action::default()
    };
    let sys = audited(state, peer, action, 200, async {
        Ok(state.store().revoke_token(customer, name).await?)
    })
    .await?;
    Ok(ok_json(&json!({
        "customer": sys.customer_id,
        "name": sys.name,
        "token_revoked": true,
    })))
}

// ---- live state ----

fn agents(state: &BrokerState) -> Value {
    let mut agents = state.registry().agents();
    agents.retain(|a| !a.mux.is_closed());
    agents.sort_by(|a, b| (&a.customer, &a.system).cmp(&(&b.customer, &b.system)));
    let v: Vec<Value> = agents
        .iter()
        .map(|a| {
            json!({
                "customer": a.customer,
                "system": a.system,
                "session_id": a.session_id,
                "version": a.hello.version,
                "policy": serde_json::to_value(&a.hello.policy).unwrap_or(Value::Null),
                "remote": a.remote.to_string(),
                "connected_since": format_rfc3339_ms(system_time_ms(a.connected_at)),
                "streams_open": a.mux.stream_count(),
            })
        })
        .collect();
    json!(v)
}

fn tunnels(state: &BrokerState) -> Value {
    let registry = state.registry();
    let systems: HashMap<i64, String> = registry
        .agents()
        .iter()
        .map(|a| (a.system_id, a.system.clone()))
        .collect();
    let mut tunnels = registry.tunnels();
    tunnels.sort_by_key(|t| t.id);
    let v: Vec<Value> = tunnels
        .iter()
        .map(|t| {
            let (up, down) = t.stats.get();
            json!({
                "id": t.id,
                "account": t.account,
                "client": t.client.to_string(),
                "customer": t.customer,
                "system": systems.get(&t.system_id),
                "target": t.target.to_string(),
                "started": format_rfc3339_ms(system_time_ms(t.started)),
                "bytes_client_to_target": up,
                "bytes_target_to_client": down,
            })
        })
        .collect();
    json!(v)
}

async fn kill(state: &Arc<BrokerState>, peer: SocketAddr, id: &str) -> Result<Reply, AdminError> {
    let id: u64 = id
        .parse()
        .map_err(|_| AdminError::BadRequest("tunnel id must be a number".into()))?;
    let found = state.registry().tunnels().into_iter().find(|t| t.id == id);
    let id_text = id.to_string();
    let action = Action {
        name: "tunnel.kill",
        account: found.as_ref().map(|t| t.account.as_str()),
        customer: found.as_ref().map(|t| t.customer.as_str()),
        system: None,
        object: Some(&id_text),
    };
    audited(state, peer, action, 200, async {
        if state.registry().kill_tunnel(id) {
            Ok(())
        } else {
            Err(AdminError::NoSuchTunnel)
        }
    })
    .await?;
    Ok(ok_json(&json!({ "killed": id })))
}

async fn audit(state: &BrokerState, query: &str) -> Result<Reply, AdminError> {
    let pairs = parse_query(query)
        .ok_or_else(|| AdminError::BadRequest("malformed query string".into()))?;
    let mut args = AuditArgs::default();
    for (k, v) in pairs {
        match k.as_str() {
            "account" => args.account = Some(v),
            "customer" => args.customer = Some(v),
            "since" => args.since = Some(v),
            "kind" => args.kind = Some(v),
            "limit" => {
                args.limit = Some(v.parse().map_err(|_| {
                    AdminError::BadRequest("limit must be a positive number".into())
                })?);
            }
            _ => {
                return Err(AdminError::BadRequest(format!(
                    "unknown parameter '{}' (account, customer, since, kind, limit)",
                    escape(&k, 32)
                )))
            }
        }
    }
    let records = state.store().audit_query(args.filter()?).await?;
    let v: Vec<AuditJson<'_>> = records.iter().map(AuditJson::from).collect();
    Ok(ok_json(&serde_json::to_value(v)?))
}

/// `GET /connect-info/{customer}?system=&ip=&port=&format=`: the same
/// instructions as `maintgate connect-info`, for this broker's domain and
/// client port. JSON by default, `format=text` for the printable form.
async fn connect_info(
    state: &BrokerState,
    customer: &str,
    query: &str,
) -> Result<Reply, AdminError> {
    use crate::connect_info::{render, BrokerInfo, ConnectRequest};
    let bad = |what: &str| AdminError::BadRequest(what.to_owned());
    let pairs = parse_query(query).ok_or_else(|| bad("malformed query string"))?;
    let mut req = ConnectRequest {
        customer: customer.to_owned(),
        ..ConnectRequest::default()
    };
    let mut text = false;
    for (k, v) in pairs {
        match k.as_str() {
            "system" => req.system = Some(v),
            "ip" => {
                req.ip = Some(
                    v.parse()
                        .map_err(|_| bad("ip must be dotted-decimal IPv4"))?,
                )
            }
            "port" => req.port = Some(v.parse().map_err(|_| bad("port must be 1-65535"))?),
            "format" => match v.as_str() {
                "json" => text = false,
                "text" => text = true,
                _ => return Err(bad("format is json or text")),
            },
            _ => {
                return Err(AdminError::BadRequest(format!(
                    "unknown parameter '{}' (system, ip, port, format)",
                    escape(&k, 32)
                )))
            }
        }
    }
    let info = render(
        &req,
        &BrokerInfo::new(&state.settings.domain, state.client_port()),
    )
    .map_err(|e| AdminError::BadRequest(e.to_string()))?;
    // Instructions for something that does not exist help nobody.
    let found = state
        .store()
        .find_system(customer, req.system.as_deref())
        .await?;
    if found.is_none() {
        return Err(
            StoreError::NotFound(format!("system of customer '{}'", escape(customer, 64))).into(),
        );
    }
    Ok(if text {
        Reply::text(200, "OK", "text/plain; charset=utf-8", info.to_text())
    } else {
        ok_json(&serde_json::to_value(&info)?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_table() {
        assert_eq!(allowed(&["accounts"]), Some("GET, POST"));
        assert_eq!(allowed(&["accounts", "x", "disable"]), Some("POST"));
        assert_eq!(
            allowed(&["customers", "1", "accounts", "a"]),
            Some("PUT, DELETE")
        );
        assert_eq!(allowed(&["tunnels", "3", "kill"]), Some("POST"));
        assert_eq!(allowed(&["nope"]), None);
    }

    #[test]
    fn statuses() {
        let cases: Vec<(AdminError, u16)> = vec![
            (AdminError::Unauthorized, 401),
            (AdminError::NoRoute, 404),
            (AdminError::MethodNotAllowed("GET"), 405),
            (AdminError::BadRequest("x".into()), 400),
            (StoreError::NotFound("x".into()).into(), 404),
            (StoreError::Conflict("x".into()).into(), 409),
            (StoreError::Invalid("x".into()).into(), 400),
            (StoreError::Backend("disk".into()).into(), 503),
            (SecretError::PasswordTooLong.into(), 400),
            (AdminError::AuditUnavailable, 503),
        ];
        for (e, status) in cases {
            let r = rescue(&e);
            assert_eq!(r.status, status, "{e}");
            assert!(!String::from_utf8(r.body).unwrap().contains("disk"));
        }
        let r = rescue(&AdminError::Unauthorized);
        assert!(r.headers.iter().any(|(k, _)| *k == "WWW-Authenticate"));
    }
}
