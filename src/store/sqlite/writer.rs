//! Group commit for the broker's audit writes.
//!
//! Every tunnel writes its record before the agent is asked to open (fail
//! closed), sets its status after the 200, and finishes it at the end. One
//! `BEGIN IMMEDIATE … COMMIT` per write made the store connection the
//! bottleneck of tunnel setup under concurrency. Here one thread drains
//! whatever is queued, applies it in one transaction and answers each
//! caller after the commit: a caller still learns that *its* record is
//! stored before it goes on, but a burst of 64 setups costs one commit,
//! not 64.
//!
//! The queue is unbounded on purpose and bounded in practice: every caller
//! but [`AuditWriter::set_status_nowait`] waits for its answer, and each
//! connection has at most one such write outstanding, so the queue never
//! holds more than the broker's connection cap plus one status update per
//! live tunnel.
//!
//! WAL checkpoints run on a thread of their own ([`checkpointer`]), not
//! inside a commit: SQLite's automatic checkpoint fsyncs the database
//! file from the committing thread, and on the bench machine every
//! ~450th setup then waited 10-12 ms behind it (with 64 setups in
//! flight, all of them did).
//!
//! A tunnel's later writes (its status after the 200, its end) do not
//! need a commit of their own: nothing waits on them but the tunnel's own
//! task, which is done by then. They are *deferred*: queued alone, they
//! wait up to [`DEFER`] for a write that is waited on (the next tunnel's
//! record) and ride in its commit. Sequential setups thus cost one commit
//! each instead of three. A crash loses at most [`DEFER`] of such
//! updates; the records themselves, written before each open, stay, and
//! are closed as `interrupted` at the next start like any open record.
//!
//! Deferred writes do not go through the channel: they are pushed on a
//! list of their own, and only the push that finds it empty wakes the
//! writer (to start the [`DEFER`] clock). Sent through the channel, each
//! of them woke the writer thread only for it to go back to sleep: two
//! futex wake-ups and two context switches per tunnel, most of the
//! broker's futex calls at 64 concurrent setups. A commit takes the list
//! first, then the channel's jobs: a deferred write was pushed before any
//! waited-on write its caller sends next, so each caller's writes keep
//! their order.
//!
//! Statement errors belong to their own operation (a finish of a record
//! that is already closed is `NotFound` and changes nothing). If the
//! transaction itself fails (disk full, I/O error), every operation in the
//! batch gets the error, so no caller believes a lost write was stored.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::oneshot;

use super::audit::{finish_on, insert_on, set_status_on};
use crate::store::audit::{AuditEnd, NewAudit};
use crate::store::StoreError;

/// Most operations applied in one transaction.
const MAX_BATCH: usize = 256;

/// Operations committed before the checkpointer is woken (SQLite's own
/// automatic checkpoint starts at 1,000 WAL pages; a tunnel's three
/// operations write a few pages).
const CHECKPOINT_AFTER_OPS: usize = 1024;

/// The checkpointer also runs this long after a commit it was not woken
/// for, so a quiet broker's WAL is folded back too.
const CHECKPOINT_IDLE: Duration = Duration::from_secs(1);

/// Longest a deferred write waits for a commit to ride in.
pub(super) const DEFER: Duration = Duration::from_millis(50);

/// One audit write.
#[derive(Debug)]
pub enum AuditOp {
    /// Insert a record; answers its id.
    Insert(NewAudit),
    /// Set the status of an open record that has none (answers 0).
    SetStatus(i64, u16),
    /// Finish an open record (answers 0; `NotFound` if none is open).
    Finish(i64, AuditEnd),
}

/// Rows affected by an operation: the new id for an insert, 0 otherwise.
type Reply = Result<i64, StoreError>;

struct Job {
    op: AuditOp,
    reply: Option<oneshot::Sender<Reply>>,
}

