//! Who the daemon runs as: it never runs as root.
//!
//! # Background
//! Port 104 (the DICOM port modalities are configured with) is a privileged port. The shipped systemd
//! unit starts the daemon as `passerelle` with `CAP_NET_BIND_SERVICE` as an ambient capability; an
//! operator (or an init without systemd) may instead start it as root. Either way the process that
//! handles studies and talks to the network is the unprivileged `daemon.user`, and the spool only
//! ever holds files that user owns.
//!
//! # Design
//! - The listening socket is bound first ([`bind_listener`]), while the process may still be root.
//! - [`become_daemon_user`] then drops root for good, before the async runtime starts (so the process
//!   has a single thread and every credential change applies to all of it): supplementary groups,
//!   gid, uid (real, effective and saved), then checks that root cannot be regained. Started as
//!   another user, the process stays that user (systemd already chose it). Either way it then
//!   empties every capability set and checks that none is left: the ambient
//!   `CAP_NET_BIND_SERVICE` served only to bind the port, which is done. Last, `PR_SET_NO_NEW_PRIVS`.
//! - [`check_spool_access`] turns "permission denied" deep inside SQLite into one sentence naming the
//!   directory, the user and the `chown` that fixes it.

use std::ffi::CString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use log::{info, warn};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::unistd::{self, AccessFlags, Gid, Group, Uid, User};
use socket2::{Domain, Protocol, Socket, Type};

use crate::error::{DaemonError, Result};

/// The listen backlog tokio uses for its own listeners.
const BACKLOG: i32 = 1024;

/// Below this open-file limit, a busy gateway (many associations, uploads, SQLite) may run out.
const MIN_NOFILE: u64 = 2048;

/// The account the process runs as once [`become_daemon_user`] returned.
#[derive(Debug, Clone)]
pub struct Identity {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
    pub group: String,
}

impl Identity {
    fn current() -> Identity {
        let uid = unistd::getuid();
        let gid = unistd::getgid();
        let name = match User::from_uid(uid) {
            Ok(Some(u)) => u.name,
            _ => uid.to_string(),
        };
        Identity {
            name,
            uid,
            gid,
            group: group_name(gid),
        }
    }
}

fn group_name(gid: Gid) -> String {
    match Group::from_gid(gid) {
        Ok(Some(g)) => g.name,
        _ => gid.to_string(),
    }
}

/// Raises the soft open-file limit to the hard limit, and says so if it stays low.
pub fn raise_open_file_limit() {
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            warn!("Could not read the open-file limit; keeping it as it is. error={e}");
            return;
        }
    };
    let mut now = soft;
    if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => now = hard,
            Err(e) => warn!(
                "Could not raise the open-file limit from {soft} to its hard limit {hard}. error={e}"
            ),
        }
    }
    if now < MIN_NOFILE {
        warn!(
            "The open-file limit is {now}, below {MIN_NOFILE}: with many associations and uploads the daemon may run out of file descriptors. Raise it (systemd LimitNOFILE=4096, as the shipped unit does)."
        );
    }
}

/// Binds the Storage SCP's listening socket (non-blocking, for tokio), before privileges are dropped.
pub fn bind_listener(listen: &str) -> Result<std::net::TcpListener> {
    let addr: SocketAddr = listen.parse().map_err(|_| DaemonError::Bind {
        addr: listen.to_string(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not an address and port"),
    })?;
    let bind = || -> std::io::Result<std::net::TcpListener> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.bind(&addr.into())?;
        socket.listen(BACKLOG)?;
        socket.set_nonblocking(true)?;
        Ok(socket.into())
    };
    bind().map_err(|source| {
        if source.kind() == std::io::ErrorKind::PermissionDenied && !unistd::geteuid().is_root() {
            DaemonError::BindPrivileged {
                addr: listen.to_string(),
                port: addr.port(),
                user: Identity::current().name,
                source,
            }
        } else {
            DaemonError::Bind {
                addr: listen.to_string(),
                source,
            }
        }
    })
}

/// Started as root: switches to `user` for good and returns it. Started as anyone else: stays that
/// user. Either way `PR_SET_NO_NEW_PRIVS` is set, so nothing the process runs can gain privileges.
pub fn become_daemon_user(user: &str) -> Result<Identity> {
    let was_root = unistd::geteuid().is_root();
    if was_root {
        drop_root(user)?;
    }
    drop_capabilities()?;
    if was_root {
        let me = Identity::current();
        info!(
            "Switched from root to the daemon user; no capability is left. user={} uid={} gid={}",
            me.name, me.uid, me.gid
        );
    }
    nix::sys::prctl::set_no_new_privs().map_err(|source| DaemonError::NoNewPrivs { source })?;
    Ok(Identity::current())
}

