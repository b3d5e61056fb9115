//! What an exchange with the PACS means for each instance of the batch. Pure functions (apart from
//! a WARN for a response that contradicts itself): the network code in `lib.rs` produces an
//! [`Exchange`], [`decide`] turns it into a [`Decision`], and `lib.rs` records that in the spool.

use std::error::Error as StdError;
use std::time::{Duration, Instant, SystemTime};

use passerelle_spool::{InstanceId, QueuedInstance};

use crate::response::{self, StowResponse};

/// What came back from one STOW-RS request.
#[derive(Debug)]
pub(crate) enum Exchange {
    Answered(Answer),
    Failed(TransportFailure),
}

/// An HTTP response, its body read (up to [`response::MAX_BODY_BYTES`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) content_type: Option<String>,
    pub(crate) body: Vec<u8>,
    /// The PACS sent more than [`response::MAX_BODY_BYTES`]: `body` holds the first of it only.
    pub(crate) cut: bool,
    /// The Retry-After header, already turned into a delay.
    pub(crate) retry_after: Option<Duration>,
    /// The Location header (redirects).
    pub(crate) location: Option<String>,
    /// The HTTP version the PACS answered in ("HTTP/1.1", "HTTP/2"), for the log.
    pub(crate) http_version: &'static str,
}

/// A spool error that stopped a request's body: what went wrong, and the instance being read
/// (unknown when opening the files failed as a whole).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LocalFailure {
    pub(crate) instance: Option<InstanceId>,
    pub(crate) detail: String,
}

/// Why no HTTP response came back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TransportFailure {
    /// Our trust anchors (uplink.ca_file) or host name check refused the PACS's certificate.
    ServerCertificateRefused(String),
    /// The PACS presents a CA certificate as its server certificate (a self-signed certificate with
    /// `CA:TRUE`, which `openssl req -x509` makes by default): no ca_file makes it acceptable.
    ServerCertificateIsCa(String),
    /// The PACS's certificate is not valid at this box's time: expired, or not yet valid (which
    /// may be the box's clock rather than the certificate). The detail carries the clock's reading.
    ServerCertificateOutOfDate(String),
    /// The PACS refused our client certificate (or required one we do not have).
    ClientCertificateRefused(String),
    /// The PACS and we share no TLS version or cipher suite (TLS 1.2+ only).
    TlsIncompatible(String),
    /// The HTTP CONNECT proxy wants credentials we do not have (407 to CONNECT).
    ProxyAuthRefused(String),
    /// Connection refused or reset, DNS, proxy, TLS handshake interrupted, connect timeout...
    Network(String),
    /// The PACS's HTTP/2 front end said it did not process the request: it closed the connection
    /// (GOAWAY) before taking the request's stream, or refused the stream (REFUSED_STREAM). HTTP/2
    /// guarantees such a request had no effect (RFC 9113 §6.8, §8.7): it may go out again at once.
    NotProcessed(String),
    /// Nothing was sent or received for this long.
    IdleTimeout(Duration),
    /// Reading the spool failed while the body was being sent.
    LocalRead(LocalFailure),
}

/// What to record for one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Confirmed in ReferencedSOPSequence.
    Sent {
        redelivery: bool,
        warning_reason: Option<u16>,
    },
    /// Not confirmed; try again after the backoff, and no earlier than `not_before`. `refused`: the
    /// PACS named this instance as not stored (FailedSOPSequence, or a FailureReason), as opposed to
    /// an instance left out of an answer or a request that failed as a whole; the spool counts such
    /// refusals apart from attempts, for the caps of [`failure_action`].
    Retry {
        error: String,
        not_before: Option<Duration>,
        refused: bool,
    },
    /// Refused for good; the operator has to look at it.
    Failed { reason: String },
}

/// What to do with a batch after an exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    PerInstance(Vec<(InstanceId, Action)>),
    /// Stop uploading until the operator fixed something (credentials, CA, certificate, URL).
    Pause {
        error: String,
    },
    /// Send each half of the batch separately, right away: the PACS found the request too large,
    /// or rejected it as a whole without naming an instance (`reason`, for the log).
    Split {
        reason: String,
    },
    /// The PACS did not process the request (HTTP/2 GOAWAY or REFUSED_STREAM): send it again at
    /// once, on a new connection, without counting an attempt.
    Resend {
        detail: String,
    },
    /// The spool could not be read while the body was sent: the instance being read is retried
    /// after its backoff, the others go back to the queue as they were, and the upstream is not
    /// held (it is not at fault).
    LocalRead(LocalFailure),
}

