//! The mux frame codec: pure, no I/O.
//!
//! One WebSocket binary message carries one or more frames back to back.
//! Every frame has a fixed 9-byte header:
//!
//! ```text
//! +--------+----------------+----------------+-------------------+
//! | type u8| stream id u32  | length u32     | payload (length)  |
//! +--------+----------------+----------------+-------------------+
//! ```
//!
//! All integers are big-endian. Stream id 0 is the session itself (HELLO);
//! tunnels use ids >= 1, allocated by the broker. The payload layouts are in
//! `docs/protocol.md`. Decoding borrows nothing: `Data` payloads are
//! zero-copy slices of the received message.

use std::net::Ipv4Addr;

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 9;
/// Largest DATA payload a sender may put in one frame (fairness: streams
/// take turns in chunks no larger than this).
pub const MAX_DATA_CHUNK: usize = 16 * 1024;
/// Largest payload of any frame the decoder accepts.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Largest OPEN_ERR message accepted.
pub const MAX_ERR_MESSAGE: usize = 256;

/// Frame type bytes on the wire.
mod kind {
    pub const HELLO: u8 = 0x01;
    pub const OPEN: u8 = 0x02;
    pub const OPEN_OK: u8 = 0x03;
    pub const OPEN_ERR: u8 = 0x04;
    pub const DATA: u8 = 0x05;
    pub const WINDOW: u8 = 0x06;
    pub const FIN: u8 = 0x07;
    pub const RST: u8 = 0x08;
}

/// What the broker asks the agent to dial. The agent re-checks it against
/// its own policy; this is only a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// The system itself (`self_address` in the agent config) on `port`.
    SelfPort(u16),
    /// A co-located server, which must be one of the agent's tunnels.
    CoLocated(Ipv4Addr, u16),
}

impl Target {
    /// The port being asked for.
    pub fn port(&self) -> u16 {
        match self {
            Target::SelfPort(p) | Target::CoLocated(_, p) => *p,
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::SelfPort(p) => write!(f, "self:{p}"),
            Target::CoLocated(ip, p) => write!(f, "{ip}:{p}"),
        }
    }
}

/// Why an OPEN failed, as the agent reports it. The broker maps these to
/// HTTP statuses (502, 504, 403, 503).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenErrCode {
    /// The target actively refused the connection (RST) → 502.
    Refused,
    /// The dial did not complete within the agent's deadline → 504.
    Timeout,
    /// The agent's own policy does not allow this target → 403.
    Forbidden,
    /// Network unreachable or another dial error → 502.
    Unreachable,
    /// The agent is at its stream cap → 503.
    Busy,
    /// Anything else → 502.
    Other,
}

impl OpenErrCode {
    fn to_u8(self) -> u8 {
        match self {
            OpenErrCode::Refused => 1,
            OpenErrCode::Timeout => 2,
            OpenErrCode::Forbidden => 3,
            OpenErrCode::Unreachable => 4,
            OpenErrCode::Busy => 5,
            OpenErrCode::Other => 6,
        }
    }
    fn from_u8(v: u8) -> OpenErrCode {
        match v {
            1 => OpenErrCode::Refused,
            2 => OpenErrCode::Timeout,
            3 => OpenErrCode::Forbidden,
            4 => OpenErrCode::Unreachable,
            5 => OpenErrCode::Busy,
            _ => OpenErrCode::Other,
        }
    }
}

/// Why a stream was reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RstCode {
    /// A normal abort: the local side went away without a clean close.
    Cancel,
    /// The peer broke the protocol on this stream (window overflow,
    /// data after FIN).
    Protocol,
    /// Closed by an operator or by a policy change.
    Killed,
}

impl RstCode {
    fn to_u8(self) -> u8 {
        match self {
            RstCode::Cancel => 1,
            RstCode::Protocol => 2,
            RstCode::Killed => 3,
        }
    }
    fn from_u8(v: u8) -> RstCode {
        match v {
            2 => RstCode::Protocol,
            3 => RstCode::Killed,
            _ => RstCode::Cancel,
        }
    }
}

/// One mux frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Agent → broker, first frame of a session: JSON (`control::Hello`).
    Hello(Bytes),
    /// Broker → agent: open stream `id` to `target`; `window` is the number
    /// of bytes the broker will accept on this stream before more credit.
    Open {
        id: u32,
        target: Target,
        window: u32,
    },
    /// Agent → broker: the dial succeeded; `window` is the agent's credit
    /// grant to the broker.
    OpenOk { id: u32, window: u32 },
    /// Agent → broker: the dial failed.
    OpenErr {
        id: u32,
        code: OpenErrCode,
        message: String,
    },
    /// Stream bytes. Never empty on the wire.
    Data { id: u32, data: Bytes },
    /// More credit: the sender of this frame can accept `increment` more
    /// bytes on stream `id`.
    Window { id: u32, increment: u32 },
    /// The sender will send no more data on `id` (half-close).
    Fin { id: u32 },
    /// Abort stream `id` in both directions.
    Rst { id: u32, code: RstCode },
}

