//! Reaching a target: plain TCP straight to an address (direct, socat,
//! rathole, bore), or TLS to the broker followed by `CONNECT`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::{anyhow, bail, Context as _, Result};
use bytes::{Buf, Bytes};
use clap::Args;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::verify::CachingVerifier;

/// How to reach the target, shared by every client mode.
#[derive(Args, Debug, Clone)]
pub struct PathArgs {
    /// Where to connect over TCP: the target itself (direct), a relay's
    /// listening port, or the broker.
    #[arg(long)]
    pub addr: String,
    /// Ask the broker for this destination with `CONNECT`, e.g.
    /// `1234.maint.bench:5201`. Without it the connection is plain TCP.
    #[arg(long)]
    pub connect: Option<String>,
    /// CA certificate the broker's chain must lead to (TLS).
    #[arg(long)]
    pub ca: Option<std::path::PathBuf>,
    /// Proxy account for `Proxy-Authorization: Basic`.
    #[arg(long, default_value = "bench")]
    pub user: String,
    /// Its password [default: $LOADGEN_PASSWORD].
    #[arg(long, env = "LOADGEN_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// Disable TLS session resumption: every connection does a full
    /// TLS 1.3 handshake.
    #[arg(long)]
    pub no_resume: bool,
    /// Verify the broker's chain on every handshake instead of reusing a
    /// chain verified before (browsers reuse it; see `verify.rs`).
    #[arg(long)]
    pub no_verify_cache: bool,
    /// Send the CONNECT without TLS (a plain test mode of the broker).
    #[arg(long)]
    pub plain_connect: bool,
}

/// The standard chain verifier for roots read from `ca`.
fn webpki_verifier(
    ca: &std::path::Path,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<rustls::client::WebPkiServerVerifier>> {
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca)
        .with_context(|| format!("reading {}", ca.display()))?
    {
        roots.add(cert.with_context(|| format!("parsing {}", ca.display()))?)?;
    }
    rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| anyhow!("certificate verifier: {e}"))
}

/// A ready-to-use dialer built from [`PathArgs`].
#[derive(Clone)]
pub struct Dialer {
    /// `--addr`, resolved once: a name such as `localhost` would otherwise
    /// cost a `getaddrinfo` on tokio's blocking pool per connection (two
    /// thread hand-offs, and a third of the load generator's CPU in the
    /// 64-concurrent setup runs), which the peers dialed by IP never pay.
    addr: std::net::SocketAddr,
    connect: Option<ConnectHop>,
}

#[derive(Clone)]
struct ConnectHop {
    request: Bytes,
    tls: Option<(TlsConnector, rustls_pki_types::ServerName<'static>)>,
}

impl Dialer {
    pub fn new(p: &PathArgs) -> Result<Dialer> {
        let connect = match &p.connect {
            None => None,
            Some(dest) => {
                let auth = match &p.password {
                    Some(pw) => {
                        use base64::Engine as _;
                        let b64 = base64::engine::general_purpose::STANDARD
                            .encode(format!("{}:{pw}", p.user));
                        format!("Proxy-Authorization: Basic {b64}\r\n")
                    }
                    None => String::new(),
                };
                let request = Bytes::from(format!(
                    "CONNECT {dest} HTTP/1.1\r\nHost: {dest}\r\n{auth}\r\n"
                ));
                let tls = if p.plain_connect {
                    None
                } else {
                    let mut cfg = maintgate::tls::client_config(p.ca.as_deref())
                        .map_err(|e| anyhow!("TLS client config: {e}"))?;
                    if p.no_resume {
                        cfg.resumption = rustls::client::Resumption::disabled();
                    }
                    if !p.no_verify_cache {
                        let ca =
                            p.ca.as_deref()
                                .ok_or_else(|| anyhow!("the verification cache needs --ca"))?;
                        let inner = webpki_verifier(ca, cfg.crypto_provider().clone())?;
                        cfg.dangerous()
                            .set_certificate_verifier(Arc::new(CachingVerifier::new(inner)));
                    }
                    let host = p.addr.rsplit_once(':').map_or(p.addr.as_str(), |(h, _)| h);
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    let name = rustls_pki_types::ServerName::try_from(host.to_owned())
                        .map_err(|e| anyhow!("server name {host:?}: {e}"))?;
                    Some((TlsConnector::from(Arc::new(cfg)), name))
                };
                Some(ConnectHop { request, tls })
            }
        };
        let addr = std::net::ToSocketAddrs::to_socket_addrs(p.addr.as_str())
            .with_context(|| format!("resolving {}", p.addr))?
            .next()
            .ok_or_else(|| anyhow!("{} has no address", p.addr))?;
        Ok(Dialer { addr, connect })
    }

    /// Connect, and for the broker path run TLS and `CONNECT` up to the
    /// `200`. The returned stream carries target bytes only.
    pub async fn dial(&self) -> Result<Conn> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .with_context(|| format!("connecting to {}", self.addr))?;
        tcp.set_nodelay(true)?;
        let Some(hop) = &self.connect else {
            return Ok(Conn::plain(tcp));
        };
        let mut conn = match &hop.tls {
            None => Conn::plain(tcp),
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .context("TLS handshake with the broker")?;
                Conn {
                    io: Io::Tls(Box::new(tls)),
                    pre: Bytes::new(),
                }
            }
        };
        conn.write_all(&hop.request).await?;
        // Read the response head; keep whatever follows it.
        let mut buf = Vec::with_capacity(256);
        let mut chunk = [0u8; 512];
        let end = loop {
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                bail!(
                    "broker closed the connection inside the response head: {:?}",
                    String::from_utf8_lossy(&buf)
                );
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > 16 * 1024 {
                bail!("response head too long");
            }
        };
        let head = &buf[..end];
        if !head.starts_with(b"HTTP/1.1 200") {
            let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
            bail!("CONNECT refused: {}", String::from_utf8_lossy(line));
        }
        conn.pre = Bytes::copy_from_slice(&buf[end..]);
        Ok(conn)
    }
}

enum Io {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// A connection to the target (through whatever path).
pub struct Conn {
    io: Io,
    /// Target bytes that arrived together with the response head.
    pre: Bytes,
}

impl Conn {
    pub fn plain(tcp: TcpStream) -> Conn {
        Conn {
            io: Io::Tcp(tcp),
            pre: Bytes::new(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            buf.put_slice(&self.pre[..n]);
            self.pre.advance(n);
            return Poll::Ready(Ok(()));
        }
        match &mut self.io {
            Io::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Tcp(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Send one byte and wait for it to come back (the echo target).
pub async fn echo_one(conn: &mut Conn) -> Result<()> {
    conn.write_all(b"x").await?;
    conn.flush().await?;
    let mut b = [0u8; 1];
    conn.read_exact(&mut b)
        .await
        .context("waiting for the echoed byte")?;
    if b[0] != b'x' {
        bail!("echo returned {:#04x}", b[0]);
    }
    Ok(())
}
