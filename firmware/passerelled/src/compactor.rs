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
//! Stopping them is not waited for beyond a moment: a compaction cut short leaves the intake file
//! in place and a temporary file that the next start removes; files created but not yet listed in
//! the pool stay empty and unused.

use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::thread::JoinHandle;
use std::time::Duration;

use log::{info, warn};
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
        body: impl FnOnce(&mpsc::Receiver<()>) + Send + 'static,
    ) -> std::io::Result<Worker> {
        let (stop, stopped) = mpsc::channel::<()>();
        let (finished, done) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                body(&stopped);
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
                // The creating worker has ended (stopped, or it panicked).
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
