use super::*;

/// What a parse should give: referenced UIDs (with warning), failed UIDs (with reason).
struct Expect<'a> {
    referenced: &'a [(&'a str, Option<u16>)],
    failed: &'a [(&'a str, Option<u16>)],
    warning: Option<u16>,
}

fn check(content_type: Option<&str>, body: &str, expect: Expect<'_>) {
    let got = parse(200, content_type, body.as_bytes())
        .unwrap_or_else(|e| panic!("parse failed: {e}\nbody: {body}"));
    let referenced: Vec<(&str, Option<u16>)> = got
        .referenced
        .iter()
        .map(|r| (r.sop_instance_uid.as_str(), r.warning_reason))
        .collect();
    let failed: Vec<(&str, Option<u16>)> = got
        .failed
        .iter()
        .map(|f| (f.sop_instance_uid.as_str(), f.failure_reason))
        .collect();
    assert_eq!(referenced, expect.referenced, "referenced, body: {body}");
    assert_eq!(failed, expect.failed, "failed, body: {body}");
    assert_eq!(
        got.warning_reason, expect.warning,
        "top-level warning, body: {body}"
    );
}

fn check_error(content_type: Option<&str>, body: &[u8], expect_in_message: &str) {
    match parse(200, content_type, body) {
        Ok(r) => panic!("expected an error containing {expect_in_message:?}, got {r:?}"),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(expect_in_message),
                "error {msg:?} should contain {expect_in_message:?}"
            );
        }
    }
}

const JSON: Option<&str> = Some("application/dicom+json");
const XML: Option<&str> = Some("application/dicom+xml; charset=utf-8");

#[test]
fn json_response_with_every_instance_referenced_lists_them_all() {
    check(
        JSON,
        r#"{
          "00081190": {"vr": "UR", "Value": ["https://pacs/studies/1.2.3"]},
          "00081199": {"vr": "SQ", "Value": [
            {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
             "00081155": {"vr": "UI", "Value": ["1.2.3.4.1"]},
             "00081190": {"vr": "UR", "Value": ["https://pacs/studies/1.2.3/series/4/instances/1"]}},
            {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
             "00081155": {"vr": "UI", "Value": ["1.2.3.4.2"]}}
          ]}
        }"#,
        Expect {
            referenced: &[("1.2.3.4.1", None), ("1.2.3.4.2", None)],
            failed: &[],
            warning: None,
        },
    );
}

#[test]
fn json_partial_failure_keeps_each_failure_reason() {
    check(
        JSON,
        r#"{
          "00081196": {"vr": "US", "Value": [45063]},
          "00081198": {"vr": "SQ", "Value": [
            {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
             "00081155": {"vr": "UI", "Value": ["1.2.3.4.2"]},
             "00081197": {"vr": "US", "Value": [42752]}},
            {"00081155": {"vr": "UI", "Value": ["1.2.3.4.3"]},
             "00081197": {"vr": "US", "Value": [272]}},
            {"00081155": {"vr": "UI", "Value": ["1.2.3.4.4"]}}
          ]},
          "00081199": {"vr": "SQ", "Value": [
            {"00081155": {"vr": "UI", "Value": ["1.2.3.4.1"]},
             "00081196": {"vr": "US", "Value": [45056]}}
          ]}
        }"#,
        Expect {
            referenced: &[("1.2.3.4.1", Some(0xB000))],
            failed: &[
                ("1.2.3.4.2", Some(0xA700)),
                ("1.2.3.4.3", Some(0x0110)),
                ("1.2.3.4.4", None),
            ],
            warning: Some(0xB007),
        },
    );
}

