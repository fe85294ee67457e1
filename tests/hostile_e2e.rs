//! Hostile clients at the TLS layer: protocol versions, ALPN, and plain
//! HTTP on the TLS port. (Slowloris and the auth flood have their own test
//! binaries, so their measurements are not shared with other tests.)

mod support;

use std::time::Duration;

use support::require_tool;
use support::stack::{basic, Stack, DOMAIN, PASS, USER};
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
