//! The uplink: forwards spooled instances to the regional PACS with DICOMweb STOW-RS over verified
//! HTTPS, and records in the spool what the PACS confirmed.
//!
//! It must never mark an instance sent unless the PACS's response, parsed, lists its SOP Instance
//! UID in ReferencedSOPSequence (0008,1199); never send bytes the spool did not verify; never hold a
//! whole instance in memory; never send anything over a connection whose certificate was not
//! verified against `uplink.ca_file`; and never retry in a tight loop.
//!
//! # Background
//! STOW-RS (PS3.18 §10.5) is an HTTP POST of a `multipart/related; type="application/dicom"` body,
//! one part per Part-10 instance. The PACS answers with a dataset (`application/dicom+json`, or
//! `+xml`) whose ReferencedSOPSequence lists what it stored and FailedSOPSequence what it did not,
//! each with a FailureReason (0008,1197). Hospitals' PACS sit behind TLS front ends (nginx,
//! stunnel), often reached through an HTTP CONNECT proxy, and links can be slow: a study of
//! several GB over a few Mbit/s takes hours.
//!
//! # Design
//! - [`Uplink::run`] starts `uplink.connections` workers. Each loops: claim a batch (instances of
//!   one study, bounded in count and bytes) from the spool, POST it, record each instance's outcome
//!   (sent, retry with a persisted next attempt time, failed, or released) in one transaction
//!   (`Spool::record_outcomes`: one WAL sync per request, not one per instance). With nothing due
//!   it waits for a wake-up from ingest, the next due time, a 2-second poll or shutdown.
//! - While a study is still arriving, a short batch waits for more of it (`LINGER`, as a Kafka
//!   producer's `linger.ms`): nothing is claimed while the batch is short of
//!   `uplink.batch_max_instances`/`batch_max_mb`, none of its instances is a retry, its newest
//!   instance arrived less than 150 ms ago and its oldest less than 1 s ago. Without it, every
//!   arriving instance woke an idle worker and went out alone, so a burst began as one-instance
//!   requests on every connection (measured on the benchmark's emulated WAN: four requests of one
//!   or two instances in the first second, while the link could have carried 25 MB). The default
//!   batch is 10 instances: the requests of a large study then fall out of step, one waiting for
//!   the PACS to store its batch while the others send, and the last request alone is short.
//!   Once fewer instances are due than one full batch per worker and the study is quiet, a batch
//!   takes its even share of them (`Linger::workers`, at least 1 MiB), so the workers finish
//!   together.
//! - Several workers keep the link busy while the PACS stores a batch: one streams its body while
//!   another waits for its answer, and a worker that claimed a batch wakes an idle one to claim the
//!   next. Measured on the benchmark's CT study (tests/bench, then with 50-instance batches of 26 MB into
//!   Orthanc): one connection spent 130-190 ms streaming a batch, 250-670 ms waiting for Orthanc to
//!   store it, and then 90-275 ms recording the outcomes row by row (a WAL sync each), before it
//!   claimed the next. The workers share one health (`Health`): a pause or a hold stops every
//!   one of them, and until the upstream has delivered a request (since start, a pause or a
//!   failure) only the first worker sends, so a wrong password or a PACS that is down sees one
//!   request at a time, never one per connection. A claimed row is `uploading`, so no other worker
//!   claims it; and a worker leaves out (releases) a version of a SOP Instance UID that another
//!   request carries, so that no UID is in two requests at once.
//! - A request the upstream as a whole does not take (no answer, 5xx, 429, or an answer that
//!   confirms none of its instances and refuses none for good, such as Orthanc's 200 listing
//!   nothing when its disk is full) holds *every* upload for
//!   a backoff that grows with the failures in a row, so instances arriving during an outage wait
//!   with the rest instead of each triggering a request. The first delivery after such a failure
//!   (or after start) makes every waiting retry due at once (`Spool::expedite_retries`), so the
//!   backlog goes out in full batches instead of trickling out over the backoff cap.
//! - The body is streamed (module `body`): a blocking producer opens one instance at a time with
//!   `Spool::open_verified` (an instance the spool quarantines or finds missing leaves the batch),
//!   reads it in 256 KiB chunks and feeds them in 16 KiB pieces through a bounded channel into
//!   `reqwest::Body::wrap_stream`. A body that cannot be completed (read error, short file,
//!   cancellation) ends with a stream error, so the connection is aborted and the PACS never sees
//!   a truncated request as complete. The multipart framing is written here, about twenty lines: no
//!   maintained crate streams `multipart/related` with a part body that is itself a stream
//!   (reqwest's and common-multipart-rfc7578's writers are `multipart/form-data` only, and
//!   multipart-stream and mime_multipart hold each part's body in memory).
//! - Timeouts: a connect timeout and an *idle* watchdog, never a whole-request timeout, so a slow
//!   but moving upload completes. Progress is a 16 KiB piece of the body taken by the HTTP client
//!   or a response byte received; nothing for `uplink.idle_timeout_secs` aborts the request. Once
//!   the whole body was taken, its tail may still sit in buffers (hyper, rustls, the kernel) while
//!   the link drains it, so the watchdog then also allows that tail's time at 1 KiB/s (at most
//!   1 MiB of it, about 17 minutes), which also gives the PACS time to store a large batch.
//!   TCP_USER_TIMEOUT makes the kernel drop a link that stops acknowledging data meanwhile; it
//!   is the idle timeout plus the time a 64 KiB segment takes at 1 KiB/s, because Linux counts a
//!   peer that reads slowly through a window smaller than the segment at the head of the send
//!   queue as not acknowledging (zero-window probing): with the idle timeout alone, a slow but
//!   moving upload was dropped (found by the trickle case of tests/system/test_upstream_faults.py).
//!   reqwest's own `read_timeout` is not used: in reqwest 0.12 it runs from sending the request to
//!   the response headers without being reset by upload progress, so it would cap the upload time.
//! - TLS (module `tls`): rustls with the ring provider, TLS 1.2 and 1.3 only, the certificates of
//!   `uplink.ca_file` as the only trust anchors, host name verification, optional client
//!   certificate. Proxy environment variables are ignored; `uplink.proxy` is the only proxy.
//!   Redirects are not followed (a study is never re-posted elsewhere).
//! - Outcomes (module `outcome`, pure and unit-tested): the response or transport failure is
//!   classified in one exhaustive match, then per instance: referenced → sent; failed → by
//!   FailureReason (A7xx, 0110, 0212 retried; 0111 retried, failed from the third attempt; others failed for good); absent → retried
//!   after a 2xx, failed for good after a 400 (with the PACS's message) or a 409. A 400 that is
//!   not a STOW-RS response (no ReferencedSOPSequence or FailedSOPSequence) rejects the request as
//!   a whole: the batch is split to isolate what the PACS refuses; a single instance is failed if
//!   the PACS has stored instances since start, otherwise the uplink pauses naming
//!   `uplink.stow_url` (Orthanc's REST `/instances` answers so), instead of failing the backlog.
//!   A 2xx that is not a STOW-RS response from a PACS that has stored nothing since start pauses
//!   the same way (an HTTPS service that is not the PACS's STOW-RS endpoint).
//!   413 splits the batch; 401/403/406/407/411/415, wrong endpoints and certificate failures pause the
//!   uplink for `uplink.auth_pause_secs` with an ERROR that says what to fix (a PACS certificate
//!   that is expired or not yet valid names both possible causes, its renewal or the box's clock,
//!   and gives the clock's reading, instead of pointing at `uplink.ca_file`; a CA certificate
//!   presented as the server certificate, the default of `openssl req -x509`, which rustls never
//!   accepts as one, says how to make a self-signed certificate that works); 5xx, 408, 429 and
//!   network errors back off exponentially with ±20% jitter, honouring Retry-After. A network error
//!   from a PACS that asked for a client certificate while none is configured, and that has answered
//!   no request since start, is its refusal: with TLS 1.3 that refusal comes after the request
//!   started, often as a connection closed under the body instead of its alert (`tls::ClientAuth`).
//!   With a certificate configured, a PACS refusing it that way is still retried as a network error
//!   (a reset before the first answer is also what a flaky link gives) until an answer is read. A
//!   TLS front end that takes the handshake whatever the certificate and answers HTTP 400 about it
//!   (nginx with `ssl_verify_client on`: "The SSL certificate error" for an expired or untrusted
//!   certificate, "No required SSL certificate was sent") pauses the uplink like a refused
//!   certificate: that 400 is about the box, not the instances, and failing them would leave the
//!   whole backlog to `requeue`.
//! - The box's own client certificate is watched: from [`CLIENT_CERT_WARNING`] (30 days) before it
//!   expires, a WARN at start and daily says when and what to do; once expired, an ERROR. `status`
//!   reads the file itself ([`client_cert_not_after`]), so it shows the date with the daemon down.
//! - A modality's corrected instance (same SOP Instance UID, other content) is a new version in the
//!   spool and is sent like any instance. STOW-RS answers alike whether the PACS stored it or kept
//!   its first copy (Orthanc keeps it unless `OverwriteInstances` is on), so a confirmation of a UID
//!   already confirmed under other content is logged as a WARN naming the instance, for the
//!   operator to check on the PACS (`Spool::confirmed_under_other_content`).
//! - The uplink's health (`UplinkState`: pause, last error, last success) is persisted in the
//!   spool for `passerelled status`.
//! - Shutdown during a request gives it 3 seconds to finish; otherwise it is aborted and its rows
//!   are released (no attempt counted).
//!
//! # Limitations
//! - HTTP/1.1 by default: one request per connection, `uplink.connections` of them. The body goes out with chunked transfer encoding (its
//!   length is not known before every instance was opened and verified); a front end that refuses
//!   chunked request bodies needs request buffering (nginx does this by default).
//! - HTTP/2 only when `uplink.http2` is set (offered by ALPN; a PACS that does not pick it gets
//!   HTTP/1.1): the workers' requests are then streams of one connection (hyper's client, through
//!   reqwest's `http2` feature), so the link never idles while one request waits for the PACS's
//!   answer, which on a 40 ms link with 0.1% loss is what kept four HTTP/1.1 connections under 90% of
//!   it (tests/PERFORMANCE.md). It is off by default because the PACS front end sets each stream's
//!   flow-control window: below the link's bandwidth × round trip (nginx's defaults are 64 KiB) a
//!   stream sends one window per round trip, and the upload runs at half the link or less. A failed
//!   connection fails every request on it at once; each is retried as a network error. A request
//!   the front end did not process (its GOAWAY came before the request's stream, or it refused the
//!   stream: nginx ends a connection so every `keepalive_requests`, 1,000 by default) had no effect
//!   (RFC 9113 §6.8, §8.7): its rows are released and it goes out again at once on a new connection,
//!   with neither an attempt nor an outage counted, up to 8 in a row (`MAX_UNPROCESSED_IN_ROW`).
//! - A PACS that takes the whole body and then never answers holds the uplink for the idle
//!   timeout plus the drain allowance (up to about 17 minutes for large batches) before the batch
//!   is retried. Likewise, a PACS that stops reading once the whole body fits in the kernel's send
//!   buffer (several MB on a fast link) is only caught by TCP_USER_TIMEOUT, after the idle timeout
//!   plus 64 s. Watching the socket's send queue drain (SIOCOUTQ) would catch that sooner, but
//!   reqwest does not expose the socket.
//! - A pause persisted by a previous run is cleared at start-up: restarting passerelled is how the
//!   operator applies a fixed configuration.
//! - If the spool cannot record an outcome, the outcome is kept in memory and recorded again every
//!   few seconds; a restart re-queues such rows (`uploading` → `queued`), which at worst sends an
//!   instance twice (STOW-RS stores are idempotent per SOP Instance UID).
//! - Two versions of one SOP Instance UID are never sent in the same request: the later one waits
//!   for the next batch, so that the response cannot be ambiguous.

