use super::*;

fn inst(id: i64, uid: &str, attempts: u32) -> QueuedInstance {
    refused_inst(id, uid, attempts, 0)
}

/// An instance the PACS refused by name `refusals` times in its `attempts`.
fn refused_inst(id: i64, uid: &str, attempts: u32, refusals: u32) -> QueuedInstance {
    QueuedInstance {
        id: InstanceId(id),
        sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
        sop_instance_uid: uid.into(),
        study_instance_uid: "1.2.3".into(),
        transfer_syntax_uid: "1.2.840.10008.1.2.1".into(),
        raw_size: 1000,
        attempts,
        refusals,
    }
}

fn batch() -> Vec<QueuedInstance> {
    vec![inst(1, "1.1", 0), inst(2, "1.2", 3), inst(3, "1.3", 0)]
}

fn answer(status: u16, body: &str) -> Exchange {
    answer_as(status, "application/dicom+json", body)
}

fn xml_answer(status: u16, body: &str) -> Exchange {
    answer_as(status, "application/dicom+xml", body)
}

fn answer_as(status: u16, content_type: &str, body: &str) -> Exchange {
    Exchange::Answered(Answer {
        status,
        content_type: Some(content_type.into()),
        body: body.as_bytes().to_vec(),
        ..Answer::default()
    })
}

/// A compact description of an action, for data-driven expectations.
#[derive(Debug, PartialEq, Eq)]
enum Is {
    Sent { redelivery: bool },
    Retry,
    RetryNotBefore(u64),
    Failed,
}

/// Expected decision: per instance, or a pause whose message mentions a word, or a split.
#[derive(Debug)]
enum Expect<'a> {
    Each(&'a [(i64, Is)]),
    PauseMentioning(&'a str),
    Split,
}

fn check(instances: &[QueuedInstance], exchange: Exchange, expect: Expect<'_>) {
    check_knowing(instances, exchange, true, expect);
}

/// [`check`] with what the uplink knows: whether the PACS stored instances before.
fn check_knowing(
    instances: &[QueuedInstance],
    exchange: Exchange,
    stored_before: bool,
    expect: Expect<'_>,
) {
    let got = decide(instances, &exchange, stored_before);
    match (&got, expect) {
        (Decision::PerInstance(actions), Expect::Each(want)) => {
            let got: Vec<(i64, Is)> = actions
                .iter()
                .map(|(id, a)| {
                    (
                        id.0,
                        match a {
                            Action::Sent { redelivery, .. } => Is::Sent {
                                redelivery: *redelivery,
                            },
                            Action::Retry {
                                not_before: None, ..
                            } => Is::Retry,
                            Action::Retry {
                                not_before: Some(d),
                                ..
                            } => Is::RetryNotBefore(d.as_secs()),
                            Action::Failed { .. } => Is::Failed,
                        },
                    )
                })
                .collect();
            let want: Vec<(i64, &Is)> = want.iter().map(|(i, w)| (*i, w)).collect();
            let got_ref: Vec<(i64, &Is)> = got.iter().map(|(i, w)| (*i, w)).collect();
            assert_eq!(got_ref, want, "exchange: {exchange:?}");
        }
        (Decision::Pause { error }, Expect::PauseMentioning(word)) => {
            assert!(
                error.contains(word),
                "pause message {error:?} should mention {word:?}"
            );
        }
        (Decision::Split { .. }, Expect::Split) => {}
        (got, want) => panic!("expected {want:?}, got {got:?} for {exchange:?}"),
    }
}

const ALL_REFERENCED: &str = r#"{"00081199": {"vr": "SQ", "Value": [
    {"00081155": {"vr": "UI", "Value": ["1.1"]}},
    {"00081155": {"vr": "UI", "Value": ["1.2"]}},
    {"00081155": {"vr": "UI", "Value": ["1.3"]}}]}}"#;

/// 1.1 stored, 1.2 out of resources (retryable), 1.3 absent from both lists.
const PARTIAL: &str = r#"{
  "00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.1"]}}]},
  "00081198": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2"]},
                                       "00081197": {"vr": "US", "Value": [42752]}}]}}"#;

fn failed_with(reason: u16) -> String {
    format!(
        r#"{{"00081198": {{"vr": "SQ", "Value": [
            {{"00081155": {{"vr": "UI", "Value": ["1.1"]}}, "00081197": {{"vr": "US", "Value": [{reason}]}}}}]}},
           "00081199": {{"vr": "SQ", "Value": [{{"00081155": {{"vr": "UI", "Value": ["1.2"]}}}}]}}}}"#
    )
}

#[test]
fn referenced_instances_are_sent_and_redelivery_follows_earlier_attempts() {
    check(
        &batch(),
        answer(200, ALL_REFERENCED),
        Expect::Each(&[
            (1, Is::Sent { redelivery: false }),
            (2, Is::Sent { redelivery: true }),
            (3, Is::Sent { redelivery: false }),
        ]),
    );
    // Attempts the PACS answered by refusing the instance did not deliver it: not a duplicate.
    let refused_before = [
        refused_inst(1, "1.1", 2, 2),
        refused_inst(2, "1.2", 3, 2),
        refused_inst(3, "1.3", 0, 0),
    ];
    check(
        &refused_before,
        answer(200, ALL_REFERENCED),
        Expect::Each(&[
            (1, Is::Sent { redelivery: false }),
            (2, Is::Sent { redelivery: true }),
            (3, Is::Sent { redelivery: false }),
        ]),
    );
}

#[test]
fn partial_success_202_confirms_only_what_is_referenced() {
    check(
        &batch(),
        answer(202, PARTIAL),
        Expect::Each(&[
            (1, Is::Sent { redelivery: false }),
            (2, Is::Retry),
            (3, Is::Retry),
        ]),
    );
}

