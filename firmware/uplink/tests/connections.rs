//! Several upload connections (`uplink.connections`): batches go out side by side, an instance is
//! never in two requests at once, and a refusal or an outage still stops every worker.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::*;

impl Env {
    /// A stub that answers with `status` (200 or 202: every instance stored; else no body).
    async fn stub(&self, status: Arc<AtomicU16>) -> Stub {
        let server = self
            .ca
            .issue(self.dir.path(), "server", &["127.0.0.1"], false);
        Stub::start(&server, StubOptions::default(), move |seen| {
            match status.load(Ordering::SeqCst) {
                ok @ (200 | 202) => {
                    let uids: Vec<&str> = seen.uids.iter().map(String::as_str).collect();
                    Reply::json(ok, stow_json(&uids, &[]))
                }
                code => Reply::status(code),
            }
        })
        .await
    }
}

fn answering(status: u16) -> Arc<AtomicU16> {
    Arc::new(AtomicU16::new(status))
}

/// Stores one instance of its own study and waits until the uplink delivered it: the upstream is
/// proven, so every worker sends from now on.
async fn prove(spool: &passerelle_spool::Spool, stub: &Stub, running: &Running) {
    let raw = store(spool, "1.2.9.0", "1.2.9.0.1", 100);
    stub.knows(&raw, "1.2.9.0.1");
    running.wake.notify_one();
    wait_for("the first delivery", WAIT, || status(spool).sent == 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_go_out_side_by_side_and_each_instance_in_one_request_only() {
    let env = Env::new();
    let spool = spool_in(env.dir.path());
    let stub = env.stub(answering(200)).await;
    let mut cfg = uplink_config(&stub.url(), &env.ca);
    cfg.connections = 2;
    cfg.batch_max_instances = 5;
    let running = start(cfg, &spool);
    prove(&spool, &stub, &running).await;

    // The stub answers no request before two wait for their answers at once.
    stub.hold_answers_until_concurrent(2);
    let uids = store_study(&spool, &stub, 20, 2000);
    running.wake.notify_one();
    wait_for("all 21 sent", WAIT, || status(&spool).sent == 21).await;
    running.stop().await;

    assert!(
        stub.max_concurrent() >= 2,
        "two batches were in flight at once: {:?}",
        stub.seen()
    );
    assert!(
        stub.overlapping_uids().is_empty(),
        "{:?}",
        stub.overlapping_uids()
    );
    let mut sent: Vec<String> = stub.seen().into_iter().flat_map(|s| s.uids).collect();
    sent.sort();
    let mut want = uids;
    want.push("1.2.9.0.1".into());
    want.sort();
    assert_eq!(sent, want, "each instance in exactly one request");
    assert!(stub.seen().iter().all(|s| s.unknown_parts == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_version_of_an_instance_in_flight_waits_for_that_request() {
    let env = Env::new();
    let spool = spool_in(env.dir.path());
    let stub = env.stub(answering(200)).await;
    let mut cfg = uplink_config(&stub.url(), &env.ca);
    cfg.connections = 2;
    let running = start(cfg, &spool);
    prove(&spool, &stub, &running).await;

    // X is alone in its study; a second version of X (other bytes) heads another study, due next.
    let x = "1.2.9.7.1";
    stub.hold_answers_until_concurrent(2);
    let first = store(&spool, "1.2.9.7", x, 300);
    stub.knows(&first, x);
    let second = store(&spool, "1.2.9.8", x, 600);
    stub.knows(&second, x);
    let others: Vec<String> = (1..=3).map(|i| format!("1.2.9.8.{}", i + 1)).collect();
    for uid in &others {
        let raw = store(&spool, "1.2.9.8", uid, 100);
        stub.knows(&raw, uid);
    }
    running.wake.notify_one();
    wait_for("all 6 sent", WAIT, || status(&spool).sent == 6).await;
    running.stop().await;

    let seen = stub.seen();
    assert!(
        stub.max_concurrent() >= 2,
        "the two studies were in flight at once: {seen:?}"
    );
    assert!(
        stub.overlapping_uids().is_empty(),
        "{x} was in two requests at once: {seen:?}"
    );
    let with_x: Vec<_> = seen
        .iter()
        .filter(|s| s.uids.iter().any(|u| u == x))
        .collect();
    assert_eq!(
        with_x.len(),
        2,
        "each version of {x} in its own request: {seen:?}"
    );
    assert!(with_x
        .iter()
        .all(|s| s.uids.iter().filter(|u| *u == x).count() == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_refusal_pauses_every_worker() {
    let env = Env::new();
    let spool = spool_in(env.dir.path());
    let answer = answering(200);
    let stub = env.stub(answer.clone()).await;
    let mut cfg = uplink_config(&stub.url(), &env.ca);
    cfg.connections = 4;
    cfg.batch_max_instances = 2;
    let running = start(cfg, &spool);
    prove(&spool, &stub, &running).await;

    // The password is revoked while several requests are in flight.
    answer.store(401, Ordering::SeqCst);
    stub.hold_answers_until_concurrent(2);
    let started = SystemTime::now();
    store_study(&spool, &stub, 12, 100);
    running.wake.notify_one();
    wait_paused(&spool).await;
    let refused = stub.seen().len() - 1;
    assert!(
        (2..=4).contains(&refused),
        "the requests in flight (at most one per connection) were refused, no more: {refused}"
    );

    // No worker sends while paused, whatever wakes it (new arrivals, the poll interval).
    let quiet_until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < quiet_until {
        running.wake.notify_one();
        assert_eq!(
            stub.seen().len(),
            1 + refused,
            "a request went out while paused"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.stop().await;

    let state = spool.uplink_state().unwrap();
    assert!(state.last_error.unwrap().contains("HTTP 401"));
    assert!(state.paused_until.unwrap() >= started + Duration::from_secs(599));
    let rows = queued_rows(&spool);
    assert_eq!(rows.len(), 12, "nothing lost, nothing marked");
    assert!(
        rows.iter().all(|r| r.attempts == 0),
        "a pause counts no attempt"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_is_down_sees_one_request_at_a_time_spaced_by_the_backoff() {
    let env = Env::new();
    let spool = spool_in(env.dir.path());
    let answer = answering(503);
    let refused_at = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let server = env
        .ca
        .issue(env.dir.path(), "server", &["127.0.0.1"], false);
    let (code, log) = (answer.clone(), refused_at.clone());
    let stub = Stub::start(&server, StubOptions::default(), move |seen| {
        match code.load(Ordering::SeqCst) {
            200 => {
                let uids: Vec<&str> = seen.uids.iter().map(String::as_str).collect();
                Reply::json(200, stow_json(&uids, &[]))
            }
            other => {
                log.lock().unwrap().push(Instant::now());
                Reply::status(other)
            }
        }
    })
    .await;
    // Four studies, so that each worker would have a batch of its own.
    for s in 1..=4 {
        for i in 1..=2 {
            let (study, uid) = (format!("1.2.9.{s}"), format!("1.2.9.{s}.{i}"));
            let raw = store(&spool, &study, &uid, 100);
            stub.knows(&raw, &uid);
        }
    }
    let mut cfg = uplink_config(&stub.url(), &env.ca);
    cfg.connections = 4;
    cfg.retry_base_secs = 1;
    cfg.retry_max_secs = 120;
    let running = start(cfg, &spool);
    wait_for("three refused requests", WAIT, || {
        refused_at.lock().unwrap().len() >= 3
    })
    .await;
    assert_eq!(
        stub.max_concurrent(),
        1,
        "one probe at a time while the PACS is down"
    );
    let times = refused_at.lock().unwrap().clone();
    for pair in times.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(700),
            "every worker waits for the backoff (base 1 s, -20% jitter): {gap:?} in {times:?}"
        );
    }

    // The PACS is back: everything goes out.
    answer.store(200, Ordering::SeqCst);
    wait_for("all 8 sent", WAIT, || status(&spool).sent == 8).await;
    running.stop().await;
    assert!(stub.overlapping_uids().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_study_arriving_instance_by_instance_goes_out_in_full_batches() {
    let env = Env::new();
    let spool = spool_in(env.dir.path());
    let stub = env.stub(answering(200)).await;
    let mut cfg = uplink_config(&stub.url(), &env.ca);
    cfg.connections = 2;
    cfg.batch_max_instances = 5;
    let running = start(cfg, &spool);
    prove(&spool, &stub, &running).await;

    // A modality's pace: an instance every 10 ms, each waking the uplink as ingest does. Without
    // the linger, every arrival found an idle worker and went out alone (about 20 requests).
    let n = 20;
    for i in 1..=n {
        let uid = format!("{STUDY}.{i}");
        let raw = store(&spool, STUDY, &uid, 2000);
        stub.knows(&raw, &uid);
        running.wake.notify_one();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    wait_for("all 21 sent", WAIT, || status(&spool).sent == n + 1).await;
    running.stop().await;

    let sizes: Vec<usize> = stub.seen().iter().skip(1).map(|s| s.uids.len()).collect();
    assert_eq!(sizes.iter().sum::<usize>(), n as usize, "{sizes:?}");
    assert!(
        sizes.len() <= 6,
        "a study still arriving waits for full batches of 5: {sizes:?}"
    );
}
