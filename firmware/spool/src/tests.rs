//! The spool's state machine, recovery and integrity, named like a specification.

use super::*;
use passerelle_config::SpoolConfig;
use rand::{RngCore, SeedableRng};
use std::collections::BTreeSet;
use std::io::Write;

const HOUR: Duration = Duration::from_secs(3600);

struct Fixture {
    dir: tempfile::TempDir,
    cfg: SpoolConfig,
}

impl Fixture {
    fn new() -> Self {
        Self::with(|_| {})
    }

    fn with(tune: impl FnOnce(&mut SpoolConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = SpoolConfig {
            dir: dir.path().join("spool"),
            min_free_mb: 0,
            retention_hours: 24,
            evict_headroom_mb: 0,
            zstd_level: 1,
        };
        tune(&mut cfg);
        Self { dir, cfg }
    }

    fn open(&self) -> (Spool, RecoveryReport) {
        Spool::open(&self.cfg).unwrap()
    }

    fn spool(&self) -> Spool {
        self.open().0
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.cfg.dir.join(rel)
    }
}

/// A fake instance: a Part-10 header and a dataset, both distinguishable.
struct Inst {
    uid: String,
    study: String,
    header: Vec<u8>,
    dataset: Vec<u8>,
}

impl Inst {
    fn new(uid: &str, study: &str, dataset_len: usize, seed: u64) -> Self {
        let mut header = vec![0u8; 128];
        header.extend_from_slice(b"DICM");
        header.extend_from_slice(uid.as_bytes());
        // Half random, half a repeating pattern: something zstd must really work on (and no run of
        // one byte value, which intake files store as RLE blocks).
        let mut dataset: Vec<u8> = (0..dataset_len).map(|i| (i % 251) as u8).collect();
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut dataset[..dataset_len / 2]);
        Self {
            uid: uid.to_owned(),
            study: study.to_owned(),
            header,
            dataset,
        }
    }

    fn raw(&self) -> Vec<u8> {
        [self.header.as_slice(), self.dataset.as_slice()].concat()
    }

    fn meta(&self) -> IncomingMeta {
        IncomingMeta {
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
            sop_instance_uid: self.uid.clone(),
            transfer_syntax_uid: "1.2.840.10008.1.2.1".into(),
            calling_ae: "CT1".into(),
            peer: "127.0.0.1:40000".into(),
        }
    }

    fn index(&self) -> InstanceIndex {
        InstanceIndex {
            study_instance_uid: self.study.clone(),
            series_instance_uid: format!("{}.1", self.study),
            patient_id: "P1".into(),
            modality: "CT".into(),
            accession_number: "A1".into(),
        }
    }

    fn written(&self, spool: &Spool) -> Written {
        self.written_in(spool, 16 * 1024 + 3)
    }

    /// Written in pieces of `piece` bytes (as PDVs of that size would hand them over).
    fn written_in(&self, spool: &Spool, piece: usize) -> Written {
        let mut incoming = spool.begin(self.meta(), &self.header).unwrap();
        for chunk in self.dataset.chunks(piece) {
            incoming.write_all(chunk).unwrap();
        }
        incoming.finish().unwrap()
    }

    fn store(&self, spool: &Spool) -> StoreOutcome {
        self.written(spool).commit(self.index()).unwrap()
    }

    fn stored_id(&self, spool: &Spool) -> InstanceId {
        match self.store(spool) {
            StoreOutcome::Stored { id } => id,
            other => panic!("expected Stored, got {other:?}"),
        }
    }
}

fn read_all(spool: &Spool, inst: &QueuedInstance) -> Result<Vec<u8>> {
    let mut reader = spool.open_verified(inst)?;
    let mut out = Vec::new();
    reader.read_to_end(&mut out).unwrap();
    assert_eq!(out.len() as u64, reader.len());
    Ok(out)
}

fn row_str(spool: &Spool, id: InstanceId, column: &str) -> Option<String> {
    spool
        .conn()
        .query_row(
            &format!("SELECT CAST({column} AS TEXT) FROM instances WHERE id = ?1"),
            [id.0],
            |r| r.get(0),
        )
        .unwrap()
}

fn state(spool: &Spool, id: InstanceId) -> String {
    row_str(spool, id, "state").unwrap()
}

fn file_of(fx: &Fixture, spool: &Spool, id: InstanceId) -> PathBuf {
    fx.path(&row_str(spool, id, "path").unwrap())
}

fn tmp_entries(fx: &Fixture) -> usize {
    fs::read_dir(fx.path("tmp")).unwrap().count()
}

fn ids(batch: &[QueuedInstance]) -> Vec<InstanceId> {
    batch.iter().map(|i| i.id).collect()
}

fn far_future() -> SystemTime {
    SystemTime::now() + 1000 * HOUR
}

fn claim_one(spool: &Spool) -> QueuedInstance {
    let mut batch = spool.claim_batch(1, u64::MAX, far_future()).unwrap();
    assert_eq!(batch.len(), 1);
    batch.remove(0)
}

#[test]
fn a_panic_under_normal_sync_leaves_the_connection_at_full_sync() {
    let mut conn = Connection::open_in_memory().unwrap();
    conn.pragma_update(None, "synchronous", "FULL").unwrap();
    let sync = |c: &Connection| {
        c.query_row("PRAGMA synchronous", [], |r| r.get::<_, i64>(0))
            .unwrap()
    };
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = crate::db::with_normal_sync(&mut conn, |c| -> Result<()> {
            assert_eq!(sync(c), 1, "NORMAL inside");
            panic!("a defect inside the commit");
        });
    }));
    assert!(panicked.is_err());
    // 2 = FULL: later commits that must be durable on return still are.
    assert_eq!(sync(&conn), 2);
    let value = crate::db::with_normal_sync(&mut conn, |_| Ok(7)).unwrap();
    assert_eq!((value, sync(&conn)), (7, 2));
}

#[test]
fn an_error_chain_reads_as_one_line_without_repeats() {
    #[derive(Debug)]
    struct Outer(std::io::Error);
    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "cannot send: {}", self.0)
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
    let e = Outer(std::io::Error::other("connection reset"));
    // The source's message is already part of the outer one: said once.
    assert_eq!(error_chain(&e), "cannot send: connection reset");
    let plain = std::io::Error::other("broken pipe");
    assert_eq!(error_chain(&plain), "broken pipe");
}

#[test]
fn a_spool_error_in_a_log_line_names_its_cause() {
    let e = SpoolError::Write {
        path: "/var/lib/passerelle/spool/objects/ab/x".into(),
        source: std::io::Error::from_raw_os_error(28),
    };
    let line = error_chain(&e);
    assert!(
        line.starts_with("Cannot write spool file /var/lib/passerelle/spool/objects/ab/x: "),
        "{line}"
    );
    assert!(line.contains("No space left on device"), "{line}");
}

#[test]
fn stored_instance_comes_back_byte_identical_after_claim_and_verification() {
    let fx = Fixture::new();
    let spool = fx.spool();
    let inst = Inst::new("1.2.3.1", "1.2.3", 3 * 1024 * 1024 + 17, 1);
    let written = inst.written(&spool);
    assert_eq!(written.raw_len(), inst.raw().len() as u64);
    let id = match written.commit(inst.index()).unwrap() {
        StoreOutcome::Stored { id } => id,
        other => panic!("{other:?}"),
    };
    assert_eq!(state(&spool, id), "queued");
    assert_eq!(tmp_entries(&fx), 0);

    let claimed = claim_one(&spool);
    assert_eq!(claimed.id, id);
    assert_eq!(claimed.sop_instance_uid, inst.uid);
    assert_eq!(claimed.study_instance_uid, inst.study);
    assert_eq!(claimed.raw_size, inst.raw().len() as u64);
    assert_eq!(claimed.attempts, 0);
    assert_eq!(state(&spool, id), "uploading");

    assert_eq!(read_all(&spool, &claimed).unwrap(), inst.raw());
}

#[test]
fn blank_frames_take_almost_no_disk_in_the_intake_file_and_come_back_byte_identical() {
    let fx = Fixture::new();
    let spool = fx.spool();
    // A multi-frame instance of 8 frames of 1 MiB: one image, seven blank.
    let mut inst = Inst::new("1.2.3.9", "1.2.3", 8 * MIB as usize, 9);
    inst.dataset[MIB as usize..].fill(0);
    let id = inst.stored_id(&spool);
    let on_disk = fs::metadata(file_of(&fx, &spool, id)).unwrap().len();
    assert!(
        on_disk < MIB + 64 * 1024,
        "{on_disk} bytes on disk for 1 MiB of image and 7 MiB of zeros"
    );
    assert_eq!(read_all(&spool, &claim_one(&spool)).unwrap(), inst.raw());
}

#[test]
fn spool_file_is_content_addressed_zstd_with_checksum_and_row_holds_every_field() {
    let fx = Fixture::new();
    let spool = fx.spool();
    let inst = Inst::new("1.2.3.2", "1.2.3", 100_000, 2);
    let id = inst.stored_id(&spool);
    let sha = hex::encode(Sha256::digest(inst.raw()));
    let rel = format!("objects/{}/{sha}.dcm.zst", &sha[..2]);
    assert_eq!(row_str(&spool, id, "path").unwrap(), rel);
    assert_eq!(row_str(&spool, id, "sha256").unwrap(), sha);
    let compressed = fs::read(fx.path(&rel)).unwrap();
    assert_eq!(
        row_str(&spool, id, "stored_size").unwrap(),
        compressed.len().to_string()
    );
    assert_eq!(zstd::decode_all(compressed.as_slice()).unwrap(), inst.raw());
    // Frame header descriptor: bit 2 is the content checksum flag.
    assert_eq!(&compressed[..4], &[0x28, 0xb5, 0x2f, 0xfd]);
    assert_ne!(compressed[4] & 0x04, 0, "zstd frame checksum must be on");
    for (column, expect) in [
        ("sop_instance_uid", "1.2.3.2"),
        ("sop_class_uid", "1.2.840.10008.5.1.4.1.1.2"),
        ("study_instance_uid", "1.2.3"),
        ("series_instance_uid", "1.2.3.1"),
        ("patient_id", "P1"),
        ("modality", "CT"),
        ("accession_number", "A1"),
        ("calling_ae", "CT1"),
        ("transfer_syntax_uid", "1.2.840.10008.1.2.1"),
        ("raw_size", &inst.raw().len().to_string()),
        ("attempts", "0"),
    ] {
        assert_eq!(
            row_str(&spool, id, column).as_deref(),
            Some(expect),
            "{column}"
        );
    }
    let version: i64 = spool
        .conn()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, db::SCHEMA_VERSION);
    let mode: String = spool
        .conn()
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

#[test]
fn a_caller_hashed_instance_is_named_and_recorded_by_the_same_sha256_as_a_spool_hashed_one() {
    let fx = Fixture::new();
    let spool = fx.spool();
    let inst = Inst::new("1.2.3.20", "1.2.3", 100_000, 20);
    let mut incoming = spool
        .begin_hashed_by_caller(inst.meta(), &inst.header)
        .unwrap();
    let mut digest = RawDigest::new(&inst.header);
    for chunk in inst.dataset.chunks(16 * 1024 + 3) {
        digest.update(chunk);
        incoming.write_all(chunk).unwrap();
    }
    let written = incoming.finish_with(digest).unwrap();
    let sha = hex::encode(Sha256::digest(inst.raw()));
    assert_eq!(written.sha256(), sha);
    let StoreOutcome::Stored { id } = written.commit(inst.index()).unwrap() else {
        panic!("expected Stored");
    };
    assert_eq!(row_str(&spool, id, "sha256").unwrap(), sha);
    assert_eq!(
        row_str(&spool, id, "path").unwrap(),
        format!("objects/{}/{sha}.dcm.zst", &sha[..2])
    );
    // The same bytes hashed by the spool itself: an identical copy, not a new version.
    assert!(matches!(inst.store(&spool), StoreOutcome::Duplicate { .. }));
    let claimed = claim_one(&spool);
    assert_eq!(read_all(&spool, &claimed).unwrap(), inst.raw());
}

#[test]
fn a_caller_digest_that_missed_or_repeated_bytes_is_refused_and_nothing_is_stored() {
    let fx = Fixture::new();
    let spool = fx.spool();
    let inst = Inst::new("1.2.3.21", "1.2.3", 50_000, 21);
    let chunks: Vec<&[u8]> = inst.dataset.chunks(4096).collect();
    // A chunk written but not hashed, then a chunk hashed twice.
    for (skip, repeat) in [(Some(3), None), (None, Some(5))] {
        let mut incoming = spool
            .begin_hashed_by_caller(inst.meta(), &inst.header)
            .unwrap();
        let mut digest = RawDigest::new(&inst.header);
        for (k, chunk) in chunks.iter().enumerate() {
            if skip != Some(k) {
                digest.update(chunk);
            }
            if repeat == Some(k) {
                digest.update(chunk);
            }
            incoming.write_all(chunk).unwrap();
        }
        let err = incoming.finish_with(digest).err().expect("refused");
        assert!(matches!(err, SpoolError::Digest { .. }), "{err}");
        assert!(err.to_string().contains("1.2.3.21"), "{err}");
    }
    // Finishing the wrong way round is refused too.
    let incoming = spool
        .begin_hashed_by_caller(inst.meta(), &inst.header)
        .unwrap();
    assert!(matches!(incoming.finish(), Err(SpoolError::Digest { .. })));
    let incoming = spool.begin(inst.meta(), &inst.header).unwrap();
    assert!(matches!(
        incoming.finish_with(RawDigest::new(&inst.header)),
        Err(SpoolError::Digest { .. })
    ));
    assert_eq!(spool.status(SystemTime::now()).unwrap().queued, 0);
    assert_eq!(tmp_entries(&fx), 0);
}

