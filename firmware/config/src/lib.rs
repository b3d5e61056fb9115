//! Passerelle's configuration file: one TOML document, parsed once at start-up.
//!
//! # Background
//! The box is configured by a hospital's IT team, usually through the admin page, which writes this
//! file. A bad value must be caught before the daemon starts, with a line per bad key saying the key,
//! what is wrong and how to fix it (`passerelled check-config`).
//!
//! # Design
//! - Every key has a default, so a file holding only the keys documented in README.md runs.
//! - Unknown keys are errors (a typo such as `min_fre_mb` must not silently fall back to a default).
//! - [`Config::validate`] collects *all* problems instead of stopping at the first one.
//!
//! # Limitations
//! A value that has the wrong TOML type (a string where a number is expected) is reported by the
//! TOML parser, which stops at the first such error.
//!
//! This crate must never touch the network or the spool; it only reads the files the config names
//! (to check they exist and parse).

mod error;

pub use error::{ConfigError, Result};

use serde::Deserialize;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The shortest `uplink.auth_pause_secs` accepted: below it, a refused request (a wrong password, a
/// refused certificate, a wrong URL) would be sent again almost at once, over and over.
pub const MIN_AUTH_PAUSE_SECS: u64 = 10;
/// The longest `uplink.auth_pause_secs` accepted (a day): after the cause is fixed, the uplink would
/// otherwise stay idle for days unless passerelled is restarted.
pub const MAX_AUTH_PAUSE_SECS: u64 = 86_400;
/// The longest `uplink.retry_max_secs` accepted (a day): an instance is never left waiting longer
/// between attempts.
pub const MAX_RETRY_MAX_SECS: u64 = 86_400;
/// The largest `uplink.batch_max_instances` accepted. The uplink reads at most 1 MiB of the PACS's
/// answer to a request; a STOW-RS response names each instance in one item of well under 2 KiB
/// (SOP Class UID, SOP Instance UID, Retrieve URL, even as indented XML), so 500 instances fit with room
/// to spare. Larger batches gain nothing: the default is 10.
pub const MAX_BATCH_INSTANCES: usize = 500;

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Config {
    pub dicom: DicomConfig,
    pub spool: SpoolConfig,
    pub uplink: UplinkConfig,
    pub admin: AdminConfig,
    pub daemon: DaemonConfig,
}

/// `[dicom]`: the Storage SCP that modalities send to.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct DicomConfig {
    /// Our called AE title; associations addressed to another called AE title are rejected.
    pub ae_title: String,
    /// Address and port the SCP listens on.
    pub listen: String,
    /// Calling AE titles allowed to store; empty means any.
    pub allowed_calling_ae_titles: Vec<String>,
    /// Private (non-standard) Storage SOP Class UIDs to accept in addition to the standard ones.
    pub private_sop_classes: Vec<String>,
    /// Maximum number of concurrent associations; further ones are rejected (transient).
    pub max_associations: usize,
    /// Largest P-DATA PDU we accept (announced in the A-ASSOCIATE-AC), in bytes.
    pub max_pdu_length: u32,
    /// ARTIM: time allowed for a peer to send its A-ASSOCIATE-RQ (or release) before we close.
    pub artim_timeout_secs: u64,
    /// Idle time allowed on an established association before we abort it.
    pub idle_timeout_secs: u64,
    /// Time in-flight associations get to finish after SIGTERM.
    pub shutdown_grace_secs: u64,
}

impl Default for DicomConfig {
    fn default() -> Self {
        Self {
            ae_title: "PASSERELLE".into(),
            listen: "0.0.0.0:11112".into(),
            allowed_calling_ae_titles: Vec::new(),
            private_sop_classes: Vec::new(),
            max_associations: 16,
            max_pdu_length: 262_144,
            artim_timeout_secs: 30,
            idle_timeout_secs: 120,
            shutdown_grace_secs: 20,
        }
    }
}

