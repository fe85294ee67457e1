//! A real OpenSSH `sshd` for tests, without port races: the harness owns the
//! listening socket (`127.0.0.1:0`) and starts `sshd -i` (inetd mode) for
//! every accepted connection, with the socket as its stdin and stdout.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use std::os::unix::process::CommandExt;

use super::process::{kill_group, require_tool, run_with_timeout};

pub struct Sshd {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    sshd: PathBuf,
    host_key_pub: String,
    stop: Arc<AtomicBool>,
    children: Arc<Mutex<Vec<Child>>>,
    accept_thread: Option<JoinHandle<()>>,
}

fn keygen(path: &Path) {
    let out = run_with_timeout(
        Command::new(require_tool("ssh-keygen"))
            .args([
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "maintgate-test",
                "-f",
            ])
            .arg(path),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "ssh-keygen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Paths go unquoted into sshd_config and into socat's `EXEC:` string.
fn check_plain_path(p: &Path) {
    let s = p.to_str().expect("utf-8 temp path");
    assert!(
        !s.chars()
            .any(|c| c.is_whitespace() || "\"'\\,:!%".contains(c)),
        "temp path {s:?} has characters the sshd/socat command line cannot carry"
    );
}

impl Sshd {
    /// Generates keys and config in a tempdir and starts accepting on
    /// `127.0.0.1:0`. Panics if sshd, ssh-keygen or puttygen is missing.
    pub fn start() -> Sshd {
        let sshd = require_tool("/usr/sbin/sshd");
        let dir = tempfile::Builder::new()
            .prefix("mgt-sshd-")
            .tempdir()
            .expect("tempdir");
        check_plain_path(dir.path());
        // Privilege separation directory; sshd refuses to start without it.
        fs::create_dir_all("/run/sshd").expect("create /run/sshd (are we root?)");

        let d = dir.path();
        keygen(&d.join("ssh_host_ed25519_key"));
        keygen(&d.join("id_ed25519"));
        let client_pub = fs::read_to_string(d.join("id_ed25519.pub")).unwrap();
        fs::write(d.join("authorized_keys"), &client_pub).unwrap();
        let host_key_pub = fs::read_to_string(d.join("ssh_host_ed25519_key.pub")).unwrap();
        let host_key_pub = host_key_pub
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        fs::write(d.join("known_hosts"), format!("* {host_key_pub}\n")).unwrap();

        let config = format!(
            "\
HostKey {d}/ssh_host_ed25519_key
AuthorizedKeysFile {d}/authorized_keys
PidFile none
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
AllowTcpForwarding yes
PrintMotd no
PrintLastLog no
LogLevel ERROR
Subsystem sftp internal-sftp
",
            d = d.display()
        );
        fs::write(d.join("sshd_config"), config).unwrap();

        // Validate the config up front so a bad config fails here, loudly,
        // and not as a mysterious "connection closed" in the client.
        let out = run_with_timeout(
            Command::new(&sshd)
                .arg("-t")
                .arg("-f")
                .arg(d.join("sshd_config")),
            Duration::from_secs(30),
        );
        assert!(
            out.status.success(),
            "sshd -t failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );

        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let mut sshd_obj = Sshd {
            dir,
            addr,
            sshd,
            host_key_pub,
            stop: Arc::new(AtomicBool::new(false)),
            children: Arc::new(Mutex::new(Vec::new())),
            accept_thread: None,
        };
        let argv = sshd_obj.inetd_command();
        let stop = sshd_obj.stop.clone();
        let children = sshd_obj.children.clone();
        sshd_obj.accept_thread = Some(std::thread::spawn(move || {
            accept_loop(listener, argv, stop, children)
        }));
        sshd_obj
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The user to log in as: the current user (root in CI).
    pub fn user(&self) -> String {
        let out = run_with_timeout(Command::new("id").arg("-un"), Duration::from_secs(10));
        let u = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if u.is_empty() {
            "root".into()
        } else {
            u
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// OpenSSH private key of the client (authorized on this sshd).
    pub fn client_key(&self) -> PathBuf {
        self.dir.path().join("id_ed25519")
    }

    /// `ssh-ed25519 AAAA...` (no comment).
    pub fn host_key_pub(&self) -> &str {
        &self.host_key_pub
    }

    /// `<host_pattern> ssh-ed25519 AAAA...`, e.g. for `[127.0.0.1]:2222`.
    pub fn known_hosts_line(&self, host_pattern: &str) -> String {
        format!("{host_pattern} {}", self.host_key_pub)
    }

    /// A known_hosts file whose only line is `* ssh-ed25519 ...`.
    pub fn known_hosts_file(&self) -> PathBuf {
        self.dir.path().join("known_hosts")
    }

    /// sshd's log (LogLevel ERROR), for diagnostics.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// Arguments for `ssh` (before the destination): our key, strict host
    /// key checking against our known_hosts, batch mode, no user config.
    pub fn ssh_base_args(&self) -> Vec<String> {
        vec![
            "-i".into(),
            self.client_key().display().to_string(),
            "-o".into(),
            "IdentitiesOnly=yes".into(),
            "-o".into(),
            "StrictHostKeyChecking=yes".into(),
            "-o".into(),
            format!("UserKnownHostsFile={}", self.known_hosts_file().display()),
            "-o".into(),
            "GlobalKnownHostsFile=/dev/null".into(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "ConnectTimeout=10".into(),
            "-F".into(),
            "/dev/null".into(),
        ]
    }

    /// The `sshd -i` argv (absolute paths, no spaces), usable by a
    /// `socat TCP-LISTEN:...,fork EXEC:"..."` inside a network namespace.
    pub fn inetd_command(&self) -> Vec<String> {
        let d = self.dir.path().display();
        vec![
            self.sshd.display().to_string(),
            "-i".into(),
            "-f".into(),
            format!("{d}/sshd_config"),
            "-E".into(),
            format!("{d}/sshd.log"),
        ]
    }

    /// The SHA256 fingerprint of the host key (`SHA256:...`), as plink's
    /// `-hostkey` accepts it.
    pub fn plink_hostkey(&self) -> String {
        let out = run_with_timeout(
            Command::new(require_tool("ssh-keygen"))
                .args(["-E", "sha256", "-lf"])
                .arg(self.dir.path().join("ssh_host_ed25519_key.pub")),
            Duration::from_secs(30),
        );
        assert!(out.status.success(), "ssh-keygen -l failed");
        let s = String::from_utf8_lossy(&out.stdout);
        s.split_whitespace()
            .find(|w| w.starts_with("SHA256:"))
            .unwrap_or_else(|| panic!("no SHA256 fingerprint in {s:?}"))
            .to_string()
    }

    /// The client key in PuTTY's .ppk format (converted with puttygen on
    /// first use), for `plink -i`.
    pub fn ppk_key(&self) -> PathBuf {
        let ppk = self.dir.path().join("id_ed25519.ppk");
        if !ppk.exists() {
            let out = run_with_timeout(
                Command::new(require_tool("puttygen"))
                    .arg(self.client_key())
                    .args(["-O", "private", "-o"])
                    .arg(&ppk),
                Duration::from_secs(30),
            );
            assert!(
                out.status.success() && ppk.exists(),
                "puttygen failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        ppk
    }

    /// Arguments for `plink` (before the destination): batch mode, pinned
    /// host key, our .ppk key, no agent.
    pub fn plink_base_args(&self) -> Vec<String> {
        vec![
            "-batch".into(),
            "-noagent".into(),
            "-hostkey".into(),
            self.plink_hostkey(),
            "-i".into(),
            self.ppk_key().display().to_string(),
        ]
    }

    /// Number of sshd processes started so far (one per accepted connection).
    pub fn connections(&self) -> usize {
        self.children.lock().unwrap().len()
    }
}

fn accept_loop(
    listener: TcpListener,
    argv: Vec<String>,
    stop: Arc<AtomicBool>,
    children: Arc<Mutex<Vec<Child>>>,
) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(sock) = conn else { continue };
        let spawn = || -> std::io::Result<Child> {
            let sock_out: OwnedFd = sock.try_clone()?.into();
            let sock_in: OwnedFd = sock.into();
            Command::new(&argv[0])
                .args(&argv[1..])
                .process_group(0)
                .stdin(Stdio::from(sock_in))
                .stdout(Stdio::from(sock_out))
                .stderr(Stdio::null())
                .spawn()
        };
        match spawn() {
            Ok(child) => {
                let mut kids = children.lock().unwrap();
                // Reap the ones that are done; keep them counted.
                for k in kids.iter_mut() {
                    let _ = k.try_wait();
                }
                kids.push(child);
            }
            Err(e) => eprintln!("harness sshd: cannot spawn sshd -i: {e}"),
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept() with a connection of our own.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
        for mut c in self.children.lock().unwrap().drain(..) {
            kill_group(c.id());
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