#[test]
fn a_success_status_with_an_unreadable_body_confirms_nothing() {
    for body in ["", "OK", "<html>stored</html>", "{\"00081199\": "] {
        check(
            &batch(),
            answer(200, body),
            Expect::Each(&[(1, Is::Retry), (2, Is::Retry), (3, Is::Retry)]),
        );
    }
}

#[test]
fn failure_reasons_decide_between_retry_and_failed() {
    let cases: &[(u16, Is)] = &[
        (0xA700, Is::Retry),
        (0xA7FF, Is::Retry),
        (0x0110, Is::Retry),
        (0x0111, Is::Retry),
        (0x0212, Is::Retry),
        (0xA900, Is::Failed),
        (0xA9FF, Is::Failed),
        (0xC000, Is::Failed),
        (0xC122, Is::Failed),
        (0x0122, Is::Failed),
        (0x0124, Is::Failed),
        (0x1234, Is::Failed),
    ];
    for (reason, want) in cases {
        let two = &batch()[..2];
        let got = decide(two, &answer(202, &failed_with(*reason)), true);
        let Decision::PerInstance(actions) = got else {
            panic!("reason {reason:#06X}: expected per-instance actions, got {got:?}");
        };
        let first = &actions[0].1;
        let matches = matches!(
            (first, want),
            (Action::Retry { .. }, Is::Retry) | (Action::Failed { .. }, Is::Failed)
        );
        assert!(
            matches,
            "reason {reason:#06X}: expected {want:?}, got {first:?}"
        );
        assert!(matches!(actions[1].1, Action::Sent { .. }));
        // The reason and its meaning reach the operator.
        let text = match first {
            Action::Retry { error, .. } => error,
            Action::Failed { reason } => reason,
            Action::Sent { .. } => unreachable!(),
        };
        assert!(text.contains(&format!("{reason:#06X}")), "{text}");
    }
}

#[test]
fn failure_without_a_reason_is_retried() {
    check(
        &batch()[..1],
        answer(
            200,
            r#"{"00081198": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.1"]}}]}}"#,
        ),
        Expect::Each(&[(1, Is::Retry)]),
    );
}

#[test]
fn bad_request_fails_the_unlisted_but_keeps_what_the_body_confirms() {
    check(
        &batch(),
        answer(400, PARTIAL),
        Expect::Each(&[
            (1, Is::Sent { redelivery: false }),
            (2, Is::Retry),
            (3, Is::Failed),
        ]),
    );
    check(
        &batch()[..1],
        answer(400, "Malformed multipart body"),
        Expect::Each(&[(1, Is::Failed)]),
    );
}

#[test]
fn bad_request_failure_carries_the_servers_message() {
    let got = decide(
        &batch()[..1],
        &answer(400, "Missing  boundary\r\nin Content-Type"),
        true,
    );
    let Decision::PerInstance(actions) = got else {
        panic!("{got:?}")
    };
    let Action::Failed { reason } = &actions[0].1 else {
        panic!("{actions:?}")
    };
    assert!(
        reason.contains("Missing boundary in Content-Type"),
        "{reason}"
    );
    assert!(reason.contains("400"), "{reason}");
}

#[test]
fn conflict_fails_the_unlisted_permanently() {
    check(
        &batch(),
        answer(409, failed_with(0xA900).as_str()),
        Expect::Each(&[
            (1, Is::Failed),
            (2, Is::Sent { redelivery: true }),
            (3, Is::Failed),
        ]),
    );
    check(
        &batch()[..1],
        answer(409, ""),
        Expect::Each(&[(1, Is::Failed)]),
    );
}

#[test]
fn statuses_that_need_the_operator_pause_the_uplink() {
    let cases: &[(u16, &str)] = &[
        (401, "uplink.username"),
        (403, "uplink.bearer_token"),
        (407, "uplink.proxy"),
        (415, "STOW-RS endpoint"),
        (404, "uplink.stow_url"),
        (405, "uplink.stow_url"),
        (406, "application/dicom+xml"),
        (301, "uplink.stow_url"),
    ];
    for (status, word) in cases {
        check(
            &batch(),
            answer(*status, "nope"),
            Expect::PauseMentioning(word),
        );
    }
}

#[test]
fn a_redirect_names_where_it_goes() {
    let exchange = Exchange::Answered(Answer {
        status: 308,
        location: Some("https://pacs2/dicom-web/studies".into()),
        ..Answer::default()
    });
    check(
        &batch(),
        exchange,
        Expect::PauseMentioning("https://pacs2/dicom-web/studies"),
    );
}

#[test]
fn too_large_splits_a_batch_and_fails_a_single_instance() {
    check(&batch(), answer(413, ""), Expect::Split);
    check(&batch()[..2], answer(413, ""), Expect::Split);
    check(
        &batch()[..1],
        answer(413, ""),
        Expect::Each(&[(1, Is::Failed)]),
    );
}

#[test]
fn transient_statuses_retry_everything_honouring_retry_after() {
    for status in [500, 502, 503, 504, 507, 408, 429] {
        check(
            &batch()[..2],
            answer(status, "busy"),
            Expect::Each(&[(1, Is::Retry), (2, Is::Retry)]),
        );
    }
    let exchange = Exchange::Answered(Answer {
        status: 503,
        retry_after: Some(Duration::from_secs(120)),
        ..Answer::default()
    });
    check(
        &batch()[..2],
        exchange,
        Expect::Each(&[(1, Is::RetryNotBefore(120)), (2, Is::RetryNotBefore(120))]),
    );
}

#[test]
fn unexpected_statuses_are_retried_not_dropped() {
    for status in [100, 204, 402, 410, 418, 422] {
        let want: &[(i64, Is)] = &[(1, Is::Retry)];
        check(&batch()[..1], answer(status, ""), Expect::Each(want));
    }
}

