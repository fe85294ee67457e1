//! Auditing what the broker decides, and `maintgate audit`.
//!
//! The broker side writes through [`crate::store::Store`] (the table and
//! its record kinds are described in [`crate::store::audit`]):
//!
//! * [`connect_refused`]: a refused CONNECT: one `rejected` record, the
//!   log line (with the claimed user name and the target escaped) and the
//!   outcome metric.
//! * [`TunnelRecord`]: a tunnel's record. [`TunnelRecord::open`] inserts it
//!   *before* the agent is asked to open the target; if that fails the
//!   caller answers 503 and nothing is dialed (fail closed). Then exactly
//!   one of [`TunnelRecord::refused`] (the open failed),
//!   [`TunnelRecord::client_gone`] or [`TunnelRecord::established`] +
//!   [`TunnelRecord::finish`] closes it.
//! * [`event`]: agent sessions and admin actions.
//!
//! The CLI side is [`AuditArgs`] / [`run_audit`], sharing [`AuditJson`]
//! with the admin API.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Instant;

use serde::Serialize;
use tracing::{info, warn};

use crate::broker::BrokerState;
use crate::dest::{parse_target, Destination};
use crate::front::head::RequestHead;
use crate::front::status::{rescue, FrontError};
use crate::logsafe::escape;
use crate::mux::{RelayEnd, Target};
use crate::registry::{AgentSession, TunnelInfo};
use crate::store::audit::{AuditEnd, AuditFilter, AuditKind, AuditRecord, NewAudit};
use crate::store::sqlite::SqliteStore;
use crate::store::StoreError;
use crate::timefmt::{format_rfc3339_ms, now_ms, parse_time, TimeError};

/// Longest client-supplied text kept, in characters, before escaping.
const MAX_CLIENT_TEXT: usize = 200;

/// The user name a client claimed in `Proxy-Authorization`, decoded
/// leniently (bad base64 or UTF-8 give `None` or replacement characters)
/// and escaped, for logs and audit. Never the password.
#[must_use]
pub fn claimed_user(head: &RequestHead) -> Option<String> {
    use base64::Engine as _;
    let value = head.header("proxy-authorization")?.trim();
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let token = token.trim();
    // Same cap as the real decoder: no large allocations for a log line.
    if token.len() > 400 {
        return None;
    }
    let cfg = base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent);
    let engine = base64::engine::GeneralPurpose::new(&base64::alphabet::STANDARD, cfg);
    let raw = engine.decode(token).ok()?;
    let user = raw.split(|b| *b == b':').next().unwrap_or_default();
    Some(escape(&String::from_utf8_lossy(user), 64))
}

fn insert_failed(state: &BrokerState, what: &str, e: &StoreError) {
    state.metrics().audit_write_failures.inc();
    warn!(error = %e, what, "audit record could not be written");
}

/// Log throttled attempts as one line per 10 seconds, not one per attempt.
fn throttled_summary(peer: SocketAddr) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SINCE_LAST: AtomicU64 = AtomicU64::new(0);
    static LAST_MS: AtomicU64 = AtomicU64::new(0);
    let n = SINCE_LAST.fetch_add(1, Ordering::Relaxed) + 1;
    let now = u64::try_from(now_ms()).unwrap_or(0);
    let last = LAST_MS.load(Ordering::Relaxed);
    if now.saturating_sub(last) >= 10_000
        && LAST_MS
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        SINCE_LAST.store(0, Ordering::Relaxed);
        warn!(attempts = n, last_source = %peer, "authentication attempts throttled (over the per-source budget)");
    }
}

