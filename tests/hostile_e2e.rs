//! Hostile clients: TLS versions and plain HTTP on the TLS port, slowloris
//! against a live tunnel, and an authentication flood.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::stack::{self, basic, open_tunnel, Stack, DOMAIN, PASS, USER};
use support::{require_tool, SinkServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn openssl(stack: &Stack, extra: &[&str]) -> (bool, String) {
    let out = support::run_with_timeout(
        std::process::Command::new(require_tool("openssl"))
            .args(["s_client", "-connect", &stack.proxy(), "-CAfile"])
            .arg(stack.ca())
            .args(extra),
        Duration::from_secs(20),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (
        out.status.success() && text.contains("Verify return code: 0"),
        text,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_tls_1_2_and_1_3_with_http_1_1() {
    let stack = Stack::start().await;
    let (ok, text) = openssl(&stack, &["-tls1_3", "-alpn", "h2,http/1.1"]);
    assert!(ok, "{text}");
    assert!(text.contains("ALPN protocol: http/1.1"), "{text}");
    let (ok, text) = openssl(&stack, &["-tls1_2"]);
    assert!(ok, "{text}");
    // TLS 1.1 and 1.0 are refused by the server (the client is told to
    // allow them).
    for v in ["-tls1_1", "-tls1"] {
        let (ok, text) = openssl(&stack, &[v, "-cipher", "DEFAULT@SECLEVEL=0"]);
        assert!(!ok, "{v} accepted: {text}");
        // rustls answers a TLS 1.0/1.1 hello with a handshake_failure alert.
        assert!(
            text.contains("no peer certificate available"),
            "{v}: {text}"
        );
    }
    // h2 only: no ALPN overlap, no handshake.
    let (ok, text) = openssl(&stack, &["-alpn", "h2"]);
    assert!(!ok, "{text}");
    assert!(text.contains("no application protocol"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_on_the_tls_port_gets_nothing() {
    let stack = Stack::start().await;
    let mut tcp = tokio::net::TcpStream::connect(stack.addr).await.unwrap();
    tcp.write_all(
        format!(
            "CONNECT 1234.{DOMAIN}:22 HTTP/1.1\r\nProxy-Authorization: {}\r\n\r\n",
            basic(USER, PASS)
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), tcp.read_to_end(&mut out))
        .await
        .expect("closed")
        .ok();
    assert!(
        !String::from_utf8_lossy(&out).contains("HTTP/1.1"),
        "{out:?}"
    );
}

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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
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
            tokio::time::sleep(Duration::from_millis(400)).await;
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
    const HEAD_DEADLINE: Duration = Duration::from_secs(6);
    const BYTES: u64 = 48 * 1024 * 1024;
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
        for _ in 0..3 {
            base.push(download(&stack, source.port(), BYTES).await);
        }
        let gate = Arc::new(tokio::sync::Barrier::new(SLOW + 1));
        let slow: Vec<_> = (0..SLOW)
            .map(|_| tokio::spawn(slow_client(stack.addr, stack.ca(), gate.clone())))
            .collect();
        // All slow connections are through their handshakes and trickling.
        gate.wait().await;
        let mut during = Vec::new();
        for _ in 0..3 {
            during.push(download(&stack, source.port(), BYTES).await);
        }
        let (b, d) = (median(base), median(during));
        eprintln!(
            "tunnel throughput: baseline {:.0} MB/s, during slowloris {:.0} MB/s ({:.0}%)",
            b / 1e6,
            d / 1e6,
            100.0 * d / b
        );
        assert!(
            d >= 0.9 * b,
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

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A TLS connection from a chosen loopback source address.
async fn tls_from(
    stack: &Stack,
    src: [u8; 4],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::from((src, 0))).unwrap();
    let tcp = sock.connect(stack.addr).await.unwrap();
    let config = maintgate::tls::client_config(Some(&stack.ca())).unwrap();
    let name =
        rustls_pki_types::ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into());
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auth_flood_does_not_lock_out_other_accounts() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let echo = support::EchoServer::start();
        let mut stack = Stack::start().await;
        let token = stack.add_system("1234", "ipo1", true).await;
        stack.start_agent(&token, stack::services(&[echo.port()]));
        stack.wait_agent("1234", "ipo1").await;
        let store = stack.state.store();
        store.add_account("bob", &maintgate::secret::hash_password("bobs-password").unwrap()).await.unwrap();
        let dest = format!("1234.{DOMAIN}:{}", echo.port());
        // Warm up allocators and caches before measuring memory.
        open_tunnel(&stack, &dest).await;
        let rss_before = rss_kib();

        let flood_start = Instant::now();
        let stop = flood_start + Duration::from_secs(6);
        // RSS every 250 ms while the flood runs.
        let sampler = tokio::spawn(async move {
            let mut samples = Vec::new();
            while Instant::now() < stop {
                samples.push((flood_start.elapsed(), rss_kib()));
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            samples
        });
        let attempts = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let flood: Vec<_> = (0..32)
            .map(|i| {
                let attempts = attempts.clone();
                let dest = dest.clone();
                let user = if i % 2 == 0 { "bob".to_string() } else { format!("nobody{i}") };
                let req = format!("CONNECT {dest} HTTP/1.1\r\nProxy-Authorization: {}\r\n\r\n", basic(&user, "guess"));
                let stack = &stack;
                async move {
                    while Instant::now() < stop {
                        let mut tls = tls_from(stack, [127, 0, 0, 2]).await;
                        for _ in 0..3 {
                            if tls.write_all(req.as_bytes()).await.is_err() {
                                break;
                            }
                            let mut buf = [0u8; 512];
                            match tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf)).await {
                                Ok(Ok(n)) if n > 0 => {
                                    assert!(buf.starts_with(b"HTTP/1.1 407 "), "{:?}", String::from_utf8_lossy(&buf[..n]));
                                    attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                }
                                _ => break,
                            }
                        }
                    }
                }
            })
            .collect();
        let good = async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let start = Instant::now();
            let mut tls = tls_from(&stack, [127, 0, 0, 3]).await;
            tls.write_all(format!("CONNECT {dest} HTTP/1.1\r\nProxy-Authorization: {}\r\n\r\n", basic(USER, PASS)).as_bytes()).await.unwrap();
            let head = stack::read_response_head(&mut tls).await;
            (head, start.elapsed())
        };
        let (_, (head, took)) = tokio::join!(futures_util::future::join_all(flood), good);
        let auth = stack.state.auth();
        let n = attempts.load(std::sync::atomic::Ordering::Relaxed);
        eprintln!(
            "flood: {n} refused attempts, {} hashes, {} throttled, {} lockouts; good login in {took:?}; max concurrent hashes {}",
            auth.counters.hashes.load(std::sync::atomic::Ordering::Relaxed),
            auth.counters.throttled.load(std::sync::atomic::Ordering::Relaxed),
            auth.counters.lockouts.load(std::sync::atomic::Ordering::Relaxed),
            auth.max_concurrent_hashes_seen()
        );
        assert_eq!(head, "HTTP/1.1 200 Connection established\r\n\r\n");
        assert!(took <= Duration::from_secs(1), "good login took {took:?}");
        assert!(n > 100, "the flood was too small to mean anything: {n}");
        assert!(auth.max_concurrent_hashes_seen() <= 2);
        assert!(auth.counters.lockouts.load(std::sync::atomic::Ordering::Relaxed) >= 1, "bob was not locked out");
        // Flat: after a warm-up (hasher threads' arenas, TLS buffers, the
        // client side of this very test), no further growth while the flood
        // goes on.
        let samples = sampler.await.unwrap();
        eprintln!("RSS before the flood {rss_before} KiB; during: {:?}", samples.iter().map(|(t, r)| format!("{:.1}s:{}M", t.as_secs_f64(), r / 1024)).collect::<Vec<_>>());
        let warm = samples.iter().find(|(t, _)| *t >= Duration::from_secs(2)).unwrap().1;
        let last = samples.last().unwrap().1;
        assert!(last <= warm + 32 * 1024, "memory kept growing during the flood: {warm} KiB at 2 s, {last} KiB at the end");
        // bob is locked now: even the right password gets the same 407.
        let reply = stack::raw_exchange(&stack, format!("CONNECT {dest} HTTP/1.1\r\nProxy-Authorization: {}\r\n\r\n", basic("bob", "bobs-password")).as_bytes()).await;
        let wrong = stack::raw_exchange(&stack, format!("CONNECT {dest} HTTP/1.1\r\nProxy-Authorization: {}\r\n\r\n", basic("nobody", "x")).as_bytes()).await;
        assert_eq!(reply, wrong);
    })
    .await
    .expect("timed out");
}
