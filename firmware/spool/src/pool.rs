//! Pre-created spool files: one fsync on the acknowledgement path instead of three.
//!
//! Storing through a temporary file costs, after the data's fdatasync, a rename, an fsync of the
//! directory (to make the new name durable) and an fsync of the WAL (to make the row durable). The
//! pool removes both: a filler thread creates empty files ahead, in place under `objects/<xx>/`
//! (named `<32 hex>.dcm.zst`), fsyncs their directory, lists them in the `pool` table and fsyncs
//! the WAL after releasing the connection (so an instance's commit never waits behind that fsync);
//! only then are they free for ingest. Ingest writes an instance straight into a pooled file, fdatasyncs it
//! (its name is already durable), and commits the row, the `intake` entry and the pool entry's
//! removal in one transaction with `synchronous=NORMAL`: written to the WAL, not yet fsynced.
//!
//! That row becomes durable with the next fsync of the WAL (any later `FULL` commit, a checkpoint)
//! or is rebuilt from its file: a power cut may lose the transaction, never the file. At start-up
//! ([`Spool::recover_pool`]) every pooled file that is not empty was written after its row was
//! lost or before its C-STORE ended: a complete zstd stream whose Part-10 header and leading
//! elements read back becomes a `queued` row (unless an identical instance is held: then it was a
//! duplicate), anything else was never acknowledged (the frame checksum makes a partial file
//! unreadable) and the file is emptied for reuse. The pool entry and the row change in one
//! transaction, so a file is never both pooled and an instance's.
//!
//! With the pool empty (the filler behind, a full disk), ingest falls back to the temporary file,
//! rename and `FULL` commit: slower, the same guarantee.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::MutexGuard;
use std::time::Duration;

use rusqlite::params;

use crate::db::QUEUED;
use crate::db::{self, to_i64, to_ms, DbContext};
use crate::files::{self, TempGuard};
use crate::{rebuild, Result, Spool, SpoolError};

/// The filler tops the pool up when fewer files than this are free (deep enough for a burst of
/// four associations while the filler, at the lowest CPU priority, waits for a core)...
pub(crate) const POOL_LOW: usize = 64;
/// ...by this many files at a time, in one directory (one directory fsync, one commit).
pub(crate) const POOL_BATCH: usize = 64;
/// At most this many files in the pool.
const POOL_MAX: usize = 192;

/// Empty files created for the pool, in place and durably named, not yet listed nor free (see
/// [`Spool::create_pool_batch`]). They count towards the pool until listed or dropped, so that
/// batches on their way to the listing are not made again. Dropped unlisted, they stay empty and
/// unused: start-up and `rebuild-index` ignore or remove empty unlisted files.
pub struct PoolBatch {
    created: Vec<String>,
    spool: Spool,
}

impl Drop for PoolBatch {
    fn drop(&mut self) {
        self.spool
            .inner
            .free
            .pending
            .fetch_sub(self.created.len(), Ordering::AcqRel);
    }
}

/// The pooled files not taken, and a condition the filler waits on.
#[derive(Default)]
pub(crate) struct Free {
    paths: std::sync::Mutex<Vec<String>>,
    low: std::sync::Condvar,
    /// Files created, not yet listed (in a [`PoolBatch`]).
    pending: AtomicUsize,
}

/// Where an instance being received is written.
pub(crate) enum Target {
    /// A temporary file in `tmp/`, renamed into place at commit.
    Temp(TempGuard),
    /// A pooled file, already in place under `objects/`.
    Pooled(Slot),
}

impl Target {
    pub(crate) fn path(&self) -> &Path {
        match self {
            Target::Temp(guard) => &guard.path,
            Target::Pooled(slot) => &slot.path,
        }
    }
}

/// A pooled file taken by an instance being received. Dropped without [`Slot::disarm`] (the
/// instance was refused, failed, or was a duplicate), it is emptied and goes back to the pool.
pub(crate) struct Slot {
    pub(crate) rel: String,
    pub(crate) path: PathBuf,
    spool: Spool,
    armed: bool,
}

impl Slot {
    pub(crate) fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        match empty_file(&self.path) {
            Ok(()) => self.spool.free().push(self.rel.clone()),
            // Left out of the free list; the next start empties it (or takes it in, if whole).
            Err(e) => log::warn!(
                "Could not empty a pre-created spool file after an instance was not kept; it is set aside until the next start. path={} error={e}",
                self.path.display()
            ),
        }
    }
}