/// Record a refused CONNECT: log it (client text escaped), count it and
/// write a `rejected` record. A failing audit write is logged and counted;
/// the request is refused either way. Throttled attempts are the exception:
/// they are counted and summarised in the log, not written one row each.
pub async fn connect_refused(
    state: &BrokerState,
    head: &RequestHead,
    peer: SocketAddr,
    e: &FrontError,
) {
    let status = rescue(e).status;
    if matches!(e, FrontError::Throttled) {
        // Counted (auth metrics), logged at most every 10 s, never one
        // audit row per attempt: a flood must not fill the audit disk.
        state.metrics().tunnel_outcome(status);
        throttled_summary(peer);
        return;
    }
    let user = claimed_user(head);
    let target = escape(&head.target, MAX_CLIENT_TEXT);
    info!(
        user = %user.as_deref().unwrap_or("-"),
        target = %target,
        status,
        error = %escape(&e.to_string(), MAX_CLIENT_TEXT),
        "CONNECT refused"
    );
    state.metrics().tunnel_outcome(status);
    let dest = parse_target(&head.target, &state.settings.domain).ok();
    let now = now_ms();
    let rec = NewAudit {
        kind: Some(AuditKind::Rejected),
        account: user,
        client: Some(peer.to_string()),
        customer: dest.as_ref().map(|d| d.customer.clone()),
        system: dest.as_ref().and_then(|d| d.system.clone()),
        dest: Some(target),
        target: dest.as_ref().map(|d| target_text(&target_of(d))),
        started_ms: now,
        ended_ms: Some(now),
        status: Some(status),
        reason: Some(escape(&e.to_string(), MAX_CLIENT_TEXT)),
        detail: None,
    };
    if let Err(e) = state.store().audit_insert(rec).await {
        insert_failed(state, "rejected CONNECT", &e);
    }
}

fn target_of(d: &Destination) -> Target {
    match d.ip {
        Some(ip) => Target::CoLocated(ip, d.port),
        None => Target::SelfPort(d.port),
    }
}

/// `ip:port`, or `self:port` for the system itself.
fn target_text(t: &Target) -> String {
    t.to_string()
}

/// A tunnel's audit record, from before the open to the end.
#[derive(Debug)]
#[must_use = "a tunnel record must be closed"]
pub struct TunnelRecord {
    /// Row id; also the tunnel's id in the registry and the admin API.
    id: i64,
    /// When the CONNECT head was complete, for the latency histogram.
    since: Instant,
}

/// What a tunnel record starts with.
#[derive(Clone, Copy)]
pub struct TunnelStart<'a> {
    /// The authenticated account.
    pub account: &'a str,
    /// The client's address.
    pub client: SocketAddr,
    /// The parsed destination.
    pub dest: &'a Destination,
    /// The agent session the tunnel goes through.
    pub agent: &'a AgentSession,
    /// What the agent is asked to dial.
    pub target: Target,
    /// When the CONNECT head was complete.
    pub since: Instant,
}

impl TunnelRecord {
    /// Insert the record of a tunnel about to be opened. No status yet:
    /// the 200 is recorded once it is sent.
    ///
    /// # Errors
    /// [`FrontError::AuditUnavailable`] when the record cannot be written:
    /// the caller must refuse the tunnel (fail closed). The outcome (503)
    /// is already counted.
    pub async fn open(state: &BrokerState, t: TunnelStart<'_>) -> Result<TunnelRecord, FrontError> {
        let rec = NewAudit {
            kind: Some(AuditKind::Tunnel),
            account: Some(t.account.to_owned()),
            client: Some(t.client.to_string()),
            customer: Some(t.agent.customer.clone()),
            system: Some(t.agent.system.clone()),
            dest: Some(format!(
                "{}:{}",
                t.dest.host(&state.settings.domain),
                t.dest.port
            )),
            target: Some(target_text(&t.target)),
            started_ms: now_ms(),
            ..NewAudit::default()
        };
        match state.store().audit_insert(rec).await {
            Ok(id) => Ok(TunnelRecord { id, since: t.since }),
            Err(e) => {
                insert_failed(state, "tunnel", &e);
                state.metrics().tunnel_outcome(503);
                Err(FrontError::AuditUnavailable)
            }
        }
    }

    /// The record id, which is also the tunnel id.
    #[must_use]
    pub fn id(&self) -> i64 {
        self.id
    }

    /// The tunnel id for the registry (the record id).
    #[must_use]
    pub fn tunnel_id(&self) -> u64 {
        u64::try_from(self.id).unwrap_or_default()
    }

