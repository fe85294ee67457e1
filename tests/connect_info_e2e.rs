//! End to end: the commands `maintgate connect-info` prints, run with the
//! real clients against an in-process broker and agent.
//!
//! Every command comes from the binary's `--json` output and is also
//! checked to appear, character for character, in its text output. The
//! broker is named with `--proxy-host 127.0.0.1 --proxy-port <port>
//! --domain maint.test`, so nothing in a command needs rewriting. What the
//! tests add, and why:
//! - the environment: `HOME` is a temporary directory (the commands'
//!   `~/.maint/ca.pem` lives there, put there by the printed download
//!   command), and `PROXYUSER`/`PROXYPASS` are set, which is what the
//!   printed credential lines do (one test runs those lines too, with only
//!   the user placeholder replaced);
//! - the test sshd's key and host key: ssh gets its options appended after
//!   the printed command (OpenSSH parses options after the destination),
//!   plink gets them inserted right after `plink` (plink reads everything
//!   after the host as the remote command);
//! - the remote command (`echo ...`);
//! - for RDP, the example local port 13389 (documented as "any free port")
//!   is replaced by a free port.
//!
//! The RDP test uses a TCP echo server as the "RDP" service, not xrdp: the
//! tunnel carries bytes, and an echo proves both directions.

mod support;

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::stack::{self, Stack, DOMAIN, PASS, USER};
use support::{require_tool, ChildGuard, EchoServer, HttpsServer, Sshd};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(60);

/// The printed output of `maintgate connect-info`, both forms.
struct Printed {
    json: Value,
    text: String,
}

