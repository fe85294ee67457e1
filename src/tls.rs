//! TLS: certificates on first run, a hot-reloading certificate resolver,
//! and the server and agent configurations.
//!
//! The broker serves `certs/server.pem` + `certs/server.key` whatever the
//! SNI says (absent, an IP literal, or a name): proxytunnel sends the `-p`
//! host as SNI, IP or not. When the files are missing, a local CA and a
//! server certificate for `maint.<domain>`, `localhost` and `127.0.0.1` are
//! generated. A watcher reloads the files when they change; a broken
//! replacement is logged and the old certificate stays in use, and live
//! tunnels are never touched by a reload.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;

/// File names inside the certificate directory.
pub const SERVER_CERT: &str = "server.pem";
pub const SERVER_KEY: &str = "server.key";
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";

/// Errors of the TLS layer.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("certificate and key do not match or are unusable: {0}")]
    Key(#[from] rustls::Error),
    #[error("generating certificates: {0}")]
    Generate(#[from] rcgen::Error),
}

/// ring, with AES-128-GCM/SHA-256 first. Its key schedule runs on the
/// SHA-NI instructions most x86 servers have (SHA-384 has none), and
/// AES-128 takes 10 rounds to AES-256's 14: a broker that terminates every
/// tunnel twice spends less per handshake and per byte. Everything in the
/// list is a standard AEAD suite; the broker picks in this order
/// (`ignore_client_order`), the agent offers in it.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as cs;
    let mut p = rustls::crypto::ring::default_provider();
    // X25519 from aws-lc: 37 µs for a key pair and an agreement against
    // ring's 68 µs (s2n-bignum's ADX/BMI2 code), and every handshake,
    // resumed or not, does one on each side. ring keeps the AEADs (its
    // VAES code sealed 16 KiB in 2.1 µs, aws-lc 3.9 µs here), the
    // signatures and verification. Measured in the ARCHITECTURE decision.
    p.kx_groups = vec![
        rustls::crypto::aws_lc_rs::kx_group::X25519,
        rustls::crypto::ring::kx_group::SECP256R1,
        rustls::crypto::ring::kx_group::SECP384R1,
    ];
    p.cipher_suites = vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

/// Where the certificate files live.
#[derive(Debug, Clone)]
pub struct CertPaths {
    /// The directory (`certs/` by default).
    pub dir: PathBuf,
}

impl CertPaths {
    /// The server chain file.
    pub fn cert(&self) -> PathBuf {
        self.dir.join(SERVER_CERT)
    }
    /// The server key file.
    pub fn key(&self) -> PathBuf {
        self.dir.join(SERVER_KEY)
    }
    /// The local CA certificate, served at `/ca.pem` when present.
    pub fn ca(&self) -> PathBuf {
        self.dir.join(CA_CERT)
    }
}

/// Generate a local CA and a server certificate into `paths.dir` unless
/// `server.pem` and `server.key` both exist. Returns whether it generated.
///
/// # Errors
/// [`TlsError`] on I/O or generation failure.
pub fn ensure_certs(paths: &CertPaths, domain: &str) -> Result<bool, TlsError> {
    if paths.cert().exists() && paths.key().exists() {
        return Ok(false);
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TlsError::Io { path, source }
    };
    std::fs::create_dir_all(&paths.dir).map_err(io(&paths.dir))?;
    let year = 1970
        + (SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
            / 31_556_952) as i32;

    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "maintgate local CA");
    ca.distinguished_name
        .push(rcgen::DnType::OrganizationName, "maintgate");
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    ca.not_after = rcgen::date_time_ymd(year + 10, 1, 1);
    let ca_key = rcgen::KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;

    let names = vec![
        domain.to_string(),
        format!("*.{domain}"),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    let mut server = rcgen::CertificateParams::new(names)?;
    server
        .distinguished_name
        .push(rcgen::DnType::CommonName, domain);
    server.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    server.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    server.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    server.not_after = rcgen::date_time_ymd(year + 2, 1, 1);
    let key = rcgen::KeyPair::generate()?;
    let cert = server.signed_by(&key, &ca_cert, &ca_key)?;

    write_private(&paths.dir.join(CA_KEY), &ca_key.serialize_pem())?;
    std::fs::write(paths.ca(), ca_cert.pem()).map_err(io(&paths.ca()))?;
    write_private(&paths.key(), &key.serialize_pem())?;
    // The chain: leaf, then the CA, so clients that trust the CA verify.
    let chain = format!("{}{}", cert.pem(), ca_cert.pem());
    std::fs::write(paths.cert(), chain).map_err(io(&paths.cert()))?;
    Ok(true)
}

fn write_private(path: &Path, pem: &str) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| TlsError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    f.write_all(pem.as_bytes()).map_err(|source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Load and check a certificate chain and its key.
///
/// # Errors
/// [`TlsError`] when a file is missing, is not PEM, or the key does not
/// match the leaf certificate.
pub fn load_certified_key(paths: &CertPaths) -> Result<CertifiedKey, TlsError> {
    let pem_err = |path: PathBuf| {
        move |e: rustls_pki_types::pem::Error| TlsError::Pem {
            path,
            message: e.to_string(),
        }
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(paths.cert())
        .map_err(pem_err(paths.cert()))?
        .collect::<Result<_, _>>()
        .map_err(pem_err(paths.cert()))?;
    if chain.is_empty() {
        return Err(TlsError::Pem {
            path: paths.cert(),
            message: "no certificate in file".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(paths.key()).map_err(pem_err(paths.key()))?;
    let ck = CertifiedKey::from_der(chain, key, &provider())?;
    // from_der tolerates "unknown" consistency; insist on a real match.
    ck.keys_match()?;
    Ok(ck)
}

/// Serves one certificate for every handshake, replaceable at run time.
#[derive(Debug)]
pub struct CertResolver {
    /// The certificate handed to new handshakes.
    current: RwLock<Arc<CertifiedKey>>,
    /// Successful reloads so far.
    pub reloads: std::sync::atomic::AtomicU64,
    /// Changed files that did not load (the old certificate stayed).
    pub reload_failures: std::sync::atomic::AtomicU64,
}

impl CertResolver {
    /// A resolver serving `ck`.
    pub fn new(ck: CertifiedKey) -> Arc<CertResolver> {
        Arc::new(CertResolver {
            current: RwLock::new(Arc::new(ck)),
            reloads: Default::default(),
            reload_failures: Default::default(),
        })
    }

    /// Swap in a new certificate for future handshakes.
    pub fn set(&self, ck: CertifiedKey) {
        if let Ok(mut cur) = self.current.write() {
            *cur = Arc::new(ck);
        }
    }

    /// The certificate being served.
    pub fn current(&self) -> Arc<CertifiedKey> {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The broker's TLS configuration: TLS 1.2 and 1.3 only, ALPN `http/1.1`
/// only (so browsers never move CONNECT to HTTP/2), session tickets on.
///
/// # Errors
/// [`TlsError`] if rustls rejects the configuration.
pub fn server_config(resolver: Arc<CertResolver>) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.ignore_client_order = true;
    config.session_storage = rustls::server::ServerSessionMemoryCache::new(8192);
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    Ok(config)
}

/// Poll the certificate files every `every` and reload them on change.
/// A broken replacement is logged and ignored.
pub async fn watch_certs(
    paths: CertPaths,
    resolver: Arc<CertResolver>,
    every: Duration,
    cancel: CancellationToken,
) {
    let stamp = |paths: &CertPaths| {
        let m = |p: PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        (m(paths.cert()), m(paths.key()))
    };
    let mut last = stamp(&paths);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let now = stamp(&paths);
        if now == last {
            continue;
        }
        last = now;
        match load_certified_key(&paths) {
            Ok(ck) => {
                resolver.set(ck);
                resolver
                    .reloads
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(cert = %paths.cert().display(), "certificate reloaded");
            }
            Err(e) => {
                resolver
                    .reload_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(error = %e, "certificate files changed but do not load; keeping the old certificate");
            }
        }
    }
}

/// The agent's TLS client configuration: trust `ca` if given, else the
/// system roots.
///
/// # Errors
/// [`TlsError`] when the CA file is unreadable or holds no certificate.
pub fn client_config(ca: Option<&Path>) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<_, _>>())
                .map_err(|e| TlsError::Pem {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(TlsError::Pem {
                    path: path.to_path_buf(),
                    message: "no usable CA certificate".into(),
                });
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let paths = CertPaths {
            dir: dir.path().join("certs"),
        };
        assert!(ensure_certs(&paths, "maint.example.com").unwrap());
        assert!(!ensure_certs(&paths, "maint.example.com").unwrap());
        let ck = load_certified_key(&paths).unwrap();
        assert_eq!(ck.cert.len(), 2, "leaf + CA");
        assert!(paths.ca().exists());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(paths.key()).unwrap().permissions(),
        );
        assert_eq!(mode & 0o077, 0, "key is private");
        // An agent trusting the CA builds a client config.
        client_config(Some(&paths.ca())).unwrap();
    }

    #[test]
    fn broken_or_mismatched_files_do_not_load() {
        let dir = tempfile::tempdir().unwrap();
        let a = CertPaths {
            dir: dir.path().join("a"),
        };
        let b = CertPaths {
            dir: dir.path().join("b"),
        };
        ensure_certs(&a, "maint.a").unwrap();
        ensure_certs(&b, "maint.b").unwrap();
        // a's certificate with b's key
        std::fs::copy(b.key(), a.key()).unwrap();
        assert!(load_certified_key(&a).is_err());
        std::fs::write(b.cert(), "garbage").unwrap();
        assert!(load_certified_key(&b).is_err());
    }
}