impl DicomConfig {
    pub fn artim_timeout(&self) -> Duration {
        Duration::from_secs(self.artim_timeout_secs)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
}

/// `[spool]`: the durable on-disk queue.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    /// Below this much free space, new C-STOREs are refused with 0xA700.
    pub min_free_mb: u64,
    /// Confirmed instances are kept as a local cache for this long (0 = evict as soon as sent).
    pub retention_hours: u64,
    /// When space runs low, confirmed instances are evicted until this much more than `min_free_mb`
    /// is free.
    pub evict_headroom_mb: u64,
    /// zstd level used at rest (1 = fastest).
    pub zstd_level: i32,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("/var/lib/passerelle/spool"),
            min_free_mb: 1024,
            retention_hours: 168,
            evict_headroom_mb: 512,
            zstd_level: 1,
        }
    }
}

/// `[uplink]`: STOW-RS to the regional PACS.
#[derive(Clone, Deserialize)]
#[serde(default)]
pub struct UplinkConfig {
    pub stow_url: String,
    pub ca_file: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub username: String,
    pub password: String,
    pub bearer_token: String,
    /// Optional HTTP CONNECT proxy, e.g. `http://proxy.hospital.local:3128`.
    pub proxy: String,
    /// Instances of one study per request (1..=[`MAX_BATCH_INSTANCES`]). Small enough that the
    /// requests of a large study keep every connection busy and fall out of step (one waits for the
    /// PACS while others send), and that a failed request over a slow link resends little.
    pub batch_max_instances: usize,
    pub batch_max_mb: u64,
    pub connect_timeout_secs: u64,
    /// No byte sent or received for this long aborts the request (a slow but moving upload is fine).
    pub idle_timeout_secs: u64,
    /// Exponential backoff of retried instances and of the hold after an outage: the first delay
    /// (at least 1 s).
    pub retry_base_secs: u64,
    /// The longest backoff (at least `retry_base_secs`, at most [`MAX_RETRY_MAX_SECS`]).
    pub retry_max_secs: u64,
    /// After an authentication or certificate failure, the uplink pauses this long before trying
    /// again ([`MIN_AUTH_PAUSE_SECS`]..=[`MAX_AUTH_PAUSE_SECS`]).
    pub auth_pause_secs: u64,
    /// Requests in flight at once (1..=8), each on its own connection, or, with `http2` agreed by
    /// the PACS, each a stream of one shared connection.
    pub connections: usize,
    /// Offer HTTP/2 (TLS ALPN). Off by default: worth it only when the PACS front end gives each
    /// request stream a flow-control window of at least the link's bandwidth × round trip.
    pub http2: bool,
}

impl Default for UplinkConfig {
    fn default() -> Self {
        Self {
            stow_url: String::new(),
            ca_file: PathBuf::from("/etc/passerelle/upstream-ca.pem"),
            client_cert: PathBuf::new(),
            client_key: PathBuf::new(),
            username: String::new(),
            password: String::new(),
            bearer_token: String::new(),
            proxy: String::new(),
            batch_max_instances: 10,
            batch_max_mb: 256,
            connect_timeout_secs: 15,
            idle_timeout_secs: 60,
            retry_base_secs: 2,
            retry_max_secs: 600,
            auth_pause_secs: 600,
            connections: 4,
            http2: false,
        }
    }
}

impl fmt::Debug for UplinkConfig {
    // Secrets never reach a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UplinkConfig")
            .field("stow_url", &self.stow_url)
            .field("ca_file", &self.ca_file)
            .field("client_cert", &self.client_cert)
            .field("username", &self.username)
            .field("password", &redacted(&self.password))
            .field("bearer_token", &redacted(&self.bearer_token))
            .field("proxy", &redact_url(&self.proxy))
            .finish_non_exhaustive()
    }
}

/// A URL for logs and `Debug`, without its password (`uplink.proxy` may be
/// `http://user:password@host:port`); what does not parse as a URL is returned as it is.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("redacted"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => url.to_string(),
    }
}

fn redacted(s: &str) -> &'static str {
    if s.is_empty() {
        ""
    } else {
        "<redacted>"
    }
}