#[test]
fn json_tolerates_lowercase_tags_array_wrapping_padding_and_string_numbers() {
    check(
        Some("application/json"),
        r#"[{
          "00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.3.4.1\u0000"]}}]},
          "0008119a": {"vr": "SQ"},
          "00081198": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [" 1.2.3.4.2 "]},
                                               "00081197": {"vr": "US", "Value": ["0xC000"]}}]}
        }]"#,
        Expect {
            referenced: &[("1.2.3.4.1", None)],
            failed: &[("1.2.3.4.2", Some(0xC000))],
            warning: None,
        },
    );
    check(
        JSON,
        r#"{"0008119b": {"vr": "SQ", "Value": []}, "00081199": {"vr":"SQ","Value":[{"0008115a": {"vr":"UI"}, "00081155": {"vr":"UI","Value":["9.9"]}}]}}"#,
        Expect {
            referenced: &[("9.9", None)],
            failed: &[],
            warning: None,
        },
    );
}

#[test]
fn json_items_without_a_uid_confirm_nothing() {
    check(
        JSON,
        r#"{"00081199": {"vr": "SQ", "Value": [
             {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]}},
             {"00081155": {"vr": "UI", "Value": [""]}},
             {"00081155": {"vr": "UI"}}
        ]}}"#,
        Expect {
            referenced: &[],
            failed: &[],
            warning: None,
        },
    );
}

#[test]
fn json_empty_dataset_confirms_nothing() {
    check(
        JSON,
        "{}",
        Expect {
            referenced: &[],
            failed: &[],
            warning: None,
        },
    );
    check(
        JSON,
        r#"{"00081199": {"vr": "SQ", "Value": null}}"#,
        Expect {
            referenced: &[],
            failed: &[],
            warning: None,
        },
    );
}

#[test]
fn xml_native_dicom_model_partial_failure() {
    check(
        XML,
        r#"<?xml version="1.0" encoding="UTF-8"?>
<NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM">
  <DicomAttribute tag="00081190" vr="UR" keyword="RetrieveURL"><Value number="1">https://pacs/studies/1</Value></DicomAttribute>
  <DicomAttribute tag="00081198" vr="SQ" keyword="FailedSOPSequence">
    <Item number="1">
      <DicomAttribute tag="00081150" vr="UI" keyword="ReferencedSOPClassUID"><Value number="1">1.2.840.10008.5.1.4.1.1.4</Value></DicomAttribute>
      <DicomAttribute tag="00081155" vr="UI" keyword="ReferencedSOPInstanceUID"><Value number="1">1.2.3.4.2</Value></DicomAttribute>
      <DicomAttribute tag="00081197" vr="US" keyword="FailureReason"><Value number="1">290</Value></DicomAttribute>
    </Item>
  </DicomAttribute>
  <DicomAttribute tag="00081199" vr="SQ" keyword="ReferencedSOPSequence">
    <Item number="1">
      <DicomAttribute tag="00081155" vr="UI" keyword="ReferencedSOPInstanceUID"><Value number="1">1.2.3.4.1</Value></DicomAttribute>
      <DicomAttribute tag="00081196" vr="US" keyword="WarningReason"><Value number="1">45062</Value></DicomAttribute>
    </Item>
    <Item number="2">
      <DicomAttribute tag="00081155" vr="UI" keyword="ReferencedSOPInstanceUID"><Value number="1">1.2.3.4.3</Value></DicomAttribute>
    </Item>
  </DicomAttribute>
</NativeDicomModel>"#,
        Expect {
            referenced: &[("1.2.3.4.1", Some(0xB006)), ("1.2.3.4.3", None)],
            failed: &[("1.2.3.4.2", Some(0x0122))],
            warning: None,
        },
    );
}

