//! Proxy-account authentication.
//!
//! Every checked failure costs one Argon2id verification: an unknown user
//! and a locked account are checked against a dummy hash, so timing does
//! not tell which names exist or which are locked, and the answer is the
//! same 407. Verifications run on the blocking pool behind a semaphore,
//! because Argon2 is itself a denial-of-service lever.
//!
//! Layers, in order:
//! 1. A success cache keyed by HMAC(user, password, stored hash): a password
//!    change invalidates it; `enabled` is read from the store every time.
//! 2. Per source: at most [`MAX_INFLIGHT_PER_SOURCE`] verifications in
//!    flight, and a governor rate limit on hash work. A source over either
//!    gets the 407 without any hashing, so one source cannot starve others.
//! 3. Per account: lockout after repeated failures, growing duration.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::Semaphore;
use tracing::warn;

use super::basic::Credentials;
use super::lockout::{LockoutPolicy, Lockouts};
use crate::logsafe::escape;
use crate::secret;
use crate::store::{Store, StoreError};

/// Most cached successes kept at once.
const MAX_CACHE_ENTRIES: usize = 10_000;
/// Verifications one source may have in flight.
pub const MAX_INFLIGHT_PER_SOURCE: usize = 2;

/// An authenticated proxy account.
#[derive(Debug, Clone)]
pub struct AuthedAccount {
    /// Row id.
    pub id: i64,
    /// User name.
    pub name: String,
}

/// Why authentication failed. Callers answer every variant but `Store`
/// with the same 407.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("wrong user or password")]
    BadCredentials,
    #[error("source is over its authentication budget")]
    Throttled,
    #[error("store unavailable: {0}")]
    Store(#[from] StoreError),
}

/// Tunables of the authenticator.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// Concurrent Argon2 verifications, broker-wide.
    pub max_hashes: usize,
    /// How long a verified password stays cached.
    pub cache_ttl: Duration,
    /// Verifications per minute per source (burst the same).
    pub hashes_per_minute_per_source: u32,
    /// Account lockout rules.
    pub lockout: LockoutPolicy,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            max_hashes: 2,
            cache_ttl: Duration::from_secs(60),
            hashes_per_minute_per_source: 60,
            lockout: LockoutPolicy::default(),
        }
    }
}

/// Counters for metrics.
#[derive(Debug, Default)]
pub struct AuthCounters {
    /// Failed checks (bad credentials, locked, throttled).
    pub failures: AtomicU64,
    /// Lockouts started.
    pub lockouts: AtomicU64,
    /// Attempts refused without hashing (source over budget).
    pub throttled: AtomicU64,
    /// Argon2 verifications run.
    pub hashes: AtomicU64,
}

/// One verification for the hasher pool.
struct HashJob {
    password: String,
    phc: String,
    answer: tokio::sync::oneshot::Sender<bool>,
}

/// A fixed set of threads that run Argon2 verifications. Each check
/// allocates 19 MiB; on the shared blocking pool those allocations spread
/// over many threads and malloc arenas and are kept, so memory grows with
/// every burst of logins. A few dedicated threads reuse theirs.
struct HashPool {
    jobs: std::sync::mpsc::SyncSender<HashJob>,
}

impl HashPool {
    fn new(threads: usize) -> HashPool {
        let (tx, rx) = std::sync::mpsc::sync_channel::<HashJob>(threads * 4);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("maintgate-hash-{i}"))
                .spawn(move || {
                    // One Argon2 buffer per thread, reused for every check.
                    let mut verifier = secret::Verifier::new();
                    loop {
                        let job = match rx.lock() {
                            Ok(r) => r.recv(),
                            Err(_) => return,
                        };
                        let Ok(job) = job else { return };
                        let ok = verifier.verify(&job.password, &job.phc);
                        let _ = job.answer.send(ok);
                    }
                });
            if let Err(e) = spawned {
                warn!(error = %e, "could not start a password hashing thread");
            }
        }
        HashPool { jobs: tx }
    }

    /// Verify on the pool; `false` if the pool is gone.
    async fn verify(&self, password: String, phc: String) -> bool {
        let (answer, rx) = tokio::sync::oneshot::channel();
        let job = HashJob {
            password,
            phc,
            answer,
        };
        // The semaphore in front keeps at most `threads` jobs in flight,
        // below the channel's capacity, so this never finds it full.
        if self.jobs.try_send(job).is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }
}

