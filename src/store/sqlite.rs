//! SQLite backend of the store.
//!
//! One long-lived write connection behind a `std::sync::Mutex`; callers on
//! the async side reach it through [`super::Store`], which runs each
//! operation on tokio's blocking pool. The CLI calls the synchronous
//! methods here directly, from its own process and connection.
//!
//! Two things keep tunnel setup off that one lock: the per-CONNECT reads
//! ([`SqliteStore::connect_lookup`]) go to a small set of read-only
//! connections, and the broker's audit writes go through a group-commit
//! thread ([`writer`]) that applies everything queued in one transaction.
//!
//! The file is opened in WAL mode (readers never block the writer), with a
//! 5 s busy timeout (the broker and the CLI share the file) and foreign keys
//! on. Writes use `BEGIN IMMEDIATE`, so two processes never deadlock
//! upgrading a read lock. The schema is versioned by `PRAGMA user_version`:
//! entry *i* of [`MIGRATIONS`] moves the file from version *i* to *i + 1*.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};

mod audit;
mod writer;

pub use writer::AuditOp;

use super::{
    normalize_customer_id, normalize_system_name, valid_customer_name, Account, AccountSummary,
    Customer, StoreError, System,
};
use crate::secret::{is_token_hash, valid_user_name};

/// How long a statement waits for another connection's lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Schema migrations, in order. Never edit a released entry; append a new
/// one instead.
pub const MIGRATIONS: &[&str] = &[
    // 1: accounts, customers, who manages whom, systems and their tokens.
    r"
CREATE TABLE accounts (
    id            INTEGER PRIMARY KEY,
    name          TEXT    NOT NULL UNIQUE COLLATE NOCASE,
    password_hash TEXT    NOT NULL,
    enabled       INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
    created_at    INTEGER NOT NULL
);
CREATE TABLE customers (
    id         TEXT    PRIMARY KEY NOT NULL,
    name       TEXT,
    created_at INTEGER NOT NULL
);
CREATE TABLE account_customers (
    account_id  INTEGER NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    customer_id TEXT    NOT NULL REFERENCES customers(id) ON DELETE CASCADE,
    PRIMARY KEY (account_id, customer_id)
) WITHOUT ROWID;
CREATE INDEX account_customers_by_customer ON account_customers(customer_id);
CREATE TABLE systems (
    id          INTEGER PRIMARY KEY,
    customer_id TEXT    NOT NULL REFERENCES customers(id) ON DELETE CASCADE,
    name        TEXT    NOT NULL,
    is_primary  INTEGER NOT NULL DEFAULT 0 CHECK (is_primary IN (0, 1)),
    token_hash  TEXT    NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL,
    UNIQUE (customer_id, name)
);
CREATE UNIQUE INDEX systems_one_primary ON systems(customer_id) WHERE is_primary = 1;
",
    // 2: the audit log (see `super::audit`). AUTOINCREMENT so an id is never
    // reused: tunnel ids in the admin API are audit ids.
    r"
CREATE TABLE audit (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    kind       TEXT    NOT NULL,
    account    TEXT,
    client     TEXT,
    customer   TEXT,
    system     TEXT,
    dest       TEXT,
    target     TEXT,
    started_at INTEGER NOT NULL,
    ended_at   INTEGER,
    bytes_up   INTEGER,
    bytes_down INTEGER,
    status     INTEGER,
    reason     TEXT,
    detail     TEXT
);
CREATE INDEX audit_by_start ON audit(started_at);
CREATE INDEX audit_open ON audit(id) WHERE ended_at IS NULL;
",
];

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Backend(e.to_string())
    }
}

/// Whether `e` is a UNIQUE or PRIMARY KEY violation.
fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
    )
}

/// Seconds since the Unix epoch, for `created_at` columns.
fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Validates an account name for a write.
fn check_user(name: &str) -> Result<(), StoreError> {
    if valid_user_name(name) {
        Ok(())
    } else {
        Err(StoreError::Invalid(
            "account name (use 1-64 of A-Z a-z 0-9 . _ -)".to_owned(),
        ))
    }
}

/// Validates a password hash for a write. The store does not hash; it only
/// refuses obviously wrong values (a plaintext password would not start
/// with `$`).
fn check_password_hash(hash: &str) -> Result<(), StoreError> {
    if hash.starts_with('$') && !hash.chars().any(char::is_control) {
        Ok(())
    } else {
        Err(StoreError::Invalid(
            "password hash (expected a PHC string)".to_owned(),
        ))
    }
}

/// Normalizes a customer id for a write.
fn customer_id_for_write(id: &str) -> Result<String, StoreError> {
    normalize_customer_id(id).ok_or_else(|| {
        StoreError::Invalid("customer id (use 1-64 ASCII letters and digits)".to_owned())
    })
}

/// Normalizes a system name for a write.
fn system_name_for_write(name: &str) -> Result<String, StoreError> {
    normalize_system_name(name)
        .ok_or_else(|| StoreError::Invalid("system name (use 1-63 of a-z 0-9 - _)".to_owned()))
}

/// Validates a token hash for a write.
fn check_token_hash(hash: &str) -> Result<(), StoreError> {
    if is_token_hash(hash) {
        Ok(())
    } else {
        Err(StoreError::Invalid(
            "token hash (expected 64 lowercase hex digits)".to_owned(),
        ))
    }
}

/// Maps a `systems` row (id, customer_id, name, is_primary).
fn system_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<System> {
    Ok(System {
        id: row.get(0)?,
        customer_id: row.get(1)?,
        name: row.get(2)?,
        is_primary: row.get(3)?,
    })
}

/// Opens the read-only connections.
fn open_readers(path: &Path) -> Result<Readers, StoreError> {
    let mut conns = Vec::with_capacity(READERS);
    for _ in 0..READERS {
        let c = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        c.busy_timeout(BUSY_TIMEOUT)?;
        c.pragma_update(None, "query_only", true)?;
        c.set_prepared_statement_cache_capacity(16);
        conns.push(Mutex::new(c));
    }
    Ok(Readers {
        conns,
        next: AtomicUsize::new(0),
    })
}