#[test]
fn every_status_maps_to_its_class() {
    let cases: &[(u16, HttpClass)] = &[
        (200, HttpClass::Stored),
        (202, HttpClass::Stored),
        (204, HttpClass::Stored),
        (400, HttpClass::BadRequest),
        (401, HttpClass::AuthRefused),
        (403, HttpClass::AuthRefused),
        (407, HttpClass::ProxyAuthRequired),
        (409, HttpClass::Conflict),
        (413, HttpClass::TooLarge),
        (415, HttpClass::UnsupportedMediaType),
        (411, HttpClass::LengthRequired),
        (406, HttpClass::NotAcceptable),
        (301, HttpClass::WrongEndpoint),
        (302, HttpClass::WrongEndpoint),
        (404, HttpClass::WrongEndpoint),
        (405, HttpClass::WrongEndpoint),
        (408, HttpClass::Transient),
        (429, HttpClass::Transient),
        (500, HttpClass::Transient),
        (503, HttpClass::Transient),
        (599, HttpClass::Transient),
        (101, HttpClass::Unexpected),
        (418, HttpClass::Unexpected),
        (600, HttpClass::Unexpected),
    ];
    for (status, class) in cases {
        assert_eq!(http_class(*status), *class, "status {status}");
    }
}

#[test]
fn transport_failures_pause_on_certificates_and_retry_otherwise() {
    let cases: &[(TransportFailure, Option<&str>)] = &[
        (
            TransportFailure::ServerCertificateRefused("UnknownIssuer".into()),
            Some("uplink.ca_file"),
        ),
        (
            TransportFailure::ServerCertificateOutOfDate("certificate expired".into()),
            Some("NTP"),
        ),
        (
            TransportFailure::ServerCertificateIsCa("CaUsedAsEndEntity".into()),
            Some("CA:FALSE"),
        ),
        (
            TransportFailure::ClientCertificateRefused("BadCertificate".into()),
            Some("uplink.client_cert"),
        ),
        (
            TransportFailure::TlsIncompatible("no shared version".into()),
            Some("TLS 1.2"),
        ),
        (TransportFailure::Network("connection reset".into()), None),
        (TransportFailure::IdleTimeout(Duration::from_secs(60)), None),
    ];
    for (failure, pause_word) in cases {
        let exchange = Exchange::Failed(failure.clone());
        match pause_word {
            Some(word) => check(&batch(), exchange, Expect::PauseMentioning(word)),
            None => check(
                &batch(),
                exchange,
                Expect::Each(&[(1, Is::Retry), (2, Is::Retry), (3, Is::Retry)]),
            ),
        }
    }
}

fn tls_in_io(e: rustls::Error) -> Box<dyn StdError + Send + Sync> {
    // The shape reqwest/hyper-util produce: an outer error whose source is an io::Error wrapping
    // an io::Error wrapping the rustls error.
    #[derive(Debug)]
    struct Outer(std::io::Error);
    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("error sending request")
        }
    }
    impl StdError for Outer {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            Some(&self.0)
        }
    }
    Box::new(Outer(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        e,
    )))
}