    async fn close(self, state: &BrokerState, end: AuditEnd) {
        if let Err(e) = state.store().audit_finish_tunnel(self.id, end).await {
            insert_failed(state, "tunnel end", &e);
        }
    }

    /// The agent could not open the target: close the record with the
    /// status the client gets.
    pub async fn refused(self, state: &BrokerState, e: &FrontError) {
        let status = rescue(e).status;
        state.metrics().tunnel_outcome(status);
        self.close(
            state,
            AuditEnd {
                ended_ms: now_ms(),
                status: Some(status),
                bytes: None,
                reason: escape(&e.to_string(), MAX_CLIENT_TEXT),
            },
        )
        .await;
    }

    /// The client went away before the 200 could be written.
    pub async fn client_gone(self, state: &BrokerState) {
        self.close(
            state,
            AuditEnd {
                ended_ms: now_ms(),
                status: None,
                bytes: Some((0, 0)),
                reason: "client-gone".to_owned(),
            },
        )
        .await;
    }

    /// The 200 was sent: count it, observe the latency, record the status.
    /// Not awaited: the record exists (it was written before the open),
    /// and `finish` writes the status again should this update fail.
    pub fn established(&self, state: &BrokerState) {
        let m = state.metrics();
        m.tunnel_outcome(200);
        m.connect_latency.observe(self.since.elapsed());
        state.store().audit_set_status_nowait(self.id, 200);
    }

    /// The tunnel ended: exact byte counts and the close reason. The
    /// reason is whoever cancelled it (`killed`, `access-revoked`, ...), or
    /// `shutdown` if the broker was stopping, or `fallback` (the relay's or
    /// the expiry's own label).
    pub async fn finish(
        self,
        state: &BrokerState,
        info: &TunnelInfo,
        end: &RelayEnd,
        shutting_down: bool,
        fallback: &str,
    ) {
        let reason = match info.end_reason.get() {
            Some(r) => (*r).to_owned(),
            None if *end == RelayEnd::Killed && shutting_down => "shutdown".to_owned(),
            None => fallback.to_owned(),
        };
        self.close(
            state,
            AuditEnd {
                ended_ms: now_ms(),
                status: Some(200),
                bytes: Some(info.stats.get()),
                reason,
            },
        )
        .await;
    }
}

/// Subject of an agent or admin event.
#[derive(Debug, Clone, Default)]
pub struct Event {
    /// Account concerned.
    pub account: Option<String>,
    /// Who did it: the agent's or the admin caller's address.
    pub client: Option<SocketAddr>,
    /// Customer concerned.
    pub customer: Option<String>,
    /// System concerned.
    pub system: Option<String>,
    /// Status answered, for admin calls.
    pub status: Option<u16>,
    /// Why (an agent session's end, a refusal).
    pub reason: Option<String>,
    /// What: the admin action (`account.disable`), the agent version.
    pub detail: Option<String>,
}

/// Write a point-in-time event record.
///
/// # Errors
/// [`StoreError`] when the record cannot be written (also logged and
/// counted); the admin API refuses the call then.
pub async fn event(state: &BrokerState, kind: AuditKind, ev: Event) -> Result<i64, StoreError> {
    let now = now_ms();
    let rec = NewAudit {
        kind: Some(kind),
        account: ev.account,
        client: ev.client.map(|c| c.to_string()),
        customer: ev.customer,
        system: ev.system,
        dest: None,
        target: None,
        started_ms: now,
        ended_ms: Some(now),
        status: ev.status,
        reason: ev.reason,
        detail: ev.detail,
    };
    let res = state.store().audit_insert(rec).await;
    if let Err(e) = &res {
        insert_failed(state, kind.as_str(), e);
    }
    res
}

/// An audit record as the CLI and the admin API print it: the stored
/// fields plus RFC 3339 times.
#[derive(Debug, Clone, Serialize)]
pub struct AuditJson<'a> {
    /// The record.
    #[serde(flatten)]
    pub record: &'a AuditRecord,
    /// Start, RFC 3339 UTC.
    pub start: String,
    /// End, RFC 3339 UTC; `null` while a tunnel runs.
    pub end: Option<String>,
}