/// HTTP statuses as the uplink understands them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HttpClass {
    /// 2xx: the body says which instances were stored.
    Stored,
    /// 400.
    BadRequest,
    /// 409.
    Conflict,
    /// 401, 403.
    AuthRefused,
    /// 407 from the proxy.
    ProxyAuthRequired,
    /// 413.
    TooLarge,
    /// 415.
    UnsupportedMediaType,
    /// 411: the front end wants a Content-Length; our bodies are chunked.
    LengthRequired,
    /// 406: the PACS produces its STOW-RS response in neither media type we accept.
    NotAcceptable,
    /// 3xx, 404, 405: stow_url does not point at a STOW-RS endpoint.
    WrongEndpoint,
    /// 408, 429, 5xx.
    Transient,
    /// Anything else (1xx, other 4xx).
    Unexpected,
}

pub(crate) fn http_class(status: u16) -> HttpClass {
    match status {
        200..=299 => HttpClass::Stored,
        400 => HttpClass::BadRequest,
        401 | 403 => HttpClass::AuthRefused,
        407 => HttpClass::ProxyAuthRequired,
        409 => HttpClass::Conflict,
        413 => HttpClass::TooLarge,
        415 => HttpClass::UnsupportedMediaType,
        411 => HttpClass::LengthRequired,
        406 => HttpClass::NotAcceptable,
        300..=399 | 404 | 405 => HttpClass::WrongEndpoint,
        408 | 429 | 500..=599 => HttpClass::Transient,
        _ => HttpClass::Unexpected,
    }
}

/// FailureReason (0008,1197) values as the uplink understands them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureClass {
    /// The PACS may accept the same instance later (out of resources, processing failure). Processing
    /// failure, mistyped argument and duplicate are retried a limited number of attempts only
    /// ([`MAX_PROCESSING_REFUSALS`], [`MAX_DUPLICATE_REFUSALS`]).
    Retryable,
    /// The PACS will refuse it again (SOP class not supported, data set does not match, ...).
    Permanent,
}

/// Microsoft's DICOM service (Azure Health Data Services) answers a STOW-RS of an instance it already
/// holds with this FailureReason (45070, "a DICOM instance with the same Study, Series and SOP
/// Instance UIDs has already been stored"): its Duplicate SOP Instance, outside the standard's codes.
pub(crate) const ALREADY_STORED: u16 = 0xB00E;

pub(crate) fn failure_class(code: u16) -> FailureClass {
    match code {
        0xA700..=0xA7FF | 0x0110 | 0x0111 | ALREADY_STORED | 0x0212 => FailureClass::Retryable,
        _ => FailureClass::Permanent,
    }
}

/// A human description of a FailureReason or WarningReason (PS3.18 Table I.2-1, PS3.7 Annex C).
pub(crate) fn describe_status(code: u16) -> &'static str {
    match code {
        0xA700..=0xA7FF => "Refused: out of resources",
        0xA900..=0xA9FF => "Error: data set does not match SOP class",
        0xC122 => "Error: transfer syntax not supported",
        0xC000..=0xC121 | 0xC123..=0xCFFF => "Error: cannot understand",
        0x0110 => "Processing failure",
        0x0111 => "Duplicate SOP instance",
        0x0117 => "Invalid SOP instance",
        0x0122 => "SOP class not supported",
        0x0124 => "Not authorized",
        0x0212 => "Mistyped argument",
        0xB000 => "Warning: coercion of data elements",
        0xB006 => "Warning: elements discarded",
        0xB007 => "Warning: data set does not match SOP class",
        ALREADY_STORED => "Already stored (Microsoft's DICOM service)",
        0xB001..=0xB005 | 0xB008..=0xB00D | 0xB00F..=0xBFFF => "Warning",
        _ => "unknown status",
    }
}

/// Decides what an exchange means for each instance that was in the request.
/// `stored_before`: the PACS has confirmed an instance since passerelled started (it is a working
/// STOW-RS endpoint).
pub(crate) fn decide(
    instances: &[QueuedInstance],
    exchange: &Exchange,
    stored_before: bool,
) -> Decision {
    match exchange {
        Exchange::Failed(failure) => decide_transport(instances, failure),
        Exchange::Answered(answer) => decide_answer(instances, answer, stored_before),
    }
}

