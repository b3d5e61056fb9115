//! Storing one instance: the blocking side of a C-STORE. It runs on a blocking thread, fed with
//! the data PDVs through a bounded channel, so at most a few PDUs of an instance are ever in RAM.

use dicom_object::meta::FileMetaTableBuilder;
use passerelle_spool::leading::Leading;
use passerelle_spool::{IncomingMeta, InstanceIndex, RawDigest, Spool, StoreOutcome};
use tokio::sync::mpsc;

use crate::boundary::{Encoding, Walk};
use crate::error::{IngestError, Result};
use crate::negotiate::trim_uid;
use crate::{IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME};

/// What the association task sends to the store task.
#[derive(Debug)]
pub(crate) enum Chunk {
    Data(Vec<u8>),
    /// The last data fragment was sent: finish, check and commit. The digest is the association
    /// task's SHA-256 of the Part-10 header and every data fragment it sent, hashed there so that
    /// hashing runs on another core than this task's compressing and writing.
    End(RawDigest),
}

/// A committed instance.
#[derive(Debug)]
pub(crate) struct Stored {
    pub outcome: StoreOutcome,
    pub raw_bytes: u64,
}

/// Builds the Part-10 header: 128-byte preamble, `DICM`, and the group 0002 file meta information.
pub(crate) fn part10_header(meta: &IncomingMeta) -> Result<Vec<u8>> {
    let err = |detail: String| IngestError::BuildPart10Header {
        sop_instance_uid: meta.sop_instance_uid.clone(),
        detail,
    };
    let mut builder = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(meta.sop_class_uid.as_str())
        .media_storage_sop_instance_uid(meta.sop_instance_uid.as_str())
        .transfer_syntax(meta.transfer_syntax_uid.as_str())
        .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
        .implementation_version_name(IMPLEMENTATION_VERSION_NAME);
    let calling = meta.calling_ae.trim();
    if !calling.is_empty() {
        builder = builder.source_application_entity_title(calling);
    }
    let table = builder.build().map_err(|e| err(e.to_string()))?;
    let mut out = vec![0u8; 128];
    out.extend_from_slice(b"DICM");
    table.write(&mut out).map_err(|e| err(e.to_string()))?;
    Ok(out)
}

/// Checks the parsed elements against the command and returns the spool index.
pub(crate) fn check_leading(leading: Leading, meta: &IncomingMeta) -> Result<InstanceIndex> {
    let uid = &meta.sop_instance_uid;
    let Some(dataset_uid) = leading.sop_instance_uid else {
        return Err(IngestError::ParseDataset {
            sop_instance_uid: uid.clone(),
            detail: "the data set has no SOP Instance UID (0008,0018) among its leading elements"
                .into(),
        });
    };
    if dataset_uid != trim_uid(uid) {
        return Err(IngestError::MatchSopInstance {
            command_uid: uid.clone(),
            dataset_uid,
        });
    }
    let Some(dataset_class) = leading.sop_class_uid else {
        return Err(IngestError::ParseDataset {
            sop_instance_uid: uid.clone(),
            detail: "the data set has no SOP Class UID (0008,0016)".into(),
        });
    };
    if dataset_class != trim_uid(&meta.sop_class_uid) {
        return Err(IngestError::MatchSopClass {
            sop_instance_uid: uid.clone(),
            command_class: meta.sop_class_uid.clone(),
            dataset_class,
        });
    }
    Ok(leading.index)
}

