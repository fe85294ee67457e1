//! The site agent against a real broker (and one fake broker): session
//! replacement, reconnect after a broker restart, local policy that holds
//! even when the broker is bypassed, and store changes from the CLI that
//! reach a running broker.

mod support;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use maintgate::mux::{Mux, MuxConfig, OpenErrCode, OpenError, Role, Target};
use support::stack::{self, open_tunnel, Stack, DOMAIN};
use support::EchoServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(60);

async fn echo_roundtrip<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    msg: &[u8],
) {
    s.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(got, msg);
}

async fn session_of(
    stack: &Stack,
    customer: &str,
    system: &str,
) -> Option<Arc<maintgate::registry::AgentSession>> {
    let sys = stack
        .state
        .store()
        .find_system(customer, Some(system))
        .await
        .unwrap()?;
    stack.state.registry().agent(sys.id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_session_with_the_same_token_replaces_the_first() {
    tokio::time::timeout(T, async {
        let echo = EchoServer::start();
        let stack = Stack::start().await;
        let token = stack.add_system("1234", "ipo1", true).await;
        let settings = Arc::new(stack.agent_settings(&token, stack::services(&[echo.port()])));
        // Single attempts (no reconnect loop), so the test is deterministic.
        let first = tokio::spawn(maintgate::agent::connect_and_serve(
            settings.clone(),
            CancellationToken::new(),
        ));
        stack.wait_agent("1234", "ipo1").await;
        let s1 = session_of(&stack, "1234", "ipo1").await.unwrap();
        let mut tunnel = open_tunnel(&stack, &format!("1234.{DOMAIN}:{}", echo.port())).await;
        echo_roundtrip(&mut tunnel, b"before").await;

        let second = tokio::spawn(maintgate::agent::connect_and_serve(
            settings.clone(),
            CancellationToken::new(),
        ));
        // The first link ends because it was replaced…
        let end = tokio::time::timeout(Duration::from_secs(10), first)
            .await
            .expect("first session ends")
            .unwrap();
        assert!(end.is_ok(), "{end:?}");
        let s2 = session_of(&stack, "1234", "ipo1")
            .await
            .expect("second session registered");
        assert_ne!(s1.session_id, s2.session_id);
        assert!(s1.mux.is_closed());
        // …its tunnel ended with it, and new tunnels go over the second.
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), tunnel.read(&mut buf))
            .await
            .expect("old tunnel closes");
        assert!(matches!(n, Ok(0) | Err(_)));
        let mut tunnel = open_tunnel(&stack, &format!("1234.{DOMAIN}:{}", echo.port())).await;
        echo_roundtrip(&mut tunnel, b"after").await;
        assert_eq!(s2.mux.opens(), 1);
        assert_eq!(stack.state.registry().agents().len(), 1);
        second.abort();
    })
    .await
    .expect("timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_reconnects_after_a_broker_restart() {
    tokio::time::timeout(T, async {
        let echo = EchoServer::start();
        let mut stack = Stack::start().await;
        let token = stack.add_system("1234", "ipo1", true).await;
        stack.start_agent(&token, stack::services(&[echo.port()]));
        stack.wait_agent("1234", "ipo1").await;
        let mut t = open_tunnel(&stack, &format!("1234.{DOMAIN}:{}", echo.port())).await;
        echo_roundtrip(&mut t, b"one").await;

        let port = stack.port();
        let stack = stack.restart().await;
        assert_eq!(stack.port(), port);
        let started = Instant::now();
        stack.wait_agent("1234", "ipo1").await;
        let mut t = open_tunnel(&stack, &format!("1234.{DOMAIN}:{}", echo.port())).await;
        echo_roundtrip(&mut t, b"two").await;
        eprintln!("agent back after {:?}", started.elapsed());
    })
    .await
    .expect("timed out");
}

/// A fake broker sends OPEN frames the real broker would never send; the
/// agent's own policy refuses them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_refuses_targets_outside_its_policy_even_from_a_rogue_broker() {
    tokio::time::timeout(T, async {
        let echo = EchoServer::start();
        let dir = tempfile::tempdir().unwrap();
        let paths = maintgate::tls::CertPaths {
            dir: dir.path().to_path_buf(),
        };
        maintgate::tls::ensure_certs(&paths, DOMAIN).unwrap();
        let resolver =
            maintgate::tls::CertResolver::new(maintgate::tls::load_certified_key(&paths).unwrap());
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(
            maintgate::tls::server_config(resolver).unwrap(),
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();

        // Loopback configured as a co-located tunnel: refused all the same.
        let policy = stack::with_tunnels(
            &[echo.port()],
            &[
                (Ipv4Addr::LOCALHOST, echo.port()),
                (Ipv4Addr::new(169, 254, 169, 254), 80),
            ],
        );
        let file: maintgate::agent::config::AgentFile = toml::from_str("").unwrap();
        let mut settings = maintgate::agent::AgentSettings::from_parts(
            file,
            format!("wss://localhost:{port}/agent"),
            maintgate::secret::Secret::new("mgt_whatever".into()),
            Some(paths.ca()),
        )
        .unwrap();
        settings.policy = policy;
        let cancel = CancellationToken::new();
        let agent = tokio::spawn(maintgate::agent::run(settings, cancel.clone()));

        let (tcp, _) = listener.accept().await.unwrap();
        let tls = acceptor.accept(tcp).await.unwrap();
        let mut ws = tokio_tungstenite::accept_async_with_config(
            tls,
            Some(maintgate::mux::session::ws_config()),
        )
        .await
        .unwrap();
        let _hello = ws.next().await.unwrap().unwrap();
        let (mux, _, _) = Mux::start(
            ws,
            Role::Broker,
            MuxConfig::default(),
            CancellationToken::new(),
        );

        // Sanity: a listed service opens.
        assert!(mux.open(Target::SelfPort(echo.port())).await.is_ok());
        let forbidden = [
            Target::SelfPort(echo.port().wrapping_add(1).max(1)),
            Target::CoLocated(Ipv4Addr::LOCALHOST, echo.port()),
            Target::CoLocated(Ipv4Addr::new(127, 0, 0, 2), echo.port()),
            Target::CoLocated(Ipv4Addr::new(169, 254, 169, 254), 80),
            Target::CoLocated(Ipv4Addr::new(10, 1, 2, 3), 22),
            Target::CoLocated(Ipv4Addr::UNSPECIFIED, echo.port()),
        ];
        for t in forbidden {
            match mux.open(t).await {
                Err(OpenError::Agent(OpenErrCode::Forbidden, _)) => {}
                other => panic!("{t}: expected Forbidden, got {other:?}"),
            }
        }
        cancel.cancel();
        let _ = agent.await;
    })
    .await
    .expect("timed out");
}

fn cli(stack: &Stack, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_maintgate"))
        .arg("--data-dir")
        .arg(&stack.settings.data_dir)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "maintgate {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabling_an_account_with_the_cli_ends_its_live_tunnel() {
    tokio::time::timeout(T, async {
        let echo = EchoServer::start();
        let mut stack = Stack::start().await;
        let token = stack.add_system("1234", "ipo1", true).await;
        stack.start_agent(&token, stack::services(&[echo.port()]));
        stack.wait_agent("1234", "ipo1").await;
        let mut t = open_tunnel(&stack, &format!("1234.{DOMAIN}:{}", echo.port())).await;
        echo_roundtrip(&mut t, b"live").await;

        let started = Instant::now();
        cli(&stack, &["account", "disable", stack::USER]);
        let mut buf = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(5), t.read(&mut buf))
            .await
            .expect("tunnel ends within 5 s");
        assert!(matches!(r, Ok(0) | Err(_)));
        eprintln!(
            "tunnel ended {:?} after the CLI returned",
            started.elapsed()
        );
        // And new CONNECTs are refused.
        let reply = stack::raw_exchange(
            &stack,
            format!(
                "CONNECT 1234.{DOMAIN}:{} HTTP/1.1\r\nProxy-Authorization: {}\r\n\r\n",
                echo.port(),
                stack::basic(stack::USER, stack::PASS)
            )
            .as_bytes(),
        )
        .await;
        assert!(String::from_utf8_lossy(&reply).starts_with("HTTP/1.1 407 "));
        cli(&stack, &["account", "enable", stack::USER]);
        let mut t = open_tunnel(&stack, &format!("1234.{DOMAIN}:{}", echo.port())).await;
        echo_roundtrip(&mut t, b"back").await;
    })
    .await
    .expect("timed out");
}

