//! The `audit` table (migration 2) of the SQLite store.
//!
//! Inserts and updates are single statements. The synchronous methods
//! (the CLI) run each in its own `BEGIN IMMEDIATE` transaction; the
//! broker's go through [`super::writer`], which commits many in one. Queries use the `audit_by_start`
//! index for `--since` and the partial `audit_open` index to find records
//! left open by a crash.

use rusqlite::{params, params_from_iter, types::Value, Connection};

use super::SqliteStore;
use crate::store::audit::{
    AuditEnd, AuditFilter, AuditRecord, NewAudit, DEFAULT_LIMIT, INTERRUPTED, MAX_LIMIT,
};
use crate::store::StoreError;

/// Longest text stored in one audit column; longer values are cut (they
/// come from clients and are already escaped).
const MAX_TEXT: usize = 512;

fn cut(s: &Option<String>) -> Option<String> {
    s.as_ref().map(|s| {
        if s.len() <= MAX_TEXT {
            s.clone()
        } else {
            let mut end = MAX_TEXT;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s[..end].to_owned()
        }
    })
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: Option<i64>) -> Option<u64> {
    v.map(|v| u64::try_from(v).unwrap_or(0))
}

const COLS: &str = "id, kind, account, client, customer, system, dest, target, started_at, \
                    ended_at, bytes_up, bytes_down, status, reason, detail";

fn record_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AuditRecord> {
    let status: Option<i64> = r.get(12)?;
    Ok(AuditRecord {
        id: r.get(0)?,
        kind: r.get(1)?,
        account: r.get(2)?,
        client: r.get(3)?,
        customer: r.get(4)?,
        system: r.get(5)?,
        dest: r.get(6)?,
        target: r.get(7)?,
        start_ms: r.get(8)?,
        end_ms: r.get(9)?,
        bytes_client_to_target: to_u64(r.get(10)?),
        bytes_target_to_client: to_u64(r.get(11)?),
        status: status.and_then(|s| u16::try_from(s).ok()),
        reason: r.get(13)?,
        detail: r.get(14)?,
    })
}

/// Inserts `rec` on `c` (inside the caller's transaction); returns its id.
pub(super) fn insert_on(c: &Connection, rec: &NewAudit) -> Result<i64, StoreError> {
    let kind = rec
        .kind
        .ok_or_else(|| StoreError::Invalid("audit record without a kind".to_owned()))?;
    c.prepare_cached(
        "INSERT INTO audit (kind, account, client, customer, system, dest, target,
                            started_at, ended_at, status, reason, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )?
    .execute(params![
        kind.as_str(),
        cut(&rec.account),
        cut(&rec.client),
        cut(&rec.customer),
        cut(&rec.system),
        cut(&rec.dest),
        cut(&rec.target),
        rec.started_ms,
        rec.ended_ms,
        rec.status,
        cut(&rec.reason),
        cut(&rec.detail),
    ])?;
    Ok(c.last_insert_rowid())
}

/// Sets the status of open record `id` if it has none yet.
pub(super) fn set_status_on(c: &Connection, id: i64, status: u16) -> Result<(), StoreError> {
    c.prepare_cached("UPDATE audit SET status = ?2 WHERE id = ?1 AND status IS NULL")?
        .execute(params![id, status])?;
    Ok(())
}

/// Finishes open record `id`; [`StoreError::NotFound`] if none is open.
pub(super) fn finish_on(c: &Connection, id: i64, end: &AuditEnd) -> Result<(), StoreError> {
    let (up, down) = match end.bytes {
        Some((u, d)) => (Some(to_i64(u)), Some(to_i64(d))),
        None => (None, None),
    };
    let reason = cut(&Some(end.reason.clone()));
    let n = c
        .prepare_cached(
            "UPDATE audit SET ended_at = ?2, bytes_up = ?3, bytes_down = ?4,
                              status = COALESCE(?5, status), reason = ?6
             WHERE id = ?1 AND ended_at IS NULL",
        )?
        .execute(params![id, end.ended_ms, up, down, end.status, reason])?;
    if n == 0 {
        return Err(StoreError::NotFound(format!("open audit record {id}")));
    }
    Ok(())
}

impl SqliteStore {
    /// Inserts an audit record; returns its id.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] without a kind; [`StoreError::Backend`] when
    /// the write fails (disk full, locked, read-only): callers that start
    /// a tunnel must then refuse it.
    pub fn audit_insert(&self, rec: &NewAudit) -> Result<i64, StoreError> {
        self.write(|tx| insert_on(tx, rec))
    }

    /// Sets the status of a still-open record that has none yet (the 200
    /// of a tunnel, written once it was sent).
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the write fails.
    pub fn audit_set_status(&self, id: i64, status: u16) -> Result<(), StoreError> {
        self.write(|tx| set_status_on(tx, id, status))
    }

