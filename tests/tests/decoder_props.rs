//! Issue 5, bad input: property tests of the Extensions API event decoder
//! (`deferred_core::extension::decode_event`). It must never panic, and it may return `Ok`
//! only for a well-formed INVOKE (object, `eventType` "INVOKE", non-empty string `requestId`,
//! non-zero integer `deadlineMs`) or SHUTDOWN event, with exactly the fields it was given.
//!
//! CI-sized: 2,000 cases per property from a fixed seed. More, from another seed:
//! `PROPTEST_CASES=200000 PROPTEST_RNG_SEED=42 cargo test --release -p deferred-testkit --test
//! decoder_props`.

use std::time::{Duration, UNIX_EPOCH};

use deferred_core::extension::{NextEvent, decode_event};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

/// The fields of an event, each as whatever JSON it holds. Other fields are skipped, as the
/// decoder skips them: serde_json does not validate skipped content (invalid UTF-8 in a
/// string, a number out of range are accepted there), so neither does the oracle.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Fields {
    event_type: Option<Value>,
    request_id: Option<Value>,
    deadline_ms: Option<Value>,
    invoked_function_arn: Option<Value>,
    tracing: Option<TracingFields>,
    shutdown_reason: Option<Value>,
}

/// `tracing`: an object (never an array) whose `value`, if any, is kept; its other fields are
/// skipped like the decoder skips them.
struct TracingFields {
    value: Option<Value>,
}

impl<'de> serde::Deserialize<'de> for TracingFields {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = TracingFields;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a tracing object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<TracingFields, A::Error> {
                let mut value = None;
                let mut seen = false;
                while let Some(key) = map.next_key::<String>()? {
                    if key == "value" {
                        if seen {
                            return Err(serde::de::Error::duplicate_field("value"));
                        }
                        seen = true;
                        value = map.next_value::<Option<Value>>()?;
                    } else {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                Ok(TracingFields { value })
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

/// What a well-formed body decodes to, per the Extensions API reference; `None` when the body
/// is not a well-formed event. An event is a JSON object.
/// What a decoded event says, in a form this test can build (the event types are
/// `#[non_exhaustive]`).
#[derive(Debug, PartialEq)]
enum Expected {
    Invoke {
        request_id: String,
        deadline: std::time::SystemTime,
        invoked_function_arn: Option<String>,
        trace_id: Option<String>,
    },
    Shutdown {
        reason: String,
        deadline: Option<std::time::SystemTime>,
    },
}

/// What `event` says.
fn seen(event: &NextEvent) -> Expected {
    match event {
        NextEvent::Invoke(e) => Expected::Invoke {
            request_id: e.request_id.clone(),
            deadline: e.deadline,
            invoked_function_arn: e.invoked_function_arn.clone(),
            trace_id: e.trace_id.clone(),
        },
        NextEvent::Shutdown(e) => Expected::Shutdown {
            reason: e.reason.clone(),
            deadline: e.deadline,
        },
        other => panic!("an event type this test does not know: {other:?}"),
    }
}

fn oracle(body: &[u8]) -> Option<Expected> {
    let first = body.iter().find(|b| !b" \t\r\n".contains(b))?;
    if *first != b'{' {
        return None;
    }
    let fields = serde_json::from_slice::<Fields>(body).ok()?;
    let mut event = Map::new();
    for (key, value) in [
        ("eventType", fields.event_type),
        ("requestId", fields.request_id),
        ("deadlineMs", fields.deadline_ms),
        ("invokedFunctionArn", fields.invoked_function_arn),
        (
            "tracing",
            fields
                .tracing
                .map(|t| json!({ "value": t.value.unwrap_or(Value::Null) })),
        ),
        ("shutdownReason", fields.shutdown_reason),
    ] {
        if let Some(value) = value {
            event.insert(key.to_owned(), value);
        }
    }
    let string_or_absent = |key: &str| match event.get(key) {
        None | Some(Value::Null) => Some(None),
        Some(Value::String(s)) => Some(Some(s.clone())),
        Some(_) => None,
    };
    // Every known field must have its type, whatever the event type.
    let request_id = string_or_absent("requestId")?;
    let arn = string_or_absent("invokedFunctionArn")?;
    let reason = string_or_absent("shutdownReason")?;
    let deadline_ms = match event.get("deadlineMs") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64()?),
    };
    let trace = match event.get("tracing") {
        None | Some(Value::Null) => None,
        Some(Value::Object(t)) => match t.get("value") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return None,
        },
        Some(_) => return None,
    };
    let deadline = |ms: u64| (ms != 0).then(|| UNIX_EPOCH + Duration::from_millis(ms));
    match event.get("eventType")?.as_str()? {
        "INVOKE" => Some(Expected::Invoke {
            request_id: request_id.filter(|id| !id.is_empty())?,
            deadline: deadline(deadline_ms?)?,
            invoked_function_arn: arn,
            trace_id: trace,
        }),
        "SHUTDOWN" => Some(Expected::Shutdown {
            reason: reason.unwrap_or_default(),
            deadline: deadline_ms.and_then(deadline),
        }),
        _ => None,
    }
}

/// `Ok` implies well-formed, and then the decoded event is the one the body describes.
fn check_sound(body: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(event) = decode_event(body) {
        let expected = oracle(body);
        prop_assert_eq!(
            Some(seen(&event)),
            expected,
            "decoded {:?} from {:?}",
            event,
            String::from_utf8_lossy(body)
        );
    }
    Ok(())
}

/// 2,000 cases from a fixed seed, so CI is deterministic; `PROPTEST_CASES` and
/// `PROPTEST_RNG_SEED` override both.
fn config() -> ProptestConfig {
    let from_env = ProptestConfig::default();
    ProptestConfig {
        cases: if std::env::var_os("PROPTEST_CASES").is_some() {
            from_env.cases
        } else {
            2_000
        },
        rng_seed: if std::env::var_os("PROPTEST_RNG_SEED").is_some() {
            from_env.rng_seed
        } else {
            proptest::test_runner::RngSeed::Fixed(0x5eed_0005)
        },
        // Failures are printed with their minimal input; nothing is written to the tree.
        failure_persistence: None,
        ..from_env
    }
}

/// A valid INVOKE or SHUTDOWN body.
fn valid_event() -> impl Strategy<Value = Value> {
    let invoke = (
        "[a-f0-9-]{1,40}",
        1u64..=u64::MAX,
        proptest::option::of("arn:aws:lambda:[a-z0-9:-]{0,40}"),
        proptest::option::of("Root=1-[a-f0-9-]{0,40}"),
    )
        .prop_map(|(id, ms, arn, trace)| {
            let mut v = json!({ "eventType": "INVOKE", "requestId": id, "deadlineMs": ms });
            if let Some(arn) = arn {
                v["invokedFunctionArn"] = json!(arn);
            }
            if let Some(trace) = trace {
                v["tracing"] = json!({ "type": "X-Amzn-Trace-Id", "value": trace });
            }
            v
        });
    let shutdown = (
        prop_oneof![Just("SPINDOWN"), Just("TIMEOUT"), Just("FAILURE")],
        1u64..=u64::MAX,
    )
        .prop_map(|(reason, ms)| {
            json!({ "eventType": "SHUTDOWN", "shutdownReason": reason, "deadlineMs": ms })
        });
    prop_oneof![invoke, shutdown]
}

/// Any JSON value of a small, varied shape (no arrays of objects: see
/// `json_arrays_are_not_events`).
fn any_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<u64>().prop_map(|n| json!(n)),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        Just(json!(0)),
        Just(json!("")),
        "[ -~]{0,20}".prop_map(Value::String),
        Just(json!("INVOKE")),
        Just(json!("SHUTDOWN")),
        Just(json!({})),
        "[ -~]{0,10}".prop_map(|s| json!({ "value": s })),
        any::<u32>().prop_map(|n| json!({ "value": n })),
    ]
}

