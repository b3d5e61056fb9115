use std::path::PathBuf;

pub type Result<T, E = SpoolError> = std::result::Result<T, E>;

/// Everything that can go wrong in the spool. Variants are named after the action that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpoolError {
    #[error("The spool has {free_mb} MB free, below the configured minimum of {min_free_mb} MB, and no confirmed instance is left to evict")]
    DiskFull { free_mb: u64, min_free_mb: u64 },

    #[error("Cannot create the spool directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("Cannot write spool file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("Cannot read spool file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("Cannot fsync {path}")]
    Sync {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("Cannot start {what}")]
    StartThread {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error("Cannot check free space on {path}")]
    Statvfs {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },

    #[error("The spool database failed while trying to {action}")]
    Database {
        action: &'static str,
        #[source]
        source: rusqlite::Error,
    },

    #[error("Spool file {path} for SOP Instance {sop_instance_uid} is corrupt ({detail}); it was quarantined and will not be sent")]
    Corrupt {
        sop_instance_uid: String,
        path: PathBuf,
        detail: String,
    },

    #[error("Spool file {path} for SOP Instance {sop_instance_uid} is missing; the instance is marked lost")]
    Missing {
        sop_instance_uid: String,
        path: PathBuf,
    },

    #[error("The spool refused to store SOP Instance {sop_instance_uid}: its hash does not fit the bytes written ({detail}). This is a defect in passerelled, not in the data; nothing was stored and the modality is told to send it again. Report it to the vendor")]
    Digest {
        sop_instance_uid: String,
        detail: String,
    },

    #[error("No spool row with id {id}")]
    NoSuchRow { id: i64 },

    #[error("The spool database {path} has schema version {found}, newer than the {supported} this build understands; run a newer passerelled or restore the matching backup")]
    SchemaVersion {
        path: PathBuf,
        found: i64,
        supported: i64,
    },

    #[error("There is no spool database at {path}; check `[spool] dir` in the config, or start passerelled once to create the spool")]
    NotASpool { path: PathBuf },

    #[error("Cannot lock the spool {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },

    #[error("The spool database {path} is missing but the spool holds instance files; refusing to start with an empty queue. Stop passerelled and run `passerelled rebuild-index --config FILE` to rebuild the queue from the spool files")]
    IndexMissing { path: PathBuf },

    #[error("The spool database {path} is damaged ({detail}); refusing to start. Stop passerelled and run `passerelled rebuild-index --config FILE`: it keeps the damaged database aside and rebuilds the queue from the spool files")]
    IndexDamaged { path: PathBuf, detail: String },

    #[error("The spool database {path} does not belong to this spool ({detail}): it is not the database these spool files were stored with (a new empty database, another box's, or an old backup), and starting on it would forget acknowledged instances. Nothing was changed. Stop passerelled and run `passerelled rebuild-index --config FILE`: it keeps this database aside and rebuilds the queue from the spool files")]
    IndexForeign { path: PathBuf, detail: String },

    #[error("The spool identity file {path} is damaged ({detail}). If spool.db is this spool's own database, delete {path} and start passerelled (it is written again from the database); otherwise run `passerelled rebuild-index --config FILE`")]
    SpoolIdInvalid { path: PathBuf, detail: String },

    #[error("Cannot rebuild the spool index while another process (a running passerelled?) holds the spool {path}; stop passerelled first")]
    RebuildWhileRunning { path: PathBuf },

    #[error("Cannot move the damaged spool database {path} aside")]
    MoveDatabaseAside {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An error and its causes on one line (`what: cause: cause`), each message once: a message that
/// already quotes its cause does not repeat it. Every crate's log lines use this, so that an operator
/// sees the cause (permission denied, no space left) and not only the action that failed.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(err);
    while let Some(e) = cur {
        let msg = e.to_string();
        if !parts.iter().any(|p| p.contains(&msg)) {
            parts.push(msg);
        }
        cur = e.source();
    }
    parts.join(": ")
}
