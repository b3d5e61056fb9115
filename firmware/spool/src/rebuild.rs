//! Rebuilding the index (`spool.db`) from the spool files, after the database was lost or damaged.
//!
//! Every spool file is a zstd stream of the raw Part-10 bytes, named by their SHA-256 (or, for a
//! pre-created file from the `pool`, by a random 128-bit number). Its file
//! meta group carries the SOP Class and Instance UIDs, the transfer syntax and the calling AE title
//! (Source AE, 0002,0016); the leading elements of the dataset carry the study, series, patient,
//! modality and accession number ([`crate::leading`], the parser ingest uses). Parsing stops at the
//! first top-level element after (0020,000E), so pixel data is never read into memory; the rest of
//! the stream only goes through the hash.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use dicom_object::meta::FileMetaTable;
use sha2::{Digest, Sha256};

use crate::leading::parse_leading_caught;
use crate::InstanceIndex;

/// What one spool file says about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Scanned {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub transfer_syntax_uid: String,
    pub calling_ae: String,
    pub index: InstanceIndex,
    /// Why the dataset's leading elements could not be read (the row is still rebuilt from the
    /// file meta group, with empty index fields).
    pub index_problem: Option<String>,
    pub sha256: String,
    pub raw_size: u64,
    /// The content after the file meta group could not be read to its end (the UIDs above are
    /// still known, so the quarantined row can name the instance).
    pub damage: Option<String>,
}

/// A row to rebuild: a spool file and what it says about itself (`None` when even its file meta
/// group is unreadable).
pub(crate) struct Rebuilt {
    pub path: PathBuf,
    pub scanned: Option<Scanned>,
    pub sha256: String,
    /// `queued` or `quarantined`.
    pub state: &'static str,
    /// Kept as the row's `last_error`.
    pub note: String,
}

/// Hashes and counts every byte read through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    len: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}

/// Why a spool file cannot be taken back into the queue.
#[derive(Debug)]
pub(crate) enum ScanError {
    /// The disk failed to read it: not a content problem, the file is left alone.
    Read(io::Error),
    /// The content is damaged (zstd error, hash mismatch, no Part-10 header).
    Corrupt(String),
}

/// Reads a spool file once, streaming: the file meta group, the leading elements, and the SHA-256
/// and length of the whole decompressed content.
pub(crate) fn scan_file(path: &Path) -> Result<Scanned, ScanError> {
    let file = File::open(path).map_err(ScanError::Read)?;
    let mut tracked = crate::files::TrackingReader::new(file);
    let result = scan_stream(&mut tracked);
    match (result, tracked.io_error) {
        (Err(ScanError::Corrupt(detail)), Some(kind)) => {
            Err(ScanError::Read(io::Error::new(kind, detail)))
        }
        (other, _) => other,
    }
}

fn scan_stream(file: impl Read) -> Result<Scanned, ScanError> {
    let decoder = zstd::stream::read::Decoder::new(file)
        .map_err(|e| ScanError::Corrupt(format!("zstd stream unreadable ({e})")))?;
    let mut stream = Hashing {
        inner: decoder,
        hasher: Sha256::new(),
        len: 0,
    };
    let mut preamble = [0u8; 128];
    stream
        .read_exact(&mut preamble)
        .map_err(|e| ScanError::Corrupt(format!("no Part-10 preamble ({e})")))?;
    let meta = FileMetaTable::from_reader(&mut stream)
        .map_err(|e| ScanError::Corrupt(format!("no readable Part-10 file meta group ({e})")))?;
    let mut scanned = Scanned {
        sop_class_uid: meta.media_storage_sop_class_uid().to_owned(),
        sop_instance_uid: meta.media_storage_sop_instance_uid().to_owned(),
        transfer_syntax_uid: meta.transfer_syntax().to_owned(),
        calling_ae: meta
            .source_application_entity_title()
            .unwrap_or_default()
            .trim()
            .to_owned(),
        ..Scanned::default()
    };
    // Whatever the parser reads ahead has gone through the hash; the rest is hashed below.
    match parse_leading_caught(&mut stream, &scanned.transfer_syntax_uid) {
        Ok(leading) => scanned.index = leading.index,
        Err(problem) => scanned.index_problem = Some(problem),
    }
    // The rest of the content (pixel data) only goes through the hash.
    if let Err(e) = io::copy(&mut stream, &mut io::sink()) {
        scanned.damage = Some(format!("zstd stream unreadable ({e})"));
    }
    scanned.sha256 = hex::encode(stream.hasher.finalize());
    scanned.raw_size = stream.len;
    Ok(scanned)
}