#[test]
fn tls_errors_are_found_inside_io_errors_and_classified() {
    use rustls::{AlertDescription, CertificateError};
    let server = tls_in_io(rustls::Error::InvalidCertificate(
        CertificateError::UnknownIssuer,
    ));
    assert!(matches!(
        classify_transport(server.as_ref()),
        TransportFailure::ServerCertificateRefused(_)
    ));
    let name = tls_in_io(rustls::Error::InvalidCertificate(
        CertificateError::NotValidForName,
    ));
    assert!(matches!(
        classify_transport(name.as_ref()),
        TransportFailure::ServerCertificateRefused(_)
    ));
    let client = tls_in_io(rustls::Error::AlertReceived(
        AlertDescription::CertificateRequired,
    ));
    assert!(matches!(
        classify_transport(client.as_ref()),
        TransportFailure::ClientCertificateRefused(_)
    ));
    let direct = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
    assert!(matches!(
        classify_transport(&direct),
        TransportFailure::ServerCertificateRefused(_)
    ));
    let webpki_error = |e: webpki::Error| {
        rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
            std::sync::Arc::new(e),
        )))
    };
    assert!(matches!(
        classify_transport(&webpki_error(webpki::Error::CaUsedAsEndEntity)),
        TransportFailure::ServerCertificateIsCa(_)
    ));
    assert!(matches!(
        classify_transport(&webpki_error(webpki::Error::BadDer)),
        TransportFailure::ServerCertificateRefused(_)
    ));
    for out_of_date in [CertificateError::Expired, CertificateError::NotValidYet] {
        match classify_transport(&rustls::Error::InvalidCertificate(out_of_date)) {
            TransportFailure::ServerCertificateOutOfDate(detail) => {
                assert!(detail.contains("the box's clock reads"), "{detail}");
                assert!(detail.contains(" GMT"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
    }
    let reset = std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "connection reset by peer",
    );
    match classify_transport(&reset) {
        TransportFailure::Network(msg) => assert!(msg.contains("connection reset"), "{msg}"),
        other => panic!("{other:?}"),
    }
    let proxy = std::io::Error::other("tunnel error: proxy authorization required");
    assert!(matches!(
        classify_transport(&proxy),
        TransportFailure::ProxyAuthRefused(_)
    ));
    let decrypt = tls_in_io(rustls::Error::DecryptError);
    assert!(matches!(
        classify_transport(decrypt.as_ref()),
        TransportFailure::Network(_)
    ));
}

#[test]
fn backoff_doubles_from_the_base_up_to_the_cap_within_jitter() {
    // (base, max, attempts) → nominal delay before jitter.
    let cases: &[(u64, u64, u32, u64)] = &[
        (2, 600, 0, 2),
        (2, 600, 1, 4),
        (2, 600, 5, 64),
        (2, 600, 8, 512),
        (2, 600, 9, 600),
        (2, 600, 63, 600),
        (2, 600, 64, 600),
        (2, 600, u32::MAX, 600),
        (10, 10, 3, 10),
    ];
    for &(base, max, attempts, nominal) in cases {
        let exact = backoff(base, max, attempts, 0.0);
        assert_eq!(exact, Duration::from_secs(nominal), "attempts {attempts}");
        let low = backoff(base, max, attempts, -0.2);
        let high = backoff(base, max, attempts, 0.2);
        let wild = backoff(base, max, attempts, 5.0);
        let n = nominal as f64;
        assert!(
            (low.as_secs_f64() - n * 0.8).abs() < 1e-6,
            "low {low:?} for {attempts}"
        );
        assert!(
            high.as_secs_f64() <= (n * 1.2).min(max as f64) + 1e-6,
            "high {high:?}"
        );
        assert!(high >= exact, "high {high:?}");
        assert!(
            wild <= Duration::from_secs(max),
            "jitter is clamped and capped: {wild:?}"
        );
    }
}

#[test]
fn retry_after_is_a_floor_capped_at_the_maximum() {
    let cases: &[(u32, Option<u64>, u64)] = &[
        (0, None, 2),
        (0, Some(30), 30),
        (5, Some(30), 64),
        (0, Some(100_000), 600),
        (0, Some(0), 2),
    ];
    for &(attempts, retry_after, want) in cases {
        let got = retry_delay(2, 600, attempts, retry_after.map(Duration::from_secs), 0.0);
        assert_eq!(
            got,
            Duration::from_secs(want),
            "attempts {attempts}, retry-after {retry_after:?}"
        );
    }
}

#[test]
fn retry_after_parses_seconds_and_http_dates() {
    let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
    let cases: &[(&str, Option<u64>)] = &[
        ("120", Some(120)),
        (" 0 ", Some(0)),
        ("Sun, 06 Nov 1994 08:51:37 GMT", Some(120)),
        ("Sun, 06 Nov 1994 08:00:00 GMT", Some(0)),
        ("Sunday, 06-Nov-94 08:50:37 GMT", Some(60)),
        ("-5", None),
        ("soon", None),
        ("", None),
        ("1.5", None),
    ];
    for &(value, want) in cases {
        assert_eq!(
            parse_retry_after(value, now),
            want.map(Duration::from_secs),
            "Retry-After: {value:?}"
        );
    }
}

#[test]
fn status_descriptions_cover_the_common_codes() {
    let cases: &[(u16, &str)] = &[
        (0xA700, "out of resources"),
        (0xA710, "out of resources"),
        (0xA900, "does not match"),
        (0xC000, "cannot understand"),
        (0xC122, "transfer syntax"),
        (0x0122, "SOP class not supported"),
        (0xB000, "coercion"),
        (0xB006, "discarded"),
        (0xB00F, "Warning"),
        (0x9999, "unknown"),
    ];
    for &(code, word) in cases {
        assert!(describe_status(code).contains(word), "{code:#06X}");
    }
}

#[test]
fn a_closed_connection_after_a_certificate_request_we_cannot_meet_is_a_refused_certificate_until_the_pacs_answers(
) {
    let pipe =
        || TransportFailure::Network("error writing a body to connection: Broken pipe".into());
    let request = |asked, have_one, answered_before| CertificateRequest {
        asked,
        have_one,
        answered_before,
    };
    let TransportFailure::ClientCertificateRefused(detail) =
        refused_after_certificate_request(pipe(), request(true, false, false))
    else {
        panic!("a PACS that asked, got no certificate and never answered refused it");
    };
    assert!(detail.contains("Broken pipe"), "{detail}");
    assert!(detail.contains("none is configured"), "{detail}");
    // Not asked, a certificate configured (a reset before the first answer is also a flaky link), or
    // the PACS has taken requests over such connections: a network failure.
    for r in [
        request(false, false, false),
        request(true, true, false),
        request(true, false, true),
    ] {
        assert!(matches!(
            refused_after_certificate_request(pipe(), r),
            TransportFailure::Network(_)
        ));
    }
    // Other failures are left as they are.
    assert!(matches!(
        refused_after_certificate_request(
            TransportFailure::IdleTimeout(Duration::from_secs(1)),
            request(true, false, false)
        ),
        TransportFailure::IdleTimeout(_)
    ));
}

/// The error an h2 client gets for one request whose stream the server resets with `reason` (a
/// real HTTP/2 exchange over loopback TCP, no TLS).
fn h2_reset_error(reason: h2::Reason) -> h2::Error {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut conn = h2::server::handshake(tcp).await.unwrap();
            let (_request, mut respond) = conn.accept().await.unwrap().unwrap();
            respond.send_reset(reason);
            // Drive the connection until the client goes.
            while let Some(Ok(_)) = conn.accept().await {}
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (client, conn) = h2::client::handshake(tcp).await.unwrap();
        let driver = tokio::spawn(conn);
        let mut client = client.ready().await.unwrap();
        let request = hyper::Request::post("http://pacs/dicom-web/studies")
            .body(())
            .unwrap();
        let (response, _body) = client.send_request(request, false).unwrap();
        let err = response.await.unwrap_err();
        drop(client);
        driver.abort();
        server.abort();
        err
    })
}

