use super::*;

#[test]
fn proxy_urls_are_logged_without_their_password() {
    let cases: &[(&str, &str)] = &[
        (
            "http://proxy.hospital.local:3128",
            "http://proxy.hospital.local:3128/",
        ),
        (
            "http://user:s3cret@proxy.hospital.local:3128",
            "http://user:redacted@proxy.hospital.local:3128/",
        ),
        ("not a url", "not a url"),
    ];
    for &(input, want) in cases {
        assert_eq!(redact_url(input), want);
        assert!(!redact_url(input).contains("s3cret"));
    }
}

#[test]
fn shutdown_is_seen_when_asked_or_when_its_sender_is_gone() {
    let (tx, rx) = watch::channel(false);
    assert!(!stop_requested(&rx));
    tx.send(true).unwrap();
    assert!(stop_requested(&rx));
    let (tx, rx) = watch::channel(false);
    drop(tx);
    assert!(stop_requested(&rx));
}

#[test]
fn the_kernel_gives_a_slow_reader_a_whole_segment_at_1_kib_per_second_beyond_the_idle_timeout() {
    let check = |idle: u64, want: u64| {
        assert_eq!(
            tcp_user_timeout(Duration::from_secs(idle)),
            Duration::from_secs(want)
        )
    };
    check(3, 67);
    check(60, 124);
}

/// The expiry watch, on tokio's paused clock (the wall clock it reads follows it): silent while
/// more than 30 days are left, then a WARN a day counting down, then an ERROR a day once expired.
#[tokio::test(start_paused = true)]
async fn the_client_certificate_warning_repeats_daily_and_becomes_an_error_once_expired() {
    const DAY: Duration = Duration::from_secs(86_400);
    let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let t0 = tokio::time::Instant::now();
    let not_after = base + 31 * DAY + Duration::from_secs(3_600);
    let said = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = said.clone();
    let (stop, stopped) = watch::channel(false);
    let watcher = tokio::spawn(watch_client_cert_with(
        "/var/lib/passerelle/client.pem".into(),
        not_after,
        stopped,
        move || base + (tokio::time::Instant::now() - t0),
        move |level, line| {
            let day = (tokio::time::Instant::now() - t0).as_secs() / DAY.as_secs();
            sink.lock().unwrap().push((day, level, line));
        },
    ));
    tokio::time::sleep(33 * DAY + Duration::from_secs(60)).await;
    stop.send(true).unwrap();
    watcher.await.unwrap();

    let said = said.lock().unwrap();
    let days: Vec<u64> = said.iter().map(|(day, _, _)| *day).collect();
    assert_eq!(
        days,
        (2..=33).collect::<Vec<u64>>(),
        "one line a day from day 2: {said:#?}"
    );
    for (day, level, line) in said.iter() {
        assert!(
            line.contains("client_cert=/var/lib/passerelle/client.pem"),
            "{line}"
        );
        assert!(
            line.contains("uplink.client_cert and uplink.client_key"),
            "{line}"
        );
        match day {
            2..=30 => {
                assert_eq!(*level, log::Level::Warn);
                assert!(
                    line.contains(&format!("expires in {} day(s)", 31 - day)),
                    "day {day}: {line}"
                );
            }
            31 => {
                assert_eq!(*level, log::Level::Warn);
                assert!(line.contains("expires in less than a day"), "{line}");
            }
            _ => {
                assert_eq!(*level, log::Level::Error);
                assert!(line.contains("has expired"), "{line}");
            }
        }
    }
}

/// A response whose body arrives in `chunks`, as reqwest hands it to `read_answer`.
fn response_of(chunks: impl Iterator<Item = Vec<u8>> + Send + 'static) -> reqwest::Response {
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(
        chunks.map(|c| Ok::<_, std::io::Error>(bytes::Bytes::from(c))),
    ));
    reqwest::Response::from(
        hyper::Response::builder()
            .status(200)
            .header("content-type", "application/dicom+json")
            .body(body)
            .unwrap(),
    )
}

async fn read(chunks: impl Iterator<Item = Vec<u8>> + Send + 'static) -> Answer {
    read_answer(response_of(chunks), &body::Progress::new())
        .await
        .unwrap()
}

#[tokio::test]
async fn a_response_body_is_read_up_to_1_mib_and_a_longer_one_is_cut_there() {
    const MIB: usize = 1024 * 1024;
    let small = read(std::iter::once(b"{}".to_vec())).await;
    assert_eq!((small.body.as_slice(), small.cut), (&b"{}"[..], false));

    // Exactly the cap: whole, not cut.
    let whole = read((0..16).map(|_| vec![b' '; 64 * 1024])).await;
    assert_eq!((whole.body.len(), whole.cut), (MIB, false));

    // One byte more: cut at the cap.
    let over = read((0..3).map(|i| vec![b' '; if i < 2 { MIB / 2 } else { 1 }])).await;
    assert_eq!((over.body.len(), over.cut), (MIB, true));

    // A PACS that never stops: reading stops at the cap, not after 16 MiB or never.
    let pulled = Arc::new(AtomicU32::new(0));
    let counter = pulled.clone();
    let endless = read(std::iter::repeat_with(move || {
        counter.fetch_add(1, Ordering::Relaxed);
        vec![b'x'; 64 * 1024]
    }))
    .await;
    assert_eq!((endless.body.len(), endless.cut), (MIB, true));
    assert!(
        pulled.load(Ordering::Relaxed) <= 18,
        "read {} chunks of 64 KiB",
        pulled.load(Ordering::Relaxed)
    );
}

#[test]
fn requests_accept_a_json_or_an_xml_stow_response() {
    assert_eq!(
        response::ACCEPT,
        "application/dicom+json, application/dicom+xml;q=0.9"
    );
}