fn decide_transport(instances: &[QueuedInstance], failure: &TransportFailure) -> Decision {
    match failure {
        TransportFailure::ServerCertificateRefused(detail) => Decision::Pause {
            error: format!(
                "The PACS's TLS certificate was refused ({detail}). Make sure uplink.ca_file holds the CA certificate that signed the PACS's server certificate, and that the host name in uplink.stow_url is one the certificate names; then restart passerelled."
            ),
        },
        TransportFailure::ServerCertificateIsCa(detail) => Decision::Pause {
            error: format!(
                "The PACS presents a CA certificate (basic constraints CA:TRUE) as its server certificate ({detail}), which Passerelle does not accept, even from uplink.ca_file; `openssl req -x509` makes such self-signed certificates by default. Give the PACS's TLS front end a server certificate signed by the CA in uplink.ca_file, or a self-signed one made with `-addext basicConstraints=critical,CA:FALSE` and put that certificate in uplink.ca_file; then restart passerelled."
            ),
        },
        TransportFailure::ServerCertificateOutOfDate(detail) => Decision::Pause {
            error: format!(
                "The PACS's TLS certificate is not valid at this box's time ({detail}). Either it has expired and the PACS's operator must renew it, or this box's clock is wrong: check that the box reaches its time server (NTP); then restart passerelled."
            ),
        },
        TransportFailure::ClientCertificateRefused(detail) => Decision::Pause {
            error: format!(
                "The PACS refused our TLS client certificate ({detail}). Check uplink.client_cert and uplink.client_key (set, not expired, issued by a CA the PACS trusts); then restart passerelled."
            ),
        },
        TransportFailure::TlsIncompatible(detail) => Decision::Pause {
            error: format!(
                "The TLS handshake with the PACS was refused ({detail}). Either the PACS shares no TLS version or cipher suite with Passerelle (which speaks TLS 1.2 and 1.3 only), or it requires a client certificate: enable TLS 1.2/1.3 on the PACS's front end, or set uplink.client_cert and uplink.client_key; then restart passerelled."
            ),
        },
        TransportFailure::ProxyAuthRefused(detail) => Decision::Pause {
            error: format!(
                "The proxy refused to open a tunnel to the PACS without valid credentials ({detail}). Put the proxy's user name and password in uplink.proxy (http://user:password@host:port); then restart passerelled."
            ),
        },
        TransportFailure::Network(detail) => retry_all(
            instances,
            format!("The upload to the PACS failed: {detail}."),
            None,
        ),
        TransportFailure::NotProcessed(detail) => Decision::Resend {
            detail: detail.clone(),
        },
        TransportFailure::IdleTimeout(idle) => retry_all(
            instances,
            format!(
                "Nothing was sent to or received from the PACS for {} s (uplink.idle_timeout_secs); the connection was dropped.",
                idle.as_secs()
            ),
            None,
        ),
        // Not the PACS's doing: no hold for the uplink, no attempt for the instances it did not
        // concern (the worker gives them back to the queue).
        TransportFailure::LocalRead(failure) => Decision::LocalRead(failure.clone()),
    }
}

