//! A maintgate stack for tests: an in-process broker on `127.0.0.1:0`
//! with its own data and certificate directories, a proxy account, a
//! customer, and agents started on demand. Everything stops on drop.

#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use maintgate::agent::AgentSettings;
use maintgate::broker::{Broker, BrokerState};
use maintgate::config::BrokerSettings;
use maintgate::policy::{App, Policy, Tunnel};
use maintgate::secret::{self, Secret};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The maint domain used by tests.
pub const DOMAIN: &str = "maint.test";
/// The proxy account every stack creates.
pub const USER: &str = "alice";
pub const PASS: &str = "Secret-pw.123";

pub struct Stack {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    /// The admin API listener (its own port).
    pub admin: SocketAddr,
    /// The plain test listener, when the settings ask for one.
    pub plain: Option<SocketAddr>,
    pub state: Arc<BrokerState>,
    pub settings: BrokerSettings,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
    agents: Vec<(CancellationToken, JoinHandle<()>)>,
}

/// Broker settings for tests: loopback, port 0, short timers.
pub fn test_settings(dir: &std::path::Path) -> BrokerSettings {
    let mut s = BrokerSettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        domain: DOMAIN.into(),
        data_dir: dir.join("data"),
        certs_dir: dir.join("certs"),
        ..BrokerSettings::default()
    };
    s.limits.revalidate_every = Duration::from_millis(200);
    s.limits.cert_reload_every = Duration::from_millis(200);
    s.limits.drain_timeout = Duration::from_secs(3);
    s
}

impl Stack {
    /// A running broker with account `alice` managing customer `1234`.
    pub async fn start() -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let settings = test_settings(dir.path());
        Self::start_with(dir, settings).await
    }

    pub async fn start_with(dir: tempfile::TempDir, settings: BrokerSettings) -> Stack {
        let broker = Broker::bind(settings.clone()).await.expect("broker binds");
        let addr = broker.local_addr();
        let admin = broker.admin_addr();
        let plain = broker.plain_addr();
        let state = broker.state();
        let stop = CancellationToken::new();
        let s2 = stop.clone();
        let task = tokio::spawn(async move { broker.run(s2.cancelled_owned()).await });
        let stack = Stack {
            dir,
            addr,
            admin,
            plain,
            state,
            settings,
            stop,
            task: Some(task),
            agents: Vec::new(),
        };
        if stack
            .state
            .store()
            .account_by_name(USER)
            .await
            .unwrap()
            .is_none()
        {
            let hash = secret::hash_password(PASS).unwrap();
            stack.state.store().add_account(USER, &hash).await.unwrap();
            stack
                .state
                .store()
                .add_customer("1234", USER, Some("Test customer"))
                .await
                .unwrap();
        }
        stack
    }

    /// Stop the broker (drain) and start a new one on the same port, data
    /// and certificates.
    pub async fn restart(mut self) -> Stack {
        let agents = std::mem::take(&mut self.agents);
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
        let mut settings = self.settings.clone();
        settings.listen = self.addr;
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        let mut s = Stack::start_with(dir, settings).await;
        s.agents = agents;
        s
    }

    /// The admin API bearer token (generated into the data directory).
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.settings.data_dir.join("admin.token"))
            .expect("admin token file")
            .trim()
            .to_string()
    }

    pub fn ca(&self) -> PathBuf {
        self.settings.certs_dir.join("ca.pem")
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `-p` argument for proxytunnel.
    pub fn proxy(&self) -> String {
        format!("127.0.0.1:{}", self.port())
    }

    /// Add a system; returns its agent token.
    pub async fn add_system(&self, customer: &str, name: &str, primary: bool) -> String {
        let token = secret::generate_token();
        self.state
            .store()
            .add_system(customer, name, primary, &secret::token_hash(&token))
            .await
            .unwrap();
        token
    }

    /// Start an in-process agent for `token` with `policy`.
    pub fn start_agent(&mut self, token: &str, policy: Policy) -> CancellationToken {
        let settings = self.agent_settings(token, policy);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(maintgate::agent::run(settings, cancel.clone()));
        self.agents.push((cancel.clone(), task));
        cancel
    }

    pub fn agent_settings(&self, token: &str, policy: Policy) -> AgentSettings {
        let file: maintgate::agent::config::AgentFile = toml::from_str(
            "reconnect_min_ms = 50\nreconnect_max_ms = 500\ndial_timeout_ms = 2000\n",
        )
        .unwrap();
        let mut s = AgentSettings::from_parts(
            file,
            format!("wss://localhost:{}/agent", self.port()),
            Secret::new(token.to_string()),
            Some(self.ca()),
        )
        .unwrap();
        s.policy = policy;
        s
    }

    /// Wait until the system has a live agent session.
    pub async fn wait_agent(&self, customer: &str, system: &str) {
        let store = self.state.store().clone();
        let sys = store
            .find_system(customer, Some(system))
            .await
            .unwrap()
            .expect("system exists");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if self.state.registry().agent(sys.id).is_some() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "agent for {customer}-{system} never connected"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.stop.cancel();
        for (c, _) in &self.agents {
            c.cancel();
        }
    }
}

