//! A live mux session over one WebSocket.
//!
//! ## Tasks
//! Each session runs two tasks: a *reader* that decodes messages and
//! dispatches frames to streams, and a *writer* that owns the sink.
//!
//! ## Fairness
//! Data frames reach the writer through one small bounded channel. Each
//! stream's sender has at most one frame in flight (it awaits the send
//! before reading more from its socket), and tokio's bounded channel hands
//! out capacity to waiting senders in FIFO order. Together that is
//! round-robin between streams with data, in chunks of at most
//! [`MAX_DATA_CHUNK`]. Control frames (credit, FIN, RST, OPEN) go through a
//! separate unbounded channel that the writer drains first, so credit
//! never waits behind bulk data.
//!
//! ## Flow control
//! Each direction of each stream has a window. The sender holds credit in
//! a semaphore and spends it before each DATA frame; the receiver returns
//! credit with WINDOW frames after it has written the bytes to its socket.
//! The receiver also counts what the peer may still send: DATA beyond that
//! resets the stream, so per-stream memory is bounded by the window even
//! against a hostile peer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use super::frame::{Frame, OpenErrCode, RstCode, Target, MAX_DATA_CHUNK, MAX_PAYLOAD};

/// Which end of the link this is. Only the broker opens streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Broker,
    Agent,
}

/// Tunables of one session. Both ends may use different values; each
/// announces its receive window per stream in OPEN / OPEN_OK.
#[derive(Debug, Clone)]
pub struct MuxConfig {
    /// Initial receive window per stream, in bytes: the most the peer may
    /// send before we return credit. Also the memory bound per stream
    /// whose reader is slow.
    pub window: u32,
    /// Most a stream's receive window grows to. A stream whose reader
    /// drains a whole window within [`WINDOW_GROW_WITHIN`] gets its window
    /// doubled (extra credit), so one stream can fill a long fat link: its
    /// throughput is window / round trip. Slow readers never grow, so
    /// they stay bounded by `window`; the worst case per stream is this.
    ///
    /// Off by default (equal to `window`). On loopback and LAN, 256 KiB is
    /// far above the bandwidth-delay product, and a larger window only
    /// lets a bulk stream queue more bytes ahead of interactive ones on
    /// the shared link: measured on the 2-core bench, a 4 MiB ceiling took
    /// one stream from 420 to 568 MB/s but an interactive echo's p99 beside
    /// it from 2.3 to 10 ms. Raise it for agents behind long WAN links.
    pub max_window: u32,
    /// Most concurrent streams; further OPENs are refused as busy.
    pub max_streams: usize,
    /// Ping after the link has delivered nothing for this long. A busy
    /// link never pings, and on an idle one only the end with the shorter
    /// interval does (the other keeps hearing its pings): the agent's is
    /// shorter by default, so a broker with 10,000 idle agents answers
    /// pings and runs no keepalive timers of its own.
    pub ping_interval: Duration,
    /// One-way heartbeats (unsolicited pongs, RFC 6455 §5.5.3) sent per
    /// `ping_interval` of silence before a ping. A heartbeat keeps the
    /// NAT mapping and the peer's silence timer fresh at half the cost of
    /// a ping (the peer answers nothing), and the kernel's ACK of it is
    /// what proves the path (`TCP_USER_TIMEOUT`, see [`tune_link_socket`]);
    /// the ping that follows them proves the peer's process still answers.
    /// 0: every beat is a ping.
    pub beats_per_ping: u32,
    /// A link that delivers nothing (not even a pong) for this long is
    /// dead; counted from the ping when `beats_per_ping` heartbeats came
    /// first, so the wait for the pong stays `dead_after - ping_interval`.
    /// Also the link socket's `TCP_USER_TIMEOUT`.
    pub dead_after: Duration,
    /// How long the broker waits for OPEN_OK / OPEN_ERR.
    pub open_timeout: Duration,
    /// Capacity of the shared data channel, in frames. Small keeps the
    /// interactive latency low behind bulk streams.
    pub data_queue: usize,
    /// Cap on unsent bytes in the link socket's kernel buffer
    /// (`TCP_NOTSENT_LOWAT`); 0 leaves the kernel default.
    pub notsent_lowat: u32,
}