/// The reads of [`SqliteStore::connect_lookup`] on connection `c`.
///
/// The three reads share one read transaction: one consistent snapshot
/// (no commit lands between the account and its grant), and the WAL read
/// lock is taken once, not per statement.
fn connect_lookup_on(
    c: &Connection,
    user: &str,
    customer: &str,
    system: Option<&str>,
) -> Result<ConnectLookup, StoreError> {
    if !c.is_autocommit() {
        // An earlier lookup could not end its transaction: end it now.
        c.execute_batch("ROLLBACK")?;
    }
    c.prepare_cached("BEGIN")?.execute([])?;
    let found = connect_lookup_reads(c, user, customer, system);
    // Read-only: COMMIT only ends the snapshot, whatever the reads gave.
    let ended = c.prepare_cached("COMMIT").and_then(|mut s| s.execute([]));
    let found = found?;
    ended?;
    Ok(found)
}

fn connect_lookup_reads(
    c: &Connection,
    user: &str,
    customer: &str,
    system: Option<&str>,
) -> Result<ConnectLookup, StoreError> {
    let account = account_by_name_on(c, user)?;
    let managed = match &account {
        Some(a) => managed_by_on(c, a.id, customer)?,
        None => false,
    };
    let system = find_system_on(c, customer, system)?;
    Ok(ConnectLookup {
        account,
        managed,
        system,
    })
}

fn account_by_name_on(c: &Connection, name: &str) -> Result<Option<Account>, StoreError> {
    if !valid_user_name(name) {
        return Ok(None);
    }
    Ok(
        c.prepare_cached("SELECT id, name, password_hash, enabled FROM accounts WHERE name = ?1")?
            .query_row(params![name], |r| {
                Ok(Account {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    password_hash: r.get(2)?,
                    enabled: r.get(3)?,
                })
            })
            .optional()?,
    )
}

fn managed_by_on(c: &Connection, account_id: i64, customer_id: &str) -> Result<bool, StoreError> {
    let Some(customer_id) = normalize_customer_id(customer_id) else {
        return Ok(false);
    };
    Ok(c.prepare_cached(
        "SELECT 1 FROM account_customers WHERE account_id = ?1 AND customer_id = ?2",
    )?
    .query_row(params![account_id, customer_id], |_| Ok(()))
    .optional()?
    .is_some())
}

fn find_system_on(
    c: &Connection,
    customer_id: &str,
    system: Option<&str>,
) -> Result<Option<System>, StoreError> {
    let Some(customer_id) = normalize_customer_id(customer_id) else {
        return Ok(None);
    };
    let found = match system {
        None => c
            .prepare_cached(&format!(
                "SELECT {SYSTEM_COLS} FROM systems WHERE customer_id = ?1 AND is_primary = 1"
            ))?
            .query_row(params![customer_id], system_row),
        Some(name) => {
            let Some(name) = normalize_system_name(name) else {
                return Ok(None);
            };
            c.prepare_cached(&format!(
                "SELECT {SYSTEM_COLS} FROM systems WHERE customer_id = ?1 AND name = ?2"
            ))?
            .query_row(params![customer_id, name], system_row)
        }
    };
    Ok(found.optional()?)
}

/// Column list matching [`system_row`].
const SYSTEM_COLS: &str = "id, customer_id, name, is_primary";

/// SQLite-backed store. Cheap to clone: clones share one connection.
#[derive(Clone)]
pub struct SqliteStore {
    /// The connection. One per process is enough (operations are short) and
    /// `PRAGMA data_version` is only meaningful on a long-lived connection.
    conn: Arc<Mutex<Connection>>,
    /// Read-only connections for the per-CONNECT lookups, so tunnel setup
    /// does not queue behind writes (WAL readers never wait for the
    /// writer). Opened on first use: the CLI never needs them.
    /// A failure to open them is returned, not kept: the next call tries
    /// again.
    readers: Arc<OnceLock<Readers>>,
    /// The group-commit audit writer, started on first use (likewise
    /// retried if the thread could not be started).
    writer: Arc<OnceLock<writer::AuditWriter>>,
    /// Where the file is, for `Debug` and error messages.
    path: Arc<PathBuf>,
}

/// A few read-only connections, taken round robin.
struct Readers {
    conns: Vec<Mutex<Connection>>,
    next: AtomicUsize,
}

/// Read connections. A CONNECT's lookup runs in its own task on a free one,
/// or on the blocking pool when all are taken (or not yet open).
const READERS: usize = 2;

/// What a CONNECT needs from the store, read in one go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectLookup {
    /// The claimed account, if it exists.
    pub account: Option<Account>,
    /// Whether that account manages the customer.
    pub managed: bool,
    /// The addressed system (the primary one without a name).
    pub system: Option<System>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Creates the database file with owner-only permissions if it is missing:
/// it holds password hashes. SQLite gives `-wal`/`-shm` the same mode.
fn create_db_file(path: &Path) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path).map(drop)
}

