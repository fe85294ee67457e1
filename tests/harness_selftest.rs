//! Self-tests of the test harness in `tests/support/`: each piece does what
//! the integration tests rely on, with the real tools.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(30);

fn stdout_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_ok(what: &str, out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A pid is gone once it no longer exists or is a zombie waiting for a
/// reaper we do not control (PID 1 in a container may not reap).
fn pid_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

fn panic_message(e: Box<dyn std::any::Any + Send>) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

// ------------------------------------------------------------ process

#[test]
fn require_tool_finds_tools_and_panics_clearly_on_missing_ones() {
    assert!(require_tool("sh").is_absolute());
    assert_eq!(require_tool("sshd"), Path::new("/usr/sbin/sshd"));
    for t in [
        "ssh",
        "ssh-keygen",
        "plink",
        "puttygen",
        "socat",
        "ip",
        "curl",
        "proxytunnel",
    ] {
        require_tool(t);
    }
    let e = std::panic::catch_unwind(|| require_tool("no-such-tool-mgt")).unwrap_err();
    let msg = panic_message(e);
    assert!(
        msg.contains("no-such-tool-mgt") && msg.contains("scripts/test.sh"),
        "{msg}"
    );
}

#[test]
fn child_guard_kills_process_group_on_drop() {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "sleep 1000 & echo $!; wait"])
        .stdout(Stdio::piped());
    let mut g = ChildGuard::spawn(&mut cmd);
    let leader = g.id();
    let (line, _rest) = wait_for_line(g.stdout.take().unwrap(), |l| !l.is_empty(), T);
    let grandchild: u32 = line.trim().parse().unwrap();
    assert!(!pid_gone(grandchild));
    drop(g);
    assert!(pid_gone(leader));
    poll_until("the grandchild to die", T, || {
        pid_gone(grandchild).then_some(())
    });
}

#[test]
fn child_guard_kills_on_panic() {
    let mut cmd = Command::new("sleep");
    cmd.arg("1000");
    let (tx, rx) = std::sync::mpsc::channel();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let g = ChildGuard::spawn(&mut cmd);
        tx.send(g.id()).unwrap();
        panic!("test body fails");
    }));
    assert!(r.is_err());
    let pid = rx.recv().unwrap();
    assert!(pid_gone(pid), "child {pid} survived a panicking test");
}

#[test]
fn wait_for_line_reads_listening_address_and_times_out() {
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "echo starting; echo 'listening on 127.0.0.1:40123'; echo more; sleep 1000",
    ])
    .stdout(Stdio::piped());
    let mut g = ChildGuard::spawn(&mut cmd);
    let (line, mut rest) =
        wait_for_line(g.stdout.take().unwrap(), |l| l.contains("listening on"), T);
    assert_eq!(
        find_socket_addr(&line),
        Some("127.0.0.1:40123".parse::<SocketAddr>().unwrap())
    );
    assert_eq!(rest.wait_for(|l| l == "more", T), "more");

    // No matching line: a bounded wait that panics, listing what it saw.
    let t0 = Instant::now();
    let e = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rest.wait_for(|l| l.contains("never"), Duration::from_millis(300))
    }))
    .unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(5));
    let msg = panic_message(e);
    assert!(msg.contains("listening on 127.0.0.1:40123"), "{msg}");

    // EOF without a match panics at once, not at the deadline.
    let mut cmd = Command::new("echo");
    cmd.arg("only line").stdout(Stdio::piped());
    let mut g2 = ChildGuard::spawn(&mut cmd);
    let out = g2.stdout.take().unwrap();
    let t0 = Instant::now();
    let r = std::panic::catch_unwind(move || wait_for_line(out, |l| l.contains("never"), T));
    assert!(r.is_err());
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert_eq!(
        find_socket_addr("bound, addr=[::1]:8080."),
        Some("[::1]:8080".parse().unwrap())
    );
}

// ------------------------------------------------------------ sshd

