//! The rustls client configuration: TLS 1.2 and 1.3 only, the ring provider, ONLY the
//! certificates of `uplink.ca_file` as trust anchors (no system or bundled roots; environment
//! variables such as SSL_CERT_FILE are never read), host name verification (rustls' WebPKI
//! verifier), and the optional client certificate for mutual TLS.

use std::path::Path;
use std::sync::Arc;

use passerelle_config::UplinkConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{Result, UplinkError};

pub(crate) fn client_config(cfg: &UplinkConfig) -> Result<rustls::ClientConfig> {
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
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|source| UplinkError::BuildTlsConfig { source })?
        .with_root_certificates(roots);

    let has_cert = !cfg.client_cert.as_os_str().is_empty();
    let has_key = !cfg.client_key.as_os_str().is_empty();
    match (has_cert, has_key) {
        (false, false) => return Ok(builder.with_no_client_auth()),
        (true, false) | (false, true) => {
            return Err(UplinkError::LoadClientCert {
                path: cfg.client_cert.clone(),
                detail: "uplink.client_cert and uplink.client_key must be set together".into(),
            })
        }
        (true, true) => {}
    }
    let chain = read_certs(&cfg.client_cert).map_err(|e| match e {
        PemError::Read(source) => UplinkError::ReadClientCert {
            path: cfg.client_cert.clone(),
            source,
        },
        PemError::Parse(detail) => UplinkError::LoadClientCert {
            path: cfg.client_cert.clone(),
            detail,
        },
    })?;
    if chain.is_empty() {
        return Err(UplinkError::LoadClientCert {
            path: cfg.client_cert.clone(),
            detail: "it holds no PEM certificate".into(),
        });
    }
    let key = read_key(&cfg.client_key)?;
    builder
        .with_client_auth_cert(chain, key)
        .map_err(|e| UplinkError::LoadClientKey {
            path: cfg.client_key.clone(),
            detail: format!("it does not go with uplink.client_cert ({e})"),
        })
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
