//! The durable spool: every instance a modality sends lives here, compressed at rest, from the moment
//! it is acknowledged until the regional PACS has confirmed it.
//!
//! # Background
//! A C-STORE success response is a promise to the modality that it may delete its copy. The spool is
//! what keeps that promise through crashes, power cuts, upstream outages, full disks and updates.
//!
//! # Design
//! - One file per instance under `objects/`, named by the SHA-256 of its raw Part-10 bytes and
//!   compressed with zstd (with the zstd frame checksum on). The file holds the Part-10 header that
//!   ingest built (preamble, `DICM`, group 0002) followed by the dataset bytes exactly as received.
//! - One SQLite database (`spool.db`, WAL, `synchronous=FULL`) with a row per instance and its state:
//!   `queued → uploading → sent` (or back to `queued` with a persisted `next_attempt_at`, or to
//!   `failed`), plus `lost` (file missing at start-up) and `quarantined` (hash mismatch).
//! - Storing is: write a temporary file, fsync it, rename it into place, fsync the directory, then
//!   commit the row. Only after [`Written::commit`] returns may ingest answer success.
//! - Recovery at [`Spool::open`]: temp files are removed, rows left `uploading` go back to `queued`,
//!   and a row whose file is missing is logged as an ERROR and marked `lost` (counted, never dropped).
//!
//! # Invariants
//! - Only this crate opens the SQLite database or deletes a spool file.
//! - An unconfirmed instance (`queued`, `uploading`, `failed`) is never evicted or deleted.
//! - A file whose SHA-256 does not match its row is never handed to the uplink.
//!
//! # Limitations
//! All calls are blocking (std I/O and rusqlite); async callers use `spawn_blocking`.

mod error;

pub use error::{Result, SpoolError};

use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

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
    NewVersion { id: InstanceId, previous: InstanceId },
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
}

/// What [`Spool::open`] found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub temp_files_removed: u64,
    pub uploading_requeued: u64,
    /// SOP Instance UIDs whose file was missing (now `lost`).
    pub lost: Vec<String>,
}

/// What an eviction pass removed from the confirmed cache.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EvictReport {
    pub files: u64,
    pub bytes: u64,
}

/// The spool. Cheap to clone; safe to share between threads.
#[derive(Clone)]
pub struct Spool {
    _todo: (),
}

impl Spool {
    /// Opens (creating if needed) the spool under `cfg.dir`, then runs recovery.
    pub fn open(cfg: &passerelle_config::SpoolConfig) -> Result<(Spool, RecoveryReport)> {
        let _ = cfg;
        todo!()
    }

    /// The spool directory.
    pub fn dir(&self) -> PathBuf {
        todo!()
    }

    /// Ensures at least `min_free_mb` is free, evicting confirmed cache (oldest first) if needed.
    /// Returns [`SpoolError::DiskFull`] when that is not enough; nothing unconfirmed is ever touched.
    pub fn ensure_space(&self) -> Result<()> {
        todo!()
    }

    /// Starts receiving an instance: creates a temporary file and writes `part10_header` (preamble,
    /// `DICM`, group 0002, built by ingest) into its zstd stream.
    pub fn begin(&self, meta: IncomingMeta, part10_header: &[u8]) -> Result<Incoming> {
        let _ = (meta, part10_header);
        todo!()
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
        let _ = (max_count, max_bytes, now);
        todo!()
    }

    /// When the next queued instance becomes due (None if nothing is queued).
    pub fn next_due(&self) -> Result<Option<SystemTime>> {
        todo!()
    }

    /// Verifies the instance's SHA-256 against its row, then returns a reader of its raw Part-10 bytes.
    /// On a mismatch or a zstd error the file is moved to `quarantine/`, the row becomes `quarantined`,
    /// an ERROR is logged, and [`SpoolError::Corrupt`] is returned: corrupt bytes are never sent.
    pub fn open_verified(&self, inst: &QueuedInstance) -> Result<InstanceReader> {
        let _ = inst;
        todo!()
    }

    /// The upstream confirmed the instance. `redelivery` is true when an earlier attempt may already
    /// have delivered it (counted as a duplicate upstream).
    pub fn mark_sent(&self, id: InstanceId, redelivery: bool) -> Result<()> {
        let _ = (id, redelivery);
        todo!()
    }

    /// A retryable failure: back to `queued`, attempts + 1, with the next attempt time persisted.
    pub fn mark_retry(&self, id: InstanceId, error: &str, next_attempt_at: SystemTime) -> Result<()> {
        let _ = (id, error, next_attempt_at);
        todo!()
    }

    /// A permanent failure: `failed`, kept and visible until the operator re-queues it.
    pub fn mark_failed(&self, id: InstanceId, reason: &str) -> Result<()> {
        let _ = (id, reason);
        todo!()
    }

    /// Back to `queued` without counting an attempt (e.g. the uplink paused or is shutting down).
    pub fn release(&self, id: InstanceId) -> Result<()> {
        let _ = id;
        todo!()
    }

    /// Operator action: `failed` rows (all, or the one with this SOP Instance UID) go back to `queued`,
    /// due now. Returns how many were re-queued.
    pub fn requeue_failed(&self, sop_instance_uid: Option<&str>) -> Result<u64> {
        let _ = sop_instance_uid;
        todo!()
    }

    pub fn set_uplink_state(&self, state: &UplinkState) -> Result<()> {
        let _ = state;
        todo!()
    }

    pub fn uplink_state(&self) -> Result<UplinkState> {
        todo!()
    }

    pub fn status(&self, now: SystemTime) -> Result<StatusReport> {
        let _ = now;
        todo!()
    }

    /// Evicts confirmed instances whose retention has passed, then (oldest first) as many more as
    /// needed to get `min_free_mb + evict_headroom_mb` free. Never touches unconfirmed instances.
    pub fn evict(&self, now: SystemTime) -> Result<EvictReport> {
        let _ = now;
        todo!()
    }
}

/// An instance being received. Dropping it without [`Incoming::finish`] removes the temporary file.
pub struct Incoming {
    _todo: (),
}

impl Incoming {
    /// Appends dataset bytes (as received in the data PDVs) to the zstd stream and the hash.
    pub fn write_all(&mut self, dataset_bytes: &[u8]) -> Result<()> {
        let _ = dataset_bytes;
        todo!()
    }

    /// Ends the zstd stream. The file is complete but not yet fsynced nor in place.
    pub fn finish(self) -> Result<Written> {
        todo!()
    }
}

/// A fully written temporary file. Dropping it without [`Written::commit`] removes it.
pub struct Written {
    _todo: (),
}

impl Written {
    /// Reads the dataset bytes back (decompressed, after the Part-10 header), for leading-element
    /// parsing. Callers read only what they need.
    pub fn dataset_reader(&self) -> Result<Box<dyn Read + Send + '_>> {
        todo!()
    }

    /// Size of the raw Part-10 bytes (header + dataset).
    pub fn raw_len(&self) -> u64 {
        todo!()
    }

    /// fsync the file, rename it into place, fsync the directory, commit the row. Only after this
    /// returns `Ok` may a success response be sent.
    pub fn commit(self, index: InstanceIndex) -> Result<StoreOutcome> {
        let _ = index;
        todo!()
    }
}

/// The raw Part-10 bytes of a verified spool file, decompressed as they are read.
pub struct InstanceReader {
    _todo: (),
}

impl InstanceReader {
    pub fn len(&self) -> u64 {
        todo!()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Read for InstanceReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let _ = buf;
        todo!()
    }
}
