//! WebSocket framing (RFC 6455) for the agent link.
//!
//! Our own, because the link's data path is the product's hot path: a
//! general-purpose library zero-fills its read buffer before each read,
//! reads in its own buffer-sized steps, and copies every outgoing message
//! into a write buffer to mask it there. Here
//!
//! - the reader reads into spare capacity (no zero-fill), as much as the
//!   TLS layer has, unmasks in place, and hands out each message as a
//!   zero-copy [`Bytes`] slice of its buffer;
//! - the writer takes a buffer whose first [`HEADROOM`] bytes are free,
//!   writes the header there, masks in place (client end) and hands the
//!   buffer to the TLS layer in one write.
//!
//! The header codec ([`decode_header`], [`encode_header`], [`apply_mask`])
//! is pure and fuzzed. The reader enforces the RFC's rules for the end it
//! is: a server refuses unmasked frames and a client masked ones; reserved
//! bits and opcodes, fragmented or long control frames, stray
//! continuations, text messages and anything over the size limit are
//! protocol errors. The HTTP upgrade is done by the broker's front
//! (server end) and by [`client_handshake`] (client end).

use std::io;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};

/// Longest frame header: 2 bytes, an 8-byte length and a 4-byte mask.
pub const MAX_HEADER: usize = 14;
/// Room a writer's buffer keeps in front of the payload for the header.
pub const HEADROOM: usize = MAX_HEADER;
/// Longest control frame payload (RFC 6455 §5.5).
pub const MAX_CONTROL: usize = 125;
/// Smallest read: what the reader reserves when it does not yet know the
/// size of the next frame. Also what an idle link holds.
const READ_MIN: usize = 4 * 1024;
/// Longest HTTP upgrade response the client reads.
const MAX_RESPONSE_HEAD: usize = 8 * 1024;

/// Which end of the WebSocket this is. Clients mask what they send;
/// servers must not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Client,
    Server,
}

/// Frame opcodes we know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl Opcode {
    fn from_u8(b: u8) -> Option<Opcode> {
        Some(match b {
            0x0 => Opcode::Continuation,
            0x1 => Opcode::Text,
            0x2 => Opcode::Binary,
            0x8 => Opcode::Close,
            0x9 => Opcode::Ping,
            0xA => Opcode::Pong,
            _ => return None,
        })
    }

    fn to_u8(self) -> u8 {
        match self {
            Opcode::Continuation => 0x0,
            Opcode::Text => 0x1,
            Opcode::Binary => 0x2,
            Opcode::Close => 0x8,
            Opcode::Ping => 0x9,
            Opcode::Pong => 0xA,
        }
    }

    fn is_control(self) -> bool {
        matches!(self, Opcode::Close | Opcode::Ping | Opcode::Pong)
    }
}

/// One decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    pub opcode: Opcode,
    pub mask: Option<[u8; 4]>,
    pub len: u64,
}

/// A broken frame or message; the link closes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    #[error("reserved bits set in a frame header")]
    Reserved,
    #[error("unknown opcode {0:#x}")]
    Opcode(u8),
    #[error("unmasked frame from the client")]
    Unmasked,
    #[error("masked frame from the server")]
    Masked,
    #[error("control frame fragmented or longer than 125 bytes")]
    BadControl,
    #[error("message of {0} bytes over the limit")]
    TooLarge(u64),
    #[error("continuation frame outside a message")]
    StrayContinuation,
    #[error("new message before the fragmented one ended")]
    Interleaved,
    #[error("text message on a binary link")]
    Text,
    #[error("link closed in the middle of a frame")]
    Truncated,
}