#[test]
fn a_stream_the_pacs_refused_is_not_processed_and_other_resets_are_network_failures() {
    let refused = h2_reset_error(h2::Reason::REFUSED_STREAM);
    assert!(refused.is_remote() && refused.is_reset(), "{refused:?}");
    assert!(matches!(
        classify_transport(&refused),
        TransportFailure::NotProcessed(_)
    ));
    // Inside the error chain reqwest builds, too.
    let wrapped = std::io::Error::other(refused);
    assert!(matches!(
        classify_transport(&wrapped),
        TransportFailure::NotProcessed(_)
    ));
    // A cancelled or failed stream may have been processed: retried with the backoff, attempt counted.
    for reason in [h2::Reason::CANCEL, h2::Reason::INTERNAL_ERROR] {
        let reset = h2_reset_error(reason);
        assert!(matches!(
            classify_transport(&reset),
            TransportFailure::Network(_)
        ));
    }
    // A refusal we made up ourselves is not the PACS's word.
    let local = h2::Error::from(h2::Reason::REFUSED_STREAM);
    assert!(matches!(
        classify_transport(&local),
        TransportFailure::Network(_)
    ));
}

#[test]
fn a_request_the_pacs_did_not_process_goes_out_again_at_once() {
    let exchange = Exchange::Failed(TransportFailure::NotProcessed("GOAWAY".into()));
    assert!(matches!(
        decide(&batch(), &exchange, true),
        Decision::Resend { detail } if detail == "GOAWAY"
    ));
}

/// nginx's answers to a request whose client certificate `ssl_verify_client on` did not accept, as
/// nginx 1.22 sends them (an HTML page, whatever the Accept header).
fn nginx_certificate_page(title: &str) -> Exchange {
    Exchange::Answered(Answer {
        status: 400,
        content_type: Some("text/html".into()),
        body: format!(
            "<html>\r\n<head><title>400 {title}</title></head>\r\n<body>\r\n<center><h1>400 Bad Request</h1></center>\r\n<center>{title}</center>\r\n<hr><center>nginx/1.22.1</center>\r\n</body>\r\n</html>\r\n"
        )
        .into_bytes(),
        ..Answer::default()
    })
}

#[test]
fn a_front_end_refusing_the_client_certificate_pauses_instead_of_failing_the_batch() {
    for (title, said) in [
        ("The SSL certificate error", "did not verify"),
        (
            "No required SSL certificate was sent",
            "No required SSL certificate was sent",
        ),
    ] {
        let got = decide(&batch(), &nginx_certificate_page(title), true);
        let Decision::Pause { error } = &got else {
            panic!("{title}: {got:?}")
        };
        assert!(error.contains("uplink.client_cert"), "{error}");
        assert!(error.contains(said), "{error}");
        assert!(error.contains("HTTP 400"), "{error}");
    }
    // Any other 400, HTML or not, still refuses the instances it does not confirm.
    check(
        &batch()[..1],
        answer(
            400,
            "<html><title>400 Bad Request</title>Bad multipart</html>",
        ),
        Expect::Each(&[(1, Is::Failed)]),
    );
}

#[test]
fn a_2xx_that_lists_no_instance_at_all_says_the_pacs_stored_nothing() {
    // What Orthanc's DICOMweb plugin answers when it cannot write to its storage (a full disk).
    let nothing = r#"{"00080005": {"vr": "CS", "Value": ["ISO_IR 100"]},
                      "00081198": {"vr": "SQ"}, "00081199": {"vr": "SQ"}}"#;
    let got = decide(&batch(), &answer(200, nothing), true);
    let Decision::PerInstance(actions) = &got else {
        panic!("{got:?}")
    };
    assert_eq!(actions.len(), 3);
    for (_, action) in actions {
        let Action::Retry { error, .. } = action else {
            panic!("{actions:?}")
        };
        assert!(error.contains("stored nothing"), "{error}");
        assert!(error.contains("none of the 3"), "{error}");
    }
    // One instance listed, the others omitted: only the omitted ones are retried, as before.
    let one =
        r#"{"00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.1"]}}]}}"#;
    let got = decide(&batch(), &answer(200, one), true);
    let Decision::PerInstance(actions) = &got else {
        panic!("{got:?}")
    };
    let Action::Retry { error, .. } = &actions[1].1 else {
        panic!("{actions:?}")
    };
    assert!(error.contains("did not list the instance"), "{error}");
}

#[test]
fn a_front_end_refusing_chunked_bodies_pauses_with_what_to_change() {
    check(
        &batch(),
        answer(411, "Length Required"),
        Expect::PauseMentioning("request buffering"),
    );
}

#[test]
fn a_400_without_a_stow_response_splits_then_pauses_unless_the_pacs_has_stored_before() {
    // What Orthanc's REST API answers to a multipart body posted to /instances.
    let rest_error = r#"{ "Details" : "Cannot parse an invalid DICOM file (size: 1591085 bytes)",
        "HttpError" : "Bad Request", "HttpStatus" : 400, "Message" : "Bad file format",
        "Method" : "POST", "OrthancError" : "Bad file format", "OrthancStatus" : 15, "Uri" : "/instances" }"#;
    for stored_before in [false, true] {
        let got = decide(&batch(), &answer(400, rest_error), stored_before);
        assert!(
            matches!(&got, Decision::Split { reason } if reason.contains("HTTP 400")),
            "{got:?}"
        );
    }
    let got = decide(&batch()[..1], &answer(400, rest_error), false);
    let Decision::Pause { error } = &got else {
        panic!("{got:?}")
    };
    assert!(
        error.contains("uplink.stow_url") && error.contains("Bad file format"),
        "{error}"
    );
    let got = decide(&batch()[..1], &answer(400, rest_error), true);
    assert!(
        matches!(&got, Decision::PerInstance(a) if matches!(a[..], [(_, Action::Failed { .. })])),
        "{got:?}"
    );
    // A STOW-RS response with a 400 (Orthanc's DICOMweb plugin lists what it stored) is per
    // instance whatever the PACS did before.
    let stow_400 = r#"{"00081198": {"vr": "SQ"},
        "00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.1"]}}]}}"#;
    check_knowing(
        &batch(),
        answer(400, stow_400),
        false,
        Expect::Each(&[
            (1, Is::Sent { redelivery: false }),
            (2, Is::Failed),
            (3, Is::Failed),
        ]),
    );
}

