//! Unit tests of [`super`]: sizes against amq-protocol's own encoder, and the order things
//! are cut and dropped in.

use super::{fit, header_frame_size, DoesNotFit, Fitted, ERROR_FLOOR, FRAME_OVERHEAD};
use crate::headers::{long_string, Written, ATTEMPTS, DROPPED_HEADERS, ERROR, REASON};
use lapin::types::{AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable};
use lapin::BasicProperties;
use std::collections::BTreeMap;

/// The frame size from amq-protocol's own encoder (flags and property list), plus the rest
/// of the frame.
fn encoded(properties: &BasicProperties) -> usize {
    let context =
        lapin::protocol::basic::gen_properties::<Vec<u8>>(properties)(Vec::new().into()).unwrap();
    FRAME_OVERHEAD - 2 + context.write.len()
}

fn text(len: usize) -> AMQPValue {
    long_string(&"h".repeat(len))
}

fn with_headers(entries: &[(&str, AMQPValue)]) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (name, value) in entries {
        headers.insert((*name).into(), value.clone());
    }
    BasicProperties::default()
        .with_message_id("m-1".into())
        .with_delivery_mode(2)
        .with_headers(headers)
}

fn written(error: &str) -> Written<'_> {
    let mut bookkeeping = BTreeMap::new();
    bookkeeping.insert(REASON.into(), long_string("malformed"));
    bookkeeping.insert(ATTEMPTS.into(), AMQPValue::LongLongInt(1));
    Written { bookkeeping, error }
}

