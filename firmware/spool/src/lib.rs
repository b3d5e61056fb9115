//! The durable spool: every instance a modality sends lives here, compressed at rest, from the moment
//! it is acknowledged until the regional PACS has confirmed it.
//!
//! # Background
//! A C-STORE success response is a promise to the modality that it may delete its copy. The spool is
//! what keeps that promise through crashes, power cuts, upstream outages, full disks and updates.
//!
//! # Design
//! - One file per instance under `objects/<xx>/`, named by a random 128-bit number when ingest
//!   wrote it into a pre-created file (`pool`), else by the SHA-256 of its raw Part-10 bytes; a zstd
//!   stream with the frame checksum on. The file holds the Part-10 header that ingest built
//!   (preamble, `DICM`, group 0002) followed by the dataset bytes exactly as received.
//! - One SQLite database (`spool.db`, WAL, `synchronous=FULL` except the one commit below) with a
//!   row per instance and its state: `queued → uploading → sent` (or back to `queued` with a
//!   persisted `next_attempt_at`, or to `failed`), plus `lost` (file missing at start-up) and
//!   `quarantined` (hash mismatch). Side tables: `intake` (files awaiting the compactor), `pool`
//!   (pre-created files) and `file_digest` (the XXH3-128 of each file as ingest or the compactor
//!   wrote it, which [`Spool::open_verified`] checks instead of decompressing the file and hashing
//!   its content before decompressing it again to send it).
//! - Storing is: write an *intake* file, a zstd frame of raw blocks, runs of one byte value as RLE
//!   blocks (`rawframe`; the leading
//!   elements are scanned as the bytes stream in, [`leading::StreamScan`], the SHA-256 is computed
//!   by the spool or, beside it, by the caller in a [`RawDigest`] that must have seen exactly the
//!   bytes written, and disk writes are started every MiB), then make it durable: into a pre-created file, fdatasync it and commit
//!   the row with `synchronous=NORMAL` (the file is the durable record until the WAL is synced: a
//!   start-up after a power cut takes whole pre-created files back in, see `pool`); or, when the
//!   pool is empty, into a temporary file, fdatasync, rename into place, fsync the directory, and
//!   commit the row with `FULL`. Either way the row's `intake` entry is in the same transaction and
//!   the compactor later rewrites the file in place at `zstd_level` ([`Spool::compact_batch`]).
//!   Only after [`Written::commit`] returns may ingest answer success. The process owning the spool
//!   checkpoints the WAL into `spool.db` from a thread of its own, so that no commit pays for a
//!   checkpoint (a commit still does past 32 MiB of WAL), and creates the 256 `objects/<xx>`
//!   directories at start-up, so that no commit creates one.
//! - Recovery at [`Spool::open`]: pre-created files holding a whole instance become `queued` rows
//!   (their row was lost with the WAL's tail), partial ones are emptied, temp files are removed, rows left `uploading` go back to `queued`
//!   with one more attempt (the PACS may have stored them before the crash, so their next
//!   confirmation counts as a possible duplicate upstream), and a row whose file is missing is logged as an ERROR and marked `lost` (counted, never dropped).
//! - A lost or damaged index is never replaced by an empty queue: [`Spool::open`] refuses to start
//!   when `spool.db` is missing while `objects/` holds files ([`SpoolError::IndexMissing`]) or when
//!   SQLite finds it damaged (not a database, or `PRAGMA quick_check` fails:
//!   [`SpoolError::IndexDamaged`]); both errors tell the operator to run `passerelled rebuild-index`.
//!   [`Spool::rebuild_index`] (daemon stopped) keeps the old database aside and rebuilds one `queued`
//!   row per intact file from its Part-10 header and leading elements, streaming; damaged files go to
//!   `quarantine/`. Rebuilt rows count one attempt, so their confirmation is counted as a possible
//!   duplicate upstream: instances confirmed before the loss are sent again (at-least-once).
//! - A database replaced by another *valid* one (a new empty one, another box's, an old backup) is
//!   refused too ([`SpoolError::IndexForeign`], naming `rebuild-index`; nothing is changed). The
//!   spool has an identity (`identity`): a random 128-bit id, in hex, recorded in `spool.db` (table
//!   `meta`, key `spool_id`) and in the file `spool.id` beside it, both written when the spool is
//!   created, database first, the file by tmp + fsync + rename + directory fsync. At start-up the
//!   two must agree. A missing `spool.id` is written again from the database; a database without
//!   id is accepted (and given `spool.id`'s) only if it holds no row and `objects/` no file. A spool
//!   from before ids (neither) is adopted with a new id, unless its database is empty while
//!   `objects/` holds files. The rebuild keeps `spool.id` (or writes a new one) and records the id
//!   in the new database only after its last row, so that an interrupted rebuild is refused too.
//!   The `meta` table is not behind the schema version: an older passerelled still opens the spool.
//! - Layout under `dir`: `spool.db`, `spool.id`, `spool.lock`, `tmp/` (files being received), `objects/<xx>/
//!   <sha256>.dcm.zst` and `quarantine/<id>-<sha256>.dcm.zst`. Directories are created `0700` and
//!   files `0600`: they hold patient data.
//! - The first process to open a spool holds an exclusive `flock` on `spool.lock` and runs recovery.
//!   `passerelled status`/`requeue` use [`Spool::attach`] (and a second [`Spool::open`] while the
//!   lock is held behaves the same): they share the database (WAL, 5 s busy timeout) but skip
//!   recovery, so they never touch the daemon's transfers in flight.
//! - Duplicates are decided in the database: same SOP Instance UID and SHA-256 as a row that is not
//!   `lost`/`quarantined` → the temporary file is dropped and only a counter moves. The decision is
//!   made again inside the insert transaction, so two associations storing the same instance at once
//!   still yield one row. Renaming onto an existing object of the same name is harmless (same name,
//!   same bytes), and adopts a file left by a crash between rename and row.
//! - Eviction walks a partial index of the confirmed cache (`sent`, not yet evicted), oldest
//!   `sent_at` first, in pages; the file is deleted before the row records it, so a crash in between
//!   only means the next pass finds nothing to delete.
//! - The file is verified (streamed, SHA-256 over the decompressed bytes) right before each upload,
//!   and the reader handed to the uplink fails if the second read yields another length.
//!
//! # Invariants
//! - Only this crate opens the SQLite database or deletes a spool file.
//! - An unconfirmed instance (`queued`, `uploading`, `failed`) is never evicted or deleted.
//! - A file whose SHA-256 does not match its row is never handed to the uplink.
//!
//! # Limitations
//! - All calls are blocking (std I/O and rusqlite); async callers use `spawn_blocking`. One SQLite
//!   connection behind a mutex serialises database work (file I/O and fsyncs happen outside it);
//!   the checkpointer has a second one.
//! - Rows are never deleted, evicted ones included: the database grows with the history (a few
//!   hundred bytes per instance). Pruning old `sent` rows is left for later.
//! - A crash between the rename into `objects/` and the row commit leaves a file without a row; the
//!   modality (which got no success) resends it and the resend adopts the file. If it never does,
//!   the file stays until an operator removes it: nothing deletes a file without a row (recovery
//!   only empties `tmp/`; eviction deletes only the files of `sent` rows), so no orphan sweep yet.
//! - An older passerelled (rolled back) ignores the `pool` and `intake` tables: empty pre-created
//!   files stay unused in `objects/` (its rebuild-index would quarantine them as unreadable), intake
//!   files stay uncompressed, and a row lost with the WAL's tail in a power cut just before the
//!   rollback is not taken back in from its pooled file (this build's rebuild-index does). It also
//!   ignores `file_digest`: it verifies every file by its content. Builds that compact but predate
//!   `file_digest` rewrite intake files without updating their digest; rolled forward again, this
//!   build finds such a file no longer matching, logs it, checks its content in full and sends it.
//! - Times are wall-clock unix milliseconds. If the clock steps back while running, rows scheduled
//!   under the old time wait for it; at start-up, a schedule more than 7 days ahead is reset to now.
//! - Free space is measured with `statvfs` on the spool directory; other writers on the same file
//!   system are only seen through it.
//! - The rebuild cannot restore what only the database knew: `failed`/`lost`/`quarantined` states,
//!   attempt counts, the uplink state and the counters start afresh; evicted instances are gone.
//!   `PRAGMA quick_check` at start-up reads the whole database (seconds for millions of rows).
//! - A replaced database is detected only through the id: a backup of this same spool's database
//!   (same id, an older queue) is accepted, and so is any database with rows on a spool from before
//!   ids, at its first start with this build. Replacing `spool.db` *and* `spool.id` together with
//!   another spool's defeats the check. On a spool from before ids, a crash between the very first
//!   instance's rename and its row leaves an empty queue beside a file: refused, and rebuild-index
//!   sends that instance (the modality, never acknowledged, may send it again too).

mod compact;
mod db;
mod error;
mod files;
mod identity;
pub mod leading;
mod pool;
mod rawframe;
mod rebuild;

pub use compact::CompactReport;
pub use error::{error_chain, Result, SpoolError};
pub use pool::PoolBatch;

#[doc(hidden)]
pub use fail as __fail;

/// A crash point for the crash-consistency campaign: with the `failpoints` feature, a `FAILPOINTS`
/// entry such as `spool::commit::before_row=5%return` kills the process there with SIGKILL (no
/// unwinding, no destructors, nothing flushed). Without the feature it compiles to nothing.
#[macro_export]
macro_rules! crash_point {
    ($name:expr) => {
        $crate::__fail::fail_point!($name, |_| $crate::__crash_now($name))
    };
}

/// Kills this process at once, as `kill -9` would (used by [`crash_point!`] only).
#[doc(hidden)]
pub fn __crash_now(point: &str) -> ! {
    eprintln!("Crash point {point} reached: killing the process (FAILPOINTS test build).");
    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    std::process::abort()
}

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use nix::fcntl::{Flock, FlockArg};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use sha2::{Digest, Sha256};

use db::{
    from_ms, to_i64, to_ms, to_u64, DbContext, DUPLICATES_RECEIVED, DUPLICATES_UPSTREAM, FAILED,
    LOST, QUARANTINED, QUEUED, SENT, UPLOADING,
};
use files::{HashOutcome, TempGuard, MIB};

/// Buffer of the compactor's reads and writes.
pub(crate) const WRITE_BUFFER: usize = 256 * 1024;
/// Disk writes of a file being received are started every this many bytes (`write_behind`): a
/// multi-frame instance never leaves tens of megabytes to its fdatasync, while a CT slice (0.5 MB)
/// is written in one go by its fdatasync. (Every 128 KiB, each slice took four more write
/// submissions on the store thread, about 16% more CPU per instance, for no shorter cycle.)
const WRITE_BEHIND: u64 = 1024 * 1024;
/// A retry scheduled further ahead than this is taken as set by a wrong clock (see recovery).
const MAX_SCHEDULE: Duration = Duration::from_secs(7 * 86_400);
/// Rows handled per eviction page (bounds memory whatever the size of the cache).
const EVICT_PAGE: i64 = 256;

/// The row id of an instance in the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceId(pub i64);

/// What ingest knows when an instance starts arriving (from the C-STORE command and the association).
#[derive(Debug, Clone)]
pub struct IncomingMeta {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub transfer_syntax_uid: String,
    pub calling_ae: String,
    /// The peer's socket address, for logs.
    pub peer: String,
}

/// The identifiers ingest parsed from the dataset's leading elements.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceIndex {
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub patient_id: String,
    pub modality: String,
    pub accession_number: String,
}

/// The outcome of a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOutcome {
    /// A new instance, now queued.
    Stored { id: InstanceId },
    /// An identical re-send (same SOP Instance UID and content hash) of an instance already held; nothing
    /// was queued and the duplicate counter was incremented.
    Duplicate { id: InstanceId },
    /// Different content under a SOP Instance UID we already hold: kept and queued as a new version.
    NewVersion {
        id: InstanceId,
        previous: InstanceId,
    },
}

/// What [`Spool::requeue_failed`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Requeued {
    /// Failed instances put back in the queue.
    pub requeued: u64,
    /// Failed instances left failed because a newer version of their UID was confirmed since.
    pub superseded: u64,
}

/// Claims take the versions of one SOP Instance UID (a modality's corrections, each its own row) one
/// at a time and in the order they arrived: a row is not claimable while another row of its UID is
/// being uploaded, or while an older one is still queued (waiting for a retry, say). A PACS that
/// overwrites on a second store then ends with the modality's latest version, never with an older
/// one sent after it; and a version whose twin is in a long request is not claimed and handed back
/// again and again meanwhile (the uplink never sends two versions of one UID at once).
const NOT_BEHIND_ANOTHER_VERSION: &str = "NOT EXISTS (SELECT 1 FROM instances AS other WHERE other.sop_instance_uid = instances.sop_instance_uid AND other.id != instances.id AND (other.state = 'uploading' OR (other.state = 'queued' AND other.id < instances.id)))";

/// A batch shortened to its even share of the end of a backlog still carries this much when it has
/// it: a smaller request spends about as long on its round trip and the PACS's answer as on its
/// bytes, and a few small instances (reports, key images) gain nothing from going one by one.
const MIN_SHARE_BYTES: u64 = 1 << 20;