impl<'a> From<&'a AuditRecord> for AuditJson<'a> {
    fn from(record: &'a AuditRecord) -> Self {
        AuditJson {
            record,
            start: format_rfc3339_ms(record.start_ms),
            end: record.end_ms.map(format_rfc3339_ms),
        }
    }
}

/// Errors of `maintgate audit`.
#[derive(Debug, thiserror::Error)]
pub enum AuditCliError {
    /// `--since` is not a time.
    #[error("--since: {0}")]
    Since(#[from] TimeError),
    /// `--kind` is not a record kind.
    #[error("--kind: expected one of {0}")]
    Kind(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Writing the output failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// Rendering JSON failed.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

/// `maintgate audit`: list audit records, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Default, clap::Args)]
pub struct AuditArgs {
    /// Only records of this account.
    #[arg(long, value_name = "A")]
    pub account: Option<String>,
    /// Only records of this customer.
    #[arg(long, value_name = "C")]
    pub customer: Option<String>,
    /// Only records running at or after T: Unix seconds (1714564800) or
    /// RFC 3339 (2024-05-01T12:00:00Z, 2024-05-01T14:00:00+02:00).
    #[arg(long, value_name = "T")]
    pub since: Option<String>,
    /// Only records of this kind: tunnel, rejected, agent-connect,
    /// agent-replace, agent-disconnect, agent-refused, admin.
    #[arg(long, value_name = "KIND")]
    pub kind: Option<String>,
    /// At most this many (the newest) [default: 1000].
    #[arg(long, value_name = "N")]
    pub limit: Option<u32>,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl AuditArgs {
    /// The store filter these arguments describe.
    ///
    /// # Errors
    /// [`AuditCliError::Since`] or [`AuditCliError::Kind`] for bad values.
    pub fn filter(&self) -> Result<AuditFilter, AuditCliError> {
        let kind = match &self.kind {
            None => None,
            Some(k) => Some(AuditKind::parse(k).ok_or_else(|| {
                AuditCliError::Kind(
                    AuditKind::ALL
                        .iter()
                        .map(|k| k.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                )
            })?),
        };
        Ok(AuditFilter {
            account: self.account.clone(),
            customer: self.customer.clone(),
            since_ms: self.since.as_deref().map(parse_time).transpose()?,
            kind,
            limit: self.limit,
        })
    }
}

/// Text safe for a terminal: printable ASCII as is, anything else escaped
/// (records hold escaped client text already; this is defence in depth).
fn printable(s: Option<&str>) -> String {
    match s {
        None | Some("") => "-".to_owned(),
        Some(s) if s.chars().all(|c| (' '..='~').contains(&c)) => s.replace(' ', "_"),
        Some(s) => escape(s, 512).replace(' ', "_"),
    }
}

fn opt_num<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// Runs `maintgate audit`.
///
/// The table has one line per record with space-separated columns (spaces
/// inside values become `_`, empty values `-`): ID START END KIND STATUS
/// ACCOUNT CLIENT CUSTOMER SYSTEM TARGET UP DOWN REASON DETAIL, where UP is
/// client → target bytes and DOWN target → client.
///
/// # Errors
/// [`AuditCliError`] for bad arguments, a store failure or an output error.
pub fn run_audit(
    args: &AuditArgs,
    store: &SqliteStore,
    out: &mut dyn Write,
) -> Result<(), AuditCliError> {
    let records = store.audit_query(&args.filter()?)?;
    if args.json {
        let view: Vec<AuditJson<'_>> = records.iter().map(AuditJson::from).collect();
        serde_json::to_writer_pretty(&mut *out, &view)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(
        out,
        "ID START END KIND STATUS ACCOUNT CLIENT CUSTOMER SYSTEM TARGET UP DOWN REASON DETAIL"
    )?;
    for r in &records {
        writeln!(
            out,
            "{} {} {} {} {} {} {} {} {} {} {} {} {} {}",
            r.id,
            format_rfc3339_ms(r.start_ms),
            r.end_ms.map_or_else(|| "-".to_owned(), format_rfc3339_ms),
            printable(Some(&r.kind)),
            opt_num(r.status),
            printable(r.account.as_deref()),
            printable(r.client.as_deref()),
            printable(r.customer.as_deref()),
            printable(r.system.as_deref()),
            printable(r.target.as_deref()),
            opt_num(r.bytes_client_to_target),
            opt_num(r.bytes_target_to_client),
            printable(r.reason.as_deref()),
            printable(r.detail.as_deref()),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::front::head::{parse_head, Limits};
    use crate::store::DB_FILE;
    use base64::Engine as _;

    fn head_with_auth(user_pass: &[u8]) -> RequestHead {
        let b64 = base64::engine::general_purpose::STANDARD.encode(user_pass);
        let raw = format!(
            "CONNECT 1234.maint.test:22 HTTP/1.1\r\nProxy-Authorization: Basic {b64}\r\n\r\n"
        );
        parse_head(raw.as_bytes(), &Limits::default())
            .unwrap()
            .unwrap()
            .0
    }

    #[test]
    fn claimed_user_is_escaped_and_never_the_password() {
        let h = head_with_auth(b"ev\r\nil\x1b[31m:hunter2");
        let u = claimed_user(&h).unwrap();
        assert_eq!(u, "ev\\x0d\\x0ail\\x1b[31m");
        assert!(!u.contains("hunter2"));
        assert_eq!(claimed_user(&head_with_auth(b"alice:pw")).unwrap(), "alice");
        assert_eq!(
            claimed_user(&head_with_auth(b"\xff\xfe:pw")).unwrap(),
            "\\u{fffd}\\u{fffd}"
        );
        let none = parse_head(b"CONNECT a:1 HTTP/1.1\r\n\r\n", &Limits::default())
            .unwrap()
            .unwrap()
            .0;
        assert_eq!(claimed_user(&none), None);
    }

    #[test]
    fn cli_table_and_json() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join(DB_FILE)).unwrap();
        store
            .audit_insert(&NewAudit {
                kind: Some(AuditKind::Rejected),
                account: Some("bad name\x1b".into()),
                customer: Some("1234".into()),
                started_ms: 1_714_564_800_000,
                ended_ms: Some(1_714_564_800_000),
                status: Some(407),
                reason: Some("proxy authentication required".into()),
                ..NewAudit::default()
            })
            .unwrap();
        let mut out = Vec::new();
        run_audit(&AuditArgs::default(), &store, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        let cols: Vec<&str> = lines[1].split(' ').collect();
        assert_eq!(cols.len(), 14, "{text}");
        assert_eq!(cols[1], "2024-05-01T12:00:00.000Z");
        assert_eq!(cols[3], "rejected");
        assert_eq!(cols[4], "407");
        assert_eq!(cols[5], "bad_name\\x1b");
        assert!(!text.contains('\x1b'));

        let mut out = Vec::new();
        let args = AuditArgs {
            json: true,
            since: Some("2024-05-01T12:00:00Z".into()),
            customer: Some("1234".into()),
            ..AuditArgs::default()
        };
        run_audit(&args, &store, &mut out).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v[0]["status"], 407);
        assert_eq!(v[0]["start"], "2024-05-01T12:00:00.000Z");
        assert_eq!(v[0]["kind"], "rejected");

        let later = AuditArgs {
            since: Some("1714564801".into()),
            ..AuditArgs::default()
        };
        let mut out = Vec::new();
        run_audit(&later, &store, &mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap().lines().count(), 1);

        let bad = AuditArgs {
            since: Some("yesterday".into()),
            ..AuditArgs::default()
        };
        assert!(matches!(
            run_audit(&bad, &store, &mut Vec::new()),
            Err(AuditCliError::Since(_))
        ));
        let bad = AuditArgs {
            kind: Some("nope".into()),
            ..AuditArgs::default()
        };
        assert!(matches!(
            run_audit(&bad, &store, &mut Vec::new()),
            Err(AuditCliError::Kind(_))
        ));
    }
}