/// Handle on the writer thread. The thread ends when the last handle is
/// dropped (its queue closes) after finishing what was queued.
#[derive(Debug, Clone)]
pub(super) struct AuditWriter {
    /// Waited-on jobs, and `None`: "the deferred list is no longer empty".
    tx: std_mpsc::Sender<Option<Job>>,
    deferred: Deferred,
}

/// The deferred list; `None` once the writer has stopped, so a deferred
/// write fails instead of waiting forever.
type Deferred = Arc<Mutex<Option<Vec<Job>>>>;

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.op.fmt(f)
    }
}

impl AuditWriter {
    /// Starts the writer thread on `conn` (shared with the store's other
    /// writes, which take the same lock), and the checkpointer on a
    /// connection of its own to `path`. From here on `conn` no longer
    /// checkpoints when it commits.
    pub(super) fn start(conn: Arc<Mutex<Connection>>, path: &Path) -> std::io::Result<AuditWriter> {
        let io = |e: rusqlite::Error| std::io::Error::other(e.to_string());
        let ckpt_conn = Connection::open(path).map_err(io)?;
        ckpt_conn.busy_timeout(Duration::from_secs(5)).map_err(io)?;
        let (wake_tx, wake_rx) = std_mpsc::sync_channel(1);
        let dirty = Arc::new(AtomicBool::new(false));
        let ckpt_dirty = dirty.clone();
        let display = path.to_owned();
        std::thread::Builder::new()
            .name("maintgate-ckpt".into())
            .spawn(move || checkpointer(&ckpt_conn, &wake_rx, &ckpt_dirty, &display))?;
        conn.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(io)?;
        let (tx, rx) = std_mpsc::channel();
        let wake = Wake {
            tx: wake_tx,
            dirty,
            ops: 0,
        };
        let deferred = Arc::new(Mutex::new(Some(Vec::new())));
        let queue = Queue {
            rx,
            deferred: deferred.clone(),
        };
        std::thread::Builder::new()
            .name("maintgate-audit".into())
            .spawn(move || {
                let _stop = StopDeferred(&queue.deferred);
                run(&conn, &queue, wake);
            })?;
        Ok(AuditWriter { tx, deferred })
    }

    /// Applies `op` in the next batch and waits for its commit.
    pub(super) async fn apply(&self, op: AuditOp) -> Reply {
        self.submit(op, false).await
    }

    /// As [`AuditWriter::apply`], but the commit may wait up to [`DEFER`]
    /// for other writes (for a tunnel's end, which nothing else waits on).
    pub(super) async fn apply_deferred(&self, op: AuditOp) -> Reply {
        self.submit(op, true).await
    }

    async fn submit(&self, op: AuditOp, defer: bool) -> Reply {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            op,
            reply: Some(reply),
        };
        if defer {
            self.defer(job).map_err(|_| stopped())?;
        } else {
            self.tx.send(Some(job)).map_err(|_| stopped())?;
        }
        answer.await.map_err(|_| stopped())?
    }

    /// Puts `job` on the deferred list; wakes the writer only if the list
    /// was empty. Fails if the writer has stopped.
    fn defer(&self, job: Job) -> Result<(), ()> {
        let was_empty = {
            let mut list = self.deferred.lock().unwrap_or_else(PoisonError::into_inner);
            let list = list.as_mut().ok_or(())?;
            list.push(job);
            list.len() == 1
        };
        if was_empty {
            self.tx.send(None).map_err(|_| ())?;
        }
        Ok(())
    }

    /// Queues a status update without waiting (deferred); a failure is
    /// logged.
    pub(super) fn set_status_nowait(&self, id: i64, status: u16) {
        let job = Job {
            op: AuditOp::SetStatus(id, status),
            reply: None,
        };
        if self.defer(job).is_err() {
            tracing::warn!(id, "audit writer stopped: status not recorded");
        }
    }
}

/// The writer's side of the queue.
struct Queue {
    rx: std_mpsc::Receiver<Option<Job>>,
    deferred: Deferred,
}