#[test]
fn the_leading_elements_come_from_the_stream_and_from_the_file_only_past_the_prefix_cap() {
    let fx = Fixture::new();
    let spool = fx.spool();
    let ts = "1.2.840.10008.1.2.1";
    let expected = leading::tests::expected("1.2.3.4.5");
    for dataset in [
        leading::tests::dataset(ts, "1.2.3.4.5"),
        leading::tests::dataset_with_long_leading_elements(),
    ] {
        let inst = Inst::new("1.2.3.4.5", "1.2.3.10", 0, 9);
        let mut incoming = spool.begin(inst.meta(), &inst.header).unwrap();
        for piece in dataset.chunks(16 * 1024) {
            incoming.write_all(piece).unwrap();
        }
        let mut written = incoming.finish().unwrap();
        assert_eq!(
            written.leading.is_some(),
            dataset.len() <= leading::PREFIX_CAP,
            "streamed unless over the cap"
        );
        assert_eq!(written.leading().unwrap(), Ok(expected.clone()));
        // Asked again, the stored file gives the same answer.
        assert_eq!(written.leading().unwrap(), Ok(expected.clone()));
    }
}

#[test]
fn the_wal_reaches_the_database_file_without_a_commit_checkpointing_it() {
    let fx = Fixture::new();
    let spool = fx.spool();
    let auto: i64 = spool
        .conn()
        .query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))
        .unwrap();
    assert!(
        auto > 1000,
        "commits checkpoint only as a backstop ({auto})"
    );
    let stored = 30;
    for n in 0..stored {
        Inst::new(&format!("1.2.9.{n}"), "1.2.9", 2_000, n).stored_id(&spool);
    }
    // `immutable=1` reads the database file alone, ignoring the WAL: the rows show there only once
    // a checkpoint has copied them.
    let uri = format!("file:{}?immutable=1", fx.path("spool.db").display());
    let in_file = || -> i64 {
        let ro = Connection::open_with_flags(
            &uri,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_URI,
        )
        .unwrap();
        ro.query_row("SELECT count(*) FROM instances", [], |r| r.get(0))
            .unwrap_or(-1)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while in_file() != stored as i64 {
        assert!(
            std::time::Instant::now() < deadline,
            "the checkpointer never copied the rows into spool.db ({} there)",
            in_file()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_256_object_directories_exist_once_the_spool_is_open() {
    let fx = Fixture::new();
    let _spool = fx.spool();
    for fan in ["00", "7f", "ff"] {
        assert!(fx.path("objects").join(fan).is_dir(), "{fan}");
    }
    let count = std::fs::read_dir(fx.path("objects")).unwrap().count();
    assert_eq!(count, 256);
}

#[test]
fn dataset_reader_yields_the_dataset_without_the_part10_header() {
    let fx = Fixture::new();
    let spool = fx.spool();
    let inst = Inst::new("1.2.3.3", "1.2.3", 200_000, 3);
    let written = inst.written(&spool);
    let mut first = vec![0u8; 4096];
    written
        .dataset_reader()
        .unwrap()
        .read_exact(&mut first)
        .unwrap();
    assert_eq!(first, inst.dataset[..4096]);
    let mut all = Vec::new();
    written
        .dataset_reader()
        .unwrap()
        .read_to_end(&mut all)
        .unwrap();
    assert_eq!(all, inst.dataset);
}

#[test]
fn identical_resend_is_a_duplicate_counted_and_not_queued_twice() {
    let fx = Fixture::new();
    let spool = fx.spool();
    let inst = Inst::new("1.2.3.4", "1.2.3", 50_000, 4);
    let id = inst.stored_id(&spool);
    assert_eq!(inst.store(&spool), StoreOutcome::Duplicate { id });
    assert_eq!(inst.store(&spool), StoreOutcome::Duplicate { id });
    let status = spool.status(SystemTime::now()).unwrap();
    assert_eq!(status.queued, 1);
    assert_eq!(status.duplicates_received, 2);
    assert_eq!(tmp_entries(&fx), 0);
    // Still a duplicate once sent (the upstream has it).
    let claimed = claim_one(&spool);
    spool.mark_sent(claimed.id, false).unwrap();
    assert_eq!(inst.store(&spool), StoreOutcome::Duplicate { id });
}

#[test]
fn a_copy_of_an_older_version_received_after_a_newer_one_is_kept_and_sent_last() {
    let fx = Fixture::with(|c| c.retention_hours = 1);
    let spool = fx.spool();
    let original = Inst::new("1.2.3.7", "1.2.3", 50_000, 11);
    let correction = Inst::new("1.2.3.7", "1.2.3", 50_000, 12);
    let v1 = original.stored_id(&spool);
    let StoreOutcome::NewVersion { id: v2, .. } = correction.store(&spool) else {
        panic!("expected a new version");
    };
    for id in [v1, v2] {
        assert_eq!(claim_one(&spool).id, id);
        spool.mark_sent(id, false).unwrap();
    }
    // The modality sends its original again: what it sent last is the original, and a PACS that
    // overwrites must end with it. Not a duplicate of v1: a new version, after v2.
    let outcome = original.store(&spool);
    let StoreOutcome::NewVersion { id: v3, previous } = outcome else {
        panic!("expected a new version, got {outcome:?}");
    };
    assert_eq!(previous, v2);
    assert_ne!(
        file_of(&fx, &spool, v3),
        file_of(&fx, &spool, v1),
        "a file of its own"
    );
    // The same bytes once more are a duplicate of that newest version.
    assert_eq!(original.store(&spool), StoreOutcome::Duplicate { id: v3 });
    // Evicting v1's cached file leaves v3's.
    let report = spool.evict(SystemTime::now() + 2 * HOUR).unwrap();
    assert_eq!(report.files, 2);
    let claimed = claim_one(&spool);
    assert_eq!(claimed.id, v3);
    assert_eq!(read_all(&spool, &claimed).unwrap(), original.raw());
    assert_eq!(tmp_entries(&fx), 0);
    assert_eq!(
        spool.status(SystemTime::now()).unwrap().duplicates_received,
        1
    );
}

#[test]
fn different_content_under_a_known_uid_is_kept_as_a_new_version() {
    let fx = Fixture::new();
    let spool = fx.spool();
    let v1 = Inst::new("1.2.3.5", "1.2.3", 50_000, 5);
    let v2 = Inst::new("1.2.3.5", "1.2.3", 50_000, 6);
    let first = v1.stored_id(&spool);
    let outcome = v2.store(&spool);
    let StoreOutcome::NewVersion { id, previous } = outcome else {
        panic!("expected NewVersion, got {outcome:?}");
    };
    assert_eq!(previous, first);
    assert_ne!(id, first);
    assert_eq!(spool.status(SystemTime::now()).unwrap().queued, 2);
    assert_ne!(file_of(&fx, &spool, id), file_of(&fx, &spool, first));
    // Both versions can be read back intact, one claim after the other (see the next test).
    let batch = spool.claim_batch(10, u64::MAX, far_future()).unwrap();
    assert_eq!(batch.len(), 1);
    assert_eq!(read_all(&spool, &batch[0]).unwrap(), v1.raw());
    // Once both are confirmed, the second is known as a version confirmed under other content
    // (which a PACS may have ignored); the first was confirmed alone, and a lone instance never is.
    spool.mark_sent(first, false).unwrap();
    assert!(spool
        .confirmed_under_other_content(&[first])
        .unwrap()
        .is_empty());
    let batch = spool.claim_batch(10, u64::MAX, far_future()).unwrap();
    assert_eq!(batch.len(), 1);
    assert_eq!(read_all(&spool, &batch[0]).unwrap(), v2.raw());
    spool.mark_sent(id, false).unwrap();
    assert_eq!(
        spool.confirmed_under_other_content(&[id]).unwrap(),
        vec!["1.2.3.5".to_owned()]
    );
    let lone = Inst::new("1.2.3.6", "1.2.3", 50_000, 7).stored_id(&spool);
    spool.mark_sent(lone, false).unwrap();
    assert!(spool
        .confirmed_under_other_content(&[lone])
        .unwrap()
        .is_empty());
}

#[test]
fn versions_of_one_uid_are_claimed_one_at_a_time_in_the_order_they_arrived() {
    let fx = Fixture::new();
    let spool = fx.spool();
    let start = SystemTime::now();
    let v1 = Inst::new("1.2.3.5", "1.2.3", 20_000, 5).stored_id(&spool);
    // v1 goes out and fails for now (the PACS is busy): it waits an hour for its retry.
    let batch = spool.claim_batch(10, u64::MAX, SystemTime::now()).unwrap();
    assert_eq!(ids(&batch), vec![v1]);
    spool.mark_retry(v1, "503", start + HOUR).unwrap();
    // Meanwhile the modality sends a corrected version, and another study arrives.
    let StoreOutcome::NewVersion { id: v2, .. } =
        Inst::new("1.2.3.5", "1.2.3", 20_000, 6).store(&spool)
    else {
        panic!("expected a new version");
    };
    let other = Inst::new("1.2.9.1", "1.2.9", 20_000, 7).stored_id(&spool);
    let now = SystemTime::now();
    // The correction is due now but waits behind its older version: sent first, an overwriting PACS
    // would end with the uncorrected original.
    let batch = spool.claim_batch(10, u64::MAX, now).unwrap();
    assert_eq!(ids(&batch), vec![other]);
    spool.mark_sent(other, false).unwrap();
    assert!(spool.claim_batch(10, u64::MAX, now).unwrap().is_empty());
    assert_eq!(
        spool.next_due().unwrap(),
        Some(from_ms(to_ms(start + HOUR)))
    );
    // At its retry the old version goes first, alone; while it is in flight the new one is not
    // claimable either (it would only be handed back).
    let later = now + 2 * HOUR;
    let batch = spool.claim_batch(10, u64::MAX, later).unwrap();
    assert_eq!(ids(&batch), vec![v1]);
    assert!(spool.claim_batch(10, u64::MAX, later).unwrap().is_empty());
    assert_eq!(spool.next_due().unwrap(), None);
    spool.mark_sent(v1, false).unwrap();
    let batch = spool.claim_batch(10, u64::MAX, later).unwrap();
    assert_eq!(ids(&batch), vec![v2]);
}

#[test]
fn dropping_an_incoming_or_a_written_instance_leaves_no_temp_file() {
    let fx = Fixture::new();
    let spool = fx.spool();
    let inst = Inst::new("1.2.3.6", "1.2.3", 10_000, 7);
    let mut incoming = spool.begin(inst.meta(), &inst.header).unwrap();
    incoming.write_all(&inst.dataset).unwrap();
    assert_eq!(tmp_entries(&fx), 1);
    drop(incoming);
    assert_eq!(tmp_entries(&fx), 0);
    let written = inst.written(&spool);
    assert_eq!(tmp_entries(&fx), 1);
    drop(written);
    assert_eq!(tmp_entries(&fx), 0);
    assert_eq!(
        spool.status(SystemTime::now()).unwrap(),
        StatusReport {
            uplink: spool.uplink_state().unwrap(),
            ..StatusReport::default()
        }
    );
}

#[test]
fn recovery_removes_temp_files_requeues_uploads_and_marks_missing_files_lost() {
    let fx = Fixture::new();
    let (a, b, c) = {
        let spool = fx.spool();
        let a = Inst::new("1.2.3.10", "1.2.3", 10_000, 10).stored_id(&spool);
        let b = Inst::new("1.2.3.11", "1.2.3", 10_000, 11).stored_id(&spool);
        let c = Inst::new("1.2.3.12", "1.2.3", 10_000, 12).stored_id(&spool);
        assert_eq!(claim_one(&spool).id, a);
        // A transfer cut short by the crash, and one abandoned written file.
        // (A forgotten `Incoming` would keep the spool open, so the files are made by hand.)
        let partial = zstd::encode_all(&b"DICM partial"[..], 1).unwrap();
        fs::write(
            fx.path("tmp/0123456789abcdef.part"),
            &partial[..partial.len() / 2],
        )
        .unwrap();
        fs::write(fx.path("tmp/leftover.part"), b"junk").unwrap();
        fs::remove_file(file_of(&fx, &spool, c)).unwrap();
        (a, b, c)
    };
    let (spool, report) = fx.open();
    assert_eq!(report.temp_files_removed, 2);
    assert_eq!(report.uploading_requeued, 1);
    assert_eq!(report.lost, vec!["1.2.3.12".to_owned()]);
    assert_eq!(tmp_entries(&fx), 0);
    assert_eq!(state(&spool, a), "queued");
    assert_eq!(state(&spool, b), "queued");
    assert_eq!(state(&spool, c), "lost");
    assert!(row_str(&spool, c, "last_error")
        .unwrap()
        .contains("missing"));
    let status = spool.status(SystemTime::now()).unwrap();
    assert_eq!((status.queued, status.lost), (2, 1));
    // A lost row is never claimed.
    let batch = spool.claim_batch(10, u64::MAX, far_future()).unwrap();
    assert_eq!(batch.iter().map(|q| q.id).collect::<Vec<_>>(), vec![a, b]);
}

#[test]
fn a_second_process_opening_the_spool_does_not_run_recovery() {
    let fx = Fixture::new();
    let (daemon, _) = fx.open();
    let inst = Inst::new("1.2.3.20", "1.2.3", 10_000, 20);
    let id = inst.stored_id(&daemon);
    claim_one(&daemon);
    let incoming = daemon.begin(inst.meta(), &inst.header).unwrap();
    let (status_tool, report) = fx.open();
    assert!(daemon.is_owner());
    assert!(!status_tool.is_owner());
    assert_eq!(report, RecoveryReport::default());
    assert_eq!(tmp_entries(&fx), 1);
    assert_eq!(state(&status_tool, id), "uploading");
    assert_eq!(status_tool.status(SystemTime::now()).unwrap().uploading, 1);
    drop(incoming);
}

/// Applies `damage` to the file of a freshly stored instance and checks it is never readable.
fn check_corruption_is_quarantined(damage: impl FnOnce(&Path), detail_contains: &str) {
    check_corruption_is_quarantined_in(false, damage, detail_contains)
}

/// As [`check_corruption_is_quarantined`], the file damaged after the compactor rewrote it (and
/// recorded its digest) if `compacted`.
fn check_corruption_is_quarantined_in(
    compacted: bool,
    damage: impl FnOnce(&Path),
    detail_contains: &str,
) {
    let fx = Fixture::new();
    let spool = fx.spool();
    let inst = Inst::new("1.2.3.30", "1.2.3", 300_000, 30);
    let id = inst.stored_id(&spool);
    if compacted {
        assert_eq!(spool.compact_batch(1).unwrap().compacted, 1);
        assert_eq!(query_i64(&spool, "SELECT COUNT(*) FROM file_digest"), 1);
    }
    let path = file_of(&fx, &spool, id);
    damage(&path);
    let claimed = claim_one(&spool);
    let err = read_all(&spool, &claimed).unwrap_err();
    let SpoolError::Corrupt {
        sop_instance_uid,
        detail,
        path: qpath,
    } = err
    else {
        panic!("expected Corrupt, got {err:?}");
    };
    assert_eq!(sop_instance_uid, inst.uid);
    assert!(detail.contains(detail_contains), "{detail}");
    assert!(!path.exists());
    assert!(qpath.starts_with(fx.path("quarantine")) && qpath.exists());
    assert_eq!(state(&spool, id), "quarantined");
    assert!(row_str(&spool, id, "last_error").is_some());
    // Never readable again, never claimed again.
    assert!(matches!(
        spool.open_verified(&claimed),
        Err(SpoolError::Corrupt { .. })
    ));
    assert!(spool
        .claim_batch(10, u64::MAX, far_future())
        .unwrap()
        .is_empty());
    spool.release(claimed.id).unwrap();
    assert_eq!(state(&spool, id), "quarantined");
    assert_eq!(spool.status(SystemTime::now()).unwrap().quarantined, 1);
}

fn flip_a_middle_byte(p: &Path) {
    let mut bytes = fs::read(p).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    fs::write(p, bytes).unwrap();
}

/// A valid zstd stream of another instance's bytes.
fn write_other_valid_content(p: &Path) {
    let other = Inst::new("1.2.3.30", "1.2.3", 300_000, 31).raw();
    fs::write(p, zstd::encode_all(other.as_slice(), 1).unwrap()).unwrap();
}

#[test]
fn a_flipped_byte_quarantines_the_file() {
    check_corruption_is_quarantined(flip_a_middle_byte, "");
}

#[test]
fn a_compacted_file_with_a_flipped_byte_fails_its_digest_then_its_content_check() {
    check_corruption_is_quarantined_in(true, flip_a_middle_byte, "");
}

#[test]
fn a_compacted_file_replaced_by_other_valid_content_is_quarantined() {
    check_corruption_is_quarantined_in(true, write_other_valid_content, "actual_sha256=");
}

#[test]
fn every_file_is_verified_by_the_digest_recorded_as_it_was_written_and_one_that_drifted_by_its_content(
) {
    let fx = Fixture::new();
    let spool = fx.spool();
    let insts: Vec<_> = (0..2u64)
        .map(|i| Inst::new(&format!("1.2.3.4{i}"), "1.2.3", 200_000, 40 + i))
        .collect();
    let ids: Vec<_> = insts.iter().map(|i| i.stored_id(&spool)).collect();
    // Intake files: ingest recorded the digest of the bytes it wrote.
    for (inst, id) in insts.iter().zip(&ids) {
        let digest: Vec<u8> = spool
            .conn()
            .query_row("SELECT xxh3 FROM file_digest WHERE id = ?1", [id.0], |r| {
                r.get(0)
            })
            .unwrap();
        let on_disk = xxhash_rust::xxh3::xxh3_128(&fs::read(file_of(&fx, &spool, *id)).unwrap());
        assert_eq!(digest, on_disk.to_le_bytes(), "{}", inst.uid);
    }
    let claimed = claim_one(&spool);
    assert_eq!(
        spool.open_verified(&claimed).unwrap().verified(),
        Verified::StoredDigest
    );
    spool.release(claimed.id).unwrap();
    assert_eq!(spool.compact_batch(10).unwrap().compacted, 2);
    // The second file is re-encoded (as another compressor would): the same content, other bytes.
    let drifted = file_of(&fx, &spool, ids[1]);
    let recoded = zstd::encode_all(insts[1].raw().as_slice(), 19).unwrap();
    assert_ne!(fs::read(&drifted).unwrap(), recoded);
    fs::write(&drifted, &recoded).unwrap();
    for (inst, how) in insts
        .iter()
        .zip([Verified::StoredDigest, Verified::Content])
    {
        let claimed = claim_one(&spool);
        assert_eq!(claimed.sop_instance_uid, inst.uid);
        let mut reader = spool.open_verified(&claimed).unwrap();
        assert_eq!(reader.verified(), how);
        let mut bytes = Vec::new();
        reader.read_to_end(&mut bytes).unwrap();
        assert_eq!(bytes, inst.raw());
        spool.mark_sent(claimed.id, false).unwrap();
    }
    assert_eq!(spool.status(SystemTime::now()).unwrap().quarantined, 0);
}

#[test]
fn a_database_from_before_file_digests_gets_the_table_and_compacts_into_it() {
    let fx = Fixture::new();
    let inst = Inst::new("1.2.3.50", "1.2.3", 100_000, 50);
    {
        let spool = fx.spool();
        inst.stored_id(&spool);
    }
    let conn = rusqlite::Connection::open(fx.path("spool.db")).unwrap();
    conn.execute_batch("DROP TABLE file_digest").unwrap();
    drop(conn);
    let spool = fx.spool();
    assert_eq!(spool.compact_batch(1).unwrap().compacted, 1);
    let claimed = claim_one(&spool);
    let mut reader = spool.open_verified(&claimed).unwrap();
    assert_eq!(reader.verified(), Verified::StoredDigest);
    let mut bytes = Vec::new();
    reader.read_to_end(&mut bytes).unwrap();
    assert_eq!(bytes, inst.raw());
}

#[test]
fn a_truncated_file_quarantines_the_file() {
    check_corruption_is_quarantined(
        |p| {
            let len = fs::metadata(p).unwrap().len();
            File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_len(len - 10)
                .unwrap();
        },
        "zstd",
    );
}

#[test]
fn an_empty_file_quarantines_the_file() {
    check_corruption_is_quarantined(|p| fs::write(p, b"").unwrap(), "zstd");
}

#[test]
fn valid_zstd_with_other_content_quarantines_the_file_on_hash_mismatch() {
    check_corruption_is_quarantined(write_other_valid_content, "actual_sha256=");
}

#[test]
fn a_missing_file_at_read_time_marks_the_instance_lost() {
    let fx = Fixture::new();
    let spool = fx.spool();
    let id = Inst::new("1.2.3.31", "1.2.3", 1000, 32).stored_id(&spool);
    fs::remove_file(file_of(&fx, &spool, id)).unwrap();
    let claimed = claim_one(&spool);
    assert!(matches!(
        spool.open_verified(&claimed),
        Err(SpoolError::Missing { sop_instance_uid, .. }) if sop_instance_uid == "1.2.3.31"
    ));
    assert_eq!(state(&spool, id), "lost");
}

/// Stores `n` instances, sends the first `sent` of them, and returns all ids.
fn store_and_send(spool: &Spool, n: u64, sent: u64) -> Vec<InstanceId> {
    let ids: Vec<_> = (0..n)
        .map(|i| Inst::new(&format!("1.2.4.{i}"), "1.2.4", 20_000, 100 + i).stored_id(spool))
        .collect();
    for id in &ids[..sent as usize] {
        let claimed = claim_one(spool);
        assert_eq!(claimed.id, *id);
        spool.mark_sent(*id, false).unwrap();
    }
    ids
}

#[test]
fn retention_evicts_only_sent_files_older_than_the_retention() {
    let fx = Fixture::with(|c| c.retention_hours = 1);
    let spool = fx.spool();
    let ids = store_and_send(&spool, 4, 2);
    let now = SystemTime::now();
    assert_eq!(spool.evict(now).unwrap(), EvictReport::default());
    let report = spool.evict(now + 2 * HOUR).unwrap();
    assert_eq!(report.files, 2);
    assert!(report.bytes > 0);
    for (i, id) in ids.iter().enumerate() {
        let evicted = i < 2;
        assert_eq!(file_of(&fx, &spool, *id).exists(), !evicted, "row {i}");
        assert_eq!(row_str(&spool, *id, "evicted_at").is_some(), evicted);
        assert_eq!(state(&spool, *id), if evicted { "sent" } else { "queued" });
    }
    let status = spool.status(now).unwrap();
    assert_eq!((status.sent, status.evicted, status.queued), (2, 2, 2));
    // A second pass has nothing left to do.
    assert_eq!(spool.evict(now + 2 * HOUR).unwrap(), EvictReport::default());
}

#[test]
fn zero_retention_evicts_as_soon_as_sent() {
    let fx = Fixture::with(|c| c.retention_hours = 0);
    let spool = fx.spool();
    let ids = store_and_send(&spool, 2, 1);
    assert!(!file_of(&fx, &spool, ids[0]).exists());
    assert!(file_of(&fx, &spool, ids[1]).exists());
    assert_eq!(spool.status(SystemTime::now()).unwrap().evicted, 1);
}

#[test]
fn low_space_evicts_every_sent_file_but_never_an_unconfirmed_one() {
    // More free space is asked for than any disk has: eviction must go as far as it may.
    let fx = Fixture::with(|c| {
        c.retention_hours = 10_000;
        c.evict_headroom_mb = u64::MAX >> 21;
    });
    let spool = fx.spool();
    let ids = store_and_send(&spool, 5, 2);
    // One uploading and one failed among the unconfirmed.
    let claimed = claim_one(&spool);
    spool.mark_failed(claimed.id, "C000").unwrap();
    claim_one(&spool);
    let report = spool.evict(SystemTime::now()).unwrap();
    assert_eq!(report.files, 2);
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(file_of(&fx, &spool, *id).exists(), i >= 2, "row {i}");
    }
    let states: Vec<_> = ids.iter().map(|id| state(&spool, *id)).collect();
    assert_eq!(states, ["sent", "sent", "failed", "uploading", "queued"]);
}

#[test]
fn below_min_free_space_begin_is_refused_with_disk_full_and_nothing_is_lost() {
    let fx = Fixture::with(|c| c.min_free_mb = u64::MAX >> 21);
    let spool = fx.spool();
    let ids = store_and_send(&spool, 3, 1);
    let err = spool.ensure_space().unwrap_err();
    assert!(
        matches!(err, SpoolError::DiskFull { min_free_mb, .. } if min_free_mb == u64::MAX >> 21),
        "{err:?}"
    );
    assert!(!file_of(&fx, &spool, ids[0]).exists());
    for id in &ids[1..] {
        assert!(file_of(&fx, &spool, *id).exists());
        assert_eq!(state(&spool, *id), "queued");
    }
}

#[test]
fn enough_free_space_passes_ensure_space() {
    let fx = Fixture::with(|c| c.min_free_mb = 1);
    fx.spool().ensure_space().unwrap();
}

/// Stores instances described as (study, dataset bytes), in order, and returns their ids.
fn store_studies(spool: &Spool, layout: &[(&str, usize)]) -> Vec<InstanceId> {
    layout
        .iter()
        .enumerate()
        .map(|(i, (study, len))| {
            Inst::new(&format!("{study}.{i}"), study, *len, 200 + i as u64).stored_id(spool)
        })
        .collect()
}

/// Claims one batch and returns the positions (in `ids`) of the claimed instances.
fn check_claim(
    spool: &Spool,
    ids: &[InstanceId],
    max_count: usize,
    max_bytes: u64,
    expect: &[usize],
) {
    let batch = spool
        .claim_batch(max_count, max_bytes, far_future())
        .unwrap();
    let got: Vec<usize> = batch
        .iter()
        .map(|q| ids.iter().position(|id| *id == q.id).unwrap())
        .collect();
    assert_eq!(got, expect, "max_count={max_count} max_bytes={max_bytes}");
    for q in &batch {
        assert_eq!(state(spool, q.id), "uploading");
    }
}

#[test]
fn claim_batch_groups_one_study_oldest_first_within_count_and_bytes() {
    let fx = Fixture::new();
    let spool = fx.spool();
    let ids = store_studies(
        &spool,
        &[
            ("1.5.1", 1000),
            ("1.5.2", 1000),
            ("1.5.1", 1000),
            ("1.5.1", 1000),
            ("1.5.2", 1000),
            ("1.5.1", 1000),
        ],
    );
    let size = spool.claim_batch(0, 0, SystemTime::now() - HOUR).unwrap();
    assert!(size.is_empty(), "nothing is due before it was received");
    let raw = Inst::new("1.5.1.0", "1.5.1", 1000, 200).raw().len() as u64;
    check_claim(&spool, &ids, 2, u64::MAX, &[0, 2]);
    check_claim(&spool, &ids, 10, 2 * raw, &[1, 4]);
    // Always at least one, even above max_bytes.
    check_claim(&spool, &ids, 10, 1, &[3]);
    check_claim(&spool, &ids, 0, u64::MAX, &[5]);
    check_claim(&spool, &ids, 10, u64::MAX, &[]);
}

#[test]
fn claim_batch_skips_instances_not_yet_due() {
    let fx = Fixture::new();
    let spool = fx.spool();
    let ids = store_studies(&spool, &[("1.6.1", 100), ("1.6.1", 100), ("1.6.1", 100)]);
    let later = SystemTime::now() + HOUR;
    let claimed = claim_one(&spool);
    spool.mark_retry(claimed.id, "503", later).unwrap();
    let now = SystemTime::now();
    let batch = spool.claim_batch(10, u64::MAX, now).unwrap();
    assert_eq!(batch.iter().map(|q| q.id).collect::<Vec<_>>(), ids[1..]);
    assert!(spool.claim_batch(10, u64::MAX, now).unwrap().is_empty());
    let retried = spool.claim_batch(10, u64::MAX, later).unwrap();
    assert_eq!(retried.len(), 1);
    assert_eq!(retried[0].id, ids[0]);
    assert_eq!(retried[0].attempts, 1);
}

#[test]
fn mark_retry_persists_the_next_attempt_across_a_reopen() {
    let fx = Fixture::new();
    // Whole milliseconds: that is what is stored.
    let at = from_ms(to_ms(SystemTime::now() + 2 * HOUR));
    let id = {
        let spool = fx.spool();
        let id = Inst::new("1.7.1", "1.7", 100, 300).stored_id(&spool);
        claim_one(&spool);
        spool.mark_retry(id, "connection reset", at).unwrap();
        id
    };
    let (spool, report) = fx.open();
    assert_eq!(report.uploading_requeued, 0);
    assert_eq!(spool.next_due().unwrap(), Some(at));
    assert_eq!(state(&spool, id), "queued");
    assert_eq!(row_str(&spool, id, "attempts").as_deref(), Some("1"));
    assert_eq!(
        row_str(&spool, id, "last_error").as_deref(),
        Some("connection reset")
    );
    assert!(spool
        .claim_batch(1, u64::MAX, at - Duration::from_millis(1))
        .unwrap()
        .is_empty());
    assert_eq!(spool.claim_batch(1, u64::MAX, at).unwrap()[0].id, id);
}

#[test]
fn expedite_retries_makes_waiting_retries_due_but_leaves_new_and_failed_rows_alone() {
    let fx = Fixture::new();
    let spool = fx.spool();
    let ids = store_studies(&spool, &[("1.7.5", 100), ("1.7.5", 100), ("1.7.5", 100)]);
    let later = SystemTime::now() + 2 * HOUR;
    let claimed = spool.claim_batch(10, u64::MAX, far_future()).unwrap();
    spool.mark_retry(claimed[0].id, "503", later).unwrap();
    spool.mark_retry(claimed[1].id, "503", later).unwrap();
    spool.mark_failed(claimed[2].id, "409").unwrap();
    let now = SystemTime::now();
    assert!(spool.claim_batch(10, u64::MAX, now).unwrap().is_empty());
    assert_eq!(spool.expedite_retries(now).unwrap(), 2);
    let batch = spool.claim_batch(10, u64::MAX, now).unwrap();
    assert_eq!(batch.len(), 2, "both retries are due now");
    assert_eq!(
        state(&spool, ids[2]),
        "failed",
        "a failed row waits for the operator"
    );
    assert_eq!(spool.expedite_retries(now).unwrap(), 0);
}

#[test]
fn release_requeues_without_counting_an_attempt() {
    let fx = Fixture::new();
    let spool = fx.spool();
    let id = Inst::new("1.7.2", "1.7", 100, 301).stored_id(&spool);
    claim_one(&spool);
    spool.release(id).unwrap();
    assert_eq!(state(&spool, id), "queued");
    assert_eq!(claim_one(&spool).attempts, 0);
}

#[test]
fn requeue_leaves_a_failed_version_whose_correction_was_confirmed_since() {
    let fx = Fixture::new();
    let spool = fx.spool();
    let v1 = Inst::new("1.8.5", "1.8", 100, 401).stored_id(&spool);
    assert_eq!(
        ids(&spool.claim_batch(10, u64::MAX, far_future()).unwrap()),
        vec![v1]
    );
    spool.mark_failed(v1, "0xC000 refused").unwrap();
    let StoreOutcome::NewVersion { id: v2, .. } = Inst::new("1.8.5", "1.8", 100, 402).store(&spool)
    else {
        panic!("expected a new version");
    };
    // A failed version does not hold its correction back; the correction is confirmed.
    assert_eq!(
        ids(&spool.claim_batch(10, u64::MAX, far_future()).unwrap()),
        vec![v2]
    );
    spool.mark_sent(v2, false).unwrap();
    // Re-queued now, the original would reach the PACS after its correction.
    let other = Inst::new("1.9.1", "1.9", 100, 403).stored_id(&spool);
    claim_one(&spool);
    spool.mark_failed(other, "0xC000 refused").unwrap();
    let r = spool.requeue_failed(None).unwrap();
    assert_eq!((r.requeued, r.superseded), (1, 1));
    assert_eq!(state(&spool, v1), "failed");
    assert_eq!(state(&spool, other), "queued");
    let r = spool.requeue_failed(Some("1.8.5")).unwrap();
    assert_eq!((r.requeued, r.superseded), (0, 1));
    assert_eq!(state(&spool, v1), "failed");
}

#[test]
fn requeue_failed_brings_back_all_or_one_failed_instance() {
    let fx = Fixture::new();
    let spool = fx.spool();
    let ids = store_studies(&spool, &[("1.8", 100), ("1.8", 100), ("1.8", 100)]);
    for q in spool.claim_batch(10, u64::MAX, far_future()).unwrap() {
        spool.mark_failed(q.id, "409 Conflict").unwrap();
    }
    assert_eq!(spool.status(SystemTime::now()).unwrap().failed, 3);
    assert_eq!(spool.requeue_failed(Some("1.8.1")).unwrap().requeued, 1);
    assert_eq!(state(&spool, ids[1]), "queued");
    assert_eq!(state(&spool, ids[0]), "failed");
    assert_eq!(spool.requeue_failed(Some("9.9.9")).unwrap().requeued, 0);
    assert_eq!(spool.requeue_failed(None).unwrap().requeued, 2);
    assert_eq!(spool.requeue_failed(None).unwrap().requeued, 0);
    let batch = spool.claim_batch(10, u64::MAX, SystemTime::now()).unwrap();
    assert_eq!(batch.len(), 3, "re-queued rows are due now");
}

#[test]
fn state_changes_on_an_unknown_row_are_errors() {
    let fx = Fixture::new();
    let spool = fx.spool();
    let ghost = InstanceId(42);
    for result in [
        spool.mark_sent(ghost, false),
        spool.mark_retry(ghost, "x", SystemTime::now()),
        spool.mark_failed(ghost, "x"),
        spool.release(ghost),
    ] {
        assert!(matches!(result, Err(SpoolError::NoSuchRow { id: 42 })));
    }
}

#[test]
fn status_counts_states_duplicates_sizes_and_oldest_age() {
    let fx = Fixture::with(|c| c.retention_hours = 0);
    let spool = fx.spool();
    let insts: Vec<_> = (0..5)
        .map(|i| Inst::new(&format!("1.9.{i}"), "1.9", 10_000, 400 + i))
        .collect();
    let ids: Vec<_> = insts.iter().map(|i| i.stored_id(&spool)).collect();
    insts[0].store(&spool); // duplicate
                            // 0 → sent (redelivery, evicted at once), 1 → failed, 2 → uploading, 3 → lost, 4 queued.
    let batch = spool.claim_batch(3, u64::MAX, far_future()).unwrap();
    assert_eq!(batch.len(), 3);
    spool.mark_sent(ids[0], true).unwrap();
    spool.mark_failed(ids[1], "C000").unwrap();
    fs::remove_file(file_of(&fx, &spool, ids[3])).unwrap();
    let claimed = claim_one(&spool);
    assert!(spool.open_verified(&claimed).is_err());
    spool.release(ids[4]).unwrap();
    let uplink = UplinkState {
        paused_until: None,
        last_error: Some("401 Unauthorized".into()),
        last_error_at: Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_000)),
        last_success_at: Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_600_000_000_000)),
    };
    spool.set_uplink_state(&uplink).unwrap();

    let now = SystemTime::now() + Duration::from_secs(60);
    let status = spool.status(now).unwrap();
    let kept: Vec<_> = [1, 2, 4]
        .iter()
        .map(|&i| insts[i].raw().len() as u64)
        .collect();
    let stored: u64 = [1, 2, 4]
        .iter()
        .map(|&i| fs::metadata(file_of(&fx, &spool, ids[i])).unwrap().len())
        .sum();
    let age = status.oldest_queued_age.unwrap();
    assert!(
        age >= Duration::from_secs(60) && age < Duration::from_secs(120),
        "{age:?}"
    );
    assert_eq!(
        status,
        StatusReport {
            queued: 1,
            uploading: 1,
            sent: 1,
            failed: 1,
            lost: 1,
            quarantined: 0,
            evicted: 1,
            oldest_queued_age: Some(age),
            duplicates_received: 1,
            duplicates_upstream: 1,
            uplink: uplink.clone(),
            stored_bytes: stored,
            raw_bytes: kept.iter().sum(),
            // Nothing compacted them yet.
            awaiting_compaction: 3,
        }
    );
    assert_eq!(spool.uplink_state().unwrap(), uplink);
}

