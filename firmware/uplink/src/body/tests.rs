use super::*;

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;

use futures_util::StreamExt;

/// How the in-memory source behaves for one instance.
#[derive(Clone)]
enum Fake {
    /// Yields these bytes.
    Bytes(Vec<u8>),
    /// Announces `len` bytes but yields only these.
    Short(Vec<u8>, u64),
    /// Yields these bytes, then an I/O error.
    FailAfter(Vec<u8>),
    /// The spool quarantined it.
    Dropped,
    /// The spool could not be read.
    Unreadable,
}

#[derive(Clone)]
struct FakeSource {
    items: Arc<HashMap<i64, Fake>>,
    /// Bytes read from all readers so far.
    read: Arc<AtomicUsize>,
}

impl FakeSource {
    fn new(items: Vec<(i64, Fake)>) -> FakeSource {
        FakeSource {
            items: Arc::new(items.into_iter().collect()),
            read: Arc::new(AtomicUsize::new(0)),
        }
    }
}

struct FakeReader {
    data: std::io::Cursor<Vec<u8>>,
    fail_at_end: bool,
    read: Arc<AtomicUsize>,
}

impl Read for FakeReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.data.read(buf)?;
        self.read.fetch_add(n, Ordering::SeqCst);
        if n == 0 && self.fail_at_end {
            return Err(std::io::Error::other("zstd: corrupted block"));
        }
        Ok(n)
    }
}

impl PartSource for FakeSource {
    type Reader = FakeReader;

    fn open(&self, inst: &QueuedInstance) -> Opened<FakeReader> {
        let reader = |data: &Vec<u8>, fail_at_end| FakeReader {
            data: std::io::Cursor::new(data.clone()),
            fail_at_end,
            read: self.read.clone(),
        };
        match self.items.get(&inst.id.0) {
            Some(Fake::Bytes(d)) => Opened::Ready(reader(d, false), d.len() as u64),
            Some(Fake::Short(d, len)) => Opened::Ready(reader(d, false), *len),
            Some(Fake::FailAfter(d)) => Opened::Ready(reader(d, true), d.len() as u64 + 10),
            Some(Fake::Dropped) => Opened::Dropped("hash mismatch; quarantined".into()),
            Some(Fake::Unreadable) | None => Opened::Unreadable("EIO".into()),
        }
    }
}

fn inst(id: i64) -> QueuedInstance {
    QueuedInstance {
        id: InstanceId(id),
        sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
        sop_instance_uid: format!("1.2.3.{id}"),
        study_instance_uid: "1.2.3".into(),
        transfer_syntax_uid: "1.2.840.10008.1.2.1".into(),
        raw_size: 0,
        attempts: 0,
        refusals: 0,
    }
}

/// Deterministic bytes that include CRLFs and dashes, like real binary data may.
fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| match i % 97 {
            0 => b'\r',
            1 => b'\n',
            2 | 3 => b'-',
            _ => (i as u8).wrapping_mul(31).wrapping_add(seed),
        })
        .collect()
}

struct Streamed {
    boundary: String,
    chunks: Vec<Bytes>,
    /// The error that ended the stream, if it did not end cleanly.
    error: Option<String>,
    report: ProducerReport,
    /// What the producer recorded as its local failure.
    failure: Option<LocalFailure>,
}

impl Streamed {
    fn body(&self) -> Vec<u8> {
        self.chunks.concat()
    }
}

