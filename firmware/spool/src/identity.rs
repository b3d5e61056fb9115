//! The spool's identity: a random 128-bit id kept both in `spool.db` (table `meta`, key
//! `spool_id`) and in the file `spool.id` beside it, so that a `spool.db` replaced by another valid
//! database (a new empty one, another box's, an old backup) is refused at start-up instead of
//! silently forgetting the instances whose files are in `objects/`.
//!
//! The database is written first and the file second (tmp, fsync, rename, directory fsync), so that
//! a present `spool.id` always means the database was given that id.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use crate::db::DbContext;
use crate::{files, rebuild, Result, SpoolError};

/// The file beside `spool.db` holding the spool's id.
pub(crate) const FILE: &str = "spool.id";
/// The key of the id in the `meta` table.
const KEY: &str = "spool_id";

/// A new random id: 32 lowercase hex digits.
pub(crate) fn new_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn valid(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Reads `spool.id` (`None` when there is none).
pub(crate) fn read_file(dir: &Path) -> Result<Option<String>> {
    let path = dir.join(FILE);
    match fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim();
            if valid(id) {
                Ok(Some(id.to_owned()))
            } else {
                Err(SpoolError::SpoolIdInvalid {
                    path,
                    detail: format!("expected 32 hex digits, found {:?}", truncate(id)),
                })
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(SpoolError::Read { path, source }),
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

/// Writes `spool.id` durably: temporary file, fsync, rename, directory fsync.
pub(crate) fn write_file(dir: &Path, id: &str) -> Result<()> {
    let path = dir.join(FILE);
    let tmp = dir.join(format!("{FILE}.tmp"));
    let write_err = |source| SpoolError::Write {
        path: tmp.clone(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(write_err)?;
    file.write_all(format!("{id}\n").as_bytes())
        .map_err(write_err)?;
    file.sync_all().map_err(|source| SpoolError::Sync {
        path: tmp.clone(),
        source,
    })?;
    drop(file);
    fs::rename(&tmp, &path).map_err(|source| SpoolError::Write {
        path: path.clone(),
        source,
    })?;
    files::fsync_dir(dir)
}

/// The id recorded in the database, if any (an older spool's database has no `meta` table).
pub(crate) fn read_db(conn: &Connection) -> Result<Option<String>> {
    if !has_table(conn, "meta")? {
        return Ok(None);
    }
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [KEY], |r| r.get(0))
        .optional()
        .ctx("read the spool id")
}

/// Records `id` in the database (whose schema, `meta` included, exists).
pub(crate) fn write_db(conn: &Connection, id: &str) -> Result<()> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [KEY, id],
    )
    .ctx("record the spool id")?;
    Ok(())
}

fn has_table(conn: &Connection, name: &str) -> Result<bool> {
    conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
        [name],
        |r| r.get(0),
    )
    .ctx("read the database schema")
}

fn has_rows(conn: &Connection) -> Result<bool> {
    if !has_table(conn, "instances")? {
        return Ok(false);
    }
    conn.query_row("SELECT EXISTS (SELECT 1 FROM instances)", [], |r| r.get(0))
        .ctx("count the queue's rows")
}

/// What the owner of the spool must write once the database is open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Both ids are there and equal.
    Nothing,
    /// The database has the id but `spool.id` is missing: write the file.
    WriteFile(String),
    /// `spool.id` is there, the database (new, empty, and no spool files) has no id: record it.
    WriteDb(String),
    /// Neither has an id (a spool from before ids, or a new one): record a new id in both.
    WriteBoth(String),
}

/// Decides, before anything is changed, whether `spool.db` belongs to this spool. Reads the file
/// first and the database second: the owner writes them in the other order, so a process reading
/// beside a starting daemon never sees a file without its database id.
///
/// Refuses with [`SpoolError::IndexForeign`] when `spool.id` names another id than the database, or
/// the database has none while it holds rows or `objects/` holds files; and when neither has an
/// id, the database has no row and `objects/` holds files (the empty database of an older spool).
pub(crate) fn check(dir: &Path, db_path: &Path) -> Result<Plan> {
    let file_id = read_file(dir)?;
    let (db_id, rows) = inspect(db_path).map_err(|e| crate::damaged(e, db_path))?;
    let objects = || -> Result<bool> {
        let objects_dir = dir.join("objects");
        rebuild::any_object_file(&objects_dir).map_err(|source| SpoolError::Read {
            path: objects_dir.clone(),
            source,
        })
    };
    let foreign = |detail: String| SpoolError::IndexForeign {
        path: db_path.to_path_buf(),
        detail,
    };
    match (file_id, db_id) {
        (Some(f), Some(d)) if f == d => Ok(Plan::Nothing),
        (Some(f), Some(d)) => Err(foreign(format!(
            "its spool id is {d} while {FILE} says {f}"
        ))),
        (Some(f), None) => {
            if rows {
                Err(foreign(format!(
                    "it has no spool id while {FILE} says {f}, and holds a queue of its own"
                )))
            } else if objects()? {
                Err(foreign(format!(
                    "it is an empty database without a spool id while {FILE} says {f} and objects/ holds instance files"
                )))
            } else {
                // A new database for a spool that holds no instance file: nothing to lose.
                Ok(Plan::WriteDb(f))
            }
        }
        (None, Some(d)) => Ok(Plan::WriteFile(d)),
        (None, None) => {
            if rows || !objects()? {
                Ok(Plan::WriteBoth(new_id()))
            } else {
                Err(foreign(
                    "it is an empty database while objects/ holds instance files".to_owned(),
                ))
            }
        }
    }
}

/// Reads the database's id and whether it holds rows, without changing it: a connection of its
/// own, read-write without create (SQLite writes only to recover a WAL, never for a read).
fn inspect(db_path: &Path) -> Result<(Option<String>, bool)> {
    let missing = match fs::metadata(db_path) {
        Err(_) => true,
        Ok(m) => m.len() == 0,
    };
    if missing {
        return Ok((None, false));
    }
    let conn = Connection::open_with_flags(
        db_path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .ctx("open the database")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .ctx("set the busy timeout")?;
    Ok((read_db(&conn)?, has_rows(&conn)?))
}

/// Applies the owner's plan once the database is open and checked. Database first, file second.
pub(crate) fn apply(plan: &Plan, dir: &Path, conn: &Connection) -> Result<()> {
    match plan {
        Plan::Nothing => {}
        Plan::WriteFile(id) => {
            write_file(dir, id)?;
            log::info!(
                "Wrote the spool's identity file from its database (a spool created by an older passerelled, or the file was removed). path={} spool_id={id}",
                dir.join(FILE).display()
            );
        }
        Plan::WriteDb(id) => {
            write_db(conn, id)?;
            log::info!(
                "Recorded the spool's id in a new spool database; the spool held no instance file, so nothing was lost. spool_id={id}"
            );
        }
        Plan::WriteBoth(id) => {
            write_db(conn, id)?;
            write_file(dir, id)?;
            log::info!(
                "Gave the spool an id, kept in spool.db and {}, so that a replaced database is detected at start-up. spool_id={id}",
                dir.join(FILE).display()
            );
        }
    }
    Ok(())
}