/// A batch's even share of what is due when that is less than `workers` full batches: what is due,
/// divided among the workers (rounded up); else `max_count`. Counts at most `workers` full batches.
fn even_share(
    tx: &rusqlite::Transaction<'_>,
    now: i64,
    max_count: usize,
    workers: usize,
) -> Result<usize> {
    let cap = max_count.saturating_mul(workers);
    let due: i64 = tx
        .prepare_cached(&format!(
            "SELECT count(*) FROM (SELECT 1 FROM instances WHERE state = 'queued' AND next_attempt_at <= ?1 AND {NOT_BEHIND_ANOTHER_VERSION} LIMIT ?2)"
        ))
        .and_then(|mut s| {
            s.query_row(params![now, i64::try_from(cap).unwrap_or(i64::MAX)], |r| {
                r.get(0)
            })
        })
        .ctx("count the due instances")?;
    let due = usize::try_from(due).unwrap_or(0);
    Ok(if due < cap {
        due.div_ceil(workers)
    } else {
        max_count
    })
}

/// What an upload did for one instance, for [`Spool::record_outcomes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream confirmed it (as [`Spool::mark_sent`]).
    Sent { redelivery: bool },
    /// A retryable failure (as [`Spool::mark_retry`]). `refused`: the upstream named this instance
    /// as not stored (a FailureReason), rather than failing the whole request; such refusals are
    /// counted apart from attempts ([`QueuedInstance::refusals`]).
    Retry {
        error: String,
        next_attempt_at: SystemTime,
        refused: bool,
    },
    /// A permanent failure (as [`Spool::mark_failed`]).
    Failed { reason: String },
    /// Back to `queued` without counting an attempt (as [`Spool::release`]).
    Release,
}

/// An instance the uplink has claimed (its row is now `uploading`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedInstance {
    pub id: InstanceId,
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub study_instance_uid: String,
    pub transfer_syntax_uid: String,
    /// Size of the raw Part-10 bytes (what goes on the wire).
    pub raw_size: u64,
    /// Upload attempts made before this one.
    pub attempts: u32,
    /// Of those attempts, the ones the upstream answered by refusing this instance by name
    /// ([`Outcome::Retry`] with `refused`), since it was queued or last re-queued.
    pub refusals: u32,
}

/// What [`Spool::claim_batch_lingering`] found.
#[derive(Debug)]
pub enum Claim {
    /// The claimed instances (now `uploading`); empty if nothing is due.
    Batch(Vec<QueuedInstance>),
    /// A study is still arriving and its batch is not full: nothing was claimed; look again at this
    /// time (or sooner, when woken).
    Wait(SystemTime),
}

/// How long a short batch of a study that is still arriving may wait to fill up.
#[derive(Debug, Clone, Copy)]
pub struct Linger {
    /// The batch waits while its newest instance was received less than this long ago.
    pub quiet: Duration,
    /// ...but never once its oldest instance was received this long ago.
    pub max_wait: Duration,
    /// The uplink's workers that send at once. When all that is due would fit in fewer than one
    /// full batch each and the batch's study is quiet (the end of a backlog), a batch takes only its
    /// even share of what is due, so that the workers finish together instead of the last request
    /// going alone (guided self-scheduling); a shortened batch still carries at least
    /// `MIN_SHARE_BYTES` when it has them. 1: batches are never shortened.
    pub workers: usize,
}

/// How the uplink is doing, persisted so that `passerelled status` (another process) can show it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UplinkState {
    /// Set while the uplink is paused after an authentication or certificate failure.
    pub paused_until: Option<SystemTime>,
    pub last_error: Option<String>,
    pub last_error_at: Option<SystemTime>,
    pub last_success_at: Option<SystemTime>,
}

/// Counts per state and the figures an operator needs (`passerelled status`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatusReport {
    pub queued: u64,
    pub uploading: u64,
    pub sent: u64,
    pub failed: u64,
    pub lost: u64,
    pub quarantined: u64,
    /// `sent` rows whose file was evicted from the local cache.
    pub evicted: u64,
    /// Age of the oldest instance waiting to be confirmed (queued or uploading).
    pub oldest_queued_age: Option<Duration>,
    /// Identical re-sends received from modalities and answered without queueing.
    pub duplicates_received: u64,
    /// Instances confirmed upstream after an earlier attempt that may already have delivered them.
    pub duplicates_upstream: u64,
    pub uplink: UplinkState,
    /// Bytes used by spool files (compressed) and their raw size.
    pub stored_bytes: u64,
    pub raw_bytes: u64,
    /// Instances whose file waits for the compactor (still at the intake level).
    pub awaiting_compaction: u64,
}

/// The state of an instance's row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InstanceState {
    Queued,
    Uploading,
    Sent,
    Failed,
    Lost,
    Quarantined,
}

impl InstanceState {
    /// The name stored in the database and shown to operators.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Queued => QUEUED,
            InstanceState::Uploading => UPLOADING,
            InstanceState::Sent => SENT,
            InstanceState::Failed => FAILED,
            InstanceState::Lost => LOST,
            InstanceState::Quarantined => QUARANTINED,
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [
            InstanceState::Queued,
            InstanceState::Uploading,
            InstanceState::Sent,
            InstanceState::Failed,
            InstanceState::Lost,
            InstanceState::Quarantined,
        ]
        .into_iter()
        .find(|state| state.as_str() == s)
    }
}

impl std::fmt::Display for InstanceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An instance that needs an operator's attention (`failed`, `lost` or `quarantined`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProblemInstance {
    pub id: InstanceId,
    pub sop_instance_uid: String,
    pub study_instance_uid: String,
    pub patient_id: String,
    pub calling_ae: String,
    pub state: InstanceState,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub received_at: SystemTime,
}

/// What [`Spool::open`] found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub temp_files_removed: u64,
    pub uploading_requeued: u64,
    /// SOP Instance UIDs whose file was missing (now `lost`).
    pub lost: Vec<String>,
    /// Instances taken in from pre-created files whose row had not reached the disk (`pool`).
    pub pooled_taken_in: u64,
}

/// What an eviction pass removed from the confirmed cache.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EvictReport {
    pub files: u64,
    pub bytes: u64,
}

/// What [`Spool::rebuild_index`] found in the spool files and put back into the queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RebuildReport {
    /// Spool files found under `objects/`.
    pub files: u64,
    /// Rows rebuilt as `queued` (sent again: confirmed ones count as duplicates upstream).
    pub queued: u64,
    /// Rows rebuilt without study/series/patient fields (the dataset's leading elements could not
    /// be read; the file itself is intact and is sent as it is).
    pub without_index: u64,
    /// Files whose content is damaged, moved to `quarantine/` (never sent).
    pub quarantined: Vec<PathBuf>,
    /// Files found in `quarantine/` from before, given back their `quarantined` rows.
    pub previously_quarantined: u64,
    /// Files the disk could not read; left in place without a row (run the rebuild again once the
    /// disk is fixed).
    pub unreadable: Vec<PathBuf>,
    /// Partial files of interrupted transfers removed from `tmp/`.
    pub temp_files_removed: u64,
    /// Where the previous database was moved (kept for inspection), if there was one.
    pub previous_database: Option<PathBuf>,
}

/// The spool. Cheap to clone; safe to share between threads.
/// Opens (creating if needed) `spool.lock`, whose exclusive flock marks the process that owns the
/// spool: the daemon, or `rebuild-index`.
fn open_lock_file(lock_path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(lock_path)
        .map_err(|source| SpoolError::Write {
            path: lock_path.to_path_buf(),
            source,
        })
}

#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: passerelle_config::SpoolConfig,
    dir: PathBuf,
    tmp_dir: PathBuf,
    objects_dir: PathBuf,
    quarantine_dir: PathBuf,
    /// Declared before `conn`: fields drop in order, so its connection closes first and the spool's
    /// own, closing last, checkpoints and removes the WAL.
    _checkpointer: Option<db::Checkpointer>,
    conn: Mutex<Connection>,
    /// Held by the process that ran recovery (the daemon) for as long as the spool is open.
    owner_lock: Option<Flock<File>>,
    /// One eviction pass at a time (many associations may find the disk low at once).
    evicting: Mutex<()>,
    /// When this process last stored an instance (for the compactor, which waits for a pause).
    last_store: Mutex<Option<std::time::Instant>>,
    backlog_verdict: compact::BacklogVerdict,
    /// Pre-created files ready for ingest (`pool`); empty in processes that do not own the spool.
    free: pool::Free,
    /// Tests simulate a small disk through this.
    #[cfg(test)]
    free_probe: Mutex<Option<FreeProbe>>,
}

#[cfg(test)]
type FreeProbe = Box<dyn Fn(&Path) -> u64 + Send>;

/// One row as eviction sees it.
struct EvictCandidate {
    id: i64,
    sop_instance_uid: String,
    path: String,
    stored_size: u64,
    sent_at: i64,
    /// Another, unconfirmed row points at the same (content-addressed) file.
    shared: bool,
}

/// Which rows an eviction page may take.
#[derive(Clone, Copy)]
enum EvictStage {
    /// Sent at or before this time (unix ms).
    Retention(i64),
    /// Any sent row, oldest first, until this many bytes are free.
    Space { target_free: u64 },
}

impl Spool {
    /// Opens (creating if needed) the spool under `cfg.dir`, then runs recovery.
    ///
    /// The first process to open a spool takes an exclusive lock (`spool.lock`) and runs recovery.
    /// Another process opening it meanwhile (`passerelled status`, `requeue`) shares the database but
    /// skips recovery, so that it never touches the running daemon's transfers; its report is empty.
    pub fn open(cfg: &passerelle_config::SpoolConfig) -> Result<(Spool, RecoveryReport)> {
        let dir = cfg.dir.clone();
        let tmp_dir = dir.join("tmp");
        let objects_dir = dir.join("objects");
        let quarantine_dir = dir.join("quarantine");
        files::create_dir(&dir)?;
        let mut created = false;
        for sub in [&tmp_dir, &objects_dir, &quarantine_dir] {
            created |= files::create_dir(sub)?;
        }
        if created {
            files::fsync_dir(&dir)?;
        }

        let lock_path = dir.join("spool.lock");
        let lock_file = open_lock_file(&lock_path)?;
        let owner_lock = match Flock::lock(lock_file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Some(lock),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                log::info!(
                    "Another process holds the spool; opening it without start-up recovery. dir={}",
                    dir.display()
                );
                None
            }
            Err((_, source)) => {
                return Err(SpoolError::Lock {
                    path: lock_path,
                    source,
                })
            }
        };

