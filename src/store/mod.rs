//! The store: proxy accounts, customers, the accounts that manage them, and
//! the systems (with their hashed agent tokens).
//!
//! [`Store`] is the handle the broker uses. It is an enum over backends so
//! that PostgreSQL can be added later as one more variant without rewriting
//! callers; today there is only [`sqlite::SqliteStore`]. Its methods are
//! `async`: SQLite work runs on tokio's blocking pool, never on the executor.
//! [`sqlite::SqliteStore`] offers the same operations synchronously, which the
//! CLI uses without a runtime.
//!
//! Invariants:
//! * Ids and names are validated here too, not only by callers. Writes with
//!   an invalid value fail with [`StoreError::Invalid`]; lookups with an
//!   invalid value find nothing (they are usually network input).
//! * Customer ids and system names are stored lowercased; account names are
//!   unique case-insensitively.
//! * A customer has at most one primary system, enforced by a partial unique
//!   index; switching the primary happens in one transaction.

pub mod audit;
pub mod sqlite;

pub use sqlite::ConnectLookup;

use std::path::{Path, PathBuf};

/// Name of the database file inside the data directory.
pub const DB_FILE: &str = "maintgate.db";

/// Path of the database file in `data_dir`: `<data-dir>/maintgate.db`.
#[must_use]
pub fn db_path(data_dir: &Path) -> PathBuf {
    data_dir.join(DB_FILE)
}

/// Longest customer id, in bytes.
pub const MAX_CUSTOMER_ID_BYTES: usize = 64;

/// Longest system name, in bytes (one DNS label).
pub const MAX_SYSTEM_NAME_BYTES: usize = 63;

/// Longest customer display name, in bytes.
pub const MAX_CUSTOMER_NAME_BYTES: usize = 200;

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The named object does not exist, e.g. `customer '1234'`.
    #[error("no such {0}")]
    NotFound(String),
    /// The named object already exists, e.g. `account 'acme'`.
    #[error("{0} already exists")]
    Conflict(String),
    /// A value failed validation (id, name, hash format).
    #[error("invalid {0}")]
    Invalid(String),
    /// The database file was written by a newer maintgate.
    #[error("database schema version {found} is newer than this maintgate supports ({supported})")]
    SchemaTooNew {
        /// `PRAGMA user_version` found in the file.
        found: i64,
        /// Number of migrations this build knows.
        supported: i64,
    },
    /// The backend failed (I/O, SQL, a panicked worker).
    #[error("store backend error: {0}")]
    Backend(String),
}

/// A proxy account: the credential a reseller's engineers use.
#[derive(Clone, PartialEq, Eq)]
pub struct Account {
    /// Row id; the stable key for authorization checks.
    pub id: i64,
    /// User name as created (lookups are case-insensitive).
    pub name: String,
    /// Argon2id PHC string.
    pub password_hash: String,
    /// Disabled accounts fail authentication and lose their sessions.
    pub enabled: bool,
}

impl std::fmt::Debug for Account {
    // The hash is not the password, but it is offline-attackable: keep it
    // out of logs like any other credential.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Account")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("password_hash", &"MASKED")
            .field("enabled", &self.enabled)
            .finish()
    }
}

/// An account as listed for operators: no hash, plus its customers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountSummary {
    /// Row id.
    pub id: i64,
    /// User name.
    pub name: String,
    /// Whether the account may authenticate.
    pub enabled: bool,
    /// Customer ids the account manages, sorted.
    pub customers: Vec<String>,
}

/// A customer (one site, one tenant boundary).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Customer {
    /// Lowercased customer id, the first part of every destination name.
    pub id: String,
    /// Optional display name for operators.
    pub name: Option<String>,
    /// Names of the accounts that manage this customer, sorted.
    pub accounts: Vec<String>,
}

/// A system at a customer's site, reached through its agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct System {
    /// Row id; agent sessions are keyed by it.
    pub id: i64,
    /// Lowercased id of the owning customer.
    pub customer_id: String,
    /// Lowercased system name, the optional second part of a destination.
    pub name: String,
    /// The primary system answers destinations without a system name.
    pub is_primary: bool,
}

/// Normalizes and validates a customer id: ASCII letters and digits,
/// 1..=64 bytes, returned lowercased.
#[must_use]
pub fn normalize_customer_id(id: &str) -> Option<String> {
    (!id.is_empty()
        && id.len() <= MAX_CUSTOMER_ID_BYTES
        && id.bytes().all(|b| b.is_ascii_alphanumeric()))
    .then(|| id.to_ascii_lowercase())
}

