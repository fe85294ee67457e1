//! TCP targets for tunnels, bound on `127.0.0.1:0`, stopped on Drop.
//!
//! They run on a harness-owned multi-thread tokio runtime (not the test's),
//! so they keep serving while a test blocks its own thread, e.g. on
//! `std::process::Command::output()` for ssh or curl, and their constructors
//! are plain functions usable from sync and async tests alike.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use super::process::{poll_until, poll_until_async};

/// The harness runtime that drives every target.
pub fn harness_runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("harness-targets")
            .enable_all()
            .build()
            .expect("harness runtime")
    })
}

/// A listener plus its accept task; aborting the task drops the listener
/// and (through the JoinSet it owns) every connection task.
struct Served {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Served {
    fn start<F, Fut>(ip: IpAddr, handler: F) -> Served
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let std_listener = std::net::TcpListener::bind((ip, 0)).expect("bind target port 0");
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let task = harness_runtime().spawn(async move {
            let listener = TcpListener::from_std(std_listener).expect("tokio listener");
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    acc = listener.accept() => {
                        if let Ok((sock, _)) = acc {
                            let _ = sock.set_nodelay(true);
                            conns.spawn(handler(sock));
                        }
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Served { addr, task }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------- echo

/// Echoes every byte. Half-close aware: after reading EOF it finishes
/// writing, then shuts down its write side (so the peer sees EOF too).
pub struct EchoServer {
    served: Served,
}

impl EchoServer {
    pub fn start() -> EchoServer {
        Self::start_on(Ipv4Addr::LOCALHOST.into())
    }

    /// Binds `ip:0` (e.g. another 127.x address).
    pub fn start_on(ip: IpAddr) -> EchoServer {
        let served = Served::start(ip, |sock| async move {
            let (mut r, mut w) = sock.into_split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        });
        EchoServer { served }
    }

    pub fn addr(&self) -> SocketAddr {
        self.served.addr
    }

    pub fn port(&self) -> u16 {
        self.served.addr.port()
    }
}

// ---------------------------------------------------------------- https

/// One request seen by [`HttpsServer`].
#[derive(Clone, Debug)]
pub struct SeenRequest {
    /// e.g. `GET /login HTTP/1.1`
    pub request_line: String,
    /// The `Host` header, if any.
    pub host: Option<String>,
    /// The SNI the client sent, if any.
    pub sni: Option<String>,
}

/// HTTPS hello server: a CA of its own (rcgen) signs a leaf for the given
/// DNS names (IP literals become IP SANs); any request gets `200` with the
/// given body (HTML). HTTP/1.1 with keep-alive, ALPN `http/1.1`.
pub struct HttpsServer {
    served: Served,
    dir: tempfile::TempDir,
    ca_pem: String,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
}

/// A CA and a leaf certificate signed by it.
pub struct TestPki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// (year, month, day) of a unix day number (civil-from-days, H. Hinnant).
fn ymd_from_days(z: i64) -> (i32, u8, u8) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let y = (yoe + era * 400 + if m <= 2 { 1 } else { 0 }) as i32;
    (y, m, d)
}

fn validity(params: &mut rcgen::CertificateParams) {
    let today = (SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 86_400) as i64;
    let (y, m, d) = ymd_from_days(today - 2);
    params.not_before = rcgen::date_time_ymd(y, m, d);
    let (y, m, d) = ymd_from_days(today + 90);
    params.not_after = rcgen::date_time_ymd(y, m, d);
}

/// Makes a fresh CA and a server leaf for `names` (DNS names or IPs).
pub fn make_pki(names: &[&str]) -> TestPki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    assert!(!names.is_empty(), "need at least one name");
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "maintgate test target CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut ca);
    let ca_cert = ca.self_signed(&ca_key).unwrap();

    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    leaf.distinguished_name.push(DnType::CommonName, names[0]);
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    validity(&mut leaf);
    let leaf_cert = leaf.signed_by(&leaf_key, &ca_cert, &ca_key).unwrap();
    TestPki {
        ca_pem: ca_cert.pem(),
        cert_pem: leaf_cert.pem(),
        key_pem: leaf_key.serialize_pem(),
    }
}

fn server_config(pki: &TestPki) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let leaf = pem_body(&pki.cert_pem);
    let key = pem_body(&pki.key_pem);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(leaf)],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
        )
        .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// DER bytes of the first PEM block.
fn pem_body(pem: &str) -> Vec<u8> {
    use base64::Engine;
    let b64: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("pem base64")
}

impl HttpsServer {
    /// Serves `body` over HTTPS on `127.0.0.1:0` with a certificate for
    /// `dns_names` (e.g. `["1234-ipo2.maint.example.com"]`).
    pub fn start(dns_names: &[&str], body: &str) -> HttpsServer {
        let pki = make_pki(dns_names);
        let dir = tempfile::Builder::new()
            .prefix("mgt-https-")
            .tempdir()
            .unwrap();
        std::fs::write(dir.path().join("ca.pem"), &pki.ca_pem).unwrap();
        std::fs::write(dir.path().join("cert.pem"), &pki.cert_pem).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(server_config(&pki));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let body: Arc<str> = body.into();
        let seen2 = seen.clone();
        let served = Served::start(Ipv4Addr::LOCALHOST.into(), move |sock| {
            let acceptor = acceptor.clone();
            let body = body.clone();
            let seen = seen2.clone();
            async move {
                let hs = tokio::time::timeout(Duration::from_secs(30), acceptor.accept(sock)).await;
                let Ok(Ok(tls)) = hs else { return };
                let sni = tls.get_ref().1.server_name().map(str::to_string);
                let _ = serve_http(tls, &body, sni, &seen).await;
            }
        });
        HttpsServer {
            served,
            dir,
            ca_pem: pki.ca_pem,
            seen,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.served.addr
    }

    pub fn port(&self) -> u16 {
        self.served.addr.port()
    }

    /// PEM file of the CA that signed the server certificate (`curl --cacert`).
    pub fn ca_pem_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Every request served so far.
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.seen.lock().unwrap().clone()
    }
}

async fn serve_http<S>(
    stream: S,
    body: &str,
    sni: Option<String>,
    seen: &Mutex<Vec<SeenRequest>>,
) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut rd = BufReader::new(stream);
    loop {
        // Read one request head (bounded in size and time).
        let mut head: Vec<String> = Vec::new();
        let mut total = 0usize;
        loop {
            let mut line = String::new();
            let n = match tokio::time::timeout(Duration::from_secs(60), rd.read_line(&mut line))
                .await
            {
                Ok(r) => r?,
                Err(_) => return Ok(()),
            };
            if n == 0 {
                return Ok(()); // EOF between requests
            }
            total += n;
            if total > 64 * 1024 {
                return Ok(());
            }
            let line = line.trim_end_matches(['\r', '\n']).to_string();
            if line.is_empty() {
                if head.is_empty() {
                    continue; // tolerate stray CRLF between requests
                }
                break;
            }
            head.push(line);
        }
        let request_line = head[0].clone();
        let header = |name: &str| {
            head[1..].iter().find_map(|h| {
                let (k, v) = h.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
        };
        let host = header("host");
        let close = header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"))
            || request_line.ends_with("HTTP/1.0");
        if let Some(len) = header("content-length").and_then(|v| v.parse::<u64>().ok()) {
            let mut sink = tokio::io::sink();
            tokio::io::copy(&mut (&mut rd).take(len), &mut sink).await?;
        }
        seen.lock().unwrap().push(SeenRequest {
            request_line: request_line.clone(),
            host,
            sni: sni.clone(),
        });
        let is_head = request_line.starts_with("HEAD ");
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: {}\r\n\r\n{}",
            body.len(),
            if close { "close" } else { "keep-alive" },
            if is_head { "" } else { body }
        );
        let w = rd.get_mut();
        w.write_all(resp.as_bytes()).await?;
        w.flush().await?;
        if close {
            w.shutdown().await?;
            return Ok(());
        }
    }
}

// ---------------------------------------------------------------- sink / source

/// What a [`SinkServer`] read on one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SinkReport {
    pub bytes: u64,
    /// Lowercase hex sha256 of the bytes.
    pub sha256: String,
}