#[test]
fn uplink_state_survives_a_reopen() {
    let fx = Fixture::new();
    let paused = UplinkState {
        paused_until: Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_800_000_000_000)),
        ..UplinkState::default()
    };
    {
        let spool = fx.spool();
        assert_eq!(spool.uplink_state().unwrap(), UplinkState::default());
        spool.set_uplink_state(&paused).unwrap();
    }
    assert_eq!(fx.spool().uplink_state().unwrap(), paused);
}

#[test]
fn concurrent_identical_commits_store_one_row() {
    let fx = Fixture::new();
    let spool = fx.spool();
    let inst = Inst::new("1.10.1", "1.10", 100_000, 500);
    let outcomes: Vec<StoreOutcome> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4).map(|_| s.spawn(|| inst.store(&spool))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let stored = outcomes
        .iter()
        .filter(|o| matches!(o, StoreOutcome::Stored { .. }))
        .count();
    assert_eq!(stored, 1, "{outcomes:?}");
    let ids: BTreeSet<_> = outcomes
        .iter()
        .map(|o| match o {
            StoreOutcome::Stored { id } | StoreOutcome::Duplicate { id } => *id,
            StoreOutcome::NewVersion { id, .. } => *id,
        })
        .collect();
    assert_eq!(ids.len(), 1);
    assert_eq!(tmp_entries(&fx), 0);
    assert_eq!(read_all(&spool, &claim_one(&spool)).unwrap(), inst.raw());
}