impl UplinkConfig {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_secs)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }
    pub fn batch_max_bytes(&self) -> u64 {
        self.batch_max_mb.saturating_mul(1024 * 1024)
    }
}

/// `[admin]`: the local admin page.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct AdminConfig {
    pub listen: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8443".into(),
        }
    }
}

/// `[daemon]`: how the process itself runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct DaemonConfig {
    /// The unprivileged account the daemon runs as. Started as root, it binds its ports and then
    /// switches to this user before it touches the spool; it never keeps running as root.
    pub user: String,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            user: "passerelle".into(),
        }
    }
}

/// One bad key: what it is, what is wrong, how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub problem: String,
    pub fix: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} Fix: {}", self.key, self.problem, self.fix)
    }
}

/// Writes an ignored key's path as TOML would (`spool.min_fre_mb`, `"".x`, `spool."a.b"`), so that
/// an empty or dotted key is still named in the problem line.
fn toml_key(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    fn segments(path: &Path<'_>, out: &mut Vec<String>) {
        match path {
            Path::Root => {}
            Path::Seq { parent, index } => {
                segments(parent, out);
                out.push(index.to_string());
            }
            Path::Map { parent, key } => {
                segments(parent, out);
                let bare = !key.is_empty()
                    && key
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                out.push(if bare {
                    key.clone()
                } else {
                    format!("{key:?}")
                });
            }
            Path::Some { parent }
            | Path::NewtypeStruct { parent }
            | Path::NewtypeVariant { parent } => segments(parent, out),
        }
    }
    let mut out = Vec::new();
    segments(path, &mut out);
    if out.is_empty() {
        "(file)".into()
    } else {
        out.join(".")
    }
}