/// Why a message could not be decoded. Any of these closes the session:
/// framing cannot be resynchronised.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    #[error("truncated frame")]
    Truncated,
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    #[error("frame payload of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("bad payload length for frame type {0:#04x}")]
    BadLength(u8),
    #[error("stream id 0 is reserved for the session")]
    ZeroStream,
    #[error("HELLO must use stream id 0")]
    HelloOnStream,
    #[error("empty DATA frame")]
    EmptyData,
    #[error("bad OPEN target")]
    BadTarget,
    #[error("OPEN_ERR message is not UTF-8 or too long")]
    BadMessage,
    #[error("zero window increment")]
    ZeroWindow,
}

impl Frame {
    /// The stream id the frame belongs to (0 for HELLO).
    pub fn stream_id(&self) -> u32 {
        match self {
            Frame::Hello(_) => 0,
            Frame::Open { id, .. }
            | Frame::OpenOk { id, .. }
            | Frame::OpenErr { id, .. }
            | Frame::Data { id, .. }
            | Frame::Window { id, .. }
            | Frame::Fin { id }
            | Frame::Rst { id, .. } => *id,
        }
    }

    /// Number of bytes `encode` appends.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN
            + match self {
                Frame::Hello(b) => b.len(),
                Frame::Open { .. } => 11,
                Frame::OpenOk { .. } | Frame::Window { .. } => 4,
                Frame::OpenErr { message, .. } => 1 + message.len().min(MAX_ERR_MESSAGE),
                Frame::Data { data, .. } => data.len(),
                Frame::Fin { .. } => 0,
                Frame::Rst { .. } => 1,
            }
    }

    /// Append the wire form of this frame to `out`.
    ///
    /// The encoder trusts its caller for sizes (DATA chunks are cut by the
    /// session); an OPEN_ERR message is truncated to [`MAX_ERR_MESSAGE`] at a
    /// character boundary.
    pub fn encode(&self, out: &mut BytesMut) {
        out.reserve(self.encoded_len());
        let header = |out: &mut BytesMut, t: u8, id: u32, len: usize| {
            out.put_u8(t);
            out.put_u32(id);
            out.put_u32(len as u32);
        };
        match self {
            Frame::Hello(json) => {
                header(out, kind::HELLO, 0, json.len());
                out.put_slice(json);
            }
            Frame::Open { id, target, window } => {
                header(out, kind::OPEN, *id, 11);
                match target {
                    Target::SelfPort(port) => {
                        out.put_u8(0);
                        out.put_u32(0);
                        out.put_u16(*port);
                    }
                    Target::CoLocated(ip, port) => {
                        out.put_u8(1);
                        out.put_slice(&ip.octets());
                        out.put_u16(*port);
                    }
                }
                out.put_u32(*window);
            }
            Frame::OpenOk { id, window } => {
                header(out, kind::OPEN_OK, *id, 4);
                out.put_u32(*window);
            }
            Frame::OpenErr { id, code, message } => {
                let msg = truncate_utf8(message, MAX_ERR_MESSAGE);
                header(out, kind::OPEN_ERR, *id, 1 + msg.len());
                out.put_u8(code.to_u8());
                out.put_slice(msg.as_bytes());
            }
            Frame::Data { id, data } => {
                header(out, kind::DATA, *id, data.len());
                out.put_slice(data);
            }
            Frame::Window { id, increment } => {
                header(out, kind::WINDOW, *id, 4);
                out.put_u32(*increment);
            }
            Frame::Fin { id } => header(out, kind::FIN, *id, 0),
            Frame::Rst { id, code } => {
                header(out, kind::RST, *id, 1);
                out.put_u8(code.to_u8());
            }
        }
    }

    /// Decode one frame from the front of `buf`, advancing it.
    ///
    /// Returns `Ok(None)` when `buf` is empty (the message is used up).
    ///
    /// # Errors
    /// [`FrameError`] when the bytes are not a valid frame; the caller must
    /// close the session, since framing is lost.
    pub fn decode(buf: &mut Bytes) -> Result<Option<Frame>, FrameError> {
        if buf.is_empty() {
            return Ok(None);
        }
        if buf.len() < HEADER_LEN {
            return Err(FrameError::Truncated);
        }
        let t = buf[0];
        let id = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
        let len = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) as usize;
        if len > MAX_PAYLOAD {
            return Err(FrameError::TooLarge(len));
        }
        if buf.len() < HEADER_LEN + len {
            return Err(FrameError::Truncated);
        }
        buf.advance(HEADER_LEN);
        let mut p = buf.split_to(len);
        let need = |want: usize| {
            if len == want {
                Ok(())
            } else {
                Err(FrameError::BadLength(t))
            }
        };
        if t == kind::HELLO {
            if id != 0 {
                return Err(FrameError::HelloOnStream);
            }
            return Ok(Some(Frame::Hello(p)));
        }
        if id == 0 && t <= kind::RST {
            return Err(FrameError::ZeroStream);
        }
        let frame = match t {
            kind::OPEN => {
                need(11)?;
                let tag = p.get_u8();
                let ip = Ipv4Addr::from(p.get_u32());
                let port = p.get_u16();
                let window = p.get_u32();
                if port == 0 {
                    return Err(FrameError::BadTarget);
                }
                let target = match tag {
                    0 if ip.is_unspecified() => Target::SelfPort(port),
                    1 => Target::CoLocated(ip, port),
                    _ => return Err(FrameError::BadTarget),
                };
                Frame::Open { id, target, window }
            }
            kind::OPEN_OK => {
                need(4)?;
                Frame::OpenOk {
                    id,
                    window: p.get_u32(),
                }
            }
            kind::OPEN_ERR => {
                if len == 0 || len > 1 + MAX_ERR_MESSAGE {
                    return Err(FrameError::BadLength(t));
                }
                let code = OpenErrCode::from_u8(p.get_u8());
                let message = String::from_utf8(p.to_vec()).map_err(|_| FrameError::BadMessage)?;
                Frame::OpenErr { id, code, message }
            }
            kind::DATA => {
                if len == 0 {
                    return Err(FrameError::EmptyData);
                }
                Frame::Data { id, data: p }
            }
            kind::WINDOW => {
                need(4)?;
                let increment = p.get_u32();
                if increment == 0 {
                    return Err(FrameError::ZeroWindow);
                }
                Frame::Window { id, increment }
            }
            kind::FIN => {
                need(0)?;
                Frame::Fin { id }
            }
            kind::RST => {
                need(1)?;
                Frame::Rst {
                    id,
                    code: RstCode::from_u8(p.get_u8()),
                }
            }
            other => return Err(FrameError::UnknownType(other)),
        };
        Ok(Some(frame))
    }

    /// Decode every frame in one message.
    ///
    /// # Errors
    /// The first [`FrameError`] met.
    pub fn decode_all(mut msg: Bytes) -> Result<Vec<Frame>, FrameError> {
        let mut out = Vec::new();
        while let Some(f) = Frame::decode(&mut msg)? {
            out.push(f);
        }
        Ok(out)
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(f: &Frame) -> Frame {
        let mut b = BytesMut::new();
        f.encode(&mut b);
        assert_eq!(b.len(), f.encoded_len());
        let mut bytes = b.freeze();
        let out = Frame::decode(&mut bytes)
            .expect("decodes")
            .expect("a frame");
        assert!(bytes.is_empty());
        out
    }

    #[test]
    fn known_frames_roundtrip() {
        let frames = [
            Frame::Hello(Bytes::from_static(b"{\"version\":\"1\"}")),
            Frame::Open {
                id: 1,
                target: Target::SelfPort(22),
                window: 262_144,
            },
            Frame::Open {
                id: 7,
                target: Target::CoLocated(Ipv4Addr::new(10, 0, 0, 5), 3389),
                window: 1,
            },
            Frame::OpenOk { id: 7, window: 5 },
            Frame::OpenErr {
                id: 3,
                code: OpenErrCode::Timeout,
                message: "dial timed out".into(),
            },
            Frame::Data {
                id: 9,
                data: Bytes::from_static(b"hello"),
            },
            Frame::Window {
                id: 9,
                increment: 65536,
            },
            Frame::Fin { id: 9 },
            Frame::Rst {
                id: 9,
                code: RstCode::Killed,
            },
        ];
        for f in &frames {
            assert_eq!(&roundtrip(f), f);
        }
    }

    #[test]
    fn exact_wire_bytes() {
        let mut b = BytesMut::new();
        Frame::Open {
            id: 1,
            target: Target::CoLocated(Ipv4Addr::new(10, 0, 0, 5), 22),
            window: 0x0004_0000,
        }
        .encode(&mut b);
        assert_eq!(
            &b[..],
            &[2, 0, 0, 0, 1, 0, 0, 0, 11, 1, 10, 0, 0, 5, 0, 22, 0, 4, 0, 0]
        );
    }

    #[test]
    fn rejects_bad_frames() {
        let cases: &[(&[u8], FrameError)] = &[
            (&[5, 0, 0, 0, 1, 0, 0], FrameError::Truncated),
            (&[5, 0, 0, 0, 1, 0, 0, 0, 4, 1], FrameError::Truncated),
            (
                &[0x7f, 0, 0, 0, 1, 0, 0, 0, 0],
                FrameError::UnknownType(0x7f),
            ),
            (&[5, 0, 0, 0, 1, 0, 0, 0, 0], FrameError::EmptyData),
            (&[5, 0, 0, 0, 0, 0, 0, 0, 1, 0], FrameError::ZeroStream),
            (&[1, 0, 0, 0, 1, 0, 0, 0, 0], FrameError::HelloOnStream),
            (
                &[6, 0, 0, 0, 1, 0, 0, 0, 4, 0, 0, 0, 0],
                FrameError::ZeroWindow,
            ),
            (&[7, 0, 0, 0, 1, 0, 0, 0, 1, 0], FrameError::BadLength(7)),
            (&[5, 0, 0, 0, 1, 0, 2, 0, 0], FrameError::TooLarge(0x20000)),
            // OPEN to port 0
            (
                &[2, 0, 0, 0, 1, 0, 0, 0, 11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                FrameError::BadTarget,
            ),
            // OPEN self with an address in it
            (
                &[2, 0, 0, 0, 1, 0, 0, 0, 11, 0, 1, 2, 3, 4, 0, 22, 0, 0, 0, 1],
                FrameError::BadTarget,
            ),
        ];
        for (bytes, want) in cases {
            let mut b = Bytes::copy_from_slice(bytes);
            assert_eq!(Frame::decode(&mut b).as_ref(), Err(want), "{bytes:?}");
        }
    }

    #[test]
    fn several_frames_per_message() {
        let mut b = BytesMut::new();
        Frame::Window {
            id: 1,
            increment: 3,
        }
        .encode(&mut b);
        Frame::Data {
            id: 2,
            data: Bytes::from_static(b"xy"),
        }
        .encode(&mut b);
        Frame::Fin { id: 2 }.encode(&mut b);
        let frames = Frame::decode_all(b.freeze()).unwrap();
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[2], Frame::Fin { id: 2 });
    }

    #[test]
    fn long_error_message_is_truncated_on_char_boundary() {
        let f = Frame::OpenErr {
            id: 1,
            code: OpenErrCode::Other,
            message: "é".repeat(200),
        };
        match roundtrip(&f) {
            Frame::OpenErr { message, .. } => {
                assert!(message.len() <= MAX_ERR_MESSAGE);
                assert!(message.chars().all(|c| c == 'é'));
            }
            other => panic!("{other:?}"),
        }
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        let id = 1u32..;
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..64).prop_map(|v| Frame::Hello(v.into())),
            (id.clone(), 1u16.., any::<u32>()).prop_map(|(id, p, window)| Frame::Open {
                id,
                target: Target::SelfPort(p),
                window
            }),
            (id.clone(), any::<u32>(), 1u16.., any::<u32>()).prop_map(|(id, ip, p, window)| {
                Frame::Open {
                    id,
                    target: Target::CoLocated(Ipv4Addr::from(ip), p),
                    window,
                }
            }),
            (id.clone(), any::<u32>()).prop_map(|(id, window)| Frame::OpenOk { id, window }),
            (id.clone(), 1u8..7, "[ -~]{0,200}").prop_map(|(id, c, message)| Frame::OpenErr {
                id,
                code: OpenErrCode::from_u8(c),
                message
            }),
            (id.clone(), proptest::collection::vec(any::<u8>(), 1..2048))
                .prop_map(|(id, v)| Frame::Data { id, data: v.into() }),
            (id.clone(), 1u32..).prop_map(|(id, increment)| Frame::Window { id, increment }),
            id.clone().prop_map(|id| Frame::Fin { id }),
            (id, 1u8..4).prop_map(|(id, c)| Frame::Rst {
                id,
                code: RstCode::from_u8(c)
            }),
        ]
    }

    proptest! {
        #[test]
        fn prop_roundtrip_sequences(frames in proptest::collection::vec(arb_frame(), 1..8)) {
            let mut b = BytesMut::new();
            for f in &frames { f.encode(&mut b); }
            let back = Frame::decode_all(b.freeze()).unwrap();
            prop_assert_eq!(back, frames);
        }

        #[test]
        fn prop_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Frame::decode_all(Bytes::from(bytes));
        }
    }
}
