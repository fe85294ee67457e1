//! Slowloris: a thousand connections trickling request heads while a real
//! tunnel moves data. Its own test binary, so nothing else shares the
//! process or the measurement.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::stack::{self, open_tunnel, Stack, DOMAIN};
use support::SinkServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn download(stack: &Stack, port: u16, bytes: u64) -> f64 {
    let mut t = open_tunnel(stack, &format!("1234.{DOMAIN}:{port}")).await;
    let start = Instant::now();
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0u64;
    loop {
        let r = t.read(&mut buf).await.unwrap();
        if r == 0 {
            break;
        }
        n += r as u64;
    }
    assert_eq!(n, bytes);
    n as f64 / start.elapsed().as_secs_f64()
}

/// The best of several rounds: other processes on a shared machine only
/// ever slow a round down, so the best round is the tunnel's own rate.
fn best(v: &[f64]) -> f64 {
    v.iter().cloned().fold(0.0, f64::max)
}

/// One slowloris connection: handshake, then a head trickled a byte at a
/// time. Returns how long after the handshake the broker closed it.
async fn slow_client(
    addr: SocketAddr,
    ca: std::path::PathBuf,
    gate: Arc<tokio::sync::Barrier>,
) -> Duration {
    let config = maintgate::tls::client_config(Some(&ca)).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name =
        rustls_pki_types::ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into());
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let shook = Instant::now();
    gate.wait().await;
    let (mut rd, mut wr) = tokio::io::split(tls);
    let trickle = async {
        for b in b"CONNECT 1234.maint.test:22 HTTP/1.1\r\nX-Slow: "
            .iter()
            .chain(std::iter::repeat(&b'a'))
        {
            if wr.write_all(&[*b]).await.is_err() {
                break;
            }
            // One byte a second: slow enough to hold a connection open, and
            // (with 1,000 clients in this very process) cheap enough that the
            // test measures the broker, not its own clients.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    let mut sink = Vec::new();
    tokio::select! {
        _ = trickle => {}
        _ = rd.read_to_end(&mut sink) => {}
    }
    shook.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_does_not_starve_a_live_tunnel() {
    const SLOW: usize = 1000;
    const HEAD_DEADLINE: Duration = Duration::from_secs(8);
    const BYTES: u64 = 32 * 1024 * 1024;
    tokio::time::timeout(Duration::from_secs(240), async {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = stack::test_settings(dir.path());
        settings.limits.head_timeout = HEAD_DEADLINE;
        settings.limits.max_connections_per_source = 4 * SLOW;
        let mut stack = Stack::start_with(dir, settings).await;
        let source = SinkServer::serve_bytes(BYTES);
        let token = stack.add_system("1234", "ipo1", true).await;
        stack.start_agent(&token, stack::services(&[source.port()]));
        stack.wait_agent("1234", "ipo1").await;

        let mut base = Vec::new();
        for _ in 0..5 {
            base.push(download(&stack, source.port(), BYTES).await);
        }
        let gate = Arc::new(tokio::sync::Barrier::new(SLOW + 1));
        let slow: Vec<_> = (0..SLOW)
            .map(|_| tokio::spawn(slow_client(stack.addr, stack.ca(), gate.clone())))
            .collect();
        // All slow connections are through their handshakes and trickling.
        gate.wait().await;
        let mut during = Vec::new();
        for _ in 0..5 {
            during.push(download(&stack, source.port(), BYTES).await);
        }
        let (b, d) = (best(&base), best(&during));
        eprintln!(
            "tunnel throughput: baseline {:.0} MB/s, during slowloris {:.0} MB/s ({:.0}%)",
            b / 1e6,
            d / 1e6,
            100.0 * d / b
        );
        // Starvation shows as a collapse. The bar sits below the spread a
        // shared CI machine adds to best-of-5 runs (a fresh-clone run with
        // a compile beside it measured 89%).
        assert!(
            d >= 0.75 * b,
            "throughput fell to {:.0}% of normal",
            100.0 * d / b
        );
        let mut worst = Duration::ZERO;
        for s in slow {
            worst = worst.max(s.await.unwrap());
        }
        eprintln!("slowest slowloris close: {worst:?} after its handshake");
        assert!(worst <= HEAD_DEADLINE + Duration::from_secs(1), "{worst:?}");
    })
    .await
    .expect("timed out");
}
