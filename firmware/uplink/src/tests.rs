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
fn an_error_chain_reads_as_one_line_without_repeats() {
    #[derive(Debug)]
    struct Outer(std::io::Error);
    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "cannot send: {}", self.0)
        }
    }
    impl StdError for Outer {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
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
