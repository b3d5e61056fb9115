//! The STOW-RS response parser of the uplink (`application/dicom+json` and `+xml`). The first byte
//! picks the Content-Type the body arrives with. A UID it reports as stored or failed is never empty
//! nor padded: it is compared with the spool's UIDs to mark instances sent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use passerelle_uplink::response;

const CONTENT_TYPES: [Option<&str>; 5] = [
    Some("application/dicom+json"),
    Some("application/dicom+xml"),
    Some("text/plain"),
    None,
    Some("application/json; charset=utf-8"),
];

fuzz_target!(|data: &[u8]| {
    let [pick, body @ ..] = data else {
        return;
    };
    let ct = CONTENT_TYPES[usize::from(*pick) % CONTENT_TYPES.len()];
    if let Ok(parsed) = response::parse(200, ct, body) {
        let uids = parsed
            .referenced
            .iter()
            .map(|r| &r.sop_instance_uid)
            .chain(parsed.failed.iter().map(|f| &f.sop_instance_uid));
        for uid in uids {
            assert!(!uid.is_empty(), "an empty UID");
            assert_eq!(
                uid.trim_matches(|c: char| c == '\0' || c.is_whitespace()),
                uid
            );
        }
        for r in &parsed.referenced {
            assert!(parsed.is_referenced(&r.sop_instance_uid));
        }
    }
});
