//! `passerelled`: the Passerelle daemon and its operator commands.
//!
//! # Background
//! This binary is deliberately thin: it reads the config, opens the spool (running its recovery), and
//! runs the Storage SCP (`passerelle-ingest`) and the STOW-RS uplink (`passerelle-uplink`) side by side
//! on one tokio runtime, under systemd (READY=1, watchdog, SIGTERM).
//!
//! # Design
//! - `main` wraps [`run`], which returns a `Result`; the error chain is printed once, exit code non-zero.
//! - `status` and `requeue` open the spool database *without* recovery, so they are safe to run while the
//!   daemon runs.
//! - The daemon never runs as root (`privileges`): started as root, it binds its listener, then switches
//!   to `daemon.user` before it opens the spool or starts any thread. The commands that open the spool
//!   (`status`, `requeue`, `rebuild-index`) switch too, so the spool only ever holds that user's files.

mod compactor;
mod error;
mod privileges;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use error::{DaemonError, Result};
use log::{error, info, warn};
use passerelle_config::Config;
use passerelle_spool::{Requeued, Spool, StatusReport};
use passerelle_uplink::CertNotice;
use tokio::sync::{watch, Notify};

#[derive(Parser)]
#[command(
    name = "passerelled",
    version,
    about = "Passerelle DICOM edge gateway daemon"
)]
struct Cli {
    /// Path of the TOML configuration file.
    #[arg(
        long,
        short = 'c',
        global = true,
        default_value = "/etc/passerelle/passerelle.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the configuration: one line per bad key, non-zero exit if any.
    CheckConfig,
    /// Print the queue's counts per state, the oldest queued instance's age and the last uplink error.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Put failed instances back in the queue (all of them, or one).
    Requeue {
        #[arg(long)]
        sop_instance_uid: Option<String>,
    },
    /// Rebuild the spool database from the spool files after it was lost or damaged (stop the daemon
    /// first). Every intact instance is queued again; damaged files are quarantined.
    RebuildIndex,
}

fn main() {
    let cli = Cli::parse();
    init_logging(cli.command.is_none());
    // The crash-consistency campaign's build (feature `failpoints`) arms the crash points named in
    // the FAILPOINTS environment variable; release builds have none.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            let msg = error_chain(&e);
            error!("{msg}");
            eprintln!("passerelled: {msg}");
            std::process::exit(1);
        }
    }
}

pub(crate) use passerelle_spool::error_chain;

fn init_logging(daemon: bool) {
    if daemon && systemd_journal_logger::connected_to_journal() {
        if let Ok(journal) = systemd_journal_logger::JournalLog::new() {
            let identifier = "passerelled".to_string();
            if journal.with_syslog_identifier(identifier).install().is_ok() {
                log::set_max_level(log::LevelFilter::Info);
                return;
            }
        }
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(if daemon {
        "info"
    } else {
        "warn"
    }))
    .format_timestamp_millis()
    .init();
}

fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Some(Command::CheckConfig) => Ok(check_config(&cli.config)),
        Some(Command::Status { json }) => {
            let cfg = Config::load(&cli.config)?;
            unprivileged_for_spool(&cfg, false)?;
            let spool = Spool::attach(&cfg.spool)?;
            let now = SystemTime::now();
            let report = spool.status(now)?;
            // The certificate is read from its file: status works while the daemon runs or not.
            let cert =
                passerelle_uplink::client_cert_not_after(&cfg.uplink).map_err(|e| error_chain(&e));
            if json {
                println!("{}", status_json(&report, &cert));
            } else {
                print!("{}", status_text(&report, &cert, now));
            }
            Ok(0)
        }
        Some(Command::Requeue { sop_instance_uid }) => {
            let cfg = Config::load(&cli.config)?;
            unprivileged_for_spool(&cfg, false)?;
            let spool = Spool::attach(&cfg.spool)?;
            let r = spool.requeue_failed(sop_instance_uid.as_deref())?;
            let (text, code) = requeue_outcome(sop_instance_uid.as_deref(), r);
            println!("{text}");
            Ok(code)
        }
        Some(Command::RebuildIndex) => {
            let cfg = Config::load(&cli.config)?;
            unprivileged_for_spool(&cfg, false)?;
            let r = Spool::rebuild_index(&cfg.spool)?;
            println!(
                "Rebuilt the spool index: files={} queued={} without_index={} quarantined={} previously_quarantined={} unreadable={} temp_files_removed={} previous_database={}",
                r.files,
                r.queued,
                r.without_index,
                r.quarantined.len(),
                r.previously_quarantined,
                r.unreadable.len(),
                r.temp_files_removed,
                r.previous_database
                    .as_ref()
                    .map_or("none".into(), |p| p.display().to_string())
            );
            // Unreadable files have no row: the operator must fix the disk and run it again.
            Ok(if r.unreadable.is_empty() { 0 } else { 1 })
        }
        None => {
            let cfg = Config::load_valid(&cli.config)?;
            daemon(cfg)?;
            Ok(0)
        }
    }
}