impl Default for MuxConfig {
    fn default() -> Self {
        MuxConfig {
            window: 256 * 1024,
            max_window: 256 * 1024,
            max_streams: 1024,
            ping_interval: BROKER_PING_AFTER,
            beats_per_ping: 0,
            dead_after: Duration::from_secs(75),
            open_timeout: Duration::from_secs(15),
            data_queue: 4,
            notsent_lowat: LINK_NOTSENT_LOWAT,
        }
    }
}

/// The broker pings a link silent for this long; with default agents
/// (which ping after [`AGENT_PING_AFTER`]) it never needs to.
pub const BROKER_PING_AFTER: Duration = Duration::from_secs(45);
/// The agent pings a link silent for this long: well inside the NAT and
/// firewall idle timeouts seen in the field, and the broker's
/// `dead_after`.
pub const AGENT_PING_AFTER: Duration = Duration::from_secs(30);
/// The longest `dead_after` a configuration may set (timer arithmetic
/// stays far from overflow below it).
pub const MAX_DEAD_AFTER: Duration = Duration::from_secs(24 * 3600);
/// The agent's one-way heartbeats between pings on a silent link: it pings
/// every fourth beat (two minutes). A broker with 10,000 idle agents then
/// reads 333 heartbeats a second and answers 83 of them.
pub const AGENT_BEATS_PER_PING: u32 = 3;

impl MuxConfig {
    /// The agent's defaults: as [`MuxConfig::default`], but it beats first,
    /// mostly one way.
    #[must_use]
    pub fn agent_default() -> MuxConfig {
        MuxConfig {
            ping_interval: AGENT_PING_AFTER,
            beats_per_ping: AGENT_BEATS_PER_PING,
            ..MuxConfig::default()
        }
    }
}

/// A stream whose reader drained its whole receive window within this
/// long gets a larger window: the window then covers the bandwidth-delay
/// product of links with round trips up to about this long.
pub const WINDOW_GROW_WITHIN: Duration = Duration::from_millis(100);

/// Most bytes of frames coalesced into one WebSocket message.
const MAX_MESSAGE_BATCH: usize = 64 * 1024;
/// Credit above this on one stream is a peer bug or an attack.
const MAX_CREDIT: u64 = 64 * 1024 * 1024;

/// Most unsent bytes the kernel may hold for the agent link's socket.
///
/// Without a cap, loopback and LAN autotuning let megabytes of one bulk
/// stream sit in the socket's send buffer, and an interactive frame queues
/// behind all of them. With `TCP_NOTSENT_LOWAT` the backlog stays in our
/// fair queue instead, where streams take turns. 64 KiB (one batch) kept
/// one stream's throughput (436 vs 426 MB/s at 128 KiB on the bench) and
/// brought an interactive echo's p99 beside it from 2.19 to 1.86 ms.
pub const LINK_NOTSENT_LOWAT: u32 = 64 * 1024;

/// Apply the agent-link socket options (best effort, logged if refused):
/// - no Nagle delay;
/// - a cap of `notsent_lowat` unsent bytes in the kernel (0: none);
/// - `TCP_USER_TIMEOUT` of `dead_after`: bytes (a heartbeat, say) left
///   unacknowledged that long end the link with an error. One-way
///   heartbeats rely on it to notice a path that died silently.
pub fn tune_link_socket(tcp: &tokio::net::TcpStream, config: &MuxConfig) {
    let _ = tcp.set_nodelay(true);
    let sock = socket2::SockRef::from(tcp);
    if config.notsent_lowat != 0 {
        if let Err(e) = sock.set_tcp_notsent_lowat(config.notsent_lowat) {
            tracing::debug!(error = %e, "TCP_NOTSENT_LOWAT not applied");
        }
    }
    if let Err(e) = sock.set_tcp_user_timeout(Some(config.dead_after)) {
        tracing::debug!(error = %e, "TCP_USER_TIMEOUT not applied");
    }
}

/// The WebSocket limits we run with. tungstenite's defaults (64 MiB
/// messages, 16 MiB frames) are far too large for a multi-tenant broker.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE_BATCH + MAX_PAYLOAD + 1024))
        .max_frame_size(Some(MAX_MESSAGE_BATCH + MAX_PAYLOAD + 1024))
        .write_buffer_size(0)
        .max_write_buffer_size(4 * MAX_MESSAGE_BATCH)
        // tungstenite zero-fills this much per read; 64 KiB made every
        // idle session hold 64 KiB on each end.
        .read_buffer_size(4 * 1024)
}

