//! DIMSE messages over P-DATA: the PDV state machine that separates command fragments from data
//! fragments, and command set parsing/building (implicit VR little endian, dicom-object).

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN;
use dicom_ul::pdu::{PDataValue, PDataValueType};

/// Command sets are small; more than this is an attack or a broken peer.
pub(crate) const MAX_COMMAND_BYTES: usize = 64 * 1024;

pub(crate) const C_STORE_RQ: u16 = 0x0001;
pub(crate) const C_STORE_RSP: u16 = 0x8001;
pub(crate) const C_ECHO_RQ: u16 = 0x0030;
pub(crate) const C_ECHO_RSP: u16 = 0x8030;
pub(crate) const C_CANCEL_RQ: u16 = 0x0FFF;
/// Command Data Set Type value meaning "no data set".
pub(crate) const NO_DATASET: u16 = 0x0101;

/// What one PDV means for the message being received.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Event {
    /// A complete command set (all its fragments) arrived on this presentation context.
    Command { pc_id: u8, bytes: Vec<u8> },
    /// A fragment of the current message's data set.
    Data {
        pc_id: u8,
        bytes: Vec<u8>,
        last: bool,
    },
}

/// The PDV state machine. It only knows about fragments; whether a command is followed by a data
/// set is decided by the caller ([`PdvAssembler::expect_data`]) after parsing the command.
#[derive(Debug, Default)]
pub(crate) struct PdvAssembler {
    command: Vec<u8>,
    command_pc: Option<u8>,
    /// Set while the data set of the message on this presentation context is expected.
    data_pc: Option<u8>,
}

impl PdvAssembler {
    /// Feeds one PDV (in the order they appear in the P-DATA-TF PDUs).
    pub(crate) fn push(&mut self, pdv: PDataValue) -> Result<Option<Event>, String> {
        let pc_id = pdv.presentation_context_id;
        match pdv.value_type {
            PDataValueType::Command => {
                if let Some(expected) = self.data_pc {
                    return Err(format!(
                        "a command fragment arrived on presentation context {pc_id} while the data set on context {expected} was incomplete"
                    ));
                }
                if let Some(current) = self.command_pc {
                    if current != pc_id {
                        return Err(format!(
                            "command fragments switched from presentation context {current} to {pc_id}"
                        ));
                    }
                }
                if self.command.len() + pdv.data.len() > MAX_COMMAND_BYTES {
                    return Err(format!(
                        "the command set exceeds {MAX_COMMAND_BYTES} bytes"
                    ));
                }
                self.command_pc = Some(pc_id);
                self.command.extend_from_slice(&pdv.data);
                if pdv.is_last {
                    self.command_pc = None;
                    Ok(Some(Event::Command {
                        pc_id,
                        bytes: std::mem::take(&mut self.command),
                    }))
                } else {
                    Ok(None)
                }
            }
            PDataValueType::Data => match self.data_pc {
                Some(expected) if expected == pc_id => {
                    if pdv.is_last {
                        self.data_pc = None;
                    }
                    Ok(Some(Event::Data {
                        pc_id,
                        bytes: pdv.data,
                        last: pdv.is_last,
                    }))
                }
                Some(expected) => Err(format!(
                    "a data fragment arrived on presentation context {pc_id}, but the data set is expected on context {expected}"
                )),
                None => Err(format!(
                    "a data fragment arrived on presentation context {pc_id} without a command announcing a data set"
                )),
            },
        }
    }

    /// The command just returned announces a data set on `pc_id`.
    pub(crate) fn expect_data(&mut self, pc_id: u8) {
        self.data_pc = Some(pc_id);
    }

    /// True between messages (no partial command, no data set pending).
    pub(crate) fn is_idle(&self) -> bool {
        self.command.is_empty() && self.command_pc.is_none() && self.data_pc.is_none()
    }
}

/// The fields of a request command set that we use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Command {
    pub field: u16,
    pub message_id: u16,
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub has_dataset: bool,
}