/// Truncates a pooled file to nothing, durably (a whole stale instance left in it would be taken
/// in at the next start).
fn empty_file(path: &Path) -> io::Result<()> {
    let file = OpenOptions::new().write(true).open(path)?;
    file.set_len(0)?;
    file.sync_data()
}

impl Spool {
    fn free(&self) -> MutexGuard<'_, Vec<String>> {
        self.inner
            .free
            .paths
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Files free or on their way to the listing (see [`PoolBatch`]), given the free list.
    fn stocked(&self, free: &[String]) -> usize {
        free.len() + self.inner.free.pending.load(Ordering::Acquire)
    }

    /// Takes a pooled file for an instance, if one is free (and wakes the filler when few are).
    pub(crate) fn take_pooled(&self) -> Option<Slot> {
        let (rel, low) = {
            let mut free = self.free();
            let rel = free.pop()?;
            (rel, self.stocked(&free) < POOL_LOW)
        };
        if low {
            self.inner.free.low.notify_one();
        }
        Some(Slot {
            path: self.inner.dir.join(&rel),
            rel,
            spool: self.clone(),
            armed: true,
        })
    }

    /// Whether fewer than the low-water number of pre-created files are free or being listed.
    pub fn pool_low(&self) -> bool {
        self.stocked(&self.free()) < POOL_LOW
    }

    /// Waits until the pool runs low or `timeout` passes (the filler thread's idle wait).
    pub fn wait_pool_low(&self, timeout: Duration) {
        let free = self.free();
        if self.stocked(&free) < POOL_LOW {
            return;
        }
        let _ = self
            .inner
            .free
            .low
            .wait_timeout_while(free, timeout, |f| self.stocked(f) >= POOL_LOW);
    }

    /// Tops the pool up (one batch of empty files, see the module documentation) when it runs low.
    /// Returns how many files it created. Only the process owning the spool calls this.
    pub fn refill_pool(&self) -> Result<usize> {
        match self.create_pool_batch()? {
            Some(batch) => self.list_pool_batch(batch),
            None => Ok(0),
        }
    }