mod body;
mod error;
mod outcome;
pub mod response;
mod tls;

pub use error::{Result, UplinkError};
pub use tls::{client_cert_not_after, client_cert_notice, CertNotice, CLIENT_CERT_WARNING};

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use log::{error, info, warn};
use passerelle_config::{redact_url, UplinkConfig};
use passerelle_spool::{Claim, InstanceId, Linger, Outcome, QueuedInstance, Spool, UplinkState};
use rand::Rng;
use reqwest::header::{ACCEPT, CONTENT_TYPE, LOCATION, RETRY_AFTER};
use tokio::sync::{mpsc, watch, Notify};

use crate::body::{BodyStream, ProducerReport, Shared};
use crate::outcome::{Action, Answer, Decision, Exchange, TransportFailure};

/// A short batch of a study that is still arriving waits until no instance of it arrived for
/// `quiet`, or until its oldest instance arrived `max_wait` ago: on a slow link, a burst then goes
/// out in full requests instead of one small request per instance on every connection.
/// The end of a backlog is then split evenly among the workers that send (`Linger::workers`).
const LINGER: Linger = Linger {
    quiet: Duration::from_millis(150),
    max_wait: Duration::from_secs(1),
    workers: 1,
};
/// With nothing due, look at the queue at least this often (another process may re-queue rows).
const POLL_INTERVAL: Duration = Duration::from_secs(2);
/// How long an upload in flight may still take once shutdown was asked for.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// Wait after the spool failed to answer, before trying again.
const SPOOL_ERROR_WAIT: Duration = Duration::from_secs(5);
/// The largest segment the kernel may queue whole (a GSO segment): a slow reader with a smaller
/// window drains it only through zero-window probes.
const MAX_SEGMENT_BYTES: u64 = 64 * 1024;

