//! The SQLite side of the spool: connection setup, schema and small helpers.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension};

use crate::{Result, SpoolError};

/// The schema version stored in `PRAGMA user_version`.
pub(crate) const SCHEMA_VERSION: i64 = 1;

pub(crate) const QUEUED: &str = "queued";
pub(crate) const UPLOADING: &str = "uploading";
pub(crate) const SENT: &str = "sent";
pub(crate) const FAILED: &str = "failed";
pub(crate) const LOST: &str = "lost";
pub(crate) const QUARANTINED: &str = "quarantined";

pub(crate) const DUPLICATES_RECEIVED: &str = "duplicates_received";
pub(crate) const DUPLICATES_UPSTREAM: &str = "duplicates_upstream";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS instances (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    sop_instance_uid    TEXT    NOT NULL,
    sop_class_uid       TEXT    NOT NULL,
    study_instance_uid  TEXT    NOT NULL,
    series_instance_uid TEXT    NOT NULL,
    patient_id          TEXT    NOT NULL,
    modality            TEXT    NOT NULL,
    accession_number    TEXT    NOT NULL,
    calling_ae          TEXT    NOT NULL,
    transfer_syntax_uid TEXT    NOT NULL,
    raw_size            INTEGER NOT NULL,
    stored_size         INTEGER NOT NULL,
    sha256              TEXT    NOT NULL,
    path                TEXT    NOT NULL,
    received_at         INTEGER NOT NULL,
    state               TEXT    NOT NULL CHECK (state IN
                            ('queued', 'uploading', 'sent', 'failed', 'lost', 'quarantined')),
    attempts            INTEGER NOT NULL DEFAULT 0,
    next_attempt_at     INTEGER NOT NULL,
    last_error          TEXT,
    sent_at             INTEGER,
    evicted_at          INTEGER
);
CREATE INDEX IF NOT EXISTS instances_due ON instances (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS instances_sop ON instances (sop_instance_uid);
CREATE INDEX IF NOT EXISTS instances_study ON instances (study_instance_uid, state, next_attempt_at);
-- The local cache of confirmed files, oldest first: what eviction walks. Partial, so that the
-- (ever growing) evicted history costs nothing.
CREATE INDEX IF NOT EXISTS instances_cache ON instances (sent_at, id)
    WHERE state = 'sent' AND evicted_at IS NULL;
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO counters (name, value) VALUES ('duplicates_received', 0);
INSERT OR IGNORE INTO counters (name, value) VALUES ('duplicates_upstream', 0);
CREATE TABLE IF NOT EXISTS uplink_state (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    paused_until    INTEGER,
    last_error      TEXT,
    last_error_at   INTEGER,
    last_success_at INTEGER
);
INSERT OR IGNORE INTO uplink_state (id) VALUES (1);
";

/// Key/value facts about the spool itself (its id, see `identity`).
const META_SCHEMA: &str =
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);";

/// Instances whose file is still an intake file, waiting for the compactor (see `compact`).
/// Not behind the schema version either: an older passerelled ignores it and reads intake files as
/// the zstd streams they are.
const INTAKE_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS intake (id INTEGER PRIMARY KEY);";

/// Empty files created ahead under `objects/`, for ingest to write into (see `pool`).
const POOL_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS pool (path TEXT PRIMARY KEY);";

/// The XXH3-128 of each file the compactor wrote, whose content it checked against the row's SHA-256
/// as it wrote it (see `compact`): the uplink checks a file against it instead of decompressing it a
/// second time. Not behind the schema version: an older passerelled ignores it, and a digest that no
/// longer matches its file only sends the uplink back to the full check.
const FILE_DIGEST_SCHEMA: &str =
    "CREATE TABLE IF NOT EXISTS file_digest (id INTEGER PRIMARY KEY, xxh3 BLOB NOT NULL);";

/// How many times the upstream refused each queued instance by name (a FailureReason in its STOW-RS
/// answer), as opposed to attempts that failed with the whole request (an outage, a timeout): the
/// uplink gives up on an instance the PACS keeps refusing after a few refusals, however long an
/// outage before them lasted. A row exists only while the count is not zero. Not behind the schema
/// version: an older passerelled ignores it (and counts attempts, as it did).
const REFUSALS_SCHEMA: &str =
    "CREATE TABLE IF NOT EXISTS refusals (id INTEGER PRIMARY KEY, count INTEGER NOT NULL);";

