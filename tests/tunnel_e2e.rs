//! End to end with real clients: OpenSSH through proxytunnel to a real
//! sshd, curl to an HTTPS target, bulk transfers both ways, half-close.

mod support;

use std::time::Duration;

use sha2::{Digest, Sha256};
use support::stack::{self, open_tunnel, proxy_command, Stack, DOMAIN};
use support::{require_tool, EchoServer, HttpsServer, Netns, SinkServer, Sshd};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(60);

async fn run(cmd: &mut tokio::process::Command) -> std::process::Output {
    cmd.kill_on_drop(true);
    tokio::time::timeout(T, cmd.output())
        .await
        .expect("client timed out")
        .expect("client runs")
}

fn ssh_cmd(
    sshd: &Sshd,
    stack: &Stack,
    host: &str,
    port: u16,
    remote: &str,
) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(require_tool("ssh"));
    c.args(sshd.ssh_base_args())
        .arg("-o")
        .arg(format!("ProxyCommand={}", proxy_command(stack)))
        .arg("-p")
        .arg(port.to_string())
        .arg(format!("root@{host}"))
        .arg(remote);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_via_proxytunnel_reaches_the_system_itself() {
    require_tool("proxytunnel");
    let sshd = Sshd::start();
    let mut stack = Stack::start().await;
    let token = stack.add_system("1234", "ipo1", true).await;
    stack.start_agent(&token, stack::services(&[sshd.port()]));
    stack.wait_agent("1234", "ipo1").await;

    // Upper case: OpenSSH lowercases %h, routing must not care.
    for host in [format!("1234.{DOMAIN}"), format!("1234-IPO1.{DOMAIN}")] {
        let out = run(&mut ssh_cmd(
            &sshd,
            &stack,
            &host,
            sshd.port(),
            "echo hello-from-$((40+2))",
        ))
        .await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.trim() == "hello-from-42",
            "host {host}: status {:?}\nstdout {stdout}\nstderr {}\nsshd log {}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            sshd.log()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_via_proxytunnel_reaches_a_co_located_server() {
    require_tool("proxytunnel");
    require_tool("socat");
    let sshd = Sshd::start();
    let ns = Netns::create();
    let exec = format!("EXEC:{}", sshd.inetd_command().join(" "));
    let _server = ns.spawn(&["socat", "TCP-LISTEN:22,fork,reuseaddr", exec.as_str()]);
    let target = std::net::SocketAddr::from((ns.ns_ip(), 22));
    support::connect_with_retry(target, Duration::from_secs(10));

    let mut stack = Stack::start().await;
    let token = stack.add_system("1234", "ipo1", true).await;
    stack.start_agent(&token, stack::with_tunnels(&[], &[(ns.ns_ip(), 22)]));
    stack.wait_agent("1234", "ipo1").await;

    let host = format!("1234-ipo1-{}.{DOMAIN}", ns.ns_ip());
    let out = run(&mut ssh_cmd(
        &sshd,
        &stack,
        &host,
        22,
        "ip -4 -o addr show; echo done",
    ))
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("done"),
        "status {:?}\nstdout {stdout}\nstderr {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // The command ran inside the namespace: it owns the namespace's address.
    assert!(
        stdout.contains(&format!("inet {}/", ns.ns_ip())),
        "{stdout}"
    );

    // The primary-system form with an IP reaches it too.
    let host = format!("1234-{}.{DOMAIN}", ns.ns_ip());
    let out = run(&mut ssh_cmd(&sshd, &stack, &host, 22, "echo primary-ok")).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "primary-ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_reaches_an_https_target() {
    let host = format!("1234-web.{DOMAIN}");
    let https = HttpsServer::start(&[host.as_str()], "hello through maintgate\n");
    let mut stack = Stack::start().await;
    stack.add_system("1234", "ipo1", true).await;
    let token = stack.add_system("1234", "web", false).await;
    stack.start_agent(&token, stack::services(&[https.port()]));
    stack.wait_agent("1234", "web").await;

    let out = run(tokio::process::Command::new(require_tool("curl"))
        .arg("-sS")
        .arg("--max-time")
        .arg("20")
        .arg("--proxy")
        .arg(format!("https://{}", stack.proxy()))
        .arg("--proxy-cacert")
        .arg(stack.ca())
        .arg("--proxy-user")
        .arg(format!("{}:{}", stack::USER, stack::PASS))
        .arg("--cacert")
        .arg(https.ca_pem_path())
        .arg(format!("https://{host}:{}/status", https.port())))
    .await;
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello through maintgate\n"
    );
    assert_eq!(https.requests().len(), 1);
}