/// Empties the calling thread's ambient, effective, permitted and inheritable capability sets
/// (threads started later inherit the empty sets), then checks that none is left, whether the
/// process was root (whose uid change already cleared them) or started with an ambient set.
/// Lowering capabilities needs no privilege.
fn drop_capabilities() -> Result<()> {
    use rustix::thread::{CapabilitySet, CapabilitySets};
    let failed = |step: &'static str| {
        move |e: rustix::io::Errno| DaemonError::DropCapabilities {
            step,
            source: e.into(),
        }
    };
    rustix::thread::clear_ambient_capability_set().map_err(failed("clear the ambient set"))?;
    let none = CapabilitySets {
        effective: CapabilitySet::empty(),
        permitted: CapabilitySet::empty(),
        inheritable: CapabilitySet::empty(),
    };
    rustix::thread::set_capabilities(None, none).map_err(failed("capset"))?;
    let left = capabilities_left().map_err(|source| DaemonError::ReadCapabilities { source })?;
    if !left.is_empty() {
        return Err(DaemonError::DropCapabilities {
            step: "check",
            source: std::io::Error::other(format!("capabilities left: {}", left.join(" "))),
        });
    }
    Ok(())
}

fn drop_root(name: &str) -> Result<()> {
    let user = User::from_name(name)
        .map_err(|source| DaemonError::UserLookup {
            user: name.to_string(),
            source,
        })?
        .ok_or_else(|| DaemonError::UserMissing {
            user: name.to_string(),
        })?;
    if user.uid.is_root() {
        return Err(DaemonError::UserIsRoot {
            user: name.to_string(),
        });
    }
    let failed = |step: &'static str| {
        let user = name.to_string();
        move |source| DaemonError::Drop { user, step, source }
    };
    let cname = CString::new(name).map_err(|_| DaemonError::UserMissing {
        user: name.to_string(),
    })?;
    // Supplementary groups first, then the group, then the user: once the uid changed, the others
    // can no longer be changed.
    unistd::initgroups(&cname, user.gid).map_err(failed("setgroups"))?;
    unistd::setresgid(user.gid, user.gid, user.gid).map_err(failed("setresgid"))?;
    unistd::setresuid(user.uid, user.uid, user.uid).map_err(failed("setresuid"))?;

    // The drop must be irreversible and complete.
    let root = Uid::from_raw(0);
    if unistd::setuid(root).is_ok() || unistd::seteuid(root).is_ok() {
        return Err(DaemonError::DropReversible {
            user: name.to_string(),
        });
    }
    let uids = unistd::getresuid().map_err(failed("getresuid"))?;
    let gids = unistd::getresgid().map_err(failed("getresgid"))?;
    let all_uid = [uids.real, uids.effective, uids.saved]
        .iter()
        .all(|u| *u == user.uid);
    let all_gid = [gids.real, gids.effective, gids.saved]
        .iter()
        .all(|g| *g == user.gid);
    if !all_uid || !all_gid {
        return Err(DaemonError::DropIncomplete {
            user: name.to_string(),
            detail: format!(
                "uid real/effective/saved {}/{}/{}, gid {}/{}/{}",
                uids.real, uids.effective, uids.saved, gids.real, gids.effective, gids.saved
            ),
        });
    }
    Ok(())
}

/// The calling thread's permitted, effective and ambient capability sets that are not empty, as
/// `CapXxx:hex` strings.
fn capabilities_left() -> std::io::Result<Vec<String>> {
    let status = std::fs::read_to_string("/proc/thread-self/status")?;
    Ok(nonzero_capabilities(&status))
}

fn nonzero_capabilities(status: &str) -> Vec<String> {
    status
        .lines()
        .filter_map(|line| {
            let (key, value) = line.split_once(':')?;
            let value = value.trim();
            let relevant = matches!(key, "CapPrm" | "CapEff" | "CapAmb");
            (relevant && !value.trim_start_matches('0').is_empty())
                .then(|| format!("{key}:{value}"))
        })
        .collect()
}