/// Attaches an action to a rusqlite error.
pub(crate) trait DbContext<T> {
    fn ctx(self, action: &'static str) -> Result<T>;
}

impl<T> DbContext<T> for rusqlite::Result<T> {
    fn ctx(self, action: &'static str) -> Result<T> {
        self.map_err(|source| SpoolError::Database { action, source })
    }
}

/// Runs `f` on `conn` with `synchronous=NORMAL` and restores `FULL` afterwards: the commits `f`
/// makes reach the WAL file but are not fsynced. They become durable with the next fsync of the WAL
/// (a later `FULL` commit, a checkpoint, or [`sync_wal`]); until then a power cut may lose them.
/// `FULL` is restored even if `f` panics (the connection outlives a panic, see `Spool::conn`): left
/// at `NORMAL`, every later commit that must be durable before it returns would not be.
pub(crate) fn with_normal_sync<T>(
    conn: &mut Connection,
    f: impl FnOnce(&mut Connection) -> Result<T>,
) -> Result<T> {
    /// Sets `FULL` back when dropped, also while unwinding.
    struct FullAgain<'c> {
        conn: &'c mut Connection,
        restored: bool,
    }
    impl FullAgain<'_> {
        fn restore(&mut self) -> Result<()> {
            self.restored = true;
            self.conn
                .pragma_update(None, "synchronous", "FULL")
                .ctx("set synchronous=FULL")
        }
    }
    impl Drop for FullAgain<'_> {
        fn drop(&mut self) {
            if !self.restored {
                if let Err(e) = self.restore() {
                    log::error!(
                        "Could not make the spool database's commits durable again after an internal error; restart passerelled. error={}",
                        crate::error_chain(&e)
                    );
                }
            }
        }
    }
    conn.pragma_update(None, "synchronous", "NORMAL")
        .ctx("set synchronous=NORMAL")?;
    let mut guard = FullAgain {
        conn,
        restored: false,
    };
    let result = f(guard.conn);
    let restored = guard.restore();
    let value = result?;
    restored?;
    Ok(value)
}

/// Makes every transaction committed to the database at `db_path` so far durable, without its
/// connection: an fsync of its WAL file (fsync flushes a file whatever descriptor wrote it). The
/// spool calls it after a `synchronous=NORMAL` commit, outside the connection's lock, so that other
/// commits (an instance's) do not wait behind this fsync. Frames a checkpoint has already copied
/// out were fsynced in the database by that checkpoint before the WAL could restart. Without a WAL
/// file (the database did not switch to WAL mode), commits wrote the database file: it is fsynced.
pub(crate) fn sync_wal(db_path: &Path) -> Result<()> {
    let mut wal = db_path.as_os_str().to_owned();
    wal.push("-wal");
    let wal = std::path::PathBuf::from(wal);
    let sync = |path: &Path| std::fs::File::open(path).and_then(|f| f.sync_data());
    match sync(&wal) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => sync(db_path),
        other => other,
    }
    .map_err(|source| SpoolError::Sync { path: wal, source })
}

/// Opens the database, sets the pragmas and creates or checks the schema.
pub(crate) fn open(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path).ctx("open the database")?;
    // Another process (`passerelled status`/`requeue`) may hold a lock for a moment.
    conn.busy_timeout(Duration::from_secs(5))
        .ctx("set the busy timeout")?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .ctx("switch to WAL journal mode")?;
    if !mode.eq_ignore_ascii_case("wal") {
        log::warn!(
            "The spool database did not switch to WAL mode; writes will be slower. path={} journal_mode={mode}",
            path.display()
        );
    }
    conn.pragma_update(None, "synchronous", "FULL")
        .ctx("set synchronous=FULL")?;
    conn.set_prepared_statement_cache_capacity(64);
    migrate(&conn, path)?;
    Ok(conn)
}

