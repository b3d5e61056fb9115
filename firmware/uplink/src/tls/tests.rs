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
