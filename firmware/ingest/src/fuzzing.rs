//! Entry points for the fuzz targets in `firmware/fuzz`: the parsers that see peer bytes, called
//! exactly as an association calls them. Not an API: hidden from the docs, may change at any time.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::pin::pin;
use std::task::{Context, Poll, Waker};

pub use dicom_ul::pdu::{PDataValue, PDataValueType, Pdu};

use crate::dimse::{self, Event, PdvAssembler};
use crate::negotiate::{self, Negotiation};
use crate::pdu_io;

fn peer() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 104))
}

/// Reads one PDU from the front of `bytes` with the association's strict reader (header check
/// against `max_pdata`, then dicom-ul's decoder). `Ok(None)` on an empty input; otherwise the PDU
/// and how many bytes it took.
pub fn read_pdu(bytes: &[u8], max_pdata: u32) -> Result<Option<(Pdu, usize)>, String> {
    let mut rest = bytes;
    let read = {
        let future = pin!(pdu_io::read_pdu(&mut rest, peer(), max_pdata));
        // A byte slice never makes a reader wait, so one poll finishes the read.
        match future.poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(r) => r,
            Poll::Pending => return Err("the PDU reader waited on an in-memory slice".into()),
        }
    };
    let consumed = bytes.len() - rest.len();
    read.map(|p| p.map(|pdu| (pdu, consumed)))
        .map_err(|e| e.to_string())
}

/// Encodes a PDU as the association does before sending it.
pub fn encode_pdu(pdu: &Pdu) -> Result<Vec<u8>, String> {
    pdu_io::encode(pdu, peer(), "PDU").map_err(|e| e.to_string())
}

/// Negotiates an A-ASSOCIATE-RQ against the default `[dicom]` configuration and returns the
/// answer PDU (A-ASSOCIATE-AC or -RJ) the association would send.
pub fn negotiate(rq: &dicom_ul::pdu::AssociationRQ, have_slot: bool) -> Pdu {
    let cfg = passerelle_config::DicomConfig::default();
    match negotiate::negotiate(rq, &cfg, have_slot) {
        Negotiation::Accept { ac, .. } => Pdu::AssociationAC(ac),
        Negotiation::Reject { rj, .. } => Pdu::AssociationRJ(rj),
    }
}

/// The request fields ingest takes from a command set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandFields {
    pub field: u16,
    pub message_id: u16,
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub has_dataset: bool,
}

/// Parses a command set (implicit VR little endian) as ingest does.
pub fn parse_command(bytes: &[u8]) -> Result<CommandFields, String> {
    dimse::parse_command(bytes).map(|c| CommandFields {
        field: c.field,
        message_id: c.message_id,
        sop_class_uid: c.sop_class_uid,
        sop_instance_uid: c.sop_instance_uid,
        has_dataset: c.has_dataset,
    })
}

/// Builds the response command set ingest would send to `rq` with `status`.
pub fn build_response(
    response_field: u16,
    rq: &CommandFields,
    status: u16,
) -> Result<Vec<u8>, String> {
    let cmd = dimse::Command {
        field: rq.field,
        message_id: rq.message_id,
        sop_class_uid: rq.sop_class_uid.clone(),
        sop_instance_uid: rq.sop_instance_uid.clone(),
        has_dataset: rq.has_dataset,
    };
    dimse::build_response(response_field, &cmd, status)
}

/// Splits a response command set into the P-DATA-TF PDUs ingest sends for `peer_max_pdu`.
pub fn command_pdvs(pc_id: u8, bytes: &[u8], peer_max_pdu: u32) -> Vec<Vec<PDataValue>> {
    dimse::command_pdvs(pc_id, bytes, peer_max_pdu)
}

/// What the PDV state machine made of one PDV.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A complete command set, parsed.
    Command { pc_id: u8, command: CommandFields },
    /// A data fragment of the current message.
    Data { pc_id: u8, len: usize, last: bool },
}

/// The association's PDV handling: fragments are joined by the state machine, each complete command
/// set is parsed, and a command announcing a data set makes the machine expect one.
#[derive(Debug, Default)]
pub struct PdvReceiver {
    assembler: PdvAssembler,
}

impl PdvReceiver {
    /// Feeds one PDV; an error is a protocol violation (the association would be aborted).
    pub fn push(&mut self, pdv: PDataValue) -> Result<Option<Message>, String> {
        match self.assembler.push(pdv)? {
            None => Ok(None),
            Some(Event::Command { pc_id, bytes }) => {
                let command = parse_command(&bytes)?;
                if command.has_dataset {
                    self.assembler.expect_data(pc_id);
                }
                Ok(Some(Message::Command { pc_id, command }))
            }
            Some(Event::Data { pc_id, bytes, last }) => Ok(Some(Message::Data {
                pc_id,
                len: bytes.len(),
                last,
            })),
        }
    }

    /// True between messages.
    pub fn is_idle(&self) -> bool {
        self.assembler.is_idle()
    }
}

/// The leading-element parser a C-STORE (and `rebuild-index`) reads a data set with, the spool's,
/// and the scan that runs it on the data set's first bytes as they stream in.
pub use passerelle_spool::leading::{parse_leading, Leading, StreamScan, PREFIX_CAP};

/// Follows a data set's element structure as the store task does (inflating a deflated one), fed
/// in `chunk`-byte pieces, and says whether it is whole: `Ok` if it ends at an element boundary.
pub fn walk_dataset(bytes: &[u8], ts_uid: &str, chunk: usize) -> Result<(), String> {
    use crate::boundary::{Encoding, Walk};
    let mut walk = Walk::new(Encoding::of_transfer_syntax(ts_uid));
    for piece in bytes.chunks(chunk.max(1)) {
        walk.feed(piece).map_err(|e| e.to_string())?;
    }
    walk.finish().map_err(|e| e.to_string())
}
