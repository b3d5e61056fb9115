//! A PACS whose STOW-RS answer lists an instance both as stored and as failed: the instance is not
//! confirmed, and the operator reads a WARN naming it and saying whom to tell. A test binary of its
//! own, because it installs its own logger to read those lines.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Mutex;

use common::*;

/// WARN lines of this test binary.
static WARNINGS: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct CaptureWarnings;

impl log::Log for CaptureWarnings {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::Level::Warn
    }
    fn log(&self, record: &log::Record) {
        if record.level() == log::Level::Warn {
            WARNINGS.lock().unwrap().push(record.args().to_string());
        }
    }
    fn flush(&self) {}
}

static CAPTURE: CaptureWarnings = CaptureWarnings;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_answered_both_stored_and_failed_is_retried_and_the_pacs_is_named_to_its_operator(
) {
    // Installed before `start`, whose env_logger then finds a logger and stays out.
    log::set_logger(&CAPTURE).unwrap();
    log::set_max_level(log::LevelFilter::Warn);
    let env = Env::new();
    let spool = spool_in(env.dir.path());
    let leaf = env
        .ca
        .issue(env.dir.path(), "server", &["127.0.0.1"], false);
    // Every instance referenced; the second also failed "out of resources" (0xA700).
    let stub = Stub::start(&leaf, StubOptions::default(), |seen| {
        let all: Vec<&str> = seen.uids.iter().map(String::as_str).collect();
        Reply::json(200, stow_json(&all, &[(all[1], 0xA700)]))
    })
    .await;
    let uids = store_study(&spool, &stub, 3, 100);
    let running = start(uplink_config(&stub.url(), &env.ca), &spool);
    wait_for("2 sent, 1 queued again", WAIT, || {
        let s = status(&spool);
        s.sent == 2 && s.queued == 1 && s.uploading == 0
    })
    .await;
    running.stop().await;

    let retried = queued_rows(&spool);
    assert_eq!(retried.len(), 1);
    assert_eq!(retried[0].sop_instance_uid, uids[1]);
    let warnings = WARNINGS.lock().unwrap().clone();
    let about: Vec<&String> = warnings
        .iter()
        .filter(|l| l.contains("contradicts itself"))
        .collect();
    assert_eq!(about.len(), 1, "{warnings:#?}");
    let line = about[0];
    assert!(
        line.contains(&format!("sop_instance_uid={}", uids[1])),
        "{line}"
    );
    assert!(line.contains("failure_reason=0xA700"), "{line}");
    assert!(line.contains("PACS's administrator"), "{line}");
    assert!(line.contains("it will be sent again"), "{line}");
}
