//! Parsing of the STOW-RS response body (PS3.18 §10.5.3): `application/dicom+json` (PS3.18 F.2)
//! and `application/dicom+xml` (the Native DICOM Model, PS3.19 A.1). Pure functions.
//!
//! Only what the uplink needs is read: the SOP Instance UIDs of ReferencedSOPSequence (0008,1199)
//! and FailedSOPSequence (0008,1198), FailureReason (0008,1197) (in the items of both: a PACS that
//! writes one in a ReferencedSOPSequence item did not store that instance) and WarningReason
//! (0008,1196).

use crate::error::{Result, UplinkError};

/// The most of a response body the uplink reads; the rest is cut. A STOW-RS response names each
/// instance of the request in one item of SOP Class UID, SOP Instance UID and Retrieve URL: about
/// 0.5 KiB as compact JSON, under 1.1 KiB as indented XML with 64-character UIDs and a long
/// Retrieve URL (the test `the_largest_batch_s_answer_fits_the_cap` builds one).
/// [`BYTES_PER_INSTANCE`] allows 2 KiB, so the largest batch the configuration accepts
/// (`passerelle_config::MAX_BATCH_INSTANCES`, 500) needs under 1,000 KiB, and 1 MiB is ample. A body
/// that long is held by each of up to 8 workers, and parsed whole.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// What a response item naming one instance may take, with room to spare.
pub const BYTES_PER_INSTANCE: usize = 2 * 1024;

/// What the top level of a response may take besides its items (XML declaration, root element,
/// the study's Retrieve URL, WarningReason).
const ENVELOPE_BYTES: usize = 16 * 1024;

// The answer to the largest batch the configuration accepts is never cut.
const _: () = assert!(
    passerelle_config::MAX_BATCH_INSTANCES * BYTES_PER_INSTANCE + ENVELOPE_BYTES <= MAX_BODY_BYTES
);

/// What a cut body says in its error: [`MAX_BODY_BYTES`] in words.
pub const CUT_NOTE: &str = "the PACS's answer was longer than 1 MiB; cut there";

/// The STOW-RS response media type the uplink prefers.
pub const DICOM_JSON: &str = "application/dicom+json";
/// The other STOW-RS response media type this module parses (the Native DICOM Model).
pub const DICOM_XML: &str = "application/dicom+xml";

/// The Accept header of a STOW-RS request: both media types this module parses, JSON preferred. A
/// PACS that produces only XML answers in XML instead of HTTP 406 Not Acceptable.
pub const ACCEPT: &str = "application/dicom+json, application/dicom+xml;q=0.9";

const REFERENCED_SOP_SEQUENCE: &str = "00081199";
const FAILED_SOP_SEQUENCE: &str = "00081198";
const REFERENCED_SOP_INSTANCE_UID: &str = "00081155";
const FAILURE_REASON: &str = "00081197";
const WARNING_REASON: &str = "00081196";

