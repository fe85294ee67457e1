//! A certificate verifier that remembers chains it has verified, as
//! browsers do (Chromium's `CachingCertVerifier`, Firefox's verification
//! cache). Without it the load generator verifies the broker's chain
//! (one ECDSA P-256 verification, about 60 µs here) on every handshake,
//! and on a 2-core machine that CPU comes out of the broker's share.
//!
//! What is still done on every handshake: the server's `CertificateVerify`
//! signature is verified, so each connection proves the broker holds the
//! key; only the chain-building result for the same bytes is reused.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, Error, SignatureScheme};

/// How long a verified chain is trusted without being verified again.
const TTL: Duration = Duration::from_secs(60);
/// Chains remembered at once (the bench talks to one broker).
const CAPACITY: usize = 8;

struct Entry {
    end_entity: Vec<u8>,
    intermediates: Vec<Vec<u8>>,
    name: String,
    at: Instant,
}

#[derive(Debug)]
pub struct CachingVerifier {
    inner: Arc<WebPkiServerVerifier>,
    cache: Mutex<Vec<Entry>>,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry").field("name", &self.name).finish()
    }
}

impl CachingVerifier {
    pub fn new(inner: Arc<WebPkiServerVerifier>) -> CachingVerifier {
        CachingVerifier {
            inner,
            cache: Mutex::new(Vec::new()),
        }
    }

    fn hit(&self, ee: &[u8], im: &[CertificateDer<'_>], name: &str) -> bool {
        let now = Instant::now();
        let Ok(mut cache) = self.cache.lock() else {
            return false;
        };
        cache.retain(|e| now.duration_since(e.at) < TTL);
        cache.iter().any(|e| {
            e.end_entity == ee
                && e.name == name
                && e.intermediates.len() == im.len()
                && e.intermediates.iter().zip(im).all(|(a, b)| a[..] == b[..])
        })
    }

    fn remember(&self, ee: &[u8], im: &[CertificateDer<'_>], name: String) {
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CAPACITY {
                cache.remove(0);
            }
            cache.push(Entry {
                end_entity: ee.to_vec(),
                intermediates: im.iter().map(|c| c.to_vec()).collect(),
                name,
                at: Instant::now(),
            });
        }
    }
}

impl ServerCertVerifier for CachingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let name = server_name.to_str();
        if self.hit(end_entity, intermediates, &name) {
            return Ok(ServerCertVerified::assertion());
        }
        let ok = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        self.remember(end_entity, intermediates, name.into_owned());
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
