use super::*;

use std::path::PathBuf;

struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Files {
        Files {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn write(&self, name: &str, content: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        path
    }

    /// A CA certificate and a client certificate + key it signed, as PEM files.
    fn pki(&self) -> (PathBuf, PathBuf, PathBuf) {
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["box.local".to_string()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        (
            self.write("ca.pem", &ca.pem()),
            self.write("client.pem", &cert.pem()),
            self.write("client.key", &key.serialize_pem()),
        )
    }
}

fn config(ca: PathBuf, cert: PathBuf, key: PathBuf) -> UplinkConfig {
    UplinkConfig {
        ca_file: ca,
        client_cert: cert,
        client_key: key,
        ..UplinkConfig::default()
    }
}

/// Builds a TLS config and checks the error message (or success when `expect` is None).
fn check(cfg: UplinkConfig, expect: Option<&str>) {
    match (client_config(&cfg), expect) {
        (Ok(_), None) => {}
        (Ok(_), Some(want)) => panic!("expected an error containing {want:?}"),
        (Err(e), None) => panic!("unexpected error: {}", crate::error_chain(&e)),
        (Err(e), Some(want)) => {
            let msg = crate::error_chain(&e);
            assert!(msg.contains(want), "{msg:?} should contain {want:?}");
        }
    }
}

#[test]
fn a_ca_file_with_certificates_and_an_optional_client_identity_build() {
    let f = Files::new();
    let (ca, cert, key) = f.pki();
    check(config(ca.clone(), PathBuf::new(), PathBuf::new()), None);
    check(config(ca, cert, key), None);
}

#[test]
fn unusable_files_are_refused_with_the_key_to_fix() {
    let f = Files::new();
    let (ca, cert, key) = f.pki();
    let empty = f.write("empty.pem", "");
    let garbage = f.write(
        "garbage.pem",
        "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
    );
    let missing = f.dir.path().join("missing.pem");
    let none = PathBuf::new();
    let cases: Vec<(UplinkConfig, &str)> = vec![
        (
            config(missing.clone(), none.clone(), none.clone()),
            "uplink.ca_file",
        ),
        (
            config(empty.clone(), none.clone(), none.clone()),
            "holds no PEM certificate",
        ),
        (
            config(garbage, none.clone(), none.clone()),
            "uplink.ca_file",
        ),
        // A private key is not a trust anchor.
        (
            config(key.clone(), none.clone(), none.clone()),
            "holds no PEM certificate",
        ),
        (
            config(ca.clone(), cert.clone(), none.clone()),
            "must be set together",
        ),
        (
            config(ca.clone(), none.clone(), key.clone()),
            "must be set together",
        ),
        (
            config(ca.clone(), missing, key.clone()),
            "uplink.client_cert",
        ),
        (
            config(ca.clone(), empty.clone(), key.clone()),
            "uplink.client_cert",
        ),
        (
            config(ca.clone(), cert.clone(), empty),
            "holds no PEM private key",
        ),
        (config(ca.clone(), cert.clone(), cert), "uplink.client_key"),
    ];
    for (cfg, want) in cases {
        check(cfg, Some(want));
    }
}

#[test]
fn a_client_key_that_does_not_match_the_certificate_is_refused() {
    let f = Files::new();
    let (ca, cert, _key) = f.pki();
    let other_key = f.write(
        "other.key",
        &rcgen::KeyPair::generate().unwrap().serialize_pem(),
    );
    check(
        config(ca, cert, other_key),
        Some("does not go with uplink.client_cert"),
    );
}

#[test]
fn the_client_certificates_end_of_validity_is_read_for_the_config_and_for_status() {
    let files = Files::new();
    let (ca, _, _) = files.pki();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["box.local".to_string()]).unwrap();
    params.not_after = rcgen::date_time_ymd(2030, 1, 1);
    let cert = files.write("dated.pem", &params.self_signed(&key).unwrap().pem());
    let cfg = config(ca, cert, files.write("dated.key", &key.serialize_pem()));
    let jan_2030 = UNIX_EPOCH + Duration::from_secs(1_893_456_000);
    assert_eq!(client_cert_not_after(&cfg).unwrap(), Some(jan_2030));
    let (_, auth) = client_config(&cfg).unwrap();
    assert_eq!(auth.not_after(), Some(jan_2030));
    let none = UplinkConfig {
        ca_file: cfg.ca_file.clone(),
        ..UplinkConfig::default()
    };
    assert_eq!(client_cert_not_after(&none).unwrap(), None);
    let garbage = UplinkConfig {
        client_cert: files.write(
            "garbage.pem",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        ),
        ..cfg
    };
    let msg = crate::error_chain(&client_cert_not_after(&garbage).unwrap_err());
    assert!(msg.contains("not valid X.509"), "{msg}");
}

#[test]
fn the_operator_hears_of_the_client_certificate_from_30_days_before_it_expires() {
    let day = Duration::from_secs(86_400);
    let now = UNIX_EPOCH + 20_000 * day;
    let notice = |left: Duration| client_cert_notice(now + left, now);
    assert_eq!(notice(31 * day), None);
    assert_eq!(notice(30 * day + Duration::from_secs(1)), None);
    assert_eq!(notice(30 * day), Some(CertNotice::ExpiresIn { days: 30 }));
    assert_eq!(
        notice(day + Duration::from_secs(3600)),
        Some(CertNotice::ExpiresIn { days: 1 })
    );
    assert_eq!(
        notice(Duration::from_secs(1)),
        Some(CertNotice::ExpiresIn { days: 0 })
    );
    assert_eq!(notice(Duration::ZERO), Some(CertNotice::Expired));
    assert_eq!(
        client_cert_notice(now - day, now),
        Some(CertNotice::Expired)
    );
}