        let db_path = dir.join("spool.db");
        if owner_lock.is_some() && index_missing(&db_path) {
            let has_files =
                rebuild::any_object_file(&objects_dir).map_err(|source| SpoolError::Read {
                    path: objects_dir.clone(),
                    source,
                })?;
            if has_files {
                // Starting with an empty queue would silently forget every acknowledged instance.
                return Err(SpoolError::IndexMissing { path: db_path });
            }
        }
        // Before anything is written: is this database the one these spool files belong to?
        let plan = identity::check(&dir, &db_path)?;
        let spool = Spool::with_connection(cfg, owner_lock).map_err(|e| damaged(e, &db_path))?;
        let report = if spool.inner.owner_lock.is_some() {
            spool.check_integrity(&db_path)?;
            identity::apply(&plan, &dir, &spool.conn())?;
            // Pooled files first: a row whose file is missing may be waiting for one of them.
            let pooled_taken_in = spool.recover_pool()?;
            let mut report = spool.recover()?;
            report.pooled_taken_in = pooled_taken_in;
            spool.create_fan_dirs();
            report
        } else {
            RecoveryReport::default()
        };
        Ok((spool, report))
    }

    /// Attaches to the existing spool of a (possibly running) daemon without recovery and without
    /// creating anything: for `passerelled status` and `requeue`. Fails with
    /// [`SpoolError::NotASpool`] when `cfg.dir` holds no spool database.
    pub fn attach(cfg: &passerelle_config::SpoolConfig) -> Result<Spool> {
        let db_path = cfg.dir.join("spool.db");
        if !db_path.is_file() {
            // Files without their database: the operator must rebuild the index, not start afresh.
            if rebuild::any_object_file(&cfg.dir.join("objects")).unwrap_or(false) {
                return Err(SpoolError::IndexMissing { path: db_path });
            }
            return Err(SpoolError::NotASpool { path: db_path });
        }
        // Refuses another spool's database; what the owner would write is left to it.
        identity::check(&cfg.dir, &db_path)?;
        Spool::with_connection(cfg, None).map_err(|e| damaged(e, &db_path))
    }

    fn with_connection(
        cfg: &passerelle_config::SpoolConfig,
        owner_lock: Option<Flock<File>>,
    ) -> Result<Spool> {
        let dir = cfg.dir.clone();
        let db_path = dir.join("spool.db");
        let conn = db::open(&db_path)?;
        // The process that owns the spool checkpoints off the acknowledgement path.
        let checkpointer = match owner_lock {
            Some(_) => Some(db::Checkpointer::start(&db_path, &conn)?),
            None => None,
        };
        Ok(Spool {
            inner: Arc::new(Inner {
                cfg: cfg.clone(),
                tmp_dir: dir.join("tmp"),
                objects_dir: dir.join("objects"),
                quarantine_dir: dir.join("quarantine"),
                dir,
                _checkpointer: checkpointer,
                conn: Mutex::new(conn),
                owner_lock,
                evicting: Mutex::new(()),
                last_store: Mutex::new(None),
                backlog_verdict: Mutex::new(None),
                free: pool::Free::default(),
                #[cfg(test)]
                free_probe: Mutex::new(None),
            }),
        })
    }

    /// Rebuilds the index (`spool.db`) from the spool files, after the database was lost or damaged.
    ///
    /// Takes the spool's exclusive lock (fails with [`SpoolError::RebuildWhileRunning`] while a
    /// daemon holds it), moves the old database (and its `-wal`/`-shm`) aside as
    /// `spool.db.before-rebuild-<unix ms>`, removes temporary files, then reads every file under
    /// `objects/` once, streaming: its SHA-256 must match its name, and its Part-10 header and leading
    /// elements give the row. Every intact file becomes a `queued` row due now, with one attempt
    /// counted, so that its confirmation is counted as a possible duplicate upstream (delivery is
    /// at-least-once: instances confirmed before the loss are sent again). Damaged files are moved
    /// to `quarantine/` and logged as ERRORs; they are never sent.
    pub fn rebuild_index(cfg: &passerelle_config::SpoolConfig) -> Result<RebuildReport> {
        let dir = cfg.dir.clone();
        let objects_dir = dir.join("objects");
        if !objects_dir.is_dir() {
            return Err(SpoolError::NotASpool { path: objects_dir });
        }
        let lock_path = dir.join("spool.lock");
        let lock_file = open_lock_file(&lock_path)?;
        let lock = match Flock::lock(lock_file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(SpoolError::RebuildWhileRunning { path: dir })
            }
            Err((_, source)) => {
                return Err(SpoolError::Lock {
                    path: lock_path,
                    source,
                })
            }
        };

        let mut report = RebuildReport::default();
        let stamp = to_ms(SystemTime::now());
        for suffix in ["", "-wal", "-shm"] {
            let from = dir.join(format!("spool.db{suffix}"));
            if fs::symlink_metadata(&from).is_err() {
                continue;
            }
            let to = dir.join(format!("spool.db.before-rebuild-{stamp}{suffix}"));
            fs::rename(&from, &to).map_err(|source| SpoolError::MoveDatabaseAside {
                path: from.clone(),
                source,
            })?;
            if suffix.is_empty() {
                report.previous_database = Some(to);
            }
        }
        files::fsync_dir(&dir)?;
        // The rebuilt database takes the spool's id, recorded only once every row is in: a rebuild
        // cut short leaves a database without it, which the next start refuses.
        let spool_id = match identity::read_file(&dir) {
            Ok(Some(id)) => id,
            Ok(None) => {
                let id = identity::new_id();
                identity::write_file(&dir, &id)?;
                id
            }
            Err(e @ SpoolError::SpoolIdInvalid { .. }) => {
                let id = identity::new_id();
                log::warn!("Giving the spool a new id while rebuilding its index. spool_id={id} previous_problem={e}");
                identity::write_file(&dir, &id)?;
                id
            }
            Err(e) => return Err(e),
        };
        if let Some(previous) = &report.previous_database {
            log::warn!(
                "Moved the previous spool database aside before rebuilding the index; keep it for inspection or delete it. path={}",
                previous.display()
            );
        }

        let spool = Spool::with_connection(cfg, Some(lock))?;
        report.temp_files_removed = spool.recover()?.temp_files_removed;
        // Files quarantined before: their rows come back as `quarantined`, so that the operator
        // still sees them.
        let quarantine_dir = spool.inner.quarantine_dir.clone();
        let earlier =
            rebuild::quarantine_files(&quarantine_dir).map_err(|source| SpoolError::Read {
                path: quarantine_dir.clone(),
                source,
            })?;
        for chunk in earlier.chunks(EVICT_PAGE as usize) {
            let rows: Vec<_> = chunk
                .iter()
                .map(|path| rebuild::Rebuilt {
                    path: path.clone(),
                    scanned: rebuild::scan_file(path).ok(),
                    sha256: rebuild::named_sha256(path),
                    state: QUARANTINED,
                    note: "quarantined before the index was rebuilt".to_owned(),
                })
                .collect();
            report.previously_quarantined += rows.len() as u64;
            spool.insert_rebuilt(&rows)?;
        }

        let paths = rebuild::object_files(&objects_dir).map_err(|source| SpoolError::Read {
            path: objects_dir.clone(),
            source,
        })?;
        for chunk in paths.chunks(EVICT_PAGE as usize) {
            let mut rows = Vec::with_capacity(chunk.len());
            for path in chunk {
                report.files += 1;
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let pooled = pool::is_pooled_name(path);
                if pooled && fs::metadata(path).is_ok_and(|m| m.len() == 0) {
                    // A pre-created file never written: nothing to rebuild, and no pool any more.
                    fs::remove_file(path).map_err(|source| SpoolError::Write {
                        path: path.clone(),
                        source,
                    })?;
                    report.files -= 1;
                    continue;
                }
                let expected = name.trim_end_matches(".dcm.zst").to_owned();
                let (scanned, detail) = match rebuild::scan_file(path) {
                    // A pre-created file is not named by its content: its hash is what it holds.
                    Ok(scanned)
                        if scanned.damage.is_none() && (pooled || scanned.sha256 == expected) =>
                    {
                        rows.push(rebuild::Rebuilt {
                            path: path.clone(),
                            sha256: scanned.sha256.clone(),
                            scanned: Some(scanned),
                            state: QUEUED,
                            note: "rebuilt from the spool file by rebuild-index".to_owned(),
                        });
                        continue;
                    }
                    Ok(scanned) => {
                        let detail = scanned.damage.clone().unwrap_or_else(|| {
                            format!(
                                "content mismatch: expected_sha256={expected} actual_sha256={}",
                                scanned.sha256
                            )
                        });
                        (Some(scanned), detail)
                    }
                    Err(rebuild::ScanError::Corrupt(detail)) => (None, detail),
                    Err(rebuild::ScanError::Read(e)) => {
                        log::error!(
                            "Could not read a spool file while rebuilding the index; it has no row and will not be sent. Check the disk, then run rebuild-index again. path={} error={e}",
                            path.display()
                        );
                        report.unreadable.push(path.clone());
                        continue;
                    }
                };
                let qpath = spool.inner.quarantine_dir.join(format!("rebuild-{name}"));
                let kept = match fs::rename(path, &qpath) {
                    Ok(()) => qpath,
                    Err(_) => path.clone(),
                };
                log::error!(
                    "A spool file is corrupt; it was quarantined and will not be sent. Ask the modality to send the instance again and check the disk. sop_instance_uid={} path={} quarantine_path={} {detail}",
                    scanned
                        .as_ref()
                        .map_or("unknown", |s| s.sop_instance_uid.as_str()),
                    path.display(),
                    kept.display()
                );
                report.quarantined.push(kept.clone());
                rows.push(rebuild::Rebuilt {
                    path: kept,
                    scanned,
                    sha256: expected,
                    state: QUARANTINED,
                    note: detail,
                });
            }
            report.queued += rows.iter().filter(|r| r.state == QUEUED).count() as u64;
            report.without_index += spool.insert_rebuilt(&rows)?;
        }
        if !report.quarantined.is_empty() {
            files::fsync_dir(&spool.inner.quarantine_dir)?;
        }
        identity::write_db(&spool.conn(), &spool_id)?;
        log::warn!(
            "Rebuilt the spool index from the spool files; every intact instance is queued and will be sent (again, for those confirmed before). files={} queued={} quarantined={} unreadable={}",
            report.files,
            report.queued,
            report.quarantined.len(),
            report.unreadable.len()
        );
        Ok(report)
    }

    /// Inserts rebuilt rows (one transaction); returns how many queued ones lack their index fields.
    fn insert_rebuilt(&self, rows: &[rebuild::Rebuilt]) -> Result<u64> {
        let now = to_ms(SystemTime::now());
        let mut without_index = 0;
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .ctx("start rebuilding rows")?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO instances (sop_instance_uid, sop_class_uid, study_instance_uid, series_instance_uid,
                        patient_id, modality, accession_number, calling_ae, transfer_syntax_uid, raw_size,
                        stored_size, sha256, path, received_at, state, attempts, next_attempt_at, last_error)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?17, 1, ?15, ?16)",
                )
                .ctx("insert a rebuilt row")?;
            let unknown = rebuild::Scanned::default();
            for row in rows {
                let path = &row.path;
                let s = row.scanned.as_ref().unwrap_or(&unknown);
                if let (QUEUED, Some(problem)) = (row.state, &s.index_problem) {
                    without_index += 1;
                    log::warn!(
                        "Rebuilt a row without its study and series: the dataset's leading elements are unreadable, the file is intact and will be sent as it is. sop_instance_uid={} path={} problem={problem}",
                        s.sop_instance_uid,
                        path.display()
                    );
                }
                let rel = path
                    .strip_prefix(&self.inner.dir)
                    .unwrap_or(path)
                    .to_string_lossy()
                    .into_owned();
                let stored = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
                stmt.execute(params![
                    s.sop_instance_uid,
                    s.sop_class_uid,
                    s.index.study_instance_uid,
                    s.index.series_instance_uid,
                    s.index.patient_id,
                    s.index.modality,
                    s.index.accession_number,
                    s.calling_ae,
                    s.transfer_syntax_uid,
                    to_i64(s.raw_size),
                    to_i64(stored),
                    row.sha256,
                    rel,
                    to_ms(rebuild::modified(path)),
                    now,
                    row.note,
                    row.state,
                ])
                .ctx("insert a rebuilt row")?;
                // Intake files are not told apart from compacted ones: list every queued row (a
                // rebuild is rare; compacting a compacted file again costs only CPU).
                if row.state == QUEUED {
                    tx.prepare_cached("INSERT INTO intake (id) VALUES (?1)")
                        .and_then(|mut s| s.execute([tx.last_insert_rowid()]))
                        .ctx("list an intake file")?;
                }
            }
        }
        tx.commit().ctx("commit rebuilt rows")?;
        Ok(without_index)
    }

    /// Refuses a damaged database (`PRAGMA quick_check`) rather than running on it.
    fn check_integrity(&self, db_path: &Path) -> Result<()> {
        let verdict: String = self
            .conn()
            .query_row("PRAGMA quick_check(1)", [], |r| r.get(0))
            .map_err(|e| {
                damaged(
                    SpoolError::Database {
                        action: "check the database",
                        source: e,
                    },
                    db_path,
                )
            })?;
        if verdict != "ok" {
            return Err(SpoolError::IndexDamaged {
                path: db_path.to_path_buf(),
                detail: verdict,
            });
        }
        Ok(())
    }

    /// True when this handle ran recovery and holds the spool's exclusive lock (false for a second
    /// process such as `passerelled status` opening the spool of a running daemon).
    pub fn is_owner(&self) -> bool {
        self.inner.owner_lock.is_some()
    }

    /// The spool directory.
    pub fn dir(&self) -> PathBuf {
        self.inner.dir.clone()
    }

    /// Free bytes for unprivileged users on the spool's file system.
    pub(crate) fn free_bytes(&self) -> Result<u64> {
        #[cfg(test)]
        if let Some(probe) = self.inner.free_probe.lock().unwrap().as_ref() {
            return Ok(probe(&self.inner.dir));
        }
        files::free_bytes(&self.inner.dir)
    }

    /// Creates the 256 `objects/<xx>` directories ahead, so that no commit has to create one (and
    /// fsync `objects/` for it) on the acknowledgement path, spread over the file system's block
    /// groups where it can (see [`files::spread_subdirectories`]). Best effort: on a full disk the daemon
    /// still starts (and answers 0xA700), and commits create what is missing.
    fn create_fan_dirs(&self) {
        // Before the fan directories exist: only directories created afterwards are spread.
        if let Err(e) = files::spread_subdirectories(&self.inner.objects_dir) {
            log::debug!(
                "Could not mark the spool's object directory for spreading over the disk; files are created as usual. path={} error={e}",
                self.inner.objects_dir.display()
            );
        }
        let created = (0..=255u8).try_fold(false, |created, fan| {
            let dir = self.inner.objects_dir.join(format!("{fan:02x}"));
            files::create_dir(&dir).map(|new| created | new)
        });
        let done = match created {
            Ok(true) => files::fsync_dir(&self.inner.objects_dir),
            Ok(false) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = done {
            log::warn!(
                "Could not create the spool's object directories ahead; each will be created when its first instance arrives. Check the disk. error={}",
                error_chain(&e)
            );
        }
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the connection leaves no open transaction behind (rusqlite rolls
        // back on drop), so the connection is still usable.
        self.inner
            .conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn recover(&self) -> Result<RecoveryReport> {
        let mut report = RecoveryReport::default();

        let entries = fs::read_dir(&self.inner.tmp_dir).map_err(|source| SpoolError::Read {
            path: self.inner.tmp_dir.clone(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| SpoolError::Read {
                path: self.inner.tmp_dir.clone(),
                source,
            })?;
            let path = entry.path();
            let result = if entry.file_type().is_ok_and(|t| t.is_dir()) {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            match result {
                Ok(()) => report.temp_files_removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(SpoolError::Write { path, source }),
            }
        }
        if report.temp_files_removed > 0 {
            log::warn!(
                "Removed partial files of transfers interrupted by the last stop; those C-STOREs were never confirmed, so the modalities will send them again. temp_files_removed={}",
                report.temp_files_removed
            );
        }

        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .ctx("start the recovery transaction")?;
        let requeued = tx
            .execute(
                // The interrupted upload was an attempt: the PACS may hold the instance already, so
                // its next confirmation is counted in duplicates_upstream (the uplink's redelivery).
                "UPDATE instances SET state = 'queued', attempts = attempts + 1 WHERE state = 'uploading'",
                [],
            )
            .ctx("re-queue interrupted uploads")?;
        report.uploading_requeued = requeued as u64;
        if requeued > 0 {
            log::info!(
                "Re-queued instances whose upload was interrupted by the last stop. count={requeued}"
            );
        }

        // A schedule far in the future means the clock was wrong when it was set (a box without a
        // battery-backed clock booting in the past, then reaching NTP): make those rows due now
        // rather than stalled for years. Claims do the same while the daemon runs.
        reschedule_implausible(&tx, to_ms(SystemTime::now()))?;

        // Only the missing ones are collected: the queue may be long after an outage.
        let mut missing: Vec<(i64, String, String)> = Vec::new();
        {
            let mut stmt = tx
                .prepare("SELECT id, sop_instance_uid, path FROM instances WHERE state IN ('queued', 'uploading', 'failed') ORDER BY id")
                .ctx("list unconfirmed instances")?;
            let mut rows = stmt.query([]).ctx("list unconfirmed instances")?;
            while let Some(row) = rows.next().ctx("list unconfirmed instances")? {
                let rel: String = row.get(2).ctx("list unconfirmed instances")?;
                let path = self.inner.dir.join(&rel);
                match fs::symlink_metadata(&path) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => missing.push((
                        row.get(0).ctx("list unconfirmed instances")?,
                        row.get(1).ctx("list unconfirmed instances")?,
                        rel,
                    )),
                    Err(e) => log::warn!(
                        "Cannot check a spool file at start-up; it will be checked again before sending. path={} error={e}",
                        path.display()
                    ),
                }
            }
        }
        for (id, uid, rel) in missing {
            log::error!(
                "The spool file of an unconfirmed instance is missing; the instance is marked lost and must be sent again from the modality. sop_instance_uid={uid} path={}",
                self.inner.dir.join(&rel).display()
            );
            tx.execute(
                "UPDATE instances SET state = 'lost', last_error = ?2 WHERE id = ?1",
                params![id, format!("spool file missing at start-up: {rel}")],
            )
            .ctx("mark an instance lost")?;
            report.lost.push(uid);
        }
        tx.commit().ctx("commit the recovery")?;
        Ok(report)
    }

    /// Ensures at least `min_free_mb` is free, evicting confirmed cache (oldest first) if needed.
    /// Returns [`SpoolError::DiskFull`] when that is not enough; nothing unconfirmed is ever touched.
    pub fn ensure_space(&self) -> Result<()> {
        let min = self.inner.cfg.min_free_mb.saturating_mul(MIB);
        if self.free_bytes()? >= min {
            return Ok(());
        }
        let free = {
            let _evicting = self.evicting();
            // Another caller may have made room while this one waited.
            if self.free_bytes()? < min {
                self.evict_locked(SystemTime::now())?;
            }
            self.free_bytes()?
        };
        if free >= min {
            return Ok(());
        }
        Err(SpoolError::DiskFull {
            free_mb: free / MIB,
            min_free_mb: self.inner.cfg.min_free_mb,
        })
    }

    /// Starts receiving an instance: creates a temporary file and writes `part10_header` (preamble,
    /// `DICM`, group 0002, built by ingest) into its zstd stream. The spool hashes the bytes as they
    /// are written; end with [`Incoming::finish`].
    pub fn begin(&self, meta: IncomingMeta, part10_header: &[u8]) -> Result<Incoming> {
        self.begin_inner(meta, part10_header, Some(Sha256::new()))
    }

    /// Like [`Spool::begin`], but the caller hashes the raw bytes itself, in a [`RawDigest`] it
    /// started with the same `part10_header` and feeds every dataset byte it passes to
    /// [`Incoming::write_all`], in the same order (ingest does it in the association task, on
    /// another core than the thread that writes the file). End with [`Incoming::finish_with`],
    /// which refuses a digest that did not see as many bytes as the file.
    pub fn begin_hashed_by_caller(
        &self,
        meta: IncomingMeta,
        part10_header: &[u8],
    ) -> Result<Incoming> {
        self.begin_inner(meta, part10_header, None)
    }

    fn begin_inner(
        &self,
        meta: IncomingMeta,
        part10_header: &[u8],
        hasher: Option<Sha256>,
    ) -> Result<Incoming> {
        let (file, guard) = match self.take_pooled() {
            Some(slot) => (pool::open_slot(&slot)?, pool::Target::Pooled(slot)),
            None => {
                let (file, guard) = files::create_temp(&self.inner.tmp_dir, "part")?;
                (file, pool::Target::Temp(guard))
            }
        };
        let write_err = |source| SpoolError::Write {
            path: guard.path().to_path_buf(),
            source,
        };
        // Stored as received: compression happens later, off the acknowledgement path (`compact`).
        let encoder = rawframe::RawFrameWriter::new(file).map_err(write_err)?;
        let mut incoming = Incoming {
            encoder,
            hasher,
            raw_len: 0,
            header_len: part10_header.len() as u64,
            written_back: 0,
            scan: leading::StreamScan::new(&meta.transfer_syntax_uid),
            meta,
            spool: self.clone(),
            guard,
        };
        incoming.write_raw(part10_header)?;
        Ok(incoming)
    }

    /// Claims up to `max_count` due instances (`queued` with `next_attempt_at <= now`) of one study,
    /// oldest first, whose raw sizes add up to at most `max_bytes` (at least one instance is always
    /// returned if one is due). Their rows become `uploading`.
    pub fn claim_batch(
        &self,
        max_count: usize,
        max_bytes: u64,
        now: SystemTime,
    ) -> Result<Vec<QueuedInstance>> {
        match self.claim_batch_lingering(max_count, max_bytes, now, None)? {
            Claim::Batch(batch) => Ok(batch),
            Claim::Wait(_) => Ok(Vec::new()),
        }
    }

    /// Like [`Spool::claim_batch`], but while a study is still arriving it waits for a fuller batch:
    /// when the batch would be short of `max_count` and `max_bytes`, none of its instances was tried
    /// before, its newest instance was received less than `linger.quiet` before `now` and its oldest
    /// less than `linger.max_wait` before `now`, nothing is claimed and [`Claim::Wait`] says when to
    /// look again. Retries are never held back. With `linger.workers` above 1, the end of a quiet
    /// backlog is split evenly among them ([`Linger::workers`]).
    pub fn claim_batch_lingering(
        &self,
        max_count: usize,
        max_bytes: u64,
        now: SystemTime,
        linger: Option<Linger>,
    ) -> Result<Claim> {
        const COLUMNS: &str = "id, sop_class_uid, sop_instance_uid, study_instance_uid, transfer_syntax_uid, raw_size, attempts, received_at, (SELECT count FROM refusals WHERE refusals.id = instances.id)";
        fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(QueuedInstance, i64)> {
            Ok((
                QueuedInstance {
                    id: InstanceId(r.get(0)?),
                    sop_class_uid: r.get(1)?,
                    sop_instance_uid: r.get(2)?,
                    study_instance_uid: r.get(3)?,
                    transfer_syntax_uid: r.get(4)?,
                    raw_size: to_u64(r.get(5)?),
                    attempts: u32::try_from(r.get::<_, i64>(6)?).unwrap_or(u32::MAX),
                    refusals: u32::try_from(r.get::<_, Option<i64>>(8)?.unwrap_or(0))
                        .unwrap_or(u32::MAX),
                },
                r.get(7)?,
            ))
        }
        let now = to_ms(now);
        let max_count = max_count.max(1);
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .ctx("start a claim")?;
        let mut batch = Vec::new();
        let mut full = false;
        {
            reschedule_implausible(&tx, now)?;
            let first = tx
                .prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM instances WHERE state = 'queued' AND next_attempt_at <= ?1 AND {NOT_BEHIND_ANOTHER_VERSION} ORDER BY next_attempt_at, id LIMIT 1"
                ))
                .and_then(|mut s| s.query_row([now], row).optional())
                .ctx("find the next due instance")?;
            let Some((first, received)) = first else {
                return Ok(Claim::Batch(batch));
            };
            let (mut oldest, mut newest) = (received, received);
            let mut total = first.raw_size;
            let study = first.study_instance_uid.clone();
            let first_id = first.id.0;
            batch.push(first);
            if max_count > 1 {
                let mut stmt = tx
                    .prepare_cached(&format!(
                        "SELECT {COLUMNS} FROM instances WHERE study_instance_uid = ?1 AND state = 'queued' AND next_attempt_at <= ?2 AND id != ?3 AND {NOT_BEHIND_ANOTHER_VERSION} ORDER BY next_attempt_at, id LIMIT ?4"
                    ))
                    .ctx("find due instances of the study")?;
                let limit = i64::try_from(max_count - 1).unwrap_or(i64::MAX);
                let rows = stmt
                    .query_map(params![study, now, first_id, limit], row)
                    .ctx("find due instances of the study")?;
                for inst in rows {
                    let (inst, received) = inst.ctx("read a due instance")?;
                    if total.saturating_add(inst.raw_size) > max_bytes {
                        full = true;
                        break;
                    }
                    total += inst.raw_size;
                    (oldest, newest) = (oldest.min(received), newest.max(received));
                    batch.push(inst);
                }
            }
            full = full || batch.len() >= max_count;
            if let Some(linger) = linger {
                let quiet_until = newest.saturating_add(duration_ms(linger.quiet));
                let wait_until = oldest.saturating_add(duration_ms(linger.max_wait));
                let fresh = batch.iter().all(|i| i.attempts == 0);
                // Received later than `now` by more than a batch ever waits: the clock went back
                // since. Waiting for it to catch up could take months; the batch goes now.
                let clock_went_back = newest > now.saturating_add(duration_ms(linger.max_wait));
                if !full && fresh && !clock_went_back && quiet_until > now && wait_until > now {
                    // Nothing was updated: dropping the transaction rolls it back.
                    return Ok(Claim::Wait(from_ms(quiet_until.min(wait_until))));
                }
                if linger.workers > 1 && batch.len() > 1 && quiet_until <= now {
                    let mut share = even_share(&tx, now, max_count, linger.workers)?;
                    if share < batch.len() {
                        // Among the study's rows still to send (a range of `instances_study`):
                        // one received within `quiet` is almost always among them.
                        let study_newest: Option<i64> = tx
                            .prepare_cached(
                                "SELECT max(received_at) FROM instances WHERE study_instance_uid = ?1 AND state IN ('queued', 'uploading')",
                            )
                            .and_then(|mut s| s.query_row([&study], |r| r.get(0)))
                            .ctx("find when the study last received an instance")?;
                        // Not while the study is still arriving: what is due is not its end.
                        if study_newest
                            .is_some_and(|at| at.saturating_add(duration_ms(linger.quiet)) > now)
                        {
                            share = batch.len();
                        }
                    }
                    let (mut keep, mut bytes) = (0, 0u64);
                    for inst in &batch {
                        if keep >= share && bytes >= MIN_SHARE_BYTES {
                            break;
                        }
                        keep += 1;
                        bytes = bytes.saturating_add(inst.raw_size);
                    }
                    batch.truncate(keep);
                }
            }
            let mut update = tx
                .prepare_cached("UPDATE instances SET state = 'uploading' WHERE id = ?1")
                .ctx("mark instances uploading")?;
            for inst in &batch {
                update
                    .execute([inst.id.0])
                    .ctx("mark instances uploading")?;
            }
        }
        tx.commit().ctx("commit a claim")?;
        Ok(Claim::Batch(batch))
    }

    /// When the next claimable queued instance becomes due (None if nothing is queued, or only
    /// versions waiting behind another version of their SOP Instance UID).
    pub fn next_due(&self) -> Result<Option<SystemTime>> {
        let conn = self.conn();
        let due: Option<i64> = conn
            .prepare_cached(&format!(
                "SELECT next_attempt_at FROM instances WHERE state = 'queued' AND {NOT_BEHIND_ANOTHER_VERSION} ORDER BY next_attempt_at LIMIT 1"
            ))
            .and_then(|mut s| s.query_row([], |r| r.get(0)).optional())
            .ctx("find the next due time")?;
        Ok(due.map(from_ms))
    }

    /// Verifies the instance's file, then returns a reader of its raw Part-10 bytes. A file is
    /// checked against the XXH3-128 recorded when ingest or the compactor wrote it (`file_digest`),
    /// without decompressing it; a file without one (taken back in after a power cut, an older
    /// database, a rebuilt index) or no longer matching it is decompressed and its SHA-256 and
    /// length checked against the row.
    /// On a mismatch or a zstd error the file is moved to `quarantine/`, the row becomes `quarantined`,
    /// an ERROR is logged, and [`SpoolError::Corrupt`] is returned: corrupt bytes are never sent.
    pub fn open_verified(&self, inst: &QueuedInstance) -> Result<InstanceReader> {
        let id = inst.id.0;
        type Row = (
            String,
            String,
            String,
            i64,
            String,
            Option<i64>,
            Option<String>,
            Option<Vec<u8>>,
        );
        let row: Option<Row> = self
            .conn()
            .prepare_cached(
                "SELECT i.sop_instance_uid, i.path, i.sha256, i.raw_size, i.state, i.evicted_at, i.last_error, d.xxh3
                 FROM instances i LEFT JOIN file_digest d ON d.id = i.id WHERE i.id = ?1",
            )
            .and_then(|mut s| {
                s.query_row([id], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                        r.get(7)?,
                    ))
                })
                .optional()
            })
            .ctx("read an instance row")?;
        let Some((uid, rel, expected, raw_size, state, evicted_at, last_error, digest)) = row
        else {
            return Err(SpoolError::NoSuchRow { id });
        };
        let path = self.inner.dir.join(&rel);
        match state.as_str() {
            QUARANTINED => {
                return Err(SpoolError::Corrupt {
                    sop_instance_uid: uid,
                    path,
                    detail: last_error.unwrap_or_else(|| "quarantined earlier".to_owned()),
                })
            }
            LOST => {
                return Err(SpoolError::Missing {
                    sop_instance_uid: uid,
                    path,
                })
            }
            SENT if evicted_at.is_some() => {
                return Err(SpoolError::Missing {
                    sop_instance_uid: uid,
                    path,
                })
            }
            _ => {}
        }
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if state != SENT {
                    // Only the row as read above: an identical copy received meanwhile may have
                    // pointed it at a new file (and been acknowledged); then it is read from there.
                    let marked = self
                        .conn()
                        .prepare_cached(
                            "UPDATE instances SET state = 'lost', last_error = ?2
                             WHERE id = ?1 AND path = ?3 AND state = ?4",
                        )
                        .and_then(|mut s| {
                            s.execute(params![
                                id,
                                format!("spool file missing: {rel}"),
                                rel,
                                state
                            ])
                        })
                        .ctx("mark an instance lost")?;
                    if marked == 0 {
                        return Err(SpoolError::Read {
                            path,
                            source: io::Error::new(
                                io::ErrorKind::NotFound,
                                "the instance's row changed while its file was opened; it is tried again",
                            ),
                        });
                    }
                    log::error!(
                        "The spool file of an unconfirmed instance is missing; the instance is marked lost and must be sent again from the modality. sop_instance_uid={uid} path={}",
                        path.display()
                    );
                }
                return Err(SpoolError::Missing {
                    sop_instance_uid: uid,
                    path,
                });
            }
            Err(source) => return Err(SpoolError::Read { path, source }),
        };
        let raw_size = to_u64(raw_size);
        let recorded = digest.and_then(|xxh3| Some(u128::from_le_bytes(xxh3.try_into().ok()?)));
        if let Some(recorded) = recorded {
            let found = files::digest_stored(&file).map_err(|source| SpoolError::Read {
                path: path.clone(),
                source,
            })?;
            file.seek(SeekFrom::Start(0))
                .map_err(|source| SpoolError::Read {
                    path: path.clone(),
                    source,
                })?;
            // The compactor may have renamed its copy over the file between the read of the row
            // and the open: the digest is read again, and a file still listed for compaction
            // (the copy's digest not recorded yet) is checked in full without alarm.
            let (now_recorded, compacting) = self.digest_and_intake(id)?;
            if found == recorded || now_recorded == Some(found) {
                return InstanceReader::new(file, raw_size, Verified::StoredDigest)
                    .map_err(|source| SpoolError::Read { path, source });
            }
            if compacting {
                log::debug!(
                    "A spool file was compacted while it was opened; checking its content in full before sending it. sop_instance_uid={uid} path={}",
                    path.display()
                );
            } else {
                log::warn!(
                    "A spool file no longer matches the digest recorded when it was written; checking its content in full before sending it. sop_instance_uid={uid} path={}",
                    path.display()
                );
            }
        }
        let detail = match files::hash_decompressed(&file) {
            // Hashing only writes to a sink that never fails; no other source of error.
            HashOutcome::ReadFailed(source) | HashOutcome::WriteFailed(source) => {
                return Err(SpoolError::Read { path, source })
            }
            HashOutcome::Undecodable(e) => {
                format!("zstd stream unreadable ({e}); expected_sha256={expected}")
            }
            HashOutcome::Ok { sha256, len } if sha256 != expected || len != raw_size => {
                format!("content mismatch: expected_sha256={expected} actual_sha256={sha256} expected_bytes={raw_size} actual_bytes={len}")
            }
            HashOutcome::Ok { .. } => {
                file.seek(SeekFrom::Start(0))
                    .map_err(|source| SpoolError::Read {
                        path: path.clone(),
                        source,
                    })?;
                return InstanceReader::new(file, raw_size, Verified::Content)
                    .map_err(|source| SpoolError::Read { path, source });
            }
        };
        drop(file);
        Err(self.quarantine(id, &uid, &path, &expected, detail))
    }

    /// Moves a corrupt file to `quarantine/` and marks its row; returns the error to hand back.
    fn quarantine(
        &self,
        id: i64,
        uid: &str,
        path: &Path,
        sha256: &str,
        detail: String,
    ) -> SpoolError {
        let qrel = format!("quarantine/{id}-{sha256}.dcm.zst");
        let qpath = self.inner.dir.join(&qrel);
        let (new_rel, final_path) = match fs::rename(path, &qpath) {
            Ok(()) => {
                if let Err(e) = files::fsync_dir(&self.inner.quarantine_dir) {
                    log::warn!("Could not fsync the quarantine directory. error={e}");
                }
                (Some(qrel), qpath)
            }
            Err(e) => {
                log::error!(
                    "Could not move a corrupt spool file to quarantine; it stays in place and is marked quarantined. sop_instance_uid={uid} path={} error={e}",
                    path.display()
                );
                (None, path.to_path_buf())
            }
        };
        log::error!(
            "A spool file is corrupt; it was quarantined and will not be sent. Ask the modality to send the instance again and check the disk. sop_instance_uid={uid} path={} quarantine_path={} {detail}",
            path.display(),
            final_path.display()
        );
        let marked = self
            .conn()
            .prepare_cached(
                "UPDATE instances SET state = 'quarantined', last_error = ?2, path = COALESCE(?3, path) WHERE id = ?1",
            )
            .and_then(|mut s| s.execute(params![id, detail, new_rel]))
            .ctx("mark an instance quarantined");
        if let Err(e) = marked {
            return e;
        }
        SpoolError::Corrupt {
            sop_instance_uid: uid.to_owned(),
            path: final_path,
            detail,
        }
    }

    /// Records one outcome, as [`Spool::record_outcomes`] does; a missing row is an error.
    fn record_one(&self, id: InstanceId, outcome: Outcome) -> Result<()> {
        if self.record_outcomes(&[(id, outcome)])?.is_empty() {
            Ok(())
        } else {
            Err(SpoolError::NoSuchRow { id: id.0 })
        }
    }

    /// The upstream confirmed the instance. `redelivery` is true when an earlier attempt may already
    /// have delivered it (counted as a duplicate upstream).
    pub fn mark_sent(&self, id: InstanceId, redelivery: bool) -> Result<()> {
        self.record_one(id, Outcome::Sent { redelivery })
    }

    /// A retryable failure: back to `queued`, attempts + 1, with the next attempt time persisted.
    pub fn mark_retry(
        &self,
        id: InstanceId,
        error: &str,
        next_attempt_at: SystemTime,
    ) -> Result<()> {
        self.record_one(
            id,
            Outcome::Retry {
                error: error.to_string(),
                next_attempt_at,
                refused: false,
            },
        )
    }

    /// A permanent failure: `failed`, kept and visible until the operator re-queues it.
    pub fn mark_failed(&self, id: InstanceId, reason: &str) -> Result<()> {
        self.record_one(
            id,
            Outcome::Failed {
                reason: reason.to_string(),
            },
        )
    }

    /// Back to `queued` without counting an attempt (e.g. the uplink paused or is shutting down).
    pub fn release(&self, id: InstanceId) -> Result<()> {
        self.record_one(id, Outcome::Release)
    }

    /// Of the rows `ids`, just confirmed upstream, the SOP Instance UIDs that the upstream had already
    /// confirmed under other content (another row of that UID, `sent`, with another SHA-256): a new
    /// version, which a PACS may confirm while keeping its first copy (Orthanc does unless its
    /// `OverwriteInstances` is on). STOW-RS answers the same either way, so only the operator can check.
    pub fn confirmed_under_other_content(&self, ids: &[InstanceId]) -> Result<Vec<String>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT a.sop_instance_uid FROM instances a WHERE a.id = ?1 AND EXISTS (
                     SELECT 1 FROM instances b WHERE b.sop_instance_uid = a.sop_instance_uid
                     AND b.id <> a.id AND b.state = 'sent' AND b.sha256 <> a.sha256)",
            )
            .ctx("prepare the earlier-version query")?;
        let mut found = Vec::new();
        for id in ids {
            if let Some(uid) = stmt
                .query_row([id.0], |r| r.get::<_, String>(0))
                .optional()
                .ctx("look for an earlier confirmed version")?
            {
                found.push(uid);
            }
        }
        Ok(found)
    }

    /// Row `id`'s recorded file digest, and whether it is listed for compaction.
    fn digest_and_intake(&self, id: i64) -> Result<(Option<u128>, bool)> {
        let (digest, listed): (Option<Vec<u8>>, bool) = self
            .conn()
            .prepare_cached(
                "SELECT (SELECT xxh3 FROM file_digest WHERE id = ?1),
                        EXISTS (SELECT 1 FROM intake WHERE id = ?1)",
            )
            .and_then(|mut s| s.query_row([id], |r| Ok((r.get(0)?, r.get(1)?))))
            .ctx("read a file's digest")?;
        let digest = digest.and_then(|d| Some(u128::from_le_bytes(d.try_into().ok()?)));
        Ok((digest, listed))
    }

    /// Makes the next [`Spool::open_verified`] of row `id` check its file in full (decompress, SHA-256
    /// against the row) instead of trusting the digest of its stored bytes: for a file that passed
    /// that digest and then failed while it was read. A damaged file is then quarantined, an
    /// unreadable one reported, instead of being retried on the strength of the digest forever.
    pub fn distrust_stored_digest(&self, id: InstanceId) -> Result<()> {
        self.conn()
            .prepare_cached("DELETE FROM file_digest WHERE id = ?1")
            .and_then(|mut s| s.execute([id.0]))
            .ctx("forget a file's stored digest")?;
        Ok(())
    }

    /// Records the outcomes of one upload in a single transaction: one WAL sync for the whole batch
    /// instead of one per instance. This is the one place the upload states change; [`Spool::mark_sent`],
    /// [`Spool::mark_retry`], [`Spool::mark_failed`] and [`Spool::release`] record a single outcome
    /// through it. A row in another state is left alone (with a WARN unless it is already where the
    /// outcome would put it). Either every outcome is recorded or, on an
    /// error, none is. Returns the ids whose rows no longer exist (nothing was recorded for them).
    pub fn record_outcomes(&self, outcomes: &[(InstanceId, Outcome)]) -> Result<Vec<InstanceId>> {
        let now_ms = to_ms(SystemTime::now());
        let mut gone = Vec::new();
        let mut any_sent = false;
        {
            let mut conn = self.conn();
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .ctx("start recording upload outcomes")?;
            for (id, outcome) in outcomes {
                let (action, quiet, changed): (&str, &[&str], _) = match outcome {
                    Outcome::Sent { .. } => (
                        "mark an instance sent",
                        &[SENT],
                        tx.prepare_cached(
                            "UPDATE instances SET state = 'sent', sent_at = ?2 WHERE id = ?1 AND state IN ('queued', 'uploading', 'failed')",
                        )
                        .and_then(|mut s| s.execute(params![id.0, now_ms])),
                    ),
                    Outcome::Retry { error, next_attempt_at, .. } => (
                        "schedule a retry",
                        &[],
                        tx.prepare_cached(
                            "UPDATE instances SET state = 'queued', attempts = attempts + 1, last_error = ?2, next_attempt_at = ?3 WHERE id = ?1 AND state IN ('uploading', 'queued')",
                        )
                        .and_then(|mut s| s.execute(params![id.0, error, to_ms(*next_attempt_at)])),
                    ),
                    Outcome::Failed { reason } => (
                        "mark an instance failed",
                        &[FAILED],
                        tx.prepare_cached(
                            "UPDATE instances SET state = 'failed', attempts = attempts + 1, last_error = ?2 WHERE id = ?1 AND state IN ('uploading', 'queued')",
                        )
                        .and_then(|mut s| s.execute(params![id.0, reason])),
                    ),
                    Outcome::Release => (
                        "release an instance",
                        &[QUEUED],
                        tx.prepare_cached(
                            "UPDATE instances SET state = 'queued' WHERE id = ?1 AND state = 'uploading'",
                        )
                        .and_then(|mut s| s.execute([id.0])),
                    ),
                };
                if changed.ctx(action)? > 0 {
                    match outcome {
                        Outcome::Sent { redelivery } => {
                            any_sent = true;
                            if *redelivery {
                                db::bump_counter(&tx, DUPLICATES_UPSTREAM)?;
                            }
                            forget_refusals(&tx, *id)?;
                        }
                        Outcome::Failed { .. } => forget_refusals(&tx, *id)?,
                        Outcome::Retry { refused: true, .. } => {
                            tx.prepare_cached(
                                "INSERT INTO refusals (id, count) VALUES (?1, 1) ON CONFLICT (id) DO UPDATE SET count = count + 1",
                            )
                            .and_then(|mut s| s.execute([id.0]))
                            .ctx("count a refusal")?;
                        }
                        Outcome::Retry { .. } | Outcome::Release => {}
                    }
                    continue;
                }
                let row = state_and_uid(&tx, *id).ctx(action)?;
                match row {
                    None => gone.push(*id),
                    Some((state, uid)) if !quiet.contains(&state.as_str()) => log::warn!(
                        "Ignored a state change for an instance in another state; nothing was lost. sop_instance_uid={uid} id={} state={state} action={action}",
                        id.0
                    ),
                    Some(_) => {}
                }
            }
            tx.commit().ctx("commit upload outcomes")?;
        }
        if any_sent && self.inner.cfg.retention_hours == 0 {
            let _evicting = self.evicting();
            if let Err(e) = self.evict_stage(EvictStage::Retention(now_ms), now_ms) {
                // The confirmations are recorded; the next eviction pass will free the files.
                log::warn!(
                    "Could not evict confirmed instances right away; they will be evicted at the next pass. If this repeats, check the disk. error={}",
                    error_chain(&e)
                );
            }
        }
        Ok(gone)
    }

    /// Operator action: `failed` rows (all, or those with this SOP Instance UID) go back to `queued`,
    /// due now. A failed version whose UID has a newer version confirmed since stays failed
    /// (`superseded`): sent now, it would reach the PACS after its correction, and a PACS that
    /// overwrites on a second store would go back to the uncorrected image.
    pub fn requeue_failed(&self, sop_instance_uid: Option<&str>) -> Result<Requeued> {
        const SUPERSEDED: &str = "EXISTS (SELECT 1 FROM instances AS newer WHERE newer.sop_instance_uid = instances.sop_instance_uid AND newer.id > instances.id AND newer.state = 'sent')";
        let now = to_ms(SystemTime::now());
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .ctx("re-queue failed instances")?;
        // Failed rows hold no refusals (a failure forgets them); rows failed by an older passerelled
        // may, and a re-queued instance starts again from none.
        tx.execute(
            &format!("DELETE FROM refusals WHERE id IN (SELECT id FROM instances WHERE state = 'failed' AND (?1 IS NULL OR sop_instance_uid = ?1) AND NOT {SUPERSEDED})"),
            params![sop_instance_uid],
        )
        .ctx("re-queue failed instances")?;
        let requeued = tx
            .execute(
                &format!("UPDATE instances SET state = 'queued', attempts = 0, next_attempt_at = ?1 WHERE state = 'failed' AND (?2 IS NULL OR sop_instance_uid = ?2) AND NOT {SUPERSEDED}"),
                params![now, sop_instance_uid],
            )
            .ctx("re-queue failed instances")?;
        let superseded: i64 = tx
            .query_row(
                &format!("SELECT COUNT(*) FROM instances WHERE state = 'failed' AND (?1 IS NULL OR sop_instance_uid = ?1) AND {SUPERSEDED}"),
                params![sop_instance_uid],
                |r| r.get(0),
            )
            .ctx("re-queue failed instances")?;
        tx.commit().ctx("re-queue failed instances")?;
        let report = Requeued {
            requeued: requeued as u64,
            superseded: to_u64(superseded),
        };
        if report.requeued > 0 || report.superseded > 0 {
            log::info!(
                "Re-queued failed instances at the operator's request. count={} superseded_left_failed={} sop_instance_uid={}",
                report.requeued,
                report.superseded,
                sop_instance_uid.unwrap_or("all")
            );
        }
        Ok(report)
    }

    /// The upstream is back: queued instances waiting on a retry schedule become due now, so that a
    /// backlog built up during an outage goes out in full batches instead of trickling out over the
    /// backoff cap. Returns how many rows were brought forward.
    pub fn expedite_retries(&self, now: SystemTime) -> Result<u64> {
        let now = to_ms(now);
        let n = self
            .conn()
            .prepare_cached(
                "UPDATE instances SET next_attempt_at = ?1 WHERE state = 'queued' AND attempts > 0 AND next_attempt_at > ?1",
            )
            .and_then(|mut s| s.execute(params![now]))
            .ctx("bring retries forward")?;
        Ok(n as u64)
    }

    /// Persists how the uplink is doing, for `passerelled status` in another process.
    pub fn set_uplink_state(&self, state: &UplinkState) -> Result<()> {
        self.conn()
            .prepare_cached(
                "UPDATE uplink_state SET paused_until = ?1, last_error = ?2, last_error_at = ?3, last_success_at = ?4 WHERE id = 1",
            )
            .and_then(|mut s| {
                s.execute(params![
                    state.paused_until.map(to_ms),
                    state.last_error,
                    state.last_error_at.map(to_ms),
                    state.last_success_at.map(to_ms),
                ])
            })
            .ctx("save the uplink state")?;
        Ok(())
    }

    /// The last [`UplinkState`] saved (all `None` on a new spool).
    pub fn uplink_state(&self) -> Result<UplinkState> {
        read_uplink_state(&self.conn())
    }

    /// Counts per state and the figures `passerelled status` shows; ages are measured from `now`.
    pub fn status(&self, now: SystemTime) -> Result<StatusReport> {
        let conn = self.conn();
        let mut report = StatusReport::default();
        {
            let mut stmt = conn
                .prepare_cached("SELECT state, COUNT(*) FROM instances GROUP BY state")
                .ctx("count instances per state")?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                .ctx("count instances per state")?;
            for row in rows {
                let (state, n) = row.ctx("count instances per state")?;
                let n = to_u64(n);
                match state.as_str() {
                    QUEUED => report.queued = n,
                    UPLOADING => report.uploading = n,
                    SENT => report.sent = n,
                    FAILED => report.failed = n,
                    LOST => report.lost = n,
                    QUARANTINED => report.quarantined = n,
                    _ => {}
                }
            }
        }
        let (evicted, oldest, stored, raw): (i64, Option<i64>, i64, i64) = conn
            .query_row(
                "SELECT
                    (SELECT COUNT(*) FROM instances WHERE state = 'sent' AND evicted_at IS NOT NULL),
                    (SELECT MIN(received_at) FROM instances WHERE state IN ('queued', 'uploading')),
                    (SELECT COALESCE(SUM(stored_size), 0) FROM instances WHERE state != 'lost' AND evicted_at IS NULL),
                    (SELECT COALESCE(SUM(raw_size), 0) FROM instances WHERE state != 'lost' AND evicted_at IS NULL)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .ctx("summarise the spool")?;
        report.evicted = to_u64(evicted);
        report.oldest_queued_age =
            oldest.map(|t| now.duration_since(from_ms(t)).unwrap_or(Duration::ZERO));
        report.stored_bytes = to_u64(stored);
        report.raw_bytes = to_u64(raw);
        report.awaiting_compaction = conn
            .query_row(
                "SELECT COUNT(*) FROM intake k JOIN instances i ON i.id = k.id
                 WHERE i.state NOT IN ('lost', 'quarantined') AND i.evicted_at IS NULL",
                [],
                |r| r.get(0),
            )
            .map(to_u64)
            .ctx("count intake files")?;
        report.duplicates_received = db::counter(&conn, DUPLICATES_RECEIVED)?;
        report.duplicates_upstream = db::counter(&conn, DUPLICATES_UPSTREAM)?;
        report.uplink = read_uplink_state(&conn)?;
        Ok(report)
    }

    /// The most recent `failed`, `lost` and `quarantined` instances (newest first, at most `limit`),
    /// for `passerelled status`.
    pub fn problems(&self, limit: usize) -> Result<Vec<ProblemInstance>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT id, sop_instance_uid, study_instance_uid, patient_id, calling_ae, state, attempts, last_error, received_at
                 FROM instances WHERE state IN ('failed', 'lost', 'quarantined') ORDER BY id DESC LIMIT ?1",
            )
            .ctx("list instances needing attention")?;
        let rows = stmt
            .query_map([i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
                let state: String = r.get(5)?;
                Ok(ProblemInstance {
                    id: InstanceId(r.get(0)?),
                    sop_instance_uid: r.get(1)?,
                    study_instance_uid: r.get(2)?,
                    patient_id: r.get(3)?,
                    calling_ae: r.get(4)?,
                    state: InstanceState::parse(&state).unwrap_or(InstanceState::Failed),
                    attempts: u32::try_from(r.get::<_, i64>(6)?).unwrap_or(u32::MAX),
                    last_error: r.get(7)?,
                    received_at: from_ms(r.get(8)?),
                })
            })
            .ctx("list instances needing attention")?;
        rows.collect::<rusqlite::Result<_>>()
            .ctx("list instances needing attention")
    }

    /// Evicts confirmed instances whose retention has passed, then (oldest first) as many more as
    /// needed to get `min_free_mb + evict_headroom_mb` free. Never touches unconfirmed instances.
    pub fn evict(&self, now: SystemTime) -> Result<EvictReport> {
        let _evicting = self.evicting();
        self.evict_locked(now)
    }

    fn evicting(&self) -> MutexGuard<'_, ()> {
        self.inner
            .evicting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn evict_locked(&self, now: SystemTime) -> Result<EvictReport> {
        let now_ms = to_ms(now);
        let retention_ms = to_i64(self.inner.cfg.retention_hours.saturating_mul(3_600_000));
        let mut report = self.evict_stage(
            EvictStage::Retention(now_ms.saturating_sub(retention_ms)),
            now_ms,
        )?;
        let target_free = self
            .inner
            .cfg
            .min_free_mb
            .saturating_add(self.inner.cfg.evict_headroom_mb)
            .saturating_mul(MIB);
        if self.free_bytes()? < target_free {
            let more = self.evict_stage(EvictStage::Space { target_free }, now_ms)?;
            report.files += more.files;
            report.bytes += more.bytes;
        }
        Ok(report)
    }

    /// Evicts `sent` rows page by page, oldest `sent_at` first, while `stage` asks for it.
    fn evict_stage(&self, stage: EvictStage, now_ms: i64) -> Result<EvictReport> {
        let mut report = EvictReport::default();
        let (cutoff, target_free) = match stage {
            EvictStage::Retention(cutoff) => (cutoff, None),
            EvictStage::Space { target_free } => (i64::MAX, Some(target_free)),
        };
        let free_before = match target_free {
            Some(_) => self.free_bytes()?,
            None => 0,
        };
        let mut cursor = (i64::MIN, i64::MIN);
        'pages: loop {
            let page = self.evict_page(cutoff, cursor)?;
            let Some(last) = page.last() else { break };
            cursor = (last.sent_at, last.id);
            let mut done = Vec::with_capacity(page.len());
            let mut enough = false;
            for cand in &page {
                if let Some(target) = target_free {
                    if free_before.saturating_add(report.bytes) >= target {
                        enough = true;
                        break;
                    }
                }
                if cand.shared {
                    // Identical bytes are still waiting to be confirmed under another row.
                    done.push(cand.id);
                    continue;
                }
                let path = self.inner.dir.join(&cand.path);
                match fs::remove_file(&path) {
                    Ok(()) => {
                        report.files += 1;
                        report.bytes += cand.stored_size;
                        done.push(cand.id);
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => done.push(cand.id),
                    Err(e) => log::warn!(
                        "Could not evict a confirmed instance from the local cache; it will be tried again. sop_instance_uid={} path={} error={e}",
                        cand.sop_instance_uid,
                        path.display()
                    ),
                }
            }
            if !done.is_empty() {
                let mut conn = self.conn();
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .ctx("record evictions")?;
                {
                    let mut stmt = tx
                        .prepare_cached(
                            "UPDATE instances SET evicted_at = ?2 WHERE id = ?1 AND state = 'sent'",
                        )
                        .ctx("record evictions")?;
                    for id in &done {
                        stmt.execute(params![id, now_ms]).ctx("record evictions")?;
                    }
                }
                tx.commit().ctx("record evictions")?;
            }
            if enough {
                break 'pages;
            }
        }
        if report.files > 0 {
            log::info!(
                "Evicted confirmed instances from the local cache. reason={} files={} bytes={}",
                match stage {
                    EvictStage::Retention(_) => "retention",
                    EvictStage::Space { .. } => "free_space",
                },
                report.files,
                report.bytes
            );
        }
        Ok(report)
    }

    fn evict_page(&self, cutoff: i64, after: (i64, i64)) -> Result<Vec<EvictCandidate>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT i.id, i.sop_instance_uid, i.path, i.stored_size, i.sent_at,
                    EXISTS (SELECT 1 FROM instances o
                            WHERE o.sop_instance_uid = i.sop_instance_uid AND o.path = i.path
                              AND o.id != i.id AND o.state IN ('queued', 'uploading', 'failed'))
                 FROM instances i INDEXED BY instances_cache
                 WHERE i.state = 'sent' AND i.evicted_at IS NULL AND i.sent_at <= ?1
                   AND (i.sent_at, i.id) > (?2, ?3)
                 ORDER BY i.sent_at, i.id
                 LIMIT ?4",
            )
            .ctx("list evictable instances")?;
        let rows = stmt
            .query_map(params![cutoff, after.0, after.1, EVICT_PAGE], |r| {
                Ok(EvictCandidate {
                    id: r.get(0)?,
                    sop_instance_uid: r.get(1)?,
                    path: r.get(2)?,
                    stored_size: to_u64(r.get(3)?),
                    sent_at: r.get(4)?,
                    shared: r.get(5)?,
                })
            })
            .ctx("list evictable instances")?;
        rows.collect::<rusqlite::Result<_>>()
            .ctx("list evictable instances")
    }
}

