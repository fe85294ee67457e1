//! The broker: `maintgate serve`.
//!
//! [`Broker::bind`] opens the store, loads (or generates) certificates and
//! binds the listener; [`Broker::run`] accepts until the shutdown future
//! resolves, then drains. Tests bind `127.0.0.1:0` and read
//! [`Broker::local_addr`].
//!
//! Background tasks: the certificate watcher, and the revalidator that
//! notices store changes made by other processes (the CLI) and ends what
//! they revoke: tunnels of disabled accounts or of customers no longer
//! managed, and agent sessions whose token was rotated.
//!
//! [`Broker::bind`] also closes audit records left open by a crash (as
//! `interrupted`), loads or creates the admin token and binds the admin
//! listener ([`Broker::admin_addr`]); [`Broker::run`] serves the admin API
//! ([`crate::admin`]) next to the proxy port and drains both on shutdown.

pub mod agent_link;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::BrokerSettings;
use crate::front::auth::Authenticator;
use crate::front::conn::Transport;
use crate::registry::Registry;
use crate::store::{Store, StoreError};
use crate::tls::{self, CertPaths, CertResolver, TlsError};

/// Errors starting or running the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("tls: {0}")]
    Tls(#[from] TlsError),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    AdminToken(#[from] crate::admin::token::TokenError),
    #[error("data directory {dir}: {source}")]
    DataDir {
        dir: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("data directory {dir} is in use by another broker ({holder}); stop that one, or give this one its own data_dir")]
    DataDirInUse {
        dir: std::path::PathBuf,
        holder: String,
    },
}

/// The lock file in the data directory.
pub const LOCK_FILE: &str = "broker.lock";

/// An exclusive lock on the data directory, held while the broker runs.
///
/// A second broker on the same directory would close the first one's open
/// audit records as interrupted at its start, and then both would write
/// one SQLite file; it is refused instead. The lock is `flock`-style, so
/// the kernel releases it when the process ends, even on SIGKILL: a crash
/// never leaves a stale lock behind. The CLI does not take it (its writes
/// are short transactions the broker notices).
#[derive(Debug)]
struct DataDirLock {
    file: std::fs::File,
}

impl Drop for DataDirLock {
    /// Unlock explicitly: closing our descriptor alone leaves the lock held
    /// while any copy of it lives, such as one a child process inherits
    /// for the moment between its fork and its exec (seen in the tests,
    /// which restart a broker in a process that also spawns clients).
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}

impl DataDirLock {
    fn acquire(dir: &std::path::Path) -> Result<DataDirLock, BrokerError> {
        use std::io::Write;
        let io = |source| BrokerError::DataDir {
            dir: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let path = dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let holder = crate::logsafe::escape(holder.trim(), 64);
                return Err(BrokerError::DataDirInUse {
                    dir: dir.to_path_buf(),
                    holder: if holder.is_empty() {
                        "pid unknown".to_owned()
                    } else {
                        holder
                    },
                });
            }
            Err(std::fs::TryLockError::Error(e)) if e.kind() == std::io::ErrorKind::Unsupported => {
                // Some network and FUSE file systems have no locks: run,
                // but say that the guard is off.
                warn!(dir = %dir.display(), error = %e, "cannot lock the data directory here; make sure only one broker uses it");
                return Ok(DataDirLock { file });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        // Who holds it, for the message above (advisory; best effort).
        let _ = file
            .set_len(0)
            .and_then(|()| write!(file, "pid {}", std::process::id()));
        Ok(DataDirLock { file })
    }
}

/// State shared by every connection of one broker.
pub struct BrokerState {
    /// Validated settings.
    pub settings: BrokerSettings,
    /// Accounts, customers, systems.
    store: Store,
    /// Live agent sessions and tunnels.
    registry: Arc<Registry>,
    /// Proxy-account checks.
    auth: Authenticator,
    /// TLS acceptor with the reloading resolver.
    acceptor: TlsAcceptor,
    /// The resolver behind `acceptor`, for the watcher.
    resolver: Arc<CertResolver>,
    /// Certificate file locations.
    cert_paths: CertPaths,
    /// The rendered PAC file.
    pac: String,
    /// Connection permits: one per open client or agent connection.
    conn_permits: Arc<Semaphore>,
    /// Counters and histograms for `/metrics`.
    metrics: crate::metrics::Metrics,
    /// The admin API's bearer token (its digest).
    admin_token: crate::admin::token::AdminToken,
    /// The port clients connect to (`public_port`, else the bound proxy
    /// port), for connect-info through the admin API.
    client_port: u16,
    /// The memory guard, when a limit applies.
    memory: Option<Arc<crate::memguard::MemoryGuard>>,
}

impl BrokerState {
    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }
    /// Live sessions and tunnels.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }
    /// The authenticator.
    pub fn auth(&self) -> &Authenticator {
        &self.auth
    }
    /// The TLS acceptor.
    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }
    /// Certificate locations.
    pub fn cert_paths(&self) -> &CertPaths {
        &self.cert_paths
    }
    /// The certificate resolver (reload counters).
    pub fn resolver(&self) -> &Arc<CertResolver> {
        &self.resolver
    }
    /// Whether open connections are past the soft cap (90% of
    /// `max_connections`) or resident memory is over its limit: new
    /// CONNECTs then get 503 while the broker keeps serving what it has;
    /// the hard connection cap stops accepting altogether.
    pub fn overloaded(&self) -> bool {
        let max = self.settings.limits.max_connections;
        let open = max.saturating_sub(self.conn_permits.available_permits());
        open * 10 >= max * 9 || self.memory.as_ref().is_some_and(|m| m.is_over())
    }
    /// The rendered PAC.
    pub fn pac(&self) -> &str {
        &self.pac
    }
    /// Metrics counters.
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }
    /// The admin token.
    pub fn admin_token(&self) -> &crate::admin::token::AdminToken {
        &self.admin_token
    }
    /// The port clients connect to.
    pub fn client_port(&self) -> u16 {
        self.client_port
    }
}