#[test]
fn a_2xx_that_is_not_a_stow_response_pauses_unless_the_pacs_has_stored_before() {
    let page = "<html><body>Welcome to the hospital portal</body></html>";
    let json = r#"{"status": "ok"}"#;
    for body in [page, json] {
        check_knowing(
            &batch(),
            answer(200, body),
            false,
            Expect::PauseMentioning("uplink.stow_url"),
        );
        // A PACS that has stored before and sends one unreadable answer is retried, as before.
        check_knowing(
            &batch(),
            answer(200, body),
            true,
            Expect::Each(&[(1, Is::Retry), (2, Is::Retry), (3, Is::Retry)]),
        );
    }
}

/// A PACS that produces its STOW-RS response neither as JSON nor as XML answers 406: that is what
/// the pause says, not that uplink.stow_url is no STOW-RS endpoint; nothing is failed.
#[test]
fn not_acceptable_says_the_pacs_offers_neither_json_nor_xml_and_pauses() {
    for stored_before in [false, true] {
        let got = decide(
            &batch(),
            &answer(406, "Not Acceptable: application/dicom+json"),
            stored_before,
        );
        let Decision::Pause { error } = got else {
            panic!("a 406 pauses the uplink, got {got:?}");
        };
        for said in [
            "HTTP 406 Not Acceptable",
            "\"Not Acceptable: application/dicom+json\"",
            "neither as application/dicom+json nor as application/dicom+xml",
            "JSON (or XML) responses on the PACS",
            "restart passerelled",
        ] {
            assert!(error.contains(said), "{said:?} missing from: {error}");
        }
        assert!(
            !error.contains("is not a STOW-RS endpoint"),
            "not the wrong-endpoint diagnosis: {error}"
        );
    }
}

fn cut_answer(status: u16, body: &str) -> Exchange {
    Exchange::Answered(Answer {
        status,
        content_type: Some("application/dicom+json".into()),
        body: body.as_bytes().to_vec(),
        cut: true,
        ..Answer::default()
    })
}

/// A body cut at the cap confirms nothing, even if what was read would parse, and every message
/// about it says it was cut instead of quoting the parser's "EOF while parsing".
#[test]
fn an_answer_cut_at_the_cap_confirms_nothing_and_says_it_was_cut() {
    let cut_note = "the PACS's answer was longer than 1 MiB; cut there";
    let half = &ALL_REFERENCED[..ALL_REFERENCED.len() / 2];
    for body in [half, ALL_REFERENCED] {
        let got = decide(&batch(), &cut_answer(200, body), true);
        let Decision::PerInstance(actions) = got else {
            panic!("expected per-instance retries, got {got:?}");
        };
        assert_eq!(actions.len(), 3);
        for (_, action) in actions {
            let Action::Retry { error, .. } = action else {
                panic!("a cut answer confirms nothing: {action:?}");
            };
            assert!(error.contains(cut_note), "{error}");
            assert!(!error.contains("EOF"), "{error}");
        }
    }
    // From an endpoint that has stored nothing yet, a cut 2xx pauses as before; the pause says why.
    let got = decide(&batch(), &cut_answer(200, half), false);
    let Decision::Pause { error } = got else {
        panic!("expected a pause, got {got:?}");
    };
    assert!(error.contains(cut_note), "{error}");
    // An error page that long is quoted, and said to be cut.
    let got = decide(&batch()[..1], &cut_answer(503, "<html>busy"), true);
    let Decision::PerInstance(actions) = got else {
        panic!("expected a retry, got {got:?}");
    };
    let Action::Retry { error, .. } = &actions[0].1 else {
        panic!("a 503 is retried: {actions:?}");
    };
    assert!(
        error.contains("\"<html>busy\"") && error.contains(cut_note),
        "{error}"
    );
}

/// No setting, however large, makes a pause, a backoff or a hold overflow the clock (which panicked
/// the worker) or give a date the log cannot write; a pause of 0 s would have been a tight loop.
#[test]
fn no_setting_makes_a_pause_or_a_backoff_overflow_the_clock() {
    const DAY: Duration = Duration::from_secs(86_400);
    let now = SystemTime::now();
    assert_eq!(pause_length(0), Duration::from_secs(10));
    assert_eq!(pause_length(600), Duration::from_secs(600));
    assert_eq!(pause_length(u64::MAX), DAY);
    assert_eq!(time_after(now, pause_length(u64::MAX)), now + DAY);
    assert_eq!(time_after(now, Duration::MAX), now + DAY);
    assert_eq!(
        time_after(now, Duration::from_secs(30)),
        now + Duration::from_secs(30)
    );
    // HTTP dates end in year 9999: the log line of the pause can be written.
    let _ = httpdate::fmt_http_date(time_after(now, Duration::MAX));
    // A clock at the end of SystemTime keeps its reading instead of panicking.
    if let Some(end) = SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(i64::MAX as u64)) {
        assert_eq!(time_after(end, DAY), end);
    }
    let start = Instant::now();
    assert_eq!(instant_after(start, Duration::MAX), start + DAY);

    // Backoff and Retry-After with the largest values: a day at most, never a panic.
    for jitter in [-0.2, 0.0, 0.2] {
        let b = backoff(u64::MAX, u64::MAX, u32::MAX, jitter);
        assert!(b <= DAY && b >= DAY.mul_f64(0.8), "{b:?}");
        let d = retry_delay(u64::MAX, u64::MAX, 3, Some(Duration::MAX), jitter);
        assert_eq!(d, DAY);
    }
    assert_eq!(retry_delay(2, u64::MAX, 0, Some(Duration::MAX), 0.0), DAY);
    // A base or maximum of 0 s is 1 s: never a tight loop.
    assert_eq!(backoff(0, 0, 0, 0.0), Duration::from_secs(1));
    assert_eq!(backoff(0, 600, 0, 0.0), Duration::from_secs(1));
    assert_eq!(backoff(0, 600, 3, 0.0), Duration::from_secs(8));
}

