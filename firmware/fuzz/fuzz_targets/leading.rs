//! The leading-element data set parser of a C-STORE and of rebuild-index (the spool's; it reads a data
//! set up to (0020,000E) for the index), and the scan that runs it on the bytes as they stream in:
//! cut into PDV-like chunks, the streamed scan must say what a parse of the whole data set says. The
//! first byte picks the transfer syntax (low bits) and the chunk size (high bits).
//! The same bytes go through ingest's element-boundary walker (`boundary`, which refuses a data set
//! cut short): fed in chunks, it must say what it says fed whole, and never panic.
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
    let whole = fuzzing::parse_leading(dataset, ts);
    let chunk = 1 + usize::from(*pick / 8) * 13;
    let mut scan = fuzzing::StreamScan::new(ts);
    for piece in dataset.chunks(chunk) {
        scan.feed(piece);
    }
    match scan.finish() {
        Some(streamed) => assert_eq!(streamed, whole, "streamed in chunks of {chunk}"),
        // Only leading elements longer than the kept prefix are left to a re-read of the file.
        None => assert!(dataset.len() > fuzzing::PREFIX_CAP, "no answer for {} bytes", dataset.len()),
    }
    let walked_whole = fuzzing::walk_dataset(dataset, ts, dataset.len().max(1));
    let walked = fuzzing::walk_dataset(dataset, ts, chunk);
    assert_eq!(
        walked.as_ref().ok(),
        walked_whole.as_ref().ok(),
        "the walker in chunks of {chunk}: {walked:?}, whole: {walked_whole:?}"
    );
    if let Ok(leading) = whole {
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