/// What the PACS said about the instances of one request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StowResponse {
    /// Items of ReferencedSOPSequence: the instances the PACS stored.
    pub referenced: Vec<ReferencedInstance>,
    /// Items of FailedSOPSequence: the instances the PACS did not store.
    pub failed: Vec<FailedInstance>,
    /// WarningReason (0008,1196) at the top level of the response, if any.
    pub warning_reason: Option<u16>,
    /// The response has a ReferencedSOPSequence or a FailedSOPSequence attribute (even empty): it is
    /// a STOW-RS response, not some other JSON or XML (an error page, another API's error).
    pub names_sequences: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReferencedInstance {
    pub sop_instance_uid: String,
    /// WarningReason (0008,1196) of the item, e.g. 0xB000 (coercion of data elements).
    pub warning_reason: Option<u16>,
    /// FailureReason (0008,1197) in this item, which PS3.18 puts in FailedSOPSequence items only.
    /// `Some` when the item has one with a value: `Some(code)`, or `None` inside when that value is
    /// not a US value. A PACS that writes one here says in the same item that it did not store the
    /// instance, so the item confirms nothing.
    pub failure_reason: Option<Option<u16>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedInstance {
    pub sop_instance_uid: String,
    /// FailureReason (0008,1197); `None` when the PACS gave none, or one that is not a US value (a
    /// WARN says so): the instance is then retried, and the rest of the response still counts.
    pub failure_reason: Option<u16>,
}

impl StowResponse {
    pub fn is_referenced(&self, sop_instance_uid: &str) -> bool {
        self.referenced
            .iter()
            .any(|r| r.sop_instance_uid == sop_instance_uid)
    }

    pub fn referenced_item(&self, sop_instance_uid: &str) -> Option<&ReferencedInstance> {
        self.referenced
            .iter()
            .find(|r| r.sop_instance_uid == sop_instance_uid)
    }

    pub fn failed_item(&self, sop_instance_uid: &str) -> Option<&FailedInstance> {
        self.failed
            .iter()
            .find(|f| f.sop_instance_uid == sop_instance_uid)
    }
}

/// Parses a STOW-RS response body. The media type decides the syntax; when it names neither JSON
/// nor XML (some servers answer `text/plain` or nothing), the first non-blank byte does.
pub fn parse(status: u16, content_type: Option<&str>, body: &[u8]) -> Result<StowResponse> {
    let ct = content_type.unwrap_or("").to_ascii_lowercase();
    let fail = |detail: String| UplinkError::ParseStowResponse {
        status,
        content_type: ct.clone(),
        detail,
    };
    let text =
        std::str::from_utf8(body).map_err(|e| fail(format!("the body is not UTF-8 ({e})")))?;
    let trimmed = text.trim_start_matches('\u{feff}').trim();
    if trimmed.is_empty() {
        return Err(fail("the body is empty".into()));
    }
    let xml = if ct.contains("json") {
        false
    } else if ct.contains("xml") {
        true
    } else {
        trimmed.starts_with('<')
    };
    if xml {
        parse_xml(trimmed).map_err(fail)
    } else {
        parse_json(trimmed).map_err(fail)
    }
}

/// Parses a response body as the uplink read it: `cut` when the PACS sent more than
/// [`MAX_BODY_BYTES`] and the rest was not read. A cut body is not parsed: a STOW-RS response is
/// never that long, what it lists beyond the cut is unknown, and the error says what happened
/// instead of the parser's "EOF while parsing".
pub fn parse_read(
    status: u16,
    content_type: Option<&str>,
    body: &[u8],
    cut: bool,
) -> Result<StowResponse> {
    if cut {
        return Err(UplinkError::ParseStowResponse {
            status,
            content_type: content_type.unwrap_or("").to_ascii_lowercase(),
            detail: format!(
                "{CUT_NOTE}, while a STOW-RS response is a few KiB per batch: check what the PACS or its front end answers at uplink.stow_url"
            ),
        });
    }
    parse(status, content_type, body)
}

// ---------------------------------------------------------------------------------------------
// application/dicom+json

type JsonMap = serde_json::Map<String, serde_json::Value>;

fn parse_json(text: &str) -> std::result::Result<StowResponse, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("invalid JSON ({e})"))?;
    // The response is one dataset; some servers wrap it in an array, as QIDO-RS does.
    let datasets: Vec<&JsonMap> = match &value {
        serde_json::Value::Object(m) => vec![m],
        serde_json::Value::Array(items) => items
            .iter()
            .map(|v| {
                v.as_object()
                    .ok_or("an array element is not a dataset object")
            })
            .collect::<std::result::Result<_, _>>()?,
        _ => return Err("the JSON is not a DICOM dataset object".into()),
    };
    let mut out = StowResponse::default();
    for ds in datasets {
        out.names_sequences |= json_attr(ds, REFERENCED_SOP_SEQUENCE).is_some()
            || json_attr(ds, FAILED_SOP_SEQUENCE).is_some();
        for item in json_items(ds, REFERENCED_SOP_SEQUENCE)? {
            if let Some(uid) = json_string(item, REFERENCED_SOP_INSTANCE_UID)? {
                let warning_reason = lenient_warning(json_u16(item, WARNING_REASON), &uid);
                let failure_reason = lenient_failure(json_u16(item, FAILURE_REASON), &uid);
                out.referenced.push(ReferencedInstance {
                    sop_instance_uid: uid,
                    warning_reason,
                    failure_reason,
                });
            }
        }
        for item in json_items(ds, FAILED_SOP_SEQUENCE)? {
            if let Some(uid) = json_string(item, REFERENCED_SOP_INSTANCE_UID)? {
                let failure_reason = lenient_failure(json_u16(item, FAILURE_REASON), &uid);
                out.failed.push(FailedInstance {
                    sop_instance_uid: uid,
                    failure_reason: failure_reason.flatten(),
                });
            }
        }
        if out.warning_reason.is_none() {
            out.warning_reason = lenient_warning(json_u16(ds, WARNING_REASON), "(the response)");
        }
    }
    Ok(out)
}