/// A bound, not yet running broker.
pub struct Broker {
    state: Arc<BrokerState>,
    listener: TcpListener,
    local_addr: SocketAddr,
    /// The admin API's own listener, never the proxy port.
    admin_listener: TcpListener,
    /// Its bound address (tests bind port 0).
    admin_addr: SocketAddr,
    /// The loopback test listener without TLS, when configured.
    plain_listener: Option<TcpListener>,
    /// Held until [`Broker::run`] has drained.
    data_lock: DataDirLock,
}

impl Broker {
    /// Open the store, close audit records left open by a crash, prepare
    /// TLS and the admin token, and bind the proxy and admin ports.
    ///
    /// # Errors
    /// [`BrokerError`] when the store, the certificates, the admin token
    /// or a bind fail.
    pub async fn bind(settings: BrokerSettings) -> Result<Broker, BrokerError> {
        // First: nothing below may touch a directory another broker uses.
        let data_lock = DataDirLock::acquire(&settings.data_dir)?;
        let store = Store::open_sqlite(&crate::store::db_path(&settings.data_dir))?;
        // Before any tunnel can run: every open record is from a crash.
        let interrupted = store
            .audit_close_interrupted(crate::timefmt::now_ms())
            .await?;
        if interrupted > 0 {
            warn!(
                records = interrupted,
                "closed audit records left open by an earlier crash as interrupted"
            );
        }
        let (admin_token, created) =
            crate::admin::token::AdminToken::load_or_create(&settings.data_dir)?;
        if created {
            info!(file = %admin_token.path().display(), "generated the admin API token");
        }
        let cert_paths = CertPaths {
            dir: settings.certs_dir.clone(),
        };
        if tls::ensure_certs(&cert_paths, &settings.domain)? {
            info!(dir = %cert_paths.dir.display(), "generated a local CA and server certificate");
        }
        let resolver = CertResolver::new(tls::load_certified_key(&cert_paths)?);
        let acceptor = TlsAcceptor::from(Arc::new(tls::server_config(resolver.clone())?));
        let listener =
            TcpListener::bind(settings.listen)
                .await
                .map_err(|source| BrokerError::Bind {
                    addr: settings.listen,
                    source,
                })?;
        let local_addr = listener.local_addr().map_err(|source| BrokerError::Bind {
            addr: settings.listen,
            source,
        })?;
        let admin_bind = |source| BrokerError::Bind {
            addr: settings.admin_listen,
            source,
        };
        let admin_listener = TcpListener::bind(settings.admin_listen)
            .await
            .map_err(admin_bind)?;
        let admin_addr = admin_listener.local_addr().map_err(admin_bind)?;
        let plain_listener = match settings.plain_test_listen {
            None => None,
            Some(addr) => {
                let bind = |source| BrokerError::Bind { addr, source };
                let l = TcpListener::bind(addr).await.map_err(bind)?;
                warn!(
                    addr = %l.local_addr().map_err(bind)?,
                    "plain test listener: CONNECT and agent links WITHOUT TLS (loopback only; for benchmarks)"
                );
                Some(l)
            }
        };
        // Computed now, so the first unknown-user login does not pay for it.
        let _ = crate::secret::dummy_hash();
        let pac = crate::pac::render(
            &settings.domain,
            &settings.domain,
            settings.client_port(local_addr),
        );
        let memory = crate::memguard::effective_limit(settings.limits.max_memory_mb)
            .map(|limit| Arc::new(crate::memguard::MemoryGuard::new(limit)));
        if let Some(m) = &memory {
            info!(
                limit_mb = m.limit() >> 20,
                "new CONNECTs get 503 above this resident memory"
            );
        }
        let auth = Authenticator::new(store.clone(), settings.limits.auth.clone());
        let client_port = settings.client_port(local_addr);
        let settings_max_connections = settings.limits.max_connections;
        Ok(Broker {
            state: Arc::new(BrokerState {
                settings,
                store,
                registry: Arc::new(Registry::default()),
                auth,
                acceptor,
                resolver,
                cert_paths,
                pac,
                conn_permits: Arc::new(Semaphore::new(settings_max_connections)),
                metrics: crate::metrics::Metrics::default(),
                admin_token,
                client_port,
                memory,
            }),
            listener,
            local_addr,
            admin_listener,
            admin_addr,
            plain_listener,
            data_lock,
        })
    }