/// TCP_USER_TIMEOUT for uploads: the idle timeout plus the time one maximal segment needs at the
/// slowest rate we support. While a segment trickles out through a small window, Linux counts
/// that time as "unacknowledged" even though the peer answers every probe; with the idle timeout
/// alone the kernel dropped slow but moving uploads (ETIMEDOUT after `idle_timeout_secs`).
fn tcp_user_timeout(idle: Duration) -> Duration {
    idle.saturating_add(Duration::from_secs(
        MAX_SEGMENT_BYTES / body::DRAIN_MIN_RATE,
    ))
}

enum Auth {
    None,
    Basic { username: String, password: String },
    Bearer(String),
}

/// The STOW-RS uplink. Build it with [`Uplink::new`], run it with [`Uplink::run`].
pub struct Uplink {
    link: Link,
}

/// What every upload worker shares: the settings, the HTTPS client and the uplink's health.
struct Link {
    cfg: UplinkConfig,
    spool: Spool,
    client: reqwest::Client,
    url: reqwest::Url,
    auth: Auth,
    health: Mutex<Health>,
    /// Bumped whenever a waiting worker may be able to go on: a request finished, the upstream
    /// took a request, a pause ended.
    changed: watch::Sender<u64>,
    /// The uplink state is saved by one worker at a time, each time with the newest state.
    saving: tokio::sync::Mutex<()>,
    /// The TLS client-certificate resolver: whether the PACS asked for a certificate.
    client_auth: Arc<tls::ClientAuth>,
    /// The PACS has answered a request (any status) since start.
    answered: AtomicBool,
    /// The PACS has confirmed an instance since start.
    stored: AtomicBool,
    /// Requests in a row the PACS's HTTP/2 front end did not process (GOAWAY, REFUSED_STREAM);
    /// reset by any answer. Past [`MAX_UNPROCESSED_IN_ROW`] they count as an outage.
    unprocessed_in_row: AtomicU32,
}

/// Requests in a row the PACS may leave unprocessed (HTTP/2 GOAWAY, REFUSED_STREAM) before the next
/// is held back like any network failure: a front end renewing its connections refuses a few
/// streams each time; one that refuses every request must not be met with a tight loop.
const MAX_UNPROCESSED_IN_ROW: u32 = 8;

/// How the upstream is doing, as every worker sees it. Locked briefly, never across an await.
struct Health {
    /// Pause, last error, last success: persisted in the spool for `passerelled status`.
    state: UplinkState,
    /// Requests in a row that the upstream as a whole did not take (no answer, 5xx, 429).
    upstream_failures: u32,
    /// While the upstream is down, no request at all goes out before this instant: instances
    /// arriving during an outage wait with the rest instead of each triggering a request.
    hold_until: Option<Instant>,
    /// When the last of those failures was counted. A request that was already in flight then and
    /// fails too saw the same outage: it does not count again (nor lengthen the hold).
    failure_counted_at: Option<Instant>,
    /// Instances may be waiting on a retry schedule that a working upstream makes moot: at start
    /// (schedules left by the previous run) and after any request the upstream did not take.
    retries_may_wait: bool,
    /// The upstream delivered a request since start, the last pause or the last failure. Until it
    /// did, only the first worker sends: a wrong password, a wrong certificate or a PACS that is
    /// down sees one request, not one per connection.
    proven: bool,
}

/// One upload loop; `uplink.connections` of them run side by side.
struct Worker {
    link: Arc<Link>,
    /// Worker 0 is the one that sends while the upstream is not proven.
    index: usize,
    /// Outcomes the spool failed to record; recorded again before the next batch.
    stranded: Vec<Mark>,
    /// The backoff jitter of the current request, drawn once per request so that the instances
    /// of a batch become due together and are sent together again.
    jitter: f64,
}

/// How one request went.
enum Sent {
    /// No instance of the batch could be read: nothing was sent.
    Nothing,
    /// Shutdown interrupted the request: nothing is known. If the whole body had gone out, the PACS
    /// may have stored the instances, so the attempt counts (a re-delivery is then counted as a
    /// duplicate); otherwise the rows are released.
    Aborted {
        body_complete: bool,
    },
    Done(Exchange),
}

impl Uplink {
    /// Builds the HTTPS client; fails with a clear error on a bad CA file / client cert / proxy.
    pub fn new(cfg: UplinkConfig, spool: Spool) -> Result<Uplink> {
        let url = reqwest::Url::parse(&cfg.stow_url).map_err(|e| UplinkError::ParseStowUrl {
            url: cfg.stow_url.clone(),
            detail: e.to_string(),
        })?;
        if url.scheme() != "https" {
            return Err(UplinkError::ParseStowUrl {
                url: cfg.stow_url.clone(),
                detail: "studies may only leave the box over TLS: use an https:// URL".into(),
            });
        }
        let (tls, client_auth) = tls::client_config(&cfg)?;
        let mut builder = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .https_only(true)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(cfg.connect_timeout())
            .pool_idle_timeout(Duration::from_secs(20))
            .tcp_keepalive(Duration::from_secs(30))
            // The kernel drops the connection when sent data stays unacknowledged this long:
            // this catches a dead link while the tail of the body sits in the send buffer.
            .tcp_user_timeout(tcp_user_timeout(cfg.idle_timeout()))
            .user_agent(concat!("passerelle/", env!("CARGO_PKG_VERSION")));
        if !cfg.proxy.is_empty() {
            let proxy =
                reqwest::Proxy::all(&cfg.proxy).map_err(|source| UplinkError::ConfigureProxy {
                    proxy: redact_url(&cfg.proxy),
                    source,
                })?;
            builder = builder.proxy(proxy);
        }
        let client = builder
            .build()
            .map_err(|source| UplinkError::BuildHttpClient { source })?;
        let auth = if !cfg.bearer_token.is_empty() {
            Auth::Bearer(cfg.bearer_token.clone())
        } else if !cfg.username.is_empty() {
            Auth::Basic {
                username: cfg.username.clone(),
                password: cfg.password.clone(),
            }
        } else {
            Auth::None
        };
        let (changed, _) = watch::channel(0);
        Ok(Uplink {
            link: Link {
                cfg,
                spool,
                client,
                url,
                auth,
                health: Mutex::new(Health {
                    state: UplinkState::default(),
                    upstream_failures: 0,
                    hold_until: None,
                    failure_counted_at: None,
                    retries_may_wait: true,
                    proven: false,
                }),
                changed,
                saving: tokio::sync::Mutex::new(()),
                client_auth,
                answered: AtomicBool::new(false),
                stored: AtomicBool::new(false),
                unprocessed_in_row: AtomicU32::new(0),
            },
        })
    }

