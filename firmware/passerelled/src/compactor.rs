//! The compactor thread: recompresses intake files at `spool.zstd_level` (see `passerelle_spool`'s
//! `compact` module) while the box has CPU to spare.
//!
//! It works when ingest pauses (`Spool::compaction_due`: one second without a new instance, or a
//! backlog of intake files too big for the disk), and at nice 19, so the kernel gives it little CPU
//! time while the uplink wants it: on a 2-core box a CT study is acknowledged at full speed and compressed afterwards.
//! Stopping it is not waited for beyond a moment: a compaction cut short leaves the intake file in
//! place and a temporary file that the next start removes.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

use log::{info, warn};
use passerelle_spool::Spool;

/// Files per batch: between batches the thread checks whether it must stop.
const BATCH: usize = 4;
/// How long the thread sleeps when nothing waits, or after an error.
const IDLE: Duration = Duration::from_millis(200);
const AFTER_ERROR: Duration = Duration::from_secs(30);
/// How long [`Compactor::stop`] waits for the thread.
const STOP_WAIT: Duration = Duration::from_secs(2);

pub struct Compactor {
    stop: mpsc::Sender<()>,
    done: mpsc::Receiver<()>,
    thread: JoinHandle<()>,
}

impl Compactor {
    pub fn start(spool: Spool) -> std::io::Result<Compactor> {
        let (stop, stopped) = mpsc::channel::<()>();
        let (finished, done) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("spool-compact".into())
            .spawn(move || {
                run(&spool, &stopped);
                let _ = finished.send(());
            })?;
        Ok(Compactor { stop, done, thread })
    }

    /// Asks the thread to stop and waits a moment for it; a file being compacted may be cut short
    /// (safe: the intake file stays in place).
    pub fn stop(self) {
        drop(self.stop);
        if self.done.recv_timeout(STOP_WAIT).is_ok() {
            let _ = self.thread.join();
        } else {
            info!("Stopping with a spool file half compacted; it stays as it was received and is compacted after the next start.");
        }
    }
}

fn run(spool: &Spool, stopped: &mpsc::Receiver<()>) {
    lower_priority();
    let mut failing = false;
    loop {
        let work = spool.compaction_due().and_then(|due| {
            if due {
                spool.compact_batch(BATCH)
            } else {
                Ok(passerelle_spool::CompactReport::default())
            }
        });
        let wait = match work {
            Ok(r) => {
                if failing {
                    failing = false;
                    info!("Compacting spool files works again.");
                }
                if r.compacted + r.skipped > 0 {
                    Duration::ZERO
                } else {
                    IDLE
                }
            }
            Err(e) => {
                if !failing {
                    failing = true;
                    warn!(
                        "Could not compact spool files; instances stay stored uncompressed (safe, but they use about twice the disk space) and compaction is retried every 30 s. Check the disk. error={}",
                        crate::error_chain(&e)
                    );
                }
                AFTER_ERROR
            }
        };
        match stopped.recv_timeout(wait) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Nice 19 for this thread (Linux applies `setpriority` to a thread id): it gets about 1.5% of a
/// core while ingest or the uplink want the CPU, and all of it otherwise.
fn lower_priority() {
    let me = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(me), 19) {
        warn!(
            "Could not lower the compactor thread's priority; it competes with ingest for CPU. error={e}"
        );
    }
}
