//! placeholder: the STOW-RS uplink (being written).
//!
//! Public entry points (contract with passerelled):
//! `pub struct Uplink; impl Uplink { pub fn new(cfg: passerelle_config::UplinkConfig, spool: passerelle_spool::Spool) -> Result<Uplink>;
//!   pub async fn run(self, wake: std::sync::Arc<tokio::sync::Notify>, shutdown: tokio::sync::watch::Receiver<bool>) -> Result<()> }`