/// The database is missing: no file, or an empty file with no WAL that could hold its pages.
fn index_missing(db_path: &Path) -> bool {
    match fs::metadata(db_path) {
        Err(_) => true,
        Ok(m) => {
            let mut wal = db_path.as_os_str().to_owned();
            wal.push("-wal");
            m.len() == 0 && !Path::new(&wal).exists()
        }
    }
}

/// Turns SQLite's "not a database" and "corrupt" errors into [`SpoolError::IndexDamaged`].
pub(crate) fn damaged(e: SpoolError, db_path: &Path) -> SpoolError {
    match &e {
        SpoolError::Database {
            source: rusqlite::Error::SqliteFailure(f, _),
            ..
        } if matches!(
            f.code,
            rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt
        ) =>
        {
            SpoolError::IndexDamaged {
                path: db_path.to_path_buf(),
                detail: e.to_string() + ": " + &f.to_string(),
            }
        }
        _ => e,
    }
}

fn read_uplink_state(conn: &Connection) -> Result<UplinkState> {
    conn.prepare_cached(
        "SELECT paused_until, last_error, last_error_at, last_success_at FROM uplink_state WHERE id = 1",
    )
    .and_then(|mut s| {
        s.query_row([], |r| {
            Ok(UplinkState {
                paused_until: r.get::<_, Option<i64>>(0)?.map(from_ms),
                last_error: r.get(1)?,
                last_error_at: r.get::<_, Option<i64>>(2)?.map(from_ms),
                last_success_at: r.get::<_, Option<i64>>(3)?.map(from_ms),
            })
        })
        .optional()
    })
    .ctx("read the uplink state")
    .map(Option::unwrap_or_default)
}

