//! `maintgate demo`: a broker, a site agent and demo targets in one
//! process, for a newcomer's first command.
//!
//! [`run`] does, in order:
//! 1. creates a private temporary directory (`data/` for the store,
//!    `certs/` for the broker's generated CA and certificate, `site-certs/`
//!    for the HTTPS demo target's own CA), removed again on exit;
//! 2. binds the broker on `127.0.0.1:6443`, or on a free port when 6443 is
//!    taken (or on `--listen`, which must be a loopback or unspecified
//!    address), with the domain [`DOMAIN`];
//! 3. creates the proxy account [`USER`] with a fresh random password,
//!    customer [`CUSTOMER`] and its primary system [`SYSTEM`];
//! 4. starts the demo targets on `127.0.0.1` ephemeral ports: an HTTP hello
//!    page, the same page over HTTPS, and a TCP echo service, and notices
//!    whether an sshd answers on `127.0.0.1:22`;
//! 5. starts an in-process agent for the system, trusting the generated CA,
//!    whose `services` are exactly those ports (plus 22 when sshd is there);
//! 6. waits until the broker has registered the agent, prints commands that
//!    work when pasted, and a last line [`READY_LINE`];
//! 7. on the shutdown future (Ctrl-C or SIGTERM in `main.rs`): drains the
//!    broker, stops the agent and the targets, and removes the directory.
//!
//! Output contract (tests and scripts rely on it): every command is
//! printed alone on its line, exactly as to paste, and starts with its
//! program name (`curl `, `proxytunnel `, `ssh `); the plain-HTTP curl
//! command is the first line starting with `curl `, the HTTPS one the
//! second; the proxytunnel line talks to the echo service over
//! stdin/stdout. Every other line starts with `# `, except the status
//! lines that start with `maintgate demo:`.

use std::future::Future;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::agent::config::AgentFile;
use crate::agent::AgentSettings;
use crate::broker::{Broker, BrokerError};
use crate::config::{BrokerSettings, ConfigError};
use crate::secret::{self, Secret, SecretError};
use crate::store::StoreError;
use crate::tls::{self, CertPaths, TlsError};

/// The maint domain of the demo (resolves to loopback by convention).
pub const DOMAIN: &str = "maint.localhost";
/// The demo's proxy account.
pub const USER: &str = "demo";
/// The demo customer.
pub const CUSTOMER: &str = "1234";
/// The demo customer's primary system.
pub const SYSTEM: &str = "pbx";
/// The port tried first when `--listen` is not given.
pub const DEFAULT_PORT: u16 = 6443;
/// Text of the hello page (in its `<h1>`).
pub const HELLO_TEXT: &str = "Hello from the maintgate demo";
/// The last line printed once everything is up.
pub const READY_LINE: &str = "maintgate demo: ready; press Ctrl-C to stop";

/// How long the agent may take to register before the demo gives up.
const AGENT_DEADLINE: Duration = Duration::from_secs(20);
/// Broker drain deadline at shutdown: a demo should stop promptly.
const DRAIN: Duration = Duration::from_secs(3);
/// Deadline for reading a request head on the hello page.
const HEAD_DEADLINE: Duration = Duration::from_secs(10);
/// Largest request head the hello page reads.
const MAX_HEAD: usize = 16 * 1024;

