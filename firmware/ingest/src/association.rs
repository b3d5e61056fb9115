//! One association, from the A-ASSOCIATE-RQ to the release or abort.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use dicom_ul::pdu::{
    AbortRQServiceProviderReason, AssociationAC, AssociationRQ, Pdu,
    PresentationContextResultReason,
};
use log::{debug, error, info, warn};
use passerelle_config::DicomConfig;
use passerelle_spool::{IncomingMeta, RawDigest, Spool, StoreOutcome};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::dimse::{self, Command, Event, PdvAssembler};
use crate::error::{
    IngestError, Result, STATUS_CANNOT_UNDERSTAND, STATUS_INVALID_SOP_INSTANCE,
    STATUS_SOP_CLASS_NOT_SUPPORTED, STATUS_SUCCESS, STATUS_UNRECOGNIZED_OPERATION,
};
use crate::negotiate::{self, trim_uid, AcceptedContext, Negotiation, Service};
use crate::pdu_io::{self, abort_pdu};
use crate::store::{self, Chunk, Stored};

/// How many data PDUs may wait between the network and the disk for one instance.
const STORE_CHANNEL_DEPTH: usize = 4;

/// What every association shares.
pub(crate) struct Shared {
    pub cfg: Arc<DicomConfig>,
    pub spool: Spool,
    pub stored: Arc<Notify>,
}

/// What a new connection holds: a place among the connections waiting for their A-ASSOCIATE-RQ,
/// and access to the association slots. A slot is taken only once the request arrived, so
/// connections that never send one cannot lock modalities out.
pub(crate) struct Slot {
    pub slots: Arc<Semaphore>,
    pub waiting: OwnedSemaphorePermit,
}

/// Serves one TCP connection. Never returns an error: everything ends in a log line.
pub(crate) async fn run(
    mut stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    slot: Slot,
    abort: watch::Receiver<bool>,
) {
    if let Err(e) = stream.set_nodelay(true) {
        debug!("Cannot set TCP_NODELAY. peer={peer} error={e}");
    }
    let cfg = shared.cfg.clone();
    let artim = cfg.artim_timeout();

    // The A-ASSOCIATE-RQ, within ARTIM. Nothing else may come first, so every PDU type has the
    // control PDUs' limit here: a P-DATA-TF sent before association is refused before its body
    // is buffered, and a connection waiting for its association never pins more than 64 KiB.
    let first = tokio::time::timeout(
        artim,
        pdu_io::read_pdu(&mut stream, peer, pdu_io::MAX_CONTROL_PDU),
    )
    .await;
    let rq = match first {
        Err(_) => {
            warn!(
                "Closed a connection that sent no association request within the ARTIM timeout. peer={peer} artim_secs={}",
                artim.as_secs()
            );
            return;
        }
        Ok(Ok(None)) => {
            debug!("Connection closed before any PDU. peer={peer}");
            return;
        }
        Ok(Ok(Some(Pdu::AssociationRQ(rq)))) => rq,
        Ok(Ok(Some(other))) => {
            warn!(
                "Aborted a connection whose first PDU was not an association request. peer={peer} pdu={}",
                other.short_description()
            );
            send_abort(
                &mut stream,
                peer,
                AbortRQServiceProviderReason::UnexpectedPdu,
                artim,
            )
            .await;
            return;
        }
        Ok(Err(e)) => {
            warn!("Aborted a connection before association: {e}. peer={peer} Check the sender's DICOM configuration.");
            send_abort(&mut stream, peer, abort_reason(&e), artim).await;
            return;
        }
    };
    let calling_ae = printable(rq.calling_ae_title.trim());

    let Slot { slots, waiting } = slot;
    let mut active = slots.try_acquire_owned().ok();
    match negotiate::negotiate(&rq, &cfg, active.is_some()) {
        Negotiation::Reject { rj, why } => {
            warn!(
                "Rejected association: {}. peer={} calling_ae={calling_ae} called_ae={} result={:?} reason=\"{}\"",
                printable(&why),
                peer.ip(),
                printable(rq.called_ae_title.trim()),
                rj.result,
                rj.source
            );
            if let Err(e) =
                pdu_io::write_pdu(&mut stream, &Pdu::AssociationRJ(rj), peer, "A-ASSOCIATE-RJ")
                    .await
            {
                debug!("Cannot send A-ASSOCIATE-RJ: {e}. peer={peer}");
            }
            // A rejected peer never holds an association slot, however long it lingers.
            drop(active.take());
            linger_until_closed(&mut stream, artim).await;
        }
        Negotiation::Accept {
            ac,
            contexts,
            peer_max_pdu,
        } => {
            let accepted = contexts.len();
            let proposed = ac.presentation_contexts.len();
            log_refused_contexts(&rq, &ac, peer, &calling_ae);
            if let Err(e) =
                pdu_io::write_pdu(&mut stream, &Pdu::AssociationAC(ac), peer, "A-ASSOCIATE-AC")
                    .await
            {
                warn!("Cannot send A-ASSOCIATE-AC: {e}. peer={peer} calling_ae={calling_ae}");
                return;
            }
            info!(
                "Association accepted. peer={} calling_ae={calling_ae} contexts_accepted={accepted} contexts_proposed={proposed}",
                peer.ip()
            );
            let mut assoc = Association {
                stream,
                peer,
                calling_ae,
                contexts,
                peer_max_pdu,
                shared,
                assembler: PdvAssembler::default(),
                current: None,
                stored: 0,
                pdu_buf: BytesMut::new(),
            };
            // Established: the association counts against its slot, no longer as waiting.
            drop(waiting);
            assoc.serve(abort).await;
        }
    }
    drop(active);
}

