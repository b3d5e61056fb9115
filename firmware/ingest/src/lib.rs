//! placeholder: the DICOM Storage SCP (being written).
//!
//! Public entry point (contract with passerelled):
//! `pub async fn serve(listener: tokio::net::TcpListener, cfg: std::sync::Arc<passerelle_config::DicomConfig>,
//!     spool: passerelle_spool::Spool, stored: std::sync::Arc<tokio::sync::Notify>,
//!     shutdown: tokio::sync::watch::Receiver<bool>) -> Result<()>`
