//! The streamed `multipart/related; type="application/dicom"` request body.
//!
//! A blocking producer (on tokio's blocking pool) opens one instance at a time, reads it in
//! [`CHUNK_SIZE`] chunks and sends them through a bounded channel of [`CHANNEL_CHUNKS`] chunks; the
//! HTTP client pulls them through [`BodyStream`], which hands each chunk over in [`SLICE_SIZE`]
//! pieces. Memory is bounded by a few chunks, whatever the size of the instances.
//!
//! Whole chunks cross the channel, not pieces: each send from the blocking producer is a
//! cross-thread wake-up, and with one per 16 KiB piece those wake-ups cost the uplink about as
//! much CPU as the TLS encryption of the data (measured with perf on the benchmark's CT study).
//!
//! The body only ends cleanly (end of stream) after the producer wrote the closing delimiter. Any
//! other end (read error, short file, cancellation) is an *error* of the body stream, which makes
//! the HTTP client abort the connection instead of finishing the chunked message: the PACS never
//! sees a truncated body as a complete request.

use std::collections::VecDeque;
use std::io::Read;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use passerelle_spool::{InstanceId, QueuedInstance, Spool, SpoolError};

use crate::outcome::LocalFailure;
use rand::Rng;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Size of one read from the spool.
pub(crate) const CHUNK_SIZE: usize = 256 * 1024;
/// Size of the pieces handed to the HTTP client. Small, because the idle watchdog sees progress
/// when the client takes a piece: at 1 KB/s a 16 KiB piece is taken every 16 s or so.
pub(crate) const SLICE_SIZE: usize = 16 * 1024;
/// Chunks buffered between the producer and the HTTP client.
pub(crate) const CHANNEL_CHUNKS: usize = 2;
/// Once the whole body was handed to the HTTP client, up to this much of it may still sit in
/// buffers (hyper's write queue, rustls, the kernel's send buffer) on its way out...
const DRAIN_BOUND: u64 = 1024 * 1024;
/// ...and it drains at no less than this rate on a link that still works (a link that stopped
/// acknowledging data is caught sooner by TCP_USER_TIMEOUT, see `tcp_user_timeout`).
pub(crate) const DRAIN_MIN_RATE: u64 = 1024;

/// A random boundary: 128 bits of randomness, so it cannot plausibly occur inside a dataset.
pub(crate) fn new_boundary() -> String {
    let mut rng = rand::thread_rng();
    let random: String = (0..32)
        .map(|_| char::from(b"0123456789abcdef"[rng.gen_range(0..16)]))
        .collect();
    format!("passerelle-{random}")
}

/// The request's Content-Type header.
pub(crate) fn content_type(boundary: &str) -> String {
    format!("multipart/related; type=\"application/dicom\"; boundary={boundary}")
}

/// What precedes each part's bytes: the delimiter line and the part's headers.
pub(crate) fn part_head(boundary: &str) -> Bytes {
    Bytes::from(format!(
        "--{boundary}\r\nContent-Type: application/dicom\r\n\r\n"
    ))
}

/// What follows each part's bytes (the CRLF belongs to the next delimiter, RFC 2046 §5.1.1).
pub(crate) const PART_TAIL: &[u8] = b"\r\n";

/// The close delimiter that ends the body.
pub(crate) fn closing(boundary: &str) -> Bytes {
    Bytes::from(format!("--{boundary}--\r\n"))
}

/// When the exchange last made progress: a piece taken by the HTTP client, a response byte
/// received, or local work (verifying a spool file) finished.
///
/// After the last piece was taken, the PACS answers only once the buffered rest of the body has
/// crossed the link, which shows no progress here: the watchdog then also allows the time that
/// rest needs at [`DRAIN_MIN_RATE`] (at most [`DRAIN_BOUND`] of it).
pub(crate) struct Progress {
    base: Instant,
    last_ms: AtomicU64,
    busy: AtomicBool,
    body_bytes: AtomicU64,
    body_done: AtomicBool,
}

impl Progress {
    pub(crate) fn new() -> Progress {
        Progress {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
            busy: AtomicBool::new(false),
            body_bytes: AtomicU64::new(0),
            body_done: AtomicBool::new(false),
        }
    }

    fn body_taken(&self, bytes: usize) {
        self.body_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.touch();
    }

    fn body_complete(&self) {
        self.body_done.store(true, Ordering::Relaxed);
        self.touch();
    }

    /// Extra time allowed once the body is complete, for its buffered tail to cross the link.
    fn drain_allowance(&self) -> Duration {
        if !self.body_done.load(Ordering::Relaxed) {
            return Duration::ZERO;
        }
        let buffered = self.body_bytes.load(Ordering::Relaxed).min(DRAIN_BOUND);
        Duration::from_millis(buffered * 1000 / DRAIN_MIN_RATE)
    }