/// The elements of a command set (implicit VR little endian, group 0000 only), as
/// `(element number, value)`. Our own walk, not dicom-object's reader: a peer-chosen length is
/// never allocated, and no element can make the walk lose step with the bytes (dicom-parser reads
/// some values in units of their VR and can then read a later length from the middle of a value).
fn command_elements(bytes: &[u8]) -> Result<Vec<(u16, &[u8])>, String> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < bytes.len() {
        let Some(head) = bytes.get(pos..pos + 8) else {
            return Err(format!("truncated element header at byte {pos}"));
        };
        let group = u16::from_le_bytes([head[0], head[1]]);
        let element = u16::from_le_bytes([head[2], head[3]]);
        let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
        if group != 0x0000 {
            return Err(format!("element of group {group:04X} in a command set"));
        }
        if len > bytes.len() - pos - 8 {
            return Err(format!(
                "element at byte {pos} claims {len} bytes, more than the command set holds"
            ));
        }
        out.push((element, &bytes[pos + 8..pos + 8 + len]));
        pos += 8 + len;
    }
    Ok(out)
}

/// The value of element (0000,`element`): the last one if a peer repeats it.
fn command_value<'a>(elements: &[(u16, &'a [u8])], element: u16) -> Option<&'a [u8]> {
    elements
        .iter()
        .rev()
        .find(|(e, _)| *e == element)
        .map(|(_, v)| *v)
}

/// A US element (the first value if there are several).
fn command_u16(elements: &[(u16, &[u8])], element: u16) -> Result<u16, String> {
    match command_value(elements, element) {
        None => Err(format!("missing (0000,{element:04X})")),
        Some([lo, hi, ..]) => Ok(u16::from_le_bytes([*lo, *hi])),
        Some(v) => Err(format!(
            "bad (0000,{element:04X}): {} bytes for a US value",
            v.len()
        )),
    }
}

/// A UI element without its padding (NUL or spaces); empty if missing. Bytes outside ASCII become
/// `?`: the UID is echoed in our response, which must stay encodable (found by fuzzing), and such a
/// UID is refused anyway.
fn command_text(elements: &[(u16, &[u8])], element: u16) -> String {
    command_value(elements, element)
        .map(|v| {
            v.iter()
                .map(|&b| if b.is_ascii() { char::from(b) } else { '?' })
                .collect::<String>()
                .trim_matches(|c: char| c == '\0' || c.is_ascii_whitespace())
                .to_string()
        })
        .unwrap_or_default()
}

/// (0000,0002) Affected SOP Class UID.
const AFFECTED_SOP_CLASS_UID: u16 = 0x0002;
/// (0000,0100) Command Field.
const COMMAND_FIELD: u16 = 0x0100;
/// (0000,0110) Message ID.
const MESSAGE_ID: u16 = 0x0110;
/// (0000,0120) Message ID Being Responded To.
const MESSAGE_ID_BEING_RESPONDED_TO: u16 = 0x0120;
/// (0000,0800) Command Data Set Type.
const COMMAND_DATA_SET_TYPE: u16 = 0x0800;
/// (0000,1000) Affected SOP Instance UID.
const AFFECTED_SOP_INSTANCE_UID: u16 = 0x1000;

/// Parses a command set (implicit VR little endian).
pub(crate) fn parse_command(bytes: &[u8]) -> Result<Command, String> {
    let elements = command_elements(bytes)?;
    let field = command_u16(&elements, COMMAND_FIELD)?;
    let message_id = if field == C_CANCEL_RQ {
        command_u16(&elements, MESSAGE_ID_BEING_RESPONDED_TO).unwrap_or(0)
    } else {
        command_u16(&elements, MESSAGE_ID)?
    };
    let has_dataset = command_u16(&elements, COMMAND_DATA_SET_TYPE)? != NO_DATASET;
    Ok(Command {
        field,
        message_id,
        sop_class_uid: command_text(&elements, AFFECTED_SOP_CLASS_UID),
        sop_instance_uid: command_text(&elements, AFFECTED_SOP_INSTANCE_UID),
        has_dataset,
    })
}

/// UIDs are padded to an even length with NUL.
fn uid_value(uid: &str) -> PrimitiveValue {
    let mut s = uid.to_string();
    if s.len() % 2 == 1 {
        s.push('\0');
    }
    PrimitiveValue::from(s)
}