/// A policy allowing the given services of the system itself.
pub fn services(ports: &[u16]) -> Policy {
    Policy {
        remote_access: true,
        services: ports.to_vec(),
        co_located: false,
        tunnels: vec![],
    }
}

/// A policy allowing services and co-located tunnels.
pub fn with_tunnels(ports: &[u16], tunnels: &[(Ipv4Addr, u16)]) -> Policy {
    Policy {
        remote_access: true,
        services: ports.to_vec(),
        co_located: true,
        tunnels: tunnels
            .iter()
            .map(|(ip, port)| Tunnel {
                app: App::Tcp,
                ip: *ip,
                port: *port,
            })
            .collect(),
    }
}

/// The proxytunnel ProxyCommand for ssh, as engineers write it.
pub fn proxy_command(stack: &Stack) -> String {
    format!(
        "proxytunnel -q -E -C {} -p {} -P {}:{} -d %h:%p",
        stack.ca().display(),
        stack.proxy(),
        USER,
        PASS
    )
}

/// A TLS connection to the broker that trusts the stack's CA.
pub async fn tls_connect(stack: &Stack) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let config = maintgate::tls::client_config(Some(&stack.ca())).unwrap();
    let tcp = tokio::net::TcpStream::connect(stack.addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let name =
        rustls_pki_types::ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into());
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap()
}

/// `Proxy-Authorization` value for the stack's account.
pub fn basic(user: &str, pass: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

/// Read a response head (up to CRLFCRLF) byte by byte, so no tunnel byte
/// is consumed. Returns the head as text.
pub async fn read_response_head<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> String {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = r.read(&mut b).await.unwrap();
        assert!(
            n == 1,
            "connection closed inside the response head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(b[0]);
        assert!(head.len() < 16384);
    }
    String::from_utf8(head).unwrap()
}

/// Open a tunnel with a CONNECT; panics unless the answer is 200.
pub async fn open_tunnel(
    stack: &Stack,
    dest: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let mut tls = tls_connect(stack).await;
    let req = format!(
        "CONNECT {dest} HTTP/1.1\r\nHost: {dest}\r\nProxy-Authorization: {}\r\n\r\n",
        basic(USER, PASS)
    );
    tls.write_all(req.as_bytes()).await.unwrap();
    let head = read_response_head(&mut tls).await;
    assert_eq!(head, "HTTP/1.1 200 Connection established\r\n\r\n");
    tls
}

/// Send raw bytes over TLS and read everything until the broker closes
/// (or 5 s pass). Returns what came back.
pub async fn raw_exchange(stack: &Stack, bytes: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = tls_connect(stack).await;
    tls.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
    out
}
