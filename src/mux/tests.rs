//! Session tests over an in-memory WebSocket: no sockets, no real time
//! dependence beyond bounded timeouts.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::Role as WsRole;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use super::session::ws_config;
use super::*;

async fn pair(config: MuxConfig) -> (Mux, Mux, tokio::sync::mpsc::Receiver<Incoming>) {
    pair_with(config.clone(), config).await
}

async fn pair_with(
    broker_config: MuxConfig,
    agent_config: MuxConfig,
) -> (Mux, Mux, tokio::sync::mpsc::Receiver<Incoming>) {
    let (a, b) = tokio::io::duplex(256 * 1024);
    let wa = WebSocketStream::from_raw_socket(a, WsRole::Client, Some(ws_config())).await;
    let wb = WebSocketStream::from_raw_socket(b, WsRole::Server, Some(ws_config())).await;
    let (agent, incoming, _) = Mux::start(wa, Role::Agent, agent_config, CancellationToken::new());
    let (broker, _, _) = Mux::start(wb, Role::Broker, broker_config, CancellationToken::new());
    (broker, agent, incoming)
}

/// An idle link with default settings: only the agent beats, once per
/// `AGENT_PING_AFTER`, and only every fourth beat is a ping (the others
/// are one-way heartbeats the broker does not answer); the broker hears
/// them and never pings back; both stay up. Then a busy link beats not.
#[tokio::test(start_paused = true)]
async fn idle_link_is_kept_alive_by_the_agent_alone() {
    let (broker, agent, incoming) =
        pair_with(MuxConfig::default(), MuxConfig::agent_default()).await;
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert!(!broker.is_closed() && !agent.is_closed());
    let (pings, beats) = (agent.pings_sent(), agent.heartbeats_sent());
    assert!(
        (19..=20).contains(&(pings + beats)),
        "agent beat {pings} + {beats} times in 600 s"
    );
    assert!(
        (4..=5).contains(&pings),
        "one ping in four beats, not {pings}"
    );
    assert_eq!(
        broker.pings_sent() + broker.heartbeats_sent(),
        0,
        "the broker kept hearing the agent"
    );

    // Traffic counts as life: a stream that talks every 20 s needs no ping.
    echo_agent(incoming);
    let stream = broker.open(Target::SelfPort(7)).await.unwrap();
    let (_relay, mut far) = relay_to_duplex(stream, 1024);
    let before = agent.pings_sent();
    let beats = agent.heartbeats_sent();
    for _ in 0..10 {
        far.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        far.read_exact(&mut b).await.unwrap();
        tokio::time::sleep(Duration::from_secs(20)).await;
    }
    assert_eq!(agent.pings_sent(), before, "a busy link does not ping");
    assert_eq!(agent.heartbeats_sent(), beats, "nor beat");
    assert_eq!(broker.pings_sent(), 0);
}

/// An agent whose broker reads but never answers (a hung process behind a
/// live kernel) declares the link dead: its heartbeats need no answer,
/// but the ping after them does, within `dead_after - ping_interval`.
#[tokio::test(start_paused = true)]
async fn an_agent_declares_a_link_dead_when_its_ping_goes_unanswered() {
    let (a, b) = tokio::io::duplex(256 * 1024);
    let wa = WebSocketStream::from_raw_socket(a, WsRole::Client, Some(ws_config())).await;
    let config = MuxConfig::agent_default();
    let (agent, _incoming, ended) =
        Mux::start(wa, Role::Agent, config.clone(), CancellationToken::new());
    // The broker end: reads everything, answers nothing (no pong either,
    // since tungstenite only flushes its pong when the stream is written).
    let (mut rd, _wr) = tokio::io::split(b);
    let drain = tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while rd.read(&mut buf).await.map(|n| n > 0).unwrap_or(false) {}
    });
    let t0 = tokio::time::Instant::now();
    let end = ended.await.expect("session end reported");
    let took = t0.elapsed();
    let expect = config.ping_interval * (config.beats_per_ping + 1) + config.dead_after
        - config.ping_interval;
    assert!(matches!(end, SessionEnd::Dead), "{end:?}");
    assert!(
        took >= expect && took <= expect + Duration::from_secs(1),
        "dead after {took:?}, expected {expect:?}"
    );
    assert_eq!(agent.pings_sent(), 1);
    assert_eq!(agent.heartbeats_sent(), u64::from(config.beats_per_ping));
    drain.abort();
}

