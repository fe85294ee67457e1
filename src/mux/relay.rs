//! Pumping bytes between a local socket and one mux stream.
//!
//! Two halves run together: *up* reads the local socket, spends credit and
//! sends DATA (FIN at EOF); *down* writes inbound DATA to the socket and
//! returns credit after each write (shutting the socket's write side at the
//! peer's FIN). The stream ends cleanly once both halves have finished;
//! any error, a reset from the peer, or cancellation resets it instead.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::frame::RstCode;
use super::session::{Inbound, MuxStream};

/// Live byte counters of one tunnel, readable while it runs.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Bytes read from the local socket and sent into the tunnel.
    pub sent: AtomicU64,
    /// Bytes received from the tunnel and written to the local socket.
    pub received: AtomicU64,
}

impl RelayStats {
    /// `(sent, received)` right now.
    pub fn get(&self) -> (u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
        )
    }
}

/// How a relay ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both sides sent FIN: a clean close.
    Closed,
    /// The local socket failed.
    LocalError(String),
    /// The peer reset the stream.
    PeerReset(RstCode),
    /// The mux session went away.
    SessionLost,
    /// Cancelled (operator kill, policy change, shutdown).
    Killed,
}

impl RelayEnd {
    /// A short label for logs and audit.
    pub fn label(&self) -> &'static str {
        match self {
            RelayEnd::Closed => "closed",
            RelayEnd::LocalError(_) => "local-error",
            RelayEnd::PeerReset(RstCode::Killed) => "peer-killed",
            RelayEnd::PeerReset(_) => "peer-reset",
            RelayEnd::SessionLost => "agent-link-lost",
            RelayEnd::Killed => "killed",
        }
    }
}

/// Why a tunnel was ended by its own limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// No byte moved either way for the idle timeout.
    Idle,
    /// The tunnel reached its maximum lifetime.
    Lifetime,
}

impl Expiry {
    /// A short label for logs and audit.
    pub fn label(self) -> &'static str {
        match self {
            Expiry::Idle => "idle-timeout",
            Expiry::Lifetime => "max-lifetime",
        }
    }
}

/// Resolve when the tunnel behind `stats` has been idle for `idle`, or has
/// lived for `lifetime`, whichever comes first. Checks a few times per
/// idle period, so idleness is noticed within `idle * 5 / 4`.
pub async fn expiry(stats: &RelayStats, idle: Duration, lifetime: Duration) -> Expiry {
    let end_of_life = tokio::time::Instant::now() + lifetime;
    let step = (idle / 4).max(Duration::from_millis(10));
    let mut last = stats.get();
    let mut quiet_since = tokio::time::Instant::now();
    loop {
        let next = (tokio::time::Instant::now() + step).min(end_of_life);
        tokio::time::sleep_until(next).await;
        let now = tokio::time::Instant::now();
        if now >= end_of_life {
            return Expiry::Lifetime;
        }
        let cur = stats.get();
        if cur != last {
            last = cur;
            quiet_since = now;
        } else if now.duration_since(quiet_since) >= idle {
            return Expiry::Idle;
        }
    }
}