    /// The plain test listener's address, when configured.
    pub fn plain_addr(&self) -> Option<SocketAddr> {
        self.plain_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// The bound proxy address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The bound admin API address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Shared state (for the admin API and tests).
    pub fn state(&self) -> Arc<BrokerState> {
        self.state.clone()
    }

    /// Accept connections until `shutdown` resolves, then drain: stop
    /// accepting, cancel every connection, wait up to the drain timeout,
    /// and report what is left.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Broker {
            state,
            listener,
            admin_listener,
            plain_listener,
            data_lock,
            ..
        } = self;
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        tracker.spawn(tls::watch_certs(
            state.cert_paths.clone(),
            state.resolver.clone(),
            state.settings.limits.cert_reload_every,
            cancel.clone(),
        ));
        tracker.spawn(revalidate(state.clone(), cancel.clone()));
        tracker.spawn(crate::admin::serve(
            state.clone(),
            admin_listener,
            cancel.clone(),
            tracker.clone(),
        ));
        tracker.spawn(prune_auth(state.clone(), cancel.clone()));
        if let Some(memory) = state.memory.clone() {
            let cancel = cancel.clone();
            tracker.spawn(async move { memory.watch(cancel).await });
        }
        if let Some(keep) = state.settings.audit_retention {
            tracker.spawn(audit_retention(state.clone(), keep, cancel.clone()));
        }
        let accepting = Accepting {
            state: state.clone(),
            permits: state.conn_permits.clone(),
            per_source: SourceCounts::new(state.settings.limits.max_connections_per_source),
            tracker: tracker.clone(),
            cancel: cancel.clone(),
        };
        if let Some(plain) = plain_listener {
            let a = accepting.clone();
            let stop = cancel.clone().cancelled_owned();
            tracker.spawn(async move { a.run(plain, Transport::Plain, stop).await });
        }
        let listener = accepting.run(listener, Transport::Tls, shutdown).await;
        drop(listener);
        info!("shutting down: draining connections");
        cancel.cancel();
        for a in state.registry.agents() {
            a.mux.close();
        }
        tracker.close();
        if tokio::time::timeout(state.settings.limits.drain_timeout, tracker.wait())
            .await
            .is_err()
        {
            warn!(
                left = tracker.len(),
                "drain deadline passed; tasks left behind"
            );
        } else {
            info!("drained");
        }
        // Tunnels have written their records' ends: another broker may
        // take the directory now.
        drop(data_lock);
    }
}