impl Config {
    /// Reads and parses `path`. Unknown keys and type errors are returned as problems; semantic
    /// checks are done by [`Config::validate`].
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|problems| ConfigError::Invalid {
            path: path.to_path_buf(),
            problems,
        })
    }

    /// Parses TOML text; every unknown key is a problem.
    pub fn parse(text: &str) -> std::result::Result<Config, Vec<Problem>> {
        let de = toml::Deserializer::new(text);
        let mut unknown = Vec::new();
        let parsed: std::result::Result<Config, _> =
            serde_ignored::deserialize(de, |path| unknown.push(toml_key(&path)));
        match parsed {
            Err(e) => Err(vec![Problem {
                key: "(file)".into(),
                problem: format!("The file is not valid TOML for Passerelle: {}", e.message()),
                fix: location_hint(text, e.span()),
            }]),
            Ok(cfg) if unknown.is_empty() => Ok(cfg),
            Ok(_) => Err(unknown
                .into_iter()
                .map(|key| Problem {
                    problem: "This key is not known to Passerelle.".into(),
                    fix: "Remove it, or correct its spelling (README.md lists every key).".into(),
                    key,
                })
                .collect()),
        }
    }

    /// Loads and validates: the one call the daemon makes before it starts.
    pub fn load_valid(path: &Path) -> Result<Config> {
        let cfg = Self::load(path)?;
        let problems = cfg.validate();
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                problems,
            })
        }
    }

    /// Checks every value; returns one [`Problem`] per bad key (empty when the config is good).
    pub fn validate(&self) -> Vec<Problem> {
        let mut p = Vec::new();
        let mut bad = |key: &str, problem: String, fix: &str| {
            p.push(Problem {
                key: key.into(),
                problem,
                fix: fix.into(),
            })
        };

        // [dicom]
        if let Err(why) = check_ae_title(&self.dicom.ae_title) {
            bad(
                "dicom.ae_title",
                why,
                "Use 1 to 16 printable ASCII characters without a backslash, e.g. \"PASSERELLE\".",
            );
        }
        if self.dicom.listen.parse::<SocketAddr>().is_err() {
            bad(
                "dicom.listen",
                format!("\"{}\" is not an address and port.", self.dicom.listen),
                "Write it as IP:PORT, e.g. \"0.0.0.0:11112\" or \"[::]:104\".",
            );
        }
        for (i, t) in self.dicom.allowed_calling_ae_titles.iter().enumerate() {
            if let Err(why) = check_ae_title(t) {
                bad(
                    &format!("dicom.allowed_calling_ae_titles[{i}]"),
                    why,
                    "Use the modality's AE title exactly as configured on the modality (1 to 16 characters).",
                );
            }
        }
        for (i, uid) in self.dicom.private_sop_classes.iter().enumerate() {
            if !is_valid_uid(uid) {
                bad(
                    &format!("dicom.private_sop_classes[{i}]"),
                    format!("\"{uid}\" is not a valid DICOM UID."),
                    "Use digits and dots only, at most 64 characters, e.g. \"1.2.3.4.5\".",
                );
            }
        }
        if self.dicom.max_associations == 0 {
            bad(
                "dicom.max_associations",
                "0 would refuse every modality.".into(),
                "Set it to at least 1 (the default is 16).",
            );
        }
        if !(4096..=16 * 1024 * 1024).contains(&self.dicom.max_pdu_length) {
            bad(
                "dicom.max_pdu_length",
                format!(
                    "{} is outside 4096..=16777216 bytes.",
                    self.dicom.max_pdu_length
                ),
                "Use a value such as 262144 (the default).",
            );
        }
        if self.dicom.artim_timeout_secs == 0 || self.dicom.idle_timeout_secs == 0 {
            bad(
                "dicom.artim_timeout_secs / dicom.idle_timeout_secs",
                "A timeout of 0 seconds would drop every association.".into(),
                "Use a number of seconds greater than 0 (defaults: 30 and 120).",
            );
        }

        // [spool]
        if !self.spool.dir.is_absolute() {
            bad(
                "spool.dir",
                format!("\"{}\" is not an absolute path.", self.spool.dir.display()),
                "Use an absolute path on the data partition, e.g. \"/var/lib/passerelle/spool\".",
            );
        }
        if self.spool.min_free_mb == 0 {
            bad(
                "spool.min_free_mb",
                "0 would let the disk fill completely, and a full disk can corrupt the queue."
                    .into(),
                "Keep a reserve, e.g. 1024.",
            );
        }
        if !(1..=19).contains(&self.spool.zstd_level) {
            bad(
                "spool.zstd_level",
                format!("{} is outside 1..=19.", self.spool.zstd_level),
                "Use 1 (fastest, the default) to 19.",
            );
        }

        // [uplink]
        match url::Url::parse(&self.uplink.stow_url) {
            Err(e) => bad(
                "uplink.stow_url",
                format!("\"{}\" is not a URL ({e}).", self.uplink.stow_url),
                "Set the regional PACS's STOW-RS endpoint, e.g. \"https://pacs.example.org/dicom-web/studies\".",
            ),
            Ok(u) if u.scheme() != "https" => bad(
                "uplink.stow_url",
                format!("The scheme is \"{}\"; studies may only leave the box over TLS.", u.scheme()),
                "Use an https:// URL.",
            ),
            Ok(u) if !u.username().is_empty() || u.password().is_some() => bad(
                "uplink.stow_url",
                "The URL carries credentials, which would end up in logs.".into(),
                "Remove them from the URL and set uplink.username and uplink.password instead.",
            ),
            Ok(_) => {}
        }
        if let Err(why) = check_pem_certs(&self.uplink.ca_file) {
            bad(
                "uplink.ca_file",
                why,
                "Point it at a PEM file holding the CA certificate(s) that signed the PACS's server certificate.",
            );
        }
        let has_cert = !self.uplink.client_cert.as_os_str().is_empty();
        let has_key = !self.uplink.client_key.as_os_str().is_empty();
        if has_cert != has_key {
            bad(
                "uplink.client_cert / uplink.client_key",
                "Only one of the two is set.".into(),
                "Set both (PEM certificate and its private key) for mutual TLS, or neither.",
            );
        } else if has_cert {
            if let Err(why) = check_pem_certs(&self.uplink.client_cert) {
                bad(
                    "uplink.client_cert",
                    why,
                    "Point it at the box's PEM client certificate.",
                );
            }
            if let Err(why) = check_pem_key(&self.uplink.client_key) {
                bad(
                    "uplink.client_key",
                    why,
                    "Point it at the PEM private key of the client certificate.",
                );
            }
        }
        if self.uplink.username.is_empty() != self.uplink.password.is_empty() {
            bad(
                "uplink.username / uplink.password",
                "Only one of the two is set.".into(),
                "Set both for HTTP basic authentication, or neither.",
            );
        }
        if !self.uplink.username.is_empty() && !self.uplink.bearer_token.is_empty() {
            bad(
                "uplink.bearer_token",
                "Both basic authentication and a bearer token are set.".into(),
                "Keep only the one the regional PACS expects.",
            );
        }
        if !self.uplink.proxy.is_empty() {
            match url::Url::parse(&self.uplink.proxy) {
                Ok(u) if u.scheme() == "http" && u.host().is_some() => {}
                _ => bad(
                    "uplink.proxy",
                    format!("\"{}\" is not an http:// proxy URL.", self.uplink.proxy),
                    "Use the hospital's HTTP CONNECT proxy, e.g. \"http://proxy.hospital.local:3128\", or leave it empty.",
                ),
            }
        }
        if self.uplink.batch_max_instances == 0 || self.uplink.batch_max_mb == 0 {
            bad(
                "uplink.batch_max_instances / uplink.batch_max_mb",
                "A batch limit of 0 would never send anything.".into(),
                "Use at least 1 (defaults: 10 instances, 256 MB).",
            );
        }
        if self.uplink.batch_max_instances > MAX_BATCH_INSTANCES {
            bad(
                "uplink.batch_max_instances",
                format!(
                    "{} instances per request is more than {MAX_BATCH_INSTANCES}: the PACS's answer to such a request could be longer than the 1 MiB the uplink reads of it.",
                    self.uplink.batch_max_instances
                ),
                &format!("Use 1 to {MAX_BATCH_INSTANCES} (default 10): larger batches do not make uploads faster."),
            );
        }
        if !(1..=8).contains(&self.uplink.connections) {
            bad(
                "uplink.connections",
                format!("{} requests in flight at once is out of range.", self.uplink.connections),
                "Use 1 to 8 (default 4): more than one keeps the link busy while the PACS stores a batch.",
            );
        }
        if self.uplink.idle_timeout_secs == 0 || self.uplink.connect_timeout_secs == 0 {
            bad(
                "uplink.idle_timeout_secs / uplink.connect_timeout_secs",
                "A timeout of 0 seconds would fail every upload.".into(),
                "Use a number of seconds greater than 0 (defaults: 60 and 15).",
            );
        }
        if self.uplink.retry_base_secs == 0
            || self.uplink.retry_max_secs < self.uplink.retry_base_secs
        {
            bad(
                "uplink.retry_base_secs / uplink.retry_max_secs",
                "The retry base must be at least 1 s and no larger than the cap.".into(),
                "Use e.g. retry_base_secs = 2 and retry_max_secs = 600.",
            );
        }
        if self.uplink.retry_max_secs > MAX_RETRY_MAX_SECS {
            bad(
                "uplink.retry_max_secs",
                format!(
                    "A backoff of up to {} s is longer than a day: a retried instance could wait that long between attempts.",
                    self.uplink.retry_max_secs
                ),
                &format!("Use at most {MAX_RETRY_MAX_SECS} (default 600)."),
            );
        }
        let pause = self.uplink.auth_pause_secs;
        if pause < MIN_AUTH_PAUSE_SECS {
            bad(
                "uplink.auth_pause_secs",
                format!(
                    "A pause of {pause} s after a refused request (wrong credentials, a refused certificate, a wrong URL) would send the next one almost at once, over and over."
                ),
                &format!("Use {MIN_AUTH_PAUSE_SECS} to {MAX_AUTH_PAUSE_SECS} seconds (default 600)."),
            );
        } else if pause > MAX_AUTH_PAUSE_SECS {
            bad(
                "uplink.auth_pause_secs",
                format!(
                    "A pause of {pause} s is longer than a day: once the cause is fixed, the uplink would stay idle that long unless passerelled is restarted."
                ),
                &format!("Use {MIN_AUTH_PAUSE_SECS} to {MAX_AUTH_PAUSE_SECS} seconds (default 600)."),
            );
        }

        // [admin]
        if self.admin.listen.parse::<SocketAddr>().is_err() {
            bad(
                "admin.listen",
                format!("\"{}\" is not an address and port.", self.admin.listen),
                "Write it as IP:PORT, e.g. \"127.0.0.1:8443\".",
            );
        }

        // [daemon]
        if let Err(why) = check_user_name(&self.daemon.user) {
            bad(
                "daemon.user",
                why,
                "Name the unprivileged system account the daemon runs as, e.g. \"passerelle\".",
            );
        }
        p
    }
}