/// What a stream receives from the session.
#[derive(Debug)]
pub(crate) enum Inbound {
    Data(Bytes),
    Fin,
    Rst(RstCode),
}

/// The reader's view of one stream.
struct StreamEntry {
    /// Where inbound frames go. Unbounded, but bounded in bytes by
    /// `recv_budget`.
    inbound: mpsc::UnboundedSender<Inbound>,
    /// Bytes the peer may still send before it needs more credit.
    recv_budget: u64,
    /// Our send credit; WINDOW frames add permits.
    credit: Arc<Semaphore>,
    /// Credit granted so far above the initial window (overflow check).
    credit_total: u64,
    /// Set after the peer's FIN: more DATA is a protocol error.
    fin_received: bool,
    /// Broker side: who waits for OPEN_OK / OPEN_ERR.
    pending_open: Option<oneshot::Sender<Result<u32, (OpenErrCode, String)>>>,
}

struct Shared {
    /// Broker or agent.
    role: Role,
    /// Limits and timers.
    config: MuxConfig,
    /// Live streams by id.
    streams: Mutex<HashMap<u32, StreamEntry>>,
    /// Next stream id the broker hands out.
    next_id: AtomicU32,
    /// Control frames, drained first by the writer.
    ctl_tx: mpsc::UnboundedSender<Frame>,
    /// Data frames: small and bounded, FIFO between senders.
    data_tx: mpsc::Sender<Frame>,
    /// Cancelled when the session ends for any reason.
    cancel: CancellationToken,
    /// Streams this side asked to open (broker) or was asked to open
    /// (agent) over the session's life.
    opens: AtomicU64,
    /// Bytes of DATA payload received and sent on this session.
    rx_bytes: AtomicU64,
    tx_bytes: AtomicU64,
    /// The reader asks the writer for a beat (the link went quiet) ...
    ping_wanted: tokio::sync::Notify,
    /// ... and says here whether it is a ping (true) or a one-way pong.
    beat_is_ping: std::sync::atomic::AtomicBool,
    /// Pings this end has sent.
    pings: AtomicU64,
    /// One-way heartbeats this end has sent.
    heartbeats: AtomicU64,
}

/// A handle to a session. Cheap to clone; the session lives until
/// [`Mux::close`] or the link dies.
#[derive(Clone)]
pub struct Mux {
    shared: Arc<Shared>,
}

/// A stream the agent has been asked to open.
pub struct Incoming {
    /// The stream, ready to relay once accepted.
    pub stream: MuxStream,
    /// What the broker asked for.
    pub target: Target,
}

/// One end of one tunnel.
pub struct MuxStream {
    pub(crate) id: u32,
    pub(crate) mux: Mux,
    pub(crate) inbound: mpsc::UnboundedReceiver<Inbound>,
    pub(crate) credit: Arc<Semaphore>,
    /// The peer's initial window: chunks are never larger.
    pub(crate) peer_window: u32,
}

impl std::fmt::Debug for MuxStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MuxStream").field("id", &self.id).finish()
    }
}

/// Why [`Mux::open`] failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("agent refused: {1} ({0:?})")]
    Agent(OpenErrCode, String),
    #[error("agent did not answer the open in time")]
    NoAnswer,
    #[error("too many streams on this agent link")]
    TooManyStreams,
    #[error("agent link closed")]
    Closed,
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// We closed it (shutdown or replacement).
    Closed,
    /// The peer closed the WebSocket.
    PeerClosed,
    /// Nothing arrived within `dead_after`.
    Dead,
    /// A transport error.
    Transport(String),
    /// The peer broke the framing.
    Protocol(String),
}

