//! Storing one instance: the blocking side of a C-STORE. It runs on a blocking thread, fed with
//! the data PDVs through a bounded channel, so at most a few PDUs of an instance are ever in RAM.

use std::io::{BufReader, Read};

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_encoding::transfer_syntax::{Codec, TransferSyntaxIndex};
use dicom_object::meta::FileMetaTableBuilder;
use dicom_parser::dataset::{DataSetReader, DataToken};
use dicom_transfer_syntax_registry::{entries, TransferSyntaxRegistry};
use passerelle_spool::{IncomingMeta, InstanceIndex, Spool, StoreOutcome};
use tokio::sync::mpsc;

use crate::error::{IngestError, Result};
use crate::negotiate::trim_uid;
use crate::{IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME};

/// A leading element whose value claims more than this stops the parsing there (the value would be
/// allocated in full). Real identifiers are tiny.
pub(crate) const MAX_LEADING_VALUE: u32 = 1024 * 1024;

/// What the association task sends to the store task.
#[derive(Debug)]
pub(crate) enum Chunk {
    Data(Vec<u8>),
    /// The last data fragment was sent: finish, check and commit.
    End,
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

/// The leading elements of a data set.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Leading {
    pub sop_class_uid: Option<String>,
    pub sop_instance_uid: Option<String>,
    pub index: InstanceIndex,
}

fn clean(s: &str) -> String {
    s.trim_matches(|c: char| c == '\0' || c == ' ').to_string()
}

/// Parses the data set's leading elements, stopping at the first top-level element after
/// (0020,000E) Series Instance UID: pixel data is never read. Deflated transfer syntaxes are
/// inflated on the fly.
pub(crate) fn parse_leading(
    dataset: impl Read,
    ts_uid: &str,
) -> std::result::Result<Leading, String> {
    let ts = TransferSyntaxRegistry
        .get(trim_uid(ts_uid))
        .ok_or_else(|| format!("unknown transfer syntax {ts_uid}"))?;
    if matches!(ts.codec(), Codec::Dataset(_)) {
        let inflated = BufReader::new(flate2::read::DeflateDecoder::new(BufReader::new(dataset)));
        scan(inflated, &entries::EXPLICIT_VR_LITTLE_ENDIAN.erased())
    } else {
        scan(BufReader::new(dataset), ts)
    }
}