#[test]
fn spool_handles_are_shareable_across_threads() {
    fn send_sync_clone<T: Send + Sync + Clone>() {}
    fn send<T: Send>() {}
    send_sync_clone::<Spool>();
    send::<Incoming>();
    send::<Written>();
    send::<InstanceReader>();
    let _ = Fixture::new().dir.path();
}

#[test]
fn hot_queries_use_an_index() {
    let fx = Fixture::new();
    let spool = fx.spool();
    let conn = spool.conn();
    for (sql, index) in [
        ("SELECT id FROM instances WHERE state = 'queued' AND next_attempt_at <= 5 ORDER BY next_attempt_at, id LIMIT 1", "instances_due"),
        ("SELECT id FROM instances WHERE study_instance_uid = 'x' AND state = 'queued' AND next_attempt_at <= 5 AND id != 3 ORDER BY next_attempt_at, id LIMIT 4", "instances_study"),
        ("SELECT i.id FROM instances i INDEXED BY instances_cache WHERE i.state = 'sent' AND i.evicted_at IS NULL AND i.sent_at <= 9 AND (i.sent_at, i.id) > (1, 2) ORDER BY i.sent_at, i.id LIMIT 5", "instances_cache"),
        ("SELECT id FROM instances WHERE sop_instance_uid = 'x' AND sha256 = 'y' AND state NOT IN ('lost', 'quarantined') ORDER BY id LIMIT 1", "instances_sop"),
    ] {
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap()
            .query_map([], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        let plan = plan.join(" | ");
        assert!(plan.contains(index) && !plan.contains("TEMP B-TREE"), "{sql}\n{plan}");
    }
}

#[test]
fn problems_lists_failed_lost_and_quarantined_instances_newest_first() {
    let fx = Fixture::new();
    let spool = fx.spool();
    let ids = store_studies(
        &spool,
        &[("1.11", 100), ("1.11", 100), ("1.11", 100), ("1.11", 100)],
    );
    let batch = spool.claim_batch(4, u64::MAX, far_future()).unwrap();
    spool.mark_failed(ids[0], "409 Conflict").unwrap();
    fs::remove_file(file_of(&fx, &spool, ids[1])).unwrap();
    fs::write(file_of(&fx, &spool, ids[2]), b"not zstd").unwrap();
    for q in &batch[1..3] {
        assert!(spool.open_verified(q).is_err());
    }
    spool.mark_sent(ids[3], false).unwrap();
    let problems = spool.problems(10).unwrap();
    let got: Vec<_> = problems.iter().map(|p| (p.id, p.state)).collect();
    assert_eq!(
        got,
        vec![
            (ids[2], InstanceState::Quarantined),
            (ids[1], InstanceState::Lost),
            (ids[0], InstanceState::Failed),
        ]
    );
    assert_eq!(problems[2].last_error.as_deref(), Some("409 Conflict"));
    assert_eq!(problems[2].attempts, 1);
    assert_eq!(spool.problems(1).unwrap().len(), 1);
}

#[test]
fn attach_shares_a_running_spool_without_recovery_and_refuses_a_missing_one() {
    let fx = Fixture::new();
    assert!(matches!(
        Spool::attach(&fx.cfg),
        Err(SpoolError::NotASpool { path }) if path == fx.path("spool.db")
    ));
    assert!(!fx.cfg.dir.exists(), "attach must not create a spool");
    let daemon = fx.spool();
    let ids = store_studies(&daemon, &[("1.12", 100), ("1.12", 100)]);
    let claimed = claim_one(&daemon);
    daemon.mark_failed(claimed.id, "C000").unwrap();
    claim_one(&daemon);
    let incoming = daemon
        .begin(Inst::new("1.12.9", "1.12", 10, 9).meta(), b"hdr")
        .unwrap();

    let tool = Spool::attach(&fx.cfg).unwrap();
    assert!(!tool.is_owner());
    let status = tool.status(SystemTime::now()).unwrap();
    assert_eq!((status.failed, status.uploading), (1, 1));
    assert_eq!(tool.requeue_failed(None).unwrap().requeued, 1);
    assert_eq!(state(&daemon, ids[0]), "queued");
    assert_eq!(state(&daemon, ids[1]), "uploading");
    assert_eq!(tmp_entries(&fx), 1);
    drop(incoming);
}

#[test]
fn a_schedule_set_by_a_wrong_clock_is_reset_at_start_up() {
    let fx = Fixture::new();
    let year_3000 = SystemTime::UNIX_EPOCH + Duration::from_secs(32_503_680_000);
    let (soon, wrong) = {
        let spool = fx.spool();
        let ids = store_studies(&spool, &[("1.13", 100), ("1.13", 100)]);
        for (id, at) in [(ids[0], SystemTime::now() + 2 * HOUR), (ids[1], year_3000)] {
            spool.claim_batch(1, u64::MAX, far_future()).unwrap();
            spool.mark_retry(id, "503", at).unwrap();
        }
        (ids[0], ids[1])
    };
    let before = to_ms(SystemTime::now());
    let spool = fx.spool();
    let due: Vec<_> = spool
        .claim_batch(10, u64::MAX, SystemTime::now())
        .unwrap()
        .iter()
        .map(|q| q.id)
        .collect();
    assert_eq!(due, vec![wrong]);
    let next: i64 = row_str(&spool, soon, "next_attempt_at")
        .unwrap()
        .parse()
        .unwrap();
    assert!(next > before + 3_600_000, "a plausible schedule is kept");
}

/// Simulates a disk of `capacity` bytes holding only the spool's objects.
fn simulate_disk(spool: &Spool, capacity: u64) {
    fn used(dir: &Path) -> u64 {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                if e.file_type().unwrap().is_dir() {
                    used(&e.path())
                } else {
                    e.metadata().unwrap().len()
                }
            })
            .sum()
    }
    *spool.inner.free_probe.lock().unwrap() = Some(Box::new(move |dir| {
        capacity.saturating_sub(used(&dir.join("objects")))
    }));
}

