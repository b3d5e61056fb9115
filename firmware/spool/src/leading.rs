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
    // The depth of the encapsulated pixel data (inside a sequence) being read, if any.
    let mut pixel_depth: Option<usize> = None;
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
                pixel_depth = Some(depth);
            }
            DataToken::SequenceEnd => {
                if pixel_depth == Some(depth) {
                    pixel_depth = None;
                }
                depth = depth.saturating_sub(1);
            }
            // An item of encapsulated pixel data (the offset table, a fragment) is read whole by the
            // parser: the same bound as an element's value applies before it is read.
            DataToken::ItemStart { len }
                if pixel_depth.is_some() && len.get().is_none_or(|l| l > MAX_LEADING_VALUE) =>
            {
                log::debug!(
                    "Stopped parsing leading elements at a pixel data item of {} bytes.",
                    len.0
                );
                break;
            }
            DataToken::ItemStart { .. }
            | DataToken::ItemEnd
            | DataToken::PrimitiveValue(_)
            | DataToken::ItemValue(_)
            | DataToken::OffsetTable(_) => {}
        }
    }
    Ok(leading)
}

/// The most dataset bytes [`StreamScan`] keeps while waiting for the leading elements to complete.
pub const PREFIX_CAP: usize = 1024 * 1024;

/// The leading elements of a data set found as its bytes stream in, so that they need not be read
/// back from the spool file afterwards.
///
/// It keeps the first bytes of the data set (at most [`PREFIX_CAP`]) and parses them again each time
/// they have doubled, until a parse ends without having asked for more bytes than there were: that
/// parse saw everything it needed, so its answer is final (more bytes would not change it) and the
/// kept bytes are dropped. For a typical image the leading elements are in the first data PDV and
/// the parse is done once. Should the cap be reached first (leading elements over a megabyte), the
/// scan gives up and [`StreamScan::finish`] returns `None`: the caller parses the stored file.
///
/// A deflated data set is parsed only once whole (if it fits in the prefix): how far a damaged
/// deflate stream inflates before failing depends on how much of it is at hand, so the parse of a
/// prefix could answer otherwise than the parse of the whole.
#[derive(Debug)]
pub struct StreamScan {
    ts_uid: String,
    /// Parse prefixes as they grow (not for deflated syntaxes).
    early: bool,
    prefix: Vec<u8>,
    /// The data set is longer than the kept prefix.
    capped: bool,
    /// Parse again once the prefix holds this many bytes.
    next_try: usize,
    outcome: Option<Result<Leading, String>>,
}

impl StreamScan {
    /// A scan of a data set encoded in `ts_uid`.
    pub fn new(ts_uid: &str) -> Self {
        let deflated = TransferSyntaxRegistry
            .get(ts_uid.trim_matches(|c: char| c == '\0' || c.is_ascii_whitespace()))
            .is_some_and(|ts| matches!(ts.codec(), Codec::Dataset(_)));
        StreamScan {
            ts_uid: ts_uid.to_owned(),
            early: !deflated,
            prefix: Vec::new(),
            capped: false,
            next_try: 1,
            outcome: None,
        }
    }

    /// The next bytes of the data set, in order.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.outcome.is_some() || self.capped || bytes.is_empty() {
            return;
        }
        let room = PREFIX_CAP - self.prefix.len();
        let take = bytes.len().min(room);
        // Grow by doubling, never past the cap.
        let want = self.prefix.len() + take;
        if want > self.prefix.capacity() {
            let target = (self.prefix.capacity() * 2).clamp(want, PREFIX_CAP.max(want));
            self.prefix.reserve_exact(target - self.prefix.len());
        }
        self.prefix.extend_from_slice(&bytes[..take]);
        if take < bytes.len() {
            self.capped = true;
        }
        if self.early && (self.prefix.len() >= self.next_try || self.capped) {
            self.attempt(false);
        }
    }

    /// Parses the kept prefix; `complete` says it is the whole data set.
    fn attempt(&mut self, complete: bool) {
        let mut source = Prefix {
            bytes: &self.prefix,
            pos: 0,
            exhausted: false,
        };
        let parsed = parse_leading_caught(&mut source, &self.ts_uid);
        if complete || !source.exhausted {
            self.outcome = Some(parsed);
            self.prefix = Vec::new();
        } else {
            self.next_try = self.prefix.len().saturating_mul(2);
        }
    }

    /// The data set has ended. `Some` is what [`parse_leading`] says of the whole data set; `None`
    /// means the leading elements did not fit in [`PREFIX_CAP`] bytes: parse the stored file.
    pub fn finish(mut self) -> Option<Result<Leading, String>> {
        if self.outcome.is_none() && !self.capped {
            self.attempt(true);
        }
        self.outcome
    }
}

/// The kept prefix as a reader that notes whether the parser asked for more than it holds.
struct Prefix<'a> {
    bytes: &'a [u8],
    pos: usize,
    exhausted: bool,
}

impl Read for Prefix<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let rest = self.bytes.get(self.pos..).unwrap_or_default();
        if rest.is_empty() && !buf.is_empty() {
            self.exhausted = true;
            return Ok(0);
        }
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
pub(crate) mod tests {
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