/// A peer that pings later than our `dead_after` is heard too late: we
/// ping it ourselves after `ping_interval`, and its pong keeps the link up.
#[tokio::test(start_paused = true)]
async fn the_broker_pings_an_agent_that_stays_silent() {
    let slow_agent = MuxConfig {
        ping_interval: Duration::from_secs(3600),
        dead_after: Duration::from_secs(7200),
        ..MuxConfig::agent_default()
    };
    let (broker, agent, _incoming) = pair_with(MuxConfig::default(), slow_agent).await;
    tokio::time::sleep(Duration::from_secs(450)).await;
    assert!(!broker.is_closed() && !agent.is_closed());
    let n = broker.pings_sent();
    assert!((9..=10).contains(&n), "broker pinged {n} times in 450 s");
    assert_eq!(agent.pings_sent() + agent.heartbeats_sent(), 0);
}

/// Relay `stream` to an in-memory socket of `capacity` bytes; returns the
/// relay task and the socket's far end.
fn relay_to_duplex(
    stream: MuxStream,
    capacity: usize,
) -> (tokio::task::JoinHandle<RelayEnd>, tokio::io::DuplexStream) {
    let (client, far) = tokio::io::duplex(capacity);
    let r = tokio::spawn(relay(
        stream,
        client,
        Bytes::new(),
        CancellationToken::new(),
        Arc::default(),
    ));
    (r, far)
}

