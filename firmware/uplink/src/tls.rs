//! The rustls client configuration: TLS 1.2 and 1.3 only, the ring provider, ONLY the
//! certificates of `uplink.ca_file` as trust anchors (no system or bundled roots; environment
//! variables such as SSL_CERT_FILE are never read), host name verification (rustls' WebPKI
//! verifier), and the optional client certificate for mutual TLS.
//!
//! The client certificate goes through [`ClientAuth`], which also remembers that a PACS asked for
//! one. With TLS 1.3 a PACS refuses a missing certificate only after our side of the handshake is
//! over and the request is on its way, so the refusal often reaches us as a connection closed under
//! the request body (broken pipe, reset) rather than as its alert; knowing the PACS asked lets the
//! uplink say what is wrong (`outcome::refused_after_certificate_request`).
//!
//! The client certificate's end of validity is read when the configuration is loaded: the uplink
//! warns for [`CLIENT_CERT_WARNING`] before it (daily, and at each start), so that the box does
//! not stop forwarding on the day it expires without having said so.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use passerelle_config::UplinkConfig;
use rustls::client::ResolvesClientCert;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;

use crate::error::{Result, UplinkError};

/// How long before the box's client certificate expires the uplink starts to warn: the time a
/// hospital's IT team needs to get a renewed one from the network's certificate authority.
pub const CLIENT_CERT_WARNING: Duration = Duration::from_secs(30 * 86_400);

/// Our client certificate, if one is configured, and whether a PACS has asked for one.
#[derive(Debug)]
pub(crate) struct ClientAuth {
    key: Option<Arc<CertifiedKey>>,
    /// When the configured certificate (the chain's first, the box's own) stops being valid.
    not_after: Option<SystemTime>,
    asked: AtomicBool,
}

impl ClientAuth {
    /// When the configured client certificate expires; `None` without one.
    pub(crate) fn not_after(&self) -> Option<SystemTime> {
        self.not_after
    }

    /// True once a PACS asked for a client certificate during a handshake.
    pub(crate) fn asked(&self) -> bool {
        self.asked.load(Ordering::Relaxed)
    }

    /// True if a client certificate is configured.
    pub(crate) fn has_certificate(&self) -> bool {
        self.key.is_some()
    }
}

impl ResolvesClientCert for ClientAuth {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.asked.store(true, Ordering::Relaxed);
        self.key.clone()
    }

    fn has_certs(&self) -> bool {
        self.key.is_some()
    }
}

/// The TLS configuration, and the client-certificate resolver it uses (to ask it later whether the
/// PACS requested a certificate).
pub(crate) fn client_config(cfg: &UplinkConfig) -> Result<(rustls::ClientConfig, Arc<ClientAuth>)> {
    let mut roots = rustls::RootCertStore::empty();
    let ca_certs = read_certs(&cfg.ca_file).map_err(|e| match e {
        PemError::Read(source) => UplinkError::ReadCaFile {
            path: cfg.ca_file.clone(),
            source,
        },
        PemError::Parse(detail) => UplinkError::LoadCaFile {
            path: cfg.ca_file.clone(),
            detail,
        },
    })?;
    if ca_certs.is_empty() {
        return Err(UplinkError::LoadCaFile {
            path: cfg.ca_file.clone(),
            detail: "it holds no PEM certificate".into(),
        });
    }
    for (i, cert) in ca_certs.into_iter().enumerate() {
        roots.add(cert).map_err(|e| UplinkError::LoadCaFile {
            path: cfg.ca_file.clone(),
            detail: format!("certificate #{} is not a usable trust anchor ({e})", i + 1),
        })?;
    }

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|source| UplinkError::BuildTlsConfig { source })?
        .with_root_certificates(roots);
    let key = client_key(cfg, &provider)?;
    // Only for the expiry warning: a certificate rustls took but whose dates cannot be read must
    // not stop the uplink (nor the daemon with it); the PACS judges the certificate.
    let not_after = key.as_ref().and_then(|key| {
        leaf_not_after(cfg, key.cert.first())
            .map_err(|e| {
                log::warn!(
                    "Cannot read the end date of the box's TLS client certificate, so no warning will come before it expires; uploads are not affected. Check the certificate's expiry by hand (openssl x509 -enddate -noout -in FILE). error=\"{}\"",
                    crate::error_chain(&e)
                )
            })
            .ok()
    });
    let auth = Arc::new(ClientAuth {
        key: key.map(Arc::new),
        not_after,
        asked: AtomicBool::new(false),
    });
    let mut config = builder.with_client_cert_resolver(auth.clone());
    // HTTP/2 only where the operator asked for it (see `uplink.http2`); the PACS may still answer
    // HTTP/1.1. Without ALPN the connection is HTTP/1.1.
    if cfg.http2 {
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    }
    Ok((config, auth))
}

