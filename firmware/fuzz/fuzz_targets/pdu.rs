//! PDUs as an association reads them: a byte stream from the peer, cut into PDUs by ingest's strict
//! reader (header checked against the maximum before the body is buffered, then dicom-ul decodes).
//! Every PDU read is written back with dicom-ul and must read back equal (write → read round
//! trip); an A-ASSOCIATE-RQ is also negotiated, and our answer must round-trip too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use passerelle_ingest::fuzzing::{self, Pdu};

/// A small maximum, so that the "announced more than our maximum" path is reached.
const MAX_PDATA: u32 = 16 * 1024;

/// Write → read: what we would send is what the peer would read.
fn round_trip(pdu: &Pdu) {
    let Ok(bytes) = fuzzing::encode_pdu(pdu) else {
        // Some decoded PDUs cannot be encoded again (dicom-ul refuses over-long fields): fine,
        // ingest only ever encodes the PDUs it builds itself.
        return;
    };
    match fuzzing::read_pdu(&bytes, u32::MAX) {
        Ok(Some((again, used))) => {
            assert_eq!(&again, pdu, "a PDU changed through write → read");
            assert_eq!(
                used,
                bytes.len(),
                "the encoding of a PDU was not read in full"
            );
        }
        other => panic!("an encoded PDU did not read back: {other:?} for {pdu:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((pdu, used))) = fuzzing::read_pdu(rest, MAX_PDATA) {
        assert!(
            used >= 6 && used <= rest.len(),
            "consumed {used} of {}",
            rest.len()
        );
        if let Pdu::PData { data } = &pdu {
            let body: usize = data.iter().map(|v| 6 + v.data.len()).sum();
            assert!(
                body <= MAX_PDATA as usize,
                "a P-DATA body of {body} bytes got through"
            );
        }
        round_trip(&pdu);
        if let Pdu::AssociationRQ(rq) = &pdu {
            for have_slot in [true, false] {
                let answer = fuzzing::negotiate(rq, have_slot);
                // Our own answer must always be encodable: otherwise the peer gets nothing.
                let bytes = fuzzing::encode_pdu(&answer)
                    .unwrap_or_else(|e| panic!("our answer {answer:?} cannot be encoded: {e}"));
                assert!(bytes.len() <= 64 * 1024 + 6);
                round_trip(&answer);
            }
        }
        rest = &rest[used..];
    }
});