impl SinkReport {
    /// Parses the `"<bytes> <hex>"` line the sink writes back.
    pub fn parse(line: &str) -> Option<SinkReport> {
        let mut it = line.split_whitespace();
        let bytes = it.next()?.parse().ok()?;
        let sha256 = it.next()?.to_string();
        (sha256.len() == 64).then_some(SinkReport { bytes, sha256 })
    }
}

/// Sink mode ([`SinkServer::start`]): reads every byte until EOF, hashes it,
/// records a [`SinkReport`] and writes it back as `"<bytes> <hex>\n"`, then
/// closes its write side.
///
/// Source mode ([`SinkServer::serve_bytes`]): writes `n` bytes of
/// [`Pattern`] data, shuts down its write side, and drains the client until
/// EOF (so no RST can cut the data short). The expected digest is
/// [`pattern_sha256`]`(n)`.
pub struct SinkServer {
    served: Served,
    reports: Arc<Mutex<Vec<SinkReport>>>,
    taken: Mutex<usize>,
    source_len: Option<u64>,
}

impl SinkServer {
    pub fn start() -> SinkServer {
        let reports = Arc::new(Mutex::new(Vec::new()));
        let r2 = reports.clone();
        let served = Served::start(Ipv4Addr::LOCALHOST.into(), move |sock| {
            let reports = r2.clone();
            async move {
                let (mut rd, mut wr) = sock.into_split();
                let mut h = Sha256::new();
                let mut n = 0u64;
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match rd.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(k) => {
                            h.update(&buf[..k]);
                            n += k as u64;
                        }
                        Err(_) => return,
                    }
                }
                let rep = SinkReport {
                    bytes: n,
                    sha256: hex::encode(h.finalize()),
                };
                reports.lock().unwrap().push(rep.clone());
                let _ = wr
                    .write_all(format!("{} {}\n", rep.bytes, rep.sha256).as_bytes())
                    .await;
                let _ = wr.shutdown().await;
            }
        });
        SinkServer {
            served,
            reports,
            taken: Mutex::new(0),
            source_len: None,
        }
    }

    /// Source mode: every connection receives `n` pattern bytes.
    pub fn serve_bytes(n: u64) -> SinkServer {
        let served = Served::start(Ipv4Addr::LOCALHOST.into(), move |sock| async move {
            let (mut rd, mut wr) = sock.into_split();
            let mut src = Pattern::new(n);
            if tokio::io::copy(&mut src, &mut wr).await.is_err() {
                return;
            }
            let _ = wr.shutdown().await;
            let mut sink = tokio::io::sink();
            let _ = tokio::time::timeout(
                Duration::from_secs(120),
                tokio::io::copy(&mut rd, &mut sink),
            )
            .await;
        });
        SinkServer {
            served,
            reports: Arc::default(),
            taken: Mutex::new(0),
            source_len: Some(n),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.served.addr
    }

    pub fn port(&self) -> u16 {
        self.served.addr.port()
    }

    /// Source mode: the sha256 of what each connection receives.
    pub fn expected_sha256(&self) -> String {
        pattern_sha256(
            self.source_len
                .expect("expected_sha256 is for serve_bytes servers"),
        )
    }

    /// All reports so far (sink mode).
    pub fn reports(&self) -> Vec<SinkReport> {
        self.reports.lock().unwrap().clone()
    }

    fn take_next(&self) -> Option<SinkReport> {
        let mut taken = self.taken.lock().unwrap();
        let r = self.reports.lock().unwrap().get(*taken).cloned();
        if r.is_some() {
            *taken += 1;
        }
        r
    }

    /// The next report not yet returned, waiting at most `timeout`
    /// (blocks the thread; in async tests use [`Self::next_report_async`]).
    pub fn next_report(&self, timeout: Duration) -> SinkReport {
        poll_until("a sink report", timeout, || self.take_next())
    }

    pub async fn next_report_async(&self, timeout: Duration) -> SinkReport {
        poll_until_async("a sink report", timeout, || {
            std::future::ready(self.take_next())
        })
        .await
    }
}