/// Runs the producer over `ids` and collects the body stream, cancelling after `cancel_after`
/// chunks if asked.
async fn stream_body(source: FakeSource, ids: &[i64], cancel_after: Option<usize>) -> Streamed {
    let shared = Shared::new();
    let mut pending: VecDeque<QueuedInstance> = ids.iter().map(|&i| inst(i)).collect();
    let mut report = ProducerReport::default();
    let boundary = new_boundary();
    let Some(first) = open_next(&source, &mut pending, &mut report, &shared.progress) else {
        return Streamed {
            boundary,
            chunks: Vec::new(),
            error: None,
            report,
            failure: shared.failure(),
        };
    };
    let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
    let producer = {
        let (shared, boundary) = (shared.clone(), boundary.clone());
        let rt = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            produce(source, first, pending, boundary, tx, shared, rt)
        })
    };
    let mut stream = BodyStream::new(rx, shared.clone());
    let mut chunks = Vec::new();
    let mut error = None;
    while let Some(item) = stream.next().await {
        match item {
            Ok(chunk) => chunks.push(chunk),
            Err(e) => {
                error = Some(e.to_string());
                break;
            }
        }
        if cancel_after == Some(chunks.len()) {
            shared.cancel.cancel();
        }
    }
    assert!(
        stream.next().await.is_none(),
        "the stream ends after an error"
    );
    let r = producer.await.unwrap();
    report.dropped.extend(r.dropped);
    report.unreadable.extend(r.unreadable);
    Streamed {
        boundary,
        chunks,
        error,
        report,
        failure: shared.failure(),
    }
}