    pub(crate) fn touch(&self) {
        let ms = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// While busy (the producer verifies a spool file), the link is idle because of us, not the
    /// peer: the watchdog does not count that time.
    fn set_busy(&self, busy: bool) {
        self.busy.store(busy, Ordering::Relaxed);
        self.touch();
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.base.elapsed().saturating_sub(last)
    }

    /// Completes once nothing has progressed for `idle` (plus the drain allowance).
    pub(crate) async fn idle(&self, idle: Duration) {
        loop {
            if self.busy.load(Ordering::Relaxed) {
                self.touch();
            }
            let limit = idle.saturating_add(self.drain_allowance());
            let since = self.idle_for();
            if since >= limit {
                return;
            }
            tokio::time::sleep(limit - since).await;
        }
    }
}

/// State shared by the producer, the body stream and the exchange.
pub(crate) struct Shared {
    pub(crate) progress: Progress,
    /// Set when the exchange is over (answered, failed, timed out or shutting down).
    pub(crate) cancel: CancellationToken,
    /// Set by the producer after it sent the closing delimiter.
    completed: AtomicBool,
    /// Why the producer stopped early, if it did because of a local error.
    failure: Mutex<Option<LocalFailure>>,
}

impl Shared {
    pub(crate) fn new() -> Arc<Shared> {
        Arc::new(Shared {
            progress: Progress::new(),
            cancel: CancellationToken::new(),
            completed: AtomicBool::new(false),
            failure: Mutex::new(None),
        })
    }

    /// True once the producer sent the closing delimiter: the whole body went out.
    pub(crate) fn body_complete(&self) -> bool {
        self.completed.load(Ordering::Acquire)
    }

    /// The local error that stopped the producer, if any, and the instance it was reading.
    pub(crate) fn failure(&self) -> Option<LocalFailure> {
        self.failure
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn fail(&self, instance: InstanceId, detail: String) {
        *self
            .failure
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(LocalFailure {
            instance: Some(instance),
            detail,
        });
    }
}

/// The request body as the HTTP client sees it.
pub(crate) struct BodyStream {
    rx: mpsc::Receiver<Bytes>,
    shared: Arc<Shared>,
    /// The rest of the chunk being handed over, piece by piece.
    current: Bytes,
    done: bool,
}

impl BodyStream {
    pub(crate) fn new(rx: mpsc::Receiver<Bytes>, shared: Arc<Shared>) -> BodyStream {
        BodyStream {
            rx,
            shared,
            current: Bytes::new(),
            done: false,
        }
    }
}

impl futures_util::Stream for BodyStream {
    type Item = std::io::Result<Bytes>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if this.shared.cancel.is_cancelled() {
            this.done = true;
            return Poll::Ready(Some(Err(std::io::Error::other(
                "the upload was cancelled before its body was complete",
            ))));
        }
        if this.current.is_empty() {
            match this.rx.poll_recv(cx) {
                Poll::Ready(Some(chunk)) => this.current = chunk,
                Poll::Ready(None) => return this.end(),
                Poll::Pending => return Poll::Pending,
            }
        }
        let piece = this.current.split_to(this.current.len().min(SLICE_SIZE));
        this.shared.progress.body_taken(piece.len());
        Poll::Ready(Some(Ok(piece)))
    }
}

impl BodyStream {
    /// The producer closed the channel: a clean end only if it wrote the closing delimiter.
    fn end(&mut self) -> Poll<Option<std::io::Result<Bytes>>> {
        self.done = true;
        if self.shared.completed.load(Ordering::Acquire) {
            self.shared.progress.body_complete();
            Poll::Ready(None)
        } else {
            let why = self
                .shared
                .failure()
                .map_or_else(|| "the body producer stopped early".into(), |f| f.detail);
            Poll::Ready(Some(Err(std::io::Error::other(why))))
        }
    }
}

/// The result of opening one instance for sending.
pub(crate) enum Opened<R> {
    /// A verified reader and the number of bytes it will yield.
    Ready(R, u64),
    /// The spool quarantined the file or marked the row lost; the instance leaves the batch.
    Dropped(String),
    /// The spool could not be read (I/O or database error); the instance is retried later.
    Unreadable(String),
}

/// Where the producer gets the instances' bytes: the spool, or in-memory data in tests.
pub(crate) trait PartSource: Send + 'static {
    type Reader: Read + Send + 'static;
    fn open(&self, inst: &QueuedInstance) -> Opened<Self::Reader>;
}

impl PartSource for Spool {
    type Reader = passerelle_spool::InstanceReader;

    fn open(&self, inst: &QueuedInstance) -> Opened<Self::Reader> {
        match self.open_verified(inst) {
            Ok(reader) => {
                let len = reader.len();
                Opened::Ready(reader, len)
            }
            Err(e @ (SpoolError::Corrupt { .. } | SpoolError::Missing { .. })) => {
                Opened::Dropped(crate::error_chain(&e))
            }
            Err(e) => Opened::Unreadable(crate::error_chain(&e)),
        }
    }
}

