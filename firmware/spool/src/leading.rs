//! The leading elements of a data set: the SOP Class and Instance UIDs that ingest checks against
//! the C-STORE command, and the study, series, patient, modality and accession number the queue is
//! indexed by. Ingest reads them from every instance it receives; `rebuild-index` from every spool
//! file. One parser serves both (and the `leading` fuzz target).
//!
//! Parsing stops at the first top-level element after (0020,000E) Series Instance UID, so pixel
//! data is never read into memory; a leading element whose value claims more than
//! [`MAX_LEADING_VALUE`] also ends it (the value would be allocated in full). Deflated transfer
//! syntaxes are inflated on the fly.

use std::io::{BufReader, Read};

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_encoding::transfer_syntax::{Codec, TransferSyntaxIndex};
use dicom_parser::dataset::{DataSetReader, DataToken};
use dicom_transfer_syntax_registry::{entries, TransferSyntaxRegistry};

use crate::InstanceIndex;

/// A leading element whose value claims more than this stops the parsing there. Real identifiers
/// are tiny.
pub const MAX_LEADING_VALUE: u32 = 1024 * 1024;

/// The leading elements of a data set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leading {
    /// (0008,0016), trimmed of padding.
    pub sop_class_uid: Option<String>,
    /// (0008,0018), trimmed of padding.
    pub sop_instance_uid: Option<String>,
    /// The index fields (empty when absent).
    pub index: InstanceIndex,
}

fn clean(s: &str) -> String {
    s.trim_matches(|c: char| c == '\0' || c == ' ').to_string()
}

/// Parses the data set's leading elements, encoded in `ts_uid` (padding allowed), stopping at the
/// first top-level element after (0020,000E) Series Instance UID. An `Err` says why the data set
/// cannot be understood. The parser sees peer bytes: daemon paths call it through
/// [`parse_leading_caught`].
pub fn parse_leading(dataset: impl Read, ts_uid: &str) -> Result<Leading, String> {
    let ts_uid = ts_uid.trim_matches(|c: char| c == '\0' || c.is_ascii_whitespace());
    let ts = TransferSyntaxRegistry
        .get(ts_uid)
        .ok_or_else(|| format!("unknown transfer syntax {ts_uid}"))?;
    if matches!(ts.codec(), Codec::Dataset(_)) {
        let inflated = BufReader::new(flate2::read::DeflateDecoder::new(BufReader::new(dataset)));
        scan(inflated, &entries::EXPLICIT_VR_LITTLE_ENDIAN.erased())
    } else {
        scan(BufReader::new(dataset), ts)
    }
}

/// [`parse_leading`], with a panic of the DICOM parser turned into an `Err`: a data set we cannot
/// understand, not a crash.
pub(crate) fn parse_leading_caught(dataset: impl Read, ts_uid: &str) -> Result<Leading, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        parse_leading(dataset, ts_uid)
    }))
    .unwrap_or_else(|_| Err("the DICOM parser failed on this data set".into()))
}

fn scan(source: impl Read, ts: &dicom_encoding::TransferSyntax) -> Result<Leading, String> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::uids;
    use dicom_object::InMemDicomObject;
    use std::io::Write;

    pub(crate) fn dataset(ts: &str, sop_instance: &str) -> Vec<u8> {
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

    pub(crate) fn expected(uid: &str) -> Leading {
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
            // A padded transfer syntax UID (as a file meta group or a command carries it).
            assert_eq!(
                parse_leading(&bytes[..], &format!("{ts}\0")),
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
}