/// An object with the event's field names, each absent or of any type, plus noise fields.
fn event_like_object() -> impl Strategy<Value = Value> {
    let fields = [
        "eventType",
        "requestId",
        "deadlineMs",
        "invokedFunctionArn",
        "tracing",
        "shutdownReason",
    ];
    let entries = fields.map(|name| {
        let value = prop_oneof![
            1 => Just(None),
            3 => any_value().prop_map(Some),
        ];
        (Just(name), value)
    });
    let event_type = prop_oneof![
        Just(json!("INVOKE")),
        Just(json!("SHUTDOWN")),
        Just(json!("invoke")),
        Just(json!("RESTART")),
        any_value(),
    ];
    (
        entries,
        event_type,
        prop::collection::vec(("[a-zA-Z]{1,8}", any_value()), 0..3),
    )
        .prop_map(|(entries, event_type, noise)| {
            let mut map = Map::new();
            for (name, value) in noise {
                map.insert(name, value);
            }
            for (name, value) in entries {
                if let Some(value) = value {
                    map.insert(name.to_owned(), value);
                }
            }
            map.insert("eventType".to_owned(), event_type);
            Value::Object(map)
        })
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Delete(usize, usize),
    Insert(usize, Vec<u8>),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<usize>(), 1usize..8).prop_map(|(i, n)| Mutation::Delete(i, n)),
        (
            any::<usize>(),
            prop_oneof![
                prop::collection::vec(any::<u8>(), 1..6),
                Just(b"\"".to_vec()),
                Just(b",".to_vec()),
                Just(b"{".to_vec()),
                Just(b"}".to_vec()),
                Just(b"null".to_vec()),
                Just(b"\\u0000".to_vec()),
                Just(b"-1".to_vec()),
                Just(b"e999".to_vec()),
            ]
        )
            .prop_map(|(i, bytes)| Mutation::Insert(i, bytes)),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn mutate(mut body: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = body.len();
        match m {
            Mutation::Flip(i, b) if len > 0 => body[i % len] ^= b | 1,
            Mutation::Delete(i, n) if len > 0 => {
                let start = i % len;
                body.drain(start..(start + n).min(len));
            }
            Mutation::Insert(i, bytes) => {
                let at = i % (len + 1);
                body.splice(at..at, bytes.iter().copied());
            }
            Mutation::Truncate(i) => body.truncate(i % (len + 1)),
            _ => {}
        }
    }
    body
}