impl SqliteStore {
    /// Opens the database at `path`, creating the file and its parent
    /// directory if missing, then sets WAL mode, a 5 s busy timeout and
    /// foreign keys, and applies pending [`MIGRATIONS`].
    ///
    /// # Errors
    /// [`StoreError::Backend`] if the directory or file cannot be created
    /// or opened or a migration fails; [`StoreError::SchemaTooNew`] if the
    /// file's schema version is above what this build knows.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let ctx = |e: &dyn std::fmt::Display| {
            StoreError::Backend(format!("cannot open database {}: {e}", path.display()))
        };
        if let Some(parent) = path.parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent).map_err(|e| ctx(&e))?;
            }
        }
        create_db_file(path).map_err(|e| ctx(&e))?;
        let mut conn = Connection::open(path).map_err(|e| ctx(&e))?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(|e| ctx(&e))?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(|e| ctx(&e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(ctx(&format_args!("journal_mode is {mode}, wanted wal")));
        }
        conn.pragma_update(None, "foreign_keys", true)
            .map_err(|e| ctx(&e))?;
        // In WAL mode NORMAL survives a process crash; only a power loss can
        // drop the last commits. FULL fsynced every audit write, which
        // capped tunnel setup at a few hundred per second.
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(|e| ctx(&e))?;
        conn.set_prepared_statement_cache_capacity(64);
        migrate(&mut conn)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            readers: Arc::new(OnceLock::new()),
            writer: Arc::new(OnceLock::new()),
            path: Arc::new(path.to_owned()),
        })
    }

    /// The path this store was opened from.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Locks the connection. A panic in another holder cannot leave a
    /// transaction half-applied (dropping a `Transaction` rolls back), so a
    /// poisoned lock is safe to reuse.
    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A read-only connection, opened on first use.
    fn reader(&self) -> Result<MutexGuard<'_, Connection>, StoreError> {
        let readers = match self.readers.get() {
            Some(r) => r,
            None => {
                let opened = open_readers(&self.path)?;
                // A racing caller may have won; either set is fine.
                let _ = self.readers.set(opened);
                self.readers
                    .get()
                    .ok_or_else(|| StoreError::Backend("read connections unavailable".to_owned()))?
            }
        };
        let start = readers.next.fetch_add(1, Ordering::Relaxed);
        let n = readers.conns.len();
        for i in 0..n {
            if let Ok(c) = readers.conns[(start + i) % n].try_lock() {
                return Ok(c);
            }
        }
        Ok(readers.conns[start % n]
            .lock()
            .unwrap_or_else(PoisonError::into_inner))
    }

    /// The audit writer, started on first use.
    fn audit_writer(&self) -> Result<&writer::AuditWriter, StoreError> {
        if let Some(w) = self.writer.get() {
            return Ok(w);
        }
        // Two racing first callers may both start a thread; the loser's
        // handle is dropped at once, which ends its idle thread.
        let started = writer::AuditWriter::start(self.conn.clone(), &self.path)
            .map_err(|e| StoreError::Backend(format!("cannot start the audit writer: {e}")))?;
        let _ = self.writer.set(started);
        self.writer
            .get()
            .ok_or_else(|| StoreError::Backend("audit writer unavailable".to_owned()))
    }

    /// Applies an audit write in the writer's next group commit.
    ///
    /// # Errors
    /// As the matching synchronous method; [`StoreError::Backend`] when
    /// the batch's transaction failed.
    pub async fn audit_apply(&self, op: AuditOp) -> Result<i64, StoreError> {
        self.audit_writer()?.apply(op).await
    }

    /// As [`SqliteStore::audit_apply`], but the commit may wait a little
    /// for other writes to share it (a tunnel's end).
    ///
    /// # Errors
    /// As [`SqliteStore::audit_apply`].
    pub async fn audit_apply_deferred(&self, op: AuditOp) -> Result<i64, StoreError> {
        self.audit_writer()?.apply_deferred(op).await
    }

    /// Queues a status update for an open record; failures are logged.
    pub fn audit_set_status_nowait(&self, id: i64, status: u16) {
        match self.audit_writer() {
            Ok(w) => w.set_status_nowait(id, status),
            Err(e) => tracing::warn!(error = %e, id, "audit status not recorded"),
        }
    }

    /// The account `user`, whether it manages `customer`, and the system
    /// addressed, on a read connection. Invalid names find nothing.
    ///
    /// # Errors
    /// [`StoreError::Backend`] on a database error.
    pub fn connect_lookup(
        &self,
        user: &str,
        customer: &str,
        system: Option<&str>,
    ) -> Result<ConnectLookup, StoreError> {
        let c = self.reader()?;
        connect_lookup_on(&c, user, customer, system)
    }

    /// [`SqliteStore::connect_lookup`] if a read connection is open and
    /// free right now; `None` (nothing done) otherwise. The lookup is three
    /// indexed reads of small, hot tables (tens of microseconds), cheap
    /// enough for the caller's async task: that saves the two thread
    /// switches of a trip to the blocking pool on every CONNECT.
    pub fn try_connect_lookup_now(
        &self,
        user: &str,
        customer: &str,
        system: Option<&str>,
    ) -> Option<Result<ConnectLookup, StoreError>> {
        let readers = self.readers.get()?;
        let start = readers.next.fetch_add(1, Ordering::Relaxed);
        let n = readers.conns.len();
        (0..n).find_map(|i| {
            let c = readers.conns[(start + i) % n].try_lock().ok()?;
            Some(connect_lookup_on(&c, user, customer, system))
        })
    }

    /// Runs `f` in a `BEGIN IMMEDIATE` transaction and commits if it
    /// returns `Ok`.
    fn write<T>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    /// `PRAGMA data_version` of this connection: it changes when another
    /// connection commits to the file, not when this one does.
    ///
    /// # Errors
    /// [`StoreError::Backend`] on a database error.
    pub fn data_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn()
            .query_row("PRAGMA data_version", [], |r| r.get(0))?)
    }

    /// The schema version recorded in the file (`PRAGMA user_version`).
    ///
    /// # Errors
    /// [`StoreError::Backend`] on a database error.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn()
            .query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }

    /// Creates an enabled account.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for a bad name or a hash that is not a PHC
    /// string; [`StoreError::Conflict`] if the name exists
    /// (case-insensitively).
    pub fn add_account(&self, name: &str, password_hash: &str) -> Result<Account, StoreError> {
        check_user(name)?;
        check_password_hash(password_hash)?;
        self.write(|tx| {
            let res = tx.execute(
                "INSERT INTO accounts (name, password_hash, enabled, created_at)
                 VALUES (?1, ?2, 1, ?3)",
                params![name, password_hash, now()],
            );
            match res {
                Ok(_) => Ok(Account {
                    id: tx.last_insert_rowid(),
                    name: name.to_owned(),
                    password_hash: password_hash.to_owned(),
                    enabled: true,
                }),
                Err(e) if is_unique_violation(&e) => {
                    Err(StoreError::Conflict(format!("account '{name}'")))
                }
                Err(e) => Err(e.into()),
            }
        })
    }

    /// Replaces an account's password hash.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for a bad name or hash;
    /// [`StoreError::NotFound`] for an unknown account.
    pub fn set_password(&self, name: &str, password_hash: &str) -> Result<(), StoreError> {
        check_user(name)?;
        check_password_hash(password_hash)?;
        self.write(|tx| {
            let n = tx.execute(
                "UPDATE accounts SET password_hash = ?2 WHERE name = ?1",
                params![name, password_hash],
            )?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("account '{name}'")));
            }
            Ok(())
        })
    }

    /// Enables or disables an account. Idempotent.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for a bad name;
    /// [`StoreError::NotFound`] for an unknown account.
    pub fn set_account_enabled(&self, name: &str, enabled: bool) -> Result<(), StoreError> {
        check_user(name)?;
        self.write(|tx| {
            let n = tx.execute(
                "UPDATE accounts SET enabled = ?2 WHERE name = ?1",
                params![name, enabled],
            )?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("account '{name}'")));
            }
            Ok(())
        })
    }

    /// All accounts with the customers they manage, sorted by name.
    ///
    /// # Errors
    /// [`StoreError::Backend`] on a database error.
    pub fn list_accounts(&self) -> Result<Vec<AccountSummary>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT a.id, a.name, a.enabled, ac.customer_id
             FROM accounts a LEFT JOIN account_customers ac ON ac.account_id = a.id
             ORDER BY a.name, a.id, ac.customer_id",
        )?;
        let mut rows = stmt.query([])?;
        let mut out: Vec<AccountSummary> = Vec::new();
        while let Some(row) = rows.next()? {
            let id: i64 = row.get(0)?;
            let customer: Option<String> = row.get(3)?;
            match out.last_mut() {
                Some(last) if last.id == id => last.customers.extend(customer),
                _ => out.push(AccountSummary {
                    id,
                    name: row.get(1)?,
                    enabled: row.get(2)?,
                    customers: customer.into_iter().collect(),
                }),
            }
        }
        Ok(out)
    }

    /// Looks an account up by name, case-insensitively. An invalid name
    /// (network input) finds nothing rather than failing.
    ///
    /// # Errors
    /// [`StoreError::Backend`] on a database error.
    pub fn account_by_name(&self, name: &str) -> Result<Option<Account>, StoreError> {
        account_by_name_on(&self.conn(), name)
    }

    /// Creates a customer managed by `account_name`, in one transaction.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for a bad id, display name or account name;
    /// [`StoreError::NotFound`] for an unknown account;
    /// [`StoreError::Conflict`] if the customer exists.
    pub fn add_customer(
        &self,
        id: &str,
        account_name: &str,
        name: Option<&str>,
    ) -> Result<Customer, StoreError> {
        let id = customer_id_for_write(id)?;
        check_user(account_name)?;
        if let Some(n) = name {
            if !valid_customer_name(n) {
                return Err(StoreError::Invalid(
                    "customer name (1-200 bytes, no control characters)".to_owned(),
                ));
            }
        }
        self.write(|tx| {
            let (account_id, account) = account_id_in(tx, account_name)?;
            let res = tx.execute(
                "INSERT INTO customers (id, name, created_at) VALUES (?1, ?2, ?3)",
                params![id, name, now()],
            );
            match res {
                Ok(_) => {}
                Err(e) if is_unique_violation(&e) => {
                    return Err(StoreError::Conflict(format!("customer '{id}'")))
                }
                Err(e) => return Err(e.into()),
            }
            tx.execute(
                "INSERT INTO account_customers (account_id, customer_id) VALUES (?1, ?2)",
                params![account_id, id],
            )?;
            Ok(Customer {
                id: id.clone(),
                name: name.map(str::to_owned),
                accounts: vec![account],
            })
        })
    }

    /// Looks a customer up by id (case-insensitively); an invalid id finds
    /// nothing.
    ///
    /// # Errors
    /// [`StoreError::Backend`] on a database error.
    pub fn customer(&self, id: &str) -> Result<Option<Customer>, StoreError> {
        let Some(id) = normalize_customer_id(id) else {
            return Ok(None);
        };
        let conn = self.conn();
        let name: Option<Option<String>> = conn
            .query_row(
                "SELECT name FROM customers WHERE id = ?1",
                params![id],
                |r| r.get(0),
            )
            .optional()?;
        let Some(name) = name else {
            return Ok(None);
        };
        let mut stmt = conn.prepare_cached(
            "SELECT a.name FROM account_customers ac JOIN accounts a ON a.id = ac.account_id
             WHERE ac.customer_id = ?1 ORDER BY a.name",
        )?;
        let accounts = stmt
            .query_map(params![id], |r| r.get(0))?
            .collect::<Result<Vec<String>, _>>()?;
        Ok(Some(Customer { id, name, accounts }))
    }

    /// All customers with their accounts, sorted by id.
    ///
    /// # Errors
    /// [`StoreError::Backend`] on a database error.
    pub fn list_customers(&self) -> Result<Vec<Customer>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT c.id, c.name, a.name
             FROM customers c
             LEFT JOIN account_customers ac ON ac.customer_id = c.id
             LEFT JOIN accounts a ON a.id = ac.account_id
             ORDER BY c.id, a.name",
        )?;
        let mut rows = stmt.query([])?;
        let mut out: Vec<Customer> = Vec::new();
        while let Some(row) = rows.next()? {
            let id: String = row.get(0)?;
            let account: Option<String> = row.get(2)?;
            match out.last_mut() {
                Some(last) if last.id == id => last.accounts.extend(account),
                _ => out.push(Customer {
                    id,
                    name: row.get(1)?,
                    accounts: account.into_iter().collect(),
                }),
            }
        }
        Ok(out)
    }

    /// Lets `account_name` manage `customer_id`. Returns `false` if it
    /// already did.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for a bad id or name;
    /// [`StoreError::NotFound`] for an unknown account or customer.
    pub fn grant_customer(
        &self,
        customer_id: &str,
        account_name: &str,
    ) -> Result<bool, StoreError> {
        let customer_id = customer_id_for_write(customer_id)?;
        check_user(account_name)?;
        self.write(|tx| {
            let (account_id, _) = account_id_in(tx, account_name)?;
            require_customer_in(tx, &customer_id)?;
            let n = tx.execute(
                "INSERT OR IGNORE INTO account_customers (account_id, customer_id)
                 VALUES (?1, ?2)",
                params![account_id, customer_id],
            )?;
            Ok(n > 0)
        })
    }

    /// Stops `account_name` managing `customer_id`. Returns `false` if it
    /// did not.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for a bad id or name;
    /// [`StoreError::NotFound`] for an unknown account or customer.
    pub fn revoke_customer(
        &self,
        customer_id: &str,
        account_name: &str,
    ) -> Result<bool, StoreError> {
        let customer_id = customer_id_for_write(customer_id)?;
        check_user(account_name)?;
        self.write(|tx| {
            let (account_id, _) = account_id_in(tx, account_name)?;
            require_customer_in(tx, &customer_id)?;
            let n = tx.execute(
                "DELETE FROM account_customers WHERE account_id = ?1 AND customer_id = ?2",
                params![account_id, customer_id],
            )?;
            Ok(n > 0)
        })
    }

    /// Whether the account manages the customer. An unknown or invalid
    /// customer gives `false`, exactly like "not yours".
    ///
    /// # Errors
    /// [`StoreError::Backend`] on a database error.
    pub fn customer_managed_by(
        &self,
        account_id: i64,
        customer_id: &str,
    ) -> Result<bool, StoreError> {
        managed_by_on(&self.conn(), account_id, customer_id)
    }

    /// Adds a system with its agent token hash. The customer's first system
    /// becomes primary even if `primary` is false; `primary = true` clears
    /// the old primary in the same transaction.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for a bad id, name or hash;
    /// [`StoreError::NotFound`] for an unknown customer;
    /// [`StoreError::Conflict`] if the system name (or the token hash) is
    /// taken.
    pub fn add_system(
        &self,
        customer_id: &str,
        name: &str,
        primary: bool,
        token_hash: &str,
    ) -> Result<System, StoreError> {
        let customer_id = customer_id_for_write(customer_id)?;
        let name = system_name_for_write(name)?;
        check_token_hash(token_hash)?;
        self.write(|tx| {
            require_customer_in(tx, &customer_id)?;
            let taken = tx
                .query_row(
                    "SELECT 1 FROM systems WHERE customer_id = ?1 AND name = ?2",
                    params![customer_id, name],
                    |_| Ok(()),
                )
                .optional()?
                .is_some();
            if taken {
                return Err(StoreError::Conflict(format!(
                    "system '{name}' of customer '{customer_id}'"
                )));
            }
            let has_primary = tx
                .query_row(
                    "SELECT 1 FROM systems WHERE customer_id = ?1 AND is_primary = 1",
                    params![customer_id],
                    |_| Ok(()),
                )
                .optional()?
                .is_some();
            let is_primary = primary || !has_primary;
            if is_primary && has_primary {
                tx.execute(
                    "UPDATE systems SET is_primary = 0 WHERE customer_id = ?1 AND is_primary = 1",
                    params![customer_id],
                )?;
            }
            let res = tx.execute(
                "INSERT INTO systems (customer_id, name, is_primary, token_hash, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![customer_id, name, is_primary, token_hash, now()],
            );
            match res {
                Ok(_) => Ok(System {
                    id: tx.last_insert_rowid(),
                    customer_id: customer_id.clone(),
                    name: name.clone(),
                    is_primary,
                }),
                Err(e) if is_unique_violation(&e) => {
                    Err(StoreError::Conflict("agent token".to_owned()))
                }
                Err(e) => Err(e.into()),
            }
        })
    }

    /// Replaces a system's token hash; the old token stops working.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for a bad id, name or hash;
    /// [`StoreError::NotFound`] for an unknown customer or system;
    /// [`StoreError::Conflict`] if the new hash is already in use.
    pub fn rotate_token(
        &self,
        customer_id: &str,
        name: &str,
        new_hash: &str,
    ) -> Result<System, StoreError> {
        let customer_id = customer_id_for_write(customer_id)?;
        let name = system_name_for_write(name)?;
        check_token_hash(new_hash)?;
        self.write(|tx| {
            require_customer_in(tx, &customer_id)?;
            let res = tx
                .query_row(
                    &format!(
                        "UPDATE systems SET token_hash = ?3 WHERE customer_id = ?1 AND name = ?2
                         RETURNING {SYSTEM_COLS}"
                    ),
                    params![customer_id, name, new_hash],
                    system_row,
                )
                .optional();
            match res {
                Ok(Some(sys)) => Ok(sys),
                Ok(None) => Err(StoreError::NotFound(format!(
                    "system '{name}' of customer '{customer_id}'"
                ))),
                Err(e) if is_unique_violation(&e) => {
                    Err(StoreError::Conflict("agent token".to_owned()))
                }
                Err(e) => Err(e.into()),
            }
        })
    }

    /// Revokes a system's agent token without issuing a new one: the stored
    /// hash becomes `revoked:<id>`, which no token hashes to (hashes are 64
    /// hex digits), so the agent can no longer connect and
    /// [`Self::system_token_hash_is_current`] turns false for its live
    /// session. [`Self::rotate_token`] issues a working token again.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for a bad id or name;
    /// [`StoreError::NotFound`] for an unknown customer or system.
    pub fn revoke_token(&self, customer_id: &str, name: &str) -> Result<System, StoreError> {
        let customer_id = customer_id_for_write(customer_id)?;
        let name = system_name_for_write(name)?;
        self.write(|tx| {
            require_customer_in(tx, &customer_id)?;
            tx.query_row(
                &format!(
                    "UPDATE systems SET token_hash = 'revoked:' || id
                     WHERE customer_id = ?1 AND name = ?2
                     RETURNING {SYSTEM_COLS}"
                ),
                params![customer_id, name],
                system_row,
            )
            .optional()?
            .ok_or_else(|| {
                StoreError::NotFound(format!("system '{name}' of customer '{customer_id}'"))
            })
        })
    }

    /// The system an agent token (by its [`crate::secret::token_hash`])
    /// belongs to.
    ///
    /// # Errors
    /// [`StoreError::Backend`] on a database error.
    pub fn system_by_token_hash(&self, hash: &str) -> Result<Option<System>, StoreError> {
        if !is_token_hash(hash) {
            return Ok(None);
        }
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {SYSTEM_COLS} FROM systems WHERE token_hash = ?1"),
                params![hash],
                system_row,
            )
            .optional()?)
    }

    /// A customer's system by name (case-insensitively), or its primary
    /// system for `None`. Invalid input finds nothing.
    ///
    /// # Errors
    /// [`StoreError::Backend`] on a database error.
    pub fn find_system(
        &self,
        customer_id: &str,
        system: Option<&str>,
    ) -> Result<Option<System>, StoreError> {
        find_system_on(&self.conn(), customer_id, system)
    }

    /// Whether `hash` is still the token hash of system `system_id`: false
    /// after a rotation or if the system is gone.
    ///
    /// # Errors
    /// [`StoreError::Backend`] on a database error.
    pub fn system_token_hash_is_current(
        &self,
        system_id: i64,
        hash: &str,
    ) -> Result<bool, StoreError> {
        if !is_token_hash(hash) {
            return Ok(false);
        }
        Ok(self
            .conn()
            .query_row(
                "SELECT 1 FROM systems WHERE id = ?1 AND token_hash = ?2",
                params![system_id, hash],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// A customer's systems, primary first, then by name.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for a malformed customer id;
    /// [`StoreError::NotFound`] for an unknown customer.
    pub fn list_systems(&self, customer_id: &str) -> Result<Vec<System>, StoreError> {
        // Not `NotFound`: that message would echo unvalidated input.
        let customer_id = customer_id_for_write(customer_id)?;
        let conn = self.conn();
        require_customer_in(&conn, &customer_id)?;
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {SYSTEM_COLS} FROM systems WHERE customer_id = ?1
             ORDER BY is_primary DESC, name"
        ))?;
        let systems = stmt
            .query_map(params![customer_id], system_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(systems)
    }
}

/// The id and stored name of an account, or `NotFound`.
fn account_id_in(conn: &Connection, name: &str) -> Result<(i64, String), StoreError> {
    conn.query_row(
        "SELECT id, name FROM accounts WHERE name = ?1",
        params![name],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .optional()?
    .ok_or_else(|| StoreError::NotFound(format!("account '{name}'")))
}

/// `NotFound` unless the (normalized) customer exists.
fn require_customer_in(conn: &Connection, customer_id: &str) -> Result<(), StoreError> {
    conn.query_row(
        "SELECT 1 FROM customers WHERE id = ?1",
        params![customer_id],
        |_| Ok(()),
    )
    .optional()?
    .ok_or_else(|| StoreError::NotFound(format!("customer '{customer_id}'")))
}

/// Applies pending migrations, each in its own `BEGIN IMMEDIATE`
/// transaction that re-reads the version, so two processes opening a fresh
/// file at once do not both migrate.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let supported = i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX);
    loop {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > supported {
            return Err(StoreError::SchemaTooNew {
                found: version,
                supported,
            });
        }
        let Some(sql) = usize::try_from(version)
            .ok()
            .and_then(|v| MIGRATIONS.get(v))
        else {
            return Ok(());
        };
        tx.execute_batch(sql)
            .map_err(|e| StoreError::Backend(format!("migration {} failed: {e}", version + 1)))?;
        // PRAGMA does not take bound parameters; the value is our own integer.
        tx.execute_batch(&format!("PRAGMA user_version = {}", version + 1))?;
        tx.commit()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::{generate_token, token_hash};
    use crate::store::DB_FILE;

    const HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA";

    fn temp_store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join(DB_FILE)).unwrap();
        (dir, store)
    }

    fn th() -> String {
        token_hash(&generate_token())
    }

    #[test]
    fn connect_lookup_reads_account_grant_and_system_on_a_reader() {
        let (_d, store) = temp_store();
        let acct = store.add_account("acme", HASH).unwrap();
        store.add_customer("1234", "acme", None).unwrap();
        store.add_account("other", HASH).unwrap();
        let primary = store.add_system("1234", "ipo", true, &th()).unwrap();
        let second = store.add_system("1234", "srv", false, &th()).unwrap();

        let l = store.connect_lookup("ACME", "1234", None).unwrap();
        assert_eq!(l.account.as_ref().map(|a| a.id), Some(acct.id));
        assert!(l.managed);
        assert_eq!(l.system, Some(primary));
        let l = store.connect_lookup("acme", "1234", Some("SRV")).unwrap();
        assert_eq!(l.system, Some(second));
        // Not managed by this account; the system is still found (the
        // caller answers both with the same 404).
        let l = store.connect_lookup("other", "1234", None).unwrap();
        assert!(l.account.is_some() && !l.managed && l.system.is_some());
        for (user, customer, system) in [
            ("nobody", "1234", None),
            ("bad user!", "1234", None),
            ("acme", "9999", None),
            ("acme", "12-34", None),
            ("acme", "1234", Some("no.such")),
        ] {
            let l = store.connect_lookup(user, customer, system).unwrap();
            assert!(
                l.account.is_none() || !l.managed || l.system.is_none(),
                "{user} {customer} {system:?}: {l:?}"
            );
        }
        // A change through the write connection is seen by the readers at
        // once (WAL: every read starts from the last commit).
        store.set_account_enabled("acme", false).unwrap();
        let l = store.connect_lookup("acme", "1234", None).unwrap();
        assert!(!l.account.unwrap().enabled);
        // The readers cannot write.
        let r = store.reader().unwrap();
        assert!(r.execute("DELETE FROM accounts", []).is_err());
    }

    #[test]
    fn lookup_now_runs_only_on_an_open_and_free_reader() {
        let (_d, store) = temp_store();
        store.add_account("acme", HASH).unwrap();
        store.add_customer("1234", "acme", None).unwrap();
        store.add_system("1234", "ipo", true, &th()).unwrap();
        // Readers are opened on the blocking path, never on the fast one.
        assert!(store.try_connect_lookup_now("acme", "1234", None).is_none());
        let slow = store.connect_lookup("acme", "1234", None).unwrap();
        let fast = store
            .try_connect_lookup_now("acme", "1234", None)
            .expect("a free reader")
            .unwrap();
        assert_eq!(fast, slow);
        // With every reader held elsewhere it does nothing, not wait.
        let readers = store.readers.get().unwrap();
        let held: Vec<_> = readers.conns.iter().map(|c| c.lock().unwrap()).collect();
        assert!(store.try_connect_lookup_now("acme", "1234", None).is_none());
        drop(held);
        assert!(store.try_connect_lookup_now("acme", "1234", None).is_some());
        // Each lookup's read transaction is over when it returns.
        for c in &readers.conns {
            assert!(c.lock().unwrap().is_autocommit());
        }
        // One left open (by a lookup that failed to end it) is ended by
        // the next lookup on that connection.
        for c in &readers.conns {
            c.lock().unwrap().execute_batch("BEGIN").unwrap();
        }
        assert_eq!(store.connect_lookup("acme", "1234", None).unwrap(), slow);
    }

    #[test]
    fn open_creates_parent_dir_wal_and_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested").join("deeper").join(DB_FILE);
        let store = SqliteStore::open(&path).unwrap();
        assert!(path.is_file());
        assert_eq!(store.path(), path);
        assert_eq!(
            store.schema_version().unwrap(),
            i64::try_from(MIGRATIONS.len()).unwrap()
        );
        let conn = store.conn();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let fk: i64 = conn
            .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
            .unwrap();
        assert_eq!(fk, 1);
        let busy: i64 = conn
            .query_row("PRAGMA busy_timeout", [], |r| r.get(0))
            .unwrap();
        assert_eq!(busy, 5000);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "db file must be owner-only: {mode:o}");
        }
    }

    #[test]
    fn reopen_keeps_data_and_does_not_remigrate() {
        let (dir, store) = temp_store();
        store.add_account("acme", HASH).unwrap();
        drop(store);
        let again = SqliteStore::open(&dir.path().join(DB_FILE)).unwrap();
        assert!(again.account_by_name("acme").unwrap().is_some());
    }

    #[test]
    fn schema_too_new_is_refused() {
        let (dir, store) = temp_store();
        store
            .conn()
            .execute_batch("PRAGMA user_version = 999")
            .unwrap();
        drop(store);
        match SqliteStore::open(&dir.path().join(DB_FILE)) {
            Err(StoreError::SchemaTooNew { found: 999, .. }) => {}
            other => panic!("expected SchemaTooNew, got {other:?}"),
        }
    }

    #[test]
    fn accounts_crud() {
        let (_dir, store) = temp_store();
        let a = store.add_account("Acme", HASH).unwrap();
        assert!(a.enabled);
        assert!(!format!("{a:?}").contains("argon2"), "hash must be masked");
        let got = store.account_by_name("acme").unwrap().unwrap();
        assert_eq!(got, a);
        assert_eq!(got.name, "Acme");

        store.set_password("ACME", "$argon2id$new").unwrap();
        assert_eq!(
            store
                .account_by_name("acme")
                .unwrap()
                .unwrap()
                .password_hash,
            "$argon2id$new"
        );
        store.set_account_enabled("acme", false).unwrap();
        assert!(!store.account_by_name("acme").unwrap().unwrap().enabled);
        store.set_account_enabled("acme", true).unwrap();
        assert!(store.account_by_name("acme").unwrap().unwrap().enabled);

        assert!(matches!(
            store.set_password("nobody", HASH),
            Err(StoreError::NotFound(ref w)) if w == "account 'nobody'"
        ));
        assert!(matches!(
            store.set_account_enabled("nobody", true),
            Err(StoreError::NotFound(_))
        ));
        assert_eq!(store.account_by_name("nobody").unwrap(), None);
        assert_eq!(store.account_by_name("bad name").unwrap(), None);
        assert_eq!(store.account_by_name("").unwrap(), None);
    }

    #[test]
    fn account_name_conflict_is_case_insensitive() {
        let (_dir, store) = temp_store();
        store.add_account("acme", HASH).unwrap();
        let err = store.add_account("ACME", HASH).unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)));
        assert_eq!(err.to_string(), "account 'ACME' already exists");
    }

    #[test]
    fn account_input_validation() {
        let (_dir, store) = temp_store();
        assert!(matches!(
            store.add_account("a:b", HASH),
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(
            store.add_account("ok", "plaintext"),
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(
            store.add_account("ok", ""),
            Err(StoreError::Invalid(_))
        ));
        assert!(store.list_accounts().unwrap().is_empty());
    }

    #[test]
    fn customers_and_grants() {
        let (_dir, store) = temp_store();
        let acme = store.add_account("acme", HASH).unwrap();
        let other = store.add_account("other", HASH).unwrap();
        let c = store.add_customer("AB12", "ACME", Some("Site A")).unwrap();
        assert_eq!(c.id, "ab12");
        assert_eq!(c.accounts, ["acme"]);
        assert_eq!(store.customer("ab12").unwrap(), Some(c.clone()));
        assert_eq!(store.customer("AB12").unwrap(), Some(c));
        assert_eq!(store.customer("zz").unwrap(), None);
        assert_eq!(store.customer("a-b").unwrap(), None);

        assert!(store.customer_managed_by(acme.id, "AB12").unwrap());
        assert!(!store.customer_managed_by(other.id, "ab12").unwrap());
        assert!(!store.customer_managed_by(acme.id, "nope").unwrap());
        assert!(!store.customer_managed_by(acme.id, "in-valid").unwrap());

        let err = store.add_customer("ab12", "other", None).unwrap_err();
        assert_eq!(err.to_string(), "customer 'ab12' already exists");
        let err = store.add_customer("cd34", "ghost", None).unwrap_err();
        assert_eq!(err.to_string(), "no such account 'ghost'");
        assert_eq!(store.customer("cd34").unwrap(), None, "rolled back");
        assert!(matches!(
            store.add_customer("a-b", "acme", None),
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(
            store.add_customer("cd34", "acme", Some("bad\nname")),
            Err(StoreError::Invalid(_))
        ));

        assert!(store.grant_customer("ab12", "other").unwrap());
        assert!(!store.grant_customer("ab12", "other").unwrap());
        assert!(store.customer_managed_by(other.id, "ab12").unwrap());
        assert_eq!(
            store.customer("ab12").unwrap().unwrap().accounts,
            ["acme", "other"]
        );
        assert!(store.revoke_customer("ab12", "other").unwrap());
        assert!(!store.revoke_customer("ab12", "other").unwrap());
        assert!(!store.customer_managed_by(other.id, "ab12").unwrap());
        assert!(matches!(
            store.grant_customer("zz99", "other"),
            Err(StoreError::NotFound(_))
        ));
        assert!(matches!(
            store.grant_customer("ab12", "ghost"),
            Err(StoreError::NotFound(_))
        ));

        store.add_customer("cd34", "acme", None).unwrap();
        let listed = store.list_accounts().unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].name, "acme");
        assert_eq!(listed[0].customers, ["ab12", "cd34"]);
        assert!(listed[1].customers.is_empty());
        let customers = store.list_customers().unwrap();
        assert_eq!(customers.len(), 2);
        assert_eq!(customers[0].name.as_deref(), Some("Site A"));
        assert_eq!(customers[1].name, None);
    }

    #[test]
    fn systems_primary_and_tokens() {
        let (_dir, store) = temp_store();
        store.add_account("acme", HASH).unwrap();
        store.add_customer("1234", "acme", None).unwrap();

        // The first system becomes primary without asking.
        let h1 = th();
        let s1 = store.add_system("1234", "IPO1", false, &h1).unwrap();
        assert!(s1.is_primary);
        assert_eq!(s1.name, "ipo1");
        // A second system without --primary leaves the primary alone.
        let h2 = th();
        let s2 = store.add_system("1234", "ipo2", false, &h2).unwrap();
        assert!(!s2.is_primary);
        assert_eq!(store.find_system("1234", None).unwrap(), Some(s1.clone()));
        // --primary moves the flag.
        let h3 = th();
        let s3 = store.add_system("1234", "app", true, &h3).unwrap();
        assert!(s3.is_primary);
        assert_eq!(store.find_system("1234", None).unwrap(), Some(s3.clone()));
        let all = store.list_systems("1234").unwrap();
        assert_eq!(all.iter().filter(|s| s.is_primary).count(), 1);
        assert_eq!(all[0], s3);
        assert_eq!(
            all.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            ["app", "ipo1", "ipo2"]
        );

        assert_eq!(
            store.find_system("1234", Some("IPO2")).unwrap(),
            Some(s2.clone())
        );
        assert_eq!(store.find_system("1234", Some("none")).unwrap(), None);
        assert_eq!(store.find_system("1234", Some("a.b")).unwrap(), None);
        assert_eq!(store.find_system("9999", None).unwrap(), None);

        assert_eq!(store.system_by_token_hash(&h2).unwrap(), Some(s2.clone()));
        assert_eq!(store.system_by_token_hash(&th()).unwrap(), None);
        assert_eq!(store.system_by_token_hash("garbage").unwrap(), None);
        assert!(store.system_token_hash_is_current(s2.id, &h2).unwrap());
        assert!(!store.system_token_hash_is_current(s1.id, &h2).unwrap());

        // Rotation: the old hash stops working, the new one finds the system.
        let h2b = th();
        let rotated = store.rotate_token("1234", "IPO2", &h2b).unwrap();
        assert_eq!(rotated, s2);
        assert_eq!(store.system_by_token_hash(&h2).unwrap(), None);
        assert_eq!(store.system_by_token_hash(&h2b).unwrap(), Some(s2.clone()));
        assert!(!store.system_token_hash_is_current(s2.id, &h2).unwrap());
        assert!(store.system_token_hash_is_current(s2.id, &h2b).unwrap());
        assert!(matches!(
            store.rotate_token("1234", "ghost", &th()),
            Err(StoreError::NotFound(ref w)) if w == "system 'ghost' of customer '1234'"
        ));
        assert!(matches!(
            store.rotate_token("1234", "ipo1", &h3),
            Err(StoreError::Conflict(_))
        ));
    }

    #[test]
    fn system_conflicts_and_validation() {
        let (_dir, store) = temp_store();
        store.add_account("acme", HASH).unwrap();
        store.add_customer("1234", "acme", None).unwrap();
        store.add_customer("5678", "acme", None).unwrap();
        let h = th();
        store.add_system("1234", "ipo", false, &h).unwrap();
        let err = store.add_system("1234", "IPO", true, &th()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "system 'ipo' of customer '1234' already exists"
        );
        // The failed --primary add did not clear the existing primary.
        assert!(store.find_system("1234", None).unwrap().is_some());
        // Same name at another customer is fine; same token hash is not.
        store.add_system("5678", "ipo", false, &th()).unwrap();
        assert!(matches!(
            store.add_system("5678", "other", false, &h),
            Err(StoreError::Conflict(_))
        ));
        let err = store.add_system("9999", "ipo", false, &th()).unwrap_err();
        assert_eq!(err.to_string(), "no such customer '9999'");
        assert!(matches!(
            store.add_system("1234", "a.b", false, &th()),
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(
            store.add_system("1234", &"a".repeat(64), false, &th()),
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(
            store.add_system("1234", "x", false, "not-a-hash"),
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(
            store.list_systems("9999"),
            Err(StoreError::NotFound(_))
        ));
        assert!(matches!(
            store.list_systems("a-b\r\n"),
            Err(StoreError::Invalid(ref m)) if !m.contains('\n')
        ));
    }

    #[test]
    fn db_enforces_one_primary_per_customer() {
        let (_dir, store) = temp_store();
        store.add_account("acme", HASH).unwrap();
        store.add_customer("1234", "acme", None).unwrap();
        store.add_system("1234", "a", false, &th()).unwrap();
        store.add_system("1234", "b", false, &th()).unwrap();
        let err = store
            .conn()
            .execute("UPDATE systems SET is_primary = 1 WHERE name = 'b'", [])
            .unwrap_err();
        assert!(is_unique_violation(&err), "{err}");
    }

    #[test]
    fn data_version_sees_other_connections_only() {
        let (dir, broker) = temp_store();
        let v0 = broker.data_version().unwrap();
        // Our own write does not move it.
        broker.add_account("own", HASH).unwrap();
        assert_eq!(broker.data_version().unwrap(), v0);
        // A write from a second connection (as the CLI process would) does.
        let cli = SqliteStore::open(&dir.path().join(DB_FILE)).unwrap();
        cli.add_account("acme", HASH).unwrap();
        let v1 = broker.data_version().unwrap();
        assert_ne!(v1, v0);
        assert!(broker.account_by_name("acme").unwrap().is_some());
        // Reads from the other connection do not move it.
        cli.list_accounts().unwrap();
        assert_eq!(broker.data_version().unwrap(), v1);
        cli.set_account_enabled("acme", false).unwrap();
        assert_ne!(broker.data_version().unwrap(), v1);
    }

    #[test]
    fn deleting_a_customer_cascades() {
        let (_dir, store) = temp_store();
        let a = store.add_account("acme", HASH).unwrap();
        store.add_customer("1234", "acme", None).unwrap();
        let h = th();
        store.add_system("1234", "ipo", false, &h).unwrap();
        store
            .conn()
            .execute("DELETE FROM customers WHERE id = '1234'", [])
            .unwrap();
        assert!(!store.customer_managed_by(a.id, "1234").unwrap());
        assert_eq!(store.system_by_token_hash(&h).unwrap(), None);
    }

    #[test]
    fn revoking_a_token_locks_the_agent_out_until_rotation() {
        let (_dir, store) = temp_store();
        store.add_account("acme", HASH).unwrap();
        store.add_customer("1234", "acme", None).unwrap();
        let h = th();
        let sys = store.add_system("1234", "ipo", false, &h).unwrap();
        assert_eq!(store.revoke_token("1234", "IPO").unwrap(), sys);
        assert_eq!(store.system_by_token_hash(&h).unwrap(), None);
        assert!(!store.system_token_hash_is_current(sys.id, &h).unwrap());
        // Idempotent, and the placeholder is no usable hash.
        store.revoke_token("1234", "ipo").unwrap();
        assert_eq!(
            store
                .system_by_token_hash(&format!("revoked:{}", sys.id))
                .unwrap(),
            None
        );
        assert!(matches!(
            store.revoke_token("1234", "ghost"),
            Err(StoreError::NotFound(_))
        ));
        let h2 = th();
        store.rotate_token("1234", "ipo", &h2).unwrap();
        assert_eq!(store.system_by_token_hash(&h2).unwrap(), Some(sys));
    }

    #[test]
    fn clones_share_the_connection() {
        let (_dir, store) = temp_store();
        let clone = store.clone();
        clone.add_account("acme", HASH).unwrap();
        assert!(store.account_by_name("acme").unwrap().is_some());
        assert!(format!("{store:?}").contains(DB_FILE));
    }
}