/// An instance being received. Dropping it without [`Incoming::finish`] removes the temporary file.
pub struct Incoming {
    // Field order matters: the encoder (and its file) drop before the guard removes (or empties)
    // the file.
    encoder: rawframe::RawFrameWriter<File>,
    /// `None`: the caller hashes (`Spool::begin_hashed_by_caller`).
    hasher: Option<Sha256>,
    raw_len: u64,
    header_len: u64,
    /// File offset up to which disk writes were started (`write_behind`).
    written_back: u64,
    /// The leading elements, found as the dataset streams in.
    scan: leading::StreamScan,
    meta: IncomingMeta,
    spool: Spool,
    guard: pool::Target,
}

impl Incoming {
    /// Appends dataset bytes (as received in the data PDVs) to the zstd stream and the hash, and
    /// scans them for the leading elements.
    pub fn write_all(&mut self, dataset_bytes: &[u8]) -> Result<()> {
        self.write_raw(dataset_bytes)?;
        self.scan.feed(dataset_bytes);
        Ok(())
    }

    /// Appends bytes to the zstd stream and the hash.
    fn write_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.encoder
            .write_all(bytes)
            .map_err(|source| SpoolError::Write {
                path: self.guard.path().to_path_buf(),
                source,
            })?;
        if let Some(hasher) = &mut self.hasher {
            hasher.update(bytes);
        }
        self.raw_len += bytes.len() as u64;
        self.write_behind();
        Ok(())
    }

    /// Starts the disk writes of what reached the file since the last call, without waiting for
    /// them, so that the fdatasync before the acknowledgement has little left to write. (Linux's
    /// `POSIX_FADV_DONTNEED` starts writeback of the range's dirty pages.) Best effort: a failure
    /// only means the fdatasync does all the work.
    fn write_behind(&mut self) {
        use std::os::fd::AsRawFd;
        // Every byte goes straight to the file: the writer's count is the file's end, no lseek.
        let end = self.encoder.written();
        if end < self.written_back + WRITE_BEHIND {
            return;
        }
        let (Ok(offset), Ok(len)) = (
            i64::try_from(self.written_back),
            i64::try_from(end - self.written_back),
        ) else {
            return;
        };
        if nix::fcntl::posix_fadvise(
            self.encoder.get_ref().as_raw_fd(),
            offset,
            len,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .is_ok()
        {
            self.written_back = end;
        }
    }

    /// Bytes written so far (header included).
    pub fn raw_len(&self) -> u64 {
        self.raw_len
    }

    /// Ends the zstd stream of an instance begun with [`Spool::begin`]. The file is complete but
    /// not yet fsynced nor in place.
    pub fn finish(self) -> Result<Written> {
        self.finish_inner(None)
    }

    /// [`Incoming::finish`] for an instance begun with [`Spool::begin_hashed_by_caller`]: `digest`
    /// is the caller's hash of the same bytes.
    pub fn finish_with(self, digest: RawDigest) -> Result<Written> {
        self.finish_inner(Some(digest))
    }

    fn finish_inner(self, digest: Option<RawDigest>) -> Result<Written> {
        let Incoming {
            encoder,
            hasher,
            raw_len,
            header_len,
            written_back: _,
            scan,
            meta,
            spool,
            guard,
        } = self;
        let refuse = |detail: String| SpoolError::Digest {
            sop_instance_uid: meta.sop_instance_uid.clone(),
            detail,
        };
        let sha256 = match (hasher, digest) {
            (Some(hasher), None) => hasher.finalize(),
            (None, Some(digest)) if digest.len == raw_len => digest.hasher.finalize(),
            (None, Some(digest)) => {
                return Err(refuse(format!(
                    "the caller hashed {} bytes, the spool wrote {raw_len}",
                    digest.len
                )))
            }
            (Some(_), Some(_)) => {
                return Err(refuse(
                    "the spool hashed the bytes itself, yet the caller passed a digest".into(),
                ))
            }
            (None, None) => {
                return Err(refuse(
                    "the caller was to hash the bytes, yet passed no digest".into(),
                ))
            }
        };
        let write_err = |source| SpoolError::Write {
            path: guard.path().to_path_buf(),
            source,
        };
        let (file, stored_digest) = encoder.finish().map_err(write_err)?;
        let stored_len = file.metadata().map_err(write_err)?.len();
        Ok(Written {
            file,
            stored_digest,
            sha256: hex::encode(sha256),
            raw_len,
            header_len,
            leading: scan.finish(),
            stored_len,
            meta,
            spool,
            guard,
        })
    }
}