fn decide_answer(instances: &[QueuedInstance], a: &Answer, stored_before: bool) -> Decision {
    let status = a.status;
    // Parsed once; every case that reads the body reads this.
    let parsed: Result<StowResponse, String> =
        response::parse_read(status, a.content_type.as_deref(), &a.body, a.cut)
            .map_err(|e| e.to_string());
    let is_stow_response = parsed.as_ref().is_ok_and(|r| r.names_sequences);
    // A STOW-RS response listing no instance at all, neither stored nor failed: the PACS took the
    // request and stored nothing (Orthanc's DICOMweb plugin, when its storage cannot be written,
    // answers 200 with both sequences empty).
    let lists_nothing = parsed
        .as_ref()
        .is_ok_and(|r| r.names_sequences && r.referenced.is_empty() && r.failed.is_empty());
    let per_instance = |leftover: &dyn Fn(Option<&str>) -> Action| {
        per_instance(instances, &parsed, status, leftover)
    };
    match http_class(status) {
        HttpClass::Stored if !stored_before && !is_stow_response => Decision::Pause {
            error: format!(
                "uplink.stow_url answered HTTP {status} with something that is not a STOW-RS response ({}), and the PACS has stored nothing since passerelled started: it is most likely not the PACS's STOW-RS endpoint. Set uplink.stow_url to it (for Orthanc, https://pacs/dicom-web/studies); then restart passerelled.",
                server_message(a)
            ),
        },
        HttpClass::Stored if lists_nothing => retry_all(
            instances,
            format!(
                "The PACS answered HTTP {status} but confirmed none of the {} instance(s) and listed none as failed: it stored nothing. Orthanc answers so when it cannot write to its storage (for example a full disk); check the PACS. The instances are not confirmed and will be sent again.",
                instances.len()
            ),
            a.retry_after,
        ),
        HttpClass::Stored => per_instance(&|parse_error| Action::Retry {
            error: match parse_error {
                None => format!(
                    "The PACS answered HTTP {status} but did not list the instance in ReferencedSOPSequence; it is not confirmed and will be sent again."
                ),
                Some(e) => format!(
                    "The PACS answered HTTP {status} but its response could not be read ({e}); the instance is not confirmed and will be sent again."
                ),
            },
            not_before: None,
            refused: false,
        }),
        HttpClass::BadRequest => match front_end_certificate_refusal(a) {
            Some(refusal) => decide_transport(
                instances,
                &TransportFailure::ClientCertificateRefused(refusal.into()),
            ),
            None if !is_stow_response => {
                request_refused(instances, &server_message(a), stored_before)
            }
            None => per_instance(&|_| Action::Failed {
                reason: format!(
                    "The PACS rejected the request as invalid (HTTP 400): {}",
                    server_message(a)
                ),
            }),
        },
        HttpClass::Conflict => per_instance(&|_| Action::Failed {
            reason: format!(
                "The PACS refused the instance with HTTP 409 Conflict (for example it holds different data under the same UIDs): {}",
                server_message(a)
            ),
        }),
        HttpClass::AuthRefused => Decision::Pause {
            error: format!(
                "The PACS refused our credentials (HTTP {status}: {}). Check uplink.username and uplink.password (or uplink.bearer_token) and the account's permission to store; then restart passerelled.",
                server_message(a)
            ),
        },
        HttpClass::ProxyAuthRequired => Decision::Pause {
            error: "The proxy asks for authentication (HTTP 407). Put the proxy's user name and password in uplink.proxy (http://user:password@host:port); then restart passerelled.".into(),
        },
        HttpClass::TooLarge => match instances {
            [] | [_, _, ..] => Decision::Split {
                reason: "found the request too large (HTTP 413)".into(),
            },
            [one] => Decision::PerInstance(vec![(
                one.id,
                Action::Failed {
                    reason: format!(
                        "The PACS refused the instance as too large (HTTP 413) even when sent alone ({} bytes). Raise the upload size limit of the PACS or its front end (e.g. nginx client_max_body_size), then re-queue the instance.",
                        one.raw_size
                    ),
                },
            )]),
        },
        HttpClass::LengthRequired => Decision::Pause {
            error: format!(
                "The PACS's front end refuses request bodies sent in chunks (HTTP 411 Length Required: {}). Passerelle streams each batch with chunked transfer encoding, because its length is known only once every instance was read and verified. Turn on request buffering in the PACS's front end (nginx buffers by default), or set uplink.http2 if it speaks HTTP/2; then restart passerelled.",
                server_message(a)
            ),
        },
        HttpClass::UnsupportedMediaType => Decision::Pause {
            error: format!(
                "The PACS does not accept multipart/related; type=\"application/dicom\" at uplink.stow_url (HTTP 415: {}). Make sure uplink.stow_url is the STOW-RS endpoint (e.g. https://pacs/dicom-web/studies) and that DICOMweb is enabled on the PACS; then restart passerelled.",
                server_message(a)
            ),
        },
        HttpClass::NotAcceptable => Decision::Pause {
            error: format!(
                "The PACS answered HTTP 406 Not Acceptable ({}): it offers its STOW-RS response neither as {} nor as {}, the two media types Passerelle asks for and reads, so it cannot say which instances it stored. Turn on DICOMweb JSON (or XML) responses on the PACS or its front end, or ask its operator which response types it can produce; if uplink.stow_url is not the PACS's STOW-RS endpoint (e.g. https://pacs/dicom-web/studies), correct it; then restart passerelled.",
                server_message(a),
                response::DICOM_JSON,
                response::DICOM_XML,
            ),
        },
        HttpClass::WrongEndpoint => Decision::Pause {
            error: match &a.location {
                Some(to) => format!(
                    "uplink.stow_url redirects (HTTP {status}) to {to}; Passerelle does not follow redirects with a study. Set uplink.stow_url to the final STOW-RS URL; then restart passerelled."
                ),
                None => format!(
                    "uplink.stow_url is not a STOW-RS endpoint (HTTP {status}: {}). Set it to the PACS's STOW-RS URL (e.g. https://pacs/dicom-web/studies); then restart passerelled.",
                    server_message(a)
                ),
            },
        },
        HttpClass::Transient => retry_all(
            instances,
            format!(
                "The PACS is temporarily unable to store (HTTP {status}: {}).",
                server_message(a)
            ),
            a.retry_after,
        ),
        HttpClass::Unexpected => retry_all(
            instances,
            format!(
                "The PACS gave an unexpected answer (HTTP {status}: {}).",
                server_message(a)
            ),
            a.retry_after,
        ),
    }
}

fn retry_all(
    instances: &[QueuedInstance],
    error: String,
    not_before: Option<Duration>,
) -> Decision {
    per_instance_all(instances, || Action::Retry {
        error: error.clone(),
        not_before,
        refused: false,
    })
}

