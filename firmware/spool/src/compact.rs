//! Compaction: recompressing intake files at the configured zstd level, off the acknowledgement path.
//!
//! Ingest writes each instance as an *intake* file: a zstd frame of raw blocks ([`crate::rawframe`]),
//! the bytes as received behind 3-byte block headers, but a complete, checksummed
//! zstd stream like any other spool file. The row is listed in the `intake` table, in the same
//! transaction that inserts it. [`Spool::compact_batch`] (the daemon's low-priority compactor
//! thread) then rewrites each listed file at `spool.zstd_level`:
//!
//! 1. read the file, verifying its SHA-256 against the row while recompressing into `tmp/`;
//! 2. fdatasync the new file;
//! 3. holding the eviction lock (so that an eviction pass never deletes a path the compactor is about
//!    to write), check the row still wants its file, rename the new file over the old one (same
//!    name, same bytes) and fsync the directory;
//! 4. record the new stored size and the new file's XXH3-128 (table `file_digest`), and remove the
//!    `intake` row, in one transaction.
//!
//! A crash at any point leaves at the row's path either the intake file or the compacted one, both
//! whole (the rename is atomic); before step 4 the row is still listed and is compacted again. The
//! row's path never changes, so the uplink, eviction and `rebuild-index` need not know about it, and
//! a reader that opened the intake file keeps reading it after the rename. An older passerelled
//! (rolled back) ignores the `intake` table and reads intake files as the zstd streams they are.
//! A file it cannot read stays an intake file, off the list, with a WARN (compaction only saves
//! space; one bad file must not stop the others), and a copy is started only while the free space
//! stays above `spool.min_free_mb` with it.
//!
//! The digest replaces the one ingest recorded for the intake file (see `rawframe`). It lets
//! [`Spool::open_verified`] check a file by hashing its stored bytes (XXH3, several GB/s) instead of
//! decompressing it and hashing the content with SHA-256 before decompressing it again to send it:
//! the compactor verified the content while writing exactly those bytes, and ingest hashed the
//! bytes it wrote from the very buffers whose SHA-256 names the row. A file that does not match its
//! digest (or has none) gets the full check.

use std::fs::File;
use std::io::{self, BufReader, BufWriter};
use std::path::Path;
use std::time::{Duration, Instant};

use rusqlite::{params, OptionalExtension};

use crate::db::{to_i64, to_u64, DbContext, LOST, QUARANTINED};
use crate::files::{self, HashOutcome, TempGuard};
use crate::{crash_point, Result, Spool, SpoolError};

/// What one [`Spool::compact_batch`] call did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CompactReport {
    /// Files rewritten at the configured level.
    pub compacted: u64,
    /// Rows taken off the list without rewriting: evicted, lost or quarantined meanwhile, or whose
    /// file is missing or does not match its row (the uplink's verification deals with those).
    pub skipped: u64,
    /// Bytes on disk before and after, over the compacted files.
    pub bytes_before: u64,
    pub bytes_after: u64,
}

/// One listed row as the compactor sees it.
struct Pending {
    id: i64,
    uid: String,
    path: String,
    sha256: String,
    raw_size: u64,
    stored_size: u64,
}

enum Rewrite {
    /// The new file is written and fdatasynced; the guard removes it unless it is renamed.
    Ready {
        tmp: TempGuard,
        stored: u64,
        digest: u128,
    },
    /// The row no longer needs compaction (or cannot be compacted); take it off the list.
    Drop(&'static str),
}

/// How long ingest must have paused before the compactor works (unless the backlog is too big).
pub const COMPACT_AFTER_PAUSE: Duration = Duration::from_secs(1);
/// Intake bytes beyond which the compactor works even while instances arrive...
const BACKLOG_LIMIT: u64 = 2 * 1024 * 1024 * 1024;
/// ...or beyond this share of the free space (1/8).
const BACKLOG_FREE_SHARE: u64 = 8;
/// While instances arrive, the backlog (a sum over the intake list, which holds the connection for
/// as long as it runs) is measured again at most this often.
const BACKLOG_RECHECK: Duration = Duration::from_secs(5);

/// The last backlog verdict while ingest was busy, and when it was reached.
pub(crate) type BacklogVerdict = std::sync::Mutex<Option<(Instant, bool)>>;

impl Spool {
    /// Records that an instance was just stored (the compactor waits for a pause in ingest).
    pub(crate) fn stored_now(&self) {
        *self
            .inner
            .last_store
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// Whether the compactor should work now: ingest has paused for `COMPACT_AFTER_PAUSE`, or
    /// intake files take more than 2 GiB or an eighth of the free space (then compaction competes
    /// with ingest for the CPU, so that the disk does not fill with uncompressed files; measured at
    /// most every 5 s while instances arrive).
    pub fn compaction_due(&self) -> Result<bool> {
        let last = *self
            .inner
            .last_store
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= COMPACT_AFTER_PAUSE) {
            return Ok(true);
        }
        let mut verdict = self
            .inner
            .backlog_verdict
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some((at, due)) = *verdict {
            if at.elapsed() < BACKLOG_RECHECK {
                return Ok(due);
            }
        }
        let backlog: i64 = self
            .conn()
            .query_row(
                "SELECT COALESCE(SUM(i.stored_size), 0) FROM intake k JOIN instances i ON i.id = k.id",
                [],
                |r| r.get(0),
            )
            .ctx("measure the intake backlog")?;
        let backlog = to_u64(backlog);
        let due = backlog >= BACKLOG_LIMIT || backlog >= self.free_bytes()? / BACKLOG_FREE_SHARE;
        *verdict = Some((Instant::now(), due));
        Ok(due)
    }

