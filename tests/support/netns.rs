//! A private network namespace that plays a co-located server's host.
//!
//! `Netns::create()` makes `mgt-<pid>-<n>`, a veth pair (host side in the
//! root namespace, peer inside), a /30 from 10.233.0.0/16 that no other live
//! instance holds, and brings the links (and `lo` inside) up. Drop kills every
//! process in the namespace, deletes the veth and the namespace.

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, Once};
use std::time::Duration;

use super::process::{require_tool, run_with_timeout, ChildGuard};

static COUNTER: AtomicU32 = AtomicU32::new(0);
static CLEAN_STALE: Once = Once::new();
/// Serialises creation inside this process (claims are also cross-process).
static CREATE_LOCK: Mutex<()> = Mutex::new(());

/// Where /30 claims live: one file per subnet index, holding the owner pid.
const CLAIM_DIR: &str = "/run/mgt-netns";
/// Number of /30 subnets in 10.233.0.0/16.
const SUBNETS: u32 = 1 << 14;

pub struct Netns {
    name: String,
    host_if: String,
    subnet: u32,
    host_ip: Ipv4Addr,
    ns_ip: Ipv4Addr,
}

fn ip(args: &[&str]) -> Output {
    run_with_timeout(
        Command::new(require_tool("ip")).args(args),
        Duration::from_secs(30),
    )
}

fn ip_ok(args: &[&str]) {
    let out = ip(args);
    assert!(
        out.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

fn subnet_addrs(s: u32) -> (Ipv4Addr, Ipv4Addr) {
    let third = (s >> 6) as u8;
    let fourth = ((s & 63) * 4) as u8;
    (
        Ipv4Addr::new(10, 233, third, fourth + 1),
        Ipv4Addr::new(10, 233, third, fourth + 2),
    )
}

/// Atomically claims subnet `s` for this process; a claim by a dead pid is
/// taken over.
fn claim_subnet(s: u32) -> bool {
    let path = PathBuf::from(CLAIM_DIR).join(s.to_string());
    for _ in 0..2 {
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(mut f) => {
                use std::io::Write;
                let _ = write!(f, "{}", std::process::id());
                return true;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let owner = std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|s| s.trim().parse::<u32>().ok());
                match owner {
                    Some(pid) if pid_alive(pid) => return false,
                    // Dead owner (or a claim being written right now: its
                    // file is empty for a moment; then we lose nothing by
                    // skipping, see below).
                    Some(_) => {
                        let _ = std::fs::remove_file(&path);
                    }
                    None => return false,
                }
            }
            Err(e) => panic!("cannot create claim {}: {e}", path.display()),
        }
    }
    false
}