/// Decode the header at the start of `buf`, as received by `end`.
///
/// `Ok(None)`: not all of the header is here yet. Frames longer than `max`
/// are refused before their payload is read.
///
/// # Errors
/// [`WsError`] for a header that breaks RFC 6455 for this end.
pub fn decode_header(buf: &[u8], end: End, max: usize) -> Result<Option<(Header, usize)>, WsError> {
    let [b0, b1, ..] = *buf else { return Ok(None) };
    if b0 & 0x70 != 0 {
        return Err(WsError::Reserved);
    }
    let fin = b0 & 0x80 != 0;
    let opcode = Opcode::from_u8(b0 & 0x0F).ok_or(WsError::Opcode(b0 & 0x0F))?;
    let masked = b1 & 0x80 != 0;
    match (end, masked) {
        (End::Server, false) => return Err(WsError::Unmasked),
        (End::Client, true) => return Err(WsError::Masked),
        _ => {}
    }
    let (len, mut at) = match b1 & 0x7F {
        126 => {
            let Some(b) = buf.get(2..4) else {
                return Ok(None);
            };
            (u64::from(u16::from_be_bytes([b[0], b[1]])), 4)
        }
        127 => {
            let Some(b) = buf.get(2..10) else {
                return Ok(None);
            };
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            (u64::from_be_bytes(a), 10)
        }
        n => (u64::from(n), 2),
    };
    if opcode.is_control() && (!fin || len > MAX_CONTROL as u64) {
        return Err(WsError::BadControl);
    }
    if len > max as u64 {
        return Err(WsError::TooLarge(len));
    }
    let mask = if masked {
        let Some(k) = buf.get(at..at + 4) else {
            return Ok(None);
        };
        at += 4;
        Some([k[0], k[1], k[2], k[3]])
    } else {
        None
    };
    Ok(Some((
        Header {
            fin,
            opcode,
            mask,
            len,
        },
        at,
    )))
}

/// Encode a header into `out`; returns its length. Lengths use the
/// shortest form, as the RFC requires.
pub fn encode_header(out: &mut [u8; MAX_HEADER], h: &Header) -> usize {
    out[0] = (if h.fin { 0x80 } else { 0 }) | h.opcode.to_u8();
    let mask_bit = if h.mask.is_some() { 0x80 } else { 0 };
    let mut at = if h.len < 126 {
        out[1] = mask_bit | h.len as u8;
        2
    } else if let Ok(n) = u16::try_from(h.len) {
        out[1] = mask_bit | 126;
        out[2..4].copy_from_slice(&n.to_be_bytes());
        4
    } else {
        out[1] = mask_bit | 127;
        out[2..10].copy_from_slice(&h.len.to_be_bytes());
        10
    };
    if let Some(k) = h.mask {
        out[at..at + 4].copy_from_slice(&k);
        at += 4;
    }
    at
}

/// XOR `data` with the masking key, starting at key offset 0. Applying it
/// twice gives the data back.
pub fn apply_mask(data: &mut [u8], key: [u8; 4]) {
    let word = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut a = [0u8; 8];
        a.copy_from_slice(c);
        c.copy_from_slice(&(u64::from_ne_bytes(a) ^ word).to_ne_bytes());
    }
    // The remainder starts at a multiple of 8, so at key offset 0.
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
}

/// A complete message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Binary(Bytes),
    Ping(Bytes),
    Pong(Bytes),
    /// The peer started the closing handshake.
    Close,
}

/// Why reading or writing the link failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("WebSocket protocol: {0}")]
    Protocol(#[from] WsError),
}

/// The receiving half of a link.
pub struct WsReader<R> {
    io: R,
    buf: BytesMut,
    end: End,
    max: usize,
    /// A fragmented binary message being assembled.
    partial: Option<BytesMut>,
}

impl<R: AsyncRead + Unpin> WsReader<R> {
    /// A reader for `end`, starting with bytes already read past the
    /// upgrade (`leftover`), refusing messages over `max` bytes.
    pub fn new(io: R, leftover: &[u8], end: End, max: usize) -> WsReader<R> {
        WsReader {
            io,
            buf: BytesMut::from(leftover),
            end,
            max,
            partial: None,
        }
    }

    /// The next message; `Ok(None)` when the peer closed the connection
    /// cleanly between frames (without a Close frame).
    ///
    /// # Errors
    /// [`LinkError`]: the transport failed or the peer broke the framing.
    pub async fn next(&mut self) -> Result<Option<Message>, LinkError> {
        loop {
            let need = match decode_header(&self.buf, self.end, self.max)? {
                Some((h, hl)) => {
                    // Bounded by `max` in decode_header.
                    let total = hl + h.len as usize;
                    if self.buf.len() >= total {
                        let mut payload = self.buf.split_to(total);
                        payload.advance(hl);
                        if let Some(k) = h.mask {
                            apply_mask(&mut payload, k);
                        }
                        if let Some(m) = self.message(&h, payload)? {
                            return Ok(Some(m));
                        }
                        continue;
                    }
                    total - self.buf.len()
                }
                None => READ_MIN,
            };
            self.buf.reserve(need.max(READ_MIN));
            if self.io.read_buf(&mut self.buf).await? == 0 {
                if self.buf.is_empty() && self.partial.is_none() {
                    return Ok(None);
                }
                return Err(WsError::Truncated.into());
            }
        }
    }