/// Referenced → sent, failed → per FailureReason, the rest → `leftover(parse error)`.
/// A request the PACS rejected with HTTP 400 as a whole, without a STOW-RS response (nothing says
/// which instance it refuses, if any). A batch is split, to isolate what the PACS refuses. A single
/// instance is failed for good if the PACS has stored instances since passerelled started (the
/// endpoint works and refuses this one); otherwise the uplink pauses, because an endpoint that has
/// stored nothing and rejects each request as a whole is most likely not a STOW-RS endpoint
/// (Orthanc's REST `/instances` answers so), and failing the instances would fail the whole backlog.
fn request_refused(instances: &[QueuedInstance], detail: &str, stored_before: bool) -> Decision {
    match instances {
        [_, _, ..] => Decision::Split {
            reason: format!(
                "rejected the request as a whole without naming an instance (HTTP 400: {detail})"
            ),
        },
        _ if stored_before => per_instance_all(instances, || Action::Failed {
            reason: format!("The PACS rejected the request as invalid (HTTP 400): {detail}"),
        }),
        _ => Decision::Pause {
            error: format!(
                "The PACS rejected each request as a whole (HTTP 400: {detail}) and has stored nothing since passerelled started. uplink.stow_url is most likely not the PACS's STOW-RS endpoint (for Orthanc it is https://pacs/dicom-web/studies, not its /instances); nothing was failed. Set uplink.stow_url; then restart passerelled."
            ),
        },
    }
}

fn per_instance_all(instances: &[QueuedInstance], action: impl Fn() -> Action) -> Decision {
    Decision::PerInstance(instances.iter().map(|i| (i.id, action())).collect())
}

/// Per instance, from the parsed response: referenced → sent; failed → by FailureReason; both, or
/// referenced with a FailureReason (a response that contradicts itself) → by FailureReason, never
/// sent; absent (or an unreadable response) → `leftover`, given the parse error if there was one.
fn per_instance(
    instances: &[QueuedInstance],
    parsed: &Result<StowResponse, String>,
    status: u16,
    leftover: &dyn Fn(Option<&str>) -> Action,
) -> Decision {
    Decision::PerInstance(
        instances
            .iter()
            .map(|inst| {
                let uid = inst.sop_instance_uid.as_str();
                let action = match parsed {
                    Err(e) => leftover(Some(e)),
                    Ok(r) => {
                        // A FailureReason in any ReferencedSOPSequence item naming this instance.
                        let stated_failure = r
                            .referenced
                            .iter()
                            .filter(|item| item.sop_instance_uid == uid)
                            .find_map(|item| item.failure_reason);
                        match (r.referenced_item(uid), r.failed_item(uid)) {
                            (Some(item), None) if stated_failure.is_none() => Action::Sent {
                                // An attempt the PACS answered by refusing this instance
                                // did not deliver it; any other may have.
                                redelivery: inst.attempts > inst.refusals,
                                warning_reason: item.warning_reason.or(r.warning_reason),
                            },
                            (Some(_), failed) => {
                                contradicted(uid, failed, stated_failure, status, inst.refusals)
                            }
                            (None, Some(failed)) => {
                                failure_action(failed.failure_reason, status, inst.refusals)
                            }
                            (None, None) => leftover(None),
                        }
                    }
                };
                (inst.id, action)
            })
            .collect(),
    )
}

/// An instance the PACS listed as stored (in ReferencedSOPSequence) and, in the same response, as not
/// stored: in FailedSOPSequence too (`failed`), or with a FailureReason in its ReferencedSOPSequence
/// item (`stated_failure`). Such an answer does not confirm the instance (Invariant 2): it is
/// decided as a failure, by the failed entry's FailureReason (else the item's), as
/// [`failure_action`] decides any failure; without a readable reason it is retried. The WARN names
/// the instance, because the PACS or its front end answers wrongly and its administrator should
/// know.
fn contradicted(
    uid: &str,
    failed: Option<&response::FailedInstance>,
    stated_failure: Option<Option<u16>>,
    status: u16,
    refusals: u32,
) -> Action {
    let reason = failed
        .and_then(|f| f.failure_reason)
        .or(stated_failure.flatten());
    let listed = if failed.is_some() {
        "in both ReferencedSOPSequence and FailedSOPSequence"
    } else {
        "in ReferencedSOPSequence with a FailureReason in its item"
    };
    let said = format!(
        "The PACS answered both stored and failed for the instance (its STOW-RS response lists it {listed}), so it is not confirmed"
    );
    let (action, next) = match failure_action(reason, status, refusals) {
        Action::Retry {
            error,
            not_before,
            refused,
        } => (
            Action::Retry {
                error: format!("{said}. {error}"),
                not_before,
                refused,
            },
            "it will be sent again",
        ),
        Action::Failed { reason } => (
            Action::Failed {
                reason: format!("{said}. {reason}"),
            },
            "it is marked failed for the FailureReason given",
        ),
        // failure_action never confirms; should it ever, the instance is still not confirmed.
        Action::Sent { .. } => (
            Action::Retry {
                error: format!("{said}; it will be sent again."),
                not_before: None,
                refused: true,
            },
            "it will be sent again",
        ),
    };
    log::warn!(
        "{said}: {next}. Check on the PACS whether it holds this instance, and tell the PACS's administrator that its STOW-RS response contradicts itself. sop_instance_uid={uid} failure_reason={} http_status={status}",
        reason.map_or_else(|| "none".into(), |code| format!("{code:#06X}"))
    );
    action
}