#[test]
fn low_space_evicts_oldest_sent_first_and_only_as_much_as_needed() {
    // 1 MiB kept free; eviction aims at 1 MiB more.
    let fx = Fixture::with(|c| {
        c.retention_hours = 10_000;
        c.min_free_mb = 1;
        c.evict_headroom_mb = 1;
        c.zstd_level = -5;
    });
    let spool = fx.spool();
    // Intake files hold the bytes as received (nothing is compacted here): each is about 400 KiB.
    let ids: Vec<_> = (0..8)
        .map(|i| Inst::new(&format!("1.14.{i}"), "1.14", 400 * 1024, 600 + i).stored_id(&spool))
        .collect();
    let size = fs::metadata(file_of(&fx, &spool, ids[0])).unwrap().len();
    // Send in the order 3, 1, 0, 2; 4..8 stay queued.
    for i in [3, 1, 0, 2] {
        spool.claim_batch(8, u64::MAX, far_future()).unwrap();
        spool.mark_sent(ids[i], false).unwrap();
        for id in &ids {
            if state(&spool, *id) == "uploading" {
                spool.release(*id).unwrap();
            }
        }
    }
    // 8 files on a disk leaving 1.5 MiB free: above the minimum, so storing needs no eviction...
    simulate_disk(&spool, 8 * size + 3 * MIB / 2);
    spool.ensure_space().unwrap();
    assert!(ids.iter().all(|id| file_of(&fx, &spool, *id).exists()));
    // ...but the periodic pass restores the headroom: two files, the two sent first.
    let report = spool.evict(SystemTime::now()).unwrap();
    assert_eq!(
        report,
        EvictReport {
            files: 2,
            bytes: 2 * size
        }
    );
    let present: Vec<bool> = ids
        .iter()
        .map(|id| file_of(&fx, &spool, *id).exists())
        .collect();
    assert_eq!(present, [true, false, true, false, true, true, true, true]);
    assert_eq!(
        spool.evict(SystemTime::now()).unwrap(),
        EvictReport::default()
    );

    // The disk fills up: every sent file goes, and that is not enough.
    simulate_disk(&spool, 6 * size + MIB / 10);
    assert!(matches!(
        spool.ensure_space(),
        Err(SpoolError::DiskFull { min_free_mb: 1, .. })
    ));
    let present: Vec<bool> = ids
        .iter()
        .map(|id| file_of(&fx, &spool, *id).exists())
        .collect();
    assert_eq!(
        present,
        [false, false, false, false, true, true, true, true]
    );
    assert_eq!(spool.status(SystemTime::now()).unwrap().queued, 4);
}

#[test]
fn a_file_damaged_after_verification_fails_the_read_instead_of_yielding_other_bytes() {
    for damage in ["truncate", "flip"] {
        let fx = Fixture::new();
        let spool = fx.spool();
        let inst = Inst::new("1.15.1", "1.15", 2 * 1024 * 1024, 700);
        let id = inst.stored_id(&spool);
        let path = file_of(&fx, &spool, id);
        let mut reader = spool.open_verified(&claim_one(&spool)).unwrap();
        let mut bytes = fs::read(&path).unwrap();
        match damage {
            "truncate" => bytes.truncate(bytes.len() / 2),
            _ => {
                let at = bytes.len() - 100;
                bytes[at] ^= 0xff;
            }
        }
        // Rewrite in place (same inode), as a failing disk would.
        File::options()
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap()
            .write_all(&bytes)
            .unwrap();
        let mut out = Vec::new();
        assert!(reader.read_to_end(&mut out).is_err(), "{damage}");
        assert_ne!(out, inst.raw(), "{damage}");
    }
}

#[test]
fn an_identical_resend_restores_the_missing_file_of_a_queued_instance() {
    let fx = Fixture::new();
    let spool = fx.spool();
    let inst = Inst::new("1.16.1", "1.16", 100_000, 800);
    let id = inst.stored_id(&spool);
    let file = file_of(&fx, &spool, id);
    let before = fs::read(&file).unwrap();
    fs::remove_file(&file).unwrap();
    // Sent in other PDVs: the same content in other raw blocks, so other bytes on disk.
    assert_eq!(
        inst.written_in(&spool, 100_000)
            .commit(inst.index())
            .unwrap(),
        StoreOutcome::Duplicate { id }
    );
    assert_eq!(tmp_entries(&fx), 0);
    assert_ne!(fs::read(&file).unwrap(), before);
    // The new file's digest is the row's: it is checked by it.
    let claimed = claim_one(&spool);
    assert_eq!(
        spool.open_verified(&claimed).unwrap().verified(),
        Verified::StoredDigest
    );
    assert_eq!(read_all(&spool, &claimed).unwrap(), inst.raw());
    // Once sent and evicted, a resend is a plain duplicate and leaves no file behind.
    spool.mark_sent(id, false).unwrap();
    spool.evict(far_future()).unwrap();
    assert!(!file_of(&fx, &spool, id).exists());
    assert_eq!(inst.store(&spool), StoreOutcome::Duplicate { id });
    assert!(!file_of(&fx, &spool, id).exists());
    assert_eq!(tmp_entries(&fx), 0);
}

#[test]
fn an_upload_cut_short_by_a_crash_counts_as_an_attempt_so_its_confirmation_counts_as_a_duplicate() {
    let fx = Fixture::new();
    let a = {
        let spool = fx.spool();
        let a = Inst::new("1.2.3.20", "1.2.3", 10_000, 20).stored_id(&spool);
        assert_eq!(claim_one(&spool).attempts, 0);
        a // crash: the row is left `uploading`, maybe already stored upstream
    };
    let (spool, report) = fx.open();
    assert_eq!(report.uploading_requeued, 1);
    let again = claim_one(&spool);
    assert_eq!((again.id, again.attempts), (a, 1));
    spool.mark_sent(a, again.attempts > 0).unwrap();
    let status = spool.status(SystemTime::now()).unwrap();
    assert_eq!((status.sent, status.duplicates_upstream), (1, 1));
}

// --- The spool's identity: a replaced `spool.db` is refused -------------------------------------

/// A spool with three real instances (rebuild-index can read them): one sent, two queued; closed.
fn spool_with_real_instances(fx: &Fixture) -> Vec<PathBuf> {
    let spool = fx.spool();
    let sent = crate::rebuild::tests::store(&spool, "1.2.3.1", "1.2.3");
    crate::rebuild::tests::store(&spool, "1.2.3.2", "1.2.3");
    crate::rebuild::tests::store(&spool, "1.2.4.1", "1.2.4");
    assert_eq!(claim_one(&spool).id, sent);
    spool.mark_sent(sent, false).unwrap();
    drop(spool);
    let files = rebuild::object_files(&fx.path("objects")).unwrap();
    assert_eq!(files.len(), 3);
    files
}

/// Puts `db` (a database file, closed cleanly) in place of the spool's, with no WAL beside it.
fn replace_database(fx: &Fixture, db: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = fs::remove_file(fx.path(&format!("spool.db{suffix}")));
    }
    fs::copy(db, fx.path("spool.db")).unwrap();
}

/// A valid SQLite database with nothing in it (as `sqlite3 x.db 'VACUUM'` leaves).
fn empty_database(at: &Path) -> PathBuf {
    let path = at.join("empty.db");
    let conn = Connection::open(&path).unwrap();
    conn.execute_batch("CREATE TABLE t (x); DROP TABLE t; VACUUM;")
        .unwrap();
    drop(conn);
    assert!(fs::metadata(&path).unwrap().len() > 0);
    path
}

fn spool_id_file(fx: &Fixture) -> Option<String> {
    fs::read_to_string(fx.path("spool.id"))
        .ok()
        .map(|s| s.trim().to_owned())
}

fn spool_id_in_db(fx: &Fixture) -> Option<String> {
    let conn = Connection::open(fx.path("spool.db")).unwrap();
    identity::read_db(&conn).unwrap()
}

fn check_foreign_refused(fx: &Fixture, files: &[PathBuf]) {
    let db_before = fs::read(fx.path("spool.db")).unwrap();
    let id_before = spool_id_file(fx);
    for _ in 0..2 {
        let refused = Spool::open(&fx.cfg).err().expect("open must refuse");
        assert!(
            matches!(refused, SpoolError::IndexForeign { .. }),
            "{refused}"
        );
        let message = refused.to_string();
        assert!(message.contains("rebuild-index"), "{message}");
        assert!(message.contains("Nothing was changed"), "{message}");
    }
    let attached = Spool::attach(&fx.cfg).err().expect("attach must refuse");
    assert!(
        matches!(attached, SpoolError::IndexForeign { .. }),
        "{attached}"
    );
    // Nothing was deleted, nothing was changed.
    assert!(files.iter().all(|f| f.exists()), "spool files kept");
    assert_eq!(fs::read(fx.path("spool.db")).unwrap(), db_before);
    assert_eq!(spool_id_file(fx), id_before);
}

#[test]
fn a_new_spool_has_one_random_id_in_its_database_and_in_spool_id() {
    let fx = Fixture::new();
    drop(fx.spool());
    let id = spool_id_file(&fx).expect("spool.id written at creation");
    assert_eq!(id.len(), 32);
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(spool_id_in_db(&fx).as_deref(), Some(id.as_str()));
    drop(fx.spool());
    assert_eq!(spool_id_file(&fx), Some(id.clone()), "stable across opens");
    let other = Fixture::new();
    drop(other.spool());
    assert_ne!(spool_id_file(&other), Some(id));
}

#[test]
fn a_spool_db_replaced_by_an_empty_database_is_refused_and_nothing_is_deleted() {
    let fx = Fixture::new();
    let files = spool_with_real_instances(&fx);
    replace_database(&fx, &empty_database(fx.dir.path()));
    check_foreign_refused(&fx, &files);
}

#[test]
fn a_spool_db_replaced_by_a_new_spools_empty_database_is_refused() {
    let fx = Fixture::new();
    let files = spool_with_real_instances(&fx);
    let fresh = Fixture::new();
    drop(fresh.spool());
    replace_database(&fx, &fresh.path("spool.db"));
    check_foreign_refused(&fx, &files);
}

#[test]
fn another_spools_database_with_a_queue_of_its_own_is_refused() {
    let fx = Fixture::new();
    let files = spool_with_real_instances(&fx);
    let other = Fixture::new();
    {
        let spool = other.spool();
        Inst::new("9.9.9.1", "9.9.9", 1000, 99).store(&spool);
    }
    replace_database(&fx, &other.path("spool.db"));
    check_foreign_refused(&fx, &files);
    // An old backup of this spool's database from before it had an id is refused the same way.
    let fx_id = spool_id_file(&fx).unwrap();
    let conn = Connection::open(fx.path("spool.db")).unwrap();
    conn.execute_batch("DROP TABLE meta").unwrap();
    drop(conn);
    check_foreign_refused(&fx, &files);
    assert_eq!(spool_id_file(&fx), Some(fx_id));
}