fn header(fitted: &Fitted, name: &str) -> Option<String> {
    match fitted.headers.inner().get(name)? {
        AMQPValue::LongString(text) => Some(text.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// Fits, and checks with the real encoder that the result is within `limit`.
fn fit_in(properties: &BasicProperties, error: &str, limit: usize) -> Fitted {
    let fitted = fit(properties, written(error), limit).unwrap();
    let sent = properties.clone().with_headers(fitted.headers.clone());
    assert!(encoded(&sent) <= limit, "{} > {limit}", encoded(&sent));
    fitted
}

#[test]
fn the_size_is_the_encoder_s_for_every_kind_of_value() {
    let mut nested = FieldTable::default();
    nested.insert("count".into(), AMQPValue::LongLongInt(3));
    nested.insert("queue".into(), AMQPValue::ShortString("payments".into()));
    let values = vec![
        AMQPValue::Boolean(true),
        AMQPValue::ShortShortInt(-1),
        AMQPValue::ShortShortUInt(1),
        AMQPValue::ShortInt(-2),
        AMQPValue::ShortUInt(2),
        AMQPValue::LongInt(-4),
        AMQPValue::LongUInt(4),
        AMQPValue::LongLongInt(-8),
        AMQPValue::Float(1.5),
        AMQPValue::Double(2.5),
        AMQPValue::DecimalValue(DecimalValue {
            scale: 2,
            value: 1234,
        }),
        AMQPValue::ShortString("short".into()),
        AMQPValue::LongString("long é".into()),
        AMQPValue::Timestamp(1_700_000_000),
        AMQPValue::ByteArray(ByteArray::from(vec![1, 2, 3])),
        AMQPValue::Void,
        AMQPValue::FieldTable(nested.clone()),
    ];
    let mut entries: Vec<(String, AMQPValue)> = values
        .iter()
        .enumerate()
        .map(|(i, value)| (format!("x-{i}"), value.clone()))
        .collect();
    entries.push((
        "x-array".into(),
        AMQPValue::FieldArray(FieldArray::from(values)),
    ));
    let entries: Vec<(&str, AMQPValue)> = entries
        .iter()
        .map(|(n, v)| (n.as_str(), v.clone()))
        .collect();
    let every = with_headers(&entries)
        .with_content_type("application/json".into())
        .with_content_encoding("gzip".into())
        .with_priority(3)
        .with_correlation_id("c-1".into())
        .with_reply_to("replies".into())
        .with_expiration("60000".into())
        .with_timestamp(1_700_000_000)
        .with_type("payment".into())
        .with_user_id("guest".into())
        .with_app_id("shop".into())
        .with_cluster_id("c".into());
    assert_eq!(header_frame_size(&every), encoded(&every));
    for bare in [BasicProperties::default(), with_headers(&[])] {
        assert_eq!(header_frame_size(&bare), encoded(&bare));
    }
}

#[test]
fn what_fits_is_kept_whole() {
    let properties = with_headers(&[("x-tenant", long_string("eu"))]);
    let error = "e".repeat(4096);
    let fitted = fit_in(&properties, &error, 131_072);
    assert!(fitted.dropped.is_empty());
    assert_eq!(header(&fitted, ERROR), Some(error));
    assert_eq!(header(&fitted, "x-tenant").as_deref(), Some("eu"));
    assert_eq!(header(&fitted, DROPPED_HEADERS), None);
}

#[test]
fn the_error_is_cut_before_any_producer_header_is_dropped() {
    let properties = with_headers(&[("x-big", text(10_000))]);
    let error = "e".repeat(4096);
    let whole = encoded(&properties) + 4096 + 200;
    let fitted = fit_in(&properties, &error, whole - 1000);
    assert!(fitted.dropped.is_empty(), "{:?}", fitted.dropped);
    let kept = header(&fitted, ERROR).unwrap().len();
    assert!((ERROR_FLOOR..4096).contains(&kept), "{kept}");
}

#[test]
fn the_largest_producer_headers_go_first_and_are_recorded() {
    let properties = with_headers(&[
        ("x-small", text(100)),
        ("x-big", text(60_000)),
        ("x-medium", text(30_000)),
        ("x-also-big", text(60_000)),
    ]);
    let full = encoded(&properties);
    // Room for idem's headers once one 60 000-byte header is gone.
    let one = fit_in(&properties, "not JSON", full - 1000);
    let names: Vec<&str> = one.dropped.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["x-also-big"], "ties go by name");
    let bytes = one.dropped[0].1;
    assert_eq!(bytes, 1 + "x-also-big".len() + 1 + 4 + 60_000);
    assert_eq!(
        header(&one, DROPPED_HEADERS),
        Some(format!("{bytes} bytes: x-also-big"))
    );
    assert!(header(&one, "x-big").is_some() && header(&one, "x-small").is_some());
    assert_eq!(header(&one, ERROR).as_deref(), Some("not JSON"));
    // Tighter: both big ones, then the medium one.
    let three = fit_in(&properties, "not JSON", full - 120_100);
    let names: Vec<&str> = three.dropped.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["x-also-big", "x-big", "x-medium"]);
    let record = header(&three, DROPPED_HEADERS).unwrap();
    assert!(
        record.ends_with(" bytes: x-also-big, x-big, x-medium"),
        "{record}"
    );
    assert_eq!(header(&three, "x-small").map(|t| t.len()), Some(100));
}

#[test]
fn idem_s_bookkeeping_is_never_dropped_and_absurd_properties_do_not_fit() {
    let properties = with_headers(&[("x-big", text(5_000)), ("x-idem-reason", text(9_000))]);
    // The producer's own x-idem-reason is replaced, not counted; everything else goes.
    let tight = encoded(&with_headers(&[])) + 200;
    let fitted = fit_in(&properties, &"e".repeat(4096), tight);
    assert_eq!(header(&fitted, REASON).as_deref(), Some("malformed"));
    assert_eq!(header(&fitted, ATTEMPTS).as_deref(), Some("LongLongInt(1)"));
    assert_eq!(fitted.dropped.len(), 1);
    assert!(header(&fitted, ERROR).unwrap().len() < ERROR_FLOOR);
    let needed = match fit(&properties, written("error"), 40) {
        Err(DoesNotFit { needed }) => needed,
        Ok(fitted) => panic!("fitted in 40 bytes: {fitted:?}"),
    };
    assert!(needed > 40);
}

#[test]
fn a_record_carried_from_a_retry_is_merged() {
    let properties = with_headers(&[
        (DROPPED_HEADERS, long_string("70000 bytes: x-trace")),
        ("x-big", text(20_000)),
    ]);
    let fitted = fit_in(&properties, "boom", encoded(&properties) - 1000);
    assert_eq!(
        header(&fitted, DROPPED_HEADERS),
        Some("90011 bytes: x-trace, x-big".into())
    );
    // Nothing new dropped: carried as it was.
    let fitted = fit_in(&properties, "boom", 131_072);
    assert_eq!(
        header(&fitted, DROPPED_HEADERS),
        Some("70000 bytes: x-trace".into())
    );
}

#[test]
fn many_small_headers_end_with_a_cut_record() {
    let names: Vec<String> = (0..2000).map(|i| format!("x-header-{i:04}")).collect();
    let entries: Vec<(&str, AMQPValue)> = names.iter().map(|n| (n.as_str(), text(10))).collect();
    let properties = with_headers(&entries);
    let fitted = fit_in(&properties, "boom", 4096);
    assert!(fitted.dropped.len() > 1000, "{}", fitted.dropped.len());
    let record = header(&fitted, DROPPED_HEADERS).unwrap();
    assert!(record.ends_with(" …") && record.len() < 1100, "{record}");
}