impl Mux {
    /// Start a session over an established WebSocket.
    ///
    /// Returns the handle, a receiver of streams the peer opens (agent side;
    /// the broker's receiver never yields), and a handle that resolves when
    /// the session ends.
    pub fn start<S>(
        ws: WebSocketStream<S>,
        role: Role,
        config: MuxConfig,
        cancel: CancellationToken,
    ) -> (
        Mux,
        mpsc::Receiver<Incoming>,
        tokio::task::JoinHandle<SessionEnd>,
    )
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let (data_tx, data_rx) = mpsc::channel(config.data_queue.max(1));
        let (incoming_tx, incoming_rx) = mpsc::channel(64);
        let shared = Arc::new(Shared {
            role,
            config,
            streams: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(1),
            ctl_tx,
            data_tx,
            cancel,
            opens: AtomicU64::new(0),
            rx_bytes: AtomicU64::new(0),
            tx_bytes: AtomicU64::new(0),
            ping_wanted: tokio::sync::Notify::new(),
            beat_is_ping: std::sync::atomic::AtomicBool::new(false),
            heartbeats: AtomicU64::new(0),
            pings: AtomicU64::new(0),
        });
        let mux = Mux { shared };
        let (sink, stream) = ws.split();
        let writer = tokio::spawn(writer_loop(mux.clone(), sink, ctl_rx, data_rx));
        let reader_mux = mux.clone();
        let handle = tokio::spawn(async move {
            let end = reader_loop(reader_mux.clone(), stream, incoming_tx).await;
            reader_mux.shared.cancel.cancel();
            reader_mux.fail_all();
            // The writer sends a Close frame and flushes; bound it.
            let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
            end
        });
        (mux, incoming_rx, handle)
    }

    /// Ask the agent to open a stream to `target`.
    ///
    /// # Errors
    /// [`OpenError`]: the agent refused (with its code), did not answer,
    /// the stream cap is reached, or the link is gone.
    pub async fn open(&self, target: Target) -> Result<MuxStream, OpenError> {
        let s = &self.shared;
        let window = s.config.window;
        let (tx, rx) = oneshot::channel();
        let (in_tx, in_rx) = mpsc::unbounded_channel();
        let credit = Arc::new(Semaphore::new(0));
        let id = {
            let mut streams = s.streams.lock().map_err(|_| OpenError::Closed)?;
            if s.cancel.is_cancelled() {
                return Err(OpenError::Closed);
            }
            if streams.len() >= s.config.max_streams {
                return Err(OpenError::TooManyStreams);
            }
            let mut id = s.next_id.fetch_add(1, Ordering::Relaxed);
            while id == 0 || streams.contains_key(&id) {
                id = s.next_id.fetch_add(1, Ordering::Relaxed);
            }
            streams.insert(
                id,
                StreamEntry {
                    inbound: in_tx,
                    recv_budget: u64::from(window),
                    credit: credit.clone(),
                    credit_total: 0,
                    fin_received: false,
                    pending_open: Some(tx),
                },
            );
            id
        };
        s.opens.fetch_add(1, Ordering::Relaxed);
        self.send_ctl(Frame::Open { id, target, window });
        let answer = tokio::select! {
            r = rx => r,
            _ = tokio::time::sleep(s.config.open_timeout) => {
                self.reset(id, RstCode::Cancel);
                return Err(OpenError::NoAnswer);
            }
        };
        match answer {
            Ok(Ok(peer_window)) => {
                credit.add_permits(peer_window as usize);
                Ok(MuxStream {
                    id,
                    mux: self.clone(),
                    inbound: in_rx,
                    credit,
                    peer_window,
                })
            }
            Ok(Err((code, msg))) => Err(OpenError::Agent(code, msg)),
            Err(_) => Err(OpenError::Closed),
        }
    }

    /// Agent side: accept an incoming stream after a successful dial.
    pub fn accept(&self, stream: &MuxStream) {
        self.send_ctl(Frame::OpenOk {
            id: stream.id,
            window: self.shared.config.window,
        });
    }

    /// Agent side: refuse an incoming stream.
    pub fn refuse(&self, stream: MuxStream, code: OpenErrCode, message: &str) {
        self.remove(stream.id);
        self.send_ctl(Frame::OpenErr {
            id: stream.id,
            code,
            message: message.to_owned(),
        });
    }

    /// End the session: every stream is reset, the WebSocket is closed.
    pub fn close(&self) {
        self.shared.cancel.cancel();
    }

    /// A token cancelled when the session ends.
    pub fn cancelled(&self) -> CancellationToken {
        self.shared.cancel.clone()
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.shared.cancel.is_cancelled()
    }

    /// Number of live streams.
    pub fn stream_count(&self) -> usize {
        self.shared.streams.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// Streams opened over the session's life (asked for, not necessarily
    /// successful).
    pub fn opens(&self) -> u64 {
        self.shared.opens.load(Ordering::Relaxed)
    }

    /// Keepalive pings this end has sent.
    pub fn pings_sent(&self) -> u64 {
        self.shared.pings.load(Ordering::Relaxed)
    }

    /// One-way heartbeats (unsolicited pongs) this end has sent.
    pub fn heartbeats_sent(&self) -> u64 {
        self.shared.heartbeats.load(Ordering::Relaxed)
    }

    /// DATA payload bytes (received, sent) over the session's life.
    pub fn byte_counts(&self) -> (u64, u64) {
        (
            self.shared.rx_bytes.load(Ordering::Relaxed),
            self.shared.tx_bytes.load(Ordering::Relaxed),
        )
    }

    /// Our initial receive window per stream.
    pub(crate) fn window(&self) -> u32 {
        self.shared.config.window
    }

    /// The most our receive window per stream grows to.
    pub(crate) fn max_window(&self) -> u32 {
        self.shared.config.max_window.max(self.shared.config.window)
    }

    /// Which end this is.
    pub fn role(&self) -> Role {
        self.shared.role
    }

    pub(crate) fn send_ctl(&self, f: Frame) {
        // If the writer is gone, the session is ending and the stream's
        // inbound will close too.
        let _ = self.shared.ctl_tx.send(f);
    }

    /// Send one DATA frame, waiting for a place in the fair queue.
    pub(crate) async fn send_data(&self, id: u32, data: Bytes) -> Result<(), ()> {
        let n = data.len() as u64;
        self.shared
            .data_tx
            .send(Frame::Data { id, data })
            .await
            .map_err(|_| ())?;
        self.shared.tx_bytes.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    /// Half-close: queued behind this stream's DATA, in order.
    pub(crate) async fn send_fin(&self, id: u32) -> Result<(), ()> {
        self.shared
            .data_tx
            .send(Frame::Fin { id })
            .await
            .map_err(|_| ())
    }

    /// Return `n` bytes of credit to the peer for stream `id`.
    pub(crate) fn grant(&self, id: u32, n: u32) {
        if n == 0 {
            return;
        }
        if let Ok(mut streams) = self.shared.streams.lock() {
            match streams.get_mut(&id) {
                Some(e) => e.recv_budget += u64::from(n),
                None => return,
            }
        }
        self.send_ctl(Frame::Window { id, increment: n });
    }

    /// Forget a stream locally (after a clean close in both directions).
    pub(crate) fn remove(&self, id: u32) {
        if let Ok(mut streams) = self.shared.streams.lock() {
            streams.remove(&id);
        }
    }

    /// Abort a stream: forget it and tell the peer.
    pub(crate) fn reset(&self, id: u32, code: RstCode) {
        self.remove(id);
        self.send_ctl(Frame::Rst { id, code });
    }

    /// Drop every stream: their relays see the inbound end and stop.
    fn fail_all(&self) {
        if let Ok(mut streams) = self.shared.streams.lock() {
            for (_, e) in streams.drain() {
                e.credit.close();
            }
        }
    }

    /// The peer broke the rules on stream `id` (but not the framing): reset
    /// that stream on both sides, and keep the session.
    fn protocol_reset(&self, mut streams: MutexGuard<'_, HashMap<u32, StreamEntry>>, id: u32) {
        if let Some(e) = streams.remove(&id) {
            e.credit.close();
            let _ = e.inbound.send(Inbound::Rst(RstCode::Protocol));
        }
        drop(streams);
        self.send_ctl(Frame::Rst {
            id,
            code: RstCode::Protocol,
        });
    }

    /// Handle one decoded frame. `Err` closes the session.
    fn dispatch(&self, frame: Frame, incoming: &mpsc::Sender<Incoming>) -> Result<(), String> {
        let s = &self.shared;
        let mut streams = s.streams.lock().map_err(|_| "poisoned".to_string())?;
        match frame {
            Frame::Hello(_) => return Err("HELLO inside a session".into()),
            Frame::Open { id, target, window } => {
                if s.role != Role::Agent {
                    return Err("OPEN sent to the broker".into());
                }
                if streams.contains_key(&id) {
                    return Err(format!("OPEN reuses live stream id {id}"));
                }
                s.opens.fetch_add(1, Ordering::Relaxed);
                if window == 0 {
                    drop(streams);
                    self.send_ctl(Frame::OpenErr {
                        id,
                        code: OpenErrCode::Other,
                        message: "zero window".into(),
                    });
                    return Ok(());
                }
                if streams.len() >= s.config.max_streams {
                    drop(streams);
                    self.send_ctl(Frame::OpenErr {
                        id,
                        code: OpenErrCode::Busy,
                        message: "too many streams".into(),
                    });
                    return Ok(());
                }
                let (in_tx, in_rx) = mpsc::unbounded_channel();
                let credit = Arc::new(Semaphore::new(window as usize));
                streams.insert(
                    id,
                    StreamEntry {
                        inbound: in_tx,
                        recv_budget: u64::from(s.config.window),
                        credit: credit.clone(),
                        credit_total: 0,
                        fin_received: false,
                        pending_open: None,
                    },
                );
                drop(streams);
                let stream = MuxStream {
                    id,
                    mux: self.clone(),
                    inbound: in_rx,
                    credit,
                    peer_window: window,
                };
                if let Err(e) = incoming.try_send(Incoming { stream, target }) {
                    // The agent's accept loop is saturated or gone.
                    let inc = match e {
                        mpsc::error::TrySendError::Full(i)
                        | mpsc::error::TrySendError::Closed(i) => i,
                    };
                    self.refuse(inc.stream, OpenErrCode::Busy, "agent busy");
                }
            }
            Frame::OpenOk { id, .. } | Frame::OpenErr { id, .. } if s.role != Role::Broker => {
                return Err(format!("open answer for stream {id} sent to the agent"));
            }
            Frame::OpenOk { id, window } => {
                let waiter = streams.get_mut(&id).and_then(|e| e.pending_open.take());
                match waiter {
                    Some(w) if window > 0 => {
                        let _ = w.send(Ok(window));
                    }
                    Some(w) => {
                        streams.remove(&id);
                        drop(streams);
                        let _ = w.send(Err((OpenErrCode::Other, "zero window".into())));
                        self.send_ctl(Frame::Rst {
                            id,
                            code: RstCode::Protocol,
                        });
                    }
                    None => {
                        // We gave up on this open (timeout) or it is a
                        // duplicate: make the agent drop its side.
                        drop(streams);
                        self.send_ctl(Frame::Rst {
                            id,
                            code: RstCode::Cancel,
                        });
                    }
                }
            }
            Frame::OpenErr { id, code, message } => {
                if let Some(mut e) = streams.remove(&id) {
                    if let Some(w) = e.pending_open.take() {
                        let _ = w.send(Err((code, message)));
                    }
                }
            }
            Frame::Data { id, data } => {
                let n = data.len() as u64;
                s.rx_bytes.fetch_add(n, Ordering::Relaxed);
                let Some(e) = streams.get_mut(&id) else {
                    // Data in flight for a stream we already closed.
                    return Ok(());
                };
                if e.pending_open.is_some() || e.fin_received || n > e.recv_budget {
                    // Data before OPEN_OK, after FIN, or beyond the window.
                    self.protocol_reset(streams, id);
                    return Ok(());
                }
                e.recv_budget -= n;
                let _ = e.inbound.send(Inbound::Data(data));
            }
            Frame::Window { id, increment } => {
                if let Some(e) = streams.get_mut(&id) {
                    e.credit_total += u64::from(increment);
                    if e.credit_total > MAX_CREDIT
                        && e.credit.available_permits() as u64 + u64::from(increment) > MAX_CREDIT
                    {
                        self.protocol_reset(streams, id);
                        return Ok(());
                    }
                    e.credit.add_permits(increment as usize);
                }
            }
            Frame::Fin { id } => {
                if let Some(e) = streams.get_mut(&id) {
                    if e.fin_received {
                        return Ok(());
                    }
                    e.fin_received = true;
                    let _ = e.inbound.send(Inbound::Fin);
                }
            }
            Frame::Rst { id, code } => {
                if let Some(mut e) = streams.remove(&id) {
                    if let Some(w) = e.pending_open.take() {
                        let _ = w.send(Err((OpenErrCode::Other, "reset".into())));
                    }
                    e.credit.close();
                    let _ = e.inbound.send(Inbound::Rst(code));
                }
            }
        }
        Ok(())
    }
}

async fn reader_loop<St>(mux: Mux, mut stream: St, incoming: mpsc::Sender<Incoming>) -> SessionEnd
where
    St: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let config = &mux.shared.config;
    let cancel = mux.shared.cancel.clone();
    // Silence is measured from the last message. Each `ping_interval` of
    // it sends a beat: `beats_per_ping` one-way heartbeats, then a ping,
    // whose answer must come within `dead_after - ping_interval`.
    let grace = config.dead_after.saturating_sub(config.ping_interval);
    let mut last = tokio::time::Instant::now();
    let mut beats: u32 = 0;
    let mut pinged_at: Option<tokio::time::Instant> = None;
    loop {
        let wake = match pinged_at {
            Some(at) => at + grace,
            None => last + config.ping_interval * (beats + 1),
        };
        let next = tokio::select! {
            _ = cancel.cancelled() => return SessionEnd::Closed,
            r = tokio::time::timeout_at(wake, stream.next()) => r,
        };
        let msg = match next {
            Err(_) if pinged_at.is_some() => return SessionEnd::Dead,
            Err(_) => {
                let ping = beats >= config.beats_per_ping;
                if ping {
                    pinged_at = Some(wake);
                } else {
                    beats += 1;
                }
                mux.shared.beat_is_ping.store(ping, Ordering::Relaxed);
                mux.shared.ping_wanted.notify_one();
                continue;
            }
            Ok(None) => return SessionEnd::PeerClosed,
            Ok(Some(Err(e))) => return SessionEnd::Transport(e.to_string()),
            Ok(Some(Ok(m))) => m,
        };
        last = tokio::time::Instant::now();
        beats = 0;
        pinged_at = None;
        match msg {
            Message::Binary(mut b) => loop {
                match Frame::decode(&mut b) {
                    Ok(Some(f)) => {
                        if let Err(e) = mux.dispatch(f, &incoming) {
                            return SessionEnd::Protocol(e);
                        }
                    }
                    Ok(None) => break,
                    Err(e) => return SessionEnd::Protocol(e.to_string()),
                }
            },
            Message::Ping(_) | Message::Pong(_) => {}
            Message::Close(_) => return SessionEnd::PeerClosed,
            Message::Text(_) | Message::Frame(_) => {
                return SessionEnd::Protocol("unexpected text message".into())
            }
        }
    }
}

