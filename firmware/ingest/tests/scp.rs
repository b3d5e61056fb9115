//! In-process tests of the Storage SCP: `serve` on 127.0.0.1:0 with a real spool in a temporary
//! directory, driven by dicom-ul's synchronous SCU (on blocking threads) and by raw TCP bytes.

// Test helpers live outside `#[test]` functions, where `allow-unwrap-in-tests` does not reach.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries;
use dicom_ul::association::Error as UlError;
use dicom_ul::pdu::{
    AssociationRJ, AssociationRJResult, AssociationRJServiceProviderPresentationReason,
    AssociationRJServiceUserReason, AssociationRJSource, AssociationRQ, PDataValue, PDataValueType,
    Pdu, PresentationContextProposed, PresentationContextResultReason, UserVariableItem,
};
use dicom_ul::{ClientAssociation, ClientAssociationOptions};
use passerelle_config::{DicomConfig, SpoolConfig};
use passerelle_ingest::{serve, IMPLEMENTATION_CLASS_UID};
use passerelle_spool::Spool;
use tokio::sync::{watch, Notify};

const AE: &str = "PASSERELLE";
const CT: &str = uids::CT_IMAGE_STORAGE;
const ELE: &str = uids::EXPLICIT_VR_LITTLE_ENDIAN;
const ILE: &str = uids::IMPLICIT_VR_LITTLE_ENDIAN;
const DEFLATED: &str = uids::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN;
#[allow(deprecated)]
const EBE: &str = uids::EXPLICIT_VR_BIG_ENDIAN;
const DEADLINE: Duration = Duration::from_secs(20);

struct Scp {
    addr: SocketAddr,
    spool: Spool,
    stored: Arc<Notify>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<passerelle_ingest::Result<()>>,
    _dir: tempfile::TempDir,
}

fn dicom_cfg() -> DicomConfig {
    DicomConfig {
        ae_title: AE.into(),
        listen: "127.0.0.1:0".into(),
        max_pdu_length: 16384,
        ..DicomConfig::default()
    }
}

async fn start(dicom: DicomConfig, min_free_mb: u64) -> Scp {
    let dir = tempfile::tempdir().unwrap();
    let spool_cfg = SpoolConfig {
        dir: dir.path().join("spool"),
        min_free_mb,
        ..SpoolConfig::default()
    };
    let (spool, _) = Spool::open(&spool_cfg).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stored = Arc::new(Notify::new());
    let (shutdown, rx) = watch::channel(false);
    let task = tokio::spawn(serve(
        listener,
        Arc::new(dicom),
        spool.clone(),
        stored.clone(),
        rx,
    ));
    Scp {
        addr,
        spool,
        stored,
        shutdown,
        task,
        _dir: dir,
    }
}

/// Runs blocking SCU code off the runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

fn associate(
    addr: SocketAddr,
    calling: &str,
    called: &str,
    contexts: &[(&str, &[&str])],
) -> Result<ClientAssociation<TcpStream>, UlError> {
    let mut opts = ClientAssociationOptions::new()
        .calling_ae_title(calling.to_string())
        .called_ae_title(called.to_string())
        .read_timeout(DEADLINE);
    for (abs, ts) in contexts {
        opts = opts
            .with_presentation_context(abs.to_string(), ts.iter().map(|t| t.to_string()).collect());
    }
    opts.establish(addr)
}

fn pc_for(assoc: &ClientAssociation<TcpStream>, abstract_syntax: &str) -> (u8, String) {
    let pc = assoc
        .presentation_contexts()
        .iter()
        .find(|pc| pc.abstract_syntax == abstract_syntax)
        .expect("context accepted");
    (pc.id, pc.transfer_syntax.clone())
}

fn uid(v: &str) -> PrimitiveValue {
    let mut s = v.to_string();
    if s.len() % 2 == 1 {
        s.push('\0');
    }
    PrimitiveValue::from(s)
}

fn command(field: u16, msg_id: u16, class: &str, instance: Option<&str>, dataset: bool) -> Vec<u8> {
    let mut elements = vec![
        DataElement::new(tags::AFFECTED_SOP_CLASS_UID, VR::UI, uid(class)),
        DataElement::new(tags::COMMAND_FIELD, VR::US, PrimitiveValue::from(field)),
        DataElement::new(tags::MESSAGE_ID, VR::US, PrimitiveValue::from(msg_id)),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            PrimitiveValue::from(if dataset { 0x0000u16 } else { 0x0101 }),
        ),
    ];
    if let Some(i) = instance {
        elements.push(DataElement::new(
            tags::PRIORITY,
            VR::US,
            PrimitiveValue::from(0u16),
        ));
        elements.push(DataElement::new(
            tags::AFFECTED_SOP_INSTANCE_UID,
            VR::UI,
            uid(i),
        ));
    }
    let obj = InMemDicomObject::command_from_element_iter(elements);
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, &entries::IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .unwrap();
    out
}

fn pdv(pc: u8, command: bool, last: bool, data: Vec<u8>) -> PDataValue {
    PDataValue {
        presentation_context_id: pc,
        value_type: if command {
            PDataValueType::Command
        } else {
            PDataValueType::Data
        },
        is_last: last,
        data,
    }
}

/// Reads the next response command set; returns it parsed.
fn response(assoc: &mut ClientAssociation<TcpStream>) -> InMemDicomObject {
    let mut bytes = Vec::new();
    loop {
        match assoc.receive().unwrap() {
            Pdu::PData { data } => {
                for v in data {
                    assert_eq!(v.value_type, PDataValueType::Command);
                    bytes.extend_from_slice(&v.data);
                    if v.is_last {
                        return InMemDicomObject::read_dataset_with_ts(
                            &bytes[..],
                            &entries::IMPLICIT_VR_LITTLE_ENDIAN.erased(),
                        )
                        .unwrap();
                    }
                }
            }
            other => panic!("expected a response, got {other:?}"),
        }
    }
}

fn u16_of(obj: &InMemDicomObject, tag: Tag) -> u16 {
    obj.element(tag).unwrap().to_int::<u16>().unwrap()
}

fn str_of(obj: &InMemDicomObject, tag: Tag) -> String {
    obj.element(tag)
        .unwrap()
        .to_str()
        .unwrap()
        .trim_end_matches(['\0', ' '])
        .to_string()
}

fn echo(assoc: &mut ClientAssociation<TcpStream>, msg_id: u16) -> InMemDicomObject {
    let (pc, _) = pc_for(assoc, uids::VERIFICATION);
    let cmd = command(0x0030, msg_id, uids::VERIFICATION, None, false);
    assoc
        .send(&Pdu::PData {
            data: vec![pdv(pc, true, true, cmd)],
        })
        .unwrap();
    response(assoc)
}