    /// Runs until `*shutdown` becomes true: `uplink.connections` workers claim batches, post them
    /// and record outcomes, side by side.
    ///
    /// Upload failures are outcomes recorded in the spool, and spool errors are logged and retried:
    /// this returns only at shutdown, once every worker has finished its request.
    pub async fn run(self, wake: Arc<Notify>, shutdown: watch::Receiver<bool>) -> Result<()> {
        let link = Arc::new(self.link);
        match link
            .spool_call("read the uplink state", |s| s.uplink_state())
            .await
        {
            Ok(state) => link.health().state = state,
            Err(e) => error!(
                "Cannot read the persisted uplink state; starting from a clean state. error=\"{}\"",
                error_chain(&e)
            ),
        }
        let left_paused = link.health().state.paused_until.take();
        if let Some(until) = left_paused {
            info!(
                "Cleared the uplink pause left by the previous run: a restart applies the current configuration. paused_until=\"{}\"",
                httpdate::fmt_http_date(until)
            );
            link.save_state().await;
        }
        let connections = link.cfg.connections.max(1);
        info!(
            "Uplink started. stow_url={} proxy={} ca_file={} client_cert={} batch_max_instances={} batch_max_mb={} idle_timeout_secs={} connections={connections} http2={}",
            link.cfg.stow_url,
            if link.cfg.proxy.is_empty() { "none".to_string() } else { redact_url(&link.cfg.proxy) },
            link.cfg.ca_file.display(),
            if link.cfg.client_cert.as_os_str().is_empty() { "none".into() } else { link.cfg.client_cert.display().to_string() },
            link.cfg.batch_max_instances,
            link.cfg.batch_max_mb,
            link.cfg.idle_timeout_secs,
            if link.cfg.http2 { "offered" } else { "off" },
        );

        let mut workers = tokio::task::JoinSet::new();
        if let Some(not_after) = link.client_auth.not_after() {
            workers.spawn(watch_client_cert(
                link.cfg.client_cert.display().to_string(),
                not_after,
                shutdown.clone(),
            ));
        }
        for index in 0..connections {
            let worker = Worker {
                link: link.clone(),
                index,
                stranded: Vec::new(),
                jitter: 0.0,
            };
            workers.spawn(worker.run(wake.clone(), shutdown.clone()));
        }
        while let Some(done) = workers.join_next().await {
            if let Err(e) = done {
                error!(
                    "An upload worker stopped unexpectedly; the others go on. Restart passerelled to re-queue the instances it held. error=\"{e}\""
                );
            }
        }
        info!("Uplink stopped.");
        Ok(())
    }
}

/// Says, at start and then daily until shutdown, that the box's client certificate has expired or
/// expires soon (see [`CLIENT_CERT_WARNING`]).
async fn watch_client_cert(path: String, not_after: SystemTime, shutdown: watch::Receiver<bool>) {
    watch_client_cert_with(path, not_after, shutdown, SystemTime::now, |level, line| {
        log::log!(level, "{line}")
    })
    .await
}

