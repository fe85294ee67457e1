//! `maintgate demo` end to end: the real binary runs, the commands it
//! prints are run exactly as printed (through `sh -c`), and a signal stops
//! it cleanly: exit status 0 and its temporary directory gone.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use support::{require_tool, run_with_timeout, ChildGuard, LineReader};

/// Start-up includes an Argon2 hash and certificate generation.
const START: Duration = Duration::from_secs(60);
const CLIENT: Duration = Duration::from_secs(30);
const STOP: Duration = Duration::from_secs(10);

const READY: &str = "maintgate demo: ready; press Ctrl-C to stop";
const HELLO: &str = "Hello from the maintgate demo";

struct Demo {
    child: ChildGuard,
    out: LineReader,
    err: LineReader,
    /// Every stdout line up to and including the ready line.
    lines: Vec<String>,
}

impl Demo {
    fn start(args: &[&str]) -> Demo {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_maintgate"));
        cmd.arg("demo")
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = ChildGuard::spawn(&mut cmd);
        let mut out = LineReader::new(child.stdout.take().unwrap());
        let mut err = LineReader::new(child.stderr.take().unwrap());
        // wait_for panics at EOF (the demo exited) or at the deadline; add
        // the demo's log to that message.
        let ready = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            out.wait_for(|l| l == READY, START)
        }));
        if ready.is_err() {
            let st = child.try_wait().ok().flatten();
            panic!(
                "demo not ready (exit status {st:?})\nstderr:\n{}",
                err.lines().join("\n")
            );
        }
        let lines = out.lines().to_vec();
        Demo {
            child,
            out,
            err,
            lines,
        }
    }

    /// The printed lines that start with `prefix`, in order.
    fn commands(&self, prefix: &str) -> Vec<String> {
        self.lines
            .iter()
            .filter(|l| l.starts_with(prefix))
            .cloned()
            .collect()
    }

    /// The temporary directory the demo announced.
    fn dir(&self) -> PathBuf {
        let line = self
            .lines
            .iter()
            .find(|l| l.starts_with("# temporary data and certificates: "))
            .expect("the demo names its directory");
        let rest = line.trim_start_matches("# temporary data and certificates: ");
        PathBuf::from(rest.trim_end_matches(" (removed on exit)"))
    }

    fn diagnostics(&mut self) -> String {
        format!(
            "demo stdout:\n{}\ndemo stderr:\n{}",
            self.out.lines().join("\n"),
            self.err.lines().join("\n")
        )
    }

    /// Send `signal` with the shell's `kill` (no libc, no unsafe) and wait
    /// for a clean exit.
    fn stop_with(&mut self, signal: &str) {
        let pid = self.child.id().to_string();
        let st = Command::new("kill")
            .args([format!("-{signal}"), pid])
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -{signal} failed");
        let status = self.child.wait_timeout(STOP);
        let diag = self.diagnostics();
        assert!(status.success(), "demo exit status {status}\n{diag}");
        let out = self.out.collect_until_eof(STOP);
        assert!(
            out.iter()
                .any(|l| l.starts_with("maintgate demo: stopped; removed ")),
            "{diag}"
        );
    }
}

/// Runs a printed command line exactly as printed.
fn sh(line: &str) -> std::process::Output {
    run_with_timeout(Command::new("sh").arg("-c").arg(line), CLIENT)
}

fn assert_hello(line: &str, out: &std::process::Output, scheme: &str, demo: &mut Demo) {
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && body.contains(HELLO) && body.contains(scheme),
        "command: {line}\nstatus {}\nstdout {body}\nstderr {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        demo.diagnostics()
    );
}

#[test]
fn demo_prints_commands_that_work_and_stops_on_sigint() {
    require_tool("curl");
    require_tool("proxytunnel");
    let mut demo = Demo::start(&["--listen", "127.0.0.1:0"]);
    let dir = demo.dir();
    assert!(dir.join("certs/ca.pem").is_file(), "{}", dir.display());

    // The plain-HTTP curl line, run as printed: it needs -p (CONNECT).
    let curls = demo.commands("curl ");
    assert_eq!(curls.len(), 2, "two curl lines: {curls:#?}");
    assert!(curls[0].starts_with("curl -p "), "{}", curls[0]);
    assert!(curls[0].contains(" http://1234.maint.localhost:"));
    let out = sh(&curls[0]);
    assert_hello(&curls[0], &out, "served over HTTP.", &mut demo);

    // The HTTPS one, end to end with the site's CA.
    assert!(curls[1].contains(" https://1234.maint.localhost:"));
    let out = sh(&curls[1]);
    assert_hello(&curls[1], &out, "served over HTTPS.", &mut demo);

    // A wrong password gets 407, so curl fails and no page arrives.
    let password = curls[0]
        .split_whitespace()
        .find_map(|w| w.strip_prefix("demo:"))
        .expect("--proxy-user demo:PASS")
        .to_string();
    assert!(password.len() >= 16, "a strong generated password");
    let wrong = curls[0].replace(&format!("demo:{password}"), "demo:wrong-password");
    let out = sh(&wrong);
    assert!(
        !out.status.success() && !String::from_utf8_lossy(&out.stdout).contains(HELLO),
        "wrong password must be refused: {:?}",
        out
    );

    // The echo line: proxytunnel over stdin/stdout, kept open until the
    // echo is back.
    let pt = demo.commands("proxytunnel ");
    assert_eq!(pt.len(), 1, "{pt:#?}");
    let mut echo = ChildGuard::spawn(
        Command::new("sh")
            .arg("-c")
            .arg(&pt[0])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let mut stdin = echo.stdin.take().unwrap();
    stdin.write_all(b"hello-echo\n").unwrap();
    stdin.flush().unwrap();
    let stdout = echo.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(CLIENT).unwrap_or_else(|_| {
        panic!(
            "no echo within {CLIENT:?} from: {}\n{}",
            pt[0],
            demo.diagnostics()
        )
    });
    assert_eq!(line, "hello-echo\n");
    drop(stdin);
    let st = echo.wait_timeout(CLIENT);
    assert!(st.success(), "proxytunnel exit status {st}");

    // No sshd on 127.0.0.1:22 here: then the demo says so instead of
    // printing an ssh command that cannot work.
    if std::net::TcpStream::connect(("127.0.0.1", 22)).is_err() {
        assert!(demo.commands("ssh ").is_empty());
    }

    demo.stop_with("INT");
    assert!(!dir.exists(), "{} was not removed", dir.display());
}

#[test]
fn demo_falls_back_to_a_free_port_and_stops_on_sigterm() {
    require_tool("curl");
    // Hold 6443 (if nobody else does already): the demo must not fail.
    let _held = std::net::TcpListener::bind(("127.0.0.1", 6443));
    let mut demo = Demo::start(&[]);
    let first = demo
        .lines
        .iter()
        .find(|l| l.starts_with("# maintgate demo: broker https://127.0.0.1:"))
        .expect("broker line")
        .clone();
    assert!(!first.contains(":6443,"), "6443 is taken: {first}");
    let dir = demo.dir();
    let curl = demo.commands("curl ").remove(0);
    let out = sh(&curl);
    assert_hello(&curl, &out, "served over HTTP.", &mut demo);
    demo.stop_with("TERM");
    assert!(!dir.exists(), "{} was not removed", dir.display());
}