    /// Recompresses up to `max` intake files at the configured zstd level (see the module
    /// documentation). Returns what it did; `compacted + skipped == 0` means nothing is waiting.
    /// Only the process owning the spool (the daemon) calls this.
    pub fn compact_batch(&self, max: usize) -> Result<CompactReport> {
        let pending = self.pending_compaction(max)?;
        let mut report = CompactReport::default();
        let reserve = self.inner.cfg.min_free_mb.saturating_mul(files::MIB);
        for p in pending {
            // The copy needs room beside the original until the rename: never out of the reserve
            // that keeps ingest answering (a disk this full is eviction's business, not ours).
            if self.free_bytes()? < reserve.saturating_add(p.stored_size) {
                log::debug!(
                    "Compaction waits for free space: a copy of the next intake file would go below spool.min_free_mb. sop_instance_uid={} stored_bytes={}",
                    p.uid,
                    p.stored_size
                );
                break;
            }
            match self.rewrite(&p)? {
                Rewrite::Drop(why) => {
                    log::debug!(
                        "Left a spool file as it is; it no longer needs compaction. sop_instance_uid={} id={} reason={why}",
                        p.uid,
                        p.id
                    );
                    self.unlist(p.id, None)?;
                    report.skipped += 1;
                }
                Rewrite::Ready {
                    mut tmp,
                    stored,
                    digest,
                } => {
                    let target = self.inner.dir.join(&p.path);
                    let placed = {
                        let _evicting = self.evicting();
                        if self.still_wanted(p.id)? {
                            std::fs::rename(&tmp.path, &target).map_err(|source| {
                                SpoolError::Write {
                                    path: target.clone(),
                                    source,
                                }
                            })?;
                            tmp.disarm();
                            if let Some(parent) = target.parent() {
                                files::fsync_dir(parent)?;
                            }
                            crash_point!("spool::compact::before_row");
                            true
                        } else {
                            false
                        }
                    };
                    if placed {
                        self.unlist(p.id, Some((stored, digest)))?;
                        report.compacted += 1;
                        report.bytes_before += p.stored_size;
                        report.bytes_after += stored;
                    } else {
                        self.unlist(p.id, None)?;
                        report.skipped += 1;
                    }
                }
            }
        }
        Ok(report)
    }

