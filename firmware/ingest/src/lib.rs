//! Passerelle's DICOM Storage SCP: modalities associate, send C-ECHO and C-STORE, and every
//! instance is streamed into the durable spool before the modality hears "success".
//!
//! This crate must never answer a C-STORE with success before [`passerelle_spool::Written::commit`]
//! returned `Ok`, never hold a whole instance in RAM, never re-encode a data set (the bytes of the
//! data PDVs go to the spool untouched), and never panic or buffer a peer-chosen length on peer input.
//!
//! # Background
//! A modality (CT, MR, US...) deletes its copy once it gets a C-STORE success. The SCP therefore
//! has to be strict about what it acknowledges, tolerant about what it accepts (every storage SOP
//! class and every transfer syntax that can be passed through), and clear when it refuses: a proper
//! A-ASSOCIATE-RJ, a presentation context result with a reason, or a DIMSE status, always with a log
//! line naming the peer and calling AE title.
//!
//! # Design
//! - [`serve`] accepts TCP connections with tokio; each connection is one task. A connection takes
//!   an association slot only once its A-ASSOCIATE-RQ arrived (within ARTIM), so idle connections
//!   (slowloris) cannot lock modalities out. At most `max_associations` associations run at once;
//!   requests beyond that are rejected transiently (local limit exceeded). At most 512 connections
//!   may wait for their request at once; beyond that, new connections are closed.
//! - Association negotiation is done here on top of dicom-ul's PDU types (`negotiate`), because
//!   dicom-ul's server association is synchronous and cannot accept "every storage SOP class".
//! - PDUs are read strictly (`pdu_io`): the 6-byte header first; a PDU announcing more than our
//!   maximum (`max_pdu_length` for P-DATA, 64 KiB for the others) is answered with A-ABORT before
//!   any of its body is buffered. The body is then decoded by dicom-ul's `read_pdu`.
//! - PDVs go through a small state machine (`dimse::PdvAssembler`) that joins command fragments
//!   (capped at 64 KiB) and hands data fragments on, using the message control header bits.
//!   Command sets are read by our own walk over their group 0000 elements, which never allocates
//!   a peer-chosen length (dicom-object's reader could be made to reserve 4 GiB; found by fuzzing).
//! - Every parser that sees peer bytes has a fuzz target in `firmware/fuzz` (run by
//!   `tests/fuzz.sh`), reached through the hidden `fuzzing` module.
//! - A C-STORE starts a blocking store task (`store::receive`) fed through a bounded channel: it
//!   checks free space, writes the Part-10 header (preamble, `DICM`, group 0002 with our
//!   implementation UID and the calling AE as Source AE) and then the data PDVs as they arrive,
//!   has the spool scan the leading elements as they stream in (stopping after (0020,000E), never
//!   reading pixel data; read back from the file only when they exceed 1 MiB), checks the UIDs
//!   against the command, and commits. Beside that scan, the store task follows the data set's
//!   element structure (`boundary`: headers only, values skipped by their length, nothing
//!   allocated) and refuses (0xC000, nothing stored) a data set that does not end at an element
//!   boundary at the top level: a modality that marked its last fragment too early or sent a
//!   truncated file must not hear success. A deflated data set is inflated for this walk as it
//!   arrives, through a 32 KiB buffer allocated once (what is stored is the deflated bytes, as
//!   received); its deflate stream must end too (a NULL pad or a gzip trailer may follow). One
//!   that inflates to more than 250 times its size beyond 256 MiB (a decompression bomb, or a
//!   large sparse instance) is checked that far only and stored with a WARN, not refused. The
//!   response goes out after the commit. If the task fails early, the
//!   rest of the data set is read and discarded and the association stays usable.
//! - A C-STORE whose command UIDs are not 1 to 64 digits and dots is refused without touching the
//!   spool: 0x0117 (Invalid SOP Instance) for the SOP Instance UID, 0xC000 for the SOP Class UID.
//!   Those UIDs end up in file metadata, log lines and STOW-RS requests. A leading zero or an empty
//!   component (not PS3.5 9.1, but written by older modalities) is taken, as a PACS takes it.
//! - Errors become DIMSE statuses in one exhaustive match ([`IngestError::dimse_status`]).
//! - Peer-supplied text (AE titles, UIDs, abstract syntaxes, data set UIDs) is stripped of control
//!   characters before it is logged, and a field is cut after 128 characters.
//! - Shutdown: stop accepting, give in-flight associations `shutdown_grace`, then A-ABORT them.
//! - `examples/scp.rs` runs the SCP alone against a spool directory, for trying it with dcmtk or
//!   pynetdicom by hand.
//!
//! # Limitations
//! - No TLS on the DICOM port, no user identity negotiation, no extended negotiation, no
//!   asynchronous operations window (one message at a time per association, as almost every
//!   modality does).
//! - C-ECHO and C-STORE only; other DIMSE requests get 0x0211 (unrecognized operation).
//! - A data set cut exactly between two top-level elements (a modality that leaves out the pixel
//!   data altogether) still has a valid structure and is stored, deflated or not.
//! - Checking a deflated data set costs its inflation on the store thread: about 2 ms of CPU for a
//!   0.5 MB CT slice (native syntaxes: a few microseconds).
//! - Leading-element parsing stops early when a leading element announces more than 1 MiB (its
//!   value would be allocated in full); the index fields after it stay empty.
//! - More than 512 connections waiting for their association request (a flood that reopens them
//!   faster than ARTIM closes them) make new connections close without an A-ASSOCIATE-RJ (each
//!   with a WARN line); a modality connecting then fails and must retry. Memory stays bounded:
//!   each waiting connection buffers at most the 64 KiB of one control PDU, as its bytes arrive.