/// What `requeue` prints and its exit code, given the UID asked for (if any) and what was done.
/// A UID that matched no failed instance (a typo, or already queued, sent or quarantined) is
/// reported as such with a non-zero exit, so that a script does not take it for a re-queue; so is
/// a UID whose only failed versions were superseded by a newer version confirmed since.
fn requeue_outcome(sop_instance_uid: Option<&str>, r: Requeued) -> (String, i32) {
    let superseded = if r.superseded > 0 {
        format!(
            " {} failed instance(s) stay failed: a newer version of each (a correction from the modality) was confirmed since, and sending the older one now would make a PACS that overwrites go back to it. `passerelled status` lists them.",
            r.superseded
        )
    } else {
        String::new()
    };
    match (sop_instance_uid, r.requeued) {
        (Some(uid), 0) if r.superseded == 0 => (
            format!(
                "Nothing re-queued: no failed instance has SOP Instance UID {uid}. Check the UID; `passerelled status` shows how many instances are failed, and one that is queued or sent needs no re-queue."
            ),
            1,
        ),
        (Some(uid), 0) => (
            format!("Nothing re-queued for SOP Instance UID {uid}.{superseded}"),
            1,
        ),
        (None, 0) if r.superseded == 0 => {
            ("Nothing re-queued: no instance is failed.".to_string(), 0)
        }
        (_, n) => (
            format!(
                "Re-queued {n} failed instance(s); the running daemon will send them shortly.{superseded}"
            ),
            0,
        ),
    }
}

/// Before a command touches the spool: drop root (to `daemon.user`) if we are root, and check that
/// whoever we are now can write the spool.
fn unprivileged_for_spool(cfg: &Config, create: bool) -> Result<privileges::Identity> {
    let me = privileges::become_daemon_user(&cfg.daemon.user)?;
    privileges::check_spool_access(&cfg.spool.dir, &me, &cfg.daemon.user, create)?;
    Ok(me)
}

fn check_config(path: &Path) -> i32 {
    let (problems, cfg) = match Config::load(path) {
        Ok(cfg) => (cfg.validate(), Some(cfg)),
        Err(passerelle_config::ConfigError::Invalid { problems, .. }) => (problems, None),
        Err(e) => {
            // The cause (not found, permission denied) is the error's source: the operator needs it.
            println!("{}: {}", path.display(), error_chain(&e));
            return 2;
        }
    };
    if problems.is_empty() {
        println!("{}: the configuration is valid.", path.display());
        // Not a configuration problem (the box keeps receiving whatever its certificate), but what
        // an operator who just installed one wants to see.
        if let Some(cfg) = cfg.filter(|c| !c.uplink.client_cert.as_os_str().is_empty()) {
            let cert =
                passerelle_uplink::client_cert_not_after(&cfg.uplink).map_err(|e| error_chain(&e));
            print!("{}", client_cert_line(&cert, SystemTime::now()));
        }
        0
    } else {
        for p in &problems {
            println!("{p}");
        }
        println!("{}: {} problem(s) found.", path.display(), problems.len());
        1
    }
}