/// A system account name as `useradd` accepts it, and never the superuser: the daemon does not run
/// as root.
pub fn check_user_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() {
        return Err("The user name is empty.".into());
    }
    if name.len() > 32 {
        return Err(format!("\"{name}\" is longer than 32 characters."));
    }
    if name.starts_with('-')
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return Err(format!(
            "\"{name}\" is not a valid user name (letters, digits, '_', '-' and '.' only)."
        ));
    }
    if name == "root" {
        return Err("\"root\" is the superuser; Passerelle never runs as root.".into());
    }
    Ok(())
}

/// AE titles: 1..=16 characters of the Default Character Repertoire, no backslash, not all spaces.
pub fn check_ae_title(t: &str) -> std::result::Result<(), String> {
    if t.trim().is_empty() {
        return Err("The AE title is empty.".into());
    }
    if t.len() > 16 {
        return Err(format!("\"{t}\" is longer than 16 characters."));
    }
    if t.chars().any(|c| !(' '..='~').contains(&c) || c == '\\') {
        return Err(format!(
            "\"{t}\" has a character that is not allowed in an AE title."
        ));
    }
    Ok(())
}

/// A DICOM UID: components of digits separated by dots, at most 64 characters.
pub fn is_valid_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 64
        && uid.split('.').all(|c| {
            !c.is_empty()
                && c.bytes().all(|b| b.is_ascii_digit())
                && (c == "0" || !c.starts_with('0'))
        })
}