fn migrate(conn: &Connection, path: &Path) -> Result<()> {
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .ctx("read the schema version")?;
    if version > SCHEMA_VERSION {
        return Err(SpoolError::SchemaVersion {
            path: path.to_path_buf(),
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    if version < SCHEMA_VERSION {
        // Version 0 is a fresh database. `IF NOT EXISTS` keeps a concurrent creator harmless.
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
        ))
        .ctx("create the schema")?;
    }
    // Not behind the schema version, so that an older passerelled (rolled back) still opens the
    // database: it ignores these tables.
    for (table, sql) in [
        ("meta", META_SCHEMA),
        ("intake", INTAKE_SCHEMA),
        ("pool", POOL_SCHEMA),
        ("file_digest", FILE_DIGEST_SCHEMA),
        ("refusals", REFUSALS_SCHEMA),
    ] {
        let exists: bool = conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
                [table],
                |r| r.get(0),
            )
            .ctx("read the database schema")?;
        if !exists {
            conn.execute_batch(sql).ctx("create a table")?;
        }
    }
    Ok(())
}

/// Unix milliseconds (times before 1970 clamp to 0).
pub(crate) fn to_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}

pub(crate) fn from_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// SQLite integers are signed; sizes are stored as such.
pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

pub(crate) fn bump_counter(conn: &Connection, name: &str) -> Result<()> {
    conn.prepare_cached("UPDATE counters SET value = value + 1 WHERE name = ?1")
        .and_then(|mut s| s.execute([name]))
        .ctx("increment a counter")?;
    Ok(())
}

pub(crate) fn counter(conn: &Connection, name: &str) -> Result<u64> {
    let v: Option<i64> = conn
        .query_row("SELECT value FROM counters WHERE name = ?1", [name], |r| {
            r.get(0)
        })
        .optional()
        .ctx("read a counter")?;
    Ok(to_u64(v.unwrap_or(0)))
}

/// How often the checkpointer looks for WAL frames to copy into the database.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(200);
/// The daemon's connection checkpoints by itself only past this many WAL pages (32 MiB): a backstop
/// should the checkpointer fall behind. SQLite's default (1000 pages) would run a checkpoint, with
/// its two extra fsyncs, inside an instance's commit every hundred or so instances.
const BACKSTOP_AUTOCHECKPOINT: i64 = 8192;

/// Copies the WAL into the database on its own thread and connection, so that checkpoints (and
/// their fsyncs) happen beside the C-STORE acknowledgement path rather than inside a commit.
/// Dropping it stops the thread and waits for it (its connection is closed by then).
pub(crate) struct Checkpointer {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    /// Starts the checkpointer for the database at `path`, and leaves `conn` (the spool's own
    /// connection) only the backstop automatic checkpoint.
    pub(crate) fn start(path: &Path, conn: &Connection) -> Result<Checkpointer> {
        let checkpointer = open_checkpoint_connection(path)?;
        conn.pragma_update(None, "wal_autocheckpoint", BACKSTOP_AUTOCHECKPOINT)
            .ctx("set the automatic checkpoint threshold")?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let display = path.display().to_string();
        let thread = std::thread::Builder::new()
            .name("spool-checkpoint".into())
            .spawn(move || run_checkpoints(&checkpointer, &stopped, &display))
            .map_err(|source| SpoolError::StartThread {
                what: "the spool database checkpointer",
                source,
            })?;
        Ok(Checkpointer {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn open_checkpoint_connection(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path).ctx("open the database for checkpoints")?;
    conn.busy_timeout(Duration::from_secs(5))
        .ctx("set the busy timeout")?;
    // A checkpoint must fsync the database before the WAL it copied can be overwritten.
    conn.pragma_update(None, "synchronous", "FULL")
        .ctx("set synchronous=FULL")?;
    conn.pragma_update(None, "wal_autocheckpoint", 0)
        .ctx("set the automatic checkpoint threshold")?;
    Ok(conn)
}

fn run_checkpoints(conn: &Connection, stopped: &std::sync::mpsc::Receiver<()>, path: &str) {
    let mut failing = false;
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
        stopped.recv_timeout(CHECKPOINT_INTERVAL)
    {
        // PASSIVE: copies what no reader still needs, never waits for (nor blocks) a writer.
        let result = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(0));
        match result {
            Ok(_) if failing => {
                failing = false;
                log::info!("Spool database checkpoints work again. path={path}");
            }
            Ok(_) => {}
            Err(e) if !failing => {
                failing = true;
                log::warn!(
                    "Could not checkpoint the spool database; commits will checkpoint it themselves once its WAL passes 32 MiB. Check the disk. path={path} error={e}"
                );
            }
            Err(_) => {}
        }
    }
}