/// Parses a body back with multer, fed chunk by chunk as the HTTP client would send it.
async fn parse_parts(boundary: &str, chunks: Vec<Bytes>) -> Vec<(String, Vec<u8>)> {
    let stream = futures_util::stream::iter(chunks.into_iter().map(Ok::<_, std::io::Error>));
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut parts = Vec::new();
    while let Some(field) = multipart.next_field().await.unwrap() {
        let ct = field
            .content_type()
            .map(|m| m.to_string())
            .unwrap_or_default();
        parts.push((ct, field.bytes().await.unwrap().to_vec()));
    }
    parts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produced_body_parses_back_into_the_same_parts_in_order() {
    let big = data(CHUNK_SIZE * 2 + 12345, 7);
    let small = data(1000, 3);
    let exact = data(CHUNK_SIZE, 9);
    let source = FakeSource::new(vec![
        (1, Fake::Bytes(small.clone())),
        (2, Fake::Bytes(big.clone())),
        (3, Fake::Bytes(Vec::new())),
        (4, Fake::Bytes(exact.clone())),
    ]);
    let s = stream_body(source, &[1, 2, 3, 4], None).await;
    assert_eq!(s.error, None);
    assert!(s.report.dropped.is_empty() && s.report.unreadable.is_empty());
    let body = s.body();
    assert!(body.starts_with(format!("--{}\r\n", s.boundary).as_bytes()));
    assert!(body.ends_with(format!("\r\n--{}--\r\n", s.boundary).as_bytes()));
    let parts = parse_parts(&s.boundary, s.chunks).await;
    let want = [small, big, Vec::new(), exact];
    assert_eq!(parts.len(), want.len());
    for (i, ((ct, bytes), want)) in parts.iter().zip(want.iter()).enumerate() {
        assert_eq!(ct, "application/dicom", "part {i}");
        assert!(
            bytes == want,
            "part {i}: {} bytes, want {}",
            bytes.len(),
            want.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exact_framing_of_one_part() {
    let source = FakeSource::new(vec![(1, Fake::Bytes(b"DICM".to_vec()))]);
    let s = stream_body(source, &[1], None).await;
    let b = &s.boundary;
    let want = format!("--{b}\r\nContent-Type: application/dicom\r\n\r\nDICM\r\n--{b}--\r\n");
    assert_eq!(String::from_utf8(s.body()).unwrap(), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_and_unreadable_instances_are_left_out_and_reported() {
    let source = FakeSource::new(vec![
        (1, Fake::Dropped),
        (2, Fake::Bytes(data(10, 1))),
        (3, Fake::Unreadable),
        (4, Fake::Dropped),
        (5, Fake::Bytes(data(20, 2))),
    ]);
    let s = stream_body(source, &[1, 2, 3, 4, 5], None).await;
    assert_eq!(s.error, None);
    assert_eq!(s.report.dropped, vec![InstanceId(1), InstanceId(4)]);
    assert_eq!(s.report.unreadable.len(), 1);
    assert_eq!(s.report.unreadable[0].0, InstanceId(3));
    for id in [1, 3, 4] {
        assert!(s.report.left_out(InstanceId(id)));
    }
    for id in [2, 5] {
        assert!(!s.report.left_out(InstanceId(id)));
    }
    let parts = parse_parts(&s.boundary, s.chunks).await;
    assert_eq!(
        parts.iter().map(|p| p.1.clone()).collect::<Vec<_>>(),
        vec![data(10, 1), data(20, 2)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_streamed_when_no_instance_can_be_read() {
    let source = FakeSource::new(vec![(1, Fake::Dropped), (2, Fake::Unreadable)]);
    let s = stream_body(source, &[1, 2], None).await;
    assert!(s.chunks.is_empty());
    assert_eq!(s.report.dropped, vec![InstanceId(1)]);
    assert_eq!(s.report.unreadable.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_spool_file_ends_the_body_with_an_error_never_a_clean_end() {
    let source = FakeSource::new(vec![
        (1, Fake::Bytes(data(100, 1))),
        (2, Fake::Short(data(100, 2), 150)),
        (3, Fake::Bytes(data(100, 3))),
    ]);
    let s = stream_body(source, &[1, 2, 3], None).await;
    let error = s.error.clone().expect("the body must end with an error");
    assert!(
        error.contains("1.2.3.2") && error.contains("100 bytes instead of 150"),
        "{error}"
    );
    let closing = format!("--{}--", s.boundary);
    assert!(!String::from_utf8_lossy(&s.body()).contains(&closing));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_error_mid_instance_ends_the_body_with_an_error() {
    let source = FakeSource::new(vec![(1, Fake::FailAfter(data(CHUNK_SIZE + 5, 1)))]);
    let s = stream_body(source, &[1], None).await;
    let error = s.error.expect("the body must end with an error");
    assert!(
        error.contains("corrupted block") && error.contains("1.2.3.1"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_error_names_the_instance_being_read_not_the_others() {
    let source = FakeSource::new(vec![
        (1, Fake::Bytes(data(CHUNK_SIZE + 7, 1))),
        (2, Fake::FailAfter(data(CHUNK_SIZE + 5, 2))),
        (3, Fake::Bytes(data(100, 3))),
    ]);
    let s = stream_body(source, &[1, 2, 3], None).await;
    let failure = s.failure.expect("the producer records its failure");
    assert_eq!(failure.instance, Some(InstanceId(2)));
    assert!(failure.detail.contains("1.2.3.2"), "{}", failure.detail);
    assert!(s.error.is_some_and(|e| e == failure.detail));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_ends_the_body_with_an_error_and_stops_the_producer() {
    let source = FakeSource::new(vec![(1, Fake::Bytes(data(CHUNK_SIZE * 20, 1)))]);
    let read = source.read.clone();
    let s = stream_body(source, &[1], Some(2)).await;
    let error = s.error.expect("a cancelled body ends with an error");
    assert!(error.contains("cancelled"), "{error}");
    assert!(
        read.load(Ordering::SeqCst) < CHUNK_SIZE * 20,
        "the producer stopped reading after cancellation"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producer_never_reads_more_than_a_few_chunks_ahead_of_the_client() {
    let total = CHUNK_SIZE * 24;
    let source = FakeSource::new(vec![(1, Fake::Bytes(data(total, 5)))]);
    let read = source.read.clone();
    let shared = Shared::new();
    let mut pending = VecDeque::from(vec![inst(1)]);
    let mut report = ProducerReport::default();
    let first = open_next(&source, &mut pending, &mut report, &shared.progress).unwrap();
    let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
    let producer = {
        let shared = shared.clone();
        let rt = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            produce(source, first, pending, new_boundary(), tx, shared, rt)
        })
    };
    let mut stream = BodyStream::new(rx, shared);
    let mut taken = 0usize;
    // The channel's chunks, the chunk the stream hands over piece by piece, and the chunk the
    // producer waits to send.
    let ahead = (CHANNEL_CHUNKS + 2) * CHUNK_SIZE;
    while let Some(chunk) = stream.next().await {
        let piece = chunk.unwrap().len();
        // The idle watchdog sees progress once per piece the HTTP client takes.
        assert!(piece <= SLICE_SIZE, "a piece of {piece} bytes");
        taken += piece;
        let r = read.load(Ordering::SeqCst);
        assert!(
            r <= taken + ahead,
            "read {r} bytes while the client took {taken}"
        );
    }
    producer.await.unwrap();
    assert_eq!(read.load(Ordering::SeqCst), total);
}

#[test]
fn boundaries_are_random_and_valid() {
    let a = new_boundary();
    let b = new_boundary();
    assert_ne!(a, b);
    for x in [&a, &b] {
        assert!(x.len() <= 70, "RFC 2046 allows at most 70 characters");
        assert!(
            x.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
            "{x}"
        );
    }
    assert_eq!(
        content_type(&a),
        format!("multipart/related; type=\"application/dicom\"; boundary={a}")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idle_watchdog_fires_only_after_no_progress() {
    let p = Progress::new();
    let idle = Duration::from_secs(1);
    let started = Instant::now();
    // Keep making progress for twice the idle timeout: the watchdog must not fire meanwhile.
    let watchdog = p.idle(idle);
    tokio::pin!(watchdog);
    let keep_busy_until = started + Duration::from_secs(2);
    while Instant::now() < keep_busy_until {
        p.touch();
        tokio::select! {
            _ = &mut watchdog => panic!("fired while progress was being made"),
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    let last_touch = Instant::now();
    p.touch();
    watchdog.await;
    assert!(last_touch.elapsed() >= idle - Duration::from_millis(20));
    assert!(started.elapsed() >= Duration::from_secs(3) - Duration::from_millis(20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pieces_handed_to_the_client_are_at_most_16_kib() {
    // At 1 KB/s, a piece must be taken well within the default 60 s idle timeout.
    let source = FakeSource::new(vec![(1, Fake::Bytes(data(CHUNK_SIZE * 3 + 7, 1)))]);
    let s = stream_body(source, &[1], None).await;
    assert_eq!(s.error, None);
    assert!(s.chunks.len() > 48);
    assert!(s.chunks.iter().all(|c| c.len() <= 16 * 1024));
}

#[test]
fn the_drain_allowance_applies_only_once_the_body_is_complete_and_is_bounded() {
    let cases: &[(u64, bool, u64)] = &[
        (0, true, 0),
        (100 * 1024, false, 0),
        (2048, true, 2),
        (100 * 1024, true, 100),
        (10 * 1024 * 1024 * 1024, true, 1024),
    ];
    for &(bytes, done, secs) in cases {
        let p = Progress::new();
        p.body_bytes.store(bytes, Ordering::Relaxed);
        if done {
            p.body_complete();
        }
        assert_eq!(
            p.drain_allowance(),
            Duration::from_secs(secs),
            "{bytes} bytes, done={done}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complete_body_counts_its_bytes_and_marks_the_progress_done() {
    let source = FakeSource::new(vec![(1, Fake::Bytes(data(3000, 1)))]);
    let shared = Shared::new();
    let mut pending = VecDeque::from(vec![inst(1)]);
    let mut report = ProducerReport::default();
    let first = open_next(&source, &mut pending, &mut report, &shared.progress).unwrap();
    let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
    let boundary = new_boundary();
    let producer = {
        let (shared, boundary) = (shared.clone(), boundary.clone());
        let rt = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            produce(source, first, pending, boundary, tx, shared, rt)
        })
    };
    let mut stream = BodyStream::new(rx, shared.clone());
    let mut total = 0;
    while let Some(chunk) = stream.next().await {
        total += chunk.unwrap().len();
        assert!(!shared.progress.body_done.load(Ordering::Relaxed));
    }
    producer.await.unwrap();
    assert_eq!(
        shared.progress.body_bytes.load(Ordering::Relaxed),
        total as u64
    );
    assert!(shared.progress.body_done.load(Ordering::Relaxed));
}