/// One log line per refused presentation context, saying what the operator can do about it.
fn log_refused_contexts(
    rq: &AssociationRQ,
    ac: &AssociationAC,
    peer: SocketAddr,
    calling_ae: &str,
) {
    for result in &ac.presentation_contexts {
        let hint = match result.reason {
            PresentationContextResultReason::Acceptance => continue,
            PresentationContextResultReason::AbstractSyntaxNotSupported => {
                "not a storage SOP class; if it is a private storage class, add it to dicom.private_sop_classes"
            }
            PresentationContextResultReason::TransferSyntaxesNotSupported => {
                "none of the proposed transfer syntaxes is known; configure the modality to also propose a standard one"
            }
            PresentationContextResultReason::UserRejection
            | PresentationContextResultReason::NoReason => "refused",
        };
        let proposed = rq.presentation_contexts.iter().find(|p| p.id == result.id);
        info!(
            "Presentation context refused: {hint}. peer={} calling_ae={calling_ae} context_id={} abstract_syntax={} transfer_syntaxes={}",
            peer.ip(),
            result.id,
            proposed.map(|p| peer_text(&p.abstract_syntax)).unwrap_or_default(),
            proposed
                .map(|p| {
                    p.transfer_syntaxes
                        .iter()
                        .map(|t| peer_text(t))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default(),
        );
    }
    if ac
        .presentation_contexts
        .iter()
        .all(|r| r.reason != PresentationContextResultReason::Acceptance)
    {
        warn!(
            "Association accepted without any usable presentation context; the modality cannot send anything. peer={} calling_ae={calling_ae} Check the SOP classes and transfer syntaxes it proposes (see the lines above).",
            peer.ip()
        );
    }
}

fn abort_reason(e: &IngestError) -> AbortRQServiceProviderReason {
    match e {
        IngestError::PduTooLarge { .. } => AbortRQServiceProviderReason::InvalidPduParameter,
        IngestError::DecodePdu { .. } => AbortRQServiceProviderReason::UnrecognizedPdu,
        _ => AbortRQServiceProviderReason::ReasonNotSpecified,
    }
}

/// Sends an A-ABORT and closes our side. A peer that does not read (its window closed, our send
/// buffer full) gets up to `artim` for it; then the connection is dropped all the same, so that it
/// never holds its association slot.
async fn send_abort(
    stream: &mut TcpStream,
    peer: SocketAddr,
    reason: AbortRQServiceProviderReason,
    artim: Duration,
) {
    let abort = async {
        pdu_io::write_pdu(stream, &abort_pdu(reason), peer, "A-ABORT").await?;
        stream
            .shutdown()
            .await
            .map_err(|source| IngestError::WritePdu { peer, source })
    };
    match tokio::time::timeout(artim, abort).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!("Cannot send A-ABORT: {e}. peer={peer}"),
        Err(_) => info!(
            "Dropped a connection whose peer did not read our A-ABORT within the ARTIM timeout ({} s). peer={peer}",
            artim.as_secs()
        ),
    }
}

/// After a rejection or a release: close our side, then give the peer up to `artim` to close its own.
async fn linger_until_closed(stream: &mut TcpStream, artim: Duration) {
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 512];
    let _ = tokio::time::timeout(artim, async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
}

/// A message whose data set is being received.
enum InFlight {
    Store {
        cmd: Command,
        pc_id: u8,
        /// `None` once the store task stopped taking data (it failed): the rest is discarded.
        tx: Option<mpsc::Sender<Chunk>>,
        /// The SHA-256 of what was sent to the store task (`None` when it could not start).
        digest: Option<RawDigest>,
        task: JoinHandle<Result<Stored>>,
        bytes: u64,
    },
    /// A request we answer without storing (`field` and `status` of the response); its data set is
    /// read and dropped.
    Refuse {
        cmd: Command,
        pc_id: u8,
        field: u16,
        status: u16,
    },
}

enum Flow {
    Continue,
    Stop,
}

struct Association {
    stream: TcpStream,
    peer: SocketAddr,
    calling_ae: String,
    contexts: HashMap<u8, AcceptedContext>,
    peer_max_pdu: u32,
    shared: Arc<Shared>,
    assembler: PdvAssembler,
    current: Option<InFlight>,
    stored: u64,
    /// The PDU being read, reused from one PDU to the next (it keeps the capacity that earlier
    /// PDUs' bytes gave it, at most `max_pdu_length`): no reallocation and fewer reads per PDU.
    pdu_buf: BytesMut,
}

impl Association {
    fn ip(&self) -> std::net::IpAddr {
        self.peer.ip()
    }

    async fn serve(&mut self, mut abort: watch::Receiver<bool>) {
        let idle = self.shared.cfg.idle_timeout();
        let max_pdata = self.shared.cfg.max_pdu_length;
        loop {
            let read = tokio::select! {
                r = pdu_io::read_pdu_into(
                    &mut self.stream, self.peer, max_pdata, &mut self.pdu_buf, Some(idle),
                ) => r,
                _ = aborted(&mut abort) => {
                    warn!(
                        "Aborted association at shutdown: the grace period is over. peer={} calling_ae={} {}",
                        self.ip(), self.calling_ae, self.in_flight_note()
                    );
                    self.abort(AbortRQServiceProviderReason::ReasonNotSpecified).await;
                    return;
                }
            };
            let pdu = match read {
                Err(IngestError::WaitForPeer { .. }) => {
                    warn!(
                        "Aborted association: nothing received for {} s (dicom.idle_timeout_secs). peer={} calling_ae={} {}",
                        idle.as_secs(), self.ip(), self.calling_ae, self.in_flight_note()
                    );
                    self.abort(AbortRQServiceProviderReason::ReasonNotSpecified)
                        .await;
                    return;
                }
                Ok(None) => {
                    warn!(
                        "Connection closed without release. peer={} calling_ae={} {}",
                        self.ip(),
                        self.calling_ae,
                        self.in_flight_note()
                    );
                    return;
                }
                Err(e) => {
                    warn!(
                        "Aborted association: {e}. peer={} calling_ae={} {} {}",
                        self.ip(),
                        self.calling_ae,
                        self.in_flight_note(),
                        e.operator_hint()
                    );
                    self.abort(abort_reason(&e)).await;
                    return;
                }
                Ok(Some(pdu)) => pdu,
            };
            match self.on_pdu(pdu).await {
                Ok(Flow::Continue) => {}
                Ok(Flow::Stop) => return,
                Err(e) => {
                    warn!(
                        "Aborted association: {e}. peer={} calling_ae={} {} {}",
                        self.ip(),
                        self.calling_ae,
                        self.in_flight_note(),
                        e.operator_hint()
                    );
                    let reason = match e {
                        IngestError::UnexpectedPdu { .. } => {
                            AbortRQServiceProviderReason::UnexpectedPdu
                        }
                        _ => AbortRQServiceProviderReason::UnexpectedPduParameter,
                    };
                    self.abort(reason).await;
                    return;
                }
            }
        }
    }

    fn in_flight_note(&self) -> String {
        match &self.current {
            Some(InFlight::Store { cmd, .. }) => format!(
                "in_flight_sop_instance_uid={} (not stored; the modality must resend it)",
                cmd.sop_instance_uid
            ),
            _ => String::new(),
        }
    }

    async fn abort(&mut self, reason: AbortRQServiceProviderReason) {
        self.current = None; // dropping the sender makes the store task discard the partial file
        let artim = self.shared.cfg.artim_timeout();
        send_abort(&mut self.stream, self.peer, reason, artim).await;
    }

    async fn on_pdu(&mut self, pdu: Pdu) -> Result<Flow> {
        match pdu {
            Pdu::PData { data } => {
                for pdv in data {
                    if !self.contexts.contains_key(&pdv.presentation_context_id) {
                        return Err(self.violation(format!(
                            "a PDV used presentation context {}, which was not accepted",
                            pdv.presentation_context_id
                        )));
                    }
                    match self.assembler.push(pdv) {
                        Err(detail) => return Err(self.violation(detail)),
                        Ok(None) => {}
                        Ok(Some(Event::Command { pc_id, bytes })) => {
                            self.on_command(pc_id, &bytes).await?;
                        }
                        Ok(Some(Event::Data { pc_id, bytes, last })) => {
                            self.on_data(pc_id, bytes, last).await?;
                        }
                    }
                }
                Ok(Flow::Continue)
            }
            Pdu::ReleaseRQ => {
                let note = self.in_flight_note();
                self.current = None;
                let artim = self.shared.cfg.artim_timeout();
                let rp =
                    pdu_io::write_pdu(&mut self.stream, &Pdu::ReleaseRP, self.peer, "A-RELEASE-RP");
                let Ok(sent) = tokio::time::timeout(artim, rp).await else {
                    warn!(
                        "Dropped an association whose peer asked to release it but did not read the A-RELEASE-RP within the ARTIM timeout ({} s). peer={} calling_ae={} {note}",
                        artim.as_secs(),
                        self.ip(),
                        self.calling_ae
                    );
                    return Ok(Flow::Stop);
                };
                sent?;
                if note.is_empty() && self.assembler.is_idle() {
                    info!(
                        "Association released. peer={} calling_ae={} instances_stored={}",
                        self.ip(),
                        self.calling_ae,
                        self.stored
                    );
                } else {
                    warn!(
                        "Association released in the middle of a message. peer={} calling_ae={} {note}",
                        self.ip(),
                        self.calling_ae
                    );
                }
                linger_until_closed(&mut self.stream, self.shared.cfg.artim_timeout()).await;
                Ok(Flow::Stop)
            }
            Pdu::AbortRQ { source } => {
                let note = self.in_flight_note();
                self.current = None;
                if note.is_empty() {
                    info!(
                        "Association aborted by the peer. peer={} calling_ae={} source={source:?}",
                        self.ip(),
                        self.calling_ae
                    );
                } else {
                    warn!(
                        "Association aborted by the peer during a transfer. peer={} calling_ae={} source={source:?} {note}",
                        self.ip(),
                        self.calling_ae
                    );
                }
                Ok(Flow::Stop)
            }
            other => Err(IngestError::UnexpectedPdu {
                peer: self.peer,
                pdu: other.short_description().to_string(),
            }),
        }
    }

    fn violation(&self, detail: String) -> IngestError {
        IngestError::FollowProtocol {
            peer: self.peer,
            detail,
        }
    }

    async fn on_command(&mut self, pc_id: u8, bytes: &[u8]) -> Result<()> {
        let cmd = dimse::parse_command(bytes).map_err(|detail| IngestError::ParseCommand {
            peer: self.peer,
            detail,
        })?;
        let Some(ctx) = self.contexts.get(&pc_id).cloned() else {
            return Err(self.violation(format!("unknown presentation context {pc_id}")));
        };
        if cmd.has_dataset {
            self.assembler.expect_data(pc_id);
        }
        match cmd.field {
            dimse::C_ECHO_RQ if !cmd.has_dataset => {
                debug!(
                    "C-ECHO. peer={} calling_ae={} message_id={}",
                    self.ip(),
                    self.calling_ae,
                    cmd.message_id
                );
                self.respond(pc_id, dimse::C_ECHO_RSP, &cmd, STATUS_SUCCESS)
                    .await
            }
            dimse::C_STORE_RQ if !cmd.has_dataset => {
                warn!(
                    "C-STORE refused: the request announced no data set, so there is nothing to store. sop_instance_uid={} calling_ae={} peer={} status=0xC000 Check the modality's DICOM software; nothing was stored.",
                    peer_text(&cmd.sop_instance_uid), self.calling_ae, self.ip()
                );
                self.respond(pc_id, dimse::C_STORE_RSP, &cmd, STATUS_CANNOT_UNDERSTAND)
                    .await
            }
            dimse::C_STORE_RQ
                if ctx.service != Service::Storage
                    || trim_uid(&cmd.sop_class_uid) != trim_uid(&ctx.abstract_syntax) =>
            {
                // The SOP class is what was negotiated for the context (and what
                // `dicom.private_sop_classes` allows): another class on it is refused unread.
                warn!(
                    "C-STORE refused: its SOP Class is not the one negotiated for its presentation context. sop_class_uid={} context_id={pc_id} context_abstract_syntax={} sop_instance_uid={} calling_ae={} peer={} status=0x0122 Check the modality's DICOM export (it must propose a presentation context for each SOP class it sends); nothing was stored.",
                    peer_text(&cmd.sop_class_uid), peer_text(&ctx.abstract_syntax), peer_text(&cmd.sop_instance_uid), self.calling_ae, self.ip()
                );
                self.current = Some(InFlight::Refuse {
                    cmd,
                    pc_id,
                    field: dimse::C_STORE_RSP,
                    status: STATUS_SOP_CLASS_NOT_SUPPORTED,
                });
                Ok(())
            }
            dimse::C_STORE_RQ => {
                // PS3.7 C.5: an invalid SOP Instance UID is 0x0117 Invalid SOP Instance.
                let refused = match (bad_uid(&cmd.sop_class_uid), bad_uid(&cmd.sop_instance_uid)) {
                    (Some(why), _) => {
                        Some(("Affected SOP Class UID", why, STATUS_CANNOT_UNDERSTAND))
                    }
                    (None, Some(why)) => Some((
                        "Affected SOP Instance UID",
                        why,
                        STATUS_INVALID_SOP_INSTANCE,
                    )),
                    (None, None) => None,
                };
                match refused {
                    None => self.start_store(pc_id, cmd, &ctx),
                    Some((which, why, status)) => {
                        warn!(
                            "C-STORE refused: the command's {which} {why}. sop_class_uid=\"{}\" sop_instance_uid=\"{}\" calling_ae={} peer={} status={status:#06X} Check the modality's export (a UID is 1 to 64 digits and dots); nothing was stored.",
                            peer_text(&cmd.sop_class_uid), peer_text(&cmd.sop_instance_uid), self.calling_ae, self.ip()
                        );
                        self.current = Some(InFlight::Refuse {
                            cmd,
                            pc_id,
                            field: dimse::C_STORE_RSP,
                            status,
                        });
                    }
                }
                Ok(())
            }
            dimse::C_CANCEL_RQ => Ok(()),
            field if field & 0x8000 != 0 => {
                Err(self.violation(format!("a response command ({field:#06x}) sent to the SCP")))
            }
            field => {
                warn!(
                    "Refused a DIMSE request we do not serve. peer={} calling_ae={} command_field={field:#06x} context_abstract_syntax={} status=0x0211",
                    self.ip(), self.calling_ae, peer_text(&ctx.abstract_syntax)
                );
                if cmd.has_dataset {
                    self.current = Some(InFlight::Refuse {
                        cmd,
                        pc_id,
                        field: field | 0x8000,
                        status: STATUS_UNRECOGNIZED_OPERATION,
                    });
                    Ok(())
                } else {
                    self.respond(pc_id, field | 0x8000, &cmd, STATUS_UNRECOGNIZED_OPERATION)
                        .await
                }
            }
        }
    }

    fn start_store(&mut self, pc_id: u8, cmd: Command, ctx: &AcceptedContext) {
        let meta = IncomingMeta {
            sop_class_uid: cmd.sop_class_uid.clone(),
            sop_instance_uid: cmd.sop_instance_uid.clone(),
            transfer_syntax_uid: ctx.transfer_syntax.clone(),
            calling_ae: self.calling_ae.clone(),
            peer: self.peer.to_string(),
        };
        let (tx, rx) = mpsc::channel(STORE_CHANNEL_DEPTH);
        let spool = self.shared.spool.clone();
        // The header is hashed here and written there; a header that cannot be built fails the
        // store task, whose error is reported when it is joined.
        let (digest, task) = match store::part10_header(&meta) {
            Ok(header) => (
                Some(RawDigest::new(&header)),
                tokio::task::spawn_blocking(move || store::receive(spool, meta, header, rx)),
            ),
            Err(e) => (None, tokio::task::spawn_blocking(move || Err(e))),
        };
        self.current = Some(InFlight::Store {
            cmd,
            pc_id,
            tx: Some(tx),
            digest,
            task,
            bytes: 0,
        });
    }

    async fn on_data(&mut self, pc_id: u8, bytes: Vec<u8>, last: bool) -> Result<()> {
        match &mut self.current {
            Some(InFlight::Store {
                tx,
                digest,
                bytes: count,
                ..
            }) => {
                *count += bytes.len() as u64;
                if let (Some(sender), Some(digest)) = (tx.as_ref(), digest.as_mut()) {
                    // Hashed here, on this core, while the store task compresses and writes.
                    digest.update(&bytes);
                    if sender.send(Chunk::Data(bytes)).await.is_err() {
                        // The store task failed; it reports why when joined. Discard the rest.
                        *tx = None;
                    }
                }
            }
            Some(InFlight::Refuse { .. }) => {}
            None => {
                return Err(self.violation(format!(
                    "a data set on presentation context {pc_id} that no request announced"
                )))
            }
        }
        if last {
            self.finish_message().await?;
        }
        Ok(())
    }

    async fn finish_message(&mut self) -> Result<()> {
        match self.current.take() {
            None => Ok(()),
            Some(InFlight::Refuse {
                cmd,
                pc_id,
                field,
                status,
            }) => self.respond(pc_id, field, &cmd, status).await,
            Some(InFlight::Store {
                cmd,
                pc_id,
                tx,
                digest,
                task,
                bytes,
            }) => {
                if let (Some(sender), Some(digest)) = (tx, digest) {
                    let _ = sender.send(Chunk::End(digest)).await;
                }
                let result = match task.await {
                    Ok(r) => r,
                    Err(e) => Err(IngestError::RunStoreTask {
                        sop_instance_uid: cmd.sop_instance_uid.clone(),
                        detail: e.to_string(),
                    }),
                };
                let stored = match result {
                    Ok(stored) => stored,
                    Err(e) => {
                        let status = self.report_failure(&cmd, &e);
                        return self.respond(pc_id, dimse::C_STORE_RSP, &cmd, status).await;
                    }
                };
                // Committed, not yet acknowledged: the modality will send it again.
                passerelle_spool::crash_point!("ingest::store::before_response");
                // The response first: a log line (a write to journald) never delays an acknowledgement.
                let responded = self
                    .respond(pc_id, dimse::C_STORE_RSP, &cmd, STATUS_SUCCESS)
                    .await;
                self.report_stored(&cmd, bytes, stored);
                responded
            }
        }
    }

    /// Logs a stored instance (after its acknowledgement), counts it, and wakes the uplink.
    fn report_stored(&mut self, cmd: &Command, bytes: u64, stored: Stored) {
        let Stored { outcome, raw_bytes } = stored;
        match outcome {
            StoreOutcome::Stored { .. } | StoreOutcome::NewVersion { .. } => {
                info!(
                    "Stored instance. sop_instance_uid={} sop_class_uid={} calling_ae={} peer={} bytes={raw_bytes} dataset_bytes={bytes}",
                    cmd.sop_instance_uid, cmd.sop_class_uid, self.calling_ae, self.ip()
                );
                self.shared.stored.notify_one();
            }
            // The spool logs duplicates at INFO already.
            StoreOutcome::Duplicate { .. } => debug!(
                "Received an identical copy of an instance already held; answered success without queueing it again. sop_instance_uid={} calling_ae={} bytes={raw_bytes}",
                cmd.sop_instance_uid, self.calling_ae
            ),
        }
        self.stored += 1;
    }

    /// Logs a failed C-STORE (before its response, so that the line is there when the modality
    /// sees the status) and returns the status to send.
    fn report_failure(&self, cmd: &Command, e: &IngestError) -> u16 {
        let status = e.dimse_status();
        let line = format!(
            "C-STORE failed: {}. sop_instance_uid={} calling_ae={} peer={} status={status:#06X} {}",
            passerelle_spool::error_chain(e),
            cmd.sop_instance_uid,
            self.calling_ae,
            self.ip(),
            e.operator_hint()
        );
        if status == crate::error::STATUS_OUT_OF_RESOURCES {
            error!("{line}");
        } else {
            warn!("{line}");
        }
        status
    }

    async fn respond(&mut self, pc_id: u8, field: u16, cmd: &Command, status: u16) -> Result<()> {
        let bytes = dimse::build_response(field, cmd, status).map_err(|detail| {
            IngestError::BuildResponse {
                peer: self.peer,
                detail,
            }
        })?;
        for data in dimse::command_pdvs(pc_id, &bytes, self.peer_max_pdu) {
            let pdu = Pdu::PData { data };
            let write = pdu_io::write_pdu(&mut self.stream, &pdu, self.peer, "P-DATA-TF");
            let idle = self.shared.cfg.idle_timeout();
            tokio::time::timeout(idle, write)
                .await
                .map_err(|_| IngestError::WaitForPeer {
                    peer: self.peer,
                    secs: idle.as_secs(),
                    waiting_for: "it to read our response",
                })??;
        }
        Ok(())
    }
}

/// Why a UID from a command cannot be used (it goes into the Part-10 header, logs and STOW-RS):
/// `None` when it is 1 to 64 characters of digits and dots. Components that PS3.5 9.1 forbids but
/// that older modalities still write (a leading zero, as in a time "…0930", or an empty one) are
/// taken: refusing them would make such a modality fail every image, while the PACS takes them.
fn bad_uid(uid: &str) -> Option<&'static str> {
    if uid.is_empty() {
        Some("is missing")
    } else if uid.len() > 64 {
        Some("is longer than 64 characters")
    } else if !uid.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        Some("holds characters other than digits and dots")
    } else {
        None
    }
}