#[test]
fn rebuild_index_after_a_replaced_database_opens_with_every_instance_queued_under_the_spools_id() {
    let fx = Fixture::new();
    let files = spool_with_real_instances(&fx);
    let id = spool_id_file(&fx).unwrap();
    let empty = empty_database(fx.dir.path());
    replace_database(&fx, &empty);
    assert!(Spool::open(&fx.cfg).is_err());

    let report = Spool::rebuild_index(&fx.cfg).unwrap();
    assert_eq!((report.files, report.queued), (3, 3), "{report:?}");
    let previous = report.previous_database.clone().expect("kept aside");
    assert_eq!(fs::read(previous).unwrap(), fs::read(&empty).unwrap());
    assert_eq!(spool_id_file(&fx), Some(id.clone()));
    assert_eq!(spool_id_in_db(&fx), Some(id.clone()));

    let (spool, report) = fx.open();
    assert!(report.lost.is_empty());
    let status = spool.status(SystemTime::now()).unwrap();
    assert_eq!((status.queued, status.lost, status.quarantined), (3, 0, 0));
    let mut uids = BTreeSet::new();
    loop {
        let batch = spool.claim_batch(10, u64::MAX, SystemTime::now()).unwrap();
        if batch.is_empty() {
            break;
        }
        for inst in batch {
            read_all(&spool, &inst).unwrap();
            spool.mark_sent(inst.id, true).unwrap();
            uids.insert(inst.sop_instance_uid);
        }
    }
    assert_eq!(
        uids,
        ["1.2.3.1", "1.2.3.2", "1.2.4.1"]
            .map(String::from)
            .into_iter()
            .collect()
    );
    assert!(files.iter().all(|f| f.exists()));
    assert_eq!(spool_id_file(&fx), Some(id));
}

#[test]
fn a_rebuilt_index_sends_the_versions_of_one_uid_in_the_order_they_were_received() {
    let fx = Fixture::new();
    let spool = fx.spool();
    let store =
        |pixels| match crate::rebuild::tests::store_version(&spool, "1.2.3.9", "1.2.3", pixels) {
            StoreOutcome::Stored { id } | StoreOutcome::NewVersion { id, .. } => id,
            other => panic!("expected a stored version, got {other:?}"),
        };
    let (first, second) = (store(200_000), store(200_002));
    let (first_file, second_file) = (file_of(&fx, &spool, first), file_of(&fx, &spool, second));
    drop(spool);
    // File names do not follow the order of receipt (they are hashes or random): make the first
    // version's name the later one, and its time the earlier one.
    let (early, late) = (SystemTime::now() - 2 * HOUR, SystemTime::now() - HOUR);
    let (named_first, named_last) = if first_file < second_file {
        (&first_file, &second_file)
    } else {
        (&second_file, &first_file)
    };
    let mtime = |path: &Path, at| {
        fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(at)
            .unwrap();
    };
    mtime(named_last, early);
    mtime(named_first, late);
    let received_first = named_last.clone();

    replace_database(&fx, &empty_database(fx.dir.path()));
    let report = Spool::rebuild_index(&fx.cfg).unwrap();
    assert_eq!(report.queued, 2, "{report:?}");
    let (spool, _) = fx.open();
    let batch = spool.claim_batch(10, u64::MAX, SystemTime::now()).unwrap();
    assert_eq!(batch.len(), 1, "one version at a time");
    assert_eq!(
        file_of(&fx, &spool, batch[0].id),
        received_first,
        "the version received first goes first"
    );
}

#[test]
fn a_rebuild_cut_short_before_the_id_is_recorded_is_refused_at_the_next_start() {
    let fx = Fixture::new();
    let files = spool_with_real_instances(&fx);
    drop(Spool::rebuild_index(&fx.cfg).unwrap());
    // As if the rebuild had died after its rows, before recording the id.
    let conn = Connection::open(fx.path("spool.db")).unwrap();
    conn.execute_batch("DELETE FROM meta").unwrap();
    drop(conn);
    check_foreign_refused(&fx, &files);
    Spool::rebuild_index(&fx.cfg).unwrap();
    assert_eq!(fx.spool().status(SystemTime::now()).unwrap().queued, 3);
}

#[test]
fn a_missing_spool_id_file_is_written_again_from_the_database() {
    let fx = Fixture::new();
    spool_with_real_instances(&fx);
    let id = spool_id_file(&fx).unwrap();
    fs::remove_file(fx.path("spool.id")).unwrap();
    let spool = fx.spool();
    assert_eq!(spool_id_file(&fx), Some(id.clone()));
    assert_eq!(spool.status(SystemTime::now()).unwrap().queued, 2);
    drop(spool);
    assert_eq!(spool_id_in_db(&fx), Some(id));
}

#[test]
fn an_old_spool_without_ids_is_adopted_with_its_queue() {
    let fx = Fixture::new();
    spool_with_real_instances(&fx);
    // A spool made before ids: no spool.id, no meta table.
    fs::remove_file(fx.path("spool.id")).unwrap();
    let conn = Connection::open(fx.path("spool.db")).unwrap();
    conn.execute_batch("DROP TABLE meta").unwrap();
    drop(conn);
    let old_id = spool_id_in_db(&fx);
    assert_eq!(old_id, None);

    let spool = fx.spool();
    let status = spool.status(SystemTime::now()).unwrap();
    assert_eq!((status.queued, status.sent), (2, 1));
    drop(spool);
    let id = spool_id_file(&fx).expect("adopted: spool.id written");
    assert_eq!(spool_id_in_db(&fx), Some(id));
}

#[test]
fn an_old_spool_whose_database_was_replaced_by_an_empty_one_is_refused() {
    let fx = Fixture::new();
    let files = spool_with_real_instances(&fx);
    fs::remove_file(fx.path("spool.id")).unwrap();
    replace_database(&fx, &empty_database(fx.dir.path()));
    check_foreign_refused(&fx, &files);
    assert_eq!(spool_id_file(&fx), None, "nothing written");
    Spool::rebuild_index(&fx.cfg).unwrap();
    let id = spool_id_file(&fx).expect("rebuild gives the spool an id");
    assert_eq!(spool_id_in_db(&fx), Some(id));
    assert_eq!(fx.spool().status(SystemTime::now()).unwrap().queued, 3);
}

#[test]
fn an_empty_spool_whose_database_was_replaced_keeps_its_id() {
    let fx = Fixture::new();
    drop(fx.spool());
    let id = spool_id_file(&fx).unwrap();
    replace_database(&fx, &empty_database(fx.dir.path()));
    // No spool file, so nothing can be forgotten: the new database takes the spool's id.
    drop(fx.spool());
    assert_eq!(spool_id_in_db(&fx), Some(id.clone()));
    assert_eq!(spool_id_file(&fx), Some(id));
}

#[test]
fn a_damaged_spool_id_file_is_refused_with_the_fix() {
    let fx = Fixture::new();
    spool_with_real_instances(&fx);
    fs::write(fx.path("spool.id"), "not an id\n").unwrap();
    let refused = Spool::open(&fx.cfg).err().expect("open must refuse");
    assert!(
        matches!(refused, SpoolError::SpoolIdInvalid { .. }),
        "{refused}"
    );
    assert!(refused.to_string().contains("delete"), "{refused}");
    fs::remove_file(fx.path("spool.id")).unwrap();
    assert_eq!(fx.spool().status(SystemTime::now()).unwrap().queued, 2);
}

// -- compaction (`compact`) -------------------------------------------------------------------------

/// One integer from a query on the spool's database.
fn query_i64(spool: &Spool, sql: &str) -> i64 {
    spool.conn().query_row(sql, [], |r| r.get(0)).unwrap()
}

fn intake_count(spool: &Spool) -> i64 {
    query_i64(spool, "SELECT COUNT(*) FROM intake")
}

#[test]
fn an_instance_is_stored_as_received_then_compacted_in_place_with_the_same_content() {
    let fx = Fixture::new();
    let spool = fx.spool();
    // Smooth 16-bit samples with a little noise, like CT pixels: what the intake level hardly
    // compresses and level 1 does.
    let insts: Vec<_> = (0..3u64)
        .map(|i| {
            let mut inst = Inst::new(&format!("1.2.9.{i}"), "1.2.9", 0, 900 + i);
            let mut rng = rand::rngs::StdRng::seed_from_u64(900 + i);
            inst.dataset = (0..100_000u32)
                .flat_map(|x| {
                    let v = 1000 + (x % 512) as u16 + (rng.next_u32() % 8) as u16;
                    v.to_le_bytes()
                })
                .collect();
            inst
        })
        .collect();
    let ids: Vec<_> = insts.iter().map(|i| i.stored_id(&spool)).collect();
    // At intake the file is a checksummed zstd frame that stores the bytes about as they are.
    for (inst, id) in insts.iter().zip(&ids) {
        let stored = fs::read(file_of(&fx, &spool, *id)).unwrap();
        assert!(
            stored.len() >= inst.raw().len(),
            "intake files are not compressed"
        );
        assert_ne!(stored[4] & 0x04, 0, "zstd frame checksum must be on");
        assert_eq!(zstd::decode_all(stored.as_slice()).unwrap(), inst.raw());
    }
    let before = spool.status(SystemTime::now()).unwrap();
    assert_eq!(before.awaiting_compaction, 3);
    // A reader opened on the intake file keeps its bytes across the compaction.
    let early = claim_one(&spool);
    let mut early_reader = spool.open_verified(&early).unwrap();
    let paths: Vec<_> = ids.iter().map(|id| row_str(&spool, *id, "path")).collect();
    // Each file's time of receipt (set well apart from now) survives the compaction: rebuild-index
    // orders versions by it.
    let received: Vec<SystemTime> = (0..ids.len() as u32)
        .map(|i| SystemTime::now() - HOUR * (i + 2))
        .collect();
    for (id, at) in ids.iter().zip(&received) {
        fs::File::options()
            .write(true)
            .open(file_of(&fx, &spool, *id))
            .unwrap()
            .set_modified(*at)
            .unwrap();
    }

    let report = spool.compact_batch(10).unwrap();
    assert_eq!((report.compacted, report.skipped), (3, 0));
    assert!(
        report.bytes_after * 3 / 2 < report.bytes_before,
        "{report:?}"
    );
    assert_eq!(spool.compact_batch(10).unwrap(), CompactReport::default());
    let after = spool.status(SystemTime::now()).unwrap();
    assert_eq!(after.awaiting_compaction, 0);
    assert_eq!(after.raw_bytes, before.raw_bytes);
    assert_eq!(after.stored_bytes, report.bytes_after);
    for (i, (inst, id)) in insts.iter().zip(&ids).enumerate() {
        assert_eq!(
            row_str(&spool, *id, "path"),
            paths[i],
            "the path never changes"
        );
        let stored = fs::read(file_of(&fx, &spool, *id)).unwrap();
        assert_eq!(
            row_str(&spool, *id, "stored_size").unwrap(),
            stored.len().to_string()
        );
        assert_eq!(zstd::decode_all(stored.as_slice()).unwrap(), inst.raw());
        let mtime = fs::metadata(file_of(&fx, &spool, *id))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(mtime, received[i], "the time of receipt is kept");
    }
    let mut early_bytes = Vec::new();
    early_reader.read_to_end(&mut early_bytes).unwrap();
    assert_eq!(early_bytes, insts[0].raw());
    spool.release(early.id).unwrap();
    for inst in &insts {
        let claimed = claim_one(&spool);
        assert_eq!(read_all(&spool, &claimed).unwrap(), inst.raw());
        spool.mark_sent(claimed.id, false).unwrap();
    }
    assert_eq!(tmp_entries(&fx), 0);
}

#[test]
fn compaction_leaves_evicted_lost_and_mismatching_files_alone() {
    let fx = Fixture::with(|c| c.retention_hours = 0);
    let spool = fx.spool();
    let ids = store_and_send(&spool, 3, 1);
    // 0: sent and evicted, 1: its file is gone (lost at the next read), 2: content changed on disk.
    spool.evict(far_future()).unwrap();
    assert!(!file_of(&fx, &spool, ids[0]).exists());
    fs::remove_file(file_of(&fx, &spool, ids[1])).unwrap();
    let other = zstd::encode_all(&b"not this instance"[..], 1).unwrap();
    fs::write(file_of(&fx, &spool, ids[2]), &other).unwrap();

    let report = spool.compact_batch(10).unwrap();
    assert_eq!((report.compacted, report.skipped), (0, 3));
    assert_eq!(intake_count(&spool), 0);
    assert!(
        !file_of(&fx, &spool, ids[0]).exists(),
        "an evicted file came back"
    );
    assert!(!file_of(&fx, &spool, ids[1]).exists());
    assert_eq!(fs::read(file_of(&fx, &spool, ids[2])).unwrap(), other);
    assert_eq!(tmp_entries(&fx), 0);
}

#[test]
fn a_compaction_whose_row_was_not_recorded_is_done_again_harmlessly() {
    let fx = Fixture::new();
    let spool = fx.spool();
    let inst = Inst::new("1.2.9.9", "1.2.9", 150_000, 999);
    let id = inst.stored_id(&spool);
    assert_eq!(spool.compact_batch(1).unwrap().compacted, 1);
    // As after a crash between the rename and the row: listed again, the file already compacted.
    spool
        .conn()
        .execute("INSERT INTO intake (id) VALUES (?1)", [id.0])
        .unwrap();
    let report = spool.compact_batch(1).unwrap();
    assert_eq!(report.compacted, 1);
    assert_eq!(report.bytes_after, report.bytes_before);
    let claimed = claim_one(&spool);
    assert_eq!(read_all(&spool, &claimed).unwrap(), inst.raw());
}