/// Closes the deferred list when the writer thread ends, even by a panic:
/// what is still on it is dropped (its waiters learn the writer stopped).
struct StopDeferred<'a>(&'a Deferred);

impl Drop for StopDeferred<'_> {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
    }
}

fn stopped() -> StoreError {
    StoreError::Backend("audit writer stopped".to_owned())
}

/// The writer's side of the checkpointer: a wake-up after
/// [`CHECKPOINT_AFTER_OPS`] operations, and a flag for the idle pass.
struct Wake {
    tx: std_mpsc::SyncSender<()>,
    dirty: Arc<AtomicBool>,
    ops: usize,
}

impl Wake {
    fn committed(&mut self, ops: usize) {
        self.dirty.store(true, Ordering::Relaxed);
        self.ops += ops;
        if self.ops >= CHECKPOINT_AFTER_OPS {
            self.ops = 0;
            // Full: a wake-up is already pending, which is enough.
            let _ = self.tx.try_send(());
        }
    }
}

/// Folds the WAL back into the database file: when the writer wakes it,
/// or a second after a commit it was not woken for, and once more when
/// the writer ends. `PASSIVE` never waits for readers or the writer;
/// what it cannot copy now, the next pass copies.
fn checkpointer(conn: &Connection, wake: &std_mpsc::Receiver<()>, dirty: &AtomicBool, path: &Path) {
    loop {
        let last = match wake.recv_timeout(CHECKPOINT_IDLE) {
            Ok(()) => false,
            Err(std_mpsc::RecvTimeoutError::Timeout) => {
                if !dirty.load(Ordering::Relaxed) {
                    continue;
                }
                false
            }
            Err(std_mpsc::RecvTimeoutError::Disconnected) => true,
        };
        dirty.store(false, Ordering::Relaxed);
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, db = %path.display(), "WAL checkpoint failed");
        }
        if last {
            return;
        }
    }
}

fn run(conn: &Mutex<Connection>, queue: &Queue, mut wake: Wake) {
    let mut waited = Vec::with_capacity(MAX_BATCH);
    let mut batch = Vec::with_capacity(MAX_BATCH);
    // When the deferred writes on the list must be committed.
    let mut due: Option<Instant> = None;
    loop {
        let next = match due {
            None => queue.rx.recv().map_err(|_| true),
            Some(t) => queue
                .rx
                .recv_timeout(t.saturating_duration_since(Instant::now()))
                .map_err(|e| e == std_mpsc::RecvTimeoutError::Disconnected),
        };
        // Err(true): the queue closed; Err(false): `due` passed.
        let mut closed = false;
        match next {
            Ok(job) => {
                waited.extend(job);
                while waited.len() < MAX_BATCH {
                    match queue.rx.try_recv() {
                        Ok(job) => waited.extend(job),
                        Err(std_mpsc::TryRecvError::Empty) => break,
                        Err(std_mpsc::TryRecvError::Disconnected) => {
                            closed = true;
                            break;
                        }
                    }
                }
            }
            Err(c) => closed = c,
        }
        if !closed && waited.is_empty() && due.is_none_or(|t| Instant::now() < t) {
            // Only the deferred list has work: give it until `due`.
            due.get_or_insert_with(|| Instant::now() + DEFER);
            continue;
        }
        due = None;
        if let Some(list) = queue
            .deferred
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
        {
            batch.append(list);
        }
        batch.append(&mut waited);
        if !batch.is_empty() {
            commit(conn, &mut batch, &mut wake);
        }
        if closed {
            return;
        }
    }
}

