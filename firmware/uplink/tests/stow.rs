//! End to end: a real spool in a temporary directory, `Uplink::run`, and a local HTTPS STOW-RS stub
//! that parses the multipart body, checks every part's bytes against what was stored, and answers
//! as scripted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::*;

impl Env {
    fn server_leaf(&self) -> Leaf {
        self.ca
            .issue(self.dir.path(), "server", &["127.0.0.1"], false)
    }

    async fn stub(&self, handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Stub {
        Stub::start(&self.server_leaf(), StubOptions::default(), handler).await
    }

    /// A PACS that is down (HTTP 503) for its first `outage` requests, then answers as `handler`.
    async fn stub_after_outage(
        &self,
        outage: usize,
        handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static,
    ) -> Stub {
        let calls = std::sync::atomic::AtomicUsize::new(0);
        self.stub(move |seen| {
            if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < outage {
                Reply::status(503)
            } else {
                handler(seen)
            }
        })
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_instance_of_a_delivered_batch_gets_the_outcome_the_pacs_gave_it() {
    let env = Env::new();
    let spool = spool_in(env.dir.path());
    let stub = env
        .stub(|seen| {
            // Stored: all but .3 (refused for good, 0xC000) and .4 (not mentioned at all).
            let stored: Vec<&str> = seen
                .uids
                .iter()
                .map(String::as_str)
                .filter(|u| !u.ends_with(".3") && !u.ends_with(".4"))
                .collect();
            let failed: Vec<(&str, u16)> = seen
                .uids
                .iter()
                .filter(|u| u.ends_with(".3"))
                .map(|u| (u.as_str(), 0xC000))
                .collect();
            Reply::json(202, stow_json(&stored, &failed))
        })
        .await;
    let mut uids = store_study(&spool, &stub, 4, 1000);
    // One instance larger than a read chunk, to stream it in pieces.
    let big_uid = format!("{STUDY}.5");
    let big = store(&spool, STUDY, &big_uid, 700 * 1024);
    stub.knows(&big, &big_uid);
    uids.push(big_uid);

    let before = SystemTime::now();
    let running = start(uplink_config(&stub.url(), &env.ca), &spool);
    wait_for("3 sent, 1 failed, 1 queued", WAIT, || {
        let s = status(&spool);
        s.sent == 3 && s.failed == 1 && s.queued == 1 && s.uploading == 0
    })
    .await;
    running.stop().await;

    let seen = stub.seen();
    assert_eq!(seen.len(), 1, "one request for the batch");
    let req = &seen[0];
    assert_eq!(
        req.uids, uids,
        "every part arrived byte-identical, in order"
    );
    assert_eq!(req.unknown_parts, 0);
    assert!(req.malformed.is_none());
    assert!(req
        .part_content_types
        .iter()
        .all(|c| c == "application/dicom"));
    assert!(
        req.content_type
            .starts_with("multipart/related; type=\"application/dicom\"; boundary="),
        "{}",
        req.content_type
    );
    assert_eq!(
        req.accept,
        "application/dicom+json, application/dicom+xml;q=0.9"
    );
    assert_eq!(
        req.authorization.as_deref(),
        Some("Basic cGFzc2VyZWxsZTpzZWNyZXQ=")
    );

    let problems = spool.problems(10).unwrap();
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].sop_instance_uid, format!("{STUDY}.3"));
    let reason = problems[0].last_error.clone().unwrap_or_default();
    assert!(reason.contains("0xC000"), "{reason}");

    // The unconfirmed one waits for its backoff (30 s ± 20%).
    let due = spool.next_due().unwrap().unwrap();
    assert!(
        due >= before + Duration::from_secs(24),
        "retry scheduled too early"
    );
    let rows = queued_rows(&spool);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].sop_instance_uid, format!("{STUDY}.4"));
    assert_eq!(rows[0].attempts, 1);

    let state = spool.uplink_state().unwrap();
    assert!(state.last_success_at.is_some());
    assert!(state.paused_until.is_none());
}