fn scan(
    source: impl Read,
    ts: &dicom_encoding::TransferSyntax,
) -> std::result::Result<Leading, String> {
    const LAST: Tag = tags::SERIES_INSTANCE_UID;
    let mut tokens = DataSetReader::new_with_ts(source, ts).map_err(|e| e.to_string())?;
    let mut leading = Leading::default();
    let mut depth = 0usize;
    while let Some(token) = tokens.next() {
        match token.map_err(|e| e.to_string())? {
            DataToken::ElementHeader(h) => {
                if depth == 0 && h.tag > LAST {
                    break;
                }
                if h.len.get().is_some_and(|l| l > MAX_LEADING_VALUE) {
                    log::debug!(
                        "Stopped parsing leading elements at {} (value of {} bytes).",
                        h.tag,
                        h.len.0
                    );
                    break;
                }
                let slot = match (depth, h.tag) {
                    (0, tags::SOP_CLASS_UID) => Some(&mut leading.sop_class_uid),
                    (0, tags::SOP_INSTANCE_UID) => Some(&mut leading.sop_instance_uid),
                    _ => None,
                };
                let field = match (depth, h.tag) {
                    (0, tags::STUDY_INSTANCE_UID) => Some(&mut leading.index.study_instance_uid),
                    (0, tags::SERIES_INSTANCE_UID) => Some(&mut leading.index.series_instance_uid),
                    (0, tags::PATIENT_ID) => Some(&mut leading.index.patient_id),
                    (0, tags::MODALITY) => Some(&mut leading.index.modality),
                    (0, tags::ACCESSION_NUMBER) => Some(&mut leading.index.accession_number),
                    _ => None,
                };
                if slot.is_some() || field.is_some() {
                    let value = match tokens.next() {
                        Some(Ok(DataToken::PrimitiveValue(v))) => clean(&v.to_str()),
                        Some(Err(e)) => return Err(e.to_string()),
                        Some(Ok(other)) => {
                            return Err(format!("expected the value of {}, got {other}", h.tag))
                        }
                        None => return Err(format!("the data set ends inside {}", h.tag)),
                    };
                    if let Some(slot) = slot {
                        *slot = Some(value);
                    } else if let Some(field) = field {
                        *field = value;
                    }
                }
            }
            DataToken::SequenceStart { tag, .. } => {
                if depth == 0 && tag > LAST {
                    break;
                }
                depth += 1;
            }
            DataToken::PixelSequenceStart => {
                if depth == 0 {
                    break;
                }
                depth += 1;
            }
            DataToken::SequenceEnd => depth = depth.saturating_sub(1),
            DataToken::ItemStart { .. }
            | DataToken::ItemEnd
            | DataToken::PrimitiveValue(_)
            | DataToken::ItemValue(_)
            | DataToken::OffsetTable(_) => {}
        }
    }
    Ok(leading)
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

/// The store task: ensure space, write header and data as they arrive, finish, check, commit.
/// Returns early (dropping `rx`, which tells the sender to discard the rest) on the first error.
pub(crate) fn receive(
    spool: Spool,
    meta: IncomingMeta,
    mut rx: mpsc::Receiver<Chunk>,
) -> Result<Stored> {
    let uid = meta.sop_instance_uid.clone();
    spool
        .ensure_space()
        .map_err(|source| IngestError::EnsureSpace {
            sop_instance_uid: uid.clone(),
            source,
        })?;
    let header = part10_header(&meta)?;
    let write_err = |source| IngestError::WriteSpool {
        sop_instance_uid: uid.clone(),
        source,
    };
    let mut incoming = spool.begin(meta.clone(), &header).map_err(write_err)?;
    loop {
        match rx.blocking_recv() {
            Some(Chunk::Data(bytes)) => {
                incoming.write_all(&bytes).map_err(write_err)?;
                // Part of the data set is in the spool's temporary file, more PDVs are to come.
                passerelle_spool::crash_point!("ingest::receive::mid_dataset");
            }
            Some(Chunk::End) => break,
            None => {
                return Err(IngestError::ReceiveDataset {
                    sop_instance_uid: uid,
                })
            }
        }
    }
    drop(rx);
    let written = incoming.finish().map_err(write_err)?;
    let index = {
        let reader = written.dataset_reader().map_err(write_err)?;
        // The parser sees peer bytes: should it ever panic, that is a data set we cannot
        // understand, not a crash.
        let parsed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            parse_leading(reader, &meta.transfer_syntax_uid)
        }))
        .unwrap_or_else(|_| Err("the DICOM parser failed on this data set".into()));
        let leading = parsed.map_err(|detail| IngestError::ParseDataset {
            sop_instance_uid: uid.clone(),
            detail,
        })?;
        check_leading(leading, &meta)?
    };
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
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::uids;
    use dicom_object::InMemDicomObject;
    use std::io::Write;

    fn dataset(ts: &str, sop_instance: &str) -> Vec<u8> {
        let mut obj = InMemDicomObject::new_empty();
        let put = |obj: &mut InMemDicomObject, tag, vr, v: &str| {
            obj.put(DataElement::new(tag, vr, PrimitiveValue::from(v)))
        };
        put(
            &mut obj,
            tags::SOP_CLASS_UID,
            VR::UI,
            uids::CT_IMAGE_STORAGE,
        );
        put(&mut obj, tags::SOP_INSTANCE_UID, VR::UI, sop_instance);
        put(&mut obj, tags::ACCESSION_NUMBER, VR::SH, "ACC1");
        put(&mut obj, tags::MODALITY, VR::CS, "CT");
        put(&mut obj, tags::PATIENT_ID, VR::LO, "PAT-7");
        put(&mut obj, tags::STUDY_INSTANCE_UID, VR::UI, "1.2.3.10");
        put(&mut obj, tags::SERIES_INSTANCE_UID, VR::UI, "1.2.3.10.1");
        put(&mut obj, tags::SERIES_NUMBER, VR::IS, "1");
        obj.put(DataElement::new(
            tags::PIXEL_DATA,
            VR::OW,
            PrimitiveValue::from(vec![0u8; 64]),
        ));
        let write_ts = TransferSyntaxRegistry.get(ts).unwrap();
        let mut out = Vec::new();
        if matches!(write_ts.codec(), Codec::Dataset(_)) {
            let mut plain = Vec::new();
            obj.write_dataset_with_ts(&mut plain, &entries::EXPLICIT_VR_LITTLE_ENDIAN.erased())
                .unwrap();
            let mut enc =
                flate2::write::DeflateEncoder::new(&mut out, flate2::Compression::default());
            enc.write_all(&plain).unwrap();
            enc.finish().unwrap();
        } else {
            obj.write_dataset_with_ts(&mut out, write_ts).unwrap();
        }
        out
    }

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

    #[test]
    #[allow(deprecated)] // explicit VR big endian is retired, yet still sent
    fn leading_elements_are_found_in_every_native_and_deflated_encoding() {
        for ts in [
            uids::IMPLICIT_VR_LITTLE_ENDIAN,
            uids::EXPLICIT_VR_LITTLE_ENDIAN,
            uids::EXPLICIT_VR_BIG_ENDIAN,
            uids::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
        ] {
            let bytes = dataset(ts, "1.2.3.4.5");
            assert_eq!(
                parse_leading(&bytes[..], ts),
                Ok(expected("1.2.3.4.5")),
                "{ts}"
            );
        }
    }

    #[test]
    fn parsing_stops_before_pixel_data_even_when_pixel_data_is_truncated() {
        let mut bytes = dataset(uids::EXPLICIT_VR_LITTLE_ENDIAN, "1.2.3.4.5");
        bytes.truncate(bytes.len() - 30);
        assert_eq!(
            parse_leading(&bytes[..], uids::EXPLICIT_VR_LITTLE_ENDIAN),
            Ok(expected("1.2.3.4.5"))
        );
    }

    #[test]
    fn a_leading_value_claiming_gigabytes_stops_parsing_without_allocating_it() {
        // (0008,0016) UI with a 4-byte length field of 0xFFFFFFF0 in implicit VR LE.
        let mut bytes = vec![0x08, 0x00, 0x16, 0x00];
        bytes.extend_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        bytes.extend_from_slice(b"1.2");
        let leading = parse_leading(&bytes[..], uids::IMPLICIT_VR_LITTLE_ENDIAN).unwrap();
        assert_eq!(leading, Leading::default());
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
    fn garbage_is_not_understood_but_out_of_order_elements_are_tolerated() {
        let garbage = b"this is certainly not a DICOM data set, just text".to_vec();
        let leading =
            parse_leading(&garbage[..], uids::EXPLICIT_VR_LITTLE_ENDIAN).unwrap_or_default();
        assert_eq!(leading.sop_instance_uid, None);

        // (0010,0020) before group 0008 is invalid DICOM, yet passed through: what matters is
        // that the identifiers are found.
        let mut swapped = vec![0x10, 0x00, 0x20, 0x00, 2, 0, 0, 0, b'P', b'1'];
        swapped.extend(dataset(uids::IMPLICIT_VR_LITTLE_ENDIAN, "1.2.3.4.5"));
        assert_eq!(
            parse_leading(&swapped[..], uids::IMPLICIT_VR_LITTLE_ENDIAN),
            Ok(expected("1.2.3.4.5"))
        );

        // A data set cut inside its leading elements cannot be understood.
        let whole = dataset(uids::EXPLICIT_VR_LITTLE_ENDIAN, "1.2.3.4.5");
        assert!(parse_leading(&whole[..40], uids::EXPLICIT_VR_LITTLE_ENDIAN).is_err());
        assert!(parse_leading(&b""[..], "1.2.3.999").is_err());
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