/// Applies `batch` in one transaction and answers each job.
fn commit(conn: &Mutex<Connection>, batch: &mut Vec<Job>, wake: &mut Wake) {
    let replies = {
        let mut c = conn.lock().unwrap_or_else(PoisonError::into_inner);
        apply_batch(&mut c, batch.iter().map(|j| &j.op))
    };
    wake.committed(batch.len());
    for (job, reply) in batch.drain(..).zip(replies) {
        match (job.reply, reply) {
            (Some(tx), r) => {
                let _ = tx.send(r);
            }
            (None, Err(e)) => tracing::warn!(error = %e, op = ?job.op, "audit write failed"),
            (None, Ok(_)) => {}
        }
    }
}

/// Applies `ops` in one transaction; one reply per op, in order.
pub(super) fn apply_batch<'a>(
    c: &mut Connection,
    ops: impl ExactSizeIterator<Item = &'a AuditOp>,
) -> Vec<Reply> {
    let n = ops.len();
    let tx = match c.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => return all_failed(n, &e.into()),
    };
    let mut replies = Vec::with_capacity(n);
    for op in ops {
        let r = match op {
            AuditOp::Insert(rec) => insert_on(&tx, rec),
            AuditOp::SetStatus(id, status) => set_status_on(&tx, *id, *status).map(|()| 0),
            AuditOp::Finish(id, end) => finish_on(&tx, *id, end).map(|()| 0),
        };
        replies.push(r);
        if tx.is_autocommit() {
            // SQLite rolled the whole transaction back (I/O error, full
            // disk): nothing of this batch is stored.
            return all_failed(n, &StoreError::Backend("transaction rolled back".into()));
        }
    }
    match tx.commit() {
        Ok(()) => replies,
        Err(e) => all_failed(n, &e.into()),
    }
}