/// A 200 whose STOW-RS response, in XML, lists `uids` in ReferencedSOPSequence.
fn xml_confirming(uids: &[String]) -> Reply {
    let items: String = uids
        .iter()
        .map(|u| {
            format!(
                r#"<Item number="1"><DicomAttribute tag="00081155" vr="UI"><Value number="1">{u}</Value></DicomAttribute></Item>"#
            )
        })
        .collect();
    Reply {
        status: 200,
        headers: vec![("Content-Type".into(), "application/dicom+xml".into())],
        body: format!(
            r#"<?xml version="1.0"?><NativeDicomModel><DicomAttribute tag="00081199" vr="SQ">{items}</DicomAttribute></NativeDicomModel>"#
        ),
        hang: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_xml_response_confirms_instances_too() {
    let env = Env::new();
    let spool = spool_in(env.dir.path());
    let stub = env.stub(|seen| xml_confirming(&seen.uids)).await;
    store_study(&spool, &stub, 3, 500);
    let running = start(uplink_config(&stub.url(), &env.ca), &spool);
    wait_for("3 sent", WAIT, || status(&spool).sent == 3).await;
    running.stop().await;
}

/// A PACS that produces its STOW-RS response only as XML answers 406 to a request that accepts only
/// JSON: the uplink accepts both, and such a PACS confirms the instances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pacs_answering_only_in_xml_is_asked_for_xml_too_and_confirms_instances() {
    let env = Env::new();
    let spool = spool_in(env.dir.path());
    let stub = env
        .stub(|seen| {
            if !seen.accept.contains("application/dicom+xml") {
                return Reply::status(406);
            }
            xml_confirming(&seen.uids)
        })
        .await;
    store_study(&spool, &stub, 3, 500);
    let running = start(uplink_config(&stub.url(), &env.ca), &spool);
    wait_for("3 sent", WAIT, || status(&spool).sent == 3).await;
    running.stop().await;
    assert_eq!(stub.seen().len(), 1, "one request, answered in XML");
    assert!(spool.uplink_state().unwrap().paused_until.is_none());
}

/// A PACS that produces neither JSON nor XML answers 406: the uplink pauses and says so, instead of
/// calling uplink.stow_url no STOW-RS endpoint; nothing is failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pacs_offering_neither_json_nor_xml_pauses_the_uplink_saying_so() {
    let env = Env::new();
    let spool = spool_in(env.dir.path());
    let stub = env.stub(|_| Reply::status(406)).await;
    store_study(&spool, &stub, 2, 100);
    let running = start(uplink_config(&stub.url(), &env.ca), &spool);
    wait_paused(&spool).await;
    running.stop().await;
    assert_eq!(stub.seen().len(), 1, "no retry before the pause ends");
    let error = spool.uplink_state().unwrap().last_error.unwrap();
    assert!(
        error.contains("HTTP 406")
            && error.contains("neither as application/dicom+json nor as application/dicom+xml"),
        "{error}"
    );
    let s = status(&spool);
    assert_eq!((s.queued, s.sent, s.failed), (2, 0, 0));
}

/// An answer longer than the 1 MiB the uplink reads is cut there: it confirms nothing, and the
/// error says it was cut rather than quoting the parser's end of input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_longer_than_1_mib_is_cut_and_said_to_be() {
    let env = Env::new();
    let spool = spool_in(env.dir.path());
    let stub = env
        .stub(|seen| {
            let uids: Vec<&str> = seen.uids.iter().map(String::as_str).collect();
            // A STOW-RS response confirming every instance, then 2 MiB of Retrieve URL.
            let whole = stow_json(&uids, &[]);
            let body = format!(
                r#"{}, "00081190": {{"vr": "UR", "Value": ["https://pacs/{}"]}}}}"#,
                whole.strip_suffix('}').unwrap(),
                "x".repeat(2 * 1024 * 1024)
            );
            Reply::json(200, body)
        })
        .await;
    store_study(&spool, &stub, 2, 100);
    let running = start(uplink_config(&stub.url(), &env.ca), &spool);
    wait_paused(&spool).await;
    running.stop().await;
    let error = spool.uplink_state().unwrap().last_error.unwrap();
    assert!(
        error.contains("the PACS's answer was longer than 1 MiB; cut there"),
        "{error}"
    );
    let s = status(&spool);
    assert_eq!((s.queued, s.sent, s.failed), (2, 0, 0));
}

/// `uplink.auth_pause_secs = 0`, had it bypassed validation, would repeat a refused request in a
/// tight loop: the pause is at least 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_auth_pause_still_pauses_instead_of_looping() {
    let env = Env::new();
    let spool = spool_in(env.dir.path());
    let stub = env.stub(|_| Reply::status(401)).await;
    store_study(&spool, &stub, 2, 100);
    let mut cfg = uplink_config(&stub.url(), &env.ca);
    cfg.auth_pause_secs = 0;
    let started = SystemTime::now();
    let running = start(cfg, &spool);
    wait_paused(&spool).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    running.stop().await;
    assert_eq!(stub.seen().len(), 1, "one refused request, no loop");
    let until = spool.uplink_state().unwrap().paused_until.unwrap();
    assert!(until >= started + Duration::from_secs(9), "{until:?}");
}

/// `uplink.auth_pause_secs` too large for the clock panicked the worker when it computed the pause
/// (the rows stayed `uploading` until a restart): the pause is a day at most.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_auth_pause_is_a_day_and_does_not_panic_the_worker() {
    let env = Env::new();
    let spool = spool_in(env.dir.path());
    let stub = env.stub(|_| Reply::status(401)).await;
    store_study(&spool, &stub, 2, 100);
    let mut cfg = uplink_config(&stub.url(), &env.ca);
    cfg.auth_pause_secs = u64::MAX;
    let started = SystemTime::now();
    let running = start(cfg, &spool);
    wait_paused(&spool).await;
    running.stop().await;
    const DAY: Duration = Duration::from_secs(86_400);
    let until = spool.uplink_state().unwrap().paused_until.unwrap();
    assert!(
        until >= started + DAY - Duration::from_secs(1)
            && until <= SystemTime::now() + DAY + Duration::from_secs(1),
        "{until:?}"
    );
    assert_eq!(status(&spool).queued, 2);
}

