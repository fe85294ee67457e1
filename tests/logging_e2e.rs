//! A broker whose log output stalls keeps serving: the real `maintgate
//! serve`, its stderr a pipe that nobody reads (as a paused terminal or a
//! stuck journald would leave it), answers 300 fresh TLS connections from
//! curl, each of which logs about 8 KiB at trace level: far more than the
//! pipe's 64 KiB and the log buffer's 1 MiB together. When the pipe is
//! finally read, the lines that did not fit are reported as dropped.

mod support;

use std::fmt::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{
    find_socket_addr, require_tool, run_with_timeout, wait_for_line, ChildGuard, LineReader,
};

const CONNECTIONS: usize = 300;

#[test]
fn a_stalled_log_output_does_not_stall_the_broker() {
    let curl = require_tool("curl");
    let root = tempfile::tempdir().unwrap();
    let certs = root.path().join("certs");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_maintgate"));
    cmd.arg("--data-dir")
        .arg(root.path().join("data"))
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--domain", "maint.example.com", "--certs-dir"])
        .arg(&certs)
        .env("RUST_LOG", "trace")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut broker = ChildGuard::spawn(&mut cmd);
    // Held open and not read until the end.
    let stderr = broker.stderr.take().unwrap();
    let (line, _stdout) = wait_for_line(
        broker.stdout.take().unwrap(),
        |l| l.contains("listening on"),
        Duration::from_secs(60),
    );
    let addr = find_socket_addr(&line).expect("address in the listening line");

    // One curl, many transfers, each on a connection of its own.
    let mut config = String::new();
    for _ in 0..CONNECTIONS {
        writeln!(
            config,
            "url = \"https://localhost:{}/ca.pem\"\noutput = \"/dev/null\"",
            addr.port()
        )
        .unwrap();
    }
    let config_path = root.path().join("curl.conf");
    std::fs::write(&config_path, config).unwrap();
    let out = run_with_timeout(
        Command::new(curl)
            .arg("-sS")
            .arg("--cacert")
            .arg(certs.join("ca.pem"))
            .args([
                "-H",
                "Connection: close",
                "--max-time",
                "10",
                "--fail-early",
            ])
            .args(["-w", "%{http_code} %{num_connects}\\n", "-K"])
            .arg(&config_path),
        Duration::from_secs(120),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "curl failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let served = stdout.lines().filter(|l| *l == "200 1").count();
    assert_eq!(
        served, CONNECTIONS,
        "every transfer a 200 on a new connection:\n{stdout}"
    );

    // Reading the pipe at last lets the log thread go on; it reports what
    // it had to drop.
    let mut log = LineReader::new(stderr);
    let dropped = log.wait_for(
        |l| l.contains("log lines dropped: the log output was too slow"),
        Duration::from_secs(30),
    );
    let n: u64 = dropped
        .split_whitespace()
        .nth(1)
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("a count in {dropped:?}"));
    assert!(n > 0, "{dropped}");
}