#[test]
fn compaction_waits_for_a_pause_in_ingest_unless_the_backlog_crowds_the_disk() {
    let fx = Fixture::new();
    let spool = fx.spool();
    assert!(spool.compaction_due().unwrap(), "nothing stored yet: idle");
    Inst::new("1.2.9.20", "1.2.9", 100_000, 920).stored_id(&spool);
    *spool.inner.free_probe.lock().unwrap() = Some(Box::new(|_| 1 << 40));
    assert!(!spool.compaction_due().unwrap(), "an instance just arrived");
    // The intake backlog (about 100 kB) is more than an eighth of what is free: seen at the next
    // measurement (the last verdict holds for a few seconds).
    *spool.inner.free_probe.lock().unwrap() = Some(Box::new(|_| 400_000));
    assert!(!spool.compaction_due().unwrap());
    *spool.inner.backlog_verdict.lock().unwrap() = None;
    assert!(spool.compaction_due().unwrap());
    *spool.inner.free_probe.lock().unwrap() = Some(Box::new(|_| 1 << 40));
    *spool.inner.last_store.lock().unwrap() =
        Some(std::time::Instant::now() - compact::COMPACT_AFTER_PAUSE);
    assert!(spool.compaction_due().unwrap(), "ingest paused");
}

#[test]
fn a_rebuilt_index_lists_its_queued_files_for_compaction() {
    let fx = Fixture::new();
    let before = {
        let spool = fx.spool();
        crate::rebuild::tests::store(&spool, "1.2.9.30", "1.2.9");
        let b = crate::rebuild::tests::store(&spool, "1.2.9.31", "1.2.9");
        // One compacted, one still an intake file.
        spool
            .conn()
            .execute("DELETE FROM intake WHERE id != ?1", [b.0])
            .unwrap();
        assert_eq!(spool.compact_batch(10).unwrap().compacted, 1);
        spool.status(SystemTime::now()).unwrap()
    };
    for suffix in ["", "-wal", "-shm"] {
        let _ = fs::remove_file(fx.path(&format!("spool.db{suffix}")));
    }
    let rebuilt = Spool::rebuild_index(&fx.cfg).unwrap();
    assert_eq!(rebuilt.queued, 2, "{rebuilt:?}");
    let spool = fx.spool();
    assert_eq!(
        spool.status(SystemTime::now()).unwrap().awaiting_compaction,
        2
    );
    let report = spool.compact_batch(10).unwrap();
    assert_eq!(report.compacted, 2);
    let after = spool.status(SystemTime::now()).unwrap();
    assert_eq!(after.awaiting_compaction, 0);
    assert_eq!(after.raw_bytes, before.raw_bytes);
    assert!(
        after.stored_bytes < before.stored_bytes,
        "the intake file shrank"
    );
    // Both still read back whole and verified.
    for _ in 0..2 {
        let claimed = claim_one(&spool);
        assert_eq!(
            read_all(&spool, &claimed).unwrap().len() as u64,
            claimed.raw_size
        );
        spool.mark_sent(claimed.id, false).unwrap();
    }
}

// -- pre-created files (`pool`) ----------------------------------------------------------------------

fn pool_rows(spool: &Spool) -> Vec<String> {
    let conn = spool.conn();
    let mut stmt = conn.prepare("SELECT path FROM pool ORDER BY path").unwrap();
    let rows = stmt.query_map([], |r| r.get(0)).unwrap();
    rows.collect::<rusqlite::Result<_>>().unwrap()
}

fn synchronous(spool: &Spool) -> i64 {
    query_i64(spool, "PRAGMA synchronous")
}

#[test]
fn an_instance_goes_straight_into_a_precreated_file_whose_name_was_durable_before() {
    let fx = Fixture::new();
    let spool = fx.spool();
    assert_eq!(spool.refill_pool().unwrap(), pool::POOL_BATCH);
    let listed = pool_rows(&spool);
    assert_eq!(listed.len(), pool::POOL_BATCH);
    for rel in &listed {
        assert_eq!(fs::metadata(fx.path(rel)).unwrap().len(), 0);
        assert!(pool::is_pooled_name(&fx.path(rel)), "{rel}");
    }
    let inst = Inst::new("1.2.10.1", "1.2.10", 100_000, 1001);
    let id = inst.stored_id(&spool);
    let rel = row_str(&spool, id, "path").unwrap();
    assert!(listed.contains(&rel), "{rel} was not a pooled file");
    assert_eq!(
        pool_rows(&spool).len(),
        pool::POOL_BATCH - 1,
        "the file left the pool with the row"
    );
    assert_eq!(tmp_entries(&fx), 0, "no temporary file");
    // The NORMAL commit is for this one transaction only.
    assert_eq!(synchronous(&spool), 2, "back to synchronous=FULL");
    let claimed = claim_one(&spool);
    assert_eq!(read_all(&spool, &claimed).unwrap(), inst.raw());
    // Compaction rewrites it in place like any other file.
    assert_eq!(spool.compact_batch(10).unwrap().compacted, 1);
    assert_eq!(row_str(&spool, id, "path").unwrap(), rel);
}

#[test]
fn the_pool_listing_is_fsynced_through_the_wal_file_after_a_normal_commit() {
    let fx = Fixture::new();
    let spool = fx.spool();
    assert_eq!(spool.refill_pool().unwrap(), pool::POOL_BATCH);
    assert_eq!(synchronous(&spool), 2, "back to synchronous=FULL");
    // The listing's frames are in the WAL file that `sync_wal` fsyncs (not only in SQLite's cache).
    let wal = fx.path("spool.db-wal");
    let wal_bytes = fs::read(&wal).unwrap();
    let rel = pool_rows(&spool).pop().unwrap();
    let needle = rel.as_bytes();
    assert!(
        wal_bytes.windows(needle.len()).any(|w| w == needle),
        "{rel} is not in {}",
        wal.display()
    );
    db::sync_wal(&fx.path("spool.db")).unwrap();
    // Without a WAL file (a database left in rollback-journal mode) the database file is fsynced.
    let plain = fx.path("plain.db");
    fs::write(&plain, b"").unwrap();
    db::sync_wal(&plain).unwrap();
    assert!(db::sync_wal(&fx.path("missing.db")).is_err());
}

#[test]
fn created_pool_files_are_not_used_before_their_listing() {
    let fx = Fixture::new();
    let spool = fx.spool();
    // The creating half takes no lock and frees nothing: an instance stored meanwhile goes through a
    // temporary file, and nothing is listed.
    let batch = spool.create_pool_batch().unwrap().expect("the pool is low");
    assert!(pool_rows(&spool).is_empty());
    // A batch on its way to the listing counts: no second one is made meanwhile.
    assert!(!spool.pool_low());
    assert!(spool.create_pool_batch().unwrap().is_none());
    let first = Inst::new("1.2.10.7", "1.2.10", 10_000, 1007).stored_id(&spool);
    let first_path = row_str(&spool, first, "path").unwrap();
    assert!(
        !pool::is_pooled_name(&fx.path(&first_path)),
        "{first_path} is a pre-created file used before its listing"
    );
    assert_eq!(
        tmp_entries(&fx),
        0,
        "the temporary file was renamed into place"
    );
    // Listed, the batch is free: the next instance takes one of its files.
    assert_eq!(spool.list_pool_batch(batch).unwrap(), pool::POOL_BATCH);
    let listed = pool_rows(&spool);
    assert_eq!(listed.len(), pool::POOL_BATCH);
    let second = Inst::new("1.2.10.8", "1.2.10", 10_000, 1008).stored_id(&spool);
    assert!(listed.contains(&row_str(&spool, second, "path").unwrap()));
    // A batch dropped unlisted (the daemon stopping) no longer counts; its files stay empty.
    let unlisted = spool
        .create_pool_batch()
        .unwrap()
        .expect("below the low-water mark again");
    assert!(!spool.pool_low());
    drop(unlisted);
    assert!(spool.pool_low());
    // Topped up to the low-water mark or above, the pool wants nothing more.
    while spool.pool_low() {
        let batch = spool.create_pool_batch().unwrap().expect("the pool is low");
        spool.list_pool_batch(batch).unwrap();
    }
    assert!(pool_rows(&spool).len() >= pool::POOL_LOW);
    assert!(spool.create_pool_batch().unwrap().is_none());
}

#[test]
fn a_row_lost_with_the_wal_tail_is_taken_back_in_from_its_precreated_file() {
    let fx = Fixture::new();
    let (rel, whole) = {
        let spool = fx.spool();
        spool.refill_pool().unwrap();
        let id = crate::rebuild::tests::store(&spool, "1.2.10.2", "1.2.10");
        let rel = row_str(&spool, id, "path").unwrap();
        let claimed = claim_one(&spool);
        let whole = read_all(&spool, &claimed).unwrap();
        // What a power cut before the WAL's next fsync leaves: the file whole, the transaction gone.
        let conn = spool.conn();
        conn.execute("DELETE FROM intake WHERE id = ?1", [id.0])
            .unwrap();
        conn.execute("DELETE FROM instances WHERE id = ?1", [id.0])
            .unwrap();
        conn.execute("DELETE FROM file_digest WHERE id = ?1", [id.0])
            .unwrap();
        conn.execute("INSERT INTO pool (path) VALUES (?1)", [&rel])
            .unwrap();
        (rel, whole)
    };
    let (spool, report) = fx.open();
    assert_eq!(report.pooled_taken_in, 1);
    assert!(!pool_rows(&spool).contains(&rel));
    let claimed = claim_one(&spool);
    assert_eq!(claimed.sop_instance_uid, "1.2.10.2");
    assert_eq!(row_str(&spool, claimed.id, "path").unwrap(), rel);
    assert_eq!(row_str(&spool, claimed.id, "attempts").unwrap(), "0");
    assert_eq!(
        row_str(&spool, claimed.id, "study_instance_uid").unwrap(),
        "1.2.10"
    );
    // No digest came back with it: the content is checked in full.
    let mut reader = spool.open_verified(&claimed).unwrap();
    assert_eq!(reader.verified(), Verified::Content);
    let mut bytes = Vec::new();
    reader.read_to_end(&mut bytes).unwrap();
    assert_eq!(bytes, whole);
    assert_eq!(
        spool.status(SystemTime::now()).unwrap().awaiting_compaction,
        1
    );
    // Taken in once: a second start finds nothing more.
    drop(spool);
    assert_eq!(fx.open().1.pooled_taken_in, 0);
}

#[test]
fn a_precreated_file_cut_short_is_emptied_and_reused_and_never_queued() {
    let fx = Fixture::new();
    let (partial, whole_dup) = {
        let spool = fx.spool();
        spool.refill_pool().unwrap();
        let listed = pool_rows(&spool);
        let id = crate::rebuild::tests::store(&spool, "1.2.10.3", "1.2.10");
        let used = row_str(&spool, id, "path").unwrap();
        let free: Vec<_> = listed.iter().filter(|r| **r != used).cloned().collect();
        // One free file holds half an instance (a C-STORE cut off mid-way), another a whole copy of
        // the instance just stored (a duplicate whose file had not been emptied yet).
        let whole = fs::read(fx.path(&used)).unwrap();
        fs::write(fx.path(&free[0]), &whole[..whole.len() / 2]).unwrap();
        fs::write(fx.path(&free[1]), &whole).unwrap();
        (free[0].clone(), free[1].clone())
    };
    let (spool, report) = fx.open();
    assert_eq!(report.pooled_taken_in, 0);
    assert_eq!(fs::metadata(fx.path(&partial)).unwrap().len(), 0);
    assert!(
        pool_rows(&spool).contains(&partial),
        "emptied and still pooled"
    );
    assert!(
        !fx.path(&whole_dup).exists(),
        "the duplicate copy is removed"
    );
    assert!(!pool_rows(&spool).contains(&whole_dup));
    let status = spool.status(SystemTime::now()).unwrap();
    assert_eq!((status.queued, status.duplicates_received), (1, 0));
}

#[test]
fn a_refused_or_duplicate_instance_gives_its_precreated_file_back_empty() {
    let fx = Fixture::new();
    let spool = fx.spool();
    spool.refill_pool().unwrap();
    let inst = Inst::new("1.2.10.4", "1.2.10", 50_000, 1004);
    inst.stored_id(&spool);
    let before = pool_rows(&spool);
    // Received, then dropped (the dataset was refused): the file goes back, emptied.
    let mut incoming = spool.begin(inst.meta(), &inst.header).unwrap();
    incoming.write_all(&inst.dataset).unwrap();
    drop(incoming.finish().unwrap());
    // Received again whole: a duplicate, the file goes back too.
    assert!(matches!(inst.store(&spool), StoreOutcome::Duplicate { .. }));
    assert_eq!(pool_rows(&spool), before);
    for rel in &before {
        assert_eq!(fs::metadata(fx.path(rel)).unwrap().len(), 0, "{rel}");
    }
    assert_eq!(spool.status(SystemTime::now()).unwrap().queued, 1);
}

#[test]
fn rebuild_index_takes_whole_precreated_files_in_and_drops_empty_ones() {
    let fx = Fixture::new();
    {
        let spool = fx.spool();
        spool.refill_pool().unwrap();
        crate::rebuild::tests::store(&spool, "1.2.10.5", "1.2.10");
    }
    for suffix in ["", "-wal", "-shm"] {
        let _ = fs::remove_file(fx.path(&format!("spool.db{suffix}")));
    }
    let report = Spool::rebuild_index(&fx.cfg).unwrap();
    assert_eq!((report.files, report.queued), (1, 1), "{report:?}");
    assert!(report.quarantined.is_empty(), "{report:?}");
    let spool = fx.spool();
    let claimed = claim_one(&spool);
    assert_eq!(
        read_all(&spool, &claimed).unwrap().len() as u64,
        claimed.raw_size
    );
}

#[test]
fn a_spool_whose_only_files_are_empty_precreated_ones_is_not_missing_its_index() {
    let fx = Fixture::new();
    fx.spool().refill_pool().unwrap();
    for suffix in ["", "-wal", "-shm"] {
        let _ = fs::remove_file(fx.path(&format!("spool.db{suffix}")));
    }
    fs::remove_file(fx.path("spool.id")).unwrap();
    assert!(Spool::open(&fx.cfg).is_ok());
}