const BIG: u64 = 100 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_mib_each_way_with_sha256() {
    tokio::time::timeout(Duration::from_secs(240), async {
        let sink = SinkServer::start();
        let source = SinkServer::serve_bytes(BIG);
        let mut stack = Stack::start().await;
        let token = stack.add_system("1234", "ipo1", true).await;
        stack.start_agent(&token, stack::services(&[sink.port(), source.port()]));
        stack.wait_agent("1234", "ipo1").await;

        // Upload: client → target.
        let mut up = open_tunnel(&stack, &format!("1234.{DOMAIN}:{}", sink.port())).await;
        let mut pattern = support::Pattern::new(BIG);
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = pattern.fill(&mut buf);
            if n == 0 {
                break;
            }
            up.write_all(&buf[..n]).await.unwrap();
        }
        up.shutdown().await.unwrap();
        let report = sink.next_report_async(Duration::from_secs(120)).await;
        assert_eq!(report.bytes, BIG);
        assert_eq!(report.sha256, support::pattern_sha256(BIG));

        // Download: target → client.
        let mut down = open_tunnel(&stack, &format!("1234.{DOMAIN}:{}", source.port())).await;
        let mut hasher = Sha256::new();
        let mut total = 0u64;
        loop {
            let n = down.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            total += n as u64;
        }
        assert_eq!(total, BIG);
        assert_eq!(hex::encode(hasher.finalize()), source.expected_sha256());
    })
    .await
    .expect("transfer timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_still_delivers_the_whole_reply() {
    tokio::time::timeout(T, async {
        let echo = EchoServer::start();
        let mut stack = Stack::start().await;
        let token = stack.add_system("1234", "ipo1", true).await;
        stack.start_agent(&token, stack::services(&[echo.port()]));
        stack.wait_agent("1234", "ipo1").await;

        let tls = open_tunnel(&stack, &format!("1234.{DOMAIN}:{}", echo.port())).await;
        let (mut rd, mut wr) = tokio::io::split(tls);
        let msg: Vec<u8> = (0..2_000_000u32).map(|i| (i * 7 % 256) as u8).collect();
        wr.write_all(&msg).await.unwrap();
        // Half-close: we are done sending, but still reading.
        wr.shutdown().await.unwrap();
        let mut got = Vec::new();
        rd.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), msg.len());
        assert!(got == msg, "echo differs");
    })
    .await
    .expect("timed out");
}

/// The benchmark's "both legs plain" path, with real clients: the broker's
/// loopback-only plain listener takes the agent's `ws://` link and an
/// OpenSSH session through proxytunnel without `-E`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_test_listener_carries_ssh_with_both_legs_plain() {
    require_tool("proxytunnel");
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let mut settings = stack::test_settings(dir.path());
    settings.plain_test_listen = Some("127.0.0.1:0".parse().unwrap());
    let stack = Stack::start_with(dir, settings).await;
    let plain = stack.plain.expect("plain listener bound");
    let token = stack.add_system("1234", "ipo1", true).await;
    let file: maintgate::agent::config::AgentFile =
        toml::from_str("reconnect_min_ms = 50\nreconnect_max_ms = 500\n").unwrap();
    let mut agent = maintgate::agent::AgentSettings::from_parts(
        file,
        format!("ws://127.0.0.1:{}/agent", plain.port()),
        maintgate::secret::Secret::new(token),
        None,
    )
    .unwrap();
    assert!(!agent.broker_tls);
    agent.policy = stack::services(&[sshd.port()]);
    let cancel = tokio_util::sync::CancellationToken::new();
    let link = tokio::spawn(maintgate::agent::run(agent, cancel.clone()));
    stack.wait_agent("1234", "ipo1").await;

    let mut ssh = tokio::process::Command::new(require_tool("ssh"));
    ssh.args(sshd.ssh_base_args())
        .arg("-o")
        .arg(format!(
            "ProxyCommand=proxytunnel -q -p 127.0.0.1:{} -P {}:{} -d %h:%p",
            plain.port(),
            stack::USER,
            stack::PASS
        ))
        .arg("-p")
        .arg(sshd.port().to_string())
        .arg(format!("root@1234.{DOMAIN}"))
        .arg("echo plain-$((40+2))");
    let out = run(&mut ssh).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim() == "plain-42",
        "status {:?}\nstdout {stdout}\nstderr {}\nsshd log {}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        sshd.log()
    );

    // The plain listener still asks for credentials: no account, no tunnel.
    let mut tcp = tokio::net::TcpStream::connect(plain).await.unwrap();
    tcp.write_all(format!("CONNECT 1234.{DOMAIN}:{} HTTP/1.1\r\n\r\n", sshd.port()).as_bytes())
        .await
        .unwrap();
    let head = stack::read_response_head(&mut tcp).await;
    assert!(head.starts_with("HTTP/1.1 407"), "{head}");
    cancel.cancel();
    let _ = link.await;
}
