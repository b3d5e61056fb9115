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
                refused: false,
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

#[test]
fn refusals_by_name_are_counted_apart_from_attempts_and_forgotten_once_decided() {
    let dir = tempfile::tempdir().unwrap();
    let spool = spool_in(dir.path());
    for i in 1..=3 {
        store(&spool, &format!("1.2.3.1.{i}"));
    }
    let retry = |refused: bool| Outcome::Retry {
        error: "x".into(),
        next_attempt_at: SystemTime::now(),
        refused,
    };
    let due = || SystemTime::now() + Duration::from_secs(1);
    let ids: Vec<InstanceId> = claim_all(&spool, due()).iter().map(|i| i.id).collect();
    // Round 1: an outage for all three. Round 2: 1 and 2 refused by name, 3 left out of the answer.
    // Round 3: 1 refused again, 2 confirmed, 3 failed.
    spool
        .record_outcomes(&ids.iter().map(|id| (*id, retry(false))).collect::<Vec<_>>())
        .unwrap();
    let claimed = claim_all(&spool, due());
    assert!(claimed.iter().all(|i| i.attempts == 1 && i.refusals == 0));
    spool
        .record_outcomes(&[
            (ids[0], retry(true)),
            (ids[1], retry(true)),
            (ids[2], retry(false)),
        ])
        .unwrap();
    let claimed = claim_all(&spool, due());
    let counts: Vec<(u32, u32)> = claimed.iter().map(|i| (i.attempts, i.refusals)).collect();
    assert_eq!(counts, vec![(2, 1), (2, 1), (2, 0)]);
    spool
        .record_outcomes(&[
            (ids[0], retry(true)),
            (ids[1], Outcome::Sent { redelivery: true }),
            (ids[2], Outcome::Failed { reason: "y".into() }),
        ])
        .unwrap();
    let claimed = claim_all(&spool, due());
    assert_eq!(claimed.len(), 1);
    assert_eq!((claimed[0].attempts, claimed[0].refusals), (3, 2));
    spool.mark_failed(ids[0], "z").unwrap();
    // Decided rows keep no count: re-queued, both start again from none.
    assert_eq!(spool.requeue_failed(None).unwrap().requeued, 2);
    let claimed = claim_all(&spool, due());
    assert_eq!(claimed.len(), 2);
    assert!(claimed.iter().all(|i| i.attempts == 0 && i.refusals == 0));
    drop(spool);
    let conn = rusqlite::Connection::open(dir.path().join("spool").join("spool.db")).unwrap();
    let left: i64 = conn
        .query_row("SELECT COUNT(*) FROM refusals", [], |r| r.get(0))
        .unwrap();
    assert_eq!(left, 0);
}
