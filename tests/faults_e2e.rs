//! Faults we must survive: an agent killed mid-stream, a target that never
//! answers, a slow reader, a stalled agent uplink, a broker restart with
//! many agents, and a certificate swapped for a broken file.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::stack::{self, basic, open_tunnel, raw_exchange, Stack, DOMAIN, PASS, USER};
use support::{ChildGuard, EchoServer, SinkServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_closes_its_tunnels_within_a_second() {
    tokio::time::timeout(T, async {
        let echo = EchoServer::start();
        let stack = Stack::start().await;
        let token = stack.add_system("1234", "ipo1", true).await;
        // A real agent process, killed with SIGKILL.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("agent.token"), &token).unwrap();
        std::fs::write(
            dir.path().join("agent.toml"),
            format!(
                "broker = \"wss://localhost:{}/agent\"\nca = \"{}\"\ntoken_file = \"agent.token\"\nremote_access = true\nservices = [{}]\nco_located = false\n",
                stack.port(),
                stack.ca().display(),
                echo.port()
            ),
        )
        .unwrap();
        let mut agent = ChildGuard::spawn(
            std::process::Command::new(env!("CARGO_BIN_EXE_maintgate"))
                .arg("agent")
                .arg("--config")
                .arg(dir.path().join("agent.toml"))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null()),
        );
        stack.wait_agent("1234", "ipo1").await;
        let mut t = open_tunnel(&stack, &format!("1234.{DOMAIN}:{}", echo.port())).await;
        t.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        t.read_exact(&mut b).await.unwrap();
        agent.kill();
        let killed = Instant::now();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), t.read_to_end(&mut rest)).await.expect("client sees the close");
        let took = killed.elapsed();
        eprintln!("client saw the close {took:?} after SIGKILL");
        assert!(took <= Duration::from_secs(1), "{took:?}");
        // The system is offline now: 503.
        let reply = raw_exchange(&stack, format!("CONNECT 1234.{DOMAIN}:{} HTTP/1.1\r\nProxy-Authorization: {}\r\n\r\n", echo.port(), basic(USER, PASS)).as_bytes()).await;
        assert!(String::from_utf8_lossy(&reply).starts_with("HTTP/1.1 503 "));
    })
    .await
    .expect("timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_never_answers_is_504_at_the_dial_deadline() {
    tokio::time::timeout(T, async {
        // A listener whose accept queue is full: further SYNs are dropped,
        // so a dial hangs until its deadline.
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = sock.listen(1).unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut fillers = Vec::new();
        for _ in 0..8 {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            match tokio::time::timeout(
                Duration::from_millis(300),
                s.connect(SocketAddr::from(([127, 0, 0, 1], port))),
            )
            .await
            {
                Ok(Ok(c)) => fillers.push(c),
                _ => break,
            }
        }
        let mut stack = Stack::start().await;
        let token = stack.add_system("1234", "ipo1", true).await;
        stack.start_agent(&token, stack::services(&[port])); // dial_timeout_ms = 2000 in the stack
        stack.wait_agent("1234", "ipo1").await;
        let start = Instant::now();
        let reply = raw_exchange(
            &stack,
            format!(
                "CONNECT 1234.{DOMAIN}:{port} HTTP/1.1\r\nProxy-Authorization: {}\r\n\r\n",
                basic(USER, PASS)
            )
            .as_bytes(),
        )
        .await;
        let took = start.elapsed();
        assert!(
            String::from_utf8_lossy(&reply)
                .starts_with("HTTP/1.1 504 Target did not answer in time\r\n"),
            "{}",
            String::from_utf8_lossy(&reply)
        );
        assert!(
            took >= Duration::from_millis(1900) && took <= Duration::from_secs(4),
            "{took:?}"
        );
        drop(listener);
    })
    .await
    .expect("timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_is_held_to_its_window_while_others_flow() {
    tokio::time::timeout(T, async {
        let source = SinkServer::serve_bytes(1 << 30);
        let echo = EchoServer::start();
        let mut stack = Stack::start().await;
        let token = stack.add_system("1234", "ipo1", true).await;
        stack.start_agent(&token, stack::services(&[source.port(), echo.port()]));
        stack.wait_agent("1234", "ipo1").await;
        let agent = stack.state.registry().agents().pop().unwrap();

        // A client that never reads from a target that never stops.
        let _stalled = open_tunnel(&stack, &format!("1234.{DOMAIN}:{}", source.port())).await;
        // The tunnel is registered right after its 200.
        let tunnel = support::poll_until("tunnel registered", Duration::from_secs(5), || stack.state.registry().tunnels().pop());
        // Wait until the flow has stopped growing.
        let mut last = (0, 0);
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = (agent.mux.byte_counts().0, tunnel.stats.get().1);
            if now == last && now.0 > 0 {
                break;
            }
            last = now;
        }
        let (arrived, written) = last;
        eprintln!("slow reader: {arrived} bytes arrived at the broker, {written} written to the client socket");
        // Buffered in the broker for this tunnel: at most one window.
        assert!(arrived - written <= stack.settings.mux.window as u64, "{arrived} - {written}");

        // Meanwhile another tunnel on the same agent moves 20 MB promptly.
        let mut t = open_tunnel(&stack, &format!("1234.{DOMAIN}:{}", echo.port())).await;
        let start = Instant::now();
        let block = vec![9u8; 1 << 20];
        let (mut rd, mut wr) = tokio::io::split(&mut t);
        let w = async {
            for _ in 0..20 {
                wr.write_all(&block).await.unwrap();
            }
            // TLS: what the socket did not take yet waits in rustls until a
            // flush (or the next write).
            wr.flush().await.unwrap();
        };
        let r = async {
            let mut buf = vec![0u8; 1 << 16];
            let mut n = 0;
            while n < 20 << 20 {
                n += rd.read(&mut buf).await.unwrap();
            }
        };
        tokio::join!(w, r);
        eprintln!("other tunnel echoed 20 MiB in {:?}", start.elapsed());
        assert!(start.elapsed() < Duration::from_secs(20));
    })
    .await
    .expect("timed out");
}

