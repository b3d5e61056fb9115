//! The spool's background threads: the compactor and the pool filler.
//!
//! - The compactor recompresses intake files at `spool.zstd_level` (see `passerelle_spool`'s
//!   `compact` module). It works when ingest pauses (`Spool::compaction_due`: one second without a
//!   new instance, or a backlog of intake files too big for the disk), at nice 19, so that the
//!   kernel gives it little CPU time while the uplink wants it: on a 2-core box a CT study is
//!   acknowledged at full speed and compressed afterwards.
//! - The pool filler keeps empty files created ahead under `objects/` (see the `pool` module), so
//!   that storing an instance needs one fsync instead of three. It wakes when ingest takes the
//!   pool below its low-water mark. One thread creates the files at nice 19, another lists them at
//!   normal priority (see [`pool_filler`]).
//!
//! A panic in either (a defect) is logged as an ERROR and the work is started again 30 s later.
//!
//! Stopping them is not waited for beyond a moment: a compaction cut short leaves the intake file
//! in place and a temporary file that the next start removes; files created but not yet listed in
//! the pool stay empty and unused.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::thread::JoinHandle;
use std::time::Duration;

use log::{error, info, warn};
use passerelle_spool::{PoolBatch, Spool};

/// Files per compaction batch: between batches the thread checks whether it must stop.
const BATCH: usize = 4;
/// How long a thread sleeps when it has nothing to do, or after an error.
const IDLE: Duration = Duration::from_millis(200);
const AFTER_ERROR: Duration = Duration::from_secs(30);
/// How long [`Worker::stop`] waits for a thread.
const STOP_WAIT: Duration = Duration::from_secs(2);

/// A background thread that stops when asked (its stop channel closes).
pub struct Worker {
    name: &'static str,
    stop: mpsc::Sender<()>,
    done: mpsc::Receiver<()>,
    thread: JoinHandle<()>,
}

impl Worker {
    fn start(
        name: &'static str,
        body: impl Fn(&mpsc::Receiver<()>) + Send + 'static,
    ) -> std::io::Result<Worker> {
        Worker::start_restarting_after(name, AFTER_ERROR, body)
    }

    /// Runs `body` on a thread of its own until it returns. A panic in it (a defect) is logged
    /// and `body` runs again after `restart_after`, so that the spool's background work never
    /// stops unnoticed: what it was doing is safe to do again (a compaction goes through a
    /// temporary file, a pool batch is listed in one commit).
    fn start_restarting_after(
        name: &'static str,
        restart_after: Duration,
        body: impl Fn(&mpsc::Receiver<()>) + Send + 'static,
    ) -> std::io::Result<Worker> {
        let (stop, stopped) = mpsc::channel::<()>();
        let (finished, done) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                while let Err(panic) =
                    std::panic::catch_unwind(AssertUnwindSafe(|| body(&stopped)))
                {
                    error!(
                        "A spool background task stopped on an internal error (a defect in passerelled); it is started again in {} s. Nothing stored is lost, but until it runs, instances may be stored more slowly or use more disk. Report this line to the vendor. thread={name} panic={}",
                        restart_after.as_secs(),
                        panic_message(panic.as_ref())
                    );
                    if stop_requested(&stopped, restart_after) {
                        break;
                    }
                }
                let _ = finished.send(());
            })?;
        Ok(Worker {
            name,
            stop,
            done,
            thread,
        })
    }

    /// Asks the thread to stop and waits a moment for it.
    pub fn stop(self) {
        drop(self.stop);
        if self.done.recv_timeout(STOP_WAIT).is_ok() {
            let _ = self.thread.join();
        } else {
            info!(
                "Stopping while a spool background task is busy; what it was doing is finished after the next start. thread={}",
                self.name
            );
        }
    }
}

/// What a panic said (its `&str` or `String` payload).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Sleeps up to `d`; true when the thread must stop.
fn stop_requested(stopped: &mpsc::Receiver<()>, d: Duration) -> bool {
    !matches!(stopped.recv_timeout(d), Err(RecvTimeoutError::Timeout))
}

/// Logs a failure once (and the recovery), and says how long to wait.
struct Failing {
    what: &'static str,
    consequence: &'static str,
    on: bool,
}

impl Failing {
    fn ok(&mut self) {
        if self.on {
            self.on = false;
            info!("Spool background work succeeds again. task={}", self.what);
        }
    }

    fn failed(&mut self, e: &passerelle_spool::SpoolError) -> Duration {
        if !self.on {
            self.on = true;
            warn!(
                "Could not {}; {} It is retried every 30 s. Check the disk. error={}",
                self.what,
                self.consequence,
                crate::error_chain(e)
            );
        }
        AFTER_ERROR
    }
}

pub fn compactor(spool: Spool) -> std::io::Result<Worker> {
    Worker::start("spool-compact", move |stopped| {
        lower_priority("spool-compact");
        let mut failing = Failing {
            what: "compact spool files",
            consequence:
                "instances stay stored as received (safe, but they use about twice the disk space).",
            on: false,
        };
        loop {
            let work = spool.compaction_due().and_then(|due| {
                if due {
                    spool.compact_batch(BATCH).map(Some)
                } else {
                    Ok(None)
                }
            });
            let wait = match work {
                // Only work done says the trouble is over (a pass that was not due tried nothing).
                Ok(Some(r)) if r.compacted + r.skipped > 0 => {
                    failing.ok();
                    Duration::ZERO
                }
                Ok(_) => IDLE,
                Err(e) => failing.failed(&e),
            };
            if stop_requested(stopped, wait) {
                return;
            }
        }
    })
}