/// Every `objects/<xx>/<sha256>.dcm.zst` file, in the order they were received: by modification
/// time (ingest writes a file once, the compactor keeps its time), then path (deterministic
/// rebuilds). Rows are inserted in this order, and claims send the versions of one SOP Instance UID
/// in row order, so that a PACS that overwrites ends with the latest.
pub(crate) fn object_files(objects_dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for fan in fs::read_dir(objects_dir)? {
        let fan = fan?;
        if !fan.file_type()?.is_dir() {
            continue;
        }
        for entry in fs::read_dir(fan.path())? {
            let entry = entry?;
            let name = entry.file_name();
            if entry.file_type()?.is_file() && name.to_string_lossy().ends_with(".dcm.zst") {
                out.push((entry.metadata()?.modified()?, entry.path()));
            }
        }
    }
    out.sort();
    Ok(out.into_iter().map(|(_, path)| path).collect())
}

/// Every `quarantine/*.dcm.zst` file, sorted by path.
pub(crate) fn quarantine_files(quarantine_dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(quarantine_dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() && entry.file_name().to_string_lossy().ends_with(".dcm.zst")
        {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

/// The SHA-256 a spool or quarantine file is named by (`<sha256>.dcm.zst`, `<id>-<sha256>.dcm.zst`,
/// `rebuild-<sha256>.dcm.zst`).
pub(crate) fn named_sha256(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name.trim_end_matches(".dcm.zst");
    stem.rsplit('-').next().unwrap_or(stem).to_owned()
}

/// True when `objects/` holds at least one spool file (stops at the first one).
pub(crate) fn any_object_file(objects_dir: &Path) -> io::Result<bool> {
    let Ok(fans) = fs::read_dir(objects_dir) else {
        return Ok(false);
    };
    for fan in fans {
        let fan = fan?;
        if !fan.file_type()?.is_dir() {
            continue;
        }
        for entry in fs::read_dir(fan.path())? {
            let entry = entry?;
            // Empty files are pre-created ones (`pool`) never written: they hold no instance.
            if entry.file_name().to_string_lossy().ends_with(".dcm.zst")
                && entry.metadata()?.len() > 0
            {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// The modification time of a file, as the best guess of when it was received.
pub(crate) fn modified(path: &Path) -> SystemTime {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| SystemTime::now())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{IncomingMeta, InstanceState, RebuildReport, Spool, SpoolError, StoreOutcome};
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::{tags, uids};
    use dicom_object::{meta::FileMetaTableBuilder, InMemDicomObject};
    use dicom_transfer_syntax_registry::entries;
    use passerelle_config::SpoolConfig;

    const TS: &str = uids::EXPLICIT_VR_LITTLE_ENDIAN;

    fn cfg(dir: &Path) -> SpoolConfig {
        SpoolConfig {
            dir: dir.join("spool"),
            min_free_mb: 0,
            retention_hours: 24,
            evict_headroom_mb: 0,
            zstd_level: 1,
        }
    }

    /// A real instance as ingest would spool it: Part-10 header, then the dataset bytes.
    fn instance(uid: &str, study: &str, pixels: usize) -> (IncomingMeta, Vec<u8>, Vec<u8>) {
        let meta = IncomingMeta {
            sop_class_uid: uids::CT_IMAGE_STORAGE.into(),
            sop_instance_uid: uid.into(),
            transfer_syntax_uid: TS.into(),
            calling_ae: "CT1".into(),
            peer: "127.0.0.1:40000".into(),
        };
        let table = FileMetaTableBuilder::new()
            .media_storage_sop_class_uid(uids::CT_IMAGE_STORAGE)
            .media_storage_sop_instance_uid(uid)
            .transfer_syntax(TS)
            .implementation_class_uid("2.25.1")
            .source_application_entity_title("CT1")
            .build()
            .unwrap();
        let mut header = vec![0u8; 128];
        header.extend_from_slice(b"DICM");
        table.write(&mut header).unwrap();
        let mut obj = InMemDicomObject::new_empty();
        for (tag, vr, v) in [
            (tags::SOP_CLASS_UID, VR::UI, uids::CT_IMAGE_STORAGE),
            (tags::SOP_INSTANCE_UID, VR::UI, uid),
            (tags::ACCESSION_NUMBER, VR::SH, "ACC1"),
            (tags::MODALITY, VR::CS, "CT"),
            (tags::PATIENT_ID, VR::LO, "PAT-7"),
            (tags::STUDY_INSTANCE_UID, VR::UI, study),
            (tags::SERIES_INSTANCE_UID, VR::UI, &format!("{study}.1")),
        ] {
            obj.put(DataElement::new(tag, vr, PrimitiveValue::from(v)));
        }
        let pixels: Vec<u8> = (0..pixels).map(|i| (i * 7 % 251) as u8).collect();
        obj.put(DataElement::new(
            tags::PIXEL_DATA,
            VR::OW,
            PrimitiveValue::from(pixels),
        ));
        let mut dataset = Vec::new();
        obj.write_dataset_with_ts(&mut dataset, &entries::EXPLICIT_VR_LITTLE_ENDIAN.erased())
            .unwrap();
        (meta, header, dataset)
    }

    /// Stores a real instance (as ingest would); also used by `crate::tests`.
    pub(crate) fn store(spool: &Spool, uid: &str, study: &str) -> crate::InstanceId {
        match store_outcome(spool, uid, study) {
            StoreOutcome::Stored { id } => id,
            other => panic!("expected Stored, got {other:?}"),
        }
    }

    /// Stores a real DICOM instance (the same bytes for the same UID and study).
    pub(crate) fn store_outcome(spool: &Spool, uid: &str, study: &str) -> StoreOutcome {
        store_version(spool, uid, study, 200_000)
    }

    /// Stores a real DICOM instance whose pixel data has `pixels` bytes (another length, another
    /// version of the same UID).
    pub(crate) fn store_version(
        spool: &Spool,
        uid: &str,
        study: &str,
        pixels: usize,
    ) -> StoreOutcome {
        let (meta, header, dataset) = instance(uid, study, pixels);
        let mut incoming = spool.begin(meta, &header).unwrap();
        incoming.write_all(&dataset).unwrap();
        let written = incoming.finish().unwrap();
        let index = crate::leading::parse_leading(written.dataset_reader().unwrap(), TS)
            .unwrap()
            .index;
        written.commit(index).unwrap()
    }

    /// Three instances: one confirmed (still cached), two queued; then the database is dropped.
    fn spool_with_three(cfg: &SpoolConfig) -> Vec<PathBuf> {
        let (spool, _) = Spool::open(cfg).unwrap();
        let sent = store(&spool, "1.2.3.1", "1.2.3");
        store(&spool, "1.2.3.2", "1.2.3");
        store(&spool, "1.2.4.1", "1.2.4");
        let claimed = spool.claim_batch(1, u64::MAX, SystemTime::now()).unwrap();
        assert_eq!(claimed[0].id, sent);
        spool.mark_sent(sent, false).unwrap();
        drop(spool);
        object_files(&cfg.dir.join("objects")).unwrap()
    }

    fn remove_database(cfg: &SpoolConfig) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(cfg.dir.join(format!("spool.db{suffix}")));
        }
    }

    fn check_rebuilt(cfg: &SpoolConfig, report: &RebuildReport, queued: u64) {
        assert_eq!(report.queued, queued, "{report:?}");
        assert_eq!(report.without_index, 0, "{report:?}");
        assert!(report.unreadable.is_empty(), "{report:?}");
        let (spool, _) = Spool::open(cfg).unwrap();
        let status = spool.status(SystemTime::now()).unwrap();
        assert_eq!(status.queued, queued);
        assert_eq!(status.sent + status.lost + status.failed, 0);
        // The index fields come back from the files: a batch is still one study.
        let batch = spool.claim_batch(10, u64::MAX, SystemTime::now()).unwrap();
        assert!(!batch.is_empty());
        let study = &batch[0].study_instance_uid;
        assert!(study == "1.2.3" || study == "1.2.4", "{batch:?}");
        assert!(batch.iter().all(|i| &i.study_instance_uid == study));
        for inst in &batch {
            assert_eq!(inst.sop_class_uid, uids::CT_IMAGE_STORAGE);
            assert_eq!(inst.transfer_syntax_uid, TS);
            assert_eq!(
                inst.attempts, 1,
                "a rebuilt row counts as a possible redelivery"
            );
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut spool.open_verified(inst).unwrap(), &mut bytes)
                .unwrap();
            let (_, header, dataset) = instance(&inst.sop_instance_uid, study, 200_000);
            assert_eq!(bytes, [header, dataset].concat(), "bit-preserving");
        }
        let problems = spool.problems(10).unwrap();
        assert!(problems
            .iter()
            .all(|p| p.state == InstanceState::Quarantined));
    }

    #[test]
    fn a_missing_database_with_spool_files_refuses_to_start_and_rebuild_queues_them_all() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = cfg(tmp.path());
        spool_with_three(&cfg);
        remove_database(&cfg);
        let refused = Spool::open(&cfg).err().expect("open must refuse");
        assert!(
            matches!(refused, SpoolError::IndexMissing { .. }),
            "{refused}"
        );
        assert!(refused.to_string().contains("rebuild-index"), "{refused}");
        // Refusing created no database: refusing again gives the same answer.
        assert!(matches!(
            Spool::open(&cfg),
            Err(SpoolError::IndexMissing { .. })
        ));

        // `passerelled status` says the same.
        let attached = Spool::attach(&cfg).err().expect("attach must refuse");
        assert!(
            matches!(attached, SpoolError::IndexMissing { .. }),
            "{attached}"
        );

        let report = Spool::rebuild_index(&cfg).unwrap();
        assert_eq!(report.files, 3);
        assert_eq!(report.previous_database, None);
        check_rebuilt(&cfg, &report, 3);
    }

    #[test]
    fn a_garbage_database_is_refused_then_moved_aside_and_rebuilt() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = cfg(tmp.path());
        spool_with_three(&cfg);
        remove_database(&cfg);
        std::fs::write(cfg.dir.join("spool.db"), vec![0x5a; 64 * 1024]).unwrap();
        let refused = Spool::open(&cfg).err().expect("open must refuse");
        assert!(
            matches!(refused, SpoolError::IndexDamaged { .. }),
            "{refused}"
        );
        assert!(refused.to_string().contains("rebuild-index"), "{refused}");
        let attached = Spool::attach(&cfg).err().expect("attach must refuse");
        assert!(
            matches!(attached, SpoolError::IndexDamaged { .. }),
            "{attached}"
        );

        let report = Spool::rebuild_index(&cfg).unwrap();
        let previous = report.previous_database.clone().unwrap();
        assert_eq!(std::fs::read(previous).unwrap(), vec![0x5a; 64 * 1024]);
        check_rebuilt(&cfg, &report, 3);
    }

    #[test]
    fn a_database_with_damaged_pages_is_refused_then_rebuilt() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = cfg(tmp.path());
        spool_with_three(&cfg);
        let db = cfg.dir.join("spool.db");
        assert!(
            !cfg.dir.join("spool.db-wal").exists(),
            "closed cleanly, checkpointed"
        );
        let mut bytes = std::fs::read(&db).unwrap();
        assert!(bytes.len() >= 3 * 4096, "{} bytes", bytes.len());
        // Page 2 onwards (tables and indexes), the header and the schema page intact.
        for b in &mut bytes[4096..3 * 4096] {
            *b = 0xa5;
        }
        std::fs::write(&db, bytes).unwrap();
        let refused = Spool::open(&cfg).err().expect("open must refuse");
        assert!(
            matches!(refused, SpoolError::IndexDamaged { .. }),
            "{refused}"
        );
        let report = Spool::rebuild_index(&cfg).unwrap();
        check_rebuilt(&cfg, &report, 3);
    }

    #[test]
    fn an_empty_spool_without_database_opens_normally() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = cfg(tmp.path());
        drop(Spool::open(&cfg).unwrap());
        remove_database(&cfg);
        let (spool, _) = Spool::open(&cfg).unwrap();
        assert_eq!(spool.status(SystemTime::now()).unwrap().queued, 0);
    }

    #[test]
    fn rebuild_quarantines_flipped_and_truncated_files_and_queues_the_rest() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = cfg(tmp.path());
        let files = spool_with_three(&cfg);
        remove_database(&cfg);
        let mut flipped = std::fs::read(&files[0]).unwrap();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0xff;
        std::fs::write(&files[0], flipped).unwrap();
        let truncated = std::fs::read(&files[1]).unwrap();
        std::fs::write(&files[1], &truncated[..truncated.len() / 2]).unwrap();

        let report = Spool::rebuild_index(&cfg).unwrap();
        assert_eq!(report.files, 3);
        assert_eq!(report.quarantined.len(), 2, "{report:?}");
        assert!(!files[0].exists() && !files[1].exists());
        assert!(report.quarantined.iter().all(|p| p.exists()));
        check_rebuilt(&cfg, &report, 1);
        let quarantined = |cfg: &SpoolConfig| {
            let (spool, _) = Spool::open(cfg).unwrap();
            spool.status(SystemTime::now()).unwrap().quarantined
        };
        assert_eq!(quarantined(&cfg), 2, "the operator sees the damaged files");

        // A second rebuild finds them in quarantine/ and keeps them visible.
        let again = Spool::rebuild_index(&cfg).unwrap();
        assert_eq!(
            (again.previously_quarantined, again.queued),
            (2, 1),
            "{again:?}"
        );
        assert!(again.quarantined.is_empty());
        assert_eq!(quarantined(&cfg), 2);
    }

    #[test]
    fn rebuild_is_refused_while_a_daemon_holds_the_spool() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = cfg(tmp.path());
        let (spool, _) = Spool::open(&cfg).unwrap();
        store(&spool, "1.2.3.1", "1.2.3");
        let refused = Spool::rebuild_index(&cfg).expect_err("rebuild must refuse");
        assert!(
            matches!(refused, SpoolError::RebuildWhileRunning { .. }),
            "{refused}"
        );
        // The running daemon's database was left alone.
        assert_eq!(spool.status(SystemTime::now()).unwrap().queued, 1);
    }

    #[test]
    fn rebuild_of_a_healthy_spool_keeps_the_old_database_and_queues_everything_again() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = cfg(tmp.path());
        spool_with_three(&cfg);
        let report = Spool::rebuild_index(&cfg).unwrap();
        assert!(report.previous_database.as_ref().unwrap().exists());
        check_rebuilt(&cfg, &report, 3);
    }
}
