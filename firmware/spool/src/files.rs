//! File-system helpers: directory fsync, temporary-file cleanup, free space, streaming hashes.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use xxhash_rust::xxh3::Xxh3;

use crate::{Result, SpoolError};

/// Mode of every directory the spool creates: patient data, owner only.
const DIR_MODE: u32 = 0o700;

/// Creates `path` (and parents) if missing. Returns true when `path` was missing when looked at
/// (its parent then needs an fsync).
pub(crate) fn create_dir(path: &Path) -> Result<bool> {
    if path.is_dir() {
        return Ok(false);
    }
    match fs::DirBuilder::new()
        .recursive(false)
        .mode(DIR_MODE)
        .create(path)
    {
        Ok(()) => Ok(true),
        // Created by a concurrent caller, whose fsync of the parent may not have happened yet:
        // report it as created so that this caller fsyncs the parent too.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // A parent is missing: create the whole chain.
            fs::DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(path)
                .map_err(|source| SpoolError::CreateDir {
                    path: path.to_path_buf(),
                    source,
                })?;
            Ok(true)
        }
        Err(source) => Err(SpoolError::CreateDir {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// fsyncs a directory so that renames and creations inside it are durable.
pub(crate) fn fsync_dir(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|source| SpoolError::Sync {
            path: path.to_path_buf(),
            source,
        })
}

/// Marks `dir` as the top of a directory hierarchy (the `T` attribute of chattr, `FS_TOPDIR_FL`),
/// so that ext4's Orlov allocator spreads the directories created in it over the file system's
/// block groups instead of packing them into `dir`'s own; files then take inodes in their
/// directory's group. Returns whether the flag is set. Best effort: a file system without such
/// flags (tmpfs, some others) returns `Ok(false)`.
///
/// Why: on ext4 without a journal, creating a file walks every inode of its group freed in the
/// last 30 seconds before it takes one (the kernel's `recently_deleted()`), a millisecond per file
/// after a large deletion nearby, all of it inside one system call.
pub(crate) fn spread_subdirectories(dir: &Path) -> io::Result<bool> {
    use rustix::fs::{ioctl_getflags, ioctl_setflags, IFlags};
    let d = File::open(dir)?;
    let unsupported = |e: rustix::io::Errno| {
        e == rustix::io::Errno::NOTTY
            || e == rustix::io::Errno::OPNOTSUPP
            || e == rustix::io::Errno::INVAL
            || e == rustix::io::Errno::NOSYS
    };
    let flags = match ioctl_getflags(&d) {
        Ok(flags) => flags,
        Err(e) if unsupported(e) => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    if flags.contains(IFlags::TOPDIR) {
        return Ok(true);
    }
    match ioctl_setflags(&d, flags | IFlags::TOPDIR) {
        Ok(()) => Ok(true),
        Err(e) if unsupported(e) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Free bytes for unprivileged users on the file system holding `path`.
pub(crate) fn free_bytes(path: &Path) -> Result<u64> {
    let st = nix::sys::statvfs::statvfs(path).map_err(|source| SpoolError::Statvfs {
        path: path.to_path_buf(),
        source,
    })?;
    #[allow(clippy::unnecessary_cast)] // the libc types differ between platforms
    let (avail, frsize) = (st.blocks_available() as u64, st.fragment_size() as u64);
    Ok(avail.saturating_mul(frsize))
}

pub(crate) const MIB: u64 = 1024 * 1024;

/// Creates a new temporary file `<random>.<suffix>` in `dir` (mode 0600), removed on drop of its
/// guard unless disarmed.
pub(crate) fn create_temp(dir: &Path, suffix: &str) -> Result<(File, TempGuard)> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(format!("{:016x}.{suffix}", rand::random::<u64>()));
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|source| SpoolError::Write {
            path: path.clone(),
            source,
        })?;
    Ok((file, TempGuard::new(path)))
}

/// Removes a temporary file on drop unless disarmed.
#[derive(Debug)]
pub(crate) struct TempGuard {
    pub(crate) path: PathBuf,
    armed: bool,
}

impl TempGuard {
    pub(crate) fn new(path: PathBuf) -> Self {
        Self { path, armed: true }
    }

    pub(crate) fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = fs::remove_file(&self.path) {
                if e.kind() != io::ErrorKind::NotFound {
                    log::warn!(
                        "Could not remove an abandoned temporary spool file; it will be removed at the next start. path={} error={e}",
                        self.path.display()
                    );
                }
            }
        }
    }
}

/// A reader that remembers whether the underlying file failed, so that an I/O error of the disk is
/// not mistaken for corrupt content (and the other way round).
pub(crate) struct TrackingReader<R> {
    inner: R,
    pub(crate) io_error: Option<io::ErrorKind>,
}

impl<R> TrackingReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        Self {
            inner,
            io_error: None,
        }
    }
}

impl<R: Read> Read for TrackingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).inspect_err(|e| {
            if e.kind() != io::ErrorKind::Interrupted {
                self.io_error = Some(e.kind());
            }
        })
    }
}

/// A writer that computes the XXH3-128 of every byte written through it.
pub(crate) struct DigestWriter<W> {
    inner: W,
    hasher: Xxh3,
}

impl<W> DigestWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Xxh3::new(),
        }
    }

    /// The inner writer and the digest of what went into it.
    pub(crate) fn finish(self) -> (W, u128) {
        (self.inner, self.hasher.digest128())
    }
}

impl<W: Write> Write for DigestWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Reads `file` to its end and returns its XXH3-128, holding only a small buffer.
pub(crate) fn digest_stored<R: Read>(file: R) -> io::Result<u128> {
    let mut sink = DigestWriter::new(io::sink());
    io::copy(
        &mut io::BufReader::with_capacity(128 * 1024, file),
        &mut sink,
    )?;
    Ok(sink.finish().1)
}

/// The result of hashing a decompressed stream.
pub(crate) enum HashOutcome {
    Ok {
        sha256: String,
        len: u64,
    },
    /// The file could not be read (disk error), not a content problem.
    ReadFailed(io::Error),
    /// The zstd stream is damaged or truncated.
    Undecodable(io::Error),
    /// The decompressed bytes could not be written where they were copied to.
    WriteFailed(io::Error),
}

/// Decompresses `file` as a stream and hashes the output, holding only a small buffer.
pub(crate) fn hash_decompressed<R: Read>(file: R) -> HashOutcome {
    hash_decompressed_into(file, &mut io::sink())
}

/// Decompresses `file` as a stream, hashes the output and copies it into `sink`, holding only a
/// small buffer.
pub(crate) fn hash_decompressed_into<R: Read, W: Write>(file: R, sink: &mut W) -> HashOutcome {
    let mut tracked = TrackingReader::new(file);
    let mut write_error = None;
    let result = (|| -> io::Result<(String, u64)> {
        let mut dec = zstd::stream::read::Decoder::new(&mut tracked)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 128 * 1024];
        let mut len = 0u64;
        loop {
            let n = dec.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            if let Err(e) = sink.write_all(&buf[..n]) {
                write_error = Some(e);
                return Ok((String::new(), len));
            }
            len += n as u64;
        }
        Ok((hex::encode(hasher.finalize()), len))
    })();
    match (result, write_error) {
        (_, Some(e)) => HashOutcome::WriteFailed(e),
        (Ok((sha256, len)), None) => HashOutcome::Ok { sha256, len },
        (Err(e), None) if tracked.io_error.is_some() => HashOutcome::ReadFailed(e),
        (Err(e), None) => HashOutcome::Undecodable(e),
    }
}