/// A Warning Reason (0008,1196) that is not a US value (a server writing "B000" or 45056.0) does not
/// undo the confirmation it comes with: the instance is listed as stored. It is logged and ignored.
fn lenient_warning(parsed: std::result::Result<Option<u16>, String>, uid: &str) -> Option<u16> {
    parsed.unwrap_or_else(|detail| {
        log::warn!(
            "The PACS's STOW-RS response has a Warning Reason that is not a DICOM US value ({detail}); the instance counts as stored, without its warning code. Tell the PACS's administrator; nothing needs doing on the box. sop_instance_uid={uid}"
        );
        None
    })
}

/// A Failure Reason (0008,1197) as read from an item: `None` when the item has none (no attribute,
/// or one without a value), `Some(code)`, or `Some(None)` when its value is not a US value (a
/// server writing "A700", 42752.0 or ""). Such a value says the instance was not stored, without
/// saying why: it is logged, and the instance is retried rather than confirmed or failed for good.
/// It never rejects the whole response, which would leave the other instances unconfirmed (sent
/// again for ever) or make the uplink take the answer for something other than STOW-RS.
fn lenient_failure(
    parsed: std::result::Result<Option<u16>, String>,
    uid: &str,
) -> Option<Option<u16>> {
    match parsed {
        Ok(reason) => reason.map(Some),
        Err(detail) => {
            log::warn!(
                "The PACS's STOW-RS response has a Failure Reason that is not a DICOM US value ({detail}); the instance is not confirmed and will be sent again, and the rest of the response is read as it is. Tell the PACS's administrator; nothing needs doing on the box. sop_instance_uid={uid}"
            );
            Some(None)
        }
    }
}

/// The attribute `tag` (8 hex digits, any case) of a dataset.
fn json_attr<'a>(ds: &'a JsonMap, tag: &str) -> Option<&'a serde_json::Value> {
    ds.get(tag).or_else(|| {
        ds.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(tag))
            .map(|(_, v)| v)
    })
}

/// The "Value" array of an attribute; missing attribute or empty value → empty.
fn json_values<'a>(
    ds: &'a JsonMap,
    tag: &str,
) -> std::result::Result<&'a [serde_json::Value], String> {
    let Some(attr) = json_attr(ds, tag) else {
        return Ok(&[]);
    };
    let attr = attr
        .as_object()
        .ok_or_else(|| format!("attribute {tag} is not an object"))?;
    match attr.get("Value") {
        None | Some(serde_json::Value::Null) => Ok(&[]),
        Some(serde_json::Value::Array(v)) => Ok(v),
        Some(_) => Err(format!("the Value of attribute {tag} is not an array")),
    }
}

fn json_items<'a>(ds: &'a JsonMap, tag: &str) -> std::result::Result<Vec<&'a JsonMap>, String> {
    json_values(ds, tag)?
        .iter()
        .map(|v| {
            v.as_object()
                .ok_or_else(|| format!("an item of sequence {tag} is not a dataset object"))
        })
        .collect()
}

fn json_string(ds: &JsonMap, tag: &str) -> std::result::Result<Option<String>, String> {
    match json_values(ds, tag)?.first() {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(clean_uid(s)),
        Some(_) => Err(format!("the value of attribute {tag} is not a string")),
    }
}

fn json_u16(ds: &JsonMap, tag: &str) -> std::result::Result<Option<u16>, String> {
    match json_values(ds, tag)?.first() {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Number(n)) => n
            .as_u64()
            .and_then(|v| u16::try_from(v).ok())
            .map(Some)
            .ok_or_else(|| format!("the value {n} of attribute {tag} is not a US value")),
        Some(serde_json::Value::String(s)) => parse_us(s)
            .map(Some)
            .ok_or_else(|| format!("the value \"{s}\" of attribute {tag} is not a US value")),
        Some(_) => Err(format!("the value of attribute {tag} is not a number")),
    }
}

