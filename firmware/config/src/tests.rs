use super::*;
use std::io::Write;

fn ca_pem() -> tempfile::NamedTempFile {
    // A syntactically valid PEM certificate block (validation only checks that PEM certs are present).
    let mut f = tempfile::NamedTempFile::new().unwrap();
    writeln!(
        f,
        "-----BEGIN CERTIFICATE-----\nMIIBAA==\n-----END CERTIFICATE-----"
    )
    .unwrap();
    f
}

fn minimal(ca: &Path) -> String {
    format!(
        r#"
[dicom]
ae_title = "PASSERELLE"
listen = "0.0.0.0:11112"
allowed_calling_ae_titles = []
[spool]
dir = "/var/lib/passerelle/spool"
min_free_mb = 1024
[uplink]
stow_url = "https://pacs.example.org/dicom-web/studies"
ca_file = "{}"
client_cert = ""
client_key = ""
username = ""
password = ""
bearer_token = ""
[admin]
listen = "127.0.0.1:8443"
"#,
        ca.display()
    )
}

/// Checks that `edit` applied to the minimal config yields exactly problems on `keys`.
fn check(edit: impl Fn(String) -> String, keys: &[&str]) {
    let ca = ca_pem();
    let text = edit(minimal(ca.path()));
    let got: Vec<String> = match Config::parse(&text) {
        Ok(cfg) => cfg.validate().into_iter().map(|p| p.key).collect(),
        Err(problems) => problems.into_iter().map(|p| p.key).collect(),
    };
    assert_eq!(got, keys, "for config:\n{text}");
}

#[test]
fn minimal_config_from_the_contract_is_valid() {
    check(|s| s, &[]);
}

#[test]
fn every_bad_key_is_reported_with_its_name() {
    check(
        |s| s.replace("\"PASSERELLE\"", "\"THIS_TITLE_IS_WAY_TOO_LONG\""),
        &["dicom.ae_title"],
    );
    check(|s| s.replace("0.0.0.0:11112", "nowhere"), &["dicom.listen"]);
    check(
        |s| {
            s.replace(
                "allowed_calling_ae_titles = []",
                "allowed_calling_ae_titles = [\"CT1\", \"\"]",
            )
        },
        &["dicom.allowed_calling_ae_titles[1]"],
    );
    check(
        |s| s.replace("/var/lib/passerelle/spool", "relative/spool"),
        &["spool.dir"],
    );
    check(
        |s| s.replace("min_free_mb = 1024", "min_free_mb = 0"),
        &["spool.min_free_mb"],
    );
    check(
        |s| s.replace("https://pacs", "http://pacs"),
        &["uplink.stow_url"],
    );
    check(
        |s| s.replace("https://pacs", "https://u:p@pacs"),
        &["uplink.stow_url"],
    );
    check(
        |s| s.replace("username = \"\"", "username = \"gw\""),
        &["uplink.username / uplink.password"],
    );
    check(
        |s| s.replace("client_cert = \"\"", "client_cert = \"/nonexistent.pem\""),
        &["uplink.client_cert / uplink.client_key"],
    );
    check(
        |s| s.replace("127.0.0.1:8443", "localhost"),
        &["admin.listen"],
    );
}

#[test]
fn several_problems_are_all_reported() {
    check(
        |s| {
            s.replace("0.0.0.0:11112", "x")
                .replace("127.0.0.1:8443", "y")
        },
        &["dicom.listen", "admin.listen"],
    );
}

#[test]
fn missing_ca_file_is_reported() {
    let text = minimal(Path::new("/nonexistent/ca.pem"));
    let keys: Vec<_> = Config::parse(&text)
        .unwrap()
        .validate()
        .into_iter()
        .map(|p| p.key)
        .collect();
    assert_eq!(keys, ["uplink.ca_file"]);
}

#[test]
fn unknown_keys_are_errors_not_silently_ignored() {
    check(
        |s| s.replace("min_free_mb", "min_fre_mb"),
        &["spool.min_fre_mb"],
    );
}

