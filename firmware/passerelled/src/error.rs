use std::path::{Path, PathBuf};

pub type Result<T, E = DaemonError> = std::result::Result<T, E>;

/// Why the daemon (or one of its commands) stopped. Each crate's error is wrapped as-is so the
/// operator sees the whole chain.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] passerelle_config::ConfigError),
    #[error("The spool could not be used")]
    Spool(#[from] passerelle_spool::SpoolError),
    #[error("The uplink could not be set up")]
    Uplink(#[from] passerelle_uplink::UplinkError),
    #[error("The DICOM service failed")]
    Ingest(#[from] passerelle_ingest::IngestError),
    #[error("Another passerelled already runs on the spool {dir} (it holds {dir}/spool.lock), and two daemons on one spool would overwrite each other's files. Stop the other one (systemctl status passerelled; `fuser -v {dir}/spool.lock` names it), or give this one a spool of its own (spool.dir)")]
    SpoolInUse { dir: String },
    #[error("Cannot listen for modalities on {addr}; check dicom.listen and that no other program uses the port")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot listen for modalities on {addr}: port {port} is a privileged port and user {user} lacks the CAP_NET_BIND_SERVICE capability. Start passerelled from its systemd unit (AmbientCapabilities=CAP_NET_BIND_SERVICE), or as root (it switches to daemon.user after binding), or listen on a port above 1023")]
    BindPrivileged {
        addr: String,
        port: u16,
        user: String,
        #[source]
        source: std::io::Error,
    },
    #[error("The daemon user \"{user}\" (daemon.user) does not exist, and Passerelle never runs as root. Create it (useradd --system --no-create-home --shell /usr/sbin/nologin {user}) or set daemon.user to an existing unprivileged account")]
    UserMissing { user: String },
    #[error("The daemon user \"{user}\" (daemon.user) has uid 0, and Passerelle never runs as root. Set daemon.user to an unprivileged account such as \"passerelle\"")]
    UserIsRoot { user: String },
    #[error("Cannot look up the daemon user \"{user}\" (daemon.user); check /etc/passwd and NSS")]
    UserLookup {
        user: String,
        #[source]
        source: nix::Error,
    },
    #[error("Cannot switch from root to the daemon user \"{user}\" ({step} failed), and Passerelle never runs as root; check the account's groups in /etc/group")]
    Drop {
        user: String,
        step: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("After switching to the daemon user \"{user}\", the process could become root again; it refuses to run. This is a bug or an unusual kernel setup: please report it")]
    DropReversible { user: String },
    #[error("After switching to the daemon user \"{user}\", privileges remain ({detail}); it refuses to run. Start it from the shipped systemd unit, or report this")]
    DropIncomplete { user: String, detail: String },
    #[error("Cannot read this process's capabilities from /proc/self/status; mount /proc")]
    ReadCapabilities {
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot drop the process's capabilities ({step}); the kernel is older than 4.3 or forbids it. The daemon does not run with capabilities it does not need")]
    DropCapabilities {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot set PR_SET_NO_NEW_PRIVS; the kernel is older than 3.5 or forbids it")]
    NoNewPrivs {
        #[source]
        source: nix::Error,
    },
    #[error("The spool directory {dir} is not writable by user {user} ({path} is not). {}", spool_fix(dir, user, group, other.as_deref()))]
    SpoolNotWritable {
        dir: PathBuf,
        path: PathBuf,
        user: String,
        group: String,
        other: Option<String>,
    },
    #[error("User {user} cannot reach the spool directory {dir}: it may not enter {blocked}. Let it through (chmod o+x {blocked}) or move the spool")]
    SpoolUnreachable {
        dir: PathBuf,
        blocked: PathBuf,
        user: String,
    },
    #[error("The spool directory {dir} does not exist and user {user} cannot create it in {parent}. Create it for that user: mkdir -p {dir} && chown {user}:{group} {dir}")]
    SpoolDirNotCreatable {
        dir: PathBuf,
        parent: PathBuf,
        user: String,
        group: String,
    },
    #[error("Cannot start the async runtime")]
    Runtime {
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot install the SIGTERM handler")]
    Signal {
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot start a spool background thread; check the memory and process limits")]
    Thread {
        #[source]
        source: std::io::Error,
    },
    #[error("A background task panicked; this is a bug, please report it with the log")]
    Join {
        #[source]
        source: tokio::task::JoinError,
    },
}

fn spool_fix(dir: &Path, user: &str, group: &str, daemon_user: Option<&str>) -> String {
    let dir = dir.display();
    match daemon_user {
        None => format!("Give the spool to that user: chown -R {user}:{group} {dir}"),
        Some(daemon) => format!(
            "Run this command as root (it switches to daemon.user \"{daemon}\") or as {daemon}; if {daemon} cannot write it either, run: chown -R {daemon}:{daemon} {dir}"
        ),
    }
}