#[test]
fn xml_is_recognised_without_a_content_type_and_ignores_nested_lookalikes() {
    // A ReferencedSOPSequence nested inside another sequence is not the top-level one.
    check(
        None,
        r#"<NativeDicomModel>
  <DicomAttribute tag="00081196" vr="US"><Value number="1">45056</Value></DicomAttribute>
  <DicomAttribute tag="0040A375" vr="SQ"><Item number="1">
    <DicomAttribute tag="00081199" vr="SQ"><Item number="1">
      <DicomAttribute tag="00081155" vr="UI"><Value number="1">7.7.7</Value></DicomAttribute>
    </Item></DicomAttribute>
  </Item></DicomAttribute>
  <DicomAttribute tag="00081199" vr="SQ"><Item number="1">
    <DicomAttribute tag="00081155" vr="UI"><Value number="2">ignored</Value><Value number="1">1.2.3</Value></DicomAttribute>
  </Item></DicomAttribute>
</NativeDicomModel>"#,
        Expect {
            referenced: &[("1.2.3", None)],
            failed: &[],
            warning: Some(0xB000),
        },
    );
}

#[test]
fn empty_and_garbage_bodies_are_errors_not_confirmations() {
    check_error(JSON, b"", "empty");
    check_error(JSON, b"  \r\n ", "empty");
    check_error(None, b"", "empty");
    check_error(
        JSON,
        b"<html><body>Bad Gateway</body></html>",
        "invalid JSON",
    );
    check_error(JSON, b"{\"00081199\": ", "invalid JSON");
    check_error(JSON, b"\"just a string\"", "not a DICOM dataset");
    check_error(JSON, b"[1, 2]", "not a dataset");
    check_error(
        JSON,
        br#"{"00081199": {"vr": "SQ", "Value": "1.2.3"}}"#,
        "not an array",
    );
    check_error(
        JSON,
        br#"{"00081199": {"vr": "SQ", "Value": ["1.2.3"]}}"#,
        "not a dataset",
    );
    check_error(JSON, &[0xff, 0xfe, 0x00], "not UTF-8");
    check_error(
        XML,
        b"<NativeDicomModel><unclosed></NativeDicomModel>",
        "invalid XML",
    );
    check_error(
        XML,
        b"<html><body>Forbidden</body></html>",
        "not <NativeDicomModel>",
    );
    check_error(None, b"Internal Server Error", "invalid JSON");
}

#[test]
fn the_error_names_the_status_and_content_type() {
    let e = parse(502, Some("text/html"), b"<html/>").unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("HTTP 502"), "{msg}");
    assert!(msg.contains("text/html"), "{msg}");
}

/// The answer to the largest batch the configuration accepts, each item as long as a real one gets
/// (64-character UIDs, a long Retrieve URL, a WarningReason; indented XML, the longer syntax), fits
/// the cap with room to spare, and parses.
#[test]
fn the_largest_batch_s_answer_fits_the_cap() {
    let n = passerelle_config::MAX_BATCH_INSTANCES;
    let uid = |i: usize| format!("1.2.826.0.1.3680043.10.1137.{:0>35}", i);
    let study = uid(0);
    let base = format!(
        "https://pacs.regional-health-network.example.org:8443/{}/dicom-web",
        "a".repeat(120)
    );
    let attr = |tag: &str, vr: &str, keyword: &str, value: &str| {
        format!(
            "      <DicomAttribute tag=\"{tag}\" vr=\"{vr}\" keyword=\"{keyword}\">\n        <Value number=\"1\">{value}</Value>\n      </DicomAttribute>\n"
        )
    };
    let item = |i: usize| {
        format!(
            "    <Item number=\"{}\">\n{}{}{}{}    </Item>\n",
            i + 1,
            attr("00081150", "UI", "ReferencedSOPClassUID", &uid(999_999)),
            attr("00081155", "UI", "ReferencedSOPInstanceUID", &uid(i + 1)),
            attr(
                "00081190",
                "UR",
                "RetrieveURL",
                &format!(
                    "{base}/studies/{study}/series/{}/instances/{}",
                    uid(7),
                    uid(i + 1)
                )
            ),
            attr("00081196", "US", "WarningReason", "45056"),
        )
    };
    let one = item(0).len();
    assert!(
        one <= BYTES_PER_INSTANCE,
        "an item of {one} bytes is more than the {BYTES_PER_INSTANCE} allowed"
    );
    let items: String = (0..n).map(item).collect();
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<NativeDicomModel xmlns=\"http://dicom.nema.org/PS3.19/models/NativeDICOM\">\n{}  <DicomAttribute tag=\"00081199\" vr=\"SQ\" keyword=\"ReferencedSOPSequence\">\n{items}  </DicomAttribute>\n</NativeDicomModel>\n",
        attr("00081190", "UR", "RetrieveURL", &format!("{base}/studies/{study}")),
    );
    assert!(
        body.len() < MAX_BODY_BYTES,
        "{} bytes for {n} instances",
        body.len()
    );
    let parsed = parse(200, XML, body.as_bytes()).unwrap();
    assert_eq!(parsed.referenced.len(), n);
    assert_eq!(parsed.referenced[n - 1].sop_instance_uid, uid(n));
}

