use std::net::SocketAddr;

use passerelle_spool::SpoolError;

use crate::association::peer_text;

pub type Result<T, E = IngestError> = std::result::Result<T, E>;

/// DIMSE status: success.
pub const STATUS_SUCCESS: u16 = 0x0000;
/// DIMSE status: refused, out of resources (disk full, write error).
pub const STATUS_OUT_OF_RESOURCES: u16 = 0xA700;
/// DIMSE status: error, data set does not match SOP class (or the command's UIDs).
pub const STATUS_DATASET_MISMATCH: u16 = 0xA900;
/// DIMSE status: error, cannot understand.
pub const STATUS_CANNOT_UNDERSTAND: u16 = 0xC000;
/// DIMSE status: refused, unrecognized operation (a DIMSE command we do not serve).
pub const STATUS_UNRECOGNIZED_OPERATION: u16 = 0x0211;
/// Refused: SOP Class not supported (the command's class is not its presentation context's).
pub const STATUS_SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
/// Failure: Invalid SOP Instance (PS3.7 C.5: the command's Affected SOP Instance UID is not a UID).
pub const STATUS_INVALID_SOP_INSTANCE: u16 = 0x0117;

/// Everything that can go wrong in the Storage SCP. Variants are named after the action that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IngestError {
    #[error("Cannot accept a connection on the DICOM port")]
    Accept {
        #[source]
        source: std::io::Error,
    },

    #[error("Cannot read a PDU from {peer}")]
    ReadPdu {
        peer: SocketAddr,
        #[source]
        source: std::io::Error,
    },

    #[error("The PDU of type {pdu_type:#04x} from {peer} announces {length} bytes, more than the {max} bytes allowed")]
    PduTooLarge {
        peer: SocketAddr,
        pdu_type: u8,
        length: u32,
        max: u32,
    },

    #[error("Cannot decode the PDU of type {pdu_type:#04x} from {peer}: {detail}")]
    DecodePdu {
        peer: SocketAddr,
        pdu_type: u8,
        detail: String,
    },

    #[error(
        "{peer} sent {pdu} on an established association, where the protocol does not allow it"
    )]
    UnexpectedPdu { peer: SocketAddr, pdu: String },

    #[error("Cannot send a PDU to {peer}")]
    WritePdu {
        peer: SocketAddr,
        #[source]
        source: std::io::Error,
    },

    #[error("Cannot encode the {what} PDU for {peer}: {detail}")]
    EncodePdu {
        peer: SocketAddr,
        what: &'static str,
        detail: String,
    },

    #[error("{peer} made no progress for {secs} s while we waited for {waiting_for}")]
    WaitForPeer {
        peer: SocketAddr,
        secs: u64,
        waiting_for: &'static str,
    },

    #[error("{peer} broke the DICOM protocol: {detail}")]
    FollowProtocol { peer: SocketAddr, detail: String },

    #[error("Cannot parse the DIMSE command set from {peer}: {detail}")]
    ParseCommand { peer: SocketAddr, detail: String },

    #[error("Cannot build a DIMSE response for {peer}: {detail}")]
    BuildResponse { peer: SocketAddr, detail: String },

    #[error("Cannot build the Part-10 header for SOP Instance {sop_instance_uid}: {detail}")]
    BuildPart10Header {
        sop_instance_uid: String,
        detail: String,
    },

    #[error("The spool has no room for SOP Instance {sop_instance_uid}")]
    EnsureSpace {
        sop_instance_uid: String,
        #[source]
        source: SpoolError,
    },

    #[error("Cannot write SOP Instance {sop_instance_uid} to the spool")]
    WriteSpool {
        sop_instance_uid: String,
        #[source]
        source: SpoolError,
    },

    #[error("Cannot commit SOP Instance {sop_instance_uid} to the spool")]
    CommitInstance {
        sop_instance_uid: String,
        #[source]
        source: SpoolError,
    },

    #[error("The task storing SOP Instance {sop_instance_uid} failed: {detail}")]
    RunStoreTask {
        sop_instance_uid: String,
        detail: String,
    },

    #[error(
        "SOP Instance {sop_instance_uid} did not arrive completely (the association ended first)"
    )]
    ReceiveDataset { sop_instance_uid: String },

    #[error("Cannot parse the data set of SOP Instance {sop_instance_uid}: {detail}")]
    ParseDataset {
        sop_instance_uid: String,
        detail: String,
    },

    #[error(
        "The data set's SOP Instance UID {} differs from the command's {}",
        peer_text(dataset_uid),
        peer_text(command_uid)
    )]
    MatchSopInstance {
        command_uid: String,
        dataset_uid: String,
    },

    #[error(
        "The data set of SOP Instance {} has SOP Class {}, but the command says {}",
        peer_text(sop_instance_uid),
        peer_text(dataset_class),
        peer_text(command_class)
    )]
    MatchSopClass {
        sop_instance_uid: String,
        command_class: String,
        dataset_class: String,
    },

    #[error("The data set of SOP Instance {sop_instance_uid} {problem}; nothing was stored and the modality is told it failed")]
    DecodeDataset {
        sop_instance_uid: String,
        problem: WalkError,
    },
}

