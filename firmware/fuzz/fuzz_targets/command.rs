//! The DIMSE command set parser (implicit VR little endian). A parsed request is answered: the
//! response command set is built and read back, and must carry the request's message ID, UIDs and
//! the status (read → write → read).
#![no_main]

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN;
use libfuzzer_sys::fuzz_target;
use passerelle_ingest::fuzzing;

fn text(obj: &InMemDicomObject, tag: Tag) -> String {
    obj.get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|s| {
            s.trim_matches(|c: char| c == '\0' || c.is_ascii_whitespace())
                .to_string()
        })
        .unwrap_or_default()
}

fn uint16(obj: &InMemDicomObject, tag: Tag) -> Option<u16> {
    obj.get(tag)?.to_int::<u16>().ok()
}

fuzz_target!(|data: &[u8]| {
    let Ok(cmd) = fuzzing::parse_command(data) else {
        return;
    };
    let status = 0xA900;
    let rsp = fuzzing::build_response(cmd.field | 0x8000, &cmd, status)
        .expect("a response to a parsed command is always buildable");
    let obj = InMemDicomObject::read_dataset_with_ts(&rsp[..], &IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .expect("our response command set reads back");
    assert_eq!(uint16(&obj, tags::COMMAND_FIELD), Some(cmd.field | 0x8000));
    assert_eq!(
        uint16(&obj, tags::MESSAGE_ID_BEING_RESPONDED_TO),
        Some(cmd.message_id)
    );
    assert_eq!(uint16(&obj, tags::STATUS), Some(status));
    assert_eq!(uint16(&obj, tags::COMMAND_DATA_SET_TYPE), Some(0x0101));
    // A UID of digits and dots (the only kind ingest stores) is echoed exactly. Others are
    // refused by ingest; they are still echoed, but a backslash makes them multi-valued in DICOM.
    let is_uid = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    if is_uid(&cmd.sop_class_uid) {
        assert_eq!(text(&obj, tags::AFFECTED_SOP_CLASS_UID), cmd.sop_class_uid);
    }
    if is_uid(&cmd.sop_instance_uid) {
        assert_eq!(
            text(&obj, tags::AFFECTED_SOP_INSTANCE_UID),
            cmd.sop_instance_uid
        );
    }
});