/// One agent link (system 1234/ipo1, `token`) through a
/// [`freezable_relay`], with `tune` applied to the agent's settings; up
/// once this returns.
async fn link_through_freezable_relay(
    stack: &Stack,
    token: &str,
    tune: impl FnOnce(&mut maintgate::agent::AgentSettings),
) -> (
    tokio::task::JoinHandle<Result<maintgate::mux::SessionEnd, maintgate::agent::AgentError>>,
    Arc<tokio::sync::Notify>,
) {
    let (relay, freeze) = freezable_relay(stack.addr).await;
    let mut s = stack.agent_settings(token, stack::services(&[22]));
    s.broker = format!("wss://localhost:{}/agent", relay.port());
    s.broker_port = relay.port();
    tune(&mut s);
    let link = tokio::spawn(maintgate::agent::connect_and_serve(
        Arc::new(s),
        tokio_util::sync::CancellationToken::new(),
    ));
    stack.wait_agent("1234", "ipo1").await;
    (link, freeze)
}

/// A TCP relay that can be frozen: it stops moving bytes either way
/// without closing anything, like a stalled uplink.
async fn freezable_relay(to: SocketAddr) -> (SocketAddr, Arc<tokio::sync::Notify>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let freeze = Arc::new(tokio::sync::Notify::new());
    let f = freeze.clone();
    tokio::spawn(async move {
        let (a, _) = listener.accept().await.unwrap();
        let b = tokio::net::TcpStream::connect(to).await.unwrap();
        // The halves live outside the pump, so freezing keeps them open.
        let (mut ar, mut aw) = a.into_split();
        let (mut br, mut bw) = b.into_split();
        tokio::select! {
            _ = async { tokio::join!(tokio::io::copy(&mut ar, &mut bw), tokio::io::copy(&mut br, &mut aw)) } => {}
            _ = f.notified() => {}
        }
        // Frozen: the sockets stay open, nothing moves.
        std::future::pending::<()>().await;
        drop((ar, aw, br, bw));
    });
    (addr, freeze)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_uplink_is_declared_dead_by_the_keepalive() {
    tokio::time::timeout(T, async {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = stack::test_settings(dir.path());
        settings.mux.ping_interval = Duration::from_millis(300);
        settings.mux.dead_after = Duration::from_millis(1500);
        let stack = Stack::start_with(dir, settings).await;
        let token = stack.add_system("1234", "ipo1", true).await;
        let (link, freeze) = link_through_freezable_relay(&stack, &token, |s| {
            s.reconnect_min = Duration::from_secs(600);
        })
        .await;
        freeze.notify_one();
        let frozen = Instant::now();
        loop {
            if stack.state.registry().agents().is_empty() {
                break;
            }
            assert!(
                frozen.elapsed() < Duration::from_secs(10),
                "stalled agent never declared dead"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let took = frozen.elapsed();
        eprintln!("stalled uplink declared dead after {took:?} (dead_after 1.5 s)");
        assert!(
            took >= Duration::from_millis(1000) && took <= Duration::from_millis(3500),
            "{took:?}"
        );
        link.abort();
    })
    .await
    .expect("timed out");
}

/// The agent's side of a stalled link: its one-way heartbeats need no
/// answer (and a frozen relay's kernel still acknowledges them), so what
/// ends the link is the ping after them going unanswered, within
/// `dead_after - ping_interval`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_declares_a_stalled_link_dead_after_its_unanswered_ping() {
    tokio::time::timeout(T, async {
        let stack = Stack::start().await;
        let token = stack.add_system("1234", "ipo1", true).await;
        let (link, freeze) = link_through_freezable_relay(&stack, &token, |s| {
            s.mux.ping_interval = Duration::from_millis(300);
            s.mux.dead_after = Duration::from_millis(1500);
            s.mux.beats_per_ping = 3;
        })
        .await;
        freeze.notify_one();
        let frozen = Instant::now();
        let end = link.await.unwrap().expect("the link was up");
        let took = frozen.elapsed();
        eprintln!("agent ended the stalled link after {took:?}: {end:?}");
        assert!(matches!(end, maintgate::mux::SessionEnd::Dead), "{end:?}");
        // Three heartbeats and a ping at 300 ms intervals of silence, then
        // 1.2 s for the pong: 2.4 s after the last byte heard.
        assert!(
            took >= Duration::from_millis(2000) && took <= Duration::from_millis(5000),
            "{took:?}"
        );
    })
    .await
    .expect("timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_agents_come_back_after_a_broker_restart() {
    const N: usize = 200;
    tokio::time::timeout(T, async {
        let mut stack = Stack::start().await;
        for i in 0..N {
            let token = stack.add_system("1234", &format!("s{i}"), i == 0).await;
            stack.start_agent(&token, stack::services(&[22]));
        }
        let wait_all = |stack: &Stack| {
            let registry = stack.state.registry().clone();
            async move {
                let start = Instant::now();
                while registry.agents().len() < N {
                    assert!(
                        start.elapsed() < Duration::from_secs(60),
                        "only {} of {N} agents",
                        registry.agents().len()
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                start.elapsed()
            }
        };
        wait_all(&stack).await;
        let stack = stack.restart().await;
        let took = wait_all(&stack).await;
        eprintln!("{N} agents back {took:?} after the restart");
        let agents = stack.state.registry().agents();
        let mut ids: Vec<_> = agents.iter().map(|a| a.system_id).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), N, "duplicate or missing sessions");
        assert!(agents.iter().all(|a| !a.mux.is_closed()));
        // Stable: no agent keeps replacing another.
        let before: Vec<_> = agents.iter().map(|a| a.session_id).collect();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut after: Vec<_> = stack
            .state
            .registry()
            .agents()
            .iter()
            .map(|a| a.session_id)
            .collect();
        let mut before = before;
        before.sort();
        after.sort();
        assert_eq!(before, after, "sessions churned after reconnecting");
    })
    .await
    .expect("timed out");
}

/// The leaf certificate the broker serves to a client trusting `ca`.
async fn served_cert(stack: &Stack, ca: &std::path::Path) -> Vec<u8> {
    let config = maintgate::tls::client_config(Some(ca)).unwrap();
    let tcp = tokio::net::TcpStream::connect(stack.addr).await.unwrap();
    let name =
        rustls_pki_types::ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into());
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_certificate_file_leaves_the_old_one_in_use() {
    tokio::time::timeout(T, async {
        let echo = EchoServer::start();
        let mut stack = Stack::start().await;
        let token = stack.add_system("1234", "ipo1", true).await;
        stack.start_agent(&token, stack::services(&[echo.port()]));
        stack.wait_agent("1234", "ipo1").await;
        let mut live = open_tunnel(&stack, &format!("1234.{DOMAIN}:{}", echo.port())).await;
        let original = served_cert(&stack, &stack.ca()).await;
        let resolver = stack.state.resolver().clone();
        let certs = &stack.settings.certs_dir;

        std::fs::write(
            certs.join("server.pem"),
            "-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let start = Instant::now();
        while resolver.reload_failures.load(Ordering::Relaxed) == 0 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "watcher never saw the change"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            served_cert(&stack, &stack.ca()).await,
            original,
            "a broken file replaced the certificate"
        );

        // A good new pair (from another CA) is picked up without a restart,
        // and the live tunnel is untouched.
        let other = tempfile::tempdir().unwrap();
        let paths = maintgate::tls::CertPaths {
            dir: other.path().to_path_buf(),
        };
        maintgate::tls::ensure_certs(&paths, DOMAIN).unwrap();
        let both = other.path().join("both.pem");
        std::fs::write(
            &both,
            std::fs::read_to_string(stack.ca()).unwrap()
                + &std::fs::read_to_string(paths.ca()).unwrap(),
        )
        .unwrap();
        std::fs::copy(paths.key(), certs.join("server.key")).unwrap();
        std::fs::copy(paths.cert(), certs.join("server.pem")).unwrap();
        while resolver.reloads.load(Ordering::Relaxed) == 0 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "new certificate never loaded"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_ne!(served_cert(&stack, &both).await, original);
        live.write_all(b"still").await.unwrap();
        let mut b = [0u8; 5];
        live.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"still");
    })
    .await
    .expect("timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_the_connection_cap_connects_get_503_and_the_broker_keeps_serving() {
    tokio::time::timeout(T, async {
        let echo = EchoServer::start();
        let dir = tempfile::tempdir().unwrap();
        let mut settings = stack::test_settings(dir.path());
        settings.limits.max_connections = 20;
        let mut stack = Stack::start_with(dir, settings).await;
        let token = stack.add_system("1234", "ipo1", true).await;
        stack.start_agent(&token, stack::services(&[echo.port()]));
        stack.wait_agent("1234", "ipo1").await;
        let mut live = open_tunnel(&stack, &format!("1234.{DOMAIN}:{}", echo.port())).await;
        // The agent link and the live tunnel hold 2; 16 idle clients bring
        // the broker to 18 of 20 (the soft cap is 90%).
        let mut idle = Vec::new();
        for _ in 0..16 {
            idle.push(stack::tls_connect(&stack).await);
        }
        let request = format!(
            "CONNECT 1234.{DOMAIN}:{} HTTP/1.1\r\nProxy-Authorization: {}\r\n\r\n",
            echo.port(),
            basic(USER, PASS)
        );
        let reply = raw_exchange(&stack, request.as_bytes()).await;
        assert!(
            String::from_utf8_lossy(&reply).starts_with("HTTP/1.1 503 Broker overloaded"),
            "{}",
            String::from_utf8_lossy(&reply)
        );
        // What it already serves keeps working.
        live.write_all(b"still").await.unwrap();
        let mut b = [0u8; 5];
        live.read_exact(&mut b).await.unwrap();
        // Below the cap again, CONNECTs succeed.
        drop(idle);
        let start = Instant::now();
        loop {
            let reply = raw_exchange(&stack, request.as_bytes()).await;
            if String::from_utf8_lossy(&reply).starts_with("HTTP/1.1 200 ") {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "still refused after the idle clients left"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("timed out");
}