/// Sends a C-STORE (command PDU, then the data set through dicom-ul's P-DATA writer); returns the
/// response.
fn store(
    assoc: &mut ClientAssociation<TcpStream>,
    pc: u8,
    msg_id: u16,
    class: &str,
    instance: &str,
    dataset: &[u8],
) -> InMemDicomObject {
    let cmd = command(0x0001, msg_id, class, Some(instance), true);
    assoc
        .send(&Pdu::PData {
            data: vec![pdv(pc, true, true, cmd)],
        })
        .unwrap();
    let mut w = assoc.send_pdata(pc);
    w.write_all(dataset).unwrap();
    w.finish().unwrap();
    response(assoc)
}

/// A small CT data set in the given transfer syntax (deflated ones are deflated here).
fn dataset(ts: &str, class: &str, instance: &str, pixels: usize) -> Vec<u8> {
    let mut obj = InMemDicomObject::new_empty();
    let mut put = |tag, vr, v: PrimitiveValue| obj.put(DataElement::new(tag, vr, v));
    put(tags::SOP_CLASS_UID, VR::UI, uid(class));
    put(tags::SOP_INSTANCE_UID, VR::UI, uid(instance));
    put(tags::STUDY_DATE, VR::DA, PrimitiveValue::from("20260101"));
    put(tags::MODALITY, VR::CS, PrimitiveValue::from("CT"));
    put(tags::PATIENT_NAME, VR::PN, PrimitiveValue::from("DOE^JANE"));
    put(tags::PATIENT_ID, VR::LO, PrimitiveValue::from("PAT-1"));
    put(
        tags::STUDY_INSTANCE_UID,
        VR::UI,
        uid("1.2.826.0.1.3680043.8.498.1"),
    );
    put(
        tags::SERIES_INSTANCE_UID,
        VR::UI,
        uid("1.2.826.0.1.3680043.8.498.1.1"),
    );
    put(tags::ROWS, VR::US, PrimitiveValue::from(1u16));
    put(
        tags::PIXEL_DATA,
        VR::OB,
        PrimitiveValue::from((0..pixels).map(|i| i as u8).collect::<Vec<u8>>()),
    );
    let mut out = Vec::new();
    if ts == DEFLATED {
        let mut plain = Vec::new();
        obj.write_dataset_with_ts(&mut plain, &entries::EXPLICIT_VR_LITTLE_ENDIAN.erased())
            .unwrap();
        let mut enc = flate2::write::DeflateEncoder::new(&mut out, flate2::Compression::default());
        enc.write_all(&plain).unwrap();
        enc.finish().unwrap();
    } else {
        use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
        let ts = dicom_transfer_syntax_registry::TransferSyntaxRegistry
            .get(ts)
            .unwrap();
        obj.write_dataset_with_ts(&mut out, ts).unwrap();
    }
    out
}

/// Claims everything queued and reads each instance's raw Part-10 bytes back, verified.
fn spooled(spool: &Spool) -> Vec<(passerelle_spool::QueuedInstance, Vec<u8>)> {
    let later = SystemTime::now() + Duration::from_secs(3600);
    let batch = spool.claim_batch(100, u64::MAX, later).unwrap();
    batch
        .into_iter()
        .map(|q| {
            let mut r = spool.open_verified(&q).unwrap();
            let mut bytes = Vec::new();
            r.read_to_end(&mut bytes).unwrap();
            (q, bytes)
        })
        .collect()
}

/// Splits Part-10 bytes into the file meta table and the data set bytes.
fn split_part10(bytes: &[u8]) -> (dicom_object::meta::FileMetaTable, &[u8]) {
    assert_eq!(&bytes[..128], &[0u8; 128][..]);
    assert_eq!(&bytes[128..132], b"DICM");
    let group_length = u32::from_le_bytes([bytes[140], bytes[141], bytes[142], bytes[143]]);
    let meta = dicom_object::meta::FileMetaTable::from_reader(&bytes[128..]).unwrap();
    (meta, &bytes[144 + group_length as usize..])
}

fn trimmed(s: &str) -> &str {
    s.trim_end_matches(['\0', ' '])
}

// --- raw TCP helpers ---

fn raw_connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s
}

fn send_raw(s: &mut TcpStream, pdu: &Pdu) {
    let mut bytes = Vec::new();
    dicom_ul::write_pdu(&mut bytes, pdu).unwrap();
    s.write_all(&bytes).unwrap();
}

/// The next PDU, or `None` when the connection was closed.
fn recv_raw(s: &mut TcpStream) -> Option<Pdu> {
    let mut header = [0u8; 6];
    s.read_exact(&mut header).ok()?;
    let len = u32::from_be_bytes([header[2], header[3], header[4], header[5]]) as usize;
    let mut buf = header.to_vec();
    buf.resize(6 + len, 0);
    s.read_exact(&mut buf[6..]).unwrap();
    dicom_ul::read_pdu(&buf[..], dicom_ul::pdu::MAXIMUM_PDU_SIZE, false).unwrap()
}