fn ssh_cmd(sshd: &Sshd, port: u16, host: &str, remote: &str) -> Command {
    let mut c = Command::new(require_tool("ssh"));
    c.args(sshd.ssh_base_args())
        .args(["-p", &port.to_string()])
        .arg(format!("{}@{host}", sshd.user()))
        .arg(remote);
    c
}

#[test]
fn sshd_runs_a_remote_command_for_real_ssh() {
    let sshd = Sshd::start();
    let out = run_with_timeout(
        &mut ssh_cmd(&sshd, sshd.port(), "127.0.0.1", "echo hello"),
        T,
    );
    assert_ok("ssh", &out);
    assert_eq!(stdout_of(&out), "hello\n");

    // A second connection gets its own sshd -i.
    let out = run_with_timeout(
        &mut ssh_cmd(&sshd, sshd.port(), "127.0.0.1", "echo again"),
        T,
    );
    assert_ok("ssh (2nd)", &out);
    assert_eq!(stdout_of(&out), "again\n");
    assert_eq!(sshd.connections(), 2);

    assert!(sshd.host_key_pub().starts_with("ssh-ed25519 AAAA"));
    assert_eq!(
        sshd.known_hosts_line("[127.0.0.1]:22"),
        format!("[127.0.0.1]:22 {}", sshd.host_key_pub())
    );
    let argv = sshd.inetd_command();
    assert_eq!(
        &argv[..2],
        &["/usr/sbin/sshd".to_string(), "-i".to_string()]
    );
}

#[test]
fn sshd_host_key_is_checked_strictly() {
    let a = Sshd::start();
    let b = Sshd::start();
    // b's client key and known_hosts against a's server: host key mismatch.
    let out = run_with_timeout(&mut ssh_cmd(&b, a.port(), "127.0.0.1", "echo hello"), T);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("HOST IDENTIFICATION HAS CHANGED")
            || err.contains("Host key verification failed"),
        "{err}"
    );
}

#[test]
fn sshd_drop_closes_listener_and_kills_sessions() {
    let sshd = Sshd::start();
    let addr = sshd.addr();
    // An idle connection holds an sshd -i process open.
    let mut idle = TcpStream::connect(addr).unwrap();
    let mut banner = String::new();
    idle.set_read_timeout(Some(T)).unwrap();
    BufReader::new(idle.try_clone().unwrap())
        .read_line(&mut banner)
        .unwrap();
    assert!(banner.starts_with("SSH-2.0-OpenSSH"), "{banner:?}");
    drop(sshd);
    assert!(
        TcpStream::connect(addr).is_err(),
        "listener still open after drop"
    );
    // The sshd -i serving our idle connection was killed: EOF (or reset)
    // arrives now, not at the 30 s read timeout.
    let t0 = Instant::now();
    let mut rest = Vec::new();
    let r = idle.read_to_end(&mut rest);
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "sshd -i outlived Drop: {r:?}"
    );
}

#[test]
fn ssh_through_a_proxy_command_to_a_maint_host_name() {
    // As through proxytunnel: ssh checks the host key under the maint name
    // (and lowercases it); the `*` known_hosts line matches any name.
    let sshd = Sshd::start();
    let out = run_with_timeout(
        Command::new(require_tool("ssh"))
            .args(sshd.ssh_base_args())
            .arg("-o")
            .arg(format!(
                "ProxyCommand=socat - TCP:127.0.0.1:{}",
                sshd.port()
            ))
            .arg(format!("{}@1234-Web01.maint.example.com", sshd.user()))
            .arg("echo via proxy"),
        T,
    );
    assert_ok("ssh with ProxyCommand", &out);
    assert_eq!(stdout_of(&out), "via proxy\n");
}

