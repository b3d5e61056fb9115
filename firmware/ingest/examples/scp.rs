//! Runs the Storage SCP alone, storing into a spool directory, for trying it with dcmtk or pynetdicom:
//! `cargo run -p passerelle-ingest --example scp -- /tmp/spool 127.0.0.1:11112 PASSERELLE`
//! Logs go to stderr at INFO. Ctrl-C stops it.

use std::sync::Arc;

/// The smallest logger that shows the SCP's log lines (the daemon uses journald or env_logger).
struct Stderr;

impl log::Log for Stderr {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Info
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            eprintln!("{} {}: {}", r.level(), r.target(), r.args());
        }
    }
    fn flush(&self) {}
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    log::set_logger(&Stderr).map_err(|e| e.to_string())?;
    log::set_max_level(log::LevelFilter::Info);
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .unwrap_or_else(|| "/tmp/passerelle-spool".into());
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:11112".into());
    let ae_title = args.next().unwrap_or_else(|| "PASSERELLE".into());
    let spool_cfg = passerelle_config::SpoolConfig {
        dir: dir.into(),
        min_free_mb: 64,
        ..Default::default()
    };
    let (spool, _) = passerelle_spool::Spool::open(&spool_cfg)?;
    let dicom = passerelle_config::DicomConfig {
        ae_title,
        listen: listen.clone(),
        ..Default::default()
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&listen).await?;
        let (tx, rx) = tokio::sync::watch::channel(false);
        let stored = Arc::new(tokio::sync::Notify::new());
        let scp = tokio::spawn(passerelle_ingest::serve(
            listener,
            Arc::new(dicom),
            spool,
            stored,
            rx,
        ));
        tokio::signal::ctrl_c().await?;
        let _ = tx.send(true);
        scp.await??;
        Ok(())
    })
}