/// Backoff settings too large for the clock panicked the worker when it scheduled a retry: the
/// backoff is a day at most.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_backoff_settings_schedule_a_retry_within_a_day_without_panicking() {
    let env = Env::new();
    let spool = spool_in(env.dir.path());
    let stub = env.stub(|_| Reply::status(503)).await;
    store_study(&spool, &stub, 2, 100);
    let mut cfg = uplink_config(&stub.url(), &env.ca);
    cfg.retry_base_secs = u64::MAX;
    cfg.retry_max_secs = u64::MAX;
    let running = start(cfg, &spool);
    wait_for("the batch back in the queue", WAIT, || {
        let s = status(&spool);
        s.queued == 2 && s.uploading == 0 && s.uplink.last_error.is_some()
    })
    .await;
    running.stop().await;
    let due = spool.next_due().unwrap().unwrap();
    assert!(
        due <= SystemTime::now() + Duration::from_secs(86_400),
        "{due:?}"
    );
    assert_eq!(stub.seen().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_success_status_without_confirmation_sends_nothing_as_sent() {
    let env = Env::new();
    let spool = spool_in(env.dir.path());
    let stub = env.stub(|_| Reply::json(200, stow_json(&[], &[]))).await;
    store_study(&spool, &stub, 2, 100);
    let running = start(uplink_config(&stub.url(), &env.ca), &spool);
    wait_for("the batch back in the queue", WAIT, || {
        let s = status(&spool);
        s.queued == 2 && s.uplink.last_error.is_some()
    })
    .await;
    running.stop().await;
    assert_eq!(status(&spool).sent, 0);
    assert!(queued_rows(&spool).iter().all(|r| r.attempts == 1));
}

/// Starts the uplink against a stub whose certificate must be refused; checks the pause.
async fn check_refused_server_certificate(env: &Env, server: Leaf, expect_in_error: &str) {
    let spool = spool_in(env.dir.path());
    let stub = Stub::start(&server, StubOptions::default(), |_| {
        Reply::json(200, "{}".into())
    })
    .await;
    store_study(&spool, &stub, 2, 100);
    let started = SystemTime::now();
    let running = start(uplink_config(&stub.url(), &env.ca), &spool);
    wait_paused(&spool).await;
    running.stop().await;

    assert!(stub.seen().is_empty(), "nothing reached the server");
    assert_eq!(stub.tls_failures(), 1, "one handshake, no retry loop");
    let state = spool.uplink_state().unwrap();
    let error = state.last_error.unwrap();
    assert!(error.contains(expect_in_error), "{error}");
    assert!(
        error.contains("uplink.ca_file"),
        "the error says what to fix: {error}"
    );
    let paused_until = state.paused_until.unwrap();
    assert!(paused_until >= started + Duration::from_secs(599));
    let s = status(&spool);
    assert_eq!((s.queued, s.sent, s.failed), (2, 0, 0));
    assert!(
        queued_rows(&spool).iter().all(|r| r.attempts == 0),
        "a pause does not count an attempt"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_from_another_ca_is_refused_and_pauses_the_uplink() {
    let env = Env::new();
    let other = Ca::new(env.dir.path(), "other");
    let server = other.issue(env.dir.path(), "server", &["127.0.0.1"], false);
    check_refused_server_certificate(&env, server, "UnknownIssuer").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_for_another_host_name_is_refused() {
    let env = Env::new();
    let server = env
        .ca
        .issue(env.dir.path(), "server", &["pacs.example.org"], false);
    check_refused_server_certificate(&env, server, "not valid for name").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthorized_pauses_the_uplink_without_counting_an_attempt() {
    let env = Env::new();
    let spool = spool_in(env.dir.path());
    let stub = env.stub(|_| Reply::status(401)).await;
    store_study(&spool, &stub, 3, 100);
    let started = SystemTime::now();
    let running = start(uplink_config(&stub.url(), &env.ca), &spool);
    wait_paused(&spool).await;
    // A wake-up (new instance stored) does not end the pause.
    running.wake.notify_one();
    running.stop().await;

    assert_eq!(stub.seen().len(), 1, "no retry before the pause ends");
    let state = spool.uplink_state().unwrap();
    let error = state.last_error.unwrap();
    assert!(
        error.contains("HTTP 401") && error.contains("uplink.username"),
        "{error}"
    );
    assert!(state.paused_until.unwrap() >= started + Duration::from_secs(599));
    let rows = queued_rows(&spool);
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(|r| r.attempts == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_left_by_a_previous_run_is_cleared_at_start() {
    let env = Env::new();
    let spool = spool_in(env.dir.path());
    let stub = env
        .stub(|seen| {
            let uids: Vec<&str> = seen.uids.iter().map(String::as_str).collect();
            Reply::json(200, stow_json(&uids, &[]))
        })
        .await;
    store_study(&spool, &stub, 1, 100);
    spool
        .set_uplink_state(&passerelle_spool::UplinkState {
            paused_until: Some(SystemTime::now() + Duration::from_secs(3600)),
            last_error: Some("The PACS refused our credentials".into()),
            ..Default::default()
        })
        .unwrap();
    let running = start(uplink_config(&stub.url(), &env.ca), &spool);
    wait_for("the instance sent", WAIT, || status(&spool).sent == 1).await;
    running.stop().await;
    assert!(spool.uplink_state().unwrap().paused_until.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_unavailable_with_retry_after_is_retried_no_earlier_than_asked() {
    let env = Env::new();
    let spool = spool_in(env.dir.path());
    let stub = env
        .stub(|_| Reply::status(503).header("Retry-After", "120"))
        .await;
    store_study(&spool, &stub, 2, 100);
    let mut cfg = uplink_config(&stub.url(), &env.ca);
    cfg.retry_base_secs = 1;
    let before = SystemTime::now();
    let running = start(cfg, &spool);
    wait_for("the batch back in the queue", WAIT, || {
        let s = status(&spool);
        s.queued == 2 && s.uplink.last_error.is_some()
    })
    .await;
    running.stop().await;

    assert_eq!(stub.seen().len(), 1);
    let due = spool.next_due().unwrap().unwrap();
    assert!(
        due >= before + Duration::from_secs(120),
        "Retry-After: 120 is a floor, the backoff alone would be ~1 s"
    );
    assert!(due <= SystemTime::now() + Duration::from_secs(121));
    let error = spool.uplink_state().unwrap().last_error.unwrap();
    assert!(error.contains("HTTP 503"), "{error}");
    assert!(queued_rows(&spool).iter().all(|r| r.attempts == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_too_large_is_split_in_halves_until_it_fits() {
    let env = Env::new();
    let spool = spool_in(env.dir.path());
    let stub = env
        .stub(|seen| {
            if seen.uids.len() > 2 {
                Reply::status(413)
            } else {
                let uids: Vec<&str> = seen.uids.iter().map(String::as_str).collect();
                Reply::json(200, stow_json(&uids, &[]))
            }
        })
        .await;
    store_study(&spool, &stub, 5, 100);
    let running = start(uplink_config(&stub.url(), &env.ca), &spool);
    wait_for("all 5 sent", WAIT, || status(&spool).sent == 5).await;
    running.stop().await;
    let sizes: Vec<usize> = stub.seen().iter().map(|s| s.uids.len()).collect();
    assert_eq!(sizes, vec![5, 3, 2, 1, 2]);
    assert!(
        spool.uplink_state().unwrap().paused_until.is_none(),
        "413 is not a reason to pause"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_too_large_even_alone_fails_with_a_clear_reason() {
    let env = Env::new();
    let spool = spool_in(env.dir.path());
    let stub = env.stub(|_| Reply::status(413)).await;
    store_study(&spool, &stub, 1, 100);
    let running = start(uplink_config(&stub.url(), &env.ca), &spool);
    wait_for("the instance failed", WAIT, || status(&spool).failed == 1).await;
    running.stop().await;
    let reason = spool.problems(1).unwrap()[0].last_error.clone().unwrap();
    assert!(
        reason.contains("413") && reason.contains("re-queue"),
        "{reason}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_but_moving_upload_outlives_the_idle_timeout() {
    let env = Env::new();
    let spool = spool_in(env.dir.path());
    let options = StubOptions {
        read_rate: Some(200 * 1024),
        recv_buffer: Some(16 * 1024),
        ..StubOptions::default()
    };
    let stub = Stub::start(&env.server_leaf(), options, |seen| {
        let uids: Vec<&str> = seen.uids.iter().map(String::as_str).collect();
        Reply::json(200, stow_json(&uids, &[]))
    })
    .await;
    store_study(&spool, &stub, 1, 1024 * 1024);
    let mut cfg = uplink_config(&stub.url(), &env.ca);
    cfg.idle_timeout_secs = 1;
    let started = Instant::now();
    let running = start(cfg, &spool);
    wait_for("the instance sent", WAIT, || status(&spool).sent == 1).await;
    let took = started.elapsed();
    running.stop().await;
    assert_eq!(stub.seen().len(), 1, "delivered in one go, never aborted");
    assert!(
        took > Duration::from_secs(3),
        "the upload must take several idle timeouts for this test to mean anything ({took:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pacs_that_never_answers_is_given_up_after_the_idle_timeout() {
    let env = Env::new();
    let spool = spool_in(env.dir.path());
    let stub = env.stub(|_| Reply::hang()).await;
    store_study(&spool, &stub, 2, 100);
    let mut cfg = uplink_config(&stub.url(), &env.ca);
    cfg.idle_timeout_secs = 1;
    let running = start(cfg, &spool);
    wait_for("the batch back in the queue", WAIT, || {
        let s = status(&spool);
        s.queued == 2 && s.uplink.last_error.is_some()
    })
    .await;
    running.stop().await;
    let error = spool.uplink_state().unwrap().last_error.unwrap();
    assert!(error.contains("uplink.idle_timeout_secs"), "{error}");
    assert!(queued_rows(&spool).iter().all(|r| r.attempts == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_while_the_pacs_holds_a_complete_body_counts_the_attempt_and_keeps_the_rows() {
    let env = Env::new();
    let spool = spool_in(env.dir.path());
    let stub = env.stub(|_| Reply::hang()).await;
    store_study(&spool, &stub, 3, 100);
    let running = start(uplink_config(&stub.url(), &env.ca), &spool);
    wait_for("the request at the PACS", WAIT, || stub.seen().len() == 1).await;
    let took = running.stop().await;
    assert!(took < Duration::from_secs(10), "shutdown took {took:?}");
    let s = status(&spool);
    assert_eq!((s.queued, s.uploading, s.sent), (3, 0, 0));
    assert!(
        spool.next_due().unwrap().unwrap() <= SystemTime::now(),
        "due again at once"
    );
    // The PACS got the whole body and may have stored it: the next confirmation is a re-delivery.
    assert!(queued_rows(&spool).iter().all(|r| r.attempts == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_presents_the_client_certificate() {
    let env = Env::new();
    let spool = spool_in(env.dir.path());
    let client_ca = Ca::new(env.dir.path(), "clients");
    let client = client_ca.issue(
        env.dir.path(),
        "passerelle-box",
        &["passerelle.local"],
        true,
    );
    let options = StubOptions {
        client_ca: Some(client_ca.der()),
        ..StubOptions::default()
    };
    let stub = Stub::start(&env.server_leaf(), options, |seen| {
        let uids: Vec<&str> = seen.uids.iter().map(String::as_str).collect();
        Reply::json(200, stow_json(&uids, &[]))
    })
    .await;
    store_study(&spool, &stub, 2, 100);
    let mut cfg = uplink_config(&stub.url(), &env.ca);
    cfg.client_cert = client.cert_path.clone();
    cfg.client_key = client.key_path.clone();
    let running = start(cfg, &spool);
    wait_for("2 sent", WAIT, || status(&spool).sent == 2).await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pacs_requiring_a_client_certificate_we_lack_pauses_the_uplink() {
    let env = Env::new();
    let spool = spool_in(env.dir.path());
    let client_ca = Ca::new(env.dir.path(), "clients");
    let options = StubOptions {
        client_ca: Some(client_ca.der()),
        ..StubOptions::default()
    };
    let stub = Stub::start(&env.server_leaf(), options, |_| Reply::status(500)).await;
    store_study(&spool, &stub, 1, 100);
    let running = start(uplink_config(&stub.url(), &env.ca), &spool);
    wait_paused(&spool).await;
    running.stop().await;
    let error = spool.uplink_state().unwrap().last_error.unwrap();
    assert!(error.contains("uplink.client_cert"), "{error}");
    assert!(queued_rows(&spool).iter().all(|r| r.attempts == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_spool_file_is_left_out_and_the_rest_is_delivered() {
    let env = Env::new();
    let spool = spool_in(env.dir.path());
    let stub = env
        .stub(|seen| {
            let uids: Vec<&str> = seen.uids.iter().map(String::as_str).collect();
            Reply::json(200, stow_json(&uids, &[]))
        })
        .await;
    // Store the first instance alone and damage its (only) file.
    let first = format!("{STUDY}.1");
    let raw = store(&spool, STUDY, &first, 50_000);
    stub.knows(&raw, &first);
    let files = files_under(&spool.dir().join("objects"));
    assert_eq!(files.len(), 1);
    let mut bytes = std::fs::read(&files[0]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&files[0], bytes).unwrap();
    for i in 2..=3 {
        let uid = format!("{STUDY}.{i}");
        let raw = store(&spool, STUDY, &uid, 1000);
        stub.knows(&raw, &uid);
    }
    let running = start(uplink_config(&stub.url(), &env.ca), &spool);
    wait_for("2 sent, 1 quarantined", WAIT, || {
        let s = status(&spool);
        s.sent == 2 && s.quarantined == 1 && s.uploading == 0
    })
    .await;
    running.stop().await;
    let seen = stub.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].uids,
        vec![format!("{STUDY}.2"), format!("{STUDY}.3")]
    );
    assert_eq!(seen[0].unknown_parts, 0, "no corrupt bytes were sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_failing_mid_upload_holds_nothing_else_and_is_checked_in_full_next_time() {
    let env = Env::new();
    let spool = spool_in(env.dir.path());
    let stub = env
        .stub(|seen| {
            let uids: Vec<&str> = seen.uids.iter().map(String::as_str).collect();
            Reply::json(200, stow_json(&uids, &[]))
        })
        .await;
    // The first instance's file passes the check before sending (its recorded digest is made to
    // match damaged bytes, as if the disk returned other bytes than were written), then fails to
    // decode while it streams.
    let first = format!("{STUDY}.1");
    store(&spool, STUDY, &first, 50_000);
    let files = files_under(&spool.dir().join("objects"));
    assert_eq!(files.len(), 1);
    let mut bytes = std::fs::read(&files[0]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&files[0], &bytes).unwrap();
    let db = rusqlite::Connection::open(spool.dir().join("spool.db")).unwrap();
    let changed = db
        .execute(
            "UPDATE file_digest SET xxh3 = ?1 WHERE id = (SELECT id FROM instances WHERE sop_instance_uid = ?2)",
            rusqlite::params![xxhash_rust::xxh3::xxh3_128(&bytes).to_le_bytes(), first],
        )
        .unwrap();
    assert_eq!(changed, 1);
    drop(db);
    for i in 2..=3 {
        let uid = format!("{STUDY}.{i}");
        let raw = store(&spool, STUDY, &uid, 1000);
        stub.knows(&raw, &uid);
    }
    // retry_base_secs is 30: a hold of the whole uplink, or a retry of the others, would keep
    // them past WAIT.
    let running = start(uplink_config(&stub.url(), &env.ca), &spool);
    wait_for("the two readable instances sent", WAIT, || {
        status(&spool).sent == 2
    })
    .await;
    running.stop().await;
    let delivered: Vec<String> = stub.seen().into_iter().flat_map(|r| r.uids).collect();
    assert!(delivered.contains(&format!("{STUDY}.2")) && delivered.contains(&format!("{STUDY}.3")));
    let s = status(&spool);
    assert_eq!((s.sent, s.failed, s.lost), (2, 0, 0), "{s:?}");
    assert_eq!(s.queued + s.quarantined, 1, "{s:?}");
    // Its digest is no longer trusted: the next open checks the content and quarantines the file
    // (the uplink may already have done so, when it brought its retries forward).
    let (id, attempts): (i64, u32) = rusqlite::Connection::open(spool.dir().join("spool.db"))
        .unwrap()
        .query_row(
            "SELECT id, attempts FROM instances WHERE sop_instance_uid = ?1",
            [&first],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!(attempts >= 1, "the failed upload counted as an attempt");
    let inst = passerelle_spool::QueuedInstance {
        id: passerelle_spool::InstanceId(id),
        sop_class_uid: String::new(),
        sop_instance_uid: first.clone(),
        study_instance_uid: STUDY.into(),
        transfer_syntax_uid: String::new(),
        raw_size: 50_000,
        attempts,
        refusals: 0,
    };
    match spool.open_verified(&inst) {
        Err(passerelle_spool::SpoolError::Corrupt { .. }) => {}
        other => panic!(
            "expected the damaged file quarantined, got {:?}",
            other.map(|_| ())
        ),
    }
    assert_eq!(status(&spool).quarantined, 1);
}

fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// A minimal HTTP CONNECT proxy: records each request head, then tunnels bytes both ways (or
/// answers 407 when `refuse` is set).
async fn start_connect_proxy(
    refuse: bool,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                    if client.read_exact(&mut byte).await.is_err() {
                        return;
                    }
                    head.push(byte[0]);
                }
                let text = String::from_utf8_lossy(&head).to_string();
                log.lock().unwrap().push(text.clone());
                if refuse {
                    let _ = client
                        .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"h\"\r\n\r\n")
                        .await;
                    return;
                }
                let target = text
                    .lines()
                    .next()
                    .and_then(|l| l.split_whitespace().nth(1))
                    .unwrap_or_default()
                    .to_string();
                let Ok(mut upstream) = tokio::net::TcpStream::connect(target).await else {
                    let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                    return;
                };
                if client
                    .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                    .await
                    .is_ok()
                {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
            });
        }
    });
    (addr, heads)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_connect_proxy_carries_the_verified_tls_connection() {
    let env = Env::new();
    let spool = spool_in(env.dir.path());
    let stub = env
        .stub(|seen| {
            let uids: Vec<&str> = seen.uids.iter().map(String::as_str).collect();
            Reply::json(200, stow_json(&uids, &[]))
        })
        .await;
    store_study(&spool, &stub, 2, 1000);
    let (proxy, heads) = start_connect_proxy(false).await;
    let mut cfg = uplink_config(&stub.url(), &env.ca);
    cfg.proxy = format!("http://proxyuser:proxypass@{proxy}");
    let running = start(cfg, &spool);
    wait_for("2 sent", WAIT, || status(&spool).sent == 2).await;
    running.stop().await;

    let heads = heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 1, "one tunnel: {heads:?}");
    assert!(
        heads[0].starts_with(&format!("CONNECT {} HTTP/1.1\r\n", stub.addr)),
        "{}",
        heads[0]
    );
    // base64("proxyuser:proxypass")
    assert!(
        heads[0]
            .to_ascii_lowercase()
            .contains("proxy-authorization: basic chjvehl1c2vyonbyb3h5cgfzcw=="),
        "{}",
        heads[0]
    );
    assert_eq!(stub.seen().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_settings_are_refused_before_anything_runs() {
    let env = Env::new();
    let spool = spool_in(env.dir.path());
    let good = uplink_config("https://127.0.0.1:9/dicom-web/studies", &env.ca);
    let cases: Vec<(passerelle_config::UplinkConfig, &str)> = vec![
        (
            passerelle_config::UplinkConfig {
                stow_url: "http://pacs.example.org/dicom-web/studies".into(),
                ..good.clone()
            },
            "https://",
        ),
        (
            passerelle_config::UplinkConfig {
                stow_url: "not a url".into(),
                ..good.clone()
            },
            "uplink.stow_url",
        ),
        (
            passerelle_config::UplinkConfig {
                ca_file: env.dir.path().join("nope.pem"),
                ..good.clone()
            },
            "uplink.ca_file",
        ),
        (
            passerelle_config::UplinkConfig {
                proxy: "http://[::1".into(),
                ..good.clone()
            },
            "uplink.proxy",
        ),
    ];
    for (cfg, want) in cases {
        match passerelle_uplink::Uplink::new(cfg, spool.clone()) {
            Ok(_) => panic!("expected an error mentioning {want:?}"),
            Err(e) => assert!(e.to_string().contains(want), "{e} should mention {want:?}"),
        }
    }
    assert!(passerelle_uplink::Uplink::new(good, spool).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_asking_for_credentials_pauses_the_uplink() {
    let env = Env::new();
    let spool = spool_in(env.dir.path());
    let stub = env.stub(|_| Reply::status(500)).await;
    store_study(&spool, &stub, 1, 100);
    let (proxy, heads) = start_connect_proxy(true).await;
    let mut cfg = uplink_config(&stub.url(), &env.ca);
    cfg.proxy = format!("http://{proxy}");
    let running = start(cfg, &spool);
    wait_paused(&spool).await;
    running.stop().await;
    assert_eq!(heads.lock().unwrap().len(), 1);
    let error = spool.uplink_state().unwrap().last_error.unwrap();
    assert!(error.contains("uplink.proxy"), "{error}");
    assert!(queued_rows(&spool).iter().all(|r| r.attempts == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bearer_token_is_sent_as_the_authorization() {
    let env = Env::new();
    let spool = spool_in(env.dir.path());
    let stub = env
        .stub(|seen| {
            let uids: Vec<&str> = seen.uids.iter().map(String::as_str).collect();
            Reply::json(200, stow_json(&uids, &[]))
        })
        .await;
    store_study(&spool, &stub, 1, 100);
    let mut cfg = uplink_config(&stub.url(), &env.ca);
    cfg.username.clear();
    cfg.password.clear();
    cfg.bearer_token = "eyJ0b2tlbiI6MX0".into();
    let running = start(cfg, &spool);
    wait_for("1 sent", WAIT, || status(&spool).sent == 1).await;
    running.stop().await;
    assert_eq!(
        stub.seen()[0].authorization.as_deref(),
        Some("Bearer eyJ0b2tlbiI6MX0")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_keeps_what_was_stored_and_fails_the_rest_for_the_operator() {
    let env = Env::new();
    let spool = spool_in(env.dir.path());
    let stub = env
        .stub(|seen| Reply::json(409, stow_json(&[seen.uids[0].as_str()], &[])))
        .await;
    store_study(&spool, &stub, 3, 100);
    let running = start(uplink_config(&stub.url(), &env.ca), &spool);
    wait_for("1 sent, 2 failed", WAIT, || {
        let s = status(&spool);
        s.sent == 1 && s.failed == 2
    })
    .await;
    running.stop().await;
    for p in spool.problems(10).unwrap() {
        let reason = p.last_error.unwrap_or_default();
        assert!(reason.contains("409"), "{reason}");
    }
    // The operator re-queues them once the cause is fixed.
    assert_eq!(spool.requeue_failed(None).unwrap().requeued, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_batch_becomes_due_together_and_is_sent_together_again() {
    let env = Env::new();
    let spool = spool_in(env.dir.path());
    let stub = env
        .stub_after_outage(1, |seen| {
            let uids: Vec<&str> = seen.uids.iter().map(String::as_str).collect();
            Reply::json(200, stow_json(&uids, &[]))
        })
        .await;
    store_study(&spool, &stub, 6, 100);
    let mut cfg = uplink_config(&stub.url(), &env.ca);
    cfg.retry_base_secs = 1;
    let running = start(cfg, &spool);
    wait_for("all 6 sent", WAIT, || status(&spool).sent == 6).await;
    running.stop().await;
    let sizes: Vec<usize> = stub.seen().iter().map(|s| s.uids.len()).collect();
    assert_eq!(
        sizes,
        vec![6, 6],
        "the retry is one request, not one per instance"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_an_outage_new_arrivals_wait_with_the_rest_and_all_go_out_once_it_answers() {
    outage_holds_every_upload(|| Reply::status(503)).await;
}

/// A PACS that answers 200 but lists no instance at all (Orthanc with a full disk) is not taking
/// requests either: the same hold as for a 5xx.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pacs_answering_200_while_storing_nothing_holds_every_upload_like_an_outage() {
    outage_holds_every_upload(|| Reply::json(200, stow_json(&[], &[]))).await;
}

async fn outage_holds_every_upload(down_reply: fn() -> Reply) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let env = Env::new();
    let spool = spool_in(env.dir.path());
    let down = Arc::new(AtomicBool::new(true));
    let failed_at = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let delivered_at = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let (is_down, log, ok_log) = (down.clone(), failed_at.clone(), delivered_at.clone());
    let stub = env
        .stub(move |seen| {
            if is_down.load(Ordering::SeqCst) {
                log.lock().unwrap().push(Instant::now());
                down_reply()
            } else {
                ok_log.lock().unwrap().push(Instant::now());
                let uids: Vec<&str> = seen.uids.iter().map(String::as_str).collect();
                Reply::json(200, stow_json(&uids, &[]))
            }
        })
        .await;
    store_study(&spool, &stub, 2, 100);
    let mut cfg = uplink_config(&stub.url(), &env.ca);
    cfg.retry_base_secs = 1;
    cfg.retry_max_secs = 120;
    let running = start(cfg, &spool);
    wait_for("the first refused request", WAIT, || {
        !failed_at.lock().unwrap().is_empty()
    })
    .await;

    // Modalities keep sending during the outage: six new studies, each due at once.
    for i in 1..=6 {
        let (study, uid) = (format!("1.2.9.{i}"), format!("1.2.9.{i}.1"));
        let raw = store(&spool, &study, &uid, 100);
        stub.knows(&raw, &uid);
        running.wake.notify_one();
    }
    wait_for("three refused requests", WAIT, || {
        failed_at.lock().unwrap().len() >= 3
    })
    .await;
    let times = failed_at.lock().unwrap().clone();
    for pair in times.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(700),
            "a refused request holds every upload for the backoff (base 1 s, -20% jitter), got {gap:?} between requests: {times:?}"
        );
    }

    // The PACS is back: the next request succeeds, and everything that waited on its own retry
    // schedule (up to tens of seconds by now) goes out right after, not on that schedule.
    down.store(false, Ordering::SeqCst);
    wait_for("all 8 sent soon after the PACS is back", WAIT, || {
        status(&spool).sent == 8
    })
    .await;
    running.stop().await;
    assert!(stub.seen().iter().all(|s| s.unknown_parts == 0));
    let ok = delivered_at.lock().unwrap().clone();
    let spread = *ok.last().unwrap() - ok[0];
    assert!(
        spread < Duration::from_millis(1500),
        "once the PACS answered, the backlog went out at once, not on its retry schedules: {spread:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_schedules_left_by_a_previous_run_are_brought_forward_once_the_pacs_takes_uploads() {
    let env = Env::new();
    let spool = spool_in(env.dir.path());
    let stub = env
        .stub(|seen| {
            let uids: Vec<&str> = seen.uids.iter().map(String::as_str).collect();
            Reply::json(200, stow_json(&uids, &[]))
        })
        .await;
    // A previous run saw an outage: these wait an hour on their own schedule.
    store_study(&spool, &stub, 3, 100);
    let far = SystemTime::now() + Duration::from_secs(3600);
    for q in spool.claim_batch(10, u64::MAX, far).unwrap() {
        spool.mark_retry(q.id, "HTTP 503", far).unwrap();
    }
    // A new study arrives and is due now.
    let raw = store(&spool, "1.2.9.99", "1.2.9.99.1", 100);
    stub.knows(&raw, "1.2.9.99.1");

    let running = start(uplink_config(&stub.url(), &env.ca), &spool);
    wait_for("all 4 sent, not in an hour", WAIT, || {
        status(&spool).sent == 4
    })
    .await;
    running.stop().await;
    assert_eq!(stub.seen().len(), 2, "the new study, then the waiting one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_outage_a_processing_failure_is_retried_until_the_pacs_refused_it_five_times() {
    const OUTAGE: usize = 6;
    let env = Env::new();
    let spool = spool_in(env.dir.path());
    let stub = env
        .stub_after_outage(OUTAGE, |seen| {
            Reply::json(409, stow_json(&[], &[(seen.uids[0].as_str(), 0x0110)]))
        })
        .await;
    store_study(&spool, &stub, 1, 100);
    let mut cfg = uplink_config(&stub.url(), &env.ca);
    cfg.retry_base_secs = 1;
    cfg.retry_max_secs = 1;
    let running = start(cfg, &spool);
    wait_for("the instance failed", Duration::from_secs(60), || {
        status(&spool).failed == 1
    })
    .await;
    running.stop().await;
    // The outage's attempts did not count: the PACS refused the instance five times first.
    assert_eq!(stub.seen().len(), OUTAGE + 5);
    let reason = spool.problems(1).unwrap()[0]
        .last_error
        .clone()
        .unwrap_or_default();
    assert!(reason.contains("0x0110"), "{reason}");
    assert!(reason.contains("5 times"), "{reason}");
    // Re-queued by the operator, it starts again from no refusal.
    assert_eq!(spool.requeue_failed(None).unwrap().requeued, 1);
    assert_eq!(queued_rows(&spool)[0].refusals, 0);
}