/// At this many refusals as a Duplicate SOP Instance (0x0111, or Microsoft's DICOM service's
/// 0xB00E, "already stored"), an instance is failed for the operator: a PACS that rejects duplicates
/// answers so for ever once it holds the instance (typically a copy delivered earlier whose
/// confirmation was lost).
pub(crate) const MAX_DUPLICATE_REFUSALS: u32 = 3;

/// At this many refusals as a Processing failure (0x0110) or a Mistyped argument (0x0212), an
/// instance is failed for the operator. Both may pass (a PACS's database busy for a moment), so they
/// are retried first, a little longer than a duplicate; but a PACS that cannot process that one
/// instance answers so at every attempt, and retried for ever it would come back alone, as a request
/// the PACS takes nothing of, holding every upload as if the PACS were down.
///
/// Both caps count the PACS's refusals of that instance by name (the spool's
/// [`QueuedInstance::refusals`]), not its attempts: attempts lost to an outage (no answer, a 5xx)
/// say nothing about the instance, and after a long outage they would fail it at its first refusal.
/// `passerelled requeue` starts the count again from 0.
pub(crate) const MAX_PROCESSING_REFUSALS: u32 = 5;

/// `refusals`: how many times the PACS refused the instance by name before this answer.
fn failure_action(reason: Option<u16>, status: u16, refusals: u32) -> Action {
    let refusal = refusals.saturating_add(1);
    match reason {
        Some(code @ (0x0110 | 0x0212)) if refusal >= MAX_PROCESSING_REFUSALS => Action::Failed {
            reason: format!(
                "The PACS refused the instance with FailureReason {code:#06X} ({}, HTTP {status}) {} times now (the limit is {MAX_PROCESSING_REFUSALS}): it fails to process this instance each time it is sent, so it is no longer sent on its own. Look in the PACS's log for this SOP Instance UID to see why, have that fixed, then send it again with `passerelled requeue`.",
                describe_status(code),
                refusal
            ),
        },
        Some(code @ (0x0111 | ALREADY_STORED)) if refusal >= MAX_DUPLICATE_REFUSALS => {
            Action::Failed {
                reason: format!(
                    "The PACS refused the instance as a duplicate (FailureReason {code:#06X}, {}, HTTP {status}) {} times now (the limit is {MAX_DUPLICATE_REFUSALS}): it already holds an instance with this SOP Instance UID, most likely a copy delivered earlier whose confirmation was lost. Check on the PACS that it holds this study's instance; `passerelled requeue` sends it again if needed.",
                    describe_status(code),
                    refusal
                ),
            }
        }
        None => Action::Retry {
            error: format!(
                "The PACS listed the instance in FailedSOPSequence without a FailureReason (HTTP {status}); it will be sent again."
            ),
            not_before: None,
            refused: true,
        },
        Some(code) => match failure_class(code) {
            FailureClass::Retryable => Action::Retry {
                error: format!(
                    "The PACS could not store the instance for now: FailureReason {code:#06X} ({}) (HTTP {status}); it will be sent again.",
                    describe_status(code)
                ),
                not_before: None,
                refused: true,
            },
            FailureClass::Permanent => Action::Failed {
                reason: format!(
                    "The PACS refused the instance: FailureReason {code:#06X} ({}) (HTTP {status}).",
                    describe_status(code)
                ),
            },
        },
    }
}

/// The PACS's own words, for a log line: a short, single-line excerpt of the body.
/// A TLS front end that took the connection but not our client certificate, as nginx answers it:
/// with `ssl_verify_client on` it completes the handshake whatever the certificate, then answers
/// every request on that connection with HTTP 400 and a page titled "The SSL certificate error"
/// (the certificate did not verify: another CA, expired, revoked) or "No required SSL certificate was
/// sent" (none presented). That 400 says nothing about the instances: it is the box's configuration
/// (or the PACS's trust list) that must change, so the batch must not be failed. Returns what the
/// front end said, for the pause's message.
fn front_end_certificate_refusal(a: &Answer) -> Option<&'static str> {
    let head = String::from_utf8_lossy(&a.body[..a.body.len().min(1024)]).to_ascii_lowercase();
    if head.contains("the ssl certificate error") {
        Some("its TLS front end answered HTTP 400 \"The SSL certificate error\": the certificate did not verify against the CAs it trusts, or has expired or been revoked")
    } else if head.contains("no required ssl certificate was sent") {
        Some("its TLS front end answered HTTP 400 \"No required SSL certificate was sent\"")
    } else {
        None
    }
}