/// Checks proxy credentials against the store.
pub struct Authenticator {
    /// Where accounts live.
    store: Store,
    /// Bounds concurrent Argon2 verifications.
    hashers: Arc<Semaphore>,
    /// The threads that run them.
    pool: HashPool,
    /// Highest number of concurrent verifications seen (tests, metrics).
    max_seen: AtomicU64,
    /// Verifications running now.
    running: AtomicU64,
    /// HMAC(user, password, hash) → expiry of a cached success.
    cache: Mutex<HashMap<[u8; 32], Instant>>,
    /// Per-process key for the cache HMAC.
    cache_key: [u8; 32],
    /// Settings.
    config: AuthConfig,
    /// Verifications in flight per source.
    inflight: Mutex<HashMap<IpAddr, usize>>,
    /// One verification per credential at a time: when a cached success
    /// expires under many concurrent requests (a NAT'd office, a browser
    /// opening tabs), they wait for the first check instead of each
    /// spending the source's budget and getting a 407.
    single_flight: Mutex<HashMap<[u8; 32], Arc<tokio::sync::Mutex<()>>>>,
    /// Hash work per source.
    per_source: DefaultKeyedRateLimiter<IpAddr>,
    /// Failure counting and lockout per account.
    lockouts: Lockouts,
    /// Counters.
    pub counters: AuthCounters,
}

/// Releases a source's in-flight slot on drop.
struct InflightGuard<'a> {
    auth: &'a Authenticator,
    source: IpAddr,
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        let mut m = self.auth.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.source);
            }
        }
    }
}

impl Authenticator {
    /// An authenticator over `store`.
    pub fn new(store: Store, config: AuthConfig) -> Authenticator {
        let per_min =
            NonZeroU32::new(config.hashes_per_minute_per_source.max(1)).unwrap_or(NonZeroU32::MIN);
        Authenticator {
            store,
            hashers: Arc::new(Semaphore::new(config.max_hashes.max(1))),
            pool: HashPool::new(config.max_hashes.max(1)),
            max_seen: AtomicU64::new(0),
            running: AtomicU64::new(0),
            cache: Mutex::new(HashMap::new()),
            cache_key: rand::random(),
            per_source: RateLimiter::keyed(Quota::per_minute(per_min)),
            lockouts: Lockouts::new(config.lockout.clone()),
            config,
            inflight: Mutex::new(HashMap::new()),
            single_flight: Mutex::new(HashMap::new()),
            counters: AuthCounters::default(),
        }
    }

    /// Most verifications that ever ran at once.
    pub fn max_concurrent_hashes_seen(&self) -> u64 {
        self.max_seen.load(Ordering::Relaxed)
    }

    /// Forget idle per-source and per-account state (call periodically).
    pub fn prune(&self) {
        self.per_source.retain_recent();
        self.per_source.shrink_to_fit();
        self.lockouts.prune(Instant::now());
        let now = Instant::now();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.retain(|_, exp| *exp > now);
    }