    /// Turn one frame into a message, or keep it as part of one.
    fn message(&mut self, h: &Header, payload: BytesMut) -> Result<Option<Message>, WsError> {
        Ok(match h.opcode {
            Opcode::Ping => Some(Message::Ping(payload.freeze())),
            Opcode::Pong => Some(Message::Pong(payload.freeze())),
            Opcode::Close => Some(Message::Close),
            Opcode::Text => return Err(WsError::Text),
            Opcode::Binary if self.partial.is_some() => return Err(WsError::Interleaved),
            Opcode::Binary if h.fin => Some(Message::Binary(payload.freeze())),
            Opcode::Binary => {
                self.partial = Some(payload);
                None
            }
            Opcode::Continuation => {
                let Some(p) = self.partial.as_mut() else {
                    return Err(WsError::StrayContinuation);
                };
                let len = p.len() + payload.len();
                if len > self.max {
                    return Err(WsError::TooLarge(len as u64));
                }
                p.extend_from_slice(&payload);
                if h.fin {
                    self.partial.take().map(|p| Message::Binary(p.freeze()))
                } else {
                    None
                }
            }
        })
    }
}

/// The sending half of a link.
pub struct WsWriter<W> {
    io: W,
    end: End,
}

impl<W: AsyncWrite + Unpin> WsWriter<W> {
    /// A writer for `end`.
    pub fn new(io: W, end: End) -> WsWriter<W> {
        WsWriter { io, end }
    }

    /// Send `buf[HEADROOM..]` as one message, writing the header into the
    /// headroom and masking in place (so `buf` is clobbered), then flush.
    ///
    /// # Errors
    /// The transport failed.
    ///
    /// # Panics
    /// If `buf` is shorter than [`HEADROOM`].
    pub async fn send_framed(&mut self, opcode: Opcode, buf: &mut [u8]) -> io::Result<()> {
        let payload = &mut buf[HEADROOM..];
        let mask = match self.end {
            End::Client => Some(rand::random::<[u8; 4]>()),
            End::Server => None,
        };
        let h = Header {
            fin: true,
            opcode,
            mask,
            len: payload.len() as u64,
        };
        if let Some(k) = mask {
            apply_mask(payload, k);
        }
        let mut head = [0u8; MAX_HEADER];
        let hl = encode_header(&mut head, &h);
        let start = HEADROOM - hl;
        buf[start..HEADROOM].copy_from_slice(&head[..hl]);
        self.io.write_all(&buf[start..]).await?;
        self.io.flush().await
    }

    /// Send a small message (control frames, HELLO): copies `payload`.
    ///
    /// # Errors
    /// The transport failed.
    pub async fn send(&mut self, opcode: Opcode, payload: &[u8]) -> io::Result<()> {
        let mut buf = vec![0u8; HEADROOM + payload.len()];
        buf[HEADROOM..].copy_from_slice(payload);
        self.send_framed(opcode, &mut buf).await
    }

    /// Send a Close frame and shut the transport's write side.
    ///
    /// # Errors
    /// The transport failed.
    pub async fn close(&mut self) -> io::Result<()> {
        self.send(Opcode::Close, &[]).await?;
        self.io.shutdown().await
    }
}

/// Both halves of an upgraded connection.
pub struct WsLink<S> {
    pub reader: WsReader<ReadHalf<S>>,
    pub writer: WsWriter<WriteHalf<S>>,
}

impl<S: AsyncRead + AsyncWrite> WsLink<S> {
    /// A link over an upgraded connection; `leftover` are bytes already
    /// read past the upgrade.
    pub fn new(io: S, leftover: &[u8], end: End, max: usize) -> WsLink<S> {
        let (r, w) = tokio::io::split(io);
        WsLink {
            reader: WsReader::new(r, leftover, end, max),
            writer: WsWriter::new(w, end),
        }
    }
}

/// Why the client's upgrade failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("broker refused the upgrade: {0}")]
    Refused(String),
    #[error("bad upgrade response: {0}")]
    Bad(&'static str),
}