/// Deletes `mgt-<pid>-*` namespaces (and their veths and subnet claims)
/// whose pid no longer exists: leftovers of a test process that was killed
/// before its Drop ran. Runs once per process on the first `Netns::create`.
pub fn clean_stale_namespaces() {
    let out = ip(&["netns", "list"]);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("mgt-") else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid_alive(pid) {
            continue;
        }
        kill_netns_pids(name);
        // Deleting the namespace destroys the peer and with it the pair.
        let _ = ip(&["netns", "delete", name]);
    }
    // Host-side veths whose namespace is gone disappear with it; claims of
    // dead pids are removed here.
    if let Ok(rd) = std::fs::read_dir(CLAIM_DIR) {
        for e in rd.flatten() {
            let owner = std::fs::read_to_string(e.path())
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok());
            if let Some(pid) = owner {
                if !pid_alive(pid) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

fn kill_netns_pids(name: &str) {
    let out = ip(&["netns", "pids", name]);
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        if let Ok(pid) = pid.parse::<u32>() {
            if pid > 1 && pid != std::process::id() {
                let _ = Command::new("sh")
                    .arg("-c")
                    .arg(format!("kill -KILL {pid} 2>/dev/null"))
                    .stdin(Stdio::null())
                    .status();
            }
        }
    }
}

impl Netns {
    /// Creates the namespace, veth pair and addresses. Panics (after undoing
    /// what it did) if any step fails.
    pub fn create() -> Netns {
        require_tool("ip");
        let _g = CREATE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        CLEAN_STALE.call_once(clean_stale_namespaces);
        std::fs::create_dir_all(CLAIM_DIR).expect("create claim dir (are we root?)");

        let pid = std::process::id();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("mgt-{pid}-{n}");
        // Interface names are at most 15 bytes: "mh" + hex pid (<= 6) + "x" + hex n.
        let host_if = format!("mh{pid:x}x{n:x}");
        let peer_if = format!("mp{pid:x}x{n:x}");
        assert!(host_if.len() <= 15, "interface name too long: {host_if}");

        // Start at a pid/counter-derived subnet; probe until one is claimed
        // (claims are atomic across processes) and not already configured.
        let start = (pid.wrapping_mul(97).wrapping_add(n.wrapping_mul(7919))) % SUBNETS;
        let addrs_now =
            String::from_utf8_lossy(&ip(&["-o", "-4", "addr", "show"]).stdout).into_owned();
        let subnet = (0..SUBNETS)
            .map(|i| (start + i) % SUBNETS)
            .filter(|&s| s != 0) // skip 10.233.0.0/30, in case someone "tries" it by hand
            .find(|&s| {
                let (h, _) = subnet_addrs(s);
                if addrs_now.contains(&format!(" {h}/")) {
                    return false;
                }
                claim_subnet(s)
            })
            .expect("no free /30 in 10.233.0.0/16");
        let (host_ip, ns_ip) = subnet_addrs(subnet);

        let ns = Netns {
            name: name.clone(),
            host_if: host_if.clone(),
            subnet,
            host_ip,
            ns_ip,
        };
        // From here on, Drop undoes whatever was done if a step panics.
        ip_ok(&["netns", "add", &name]);
        ip_ok(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &peer_if, "netns", &name,
        ]);
        ip_ok(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if]);
        ip_ok(&["link", "set", &host_if, "up"]);
        ip_ok(&["-n", &name, "link", "set", "lo", "up"]);
        ip_ok(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{ns_ip}/30"),
            "dev",
            &peer_if,
        ]);
        ip_ok(&["-n", &name, "link", "set", &peer_if, "up"]);
        ip_ok(&[
            "-n",
            &name,
            "route",
            "add",
            "default",
            "via",
            &host_ip.to_string(),
        ]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's address (the co-located server's IP).
    pub fn ns_ip(&self) -> Ipv4Addr {
        self.ns_ip
    }

    /// The root namespace's address on the veth (the agent side).
    pub fn host_ip(&self) -> Ipv4Addr {
        self.host_ip
    }

    /// Host-side interface name.
    pub fn host_if(&self) -> &str {
        &self.host_if
    }

    /// A `Command` that runs `program` inside the namespace
    /// (`ip netns exec <name> program`); add args, stdio as you like.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new(require_tool("ip"));
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Spawns `argv` inside the namespace (stdin null, stdout piped, stderr
    /// inherited). The returned guard kills it on drop; Drop of the Netns
    /// kills every process left in the namespace anyway.
    pub fn spawn<S: AsRef<OsStr>>(&self, argv: &[S]) -> ChildGuard {
        assert!(!argv.is_empty(), "empty argv");
        let mut c = self.command(&argv[0]);
        c.args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        ChildGuard::spawn(&mut c)
    }

    /// Runs `argv` inside the namespace to completion (at most 30 s).
    pub fn exec<S: AsRef<OsStr>>(&self, argv: &[S]) -> Output {
        assert!(!argv.is_empty(), "empty argv");
        let mut c = self.command(&argv[0]);
        c.args(&argv[1..]);
        run_with_timeout(&mut c, Duration::from_secs(30))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // `ip netns exec` execs the program, so every spawned child and its
        // descendants are in the namespace: kill them all.
        kill_netns_pids(&self.name);
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "delete", &self.name]);
        let _ = std::fs::remove_file(PathBuf::from(CLAIM_DIR).join(self.subnet.to_string()));
    }
}