/// PEM files are small: anything that is not a regular file of at most 1 MiB (a device, a FIFO, a
/// wrong path to a large file) is refused before it is read.
const MAX_PEM_BYTES: u64 = 1024 * 1024;

fn read_pem_file(path: &Path) -> std::result::Result<Vec<u8>, String> {
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("\"{}\" cannot be read ({e}).", path.display()))?;
    if !meta.is_file() {
        return Err(format!("\"{}\" is not a regular file.", path.display()));
    }
    if meta.len() > MAX_PEM_BYTES {
        return Err(format!(
            "\"{}\" is {} bytes, too large for a PEM file (at most {MAX_PEM_BYTES}).",
            path.display(),
            meta.len()
        ));
    }
    std::fs::read(path).map_err(|e| format!("\"{}\" cannot be read ({e}).", path.display()))
}

fn check_pem_certs(path: &Path) -> std::result::Result<(), String> {
    let data = read_pem_file(path)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| format!("\"{}\" is not valid PEM ({e}).", path.display()))?;
    if certs.is_empty() {
        return Err(format!("\"{}\" holds no PEM certificate.", path.display()));
    }
    Ok(())
}

fn check_pem_key(path: &Path) -> std::result::Result<(), String> {
    let data = read_pem_file(path)?;
    match rustls_pemfile::private_key(&mut data.as_slice()) {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(format!("\"{}\" holds no PEM private key.", path.display())),
        Err(e) => Err(format!("\"{}\" is not valid PEM ({e}).", path.display())),
    }
}

fn location_hint(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(r) => {
            let line = text[..r.start.min(text.len())].matches('\n').count() + 1;
            format!("Correct the value on line {line}; README.md documents each key and its type.")
        }
        None => "Correct the file; README.md documents each key and its type.".into(),
    }
}

#[cfg(test)]
mod tests;