/// The SHA-256 of an instance's raw Part-10 bytes, computed by the caller that holds the bytes
/// before the spool writes them, so that hashing runs beside the writing instead of before it
/// (see [`Spool::begin_hashed_by_caller`]). It counts the bytes it saw: [`Incoming::finish_with`]
/// refuses a digest of another length than the file, so that a missed or repeated chunk can never
/// name a file by a wrong hash.
#[derive(Debug, Clone)]
pub struct RawDigest {
    hasher: Sha256,
    len: u64,
}

impl RawDigest {
    /// A digest that has seen `part10_header`, the bytes the spool writes first.
    pub fn new(part10_header: &[u8]) -> Self {
        let mut digest = RawDigest {
            hasher: Sha256::new(),
            len: 0,
        };
        digest.update(part10_header);
        digest
    }

    /// Hashes the next dataset bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
    }
}

/// A fully written temporary file. Dropping it without [`Written::commit`] removes it.
pub struct Written {
    file: File,
    /// The XXH3-128 of the file's bytes, as written (`file_digest`).
    stored_digest: u128,
    sha256: String,
    raw_len: u64,
    header_len: u64,
    /// What the streaming scan found (`None`: the leading elements did not fit its prefix).
    leading: Option<std::result::Result<leading::Leading, String>>,
    stored_len: u64,
    meta: IncomingMeta,
    spool: Spool,
    guard: pool::Target,
}