/// Deterministic pseudo-random bytes (xorshift64*, fixed seed): the same `n`
/// always gives the same stream. Implements `std::io::Read` and tokio's
/// `AsyncRead`, e.g. `tokio::io::copy(&mut Pattern::new(n), &mut stream)`.
pub struct Pattern {
    state: u64,
    remaining: u64,
    /// Bytes of the current 8-byte word not handed out yet.
    word: [u8; 8],
    word_pos: usize,
}

impl Pattern {
    pub fn new(n: u64) -> Pattern {
        Pattern {
            state: 0x9E37_79B9_7F4A_7C15,
            remaining: n,
            word: [0; 8],
            word_pos: 8,
        }
    }

    fn next_word(&mut self) -> [u8; 8] {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes()
    }

    /// Fills `buf` (up to the remaining length); returns the count.
    pub fn fill(&mut self, buf: &mut [u8]) -> usize {
        let n = (buf.len() as u64).min(self.remaining) as usize;
        let mut i = 0;
        while i < n && self.word_pos < 8 {
            buf[i] = self.word[self.word_pos];
            self.word_pos += 1;
            i += 1;
        }
        while n - i >= 8 {
            let w = self.next_word();
            buf[i..i + 8].copy_from_slice(&w);
            i += 8;
        }
        if i < n {
            self.word = self.next_word();
            self.word_pos = 0;
            while i < n {
                buf[i] = self.word[self.word_pos];
                self.word_pos += 1;
                i += 1;
            }
        }
        self.remaining -= n as u64;
        n
    }
}

impl std::io::Read for Pattern {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        Ok(self.fill(buf))
    }
}

impl AsyncRead for Pattern {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let n = this.fill(buf.initialize_unfilled());
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

/// Lowercase hex sha256 of `Pattern::new(n)` (computed once per `n`).
pub fn pattern_sha256(n: u64) -> String {
    static CACHE: OnceLock<Mutex<HashMap<u64, String>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(h) = cache.lock().unwrap().get(&n) {
        return h.clone();
    }
    let mut p = Pattern::new(n);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let k = p.fill(&mut buf);
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
    }
    let hex = hex::encode(h.finalize());
    cache.lock().unwrap().insert(n, hex.clone());
    hex
}

/// Incremental sha256 + byte count, for checking what a client received.
#[derive(Default)]
pub struct Hasher {
    h: Sha256,
    pub bytes: u64,
}

impl Hasher {
    pub fn update(&mut self, data: &[u8]) {
        self.h.update(data);
        self.bytes += data.len() as u64;
    }
    pub fn finish(self) -> SinkReport {
        SinkReport {
            bytes: self.bytes,
            sha256: hex::encode(self.h.finalize()),
        }
    }
}
