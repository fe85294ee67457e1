//! Log output off the runtime's worker threads.
//!
//! tracing's formatter writes each event from the thread that logged it,
//! which in the broker and the agent is a tokio worker. Written straight to
//! stderr, every line costs that worker a `write` call, and a slow reader
//! of stderr (a full pipe, a stalled journald) stalls every task on the
//! worker. [`LogWriter`] appends the formatted line to a shared buffer
//! instead; one thread of its own writes the buffer out in batches, at
//! most [`Limits::batch`] after the first line of a batch (at once when the
//! batch reaches [`Limits::flush_at`]).
//!
//! When the output cannot keep up and [`Limits::max_pending`] bytes are
//! waiting, further lines are dropped and counted, and a line saying how
//! many follows once the output takes bytes again: logging never blocks a
//! worker and never grows without bound. Dropping the [`LogGuard`] writes
//! out what is pending and stops the thread; lines logged after that go to
//! the output directly.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

/// Batching and bounds of a [`LogWriter`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest a line waits for the rest of its batch.
    pub batch: Duration,
    /// A batch this large is written at once.
    pub flush_at: usize,
    /// Bytes waiting at most; lines beyond it are dropped and counted.
    pub max_pending: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            batch: Duration::from_millis(20),
            flush_at: 64 * 1024,
            max_pending: 1024 * 1024,
        }
    }
}

/// Capacity a buffer keeps between batches; a larger one (after a burst)
/// is given back.
const KEEP: usize = 64 * 1024;

struct State {
    buf: Vec<u8>,
    dropped: u64,
    /// The writer thread waits on the condition variable.
    sleeping: bool,
    /// The guard was dropped: the thread is finishing or gone.
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    limits: Limits,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The handle the formatter writes lines to (cheap to clone).
#[derive(Clone)]
pub struct LogWriter {
    shared: Arc<Shared>,
}

/// Keeps the writer thread; dropping it flushes and stops the thread.
pub struct LogGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Start the writer thread over `out` (stderr in the binary).
///
/// # Errors
/// The thread could not be spawned.
pub fn start<W: Write + Send + 'static>(
    out: W,
    limits: Limits,
) -> io::Result<(LogWriter, LogGuard)> {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            buf: Vec::new(),
            dropped: 0,
            sleeping: false,
            closed: false,
        }),
        wake: Condvar::new(),
        limits,
    });
    let thread = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("maintgate-log".into())
            .spawn(move || run(&shared, out))?
    };
    Ok((
        LogWriter {
            shared: shared.clone(),
        },
        LogGuard {
            shared,
            thread: Some(thread),
        },
    ))
}

fn run<W: Write>(shared: &Shared, mut out: W) {
    let mut spare = Vec::new();
    loop {
        let mut st = shared.lock();
        while st.buf.is_empty() && st.dropped == 0 && !st.closed {
            st.sleeping = true;
            st = shared.wake.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
        if !st.closed && st.buf.len() < shared.limits.flush_at {
            // Let the rest of the batch gather; a full batch or the guard
            // wakes us early.
            st.sleeping = true;
            st = shared
                .wake
                .wait_timeout(st, shared.limits.batch)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        st.sleeping = false;
        std::mem::swap(&mut st.buf, &mut spare);
        let dropped = std::mem::take(&mut st.dropped);
        let closed = st.closed;
        drop(st);
        // Errors writing the log have nowhere to be reported.
        let _ = out.write_all(&spare);
        if dropped > 0 {
            let _ = writeln!(
                out,
                "maintgate: {dropped} log lines dropped: the log output was too slow"
            );
        }
        let _ = out.flush();
        spare.clear();
        spare.shrink_to(KEEP);
        if closed {
            return;
        }
    }
}

impl Write for LogWriter {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let shared = &*self.shared;
        let mut st = shared.lock();
        if st.closed {
            drop(st);
            return io::stderr().write(line);
        }
        if st.buf.len() + line.len() > shared.limits.max_pending {
            st.dropped += 1;
            return Ok(line.len());
        }
        let was_empty = st.buf.is_empty();
        st.buf.extend_from_slice(line);
        let full = st.buf.len() >= shared.limits.flush_at;
        if st.sleeping && (was_empty || full) {
            st.sleeping = false;
            drop(st);
            shared.wake.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// An output that records what it got.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_comes_out_whole_and_in_order_by_the_time_the_guard_is_dropped() {
        let sink = Sink::default();
        let (w, guard) = start(sink.clone(), Limits::default()).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let mut w = w.clone();
                std::thread::spawn(move || {
                    for i in 0..2_000 {
                        w.write_all(format!("t{t} line {i}\n").as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(guard);
        let out = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        for t in 0..4 {
            let mine: Vec<usize> = out
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("t{t} line ")))
                .map(|n| n.parse().unwrap())
                .collect();
            assert_eq!(mine, (0..2_000).collect::<Vec<_>>(), "thread {t}");
        }
        assert_eq!(out.lines().count(), 8_000);
    }

    /// An output that takes nothing until it is released.
    struct Stalled {
        release: mpsc::Receiver<()>,
        got: Sink,
    }

    impl Write for Stalled {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let _ = self.release.recv();
            self.got.write(b)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_output_costs_dropped_lines_not_a_blocked_caller() {
        let got = Sink::default();
        let (release, rx) = mpsc::channel();
        let limits = Limits {
            batch: Duration::from_millis(1),
            flush_at: 1024,
            max_pending: 4096,
        };
        let (mut w, guard) = start(
            Stalled {
                release: rx,
                got: got.clone(),
            },
            limits,
        )
        .unwrap();
        // The first batch goes to the output and stalls there; everything
        // after it piles up to `max_pending` and the rest is dropped, while
        // every write returns at once.
        w.write_all(b"first\n").unwrap();
        let mut line = [b'x'; 100];
        line[99] = b'\n';
        for _ in 0..1_000 {
            w.write_all(&line).unwrap();
        }
        // Release the output for good: the sender goes away, so every
        // further `recv` returns at once.
        drop(release);
        drop(guard);
        let out = String::from_utf8(got.0.lock().unwrap().clone()).unwrap();
        assert!(out.starts_with("first\n"));
        let kept = out.lines().filter(|l| l.len() == 99).count();
        assert!(kept > 0 && kept < 1_000, "kept {kept}");
        assert!(out.len() <= 6 + 2 * 4096 + 200, "bounded: {}", out.len());
        assert!(
            out.contains("log lines dropped: the log output was too slow"),
            "{out}"
        );
    }

    #[test]
    fn lines_after_the_guard_is_dropped_are_not_lost() {
        let sink = Sink::default();
        let (mut w, guard) = start(sink.clone(), Limits::default()).unwrap();
        w.write_all(b"before\n").unwrap();
        drop(guard);
        assert_eq!(&*sink.0.lock().unwrap(), b"before\n");
        // Goes to stderr directly; it must not panic or block.
        w.write_all(b"maintgate logwriter test: after the guard\n")
            .unwrap();
    }
}