/// True once the server closed the connection (EOF or reset) before the read timeout.
fn closed_by_server(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

fn raw_rq(contexts: Vec<(u8, &str, Vec<&str>)>) -> Pdu {
    Pdu::AssociationRQ(AssociationRQ {
        protocol_version: 1,
        calling_ae_title: "RAW".into(),
        called_ae_title: AE.into(),
        application_context_name: "1.2.840.10008.3.1.1.1".into(),
        presentation_contexts: contexts
            .into_iter()
            .map(|(id, abs, ts)| PresentationContextProposed {
                id,
                abstract_syntax: abs.into(),
                transfer_syntaxes: ts.into_iter().map(String::from).collect(),
            })
            .collect(),
        user_variables: vec![UserVariableItem::MaxLength(16384)],
    })
}

// --- tests ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_echo_is_answered_with_the_requests_message_id() {
    let scp = start(dicom_cfg(), 1).await;
    let addr = scp.addr;
    blocking(move || {
        let mut a = associate(addr, "CT1", AE, &[(uids::VERIFICATION, &[ILE])]).unwrap();
        assert_eq!(a.acceptor_max_pdu_length(), 16384);
        assert!(a
            .user_variables()
            .contains(&UserVariableItem::ImplementationClassUID(
                IMPLEMENTATION_CLASS_UID.into()
            )));
        for id in [1u16, 7, 65535] {
            let rsp = echo(&mut a, id);
            assert_eq!(u16_of(&rsp, tags::COMMAND_FIELD), 0x8030);
            assert_eq!(u16_of(&rsp, tags::MESSAGE_ID_BEING_RESPONDED_TO), id);
            assert_eq!(u16_of(&rsp, tags::STATUS), 0x0000);
        }
        a.release().unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_store_is_committed_and_the_spooled_data_set_is_byte_identical_to_what_was_sent() {
    let scp = start(dicom_cfg(), 1).await;
    let addr = scp.addr;
    // ~100 KB: several P-DATA PDUs of at most 16 KiB each.
    let sent = dataset(ELE, CT, "1.2.3.100", 100_000);
    let ds = sent.clone();
    blocking(move || {
        let mut a = associate(addr, "CT1", AE, &[(CT, &[ELE, ILE])]).unwrap();
        let (pc, ts) = pc_for(&a, CT);
        assert_eq!(ts, ELE, "the first proposed syntax is preferred");
        let rsp = store(&mut a, pc, 5, CT, "1.2.3.100", &ds);
        assert_eq!(u16_of(&rsp, tags::STATUS), 0x0000);
        assert_eq!(u16_of(&rsp, tags::COMMAND_FIELD), 0x8001);
        assert_eq!(u16_of(&rsp, tags::MESSAGE_ID_BEING_RESPONDED_TO), 5);
        assert_eq!(str_of(&rsp, tags::AFFECTED_SOP_INSTANCE_UID), "1.2.3.100");
        assert_eq!(str_of(&rsp, tags::AFFECTED_SOP_CLASS_UID), CT);
        a.release().unwrap();
    })
    .await;
    tokio::time::timeout(DEADLINE, scp.stored.notified())
        .await
        .expect("the uplink is woken after the commit");
    // The compactor rewrites a file only if its content matches the row's SHA-256, which the
    // association task computed from the PDVs it handed to the store task.
    let compacted = scp.spool.compact_batch(10).unwrap();
    assert_eq!(
        (compacted.compacted, compacted.skipped),
        (1, 0),
        "the recorded SHA-256 is the content's"
    );

    let got = spooled(&scp.spool);
    assert_eq!(got.len(), 1);
    let (q, bytes) = &got[0];
    assert_eq!(q.sop_instance_uid, "1.2.3.100");
    assert_eq!(q.sop_class_uid, CT);
    assert_eq!(q.transfer_syntax_uid, ELE);
    assert_eq!(q.study_instance_uid, "1.2.826.0.1.3680043.8.498.1");
    assert_eq!(q.raw_size, bytes.len() as u64);
    let (meta, body) = split_part10(bytes);
    assert!(
        body == &sent[..],
        "data set bytes differ from what was sent"
    );
    assert_eq!(trimmed(meta.media_storage_sop_instance_uid()), "1.2.3.100");
    assert_eq!(trimmed(meta.media_storage_sop_class_uid()), CT);
    assert_eq!(trimmed(meta.transfer_syntax()), ELE);
    assert_eq!(
        trimmed(meta.implementation_class_uid()),
        IMPLEMENTATION_CLASS_UID
    );
    assert_eq!(
        meta.source_application_entity_title().map(trimmed),
        Some("CT1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deflated_and_big_endian_contexts_are_accepted_and_stored_as_sent() {
    let scp = start(dicom_cfg(), 1).await;
    let addr = scp.addr;
    let mr = uids::MR_IMAGE_STORAGE;
    let deflated = dataset(DEFLATED, CT, "1.2.3.300", 20_000);
    let big = dataset(EBE, mr, "1.2.3.301", 20_000);
    let (d, b) = (deflated.clone(), big.clone());
    blocking(move || {
        let mut a = associate(addr, "CT1", AE, &[(CT, &[DEFLATED]), (mr, &[EBE])]).unwrap();
        let (pc_ct, ts_ct) = pc_for(&a, CT);
        let (pc_mr, ts_mr) = pc_for(&a, mr);
        assert_eq!((ts_ct.as_str(), ts_mr.as_str()), (DEFLATED, EBE));
        assert_eq!(
            u16_of(&store(&mut a, pc_ct, 1, CT, "1.2.3.300", &d), tags::STATUS),
            0
        );
        assert_eq!(
            u16_of(&store(&mut a, pc_mr, 2, mr, "1.2.3.301", &b), tags::STATUS),
            0
        );
        a.release().unwrap();
    })
    .await;
    let mut got = spooled(&scp.spool);
    got.sort_by(|x, y| x.0.sop_instance_uid.cmp(&y.0.sop_instance_uid));
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].0.transfer_syntax_uid, DEFLATED);
    assert!(split_part10(&got[0].1).1 == &deflated[..]);
    assert_eq!(got[1].0.transfer_syntax_uid, EBE);
    assert!(split_part10(&got[1].1).1 == &big[..]);
}

fn check_rejected(addr: SocketAddr, calling: &str, called: &str, expect: AssociationRJ) {
    match associate(addr, calling, called, &[(uids::VERIFICATION, &[ILE])]) {
        Err(UlError::Rejected { association_rj, .. }) => assert_eq!(association_rj, expect),
        Err(other) => panic!("expected a rejection, got {other}"),
        Ok(_) => panic!("expected a rejection, got an association"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_called_ae_or_a_calling_ae_not_allowed_gets_a_permanent_rejection() {
    let mut cfg = dicom_cfg();
    cfg.allowed_calling_ae_titles = vec!["CT1".into()];
    let scp = start(cfg, 1).await;
    let addr = scp.addr;
    blocking(move || {
        check_rejected(
            addr,
            "CT1",
            "SOMEONE_ELSE",
            AssociationRJ {
                result: AssociationRJResult::Permanent,
                source: AssociationRJSource::ServiceUser(
                    AssociationRJServiceUserReason::CalledAETitleNotRecognized,
                ),
            },
        );
        check_rejected(
            addr,
            "US9",
            AE,
            AssociationRJ {
                result: AssociationRJResult::Permanent,
                source: AssociationRJSource::ServiceUser(
                    AssociationRJServiceUserReason::CallingAETitleNotRecognized,
                ),
            },
        );
        let a = associate(addr, "CT1", AE, &[(uids::VERIFICATION, &[ILE])]).unwrap();
        a.release().unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_association_over_the_cap_gets_a_transient_rejection_and_the_slot_comes_back() {
    let mut cfg = dicom_cfg();
    cfg.max_associations = 1;
    let scp = start(cfg, 1).await;
    let addr = scp.addr;
    blocking(move || {
        let mut first = associate(addr, "CT1", AE, &[(uids::VERIFICATION, &[ILE])]).unwrap();
        check_rejected(
            addr,
            "CT2",
            AE,
            AssociationRJ {
                result: AssociationRJResult::Transient,
                source: AssociationRJSource::ServiceProviderPresentation(
                    AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
                ),
            },
        );
        assert_eq!(u16_of(&echo(&mut first, 3), tags::STATUS), 0);
        first.release().unwrap();
        // The slot is freed when the server has closed the first association.
        let start = Instant::now();
        loop {
            match associate(addr, "CT2", AE, &[(uids::VERIFICATION, &[ILE])]) {
                Ok(a) => {
                    a.release().unwrap();
                    break;
                }
                Err(UlError::Rejected { .. }) if start.elapsed() < DEADLINE => {
                    // Poll interval, not synchronisation: the loop checks the condition.
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contexts_are_rejected_with_reason_3_for_non_storage_and_4_for_unknown_transfer_syntax() {
    let scp = start(dicom_cfg(), 1).await;
    let addr = scp.addr;
    blocking(move || {
        let mut s = raw_connect(addr);
        send_raw(
            &mut s,
            &raw_rq(vec![
                (1, CT, vec!["1.2.3.4.999", uids::JPEG2000_LOSSLESS]),
                (3, uids::MODALITY_WORKLIST_INFORMATION_MODEL_FIND, vec![ILE]),
                (5, uids::MR_IMAGE_STORAGE, vec!["1.2.3.4.999"]),
                (
                    7,
                    uids::ENCAPSULATED_PDF_STORAGE,
                    vec![uids::RLE_LOSSLESS, ELE],
                ),
            ]),
        );
        let Some(Pdu::AssociationAC(ac)) = recv_raw(&mut s) else {
            panic!("expected A-ASSOCIATE-AC")
        };
        let results: Vec<_> = ac
            .presentation_contexts
            .iter()
            .map(|r| (r.id, r.reason.clone()))
            .collect();
        assert_eq!(
            results,
            vec![
                (1, PresentationContextResultReason::Acceptance),
                (
                    3,
                    PresentationContextResultReason::AbstractSyntaxNotSupported
                ),
                (
                    5,
                    PresentationContextResultReason::TransferSyntaxesNotSupported
                ),
                (7, PresentationContextResultReason::Acceptance),
            ]
        );
        assert_eq!(
            ac.presentation_contexts[0].transfer_syntax,
            uids::JPEG2000_LOSSLESS
        );
        assert_eq!(
            ac.presentation_contexts[3].transfer_syntax,
            uids::RLE_LOSSLESS
        );
        send_raw(&mut s, &Pdu::ReleaseRQ);
        assert_eq!(recv_raw(&mut s), Some(Pdu::ReleaseRP));
        assert!(closed_by_server(&mut s));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uid_mismatch_answers_a900_garbage_c000_a_bad_uid_0117_and_the_association_stays_usable()
{
    let scp = start(dicom_cfg(), 1).await;
    let addr = scp.addr;
    let mismatched = dataset(ELE, CT, "1.2.3.201", 3000);
    let wrong_class = dataset(ELE, uids::MR_IMAGE_STORAGE, "1.2.3.202", 3000);
    let garbage = b"Not a DICOM data set at all, just some text sent by mistake.\n".repeat(200);
    let good = dataset(ELE, CT, "1.2.3.203", 3000);
    let bad_uid = dataset(ELE, CT, "1.2.3.abc", 3000);
    blocking(move || {
        let mut a = associate(
            addr,
            "CT1",
            AE,
            &[(CT, &[ELE]), (uids::VERIFICATION, &[ILE])],
        )
        .unwrap();
        let (pc, _) = pc_for(&a, CT);
        let check = |a: &mut ClientAssociation<TcpStream>, id, uid, ds: &[u8], status| {
            let rsp = store(a, pc, id, CT, uid, ds);
            assert_eq!(u16_of(&rsp, tags::STATUS), status, "{uid}");
            assert_eq!(u16_of(&rsp, tags::MESSAGE_ID_BEING_RESPONDED_TO), id);
        };
        check(&mut a, 1, "1.2.3.200", &mismatched, 0xA900);
        check(&mut a, 2, "1.2.3.202", &wrong_class, 0xA900);
        check(&mut a, 3, "1.2.3.204", &garbage, 0xC000);
        check(&mut a, 4, "1.2.3.abc", &bad_uid, 0x0117);
        // Not PS3.5 9.1, but written by older modalities: stored, as a PACS takes it.
        check(
            &mut a,
            7,
            "1.2.03",
            &dataset(ELE, CT, "1.2.03", 300),
            0x0000,
        );
        check(&mut a, 6, "1.2.3.203", &good, 0x0000);
        assert_eq!(u16_of(&echo(&mut a, 5), tags::STATUS), 0);
        a.release().unwrap();
    })
    .await;
    let got = spooled(&scp.spool);
    let uids: Vec<_> = got
        .iter()
        .map(|(q, _)| q.sop_instance_uid.as_str())
        .collect();
    assert_eq!(
        uids,
        vec!["1.2.03", "1.2.3.203"],
        "refused instances are not queued"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_answers_a700_and_the_association_still_answers_c_echo() {
    // No real disk has 2^40 MB free: every C-STORE finds the spool below its minimum.
    let scp = start(dicom_cfg(), 1 << 40).await;
    let addr = scp.addr;
    let ds = dataset(ELE, CT, "1.2.3.400", 50_000);
    blocking(move || {
        let mut a = associate(
            addr,
            "CT1",
            AE,
            &[(CT, &[ELE]), (uids::VERIFICATION, &[ILE])],
        )
        .unwrap();
        let (pc, _) = pc_for(&a, CT);
        let rsp = store(&mut a, pc, 9, CT, "1.2.3.400", &ds);
        assert_eq!(u16_of(&rsp, tags::STATUS), 0xA700);
        assert_eq!(u16_of(&rsp, tags::MESSAGE_ID_BEING_RESPONDED_TO), 9);
        let rsp = echo(&mut a, 10);
        assert_eq!(u16_of(&rsp, tags::STATUS), 0);
        assert_eq!(u16_of(&rsp, tags::MESSAGE_ID_BEING_RESPONDED_TO), 10);
        a.release().unwrap();
    })
    .await;
    assert!(spooled(&scp.spool).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pdu_announcing_more_than_the_maximum_is_aborted_and_the_next_client_is_served() {
    let scp = start(dicom_cfg(), 1).await;
    let addr = scp.addr;
    blocking(move || {
        // Before association: an A-ASSOCIATE-RQ announcing 100 MB.
        let mut s = raw_connect(addr);
        s.write_all(&[0x01, 0, 0x05, 0xF5, 0xE1, 0x00]).unwrap();
        assert!(matches!(recv_raw(&mut s), Some(Pdu::AbortRQ { .. })));
        assert!(closed_by_server(&mut s));

        // On an established association: a P-DATA one byte over our maximum.
        let mut s = raw_connect(addr);
        send_raw(&mut s, &raw_rq(vec![(1, uids::VERIFICATION, vec![ILE])]));
        assert!(matches!(recv_raw(&mut s), Some(Pdu::AssociationAC(_))));
        let too_long: u32 = 16384 + 1;
        let mut header = vec![0x04, 0];
        header.extend_from_slice(&too_long.to_be_bytes());
        s.write_all(&header).unwrap();
        assert!(matches!(recv_raw(&mut s), Some(Pdu::AbortRQ { .. })));
        assert!(closed_by_server(&mut s));

        let mut a = associate(addr, "CT1", AE, &[(uids::VERIFICATION, &[ILE])]).unwrap();
        assert_eq!(u16_of(&echo(&mut a, 1), tags::STATUS), 0);
        a.release().unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_pdata_carrying_the_last_command_fragment_and_data_fragments_is_understood() {
    let scp = start(dicom_cfg(), 1).await;
    let addr = scp.addr;
    let sent = dataset(ELE, CT, "1.2.3.500", 2000);
    let ds = sent.clone();
    blocking(move || {
        let mut a = associate(addr, "CT1", AE, &[(CT, &[ELE])]).unwrap();
        let (pc, _) = pc_for(&a, CT);
        let cmd = command(0x0001, 77, CT, Some("1.2.3.500"), true);
        let (c1, c2) = cmd.split_at(20);
        let (d1, d2) = ds.split_at(1000);
        a.send(&Pdu::PData {
            data: vec![pdv(pc, true, false, c1.to_vec())],
        })
        .unwrap();
        a.send(&Pdu::PData {
            data: vec![
                pdv(pc, true, true, c2.to_vec()),
                pdv(pc, false, false, d1.to_vec()),
                pdv(pc, false, true, d2.to_vec()),
            ],
        })
        .unwrap();
        let rsp = response(&mut a);
        assert_eq!(u16_of(&rsp, tags::STATUS), 0);
        assert_eq!(u16_of(&rsp, tags::MESSAGE_ID_BEING_RESPONDED_TO), 77);
        a.release().unwrap();
    })
    .await;
    let got = spooled(&scp.spool);
    assert_eq!(got.len(), 1);
    assert!(split_part10(&got[0].1).1 == &sent[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_association_is_aborted_after_the_idle_timeout_and_a_silent_socket_after_artim() {
    let mut cfg = dicom_cfg();
    cfg.idle_timeout_secs = 1;
    cfg.artim_timeout_secs = 1;
    let scp = start(cfg, 1).await;
    let addr = scp.addr;
    blocking(move || {
        let started = Instant::now();
        let mut a = associate(addr, "CT1", AE, &[(uids::VERIFICATION, &[ILE])]).unwrap();
        assert!(matches!(a.receive(), Ok(Pdu::AbortRQ { .. })));
        assert!(started.elapsed() >= Duration::from_millis(900));

        let started = Instant::now();
        let mut s = raw_connect(addr);
        assert!(
            closed_by_server(&mut s),
            "ARTIM closes a socket that never associates"
        );
        assert!(started.elapsed() >= Duration::from_millis(900));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pdu_crossing_a_slow_link_is_stored_though_it_takes_longer_than_the_idle_timeout() {
    let mut cfg = dicom_cfg();
    cfg.idle_timeout_secs = 1;
    let scp = start(cfg, 1).await;
    let addr = scp.addr;
    let sent = dataset(ELE, CT, "1.2.3.501", 6_000);
    let ds = sent.clone();
    blocking(move || {
        let mut a = associate(addr, "CT1", AE, &[(CT, &[ELE])]).unwrap();
        let (pc, _) = pc_for(&a, CT);
        let cmd = command(0x0001, 78, CT, Some("1.2.3.501"), true);
        a.send(&Pdu::PData {
            data: vec![pdv(pc, true, true, cmd)],
        })
        .unwrap();
        let mut pdu = Vec::new();
        dicom_ul::write_pdu(
            &mut pdu,
            &Pdu::PData {
                data: vec![pdv(pc, false, true, ds)],
            },
        )
        .unwrap();
        // A link that brings a piece every 0.25 s: 2.5 s for the PDU, never 1 s without a byte.
        let started = Instant::now();
        for piece in pdu.chunks(pdu.len().div_ceil(10)) {
            a.inner_stream().write_all(piece).unwrap();
            std::thread::sleep(Duration::from_millis(250));
        }
        assert!(started.elapsed() >= Duration::from_millis(2500));
        let rsp = response(&mut a);
        assert_eq!(u16_of(&rsp, tags::STATUS), 0);
        a.release().unwrap();
    })
    .await;
    let got = spooled(&scp.spool);
    assert_eq!(got.len(), 1);
    assert!(split_part10(&got[0].1).1 == &sent[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_accepting_and_aborts_associations_still_open_after_the_grace_period() {
    let mut cfg = dicom_cfg();
    cfg.shutdown_grace_secs = 1;
    let scp = start(cfg, 1).await;
    let addr = scp.addr;
    let mut a = blocking(move || {
        let mut a = associate(addr, "CT1", AE, &[(uids::VERIFICATION, &[ILE])]).unwrap();
        assert_eq!(u16_of(&echo(&mut a, 1), tags::STATUS), 0);
        a
    })
    .await;
    scp.shutdown.send(true).unwrap();
    let served = tokio::time::timeout(DEADLINE, scp.task)
        .await
        .unwrap()
        .unwrap();
    assert!(served.is_ok());
    blocking(move || {
        assert!(matches!(a.receive(), Ok(Pdu::AbortRQ { .. })));
        assert!(TcpStream::connect(addr).is_err(), "the listener is closed");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_associations_each_store_their_instances() {
    let scp = start(dicom_cfg(), 1).await;
    let addr = scp.addr;
    let senders: Vec<_> = (0..4)
        .map(|n| {
            std::thread::spawn(move || {
                let calling = format!("MOD{n}");
                let mut a = associate(addr, &calling, AE, &[(CT, &[ELE])]).unwrap();
                let (pc, _) = pc_for(&a, CT);
                for i in 0..3u16 {
                    let uid = format!("1.2.3.600.{n}.{i}");
                    let ds = dataset(ELE, CT, &uid, 40_000 + usize::from(i));
                    let rsp = store(&mut a, pc, i + 1, CT, &uid, &ds);
                    assert_eq!(u16_of(&rsp, tags::STATUS), 0, "{uid}");
                }
                a.release().unwrap();
            })
        })
        .collect();
    blocking(move || {
        for s in senders {
            s.join().unwrap();
        }
    })
    .await;
    let got = spooled(&scp.spool);
    assert_eq!(got.len(), 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_other_than_echo_or_store_gets_0211_after_its_data_set_is_discarded() {
    let scp = start(dicom_cfg(), 1).await;
    let addr = scp.addr;
    blocking(move || {
        let mut a = associate(addr, "CT1", AE, &[(CT, &[ELE])]).unwrap();
        let (pc, _) = pc_for(&a, CT);
        // A C-FIND-RQ (0x0020) with an identifier data set, on a storage context.
        let cmd = command(0x0020, 31, CT, None, true);
        a.send(&Pdu::PData {
            data: vec![pdv(pc, true, true, cmd), pdv(pc, false, true, vec![0; 8])],
        })
        .unwrap();
        let rsp = response(&mut a);
        assert_eq!(u16_of(&rsp, tags::COMMAND_FIELD), 0x8020);
        assert_eq!(u16_of(&rsp, tags::STATUS), 0x0211);
        assert_eq!(u16_of(&rsp, tags::MESSAGE_ID_BEING_RESPONDED_TO), 31);
        // The association still stores.
        let ds = dataset(ELE, CT, "1.2.3.700", 1000);
        assert_eq!(
            u16_of(&store(&mut a, pc, 32, CT, "1.2.3.700", &ds), tags::STATUS),
            0
        );
        a.release().unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_cut_short_by_release_or_abort_is_not_stored() {
    let scp = start(dicom_cfg(), 1).await;
    let addr = scp.addr;
    let ds = dataset(ELE, CT, "1.2.3.800", 30_000);
    blocking(move || {
        for release in [true, false] {
            let mut a = associate(addr, "CT1", AE, &[(CT, &[ELE])]).unwrap();
            let (pc, _) = pc_for(&a, CT);
            let cmd = command(0x0001, 1, CT, Some("1.2.3.800"), true);
            a.send(&Pdu::PData {
                data: vec![
                    pdv(pc, true, true, cmd),
                    pdv(pc, false, false, ds[..10_000].to_vec()),
                ],
            })
            .unwrap();
            if release {
                a.send(&Pdu::ReleaseRQ).unwrap();
                assert!(matches!(a.receive(), Ok(Pdu::ReleaseRP)));
            } else {
                a.abort().unwrap();
            }
        }
    })
    .await;
    assert!(spooled(&scp.spool).is_empty());
    let status = scp.spool.status(SystemTime::now()).unwrap();
    assert_eq!(status.queued + status.uploading, 0);
    // The store tasks notice the cut and drop their temporary files.
    let tmp = scp.spool.dir().join("tmp");
    let start = Instant::now();
    while std::fs::read_dir(&tmp).unwrap().count() > 0 {
        assert!(
            start.elapsed() < DEADLINE,
            "temporary files left in {tmp:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await; // poll interval
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_never_take_an_association_slot_so_a_modality_still_gets_in() {
    // Found by tests/system/test_abuse.py: 32 connections that never sent a byte held every
    // association slot (and every rejection slot) until ARTIM closed them, so a modality
    // connecting meanwhile was closed without even a rejection.
    let mut cfg = dicom_cfg();
    cfg.max_associations = 2;
    cfg.artim_timeout_secs = 60;
    let scp = start(cfg, 1).await;
    let addr = scp.addr;
    blocking(move || {
        let idle: Vec<TcpStream> = (0..40).map(|_| raw_connect(addr)).collect();
        // Half-sent requests do not take a slot either.
        let mut half = raw_connect(addr);
        let mut rq = Vec::new();
        dicom_ul::write_pdu(&mut rq, &raw_rq(vec![(1, uids::VERIFICATION, vec![ILE])])).unwrap();
        half.write_all(&rq[..rq.len() / 2]).unwrap();
        let mut first = associate(addr, "CT1", AE, &[(uids::VERIFICATION, &[ILE])]).unwrap();
        let mut second = associate(addr, "CT2", AE, &[(uids::VERIFICATION, &[ILE])]).unwrap();
        assert_eq!(u16_of(&echo(&mut first, 1), tags::STATUS), 0);
        assert_eq!(u16_of(&echo(&mut second, 2), tags::STATUS), 0);
        // The cap still holds for real associations.
        check_rejected(
            addr,
            "CT3",
            AE,
            AssociationRJ {
                result: AssociationRJResult::Transient,
                source: AssociationRJSource::ServiceProviderPresentation(
                    AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
                ),
            },
        );
        first.release().unwrap();
        second.release().unwrap();
        drop((idle, half));
    })
    .await;
}

#[tokio::test]
async fn a_pdu_body_cut_short_by_the_peer_is_a_read_error() {
    // Through the fuzzing entry point: the same reader an association uses.
    let bytes = [0x01, 0, 0, 0, 0, 0x10, 1, 2, 3];
    let err = passerelle_ingest::fuzzing::read_pdu(&bytes, 16384).unwrap_err();
    assert!(err.starts_with("Cannot read a PDU"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_c_store_whose_sop_class_is_not_its_contexts_is_refused_0122_and_nothing_is_stored() {
    let scp = start(dicom_cfg(), 1).await;
    let addr = scp.addr;
    let mr = dataset(ELE, uids::MR_IMAGE_STORAGE, "1.2.3.301", 3000);
    let ct = dataset(ELE, CT, "1.2.3.302", 3000);
    blocking(move || {
        let mut a = associate(
            addr,
            "CT1",
            AE,
            &[(CT, &[ELE]), (uids::VERIFICATION, &[ILE])],
        )
        .unwrap();
        let (pc, _) = pc_for(&a, CT);
        // An MR instance (command and data set agree) sent on the context negotiated for CT.
        let rsp = store(&mut a, pc, 7, uids::MR_IMAGE_STORAGE, "1.2.3.301", &mr);
        assert_eq!(u16_of(&rsp, tags::STATUS), 0x0122);
        assert_eq!(u16_of(&rsp, tags::MESSAGE_ID_BEING_RESPONDED_TO), 7);
        // A CT instance sent on the Verification context.
        let (echo_pc, _) = pc_for(&a, uids::VERIFICATION);
        let rsp = store(&mut a, echo_pc, 10, CT, "1.2.3.302", &ct);
        assert_eq!(u16_of(&rsp, tags::STATUS), 0x0122);
        // A C-STORE announcing no data set.
        let cmd = command(0x0001, 11, CT, Some("1.2.3.303"), false);
        a.send(&Pdu::PData {
            data: vec![pdv(pc, true, true, cmd)],
        })
        .unwrap();
        let rsp = response(&mut a);
        assert_eq!(u16_of(&rsp, tags::STATUS), 0xC000);
        assert_eq!(u16_of(&rsp, tags::MESSAGE_ID_BEING_RESPONDED_TO), 11);
        // The association goes on.
        let rsp = store(&mut a, pc, 8, CT, "1.2.3.302", &ct);
        assert_eq!(u16_of(&rsp, tags::STATUS), 0);
        assert_eq!(u16_of(&echo(&mut a, 9), tags::STATUS), 0);
        a.release().unwrap();
    })
    .await;
    let got = spooled(&scp.spool);
    let uids: Vec<_> = got
        .iter()
        .map(|(q, _)| q.sop_instance_uid.as_str())
        .collect();
    assert_eq!(
        uids,
        vec!["1.2.3.302"],
        "the refused instance is not queued"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_peer_that_keeps_its_connection_open_does_not_hold_the_only_slot() {
    let mut cfg = dicom_cfg();
    cfg.max_associations = 1;
    cfg.artim_timeout_secs = 600;
    let scp = start(cfg, 1).await;
    let addr = scp.addr;
    blocking(move || {
        let mut rejected = raw_connect(addr);
        let Pdu::AssociationRQ(mut rq) = raw_rq(vec![(1, uids::VERIFICATION, vec![ILE])]) else {
            unreachable!()
        };
        rq.called_ae_title = "SOMEONE_ELSE".into();
        send_raw(&mut rejected, &Pdu::AssociationRQ(rq));
        assert!(matches!(
            recv_raw(&mut rejected),
            Some(Pdu::AssociationRJ(_))
        ));
        // `rejected` stays open (the server lingers up to ARTIM, 10 min here); a modality still gets in.
        let mut a = associate(addr, "CT1", AE, &[(uids::VERIFICATION, &[ILE])]).unwrap();
        assert_eq!(u16_of(&echo(&mut a, 1), tags::STATUS), 0);
        a.release().unwrap();
        drop(rejected);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pdata_sent_before_association_is_aborted_before_its_body_arrives() {
    let mut cfg = dicom_cfg();
    // Well above the 64 KiB of a control PDU: the limit before association must not be this one.
    cfg.max_pdu_length = 1024 * 1024;
    cfg.artim_timeout_secs = 600;
    let scp = start(cfg, 1).await;
    let addr = scp.addr;
    blocking(move || {
        let mut s = raw_connect(addr);
        let announced: u32 = 200_000;
        let mut header = vec![0x04, 0];
        header.extend_from_slice(&announced.to_be_bytes());
        s.write_all(&header).unwrap();
        s.write_all(&[0u8; 100]).unwrap();
        // Answered at once (the read timeout is 20 s, ARTIM 10 min), not after the body.
        assert!(matches!(recv_raw(&mut s), Some(Pdu::AbortRQ { .. })));
        assert!(closed_by_server(&mut s));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_loses_its_slot_after_the_idle_timeout_and_artim() {
    let mut cfg = dicom_cfg();
    cfg.max_associations = 1;
    cfg.idle_timeout_secs = 1;
    cfg.artim_timeout_secs = 1;
    let scp = start(cfg, 1).await;
    let addr = scp.addr;
    blocking(move || {
        let mut s = raw_connect(addr);
        send_raw(&mut s, &raw_rq(vec![(1, uids::VERIFICATION, vec![ILE])]));
        assert!(matches!(recv_raw(&mut s), Some(Pdu::AssociationAC(_))));
        // C-ECHO requests, never reading the responses, until both directions are full: the
        // server's writes block, its idle timeout fires, and its A-ABORT cannot be written either.
        let mut burst = Vec::new();
        for id in 0..1000u16 {
            dicom_ul::write_pdu(
                &mut burst,
                &Pdu::PData {
                    data: vec![pdv(
                        1,
                        true,
                        true,
                        command(0x0030, id, uids::VERIFICATION, None, false),
                    )],
                },
            )
            .unwrap();
        }
        s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
        let started = Instant::now();
        while s.write_all(&burst).is_ok() {
            assert!(started.elapsed() < DEADLINE, "the server kept reading");
        }
        // `s` stays open and unread. The only slot must come back.
        let start = Instant::now();
        loop {
            match associate(addr, "CT1", AE, &[(uids::VERIFICATION, &[ILE])]) {
                Ok(mut a) => {
                    assert_eq!(u16_of(&echo(&mut a, 1), tags::STATUS), 0);
                    a.release().unwrap();
                    break;
                }
                Err(UlError::Rejected { .. }) if start.elapsed() < DEADLINE => {
                    // Poll interval, not synchronisation: the loop checks the condition.
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => panic!("the slot did not come back: {e}"),
            }
        }
        drop(s);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_association_request_on_an_established_association_is_aborted_as_an_unexpected_pdu(
) {
    let scp = start(dicom_cfg(), 1).await;
    let addr = scp.addr;
    blocking(move || {
        let mut s = raw_connect(addr);
        send_raw(&mut s, &raw_rq(vec![(1, uids::VERIFICATION, vec![ILE])]));
        assert!(matches!(recv_raw(&mut s), Some(Pdu::AssociationAC(_))));
        send_raw(&mut s, &raw_rq(vec![(1, uids::VERIFICATION, vec![ILE])]));
        match recv_raw(&mut s) {
            Some(Pdu::AbortRQ { source }) => assert_eq!(
                source,
                dicom_ul::pdu::AbortRQSource::ServiceProvider(
                    dicom_ul::pdu::AbortRQServiceProviderReason::UnexpectedPdu
                )
            ),
            other => panic!("expected an A-ABORT, got {other:?}"),
        }
        assert!(closed_by_server(&mut s));
    })
    .await;
}

/// Sends a C-STORE whose data set is `dataset`, in data PDVs of at most 8000 bytes, the last one
/// marked last; returns the response.
fn store_marked_last(
    assoc: &mut ClientAssociation<TcpStream>,
    pc: u8,
    msg_id: u16,
    instance: &str,
    dataset: &[u8],
) -> InMemDicomObject {
    let cmd = command(0x0001, msg_id, CT, Some(instance), true);
    assoc
        .send(&Pdu::PData {
            data: vec![pdv(pc, true, true, cmd)],
        })
        .unwrap();
    let pieces: Vec<&[u8]> = dataset.chunks(8000).collect();
    for (i, piece) in pieces.iter().enumerate() {
        let last = i + 1 == pieces.len();
        assoc
            .send(&Pdu::PData {
                data: vec![pdv(pc, false, last, piece.to_vec())],
            })
            .unwrap();
    }
    response(assoc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_set_whose_last_fragment_is_marked_too_early_is_refused_and_not_stored() {
    let scp = start(dicom_cfg(), 1).await;
    let addr = scp.addr;
    blocking(move || {
        for (n, ts) in [ELE, ILE, EBE].into_iter().enumerate() {
            let mut a = associate(addr, "CT1", AE, &[(CT, &[ts])]).unwrap();
            let (pc, _) = pc_for(&a, CT);
            let uid = format!("1.2.3.90{n}");
            let full = dataset(ts, CT, &uid, 30_000);
            // The pixel data element (a 30,000-byte OB) ends the data set.
            let pixel_header = full.len() - 30_000 - if ts == ILE { 8 } else { 12 };
            let cuts = [
                full.len() - 1000, // inside the pixel data's value
                pixel_header + 5,  // inside its header
                pixel_header + 8,  // explicit VR: before its 4-byte length; implicit: at its value
            ];
            for (i, cut) in cuts.into_iter().enumerate() {
                let id = (n * 10 + i + 1) as u16;
                let rsp = store_marked_last(&mut a, pc, id, &uid, &full[..cut]);
                let status = u16_of(&rsp, tags::STATUS);
                assert_eq!(status, 0xC000, "{ts}: cut at {cut} of {}", full.len());
                assert_eq!(u16_of(&rsp, tags::MESSAGE_ID_BEING_RESPONDED_TO), id);
            }
            // The association stays usable, and the whole data set is stored.
            let rsp = store_marked_last(&mut a, pc, 99, &uid, &full);
            assert_eq!(u16_of(&rsp, tags::STATUS), 0x0000, "{ts}: whole data set");
            a.release().unwrap();
        }
    })
    .await;
    let mut got = spooled(&scp.spool);
    got.sort_by(|x, y| x.0.sop_instance_uid.cmp(&y.0.sop_instance_uid));
    assert_eq!(got.len(), 3, "only the whole data sets are queued");
    for (n, ts) in [ELE, ILE, EBE].into_iter().enumerate() {
        let (q, bytes) = &got[n];
        let uid = format!("1.2.3.90{n}");
        assert_eq!(q.sop_instance_uid, uid);
        assert!(split_part10(bytes).1 == &dataset(ts, CT, &uid, 30_000)[..]);
    }
}

/// The same for a deflated data set: cut anywhere, its deflate stream has not ended; bytes after
/// its end other than one NULL pad are garbage. The whole one, padded as PS3.5 A.5 asks, is stored
/// as sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deflated_data_set_cut_short_is_refused_and_a_whole_one_is_stored_as_sent() {
    let scp = start(dicom_cfg(), 1).await;
    let addr = scp.addr;
    let uid = "1.2.3.950";
    // The CT data set with pixel values that do not repeat, so that the stream spans several PDVs
    // (its empty pixel data element, the last 12 bytes, is replaced), and as many of them as make
    // the stream's length odd, so that it takes a pad.
    let deflated = |n: usize| {
        let mut plain = dataset(ELE, CT, uid, 0);
        plain.truncate(plain.len() - 12);
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let pixels: Vec<u8> = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8 & 0x3F // six bits of noise: Huffman-coded, any length
            })
            .collect();
        plain.extend([0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0]);
        plain.extend((pixels.len() as u32).to_le_bytes());
        plain.extend(pixels);
        let mut enc =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&plain).unwrap();
        enc.finish().unwrap()
    };
    let full = (20_000..20_100)
        .map(|n| deflated(2 * n))
        .find(|d| d.len() % 2 == 1)
        .unwrap();
    assert!(full.len() > 16_000, "{} bytes", full.len());
    let mut padded = full.clone();
    if padded.len() % 2 == 1 {
        padded.push(0);
    }
    let (f, p) = (full.clone(), padded.clone());
    blocking(move || {
        let mut a = associate(addr, "CT1", AE, &[(CT, &[DEFLATED])]).unwrap();
        let (pc, ts) = pc_for(&a, CT);
        assert_eq!(ts, DEFLATED);
        let garbage = [f.as_slice(), b"\0\0trailing garbage"].concat();
        let refused: [&[u8]; 4] = [&f[..f.len() / 2], &f[..f.len() - 1], &f[..9000], &garbage];
        for (i, bytes) in refused.into_iter().enumerate() {
            let id = i as u16 + 1;
            let rsp = store_marked_last(&mut a, pc, id, uid, bytes);
            assert_eq!(u16_of(&rsp, tags::STATUS), 0xC000, "{} bytes", bytes.len());
            assert_eq!(u16_of(&rsp, tags::MESSAGE_ID_BEING_RESPONDED_TO), id);
        }
        // The association stays usable, and the whole data set is stored.
        let rsp = store_marked_last(&mut a, pc, 99, uid, &p);
        assert_eq!(u16_of(&rsp, tags::STATUS), 0x0000, "whole data set");
        a.release().unwrap();
    })
    .await;
    let got = spooled(&scp.spool);
    assert_eq!(got.len(), 1, "only the whole data set is queued");
    assert_eq!(got[0].0.sop_instance_uid, uid);
    assert_eq!(got[0].0.transfer_syntax_uid, DEFLATED);
    assert!(split_part10(&got[0].1).1 == &padded[..], "stored as sent");
}

/// Log lines that mention `FORGED` or a `sop_instance_uid` of [`MARKED_UIDS`], from every thread of
/// this test binary (its one logger, installed by [`capture_log`]).
static FORGED_LINES: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Instances whose log lines the tests look at.
const MARKED_UIDS: [&str; 1] = ["1.2.3.951"];

struct CaptureForged;

impl log::Log for CaptureForged {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        let line = record.args().to_string();
        let marked = MARKED_UIDS
            .iter()
            .any(|uid| line.contains(&format!("sop_instance_uid={uid} ")));
        if line.contains("FORGED") || marked {
            FORGED_LINES.lock().unwrap().push(line);
        }
    }
    fn flush(&self) {}
}

static CAPTURE_FORGED: CaptureForged = CaptureForged;

fn capture_log() {
    let _ = log::set_logger(&CAPTURE_FORGED);
    log::set_max_level(log::LevelFilter::Debug);
}

/// A deflated data set that inflates beyond what the boundary walk checks (400 MiB of zero pixels
/// from about 400 KB): a decompression bomb, or a real sparse instance. Its check stops at the
/// bound: it is stored as sent, with a WARN that says it was checked only that far.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deflated_data_set_inflating_past_the_checks_bound_is_stored_unchecked_with_a_warning() {
    capture_log();
    let scp = start(dicom_cfg(), 1).await;
    let addr = scp.addr;
    let uid = MARKED_UIDS[0];
    let mut plain = dataset(ELE, CT, uid, 0);
    plain.truncate(plain.len() - 12);
    let pixels: u32 = 400 << 20;
    plain.extend([0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0]);
    plain.extend(pixels.to_le_bytes());
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(&plain).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..400 {
        enc.write_all(&zeros).unwrap();
    }
    let mut deflated = enc.finish().unwrap();
    if deflated.len() % 2 == 1 {
        deflated.push(0);
    }
    assert!(deflated.len() < 1 << 20, "{} bytes", deflated.len());
    let sent = deflated.clone();
    blocking(move || {
        let mut a = associate(addr, "CT1", AE, &[(CT, &[DEFLATED])]).unwrap();
        let (pc, _) = pc_for(&a, CT);
        let rsp = store_marked_last(&mut a, pc, 1, uid, &sent);
        assert_eq!(u16_of(&rsp, tags::STATUS), 0x0000);
        a.release().unwrap();
    })
    .await;
    let got = spooled(&scp.spool);
    assert_eq!(got.len(), 1);
    assert!(split_part10(&got[0].1).1 == &deflated[..], "stored as sent");
    let lines = FORGED_LINES.lock().unwrap().clone();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("inflates further than its completeness is checked")),
        "{lines:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_abstract_syntax_reaches_log_lines_without_its_newline_and_cut_short() {
    capture_log();
    let scp = start(dicom_cfg(), 1).await;
    let addr = scp.addr;
    // A storage abstract syntax as far as negotiation goes (it extends the storage arc).
    let forged = format!(
        "1.2.840.10008.5.1.4.1.1.2.9\nERROR FORGED line {}",
        "x".repeat(1000)
    );
    let abs = forged.clone();
    blocking(move || {
        let mut a = associate(addr, "CT1", AE, &[(abs.as_str(), &[ELE])]).unwrap();
        let (pc, _) = pc_for(&a, &abs);
        // A CT instance on that context: refused (0x0122), its line names the context's syntax.
        let ds = dataset(ELE, CT, "1.2.3.950", 100);
        let rsp = store(&mut a, pc, 1, CT, "1.2.3.950", &ds);
        assert_eq!(u16_of(&rsp, tags::STATUS), 0x0122);
        // A C-FIND on it: refused (0x0211), its line names the context's syntax too.
        let cmd = command(0x0020, 2, &abs, None, false);
        a.send(&Pdu::PData {
            data: vec![pdv(pc, true, true, cmd)],
        })
        .unwrap();
        assert_eq!(u16_of(&response(&mut a), tags::STATUS), 0x0211);
        a.release().unwrap();
    })
    .await;
    let lines = FORGED_LINES.lock().unwrap().clone();
    assert!(
        lines.iter().any(|l| l.contains("status=0x0122")),
        "{lines:#?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("status=0x0211")),
        "{lines:#?}"
    );
    for line in &lines {
        assert!(!line.contains('\n'), "a forged line break: {line}");
        assert!(
            line.contains("1.2.840.10008.5.1.4.1.1.2.9?ERROR FORGED line xxx"),
            "{line}"
        );
        assert!(line.len() < 800, "{} bytes: {line}", line.len());
    }
}