#[test]
fn a_body_cut_at_the_cap_is_not_parsed_and_says_so() {
    let whole =
        r#"{"00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.3"]}}]}}"#;
    let err = parse_read(200, JSON, &whole.as_bytes()[..40], true).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("the PACS's answer was longer than 1 MiB; cut there"),
        "{msg}"
    );
    assert!(!msg.contains("EOF"), "{msg}");
    assert!(parse_read(200, JSON, whole.as_bytes(), true).is_err());
    assert_eq!(
        parse_read(200, JSON, whole.as_bytes(), false)
            .unwrap()
            .referenced
            .len(),
        1
    );
}

#[test]
fn a_warning_reason_that_is_not_a_us_value_does_not_undo_the_confirmation() {
    for bad in [r#""B000""#, "45056.0", r#""""#, "70000", "true"] {
        let body = format!(
            r#"{{"00081199": {{"vr": "SQ", "Value": [{{"00081155": {{"vr": "UI", "Value": ["1.2.3.1"]}}, "00081196": {{"vr": "US", "Value": [{bad}]}}}}]}}, "00081196": {{"vr": "US", "Value": [{bad}]}}}}"#
        );
        let r = parse(200, JSON, body.as_bytes()).unwrap_or_else(|e| panic!("{bad}: {e}"));
        assert_eq!(r.referenced.len(), 1, "{bad}");
        assert_eq!(r.referenced[0].sop_instance_uid, "1.2.3.1");
        assert_eq!(r.referenced[0].warning_reason, None, "{bad}");
        assert_eq!(r.warning_reason, None, "{bad}");
    }
    let xml = r#"<NativeDicomModel><DicomAttribute tag="00081199" vr="SQ"><Item number="1"><DicomAttribute tag="00081155" vr="UI"><Value number="1">1.2.3.1</Value></DicomAttribute><DicomAttribute tag="00081196" vr="US"><Value number="1">B000</Value></DicomAttribute></Item></DicomAttribute></NativeDicomModel>"#;
    let r = parse(200, XML, xml.as_bytes()).unwrap();
    assert_eq!(r.referenced.len(), 1);
    assert_eq!(r.referenced[0].warning_reason, None);
}