/// Builds a response command set (no data set) for the request `rq`.
pub(crate) fn build_response(
    response_field: u16,
    rq: &Command,
    status: u16,
) -> Result<Vec<u8>, String> {
    let mut elements = vec![
        DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            uid_value(&rq.sop_class_uid),
        ),
        DataElement::new(
            tags::COMMAND_FIELD,
            VR::US,
            PrimitiveValue::from(response_field),
        ),
        DataElement::new(
            tags::MESSAGE_ID_BEING_RESPONDED_TO,
            VR::US,
            PrimitiveValue::from(rq.message_id),
        ),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            PrimitiveValue::from(NO_DATASET),
        ),
        DataElement::new(tags::STATUS, VR::US, PrimitiveValue::from(status)),
    ];
    if !rq.sop_instance_uid.is_empty() {
        elements.push(DataElement::new(
            tags::AFFECTED_SOP_INSTANCE_UID,
            VR::UI,
            uid_value(&rq.sop_instance_uid),
        ));
    }
    let obj = InMemDicomObject::command_from_element_iter(elements);
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .map_err(|e| e.to_string())?;
    Ok(out)
}

/// Splits a command set into P-DATA-TF PDUs that fit the peer's maximum PDU length (0 = no limit).
pub(crate) fn command_pdvs(pc_id: u8, bytes: &[u8], peer_max_pdu: u32) -> Vec<Vec<PDataValue>> {
    // PDU body = PDV length (4) + context id (1) + control header (1) + fragment.
    let chunk = match peer_max_pdu {
        0 => bytes.len().max(1),
        n => (n as usize).saturating_sub(6).max(1),
    };
    let pieces: Vec<&[u8]> = if bytes.is_empty() {
        vec![bytes]
    } else {
        bytes.chunks(chunk).collect()
    };
    let count = pieces.len();
    pieces
        .into_iter()
        .enumerate()
        .map(|(i, piece)| {
            vec![PDataValue {
                presentation_context_id: pc_id,
                value_type: PDataValueType::Command,
                is_last: i + 1 == count,
                data: piece.to_vec(),
            }]
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use dicom_core::Tag;

    fn text(obj: &InMemDicomObject, tag: Tag) -> String {
        obj.get(tag)
            .and_then(|e| e.to_str().ok())
            .map(|s| {
                s.trim_matches(|c: char| c == '\0' || c.is_ascii_whitespace())
                    .to_string()
            })
            .unwrap_or_default()
    }

    fn uint16(obj: &InMemDicomObject, tag: Tag) -> Result<u16, String> {
        obj.get(tag)
            .ok_or_else(|| format!("missing {tag}"))?
            .to_int::<u16>()
            .map_err(|e| format!("bad {tag}: {e}"))
    }

    pub(crate) fn pdv(pc: u8, command: bool, last: bool, data: &[u8]) -> PDataValue {
        PDataValue {
            presentation_context_id: pc,
            value_type: if command {
                PDataValueType::Command
            } else {
                PDataValueType::Data
            },
            is_last: last,
            data: data.to_vec(),
        }
    }

    /// Feeds PDVs; after each Command event, `expect_data` is called when `with_data` says so.
    fn check(pdvs: Vec<PDataValue>, with_data: bool, expect: Result<Vec<Event>, &str>) {
        let mut a = PdvAssembler::default();
        let mut events = Vec::new();
        for p in pdvs {
            match a.push(p) {
                Ok(Some(e)) => {
                    if let Event::Command { pc_id, .. } = &e {
                        if with_data {
                            a.expect_data(*pc_id);
                        }
                    }
                    events.push(e);
                }
                Ok(None) => {}
                Err(why) => {
                    let Err(expected) = expect else {
                        panic!("unexpected error: {why}")
                    };
                    assert!(why.contains(expected), "{why}");
                    return;
                }
            }
        }
        assert_eq!(Ok(events), expect.map_err(|e| e.to_string()));
        assert!(a.is_idle());
    }

    #[test]
    fn command_fragments_are_joined_and_data_fragments_follow_in_order() {
        check(
            vec![
                pdv(1, true, false, b"ab"),
                pdv(1, true, true, b"cd"),
                pdv(1, false, false, b"12"),
                pdv(1, false, true, b"34"),
            ],
            true,
            Ok(vec![
                Event::Command {
                    pc_id: 1,
                    bytes: b"abcd".to_vec(),
                },
                Event::Data {
                    pc_id: 1,
                    bytes: b"12".to_vec(),
                    last: false,
                },
                Event::Data {
                    pc_id: 1,
                    bytes: b"34".to_vec(),
                    last: true,
                },
            ]),
        );
    }

    #[test]
    fn a_command_without_data_set_returns_to_idle_and_the_next_command_starts_fresh() {
        check(
            vec![pdv(3, true, true, b"echo1"), pdv(3, true, true, b"echo2")],
            false,
            Ok(vec![
                Event::Command {
                    pc_id: 3,
                    bytes: b"echo1".to_vec(),
                },
                Event::Command {
                    pc_id: 3,
                    bytes: b"echo2".to_vec(),
                },
            ]),
        );
    }

    #[test]
    fn data_without_a_command_or_on_another_context_is_a_protocol_violation() {
        check(
            vec![pdv(1, false, true, b"x")],
            false,
            Err("without a command"),
        );
        check(
            vec![pdv(1, true, true, b"c"), pdv(3, false, true, b"x")],
            true,
            Err("expected on context 1"),
        );
        check(
            vec![
                pdv(1, true, true, b"c"),
                pdv(1, false, false, b"x"),
                pdv(1, true, true, b"c"),
            ],
            true,
            Err("while the data set"),
        );
        check(
            vec![pdv(1, true, false, b"c"), pdv(3, true, true, b"c")],
            false,
            Err("switched"),
        );
    }

    #[test]
    fn a_command_set_larger_than_the_cap_is_refused() {
        let big = vec![0u8; MAX_COMMAND_BYTES / 2 + 1];
        check(
            vec![pdv(1, true, false, &big), pdv(1, true, true, &big)],
            false,
            Err("exceeds"),
        );
    }

    fn command_bytes(field: u16, msg_id: u16, dataset: bool) -> Vec<u8> {
        let obj = InMemDicomObject::command_from_element_iter([
            DataElement::new(
                tags::AFFECTED_SOP_CLASS_UID,
                VR::UI,
                uid_value("1.2.840.10008.5.1.4.1.1.2"),
            ),
            DataElement::new(tags::COMMAND_FIELD, VR::US, PrimitiveValue::from(field)),
            DataElement::new(tags::MESSAGE_ID, VR::US, PrimitiveValue::from(msg_id)),
            DataElement::new(tags::PRIORITY, VR::US, PrimitiveValue::from(0u16)),
            DataElement::new(
                tags::COMMAND_DATA_SET_TYPE,
                VR::US,
                PrimitiveValue::from(if dataset { 0u16 } else { NO_DATASET }),
            ),
            DataElement::new(
                tags::AFFECTED_SOP_INSTANCE_UID,
                VR::UI,
                uid_value("1.2.3.4"),
            ),
        ]);
        let mut out = Vec::new();
        obj.write_dataset_with_ts(&mut out, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
            .unwrap();
        out
    }

    #[test]
    fn a_c_store_command_is_parsed_with_its_uids_trimmed() {
        let cmd = parse_command(&command_bytes(C_STORE_RQ, 77, true)).unwrap();
        assert_eq!(
            cmd,
            Command {
                field: C_STORE_RQ,
                message_id: 77,
                sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
                sop_instance_uid: "1.2.3.4".into(),
                has_dataset: true,
            }
        );
    }

    #[test]
    fn a_command_element_claiming_more_bytes_than_present_is_refused_without_allocating() {
        let mut bytes = command_bytes(C_ECHO_RQ, 1, false);
        // Corrupt the group length's length field to claim 4 GiB.
        bytes[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = parse_command(&bytes).unwrap_err();
        assert!(err.contains("claims"), "{err}");
        assert!(parse_command(&[1, 2, 3]).is_err());
        assert!(parse_command(b"\x08\x00\x18\x00\x02\x00\x00\x001.").is_err());
    }

    #[test]
    fn a_command_set_that_desynchronised_dicom_parser_is_walked_without_allocating() {
        // Found by the `command` fuzz target: every element length fits the 396 bytes, yet
        // dicom-object's reader lost step inside a value, read 0xF6000000 as a later length and
        // reserved 4 GiB. Our own walk answers from the bytes themselves.
        let bytes = include_bytes!("../../fuzz/corpus/command/regression_oom_value_desync");
        let started = std::time::Instant::now();
        let parsed = parse_command(bytes);
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        assert_eq!(
            parsed.map(|c| (c.field, c.message_id, c.has_dataset)),
            Ok((C_STORE_RQ, 7, true))
        );
    }

    #[test]
    fn command_values_repeated_short_or_padded_are_handled() {
        let el = |e: u16, v: &[u8]| {
            let mut out = vec![0, 0];
            out.extend_from_slice(&e.to_le_bytes());
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            out.extend_from_slice(v);
            out
        };
        let check = |bytes: Vec<u8>, expect: Result<(u16, u16, bool, &str), &str>| {
            let got = parse_command(&bytes).map(|c| (c.field, c.message_id, c.has_dataset));
            match expect {
                Ok((f, m, d, uid)) => {
                    assert_eq!(got, Ok((f, m, d)));
                    assert_eq!(parse_command(&bytes).unwrap().sop_instance_uid, uid);
                }
                Err(e) => assert!(got.unwrap_err().contains(e)),
            }
        };
        let echo = [
            el(0x0100, &[0x30, 0]),
            el(0x0110, &[5, 0]),
            el(0x0800, &[1, 1]),
        ]
        .concat();
        check(echo.clone(), Ok((C_ECHO_RQ, 5, false, "")));
        // The last of a repeated element wins; a UID loses its padding.
        let again = [echo.clone(), el(0x0110, &[6, 0]), el(0x1000, b" 1.2.3\0")].concat();
        check(again, Ok((C_ECHO_RQ, 6, false, "1.2.3")));
        check(
            [echo.clone(), el(0x0110, &[6])].concat(),
            Err("1 bytes for a US"),
        );
        check(
            [el(0x0100, &[0x30, 0]), el(0x0800, &[1, 1])].concat(),
            Err("missing (0000,0110)"),
        );
        check(echo[..echo.len() - 1].to_vec(), Err("claims 2 bytes"));
        // Found by fuzzing: a non-ASCII byte in a UID made the response unencodable.
        let odd = [echo.clone(), el(0x1000, b"1.2.\xff.3")].concat();
        check(odd.clone(), Ok((C_ECHO_RQ, 5, false, "1.2.?.3")));
        let rq = parse_command(&odd).unwrap();
        assert!(build_response(C_ECHO_RSP, &rq, 0xC000).is_ok());
    }

    #[test]
    fn responses_echo_the_message_id_and_carry_uids_and_status() {
        let rq = parse_command(&command_bytes(C_STORE_RQ, 4242, true)).unwrap();
        let rsp = parse_command(&build_response(C_STORE_RSP, &rq, 0xA900).unwrap());
        // A response has no Message ID, so parse it by hand.
        assert!(rsp.is_err());
        let bytes = build_response(C_STORE_RSP, &rq, 0xA900).unwrap();
        let obj =
            InMemDicomObject::read_dataset_with_ts(&bytes[..], &IMPLICIT_VR_LITTLE_ENDIAN.erased())
                .unwrap();
        assert_eq!(uint16(&obj, tags::MESSAGE_ID_BEING_RESPONDED_TO), Ok(4242));
        assert_eq!(uint16(&obj, tags::STATUS), Ok(0xA900));
        assert_eq!(uint16(&obj, tags::COMMAND_FIELD), Ok(C_STORE_RSP));
        assert_eq!(text(&obj, tags::AFFECTED_SOP_INSTANCE_UID), "1.2.3.4");
        assert_eq!(
            text(&obj, tags::AFFECTED_SOP_CLASS_UID),
            "1.2.840.10008.5.1.4.1.1.2"
        );
        let group_length = uint16(&obj, tags::COMMAND_GROUP_LENGTH);
        assert!(group_length.is_ok());
    }

    #[test]
    fn commands_are_split_to_fit_the_peers_maximum_pdu() {
        let pdus = command_pdvs(5, &[7u8; 25], 16);
        assert_eq!(pdus.len(), 3);
        assert_eq!(pdus[0][0].data.len(), 10);
        assert!(!pdus[0][0].is_last && !pdus[1][0].is_last && pdus[2][0].is_last);
        assert_eq!(command_pdvs(5, &[7u8; 25], 0).len(), 1);
    }
}
