//! Association negotiation: which A-ASSOCIATE-RQ we accept, which presentation contexts, and with
//! which transfer syntax. Pure functions over dicom-ul's PDU types, so they are unit-tested directly.

use std::collections::HashMap;

use dicom_dictionary_std::uids;
use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use dicom_ul::pdu::{
    AssociationAC, AssociationRJ, AssociationRJResult, AssociationRJServiceProviderASCEReason,
    AssociationRJServiceProviderPresentationReason, AssociationRJServiceUserReason,
    AssociationRJSource, AssociationRQ, PresentationContextResult, PresentationContextResultReason,
    UserVariableItem,
};
use passerelle_config::DicomConfig;

use crate::{IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME};

/// The DICOM application context name (the only one there is).
pub(crate) const APPLICATION_CONTEXT_NAME: &str = "1.2.840.10008.3.1.1.1";

/// The arc under which most Storage SOP Classes live.
const STORAGE_ARC: &str = "1.2.840.10008.5.1.4.1.1.";

/// Standard Storage SOP Classes outside [`STORAGE_ARC`] (from dicom-dictionary-std's UID list).
#[allow(deprecated)] // retired classes are still sent by old modalities
const OTHER_STORAGE_SOP_CLASSES: &[&str] = &[
    uids::RT_BEAMS_DELIVERY_INSTRUCTION_STORAGE,
    uids::RT_BEAMS_DELIVERY_INSTRUCTION_STORAGE_TRIAL,
    uids::RT_BRACHY_APPLICATION_SETUP_DELIVERY_INSTRUCTION_STORAGE,
    uids::HANGING_PROTOCOL_STORAGE,
    uids::COLOR_PALETTE_STORAGE,
    uids::GENERIC_IMPLANT_TEMPLATE_STORAGE,
    uids::IMPLANT_ASSEMBLY_TEMPLATE_STORAGE,
    uids::IMPLANT_TEMPLATE_GROUP_STORAGE,
    uids::STORED_PRINT_STORAGE,
    uids::HARDCOPY_GRAYSCALE_IMAGE_STORAGE,
    uids::HARDCOPY_COLOR_IMAGE_STORAGE,
];

/// Strips the padding a peer may leave on a UID (NUL or spaces).
pub(crate) fn trim_uid(uid: &str) -> &str {
    uid.trim_matches(|c: char| c == '\0' || c.is_ascii_whitespace())
}

/// What a presentation context's abstract syntax is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Service {
    Verification,
    Storage,
}

/// Classifies an abstract syntax; `None` means we do not serve it (result 3).
pub(crate) fn service_for(abstract_syntax: &str, cfg: &DicomConfig) -> Option<Service> {
    let uid = trim_uid(abstract_syntax);
    if uid == uids::VERIFICATION {
        Some(Service::Verification)
    } else if (uid.starts_with(STORAGE_ARC) && uid.len() > STORAGE_ARC.len())
        || OTHER_STORAGE_SOP_CLASSES.contains(&uid)
        || cfg.private_sop_classes.iter().any(|p| trim_uid(p) == uid)
    {
        Some(Service::Storage)
    } else {
        None
    }
}

/// A transfer syntax we can pass through as-is: any that dicom-transfer-syntax-registry knows
/// (native, deflated, big endian and every encapsulated one: we never decode pixel data).
pub(crate) fn is_passthrough_transfer_syntax(uid: &str) -> bool {
    TransferSyntaxRegistry.get(trim_uid(uid)).is_some()
}

/// An accepted presentation context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AcceptedContext {
    pub abstract_syntax: String,
    pub transfer_syntax: String,
    pub service: Service,
}

/// The outcome of negotiating one A-ASSOCIATE-RQ.
#[derive(Debug)]
pub(crate) enum Negotiation {
    Accept {
        ac: AssociationAC,
        contexts: HashMap<u8, AcceptedContext>,
        /// The requestor's maximum PDU length (0 = unlimited).
        peer_max_pdu: u32,
    },
    Reject {
        rj: AssociationRJ,
        /// Why, in words, for the log line.
        why: String,
    },
}

fn reject(result: AssociationRJResult, source: AssociationRJSource, why: String) -> Negotiation {
    Negotiation::Reject {
        rj: AssociationRJ { result, source },
        why,
    }
}