#[test]
fn plink_runs_a_remote_command_with_pinned_host_key() {
    let sshd = Sshd::start();
    let fp = sshd.plink_hostkey();
    assert!(fp.starts_with("SHA256:"), "{fp}");
    let ppk = sshd.ppk_key();
    assert!(std::fs::read_to_string(&ppk)
        .unwrap()
        .starts_with("PuTTY-User-Key-File-3: ssh-ed25519"));
    let out = run_with_timeout(
        Command::new(require_tool("plink"))
            .args(["-batch", "-hostkey", &fp, "-i"])
            .arg(&ppk)
            .args(["-P", &sshd.port().to_string()])
            .arg(format!("{}@127.0.0.1", sshd.user()))
            .arg("echo hi"),
        T,
    );
    assert_ok("plink", &out);
    assert_eq!(stdout_of(&out), "hi\n");

    // plink_base_args is the same, plus -noagent.
    let out = run_with_timeout(
        Command::new(require_tool("plink"))
            .args(sshd.plink_base_args())
            .args(["-P", &sshd.port().to_string()])
            .arg(format!("{}@127.0.0.1", sshd.user()))
            .arg("echo hi2"),
        T,
    );
    assert_ok("plink (base args)", &out);
    assert_eq!(stdout_of(&out), "hi2\n");

    // A wrong pinned key is refused in batch mode, not prompted for.
    let other = Sshd::start();
    let out = run_with_timeout(
        Command::new(require_tool("plink"))
            .args(["-batch", "-hostkey", &other.plink_hostkey(), "-i"])
            .arg(&ppk)
            .args(["-P", &sshd.port().to_string()])
            .arg(format!("{}@127.0.0.1", sshd.user()))
            .arg("echo hi"),
        T,
    );
    assert!(!out.status.success(), "plink accepted a wrong host key");
}

// ------------------------------------------------------------ netns