proptest! {
    #![proptest_config(config())]

    /// Arbitrary bytes: no panic; `Ok` only for a well-formed event.
    #[test]
    fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
        check_sound(&body)?;
    }

    /// Text made of JSON's own characters reaches deeper into the parser.
    #[test]
    fn json_like_text_never_panics(body in "[{}\\[\\]\":,0-9a-zA-Z .eE+-]{0,200}") {
        check_sound(body.as_bytes())?;
    }

    /// Every valid event decodes to exactly what it says.
    #[test]
    fn valid_events_decode(event in valid_event()) {
        let body = serde_json::to_vec(&event).expect("json");
        let decoded = decode_event(&body);
        prop_assert!(decoded.is_ok(), "{:?} on {}", decoded, event);
        check_sound(&body)?;
    }

    /// Objects with the event's fields of any type: `Ok` exactly when well-formed.
    #[test]
    fn event_like_objects_decode_iff_well_formed(event in event_like_object()) {
        let body = serde_json::to_vec(&event).expect("json");
        let decoded = decode_event(&body);
        let expected = oracle(&body);
        prop_assert_eq!(decoded.as_ref().ok().map(seen), expected, "{}", event);
    }

    /// Valid events with bytes flipped, deleted, inserted or cut: no panic, `Ok` only when
    /// what is left is still well-formed.
    #[test]
    fn mutated_valid_events_never_panic(
        event in valid_event(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let body = mutate(serde_json::to_vec(&event).expect("json"), &mutations);
        check_sound(&body)?;
    }
}

/// Invalid UTF-8 or an out-of-range number inside a skipped field is accepted (documented in
/// docs/RELIABILITY.md); inside a field the event carries it is an error.
#[test]
fn skipped_fields_are_not_validated() {
    let number = br#"{"eventType":"SHUTDOWN","x":1e99999}"#;
    assert!(decode_event(number).is_ok());
    let carried = br#"{"eventType":"SHUTDOWN","deadlineMs":1e99999}"#;
    assert!(decode_event(carried).is_err());
    let skipped = b"{\"eventType\":\"INVOKE\",\"requestId\":\"r\",\"deadlineMs\":5,\"x\":\"\xff\"}";
    assert!(decode_event(skipped).is_ok());
    let carried = b"{\"eventType\":\"INVOKE\",\"requestId\":\"\xff\",\"deadlineMs\":5}";
    assert!(decode_event(carried).is_err());
}

/// Edge values that must not panic: the largest deadline, huge numbers, deep nesting, long
/// strings.
#[test]
fn edge_inputs() {
    let max = format!(
        r#"{{"eventType":"INVOKE","requestId":"r","deadlineMs":{}}}"#,
        u64::MAX
    );
    assert!(decode_event(max.as_bytes()).is_ok());
    for body in [
        r#"{"eventType":"INVOKE","requestId":"r","deadlineMs":18446744073709551616}"#.to_owned(),
        r#"{"eventType":"INVOKE","requestId":"r","deadlineMs":1e3}"#.to_owned(),
        r#"{"eventType":"INVOKE","requestId":"r","deadlineMs":5,"requestId":"s"}"#.to_owned(),
        format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)),
        format!(r#"{{"eventType":{}1{}}}"#, "[".repeat(200), "]".repeat(200)),
        format!(r#"{{"eventType":"{}"}}"#, "A".repeat(1 << 20)),
    ] {
        assert!(
            decode_event(body.as_bytes()).is_err(),
            "{}",
            &body[..60.min(body.len())]
        );
    }
}

/// A JSON array is not an event, whatever it holds.
#[test]
fn json_arrays_are_not_events() {
    for body in [
        &br#"["INVOKE","r-1",1700000000000,null,null,null]"#[..],
        br#"["SHUTDOWN",null,null,null,null,"SPINDOWN"]"#,
        br#"{"eventType":"INVOKE","requestId":"r","deadlineMs":5,"tracing":["v"]}"#,
    ] {
        assert!(
            decode_event(body).is_err(),
            "{} decoded as {:?}",
            String::from_utf8_lossy(body),
            decode_event(body)
        );
    }
}
