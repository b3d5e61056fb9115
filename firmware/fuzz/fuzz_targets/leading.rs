//! The leading-element data set parser of a C-STORE (it reads the spooled data set up to (0020,000E)
//! for the index). The first byte picks the transfer syntax the data set is parsed in.
#![no_main]

use libfuzzer_sys::fuzz_target;
use passerelle_ingest::fuzzing;

const SYNTAXES: [&str; 5] = [
    "1.2.840.10008.1.2",      // implicit VR little endian
    "1.2.840.10008.1.2.1",    // explicit VR little endian
    "1.2.840.10008.1.2.2",    // explicit VR big endian (retired, still sent)
    "1.2.840.10008.1.2.1.99", // deflated explicit VR little endian
    "1.2.840.10008.1.2.4.50", // JPEG baseline (encapsulated pixel data)
];

fuzz_target!(|data: &[u8]| {
    let [pick, dataset @ ..] = data else {
        return;
    };
    let ts = SYNTAXES[usize::from(*pick) % SYNTAXES.len()];
    if let Ok(leading) = fuzzing::parse_leading(dataset, ts) {
        for uid in [&leading.sop_class_uid, &leading.sop_instance_uid]
            .into_iter()
            .flatten()
        {
            assert_eq!(
                uid.trim_matches(|c| c == '\0' || c == ' '),
                uid,
                "an untrimmed UID"
            );
        }
    }
});