impl Printed {
    /// A string field by JSON pointer; it must also be in the text output.
    fn get(&self, pointer: &str) -> String {
        let v = self
            .json
            .pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no string at {pointer} in {:#}", self.json))
            .to_string();
        for line in v.lines() {
            assert!(
                self.text.contains(line),
                "text output lacks {line:?}:\n{}",
                self.text
            );
        }
        v
    }
}

/// Runs the binary: `connect-info 1234 [--system S] --port P` for the
/// stack's broker, as text and as JSON.
fn connect_info(stack: &Stack, system: Option<&str>, port: u16) -> Printed {
    let run = |json: bool| {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Command::new(env!("CARGO_BIN_EXE_maintgate"));
        c.current_dir(dir.path())
            .args(["connect-info", "1234", "--domain", DOMAIN])
            .args(["--proxy-host", "127.0.0.1", "--proxy-port"])
            .arg(stack.port().to_string())
            .arg("--port")
            .arg(port.to_string());
        if let Some(s) = system {
            c.args(["--system", s]);
        }
        if json {
            c.arg("--json");
        }
        let out = support::run_with_timeout(&mut c, T);
        assert!(
            out.status.success(),
            "connect-info failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    };
    let text = run(false);
    let json: Value = serde_json::from_str(&run(true)).expect("--json is JSON");
    assert!(!text.contains(PASS) && !json.to_string().contains(PASS));
    Printed { json, text }
}

/// One POSIX shell word.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn sh_words(words: &[String]) -> String {
    words
        .iter()
        .map(|w| sh_quote(w))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A clean environment for a client: PATH, HOME and, unless `creds` is
/// false, the proxy account in PROXYUSER/PROXYPASS. No proxy variables
/// leak in from the test's environment.
fn client_env(c: &mut tokio::process::Command, home: &Path, creds: bool) {
    c.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("LANG", "C");
    if creds {
        c.env("PROXYUSER", USER).env("PROXYPASS", PASS);
    }
}

/// Runs `shell -c script` in the client environment, with `stdin` bytes.
async fn run_script(
    shell: &str,
    script: &str,
    home: &Path,
    creds: bool,
    stdin: &[u8],
) -> std::process::Output {
    let mut c = tokio::process::Command::new(require_tool(shell));
    c.arg("-c").arg(script);
    client_env(&mut c, home, creds);
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = c.spawn().expect("shell starts");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin).await.unwrap();
    drop(input);
    tokio::time::timeout(T, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("timed out: {script}"))
        .expect("shell runs")
}

fn show(out: &std::process::Output) -> String {
    format!(
        "status {:?}\nstdout {}\nstderr {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A client HOME holding `~/.maint/ca.pem`, fetched with the printed
/// download command. The broker's CA is self-made, so this first download
/// is verified against a copy the operator handed out (`CURL_CA_BUNDLE`).
async fn client_home(stack: &Stack, printed: &Printed) -> tempfile::TempDir {
    require_tool("curl");
    let home = tempfile::Builder::new()
        .prefix("mgt-home-")
        .tempdir()
        .unwrap();
    let download = printed.get("/proxy/ca_download_linux");
    let script = format!(
        "export CURL_CA_BUNDLE={}; {download}",
        sh_quote(&path_str(&stack.ca()))
    );
    let out = run_script("sh", &script, home.path(), false, b"").await;
    assert!(out.status.success(), "{download}\n{}", show(&out));
    let got = std::fs::read(home.path().join(".maint/ca.pem")).expect("CA downloaded");
    assert_eq!(
        got,
        std::fs::read(stack.ca()).unwrap(),
        "downloaded CA differs"
    );
    home
}

fn path_str(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_string()
}

/// ssh options for the test sshd, minus `-F /dev/null` when a config file
/// is given.
fn ssh_test_options(sshd: &Sshd, keep_f: bool) -> Vec<String> {
    let mut opts = sshd.ssh_base_args();
    if !keep_f {
        let i = opts
            .iter()
            .position(|o| o == "-F")
            .expect("-F in base args");
        opts.drain(i..i + 2);
    }
    opts
}

async fn ssh_stack(sshd: &Sshd) -> Stack {
    let mut stack = Stack::start().await;
    let token = stack.add_system("1234", "ipo1", true).await;
    stack.start_agent(&token, stack::services(&[sshd.port()]));
    stack.wait_agent("1234", "ipo1").await;
    stack
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linux_ssh_one_liner_runs_as_printed() {
    require_tool("proxytunnel");
    require_tool("ssh");
    let sshd = Sshd::start();
    assert_eq!(sshd.user(), "root", "the printed commands log in as root");
    let stack = ssh_stack(&sshd).await;
    let printed = connect_info(&stack, Some("ipo1"), sshd.port());
    let home = client_home(&stack, &printed).await;

    let one_liner = printed.get("/ssh/linux");
    assert!(
        one_liner.starts_with("ssh -o 'ProxyCommand=proxytunnel "),
        "{one_liner}"
    );
    let script = format!(
        "{one_liner} {} 'echo connect-info-$((40+2))'",
        sh_words(&ssh_test_options(&sshd, true))
    );
    let out = run_script("sh", &script, home.path(), true, b"").await;
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "connect-info-42",
        "{script}\n{}\nsshd log {}",
        show(&out),
        sshd.log()
    );

    // Without the environment variables the same line fails: the
    // credentials come from nowhere else.
    let out = run_script("sh", &script, home.path(), false, b"").await;
    assert!(
        !out.status.success(),
        "ran without credentials: {}",
        show(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_config_block_works_with_ssh_f() {
    require_tool("proxytunnel");
    require_tool("ssh");
    require_tool("bash");
    let sshd = Sshd::start();
    let stack = ssh_stack(&sshd).await;
    let printed = connect_info(&stack, None, sshd.port());
    let home = client_home(&stack, &printed).await;

    let block = printed.get("/ssh/config");
    assert!(block.starts_with(&format!("Host *.{DOMAIN}\n")), "{block}");
    let config = home.path().join("ssh_config");
    std::fs::write(&config, &block).unwrap();
    let usage = printed.get("/ssh/config_usage");
    assert_eq!(usage, format!("ssh -p {} root@1234.{DOMAIN}", sshd.port()));

    // The printed credential line, with only the user placeholder
    // replaced; the password comes on stdin as if typed. bash, because
    // `read -s` is bash/zsh.
    let creds = printed.get("/credentials/linux");
    assert_eq!(creds.matches("YOUR-PROXY-USER").count(), 1, "{creds}");
    let creds = creds.replace("YOUR-PROXY-USER", USER);
    let script = format!(
        "{creds}\n{usage} -F {} {} 'echo via-config-block'",
        sh_quote(&path_str(&config)),
        sh_words(&ssh_test_options(&sshd, false))
    );
    let out = run_script(
        "bash",
        &script,
        home.path(),
        false,
        format!("{PASS}\n").as_bytes(),
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.lines().last() == Some("via-config-block"),
        "{script}\n{}\nsshd log {}",
        show(&out),
        sshd.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plink_proxycmd_runs_a_command() {
    require_tool("proxytunnel");
    require_tool("plink");
    let sshd = Sshd::start();
    let stack = ssh_stack(&sshd).await;
    let printed = connect_info(&stack, Some("ipo1"), sshd.port());
    let home = client_home(&stack, &printed).await;

    // The Linux plink line (PuTTY's own %host/%port substitution, run by
    // /bin/sh). The PuTTY GUI command names C:\ paths and is checked by
    // the unit tests, not here.
    let line = printed.get("/plink/linux");
    let rest = line.strip_prefix("plink ").expect("starts with plink");
    assert!(rest.contains("-proxycmd 'proxytunnel "), "{line}");
    let script = format!(
        "plink {} {rest} 'echo plink-$((6*7))'",
        sh_words(&sshd.plink_base_args())
    );
    let out = run_script("sh", &script, home.path(), true, b"").await;
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "plink-42",
        "{script}\n{}\nsshd log {}",
        show(&out),
        sshd.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_line_fetches_an_https_target() {
    require_tool("curl");
    let host = format!("1234-web.{DOMAIN}");
    let https = HttpsServer::start(&[host.as_str()], "hello via connect-info\n");
    let mut stack = Stack::start().await;
    stack.add_system("1234", "ipo1", true).await;
    let token = stack.add_system("1234", "web", false).await;
    stack.start_agent(&token, stack::services(&[https.port()]));
    stack.wait_agent("1234", "web").await;
    let printed = connect_info(&stack, Some("web"), https.port());
    let home = client_home(&stack, &printed).await;

    let line = printed.get("/curl/linux");
    // The target's own certificate is signed by the test server's CA: the
    // printed advice is to add --cacert for such a system.
    let script = format!(
        "{line} --cacert {} -sS --max-time 20",
        sh_quote(&path_str(&https.ca_pem_path()))
    );
    let out = run_script("sh", &script, home.path(), true, b"").await;
    assert!(out.status.success(), "{script}\n{}", show(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello via connect-info\n"
    );
    assert_eq!(https.requests().len(), 1);
}

/// A port that was free a moment ago. Racy by nature: another process may
/// take it between this drop and proxytunnel's bind (proxytunnel 1.10 takes
/// only a port number, so the test cannot hand it a bound socket).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    l.local_addr().unwrap().port()
}

/// The IPv4 addresses with a listening TCP socket on `port`, from
/// /proc/net/tcp.
fn listening_on(port: u16) -> Vec<Ipv4Addr> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let mut found = Vec::new();
    for line in table.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(state)) = (cols.get(1), cols.get(3)) else {
            continue;
        };
        let Some((addr, p)) = local.split_once(':') else {
            continue;
        };
        let (Ok(addr), Ok(p)) = (u32::from_str_radix(addr, 16), u16::from_str_radix(p, 16)) else {
            continue;
        };
        // /proc shows the address in host byte order of the raw bytes.
        if *state == "0A" && p == port {
            found.push(Ipv4Addr::from(u32::from_be(addr)));
        }
    }
    found
}

/// Starts `script` in the background (own process group, killed on
/// drop), waits until the local port accepts, and exchanges bytes with the
/// echo service behind the agent, twice (a connection each).
/// Returns `None` when the listener exited before accepting: the port picked
/// by binding :0 and dropping it was taken meanwhile (a parallel test's
/// outgoing connection can get it as its source port), so the caller retries
/// with another port.
async fn rdp_round_trip(script: &str, home: &Path, port: u16) -> Option<ChildGuard> {
    let mut c = Command::new(require_tool("sh"));
    c.arg("-c")
        .arg(script)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("PROXYUSER", USER)
        .env("PROXYPASS", PASS)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let mut guard = ChildGuard::spawn(&mut c);
    let addr = std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    for round in 0..2 {
        let deadline = std::time::Instant::now() + T;
        let mut sock = loop {
            if let Ok(s) = tokio::net::TcpStream::connect(addr).await {
                break s;
            }
            if let Ok(Some(_)) = guard.try_wait() {
                return None;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for the local RDP port"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        let msg = format!("rdp-bytes-{round}-{}", "x".repeat(1000));
        support::within("echo through the local port", T, async {
            // No half-close before reading: proxytunnel ends the whole
            // tunnel when its client side reaches EOF (RDP never half-closes).
            sock.write_all(msg.as_bytes()).await.unwrap();
            let mut back = vec![0u8; msg.len()];
            sock.read_exact(&mut back).await.unwrap();
            assert_eq!(String::from_utf8_lossy(&back), msg, "round {round}");
        })
        .await;
    }
    Some(guard)
}

/// Run `make_script(port)` on fresh ports until its listener comes up.
async fn rdp_with_retries(make_script: impl Fn(u16) -> String, home: &Path) -> (ChildGuard, u16) {
    for _ in 0..5 {
        let port = free_port();
        if let Some(guard) = rdp_round_trip(&make_script(port), home, port).await {
            return (guard, port);
        }
    }
    panic!("the local listener never came up on five fresh ports");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rdp_through_proxytunnel_standalone() {
    require_tool("proxytunnel");
    require_tool("socat");
    let echo = EchoServer::start();
    let mut stack = Stack::start().await;
    let token = stack.add_system("1234", "ipo1", true).await;
    stack.start_agent(&token, stack::services(&[echo.port()]));
    stack.wait_agent("1234", "ipo1").await;
    // The echo port plays the RDP port (3389 is not bindable by a test).
    let printed = connect_info(&stack, None, echo.port());
    let home = client_home(&stack, &printed).await;
    let example = printed
        .json
        .pointer("/rdp/local_port")
        .and_then(Value::as_u64)
        .expect("rdp.local_port");
    assert_eq!(example, 13389);
    assert!(printed.get("/rdp/warning").contains("every interface"));
    assert_eq!(
        printed.get("/rdp/client_linux"),
        "xfreerdp /v:127.0.0.1:13389"
    );

    // proxytunnel 1.10 is installed, so the pre-1.12 line is the one that
    // runs here: `-a PORT`, which (as the warning says) listens on every
    // interface.
    let legacy = printed.get("/rdp/linux_legacy");
    assert_eq!(legacy.matches(" -a 13389 ").count(), 1, "{legacy}");
    let (mut guard, port) = rdp_with_retries(
        |port| legacy.replace(" -a 13389 ", &format!(" -a {port} ")),
        home.path(),
    )
    .await;
    assert_eq!(
        listening_on(port),
        vec![Ipv4Addr::UNSPECIFIED],
        "proxytunnel 1.10 -a should listen on 0.0.0.0, as the warning says"
    );
    guard.kill();

    // The advice for older proxytunnel: socat listening on 127.0.0.1 only.
    let socat = printed.get("/rdp/linux_loopback_socat");
    assert_eq!(socat.matches("TCP-LISTEN:13389,").count(), 1, "{socat}");
    let (mut guard, port) = rdp_with_retries(
        |port| socat.replace("TCP-LISTEN:13389,", &format!("TCP-LISTEN:{port},")),
        home.path(),
    )
    .await;
    assert_eq!(listening_on(port), vec![Ipv4Addr::LOCALHOST]);
    guard.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_refuses_bad_input_clearly() {
    let cases: &[(&[&str], &str)] = &[
        (&["12_34"], "customer id"),
        (&["1234", "--system", "a.b"], "system name"),
        (&["1234", "--ip", "127.1"], "--ip"),
        (&["1234", "--ip", "010.0.0.1"], "--ip"),
        (&["1234", "--port", "0"], "--port"),
        (&["1234", "--domain", "bad..domain"], "domain"),
    ];
    for (args, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Command::new(env!("CARGO_BIN_EXE_maintgate"));
        c.current_dir(dir.path()).arg("connect-info").args(*args);
        let out = support::run_with_timeout(&mut c, T);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(out.stdout.is_empty(), "{args:?} printed instructions");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
}