    /// The first half of [`Spool::refill_pool`], which takes no lock: when the pool runs low,
    /// creates one batch of empty files in one directory and fsyncs it. The files are not free for
    /// ingest until [`Spool::list_pool_batch`] has listed them durably. `None`: not low, or the disk
    /// is at its reserve.
    ///
    /// The daemon runs this half at the lowest CPU priority: on a file system that skips recently
    /// freed inodes (ext4 without a journal), one file creation can take a millisecond of kernel
    /// time, and a batch of them must never delay an acknowledgement.
    pub fn create_pool_batch(&self) -> Result<Option<PoolBatch>> {
        let have = self.stocked(&self.free());
        if have >= POOL_LOW {
            return Ok(None);
        }
        // Never fill the disk's last reserve with empty files (they take an inode each).
        if self.free_bytes()? < self.inner.cfg.min_free_mb.saturating_mul(files::MIB) {
            return Ok(None);
        }
        let want = POOL_BATCH.min(POOL_MAX - have);
        let fan = format!("{:02x}", rand::random::<u8>());
        let dir = self.inner.objects_dir.join(&fan);
        // Made at start-up; if it was not, its name must be durable before the files in it are.
        if files::create_dir(&dir)? {
            files::fsync_dir(&self.inner.objects_dir)?;
        }
        let mut created = Vec::with_capacity(want);
        for _ in 0..want {
            let rel = format!("objects/{fan}/{:032x}.dcm.zst", rand::random::<u128>());
            let path = self.inner.dir.join(&rel);
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|source| SpoolError::Write { path, source })?;
            created.push(rel);
        }
        files::fsync_dir(&dir)?;
        self.inner
            .free
            .pending
            .fetch_add(created.len(), Ordering::AcqRel);
        Ok(Some(PoolBatch {
            created,
            spool: self.clone(),
        }))
    }

    /// The second half of [`Spool::refill_pool`]: lists a created batch in the `pool` table, makes
    /// the listing durable, and frees the files for ingest. Returns how many. It holds the
    /// database connection for the commit, so the daemon runs it at normal priority (a thread at
    /// the lowest one, preempted while holding the connection, would stall every store).
    pub fn list_pool_batch(&self, batch: PoolBatch) -> Result<usize> {
        let created = &batch.created;
        // The listing must be durable before ingest writes into these files (a whole instance in a
        // file listed nowhere would be lost at the next start). A `FULL` commit would fsync the WAL
        // with the connection locked, and the instance being acknowledged meanwhile would wait for
        // it: commit with `NORMAL` and fsync the WAL once the lock is released.
        db::with_normal_sync(&mut self.conn(), |conn| {
            let tx = conn.transaction().ctx("start listing pre-created files")?;
            for rel in created {
                tx.prepare_cached("INSERT INTO pool (path) VALUES (?1)")
                    .and_then(|mut s| s.execute([rel]))
                    .ctx("list a pre-created file")?;
            }
            tx.commit().ctx("list pre-created files")
        })?;
        db::sync_wal(&self.inner.dir.join("spool.db"))?;
        let n = created.len();
        self.free().extend(created.iter().cloned());
        // Dropping the batch takes its files off the pending count, now that they are free.
        drop(batch);
        Ok(n)
    }

    /// Start-up (owner only): takes in the whole instances found in pooled files, empties the rest,
    /// and loads the free list. See the module documentation.
    pub(crate) fn recover_pool(&self) -> Result<u64> {
        let listed: Vec<String> = {
            let conn = self.conn();
            let mut stmt = conn
                .prepare("SELECT path FROM pool ORDER BY path")
                .ctx("list pre-created files")?;
            let rows = stmt
                .query_map([], |r| r.get(0))
                .ctx("list pre-created files")?;
            rows.collect::<rusqlite::Result<_>>()
                .ctx("list pre-created files")?
        };
        let mut free = Vec::new();
        let mut taken_in = Vec::new();
        let mut gone = Vec::new();
        for rel in listed {
            let path = self.inner.dir.join(&rel);
            let len = match fs::metadata(&path) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    gone.push(rel);
                    continue;
                }
                Err(source) => return Err(SpoolError::Read { path, source }),
            };
            if len == 0 {
                free.push(rel);
                continue;
            }
            match rebuild::scan_file(&path) {
                Ok(scanned) if scanned.damage.is_none() => taken_in.push((rel, path, scanned)),
                Err(rebuild::ScanError::Read(e)) => {
                    // A disk error, not a partial file: leave it listed for the next start.
                    log::error!(
                        "Could not read a pre-created spool file at start-up; it is left as it is and read again at the next start. Check the disk. path={} error={e}",
                        path.display()
                    );
                }
                // Cut short before its end: never acknowledged (its fdatasync comes before the
                // response). Empty it for reuse, and say so: the operator can match it to a
                // modality's failed or unanswered C-STORE.
                damaged => {
                    let (uid, detail) = match damaged {
                        Ok(scanned) => {
                            (scanned.sop_instance_uid, scanned.damage.unwrap_or_default())
                        }
                        Err(rebuild::ScanError::Corrupt(detail)) => (String::new(), detail),
                        Err(rebuild::ScanError::Read(e)) => (String::new(), e.to_string()),
                    };
                    log::warn!(
                        "A pre-created spool file held an incomplete instance at start-up: it was being received when the daemon stopped, before its acknowledgement. It is emptied for reuse; the modality resends what it did not see acknowledged. sop_instance_uid={uid} path={} bytes={len} detail=\"{detail}\"",
                        path.display()
                    );
                    empty_file(&path).map_err(|source| SpoolError::Write {
                        path: path.clone(),
                        source,
                    })?;
                    free.push(rel);
                }
            }
        }
        // In the order they were received (their modification time), so that two versions of one
        // SOP Instance UID get their rows, and go out, in that order.
        taken_in.sort_by_cached_key(|(rel, path, _)| (rebuild::modified(path), rel.clone()));
        let mut recovered = 0;
        {
            let mut conn = self.conn();
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .ctx("start recovering pre-created files")?;
            for rel in &gone {
                tx.prepare_cached("DELETE FROM pool WHERE path = ?1")
                    .and_then(|mut s| s.execute([rel]))
                    .ctx("forget a missing pre-created file")?;
            }
            for (rel, path, scanned) in &taken_in {
                tx.prepare_cached("DELETE FROM pool WHERE path = ?1")
                    .and_then(|mut s| s.execute([rel]))
                    .ctx("take in a pre-created file")?;
                let held = crate::find_duplicate(&tx, &scanned.sop_instance_uid, &scanned.sha256)?;
                if let Some((id, true)) = held {
                    if !self.row_file_exists(&tx, id)? {
                        // The held copy's file had gone and this copy was replacing it (the
                        // transaction that said so was lost): it takes its place now.
                        tx.prepare_cached("UPDATE instances SET path = ?2 WHERE id = ?1")
                            .and_then(|mut s| s.execute(params![id, rel]))
                            .ctx("point a row at its new file")?;
                        tx.prepare_cached("INSERT OR IGNORE INTO intake (id) VALUES (?1)")
                            .and_then(|mut s| s.execute([id]))
                            .ctx("list an intake file")?;
                        // The recorded digest is the missing file's: this one's content is
                        // checked in full before it is sent.
                        tx.prepare_cached("DELETE FROM file_digest WHERE id = ?1")
                            .and_then(|mut s| s.execute([id]))
                            .ctx("forget a missing file's digest")?;
                        recovered += 1;
                        continue;
                    }
                }
                if let Some((id, _)) = held {
                    // Never remove a file a row names (a database restored from an older copy of
                    // this spool could list a file both ways): only the pool entry goes.
                    let named: bool = tx
                        .prepare_cached("SELECT EXISTS (SELECT 1 FROM instances WHERE path = ?1)")
                        .and_then(|mut s| s.query_row([rel], |r| r.get(0)))
                        .ctx("look up a file's row")?;
                    if named {
                        continue;
                    }
                    // Held already: this copy was a duplicate whose file was not emptied yet.
                    log::info!(
                        "A pre-created spool file held a second copy of an instance already queued; it is removed. sop_instance_uid={} id={id} path={}",
                        scanned.sop_instance_uid,
                        path.display()
                    );
                    fs::remove_file(path).map_err(|source| SpoolError::Write {
                        path: path.clone(),
                        source,
                    })?;
                    continue;
                }
                let received = to_ms(rebuild::modified(path));
                tx.prepare_cached(
                    "INSERT INTO instances (sop_instance_uid, sop_class_uid, study_instance_uid, series_instance_uid,
                        patient_id, modality, accession_number, calling_ae, transfer_syntax_uid, raw_size,
                        stored_size, sha256, path, received_at, state, attempts, next_attempt_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, 0, ?14)",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        scanned.sop_instance_uid,
                        scanned.sop_class_uid,
                        scanned.index.study_instance_uid,
                        scanned.index.series_instance_uid,
                        scanned.index.patient_id,
                        scanned.index.modality,
                        scanned.index.accession_number,
                        scanned.calling_ae,
                        scanned.transfer_syntax_uid,
                        to_i64(scanned.raw_size),
                        to_i64(fs::metadata(path).map(|m| m.len()).unwrap_or(0)),
                        scanned.sha256,
                        rel,
                        received,
                        QUEUED,
                    ])
                })
                .ctx("take in a pre-created file")?;
                tx.prepare_cached("INSERT INTO intake (id) VALUES (?1)")
                    .and_then(|mut s| s.execute([tx.last_insert_rowid()]))
                    .ctx("list an intake file")?;
                log::warn!(
                    "Queued an instance found whole in a pre-created spool file: it was received whole just before the stop and its queue row had not reached the disk (acknowledged, or refused for a reason found after it was written, such as a UID mismatch; either way it is forwarded, and the PACS keeps one copy). sop_instance_uid={} path={}",
                    scanned.sop_instance_uid,
                    path.display()
                );
                recovered += 1;
            }
            tx.commit().ctx("recover pre-created files")?;
        }
        *self.free() = free;
        Ok(recovered)
    }
}

/// Whether a spool file's name is a pooled file's (`<32 hex>.dcm.zst`), not a SHA-256.
pub(crate) fn is_pooled_name(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".dcm.zst"))
        .is_some_and(|stem| stem.len() == 32 && stem.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Opens a taken pooled file for writing (it is empty).
pub(crate) fn open_slot(slot: &Slot) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .open(&slot.path)
        .map_err(|source| SpoolError::Write {
            path: slot.path.clone(),
            source,
        })
}
