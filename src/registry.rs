//! Live state of a broker: agent sessions and the tunnels running over
//! them.
//!
//! The registry owns agent sessions: registering a session for a system
//! that already has one returns the old one, which the caller closes, so a
//! reconnecting agent cleanly replaces its stale session. Tunnels are
//! registered through a [`TunnelGuard`] that removes them when dropped, so
//! no tunnel outlives its entry.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;

use crate::mux::{Mux, RelayStats, Target};
use crate::policy::Hello;

/// One connected agent.
pub struct AgentSession {
    /// Unique per session (a replaced session has another id).
    pub session_id: u64,
    /// The system this agent is, from its token alone.
    pub system_id: i64,
    /// The system's customer id.
    pub customer: String,
    /// The system's name.
    pub system: String,
    /// Hash of the token it authenticated with, to notice rotation.
    pub token_hash: String,
    /// The multiplexed link.
    pub mux: Mux,
    /// What the agent announced: version and policy.
    pub hello: Hello,
    /// The agent's address as the broker saw it.
    pub remote: SocketAddr,
    /// When the session was registered.
    pub connected_at: SystemTime,
}

/// One running tunnel.
pub struct TunnelInfo {
    /// Unique per tunnel.
    pub id: u64,
    /// The account that opened it.
    pub account_id: i64,
    /// The account's name, for operators.
    pub account: String,
    /// Customer and system the tunnel goes to.
    pub customer: String,
    pub system_id: i64,
    /// What the agent dialed.
    pub target: Target,
    /// The client's address.
    pub client: SocketAddr,
    /// When the 200 was sent.
    pub started: SystemTime,
    /// Live byte counters.
    pub stats: Arc<RelayStats>,
    /// Cancelling ends the tunnel (kill, account disabled, shutdown).
    pub cancel: CancellationToken,
    /// Why it was cancelled, set by whoever cancels it (first one wins),
    /// for the audit record's close reason.
    pub end_reason: OnceLock<&'static str>,
}

impl TunnelInfo {
    /// End the tunnel, recording `reason` as its close reason unless one
    /// was already given.
    pub fn end_because(&self, reason: &'static str) {
        let _ = self.end_reason.set(reason);
        self.cancel.cancel();
    }
}

/// Agent sessions and tunnels of one broker.
#[derive(Default)]
pub struct Registry {
    /// Live agent sessions by system id.
    agents: Mutex<HashMap<i64, Arc<AgentSession>>>,
    /// Live tunnels.
    tunnels: Mutex<Tunnels>,
    /// Id source for sessions and tunnels.
    next_id: AtomicU64,
    /// Bytes (client → target, target → client) of tunnels that have
    /// ended. Added under the `tunnels` lock as a tunnel is removed, so
    /// [`Registry::bytes_total`] never counts a tunnel twice or not at all.
    finished_bytes: (AtomicU64, AtomicU64),
}