/// A peer-supplied text made safe for a log line (no control characters).
pub(crate) fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// The most characters of one peer-supplied field (a UID, an abstract syntax) put in a log line.
/// Real ones have at most 64; a data set element may hold a megabyte, a PDU field 64 KiB.
pub(crate) const MAX_LOGGED_FIELD: usize = 128;

/// A peer-supplied field made safe for a log line: [`printable`], and cut after
/// [`MAX_LOGGED_FIELD`] characters, saying how long it was.
pub(crate) fn peer_text(s: &str) -> String {
    let mut chars = s.chars();
    let mut out = printable(&chars.by_ref().take(MAX_LOGGED_FIELD).collect::<String>());
    if chars.next().is_some() {
        out.push_str(&format!("...(cut, {} bytes in all)", s.len()));
    }
    out
}

/// Resolves once the abort flag is set (never, if the flag's sender is gone).
async fn aborted(abort: &mut watch::Receiver<bool>) {
    let set = abort.wait_for(|a| *a).await.is_ok();
    if !set {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_uids_must_be_1_to_64_digits_and_dots() {
        let check = |uid: &str, ok: bool| assert_eq!(bad_uid(uid).is_none(), ok, "{uid:?}");
        check("1.2.840.10008.5.1.4.1.1.2", true);
        let longest = format!("{}11", "1.".repeat(31));
        assert_eq!(longest.len(), 64);
        check(&longest, true);
        check("", false);
        check(&"1".repeat(65), false);
        check("1.2.3\n4", false);
        check("1.2.abc", false);
        // Not PS3.5 9.1, but written by older modalities: taken, as the PACS takes them.
        check("1.2.840.113619.2.55.3.0930", true);
        check("1..2", true);
    }

    #[test]
    fn peer_texts_lose_their_control_characters_before_reaching_a_log_line() {
        assert_eq!(printable("CT1\nfake log line\r"), "CT1?fake log line?");
        assert_eq!(printable("MR_ROOM 2"), "MR_ROOM 2");
    }

    #[test]
    fn peer_fields_are_cut_after_128_characters_and_say_how_long_they_were() {
        assert_eq!(
            peer_text("1.2.840.10008.5.1.4.1.1.2"),
            "1.2.840.10008.5.1.4.1.1.2"
        );
        assert_eq!(peer_text("1.2\n3"), "1.2?3");
        let exact = "9".repeat(MAX_LOGGED_FIELD);
        assert_eq!(peer_text(&exact), exact);
        let long = format!("1.2.3\nFAKE line {}", "é".repeat(1 << 20));
        let shown = peer_text(&long);
        assert!(!shown.contains('\n'), "{shown}");
        assert!(shown.starts_with("1.2.3?FAKE line é"), "{shown}");
        assert!(
            shown.ends_with(&format!("...(cut, {} bytes in all)", long.len())),
            "{shown}"
        );
        assert_eq!(
            shown.chars().count(),
            MAX_LOGGED_FIELD + "...(cut, 2097168 bytes in all)".len()
        );
    }
}
