//! Serving TLS from a certificate and key in files, as a `kubernetes.io/tls` Secret volume
//! (`tls.crt`, `tls.key`) provides them, and taking up a rotated pair without a restart.
//!
//! The files are read again on an interval and compared by content, not by mtime: the kubelet
//! swaps a Secret volume's `..data` symlink, and cert-manager may rewrite a file within the
//! same second. A new pair is taken only if it parses and the key belongs to the certificate;
//! otherwise the refusal is logged once per content seen and the pair in use stays. New
//! connections get the new pair; established ones keep theirs.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{Error, InconsistentKeys, ServerConfig};
use tokio_rustls::TlsAcceptor;

/// Larger than any certificate chain or key in practice; a file beyond it is refused rather
/// than read into memory.
pub const MAX_PEM_BYTES: u64 = 1 << 20;

/// How often `serve` looks at the files by default. The kubelet itself takes up to a minute
/// or so to project a rotated Secret into the volume.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: larger than {MAX_PEM_BYTES} bytes; not a PEM certificate or key")]
    TooLarge { path: PathBuf },
    #[error("{path}: no PEM certificate in it (expected tls.crt: the certificate, then its chain)")]
    NoCertificate { path: PathBuf },
    #[error("{path}: not a PEM certificate chain: {reason}")]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{path}: no usable PEM private key in it (expected tls.key: PKCS#8, SEC1 or PKCS#1): {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("{key} and {cert} are not a pair: {reason}")]
    Mismatch { cert: PathBuf, key: PathBuf, reason: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The file contents a pair was built from, to tell whether the files changed.
#[derive(PartialEq, Eq)]
struct Seen {
    cert: Vec<u8>,
    key: Vec<u8>,
}

/// A certificate and key from two files, reloadable. Hands rustls the pair in use for each
/// new handshake.
pub struct ServerTls {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    seen: Mutex<Option<Seen>>,
    accepted: AtomicU64,
    refused: AtomicU64,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").field("cert", &self.cert_path).field("key", &self.key_path).finish_non_exhaustive()
    }
}

fn read_capped(path: &Path) -> Result<Vec<u8>, TlsError> {
    let file = std::fs::File::open(path).map_err(|source| TlsError::Read { path: path.into(), source })?;
    let mut bytes = vec![];
    file.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| TlsError::Read { path: path.into(), source })?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(TlsError::TooLarge { path: path.into() });
    }
    Ok(bytes)
}

impl ServerTls {
    /// Loads the pair; an error names the file and what is wrong with it.
    pub fn load(cert_path: impl Into<PathBuf>, key_path: impl Into<PathBuf>) -> Result<Arc<Self>, TlsError> {
        let (cert_path, key_path) = (cert_path.into(), key_path.into());
        // ring: the provider the rest of the tree (kube, reqwest, oci-client) already builds.
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let seen = Seen { cert: read_capped(&cert_path)?, key: read_capped(&key_path)? };
        let key = certified_key(&cert_path, &key_path, &seen, &provider)?;
        Ok(Arc::new(Self {
            cert_path,
            key_path,
            provider,
            current: RwLock::new(Arc::new(key)),
            seen: Mutex::new(Some(seen)),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }))
    }

    /// A rustls acceptor that asks this for the pair at every handshake. HTTP/1.1 only, as
    /// the server speaks.
    pub fn acceptor(self: &Arc<Self>) -> Result<TlsAcceptor, TlsError> {
        let mut config = ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        // No session resumption: a resumed session skips the certificate, so after a rotation
        // (say, away from a compromised CA) clients could go on with the old one. A full
        // handshake per connection costs little next to a module download.
        config.session_storage = Arc::new(tokio_rustls::rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(TlsAcceptor::from(Arc::new(config)))
    }

    /// The certificate chain served to new connections, DER, leaf first.
    pub fn certificate_chain(&self) -> Vec<CertificateDer<'static>> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).cert.clone()
    }

    /// Rotations taken up since start.
    pub fn reloads(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Replacement pairs refused (each distinct content counts once).
    pub fn refusals(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Reads the files; if they changed and make a valid pair, serves it from now on.
    /// Returns whether the pair in use changed. A pair that does not load is an error, and
    /// the pair in use stays.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let seen = Seen { cert: read_capped(&self.cert_path)?, key: read_capped(&self.key_path)? };
        let mut last = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if last.as_ref() == Some(&seen) {
            return Ok(false);
        }
        let loaded = certified_key(&self.cert_path, &self.key_path, &seen, &self.provider);
        *last = Some(seen);
        match loaded {
            Ok(key) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
                self.accepted.fetch_add(1, Ordering::Relaxed);
                Ok(true)
            }
            Err(e) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Reloads every `interval` for as long as the task runs, logging each change and each
    /// refused pair.
    pub fn spawn_reloader(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let t = Arc::clone(&this);
                match tokio::task::spawn_blocking(move || t.reload()).await {
                    Ok(Ok(true)) => tracing::info!(
                        cert = %this.cert_path.display(),
                        "TLS certificate rotated; new connections get the new one"
                    ),
                    Ok(Ok(false)) => {}
                    Ok(Err(e)) => tracing::error!(
                        error = %e,
                        "new TLS certificate files cannot be used; still serving the previous pair"
                    ),
                    Err(e) => tracing::error!(error = %e, "TLS reload task failed"),
                }
            }
        })
    }
}

impl ResolvesServerCert for ServerTls {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner())))
    }
}

fn certified_key(
    cert_path: &Path,
    key_path: &Path,
    seen: &Seen,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_slice_iter(&seen.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCertificate { path: cert_path.into(), reason: e.to_string() })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate { path: cert_path.into() });
    }
    let bad_key = |reason: String| TlsError::BadKey { path: key_path.into(), reason };
    let key = PrivateKeyDer::from_pem_slice(&seen.key).map_err(|e| bad_key(e.to_string()))?;
    let key = provider.key_provider.load_private_key(key).map_err(|e| bad_key(e.to_string()))?;
    let pair = CertifiedKey::new(chain, key);
    // A half-rotated pair (new certificate, old key) is refused here. A key type whose public
    // half cannot be compared is let through, as rustls itself does.
    match pair.keys_match() {
        Ok(()) | Err(Error::InconsistentKeys(InconsistentKeys::Unknown)) => Ok(pair),
        Err(e) => Err(TlsError::Mismatch { cert: cert_path.into(), key: key_path.into(), reason: e.to_string() }),
    }
}
