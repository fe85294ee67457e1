//! Process helpers: tool checks, kill-on-drop children, reading a child's
//! output with a deadline, and bounded polling (instead of readiness sleeps).

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::ops::{Deref, DerefMut};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Which Debian package provides a tool (for the panic message of
/// [`require_tool`]; `scripts/test.sh` installs all of them).
fn package_for(tool: &str) -> &'static str {
    match tool {
        "sshd" => "openssh-server",
        "ssh" | "ssh-keygen" => "openssh-client",
        "plink" | "puttygen" => "putty-tools",
        "ip" => "iproute2",
        "certutil" => "libnss3-tools",
        "chromium" => "chromium",
        "proxytunnel" => "proxytunnel",
        "curl" => "curl",
        "socat" => "socat",
        _ => "?",
    }
}

/// Returns the absolute path of `name`, searched in `$PATH` plus the sbin
/// directories. Panics with a clear message if it is missing: tests never
/// skip silently because a tool is absent.
pub fn require_tool(name: &str) -> PathBuf {
    if name.contains('/') {
        let p = PathBuf::from(name);
        if is_executable(&p) {
            return p;
        }
    } else {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let extra = ["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from);
        for dir in std::env::split_paths(&path).chain(extra) {
            let p = dir.join(name);
            if is_executable(&p) {
                return p;
            }
        }
    }
    panic!(
        "required test tool `{name}` is not installed (Debian package `{}`); \
         run scripts/test.sh, which installs every tool the tests need",
        package_for(name)
    );
}

fn is_executable(p: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// A child process that is killed (SIGKILL) and reaped on drop, also when
/// the test panics. Children started with [`ChildGuard::spawn`] get their own
/// process group, and the whole group is killed, so grandchildren (e.g.
/// `proxytunnel --standalone` forks, `socat ... fork`) go too.
pub struct ChildGuard {
    child: Child,
    own_group: bool,
    name: String,
}

impl ChildGuard {
    /// Spawns `cmd` in a new process group. Panics if it cannot be started.
    pub fn spawn(cmd: &mut Command) -> ChildGuard {
        let name = format!("{:?}", cmd);
        cmd.process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("failed to spawn {name}: {e}"));
        ChildGuard {
            child,
            own_group: true,
            name,
        }
    }

    /// Wraps an already spawned child; only that process is killed on drop.
    pub fn new(child: Child) -> ChildGuard {
        let name = format!("pid {}", child.id());
        ChildGuard {
            child,
            own_group: false,
            name,
        }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the child to exit, at most `timeout`; panics on timeout
    /// (the child is then killed by drop).
    pub fn wait_timeout(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) => return st,
                Ok(None) => {}
                Err(e) => panic!("waiting for {}: {e}", self.name),
            }
            if Instant::now() >= deadline {
                panic!("{} did not exit within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process (group) now and reaps it.
    pub fn kill(&mut self) {
        if self.own_group {
            // Also when the leader has exited: grandchildren may live on.
            kill_group(self.child.id());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Deref for ChildGuard {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.child
    }
}

impl DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// SIGKILLs the process group `pgid` (a process started with
/// `process_group(0)`, which is its own group leader). Uses the shell's
/// builtin `kill`, so no libc is needed.
pub fn kill_group(pgid: u32) {
    assert!(pgid > 1, "refusing to kill process group {pgid}");
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!("kill -KILL -{pgid} 2>/dev/null"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Reads lines from a pipe in a background thread, so they can be awaited
/// with a deadline. Lines keep flowing into it after a match, so the child
/// never blocks on a full pipe as long as this reader lives.
pub struct LineReader {
    rx: mpsc::Receiver<String>,
    seen: Vec<String>,
    eof: bool,
}

impl LineReader {
    pub fn new<R: Read + Send + 'static>(r: R) -> LineReader {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(r);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf);
                        let line = line.trim_end_matches(['\n', '\r']).to_string();
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        LineReader {
            rx,
            seen: Vec::new(),
            eof: false,
        }
    }

    /// Returns the first line (not yet consumed) matching `pred`. Panics,
    /// showing every line read so far, at EOF or when `timeout` passes.
    pub fn wait_for(&mut self, mut pred: impl FnMut(&str) -> bool, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let now = Instant::now();
            if self.eof || now >= deadline {
                panic!(
                    "no matching line {} ; lines so far:\n{}",
                    if self.eof {
                        "before EOF"
                    } else {
                        "within the deadline"
                    },
                    self.seen.join("\n")
                );
            }
            match self.rx.recv_timeout(deadline - now) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => self.eof = true,
            }
        }
    }

    /// Lines read so far (all, matched or not), plus any now buffered.
    pub fn lines(&mut self) -> &[String] {
        while let Ok(l) = self.rx.try_recv() {
            self.seen.push(l);
        }
        &self.seen
    }

    /// Reads until EOF (at most `timeout`) and returns every line read.
    pub fn collect_until_eof(&mut self, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        while !self.eof {
            let now = Instant::now();
            if now >= deadline {
                panic!(
                    "no EOF within {timeout:?}; lines so far:\n{}",
                    self.seen.join("\n")
                );
            }
            match self.rx.recv_timeout(deadline - now) {
                Ok(line) => self.seen.push(line),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => self.eof = true,
            }
        }
        self.seen.clone()
    }
}

/// Waits for a line matching `pred` on `stdout` (e.g. a child's
/// `ChildStdout`), at most `timeout`. Returns the line and the reader, which
/// keeps draining the pipe. Panics on EOF or timeout.
pub fn wait_for_line<R: Read + Send + 'static>(
    stdout: R,
    pred: impl FnMut(&str) -> bool,
    timeout: Duration,
) -> (String, LineReader) {
    let mut lr = LineReader::new(stdout);
    let line = lr.wait_for(pred, timeout);
    (line, lr)
}

/// Finds the first `IP:PORT` socket address in a line such as
/// `listening on 127.0.0.1:40123`.
pub fn find_socket_addr(line: &str) -> Option<SocketAddr> {
    line.split(|c: char| c.is_whitespace() || c == ',' || c == '"' || c == '\'' || c == '=')
        .map(|w| w.trim_end_matches(['.', ';', ')']).trim_start_matches('('))
        .find_map(|w| w.parse::<SocketAddr>().ok())
}

/// Polls `f` until it returns `Some`, at most `timeout`; panics with `what`
/// on timeout. This is the harness' replacement for readiness sleeps.
pub fn poll_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Async [`poll_until`]: does not block the runtime.
pub async fn poll_until_async<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Connects to `addr`, retrying refused connections until `timeout`.
pub fn connect_with_retry(addr: SocketAddr, timeout: Duration) -> TcpStream {
    poll_until(&format!("a TCP listener on {addr}"), timeout, || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()
    })
}

/// Runs `fut` with a deadline; panics with `what` if it does not finish.
/// Every async test should wrap its body in this (or `tokio::time::timeout`).
pub async fn within<T>(
    what: &str,
    timeout: Duration,
    fut: impl std::future::Future<Output = T>,
) -> T {
    match tokio::time::timeout(timeout, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: did not finish within {timeout:?}"),
    }
}

/// Runs a command to completion with stdin closed, at most `timeout`, and
/// returns its output. Panics if it cannot be started or times out.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> std::process::Output {
    let desc = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut g = ChildGuard::spawn(cmd);
    let out = LineReaderBytes::new(g.stdout.take().unwrap());
    let err = LineReaderBytes::new(g.stderr.take().unwrap());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = g.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() >= deadline {
            let e = err.finish(Duration::from_millis(200));
            panic!(
                "{desc} did not finish within {timeout:?}; stderr so far:\n{}",
                String::from_utf8_lossy(&e)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // The process has exited, but a grandchild may still hold the pipes:
    // bound the wait for EOF too.
    let remaining = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_secs(2));
    std::process::Output {
        status,
        stdout: out.finish(remaining),
        stderr: err.finish(remaining),
    }
}

/// Shorthand: build a `Command` from an argv.
pub fn command<S: AsRef<OsStr>>(argv: &[S]) -> Command {
    assert!(!argv.is_empty(), "empty argv");
    let mut c = Command::new(argv[0].as_ref());
    c.args(&argv[1..]);
    c
}

/// Collects a pipe's bytes in a background thread.
struct LineReaderBytes {
    rx: mpsc::Receiver<Vec<u8>>,
}

impl LineReaderBytes {
    fn new<R: Read + Send + 'static>(mut r: R) -> Self {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            let _ = tx.send(buf);
        });
        LineReaderBytes { rx }
    }
    fn finish(&self, timeout: Duration) -> Vec<u8> {
        self.rx.recv_timeout(timeout).unwrap_or_default()
    }
}
