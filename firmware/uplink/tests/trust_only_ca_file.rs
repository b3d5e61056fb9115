//! The uplink trusts only `uplink.ca_file`: not the system store, and not the CA bundles that
//! environment variables such as SSL_CERT_FILE or REQUESTS_CA_BUNDLE point at (they are set on
//! the hospital's machines). Alone in its test binary because it changes the process environment.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_bundles_named_by_environment_variables_are_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let configured = Ca::new(dir.path(), "configured");
    let other = Ca::new(dir.path(), "other");
    // Every variable a TLS stack might read points at the CA that did sign the server.
    for var in [
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "NODE_EXTRA_CA_CERTS",
    ] {
        std::env::set_var(var, &other.pem_path);
    }
    std::env::set_var("SSL_CERT_DIR", dir.path());
    // And a proxy that does not exist: proxy variables must be ignored as well.
    for var in ["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"] {
        std::env::set_var(var, "http://127.0.0.1:9");
    }

    let server = other.issue(dir.path(), "server", &["127.0.0.1"], false);
    let spool = spool_in(dir.path());
    let stub = Stub::start(&server, StubOptions::default(), |seen| {
        let uids: Vec<&str> = seen.uids.iter().map(String::as_str).collect();
        Reply::json(200, stow_json(&uids, &[]))
    })
    .await;
    store_study(&spool, &stub, 1, 100);
    let running = start(uplink_config(&stub.url(), &configured), &spool);
    wait_paused(&spool).await;
    running.stop().await;

    assert_eq!(
        status(&spool).sent,
        0,
        "nothing sent to an untrusted server"
    );
    assert!(stub.seen().is_empty());
    assert_eq!(
        stub.tls_failures(),
        1,
        "the handshake reached the server directly (no proxy) and was refused"
    );
    let error = spool.uplink_state().unwrap().last_error.unwrap();
    assert!(error.contains("uplink.ca_file"), "{error}");
}