/// The store task: ensure space, write `header` (from [`part10_header`]) and the data as they
/// arrive, finish, check, commit. Returns early (dropping `rx`, which tells the sender to discard
/// the rest) on the first error.
pub(crate) fn receive(
    spool: Spool,
    meta: IncomingMeta,
    header: Vec<u8>,
    mut rx: mpsc::Receiver<Chunk>,
) -> Result<Stored> {
    let uid = meta.sop_instance_uid.clone();
    spool
        .ensure_space()
        .map_err(|source| IngestError::EnsureSpace {
            sop_instance_uid: uid.clone(),
            source,
        })?;
    let write_err = |source| IngestError::WriteSpool {
        sop_instance_uid: uid.clone(),
        source,
    };
    let decode_err = |problem| IngestError::DecodeDataset {
        sop_instance_uid: uid.clone(),
        problem,
    };
    // A deflated data set is inflated here for the walk only; the bytes stored are as received.
    let mut walk = Walk::new(Encoding::of_transfer_syntax(&meta.transfer_syntax_uid));
    let mut incoming = spool
        .begin_hashed_by_caller(meta.clone(), &header)
        .map_err(write_err)?;
    let digest = loop {
        match rx.blocking_recv() {
            Some(Chunk::Data(bytes)) => {
                walk.feed(&bytes).map_err(decode_err)?;
                incoming.write_all(&bytes).map_err(write_err)?;
                // Part of the data set is in the spool's temporary file, more PDVs are to come.
                passerelle_spool::crash_point!("ingest::receive::mid_dataset");
            }
            Some(Chunk::End(digest)) => break digest,
            None => {
                return Err(IngestError::ReceiveDataset {
                    sop_instance_uid: uid,
                })
            }
        }
    };
    drop(rx);
    // A data set cut short is refused before anything else is checked: dropping `incoming` removes
    // the file.
    walk.finish().map_err(decode_err)?;
    if let Some(inflated) = walk.unchecked_beyond() {
        log::warn!(
            "A deflated data set inflates further than its completeness is checked (to keep that check cheap, as against a decompression bomb): it was walked over its first {inflated} inflated bytes only, and is stored and forwarded as received. If the PACS finds it incomplete, have the modality send it in another transfer syntax. sop_instance_uid={uid} raw_bytes={}",
            incoming.raw_len()
        );
    }
    let mut written = incoming.finish_with(digest).map_err(write_err)?;
    // Found as the bytes streamed in (the file is read back only for leading elements over 1 MiB).
    let leading =
        written
            .leading()
            .map_err(write_err)?
            .map_err(|detail| IngestError::ParseDataset {
                sop_instance_uid: uid.clone(),
                detail,
            })?;
    let index = check_leading(leading, &meta)?;
    let raw_bytes = written.raw_len();
    let outcome = written
        .commit(index)
        .map_err(|source| IngestError::CommitInstance {
            sop_instance_uid: uid.clone(),
            source,
        })?;
    Ok(Stored { outcome, raw_bytes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_dictionary_std::uids;

    fn expected(uid: &str) -> Leading {
        Leading {
            sop_class_uid: Some(uids::CT_IMAGE_STORAGE.into()),
            sop_instance_uid: Some(uid.into()),
            index: InstanceIndex {
                study_instance_uid: "1.2.3.10".into(),
                series_instance_uid: "1.2.3.10.1".into(),
                patient_id: "PAT-7".into(),
                modality: "CT".into(),
                accession_number: "ACC1".into(),
            },
        }
    }

    fn meta(class: &str, uid: &str) -> IncomingMeta {
        IncomingMeta {
            sop_class_uid: class.into(),
            sop_instance_uid: uid.into(),
            transfer_syntax_uid: uids::EXPLICIT_VR_LITTLE_ENDIAN.into(),
            calling_ae: "CT1".into(),
            peer: "127.0.0.1:5000".into(),
        }
    }

    fn check(leading: Leading, meta: IncomingMeta, status: u16) {
        match check_leading(leading, &meta) {
            Ok(_) => assert_eq!(status, 0, "accepted"),
            Err(e) => assert_eq!(e.dimse_status(), status, "{e}"),
        }
    }

    #[test]
    fn uid_mismatches_answer_a900_and_missing_uids_answer_c000() {
        let ct = uids::CT_IMAGE_STORAGE;
        check(expected("1.2.3"), meta(ct, "1.2.3"), 0x0000);
        check(expected("1.2.3"), meta(ct, "1.2.3\0"), 0x0000);
        check(expected("1.2.3"), meta(ct, "1.2.4"), 0xA900);
        check(
            expected("1.2.3"),
            meta(uids::MR_IMAGE_STORAGE, "1.2.3"),
            0xA900,
        );
        check(Leading::default(), meta(ct, "1.2.3"), 0xC000);
        let mut no_class = expected("1.2.3");
        no_class.sop_class_uid = None;
        check(no_class, meta(ct, "1.2.3"), 0xC000);
    }

    #[test]
    fn the_part10_header_carries_command_uids_context_syntax_and_our_implementation() {
        let header = part10_header(&meta(uids::CT_IMAGE_STORAGE, "1.2.3.4.5")).unwrap();
        assert_eq!(&header[..128], &[0u8; 128][..]);
        assert_eq!(&header[128..132], b"DICM");
        let table = dicom_object::meta::FileMetaTable::from_reader(&header[128..]).unwrap();
        assert_eq!(
            trim_uid(table.media_storage_sop_class_uid()),
            uids::CT_IMAGE_STORAGE
        );
        assert_eq!(
            trim_uid(table.media_storage_sop_instance_uid()),
            "1.2.3.4.5"
        );
        assert_eq!(
            trim_uid(table.transfer_syntax()),
            uids::EXPLICIT_VR_LITTLE_ENDIAN
        );
        assert_eq!(
            trim_uid(table.implementation_class_uid()),
            IMPLEMENTATION_CLASS_UID
        );
        assert_eq!(
            table.implementation_version_name().map(str::trim),
            Some(IMPLEMENTATION_VERSION_NAME)
        );
        assert_eq!(
            table.source_application_entity_title().map(str::trim),
            Some("CT1")
        );
        let group_length = u32::from_le_bytes([header[140], header[141], header[142], header[143]]);
        assert_eq!(header.len(), 144 + group_length as usize);
    }
}