/// Why a data set's element structure ([`crate::boundary::Walker`]) does not hold: it ends
/// elsewhere than at an element boundary at the top level, or it does not decode; for a deflated
/// data set, also why its deflate stream does not hold. Tags are `gggg_eeee`; offsets count data
/// set bytes (inflated ones in a deflated data set), except where they say deflated bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalkError {
    #[error("ends inside element {} ({}{len} bytes announced by its header at byte {header_at}, the last {missing} of them missing): {TRUNCATED}", tag_text(*tag), vr_prefix(*vr))]
    EndsInValue {
        tag: u32,
        vr: Option<[u8; 2]>,
        len: u32,
        header_at: u64,
        missing: u64,
    },

    #[error("ends inside {} at byte {at}, after {have} bytes of its header: {TRUNCATED}", tag.map(|t| format!("element {}", tag_text(t))).unwrap_or_else(|| "an element".into()))]
    EndsInHeader {
        tag: Option<u32>,
        have: usize,
        at: u64,
    },

    #[error("ends inside element {}, in one of its items of undefined length, before the item delimiter (at byte {at}): {TRUNCATED}", tag_text(*tag))]
    EndsInItem { tag: u32, at: u64 },

    #[error("ends inside element {}, of undefined length, before its sequence delimiter (at byte {at}): {TRUNCATED}", tag_text(*tag))]
    EndsInSequence { tag: u32, at: u64 },

    #[error("does not decode: element {} at byte {at} has the VR {}, which is not a DICOM VR", tag_text(*tag), vr_text(*vr))]
    UnknownVr { tag: u32, vr: [u8; 2], at: u64 },

    #[error("does not decode: element {} at byte {at} has the VR {} and an undefined length, which only sequences, UN and encapsulated pixel data may have", tag_text(*tag), vr_text(*vr))]
    UndefinedLength { tag: u32, vr: [u8; 2], at: u64 },

    #[error("does not decode: {} at byte {at} stands where an element was expected ({})", tag_text(*tag), if *inside == 0 { "at the top level".to_string() } else { format!("in an item of {}", tag_text(*inside)) })]
    Misplaced { tag: u32, at: u64, inside: u32 },

    #[error("does not decode: element {} at byte {at} stands among the items of {}, where only items and the sequence delimiter may be", tag_text(*tag), tag_text(*of))]
    NotAnItem { tag: u32, of: u32, at: u64 },

    #[error("does not decode: a fragment of the encapsulated pixel data {} at byte {at} has an undefined length", tag_text(*tag))]
    FragmentWithoutLength { tag: u32, at: u64 },

    #[error("does not decode: element {} at byte {at} opens a sequence nested more than {max} deep", tag_text(*tag))]
    TooDeep { tag: u32, at: u64, max: usize },

    #[error("ends inside its deflate stream, after {received} deflated bytes (inflated to {inflated}), before the stream's end: {TRUNCATED}")]
    EndsInDeflateStream { received: u64, inflated: u64 },

    #[error("does not inflate: its deflate stream is corrupt in the deflated bytes from byte {at} on ({detail}): {CORRUPT}")]
    DoesNotInflate { at: u64, detail: String },

    #[error("does not decode: {extra} bytes follow the end of its deflate stream at deflated byte {end}, where only a NULL byte of padding or a gzip trailer of the inflated bytes (their CRC-32 and length) may be: {CORRUPT}")]
    AfterDeflateStream { end: u64, extra: u64 },
}

