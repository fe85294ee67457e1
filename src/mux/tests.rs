//! Session tests over an in-memory WebSocket: no sockets, no real time
//! dependence beyond bounded timeouts.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::Role as WsRole;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use super::session::ws_config;
use super::*;

async fn pair(config: MuxConfig) -> (Mux, Mux, tokio::sync::mpsc::Receiver<Incoming>) {
    let (a, b) = tokio::io::duplex(256 * 1024);
    let wa = WebSocketStream::from_raw_socket(a, WsRole::Client, Some(ws_config())).await;
    let wb = WebSocketStream::from_raw_socket(b, WsRole::Server, Some(ws_config())).await;
    let (agent, incoming, _) =
        Mux::start(wa, Role::Agent, config.clone(), CancellationToken::new());
    let (broker, _, _) = Mux::start(wb, Role::Broker, config, CancellationToken::new());
    (broker, agent, incoming)
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
        let writer = {
            let payload = payload.clone();
            let (mut rd, mut wr) = tokio::io::split(far);
            let w = tokio::spawn(async move {
                wr.write_all(&payload).await.unwrap();
                wr.shutdown().await.unwrap();
            });
            let mut got = Vec::new();
            rd.read_to_end(&mut got).await.unwrap();
            w.await.unwrap();
            got
        };
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
        let (client, _far) = tokio::io::duplex(1024);
        let r = tokio::spawn(relay(
            stream,
            client,
            Bytes::new(),
            CancellationToken::new(),
            Arc::default(),
        ));
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