/// What the producer did with the instances it was given.
#[derive(Debug, Default)]
pub(crate) struct ProducerReport {
    /// Instances the spool dropped (quarantined or lost): not in the request, nothing to record.
    pub(crate) dropped: Vec<InstanceId>,
    /// Instances whose spool file could not be read: not in the request, to be retried.
    pub(crate) unreadable: Vec<(InstanceId, String)>,
}

impl ProducerReport {
    /// True if the instance was left out of the request.
    pub(crate) fn left_out(&self, id: InstanceId) -> bool {
        self.dropped.contains(&id) || self.unreadable.iter().any(|(i, _)| *i == id)
    }
}

/// An instance opened and ready to stream.
pub(crate) struct ReadyPart<R> {
    pub(crate) inst: QueuedInstance,
    reader: R,
    len: u64,
}

/// Opens instances from the front of `pending` until one is readable (blocking).
pub(crate) fn open_next<S: PartSource>(
    source: &S,
    pending: &mut VecDeque<QueuedInstance>,
    report: &mut ProducerReport,
    progress: &Progress,
) -> Option<ReadyPart<S::Reader>> {
    while let Some(inst) = pending.pop_front() {
        progress.set_busy(true);
        let opened = source.open(&inst);
        progress.set_busy(false);
        match opened {
            Opened::Ready(reader, len) => return Some(ReadyPart { inst, reader, len }),
            Opened::Dropped(why) => {
                log::warn!(
                    "Left an instance out of the upload: the spool could not hand it over intact. sop_instance_uid={} error=\"{}\"",
                    inst.sop_instance_uid, why
                );
                report.dropped.push(inst.id);
            }
            Opened::Unreadable(why) => {
                log::error!(
                    "Cannot read an instance from the spool; it stays queued and will be tried again. Check the spool disk. sop_instance_uid={} error=\"{}\"",
                    inst.sop_instance_uid, why
                );
                report.unreadable.push((inst.id, why));
            }
        }
    }
    None
}

/// Streams `first` and then every readable instance of `pending` as multipart parts into `tx`
/// (blocking; run it on the blocking pool). Stops early on cancellation or on a local error, in
/// which case the body stream ends with an error.
pub(crate) fn produce<S: PartSource>(
    source: S,
    first: ReadyPart<S::Reader>,
    mut pending: VecDeque<QueuedInstance>,
    boundary: String,
    tx: mpsc::Sender<Bytes>,
    shared: Arc<Shared>,
    rt: tokio::runtime::Handle,
) -> ProducerReport {
    let mut report = ProducerReport::default();
    let send = |chunk: Bytes| -> bool {
        rt.block_on(async {
            tokio::select! {
                sent = tx.send(chunk) => sent.is_ok(),
                _ = shared.cancel.cancelled() => false,
            }
        })
    };
    let mut next = Some(first);
    while let Some(ReadyPart {
        inst,
        mut reader,
        len,
    }) = next.take()
    {
        if !send(part_head(&boundary)) {
            return report;
        }
        let mut sent: u64 = 0;
        loop {
            if shared.cancel.is_cancelled() {
                return report;
            }
            let chunk = match read_chunk(&mut reader) {
                Ok(chunk) => chunk,
                Err(e) => {
                    shared.fail(
                        inst.id,
                        format!(
                            "reading the spool file of SOP Instance {} failed after {sent} bytes ({e})",
                            inst.sop_instance_uid
                        ),
                    );
                    return report;
                }
            };
            if chunk.is_empty() {
                break;
            }
            sent += chunk.len() as u64;
            if sent > len {
                break;
            }
            if !send(chunk) {
                return report;
            }
            // Part of the request body is on its way to the PACS.
            passerelle_spool::crash_point!("uplink::body::mid_upload");
        }
        if sent != len {
            if !shared.cancel.is_cancelled() {
                shared.fail(
                    inst.id,
                    format!(
                        "the spool file of SOP Instance {} gave {sent} bytes instead of {len}",
                        inst.sop_instance_uid
                    ),
                );
            }
            return report;
        }
        if !send(Bytes::from_static(PART_TAIL)) {
            return report;
        }
        if shared.cancel.is_cancelled() {
            return report;
        }
        next = open_next(&source, &mut pending, &mut report, &shared.progress);
    }
    if send(closing(&boundary)) {
        shared.completed.store(true, Ordering::Release);
    }
    report
}

/// Reads up to [`CHUNK_SIZE`] bytes; an empty chunk means end of file.
fn read_chunk<R: Read>(reader: &mut R) -> std::io::Result<Bytes> {
    let mut buf = BytesMut::zeroed(CHUNK_SIZE);
    let mut filled = 0;
    while filled < CHUNK_SIZE {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(filled);
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests;