/// Normalizes and validates a system name: ASCII letters, digits, `-` and
/// `_`, 1..=63 bytes, returned lowercased.
#[must_use]
pub fn normalize_system_name(name: &str) -> Option<String> {
    (!name.is_empty()
        && name.len() <= MAX_SYSTEM_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
    .then(|| name.to_ascii_lowercase())
}

/// Validates a customer display name: 1..=200 bytes, no control characters
/// (it is shown in terminals and logs).
#[must_use]
pub fn valid_customer_name(name: &str) -> bool {
    !name.trim().is_empty()
        && name.len() <= MAX_CUSTOMER_NAME_BYTES
        && !name.chars().any(char::is_control)
}

/// The broker's handle on the store. Cheap to clone.
#[derive(Debug, Clone)]
pub enum Store {
    /// SQLite file in the data directory.
    Sqlite(sqlite::SqliteStore),
}

impl From<sqlite::SqliteStore> for Store {
    fn from(s: sqlite::SqliteStore) -> Self {
        Self::Sqlite(s)
    }
}

/// Runs a synchronous SQLite operation on the blocking pool.
async fn blocking<T, F>(s: &sqlite::SqliteStore, f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce(&sqlite::SqliteStore) -> Result<T, StoreError> + Send + 'static,
{
    let s = s.clone();
    tokio::task::spawn_blocking(move || f(&s))
        .await
        .map_err(|e| StoreError::Backend(format!("store worker failed: {e}")))?
}

impl Store {
    /// Opens (creating if missing) the SQLite database at `path` and brings
    /// its schema up to date. See [`sqlite::SqliteStore::open`].
    ///
    /// # Errors
    /// [`StoreError::Backend`] if the file or its directory cannot be
    /// created or opened, or a migration fails;
    /// [`StoreError::SchemaTooNew`] for a file from a newer maintgate.
    pub fn open_sqlite(path: &Path) -> Result<Store, StoreError> {
        sqlite::SqliteStore::open(path).map(Store::Sqlite)
    }

    /// A counter that changes whenever another connection (e.g. the CLI in
    /// another process) commits to the database. The broker polls it to
    /// notice operator changes without a restart. Writes made through this
    /// handle do not change it.
    ///
    /// # Errors
    /// [`StoreError::Backend`] on a database error.
    pub async fn data_version(&self) -> Result<i64, StoreError> {
        match self {
            Store::Sqlite(s) => blocking(s, |s| s.data_version()).await,
        }
    }

    /// Creates an enabled account. See [`sqlite::SqliteStore::add_account`].
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for a bad name or empty hash,
    /// [`StoreError::Conflict`] if the name exists (case-insensitively).
    pub async fn add_account(
        &self,
        name: &str,
        password_hash: &str,
    ) -> Result<Account, StoreError> {
        let (name, hash) = (name.to_owned(), password_hash.to_owned());
        match self {
            Store::Sqlite(s) => blocking(s, move |s| s.add_account(&name, &hash)).await,
        }
    }

    /// Replaces an account's password hash.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] for an unknown account,
    /// [`StoreError::Invalid`] for a bad name or empty hash.
    pub async fn set_password(&self, name: &str, password_hash: &str) -> Result<(), StoreError> {
        let (name, hash) = (name.to_owned(), password_hash.to_owned());
        match self {
            Store::Sqlite(s) => blocking(s, move |s| s.set_password(&name, &hash)).await,
        }
    }

    /// Enables or disables an account.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] for an unknown account.
    pub async fn set_account_enabled(&self, name: &str, enabled: bool) -> Result<(), StoreError> {
        let name = name.to_owned();
        match self {
            Store::Sqlite(s) => blocking(s, move |s| s.set_account_enabled(&name, enabled)).await,
        }
    }

    /// All accounts with their customers, sorted by name.
    ///
    /// # Errors
    /// [`StoreError::Backend`] on a database error.
    pub async fn list_accounts(&self) -> Result<Vec<AccountSummary>, StoreError> {
        match self {
            Store::Sqlite(s) => blocking(s, |s| s.list_accounts()).await,
        }
    }

    /// Looks an account up by name, case-insensitively. An invalid name
    /// finds nothing.
    ///
    /// # Errors
    /// [`StoreError::Backend`] on a database error.
    pub async fn account_by_name(&self, name: &str) -> Result<Option<Account>, StoreError> {
        let name = name.to_owned();
        match self {
            Store::Sqlite(s) => blocking(s, move |s| s.account_by_name(&name)).await,
        }
    }

    /// Creates a customer managed by `account_name`.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for a bad id or name,
    /// [`StoreError::NotFound`] for an unknown account,
    /// [`StoreError::Conflict`] if the customer exists.
    pub async fn add_customer(
        &self,
        id: &str,
        account_name: &str,
        name: Option<&str>,
    ) -> Result<Customer, StoreError> {
        let (id, account, name) = (
            id.to_owned(),
            account_name.to_owned(),
            name.map(str::to_owned),
        );
        match self {
            Store::Sqlite(s) => {
                blocking(s, move |s| s.add_customer(&id, &account, name.as_deref())).await
            }
        }
    }

    /// Looks a customer up by id (case-insensitively).
    ///
    /// # Errors
    /// [`StoreError::Backend`] on a database error.
    pub async fn customer(&self, id: &str) -> Result<Option<Customer>, StoreError> {
        let id = id.to_owned();
        match self {
            Store::Sqlite(s) => blocking(s, move |s| s.customer(&id)).await,
        }
    }

    /// All customers, sorted by id.
    ///
    /// # Errors
    /// [`StoreError::Backend`] on a database error.
    pub async fn list_customers(&self) -> Result<Vec<Customer>, StoreError> {
        match self {
            Store::Sqlite(s) => blocking(s, |s| s.list_customers()).await,
        }
    }

    /// Lets `account_name` manage `customer_id`. Returns `false` if it
    /// already did.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] for an unknown account or customer.
    pub async fn grant_customer(
        &self,
        customer_id: &str,
        account_name: &str,
    ) -> Result<bool, StoreError> {
        let (c, a) = (customer_id.to_owned(), account_name.to_owned());
        match self {
            Store::Sqlite(s) => blocking(s, move |s| s.grant_customer(&c, &a)).await,
        }
    }

    /// Stops `account_name` managing `customer_id`. Returns `false` if it
    /// did not.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] for an unknown account or customer.
    pub async fn revoke_customer(
        &self,
        customer_id: &str,
        account_name: &str,
    ) -> Result<bool, StoreError> {
        let (c, a) = (customer_id.to_owned(), account_name.to_owned());
        match self {
            Store::Sqlite(s) => blocking(s, move |s| s.revoke_customer(&c, &a)).await,
        }
    }

    /// Whether the account manages the customer. An unknown or invalid
    /// customer is simply `false`, the same answer as "not yours".
    ///
    /// # Errors
    /// [`StoreError::Backend`] on a database error.
    pub async fn customer_managed_by(
        &self,
        account_id: i64,
        customer_id: &str,
    ) -> Result<bool, StoreError> {
        let c = customer_id.to_owned();
        match self {
            Store::Sqlite(s) => blocking(s, move |s| s.customer_managed_by(account_id, &c)).await,
        }
    }

    /// Adds a system with its agent token hash. The first system of a
    /// customer is made primary even if `primary` is false; `primary = true`
    /// moves the primary flag to the new system.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for a bad id, name or hash,
    /// [`StoreError::NotFound`] for an unknown customer,
    /// [`StoreError::Conflict`] if the system (or the token hash) exists.
    pub async fn add_system(
        &self,
        customer_id: &str,
        name: &str,
        primary: bool,
        token_hash: &str,
    ) -> Result<System, StoreError> {
        let (c, n, h) = (
            customer_id.to_owned(),
            name.to_owned(),
            token_hash.to_owned(),
        );
        match self {
            Store::Sqlite(s) => blocking(s, move |s| s.add_system(&c, &n, primary, &h)).await,
        }
    }

    /// Replaces a system's token hash; the old token stops working.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for a bad id, name or hash,
    /// [`StoreError::NotFound`] for an unknown customer or system.
    pub async fn rotate_token(
        &self,
        customer_id: &str,
        name: &str,
        new_hash: &str,
    ) -> Result<System, StoreError> {
        let (c, n, h) = (customer_id.to_owned(), name.to_owned(), new_hash.to_owned());
        match self {
            Store::Sqlite(s) => blocking(s, move |s| s.rotate_token(&c, &n, &h)).await,
        }
    }

    /// The system an agent token (by its hash) belongs to.
    ///
    /// # Errors
    /// [`StoreError::Backend`] on a database error.
    pub async fn system_by_token_hash(&self, hash: &str) -> Result<Option<System>, StoreError> {
        let h = hash.to_owned();
        match self {
            Store::Sqlite(s) => blocking(s, move |s| s.system_by_token_hash(&h)).await,
        }
    }

    /// Finds a customer's system by name, or its primary system for `None`.
    ///
    /// # Errors
    /// [`StoreError::Backend`] on a database error.
    pub async fn find_system(
        &self,
        customer_id: &str,
        system: Option<&str>,
    ) -> Result<Option<System>, StoreError> {
        let (c, n) = (customer_id.to_owned(), system.map(str::to_owned));
        match self {
            Store::Sqlite(s) => blocking(s, move |s| s.find_system(&c, n.as_deref())).await,
        }
    }

    /// Whether `hash` is still the token hash of system `system_id` (false
    /// after rotation or removal). Live sessions re-check this to end
    /// sessions whose token was revoked.
    ///
    /// # Errors
    /// [`StoreError::Backend`] on a database error.
    pub async fn system_token_hash_is_current(
        &self,
        system_id: i64,
        hash: &str,
    ) -> Result<bool, StoreError> {
        let h = hash.to_owned();
        match self {
            Store::Sqlite(s) => {
                blocking(s, move |s| s.system_token_hash_is_current(system_id, &h)).await
            }
        }
    }

    /// A customer's systems, primary first, then by name.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for a malformed customer id;
    /// [`StoreError::NotFound`] for an unknown customer.
    pub async fn list_systems(&self, customer_id: &str) -> Result<Vec<System>, StoreError> {
        let c = customer_id.to_owned();
        match self {
            Store::Sqlite(s) => blocking(s, move |s| s.list_systems(&c)).await,
        }
    }

    /// Revokes a system's agent token without issuing a new one. See
    /// [`sqlite::SqliteStore::revoke_token`].
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for a bad id or name,
    /// [`StoreError::NotFound`] for an unknown customer or system.
    pub async fn revoke_token(&self, customer_id: &str, name: &str) -> Result<System, StoreError> {
        let (c, n) = (customer_id.to_owned(), name.to_owned());
        match self {
            Store::Sqlite(s) => blocking(s, move |s| s.revoke_token(&c, &n)).await,
        }
    }

    /// Everything a CONNECT reads, in one go: right here on a free read
    /// connection, else on the blocking pool. See
    /// [`sqlite::SqliteStore::connect_lookup`].
    ///
    /// # Errors
    /// [`StoreError::Backend`] on a database error.
    pub async fn connect_lookup(
        &self,
        user: &str,
        customer: &str,
        system: Option<&str>,
    ) -> Result<ConnectLookup, StoreError> {
        match self {
            Store::Sqlite(s) => {
                if let Some(found) = s.try_connect_lookup_now(user, customer, system) {
                    return found;
                }
                let (u, c, n) = (
                    user.to_owned(),
                    customer.to_owned(),
                    system.map(str::to_owned),
                );
                blocking(s, move |s| s.connect_lookup(&u, &c, n.as_deref())).await
            }
        }
    }

    /// Inserts an audit record (group-committed with others); returns its
    /// id once it is stored.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] without a kind, [`StoreError::Backend`] when
    /// the write fails (the caller fails closed).
    pub async fn audit_insert(&self, rec: audit::NewAudit) -> Result<i64, StoreError> {
        match self {
            Store::Sqlite(s) => s.audit_apply(sqlite::AuditOp::Insert(rec)).await,
        }
    }

    /// Sets the status of an open record that has none yet.
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the write fails.
    pub async fn audit_set_status(&self, id: i64, status: u16) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s
                .audit_apply(sqlite::AuditOp::SetStatus(id, status))
                .await
                .map(drop),
        }
    }

    /// Queues a status update of an open record without waiting for it;
    /// a failure is logged. Later writes of the same caller are applied
    /// after it.
    pub fn audit_set_status_nowait(&self, id: i64, status: u16) {
        match self {
            Store::Sqlite(s) => s.audit_set_status_nowait(id, status),
        }
    }

    /// Finishes an open audit record.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] if no open record has this id,
    /// [`StoreError::Backend`] when the write fails.
    pub async fn audit_finish(&self, id: i64, end: audit::AuditEnd) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s
                .audit_apply(sqlite::AuditOp::Finish(id, end))
                .await
                .map(drop),
        }
    }

    /// Finishes a tunnel's audit record. As [`Store::audit_finish`], but
    /// the commit may wait up to 50 ms to share one with other writes:
    /// nothing but the ending tunnel waits on it.
    ///
    /// # Errors
    /// As [`Store::audit_finish`].
    pub async fn audit_finish_tunnel(
        &self,
        id: i64,
        end: audit::AuditEnd,
    ) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s
                .audit_apply_deferred(sqlite::AuditOp::Finish(id, end))
                .await
                .map(drop),
        }
    }

    /// Closes records left open by a crash as `interrupted`; returns how
    /// many.
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the write fails.
    pub async fn audit_close_interrupted(&self, now_ms: i64) -> Result<usize, StoreError> {
        match self {
            Store::Sqlite(s) => blocking(s, move |s| s.audit_close_interrupted(now_ms)).await,
        }
    }

    /// Deletes closed audit records that ended before `before_ms`, in
    /// transactions of at most `chunk` records; returns how many went.
    /// Open records are kept. See [`sqlite::SqliteStore::audit_prune`].
    ///
    /// # Errors
    /// [`StoreError::Backend`] when a write fails (earlier chunks stay
    /// deleted).
    pub async fn audit_prune(&self, before_ms: i64, chunk: usize) -> Result<usize, StoreError> {
        let chunk = chunk.max(1);
        let mut total = 0;
        loop {
            let n = match self {
                Store::Sqlite(s) => blocking(s, move |s| s.audit_prune(before_ms, chunk)).await?,
            };
            total += n;
            if n < chunk {
                return Ok(total);
            }
        }
    }

    /// Lists audit records, oldest first.
    ///
    /// # Errors
    /// [`StoreError::Backend`] on a database error.
    pub async fn audit_query(
        &self,
        filter: audit::AuditFilter,
    ) -> Result<Vec<audit::AuditRecord>, StoreError> {
        match self {
            Store::Sqlite(s) => blocking(s, move |s| s.audit_query(&filter)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::{generate_token, token_hash};
    use std::time::Duration;

    #[test]
    fn id_and_name_validation() {
        assert_eq!(normalize_customer_id("AbC123").as_deref(), Some("abc123"));
        assert_eq!(
            normalize_customer_id(&"a".repeat(64)).map(|s| s.len()),
            Some(64)
        );
        for bad in ["", "a-b", "a_b", "a.b", "ä", &"a".repeat(65)] {
            assert_eq!(normalize_customer_id(bad), None, "{bad:?}");
        }
        assert_eq!(normalize_system_name("IPO_2-x").as_deref(), Some("ipo_2-x"));
        for bad in ["", "a.b", "a b", "ä", &"a".repeat(64)] {
            assert_eq!(normalize_system_name(bad), None, "{bad:?}");
        }
        assert!(valid_customer_name("ACME GmbH"));
        assert!(!valid_customer_name(" "));
        assert!(!valid_customer_name("a\nb"));
        assert!(!valid_customer_name(&"a".repeat(201)));
    }

    #[tokio::test]
    async fn async_facade_dispatches() {
        tokio::time::timeout(Duration::from_secs(30), async {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open_sqlite(&db_path(dir.path())).unwrap();
            let acct = store.add_account("acme", "$argon2id$x").await.unwrap();
            assert!(store.account_by_name("ACME").await.unwrap().is_some());
            store
                .add_customer("1234", "acme", Some("Site"))
                .await
                .unwrap();
            assert!(store.customer_managed_by(acct.id, "1234").await.unwrap());
            let token = generate_token();
            let sys = store
                .add_system("1234", "ipo1", false, &token_hash(&token))
                .await
                .unwrap();
            assert!(sys.is_primary);
            assert_eq!(
                store
                    .system_by_token_hash(&token_hash(&token))
                    .await
                    .unwrap(),
                Some(sys.clone())
            );
            assert_eq!(
                store.find_system("1234", None).await.unwrap(),
                Some(sys.clone())
            );
            assert!(store
                .system_token_hash_is_current(sys.id, &token_hash(&token))
                .await
                .unwrap());
            assert_eq!(store.list_systems("1234").await.unwrap().len(), 1);
            assert_eq!(store.list_accounts().await.unwrap()[0].customers, ["1234"]);
            store.set_account_enabled("acme", false).await.unwrap();
            assert!(
                !store
                    .account_by_name("acme")
                    .await
                    .unwrap()
                    .unwrap()
                    .enabled
            );
            store.data_version().await.unwrap();
        })
        .await
        .unwrap();
    }
}
