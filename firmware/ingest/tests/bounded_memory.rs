//! Invariant 4, measured: storing an instance much larger than the memory the process gains.
//! Its own test binary (own process), so that no other test's allocations blur the measurement.

// Test helpers live outside `#[test]` functions, where `allow-unwrap-in-tests` does not reach.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries;
use dicom_ul::pdu::{PDataValue, PDataValueType, Pdu};
use dicom_ul::ClientAssociationOptions;
use passerelle_config::{DicomConfig, SpoolConfig};
use passerelle_spool::Spool;
use tokio::sync::{watch, Notify};

const PIXEL_BYTES: u64 = 96 * 1024 * 1024;
const CHUNK: usize = 64 * 1024;

/// Deterministic, poorly compressible bytes: the instance is regenerated to check it, never kept.
fn pixel_chunk(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let x = (offset + i).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            (x >> 56) as u8 ^ (x >> 29) as u8
        })
        .collect()
}

fn uid(v: &str) -> PrimitiveValue {
    let mut s = v.to_string();
    if s.len() % 2 == 1 {
        s.push('\0');
    }
    PrimitiveValue::from(s)
}

/// Everything before the pixel data's value, explicit VR little endian.
fn dataset_head(instance: &str) -> Vec<u8> {
    let mut obj = InMemDicomObject::new_empty();
    let mut put = |tag, vr, v| obj.put(DataElement::new(tag, vr, v));
    put(tags::SOP_CLASS_UID, VR::UI, uid(uids::CT_IMAGE_STORAGE));
    put(tags::SOP_INSTANCE_UID, VR::UI, uid(instance));
    put(tags::MODALITY, VR::CS, PrimitiveValue::from("CT"));
    put(tags::PATIENT_ID, VR::LO, PrimitiveValue::from("BIG"));
    put(tags::STUDY_INSTANCE_UID, VR::UI, uid("1.2.3.9"));
    put(tags::SERIES_INSTANCE_UID, VR::UI, uid("1.2.3.9.1"));
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, &entries::EXPLICIT_VR_LITTLE_ENDIAN.erased())
        .unwrap();
    // (7FE0,0010) OB, reserved, 32-bit length.
    out.extend_from_slice(&[0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0]);
    out.extend_from_slice(&(PIXEL_BYTES as u32).to_le_bytes());
    out
}

fn command(instance: &str) -> Vec<u8> {
    let obj = InMemDicomObject::command_from_element_iter([
        DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            uid(uids::CT_IMAGE_STORAGE),
        ),
        DataElement::new(tags::COMMAND_FIELD, VR::US, PrimitiveValue::from(1u16)),
        DataElement::new(tags::MESSAGE_ID, VR::US, PrimitiveValue::from(1u16)),
        DataElement::new(tags::PRIORITY, VR::US, PrimitiveValue::from(0u16)),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            PrimitiveValue::from(0u16),
        ),
        DataElement::new(tags::AFFECTED_SOP_INSTANCE_UID, VR::UI, uid(instance)),
    ]);
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, &entries::IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .unwrap();
    out
}

/// Peak resident set size of this process so far, in KiB (Linux).
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_96_mib_instance_is_stored_while_the_process_grows_by_far_less() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(&SpoolConfig {
        dir: dir.path().join("spool"),
        min_free_mb: 1,
        ..SpoolConfig::default()
    })
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cfg = DicomConfig {
        ae_title: "PASSERELLE".into(),
        ..DicomConfig::default() // 256 KiB PDUs
    };
    let (_shutdown, rx) = watch::channel(false);
    tokio::spawn(passerelle_ingest::serve(
        listener,
        Arc::new(cfg),
        spool.clone(),
        Arc::new(Notify::new()),
        rx,
    ));

    let instance = "1.2.3.9.1.1";
    let head = dataset_head(instance);
    let before = peak_rss_kib();
    let head_sent = head.clone();
    tokio::task::spawn_blocking(move || {
        let mut a = ClientAssociationOptions::new()
            .calling_ae_title("CT1")
            .called_ae_title("PASSERELLE")
            .with_presentation_context(
                uids::CT_IMAGE_STORAGE,
                vec![uids::EXPLICIT_VR_LITTLE_ENDIAN],
            )
            .read_timeout(Duration::from_secs(120))
            .establish(addr)
            .unwrap();
        let pc = a.presentation_contexts()[0].id;
        a.send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc,
                value_type: PDataValueType::Command,
                is_last: true,
                data: command(instance),
            }],
        })
        .unwrap();
        let mut w = a.send_pdata(pc);
        w.write_all(&head_sent).unwrap();
        let mut offset = 0u64;
        while offset < PIXEL_BYTES {
            let n = CHUNK.min((PIXEL_BYTES - offset) as usize);
            w.write_all(&pixel_chunk(offset, n)).unwrap();
            offset += n as u64;
        }
        w.finish().unwrap();
        let Pdu::PData { data } = a.receive().unwrap() else {
            panic!("expected the C-STORE response")
        };
        let bytes: Vec<u8> = data.into_iter().flat_map(|v| v.data).collect();
        let rsp = InMemDicomObject::read_dataset_with_ts(
            &bytes[..],
            &entries::IMPLICIT_VR_LITTLE_ENDIAN.erased(),
        )
        .unwrap();
        let status: u16 = rsp.element(tags::STATUS).unwrap().to_int().unwrap();
        assert_eq!(status, 0);
        a.release().unwrap();
    })
    .await
    .unwrap();
    let grown_mib = (peak_rss_kib() - before) / 1024;
    assert!(
        grown_mib < 32,
        "storing a {} MiB instance grew the process by {grown_mib} MiB",
        PIXEL_BYTES >> 20
    );

    // And the bytes are all there, in order: read back and compare as they stream.
    let later = SystemTime::now() + Duration::from_secs(3600);
    let q = spool.claim_batch(1, u64::MAX, later).unwrap().remove(0);
    let mut r = spool.open_verified(&q).unwrap();
    let mut prefix = vec![0u8; 144];
    r.read_exact(&mut prefix).unwrap();
    let group_length = u32::from_le_bytes([prefix[140], prefix[141], prefix[142], prefix[143]]);
    let mut meta = vec![0u8; group_length as usize];
    r.read_exact(&mut meta).unwrap();
    let mut got_head = vec![0u8; head.len()];
    r.read_exact(&mut got_head).unwrap();
    assert!(got_head == head);
    let mut offset = 0u64;
    let mut buf = vec![0u8; CHUNK];
    while offset < PIXEL_BYTES {
        let n = CHUNK.min((PIXEL_BYTES - offset) as usize);
        r.read_exact(&mut buf[..n]).unwrap();
        assert!(
            buf[..n] == pixel_chunk(offset, n)[..],
            "differs at pixel byte {offset}"
        );
        offset += n as u64;
    }
    assert_eq!(r.read(&mut buf).unwrap(), 0, "nothing after the data set");
}