fn netns_exists(name: &str) -> bool {
    let out = run_with_timeout(Command::new("ip").args(["netns", "list"]), T);
    stdout_of(&out)
        .lines()
        .any(|l| l.split_whitespace().next() == Some(name))
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

#[test]
fn netns_echo_through_socat_from_the_root_namespace() {
    let ns = Netns::create();
    let name = ns.name().to_string();
    let host_if = ns.host_if().to_string();
    assert!(name.starts_with(&format!("mgt-{}-", std::process::id())));
    assert!(netns_exists(&name));
    assert!(link_exists(&host_if));
    let (h, n) = (ns.host_ip().octets(), ns.ns_ip().octets());
    assert_eq!((h[0], h[1], n[0], n[1]), (10, 233, 10, 233));
    assert_eq!(u32::from(ns.ns_ip()), u32::from(ns.host_ip()) + 1);

    // lo is up inside, and the address is there.
    let out = ns.exec(&["ip", "-o", "addr", "show"]);
    assert_ok("ip addr in ns", &out);
    let addrs = stdout_of(&out);
    assert!(
        addrs.contains(&format!("inet {}/30", ns.ns_ip())),
        "{addrs}"
    );
    assert!(addrs.contains("inet 127.0.0.1/8"), "{addrs}");

    let socat = ns.spawn(&["socat", "TCP-LISTEN:2222,fork,reuseaddr", "EXEC:cat"]);
    let addr = SocketAddr::from((ns.ns_ip(), 2222));
    let mut s = connect_with_retry(addr, T);
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(b"hello from the root namespace\n").unwrap();
    let mut line = String::new();
    BufReader::new(s.try_clone().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "hello from the root namespace\n");
    // The namespace is not reachable through loopback of the root ns.
    assert!(TcpStream::connect(("127.0.0.1", 2222)).is_err() || !netns_exists(&name));
    let socat_pid = socat.id();

    drop(ns);
    assert!(!netns_exists(&name), "namespace {name} left behind");
    assert!(!link_exists(&host_if), "veth {host_if} left behind");
    poll_until("socat in the namespace to die", T, || {
        pid_gone(socat_pid).then_some(())
    });
    drop(socat);
}

#[test]
fn netns_instances_get_distinct_subnets() {
    let a = Netns::create();
    let b = Netns::create();
    assert_ne!(a.name(), b.name());
    assert_ne!(a.ns_ip(), b.ns_ip());
    assert_ne!(a.host_ip(), b.host_ip());
    // Isolated from each other's addresses but each reachable from the root.
    let out = a.exec(&["ip", "-o", "addr", "show"]);
    assert!(!stdout_of(&out).contains(&b.ns_ip().to_string()));
}

#[test]
fn netns_cleaned_up_when_a_test_panics() {
    let (tx, rx) = std::sync::mpsc::channel();
    let r = std::panic::catch_unwind(move || {
        let ns = Netns::create();
        tx.send((ns.name().to_string(), ns.host_if().to_string()))
            .unwrap();
        let _c = ns.spawn(&["sleep", "1000"]);
        panic!("test body fails");
    });
    assert!(r.is_err());
    let (name, host_if) = rx.recv().unwrap();
    assert!(!netns_exists(&name));
    assert!(!link_exists(&host_if));
}

#[test]
fn netns_stale_namespaces_of_dead_pids_are_removed() {
    // A pid that does not exist: above every live one, below pid_max.
    let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let dead = (1000..pid_max)
        .rev()
        .find(|p| !Path::new(&format!("/proc/{p}")).exists())
        .unwrap();
    let stale = format!("mgt-{dead}-0");
    let out = run_with_timeout(Command::new("ip").args(["netns", "add", &stale]), T);
    assert_ok("ip netns add", &out);
    // Ours (live pid) must survive the cleanup.
    let live = Netns::create();
    clean_stale_namespaces();
    let gone = !netns_exists(&stale);
    if !gone {
        let _ = run_with_timeout(Command::new("ip").args(["netns", "delete", &stale]), T);
    }
    assert!(gone, "stale namespace {stale} not cleaned");
    assert!(netns_exists(live.name()));
}

#[test]
fn netns_runs_a_real_sshd_reached_by_ssh() {
    let sshd = Sshd::start();
    let ns = Netns::create();
    let exec = format!("EXEC:{},nofork", sshd.inetd_command().join(" "));
    let _socat = ns.spawn(&[
        "socat".to_string(),
        "TCP-LISTEN:22,fork,reuseaddr".to_string(),
        exec,
    ]);
    connect_with_retry(SocketAddr::from((ns.ns_ip(), 22)), T);
    let out = run_with_timeout(
        &mut ssh_cmd(
            &sshd,
            22,
            &ns.ns_ip().to_string(),
            "echo hello from ns; ip -o -4 addr show",
        ),
        T,
    );
    assert_ok(
        &format!("ssh to the namespace (sshd log: {})", sshd.log()),
        &out,
    );
    let text = stdout_of(&out);
    assert!(text.starts_with("hello from ns\n"), "{text}");
    // The command ran inside the namespace: it sees the namespace's address.
    assert!(text.contains(&format!("inet {}/30", ns.ns_ip())), "{text}");
    // The harness' own listener was not used.
    assert_eq!(sshd.connections(), 0);
}

// ------------------------------------------------------------ targets

#[tokio::test]
async fn echo_server_echoes_and_honours_half_close() {
    within("echo", T, async {
        let echo = EchoServer::start();
        let mut s = tokio::net::TcpStream::connect(echo.addr()).await.unwrap();
        let msg: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        // Send everything, then half-close: the reply must still arrive in full.
        let (mut rd, mut wr) = s.split();
        let send = async {
            wr.write_all(&msg).await.unwrap();
            wr.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let recv = rd.read_to_end(&mut got);
        let (_, n) = tokio::join!(send, recv);
        n.unwrap();
        assert_eq!(got, msg);

        // Stops on drop.
        let addr = echo.addr();
        drop(echo);
        poll_until_async("echo listener to close", T, || async move {
            tokio::net::TcpStream::connect(addr)
                .await
                .is_err()
                .then_some(())
        })
        .await;
    })
    .await;
}

#[test]
fn https_server_answers_curl_with_its_own_ca() {
    let name = "1234-ipo2.maint.example.com";
    let srv = HttpsServer::start(&[name, "127.0.0.1"], "<h1>hello target</h1>");
    let url = format!("https://{name}:{}/login", srv.port());
    let out = run_with_timeout(
        Command::new(require_tool("curl"))
            .args(["-sS", "--fail", "--max-time", "20", "--cacert"])
            .arg(srv.ca_pem_path())
            .args([
                "--resolve",
                &format!("{name}:{}:127.0.0.1", srv.port()),
                &url,
            ]),
        T,
    );
    assert_ok("curl", &out);
    assert_eq!(stdout_of(&out), "<h1>hello target</h1>");
    // The IP SAN works too, and keep-alive serves several requests.
    let ip_url = format!("https://127.0.0.1:{}/a", srv.port());
    let out = run_with_timeout(
        Command::new("curl")
            .args(["-sS", "--fail", "--max-time", "20", "--cacert"])
            .arg(srv.ca_pem_path())
            .args([&ip_url, &ip_url]),
        T,
    );
    assert_ok("curl by IP", &out);
    assert_eq!(stdout_of(&out), "<h1>hello target</h1>".repeat(2));
    let reqs = srv.requests();
    assert_eq!(reqs.len(), 3, "{reqs:?}");
    assert_eq!(reqs[0].request_line, "GET /login HTTP/1.1");
    assert_eq!(reqs[0].sni.as_deref(), Some(name));
    assert_eq!(
        reqs[0].host.as_deref(),
        Some(&*format!("{name}:{}", srv.port()))
    );

    // Without the CA, curl refuses the certificate.
    let out = run_with_timeout(
        Command::new("curl")
            .args(["-sS", "--max-time", "20", "--cacert", "/dev/null"])
            .args([
                "--resolve",
                &format!("{name}:{}:127.0.0.1", srv.port()),
                &url,
            ]),
        T,
    );
    assert!(!out.status.success());
}

const MIB100: u64 = 100 * 1024 * 1024;

#[test]
fn pattern_is_deterministic() {
    let mut a = vec![0u8; 1000];
    let mut b = vec![0u8; 1000];
    std::io::Read::read_exact(&mut Pattern::new(1000), &mut a).unwrap();
    // Odd chunk sizes give the same stream.
    let mut p = Pattern::new(1000);
    let mut off = 0;
    for k in [3usize, 1, 7, 8, 13, 500, 468] {
        off += p.fill(&mut b[off..off + k]);
    }
    assert_eq!(off, 1000);
    assert_eq!(a, b);
    assert_eq!(p.fill(&mut [0u8; 10]), 0);
    let mut h = Hasher::default();
    h.update(&a);
    assert_eq!(h.finish().sha256, pattern_sha256(1000));
    assert_ne!(pattern_sha256(1000), pattern_sha256(999));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_and_source_check_100_mib_in_both_directions() {
    within("100 MiB both ways", Duration::from_secs(300), async {
        // Upload: client -> sink; the report comes back on the socket and
        // through next_report.
        let sink = SinkServer::start();
        let mut s = tokio::net::TcpStream::connect(sink.addr()).await.unwrap();
        tokio::io::copy(&mut Pattern::new(MIB100), &mut s)
            .await
            .unwrap();
        s.shutdown().await.unwrap();
        let mut line = String::new();
        s.read_to_string(&mut line).await.unwrap();
        let rep = SinkReport::parse(&line).unwrap();
        assert_eq!(
            rep,
            SinkReport {
                bytes: MIB100,
                sha256: pattern_sha256(MIB100)
            }
        );
        assert_eq!(sink.next_report_async(T).await, rep);

        // Download: source -> client.
        let src = SinkServer::serve_bytes(MIB100);
        let mut s = tokio::net::TcpStream::connect(src.addr()).await.unwrap();
        let mut h = Hasher::default();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        s.shutdown().await.unwrap();
        let got = h.finish();
        assert_eq!(got.bytes, MIB100);
        assert_eq!(got.sha256, src.expected_sha256());
    })
    .await;
}

#[test]
fn sink_reports_blocking_from_a_sync_test() {
    let sink = SinkServer::start();
    let mut s = TcpStream::connect(sink.addr()).unwrap();
    s.write_all(b"abc").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let rep = sink.next_report(T);
    assert_eq!(rep.bytes, 3);
    assert_eq!(
        rep.sha256,
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}
