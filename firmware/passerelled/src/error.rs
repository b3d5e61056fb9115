pub type Result<T, E = DaemonError> = std::result::Result<T, E>;

/// Why the daemon (or one of its commands) stopped. Each crate's error is wrapped as-is so the
/// operator sees the whole chain.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] passerelle_config::ConfigError),
    #[error("The spool could not be used")]
    Spool(#[from] passerelle_spool::SpoolError),
    #[error("The uplink could not be set up")]
    Uplink(#[from] passerelle_uplink::UplinkError),
    #[error("The DICOM service failed")]
    Ingest(#[from] passerelle_ingest::IngestError),
    #[error("Cannot listen for modalities on {addr}; check dicom.listen and that no other program uses the port")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot start the async runtime")]
    Runtime {
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot install the SIGTERM handler")]
    Signal {
        #[source]
        source: std::io::Error,
    },
    #[error("A background task panicked; this is a bug, please report it with the log")]
    Join {
        #[source]
        source: tokio::task::JoinError,
    },
}