const TRUNCATED: &str = "the modality marked its last fragment too early or sent a truncated file";

const CORRUPT: &str = "the modality sent a corrupt file";

/// `(gggg,eeee)`.
fn tag_text(tag: u32) -> String {
    format!("({:04X},{:04X})", tag >> 16, tag & 0xFFFF)
}

/// A VR from the peer: its two letters, or its bytes in hex when they are not letters.
fn vr_text(vr: [u8; 2]) -> String {
    if vr.iter().all(u8::is_ascii_uppercase) {
        String::from_utf8_lossy(&vr).into_owned()
    } else {
        format!("0x{:02X}{:02X}", vr[0], vr[1])
    }
}

fn vr_prefix(vr: Option<[u8; 2]>) -> String {
    vr.map(|v| format!("{}, ", vr_text(v))).unwrap_or_default()
}

impl IngestError {
    /// The DIMSE status that answers a C-STORE which failed with this error: the one place where
    /// errors become statuses.
    ///
    /// Association-level errors (PDU and protocol failures) never produce a response: the
    /// association is aborted instead. They map to 0xC000 for completeness.
    pub fn dimse_status(&self) -> u16 {
        match self {
            IngestError::EnsureSpace { .. }
            | IngestError::WriteSpool { .. }
            | IngestError::CommitInstance { .. }
            | IngestError::RunStoreTask { .. }
            | IngestError::ReceiveDataset { .. } => STATUS_OUT_OF_RESOURCES,
            IngestError::MatchSopInstance { .. } | IngestError::MatchSopClass { .. } => {
                STATUS_DATASET_MISMATCH
            }
            IngestError::ParseDataset { .. }
            | IngestError::DecodeDataset { .. }
            | IngestError::BuildPart10Header { .. }
            | IngestError::Accept { .. }
            | IngestError::ReadPdu { .. }
            | IngestError::PduTooLarge { .. }
            | IngestError::DecodePdu { .. }
            | IngestError::WritePdu { .. }
            | IngestError::EncodePdu { .. }
            | IngestError::WaitForPeer { .. }
            | IngestError::FollowProtocol { .. }
            | IngestError::UnexpectedPdu { .. }
            | IngestError::ParseCommand { .. }
            | IngestError::BuildResponse { .. } => STATUS_CANNOT_UNDERSTAND,
        }
    }

    /// What the operator (or the modality's operator) should do about this error: for a failed
    /// C-STORE, the end of its log line; for an aborted association, the end of that line. It
    /// names the side at fault: the spool's disk (full or failing), a defect of ours, the
    /// modality's export or DICOM software, or the network.
    pub fn operator_hint(&self) -> &'static str {
        match self {
            IngestError::EnsureSpace { source, .. }
            | IngestError::WriteSpool { source, .. }
            | IngestError::CommitInstance { source, .. } => spool_hint(source),
            IngestError::RunStoreTask { .. } | IngestError::BuildPart10Header { .. } => HINT_DEFECT,
            IngestError::ReceiveDataset { .. } => {
                "The association ended before the data set was complete; the modality must send it again."
            }
            IngestError::MatchSopInstance { .. } | IngestError::MatchSopClass { .. } => {
                "Check the modality's export: its command and data set disagree; nothing was stored."
            }
            IngestError::DecodeDataset { .. } => "Check the modality's export of this image.",
            IngestError::ParseDataset { .. } => {
                "Check the modality's export of this instance; nothing was stored."
            }
            IngestError::FollowProtocol { .. }
            | IngestError::UnexpectedPdu { .. }
            | IngestError::ParseCommand { .. }
            | IngestError::DecodePdu { .. } => HINT_PEER_SOFTWARE,
            IngestError::PduTooLarge { .. } => {
                "The modality sent a PDU larger than the maximum length we announced (dicom.max_pdu_length), which its DICOM software must respect: report it to the modality's vendor, or raise dicom.max_pdu_length. The modality must send again what was not acknowledged."
            }
            IngestError::ReadPdu { .. } | IngestError::WritePdu { .. } => {
                "The connection failed: check the network between the modality and this box; the modality must send again what was not acknowledged."
            }
            IngestError::WaitForPeer { .. } => {
                "The modality stopped sending or reading: check the modality and the network between it and this box; it must send again what was not acknowledged."
            }
            IngestError::EncodePdu { .. } | IngestError::BuildResponse { .. } => HINT_DEFECT,
            IngestError::Accept { .. } => {
                "Check the process's file descriptor limit and the system's memory."
            }
        }
    }
}