    fn cache_tag(&self, creds: &Credentials, hash: &str) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.cache_key)
            .expect("HMAC takes keys of any length");
        mac.update(creds.user.to_ascii_lowercase().as_bytes());
        mac.update(&[0]);
        mac.update(creds.password.as_bytes());
        mac.update(&[0]);
        mac.update(hash.as_bytes());
        mac.finalize().into_bytes().into()
    }

    fn fail(&self) -> AuthError {
        self.counters.failures.fetch_add(1, Ordering::Relaxed);
        AuthError::BadCredentials
    }

    /// Verify `creds` presented from `source`.
    ///
    /// # Errors
    /// [`AuthError::BadCredentials`] for an unknown user, a wrong password,
    /// a disabled or locked account; [`AuthError::Throttled`] when the
    /// source is over budget (callers answer both with the same 407);
    /// [`AuthError::Store`] when the store fails.
    pub async fn verify(
        &self,
        creds: &Credentials,
        source: IpAddr,
    ) -> Result<AuthedAccount, AuthError> {
        let account = self.store.account_by_name(&creds.user).await?;
        self.verify_account(creds, source, account).await
    }

    /// [`Authenticator::verify`] with the account already read from the
    /// store (`None`: no such user), so a CONNECT reads everything it needs
    /// in one trip.
    ///
    /// # Errors
    /// As [`Authenticator::verify`].
    pub async fn verify_account(
        &self,
        creds: &Credentials,
        source: IpAddr,
        account: Option<crate::store::Account>,
    ) -> Result<AuthedAccount, AuthError> {
        let stored = account.as_ref().map(|a| a.password_hash.clone());
        let hash = stored
            .clone()
            .unwrap_or_else(|| secret::dummy_hash().to_string());
        let tag = self.cache_tag(creds, &hash);
        if let Some(hit) = self.cached(account.as_ref(), &tag) {
            return Ok(hit);
        }
        // Same credentials already being checked: wait for that check, then
        // look at the cache again.
        let flight = {
            let mut m = self.single_flight.lock().unwrap_or_else(|p| p.into_inner());
            m.entry(tag).or_default().clone()
        };
        let _turn = flight.lock().await;
        let result = self
            .verify_uncached(creds, source, account, hash, tag)
            .await;
        drop(_turn);
        {
            let mut m = self.single_flight.lock().unwrap_or_else(|p| p.into_inner());
            // Only the map and this task hold it: nobody else is waiting.
            if m.get(&tag).is_some_and(|f| Arc::strong_count(f) <= 2) {
                m.remove(&tag);
            }
        }
        result
    }

    /// A fresh cached success for this account and credential tag.
    fn cached(
        &self,
        account: Option<&crate::store::Account>,
        tag: &[u8; 32],
    ) -> Option<AuthedAccount> {
        let a = account?;
        let hit = {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            cache.get(tag).is_some_and(|exp| *exp > Instant::now())
        };
        (hit && a.enabled && !self.lockouts.is_locked(&a.name, Instant::now())).then(|| {
            AuthedAccount {
                id: a.id,
                name: a.name.clone(),
            }
        })
    }

    async fn verify_uncached(
        &self,
        creds: &Credentials,
        source: IpAddr,
        account: Option<crate::store::Account>,
        hash: String,
        tag: [u8; 32],
    ) -> Result<AuthedAccount, AuthError> {
        if let Some(hit) = self.cached(account.as_ref(), &tag) {
            return Ok(hit);
        }

        // Per-source budget, before any hashing.
        let _slot = {
            let mut m = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            let n = m.entry(source).or_insert(0);
            if *n >= MAX_INFLIGHT_PER_SOURCE {
                drop(m);
                self.counters.throttled.fetch_add(1, Ordering::Relaxed);
                self.counters.failures.fetch_add(1, Ordering::Relaxed);
                return Err(AuthError::Throttled);
            }
            *n += 1;
            InflightGuard { auth: self, source }
        };
        if self.per_source.check_key(&source).is_err() {
            self.counters.throttled.fetch_add(1, Ordering::Relaxed);
            self.counters.failures.fetch_add(1, Ordering::Relaxed);
            return Err(AuthError::Throttled);
        }

        let locked = account
            .as_ref()
            .is_some_and(|a| self.lockouts.is_locked(&a.name, Instant::now()));
        // A locked account is checked against the dummy hash: same cost,
        // same answer, and the real hash is not exercised.
        let check_hash = if locked {
            secret::dummy_hash().to_string()
        } else {
            hash
        };
        let ok = {
            let _permit = self.hashers.acquire().await.map_err(|_| self.fail())?;
            let now = self.running.fetch_add(1, Ordering::Relaxed) + 1;
            self.max_seen.fetch_max(now, Ordering::Relaxed);
            self.counters.hashes.fetch_add(1, Ordering::Relaxed);
            let ok = self.pool.verify(creds.password.clone(), check_hash).await;
            self.running.fetch_sub(1, Ordering::Relaxed);
            ok
        };
        match account {
            Some(a) if ok && a.enabled && !locked => {
                self.lockouts.record_success(&a.name);
                let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                if cache.len() >= MAX_CACHE_ENTRIES {
                    let now = Instant::now();
                    cache.retain(|_, exp| *exp > now);
                    if cache.len() >= MAX_CACHE_ENTRIES {
                        cache.clear();
                    }
                }
                cache.insert(tag, Instant::now() + self.config.cache_ttl);
                Ok(AuthedAccount {
                    id: a.id,
                    name: a.name,
                })
            }
            Some(a) => {
                if !locked {
                    if let Some(d) = self.lockouts.record_failure(&a.name, Instant::now()) {
                        self.counters.lockouts.fetch_add(1, Ordering::Relaxed);
                        warn!(account = %escape(&a.name, 64), %source, lockout_secs = d.as_secs(), "account locked after repeated failures");
                    }
                }
                Err(self.fail())
            }
            None => Err(self.fail()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_logins_with_the_same_credentials_share_one_check() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("db")).unwrap();
        let hash = secret::hash_password("office-pw").unwrap();
        store.add_account("office", &hash).await.unwrap();
        let auth = Arc::new(Authenticator::new(store, AuthConfig::default()));
        let creds = Credentials {
            user: "office".into(),
            password: "office-pw".into(),
        };
        let source: IpAddr = [10, 0, 0, 1].into();
        let all: Vec<_> = (0..16)
            .map(|_| {
                let auth = auth.clone();
                let creds = creds.clone();
                tokio::spawn(async move { auth.verify(&creds, source).await })
            })
            .collect();
        for r in all {
            assert!(r.await.unwrap().is_ok(), "a concurrent login was refused");
        }
        assert_eq!(auth.counters.hashes.load(Ordering::Relaxed), 1);
        assert_eq!(auth.counters.throttled.load(Ordering::Relaxed), 0);
        assert!(auth.single_flight.lock().unwrap().is_empty());
    }
}