    /// Instances whose file is still an intake file (and still held), oldest first.
    fn pending_compaction(&self, max: usize) -> Result<Vec<Pending>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT i.id, i.sop_instance_uid, i.path, i.sha256, i.raw_size, i.stored_size
                 FROM intake k JOIN instances i ON i.id = k.id ORDER BY k.id LIMIT ?1",
            )
            .ctx("list intake files")?;
        let rows = stmt
            .query_map([to_i64(max as u64)], |r| {
                Ok(Pending {
                    id: r.get(0)?,
                    uid: r.get(1)?,
                    path: r.get(2)?,
                    sha256: r.get(3)?,
                    raw_size: to_u64(r.get(4)?),
                    stored_size: to_u64(r.get(5)?),
                })
            })
            .ctx("list intake files")?;
        // (Rows are never deleted from `instances`, so every listed id has its row.)
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .ctx("list intake files")
    }

    /// Whether row `id` still owns its file: not evicted, lost or quarantined.
    fn still_wanted(&self, id: i64) -> Result<bool> {
        let row: Option<(String, Option<i64>)> = self
            .conn()
            .prepare_cached("SELECT state, evicted_at FROM instances WHERE id = ?1")
            .and_then(|mut s| s.query_row([id], |r| Ok((r.get(0)?, r.get(1)?))).optional())
            .ctx("read an instance row")?;
        Ok(matches!(row, Some((state, None)) if state != LOST && state != QUARANTINED))
    }

    /// Takes row `id` off the intake list, recording its new stored size and file digest if it was
    /// compacted.
    fn unlist(&self, id: i64, compacted: Option<(u64, u128)>) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction().ctx("start recording a compaction")?;
        if let Some((stored, digest)) = compacted {
            tx.prepare_cached("UPDATE instances SET stored_size = ?2 WHERE id = ?1")
                .and_then(|mut s| s.execute(params![id, to_i64(stored)]))
                .ctx("record a compacted size")?;
            tx.prepare_cached("INSERT OR REPLACE INTO file_digest (id, xxh3) VALUES (?1, ?2)")
                .and_then(|mut s| s.execute(params![id, digest.to_le_bytes()]))
                .ctx("record a compacted file's digest")?;
        }
        tx.prepare_cached("DELETE FROM intake WHERE id = ?1")
            .and_then(|mut s| s.execute([id]))
            .ctx("take a row off the intake list")?;
        tx.commit().ctx("record a compaction")
    }

    /// Writes the compacted copy of `p`'s file into `tmp/`, verifying the content on the way.
    fn rewrite(&self, p: &Pending) -> Result<Rewrite> {
        if !self.still_wanted(p.id)? {
            return Ok(Rewrite::Drop("no longer held"));
        }
        let source_path = self.inner.dir.join(&p.path);
        let source = match File::open(&source_path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(Rewrite::Drop("file missing"))
            }
            Err(source) => return Ok(unreadable(p, &source_path, &source)),
        };
        // The file's modification time is when it was received: rebuild-index orders the versions
        // of one SOP Instance UID by it, so the copy keeps it (best effort).
        let received = source.metadata().and_then(|m| m.modified()).ok();
        let (out, tmp) = files::create_temp(&self.inner.tmp_dir, "compact")?;
        let write_err = |source| SpoolError::Write {
            path: tmp.path.clone(),
            source,
        };
        let mut encoder = zstd::stream::write::Encoder::new(
            BufWriter::with_capacity(crate::WRITE_BUFFER, files::DigestWriter::new(out)),
            self.inner.cfg.zstd_level,
        )
        .map_err(write_err)?;
        encoder.include_checksum(true).map_err(write_err)?;
        let source = BufReader::with_capacity(crate::WRITE_BUFFER, source);
        match files::hash_decompressed_into(source, &mut encoder) {
            HashOutcome::Ok { sha256, len } if sha256 == p.sha256 && len == p.raw_size => {}
            HashOutcome::Ok { .. } => return Ok(Rewrite::Drop("content does not match its row")),
            HashOutcome::ReadFailed(source) => return Ok(unreadable(p, &source_path, &source)),
            // Damaged content is the uplink's verification's business (it quarantines the file).
            HashOutcome::Undecodable(_) => return Ok(Rewrite::Drop("content unreadable")),
            HashOutcome::WriteFailed(source) => return Err(write_err(source)),
        }
        let (file, digest) = encoder
            .finish()
            .map_err(write_err)?
            .into_inner()
            .map_err(|e| write_err(e.into_error()))?
            .finish();
        let stored = file.metadata().map_err(write_err)?.len();
        if let Some(at) = received {
            if let Err(e) = file.set_modified(at) {
                log::debug!(
                    "Could not keep a compacted spool file's time of receipt; a rebuilt index may order its versions by file name. path={} error={e}",
                    tmp.path.display()
                );
            }
        }
        file.sync_data().map_err(|source| SpoolError::Sync {
            path: tmp.path.clone(),
            source,
        })?;
        Ok(Rewrite::Ready {
            tmp,
            stored,
            digest,
        })
    }
}

/// An intake file the compactor cannot read stays as it is (compaction only saves space) and off
/// the list, so that the files after it are still compacted; the uplink verifies it before sending.
fn unreadable(p: &Pending, path: &Path, error: &io::Error) -> Rewrite {
    log::warn!(
        "Could not read a spool file to compact it; it stays stored as received and the files after it are compacted. Check the disk (dmesg, SMART); the uplink verifies the file before sending it and quarantines it if it is damaged. sop_instance_uid={} path={} error={error}",
        p.uid,
        path.display()
    );
    Rewrite::Drop("unreadable")
}