/// The configured client certificate chain and its key, checked to go together; `None` if unset.
fn client_key(
    cfg: &UplinkConfig,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<Option<CertifiedKey>> {
    let has_cert = !cfg.client_cert.as_os_str().is_empty();
    let has_key = !cfg.client_key.as_os_str().is_empty();
    match (has_cert, has_key) {
        (false, false) => return Ok(None),
        (true, false) | (false, true) => {
            return Err(UplinkError::LoadClientCert {
                path: cfg.client_cert.clone(),
                detail: "uplink.client_cert and uplink.client_key must be set together".into(),
            })
        }
        (true, true) => {}
    }
    let chain = read_certs(&cfg.client_cert).map_err(|e| client_cert_error(cfg, e))?;
    if chain.is_empty() {
        return Err(UplinkError::LoadClientCert {
            path: cfg.client_cert.clone(),
            detail: "it holds no PEM certificate".into(),
        });
    }
    let key = read_key(&cfg.client_key)?;
    CertifiedKey::from_der(chain, key, provider)
        .map(Some)
        .map_err(|e| UplinkError::LoadClientKey {
            path: cfg.client_key.clone(),
            detail: format!("it does not go with uplink.client_cert ({e})"),
        })
}

/// When the box's client certificate (`uplink.client_cert`'s first certificate) stops being valid;
/// `None` if none is configured. For `passerelled status`, which reads the file itself.
pub fn client_cert_not_after(cfg: &UplinkConfig) -> Result<Option<SystemTime>> {
    if cfg.client_cert.as_os_str().is_empty() {
        return Ok(None);
    }
    let chain = read_certs(&cfg.client_cert).map_err(|e| client_cert_error(cfg, e))?;
    leaf_not_after(cfg, chain.first()).map(Some)
}

/// The end of the validity period of `leaf`, the chain's first certificate.
fn leaf_not_after(cfg: &UplinkConfig, leaf: Option<&CertificateDer<'_>>) -> Result<SystemTime> {
    let invalid = |detail: String| UplinkError::LoadClientCert {
        path: cfg.client_cert.clone(),
        detail,
    };
    let leaf = leaf.ok_or_else(|| invalid("it holds no PEM certificate".into()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| invalid(format!("its first certificate is not valid X.509 ({e})")))?;
    // A date before 1970 is as expired as 1970.
    let secs = u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0);
    Ok(UNIX_EPOCH + Duration::from_secs(secs))
}

/// What the operator must hear about the box's client certificate at `now`, if anything.
#[derive(Debug, PartialEq, Eq)]
pub enum CertNotice {
    /// It has expired: the PACS refuses every upload.
    Expired,
    /// It expires within [`CLIENT_CERT_WARNING`]: in this many whole days (0: within a day).
    ExpiresIn { days: u64 },
}

/// Whether a client certificate valid until `not_after` has expired at `now`, or expires within
/// [`CLIENT_CERT_WARNING`]; `None` while it has longer. The daemon's watch and `status` both ask it.
pub fn client_cert_notice(not_after: SystemTime, now: SystemTime) -> Option<CertNotice> {
    match not_after.duration_since(now) {
        Err(_) => Some(CertNotice::Expired),
        Ok(left) if left.is_zero() => Some(CertNotice::Expired),
        Ok(left) if left <= CLIENT_CERT_WARNING => Some(CertNotice::ExpiresIn {
            days: left.as_secs() / 86_400,
        }),
        Ok(_) => None,
    }
}

fn client_cert_error(cfg: &UplinkConfig, e: PemError) -> UplinkError {
    match e {
        PemError::Read(source) => UplinkError::ReadClientCert {
            path: cfg.client_cert.clone(),
            source,
        },
        PemError::Parse(detail) => UplinkError::LoadClientCert {
            path: cfg.client_cert.clone(),
            detail,
        },
    }
}

enum PemError {
    Read(std::io::Error),
    Parse(String),
}

fn read_certs(path: &Path) -> std::result::Result<Vec<CertificateDer<'static>>, PemError> {
    let data = std::fs::read(path).map_err(PemError::Read)?;
    rustls_pemfile::certs(&mut data.as_slice())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| PemError::Parse(format!("it is not valid PEM ({e})")))
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let data = std::fs::read(path).map_err(|source| UplinkError::ReadClientKey {
        path: path.to_path_buf(),
        source,
    })?;
    match rustls_pemfile::private_key(&mut data.as_slice()) {
        Ok(Some(key)) => Ok(key),
        Ok(None) => Err(UplinkError::LoadClientKey {
            path: path.to_path_buf(),
            detail: "it holds no PEM private key".into(),
        }),
        Err(e) => Err(UplinkError::LoadClientKey {
            path: path.to_path_buf(),
            detail: format!("it is not valid PEM ({e})"),
        }),
    }
}

#[cfg(test)]
mod tests;
