//! Audit records as the store keeps them.
//!
//! One table, `audit`, holds every decision the broker makes
//! (security.md promise 6):
//!
//! * `tunnel`: a CONNECT that got (or was about to get) its 200. The row is
//!   written *before* the agent is asked to open the target, and the broker
//!   refuses the tunnel with 503 if it cannot be written (fail closed). It
//!   is finished with the end time, the exact byte counts and the close
//!   reason when the tunnel ends; a row still open at the next start was
//!   left by a crash and is closed as `interrupted`.
//! * `rejected`: a CONNECT answered with an error status, with the reason.
//! * `agent-connect`, `agent-replace`, `agent-disconnect`, `agent-refused`:
//!   agent sessions.
//! * `admin`: a state-changing admin API call; `detail` names the action.
//!
//! Times are Unix milliseconds. Text that came from a client (a claimed
//! user name, a requested destination) is stored escaped by the caller
//! ([`crate::logsafe::escape`]), so it is safe to print.

use serde::Serialize;

/// Kinds of audit records. Stored as their [`AuditKind::as_str`] text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuditKind {
    /// A tunnel (CONNECT answered 200).
    Tunnel,
    /// A refused CONNECT.
    Rejected,
    /// An agent session started.
    AgentConnect,
    /// An agent session started and replaced an older one of the same
    /// system.
    AgentReplace,
    /// An agent session ended.
    AgentDisconnect,
    /// An agent presented a token that was not accepted.
    AgentRefused,
    /// A state-changing admin API call.
    Admin,
}

impl AuditKind {
    /// Every kind, for parsing and docs.
    pub const ALL: [AuditKind; 7] = [
        AuditKind::Tunnel,
        AuditKind::Rejected,
        AuditKind::AgentConnect,
        AuditKind::AgentReplace,
        AuditKind::AgentDisconnect,
        AuditKind::AgentRefused,
        AuditKind::Admin,
    ];

    /// The stored text.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            AuditKind::Tunnel => "tunnel",
            AuditKind::Rejected => "rejected",
            AuditKind::AgentConnect => "agent-connect",
            AuditKind::AgentReplace => "agent-replace",
            AuditKind::AgentDisconnect => "agent-disconnect",
            AuditKind::AgentRefused => "agent-refused",
            AuditKind::Admin => "admin",
        }
    }

    /// The kind named `s`, if any.
    #[must_use]
    pub fn parse(s: &str) -> Option<AuditKind> {
        AuditKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// Close reason written to tunnel records left open by a crash.
pub const INTERRUPTED: &str = "interrupted";

/// A record to insert. Empty fields stay `NULL`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewAudit {
    /// What happened; `None` is refused by the store.
    pub kind: Option<AuditKind>,
    /// Account name: the authenticated account, or the (escaped) name a
    /// refused client claimed.
    pub account: Option<String>,
    /// Client (or agent, or admin caller) address, `ip:port`.
    pub client: Option<String>,
    /// Customer id.
    pub customer: Option<String>,
    /// System name.
    pub system: Option<String>,
    /// The destination as requested (escaped), e.g. `1234-ipo2.maint...:22`.
    pub dest: Option<String>,
    /// What the agent dials: `ip:port`, or `self:port` for the system
    /// itself (its address is the agent's `self_address`).
    pub target: Option<String>,
    /// Start, Unix ms.
    pub started_ms: i64,
    /// End, Unix ms; `None` keeps the record open (a running tunnel).
    pub ended_ms: Option<i64>,
    /// HTTP status answered, if any yet.
    pub status: Option<u16>,
    /// Why it was refused or closed.
    pub reason: Option<String>,
    /// Free text: the admin action, the agent version, ...
    pub detail: Option<String>,
}

/// How a tunnel ended, written over its open record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEnd {
    /// End, Unix ms.
    pub ended_ms: i64,
    /// Status to record; `None` keeps the stored one.
    pub status: Option<u16>,
    /// Bytes client → target and target → client, exact; `None` when no
    /// byte could flow (the open failed).
    pub bytes: Option<(u64, u64)>,
    /// Close reason: `closed`, `killed`, `access-revoked`, `shutdown`, ...
    pub reason: String,
}

/// One stored record, as listed by `maintgate audit` and the admin API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditRecord {
    /// Row id. For tunnels it is also the tunnel id the admin API uses.
    pub id: i64,
    /// Kind, see [`AuditKind`].
    pub kind: String,
    /// Account name.
    pub account: Option<String>,
    /// Client address.
    pub client: Option<String>,
    /// Customer id.
    pub customer: Option<String>,
    /// System name.
    pub system: Option<String>,
    /// Destination as requested.
    pub dest: Option<String>,
    /// What the agent dialed (`ip:port` or `self:port`).
    pub target: Option<String>,
    /// Start, Unix ms.
    pub start_ms: i64,
    /// End, Unix ms; `None` while a tunnel runs.
    pub end_ms: Option<i64>,
    /// Bytes client → target.
    pub bytes_client_to_target: Option<u64>,
    /// Bytes target → client.
    pub bytes_target_to_client: Option<u64>,
    /// HTTP status answered.
    pub status: Option<u16>,
    /// Refusal or close reason.
    pub reason: Option<String>,
    /// Extra detail (admin action, agent version).
    pub detail: Option<String>,
}

/// Default number of records a query returns.
pub const DEFAULT_LIMIT: u32 = 1000;
/// Most records one query returns.
pub const MAX_LIMIT: u32 = 100_000;

/// Which records to list. Records come oldest first; with a limit, the
/// newest `limit` matching records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Only this account (case-insensitive).
    pub account: Option<String>,
    /// Only this customer (case-insensitive).
    pub customer: Option<String>,
    /// Only records running at or after this time (Unix ms): started after
    /// it, ended after it, or still open.
    pub since_ms: Option<i64>,
    /// Only this kind.
    pub kind: Option<AuditKind>,
    /// At most this many (default [`DEFAULT_LIMIT`], capped at
    /// [`MAX_LIMIT`]).
    pub limit: Option<u32>,
}
