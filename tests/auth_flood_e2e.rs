//! An authentication flood: memory stays flat, hashing stays bounded, and
//! other accounts still log in. Its own test binary, so the RSS measured is
//! this test's alone.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::stack::{self, basic, open_tunnel, Stack, DOMAIN, PASS, USER};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
        // Throttled attempts are counted, not audited row by row: the flood
        // cannot fill the audit store.
        let rows = stack
            .state
            .store()
            .audit_query(maintgate::store::audit::AuditFilter {
                limit: Some(100_000),
                ..Default::default()
            })
            .await
            .unwrap()
            .len() as u64;
        eprintln!("audit rows after the flood: {rows} for {n} refused attempts");
        assert!(rows < n / 5, "{rows} audit rows for {n} attempts");
        // bob is locked now: even the right password gets the same 407.
        let reply = stack::raw_exchange(&stack, format!("CONNECT {dest} HTTP/1.1\r\nProxy-Authorization: {}\r\n\r\n", basic("bob", "bobs-password")).as_bytes()).await;
        let wrong = stack::raw_exchange(&stack, format!("CONNECT {dest} HTTP/1.1\r\nProxy-Authorization: {}\r\n\r\n", basic("nobody", "x")).as_bytes()).await;
        assert_eq!(reply, wrong);
    })
    .await
    .expect("timed out");
}