/// Checks that `me` can write the spool: the directory (or, when `create` and it does not exist yet,
/// its nearest existing parent) and every directory and top-level file in it. `daemon_user` is the
/// configured `daemon.user`, named in the fix when someone else runs the command.
pub fn check_spool_access(
    dir: &Path,
    me: &Identity,
    daemon_user: &str,
    create: bool,
) -> Result<()> {
    // Every directory on the way must let the user in (e.g. a 0700 parent owned by root).
    let mut ancestors: Vec<&Path> = dir.ancestors().skip(1).collect();
    ancestors.reverse();
    for a in ancestors {
        match unistd::access(a, AccessFlags::X_OK) {
            Ok(()) => {}
            Err(nix::errno::Errno::ENOENT) => break,
            Err(_) => {
                return Err(DaemonError::SpoolUnreachable {
                    dir: dir.to_path_buf(),
                    blocked: a.to_path_buf(),
                    user: me.name.clone(),
                })
            }
        }
    }
    if !dir.exists() {
        if !create {
            return Ok(()); // the spool crate says there is no spool there
        }
        let mut parent = dir.parent();
        while let Some(p) = parent {
            if p.exists() {
                if !writable(p) {
                    return Err(DaemonError::SpoolDirNotCreatable {
                        dir: dir.to_path_buf(),
                        parent: p.to_path_buf(),
                        user: me.name.clone(),
                        group: me.group.clone(),
                    });
                }
                break;
            }
            parent = p.parent();
        }
        return Ok(());
    }
    if let Some(bad) = first_unwritable(dir, 0) {
        return Err(DaemonError::SpoolNotWritable {
            dir: dir.to_path_buf(),
            path: bad,
            user: me.name.clone(),
            group: me.group.clone(),
            other: (me.name != daemon_user).then(|| daemon_user.to_string()),
        });
    }
    Ok(())
}

fn writable(p: &Path) -> bool {
    unistd::access(p, AccessFlags::W_OK | AccessFlags::X_OK).is_ok()
}

/// The spool's directories (objects/<aa>/, tmp/, quarantine/) and its top-level files (spool.db,
/// its -wal and -shm, spool.lock) must be writable; object files are only read, renamed and removed.
fn first_unwritable(dir: &Path, depth: usize) -> Option<PathBuf> {
    if !writable(dir) {
        return Some(dir.to_path_buf());
    }
    let entries = std::fs::read_dir(dir).ok()?;
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() && depth < 2 {
            if let Some(bad) = first_unwritable(&path, depth + 1) {
                return Some(bad);
            }
        } else if kind.is_file()
            && depth == 0
            && unistd::access(&path, AccessFlags::R_OK | AccessFlags::W_OK).is_err()
        {
            return Some(path);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn capability_lines_are_read_from_proc_status() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapPrm:\t0000000000000000\n\
                      CapEff:\t0000000000000000\nCapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\n";
        assert!(nonzero_capabilities(status).is_empty());
        let with_bind = status.replace("CapAmb:\t0000000000000000", "CapAmb:\t0000000000000400");
        assert_eq!(
            nonzero_capabilities(&with_bind),
            ["CapAmb:0000000000000400"]
        );
    }

    #[test]
    fn dropping_capabilities_empties_every_set_of_the_thread() {
        // Capabilities are per thread: a thread of its own, so that the test process keeps its own.
        std::thread::spawn(|| {
            drop_capabilities().unwrap();
            let sets = rustix::thread::capabilities(None).unwrap();
            assert!(sets.effective.is_empty(), "{sets:?}");
            assert!(sets.permitted.is_empty(), "{sets:?}");
            assert!(sets.inheritable.is_empty(), "{sets:?}");
            let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
            assert!(nonzero_capabilities(&status).is_empty(), "{status}");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_bound_listener_is_non_blocking_and_reports_its_port() {
        let l = bind_listener("127.0.0.1:0").unwrap();
        assert_ne!(l.local_addr().unwrap().port(), 0);
        // Non-blocking: accept with no peer returns WouldBlock instead of hanging.
        assert_eq!(
            l.accept().unwrap_err().kind(),
            std::io::ErrorKind::WouldBlock
        );
    }

    #[test]
    fn a_missing_spool_dir_under_a_writable_parent_is_fine() {
        let d = tempfile::tempdir().unwrap();
        let me = Identity::current();
        check_spool_access(&d.path().join("a/b/spool"), &me, &me.name, true).unwrap();
        check_spool_access(d.path(), &me, &me.name, false).unwrap();
    }
}
