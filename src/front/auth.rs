//! Proxy-account authentication.
//!
//! Every failure costs one Argon2id verification: an unknown user is
//! checked against a dummy hash, so timing does not tell which names
//! exist. Verifications run on the blocking pool behind a semaphore,
//! because Argon2 is itself a denial-of-service lever. A success is cached
//! briefly under an HMAC of (user, password, stored hash): a password change
//! invalidates the entry, and the account's `enabled` flag is read from the
//! store on every request, so disabling takes effect at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::Semaphore;

use super::basic::Credentials;
use crate::secret;
use crate::store::{Store, StoreError};

/// Most cached successes kept at once.
const MAX_CACHE_ENTRIES: usize = 10_000;

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
    #[error("store unavailable: {0}")]
    Store(#[from] StoreError),
}

/// Checks proxy credentials against the store.
pub struct Authenticator {
    /// Where accounts live.
    store: Store,
    /// Bounds concurrent Argon2 verifications.
    hashers: Arc<Semaphore>,
    /// HMAC(user, password, hash) → expiry of a cached success.
    cache: Mutex<HashMap<[u8; 32], Instant>>,
    /// Per-process key for the cache HMAC.
    cache_key: [u8; 32],
    /// How long a success stays cached.
    ttl: Duration,
}

impl Authenticator {
    /// An authenticator allowing `max_hashes` concurrent verifications and
    /// caching successes for `ttl`.
    pub fn new(store: Store, max_hashes: usize, ttl: Duration) -> Authenticator {
        Authenticator {
            store,
            hashers: Arc::new(Semaphore::new(max_hashes.max(1))),
            cache: Mutex::new(HashMap::new()),
            cache_key: rand::random(),
            ttl,
        }
    }

    /// The semaphore bounding concurrent hashes (for tests and metrics).
    pub fn hash_permits_available(&self) -> usize {
        self.hashers.available_permits()
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

    /// Verify `creds`.
    ///
    /// # Errors
    /// [`AuthError::BadCredentials`] for an unknown user, a wrong password
    /// or a disabled account (indistinguishable to the caller);
    /// [`AuthError::Store`] when the store fails.
    pub async fn verify(&self, creds: &Credentials) -> Result<AuthedAccount, AuthError> {
        let account = self.store.account_by_name(&creds.user).await?;
        let hash = account
            .as_ref()
            .map(|a| a.password_hash.clone())
            .unwrap_or_else(|| secret::dummy_hash().to_string());
        let tag = self.cache_tag(creds, &hash);
        if let Some(a) = &account {
            let hit = {
                let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                cache.get(&tag).is_some_and(|exp| *exp > Instant::now())
            };
            if hit && a.enabled {
                return Ok(AuthedAccount {
                    id: a.id,
                    name: a.name.clone(),
                });
            }
        }
        let ok = {
            let _permit = self
                .hashers
                .acquire()
                .await
                .map_err(|_| AuthError::BadCredentials)?;
            let pw = creds.password.clone();
            tokio::task::spawn_blocking(move || secret::verify_password(&pw, &hash))
                .await
                .unwrap_or(false)
        };
        match account {
            Some(a) if ok && a.enabled => {
                let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                if cache.len() >= MAX_CACHE_ENTRIES {
                    let now = Instant::now();
                    cache.retain(|_, exp| *exp > now);
                    if cache.len() >= MAX_CACHE_ENTRIES {
                        cache.clear();
                    }
                }
                cache.insert(tag, Instant::now() + self.ttl);
                Ok(AuthedAccount {
                    id: a.id,
                    name: a.name,
                })
            }
            _ => Err(AuthError::BadCredentials),
        }
    }
}