fn server_message(a: &Answer) -> String {
    let text = String::from_utf8_lossy(&a.body[..a.body.len().min(400)]);
    let one_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let said = if one_line.is_empty() {
        "no explanation was given".into()
    } else {
        format!("\"{}\"", truncate(&one_line, 200))
    };
    if a.cut {
        format!("{said}; {}", response::CUT_NOTE)
    } else {
        said
    }
}

fn truncate(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_string(),
    }
}

/// The longest wait the uplink derives from its settings or from a Retry-After (a pause, a backoff,
/// the hold after an outage): the largest `uplink.auth_pause_secs` and `uplink.retry_max_secs` that
/// the configuration accepts, a day. A longer one (settings that were not validated) is cut to it,
/// so that adding it to the clock can neither overflow (a panic) nor give a date that the log
/// (HTTP dates end in year 9999) and the spool cannot write.
pub(crate) const LONGEST_WAIT: Duration = Duration::from_secs(
    if passerelle_config::MAX_AUTH_PAUSE_SECS > passerelle_config::MAX_RETRY_MAX_SECS {
        passerelle_config::MAX_AUTH_PAUSE_SECS
    } else {
        passerelle_config::MAX_RETRY_MAX_SECS
    },
);

/// How long the uplink pauses after a failure the operator must fix: `uplink.auth_pause_secs`,
/// within the bounds the configuration accepts. Below them (0 s) worker 0 would send the refused
/// request again in a tight loop; above them the pause would overflow the clock.
pub(crate) fn pause_length(auth_pause_secs: u64) -> Duration {
    Duration::from_secs(auth_pause_secs.clamp(
        passerelle_config::MIN_AUTH_PAUSE_SECS,
        passerelle_config::MAX_AUTH_PAUSE_SECS,
    ))
}

/// What is left at `now` of a pause that ends at `until` and was set for at most `longest`:
/// `None` once it is over. A pause with more than `longest` left was set before the clock went
/// back (NTP correcting a clock that ran ahead): it is over too, rather than held until the clock
/// catches up, months perhaps.
pub(crate) fn pause_left(
    until: SystemTime,
    now: SystemTime,
    longest: Duration,
) -> Option<Duration> {
    match until.duration_since(now) {
        Ok(left) if !left.is_zero() && left <= longest => Some(left),
        _ => None,
    }
}

/// `now + wait`, `wait` cut to [`LONGEST_WAIT`], with checked arithmetic: a clock too close to the
/// end of `SystemTime` for even that (never seen) gives `now` rather than a panic.
pub(crate) fn time_after(now: SystemTime, wait: Duration) -> SystemTime {
    now.checked_add(wait.min(LONGEST_WAIT)).unwrap_or(now)
}

/// [`time_after`] for a monotonic instant (the hold after an outage).
pub(crate) fn instant_after(now: Instant, wait: Duration) -> Instant {
    now.checked_add(wait.min(LONGEST_WAIT)).unwrap_or(now)
}

/// Exponential backoff: `base * 2^attempts`, capped at `max`, with `jitter` (clamped to ±20%)
/// applied, never above `max`. `max` is taken within 1 s..=[`LONGEST_WAIT`] and `base` within
/// 1 s..=`max`, as the configuration accepts them: a base of 0 would retry in a tight loop, and a
/// maximum near `u64::MAX` seconds is more than a `Duration` made from an `f64` can hold.
pub(crate) fn backoff(base_secs: u64, max_secs: u64, attempts: u32, jitter: f64) -> Duration {
    let max_secs = max_secs.clamp(1, LONGEST_WAIT.as_secs());
    let base_secs = base_secs.clamp(1, max_secs);
    let exp = base_secs.saturating_mul(2u64.saturating_pow(attempts));
    let capped = exp.min(max_secs) as f64;
    let jittered = capped * (1.0 + jitter.clamp(-0.2, 0.2));
    Duration::from_secs_f64(jittered.clamp(0.0, max_secs as f64))
}

/// The delay before the next attempt: the backoff, and no less than Retry-After (itself capped
/// at `max`, and `max` at [`LONGEST_WAIT`]).
pub(crate) fn retry_delay(
    base_secs: u64,
    max_secs: u64,
    attempts: u32,
    not_before: Option<Duration>,
    jitter: f64,
) -> Duration {
    let b = backoff(base_secs, max_secs, attempts, jitter);
    let max = Duration::from_secs(max_secs).min(LONGEST_WAIT);
    match not_before {
        Some(nb) => b.max(nb.min(max)),
        None => b,
    }
}