mod association;
mod boundary;
mod dimse;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod negotiate;
mod pdu_io;
mod store;

pub use error::{
    IngestError, Result, WalkError, STATUS_CANNOT_UNDERSTAND, STATUS_DATASET_MISMATCH,
    STATUS_OUT_OF_RESOURCES, STATUS_SUCCESS, STATUS_UNRECOGNIZED_OPERATION,
};

use std::sync::Arc;
use std::time::Duration;

use log::{info, warn};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinSet;

use association::{Shared, Slot};

/// Passerelle's Implementation Class UID, sent in the A-ASSOCIATE-AC and written to (0002,0012).
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.255089917391227131186520166178213498771";
/// Passerelle's Implementation Version Name, sent in the A-ASSOCIATE-AC and written to (0002,0013).
pub const IMPLEMENTATION_VERSION_NAME: &str = "PASSERELLE_010";

/// Connections that may be waiting for their A-ASSOCIATE-RQ (or for their rejection) at once. They
/// do not hold an association slot: idle connections (slowloris) cannot lock modalities out. Each
/// buffers at most one control PDU (64 KiB), and only as its bytes arrive.
const MAX_PENDING_CONNECTIONS: usize = 512;
/// After the grace period, how long aborted associations get to close.
const ABORT_WAIT: Duration = Duration::from_secs(5);

/// Runs the Storage SCP on `listener` until `*shutdown` becomes true.
///
/// `stored` is notified after each instance committed to the spool. On shutdown, no new connection
/// is accepted, in-flight associations get `cfg.shutdown_grace()` to finish, then they are aborted
/// (A-ABORT) and this returns `Ok`.
pub async fn serve(
    listener: TcpListener,
    cfg: Arc<passerelle_config::DicomConfig>,
    spool: passerelle_spool::Spool,
    stored: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let slots = Arc::new(Semaphore::new(cfg.max_associations));
    let pending = Arc::new(Semaphore::new(MAX_PENDING_CONNECTIONS));
    let (abort_tx, abort_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        spool,
        stored,
    });
    let mut tasks = JoinSet::new();
    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    info!(
        "DICOM Storage SCP listening. address={local} ae_title={} max_associations={} max_pdu_length={}",
        cfg.ae_title, cfg.max_associations, cfg.max_pdu_length
    );

    loop {
        tokio::select! {
            _ = shutdown_requested(&mut shutdown) => break,
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => report_task_end(joined),
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Ok(waiting) = pending.clone().try_acquire_owned() else {
                        warn!(
                            "Closed a connection without reading it: {MAX_PENDING_CONNECTIONS} connections are already waiting for their association request. peer={} This is a connection flood; find the host that opens them.",
                            peer.ip()
                        );
                        continue;
                    };
                    let slot = Slot { slots: slots.clone(), waiting };
                    tasks.spawn(association::run(stream, peer, shared.clone(), slot, abort_rx.clone()));
                }
                Err(source) => {
                    let e = IngestError::Accept { source };
                    warn!("{e}: {}. Retrying; check the process's file descriptor limit if this repeats.", source_text(&e));
                    // Back off so that a persistent error (e.g. EMFILE) does not spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }

    drop(listener);
    info!(
        "Stopped accepting associations for shutdown. in_flight={} grace_secs={}",
        tasks.len(),
        cfg.shutdown_grace().as_secs()
    );
    if tokio::time::timeout(cfg.shutdown_grace(), drain(&mut tasks))
        .await
        .is_err()
    {
        warn!(
            "Aborting associations still open after the shutdown grace period. count={} The modalities will resend what was not acknowledged.",
            tasks.len()
        );
        let _ = abort_tx.send(true);
        if tokio::time::timeout(ABORT_WAIT, drain(&mut tasks))
            .await
            .is_err()
        {
            tasks.abort_all();
            drain(&mut tasks).await;
        }
    }
    info!("DICOM Storage SCP stopped.");
    Ok(())
}

async fn drain(tasks: &mut JoinSet<()>) {
    while let Some(joined) = tasks.join_next().await {
        report_task_end(joined);
    }
}

/// An association task only ends by panicking if a library it uses panicked on peer input.
fn report_task_end(joined: std::result::Result<(), tokio::task::JoinError>) {
    if let Err(e) = joined {
        if e.is_panic() {
            log::error!(
                "An association task panicked; its modality saw a dropped connection and will resend what was not acknowledged. Please report this with the log lines above. error={e}"
            );
        }
    }
}

/// Resolves when `*shutdown` becomes true, or when its sender is gone (nobody could stop us then).
async fn shutdown_requested(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

fn source_text(e: &IngestError) -> String {
    std::error::Error::source(e)
        .map(|s| s.to_string())
        .unwrap_or_default()
}