/// Relay between `io` and `stream` until both directions are done.
///
/// `initial` holds bytes already read from `io` (sent first). `stats` is
/// updated as bytes move. Returns how the relay ended.
pub async fn relay<IO>(
    stream: MuxStream,
    io: IO,
    initial: Bytes,
    cancel: CancellationToken,
    stats: Arc<RelayStats>,
) -> RelayEnd
where
    IO: AsyncRead + AsyncWrite + Send,
{
    let chunk = stream.chunk();
    let MuxStream {
        id,
        mux,
        mut inbound,
        credit,
        ..
    } = stream;
    let (mut rd, mut wr) = tokio::io::split(io);
    let session_gone = mux.cancelled();

    let up = {
        let mux = mux.clone();
        let stats = stats.clone();
        async move {
            let mut pending = initial;
            // Start small, so an idle tunnel holds about 1 KiB; grow while
            // reads fill the buffer, shrink when they stop doing so.
            let floor = 1024.min(chunk);
            let mut want = floor;
            let mut buf = BytesMut::new();
            loop {
                if pending.is_empty() {
                    buf.reserve(want);
                    let n = match rd.read_buf(&mut (&mut buf).limit(want)).await {
                        Ok(n) => n,
                        // A TLS client that closes without close_notify
                        // (most do, at the end of a tunnel): an ordinary
                        // EOF. The tunnel's own protocol (SSH, TLS, RDP)
                        // guards the end of its data, not this leg.
                        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
                        Err(e) => return Err(RelayEnd::LocalError(e.to_string())),
                    };
                    if n == want {
                        want = (want * 4).min(chunk);
                    } else if n < want / 8 {
                        want = (want / 2).max(floor);
                    }
                    if n == 0 {
                        // FIN takes the data path so it cannot overtake
                        // this stream's queued DATA.
                        mux.send_fin(id).await.map_err(|_| RelayEnd::SessionLost)?;
                        return Ok(());
                    }
                    pending = buf.split().freeze();
                }
                let data = pending.split_to(pending.len().min(chunk));
                let n = data.len();
                credit
                    .acquire_many(n as u32)
                    .await
                    .map_err(|_| RelayEnd::SessionLost)?
                    .forget();
                mux.send_data(id, data)
                    .await
                    .map_err(|_| RelayEnd::SessionLost)?;
                stats.sent.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    };

    let down = {
        let mux = mux.clone();
        let stats = stats.clone();
        async move {
            let mut tuner = WindowTuner::new(mux.window(), mux.max_window());
            let mut unacked: u32 = 0;
            // What arrived behind a batch of DATA and waits its turn.
            let mut held: Option<Inbound> = None;
            let mut batch: Vec<Bytes> = Vec::new();
            loop {
                let next = match held.take() {
                    Some(item) => Some(item),
                    None => inbound.recv().await,
                };
                match next {
                    Some(Inbound::Data(b)) => {
                        // Whatever DATA is already queued goes out in one
                        // vectored write: one syscall (and, over TLS, one
                        // writev of its records) instead of one per chunk.
                        let mut n = b.len();
                        batch.push(b);
                        while batch.len() < MAX_WRITE_CHUNKS && n < MAX_WRITE_BYTES {
                            match inbound.try_recv() {
                                Ok(Inbound::Data(b)) => {
                                    n += b.len();
                                    batch.push(b);
                                }
                                Ok(other) => {
                                    held = Some(other);
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                        write_all_vectored(&mut wr, &batch)
                            .await
                            .map_err(|e| RelayEnd::LocalError(e.to_string()))?;
                        // An idle tunnel keeps no batch buffer.
                        batch = Vec::new();
                        if held.is_none() && inbound.is_empty() {
                            wr.flush()
                                .await
                                .map_err(|e| RelayEnd::LocalError(e.to_string()))?;
                        }
                        let n = n as u32;
                        stats.received.fetch_add(u64::from(n), Ordering::Relaxed);
                        unacked += n;
                        if unacked >= tuner.threshold() {
                            let extra = tuner.consumed(unacked, std::time::Instant::now());
                            mux.grant(id, unacked + extra);
                            unacked = 0;
                        }
                    }
                    Some(Inbound::Fin) => {
                        // The peer is done sending; pass the half-close on.
                        let _ = wr.shutdown().await;
                        return Ok(());
                    }
                    Some(Inbound::Rst(code)) => return Err(RelayEnd::PeerReset(code)),
                    None => return Err(RelayEnd::SessionLost),
                }
            }
        }
    };

    tokio::pin!(up);
    tokio::pin!(down);
    let (mut up_done, mut down_done) = (false, false);
    let end = loop {
        tokio::select! {
            r = &mut up, if !up_done => match r {
                Ok(()) => { up_done = true; if down_done { break RelayEnd::Closed } }
                Err(e) => break e,
            },
            r = &mut down, if !down_done => match r {
                Ok(()) => { down_done = true; if up_done { break RelayEnd::Closed } }
                Err(e) => break e,
            },
            _ = cancel.cancelled() => break RelayEnd::Killed,
            _ = session_gone.cancelled() => break RelayEnd::SessionLost,
        }
    };
    match &end {
        RelayEnd::Closed | RelayEnd::PeerReset(_) | RelayEnd::SessionLost => mux.remove(id),
        RelayEnd::Killed => mux.reset(id, RstCode::Killed),
        RelayEnd::LocalError(_) => mux.reset(id, RstCode::Cancel),
    }
    end
}

/// Most DATA chunks, and about the most bytes, written to the local socket
/// in one vectored write.
const MAX_WRITE_CHUNKS: usize = 8;
const MAX_WRITE_BYTES: usize = 64 * 1024;

/// Write every byte of `bufs`, in order, with vectored writes.
async fn write_all_vectored<W>(wr: &mut W, bufs: &[Bytes]) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    if let [one] = bufs {
        return wr.write_all(one).await;
    }
    let (mut first, mut offset) = (0, 0);
    loop {
        while first < bufs.len() && offset == bufs[first].len() {
            first += 1;
            offset = 0;
        }
        if first == bufs.len() {
            return Ok(());
        }
        // On the stack: at most MAX_WRITE_CHUNKS slices per call (the loop
        // takes any further ones next time round).
        let mut slices = [std::io::IoSlice::new(&[]); MAX_WRITE_CHUNKS];
        let parts =
            std::iter::once(&bufs[first][offset..]).chain(bufs[first + 1..].iter().map(|b| &b[..]));
        let mut k = 0;
        for (slot, part) in slices.iter_mut().zip(parts) {
            *slot = std::io::IoSlice::new(part);
            k += 1;
        }
        let mut n = wr.write_vectored(&slices[..k]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let left = bufs[first].len() - offset;
            if n >= left {
                n -= left;
                first += 1;
                offset = 0;
            } else {
                offset += n;
                n = 0;
            }
        }
    }
}

/// Receive-window auto-tuning for one stream (the receiving side).
///
/// Credit goes back in quarters of the window as the local writer drains
/// bytes. When a whole window drains within [`WINDOW_GROW_WITHIN`], the
/// window doubles (up to `max`): the next grant carries the extra credit.
/// A reader that keeps up thus gets a window near the link's
/// bandwidth-delay product, and one that does not stays at the initial
/// window, which bounds what the session buffers for it.
#[derive(Debug, Clone)]
pub(crate) struct WindowTuner {
    window: u32,
    max: u32,
    epoch_start: Option<std::time::Instant>,
    epoch_bytes: u64,
}

impl WindowTuner {
    pub(crate) fn new(window: u32, max: u32) -> WindowTuner {
        WindowTuner {
            window,
            max: max.max(window),
            epoch_start: None,
            epoch_bytes: 0,
        }
    }

    /// Return credit once this many bytes are drained.
    pub(crate) fn threshold(&self) -> u32 {
        (self.window / 4).max(1)
    }

    /// The current window.
    #[cfg(test)]
    pub(crate) fn window(&self) -> u32 {
        self.window
    }

    /// `n` bytes were drained at `now`; returns extra credit to grant with
    /// them (the growth of the window), usually 0.
    pub(crate) fn consumed(&mut self, n: u32, now: std::time::Instant) -> u32 {
        let start = *self.epoch_start.get_or_insert(now);
        self.epoch_bytes += u64::from(n);
        if self.epoch_bytes < u64::from(self.window) {
            return 0;
        }
        let fast = now.duration_since(start) < super::session::WINDOW_GROW_WITHIN;
        self.epoch_start = Some(now);
        self.epoch_bytes = 0;
        if !fast || self.window >= self.max {
            return 0;
        }
        let grown = self.window.saturating_mul(2).min(self.max);
        let extra = grown - self.window;
        self.window = grown;
        extra
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Partial vectored writes (a 7-byte pipe) still deliver every byte in
    /// order, empty chunks included, and an all-empty batch writes nothing.
    #[tokio::test]
    async fn vectored_writes_survive_partial_writes() {
        let chunks: Vec<Bytes> = [&b""[..], b"hello ", b"", b"vectored", b" world", b""]
            .iter()
            .map(|c| Bytes::copy_from_slice(c))
            .collect();
        let (mut wr, mut rd) = tokio::io::duplex(7);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            rd.read_to_end(&mut got).await.unwrap();
            got
        });
        write_all_vectored(&mut wr, &chunks).await.unwrap();
        write_all_vectored(&mut wr, &[Bytes::new(), Bytes::new()])
            .await
            .unwrap();
        // More chunks than one call takes.
        let many: Vec<Bytes> = (0..20).map(|i| Bytes::from(format!("<{i}>"))).collect();
        write_all_vectored(&mut wr, &many).await.unwrap();
        drop(wr);
        let want: String = std::iter::once("hello vectored world".to_string())
            .chain((0..20).map(|i| format!("<{i}>")))
            .collect();
        assert_eq!(reader.await.unwrap(), want.as_bytes());
    }

    #[test]
    fn window_grows_for_a_fast_reader_only() {
        let t0 = std::time::Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut fast = WindowTuner::new(256 * 1024, 1024 * 1024);
        let q = fast.threshold();
        assert_eq!(q, 64 * 1024);
        // Three quarters: no decision yet.
        for i in 0..3 {
            assert_eq!(fast.consumed(q, ms(i)), 0);
        }
        // The fourth completes a window in 3 ms: double it.
        assert_eq!(fast.consumed(q, ms(3)), 256 * 1024);
        assert_eq!(fast.window(), 512 * 1024);
        let mut granted = 0;
        for i in 0..64 {
            granted += fast.consumed(fast.threshold(), ms(4 + i));
        }
        assert_eq!(fast.window(), 1024 * 1024, "capped at max");
        assert_eq!(granted, 512 * 1024, "extra credit is exactly the growth");

        let mut slow = WindowTuner::new(256 * 1024, 1024 * 1024);
        for i in 0..64 {
            assert_eq!(slow.consumed(slow.threshold(), ms(40 * i)), 0);
        }
        assert_eq!(slow.window(), 256 * 1024, "a window per 160 ms never grows");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_and_lifetime() {
        let stats = RelayStats::default();
        let t0 = tokio::time::Instant::now();
        assert_eq!(
            expiry(&stats, Duration::from_secs(60), Duration::from_secs(3600)).await,
            Expiry::Idle
        );
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_secs(60) && waited <= Duration::from_secs(76),
            "{waited:?}"
        );

        // Traffic keeps it alive until the lifetime ends.
        let stats = Arc::new(RelayStats::default());
        let busy = {
            let stats = stats.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    stats.sent.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        let t0 = tokio::time::Instant::now();
        assert_eq!(
            expiry(&stats, Duration::from_secs(60), Duration::from_secs(600)).await,
            Expiry::Lifetime
        );
        assert_eq!(t0.elapsed(), Duration::from_secs(600));
        busy.abort();
    }
}