impl Written {
    /// The dataset's leading elements (the inner `Err` says why the dataset cannot be understood).
    /// They were found as the bytes streamed in; only when they did not fit in the first
    /// [`leading::PREFIX_CAP`] bytes is the file read back (decompressed, up to what the parser
    /// needs). The outer `Err` is a failure to read the file back.
    pub fn leading(&mut self) -> Result<std::result::Result<leading::Leading, String>> {
        if let Some(found) = self.leading.take() {
            return Ok(found);
        }
        log::debug!(
            "The leading elements did not fit in the first bytes kept while receiving; reading them back from the spool file. sop_instance_uid={}",
            self.meta.sop_instance_uid
        );
        let reader = self.dataset_reader()?;
        Ok(leading::parse_leading_caught(
            reader,
            &self.meta.transfer_syntax_uid,
        ))
    }

    /// Reads the dataset bytes back (decompressed, after the Part-10 header), for leading-element
    /// parsing. Callers read only what they need.
    pub fn dataset_reader(&self) -> Result<Box<dyn Read + Send + '_>> {
        let path = self.guard.path();
        let read_err = |source| SpoolError::Read {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(read_err)?;
        let mut decoder = zstd::stream::read::Decoder::new(file).map_err(read_err)?;
        let skipped = io::copy(&mut (&mut decoder).take(self.header_len), &mut io::sink())
            .map_err(read_err)?;
        if skipped != self.header_len {
            return Err(read_err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the temporary file is shorter than its Part-10 header",
            )));
        }
        Ok(Box::new(decoder))
    }

    /// Size of the raw Part-10 bytes (header + dataset).
    pub fn raw_len(&self) -> u64 {
        self.raw_len
    }

    /// The SHA-256 (hex) of the raw Part-10 bytes.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Makes the instance durable, then queues it. Only after this returns `Ok` may a success
    /// response be sent. A pooled file (`pool`): fdatasync, then the row in a `synchronous=NORMAL`
    /// commit (the file itself is the durable record until the WAL is synced). A temporary file:
    /// fdatasync, rename into place, fsync the directory, then the row in a `FULL` commit.
    pub fn commit(self, index: InstanceIndex) -> Result<StoreOutcome> {
        let Written {
            file,
            stored_digest,
            sha256,
            raw_len,
            header_len: _,
            leading: _,
            stored_len,
            meta,
            spool,
            guard,
        } = self;
        // fdatasync, not fsync: it forces the data and every piece of metadata needed to read it back
        // (the file's size and block allocation, which a freshly written file always changes); it
        // skips only the timestamps, which nothing here relies on.
        file.sync_data().map_err(|source| SpoolError::Sync {
            path: guard.path().to_path_buf(),
            source,
        })?;
        drop(file);
        let new = NewRow {
            meta: &meta,
            index: &index,
            sha256: &sha256,
            raw_len,
            stored_len,
            stored_digest,
        };
        let (id, previous) = match guard {
            pool::Target::Pooled(slot) => match spool.commit_pooled(&new, slot)? {
                Committed::Row(id, previous) => (id, previous),
                Committed::Duplicate(id) => return Ok(StoreOutcome::Duplicate { id }),
            },
            pool::Target::Temp(guard) => match spool.commit_renamed(&new, guard)? {
                Committed::Row(id, previous) => (id, previous),
                Committed::Duplicate(id) => return Ok(StoreOutcome::Duplicate { id }),
            },
        };
        spool.stored_now();
        Ok(new.outcome(id, previous))
    }
}

/// An instance about to get its row.
struct NewRow<'a> {
    meta: &'a IncomingMeta,
    index: &'a InstanceIndex,
    sha256: &'a str,
    raw_len: u64,
    stored_len: u64,
    stored_digest: u128,
}

/// The newest earlier row under the same SOP Instance UID: (id, sha256, state).
type Previous = Option<(i64, String, String)>;

enum Committed {
    Row(i64, Previous),
    Duplicate(InstanceId),
}

impl NewRow<'_> {
    /// Inserts the row (queued, due now) and its `intake` entry; returns its id and the earlier row.
    fn insert(&self, tx: &rusqlite::Transaction<'_>, rel: &str) -> Result<(i64, Previous)> {
        let (meta, index, uid) = (self.meta, self.index, self.meta.sop_instance_uid.as_str());
        let previous: Previous = tx
            .prepare_cached(
                "SELECT id, sha256, state FROM instances WHERE sop_instance_uid = ?1 ORDER BY id DESC LIMIT 1",
            )
            .and_then(|mut s| s.query_row([uid], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).optional())
            .ctx("look up earlier versions")?;
        tx.prepare_cached(
            "INSERT INTO instances (sop_instance_uid, sop_class_uid, study_instance_uid, series_instance_uid,
                patient_id, modality, accession_number, calling_ae, transfer_syntax_uid, raw_size,
                stored_size, sha256, path, received_at, state, attempts, next_attempt_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, 'queued', 0, ?14)",
        )
        .and_then(|mut s| {
            s.execute(params![
                uid,
                meta.sop_class_uid,
                index.study_instance_uid,
                index.series_instance_uid,
                index.patient_id,
                index.modality,
                index.accession_number,
                meta.calling_ae,
                meta.transfer_syntax_uid,
                to_i64(self.raw_len),
                to_i64(self.stored_len),
                self.sha256,
                rel,
                to_ms(SystemTime::now()),
            ])
        })
        .ctx("insert an instance row")?;
        let id = tx.last_insert_rowid();
        // The file is an intake file: the compactor rewrites it at the configured level.
        tx.prepare_cached("INSERT INTO intake (id) VALUES (?1)")
            .and_then(|mut s| s.execute([id]))
            .ctx("list an intake file")?;
        self.record_digest(tx, id)?;
        Ok((id, previous))
    }

    /// Records this file's digest as row `id`'s: the file is now at the row's path.
    fn record_digest(&self, tx: &rusqlite::Transaction<'_>, id: i64) -> Result<()> {
        tx.prepare_cached("INSERT OR REPLACE INTO file_digest (id, xxh3) VALUES (?1, ?2)")
            .and_then(|mut s| s.execute(params![id, self.stored_digest.to_le_bytes()]))
            .ctx("record a spool file's digest")
            .map(drop)
    }

    /// Logs the new row and says what it is.
    fn outcome(&self, id: i64, previous: Previous) -> StoreOutcome {
        let meta = self.meta;
        let uid = meta.sop_instance_uid.as_str();
        log::debug!(
            "Spooled instance. sop_instance_uid={uid} calling_ae={} id={id} raw_bytes={} stored_bytes={}",
            meta.calling_ae,
            self.raw_len,
            self.stored_len
        );
        match previous {
            Some((prev, prev_sha, _)) if prev_sha != self.sha256 => {
                log::warn!(
                    "Received different content under a SOP Instance UID already held; both versions are kept and the new one is queued. sop_instance_uid={uid} calling_ae={} peer={} id={id} previous_id={prev} sha256={} previous_sha256={prev_sha}",
                    meta.calling_ae,
                    meta.peer,
                    self.sha256
                );
                StoreOutcome::NewVersion {
                    id: InstanceId(id),
                    previous: InstanceId(prev),
                }
            }
            Some((prev, _, state)) => {
                log::warn!(
                    "Received again an instance whose earlier copy was {state}; the new copy is queued. sop_instance_uid={uid} calling_ae={} id={id} previous_id={prev}",
                    meta.calling_ae
                );
                StoreOutcome::Stored { id: InstanceId(id) }
            }
            None => StoreOutcome::Stored { id: InstanceId(id) },
        }
    }
}