/// The pool filler: two workers. `spool-pool-new` creates batches of empty files at nice 19 (file
/// creation is the costly half, up to a millisecond of kernel time per file on ext4 without a
/// journal, and it must not take a core from an acknowledgement); `spool-pool` lists each batch
/// at normal priority (it holds the database connection for that commit, and a thread at nice 19
/// preempted while holding it would stall every store).
pub struct PoolFiller {
    creator: Worker,
    lister: Worker,
}

impl PoolFiller {
    /// Stops the creating worker, then the listing one (which takes a batch the creator may be
    /// handing over meanwhile).
    pub fn stop(self) {
        self.creator.stop();
        self.lister.stop();
    }
}

pub fn pool_filler(spool: Spool) -> std::io::Result<PoolFiller> {
    let (created, batches) = mpsc::sync_channel::<PoolBatch>(1);
    let creator_spool = spool.clone();
    let creator = Worker::start("spool-pool-new", move |stopped| {
        create_batches(&creator_spool, &created, stopped);
    })?;
    let lister = Worker::start("spool-pool", move |stopped| {
        let mut failing = Failing {
            what: "list spool files created ahead",
            consequence: "instances are stored through temporary files (safe, a little slower).",
            on: false,
        };
        loop {
            match batches.recv_timeout(IDLE) {
                Ok(batch) => match spool.list_pool_batch(batch) {
                    Ok(_) => failing.ok(),
                    Err(e) => {
                        if stop_requested(stopped, failing.failed(&e)) {
                            return;
                        }
                    }
                },
                Err(RecvTimeoutError::Timeout) => {}
                // The creating worker has stopped (a panic restarts it on its own thread).
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if !matches!(stopped.try_recv(), Err(TryRecvError::Empty)) {
                return;
            }
        }
    })?;
    Ok(PoolFiller { creator, lister })
}

/// The creating half of the pool filler (see [`pool_filler`]).
fn create_batches(
    spool: &Spool,
    created: &mpsc::SyncSender<PoolBatch>,
    stopped: &mpsc::Receiver<()>,
) {
    lower_priority("spool-pool-new");
    let mut failing = Failing {
        what: "create spool files ahead",
        consequence: "instances are stored through temporary files (safe, a little slower).",
        on: false,
    };
    loop {
        let wait = match spool.create_pool_batch() {
            Ok(Some(batch)) => {
                failing.ok();
                if created.send(batch).is_err() {
                    return;
                }
                Duration::ZERO
            }
            Ok(None) => {
                failing.ok();
                if spool.pool_low() {
                    // Low but nothing made (the disk is at its reserve): wait, then try again.
                    IDLE
                } else {
                    spool.wait_pool_low(IDLE);
                    Duration::ZERO
                }
            }
            Err(e) => failing.failed(&e),
        };
        if stop_requested(stopped, wait) {
            return;
        }
    }
}

/// Nice 19 for this thread (Linux applies `setpriority` to a thread id): it gets about 1.5% of a
/// core while ingest or the uplink want the CPU, and all of it otherwise.
fn lower_priority(thread: &str) {
    let me = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(me), 19) {
        warn!(
            "Could not lower a spool background thread's priority; it competes with ingest for CPU, and acknowledgements may be slower. thread={thread} error={e}"
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn a_worker_that_panics_is_started_again_and_still_stops_when_asked() {
        let runs = Arc::new(AtomicUsize::new(0));
        let (running, started) = mpsc::channel::<usize>();
        let counted = runs.clone();
        let worker = Worker::start_restarting_after(
            "test-worker",
            Duration::from_millis(10),
            move |stopped| {
                let run = counted.fetch_add(1, Ordering::SeqCst) + 1;
                if run == 1 {
                    panic!("first run fails");
                }
                running.send(run).unwrap();
                // Runs until asked to stop, as the real workers do.
                let _ = stopped.recv();
            },
        )
        .unwrap();
        assert_eq!(
            started.recv_timeout(Duration::from_secs(10)),
            Ok(2),
            "the worker was not started again after its panic"
        );
        drop(worker.stop);
        assert!(
            worker.done.recv_timeout(STOP_WAIT).is_ok(),
            "the restarted worker did not stop when asked"
        );
        worker.thread.join().unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_panic_message_is_read_from_either_payload() {
        let s: Box<dyn std::any::Any + Send> = Box::new("static text");
        assert_eq!(panic_message(s.as_ref()), "static text");
        let s: Box<dyn std::any::Any + Send> = Box::new(String::from("formatted 7"));
        assert_eq!(panic_message(s.as_ref()), "formatted 7");
        let s: Box<dyn std::any::Any + Send> = Box::new(7u8);
        assert_eq!(panic_message(s.as_ref()), "(no message)");
    }
}
