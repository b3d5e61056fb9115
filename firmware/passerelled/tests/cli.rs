//! The operator-facing command contract of `passerelled`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a test failure

use std::path::Path;
use std::process::Command;

fn passerelled(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_passerelled"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run passerelled");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

fn write_ca(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("ca.pem");
    std::fs::write(
        &p,
        "-----BEGIN CERTIFICATE-----\nMIIBAA==\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    p
}

fn config(dir: &Path, body: &str) -> String {
    let p = dir.join("passerelle.toml");
    std::fs::write(&p, body).unwrap();
    p.to_string_lossy().into_owned()
}

#[test]
fn check_config_accepts_the_minimal_contract_config() {
    let dir = tempfile::tempdir().unwrap();
    let ca = write_ca(dir.path());
    let cfg = config(
        dir.path(),
        &format!(
            "[dicom]\nae_title = \"PASSERELLE\"\nlisten = \"0.0.0.0:11112\"\nallowed_calling_ae_titles = []\n\
             [spool]\ndir = \"{}/spool\"\nmin_free_mb = 1024\n\
             [uplink]\nstow_url = \"https://pacs.example.org/dicom-web/studies\"\nca_file = \"{}\"\n\
             [admin]\nlisten = \"127.0.0.1:8443\"\n",
            dir.path().display(),
            ca.display()
        ),
    );
    let (code, out) = passerelled(&["check-config", "--config", &cfg]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("valid"), "{out}");
}

#[test]
fn check_config_names_every_bad_key_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        "[dicom]\nae_title = \"\"\nlisten = \"nowhere\"\n\
         [spool]\ndir = \"relative\"\n\
         [uplink]\nstow_url = \"http://pacs.example.org/dicom-web/studies\"\nca_file = \"/nonexistent.pem\"\n",
    );
    let (code, out) = passerelled(&["check-config", "--config", &cfg]);
    assert_eq!(code, 1, "{out}");
    for key in [
        "dicom.ae_title",
        "dicom.listen",
        "spool.dir",
        "uplink.stow_url",
        "uplink.ca_file",
    ] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(key) && l.contains("Fix:")),
            "{key} missing in:\n{out}"
        );
    }
}

#[test]
fn check_config_reports_unknown_keys() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "[spool]\nmin_fre_mb = 10\n");
    let (code, out) = passerelled(&["check-config", "--config", &cfg]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("spool.min_fre_mb"), "{out}");
}

#[test]
fn the_daemon_refuses_to_start_on_a_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "[dicom]\nlisten = \"nowhere\"\n");
    let (code, out) = passerelled(&["--config", &cfg]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("dicom.listen"), "{out}");
}

#[test]
fn a_missing_config_file_is_a_clear_error() {
    let (code, out) = passerelled(&["check-config", "--config", "/nonexistent/passerelle.toml"]);
    assert_ne!(code, 0);
    assert!(out.contains("/nonexistent/passerelle.toml"), "{out}");
}

#[test]
fn check_config_says_why_the_file_cannot_be_read() {
    // A directory where the file should be: unreadable as a file whoever runs the test (root too).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_string_lossy().into_owned();
    let why = std::fs::read_to_string(dir.path()).unwrap_err().to_string();
    let (code, out) = passerelled(&["check-config", "--config", &path]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains(&path), "{out}");
    assert!(
        out.contains(&why),
        "the cause ({why}) is missing in:\n{out}"
    );

    let missing = dir.path().join("passerelle.toml");
    let why = std::fs::read_to_string(&missing).unwrap_err().to_string();
    let (code, out) = passerelled(&["check-config", "--config", &missing.to_string_lossy()]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains(&why),
        "the cause ({why}) is missing in:\n{out}"
    );
}