/// A defect of passerelled's, not of the data, the disk or the modality.
const HINT_DEFECT: &str = "This is a defect in passerelled: report it to the vendor with these log lines; nothing was stored and the modality may resend.";

/// The modality's DICOM software broke the protocol.
const HINT_PEER_SOFTWARE: &str = "The modality's DICOM software broke the DICOM protocol (not the network, not this box): report it to the modality's vendor with this line; the modality must send again what was not acknowledged.";

const HINT_DISK_FULL: &str = "Free space on the spool partition: it is full, and no instance confirmed by the upstream is left to evict (check the uplink's log lines); the modality may resend.";

const HINT_DISK_ERROR: &str = "The spool disk failed: check it (kernel log, SMART, mount state and permissions of the spool directory); the modality may resend.";

/// The hint for a spool failure on the way to storing an instance.
fn spool_hint(e: &SpoolError) -> &'static str {
    use std::io::ErrorKind;
    match e {
        SpoolError::DiskFull { .. } => HINT_DISK_FULL,
        SpoolError::Digest { .. } => HINT_DEFECT,
        SpoolError::Statvfs { .. } => {
            "Passerelle cannot read the spool partition's free space: check the disk and its mount (kernel log); the modality may resend."
        }
        SpoolError::Database { .. } => {
            "The spool database failed: check the spool partition's free space and the disk (kernel log); if neither explains it, report it to the vendor with these log lines. The modality may resend."
        }
        SpoolError::StartThread { .. } => {
            "The system could not start a thread: check the memory and the process limits; the modality may resend."
        }
        SpoolError::Write { source, .. }
        | SpoolError::Read { source, .. }
        | SpoolError::Sync { source, .. }
        | SpoolError::CreateDir { source, .. }
            if matches!(
                source.kind(),
                ErrorKind::StorageFull | ErrorKind::QuotaExceeded
            ) =>
        {
            HINT_DISK_FULL
        }
        _ => HINT_DISK_ERROR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn check(e: IngestError, status: u16) {
        assert_eq!(e.dimse_status(), status, "{e}");
    }

    fn io() -> SpoolError {
        SpoolError::Write {
            path: PathBuf::from("/spool/tmp/x"),
            source: std::io::Error::other("EIO"),
        }
    }

    #[test]
    fn store_failures_map_to_a700_a900_or_c000() {
        let uid = || "1.2.3".to_string();
        check(
            IngestError::EnsureSpace {
                sop_instance_uid: uid(),
                source: SpoolError::DiskFull {
                    free_mb: 10,
                    min_free_mb: 1024,
                },
            },
            STATUS_OUT_OF_RESOURCES,
        );
        check(
            IngestError::WriteSpool {
                sop_instance_uid: uid(),
                source: io(),
            },
            STATUS_OUT_OF_RESOURCES,
        );
        check(
            IngestError::CommitInstance {
                sop_instance_uid: uid(),
                source: io(),
            },
            STATUS_OUT_OF_RESOURCES,
        );
        check(
            IngestError::RunStoreTask {
                sop_instance_uid: uid(),
                detail: "panicked".into(),
            },
            STATUS_OUT_OF_RESOURCES,
        );
        check(
            IngestError::MatchSopInstance {
                command_uid: uid(),
                dataset_uid: "1.2.4".into(),
            },
            STATUS_DATASET_MISMATCH,
        );
        check(
            IngestError::MatchSopClass {
                sop_instance_uid: uid(),
                command_class: "1.2.840.10008.5.1.4.1.1.2".into(),
                dataset_class: "1.2.840.10008.5.1.4.1.1.4".into(),
            },
            STATUS_DATASET_MISMATCH,
        );
        check(
            IngestError::ParseDataset {
                sop_instance_uid: uid(),
                detail: "garbage".into(),
            },
            STATUS_CANNOT_UNDERSTAND,
        );
        check(
            IngestError::BuildPart10Header {
                sop_instance_uid: uid(),
                detail: "bad".into(),
            },
            STATUS_CANNOT_UNDERSTAND,
        );
    }

    #[test]
    fn a_data_set_cut_short_answers_c000_with_a_sentence_naming_the_element_and_the_cause() {
        let e = IngestError::DecodeDataset {
            sop_instance_uid: "1.2.3".into(),
            problem: WalkError::EndsInValue {
                tag: 0x7FE0_0010,
                vr: Some(*b"OW"),
                len: 524_288,
                header_at: 1200,
                missing: 1000,
            },
        };
        assert_eq!(e.dimse_status(), STATUS_CANNOT_UNDERSTAND);
        assert_eq!(
            e.to_string(),
            "The data set of SOP Instance 1.2.3 ends inside element (7FE0,0010) (OW, 524288 bytes \
             announced by its header at byte 1200, the last 1000 of them missing): the modality \
             marked its last fragment too early or sent a truncated file; nothing was stored and \
             the modality is told it failed"
        );
        assert_eq!(
            e.operator_hint(),
            "Check the modality's export of this image."
        );
    }

    #[test]
    fn a_deflated_data_set_cut_short_answers_c000_with_a_sentence_saying_so() {
        let e = IngestError::DecodeDataset {
            sop_instance_uid: "1.2.3".into(),
            problem: WalkError::EndsInDeflateStream {
                received: 8000,
                inflated: 40_000,
            },
        };
        assert_eq!(e.dimse_status(), STATUS_CANNOT_UNDERSTAND);
        assert_eq!(
            e.to_string(),
            "The data set of SOP Instance 1.2.3 ends inside its deflate stream, after 8000 \
             deflated bytes (inflated to 40000), before the stream's end: the modality marked its \
             last fragment too early or sent a truncated file; nothing was stored and the \
             modality is told it failed"
        );
    }

    #[test]
    fn data_set_uids_reach_the_log_line_without_control_characters_and_cut_to_128_characters() {
        // The leading-element parser takes values of up to 1 MiB.
        let huge = format!("1.2.3\r\nINFO forged line {}", "7".repeat(1 << 20));
        let lines = [
            IngestError::MatchSopInstance {
                command_uid: "1.2.3".into(),
                dataset_uid: huge.clone(),
            }
            .to_string(),
            IngestError::MatchSopClass {
                sop_instance_uid: "1.2.3".into(),
                command_class: "1.2.840.10008.5.1.4.1.1.2".into(),
                dataset_class: huge.clone(),
            }
            .to_string(),
        ];
        for line in lines {
            assert!(!line.contains(['\r', '\n']), "{line}");
            assert!(line.contains("1.2.3??INFO forged line 777"), "{line}");
            assert!(line.contains("...(cut, 1048600 bytes in all)"), "{line}");
            assert!(line.len() < 400, "{} bytes", line.len());
        }
    }

    #[test]
    fn every_failure_status_comes_with_advice_for_the_operator() {
        let full = IngestError::EnsureSpace {
            sop_instance_uid: "1.2.3".into(),
            source: SpoolError::DiskFull {
                free_mb: 1,
                min_free_mb: 2,
            },
        };
        assert!(full.operator_hint().contains("Free space"));
        let mismatch = IngestError::MatchSopInstance {
            command_uid: "1".into(),
            dataset_uid: "2".into(),
        };
        assert!(mismatch.operator_hint().contains("disagree"));
    }

    fn io_error(kind: std::io::ErrorKind) -> SpoolError {
        SpoolError::Write {
            path: PathBuf::from("/spool/objects/ab/x.dcm.zst"),
            source: std::io::Error::from(kind),
        }
    }

    /// Each 0xA700 (and every other error) names the side at fault: a full disk, a failing disk, a
    /// defect of ours, the modality's export or DICOM software, or the network.
    #[test]
    fn the_hint_names_the_cause_a_disk_full_a_disk_error_a_defect_or_the_modality() {
        use std::io::ErrorKind;
        let peer: SocketAddr = "192.0.2.7:104".parse().unwrap();
        let uid = || "1.2.3".to_string();
        let write = |source| IngestError::WriteSpool {
            sop_instance_uid: uid(),
            source,
        };
        let full = "Free space on the spool partition";
        let disk = "check it (kernel log, SMART";
        let defect = "defect in passerelled: report it to the vendor";
        let peer_software = "The modality's DICOM software broke the DICOM protocol";
        let cases: Vec<(IngestError, &str)> = vec![
            (
                IngestError::EnsureSpace {
                    sop_instance_uid: uid(),
                    source: SpoolError::DiskFull {
                        free_mb: 1,
                        min_free_mb: 2,
                    },
                },
                full,
            ),
            (write(io_error(ErrorKind::StorageFull)), full),
            (
                IngestError::CommitInstance {
                    sop_instance_uid: uid(),
                    source: SpoolError::Sync {
                        path: PathBuf::from("/spool"),
                        source: std::io::Error::from_raw_os_error(28), // ENOSPC
                    },
                },
                full,
            ),
            (write(io_error(ErrorKind::QuotaExceeded)), full),
            (write(io()), disk),
            (write(io_error(ErrorKind::PermissionDenied)), disk),
            (write(io_error(ErrorKind::ReadOnlyFilesystem)), disk),
            (
                IngestError::CommitInstance {
                    sop_instance_uid: uid(),
                    source: SpoolError::StartThread {
                        what: "the compactor",
                        source: std::io::Error::from(ErrorKind::OutOfMemory),
                    },
                },
                "could not start a thread",
            ),
            (
                IngestError::CommitInstance {
                    sop_instance_uid: uid(),
                    source: SpoolError::Digest {
                        sop_instance_uid: uid(),
                        detail: "the caller hashed 10 bytes, the spool wrote 12".into(),
                    },
                },
                defect,
            ),
            (
                IngestError::RunStoreTask {
                    sop_instance_uid: uid(),
                    detail: "task 7 panicked".into(),
                },
                defect,
            ),
            (
                IngestError::BuildResponse {
                    peer,
                    detail: "x".into(),
                },
                defect,
            ),
            (
                IngestError::FollowProtocol {
                    peer,
                    detail: "a PDV used presentation context 3, which was not accepted".into(),
                },
                peer_software,
            ),
            (
                IngestError::UnexpectedPdu {
                    peer,
                    pdu: "A-ASSOCIATE-RQ".into(),
                },
                peer_software,
            ),
            (
                IngestError::ParseCommand {
                    peer,
                    detail: "x".into(),
                },
                peer_software,
            ),
            (
                IngestError::PduTooLarge {
                    peer,
                    pdu_type: 4,
                    length: 1 << 20,
                    max: 16384,
                },
                "report it to the modality's vendor, or raise dicom.max_pdu_length",
            ),
            (
                IngestError::WritePdu {
                    peer,
                    source: std::io::Error::from(ErrorKind::BrokenPipe),
                },
                "check the network",
            ),
            (
                IngestError::ParseDataset {
                    sop_instance_uid: uid(),
                    detail: "x".into(),
                },
                "Check the modality's export",
            ),
        ];
        for (e, expected) in cases {
            let hint = e.operator_hint();
            assert!(hint.contains(expected), "{e:?}: {hint}");
            if expected != full {
                assert!(!hint.contains("Free space"), "{e:?}: {hint}");
            }
        }
    }
}
