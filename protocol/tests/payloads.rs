//! Bad payloads and topics: every one is a named error, never a panic.

use proptest::prelude::*;
use rxvision_protocol::topic::{self, Channel};
use rxvision_protocol::{decode, decode_on, encode, Ack, Event, Histogram, ProtocolError, Status, Telemetry};

use crate::golden;

fn with(value: serde_json::Value, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> Vec<u8> {
    let mut value = value;
    edit(value.as_object_mut().unwrap());
    serde_json::to_vec(&value).unwrap()
}

fn telemetry_json() -> serde_json::Value {
    serde_json::from_slice(&encode(&golden::telemetry()).unwrap()).unwrap()
}

#[test]
fn oversized_payloads_are_refused_before_parsing() {
    let big = vec![b' '; Channel::Telemetry.max_payload() + 1];
    assert!(matches!(decode::<Telemetry>(&big), Err(ProtocolError::TooLarge { channel: Channel::Telemetry, .. })));
    let ten_mb = vec![b'{'; 10 << 20];
    assert!(matches!(decode::<Event>(&ten_mb), Err(ProtocolError::TooLarge { .. })));
}

#[test]
fn garbage_truncation_and_unknown_fields_are_malformed() {
    assert!(matches!(decode::<Ack>(b"\xff\xfe garbage"), Err(ProtocolError::Malformed { .. })));
    let full = encode(&golden::telemetry()).unwrap();
    assert!(matches!(decode::<Telemetry>(&full[..full.len() / 2]), Err(ProtocolError::Malformed { .. })));
    let extra = with(telemetry_json(), |m| {
        m.insert("gps".into(), serde_json::json!([51.5, -0.1]));
    });
    match decode::<Telemetry>(&extra) {
        Err(ProtocolError::Malformed { reason, .. }) => assert!(reason.contains("gps"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn another_version_is_named_as_such() {
    let newer = with(telemetry_json(), |m| {
        m.insert("v".into(), 2.into());
        m.insert("field_of_v2".into(), true.into());
    });
    assert_eq!(
        decode::<Telemetry>(&newer).unwrap_err(),
        ProtocolError::Version { channel: Channel::Telemetry, version: 2 }
    );
    let mut old = golden::ack();
    old.v = 0;
    assert!(matches!(encode(&old), Err(ProtocolError::Version { version: 0, .. })));
}

#[test]
fn out_of_range_values_are_invalid() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("seq 0", with(telemetry_json(), |m| drop(m.insert("seq".into(), 0.into())))),
        (
            "window backwards",
            with(telemetry_json(), |m| {
                drop(m.insert("window".into(), serde_json::json!({"start_ms": 10, "end_ms": 5, "windows": 1})))
            }),
        ),
        (
            "histogram shape",
            with(telemetry_json(), |m| {
                drop(
                    m.insert("latency_ms".into(), serde_json::json!({"bounds": [1.0, 2.0], "counts": [1], "sum": 1.0})),
                )
            }),
        ),
        (
            "bounds not ascending",
            with(telemetry_json(), |m| {
                drop(m.insert(
                    "confidence".into(),
                    serde_json::json!({"bounds": [0.9, 0.5], "counts": [0, 0, 0], "sum": 0.0}),
                ))
            }),
        ),
        (
            "head not hex",
            with(telemetry_json(), |m| {
                drop(m.insert("audit".into(), serde_json::json!({"next_seq": 1, "head": "zz"})))
            }),
        ),
        ("device id", with(telemetry_json(), |m| drop(m.insert("device_id".into(), "a/b".into())))),
        ("control characters", with(telemetry_json(), |m| drop(m.insert("engine".into(), "cpu\u{7}".into())))),
    ];
    for (name, bytes) in cases {
        assert!(matches!(decode::<Telemetry>(&bytes), Err(ProtocolError::Invalid { .. })), "{name}");
    }
}

#[test]
fn a_payload_must_name_its_topics_device() {
    let bytes = encode(&golden::status()).unwrap();
    assert!(decode_on::<Status>("store-0412-counter-1", &bytes).is_ok());
    assert_eq!(
        decode_on::<Status>("store-0999-counter-1", &bytes).unwrap_err(),
        ProtocolError::WrongDevice { topic: "store-0999-counter-1".into(), payload: "store-0412-counter-1".into() }
    );
}

#[test]
fn topics_are_built_and_parsed_for_valid_device_ids_only() {
    for channel in Channel::ALL {
        let name = topic::topic("counter-1.a_b", channel).unwrap();
        assert_eq!(topic::parse(&name).unwrap(), ("counter-1.a_b".to_string(), channel));
    }
    assert_eq!(topic::all_devices(Channel::Events), "rxv/v1/dev/+/events");
    for bad in ["", "a/b", "+", "#", "a b", &"x".repeat(65), "ü"] {
        assert!(topic::topic(bad, Channel::Status).is_err(), "{bad:?}");
    }
    for bad in ["rxv/v2/dev/a/status", "rxv/v1/dev/a/unknown", "rxv/v1/dev/a/b/status", "rxv/v1/dev//status", "x"] {
        assert!(matches!(topic::parse(bad), Err(ProtocolError::Topic(_))), "{bad:?}");
    }
    assert!(Channel::Status.retained() && Channel::Desired.retained() && !Channel::Telemetry.retained());
    assert!(Channel::Events.from_device() && !Channel::Ack.from_device());
}

#[test]
fn histograms_count_into_buckets_and_merge_only_like_with_like() {
    let mut h = Histogram::new(&[1.0, 2.0]);
    for v in [0.5, 1.0, 1.5, 2.5, f64::NAN] {
        h.observe(v);
    }
    assert_eq!((h.counts.clone(), h.total(), h.sum), (vec![2, 1, 1], 4, 5.5));
    let other = h.clone();
    h.merge(&other).unwrap();
    assert_eq!(h.counts, vec![4, 2, 2]);
    assert!(h.merge(&Histogram::new(&[1.0])).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256),
        failure_persistence: Some(Box::new(proptest::test_runner::FileFailurePersistence::Direct(
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/proptest-regressions/payloads.txt"),
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_bytes_are_an_error_or_a_payload(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode::<Telemetry>(&bytes);
        let _ = decode::<Event>(&bytes);
        let _ = decode::<Status>(&bytes);
        let _ = decode::<Ack>(&bytes);
    }

    #[test]
    fn mutated_telemetry_is_an_error_or_a_payload(index in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut bytes = encode(&golden::telemetry()).unwrap();
        let i = index.index(bytes.len());
        bytes[i] = byte;
        if let Ok(t) = decode::<Telemetry>(&bytes) {
            // Whatever decodes re-encodes: a decoded payload is always a valid one.
            prop_assert!(encode(&t).is_ok());
        }
    }
}

#[test]
fn numbers_come_back_exactly() {
    for sum in [1151.5040577653447, 0.1 + 0.2, 1e-300, f64::MAX / 3.0, 5e-324] {
        let mut telemetry = golden::telemetry();
        telemetry.latency_ms.sum = sum;
        let back: Telemetry = decode(&encode(&telemetry).unwrap()).unwrap();
        assert_eq!(back.latency_ms.sum.to_bits(), sum.to_bits(), "{sum:e}");
    }
}

#[test]
fn merged_windows_add_up_and_span_both() {
    let first = golden::telemetry();
    let mut later = golden::telemetry();
    later.window.start_ms = first.window.end_ms;
    later.window.end_ms = first.window.end_ms + 60_000;
    later.model_version = "0.5.0".into();
    later.verdicts.insert("MISMATCH".into(), 2);
    let mut merged = first.clone();
    merged.merge(&later).unwrap();
    assert_eq!(
        (merged.window.start_ms, merged.window.end_ms, merged.window.windows),
        (first.window.start_ms, later.window.end_ms, 2)
    );
    assert_eq!(merged.scans, first.scans + later.scans);
    assert_eq!(merged.verdicts["MATCH"], 6);
    assert_eq!(merged.verdicts["MISMATCH"], 2);
    assert_eq!(merged.latency_ms.total(), first.latency_ms.total() * 2);
    assert_eq!(merged.features["brightness"].total(), first.features["brightness"].total() * 2);
    assert_eq!(merged.model_version, "0.5.0");
    assert!(encode(&merged).is_ok(), "a merged window is a valid window");
    let mut other_bounds = golden::telemetry();
    other_bounds.latency_ms = Histogram::new(&[1.0]);
    let before = merged.clone();
    assert!(merged.merge(&other_bounds).is_err());
    assert_eq!(merged, before, "a refused merge changes nothing");
}