/// Live tunnels by id, and how many each account has (so the per-account
/// cap is checked without walking every tunnel).
#[derive(Default)]
struct Tunnels {
    by_id: HashMap<u64, Arc<TunnelInfo>>,
    per_account: HashMap<i64, usize>,
    /// Revalidations started: see [`Registry::tunnels_for_revalidation`].
    epoch: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these short locks leaves consistent maps.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Registry {
    /// A fresh id for a session or tunnel.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Register `session`; returns the session it replaces, if any. The
    /// caller closes the replaced session.
    pub fn register(&self, session: Arc<AgentSession>) -> Option<Arc<AgentSession>> {
        lock(&self.agents).insert(session.system_id, session)
    }

    /// Remove the session for `system_id` if it is still `session_id`.
    pub fn unregister(&self, system_id: i64, session_id: u64) {
        let mut agents = lock(&self.agents);
        if agents
            .get(&system_id)
            .is_some_and(|s| s.session_id == session_id)
        {
            agents.remove(&system_id);
        }
    }

    /// The live session of a system.
    pub fn agent(&self, system_id: i64) -> Option<Arc<AgentSession>> {
        lock(&self.agents)
            .get(&system_id)
            .filter(|s| !s.mux.is_closed())
            .cloned()
    }

    /// All live sessions.
    pub fn agents(&self) -> Vec<Arc<AgentSession>> {
        lock(&self.agents).values().cloned().collect()
    }

    /// Register a running tunnel; it is removed when the guard drops.
    pub fn add_tunnel(self: &Arc<Self>, info: TunnelInfo) -> TunnelGuard {
        let info = Arc::new(info);
        let mut t = lock(&self.tunnels);
        if t.by_id.insert(info.id, info.clone()).is_none() {
            *t.per_account.entry(info.account_id).or_insert(0) += 1;
        }
        let epoch = t.epoch;
        drop(t);
        TunnelGuard {
            registry: self.clone(),
            info,
            epoch,
        }
    }

    /// All running tunnels.
    pub fn tunnels(&self) -> Vec<Arc<TunnelInfo>> {
        lock(&self.tunnels).by_id.values().cloned().collect()
    }

    /// How many revalidations have started. A CONNECT reads it before it
    /// reads the store, and compares it with [`TunnelGuard::epoch`].
    pub fn revalidation_epoch(&self) -> u64 {
        lock(&self.tunnels).epoch
    }

    /// Start a revalidation: bump the epoch and list the running tunnels,
    /// under one lock. A tunnel registered after this sees the new epoch
    /// (and checks itself); one registered before is in the list.
    pub fn tunnels_for_revalidation(&self) -> Vec<Arc<TunnelInfo>> {
        let mut t = lock(&self.tunnels);
        t.epoch += 1;
        t.by_id.values().cloned().collect()
    }

    /// How many tunnels run in all, and how many of them for `account_id`.
    pub fn tunnel_counts(&self, account_id: i64) -> (usize, usize) {
        let t = lock(&self.tunnels);
        (
            t.by_id.len(),
            t.per_account.get(&account_id).copied().unwrap_or(0),
        )
    }

    /// End a tunnel by id. Returns whether it existed.
    pub fn kill_tunnel(&self, id: u64) -> bool {
        self.kill_tunnel_because(id, "killed")
    }

    /// End a tunnel by id, recording `reason` as its close reason. Returns
    /// whether it existed.
    pub fn kill_tunnel_because(&self, id: u64, reason: &'static str) -> bool {
        match lock(&self.tunnels).by_id.get(&id) {
            Some(t) => {
                t.end_because(reason);
                true
            }
            None => false,
        }
    }

    /// Bytes carried by every tunnel so far, running ones included:
    /// `(client → target, target → client)`. Monotonic.
    pub fn bytes_total(&self) -> (u64, u64) {
        let tunnels = lock(&self.tunnels);
        let (mut up, mut down) = (
            self.finished_bytes.0.load(Ordering::Relaxed),
            self.finished_bytes.1.load(Ordering::Relaxed),
        );
        for t in tunnels.by_id.values() {
            let (u, d) = t.stats.get();
            up = up.saturating_add(u);
            down = down.saturating_add(d);
        }
        (up, down)
    }
}

/// Keeps a tunnel registered while it lives.
pub struct TunnelGuard {
    registry: Arc<Registry>,
    /// The registered tunnel.
    pub info: Arc<TunnelInfo>,
    /// The revalidation epoch when it was registered.
    pub epoch: u64,
}

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        let mut tunnels = lock(&self.registry.tunnels);
        if tunnels.by_id.remove(&self.info.id).is_some() {
            let account = self.info.account_id;
            if let Some(n) = tunnels.per_account.get_mut(&account) {
                *n -= 1;
                if *n == 0 {
                    tunnels.per_account.remove(&account);
                }
            }
            let (up, down) = self.info.stats.get();
            let finished = &self.registry.finished_bytes;
            finished.0.fetch_add(up, Ordering::Relaxed);
            finished.1.fetch_add(down, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tunnel(id: u64, account_id: i64) -> TunnelInfo {
        TunnelInfo {
            id,
            account_id,
            account: format!("a{account_id}"),
            customer: "1234".into(),
            system_id: 1,
            target: Target::SelfPort(22),
            client: "127.0.0.1:5000".parse().unwrap(),
            started: SystemTime::now(),
            stats: Arc::default(),
            cancel: CancellationToken::new(),
            end_reason: OnceLock::new(),
        }
    }

    #[test]
    fn per_account_counts_follow_registration() {
        let reg = Arc::new(Registry::default());
        let a = reg.add_tunnel(tunnel(1, 7));
        let b = reg.add_tunnel(tunnel(2, 7));
        let c = reg.add_tunnel(tunnel(3, 8));
        assert_eq!(reg.tunnel_counts(7), (3, 2));
        assert_eq!(reg.tunnel_counts(8), (3, 1));
        assert_eq!(reg.tunnel_counts(9), (3, 0));
        drop(a);
        drop(c);
        assert_eq!(reg.tunnel_counts(7), (1, 1));
        assert_eq!(reg.tunnel_counts(8), (1, 0));
        drop(b);
        assert_eq!(reg.tunnel_counts(7), (0, 0));
    }

    /// The race the epoch closes: a CONNECT reads the epoch, then the
    /// store; a revalidation scans before the tunnel is registered. The
    /// registration then sees a different epoch, so the tunnel rechecks
    /// itself. Without a revalidation in between, it sees the same one.
    #[test]
    fn a_revalidation_between_read_and_registration_moves_the_epoch() {
        let reg = Arc::new(Registry::default());
        let before = reg.revalidation_epoch();
        let quiet = reg.add_tunnel(tunnel(1, 7));
        assert_eq!(quiet.epoch, before, "no revalidation: no recheck");

        let read = reg.revalidation_epoch();
        let scanned = reg.tunnels_for_revalidation();
        assert_eq!(scanned.len(), 1, "the scan saw the registered tunnel");
        let raced = reg.add_tunnel(tunnel(2, 7));
        assert_ne!(raced.epoch, read, "the scan missed it: recheck");
    }
}