/// Retry-After (RFC 9110 §10.2.3): delta-seconds or an HTTP-date.
pub(crate) fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Classifies why a request got no response, from the error and its sources.
pub(crate) fn classify_transport(err: &(dyn StdError + 'static)) -> TransportFailure {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return classify_tls(tls, err);
        }
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            if unprocessed(h2) {
                return TransportFailure::NotProcessed(crate::error_chain(err));
            }
        }
        // io::Error::source() skips the error it wraps (and io::Errors nest): look inside.
        cur = match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn StdError + 'static)),
            None => e.source(),
        };
    }
    let chain = crate::error_chain(err);
    // hyper-util's tunnel error type is private: recognise it by its message.
    let lower = chain.to_ascii_lowercase();
    if lower.contains("proxy authorization required")
        || lower.contains("proxy authentication required")
    {
        return TransportFailure::ProxyAuthRefused(chain);
    }
    TransportFailure::Network(chain)
}

/// Whether an HTTP/2 error means the PACS did not process the stream: its GOAWAY (the h2 crate fails
/// with it only the streams above the GOAWAY's last stream id, and those opened after it) or its
/// REFUSED_STREAM. A GOAWAY we sent, or any other reset, may follow processing.
fn unprocessed(e: &h2::Error) -> bool {
    e.is_remote()
        && (e.is_go_away() || (e.is_reset() && e.reason() == Some(h2::Reason::REFUSED_STREAM)))
}

/// What the PACS asked of our TLS client certificate, as the uplink knows it when a request fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CertificateRequest {
    /// The PACS asked for a client certificate in a handshake.
    pub(crate) asked: bool,
    /// A client certificate is configured.
    pub(crate) have_one: bool,
    /// The PACS has answered a request (any HTTP status) since passerelled started: it takes our
    /// connections as they are.
    pub(crate) answered_before: bool,
}

/// A network failure from a PACS that asked for a client certificate while none is configured, and
/// that never answered a request, is its refusal of the missing certificate: with TLS 1.3 the PACS
/// sends its alert only after our side of the handshake is done and the request is on its way, and a
/// body write that meets the closed connection first (broken pipe, reset) hides the alert. With a
/// certificate configured a closed connection stays a network failure (a reset before the first answer
/// is also what a flaky link gives). Any other failure is left as it is.
pub(crate) fn refused_after_certificate_request(
    failure: TransportFailure,
    request: CertificateRequest,
) -> TransportFailure {
    match failure {
        TransportFailure::Network(detail)
            if request.asked && !request.have_one && !request.answered_before =>
        {
            TransportFailure::ClientCertificateRefused(format!(
                "the PACS asked for a client certificate and none is configured; it then closed the connection and has answered no request since passerelled started: {detail}"
            ))
        }
        other => other,
    }
}

fn classify_tls(tls: &rustls::Error, whole: &(dyn StdError + 'static)) -> TransportFailure {
    use rustls::AlertDescription as A;
    use rustls::CertificateError;
    match tls {
        rustls::Error::InvalidCertificate(
            e @ (CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. }),
        ) => TransportFailure::ServerCertificateOutOfDate(format!(
            "{e}; the box's clock reads {}",
            httpdate::fmt_http_date(SystemTime::now())
        )),
        rustls::Error::InvalidCertificate(CertificateError::Other(other))
            if matches!(
                other.0.downcast_ref::<webpki::Error>(),
                Some(webpki::Error::CaUsedAsEndEntity)
            ) =>
        {
            TransportFailure::ServerCertificateIsCa("rustls: CaUsedAsEndEntity".into())
        }
        rustls::Error::InvalidCertificate(e) => {
            TransportFailure::ServerCertificateRefused(format!("{e}"))
        }
        rustls::Error::NoCertificatesPresented => {
            TransportFailure::ServerCertificateRefused("the PACS presented no certificate".into())
        }
        rustls::Error::AlertReceived(
            alert @ (A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA
            | A::AccessDenied
            | A::CertificateRequired),
        ) => TransportFailure::ClientCertificateRefused(format!(
            "the PACS sent the TLS alert {alert:?}"
        )),
        rustls::Error::PeerIncompatible(e) => TransportFailure::TlsIncompatible(format!("{e:?}")),
        rustls::Error::AlertReceived(A::ProtocolVersion | A::HandshakeFailure) => {
            TransportFailure::TlsIncompatible(format!("{tls}"))
        }
        _ => TransportFailure::Network(crate::error_chain(whole)),
    }
}

#[cfg(test)]
mod tests;