fn all_failed(n: usize, e: &StoreError) -> Vec<Reply> {
    (0..n)
        .map(|_| Err(StoreError::Backend(e.to_string())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::audit::AuditKind;
    use crate::store::sqlite::SqliteStore;

    fn rec(account: &str) -> NewAudit {
        NewAudit {
            kind: Some(AuditKind::Tunnel),
            account: Some(account.to_owned()),
            started_ms: 1,
            ..NewAudit::default()
        }
    }

    #[tokio::test]
    async fn batched_writes_are_stored_and_answered_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("m.db")).unwrap();
        let w = AuditWriter::start(store.conn.clone(), &store.path).unwrap();
        let ids = futures_util::future::join_all(
            (0..100).map(|i| w.apply(AuditOp::Insert(rec(&format!("a{i}"))))),
        )
        .await;
        let ids: Vec<i64> = ids.into_iter().map(Result::unwrap).collect();
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 100, "every insert got its own id");
        w.set_status_nowait(ids[0], 200);
        let end = AuditEnd {
            ended_ms: 2,
            status: None,
            bytes: Some((3, 4)),
            reason: "closed".into(),
        };
        w.apply(AuditOp::Finish(ids[0], end.clone())).await.unwrap();
        // The status queued before the finish was applied before it.
        let stored = store
            .audit_query(&crate::store::audit::AuditFilter::default())
            .unwrap();
        let first = stored.iter().find(|r| r.id == ids[0]).unwrap();
        assert_eq!(first.status, Some(200));
        assert_eq!(first.end_ms, Some(2));
        assert_eq!(first.account.as_deref(), Some("a0"));
        // A second finish of the same record fails alone.
        let again = w.apply(AuditOp::Finish(ids[0], end)).await;
        assert!(matches!(again, Err(StoreError::NotFound(_))), "{again:?}");
        w.apply(AuditOp::SetStatus(ids[1], 200)).await.unwrap();
    }

    /// A deferred write rides in the next waited-on write's commit (and is
    /// answered first, in queue order); alone, it is still committed.
    #[tokio::test]
    async fn deferred_writes_share_the_next_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("m.db")).unwrap();
        let w = AuditWriter::start(store.conn.clone(), &store.path).unwrap();
        let id = w.apply(AuditOp::Insert(rec("a"))).await.unwrap();
        let end = AuditEnd {
            ended_ms: 2,
            status: None,
            bytes: None,
            reason: "closed".into(),
        };
        let (finish_tx, mut finish_rx) = oneshot::channel();
        w.defer(Job {
            op: AuditOp::Finish(id, end.clone()),
            reply: Some(finish_tx),
        })
        .unwrap();
        // The next insert's commit carries the finish: by the time the
        // insert is answered, the finish already is.
        let next = w.apply(AuditOp::Insert(rec("b"))).await.unwrap();
        assert_eq!(finish_rx.try_recv().unwrap().unwrap(), 0);
        // Alone, a deferred write still commits (within DEFER).
        let t0 = Instant::now();
        w.apply_deferred(AuditOp::Finish(next, end)).await.unwrap();
        assert!(t0.elapsed() < Duration::from_secs(5));
        let stored = store
            .audit_query(&crate::store::audit::AuditFilter::default())
            .unwrap();
        assert!(stored.iter().all(|r| r.end_ms == Some(2)), "{stored:?}");
        // Queued deferred writes are committed when the writer stops.
        w.set_status_nowait(next, 201);
        drop(w);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let stored = store
                .audit_query(&crate::store::audit::AuditFilter::default())
                .unwrap();
            if stored.iter().any(|r| r.status == Some(201)) {
                break;
            }
            assert!(Instant::now() < deadline, "status never stored");
            tokio::task::yield_now().await;
        }
    }

    #[test]
    fn checkpoints_run_beside_the_writer_not_in_its_commits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let store = SqliteStore::open(&path).unwrap();
        let _w = AuditWriter::start(store.conn.clone(), &path).unwrap();
        let mut c = store.conn.lock().unwrap();
        let auto: i64 = c
            .query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))
            .unwrap();
        assert_eq!(auto, 0, "commits no longer checkpoint");
        // 2,000 records, all of them in the WAL only so far.
        let before = std::fs::metadata(&path).unwrap().len();
        let ops: Vec<AuditOp> = (0..2000)
            .map(|i| AuditOp::Insert(rec(&format!("account-{i}"))))
            .collect();
        assert!(apply_batch(&mut c, ops.iter()).iter().all(Result::is_ok));
        drop(c);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), before);
        // One wake-up, then the writer's end: the checkpointer copies the
        // WAL into the database file and returns.
        let (tx, rx) = std_mpsc::sync_channel(1);
        tx.send(()).unwrap();
        drop(tx);
        let own = Connection::open(&path).unwrap();
        checkpointer(&own, &rx, &AtomicBool::new(true), &path);
        assert!(
            std::fs::metadata(&path).unwrap().len() > before + 100 * 1024,
            "the records reached the database file"
        );
    }

    #[test]
    fn a_failed_statement_fails_only_its_own_op() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("m.db")).unwrap();
        let mut c = store.conn.lock().unwrap();
        let end = AuditEnd {
            ended_ms: 2,
            status: None,
            bytes: None,
            reason: "closed".into(),
        };
        let ops = [
            AuditOp::Insert(rec("x")),
            AuditOp::Finish(999, end),
            AuditOp::Insert(NewAudit::default()),
            AuditOp::Insert(rec("y")),
        ];
        let r = apply_batch(&mut c, ops.iter());
        assert!(r[0].is_ok());
        assert!(matches!(r[1], Err(StoreError::NotFound(_))));
        assert!(matches!(r[2], Err(StoreError::Invalid(_))));
        assert!(r[3].is_ok());
        let n: i64 = c
            .query_row("SELECT count(*) FROM audit", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 2);
    }

    #[test]
    fn a_read_only_database_fails_the_whole_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("m.db")).unwrap();
        let mut c = store.conn.lock().unwrap();
        c.pragma_update(None, "query_only", true).unwrap();
        let ops = [AuditOp::Insert(rec("x")), AuditOp::Insert(rec("y"))];
        let r = apply_batch(&mut c, ops.iter());
        assert!(r.iter().all(Result::is_err), "{r:?}");
    }
}
