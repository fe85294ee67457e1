//! Every rejection: what proxytunnel users see for 400, 403, 407 and 503,
//! and raw bytes over TLS for malformed heads, pipelining and size caps.
//! Each case also proves the agent was never asked to open anything.

mod support;

use std::time::Duration;

use support::stack::{self, basic, raw_exchange, Stack, DOMAIN, PASS, USER};
use support::{require_tool, EchoServer};

const T: Duration = Duration::from_secs(60);

/// A stack with system 1234-ipo1 online, allowing only the echo port.
async fn online() -> (Stack, EchoServer) {
    let echo = EchoServer::start();
    let mut stack = Stack::start().await;
    let token = stack.add_system("1234", "ipo1", true).await;
    stack.start_agent(&token, stack::services(&[echo.port()]));
    stack.wait_agent("1234", "ipo1").await;
    // A customer of another account, to test tenant isolation.
    let store = stack.state.store();
    let hash = maintgate::secret::hash_password("bobs-password").unwrap();
    store.add_account("bob", &hash).await.unwrap();
    store.add_customer("5678", "bob", None).await.unwrap();
    (stack, echo)
}

/// Opens the agent has been asked for so far.
fn agent_opens(stack: &Stack) -> u64 {
    stack
        .state
        .registry()
        .agents()
        .iter()
        .map(|a| a.mux.opens())
        .sum()
}

