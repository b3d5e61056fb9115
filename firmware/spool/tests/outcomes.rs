//! `Spool::record_outcomes`: the outcomes of one upload recorded in one transaction, each row
//! changed as the matching single call (`mark_sent`, `mark_retry`, `mark_failed`, `release`) does.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime};

use passerelle_config::SpoolConfig;
use passerelle_spool::{
    IncomingMeta, InstanceId, InstanceIndex, Outcome, QueuedInstance, Spool, StoreOutcome,
};

fn spool_in(dir: &std::path::Path) -> Spool {
    let cfg = SpoolConfig {
        dir: dir.join("spool"),
        min_free_mb: 0,
        retention_hours: 24,
        evict_headroom_mb: 0,
        zstd_level: 1,
    };
    Spool::open(&cfg).unwrap().0
}

fn store(spool: &Spool, uid: &str) {
    let meta = IncomingMeta {
        sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
        sop_instance_uid: uid.into(),
        transfer_syntax_uid: "1.2.840.10008.1.2.1".into(),
        calling_ae: "CT1".into(),
        peer: "127.0.0.1:40000".into(),
    };
    let mut header = vec![0u8; 128];
    header.extend_from_slice(b"DICM");
    let mut incoming = spool.begin(meta, &header).unwrap();
    incoming.write_all(uid.as_bytes()).unwrap();
    let index = InstanceIndex {
        study_instance_uid: "1.2.3".into(),
        series_instance_uid: "1.2.3.1".into(),
        patient_id: "P1".into(),
        modality: "CT".into(),
        accession_number: "A1".into(),
    };
    let outcome = incoming.finish().unwrap().commit(index).unwrap();
    assert!(
        matches!(outcome, StoreOutcome::Stored { .. }),
        "{outcome:?}"
    );
}

fn claim_all(spool: &Spool, at: SystemTime) -> Vec<QueuedInstance> {
    spool.claim_batch(100, u64::MAX, at).unwrap()
}

#[test]
fn each_outcome_changes_its_row_as_the_single_call_would_in_one_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let spool = spool_in(dir.path());
    for i in 1..=5 {
        store(&spool, &format!("1.2.3.1.{i}"));
    }
    let batch = claim_all(&spool, SystemTime::now());
    assert_eq!(batch.len(), 5);
    let id = |i: usize| batch[i].id;
    let later = SystemTime::now() + Duration::from_secs(3600);
    let gone = InstanceId(999_999);
    let outcomes = vec![
        (id(0), Outcome::Sent { redelivery: false }),
        (id(1), Outcome::Sent { redelivery: true }),
        (
            id(2),
            Outcome::Retry {
                error: "HTTP 503".into(),
                next_attempt_at: later,
            },
        ),
        (
            id(3),
            Outcome::Failed {
                reason: "0xC000".into(),
            },
        ),
        (id(4), Outcome::Release),
        (gone, Outcome::Release),
    ];
    assert_eq!(spool.record_outcomes(&outcomes).unwrap(), vec![gone]);

    let s = spool.status(SystemTime::now()).unwrap();
    assert_eq!((s.sent, s.failed, s.queued, s.uploading), (2, 1, 2, 0));
    assert_eq!(s.duplicates_upstream, 1, "the re-delivery is counted");
    // Released: due now, no attempt counted. Retried: one attempt, due only at its time.
    let due_now = claim_all(&spool, SystemTime::now());
    assert_eq!(due_now.len(), 1);
    assert_eq!((due_now[0].id, due_now[0].attempts), (id(4), 0));
    let due_later = claim_all(&spool, later);
    assert_eq!(due_later.len(), 1);
    assert_eq!((due_later[0].id, due_later[0].attempts), (id(2), 1));

    // A row in another state is left as it is: a release does not un-send an instance.
    spool
        .record_outcomes(&[(id(0), Outcome::Release), (id(4), Outcome::Release)])
        .unwrap();
    let s = spool.status(SystemTime::now()).unwrap();
    assert_eq!((s.sent, s.failed, s.queued, s.uploading), (2, 1, 1, 1));
}
