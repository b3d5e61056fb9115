use std::path::PathBuf;

pub type Result<T, E = UplinkError> = std::result::Result<T, E>;

/// Everything that can go wrong in the uplink. Variants are named after the action that failed.
///
/// Set-up errors ([`crate::Uplink::new`]) are returned to the daemon, which refuses to start. Errors
/// during [`crate::Uplink::run`] are logged and retried: an upload failure is an outcome recorded in
/// the spool, never a reason to stop uploading.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UplinkError {
    #[error("uplink.stow_url \"{url}\" cannot be used: {detail}")]
    ParseStowUrl { url: String, detail: String },

    #[error("Cannot read the CA file {path} (uplink.ca_file)")]
    ReadCaFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("The CA file {path} (uplink.ca_file) is not usable: {detail}")]
    LoadCaFile { path: PathBuf, detail: String },

    #[error("Cannot read the client certificate {path} (uplink.client_cert)")]
    ReadClientCert {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("The client certificate {path} (uplink.client_cert) is not usable: {detail}")]
    LoadClientCert { path: PathBuf, detail: String },

    #[error("Cannot read the client key {path} (uplink.client_key)")]
    ReadClientKey {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("The client key {path} (uplink.client_key) is not usable: {detail}")]
    LoadClientKey { path: PathBuf, detail: String },

    #[error("Cannot build the TLS configuration for the uplink")]
    BuildTlsConfig {
        #[source]
        source: rustls::Error,
    },

    #[error("uplink.proxy \"{proxy}\" cannot be used")]
    ConfigureProxy {
        proxy: String,
        #[source]
        source: reqwest::Error,
    },

    #[error("Cannot build the HTTPS client for the uplink")]
    BuildHttpClient {
        #[source]
        source: reqwest::Error,
    },

    #[error("The STOW-RS response (HTTP {status}, Content-Type \"{content_type}\") cannot be read: {detail}")]
    ParseStowResponse {
        status: u16,
        content_type: String,
        detail: String,
    },

    #[error("The spool failed while the uplink tried to {action}")]
    Spool {
        action: &'static str,
        #[source]
        source: passerelle_spool::SpoolError,
    },

    #[error("A blocking spool task of the uplink failed while trying to {action}")]
    JoinSpoolTask {
        action: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
}