async fn proxytunnel(stack: &Stack, user_pass: &str, dest: &str) -> (bool, String) {
    let mut c = tokio::process::Command::new(require_tool("proxytunnel"));
    c.args(["-E", "-C"])
        .arg(stack.ca())
        .arg("-p")
        .arg(stack.proxy())
        .arg("-P")
        .arg(user_pass)
        .arg("-d")
        .arg(dest)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(T, c.output()).await.unwrap().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxytunnel_users_see_a_useful_status_line() {
    let (stack, echo) = online().await;
    let good = format!("{USER}:{PASS}");
    let p = echo.port();
    let cases = [
        (
            good.as_str(),
            format!("1234..{DOMAIN}:{p}"),
            "HTTP return code: 400 Bad destination",
        ),
        (
            good.as_str(),
            format!("1234.{DOMAIN}:0"),
            "HTTP return code: 400 Bad destination",
        ),
        (
            good.as_str(),
            format!("1234-0127.0.0.1.{DOMAIN}:{p}"),
            "HTTP return code: 400 Bad destination",
        ),
        (
            good.as_str(),
            format!("1234.example.com:{p}"),
            "HTTP return code: 400 Bad destination",
        ),
        (
            good.as_str(),
            format!("1234.{DOMAIN}:1"),
            "HTTP return code: 403 Forbidden: port not allowed",
        ),
        (
            good.as_str(),
            format!("1234-10.9.9.9.{DOMAIN}:22"),
            "HTTP return code: 403 Forbidden: co-located servers are off",
        ),
        (
            "alice:wrong",
            format!("1234.{DOMAIN}:{p}"),
            "HTTP return code: 407 Proxy Authentication Required",
        ),
        (
            "nobody:x",
            format!("1234.{DOMAIN}:{p}"),
            "HTTP return code: 407 Proxy Authentication Required",
        ),
        (
            good.as_str(),
            format!("5678.{DOMAIN}:{p}"),
            "HTTP return code: 404 No such customer or system",
        ),
        (
            good.as_str(),
            format!("9999.{DOMAIN}:{p}"),
            "HTTP return code: 404 No such customer or system",
        ),
        (
            good.as_str(),
            format!("1234-nosuch.{DOMAIN}:{p}"),
            "HTTP return code: 404 No such customer or system",
        ),
    ];
    for (creds, dest, want) in &cases {
        let (ok, text) = proxytunnel(&stack, creds, dest).await;
        assert!(!ok, "{dest}: proxytunnel succeeded");
        assert!(text.contains(want), "{dest}: want {want:?}, got {text:?}");
    }
    // 503: a system that exists but has no agent.
    stack.add_system("1234", "offline", false).await;
    let (ok, text) = proxytunnel(&stack, &good, &format!("1234-offline.{DOMAIN}:22")).await;
    assert!(!ok);
    assert!(
        text.contains("HTTP return code: 503 System offline"),
        "{text}"
    );
    assert_eq!(agent_opens(&stack), 0, "the agent was contacted");
}

fn connect(dest: &str, auth: Option<&str>, extra: &str) -> Vec<u8> {
    let mut s = format!("CONNECT {dest} HTTP/1.1\r\nHost: {dest}\r\n");
    if let Some(a) = auth {
        s.push_str(&format!("Proxy-Authorization: {a}\r\n"));
    }
    s.push_str(extra);
    s.push_str("\r\n");
    s.into_bytes()
}

fn status_of(reply: &[u8]) -> String {
    let text = String::from_utf8_lossy(reply);
    text.lines().next().unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_hostile_heads_are_refused_and_closed() {
    let (stack, echo) = online().await;
    let good = basic(USER, PASS);
    let dest = format!("1234.{DOMAIN}:{}", echo.port());
    let big_header = format!("X-Pad: {}\r\n", "a".repeat(9000));
    let many_headers: String = (0..100).map(|i| format!("X-H{i}: v\r\n")).collect();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("bare LF", format!("CONNECT {dest} HTTP/1.1\nProxy-Authorization: {good}\n\n").into_bytes(), "HTTP/1.1 400 "),
        ("oversized head", connect(&dest, Some(&good), &big_header), "HTTP/1.1 400 "),
        ("too many headers", connect(&dest, Some(&good), &many_headers), "HTTP/1.1 400 "),
        ("duplicate Proxy-Authorization", connect(&dest, Some(&good), &format!("Proxy-Authorization: {good}\r\n")), "HTTP/1.1 400 "),
        ("Content-Length on CONNECT", connect(&dest, Some(&good), "Content-Length: 5\r\n"), "HTTP/1.1 400 "),
        ("Transfer-Encoding on CONNECT", connect(&dest, Some(&good), "Transfer-Encoding: chunked\r\n"), "HTTP/1.1 400 "),
        ("obs-fold", connect(&dest, Some(&good), "X-A: b\r\n  folded\r\n"), "HTTP/1.1 400 "),
        ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(), "HTTP/1.1 4"),
        ("absolute-form GET", b"GET http://1234.maint.test/ HTTP/1.1\r\nHost: 1234.maint.test\r\n\r\n".to_vec(), "HTTP/1.1 405 "),
        ("POST", b"POST /agent HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".to_vec(), "HTTP/1.1 405 "),
        ("unknown path", b"GET /etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), "HTTP/1.1 404 "),
        ("missing port", connect(&format!("1234.{DOMAIN}"), Some(&good), ""), "HTTP/1.1 400 "),
        ("IPv6 target", connect("[::1]:22", Some(&good), ""), "HTTP/1.1 400 "),
        ("scheme lowercase basic ok but bad b64", connect(&dest, Some("basic !!!"), ""), "HTTP/1.1 407 "),
        ("websocket upgrade without token", b"GET /agent HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".to_vec(), "HTTP/1.1 401 "),
        ("websocket upgrade with a wrong token", b"GET /agent HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Bearer mgt_nope\r\n\r\n".to_vec(), "HTTP/1.1 401 "),
    ];
    for (name, bytes, want) in cases {
        let reply = tokio::time::timeout(T, raw_exchange(&stack, &bytes))
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&reply);
        assert!(text.starts_with(want), "{name}: got {text:?}");
        if !want.contains("407") {
            assert!(text.contains("Connection: close\r\n"), "{name}: {text:?}");
        }
    }
    assert_eq!(agent_opens(&stack), 0, "the agent was contacted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_bytes_after_a_rejection_are_never_forwarded() {
    let (stack, echo) = online().await;
    let good = basic(USER, PASS);
    let p = echo.port();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        // 407 keeps the connection, but what follows is not a request.
        (
            "407",
            [
                connect(
                    &format!("1234.{DOMAIN}:{p}"),
                    Some(&basic(USER, "wrong")),
                    "",
                ),
                b"SSH-2.0-evil\r\n\r\n".to_vec(),
            ]
            .concat(),
            "HTTP/1.1 407 ",
        ),
        (
            "403",
            [
                connect(&format!("1234.{DOMAIN}:1"), Some(&good), ""),
                b"SSH-2.0-evil\r\n\r\n".to_vec(),
            ]
            .concat(),
            "HTTP/1.1 403 ",
        ),
        (
            "400",
            [
                connect(&format!("1234..{DOMAIN}:{p}"), Some(&good), ""),
                b"SSH-2.0-evil\r\n\r\n".to_vec(),
            ]
            .concat(),
            "HTTP/1.1 400 ",
        ),
        (
            "404",
            [
                connect(&format!("5678.{DOMAIN}:{p}"), Some(&good), ""),
                b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            ]
            .concat(),
            "HTTP/1.1 404 ",
        ),
    ];
    for (name, bytes, want) in cases {
        let reply = tokio::time::timeout(T, raw_exchange(&stack, &bytes))
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&reply);
        assert!(text.starts_with(want), "{name}: {text:?}");
        // Nothing after the rejection reached the target, and the
        // connection ended (raw_exchange returned at close or timeout).
        assert!(!text.contains("SSH-2.0-evil"), "{name}: {text:?}");
    }
    assert_eq!(agent_opens(&stack), 0, "the agent was contacted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_can_retry_after_407_on_the_same_connection() {
    use tokio::io::AsyncWriteExt;
    let (stack, echo) = online().await;
    let dest = format!("1234.{DOMAIN}:{}", echo.port());
    let mut tls = stack::tls_connect(&stack).await;
    tls.write_all(&connect(&dest, None, "")).await.unwrap();
    let head = stack::read_response_head(&mut tls).await;
    assert_eq!(
        head,
        "HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"maintgate\", charset=\"UTF-8\"\r\nContent-Length: 0\r\n\r\n"
    );
    tls.write_all(&connect(&dest, Some(&basic(USER, PASS)), ""))
        .await
        .unwrap();
    let head = stack::read_response_head(&mut tls).await;
    assert_eq!(
        status_of(head.as_bytes()),
        "HTTP/1.1 200 Connection established"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_yours_and_nonexistent_get_the_same_bytes() {
    let (stack, echo) = online().await;
    let good = basic(USER, PASS);
    let theirs = raw_exchange(
        &stack,
        &connect(&format!("5678.{DOMAIN}:{}", echo.port()), Some(&good), ""),
    )
    .await;
    let missing = raw_exchange(
        &stack,
        &connect(&format!("9999.{DOMAIN}:{}", echo.port()), Some(&good), ""),
    )
    .await;
    assert!(!theirs.is_empty());
    assert_eq!(theirs, missing);
    // Unknown user and wrong password: the same 407, byte for byte.
    let wrong = raw_exchange(
        &stack,
        &connect(&format!("1234.{DOMAIN}:22"), Some(&basic(USER, "nope")), ""),
    )
    .await;
    let nobody = raw_exchange(
        &stack,
        &connect(
            &format!("1234.{DOMAIN}:22"),
            Some(&basic("nobody", "nope")),
            "",
        ),
    )
    .await;
    assert!(String::from_utf8_lossy(&wrong).starts_with("HTTP/1.1 407 "));
    assert_eq!(wrong, nobody);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pac_and_ca_are_served_without_auth() {
    let stack = Stack::start().await;
    let pac = raw_exchange(&stack, b"GET /proxy.pac HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let text = String::from_utf8_lossy(&pac);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("Content-Type: application/x-ns-proxy-autoconfig\r\n"));
    assert!(text.contains(&format!(
        "if (dnsDomainIs(host, \".{DOMAIN}\")) return \"HTTPS {DOMAIN}:{}\";",
        stack.port()
    )));
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.contains(&format!("Content-Length: {}\r\n", body.len())));
    let ca = raw_exchange(&stack, b"GET /ca.pem HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let text = String::from_utf8_lossy(&ca);
    let body = text.split_once("\r\n\r\n").unwrap().1;
    assert_eq!(body, std::fs::read_to_string(stack.ca()).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_memory_limit_a_connect_is_503_and_nothing_is_dialed() {
    tokio::time::timeout(T, async {
        let echo = EchoServer::start();
        let dir = tempfile::tempdir().unwrap();
        let mut settings = stack::test_settings(dir.path());
        // 1 MiB: any broker is over it from its first sample.
        settings.limits.max_memory_mb = Some(1);
        let mut stack = Stack::start_with(dir, settings).await;
        let token = stack.add_system("1234", "ipo1", true).await;
        // Agents still get in: their links are what the tunnels need once
        // memory is back.
        stack.start_agent(&token, stack::services(&[echo.port()]));
        stack.wait_agent("1234", "ipo1").await;
        let good = format!("{USER}:{PASS}");
        let (ok, text) =
            proxytunnel(&stack, &good, &format!("1234.{DOMAIN}:{}", echo.port())).await;
        assert!(!ok, "proxytunnel succeeded");
        assert!(
            text.contains("HTTP return code: 503 Broker overloaded"),
            "{text}"
        );
        assert_eq!(agent_opens(&stack), 0, "the agent was contacted");
    })
    .await
    .expect("timed out");
}