#[test]
fn a_spool_read_error_retries_only_the_instance_being_read_and_holds_nothing() {
    let failure = LocalFailure {
        instance: Some(InstanceId(2)),
        detail: "reading the spool file of SOP Instance 1.2.3.2 failed after 10 bytes (EIO)".into(),
    };
    let exchange = Exchange::Failed(TransportFailure::LocalRead(failure.clone()));
    // Whatever the PACS did before: the decision names the instance, nothing is paused.
    for stored_before in [false, true] {
        assert_eq!(
            decide(&batch(), &exchange, stored_before),
            Decision::LocalRead(failure.clone())
        );
    }
}

/// The decision for one instance refused by name `refusals` times in `attempts`, answered `code`.
fn refusal_decided(attempts: u32, refusals: u32, status: u16, code: u16) -> Action {
    let one = [refused_inst(1, "1.1", attempts, refusals)];
    let Decision::PerInstance(mut actions) =
        decide(&one, &answer(status, &failed_with(code)), true)
    else {
        panic!("expected per-instance actions");
    };
    actions.remove(0).1
}

#[test]
fn a_duplicate_sop_instance_refusal_is_retried_then_failed_for_the_operator() {
    // 0xB00E: Microsoft's DICOM service's "already stored".
    for code in [0x0111u16, 0xB00E] {
        for (refusals_before, want_failed) in [(0, false), (1, false), (2, true), (7, true)] {
            // However many attempts an outage took before, only the refusals count.
            for attempts_before in [refusals_before, refusals_before + 40] {
                match (refusal_decided(attempts_before, refusals_before, 409, code), want_failed) {
                    (Action::Failed { reason }, true) => {
                        assert!(reason.contains(&format!("{code:#06X}")), "{reason}");
                        assert!(reason.contains("already holds an instance"), "{reason}");
                        assert!(reason.contains("passerelled requeue"), "{reason}");
                    }
                    (Action::Retry { refused, .. }, false) => assert!(refused, "{code:#06X}"),
                    (other, _) => panic!(
                        "{code:#06X} after {refusals_before} refusals in {attempts_before} attempts: got {other:?}"
                    ),
                }
            }
        }
    }
}

/// 1.1 listed stored and failed "out of resources", 1.2 stored and failed "SOP class not
/// supported", 1.3 stored and failed without a reason.
const STORED_AND_FAILED: &str = r#"{
  "00081199": {"vr": "SQ", "Value": [
    {"00081155": {"vr": "UI", "Value": ["1.1"]}},
    {"00081155": {"vr": "UI", "Value": ["1.2"]}},
    {"00081155": {"vr": "UI", "Value": ["1.3"]}}]},
  "00081198": {"vr": "SQ", "Value": [
    {"00081155": {"vr": "UI", "Value": ["1.1"]}, "00081197": {"vr": "US", "Value": [42752]}},
    {"00081155": {"vr": "UI", "Value": ["1.2"]}, "00081197": {"vr": "US", "Value": [290]}},
    {"00081155": {"vr": "UI", "Value": ["1.3"]}}]}}"#;

#[test]
fn an_instance_listed_both_stored_and_failed_is_not_confirmed() {
    for status in [200, 202] {
        check(
            &batch(),
            answer(status, STORED_AND_FAILED),
            Expect::Each(&[(1, Is::Retry), (2, Is::Failed), (3, Is::Retry)]),
        );
    }
    // The order of the two sequences in the body does not matter, nor does the XML form.
    let xml = r#"<NativeDicomModel>
  <DicomAttribute tag="00081198" vr="SQ"><Item number="1">
    <DicomAttribute tag="00081155" vr="UI"><Value number="1">1.1</Value></DicomAttribute>
    <DicomAttribute tag="00081197" vr="US"><Value number="1">272</Value></DicomAttribute>
  </Item></DicomAttribute>
  <DicomAttribute tag="00081199" vr="SQ"><Item number="1">
    <DicomAttribute tag="00081155" vr="UI"><Value number="1">1.1</Value></DicomAttribute>
  </Item></DicomAttribute>
</NativeDicomModel>"#;
    check(
        &batch()[..1],
        xml_answer(200, xml),
        Expect::Each(&[(1, Is::Retry)]),
    );
    // What is recorded for the instance says why it was not confirmed, and keeps the reason.
    let Decision::PerInstance(actions) = decide(&batch(), &answer(200, STORED_AND_FAILED), true)
    else {
        panic!("expected per-instance actions");
    };
    for (_, action) in &actions {
        let text = match action {
            Action::Retry { error, .. } => error,
            Action::Failed { reason } => reason,
            Action::Sent { .. } => panic!("confirmed: {action:?}"),
        };
        assert!(text.contains("both stored and failed"), "{text}");
        assert!(text.contains("FailedSOPSequence"), "{text}");
    }
    let Action::Failed { reason } = &actions[1].1 else {
        panic!("{:?}", actions[1]);
    };
    assert!(reason.contains("0x0122"), "{reason}");
}

