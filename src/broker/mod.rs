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
use tracing::{info, warn};

use crate::config::BrokerSettings;
use crate::front::auth::Authenticator;
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
    /// The rendered PAC.
    pub fn pac(&self) -> &str {
        &self.pac
    }
}

/// A bound, not yet running broker.
pub struct Broker {
    state: Arc<BrokerState>,
    listener: TcpListener,
    local_addr: SocketAddr,
}

impl Broker {
    /// Open the store, prepare TLS and bind the proxy port.
    ///
    /// # Errors
    /// [`BrokerError`] when the store, the certificates or the bind fail.
    pub async fn bind(settings: BrokerSettings) -> Result<Broker, BrokerError> {
        let store = Store::open_sqlite(&crate::store::db_path(&settings.data_dir))?;
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
        // Computed now, so the first unknown-user login does not pay for it.
        let _ = crate::secret::dummy_hash();
        let pac = crate::pac::render(
            &settings.domain,
            &settings.domain,
            settings.client_port(local_addr),
        );
        let auth = Authenticator::new(store.clone(), settings.limits.auth.clone());
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
            }),
            listener,
            local_addr,
        })
    }

    /// The bound proxy address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
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
            state, listener, ..
        } = self;
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let permits = Arc::new(Semaphore::new(state.settings.limits.max_connections));
        tracker.spawn(tls::watch_certs(
            state.cert_paths.clone(),
            state.resolver.clone(),
            state.settings.limits.cert_reload_every,
            cancel.clone(),
        ));
        tracker.spawn(revalidate(state.clone(), cancel.clone()));
        tracker.spawn(prune_auth(state.clone(), cancel.clone()));
        tokio::pin!(shutdown);
        loop {
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
                _ = &mut shutdown => break,
            };
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = &mut shutdown => break,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    let state = state.clone();
                    let cancel = cancel.child_token();
                    tracker.spawn(async move {
                        crate::front::conn::serve(state, tcp, peer, cancel).await;
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

/// Check every live tunnel and agent session against the store once.
pub async fn revalidate_once(state: &BrokerState) {
    for t in state.registry.tunnels() {
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
            t.cancel.cancel();
        }
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