/// [`watch_client_cert`] with its clock and its log as parameters: the wall clock (`now`) dates
/// the certificate, tokio's clock paces the daily repetition.
async fn watch_client_cert_with(
    path: String,
    not_after: SystemTime,
    mut shutdown: watch::Receiver<bool>,
    now: impl Fn() -> SystemTime,
    mut say: impl FnMut(log::Level, String),
) {
    let date = httpdate::fmt_http_date(not_after);
    loop {
        match tls::client_cert_notice(not_after, now()) {
            Some(tls::CertNotice::Expired) => say(log::Level::Error, format!(
                "The box's TLS client certificate has expired: the PACS refuses every upload until it is replaced. Install a renewed certificate and its key at uplink.client_cert and uplink.client_key, then restart passerelled. client_cert={path} not_after=\"{date}\""
            )),
            Some(tls::CertNotice::ExpiresIn { days }) => say(log::Level::Warn, format!(
                "The box's TLS client certificate expires in {}: from then on the PACS will refuse every upload. Ask the network's certificate authority for a renewed one, install it and its key at uplink.client_cert and uplink.client_key, then restart passerelled. client_cert={path} not_after=\"{date}\"",
                if days == 0 { "less than a day".to_string() } else { format!("{days} day(s)") }
            )),
            None => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(86_400)) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

impl Link {
    /// The shared health (a worker that panicked while holding it left nothing half-written that
    /// matters more than going on).
    fn health(&self) -> MutexGuard<'_, Health> {
        self.health
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Tells waiting workers to look again.
    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn paused(&self) -> bool {
        self.health().state.paused_until.is_some()
    }

    fn note_error(&self, error: &str, now: SystemTime) {
        let mut h = self.health();
        h.state.last_error = Some(error.to_string());
        h.state.last_error_at = Some(now);
    }

    async fn save_state(&self) {
        let _one_at_a_time = self.saving.lock().await;
        let state = self.health().state.clone();
        if let Err(e) = self
            .spool_call("save the uplink state", move |s| s.set_uplink_state(&state))
            .await
        {
            error!(
                "Cannot save the uplink state in the spool; `passerelled status` may show an old state. error=\"{}\"",
                error_chain(&e)
            );
        }
    }

    async fn spool_call<T, F>(&self, action: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Spool) -> passerelle_spool::Result<T> + Send + 'static,
    {
        let spool = self.spool.clone();
        tokio::task::spawn_blocking(move || f(&spool))
            .await
            .map_err(|source| UplinkError::JoinSpoolTask { action, source })?
            .map_err(|source| UplinkError::Spool { action, source })
    }

    /// Sends one request for `instances` and waits for its answer, the idle watchdog or shutdown.
    async fn exchange(
        &self,
        instances: &[QueuedInstance],
        shutdown: &mut watch::Receiver<bool>,
    ) -> (Sent, ProducerReport) {
        let shared = Shared::new();
        let spool = self.spool.clone();
        let pending: VecDeque<QueuedInstance> = instances.iter().cloned().collect();
        let opener = {
            let shared = shared.clone();
            tokio::task::spawn_blocking(move || {
                let mut pending = pending;
                let mut report = ProducerReport::default();
                let first = body::open_next(&spool, &mut pending, &mut report, &shared.progress);
                (first, pending, report)
            })
        };
        let (first, pending, mut report) = match opener.await {
            Ok(opened) => opened,
            Err(e) => {
                let failure = TransportFailure::LocalRead(outcome::LocalFailure {
                    instance: None,
                    detail: format!("opening the spool files failed ({e})"),
                });
                return (
                    Sent::Done(Exchange::Failed(failure)),
                    ProducerReport::default(),
                );
            }
        };
        let Some(first) = first else {
            return (Sent::Nothing, report);
        };

        let boundary = body::new_boundary();
        let (tx, rx) = mpsc::channel(body::CHANNEL_CHUNKS);
        let producer = {
            let (spool, shared, boundary) = (self.spool.clone(), shared.clone(), boundary.clone());
            let rt = tokio::runtime::Handle::current();
            tokio::task::spawn_blocking(move || {
                body::produce(spool, first, pending, boundary, tx, shared, rt)
            })
        };
        let request = self
            .client
            .post(self.url.clone())
            .header(CONTENT_TYPE, body::content_type(&boundary))
            .header(ACCEPT, response::ACCEPT)
            .body(reqwest::Body::wrap_stream(BodyStream::new(
                rx,
                shared.clone(),
            )));
        let request = match &self.auth {
            Auth::None => request,
            Auth::Basic { username, password } => request.basic_auth(username, Some(password)),
            Auth::Bearer(token) => request.bearer_auth(token),
        };
        let progress = &shared.progress;
        let call = async move {
            let response = request.send().await?;
            progress.touch();
            read_answer(response, progress).await
        };
        tokio::pin!(call);
        let idle = self.cfg.idle_timeout();
        let result = tokio::select! {
            r = &mut call => Some(r.map_err(|e| outcome::classify_transport(&e))),
            _ = shared.progress.idle(idle) => Some(Err(TransportFailure::IdleTimeout(idle))),
            _ = shutdown_requested(shutdown) => None,
        };
        let result = match result {
            Some(r) => Some(r),
            None => {
                info!(
                    "Shutdown asked with an upload in flight; letting it finish for up to {} s.",
                    SHUTDOWN_GRACE.as_secs()
                );
                match tokio::time::timeout(SHUTDOWN_GRACE, &mut call).await {
                    Ok(r) => Some(r.map_err(|e| outcome::classify_transport(&e))),
                    Err(_) => None,
                }
            }
        };
        // Whatever happened, the body must not go on: a body not yet complete ends with an error,
        // which aborts the connection instead of finishing the message.
        shared.cancel.cancel();
        match producer.await {
            Ok(r) => {
                report.dropped.extend(r.dropped);
                report.unreadable.extend(r.unreadable);
            }
            Err(e) => {
                error!("The upload body producer failed; the batch will be retried. error=\"{e}\"")
            }
        }
        let sent = match result {
            None => Sent::Aborted {
                body_complete: shared.body_complete(),
            },
            Some(Ok(answer)) => {
                self.answered.store(true, Ordering::Relaxed);
                self.unprocessed_in_row.store(0, Ordering::Relaxed);
                Sent::Done(Exchange::Answered(answer))
            }
            Some(Err(failure)) => match shared.failure() {
                Some(local) => Sent::Done(Exchange::Failed(TransportFailure::LocalRead(local))),
                None => Sent::Done(Exchange::Failed(
                    outcome::refused_after_certificate_request(
                        failure,
                        outcome::CertificateRequest {
                            asked: self.client_auth.asked(),
                            have_one: self.client_auth.has_certificate(),
                            answered_before: self.answered.load(Ordering::Relaxed),
                        },
                    ),
                )),
            },
        };
        (sent, report)
    }
}

impl Worker {
    /// Claims batches, posts them and records their outcomes until shutdown.
    async fn run(mut self, wake: Arc<Notify>, mut shutdown: watch::Receiver<bool>) {
        let link = self.link.clone();
        let mut changed = link.changed.subscribe();
        while !stop_requested(&shutdown) {
            if !self.stranded.is_empty() {
                let marks = std::mem::take(&mut self.stranded);
                self.record(marks).await;
                if !self.stranded.is_empty() {
                    wait_or_shutdown(SPOOL_ERROR_WAIT, &mut shutdown).await;
                    continue;
                }
            }
            // Seen before looking at the health: a change made after this wakes the waits below.
            changed.borrow_and_update();
            let (paused_until, hold_until, proven) = {
                let h = link.health();
                (h.state.paused_until, h.hold_until, h.proven)
            };
            if let Some(until) = paused_until {
                let now = SystemTime::now();
                let longest = outcome::pause_length(link.cfg.auth_pause_secs);
                if let Some(left) = outcome::pause_left(until, now, longest) {
                    wait_or_shutdown(left, &mut shutdown).await;
                    continue;
                }
                if until > now {
                    warn!(
                        "The uplink pause had longer to run than uplink.auth_pause_secs ({} s): the system clock went back since it began, so it ends now. Check the system clock (NTP). paused_until=\"{}\"",
                        longest.as_secs(),
                        httpdate::fmt_http_date(until)
                    );
                }
                let over = {
                    let mut h = link.health();
                    let same = h.state.paused_until == Some(until);
                    if same {
                        h.state.paused_until = None;
                    }
                    same
                };
                if over {
                    link.save_state().await;
                    info!("The uplink pause is over; uploads resume.");
                    link.bump();
                }
                continue;
            }

            if let Some(until) = hold_until {
                let left = until.saturating_duration_since(Instant::now());
                if !left.is_zero() {
                    wait_or_shutdown(left, &mut shutdown).await;
                    continue;
                }
            }

            if self.index > 0 && !proven {
                // Until the upstream takes a request, the first worker alone sends.
                wait_for_change(&mut changed, POLL_INTERVAL, &mut shutdown).await;
                continue;
            }

            let now = SystemTime::now();
            // The configuration accepts at most MAX_BATCH_INSTANCES, whose answer fits the
            // response cap; a larger value that bypassed validation is cut to it.
            let max_count = link
                .cfg
                .batch_max_instances
                .min(passerelle_config::MAX_BATCH_INSTANCES);
            let max_bytes = link.cfg.batch_max_bytes();
            // Until the upstream took a request the first worker sends alone (above).
            let linger = Linger {
                workers: if proven { link.cfg.connections } else { 1 },
                ..LINGER
            };
            let batch = match link
                .spool_call("claim a batch", move |s| {
                    s.claim_batch_lingering(max_count, max_bytes, now, Some(linger))
                })
                .await
            {
                Ok(Claim::Batch(batch)) => batch,
                Ok(Claim::Wait(until)) => {
                    // A study is still arriving: let its batch fill up (or its quiet time pass).
                    let wait = until
                        .duration_since(SystemTime::now())
                        .unwrap_or(Duration::ZERO)
                        .min(LINGER.quiet);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown_requested(&mut shutdown) => {}
                    }
                    continue;
                }
                Err(e) => {
                    error!(
                        "Cannot claim instances to upload from the spool; trying again in {} s. Check the spool disk. error=\"{}\"",
                        SPOOL_ERROR_WAIT.as_secs(),
                        error_chain(&e)
                    );
                    wait_or_shutdown(SPOOL_ERROR_WAIT, &mut shutdown).await;
                    continue;
                }
            };
            if batch.is_empty() {
                let next_due = link
                    .spool_call("find the next due time", |s| s.next_due())
                    .await;
                let wait = match next_due {
                    Ok(Some(due)) => due
                        .duration_since(SystemTime::now())
                        .unwrap_or(Duration::ZERO)
                        .clamp(Duration::from_millis(100), POLL_INTERVAL),
                    Ok(None) | Err(_) => POLL_INTERVAL,
                };
                tokio::select! {
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown_requested(&mut shutdown) => {}
                }
                continue;
            }
            if proven && link.cfg.connections > 1 {
                // More may be due: an idle worker looks while this batch goes out.
                wake.notify_one();
            }

            // No two requests carry the same SOP Instance UID, and no batch carries two versions of
            // one: the spool claims the versions of a UID one at a time, oldest first.
            self.process(batch, &mut shutdown).await;
            link.bump();
        }
        if !self.stranded.is_empty() {
            let marks = std::mem::take(&mut self.stranded);
            self.record(marks).await;
        }
    }

    /// Uploads one claimed batch (in halves after a 413) and records every outcome.
    async fn process(&mut self, batch: Vec<QueuedInstance>, shutdown: &mut watch::Receiver<bool>) {
        let link = self.link.clone();
        let mut marks: Vec<Mark> = Vec::new();

        let mut work = vec![batch];
        while let Some(part) = work.pop() {
            if part.is_empty() {
                continue;
            }
            if stop_requested(shutdown) || link.paused() {
                marks.extend(released(part));
                continue;
            }
            let started = Instant::now();
            let (sent, report) = link.exchange(&part, shutdown).await;
            let elapsed = started.elapsed();
            let now = SystemTime::now();
            self.jitter = rand::thread_rng().gen_range(-0.2..=0.2);
            let (mut in_request, left_out): (Vec<_>, Vec<_>) =
                part.into_iter().partition(|i| !report.left_out(i.id));
            for inst in left_out {
                if let Some((_, why)) = report.unreadable.iter().find(|(id, _)| *id == inst.id) {
                    let error = format!("The spool file could not be read: {why}");
                    let at = outcome::time_after(now, self.retry_delay(inst.attempts, None));
                    link.note_error(&error, now);
                    marks.push((
                        inst.id,
                        inst.sop_instance_uid,
                        Outcome::Retry {
                            error,
                            next_attempt_at: at,
                            refused: false,
                        },
                    ));
                }
            }
            let mut exchange = match sent {
                Sent::Nothing => continue,
                Sent::Aborted { body_complete } => {
                    info!(
                        "Stopped an upload for shutdown; its instances stay queued. study_instance_uid={} instances={} body_complete={body_complete}",
                        study_of(&in_request),
                        in_request.len()
                    );
                    marks.extend(in_request.into_iter().map(|i| {
                        let mark = if body_complete {
                            Outcome::Retry {
                                error: "The upload was stopped by a shutdown after its body was sent; the PACS may hold these instances already.".into(),
                                next_attempt_at: now,
                                refused: false,
                            }
                        } else {
                            Outcome::Release
                        };
                        (i.id, i.sop_instance_uid, mark)
                    }));
                    continue;
                }
                Sent::Done(exchange) => exchange,
            };
            let stored_before = link.stored.load(Ordering::Relaxed);
            let mut decision = outcome::decide(&in_request, &exchange, stored_before);
            if let Decision::Resend { detail } = &decision {
                let in_row = link.unprocessed_in_row.fetch_add(1, Ordering::Relaxed) + 1;
                if in_row > MAX_UNPROCESSED_IN_ROW {
                    exchange = Exchange::Failed(TransportFailure::Network(format!(
                        "{detail} ({in_row} requests in a row were not processed by the PACS)"
                    )));
                    decision = outcome::decide(&in_request, &exchange, stored_before);
                }
            }
            match decision {
                Decision::Resend { detail } => {
                    info!(
                        "The PACS's front end closed its HTTP/2 connection or refused the request's stream before taking it; it had no effect and goes out again at once. study_instance_uid={} instances={} detail=\"{detail}\"",
                        study_of(&in_request),
                        in_request.len()
                    );
                    marks.extend(released(in_request));
                }
                Decision::LocalRead(failure) => {
                    let study = study_of(&in_request).to_string();
                    let (failing, others): (Vec<_>, Vec<_>) = in_request
                        .into_iter()
                        .partition(|i| Some(i.id) == failure.instance);
                    error!(
                        "Could not read the spool while sending to the PACS: {}. The PACS is not at fault and uploads go on: {} other instance(s) of the request go out again at once{}. Check the disk (dmesg, SMART); before its next upload the file is checked in full, and quarantined if its content is damaged. study_instance_uid={study}",
                        failure.detail,
                        others.len(),
                        if failing.is_empty() { "" } else { ", this one after its backoff" },
                    );
                    marks.extend(released(others));
                    if let Some(id) = failure.instance {
                        if let Err(e) = link
                            .spool_call("distrust a spool file's digest", move |s| {
                                s.distrust_stored_digest(id)
                            })
                            .await
                        {
                            warn!(
                                "Could not mark a spool file for a full check before its next upload; it is checked by its digest again. error=\"{}\"",
                                error_chain(&e)
                            );
                        }
                    }
                    let actions = failing
                        .iter()
                        .map(|i| {
                            (
                                i.id,
                                outcome::Action::Retry {
                                    error: format!(
                                        "The spool could not be read: {}.",
                                        failure.detail
                                    ),
                                    not_before: None,
                                    refused: false,
                                },
                            )
                        })
                        .collect();
                    self.apply(&failing, actions, None, elapsed, now, &mut marks);
                }
                Decision::Split { reason } => {
                    let second = in_request.split_off(in_request.len().div_ceil(2));
                    info!(
                        "The PACS {reason}; sending the batch again in two halves. study_instance_uid={} instances={} first_half={} second_half={}",
                        study_of(&in_request),
                        in_request.len() + second.len(),
                        in_request.len(),
                        second.len()
                    );
                    work.push(second);
                    work.push(in_request);
                }
                Decision::Pause { error } => {
                    let until =
                        outcome::time_after(now, outcome::pause_length(link.cfg.auth_pause_secs));
                    let already_paused = {
                        let mut h = link.health();
                        h.proven = false;
                        h.state.last_error = Some(error.clone());
                        h.state.last_error_at = Some(now);
                        match h.state.paused_until {
                            Some(at) if at > now => true,
                            _ => {
                                h.state.paused_until = Some(until);
                                false
                            }
                        }
                    };
                    if already_paused {
                        warn!(
                            "A request that was in flight when the uplink paused was refused too: {error} Its instances stay queued. study_instance_uid={} instances={}",
                            study_of(&in_request),
                            in_request.len()
                        );
                    } else {
                        error!(
                            "Paused the uplink: {error} Nothing is lost: the instances stay queued. paused_until=\"{}\" study_instance_uid={} instances={}",
                            httpdate::fmt_http_date(until),
                            study_of(&in_request),
                            in_request.len()
                        );
                    }
                    marks.extend(released(in_request));
                }
                Decision::PerInstance(actions) => {
                    // A request whose every instance is to be sent again (no answer, a 5xx or 429, a
                    // 2xx that stored nothing or only "out of resources") is the upstream as a whole
                    // not taking requests: one rule for all of them.
                    let whole_request_failed = !actions.is_empty()
                        && actions
                            .iter()
                            .all(|(_, a)| matches!(a, outcome::Action::Retry { .. }));
                    let (status, retry_after) = match &exchange {
                        Exchange::Answered(a) => (Some((a.status, a.http_version)), a.retry_after),
                        Exchange::Failed(_) => (None, None),
                    };
                    let delivered =
                        self.apply(&in_request, actions, status, elapsed, now, &mut marks);
                    if delivered > 0 {
                        link.stored.store(true, Ordering::Relaxed);
                        self.upstream_recovered().await;
                    } else if whole_request_failed {
                        self.upstream_failed(retry_after, started);
                        // The other halves of a split batch wait for the upstream with the rest.
                        for rest in work.drain(..) {
                            marks.extend(released(rest));
                        }
                    }
                }
            }
        }
        self.record(marks).await;
        link.save_state().await;
    }

    /// Turns per-instance actions into marks, with log lines.
    fn apply(
        &mut self,
        instances: &[QueuedInstance],
        actions: Vec<(InstanceId, Action)>,
        status: Option<(u16, &'static str)>,
        elapsed: Duration,
        now: SystemTime,
        marks: &mut Vec<Mark>,
    ) -> usize {
        let (mut delivered, mut bytes, mut redelivered) = (0usize, 0u64, 0usize);
        let mut retries: Vec<(String, usize, SystemTime)> = Vec::new();
        for (id, action) in actions {
            let Some(inst) = instances.iter().find(|i| i.id == id) else {
                continue;
            };
            let uid = inst.sop_instance_uid.clone();
            match action {
                Action::Sent {
                    redelivery,
                    warning_reason,
                } => {
                    delivered += 1;
                    bytes += inst.raw_size;
                    redelivered += usize::from(redelivery);
                    if let Some(code) = warning_reason {
                        warn!(
                            "The PACS stored an instance with a warning. sop_instance_uid={uid} warning_reason={code:#06X} meaning=\"{}\"",
                            outcome::describe_status(code)
                        );
                    }
                    marks.push((id, uid, Outcome::Sent { redelivery }));
                }
                Action::Retry {
                    error,
                    not_before,
                    refused,
                } => {
                    let at = outcome::time_after(now, self.retry_delay(inst.attempts, not_before));
                    match retries.iter_mut().find(|(e, _, _)| *e == error) {
                        Some((_, n, first_at)) => {
                            *n += 1;
                            *first_at = (*first_at).min(at);
                        }
                        None => retries.push((error.clone(), 1, at)),
                    }
                    self.link.note_error(&error, now);
                    marks.push((
                        id,
                        uid,
                        Outcome::Retry {
                            error,
                            next_attempt_at: at,
                            refused,
                        },
                    ));
                }
                Action::Failed { reason } => {
                    error!(
                        "The PACS refused an instance for good; it stays in the spool as failed. Fix the cause, then re-queue it with `passerelled requeue`. sop_instance_uid={uid} study_instance_uid={} reason=\"{reason}\"",
                        inst.study_instance_uid
                    );
                    self.link.note_error(&reason, now);
                    marks.push((id, uid, Outcome::Failed { reason }));
                }
            }
        }
        if delivered > 0 {
            info!(
                "Delivered batch. study_instance_uid={} instances={delivered} bytes={bytes} elapsed_ms={} redelivered={redelivered} http_status={} http_version={}",
                study_of(instances),
                elapsed.as_millis(),
                status.map_or_else(|| "none".into(), |(s, _)| s.to_string()),
                status.map_or("none", |(_, v)| v)
            );
            self.link.health().state.last_success_at = Some(now);
        }
        for (error, n, at) in retries {
            warn!(
                "Upload not confirmed; it will be retried. study_instance_uid={} instances={n} next_attempt_at=\"{}\" error=\"{error}\"",
                study_of(instances),
                httpdate::fmt_http_date(at)
            );
        }
        delivered
    }

    /// The upstream as a whole did not take a request: hold every request (not just this batch's,
    /// and every worker's) for a backoff that grows with the failures in a row, so an outage is not
    /// hammered by the instances that keep arriving. A request that was already in flight when
    /// another one's failure was counted saw the same outage and does not count again.
    fn upstream_failed(&mut self, retry_after: Option<Duration>, started: Instant) {
        let (failures, delay) = {
            let mut h = self.link.health();
            h.proven = false;
            h.retries_may_wait = true;
            if h.failure_counted_at.is_some_and(|at| started <= at) {
                return;
            }
            let delay = self.retry_delay(h.upstream_failures, retry_after);
            h.upstream_failures = h.upstream_failures.saturating_add(1);
            let now = Instant::now();
            h.failure_counted_at = Some(now);
            h.hold_until = Some(outcome::instant_after(now, delay));
            (h.upstream_failures, delay)
        };
        info!(
            "Holding all uploads until the PACS answers again. failures_in_a_row={failures} next_try_in_secs={}",
            delay.as_secs()
        );
    }

    /// The upstream took a request again: lift the hold, let every worker send, and bring forward
    /// everything that waited on a retry schedule, so the backlog goes out in full batches now.
    async fn upstream_recovered(&mut self) {
        let (expedite, newly_proven) = {
            let mut h = self.link.health();
            h.hold_until = None;
            h.upstream_failures = 0;
            h.failure_counted_at = None;
            let newly_proven = !std::mem::replace(&mut h.proven, true);
            (std::mem::take(&mut h.retries_may_wait), newly_proven)
        };
        if newly_proven {
            self.link.bump();
        }
        if !expedite {
            return;
        }
        let now = SystemTime::now();
        match self
            .link
            .spool_call("bring retries forward", move |s| s.expedite_retries(now))
            .await
        {
            Ok(0) => {}
            Ok(n) => info!(
                "The PACS takes uploads; the instances waiting for a retry are due now. instances={n}"
            ),
            Err(e) => warn!(
                "Cannot bring waiting retries forward; they will go out on their own schedule. error=\"{}\"",
                error_chain(&e)
            ),
        }
    }

    fn retry_delay(&self, attempts: u32, not_before: Option<Duration>) -> Duration {
        outcome::retry_delay(
            self.link.cfg.retry_base_secs,
            self.link.cfg.retry_max_secs,
            attempts,
            not_before,
            self.jitter,
        )
    }

    /// Records outcomes in the spool; the ones that fail are kept for later.
    async fn record(&mut self, marks: Vec<Mark>) {
        if marks.is_empty() {
            return;
        }
        if marks
            .iter()
            .any(|(_, _, m)| matches!(m, Outcome::Sent { .. }))
        {
            // The PACS confirmed these instances; the spool does not know yet.
            passerelle_spool::crash_point!("uplink::record::before_mark_sent");
        }
        let outcomes: Vec<(InstanceId, Outcome)> = marks
            .iter()
            .map(|(id, _, outcome)| (*id, outcome.clone()))
            .collect();
        let sent: Vec<InstanceId> = marks
            .iter()
            .filter(|(_, _, m)| matches!(m, Outcome::Sent { .. }))
            .map(|(id, _, _)| *id)
            .collect();
        let spool = self.link.spool.clone();
        // One transaction for the whole request: one WAL sync, not one per instance.
        let done = tokio::task::spawn_blocking(move || -> passerelle_spool::Result<_> {
            let gone = spool.record_outcomes(&outcomes)?;
            if !sent.is_empty() {
                // Only a warning depends on it: a failed lookup does not undo the record.
                match spool.confirmed_under_other_content(&sent) {
                    Ok(uids) => warn_new_versions(&uids),
                    Err(e) => warn!(
                        "Could not check whether a confirmed instance replaced an earlier version; nothing is lost. error=\"{}\"",
                        error_chain(&e)
                    ),
                }
            }
            Ok(gone)
        })
        .await;
        match done {
            Ok(Ok(gone)) => {
                for (id, uid, _) in marks.iter().filter(|(id, _, _)| gone.contains(id)) {
                    warn!(
                        "An uploaded instance's row is gone from the spool; nothing to record. sop_instance_uid={uid} id={}",
                        id.0
                    );
                }
            }
            Ok(Err(e)) => {
                error!(
                    "Cannot record upload outcomes in the spool; trying again in a few seconds. Check the spool disk. instances={} first_sop_instance_uid={} error=\"{}\"",
                    marks.len(),
                    marks.first().map_or("none", |(_, uid, _)| uid.as_str()),
                    error_chain(&e)
                );
                self.stranded.extend(marks);
            }
            Err(e) => error!(
                "The task recording upload outcomes failed; restarting passerelled re-queues the affected instances. error=\"{e}\""
            ),
        }
    }
}

/// Warns about each SOP Instance UID the PACS confirmed again under other content: STOW-RS answers
/// alike whether the PACS stored the new version or kept its first copy, which Orthanc does unless
/// its `OverwriteInstances` option is on, so a corrected image may not be what the PACS shows.
fn warn_new_versions(uids: &[String]) {
    for uid in uids {
        warn!(
            "The PACS confirmed a new version of an instance it had already confirmed with other content. Some PACS keep their first copy and still confirm the new one (Orthanc does unless OverwriteInstances is true): check that the PACS shows the new version. sop_instance_uid={uid}"
        );
    }
}

/// Reads the status, the headers that matter and the body of a response, up to
/// [`response::MAX_BODY_BYTES`]: a longer body is cut there (`Answer::cut`) and the rest is not read.
async fn read_answer(
    mut response: reqwest::Response,
    progress: &body::Progress,
) -> reqwest::Result<Answer> {
    let header = |name| {
        response
            .headers()
            .get(name)
            .and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok())
            .map(str::to_string)
    };
    let mut answer = Answer {
        status: response.status().as_u16(),
        content_type: header(CONTENT_TYPE),
        location: header(LOCATION),
        retry_after: header(RETRY_AFTER)
            .and_then(|v| outcome::parse_retry_after(&v, SystemTime::now())),
        body: Vec::new(),
        cut: false,
        http_version: match response.version() {
            reqwest::Version::HTTP_2 => "HTTP/2",
            reqwest::Version::HTTP_11 => "HTTP/1.1",
            _ => "other",
        },
    };
    while let Some(chunk) = response.chunk().await? {
        progress.touch();
        let room = crate::response::MAX_BODY_BYTES.saturating_sub(answer.body.len());
        if chunk.len() > room {
            // A STOW-RS response is never this long: keep what fits, read no further.
            answer.body.extend_from_slice(&chunk[..room]);
            answer.cut = true;
            break;
        }
        answer.body.extend_from_slice(&chunk);
    }
    Ok(answer)
}

/// True once shutdown was asked (or its sender is gone).
fn stop_requested(shutdown: &watch::Receiver<bool>) -> bool {
    *shutdown.borrow() || shutdown.has_changed().is_err()
}

/// Completes once shutdown is asked (or its sender is gone).
async fn shutdown_requested(shutdown: &mut watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow_and_update() {
            return;
        }
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

async fn wait_or_shutdown(wait: Duration, shutdown: &mut watch::Receiver<bool>) {
    tokio::select! {
        _ = tokio::time::sleep(wait) => {}
        _ = shutdown_requested(shutdown) => {}
    }
}

/// Completes when a waiting worker may go on (see [`Link::changed`]), after `poll` at the latest,
/// or at shutdown.
async fn wait_for_change(
    changed: &mut watch::Receiver<u64>,
    poll: Duration,
    shutdown: &mut watch::Receiver<bool>,
) {
    tokio::select! {
        _ = changed.changed() => {}
        _ = tokio::time::sleep(poll) => {}
        _ = shutdown_requested(shutdown) => {}
    }
}

/// An instance's outcome as the worker records it: its row, its SOP Instance UID (for the log), what
/// became of it.
type Mark = (InstanceId, String, Outcome);

/// Marks that give these instances back to the queue as they were: no attempt counted.
fn released(instances: Vec<QueuedInstance>) -> impl Iterator<Item = Mark> {
    instances
        .into_iter()
        .map(|i| (i.id, i.sop_instance_uid, Outcome::Release))
}

fn study_of(instances: &[QueuedInstance]) -> &str {
    instances
        .first()
        .map_or("none", |i| i.study_instance_uid.as_str())
}

pub(crate) use passerelle_spool::error_chain;

#[cfg(test)]
mod tests;
