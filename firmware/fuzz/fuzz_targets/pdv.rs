//! The PDV/command state machine of an association. The input is a compact list of PDVs
//! (`[context id, control header, length (u16 BE), bytes]`...) so that the fuzzer reaches the
//! states quickly. The PDVs go into a P-DATA-TF PDU, which is written and read back with ingest's
//! reader (write → read), then fed to the state machine, which joins command fragments, parses
//! command sets and hands data fragments on. Responses to parsed commands are built and split for
//! the peer's maximum PDU length as ingest sends them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use passerelle_ingest::fuzzing::{self, Message, PDataValue, PDataValueType, Pdu, PdvReceiver};

fn pdvs(mut data: &[u8]) -> Vec<PDataValue> {
    let mut out = Vec::new();
    while let [pc, control, hi, lo, rest @ ..] = data {
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(rest.len());
        out.push(PDataValue {
            presentation_context_id: *pc,
            value_type: if control & 1 == 1 {
                PDataValueType::Command
            } else {
                PDataValueType::Data
            },
            is_last: control & 2 == 2,
            data: rest[..len].to_vec(),
        });
        data = &rest[len..];
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let [peer_max_hi, peer_max_lo, data @ ..] = data else {
        return;
    };
    let peer_max_pdu = u32::from(u16::from_be_bytes([*peer_max_hi, *peer_max_lo]));
    let mut receiver = PdvReceiver::default();
    // The PDVs go in PDUs of up to 4 PDVs, as a modality may pack them.
    for chunk in pdvs(data).chunks(4) {
        let pdu = Pdu::PData {
            data: chunk.to_vec(),
        };
        let bytes = fuzzing::encode_pdu(&pdu).expect("a P-DATA-TF is always encodable");
        let read = match fuzzing::read_pdu(&bytes, u32::MAX) {
            Ok(Some((read, used))) => {
                assert_eq!(used, bytes.len());
                read
            }
            other => panic!("a P-DATA-TF did not read back: {other:?}"),
        };
        assert_eq!(read, pdu, "a P-DATA-TF changed through write → read");
        let Pdu::PData { data: read_pdvs } = read else {
            unreachable!()
        };
        for pdv in read_pdvs {
            let in_len = pdv.data.len();
            match receiver.push(pdv) {
                // A protocol violation: the association is aborted.
                Err(_) => return,
                Ok(None) => {}
                Ok(Some(Message::Data { len, last, .. })) => {
                    assert_eq!(len, in_len, "a data fragment changed length");
                    if last {
                        assert!(receiver.is_idle(), "not idle after the last data fragment");
                    }
                }
                Ok(Some(Message::Command { pc_id, command })) => {
                    let rsp = fuzzing::build_response(command.field | 0x8000, &command, 0)
                        .expect("a response to a parsed command is always buildable");
                    let pieces = fuzzing::command_pdvs(pc_id, &rsp, peer_max_pdu);
                    let mut joined = Vec::new();
                    for (i, pdvs) in pieces.iter().enumerate() {
                        assert_eq!(pdvs.len(), 1);
                        assert_eq!(pdvs[0].is_last, i + 1 == pieces.len());
                        let encoded = fuzzing::encode_pdu(&Pdu::PData { data: pdvs.clone() })
                            .expect("a response PDU is always encodable");
                        // A PDV needs 6 bytes of framing and 1 byte of data at least.
                        if peer_max_pdu >= 7 {
                            assert!(
                                encoded.len() - 6 <= peer_max_pdu as usize,
                                "a response PDU of {} bytes for a maximum of {peer_max_pdu}",
                                encoded.len() - 6
                            );
                        }
                        joined.extend_from_slice(&pdvs[0].data);
                    }
                    assert_eq!(joined, rsp, "the response fragments do not join up");
                }
            }
        }
    }
});