/// Connects an agent for system ipo1, runs `maintgate system <change> 1234
/// ipo1`, and checks that the session ends within 5 s and the old token no
/// longer gets in. Returns the stack, the echo server and the CLI output.
async fn token_change_ends_the_session(change: &str) -> (Stack, EchoServer, String) {
    let echo = EchoServer::start();
    let stack = Stack::start().await;
    let token = stack.add_system("1234", "ipo1", true).await;
    let settings = Arc::new(stack.agent_settings(&token, stack::services(&[echo.port()])));
    let link = tokio::spawn(maintgate::agent::connect_and_serve(
        settings.clone(),
        CancellationToken::new(),
    ));
    stack.wait_agent("1234", "ipo1").await;
    let out = cli(&stack, &["system", change, "1234", "ipo1"]);
    tokio::time::timeout(Duration::from_secs(5), link)
        .await
        .expect("session closed within 5 s")
        .unwrap()
        .unwrap();
    let again = maintgate::agent::connect_and_serve(settings, CancellationToken::new()).await;
    assert!(again.is_err(), "the old token still gets in: {again:?}");
    assert!(!out.contains(&token), "{out}");
    (stack, echo, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_a_token_with_the_cli_closes_the_agent_session() {
    tokio::time::timeout(T, async {
        let (stack, echo, out) = token_change_ends_the_session("rotate-token").await;
        let new_token = out.lines().last().unwrap().trim().to_string();
        assert!(new_token.starts_with("mgt_"), "{out}");
        // The new token gets in.
        let fresh = Arc::new(stack.agent_settings(&new_token, stack::services(&[echo.port()])));
        let link = tokio::spawn(maintgate::agent::connect_and_serve(
            fresh,
            CancellationToken::new(),
        ));
        stack.wait_agent("1234", "ipo1").await;
        link.abort();
    })
    .await
    .expect("timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_token_with_the_cli_closes_the_session_and_keeps_the_agent_out() {
    tokio::time::timeout(T, async {
        let (_stack, _echo, out) = token_change_ends_the_session("revoke-token").await;
        assert!(out.contains("revoked") && !out.contains("mgt_"), "{out}");
    })
    .await
    .expect("timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_target_is_502() {
    tokio::time::timeout(T, async {
        // Bind and drop: nothing listens on this port any more.
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut stack = Stack::start().await;
        let token = stack.add_system("1234", "ipo1", true).await;
        stack.start_agent(&token, stack::services(&[dead]));
        stack.wait_agent("1234", "ipo1").await;
        let reply = stack::raw_exchange(
            &stack,
            format!(
                "CONNECT 1234.{DOMAIN}:{dead} HTTP/1.1\r\nProxy-Authorization: {}\r\n\r\n",
                stack::basic(stack::USER, stack::PASS)
            )
            .as_bytes(),
        )
        .await;
        assert!(
            String::from_utf8_lossy(&reply)
                .starts_with("HTTP/1.1 502 Target refused the connection\r\n"),
            "{}",
            String::from_utf8_lossy(&reply)
        );
    })
    .await
    .expect("timed out");
}