impl Spool {
    /// The row of an instance written into a pooled file (already fdatasynced, its name durable
    /// since the pool was filled): one `synchronous=NORMAL` transaction takes the file off the
    /// pool and inserts the row. A duplicate gives the file back to the pool (emptied).
    fn commit_pooled(&self, new: &NewRow<'_>, mut slot: pool::Slot) -> Result<Committed> {
        let uid = new.meta.sop_instance_uid.as_str();
        let committed = db::with_normal_sync(&mut self.conn(), |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .ctx("start storing an instance")?;
            let committed = match find_duplicate(&tx, uid, new.sha256)? {
                // The held copy is unconfirmed and its file has gone: this copy takes its place.
                Some((id, true)) if !self.row_file_exists(&tx, id)? => {
                    log::warn!(
                        "The spool file of a queued instance was missing; an identical copy just received replaces it. sop_instance_uid={uid} id={id} path={}",
                        slot.path.display()
                    );
                    tx.prepare_cached(
                        "UPDATE instances SET path = ?2, stored_size = ?3 WHERE id = ?1",
                    )
                    .and_then(|mut s| s.execute(params![id, slot.rel, to_i64(new.stored_len)]))
                    .ctx("point a row at its new file")?;
                    tx.prepare_cached("INSERT OR IGNORE INTO intake (id) VALUES (?1)")
                        .and_then(|mut s| s.execute([id]))
                        .ctx("list an intake file")?;
                    new.record_digest(&tx, id)?;
                    Committed::Duplicate(InstanceId(id))
                }
                Some((id, _)) => {
                    db::bump_counter(&tx, DUPLICATES_RECEIVED)?;
                    tx.commit().ctx("count a duplicate")?;
                    // The slot is dropped armed: emptied and back in the pool.
                    return Ok(Committed::Duplicate(InstanceId(id)));
                }
                None => {
                    let (id, previous) = new.insert(&tx, &slot.rel)?;
                    Committed::Row(id, previous)
                }
            };
            tx.prepare_cached("DELETE FROM pool WHERE path = ?1")
                .and_then(|mut s| s.execute([&slot.rel]))
                .ctx("take a pre-created file")?;
            crash_point!("spool::commit::before_row");
            tx.commit().ctx("commit an instance row")?;
            slot.disarm();
            Ok(committed)
        })?;
        if let Committed::Duplicate(id) = &committed {
            log_duplicate(new.meta, id.0);
        }
        Ok(committed)
    }

    /// Whether row `id`'s file is on disk.
    pub(crate) fn row_file_exists(&self, conn: &Connection, id: i64) -> Result<bool> {
        let rel: String = conn
            .prepare_cached("SELECT path FROM instances WHERE id = ?1")
            .and_then(|mut s| s.query_row([id], |r| r.get(0)))
            .ctx("read an instance row")?;
        Ok(self.inner.dir.join(rel).exists())
    }

    /// The row of an instance written into a temporary file: rename it into place (content-
    /// addressed), fsync the directory, then the row in a `FULL` commit.
    fn commit_renamed(&self, new: &NewRow<'_>, mut guard: TempGuard) -> Result<Committed> {
        let (meta, sha256) = (new.meta, new.sha256);
        let uid = meta.sop_instance_uid.as_str();
        let fan = sha256.get(..2).unwrap_or("00");
        let subdir = self.inner.objects_dir.join(fan);
        let mut rel = format!("objects/{fan}/{sha256}.dcm.zst");
        let mut own_name = false;

        // An identical re-send: answer success, keep nothing (the guard removes the temp file)...
        let duplicate = {
            let conn = self.conn();
            let held = find_duplicate(&conn, uid, sha256)?;
            // An older version holds these bytes at their content-addressed name (a copy of it
            // received after a newer version): this row gets a file of its own, so that evicting
            // the older row never takes this one's file.
            if held.is_none() && path_has_row(&conn, uid, &rel)? {
                rel = format!("objects/{fan}/{:032x}.dcm.zst", rand::random::<u128>());
                own_name = true;
            }
            match held {
                // ...unless the held copy is unconfirmed and its file has gone: then this copy
                // takes its place (below) instead of the instance turning up lost later.
                Some((id, true)) if !self.row_file_exists(&conn, id)? => {
                    log::warn!(
                        "The spool file of a queued instance was missing; an identical copy just received replaces it. sop_instance_uid={uid} id={id} path={}",
                        self.inner.dir.join(&rel).display()
                    );
                    None
                }
                Some((id, _)) => {
                    db::bump_counter(&conn, DUPLICATES_RECEIVED)?;
                    Some(id)
                }
                None => None,
            }
        };
        if let Some(id) = duplicate {
            drop(guard);
            log_duplicate(meta, id);
            return Ok(Committed::Duplicate(InstanceId(id)));
        }
        let target = self.inner.dir.join(&rel);

        // Into place: content-addressed, durable before the row exists.
        if files::create_dir(&subdir)? {
            files::fsync_dir(&self.inner.objects_dir)?;
        }
        // Renaming over an existing file of the same name is harmless: same name, same content (a
        // file left by a crash between rename and row, or a concurrent identical commit), though
        // not always the same bytes (raw blocks follow how the PDVs came): a row already naming
        // this path gets this file's digest below.
        fs::rename(&guard.path, &target).map_err(|source| SpoolError::Write {
            path: target.clone(),
            source,
        })?;
        guard.disarm();
        files::fsync_dir(&subdir)?;
        crash_point!("spool::commit::before_row");

        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .ctx("start storing an instance")?;
        if let Some((id, unconfirmed)) = find_duplicate(&tx, uid, sha256)? {
            // A concurrent identical commit won the race, or this copy restored a missing file
            // (whose row may name another path: point it at this one).
            if unconfirmed && !self.row_file_exists(&tx, id)? {
                tx.prepare_cached("UPDATE instances SET path = ?2 WHERE id = ?1")
                    .and_then(|mut s| s.execute(params![id, rel]))
                    .ctx("point a row at its new file")?;
            }
            let held_path: String = tx
                .prepare_cached("SELECT path FROM instances WHERE id = ?1")
                .and_then(|mut s| s.query_row([id], |r| r.get(0)))
                .ctx("read an instance row")?;
            if held_path == rel {
                new.record_digest(&tx, id)?;
            } else if own_name {
                // A name of its own that no row will name: not left behind.
                if let Err(e) = fs::remove_file(&target) {
                    log::warn!(
                        "Could not remove the spool file of a copy found to be a duplicate; it stays unused until rebuild-index. path={} error={e}",
                        target.display()
                    );
                }
            }
            db::bump_counter(&tx, DUPLICATES_RECEIVED)?;
            tx.prepare_cached("INSERT OR IGNORE INTO intake (id) VALUES (?1)")
                .and_then(|mut s| s.execute([id]))
                .ctx("list an intake file")?;
            tx.commit().ctx("count a duplicate")?;
            log_duplicate(meta, id);
            return Ok(Committed::Duplicate(InstanceId(id)));
        }
        let (id, previous) = new.insert(&tx, &rel)?;
        tx.commit().ctx("commit an instance row")?;
        Ok(Committed::Row(id, previous))
    }
}

/// The row already holding these exact bytes under this UID, if it is the newest version held of
/// that UID (lost and quarantined rows do not count). Also says whether that row is still
/// unconfirmed (so its file must exist). A copy of an older version's bytes, received after a newer
/// version (a modality sending its original again after a correction), is not a duplicate: it is
/// kept as the newest version and sent last, so that a PACS that overwrites ends with what the
/// modality sent last.
/// The state and SOP Instance UID of row `id`, if the row exists.
/// Makes queued rows scheduled more than [`MAX_SCHEDULE`] after `now` due at `now`, with a WARN:
/// no retry is ever scheduled that far ahead, so the clock was wrong when they were set, or went
/// back since (NTP correcting a clock that ran ahead). Without this they would wait for the clock to
/// catch up, months perhaps. Costs one indexed lookup when there is nothing to do.
fn reschedule_implausible(conn: &Connection, now: i64) -> Result<usize> {
    let limit = now.saturating_add(to_i64(MAX_SCHEDULE.as_millis() as u64));
    let latest: Option<i64> = conn
        .prepare_cached("SELECT MAX(next_attempt_at) FROM instances WHERE state = 'queued'")
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .ctx("look for retries scheduled implausibly late")?;
    if latest.is_none_or(|latest| latest <= limit) {
        return Ok(0);
    }
    let rescheduled = conn
        .prepare_cached(
            "UPDATE instances SET next_attempt_at = ?1 WHERE state = 'queued' AND next_attempt_at > ?2",
        )
        .and_then(|mut s| s.execute(params![now, limit]))
        .ctx("reschedule instances due implausibly late")?;
    log::warn!(
        "Found queued instances scheduled more than {} days ahead, set while the system clock was wrong or before it went back; they are due now. Check the system clock (NTP). count={rescheduled}",
        MAX_SCHEDULE.as_secs() / 86_400
    );
    Ok(rescheduled)
}

/// An instance confirmed or failed no longer needs its count of refusals.
fn forget_refusals(conn: &Connection, id: InstanceId) -> Result<()> {
    conn.prepare_cached("DELETE FROM refusals WHERE id = ?1")
        .and_then(|mut s| s.execute([id.0]))
        .ctx("forget an instance's refusals")?;
    Ok(())
}

fn state_and_uid(conn: &Connection, id: InstanceId) -> rusqlite::Result<Option<(String, String)>> {
    conn.prepare_cached("SELECT state, sop_instance_uid FROM instances WHERE id = ?1")
        .and_then(|mut s| {
            s.query_row([id.0], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })
}

fn find_duplicate(conn: &Connection, uid: &str, sha256: &str) -> Result<Option<(i64, bool)>> {
    let newest: Option<(i64, bool, bool)> = conn
        .prepare_cached(
            "SELECT id, sha256 = ?2, state IN ('queued', 'uploading', 'failed') FROM instances WHERE sop_instance_uid = ?1 AND state NOT IN ('lost', 'quarantined') ORDER BY id DESC LIMIT 1",
        )
        .and_then(|mut s| {
            s.query_row([uid, sha256], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()
        })
        .ctx("look up duplicates")?;
    Ok(newest.and_then(|(id, same, unconfirmed)| same.then_some((id, unconfirmed))))
}

/// Whether a row of `uid` names `rel` as its file (a content-addressed name holds bytes that carry
/// their UID, so only that UID's rows can name it).
fn path_has_row(conn: &Connection, uid: &str, rel: &str) -> Result<bool> {
    conn.prepare_cached("SELECT 1 FROM instances WHERE sop_instance_uid = ?1 AND path = ?2 LIMIT 1")
        .and_then(|mut s| s.query_row([uid, rel], |_| Ok(())).optional())
        .map(|found| found.is_some())
        .ctx("look up a file's row")
}

fn log_duplicate(meta: &IncomingMeta, id: i64) {
    log::info!(
        "Received an identical copy of an instance already held; answered success without queueing it again. sop_instance_uid={} calling_ae={} peer={} id={id}",
        meta.sop_instance_uid,
        meta.calling_ae,
        meta.peer
    );
}

/// The raw Part-10 bytes of a verified spool file, decompressed as they are read.
pub struct InstanceReader {
    decoder: zstd::stream::read::Decoder<'static, BufReader<File>>,
    len: u64,
    read: u64,
    verified: Verified,
}

/// How [`Spool::open_verified`] checked a file before handing out its reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    /// The stored bytes match the XXH3-128 the compactor recorded when it wrote them
    /// (after checking their content against the row's SHA-256).
    StoredDigest,
    /// The file was decompressed and its content's SHA-256 and length match the row.
    Content,
}

impl InstanceReader {
    fn new(file: File, len: u64, verified: Verified) -> io::Result<InstanceReader> {
        Ok(InstanceReader {
            decoder: zstd::stream::read::Decoder::new(file)?,
            len,
            read: 0,
            verified,
        })
    }

    /// How the file was checked.
    pub fn verified(&self) -> Verified {
        self.verified
    }

    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Read for InstanceReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.decoder.read(buf)?;
        self.read += n as u64;
        // The file was verified, but it is read a second time: never let a changed length through.
        if self.read > self.len || (n == 0 && !buf.is_empty() && self.read != self.len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the spool file changed after verification: expected {} bytes, read {}",
                    self.len, self.read
                ),
            ));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests;

/// A duration in whole milliseconds, the unit of the database's times.
fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