fn daemon(cfg: Config) -> Result<()> {
    // Still single-threaded, possibly root: raise the file limit, bind the (possibly privileged)
    // port, then drop root for good before the spool is opened and before any thread exists.
    privileges::raise_open_file_limit();
    let listener = privileges::bind_listener(&cfg.dicom.listen)?;
    let me = unprivileged_for_spool(&cfg, true)?;
    if me.name != cfg.daemon.user {
        info!(
            "Started as a user other than daemon.user; running as that user. user={} uid={} gid={} daemon_user={}",
            me.name, me.uid, me.gid, cfg.daemon.user
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|source| DaemonError::Runtime { source })?;
    runtime.block_on(daemon_async(cfg, listener))
}

/// Opens the spool as its owner. `Spool::open` lets a second process in without recovery (for
/// `status` and `requeue`, which hold it for moments); a daemon must own it, because its recovery,
/// pool and eviction assume no other writer. It waits up to [`SPOOL_LOCK_WAIT`] for such a command
/// to finish, then refuses to start.
async fn open_owned_spool(cfg: &Config) -> Result<(Spool, passerelle_spool::RecoveryReport)> {
    let started = std::time::Instant::now();
    loop {
        let spool_cfg = cfg.spool.clone();
        let (spool, recovery) = tokio::task::spawn_blocking(move || Spool::open(&spool_cfg))
            .await
            .map_err(|source| DaemonError::Join { source })??;
        if spool.is_owner() {
            return Ok((spool, recovery));
        }
        drop(spool);
        if started.elapsed() >= SPOOL_LOCK_WAIT {
            return Err(DaemonError::SpoolInUse {
                dir: cfg.spool.dir.display().to_string(),
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// How long start-up waits for another process to release the spool.
const SPOOL_LOCK_WAIT: Duration = Duration::from_secs(5);

async fn daemon_async(cfg: Config, listener: std::net::TcpListener) -> Result<()> {
    // Before the spool is opened (its recovery can take seconds): a SIGTERM from then on waits for
    // the start-up to end and stops the daemon cleanly, instead of killing it half-way.
    let stop = StopSignals::register()?;
    let (spool, recovery) = open_owned_spool(&cfg).await?;
    info!(
        "Opened the spool. dir={} temp_files_removed={} uploading_requeued={} lost={} taken_in_from_precreated_files={}",
        cfg.spool.dir.display(),
        recovery.temp_files_removed,
        recovery.uploading_requeued,
        recovery.lost.len(),
        recovery.pooled_taken_in
    );

    let uplink = passerelle_uplink::Uplink::new(cfg.uplink.clone(), spool.clone())?;

    let listener =
        tokio::net::TcpListener::from_std(listener).map_err(|source| DaemonError::Bind {
            addr: cfg.dicom.listen.clone(),
            source,
        })?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let stored = Arc::new(Notify::new());

    let ingest = tokio::spawn(passerelle_ingest::serve(
        listener,
        Arc::new(cfg.dicom.clone()),
        spool.clone(),
        stored.clone(),
        shutdown_rx.clone(),
    ));
    let uplink = tokio::spawn(uplink.run(stored.clone(), shutdown_rx.clone()));
    let housekeeping = tokio::spawn(housekeeping(spool.clone(), shutdown_rx.clone()));
    let compactor =
        compactor::compactor(spool.clone()).map_err(|source| DaemonError::Thread { source })?;
    let filler =
        compactor::pool_filler(spool.clone()).map_err(|source| DaemonError::Thread { source })?;

    info!(
        "Passerelle is ready. ae_title={} listen={} stow_url={}",
        cfg.dicom.ae_title, cfg.dicom.listen, cfg.uplink.stow_url
    );
    notify(&[sd_notify::NotifyState::Ready]);

    stop.received().await;
    info!("Shutting down: no new associations; in-flight C-STOREs may finish, then uploads stop.");
    notify(&[sd_notify::NotifyState::Stopping]);
    let _ = shutdown_tx.send(true);

    let mut failed = None;
    match ingest.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => failed = Some(DaemonError::from(e)),
        Err(source) => failed = Some(DaemonError::Join { source }),
    }
    match uplink.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => failed = failed.or(Some(DaemonError::from(e))),
        Err(source) => failed = failed.or(Some(DaemonError::Join { source })),
    }
    let _ = housekeeping.await;
    tokio::task::spawn_blocking(move || {
        compactor.stop();
        filler.stop();
    })
    .await
    .map_err(|source| DaemonError::Join { source })?;
    match failed {
        Some(e) => Err(e),
        None => {
            info!("Passerelle stopped cleanly.");
            Ok(())
        }
    }
}

/// SIGTERM and SIGINT, caught from registration on: one that arrives before [`Self::received`] is
/// awaited is kept until then.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn register() -> Result<StopSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        let term =
            signal(SignalKind::terminate()).map_err(|source| DaemonError::Signal { source })?;
        let int =
            signal(SignalKind::interrupt()).map_err(|source| DaemonError::Signal { source })?;
        Ok(StopSignals { term, int })
    }

    async fn received(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// Eviction of the confirmed cache, and the systemd watchdog: the watchdog is only fed while the spool
/// database answers, so a wedged daemon gets restarted by systemd.
async fn housekeeping(spool: Spool, mut shutdown: watch::Receiver<bool>) {
    let watchdog_usec = watchdog_usec();
    let watchdog = watchdog_usec > 0;
    let tick = if watchdog {
        Duration::from_micros(watchdog_usec / 2).max(Duration::from_millis(100))
    } else {
        Duration::from_secs(30)
    };
    let mut last_evict = std::time::Instant::now()
        .checked_sub(Duration::from_secs(3600))
        .unwrap_or_else(std::time::Instant::now);
    loop {
        let do_evict = last_evict.elapsed() >= Duration::from_secs(60);
        let s = spool.clone();
        let healthy = tokio::task::spawn_blocking(move || {
            if do_evict {
                match s.evict(SystemTime::now()) {
                    Ok(r) if r.files > 0 => info!(
                        "Evicted confirmed instances from the local cache. files={} bytes={}",
                        r.files, r.bytes
                    ),
                    Ok(_) => {}
                    Err(e) => warn!("{}", eviction_failed(&e)),
                }
            }
            s.next_due().is_ok()
        })
        .await
        .unwrap_or(false);
        if do_evict {
            last_evict = std::time::Instant::now();
        }
        if watchdog && healthy {
            notify(&[sd_notify::NotifyState::Watchdog]);
        }
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// The log line for an eviction pass that failed.
fn eviction_failed(e: &passerelle_spool::SpoolError) -> String {
    format!(
        "Eviction of the confirmed cache failed: confirmed instances stay on disk, and once the spool is full modalities are refused (nothing acknowledged is lost). It is retried every minute. Check the disk (dmesg, df) and that the spool is the daemon user's. error={}",
        error_chain(e)
    )
}

/// The watchdog interval systemd asks for (0 = none), with libsystemd's `sd_watchdog_enabled`
/// semantics: `WATCHDOG_USEC` applies to us unless `WATCHDOG_PID` names another process. (The
/// sd-notify crate also requires `WATCHDOG_PID` to be present.)
fn watchdog_usec() -> u64 {
    let usec = std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0);
    match std::env::var("WATCHDOG_PID").ok().map(|p| p.parse::<u32>()) {
        Some(Ok(pid)) if pid != std::process::id() => 0,
        Some(Err(_)) => 0,
        _ => usec,
    }
}

fn notify(state: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(false, state) {
        warn!("Could not notify systemd; the unit may time out. error={e}");
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The box's client certificate's end of validity (`None`: none configured), or why it could not
/// be read.
type CertExpiry = std::result::Result<Option<SystemTime>, String>;

fn status_json(r: &StatusReport, cert: &CertExpiry) -> String {
    let (not_after, cert_error) = match cert {
        Ok(t) => (t.map(unix_secs), None),
        Err(e) => (None, Some(e.as_str())),
    };
    serde_json::json!({
        "queued": r.queued,
        "uploading": r.uploading,
        "sent": r.sent,
        "failed": r.failed,
        "lost": r.lost,
        "quarantined": r.quarantined,
        "evicted": r.evicted,
        "duplicates_received": r.duplicates_received,
        "duplicates_upstream": r.duplicates_upstream,
        "oldest_queued_age_secs": r.oldest_queued_age.map(|d| d.as_secs()),
        "last_error": r.uplink.last_error,
        "last_error_at": r.uplink.last_error_at.map(unix_secs),
        "last_success_at": r.uplink.last_success_at.map(unix_secs),
        "paused_until": r.uplink.paused_until.map(unix_secs),
        "stored_bytes": r.stored_bytes,
        "raw_bytes": r.raw_bytes,
        "awaiting_compaction": r.awaiting_compaction,
        "client_cert_not_after": not_after,
        "client_cert_error": cert_error,
    })
    .to_string()
}

fn status_text(r: &StatusReport, cert: &CertExpiry, now: SystemTime) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "queued: {}\nuploading: {}\nsent: {} (evicted from cache: {})\nfailed: {}\nlost: {}\nquarantined: {}\n",
        r.queued, r.uploading, r.sent, r.evicted, r.failed, r.lost, r.quarantined
    ));
    s.push_str(&format!(
        "duplicates received: {}\nduplicates upstream: {}\n",
        r.duplicates_received, r.duplicates_upstream
    ));
    match r.oldest_queued_age {
        Some(d) => s.push_str(&format!("oldest queued instance: {} s old\n", d.as_secs())),
        None => s.push_str("oldest queued instance: none\n"),
    }
    if let Some(until) = r.uplink.paused_until {
        if until > SystemTime::now() {
            s.push_str(&format!(
                "uplink: PAUSED until {} (unix time); fix the error below, then restart passerelled\n",
                unix_secs(until)
            ));
        }
    }
    match &r.uplink.last_error {
        Some(e) => s.push_str(&format!("last uplink error: {e}\n")),
        None => s.push_str("last uplink error: none\n"),
    }
    if r.raw_bytes > 0 {
        s.push_str(&format!(
            "spool: {} bytes on disk for {} raw bytes\n",
            r.stored_bytes, r.raw_bytes
        ));
    }
    if r.awaiting_compaction > 0 {
        s.push_str(&format!(
            "awaiting compression: {} instances (stored as received until then)\n",
            r.awaiting_compaction
        ));
    }
    s.push_str(&client_cert_line(cert, now));
    s
}

fn client_cert_line(cert: &CertExpiry, now: SystemTime) -> String {
    let not_after = match cert {
        Ok(None) => return "client certificate: none configured\n".into(),
        Ok(Some(t)) => *t,
        Err(e) => return format!("client certificate: UNREADABLE ({e})\n"),
    };
    let date = httpdate::fmt_http_date(not_after);
    match passerelle_uplink::client_cert_notice(not_after, now) {
        None => format!("client certificate: valid until {date}\n"),
        Some(CertNotice::ExpiresIn { days }) => format!(
            "client certificate: EXPIRES SOON, on {date} ({days} whole day(s) left): install a renewed one before then\n"
        ),
        Some(CertNotice::Expired) => format!(
            "client certificate: EXPIRED on {date}: the PACS refuses uploads until a renewed one is installed\n"
        ),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn requeue_of_a_uid_that_is_not_failed_says_so_and_exits_non_zero() {
        let (text, code) = requeue_outcome(Some("1.2.3.4"), done(0, 0));
        assert_eq!(code, 1, "{text}");
        assert!(text.contains("1.2.3.4"), "{text}");
        assert!(text.contains("status"), "{text}");
        assert!(!text.contains("will send"), "{text}");

        let (text, code) = requeue_outcome(Some("1.2.3.4"), done(1, 0));
        assert_eq!(code, 0, "{text}");
        assert!(text.contains("Re-queued 1"), "{text}");
        // Everything failed, when nothing is: nothing to do, not an error (scripts run it blindly).
        let (text, code) = requeue_outcome(None, done(0, 0));
        assert_eq!(code, 0, "{text}");
        assert!(!text.contains("will send"), "{text}");
        let (text, code) = requeue_outcome(None, done(3, 0));
        assert_eq!(code, 0, "{text}");
        assert!(text.contains("Re-queued 3"), "{text}");
        // Versions whose correction was confirmed since stay failed, and the operator is told why.
        let (text, code) = requeue_outcome(Some("1.2.3.4"), done(0, 1));
        assert_eq!(code, 1, "{text}");
        assert!(text.contains("newer version"), "{text}");
        let (text, code) = requeue_outcome(None, done(0, 2));
        assert_eq!(code, 0, "{text}");
        assert!(text.contains("2 failed instance(s) stay failed"), "{text}");
        let (text, code) = requeue_outcome(None, done(1, 2));
        assert_eq!(code, 0, "{text}");
        assert!(
            text.contains("Re-queued 1") && text.contains("stay failed"),
            "{text}"
        );
    }

    fn done(requeued: u64, superseded: u64) -> Requeued {
        Requeued {
            requeued,
            superseded,
        }
    }

    #[test]
    fn a_failed_eviction_is_logged_with_its_cause_and_what_to_do() {
        let e = passerelle_spool::SpoolError::Statvfs {
            path: PathBuf::from("/var/lib/passerelle/spool"),
            source: nix::errno::Errno::EIO,
        };
        let line = eviction_failed(&e);
        // The cause, not only the action that failed.
        assert!(line.contains("/var/lib/passerelle/spool"), "{line}");
        assert!(line.contains(&nix::errno::Errno::EIO.to_string()), "{line}");
        // What it means and what to do.
        assert!(line.contains("refused"), "{line}");
        assert!(line.contains("Check the disk"), "{line}");
    }
}