/// AE titles compare without their (non-significant) leading and trailing spaces.
fn same_ae(a: &str, b: &str) -> bool {
    a.trim() == b.trim()
}

/// Decides on an A-ASSOCIATE-RQ. `have_slot` is false when the association cap is reached.
pub(crate) fn negotiate(rq: &AssociationRQ, cfg: &DicomConfig, have_slot: bool) -> Negotiation {
    use AssociationRJResult::{Permanent, Transient};
    if rq.protocol_version & 1 == 0 {
        return reject(
            Permanent,
            AssociationRJSource::ServiceProviderASCE(
                AssociationRJServiceProviderASCEReason::ProtocolVersionNotSupported,
            ),
            format!(
                "protocol version {:#06x} is not supported (bit 0 must be set)",
                rq.protocol_version
            ),
        );
    }
    if trim_uid(&rq.application_context_name) != APPLICATION_CONTEXT_NAME {
        return reject(
            Permanent,
            AssociationRJSource::ServiceUser(
                AssociationRJServiceUserReason::ApplicationContextNameNotSupported,
            ),
            format!(
                "application context {} is not the DICOM one",
                crate::association::peer_text(&rq.application_context_name)
            ),
        );
    }
    if !same_ae(&rq.called_ae_title, &cfg.ae_title) {
        return reject(
            Permanent,
            AssociationRJSource::ServiceUser(
                AssociationRJServiceUserReason::CalledAETitleNotRecognized,
            ),
            format!(
                "called AE title \"{}\" is not ours (\"{}\"); set the modality's destination AE title to \"{}\"",
                rq.called_ae_title.trim(),
                cfg.ae_title.trim(),
                cfg.ae_title.trim()
            ),
        );
    }
    if !cfg.allowed_calling_ae_titles.is_empty()
        && !cfg
            .allowed_calling_ae_titles
            .iter()
            .any(|t| same_ae(t, &rq.calling_ae_title))
    {
        return reject(
            Permanent,
            AssociationRJSource::ServiceUser(
                AssociationRJServiceUserReason::CallingAETitleNotRecognized,
            ),
            "the calling AE title is not in dicom.allowed_calling_ae_titles; add it there if this modality may store".into(),
        );
    }
    // PS3.8 9.3.2.2: each proposed context has an odd ID of its own. With a repeated ID the
    // answer would be ambiguous (which transfer syntax was accepted for it?), and the data set
    // could be stored under a Part-10 header naming another one.
    let mut seen = [false; 256];
    for pc in &rq.presentation_contexts {
        let repeated = std::mem::replace(&mut seen[usize::from(pc.id)], true);
        if pc.id % 2 == 0 || repeated {
            return reject(
                Permanent,
                AssociationRJSource::ServiceUser(AssociationRJServiceUserReason::NoReasonGiven),
                format!(
                    "the request proposes presentation context ID {} {}, while each context needs an odd ID of its own (PS3.8 9.3.2.2); the modality's DICOM software is at fault, report it to its vendor",
                    pc.id,
                    if repeated { "more than once" } else { "(an even number)" }
                ),
            );
        }
    }
    if !have_slot {
        return reject(
            Transient,
            AssociationRJSource::ServiceProviderPresentation(
                AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
            ),
            format!(
                "{} associations are already open (dicom.max_associations); the modality should retry later",
                cfg.max_associations
            ),
        );
    }

    let mut contexts = HashMap::new();
    let mut results = Vec::with_capacity(rq.presentation_contexts.len());
    for pc in &rq.presentation_contexts {
        let abstract_syntax = trim_uid(&pc.abstract_syntax).to_string();
        // A refused context's transfer syntax is not significant: echo the peer's first one only if
        // it is a well-formed UID, never peer bytes that do not survive encoding (found by fuzzing).
        let fallback = pc
            .transfer_syntaxes
            .first()
            .map(|t| trim_uid(t))
            .filter(|t| passerelle_config::is_valid_uid(t))
            .unwrap_or(uids::IMPLICIT_VR_LITTLE_ENDIAN)
            .to_string();
        let (reason, transfer_syntax) = match service_for(&abstract_syntax, cfg) {
            None => (
                PresentationContextResultReason::AbstractSyntaxNotSupported,
                fallback,
            ),
            Some(service) => match pc
                .transfer_syntaxes
                .iter()
                .map(|t| trim_uid(t))
                .find(|t| is_passthrough_transfer_syntax(t))
            {
                None => (
                    PresentationContextResultReason::TransferSyntaxesNotSupported,
                    fallback,
                ),
                Some(ts) => {
                    contexts.insert(
                        pc.id,
                        AcceptedContext {
                            abstract_syntax: abstract_syntax.clone(),
                            transfer_syntax: ts.to_string(),
                            service,
                        },
                    );
                    (PresentationContextResultReason::Acceptance, ts.to_string())
                }
            },
        };
        results.push(PresentationContextResult {
            id: pc.id,
            reason,
            transfer_syntax,
        });
    }

    let peer_max_pdu = rq
        .user_variables
        .iter()
        .find_map(|v| match v {
            UserVariableItem::MaxLength(n) => Some(*n),
            _ => None,
        })
        .unwrap_or(0);

    Negotiation::Accept {
        ac: AssociationAC {
            protocol_version: 1,
            calling_ae_title: rq.calling_ae_title.clone(),
            called_ae_title: rq.called_ae_title.clone(),
            application_context_name: APPLICATION_CONTEXT_NAME.to_string(),
            presentation_contexts: results,
            user_variables: vec![
                UserVariableItem::MaxLength(cfg.max_pdu_length),
                UserVariableItem::ImplementationClassUID(IMPLEMENTATION_CLASS_UID.to_string()),
                UserVariableItem::ImplementationVersionName(
                    IMPLEMENTATION_VERSION_NAME.to_string(),
                ),
            ],
        },
        contexts,
        peer_max_pdu,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_ul::pdu::PresentationContextProposed;

    fn cfg() -> DicomConfig {
        DicomConfig {
            ae_title: "PASSERELLE".into(),
            allowed_calling_ae_titles: vec![],
            private_sop_classes: vec!["1.2.3.4.5.6".into()],
            ..DicomConfig::default()
        }
    }

    fn rq(calling: &str, called: &str, pcs: Vec<(&str, Vec<&str>)>) -> AssociationRQ {
        AssociationRQ {
            protocol_version: 1,
            calling_ae_title: calling.into(),
            called_ae_title: called.into(),
            application_context_name: APPLICATION_CONTEXT_NAME.into(),
            presentation_contexts: pcs
                .into_iter()
                .enumerate()
                .map(|(i, (a, ts))| PresentationContextProposed {
                    id: (2 * i + 1) as u8,
                    abstract_syntax: a.into(),
                    transfer_syntaxes: ts.into_iter().map(String::from).collect(),
                })
                .collect(),
            user_variables: vec![UserVariableItem::MaxLength(16384)],
        }
    }

    #[test]
    fn repeated_or_even_context_ids_are_rejected_permanently() {
        for ids in [[1u8, 1], [1, 4]] {
            let mut r = rq(
                "CT1",
                "PASSERELLE",
                vec![
                    (
                        uids::CT_IMAGE_STORAGE,
                        vec![uids::EXPLICIT_VR_LITTLE_ENDIAN],
                    ),
                    (
                        uids::CT_IMAGE_STORAGE,
                        vec![uids::IMPLICIT_VR_LITTLE_ENDIAN],
                    ),
                ],
            );
            for (pc, id) in r.presentation_contexts.iter_mut().zip(ids) {
                pc.id = id;
            }
            match negotiate(&r, &cfg(), true) {
                Negotiation::Reject { rj, why } => {
                    assert_eq!(rj.result, AssociationRJResult::Permanent);
                    assert!(why.contains(&format!("ID {}", ids[1])), "{why}");
                }
                Negotiation::Accept { .. } => panic!("accepted context IDs {ids:?}"),
            }
        }
        assert!(matches!(
            negotiate(
                &rq(
                    "CT1",
                    "PASSERELLE",
                    vec![(
                        uids::CT_IMAGE_STORAGE,
                        vec![uids::EXPLICIT_VR_LITTLE_ENDIAN]
                    )]
                ),
                &cfg(),
                true
            ),
            Negotiation::Accept { .. }
        ));
    }

    #[test]
    fn a_refused_context_echoes_only_a_well_formed_transfer_syntax() {
        // Found by the pdu fuzz target: a non-ASCII transfer syntax echoed in the A-ASSOCIATE-AC
        // did not survive encoding.
        let check = |ts: &str, echoed: &str| {
            let Negotiation::Accept { ac, .. } = negotiate(
                &rq("CT1", "PASSERELLE", vec![("1.2.840.1.99", vec![ts])]),
                &cfg(),
                true,
            ) else {
                panic!("rejected")
            };
            assert_eq!(
                ac.presentation_contexts[0].transfer_syntax, echoed,
                "{ts:?}"
            );
        };
        check("1.2.840.10008.1.2.1\0", "1.2.840.10008.1.2.1");
        check("1.2.840.8t0.101.2.\u{85}", uids::IMPLICIT_VR_LITTLE_ENDIAN);
        check("", uids::IMPLICIT_VR_LITTLE_ENDIAN);
    }

    fn check_service(uid: &str, expect: Option<Service>) {
        assert_eq!(service_for(uid, &cfg()), expect, "{uid}");
    }

    #[test]
    fn storage_classes_inside_and_outside_the_storage_arc_are_served() {
        check_service(uids::CT_IMAGE_STORAGE, Some(Service::Storage));
        check_service(uids::ENHANCED_SR_STORAGE, Some(Service::Storage));
        check_service(
            uids::X_RAY_RADIATION_DOSE_SR_STORAGE,
            Some(Service::Storage),
        );
        check_service(
            uids::KEY_OBJECT_SELECTION_DOCUMENT_STORAGE,
            Some(Service::Storage),
        );
        check_service(uids::SEGMENTATION_STORAGE, Some(Service::Storage));
        check_service(uids::RT_PLAN_STORAGE, Some(Service::Storage));
        check_service(uids::HANGING_PROTOCOL_STORAGE, Some(Service::Storage));
        check_service(uids::COLOR_PALETTE_STORAGE, Some(Service::Storage));
        check_service(uids::IMPLANT_TEMPLATE_GROUP_STORAGE, Some(Service::Storage));
        check_service("1.2.840.10008.5.1.4.1.1.2\0", Some(Service::Storage));
        check_service("1.2.3.4.5.6", Some(Service::Storage));
        check_service(uids::VERIFICATION, Some(Service::Verification));
        check_service(uids::STUDY_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_FIND, None);
        check_service(uids::MODALITY_WORKLIST_INFORMATION_MODEL_FIND, None);
        check_service(uids::STORAGE_COMMITMENT_PUSH_MODEL, None);
        check_service("1.2.840.10008.5.1.4.1.1.", None);
        check_service("1.2.3.4.5.7", None);
    }

    #[test]
    #[allow(deprecated)] // explicit VR big endian is retired, yet still sent
    fn every_registered_transfer_syntax_passes_through_and_unknown_ones_do_not() {
        for uid in [
            uids::IMPLICIT_VR_LITTLE_ENDIAN,
            uids::EXPLICIT_VR_LITTLE_ENDIAN,
            uids::EXPLICIT_VR_BIG_ENDIAN,
            uids::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
            uids::JPEG_BASELINE8_BIT,
            uids::JPEG_LOSSLESS_SV1,
            uids::JPEGLS_LOSSLESS,
            uids::JPEG2000_LOSSLESS,
            uids::JPEG2000,
            uids::RLE_LOSSLESS,
            uids::HTJ2K_LOSSLESS,
            uids::MPEG4HP41,
        ] {
            assert!(is_passthrough_transfer_syntax(uid), "{uid}");
        }
        assert!(!is_passthrough_transfer_syntax("1.2.3.4.999"));
    }

    #[test]
    fn contexts_get_reason_3_for_unknown_abstract_syntax_and_4_for_unknown_transfer_syntax() {
        let req = rq(
            "CT1",
            "PASSERELLE",
            vec![
                (
                    uids::CT_IMAGE_STORAGE,
                    vec![
                        "1.2.3.999",
                        uids::JPEG2000_LOSSLESS,
                        uids::EXPLICIT_VR_LITTLE_ENDIAN,
                    ],
                ),
                (
                    uids::MODALITY_WORKLIST_INFORMATION_MODEL_FIND,
                    vec![uids::IMPLICIT_VR_LITTLE_ENDIAN],
                ),
                (uids::MR_IMAGE_STORAGE, vec!["1.2.3.999"]),
                (uids::VERIFICATION, vec![uids::IMPLICIT_VR_LITTLE_ENDIAN]),
            ],
        );
        let Negotiation::Accept {
            ac,
            contexts,
            peer_max_pdu,
        } = negotiate(&req, &cfg(), true)
        else {
            panic!("rejected")
        };
        assert_eq!(peer_max_pdu, 16384);
        let reasons: Vec<_> = ac
            .presentation_contexts
            .iter()
            .map(|r| (r.id, r.reason.clone(), r.transfer_syntax.as_str()))
            .collect();
        assert_eq!(
            reasons,
            vec![
                (
                    1,
                    PresentationContextResultReason::Acceptance,
                    uids::JPEG2000_LOSSLESS
                ),
                (
                    3,
                    PresentationContextResultReason::AbstractSyntaxNotSupported,
                    uids::IMPLICIT_VR_LITTLE_ENDIAN
                ),
                (
                    5,
                    PresentationContextResultReason::TransferSyntaxesNotSupported,
                    "1.2.3.999"
                ),
                (
                    7,
                    PresentationContextResultReason::Acceptance,
                    uids::IMPLICIT_VR_LITTLE_ENDIAN
                ),
            ]
        );
        assert_eq!(contexts.len(), 2);
        assert_eq!(contexts[&1].transfer_syntax, uids::JPEG2000_LOSSLESS);
        assert_eq!(contexts[&7].service, Service::Verification);
        assert!(ac
            .user_variables
            .contains(&UserVariableItem::MaxLength(cfg().max_pdu_length)));
        assert!(ac
            .user_variables
            .contains(&UserVariableItem::ImplementationClassUID(
                IMPLEMENTATION_CLASS_UID.into()
            )));
    }

    fn check_reject(req: AssociationRQ, cfg: &DicomConfig, have_slot: bool, expect: AssociationRJ) {
        match negotiate(&req, cfg, have_slot) {
            Negotiation::Reject { rj, .. } => assert_eq!(rj, expect),
            Negotiation::Accept { .. } => panic!("accepted, expected {expect:?}"),
        }
    }

    #[test]
    fn associations_are_rejected_with_the_reason_the_standard_names() {
        let pcs = || vec![(uids::VERIFICATION, vec![uids::IMPLICIT_VR_LITTLE_ENDIAN])];
        let mut restricted = cfg();
        restricted.allowed_calling_ae_titles = vec!["CT1".into(), "MR1 ".into()];

        check_reject(
            rq("CT1", "OTHER", pcs()),
            &cfg(),
            true,
            AssociationRJ {
                result: AssociationRJResult::Permanent,
                source: AssociationRJSource::ServiceUser(
                    AssociationRJServiceUserReason::CalledAETitleNotRecognized,
                ),
            },
        );
        check_reject(
            rq("US9", "PASSERELLE", pcs()),
            &restricted,
            true,
            AssociationRJ {
                result: AssociationRJResult::Permanent,
                source: AssociationRJSource::ServiceUser(
                    AssociationRJServiceUserReason::CallingAETitleNotRecognized,
                ),
            },
        );
        check_reject(
            rq("CT1", "PASSERELLE", pcs()),
            &cfg(),
            false,
            AssociationRJ {
                result: AssociationRJResult::Transient,
                source: AssociationRJSource::ServiceProviderPresentation(
                    AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
                ),
            },
        );
        let mut v2 = rq("CT1", "PASSERELLE", pcs());
        v2.protocol_version = 2;
        check_reject(
            v2,
            &cfg(),
            true,
            AssociationRJ {
                result: AssociationRJResult::Permanent,
                source: AssociationRJSource::ServiceProviderASCE(
                    AssociationRJServiceProviderASCEReason::ProtocolVersionNotSupported,
                ),
            },
        );
        // Allowed calling AEs and our AE title compare without trailing spaces.
        assert!(matches!(
            negotiate(&rq("MR1", "PASSERELLE  ", pcs()), &restricted, true),
            Negotiation::Accept { .. }
        ));
    }
}