/// What an accept loop needs; one per listener, sharing the caps.
#[derive(Clone)]
struct Accepting {
    state: Arc<BrokerState>,
    permits: Arc<Semaphore>,
    per_source: SourceCounts,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Accepting {
    /// Accept on `listener` until `stop` resolves; each connection gets a
    /// permit, a per-source slot and its own task. Returns the listener,
    /// so the caller decides when the port closes.
    async fn run(
        &self,
        listener: TcpListener,
        transport: Transport,
        stop: impl Future<Output = ()>,
    ) -> TcpListener {
        tokio::pin!(stop);
        loop {
            let permit = tokio::select! {
                p = self.permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
                _ = &mut stop => break,
            };
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = &mut stop => break,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    let Some(source_slot) = self.per_source.admit(peer.ip()) else {
                        // Over the per-source cap: close before any TLS work.
                        debug!(%peer, "connection refused: too many from this source");
                        drop(tcp);
                        continue;
                    };
                    let state = self.state.clone();
                    let cancel = self.cancel.child_token();
                    self.tracker.spawn(async move {
                        crate::front::conn::serve(state, tcp, peer, transport, cancel).await;
                        drop(source_slot);
                        drop(permit);
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        listener
    }
}

/// Open connections per source address, capped.
#[derive(Clone)]
struct SourceCounts {
    /// Connections per address.
    counts: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    /// The cap.
    max: usize,
}

/// A connection's place in [`SourceCounts`], released on drop.
struct SourceSlot {
    counts: SourceCounts,
    ip: std::net::IpAddr,
}

impl SourceCounts {
    fn new(max: usize) -> SourceCounts {
        SourceCounts {
            counts: Arc::default(),
            max,
        }
    }

    fn admit(&self, ip: std::net::IpAddr) -> Option<SourceSlot> {
        let mut m = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            counts: self.clone(),
            ip,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut m = self.counts.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// Forget idle per-source and per-account authentication state.
async fn prune_auth(state: Arc<BrokerState>, cancel: CancellationToken) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(60)) => state.auth.prune(),
        }
    }
}

/// How often closed audit records past the retention are deleted.
const AUDIT_PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// Records deleted per transaction: a few milliseconds of the store's
/// write lock, which tunnel setups' audit writes wait for.
const AUDIT_PRUNE_CHUNK: usize = 1000;

/// Delete closed audit records older than `keep`: at start, then hourly.
/// Each run that deletes something leaves an `admin` record saying so.
async fn audit_retention(state: Arc<BrokerState>, keep: Duration, cancel: CancellationToken) {
    loop {
        prune_audit_once(&state, keep).await;
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(AUDIT_PRUNE_EVERY) => {}
        }
    }
}

/// One retention pass; returns how many records went.
async fn prune_audit_once(state: &BrokerState, keep: Duration) -> usize {
    let now = crate::timefmt::now_ms();
    let before = now.saturating_sub(i64::try_from(keep.as_millis()).unwrap_or(i64::MAX));
    let deleted = match state.store.audit_prune(before, AUDIT_PRUNE_CHUNK).await {
        Ok(n) => n,
        Err(e) => {
            warn!(error = %e, "audit retention: delete failed");
            return 0;
        }
    };
    if deleted > 0 {
        let cutoff = crate::timefmt::format_rfc3339_ms(before);
        info!(deleted, before = %cutoff, "audit retention: old records deleted");
        let rec = crate::store::audit::NewAudit {
            kind: Some(crate::store::audit::AuditKind::Admin),
            started_ms: now,
            ended_ms: Some(now),
            reason: Some("ok".into()),
            detail: Some(format!(
                "audit.retention deleted {deleted} records that ended before {cutoff}"
            )),
            ..Default::default()
        };
        if let Err(e) = state.store.audit_insert(rec).await {
            warn!(error = %e, "audit retention: could not record the deletion");
        }
    }
    deleted
}

/// Watch the store for changes made by other processes and end what they
/// revoke.
async fn revalidate(state: Arc<BrokerState>, cancel: CancellationToken) {
    let mut last = state.store.data_version().await.ok();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(state.settings.limits.revalidate_every) => {}
        }
        let now = state.store.data_version().await.ok();
        if now == last {
            continue;
        }
        last = now;
        revalidate_once(&state).await;
    }
}

/// End `t` if its account is disabled or no longer manages its customer.
/// Run by [`revalidate_once`] for every tunnel, and once by a new tunnel
/// whose setup overlapped a revalidation (the epoch moved between its store
/// read and its registration): that revalidation may not have seen it.
pub async fn recheck_tunnel(state: &BrokerState, t: &crate::registry::TunnelInfo) {
    let allowed = match state.store.account_by_name(&t.account).await {
        Ok(Some(a)) if a.id == t.account_id && a.enabled => state
            .store
            .customer_managed_by(a.id, &t.customer)
            .await
            .unwrap_or(true),
        Ok(_) => false,
        // A store hiccup must not kill tunnels.
        Err(_) => true,
    };
    if !allowed {
        info!(tunnel = t.id, account = %t.account, "account disabled or customer revoked: ending tunnel");
        t.end_because("access-revoked");
    }
}

/// Check every live tunnel and agent session against the store once.
pub async fn revalidate_once(state: &BrokerState) {
    for t in state.registry.tunnels_for_revalidation() {
        recheck_tunnel(state, &t).await;
    }
    for a in state.registry.agents() {
        if let Ok(false) = state
            .store
            .system_token_hash_is_current(a.system_id, &a.token_hash)
            .await
        {
            info!(customer = %a.customer, system = %a.system, "agent token rotated or revoked: closing session");
            a.mux.close();
        }
    }
}