/// Client end of the HTTP upgrade: send the request for `url`
/// (`wss://authority/path`) with `extra` header lines (each ending in
/// CRLF), check the 101 answer and its accept key. Returns the bytes read
/// past the response.
///
/// # Errors
/// [`HandshakeError`]: the transport failed, the broker answered with
/// another status (its status line is in the error), or the answer is not
/// a valid upgrade.
pub async fn client_handshake<S>(
    io: &mut S,
    url: &str,
    extra: &str,
) -> Result<BytesMut, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    let key = tokio_tungstenite::tungstenite::handshake::client::generate_key();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    );
    io.write_all(req.as_bytes()).await?;
    io.flush().await?;
    let mut buf = BytesMut::with_capacity(1024);
    let head_len = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() >= MAX_RESPONSE_HEAD {
            return Err(HandshakeError::Bad("response head too long"));
        }
        buf.reserve(1024);
        if io.read_buf(&mut buf).await? == 0 {
            return Err(HandshakeError::Bad("connection closed during the upgrade"));
        }
    };
    let head = buf.split_to(head_len);
    check_upgrade_response(&head, &key)?;
    Ok(buf)
}

/// Check an upgrade response head (status line and headers, ending in an
/// empty line) against the key we sent.
///
/// # Errors
/// [`HandshakeError::Refused`] for a status other than 101 (with the
/// status line); [`HandshakeError::Bad`] for a 101 that is not a valid
/// WebSocket upgrade.
pub fn check_upgrade_response(head: &[u8], key: &str) -> Result<(), HandshakeError> {
    let text = std::str::from_utf8(head).map_err(|_| HandshakeError::Bad("not text"))?;
    let mut lines = text.split("\r\n");
    let status = lines.next().unwrap_or("");
    let mut parts = status.splitn(3, ' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(HandshakeError::Bad("no status line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(HandshakeError::Bad("not HTTP/1.x"));
    }
    if code != "101" {
        let shown: String = status
            .chars()
            .filter(|c| !c.is_control())
            .take(200)
            .collect();
        return Err(HandshakeError::Refused(shown));
    }
    let mut upgrade = false;
    let mut connection = false;
    let mut accept = None;
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err(HandshakeError::Bad("malformed header line"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("upgrade") {
            upgrade = value.eq_ignore_ascii_case("websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            connection = value
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
        } else if name.eq_ignore_ascii_case("sec-websocket-accept") {
            accept = Some(value);
        }
    }
    if !upgrade || !connection {
        return Err(HandshakeError::Bad("missing Upgrade or Connection header"));
    }
    let want = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    if accept != Some(want.as_str()) {
        return Err(HandshakeError::Bad("wrong Sec-WebSocket-Accept"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use proptest::prelude::*;
    use tokio_tungstenite::tungstenite::protocol::Role as TRole;
    use tokio_tungstenite::tungstenite::Message as TMessage;
    use tokio_tungstenite::WebSocketStream;

    const MAX: usize = 1 << 20;

    fn naive_mask(data: &mut [u8], key: [u8; 4]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b ^= key[i % 4];
        }
    }

    proptest! {
        #[test]
        fn mask_matches_the_rfc_definition(data in proptest::collection::vec(any::<u8>(), 0..100), key in any::<[u8; 4]>()) {
            let mut fast = data.clone();
            let mut slow = data.clone();
            apply_mask(&mut fast, key);
            naive_mask(&mut slow, key);
            prop_assert_eq!(&fast, &slow);
            apply_mask(&mut fast, key);
            prop_assert_eq!(fast, data);
        }

        #[test]
        fn headers_round_trip(fin in any::<bool>(), op in 0usize..3, len in prop_oneof![0u64..130, 65530u64..65540, 0u64..(MAX as u64)], mask in any::<Option<[u8; 4]>>()) {
            let opcode = [Opcode::Continuation, Opcode::Binary, Opcode::Text][op];
            let h = Header { fin, opcode, mask, len };
            let mut out = [0u8; MAX_HEADER];
            let n = encode_header(&mut out, &h);
            let end = if mask.is_some() { End::Server } else { End::Client };
            prop_assert_eq!(decode_header(&out[..n], end, MAX), Ok(Some((h, n))));
            // Any prefix is "not yet".
            for cut in 0..n {
                prop_assert_eq!(decode_header(&out[..cut], end, MAX), Ok(None));
            }
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..20)) {
            for end in [End::Client, End::Server] {
                if let Ok(Some((h, n))) = decode_header(&bytes, end, MAX) {
                    prop_assert!(n <= bytes.len() && n <= MAX_HEADER);
                    prop_assert!(h.len <= MAX as u64);
                }
            }
        }
    }

    #[test]
    fn shortest_length_forms() {
        let mut out = [0u8; MAX_HEADER];
        for (len, hl) in [(125u64, 2), (126, 4), (65535, 4), (65536, 10)] {
            let h = Header {
                fin: true,
                opcode: Opcode::Binary,
                mask: None,
                len,
            };
            assert_eq!(encode_header(&mut out, &h), hl, "{len}");
        }
    }

    #[test]
    fn rfc_violations_are_refused() {
        let srv = End::Server;
        // RSV1 set.
        assert_eq!(
            decode_header(&[0xC2, 0x80], srv, MAX),
            Err(WsError::Reserved)
        );
        // Opcode 3 is reserved.
        assert_eq!(
            decode_header(&[0x83, 0x80], srv, MAX),
            Err(WsError::Opcode(3))
        );
        // Unmasked from a client, masked from a server.
        assert_eq!(
            decode_header(&[0x82, 0x00], srv, MAX),
            Err(WsError::Unmasked)
        );
        assert_eq!(
            decode_header(&[0x82, 0x80], End::Client, MAX),
            Err(WsError::Masked)
        );
        // Fragmented ping; ping of 126 bytes.
        assert_eq!(
            decode_header(&[0x09, 0x80], srv, MAX),
            Err(WsError::BadControl)
        );
        assert_eq!(
            decode_header(&[0x89, 0xFE, 0, 126], srv, MAX),
            Err(WsError::BadControl)
        );
        // Over the limit (and a 64-bit length with the top bit set),
        // refused from the header alone.
        assert_eq!(
            decode_header(&[0x82, 0xFF, 0, 0, 0, 0, 0, 0x10, 0, 1], srv, MAX),
            Err(WsError::TooLarge(MAX as u64 + 1))
        );
        assert!(matches!(
            decode_header(&[0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0], srv, MAX),
            Err(WsError::TooLarge(_))
        ));
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Our client against tungstenite's server and the reverse: both
    /// directions, large and small messages, pings answered by tungstenite,
    /// close.
    #[test]
    fn interoperates_with_tungstenite_both_ways() {
        rt().block_on(async {
            for our_end in [End::Client, End::Server] {
                let (a, b) = tokio::io::duplex(1 << 16);
                let their_role = match our_end {
                    End::Client => TRole::Server,
                    End::Server => TRole::Client,
                };
                let mut theirs = WebSocketStream::from_raw_socket(b, their_role, None).await;
                let mut ours = WsLink::new(a, &[], our_end, MAX);
                let big: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
                for payload in [&b"hi"[..], &big[..], &[][..]] {
                    let mut buf = vec![0u8; HEADROOM];
                    buf.extend_from_slice(payload);
                    let (sent, got) = tokio::join!(
                        ours.writer.send_framed(Opcode::Binary, &mut buf),
                        theirs.next()
                    );
                    sent.unwrap();
                    assert_eq!(got.unwrap().unwrap(), TMessage::binary(payload.to_vec()));
                    let (sent, got) = tokio::join!(
                        theirs.send(TMessage::binary(payload.to_vec())),
                        ours.reader.next()
                    );
                    sent.unwrap();
                    assert_eq!(
                        got.unwrap(),
                        Some(Message::Binary(Bytes::copy_from_slice(payload)))
                    );
                }
                // Their ping arrives as a ping; our ping gets their pong.
                theirs
                    .send(TMessage::Ping(Bytes::from_static(b"p1")))
                    .await
                    .unwrap();
                assert_eq!(
                    ours.reader.next().await.unwrap(),
                    Some(Message::Ping(Bytes::from_static(b"p1")))
                );
                ours.writer.send(Opcode::Ping, b"p2").await.unwrap();
                assert_eq!(
                    theirs.next().await.unwrap().unwrap(),
                    TMessage::Ping(Bytes::from_static(b"p2"))
                );
                // tungstenite sends the pong on its next read.
                let got = tokio::select! {
                    m = theirs.next() => panic!("unexpected {m:?}"),
                    got = ours.reader.next() => got,
                };
                assert_eq!(got.unwrap(), Some(Message::Pong(Bytes::from_static(b"p2"))));
                // Their fragmented message is reassembled.
                let frag = |op, fin, data: &[u8]| {
                    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
                    let mut f = Frame::message(data.to_vec(), op, fin);
                    if their_role == TRole::Client {
                        f.header_mut().mask = Some([1, 2, 3, 4]);
                    }
                    TMessage::Frame(f)
                };
                use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
                theirs
                    .send(frag(OpCode::Data(Data::Binary), false, b"ab"))
                    .await
                    .unwrap();
                theirs.send(TMessage::Ping(Bytes::new())).await.unwrap();
                theirs
                    .send(frag(OpCode::Data(Data::Continue), true, b"cd"))
                    .await
                    .unwrap();
                assert_eq!(
                    ours.reader.next().await.unwrap(),
                    Some(Message::Ping(Bytes::new()))
                );
                assert_eq!(
                    ours.reader.next().await.unwrap(),
                    Some(Message::Binary(Bytes::from_static(b"abcd")))
                );
                // Close both ways.
                ours.writer.close().await.unwrap();
                let got = theirs.next().await;
                assert!(matches!(got, Some(Ok(TMessage::Close(_)))));
                // tungstenite answers the close on its next read, which then
                // sees our end of the stream.
                let (_, got) = tokio::join!(
                    async { while let Some(Ok(_)) = theirs.next().await {} },
                    ours.reader.next()
                );
                assert_eq!(got.unwrap(), Some(Message::Close));
            }
        });
    }

    #[test]
    fn reader_limits_and_truncation() {
        rt().block_on(async {
            // Over the limit: refused from the header.
            let (mut a, b) = tokio::io::duplex(1024);
            let mut r = WsReader::new(b, &[], End::Client, 100);
            a.write_all(&[0x82, 101]).await.unwrap();
            assert!(matches!(
                r.next().await,
                Err(LinkError::Protocol(WsError::TooLarge(101)))
            ));
            // Fragments adding up over the limit.
            let (mut a, b) = tokio::io::duplex(1024);
            let mut r = WsReader::new(b, &[], End::Client, 100);
            let mut frames = vec![0x02, 60];
            frames.extend([0u8; 60]);
            frames.extend([0x80, 60]);
            frames.extend([0u8; 60]);
            a.write_all(&frames).await.unwrap();
            assert!(matches!(
                r.next().await,
                Err(LinkError::Protocol(WsError::TooLarge(120)))
            ));
            // Text, stray continuation, interleaved message.
            for (bytes, want) in [
                (vec![0x81, 0], WsError::Text),
                (vec![0x80, 0], WsError::StrayContinuation),
                (vec![0x02, 0, 0x82, 0], WsError::Interleaved),
            ] {
                let (mut a, b) = tokio::io::duplex(1024);
                let mut r = WsReader::new(b, &[], End::Client, 100);
                a.write_all(&bytes).await.unwrap();
                match r.next().await {
                    Err(LinkError::Protocol(e)) => assert_eq!(e, want),
                    other => panic!("{other:?}"),
                }
            }
            // EOF mid-frame is an error; EOF between frames is a clean end.
            let (mut a, b) = tokio::io::duplex(1024);
            let mut r = WsReader::new(b, &[0x82, 1, 7], End::Client, 100);
            a.write_all(&[0x82, 5, 1]).await.unwrap();
            drop(a);
            assert_eq!(
                r.next().await.unwrap(),
                Some(Message::Binary(Bytes::from_static(&[7])))
            );
            assert!(matches!(
                r.next().await,
                Err(LinkError::Protocol(WsError::Truncated))
            ));
            let (a, b) = tokio::io::duplex(1024);
            let mut r = WsReader::new(b, &[], End::Client, 100);
            drop(a);
            assert_eq!(r.next().await.unwrap(), None);
        });
    }

    #[test]
    fn upgrade_responses() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let ok = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        check_upgrade_response(ok.as_bytes(), key).unwrap();
        let wrong = ok.replace("s3pP", "xxxx");
        assert!(matches!(
            check_upgrade_response(wrong.as_bytes(), key),
            Err(HandshakeError::Bad("wrong Sec-WebSocket-Accept"))
        ));
        let refused = "HTTP/1.1 401 Agent token not accepted\r\nContent-Length: 0\r\n\r\n";
        match check_upgrade_response(refused.as_bytes(), key) {
            Err(HandshakeError::Refused(s)) => {
                assert_eq!(s, "HTTP/1.1 401 Agent token not accepted");
            }
            other => panic!("{other:?}"),
        }
        let no_upgrade =
            "HTTP/1.1 101 OK\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        assert!(check_upgrade_response(no_upgrade.as_bytes(), key).is_err());
    }
}