// ---------------------------------------------------------------------------------------------
// application/dicom+xml (Native DICOM Model)

fn parse_xml(text: &str) -> std::result::Result<StowResponse, String> {
    let doc = roxmltree::Document::parse(text).map_err(|e| format!("invalid XML ({e})"))?;
    let root = doc.root_element();
    if root.tag_name().name() != "NativeDicomModel" {
        return Err(format!(
            "the XML root element is <{}>, not <NativeDicomModel>",
            root.tag_name().name()
        ));
    }
    let mut out = StowResponse {
        names_sequences: xml_attr(root, REFERENCED_SOP_SEQUENCE).is_some()
            || xml_attr(root, FAILED_SOP_SEQUENCE).is_some(),
        ..StowResponse::default()
    };
    for item in xml_items(root, REFERENCED_SOP_SEQUENCE) {
        if let Some(uid) = xml_value(item, REFERENCED_SOP_INSTANCE_UID).and_then(clean_uid) {
            let warning_reason = lenient_warning(xml_u16(item, WARNING_REASON), &uid);
            let failure_reason = lenient_failure(xml_u16(item, FAILURE_REASON), &uid);
            out.referenced.push(ReferencedInstance {
                sop_instance_uid: uid,
                warning_reason,
                failure_reason,
            });
        }
    }
    for item in xml_items(root, FAILED_SOP_SEQUENCE) {
        if let Some(uid) = xml_value(item, REFERENCED_SOP_INSTANCE_UID).and_then(clean_uid) {
            let failure_reason = lenient_failure(xml_u16(item, FAILURE_REASON), &uid);
            out.failed.push(FailedInstance {
                sop_instance_uid: uid,
                failure_reason: failure_reason.flatten(),
            });
        }
    }
    out.warning_reason = lenient_warning(xml_u16(root, WARNING_REASON), "(the response)");
    Ok(out)
}

fn is_element(n: &roxmltree::Node<'_, '_>, name: &str) -> bool {
    n.is_element() && n.tag_name().name() == name
}

/// The `<DicomAttribute tag="…">` child of a dataset node (root or `<Item>`).
fn xml_attr<'a, 'i>(ds: roxmltree::Node<'a, 'i>, tag: &str) -> Option<roxmltree::Node<'a, 'i>> {
    ds.children().find(|n| {
        is_element(n, "DicomAttribute")
            && n.attribute("tag")
                .is_some_and(|t| t.eq_ignore_ascii_case(tag))
    })
}

fn xml_items<'a, 'i>(ds: roxmltree::Node<'a, 'i>, tag: &str) -> Vec<roxmltree::Node<'a, 'i>> {
    xml_attr(ds, tag)
        .map(|a| a.children().filter(|n| is_element(n, "Item")).collect())
        .unwrap_or_default()
}

/// The text of the first `<Value>` of an attribute.
fn xml_value<'a>(ds: roxmltree::Node<'a, '_>, tag: &str) -> Option<&'a str> {
    let attr = xml_attr(ds, tag)?;
    let value = attr
        .children()
        .filter(|n| is_element(n, "Value"))
        .min_by_key(|n| {
            n.attribute("number")
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(u32::MAX)
        })?;
    value.text()
}

fn xml_u16(ds: roxmltree::Node<'_, '_>, tag: &str) -> std::result::Result<Option<u16>, String> {
    match xml_value(ds, tag) {
        None => Ok(None),
        Some(s) if s.trim().is_empty() => Ok(None),
        Some(s) => parse_us(s)
            .map(Some)
            .ok_or_else(|| format!("the value \"{s}\" of attribute {tag} is not a US value")),
    }
}

// ---------------------------------------------------------------------------------------------

/// A UID as sent by some servers may carry the DICOM padding (NUL or space); empty means absent.
fn clean_uid(s: &str) -> Option<String> {
    let t = s.trim_matches(|c: char| c == '\0' || c.is_whitespace());
    (!t.is_empty()).then(|| t.to_string())
}

/// A US value: decimal as the standard says, or `0x`-prefixed hex as a few servers write it.
fn parse_us(s: &str) -> Option<u16> {
    let t = s.trim();
    match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u16::from_str_radix(hex, 16).ok(),
        None => t.parse().ok(),
    }
}

#[cfg(test)]
mod tests;