#[test]
fn wrong_types_point_at_the_line() {
    let ca = ca_pem();
    let text = minimal(ca.path()).replace("min_free_mb = 1024", "min_free_mb = \"lots\"");
    let problems = Config::parse(&text).unwrap_err();
    assert_eq!(problems.len(), 1);
    assert!(problems[0].fix.contains("line 8"), "{}", problems[0]);
}

#[test]
fn defaults_fill_missing_keys() {
    let cfg = Config::parse("").unwrap();
    assert_eq!(cfg.dicom.ae_title, "PASSERELLE");
    assert_eq!(cfg.spool.min_free_mb, 1024);
    assert_eq!(cfg.admin.listen, "127.0.0.1:8443");
}

#[test]
fn secrets_are_not_in_debug_output() {
    let mut cfg = Config::default();
    cfg.uplink.password = "hunter2".into();
    cfg.uplink.bearer_token = "tok".into();
    let dbg = format!("{:?}", cfg.uplink);
    assert!(!dbg.contains("hunter2") && !dbg.contains("tok\""), "{dbg}");
}

#[test]
fn uid_validation() {
    for good in ["1.2.840.10008.5.1.4.1.1.2", "0.1", "1.2.0.3"] {
        assert!(is_valid_uid(good), "{good}");
    }
    for bad in ["", "1..2", "1.02", "a.b", &"1.".repeat(40)] {
        assert!(!is_valid_uid(bad), "{bad}");
    }
}

#[test]
fn a_device_or_huge_file_as_ca_file_is_refused_without_reading_it() {
    for path in ["/dev/zero", "/dev/null"] {
        let text = minimal(Path::new(path));
        let problems = Config::parse(&text).unwrap().validate();
        assert_eq!(problems.len(), 1, "{path}: {problems:?}");
        assert_eq!(problems[0].key, "uplink.ca_file");
        assert!(
            problems[0].problem.contains("not a regular file"),
            "{}",
            problems[0]
        );
    }
}

#[test]
fn an_empty_or_dotted_unknown_key_is_still_named() {
    let problems = Config::parse("''=7\n[spool]\n\"a.b\" = 1\n").unwrap_err();
    let keys: Vec<_> = problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, ["\"\"", "spool.\"a.b\""]);
}

#[test]
fn the_daemon_user_defaults_to_passerelle_and_is_never_root() {
    let ca = ca_pem();
    let cfg = Config::parse(&minimal(ca.path())).unwrap();
    assert_eq!(cfg.daemon.user, "passerelle");
    check(|s| s + "[daemon]\nuser = \"pacsgw\"\n", &[]);
    for bad in ["", "root", "-x", "a b", "a:b", &"u".repeat(33)] {
        check(
            |s| s + &format!("[daemon]\nuser = {bad:?}\n"),
            &["daemon.user"],
        );
    }
    let problems = Config::parse(&(minimal(ca.path()) + "[daemon]\nuser = \"root\"\n"))
        .unwrap()
        .validate();
    assert!(
        problems[0].problem.contains("never runs as root"),
        "{problems:?}"
    );
}

#[test]
fn uplink_connections_default_to_4_and_stay_within_1_to_8() {
    let ca = ca_pem();
    let cfg = Config::parse(&minimal(ca.path())).unwrap();
    assert_eq!(cfg.uplink.connections, 4);
    for good in [1, 4, 8] {
        let text =
            minimal(ca.path()).replace("[uplink]\n", &format!("[uplink]\nconnections = {good}\n"));
        let cfg = Config::parse(&text).unwrap();
        assert_eq!(cfg.uplink.connections, good);
        assert!(cfg.validate().is_empty(), "connections = {good}");
    }
    for bad in [0, 9, 64] {
        check(
            |s| s.replace("[uplink]\n", &format!("[uplink]\nconnections = {bad}\n")),
            &["uplink.connections"],
        );
    }
}

#[test]
fn http2_is_off_unless_asked_for() {
    let ca = ca_pem();
    assert!(!Config::parse(&minimal(ca.path())).unwrap().uplink.http2);
    let text = minimal(ca.path()).replace("[uplink]\n", "[uplink]\nhttp2 = true\n");
    let cfg = Config::parse(&text).unwrap();
    assert!(cfg.uplink.http2);
    assert!(cfg.validate().is_empty());
    assert!(Config::parse(
        &minimal(ca.path()).replace("[uplink]\n", "[uplink]\nhttp2 = \"yes\"\n")
    )
    .is_err());
}