async fn writer_loop<Si>(
    mux: Mux,
    mut sink: Si,
    mut ctl_rx: mpsc::UnboundedReceiver<Frame>,
    mut data_rx: mpsc::Receiver<Frame>,
) where
    Si: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    let cancel = mux.shared.cancel.clone();
    // Grown on demand: an idle session (most of a broker's) keeps a few
    // bytes here, a busy one reuses its batch buffer (`split` hands the
    // bytes to the sink, and they come back once it has written them).
    let mut buf = BytesMut::new();
    loop {
        let first = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            f = ctl_rx.recv() => f,
            f = data_rx.recv() => f,
            () = mux.shared.ping_wanted.notified() => {
                let beat = if mux.shared.beat_is_ping.load(Ordering::Relaxed) {
                    mux.shared.pings.fetch_add(1, Ordering::Relaxed);
                    Message::Ping(Bytes::new())
                } else {
                    mux.shared.heartbeats.fetch_add(1, Ordering::Relaxed);
                    Message::Pong(Bytes::new())
                };
                if sink.send(beat).await.is_err() {
                    break;
                }
                continue;
            }
        };
        let Some(first) = first else { break };
        if matches!(first, Frame::Data { .. }) {
            buf.reserve(MAX_MESSAGE_BATCH + MAX_PAYLOAD);
        }
        first.encode(&mut buf);
        // Coalesce what is already queued: control first, then data.
        while buf.len() < MAX_MESSAGE_BATCH {
            if let Ok(f) = ctl_rx.try_recv() {
                f.encode(&mut buf);
            } else if let Ok(f) = data_rx.try_recv() {
                f.encode(&mut buf);
            } else {
                break;
            }
        }
        if sink
            .send(Message::Binary(buf.split().freeze()))
            .await
            .is_err()
        {
            break;
        }
    }
    cancel.cancel();
    let _ = sink.send(Message::Close(None)).await;
    let _ = sink.close().await;
}

impl MuxStream {
    /// The stream id (for logs).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Largest chunk this side sends: never more than the peer's window.
    pub(crate) fn chunk(&self) -> usize {
        MAX_DATA_CHUNK.min(self.peer_window.max(1) as usize)
    }
}