/// Options of `maintgate demo`.
#[derive(Debug, Clone, Default)]
pub struct DemoOptions {
    /// Proxy listener; `None` tries `127.0.0.1:6443`, then a free port.
    pub listen: Option<SocketAddr>,
}

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("broker: {0}")]
    Broker(#[from] BrokerError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("password: {0}")]
    Secret(#[from] SecretError),
    #[error("agent settings: {0}")]
    Config(#[from] ConfigError),
    #[error("demo target certificate: {0}")]
    Tls(#[from] TlsError),
    #[error("--listen {0}: the demo listens on a loopback address (127.0.0.1, ::1) or on 0.0.0.0/[::] only")]
    NotLoopback(SocketAddr),
    #[error("the in-process agent did not register within {0:?}; see the log above")]
    AgentTimeout(Duration),
    #[error("background task failed: {0}")]
    Join(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DemoError {
    let what = what.into();
    move |source| DemoError::Io { what, source }
}

/// A private temporary directory, removed on drop.
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn create() -> Result<TempDir, DemoError> {
        use rand::distributions::{Alphanumeric, DistString};
        use std::os::unix::fs::DirBuilderExt;
        let base = std::env::temp_dir();
        let mut last = None;
        for _ in 0..16 {
            let suffix = Alphanumeric
                .sample_string(&mut rand::thread_rng(), 10)
                .to_ascii_lowercase();
            let path = base.join(format!("maintgate-demo-{suffix}"));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(TempDir { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => return Err(io_err(format!("creating {}", path.display()))(e)),
            }
        }
        let e = last.unwrap_or_else(|| std::io::Error::other("no free name"));
        Err(io_err(format!(
            "creating a directory in {}",
            base.display()
        ))(e))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            warn!(dir = %self.path.display(), error = %e, "could not remove the demo directory");
        }
    }
}

/// Quote `s` for a POSIX shell when it needs it.
pub fn sh_quote(s: &str) -> String {
    let safe = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-:@%+=,".contains(&b));
    if safe {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// `host:port` with brackets for IPv6.
fn host_port(ip: IpAddr, port: u16) -> String {
    SocketAddr::new(ip, port).to_string()
}

/// The address the agent and the printed commands use to reach a broker
/// bound on `bound`: loopback when it listens on every address.
fn client_ip(bound: SocketAddr) -> IpAddr {
    match bound.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => Ipv4Addr::LOCALHOST.into(),
        IpAddr::V6(v6) if v6.is_unspecified() => Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    }
}

/// Addresses covered by the generated certificate (besides the domain).
fn listen_allowed(addr: SocketAddr) -> bool {
    let ip = addr.ip();
    ip.is_unspecified() || ip == IpAddr::from(Ipv4Addr::LOCALHOST) || ip == Ipv6Addr::LOCALHOST
}

/// The ports and paths the printed commands need.
struct Printed<'a> {
    proxy: String,
    ca: &'a Path,
    site_ca: &'a Path,
    password: &'a str,
    hello_port: u16,
    https_port: u16,
    echo_port: u16,
    sshd: bool,
    dir: &'a Path,
}

/// Write the instructions (see the module docs for the contract).
fn print_instructions(out: &mut dyn Write, p: &Printed<'_>) -> std::io::Result<()> {
    let ca = sh_quote(&p.ca.display().to_string());
    let site_ca = sh_quote(&p.site_ca.display().to_string());
    let proxy = &p.proxy;
    let creds = format!("{USER}:{}", p.password);
    let host = |port: u16| format!("{CUSTOMER}.{DOMAIN}:{port}");
    let ptunnel = format!("proxytunnel -q -E -C {ca} -p {proxy} -P {creds}");
    writeln!(out)?;
    writeln!(
        out,
        "# maintgate demo: broker https://{proxy}, domain {DOMAIN}"
    )?;
    writeln!(out, "# proxy account: {USER}  password: {}", p.password)?;
    writeln!(
        out,
        "# customer {CUSTOMER}, primary system {SYSTEM}; its agent runs in this process"
    )?;
    writeln!(
        out,
        "# temporary data and certificates: {} (removed on exit)",
        p.dir.display()
    )?;
    writeln!(out, "#")?;
    writeln!(
        out,
        "# The hello page through the proxy (-p: curl tunnels http:// URLs with CONNECT only with it):"
    )?;
    writeln!(
        out,
        "curl -p --proxy https://{proxy} --proxy-cacert {ca} --proxy-user {creds} http://{}/",
        host(p.hello_port)
    )?;
    writeln!(
        out,
        "# The same page over HTTPS, end to end with the site's own CA:"
    )?;
    writeln!(
        out,
        "curl --proxy https://{proxy} --proxy-cacert {ca} --proxy-user {creds} --cacert {site_ca} https://{}/",
        host(p.https_port)
    )?;
    writeln!(
        out,
        "# The echo service through proxytunnel (the tool ssh and RDP use): type a line, it comes back; Ctrl-D ends:"
    )?;
    writeln!(out, "{ptunnel} -d {}", host(p.echo_port))?;
    if p.sshd {
        writeln!(out, "# ssh to this machine's sshd, through the tunnel:")?;
        writeln!(
            out,
            "ssh -o 'ProxyCommand={ptunnel} -d %h:%p' {CUSTOMER}.{DOMAIN}"
        )?;
    } else {
        writeln!(
            out,
            "# No sshd answers on 127.0.0.1:22; start one and rerun the demo for an ssh command."
        )?;
    }
    writeln!(
        out,
        "# PAC https://{proxy}/proxy.pac and CA https://{proxy}/ca.pem are served, but \
         Chromium never proxies *.localhost names: for a browser, run `maintgate serve` with a real --domain."
    )?;
    writeln!(out, "{READY_LINE}")?;
    out.flush()
}

/// Run the demo until `shutdown` resolves; `out` receives the
/// instructions (stdout in `main.rs`), logs go to `tracing`.
///
/// # Errors
/// [`DemoError`] when something cannot be set up; a shutdown during
/// start-up is not an error.
pub async fn run(
    opts: DemoOptions,
    shutdown: impl Future<Output = ()>,
    out: &mut dyn Write,
) -> Result<(), DemoError> {
    tokio::pin!(shutdown);
    let dir = TempDir::create()?;
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let result = tokio::select! {
        r = start_and_serve(&opts, &dir, &stop, &tasks, out) => r,
        _ = &mut shutdown => {
            info!("shutdown requested during start-up");
            Ok(Started::No)
        }
    };
    let result = match result {
        Ok(Started::Yes(running)) => {
            shutdown.await;
            info!("shutting down the demo");
            running.stop().await
        }
        Ok(Started::No) => Ok(()),
        Err(e) => Err(e),
    };
    // Whatever happened, stop every task before the directory goes.
    stop.cancel();
    tasks.close();
    if tokio::time::timeout(DRAIN + Duration::from_secs(2), tasks.wait())
        .await
        .is_err()
    {
        warn!("some demo tasks did not stop in time");
    }
    let path = dir.path.clone();
    drop(dir);
    if result.is_ok() {
        let _ = if path.exists() {
            writeln!(
                out,
                "maintgate demo: stopped; could not remove {}",
                path.display()
            )
        } else {
            writeln!(out, "maintgate demo: stopped; removed {}", path.display())
        };
        let _ = out.flush();
    }
    result
}

/// What start-up produced.
enum Started {
    /// Everything runs; stop it with [`Running::stop`].
    Yes(Running),
    /// Nothing to stop.
    No,
}

/// Handles of the running demo.
struct Running {
    broker_stop: CancellationToken,
    broker: tokio::task::JoinHandle<()>,
    agent_stop: CancellationToken,
    agent: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Drain the broker, then stop the agent; the targets stop afterwards
    /// with the demo's `stop` token.
    async fn stop(self) -> Result<(), DemoError> {
        self.broker_stop.cancel();
        let broker = tokio::time::timeout(DRAIN + Duration::from_secs(2), self.broker).await;
        self.agent_stop.cancel();
        let agent = tokio::time::timeout(Duration::from_secs(5), self.agent).await;
        match (broker, agent) {
            (Ok(Ok(())), Ok(Ok(()))) => Ok(()),
            (Ok(Err(e)), _) | (_, Ok(Err(e))) => Err(DemoError::Join(e.to_string())),
            _ => {
                warn!("the broker or the agent did not stop in time");
                Ok(())
            }
        }
    }
}

/// Bind the broker: `--listen`, else 6443 on loopback, else a free port.
async fn bind_broker(opts: &DemoOptions, dir: &Path) -> Result<Broker, DemoError> {
    let settings = |listen: SocketAddr| {
        let mut s = BrokerSettings {
            listen,
            admin_listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            domain: DOMAIN.to_string(),
            data_dir: dir.join("data"),
            certs_dir: dir.join("certs"),
            ..BrokerSettings::default()
        };
        s.limits.drain_timeout = DRAIN;
        s
    };
    if let Some(addr) = opts.listen {
        if !listen_allowed(addr) {
            return Err(DemoError::NotLoopback(addr));
        }
        return Ok(Broker::bind(settings(addr)).await?);
    }
    let preferred = SocketAddr::from((Ipv4Addr::LOCALHOST, DEFAULT_PORT));
    match Broker::bind(settings(preferred)).await {
        Ok(b) => Ok(b),
        Err(BrokerError::Bind { source, .. }) => {
            info!(error = %source, "port {DEFAULT_PORT} is not free; using a free port");
            Ok(Broker::bind(settings(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))).await?)
        }
        Err(e) => Err(e.into()),
    }
}

async fn start_and_serve(
    opts: &DemoOptions,
    dir: &TempDir,
    stop: &CancellationToken,
    tasks: &TaskTracker,
    out: &mut dyn Write,
) -> Result<Started, DemoError> {
    let broker = bind_broker(opts, &dir.path).await?;
    let bound = broker.local_addr();
    let state = broker.state();
    let ca = state.cert_paths().ca();
    // Child tokens: cancelling `stop` (every exit path of `run`) ends them.
    let broker_stop = stop.child_token();
    let broker_task = tasks.spawn(broker.run(broker_stop.clone().cancelled_owned()));

    // Account, customer, system.
    let password = secret::generate_password();
    let pw = password.clone();
    let hash = tokio::task::spawn_blocking(move || secret::hash_password(&pw))
        .await
        .map_err(|e| DemoError::Join(e.to_string()))??;
    let store = state.store();
    store.add_account(USER, &hash).await?;
    store
        .add_customer(CUSTOMER, USER, Some("Demo customer"))
        .await?;
    let token = secret::generate_token();
    let system = store
        .add_system(CUSTOMER, SYSTEM, true, &secret::token_hash(&token))
        .await?;

    // Targets.
    let loopback = IpAddr::from(Ipv4Addr::LOCALHOST);
    let hello = bind(loopback).await?;
    let https = bind(loopback).await?;
    let echo = bind(loopback).await?;
    let (hello_port, https_port, echo_port) = (port(&hello)?, port(&https)?, port(&echo)?);
    let site = CertPaths {
        dir: dir.path.join("site-certs"),
    };
    tls::ensure_certs(&site, DOMAIN)?;
    let acceptor = TlsAcceptor::from(Arc::new(tls::server_config(tls::CertResolver::new(
        tls::load_certified_key(&site)?,
    ))?));
    spawn_server(tasks, stop, hello, move |s| serve_hello(s, "HTTP"));
    spawn_server(tasks, stop, https, move |s| {
        let acceptor = acceptor.clone();
        async move {
            match tokio::time::timeout(HEAD_DEADLINE, acceptor.accept(s)).await {
                Ok(Ok(tls)) => serve_hello(tls, "HTTPS").await,
                Ok(Err(e)) => debug!(error = %e, "demo HTTPS handshake failed"),
                Err(_) => debug!("demo HTTPS handshake timed out"),
            }
        }
    });
    spawn_server(tasks, stop, echo, serve_echo);
    let sshd = sshd_listening().await;

    // The agent.
    let mut services = vec![hello_port, https_port, echo_port];
    if sshd {
        services.push(22);
    }
    let file = AgentFile {
        broker: None,
        ca: None,
        token_file: None,
        self_address: Some(loopback),
        remote_access: true,
        services,
        co_located: false,
        tunnels: Vec::new(),
        dial_timeout_ms: Some(5_000),
        window_bytes: None,
        max_window_bytes: None,
        max_streams: None,
        ping_interval_ms: None,
        dead_after_ms: None,
        beats_per_ping: None,
        reconnect_min_ms: Some(100),
        reconnect_max_ms: Some(2_000),
        link_notsent_lowat_bytes: None,
    };
    let broker_ip = client_ip(bound);
    let agent_settings = AgentSettings::from_parts(
        file,
        format!("wss://{}/agent", host_port(broker_ip, bound.port())),
        Secret::new(token),
        Some(ca.clone()),
    )?;
    let agent_stop = stop.child_token();
    let agent_task = tasks.spawn(crate::agent::run(agent_settings, agent_stop.clone()));
    let running = Running {
        broker_stop,
        broker: broker_task,
        agent_stop,
        agent: agent_task,
    };

    // Wait for the agent's session, bounded.
    let deadline = tokio::time::Instant::now() + AGENT_DEADLINE;
    while state.registry().agent(system.id).is_none() {
        if tokio::time::Instant::now() >= deadline {
            return Err(DemoError::AgentTimeout(AGENT_DEADLINE));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    info!(%bound, "demo broker and agent are up");
    print_instructions(
        out,
        &Printed {
            proxy: host_port(broker_ip, bound.port()),
            ca: &ca,
            site_ca: &site.ca(),
            password: &password,
            hello_port,
            https_port,
            echo_port,
            sshd,
            dir: &dir.path,
        },
    )
    .map_err(io_err("writing the instructions"))?;
    Ok(Started::Yes(running))
}

async fn bind(ip: IpAddr) -> Result<TcpListener, DemoError> {
    TcpListener::bind((ip, 0))
        .await
        .map_err(io_err(format!("binding a demo target on {ip}")))
}

fn port(l: &TcpListener) -> Result<u16, DemoError> {
    l.local_addr()
        .map(|a| a.port())
        .map_err(io_err("reading a demo target's port"))
}

/// Accept on `listener` until `stop`, one tracked task per connection.
fn spawn_server<F, Fut>(
    tasks: &TaskTracker,
    stop: &CancellationToken,
    listener: TcpListener,
    handler: F,
) where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let stop = stop.clone();
    let inner = tasks.clone();
    tasks.spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.cancelled() => return,
            };
            match accepted {
                Ok((sock, _)) => {
                    let _ = sock.set_nodelay(true);
                    let conn = handler(sock);
                    let stop = stop.clone();
                    inner.spawn(async move {
                        tokio::select! {
                            _ = conn => {}
                            _ = stop.cancelled() => {}
                        }
                    });
                }
                Err(e) => {
                    warn!(error = %e, "demo target accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
}

/// The hello page: read one request head, answer 200 with a small HTML
/// page, close.
async fn serve_hello<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, scheme: &'static str) {
    let mut head = Vec::with_capacity(1024);
    let read = async {
        let mut chunk = [0u8; 2048];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => head.extend_from_slice(&chunk[..n]),
            }
        }
        true
    };
    if !matches!(tokio::time::timeout(HEAD_DEADLINE, read).await, Ok(true)) {
        return;
    }
    let body = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>maintgate demo</title></head>\n\
         <body><h1>{HELLO_TEXT}</h1>\n<p>Demo target of customer {CUSTOMER}, system {SYSTEM}, \
         served over {scheme}.</p></body></html>\n"
    );
    let is_head = head.starts_with(b"HEAD ");
    let reply = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n{}",
        body.len(),
        if is_head { "" } else { body.as_str() }
    );
    let _ = s.write_all(reply.as_bytes()).await;
    let _ = s.flush().await;
    let _ = s.shutdown().await;
}

/// Echo every byte; after the client's EOF, close the write side too.
async fn serve_echo(sock: TcpStream) {
    let (mut r, mut w) = sock.into_split();
    let _ = tokio::io::copy(&mut r, &mut w).await;
    let _ = w.shutdown().await;
}

/// Whether an SSH server answers on `127.0.0.1:22` (it sends `SSH-` first).
async fn sshd_listening() -> bool {
    let probe = async {
        let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, 22)).await.ok()?;
        let mut banner = [0u8; 4];
        s.read_exact(&mut banner).await.ok()?;
        Some(&banner == b"SSH-")
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), probe).await,
        Ok(Some(true))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(
            sh_quote("/tmp/maintgate-demo-ab12/certs/ca.pem"),
            "/tmp/maintgate-demo-ab12/certs/ca.pem"
        );
        assert_eq!(
            sh_quote("/tmp/with space/ca.pem"),
            "'/tmp/with space/ca.pem'"
        );
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sh_quote(""), "''");
    }

    #[test]
    fn listen_addresses() {
        for ok in ["127.0.0.1:0", "[::1]:6443", "0.0.0.0:6443", "[::]:1"] {
            assert!(listen_allowed(ok.parse().unwrap()), "{ok}");
        }
        for bad in ["192.168.1.5:6443", "127.0.0.2:6443"] {
            assert!(!listen_allowed(bad.parse().unwrap()), "{bad}");
        }
        assert_eq!(
            client_ip("0.0.0.0:1".parse().unwrap()),
            IpAddr::from(Ipv4Addr::LOCALHOST)
        );
        assert_eq!(host_port(Ipv6Addr::LOCALHOST.into(), 6443), "[::1]:6443");
    }

    #[test]
    fn instructions_follow_the_contract() {
        let mut out = Vec::new();
        print_instructions(
            &mut out,
            &Printed {
                proxy: "127.0.0.1:6443".into(),
                ca: Path::new("/tmp/d/certs/ca.pem"),
                site_ca: Path::new("/tmp/d/site-certs/ca.pem"),
                password: "Pw123",
                hello_port: 1001,
                https_port: 1002,
                echo_port: 1003,
                sshd: true,
                dir: Path::new("/tmp/d"),
            },
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        let first_curl = text.lines().find(|l| l.starts_with("curl ")).unwrap();
        assert_eq!(
            first_curl,
            "curl -p --proxy https://127.0.0.1:6443 --proxy-cacert /tmp/d/certs/ca.pem \
             --proxy-user demo:Pw123 http://1234.maint.localhost:1001/"
        );
        assert!(text
            .lines()
            .any(|l| l.starts_with("ssh -o 'ProxyCommand=proxytunnel")));
        assert_eq!(text.lines().last(), Some(READY_LINE));
    }
}