#[test]
fn a_lost_replacement_of_a_missing_file_is_redone_at_start_up() {
    let fx = Fixture::new();
    let whole = {
        let spool = fx.spool();
        spool.refill_pool().unwrap();
        let id = crate::rebuild::tests::store(&spool, "1.2.10.6", "1.2.10");
        let old = row_str(&spool, id, "path").unwrap();
        let claimed = claim_one(&spool);
        let whole = read_all(&spool, &claimed).unwrap();
        spool.release(claimed.id).unwrap();
        // Another file's digest than the new file's (as when the resend came in other PDVs).
        let old_digest = [0x5au8; 16].to_vec();
        // The queued instance's file disappears; the modality sends it again, which replaces it.
        fs::remove_file(fx.path(&old)).unwrap();
        assert!(matches!(
            crate::rebuild::tests::store_outcome(&spool, "1.2.10.6", "1.2.10"),
            StoreOutcome::Duplicate { .. }
        ));
        let new = row_str(&spool, id, "path").unwrap();
        assert_ne!(new, old);
        // A power cut loses that transaction: the row names the missing file (and has its digest),
        // the new file is pooled.
        let conn = spool.conn();
        conn.execute(
            "UPDATE instances SET path = ?2 WHERE id = ?1",
            params![id.0, old],
        )
        .unwrap();
        conn.execute(
            "UPDATE file_digest SET xxh3 = ?2 WHERE id = ?1",
            params![id.0, old_digest],
        )
        .unwrap();
        conn.execute("INSERT INTO pool (path) VALUES (?1)", [&new])
            .unwrap();
        whole
    };
    let (spool, report) = fx.open();
    assert_eq!(report.pooled_taken_in, 1);
    let claimed = claim_one(&spool);
    // The missing file's digest went with it: the new file's content is checked.
    assert_eq!(
        query_i64(
            &spool,
            &format!(
                "SELECT COUNT(*) FROM file_digest WHERE id = {}",
                claimed.id.0
            )
        ),
        0
    );
    let mut reader = spool.open_verified(&claimed).unwrap();
    assert_eq!(reader.verified(), Verified::Content);
    let mut bytes = Vec::new();
    reader.read_to_end(&mut bytes).unwrap();
    assert_eq!(bytes, whole);
    let status = spool.status(SystemTime::now()).unwrap();
    assert_eq!((status.uploading, status.lost, status.queued), (1, 0, 0));
}

#[test]
fn lingering_claim_waits_for_a_study_still_arriving_but_never_for_full_batches_or_retries() {
    let fx = Fixture::new();
    let spool = fx.spool();
    let ids = store_studies(&spool, &[("1.9.1", 100), ("1.9.1", 100), ("1.9.1", 100)]);
    let received =
        |id: InstanceId| from_ms(row_str(&spool, id, "received_at").unwrap().parse().unwrap());
    let (oldest, newest) = (received(ids[0]), received(ids[2]));
    let quiet = Linger {
        quiet: Duration::from_millis(150),
        max_wait: Duration::from_secs(1),
        workers: 1,
    };
    let claim = |max_count, now, linger| {
        spool
            .claim_batch_lingering(max_count, u64::MAX, now, linger)
            .unwrap()
    };

    // Short batch, newest instance just in: nothing claimed, look again when the study went quiet.
    match claim(10, newest, Some(quiet)) {
        Claim::Wait(at) => assert_eq!(at, newest + quiet.quiet),
        other => panic!("expected a wait, got {other:?}"),
    }
    assert!(
        ids.iter().all(|id| state(&spool, *id) == "queued"),
        "a wait claims nothing"
    );
    // A full batch goes at once (the first two; the third stays queued).
    match claim(2, newest, Some(quiet)) {
        Claim::Batch(b) => assert_eq!(b.iter().map(|q| q.id).collect::<Vec<_>>(), ids[..2]),
        other => panic!("expected a full batch, got {other:?}"),
    }
    spool.release(ids[0]).unwrap();
    spool.release(ids[1]).unwrap();
    // A study that keeps trickling in still goes once its oldest instance waited max_wait.
    let trickle = Linger {
        quiet: Duration::from_secs(3600),
        max_wait: Duration::from_secs(1),
        workers: 1,
    };
    match claim(10, newest, Some(trickle)) {
        Claim::Wait(at) => assert_eq!(at, oldest + trickle.max_wait),
        other => panic!("expected a wait, got {other:?}"),
    }
    match claim(10, oldest + trickle.max_wait, Some(trickle)) {
        Claim::Batch(b) => assert_eq!(b.len(), 3),
        other => panic!("expected the batch after max_wait, got {other:?}"),
    }
    // A retry is never held back, and without a linger nothing waits.
    spool.mark_retry(ids[0], "503", newest).unwrap();
    spool.release(ids[1]).unwrap();
    spool.release(ids[2]).unwrap();
    match claim(10, newest, Some(quiet)) {
        Claim::Batch(b) => assert_eq!(b.len(), 3, "{b:?}"),
        other => panic!("a batch with a retry must go at once, got {other:?}"),
    }
    for id in &ids {
        spool.release(*id).unwrap();
    }
    assert_eq!(spool.claim_batch(10, u64::MAX, newest).unwrap().len(), 3);
}

#[test]
fn the_end_of_a_quiet_backlog_is_split_evenly_among_the_workers() {
    let fx = Fixture::new();
    let spool = fx.spool();
    // 600 KB each: two make a request of at least MIN_SHARE_BYTES, one does not.
    let layout: Vec<(&str, usize)> = (0..12).map(|_| ("1.9.2", 600_000)).collect();
    let ids = store_studies(&spool, &layout);
    let newest = from_ms(
        row_str(&spool, ids[11], "received_at")
            .unwrap()
            .parse()
            .unwrap(),
    );
    let quiet_at = newest + Duration::from_secs(1);
    let linger = |workers| Linger {
        quiet: Duration::from_millis(150),
        max_wait: Duration::from_secs(1),
        workers,
    };
    let claim = |now, workers| match spool
        .claim_batch_lingering(10, u64::MAX, now, Some(linger(workers)))
        .unwrap()
    {
        Claim::Batch(b) => b.iter().map(|q| q.id).collect::<Vec<_>>(),
        other => panic!("expected a batch, got {other:?}"),
    };
    let release = |batch: &[InstanceId]| {
        for id in batch {
            spool.release(*id).unwrap();
        }
    };
    let sizes = |workers| {
        let (mut sizes, mut claimed) = (Vec::new(), Vec::new());
        while claimed.len() < ids.len() {
            let batch = claim(quiet_at, workers);
            sizes.push(batch.len());
            claimed.extend(batch);
        }
        assert_eq!(claimed, ids, "oldest first, each once");
        release(&claimed);
        sizes
    };

    // One worker: full batches.
    assert_eq!(sizes(1), [10, 2]);
    // A full batch of a study still arriving is not shortened: more of it is on its way.
    assert_eq!(claim(newest, 4), ids[..10]);
    release(&ids[..10]);
    // Twelve due for four workers: 3 each (12 / 4, then 9 / 4), then 6 / 4 = 2; below that, two
    // still go together (MIN_SHARE_BYTES), not one request each.
    assert_eq!(sizes(4), [3, 3, 2, 2, 2]);

    // Due instances of other studies count too: with enough of them, this study's batch is whole.
    let others: Vec<(&str, usize)> = (0..40).map(|_| ("1.9.3", 100)).collect();
    let others = store_studies(&spool, &others);
    assert_eq!(claim(quiet_at + Duration::from_secs(60), 4), ids[..10]);
    release(&ids[..10]);
    for id in &ids {
        let batch = spool.claim_batch(1, u64::MAX, far_future()).unwrap();
        assert_eq!(batch[0].id, *id);
        spool.mark_sent(*id, false).unwrap();
    }
    // Small instances are never split: the last ten of them go in one request.
    for id in &others[..30] {
        assert_eq!(
            spool.claim_batch(1, u64::MAX, far_future()).unwrap()[0].id,
            *id
        );
        spool.mark_sent(*id, false).unwrap();
    }
    assert_eq!(claim(quiet_at + Duration::from_secs(120), 4), others[30..]);
}

#[test]
fn the_object_directories_are_marked_to_be_spread_over_the_block_groups_before_they_are_made() {
    let fx = Fixture::new();
    // Whether this file system takes the flag at all (ext4, as on the box and in CI, does; tmpfs
    // does not, and the spool then works as usual).
    let scratch = fx.dir.path().join("scratch");
    fs::create_dir(&scratch).unwrap();
    let supported = files::spread_subdirectories(&scratch).unwrap();
    let spool = fx.spool();
    let objects = fx.path("objects");
    let flags = |p: &Path| rustix::fs::ioctl_getflags(File::open(p).unwrap());
    if supported {
        assert!(flags(&objects)
            .unwrap()
            .contains(rustix::fs::IFlags::TOPDIR));
        // Idempotent: a second start finds the flag set and keeps it.
        drop(spool);
        let _again = fx.spool();
        assert!(flags(&objects)
            .unwrap()
            .contains(rustix::fs::IFlags::TOPDIR));
    }
    for fan in 0..=255u8 {
        assert!(objects.join(format!("{fan:02x}")).is_dir());
    }
}

#[test]
fn an_intake_file_the_compactor_cannot_read_stays_as_it_is_and_the_files_after_it_are_compacted() {
    let fx = Fixture::new();
    let spool = fx.spool();
    let insts: Vec<_> = (0..3)
        .map(|k| Inst::new(&format!("1.2.7.{k}"), "1.2.7", 200_000, 70 + k))
        .collect();
    let ids: Vec<_> = insts.iter().map(|i| i.stored_id(&spool)).collect();
    // The oldest intake file cannot be read (a directory in its place reads as EISDIR, whoever runs
    // the test; a disk error does the same on a box).
    let first = file_of(&fx, &spool, ids[0]);
    fs::remove_file(&first).unwrap();
    fs::create_dir(&first).unwrap();

    let report = spool.compact_batch(10).unwrap();
    assert_eq!((report.compacted, report.skipped), (2, 1), "{report:?}");
    assert_eq!(
        spool.status(SystemTime::now()).unwrap().awaiting_compaction,
        0
    );
    for (inst, id) in insts.iter().zip(&ids).skip(1) {
        let stored = fs::read(file_of(&fx, &spool, *id)).unwrap();
        assert!(stored.len() < inst.raw().len(), "compacted");
        assert_eq!(zstd::decode_all(stored.as_slice()).unwrap(), inst.raw());
    }
    assert_eq!(
        state(&spool, ids[0]),
        "queued",
        "left for the uplink to verify"
    );
}

#[test]
fn compaction_never_takes_the_free_space_reserve() {
    let mut fx = Fixture::new();
    let inst = Inst::new("1.2.8.1", "1.2.8", 200_000, 81);
    let id = {
        let spool = fx.spool();
        inst.stored_id(&spool)
    };
    // The same spool, with a reserve larger than the disk: no copy may be started.
    fx.cfg.min_free_mb = 1 << 40;
    let spool = fx.spool();
    let before = fs::read(file_of(&fx, &spool, id)).unwrap();
    assert_eq!(spool.compact_batch(10).unwrap(), CompactReport::default());
    assert_eq!(
        spool.status(SystemTime::now()).unwrap().awaiting_compaction,
        1
    );
    assert_eq!(fs::read(file_of(&fx, &spool, id)).unwrap(), before);
    assert_eq!(
        fs::read_dir(fx.path("tmp")).unwrap().count(),
        0,
        "no copy was started"
    );
    // With room again, it is compacted.
    drop(spool);
    fx.cfg.min_free_mb = 0;
    let spool = fx.spool();
    assert_eq!(spool.compact_batch(10).unwrap().compacted, 1);
    assert_eq!(read_all(&spool, &claim_one(&spool)).unwrap(), inst.raw());
}

#[test]
fn a_clock_that_went_back_while_running_neither_stalls_retries_nor_holds_a_batch() {
    let fx = Fixture::new();
    let spool = fx.spool();
    // Received and scheduled while the clock ran a month ahead; `back` is the corrected clock.
    let ids = store_studies(&spool, &[("1.14", 100), ("1.15", 100), ("1.15", 100)]);
    let back = SystemTime::now() - 30 * 24 * HOUR;
    spool.claim_batch(1, u64::MAX, far_future()).unwrap();
    spool
        .mark_retry(ids[0], "503", SystemTime::now() + 2 * HOUR)
        .unwrap();
    let linger = Linger {
        quiet: Duration::from_secs(2),
        max_wait: Duration::from_secs(10),
        workers: 1,
    };
    // The retry, due "a month and two hours" from the corrected clock, is due now...
    let first = match spool
        .claim_batch_lingering(10, u64::MAX, back, Some(linger))
        .unwrap()
    {
        Claim::Batch(batch) => batch.iter().map(|q| q.id).collect::<Vec<_>>(),
        other => panic!("expected the rescheduled retry, got {other:?}"),
    };
    assert_eq!(first, vec![ids[0]]);
    let next: i64 = row_str(&spool, ids[0], "next_attempt_at")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        next,
        to_ms(back),
        "rescheduled to the corrected clock's now"
    );
    // ...and the short batch of a study "received in a month" does not wait for its quiet time.
    spool
        .mark_retry(ids[0], "503", back + Duration::from_secs(60))
        .unwrap();
    let second = match spool
        .claim_batch_lingering(10, u64::MAX, back, Some(linger))
        .unwrap()
    {
        Claim::Batch(batch) => batch.iter().map(|q| q.id).collect::<Vec<_>>(),
        other => panic!("expected the study's batch at once, got {other:?}"),
    };
    assert_eq!(second, vec![ids[1], ids[2]]);
    // A plausible schedule is kept: the retry a minute ahead is not due yet.
    assert!(spool.claim_batch(10, u64::MAX, back).unwrap().is_empty());
}