    /// The process's peak resident memory, from /proc (kB).
    fn peak_rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[test]
    fn a_pixel_data_item_inside_a_sequence_claiming_gigabytes_stops_parsing_without_reading_it() {
        // Fuzzing found it: encapsulated pixel data nested in a sequence item, whose first item (the
        // offset table) claims 4 GB; the parser reads an item of pixel data whole.
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&[
            0x08, 0x00, 0x40, 0x11, b'S', b'Q', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
        ]);
        bytes.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        bytes.extend_from_slice(&[
            0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
        ]);
        bytes.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0]);
        bytes.extend_from_slice(&0xF000_0000u32.to_le_bytes());
        bytes.extend_from_slice(&[0u8; 64]);
        let leading = parse_leading(&bytes[..], uids::JPEG_BASELINE8_BIT).unwrap();
        assert_eq!(leading, Leading::default());
        let peak = peak_rss_kib();
        assert!(peak < 512 * 1024, "the parse took the process to {peak} kB");
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

    fn streamed(bytes: &[u8], ts: &str, chunk: usize) -> Option<Result<Leading, String>> {
        let mut scan = StreamScan::new(ts);
        for piece in bytes.chunks(chunk) {
            scan.feed(piece);
            assert!(scan.prefix.capacity() <= PREFIX_CAP);
        }
        scan.finish()
    }

    #[test]
    #[allow(deprecated)] // explicit VR big endian is retired, yet still sent
    fn the_streamed_scan_says_what_a_parse_of_the_whole_data_set_says_however_it_is_cut() {
        let whole = dataset(uids::EXPLICIT_VR_LITTLE_ENDIAN, "1.2.3.4.5");
        let mut samples = vec![
            (whole[..40].to_vec(), uids::EXPLICIT_VR_LITTLE_ENDIAN),
            (
                whole[..whole.len() - 30].to_vec(),
                uids::EXPLICIT_VR_LITTLE_ENDIAN,
            ),
            (
                b"not DICOM at all, only text".to_vec(),
                uids::IMPLICIT_VR_LITTLE_ENDIAN,
            ),
            (Vec::new(), uids::EXPLICIT_VR_LITTLE_ENDIAN),
            (whole.clone(), "1.2.3.999"),
        ];
        for ts in [
            uids::IMPLICIT_VR_LITTLE_ENDIAN,
            uids::EXPLICIT_VR_LITTLE_ENDIAN,
            uids::EXPLICIT_VR_BIG_ENDIAN,
            uids::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
        ] {
            samples.push((dataset(ts, "1.2.3.4.5"), ts));
        }
        for (bytes, ts) in samples {
            let once = parse_leading(&bytes[..], ts);
            for chunk in [1, 3, 7, 64, 100, 4096, bytes.len().max(1)] {
                assert_eq!(
                    streamed(&bytes, ts, chunk),
                    Some(once.clone()),
                    "{ts}, {} bytes in chunks of {chunk}",
                    bytes.len()
                );
            }
        }
    }

    #[test]
    fn the_scan_keeps_no_bytes_once_the_leading_elements_are_complete() {
        // The header in the first chunk, then megabytes of pixel data.
        let header = dataset(uids::EXPLICIT_VR_LITTLE_ENDIAN, "1.2.3.4.5");
        let mut scan = StreamScan::new(uids::EXPLICIT_VR_LITTLE_ENDIAN);
        scan.feed(&header);
        assert_eq!(scan.outcome, Some(Ok(expected("1.2.3.4.5"))));
        assert_eq!(scan.prefix.capacity(), 0);
        for _ in 0..64 {
            scan.feed(&[0x5a; 64 * 1024]);
        }
        assert_eq!(scan.prefix.capacity(), 0);
        assert_eq!(scan.finish(), Some(Ok(expected("1.2.3.4.5"))));
    }

    /// Leading elements longer than the kept prefix: two private values of 600 KB before the study.
    pub(crate) fn dataset_with_long_leading_elements() -> Vec<u8> {
        let plain = dataset(uids::EXPLICIT_VR_LITTLE_ENDIAN, "1.2.3.4.5");
        let mut obj = InMemDicomObject::read_dataset_with_ts(
            &plain[..],
            &entries::EXPLICIT_VR_LITTLE_ENDIAN.erased(),
        )
        .unwrap();
        for group in [0x0009, 0x0011] {
            obj.put(DataElement::new(
                Tag(group, 0x1000),
                VR::OB,
                PrimitiveValue::from(vec![7u8; 600 * 1024]),
            ));
        }
        let mut out = Vec::new();
        obj.write_dataset_with_ts(&mut out, &entries::EXPLICIT_VR_LITTLE_ENDIAN.erased())
            .unwrap();
        out
    }

    #[test]
    fn leading_elements_longer_than_the_prefix_cap_leave_the_answer_to_the_stored_file() {
        let bytes = dataset_with_long_leading_elements();
        assert!(bytes.len() > PREFIX_CAP);
        let ts = uids::EXPLICIT_VR_LITTLE_ENDIAN;
        assert_eq!(parse_leading(&bytes[..], ts), Ok(expected("1.2.3.4.5")));
        for chunk in [16 * 1024, 256 * 1024, bytes.len()] {
            assert_eq!(streamed(&bytes, ts, chunk), None, "chunks of {chunk}");
        }
    }
}