/// The uplink adds these to the clock: each is bounded, so that no value can make it overflow or
/// repeat a refused request in a tight loop, and each default lies within its bounds.
#[test]
fn uplink_pauses_and_backoff_are_bounded_and_their_defaults_lie_within() {
    let d = UplinkConfig::default();
    assert!((MIN_AUTH_PAUSE_SECS..=MAX_AUTH_PAUSE_SECS).contains(&d.auth_pause_secs));
    assert!((1..=d.retry_max_secs).contains(&d.retry_base_secs));
    assert!(d.retry_max_secs <= MAX_RETRY_MAX_SECS);
    assert!((1..=MAX_BATCH_INSTANCES).contains(&d.batch_max_instances));

    fn set(key: &'static str, value: i64) -> impl Fn(String) -> String {
        move |s| s.replace("[uplink]\n", &format!("[uplink]\n{key} = {value}\n"))
    }
    for good in [10, 600, 86_400] {
        check(set("auth_pause_secs", good), &[]);
    }
    // i64::MAX is the largest integer TOML has; as seconds added to the clock it overflowed.
    for bad in [0, 1, 9, 86_401, i64::MAX] {
        check(set("auth_pause_secs", bad), &["uplink.auth_pause_secs"]);
    }
    for good in [2, 600, 86_400] {
        check(set("retry_max_secs", good), &[]);
    }
    for bad in [86_401, i64::MAX] {
        check(set("retry_max_secs", bad), &["uplink.retry_max_secs"]);
    }
    check(
        set("retry_base_secs", 0),
        &["uplink.retry_base_secs / uplink.retry_max_secs"],
    );
}

#[test]
fn a_pause_out_of_bounds_says_why_and_what_to_use() {
    let ca = ca_pem();
    for (value, why) in [(0, "almost at once"), (100_000, "longer than a day")] {
        let text = minimal(ca.path()).replace(
            "[uplink]\n",
            &format!("[uplink]\nauth_pause_secs = {value}\n"),
        );
        let problems = Config::parse(&text).unwrap().validate();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].problem.contains(why), "{}", problems[0]);
        assert!(
            problems[0].fix.contains("10 to 86400 seconds"),
            "{}",
            problems[0]
        );
    }
}

#[test]
fn a_batch_is_at_most_500_instances_so_the_pacs_answer_fits_what_the_uplink_reads() {
    for good in [1, 10, 500] {
        check(
            |s| {
                s.replace(
                    "[uplink]\n",
                    &format!("[uplink]\nbatch_max_instances = {good}\n"),
                )
            },
            &[],
        );
    }
    for bad in [501, 100_000] {
        check(
            |s| {
                s.replace(
                    "[uplink]\n",
                    &format!("[uplink]\nbatch_max_instances = {bad}\n"),
                )
            },
            &["uplink.batch_max_instances"],
        );
    }
    check(
        |s| s.replace("[uplink]\n", "[uplink]\nbatch_max_instances = 0\n"),
        &["uplink.batch_max_instances / uplink.batch_max_mb"],
    );
}

#[test]
fn the_debug_form_of_the_uplink_settings_hides_every_secret_including_the_proxy_password() {
    let cfg = UplinkConfig {
        password: "pw-secret".into(),
        bearer_token: "token-secret".into(),
        proxy: "http://squid:proxy-secret@proxy.hospital.local:3128/".into(),
        ..UplinkConfig::default()
    };
    let shown = format!("{cfg:?}");
    for secret in ["pw-secret", "token-secret", "proxy-secret"] {
        assert!(!shown.contains(secret), "{shown}");
    }
    assert!(
        shown.contains("http://squid:redacted@proxy.hospital.local:3128/"),
        "{shown}"
    );
    for plain in ["", "http://proxy:3128", "http://user@proxy:3128"] {
        assert!(redact_url(plain).starts_with(plain), "{plain}");
    }
}
