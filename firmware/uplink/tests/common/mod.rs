//! Shared pieces of the end-to-end tests: certificates (rcgen), a local HTTPS STOW-RS stub
//! (hyper over tokio-rustls, parsing the multipart body with multer), a real spool in a temporary
//! directory, and a running uplink.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::Full;
use passerelle_config::{SpoolConfig, UplinkConfig};
use passerelle_spool::{IncomingMeta, InstanceIndex, QueuedInstance, Spool, StoreOutcome};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::{watch, Notify};

// ---------------------------------------------------------------------------------------------
// Certificates

/// A certificate authority, its PEM written to a file.
pub struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
    pub pem_path: PathBuf,
}

/// A leaf certificate and key, as DER (for rustls) and PEM files (for the uplink's config).
pub struct Leaf {
    pub chain: Vec<CertificateDer<'static>>,
    pub key_der: Vec<u8>,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

impl Leaf {
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

impl Ca {
    pub fn new(dir: &Path, name: &str) -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let pem_path = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&pem_path, cert.pem()).unwrap();
        Ca {
            cert,
            key,
            pem_path,
        }
    }

    pub fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// Issues a certificate for these names (DNS names or IP addresses).
    pub fn issue(&self, dir: &Path, name: &str, sans: &[&str], client: bool) -> Leaf {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(sans).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name.to_string());
        params.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let cert_path = dir.join(format!("{name}.pem"));
        let key_path = dir.join(format!("{name}.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        Leaf {
            chain: vec![cert.der().clone()],
            key_der: key.serialize_der(),
            cert_path,
            key_path,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The STOW-RS stub

/// One request as the stub saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub authorization: Option<String>,
    pub content_type: String,
    pub accept: String,
    /// The SOP Instance UIDs of the parts, identified by their exact bytes.
    pub uids: Vec<String>,
    /// Parts whose bytes match no stored instance (must stay 0: bit-preserving).
    pub unknown_parts: usize,
    pub part_content_types: Vec<String>,
    /// The body could not be parsed as multipart.
    pub malformed: Option<String>,
}

pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// Never answer (a PACS that hangs).
    pub hang: bool,
}

impl Reply {
    pub fn json(status: u16, body: String) -> Reply {
        Reply {
            status,
            headers: vec![("Content-Type".into(), "application/dicom+json".into())],
            body,
            hang: false,
        }
    }

    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: String::new(),
            hang: false,
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn hang() -> Reply {
        Reply {
            hang: true,
            ..Reply::status(200)
        }
    }
}

/// A dicom+json STOW-RS response.
pub fn stow_json(referenced: &[&str], failed: &[(&str, u16)]) -> String {
    let refs: Vec<String> = referenced
        .iter()
        .map(|u| {
            format!(
                r#"{{"00081150": {{"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]}}, "00081155": {{"vr": "UI", "Value": ["{u}"]}}}}"#
            )
        })
        .collect();
    let fails: Vec<String> = failed
        .iter()
        .map(|(u, r)| {
            format!(
                r#"{{"00081155": {{"vr": "UI", "Value": ["{u}"]}}, "00081197": {{"vr": "US", "Value": [{r}]}}}}"#
            )
        })
        .collect();
    // Both sequences, even empty, as STOW-RS services send them (Orthanc, dcm4chee).
    format!(
        r#"{{"00081199": {{"vr": "SQ", "Value": [{}]}}, "00081198": {{"vr": "SQ", "Value": [{}]}}}}"#,
        refs.join(","),
        fails.join(",")
    )
}

type Handler = Box<dyn Fn(&Seen) -> Reply + Send + Sync>;

#[derive(Default)]
pub struct StubOptions {
    /// Require a client certificate issued by this CA.
    pub client_ca: Option<CertificateDer<'static>>,
    /// Read the request body no faster than this many bytes per second.
    pub read_rate: Option<u64>,
    /// Receive buffer of the listening socket (small, so a slow reader slows the client down).
    pub recv_buffer: Option<u32>,
}

struct StubState {
    handler: Handler,
    known: Mutex<HashMap<Vec<u8>, String>>,
    seen: Mutex<Vec<Seen>>,
    tls_failures: AtomicUsize,
    read_rate: Option<u64>,
    /// While not 0: answers wait until this many requests wait for theirs at once.
    gate: AtomicUsize,
    /// Requests whose body was read and whose answer is not sent yet.
    pending: watch::Sender<usize>,
    max_pending: AtomicUsize,
    /// The SOP Instance UIDs of those requests, and every UID seen in two of them at once.
    pending_uids: Mutex<Vec<String>>,
    overlapping_uids: Mutex<Vec<String>>,
}

pub struct Stub {
    pub addr: SocketAddr,
    state: Arc<StubState>,
}

impl Stub {
    pub async fn start(
        server: &Leaf,
        options: StubOptions,
        handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static,
    ) -> Stub {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match &options.client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add(ca.clone()).unwrap();
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder
            .with_single_cert(server.chain.clone(), server.key())
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        if let Some(size) = options.recv_buffer {
            socket.set_recv_buffer_size(size).unwrap();
        }
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(16).unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(StubState {
            handler: Box::new(handler),
            known: Mutex::new(HashMap::new()),
            seen: Mutex::new(Vec::new()),
            tls_failures: AtomicUsize::new(0),
            read_rate: options.read_rate,
            gate: AtomicUsize::new(0),
            pending: watch::channel(0).0,
            max_pending: AtomicUsize::new(0),
            pending_uids: Mutex::new(Vec::new()),
            overlapping_uids: Mutex::new(Vec::new()),
        });
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let st = st.clone();
                tokio::spawn(async move {
                    let tls = match acceptor.accept(tcp).await {
                        Ok(tls) => tls,
                        Err(_) => {
                            st.tls_failures.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                    };
                    let service = hyper::service::service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(handle(st, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Stub { addr, state }
    }

    pub fn url(&self) -> String {
        format!("https://{}/dicom-web/studies", self.addr)
    }

    /// Registers the exact bytes of an instance, so that the stub can recognise its part.
    pub fn knows(&self, raw: &[u8], uid: &str) {
        self.state
            .known
            .lock()
            .unwrap()
            .insert(raw.to_vec(), uid.to_string());
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    pub fn tls_failures(&self) -> usize {
        self.state.tls_failures.load(Ordering::SeqCst)
    }

    /// From now on, answers wait until `n` requests wait for theirs at once; then the gate stays
    /// open. A request waits at most 10 s, so that an uplink sending one request at a time is
    /// answered and the test fails on its assertions instead of hanging.
    pub fn hold_answers_until_concurrent(&self, n: usize) {
        self.state.gate.store(n, Ordering::SeqCst);
    }

    /// The most requests that were waiting for their answers at the same time.
    pub fn max_concurrent(&self) -> usize {
        self.state.max_pending.load(Ordering::SeqCst)
    }

    /// SOP Instance UIDs that were in two requests waiting for their answers at the same time.
    pub fn overlapping_uids(&self) -> Vec<String> {
        self.state.overlapping_uids.lock().unwrap().clone()
    }
}

async fn handle(
    st: Arc<StubState>,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<Full<Bytes>> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let content_type = header("content-type").unwrap_or_default();
    let mut seen = Seen {
        authorization: header("authorization"),
        accept: header("accept").unwrap_or_default(),
        content_type: content_type.clone(),
        uids: Vec::new(),
        unknown_parts: 0,
        part_content_types: Vec::new(),
        malformed: None,
    };
    let boundary = content_type
        .split(';')
        .map(str::trim)
        .find_map(|p| p.strip_prefix("boundary="))
        .map(|b| b.trim_matches('"').to_string())
        .unwrap_or_default();
    let rate = st.read_rate;
    let body =
        http_body_util::BodyStream::new(req.into_body()).filter_map(move |frame| async move {
            match frame {
                Ok(frame) => {
                    let data = frame.into_data().ok()?;
                    if let Some(rate) = rate {
                        // A slow link: this many bytes take this long.
                        tokio::time::sleep(Duration::from_micros(
                            data.len() as u64 * 1_000_000 / rate,
                        ))
                        .await;
                    }
                    Some(Ok::<Bytes, hyper::Error>(data))
                }
                Err(e) => Some(Err(e)),
            }
        });
    let mut multipart = multer::Multipart::new(body, boundary);
    loop {
        match multipart.next_field().await {
            Ok(Some(field)) => {
                seen.part_content_types.push(
                    field
                        .content_type()
                        .map(|m| m.to_string())
                        .unwrap_or_default(),
                );
                match field.bytes().await {
                    Ok(bytes) => match st.known.lock().unwrap().get(bytes.as_ref()) {
                        Some(uid) => seen.uids.push(uid.clone()),
                        None => seen.unknown_parts += 1,
                    },
                    Err(e) => {
                        seen.malformed = Some(e.to_string());
                        break;
                    }
                }
            }
            Ok(None) => break,
            Err(e) => {
                seen.malformed = Some(e.to_string());
                break;
            }
        }
    }
    {
        let mut pending = st.pending_uids.lock().unwrap();
        for uid in &seen.uids {
            if pending.contains(uid) {
                st.overlapping_uids.lock().unwrap().push(uid.clone());
            }
        }
        pending.extend(seen.uids.iter().cloned());
    }
    st.pending.send_modify(|n| {
        *n += 1;
        st.max_pending.fetch_max(*n, Ordering::SeqCst);
    });
    let want = st.gate.load(Ordering::SeqCst);
    if want > 0 {
        let mut pending = st.pending.subscribe();
        // Once one request saw enough company, the gate is open for the others too.
        let open = |n: &usize| *n >= want || st.gate.load(Ordering::SeqCst) == 0;
        let _ = tokio::time::timeout(Duration::from_secs(10), pending.wait_for(open)).await;
        st.gate.store(0, Ordering::SeqCst);
    }
    let reply = if seen.malformed.is_some() {
        Reply::status(400)
    } else {
        (st.handler)(&seen)
    };
    let uids = seen.uids.clone();
    st.seen.lock().unwrap().push(seen);
    if reply.hang {
        std::future::pending::<()>().await;
    }
    {
        let mut pending = st.pending_uids.lock().unwrap();
        for uid in &uids {
            if let Some(at) = pending.iter().position(|u| u == uid) {
                pending.remove(at);
            }
        }
    }
    st.pending.send_modify(|n| *n -= 1);
    let mut response = hyper::Response::builder().status(reply.status);
    for (name, value) in &reply.headers {
        response = response.header(name, value);
    }
    response.body(Full::new(Bytes::from(reply.body))).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Spool and uplink

pub const STUDY: &str = "1.2.826.0.1.3680043.10.1137.1";

pub fn spool_in(dir: &Path) -> Spool {
    let cfg = SpoolConfig {
        dir: dir.join("spool"),
        min_free_mb: 0,
        retention_hours: 24,
        evict_headroom_mb: 0,
        zstd_level: 1,
    };
    Spool::open(&cfg).unwrap().0
}

/// Stores a fake instance (distinct bytes per UID) and returns its raw Part-10 bytes.
pub fn store(spool: &Spool, study: &str, uid: &str, dataset_len: usize) -> Vec<u8> {
    let mut header = vec![0u8; 128];
    header.extend_from_slice(b"DICM");
    header.extend_from_slice(uid.as_bytes());
    let seed = uid
        .bytes()
        .fold(7u32, |a, b| a.wrapping_mul(31).wrapping_add(u32::from(b)));
    let dataset: Vec<u8> = (0..dataset_len)
        .map(|i| {
            let x = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed);
            (x >> 13) as u8
        })
        .collect();
    let meta = IncomingMeta {
        sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
        sop_instance_uid: uid.into(),
        transfer_syntax_uid: "1.2.840.10008.1.2.1".into(),
        calling_ae: "CT1".into(),
        peer: "127.0.0.1:40000".into(),
    };
    let mut incoming = spool.begin(meta, &header).unwrap();
    for chunk in dataset.chunks(64 * 1024) {
        incoming.write_all(chunk).unwrap();
    }
    let written = incoming.finish().unwrap();
    let index = InstanceIndex {
        study_instance_uid: study.into(),
        series_instance_uid: format!("{study}.1"),
        patient_id: "P1".into(),
        modality: "CT".into(),
        accession_number: "A1".into(),
    };
    match written.commit(index).unwrap() {
        StoreOutcome::Stored { .. } | StoreOutcome::NewVersion { .. } => {}
        other => panic!("expected a new instance or a new version, got {other:?}"),
    }
    [header, dataset].concat()
}

/// Stores `n` instances `STUDY.1..=n` of `len` bytes each and registers them with the stub.
pub fn store_study(spool: &Spool, stub: &Stub, n: usize, len: usize) -> Vec<String> {
    (1..=n)
        .map(|i| {
            let uid = format!("{STUDY}.{i}");
            let raw = store(spool, STUDY, &uid, len);
            stub.knows(&raw, &uid);
            uid
        })
        .collect()
}

pub fn uplink_config(stub_url: &str, ca: &Ca) -> UplinkConfig {
    UplinkConfig {
        stow_url: stub_url.into(),
        ca_file: ca.pem_path.clone(),
        username: "passerelle".into(),
        password: "secret".into(),
        batch_max_instances: 10,
        batch_max_mb: 64,
        connect_timeout_secs: 5,
        idle_timeout_secs: 10,
        retry_base_secs: 30,
        retry_max_secs: 600,
        auth_pause_secs: 600,
        ..UplinkConfig::default()
    }
}

pub struct Running {
    pub wake: Arc<Notify>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<passerelle_uplink::Result<()>>,
}

pub fn start(cfg: UplinkConfig, spool: &Spool) -> Running {
    let _ = env_logger::builder().is_test(true).try_init();
    let uplink = passerelle_uplink::Uplink::new(cfg, spool.clone()).unwrap();
    let wake = Arc::new(Notify::new());
    let (shutdown, rx) = watch::channel(false);
    let task = tokio::spawn(uplink.run(wake.clone(), rx));
    Running {
        wake,
        shutdown,
        task,
    }
}

impl Running {
    /// Asks for shutdown and waits (bounded) for `run` to return Ok.
    pub async fn stop(self) -> Duration {
        let asked = Instant::now();
        self.shutdown.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("the uplink stops within 20 s of shutdown")
            .unwrap()
            .unwrap();
        asked.elapsed()
    }
}

/// Polls `cond` until it holds, failing the test after `within`.
pub async fn wait_for(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until the uplink has paused and holds no row `uploading` (the paused request's rows were
/// released).
pub async fn wait_paused(spool: &Spool) {
    wait_for("the uplink to pause", WAIT, || {
        spool.uplink_state().unwrap().paused_until.is_some() && status(spool).uploading == 0
    })
    .await;
}

pub fn status(spool: &Spool) -> passerelle_spool::StatusReport {
    spool.status(SystemTime::now()).unwrap()
}

/// After the uplink stopped: claims every queued row (due or not) to look at its attempts.
pub fn queued_rows(spool: &Spool) -> Vec<QueuedInstance> {
    let far = SystemTime::now() + Duration::from_secs(10 * 365 * 24 * 3600);
    let mut all = Vec::new();
    loop {
        let batch = spool.claim_batch(1000, u64::MAX, far).unwrap();
        if batch.is_empty() {
            return all;
        }
        all.extend(batch);
    }
}

/// How long a test waits for something the uplink should do.
pub const WAIT: Duration = Duration::from_secs(20);

/// A test's temporary directory and the CA its PACS stub and spool use; each test file adds the
/// helpers it needs in its own `impl Env`.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub ca: Ca,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new(dir.path(), "pacs");
        Env { dir, ca }
    }
}