#[test]
fn a_failure_reason_in_a_referenced_item_is_read_in_both_forms() {
    let json = |reason: &str| {
        format!(
            r#"{{"00081199": {{"vr": "SQ", "Value": [{{"00081155": {{"vr": "UI", "Value": ["1.2.3.1"]}}, "00081197": {{"vr": "US", "Value": [{reason}]}}}}, {{"00081155": {{"vr": "UI", "Value": ["1.2.3.2"]}}}}]}}}}"#
        )
    };
    for (reason, want) in [
        ("42752", Some(Some(0xA700))),
        (r#""0x0110""#, Some(Some(0x0110))),
        // Present but not a US value: a failure whose reason is unknown.
        (r#""A700""#, Some(None)),
        ("42752.0", Some(None)),
        (r#""""#, Some(None)),
        // No value: no failure.
        ("null", None),
    ] {
        let r = parse(200, JSON, json(reason).as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.referenced.len(), 2, "{reason}");
        assert_eq!(r.referenced[0].failure_reason, want, "{reason}");
        assert_eq!(r.referenced[1].failure_reason, None, "{reason}");
    }
    let xml = |reason: &str| {
        format!(
            r#"<NativeDicomModel><DicomAttribute tag="00081199" vr="SQ"><Item number="1"><DicomAttribute tag="00081155" vr="UI"><Value number="1">1.2.3.1</Value></DicomAttribute><DicomAttribute tag="00081197" vr="US"><Value number="1">{reason}</Value></DicomAttribute></Item><Item number="2"><DicomAttribute tag="00081155" vr="UI"><Value number="1">1.2.3.2</Value></DicomAttribute></Item></DicomAttribute></NativeDicomModel>"#
        )
    };
    for (reason, want) in [
        ("290", Some(Some(0x0122))),
        ("A700", Some(None)),
        ("", None),
    ] {
        let r = parse(200, XML, xml(reason).as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.referenced.len(), 2, "{reason}");
        assert_eq!(r.referenced[0].failure_reason, want, "{reason}");
        assert_eq!(r.referenced[1].failure_reason, None, "{reason}");
    }
}

#[test]
fn a_failure_reason_that_is_not_a_us_value_leaves_the_rest_of_the_response_readable() {
    // 1.2.3.2's reason is unreadable: it is listed as failed without a reason (retried), and the
    // response still confirms 1.2.3.1 and keeps 1.2.3.3's reason.
    for bad in [
        r#""A700""#,
        "42752.0",
        r#""""#,
        "70000",
        "-1",
        "true",
        r#"["x"]"#,
    ] {
        let body = format!(
            r#"{{"00081199": {{"vr": "SQ", "Value": [{{"00081155": {{"vr": "UI", "Value": ["1.2.3.1"]}}}}]}},
                "00081198": {{"vr": "SQ", "Value": [
                    {{"00081155": {{"vr": "UI", "Value": ["1.2.3.2"]}}, "00081197": {{"vr": "US", "Value": [{bad}]}}}},
                    {{"00081155": {{"vr": "UI", "Value": ["1.2.3.3"]}}, "00081197": {{"vr": "US", "Value": [290]}}}}]}}}}"#
        );
        check(
            JSON,
            &body,
            Expect {
                referenced: &[("1.2.3.1", None)],
                failed: &[("1.2.3.2", None), ("1.2.3.3", Some(0x0122))],
                warning: None,
            },
        );
    }
    for bad in ["A700", "42752.0", "0xZZ", "70000"] {
        let body = format!(
            r#"<NativeDicomModel>
  <DicomAttribute tag="00081199" vr="SQ"><Item number="1">
    <DicomAttribute tag="00081155" vr="UI"><Value number="1">1.2.3.1</Value></DicomAttribute>
  </Item></DicomAttribute>
  <DicomAttribute tag="00081198" vr="SQ"><Item number="1">
    <DicomAttribute tag="00081155" vr="UI"><Value number="1">1.2.3.2</Value></DicomAttribute>
    <DicomAttribute tag="00081197" vr="US"><Value number="1">{bad}</Value></DicomAttribute>
  </Item><Item number="2">
    <DicomAttribute tag="00081155" vr="UI"><Value number="1">1.2.3.3</Value></DicomAttribute>
    <DicomAttribute tag="00081197" vr="US"><Value number="1">290</Value></DicomAttribute>
  </Item></DicomAttribute>
</NativeDicomModel>"#
        );
        check(
            XML,
            &body,
            Expect {
                referenced: &[("1.2.3.1", None)],
                failed: &[("1.2.3.2", None), ("1.2.3.3", Some(0x0122))],
                warning: None,
            },
        );
    }
}