/// Write `payload` into `far` and half-close it while reading `far` to its
/// end; returns what was read.
async fn write_and_read_back(far: tokio::io::DuplexStream, payload: Vec<u8>) -> Vec<u8> {
    let (mut rd, mut wr) = tokio::io::split(far);
    let w = tokio::spawn(async move {
        wr.write_all(&payload).await.unwrap();
        wr.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    rd.read_to_end(&mut got).await.unwrap();
    w.await.unwrap();
    got
}

/// Agent side that accepts every stream and relays it to an in-memory
/// echo (which half-closes after echoing everything).
fn echo_agent(mut incoming: tokio::sync::mpsc::Receiver<Incoming>) {
    tokio::spawn(async move {
        while let Some(inc) = incoming.recv().await {
            let mux = inc.stream.mux.clone();
            mux.accept(&inc.stream);
            let (local, mut remote) = tokio::io::duplex(64 * 1024);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                loop {
                    let n = remote.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        let _ = remote.shutdown().await;
                        break;
                    }
                    if remote.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
            tokio::spawn(relay(
                inc.stream,
                local,
                Bytes::new(),
                CancellationToken::new(),
                Arc::default(),
            ));
        }
    });
}

#[tokio::test]
async fn echo_with_half_close() {
    tokio::time::timeout(Duration::from_secs(20), async {
        let (broker, _agent, incoming) = pair(MuxConfig::default()).await;
        echo_agent(incoming);
        let stream = broker.open(Target::SelfPort(22)).await.expect("opens");
        let (client, mut far) = tokio::io::duplex(64 * 1024);
        let stats = Arc::new(RelayStats::default());
        let r = tokio::spawn(relay(
            stream,
            client,
            Bytes::from_static(b"early:"),
            CancellationToken::new(),
            stats.clone(),
        ));
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let writer = write_and_read_back(far, payload.clone()).await;
        let mut want = b"early:".to_vec();
        want.extend_from_slice(&payload);
        assert_eq!(writer.len(), want.len());
        assert!(writer == want, "echo differs");
        assert_eq!(r.await.unwrap(), RelayEnd::Closed);
        assert_eq!(stats.get(), (want.len() as u64, want.len() as u64));
        assert_eq!(broker.stream_count(), 0);
        far = tokio::io::duplex(1).0;
        drop(far);
    })
    .await
    .expect("test timed out");
}

/// Windows that grow: the extra credit is accepted by the sender (no
/// overflow reset), and a fast echo of 8 MiB arrives intact.
#[tokio::test]
async fn growing_windows_carry_a_bulk_echo_intact() {
    tokio::time::timeout(Duration::from_secs(20), async {
        let config = MuxConfig {
            window: 64 * 1024,
            max_window: 2 * 1024 * 1024,
            ..MuxConfig::default()
        };
        let (broker, _agent, incoming) = pair(config).await;
        echo_agent(incoming);
        let stream = broker.open(Target::SelfPort(22)).await.expect("opens");
        let (r, far) = relay_to_duplex(stream, 256 * 1024);
        let payload: Vec<u8> = (0..8_000_000u32).map(|i| (i % 253) as u8).collect();
        let got = write_and_read_back(far, payload.clone()).await;
        assert!(got == payload, "echo differs");
        assert_eq!(r.await.unwrap(), RelayEnd::Closed);
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn slow_reader_is_bounded_by_the_window() {
    tokio::time::timeout(Duration::from_secs(20), async {
        let config = MuxConfig {
            window: 64 * 1024,
            ..MuxConfig::default()
        };
        let (broker, _agent, mut incoming) = pair(config).await;
        // Agent side: a target that sends forever.
        let agent_stats = Arc::new(RelayStats::default());
        {
            let agent_stats = agent_stats.clone();
            tokio::spawn(async move {
                let inc = incoming.recv().await.unwrap();
                inc.stream.mux.clone().accept(&inc.stream);
                let (local, mut target) = tokio::io::duplex(16 * 1024);
                tokio::spawn(async move {
                    let block = vec![7u8; 16 * 1024];
                    while target.write_all(&block).await.is_ok() {}
                });
                relay(
                    inc.stream,
                    local,
                    Bytes::new(),
                    CancellationToken::new(),
                    agent_stats,
                )
                .await
            });
        }
        let stream = broker.open(Target::SelfPort(22)).await.unwrap();
        // Broker side: a client that never reads.
        let (client, _never_read) = tokio::io::duplex(1024);
        let cancel = CancellationToken::new();
        let bstats = Arc::new(RelayStats::default());
        let r = tokio::spawn(relay(
            stream,
            client,
            Bytes::new(),
            cancel.clone(),
            bstats.clone(),
        ));
        // Wait until the agent's sending stalls.
        let mut last = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let (sent, _) = agent_stats.get();
            if sent == last && sent > 0 {
                break;
            }
            last = sent;
        }
        // In flight: the broker's window plus what its client buffer took.
        let (sent, _) = agent_stats.get();
        let (_, written) = bstats.get();
        assert!(sent - written <= 64 * 1024, "sent {sent} written {written}");
        cancel.cancel();
        assert_eq!(r.await.unwrap(), RelayEnd::Killed);
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn refused_open_carries_its_code() {
    tokio::time::timeout(Duration::from_secs(10), async {
        let (broker, _agent, mut incoming) = pair(MuxConfig::default()).await;
        tokio::spawn(async move {
            while let Some(inc) = incoming.recv().await {
                inc.stream
                    .mux
                    .clone()
                    .refuse(inc.stream, OpenErrCode::Timeout, "dial timed out");
            }
        });
        match broker.open(Target::SelfPort(22)).await {
            Err(OpenError::Agent(OpenErrCode::Timeout, m)) => assert_eq!(m, "dial timed out"),
            other => panic!("{other:?}"),
        }
        assert_eq!(broker.stream_count(), 0);
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn closing_the_agent_ends_broker_streams() {
    tokio::time::timeout(Duration::from_secs(10), async {
        let (broker, agent, incoming) = pair(MuxConfig::default()).await;
        echo_agent(incoming);
        let stream = broker.open(Target::SelfPort(22)).await.unwrap();
        let (r, _far) = relay_to_duplex(stream, 1024);
        agent.close();
        assert_eq!(r.await.unwrap(), RelayEnd::SessionLost);
        assert!(matches!(
            broker.open(Target::SelfPort(22)).await,
            Err(OpenError::Closed)
        ));
    })
    .await
    .expect("test timed out");
}

// ---- Abuse: a raw peer sends hand-crafted frames to an agent session ----

/// A hand-driven peer: raw WebSocket plus frames received but not yet
/// looked at (the session coalesces several frames into one message).
struct Raw {
    ws: WebSocketStream<tokio::io::DuplexStream>,
    pending: std::collections::VecDeque<Frame>,
}

impl Raw {
    async fn send(&mut self, m: Message) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        self.ws.send(m).await
    }
}

async fn raw_peer(config: MuxConfig) -> (Mux, tokio::sync::mpsc::Receiver<Incoming>, Raw) {
    let (a, b) = tokio::io::duplex(1 << 20);
    let wa = WebSocketStream::from_raw_socket(a, WsRole::Client, Some(ws_config())).await;
    let ws = WebSocketStream::from_raw_socket(b, WsRole::Server, Some(ws_config())).await;
    let (agent, incoming, _) = Mux::start(wa, Role::Agent, config, CancellationToken::new());
    let raw = Raw {
        ws,
        pending: Default::default(),
    };
    (agent, incoming, raw)
}

async fn send(raw: &mut Raw, frames: &[Frame]) {
    let mut b = bytes::BytesMut::new();
    for f in frames {
        f.encode(&mut b);
    }
    raw.ws.send(Message::Binary(b.freeze())).await.unwrap();
}

/// Next frame from the agent (skipping pings); `None` when it closed.
async fn recv(raw: &mut Raw) -> Option<Frame> {
    loop {
        if let Some(f) = raw.pending.pop_front() {
            return Some(f);
        }
        match tokio::time::timeout(Duration::from_secs(5), raw.ws.next())
            .await
            .ok()??
        {
            Ok(Message::Binary(b)) => raw.pending.extend(Frame::decode_all(b).unwrap()),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

fn open(id: u32) -> Frame {
    Frame::Open {
        id,
        target: Target::SelfPort(22),
        window: 65536,
    }
}

#[tokio::test]
async fn data_beyond_the_window_resets_only_that_stream() {
    tokio::time::timeout(Duration::from_secs(10), async {
        let config = MuxConfig {
            window: 32 * 1024,
            ..MuxConfig::default()
        };
        let (agent, mut incoming, mut raw) = raw_peer(config).await;
        send(&mut raw, &[open(1), open(2)]).await;
        let mut s1 = incoming.recv().await.unwrap().stream;
        let mut s2 = incoming.recv().await.unwrap().stream;
        agent.accept(&s1);
        agent.accept(&s2);
        assert!(matches!(
            recv(&mut raw).await,
            Some(Frame::OpenOk { id: 1, .. })
        ));
        assert!(matches!(
            recv(&mut raw).await,
            Some(Frame::OpenOk { id: 2, .. })
        ));
        let chunk = bytes::Bytes::from(vec![1u8; 16 * 1024]);
        // Stream 2 gets one legal chunk; stream 1 gets three (48 KiB > 32 KiB).
        send(
            &mut raw,
            &[Frame::Data {
                id: 2,
                data: bytes::Bytes::from_static(b"two"),
            }],
        )
        .await;
        for _ in 0..3 {
            send(
                &mut raw,
                &[Frame::Data {
                    id: 1,
                    data: chunk.clone(),
                }],
            )
            .await;
        }
        assert_eq!(
            recv(&mut raw).await,
            Some(Frame::Rst {
                id: 1,
                code: RstCode::Protocol
            })
        );
        // Stream 1 saw its two legal chunks, then the reset; no byte of
        // stream 2 crossed over.
        let mut got1 = 0;
        loop {
            match s1.inbound.recv().await.unwrap() {
                super::session::Inbound::Data(d) => {
                    assert!(d.iter().all(|b| *b == 1));
                    got1 += d.len();
                }
                super::session::Inbound::Rst(RstCode::Protocol) => break,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(got1, 32 * 1024);
        match s2.inbound.recv().await.unwrap() {
            super::session::Inbound::Data(d) => assert_eq!(&d[..], b"two"),
            other => panic!("{other:?}"),
        }
        assert_eq!(agent.stream_count(), 1);
        assert!(!agent.is_closed());
    })
    .await
    .expect("timed out");
}

#[tokio::test]
async fn data_after_fin_and_unknown_streams() {
    tokio::time::timeout(Duration::from_secs(10), async {
        let (agent, mut incoming, mut raw) = raw_peer(MuxConfig::default()).await;
        send(&mut raw, &[open(5)]).await;
        let s = incoming.recv().await.unwrap().stream;
        agent.accept(&s);
        assert!(matches!(
            recv(&mut raw).await,
            Some(Frame::OpenOk { id: 5, .. })
        ));
        // DATA for a stream that never existed is dropped, not delivered.
        send(
            &mut raw,
            &[Frame::Data {
                id: 77,
                data: bytes::Bytes::from_static(b"x"),
            }],
        )
        .await;
        send(
            &mut raw,
            &[
                Frame::Fin { id: 5 },
                Frame::Data {
                    id: 5,
                    data: bytes::Bytes::from_static(b"late"),
                },
            ],
        )
        .await;
        assert_eq!(
            recv(&mut raw).await,
            Some(Frame::Rst {
                id: 5,
                code: RstCode::Protocol
            })
        );
        assert!(!agent.is_closed());
        drop(s);
    })
    .await
    .expect("timed out");
}

#[tokio::test]
async fn reusing_a_live_stream_id_closes_the_session() {
    tokio::time::timeout(Duration::from_secs(10), async {
        let (agent, mut incoming, mut raw) = raw_peer(MuxConfig::default()).await;
        send(&mut raw, &[open(3)]).await;
        let _s = incoming.recv().await.unwrap();
        send(&mut raw, &[open(3)]).await;
        assert_eq!(recv(&mut raw).await, None, "session closed");
        assert!(agent.is_closed());
    })
    .await
    .expect("timed out");
}

#[tokio::test]
async fn a_flood_of_opens_is_refused_beyond_the_cap() {
    tokio::time::timeout(Duration::from_secs(10), async {
        let config = MuxConfig {
            max_streams: 8,
            ..MuxConfig::default()
        };
        let (_agent, mut incoming, mut raw) = raw_peer(config).await;
        let frames: Vec<Frame> = (1..=20).map(open).collect();
        send(&mut raw, &frames).await;
        let mut busy = 0;
        while busy < 12 {
            match recv(&mut raw).await {
                Some(Frame::OpenErr {
                    code: OpenErrCode::Busy,
                    ..
                }) => busy += 1,
                other => panic!("{other:?}"),
            }
        }
        let mut accepted = 0;
        while incoming.try_recv().is_ok() {
            accepted += 1;
        }
        assert_eq!(accepted, 8);
    })
    .await
    .expect("timed out");
}

#[tokio::test]
async fn a_window_overflow_resets_the_stream() {
    tokio::time::timeout(Duration::from_secs(10), async {
        let (agent, mut incoming, mut raw) = raw_peer(MuxConfig::default()).await;
        send(&mut raw, &[open(1)]).await;
        let s = incoming.recv().await.unwrap().stream;
        agent.accept(&s);
        assert!(matches!(
            recv(&mut raw).await,
            Some(Frame::OpenOk { id: 1, .. })
        ));
        let huge: Vec<Frame> = (0..40)
            .map(|_| Frame::Window {
                id: 1,
                increment: 4 << 20,
            })
            .collect();
        send(&mut raw, &huge).await;
        assert_eq!(
            recv(&mut raw).await,
            Some(Frame::Rst {
                id: 1,
                code: RstCode::Protocol
            })
        );
    })
    .await
    .expect("timed out");
}

#[tokio::test]
async fn framing_errors_close_the_session() {
    tokio::time::timeout(Duration::from_secs(10), async {
        for bad in [
            vec![0x7fu8, 0, 0, 0, 1, 0, 0, 0, 0],
            vec![5, 0, 0, 0, 1, 0, 0],
        ] {
            let (agent, _incoming, mut raw) = raw_peer(MuxConfig::default()).await;
            raw.send(Message::Binary(bad.into())).await.unwrap();
            assert_eq!(recv(&mut raw).await, None);
            assert!(agent.is_closed());
        }
        let (agent, _incoming, mut raw) = raw_peer(MuxConfig::default()).await;
        raw.send(Message::Text("hello".into())).await.unwrap();
        assert_eq!(recv(&mut raw).await, None);
        assert!(agent.is_closed());
    })
    .await
    .expect("timed out");
}