#[test]
fn a_referenced_item_that_carries_a_failure_reason_is_not_confirmed() {
    let body = |reason: &str| {
        format!(
            r#"{{"00081199": {{"vr": "SQ", "Value": [
                {{"00081155": {{"vr": "UI", "Value": ["1.1"]}}, "00081197": {{"vr": "US", "Value": [{reason}]}}}},
                {{"00081155": {{"vr": "UI", "Value": ["1.2"]}}}}]}}}}"#
        )
    };
    let two = &batch()[..2];
    // Out of resources: retried; SOP class not supported: failed; not a US value: retried. The
    // other instance of the response is confirmed all the same.
    for (reason, want) in [
        ("42752", Is::Retry),
        ("290", Is::Failed),
        (r#""A700""#, Is::Retry),
    ] {
        check(
            two,
            answer(200, &body(reason)),
            Expect::Each(&[(1, want), (2, Is::Sent { redelivery: true })]),
        );
    }
    // An empty FailureReason attribute says nothing: the item confirms its instance.
    check(
        two,
        answer(
            200,
            r#"{"00081199": {"vr": "SQ", "Value": [
                {"00081155": {"vr": "UI", "Value": ["1.1"]}, "00081197": {"vr": "US"}},
                {"00081155": {"vr": "UI", "Value": ["1.2"]}}]}}"#,
        ),
        Expect::Each(&[
            (1, Is::Sent { redelivery: false }),
            (2, Is::Sent { redelivery: true }),
        ]),
    );
    let xml = r#"<NativeDicomModel><DicomAttribute tag="00081199" vr="SQ"><Item number="1">
    <DicomAttribute tag="00081155" vr="UI"><Value number="1">1.1</Value></DicomAttribute>
    <DicomAttribute tag="00081197" vr="US"><Value number="1">42752</Value></DicomAttribute>
  </Item></DicomAttribute></NativeDicomModel>"#;
    check(
        &batch()[..1],
        xml_answer(200, xml),
        Expect::Each(&[(1, Is::Retry)]),
    );
}

#[test]
fn a_failure_reason_that_is_not_a_us_value_fails_nothing_else_of_the_response() {
    // 1.1 failed with an unreadable reason, 1.2 stored, 1.3 failed "SOP class not supported".
    let body = |bad: &str| {
        format!(
            r#"{{"00081199": {{"vr": "SQ", "Value": [{{"00081155": {{"vr": "UI", "Value": ["1.2"]}}}}]}},
                "00081198": {{"vr": "SQ", "Value": [
                    {{"00081155": {{"vr": "UI", "Value": ["1.1"]}}, "00081197": {{"vr": "US", "Value": [{bad}]}}}},
                    {{"00081155": {{"vr": "UI", "Value": ["1.3"]}}, "00081197": {{"vr": "US", "Value": [290]}}}}]}}}}"#
        )
    };
    for bad in [r#""A700""#, "42752.0", r#""""#] {
        for status in [200, 202, 409] {
            check(
                &batch(),
                answer(status, &body(bad)),
                Expect::Each(&[
                    (1, Is::Retry),
                    (2, Is::Sent { redelivery: true }),
                    (3, Is::Failed),
                ]),
            );
        }
        // Before the PACS has stored anything, such an answer is still a STOW-RS response: no
        // pause naming uplink.stow_url.
        for status in [200, 400] {
            check_knowing(
                &batch(),
                answer(status, &body(bad)),
                false,
                Expect::Each(&[
                    (1, Is::Retry),
                    (2, Is::Sent { redelivery: true }),
                    (3, Is::Failed),
                ]),
            );
        }
    }
}

#[test]
fn a_processing_failure_or_mistyped_argument_refusal_is_retried_then_failed_for_the_operator() {
    for code in [0x0110u16, 0x0212] {
        for (refusals_before, want_failed) in [(0, false), (3, false), (4, true), (9, true)] {
            // After a long outage (attempts that got no answer) a first refusal is still retried.
            for attempts_before in [refusals_before, refusals_before + 40] {
                for status in [200, 202, 409] {
                    match (
                        refusal_decided(attempts_before, refusals_before, status, code),
                        want_failed,
                    ) {
                        (Action::Failed { reason }, true) => {
                            assert!(reason.contains(&format!("{code:#06X}")), "{reason}");
                            assert!(reason.contains("PACS's log"), "{reason}");
                            assert!(reason.contains("passerelled requeue"), "{reason}");
                        }
                        (Action::Retry { refused, .. }, false) => assert!(refused, "{code:#06X}"),
                        (other, _) => panic!(
                            "{code:#06X} after {refusals_before} refusals in {attempts_before} attempts, HTTP {status}: got {other:?}"
                        ),
                    }
                }
            }
        }
    }
    // "Out of resources" stays retried however often it comes: the PACS will take the instance
    // once it has room.
    let action = refusal_decided(50, 50, 200, 0xA700);
    assert!(matches!(action, Action::Retry { .. }), "{action:?}");
}

#[test]
fn a_pause_ends_at_its_time_or_at_once_if_the_clock_went_back_since_it_began() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let longest = Duration::from_secs(600);
    let at = |secs: i64| {
        if secs >= 0 {
            now + Duration::from_secs(secs.unsigned_abs())
        } else {
            now - Duration::from_secs(secs.unsigned_abs())
        }
    };
    assert_eq!(pause_left(at(600), now, longest), Some(longest));
    assert_eq!(
        pause_left(at(30), now, longest),
        Some(Duration::from_secs(30))
    );
    assert_eq!(pause_left(now, now, longest), None);
    assert_eq!(pause_left(at(-5), now, longest), None);
    // Set at most 600 s ahead, yet 601 s or a month left: the clock went back; it is over.
    assert_eq!(pause_left(at(601), now, longest), None);
    assert_eq!(pause_left(at(30 * 86_400), now, longest), None);
}