    /// Finishes an open record: end time, bytes, reason and (if given)
    /// status. A record that is already closed is left alone.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] if no open record has this id;
    /// [`StoreError::Backend`] when the write fails.
    pub fn audit_finish(&self, id: i64, end: &AuditEnd) -> Result<(), StoreError> {
        self.write(|tx| finish_on(tx, id, end))
    }

    /// Closes every record left open (by a crash) as [`INTERRUPTED`], with
    /// `now_ms` as the end. Returns how many there were. Called once at
    /// broker start, before any tunnel can run.
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the write fails.
    pub fn audit_close_interrupted(&self, now_ms: i64) -> Result<usize, StoreError> {
        self.write(|tx| {
            Ok(tx.execute(
                "UPDATE audit SET ended_at = MAX(?1, started_at), reason = ?2
                 WHERE ended_at IS NULL",
                params![now_ms, INTERRUPTED],
            )?)
        })
    }

    /// Deletes up to `max` closed records that ended before `before_ms`
    /// (open records, live tunnels and sessions, are kept whatever their
    /// age). Returns how many went; call again while it returns `max`, so
    /// no transaction holds the write lock for long.
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the write fails.
    pub fn audit_prune(&self, before_ms: i64, max: usize) -> Result<usize, StoreError> {
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        self.write(|tx| {
            // `started_at` is indexed and never after `ended_at`.
            Ok(tx.execute(
                "DELETE FROM audit WHERE id IN (
                     SELECT id FROM audit
                     WHERE started_at < ?1 AND ended_at IS NOT NULL AND ended_at < ?1
                     ORDER BY started_at LIMIT ?2)",
                params![before_ms, max],
            )?)
        })
    }

    /// Lists records matching `filter`, oldest first (the newest `limit`).
    ///
    /// # Errors
    /// [`StoreError::Backend`] on a database error.
    pub fn audit_query(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>, StoreError> {
        let mut sql = format!("SELECT {COLS} FROM audit WHERE 1 = 1");
        let mut args: Vec<Value> = Vec::new();
        if let Some(a) = &filter.account {
            args.push(Value::Text(a.clone()));
            sql.push_str(&format!(" AND account = ?{} COLLATE NOCASE", args.len()));
        }
        if let Some(c) = &filter.customer {
            args.push(Value::Text(c.to_ascii_lowercase()));
            sql.push_str(&format!(" AND customer = ?{}", args.len()));
        }
        if let Some(since) = filter.since_ms {
            args.push(Value::Integer(since));
            let n = args.len();
            sql.push_str(&format!(
                " AND (started_at >= ?{n} OR ended_at IS NULL OR ended_at >= ?{n})"
            ));
        }
        if let Some(k) = filter.kind {
            args.push(Value::Text(k.as_str().to_owned()));
            sql.push_str(&format!(" AND kind = ?{}", args.len()));
        }
        let limit = filter.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
        args.push(Value::Integer(i64::from(limit)));
        sql.push_str(&format!(" ORDER BY id DESC LIMIT ?{}", args.len()));
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&sql)?;
        let mut rows = stmt
            .query_map(params_from_iter(args), record_row)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.reverse();
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::audit::AuditKind;
    use crate::store::DB_FILE;

    fn temp_store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join(DB_FILE)).unwrap();
        (dir, store)
    }

    fn tunnel(account: &str, customer: &str, start: i64) -> NewAudit {
        NewAudit {
            kind: Some(AuditKind::Tunnel),
            account: Some(account.into()),
            client: Some("127.0.0.1:5000".into()),
            customer: Some(customer.into()),
            system: Some("ipo1".into()),
            dest: Some(format!("{customer}.maint.test:22")),
            target: Some("self:22".into()),
            started_ms: start,
            ..NewAudit::default()
        }
    }

    #[test]
    fn prune_deletes_only_closed_records_that_ended_before_the_cutoff() {
        let (_dir, s) = temp_store();
        let end = |ms| AuditEnd {
            ended_ms: ms,
            status: Some(200),
            bytes: Some((1, 2)),
            reason: "closed".into(),
        };
        let mut old = Vec::new();
        for i in 0..5 {
            let id = s.audit_insert(&tunnel("alice", "1234", 1000 + i)).unwrap();
            s.audit_finish(id, &end(2000 + i)).unwrap();
            old.push(id);
        }
        // Started long ago but still running: kept.
        let live = s.audit_insert(&tunnel("alice", "1234", 500)).unwrap();
        // Started before the cutoff, ended after it: kept.
        let straddles = s.audit_insert(&tunnel("bob", "1234", 1500)).unwrap();
        s.audit_finish(straddles, &end(9000)).unwrap();
        let recent = s.audit_insert(&tunnel("bob", "1234", 8000)).unwrap();
        s.audit_finish(recent, &end(8001)).unwrap();

        // In chunks: 2, 2, 1, then nothing.
        let mut chunks = Vec::new();
        loop {
            let n = s.audit_prune(5000, 2).unwrap();
            chunks.push(n);
            if n < 2 {
                break;
            }
        }
        assert_eq!(chunks, [2, 2, 1]);
        let left: Vec<i64> = s
            .audit_query(&AuditFilter::default())
            .unwrap()
            .iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(left, [live, straddles, recent]);
    }

    #[test]
    fn tunnel_lifecycle() {
        let (_dir, s) = temp_store();
        let id = s.audit_insert(&tunnel("alice", "1234", 1000)).unwrap();
        s.audit_set_status(id, 200).unwrap();
        let open = s.audit_query(&AuditFilter::default()).unwrap();
        assert_eq!(open.len(), 1);
        assert_eq!(open[0].status, Some(200));
        assert_eq!(open[0].end_ms, None);
        s.audit_finish(
            id,
            &AuditEnd {
                ended_ms: 2000,
                status: None,
                bytes: Some((u64::MAX, 7)),
                reason: "closed".into(),
            },
        )
        .unwrap();
        let r = &s.audit_query(&AuditFilter::default()).unwrap()[0];
        assert_eq!(r.id, id);
        assert_eq!(r.kind, "tunnel");
        assert_eq!(r.end_ms, Some(2000));
        assert_eq!(r.status, Some(200));
        assert_eq!(r.bytes_client_to_target, Some(i64::MAX as u64));
        assert_eq!(r.bytes_target_to_client, Some(7));
        assert_eq!(r.reason.as_deref(), Some("closed"));
        // A closed record is not finished twice.
        assert!(matches!(
            s.audit_finish(
                id,
                &AuditEnd {
                    ended_ms: 3000,
                    status: Some(500),
                    bytes: None,
                    reason: "again".into()
                }
            ),
            Err(StoreError::NotFound(_))
        ));
        assert!(matches!(
            s.audit_insert(&NewAudit::default()),
            Err(StoreError::Invalid(_))
        ));
    }

    #[test]
    fn crash_leftovers_are_closed_as_interrupted() {
        let (_dir, s) = temp_store();
        let open = s.audit_insert(&tunnel("alice", "1234", 1000)).unwrap();
        let mut done = tunnel("alice", "1234", 1000);
        done.ended_ms = Some(1500);
        done.reason = Some("closed".into());
        let closed = s.audit_insert(&done).unwrap();
        assert_eq!(s.audit_close_interrupted(5000).unwrap(), 1);
        assert_eq!(s.audit_close_interrupted(6000).unwrap(), 0);
        let rows = s.audit_query(&AuditFilter::default()).unwrap();
        let by_id = |id| rows.iter().find(|r| r.id == id).unwrap();
        assert_eq!(by_id(open).reason.as_deref(), Some(INTERRUPTED));
        assert_eq!(by_id(open).end_ms, Some(5000));
        assert_eq!(by_id(closed).reason.as_deref(), Some("closed"));
    }

    #[test]
    fn filters_and_limits() {
        let (_dir, s) = temp_store();
        for (i, (a, c)) in [("alice", "1234"), ("Bob", "5678"), ("alice", "5678")]
            .iter()
            .enumerate()
        {
            let mut rec = tunnel(a, c, 1000 * (i as i64 + 1));
            rec.ended_ms = Some(1000 * (i as i64 + 1) + 10);
            s.audit_insert(&rec).unwrap();
        }
        s.audit_insert(&NewAudit {
            kind: Some(AuditKind::Admin),
            detail: Some("account.disable".into()),
            account: Some("bob".into()),
            started_ms: 4000,
            ended_ms: Some(4000),
            ..NewAudit::default()
        })
        .unwrap();
        let q = |f: AuditFilter| s.audit_query(&f).unwrap();
        assert_eq!(q(AuditFilter::default()).len(), 4);
        let alice = q(AuditFilter {
            account: Some("ALICE".into()),
            ..AuditFilter::default()
        });
        assert_eq!(alice.len(), 2);
        assert!(alice[0].start_ms < alice[1].start_ms, "oldest first");
        assert_eq!(
            q(AuditFilter {
                customer: Some("5678".into()),
                ..AuditFilter::default()
            })
            .len(),
            2
        );
        assert_eq!(
            q(AuditFilter {
                since_ms: Some(2500),
                ..AuditFilter::default()
            })
            .len(),
            2
        );
        assert_eq!(
            q(AuditFilter {
                kind: Some(AuditKind::Admin),
                account: Some("bob".into()),
                ..AuditFilter::default()
            })
            .len(),
            1
        );
        let newest = q(AuditFilter {
            limit: Some(2),
            ..AuditFilter::default()
        });
        assert_eq!(
            newest.iter().map(|r| r.start_ms).collect::<Vec<_>>(),
            [3000, 4000]
        );
    }

    #[test]
    fn long_text_is_cut_on_a_char_boundary() {
        let (_dir, s) = temp_store();
        let mut rec = tunnel("alice", "1234", 1);
        rec.dest = Some("é".repeat(MAX_TEXT));
        s.audit_insert(&rec).unwrap();
        let r = &s.audit_query(&AuditFilter::default()).unwrap()[0];
        assert!(r.dest.as_ref().unwrap().len() <= MAX_TEXT);
    }
}
