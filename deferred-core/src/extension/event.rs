//! The events `GET /event/next` answers, decoded strictly: a malformed or unknown event is an
//! error value, never a panic or a silent default.

use std::borrow::Cow;
use std::fmt;
use std::time::SystemTime;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};

use super::error::ClientError;
use crate::context::deadline_from_epoch_ms;

/// An event delivered to an extension, as [`decode_event`] reads it.
///
/// ```
/// use deferred_core::extension::{NextEvent, decode_event};
///
/// let body = br#"{"eventType":"SHUTDOWN","shutdownReason":"SPINDOWN","deadlineMs":1700000000500}"#;
/// match decode_event(body)? {
///     NextEvent::Invoke(invoke) => println!("invocation {}", invoke.request_id),
///     NextEvent::Shutdown(shutdown) => assert_eq!(shutdown.reason, "SPINDOWN"),
///     _ => {} // an event type this version does not know
/// }
/// # Ok::<(), deferred_core::extension::ClientError>(())
/// ```
///
/// `#[non_exhaustive]`: the Extensions API may add event types, and fields to these (as the
/// register answer gained `accountId`); a `match` needs a `_` arm.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NextEvent {
    /// `{"eventType":"INVOKE", …}`: an invocation started.
    Invoke(InvokeEvent),
    /// `{"eventType":"SHUTDOWN", …}`: the environment shuts down (external extensions only).
    Shutdown(ShutdownEvent),
}

/// An INVOKE event.
///
/// ```
/// use deferred_core::extension::{NextEvent, decode_event};
/// use std::time::{Duration, UNIX_EPOCH};
///
/// let body = br#"{
///     "eventType": "INVOKE",
///     "deadlineMs": 1700000003000,
///     "requestId": "8476a536-e9f4-11e8-9739-2dfe598c3fcd",
///     "invokedFunctionArn": "arn:aws:lambda:us-east-1:123456789012:function:orders",
///     "tracing": { "type": "X-Amzn-Trace-Id", "value": "Root=1-5bef4de7-ad49b0e87f6ef6c87fc2e700;Sampled=1" }
/// }"#;
/// let NextEvent::Invoke(invoke) = decode_event(body)? else { unreachable!() };
/// assert_eq!(invoke.request_id, "8476a536-e9f4-11e8-9739-2dfe598c3fcd");
/// assert_eq!(invoke.deadline, UNIX_EPOCH + Duration::from_millis(1_700_000_003_000));
/// assert!(invoke.trace_id.as_deref().is_some_and(|t| t.starts_with("Root=")));
/// # Ok::<(), deferred_core::extension::ClientError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct InvokeEvent {
    /// The invocation's request id, the same the runtime receives.
    pub request_id: String,
    /// The invocation's deadline (`deadlineMs`, epoch milliseconds).
    pub deadline: SystemTime,
    /// The ARN the function was invoked with, when Lambda sent it.
    pub invoked_function_arn: Option<String>,
    /// The `X-Amzn-Trace-Id` value, when tracing is on.
    pub trace_id: Option<String>,
}

/// A SHUTDOWN event.
///
/// Internal extensions, such as the one deferred-core registers, may not subscribe to it:
/// they learn of the shutdown from SIGTERM.
///
/// ```
/// use deferred_core::extension::{NextEvent, decode_event};
///
/// let body = br#"{"eventType":"SHUTDOWN","shutdownReason":"TIMEOUT","deadlineMs":1700000000500}"#;
/// let NextEvent::Shutdown(shutdown) = decode_event(body)? else { unreachable!() };
/// assert_eq!(shutdown.reason, "TIMEOUT");
/// assert!(shutdown.deadline.is_some());
/// # Ok::<(), deferred_core::extension::ClientError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownEvent {
    /// As sent: RAPID sends `spindown`, `timeout` or `failure` (lowercase,
    /// `rapi/model/agentevent.go`), AWS's documentation prints them in capitals. Compare
    /// with `eq_ignore_ascii_case`.
    pub reason: String,
    /// When the environment will be stopped, if Lambda sent it.
    pub deadline: Option<SystemTime>,
}

// Field names per the Extensions API reference ("Next event"): eventType, deadlineMs,
// requestId, invokedFunctionArn, tracing{type,value}; shutdownReason for SHUTDOWN.
// Read once per invocation on the path to the handler: what is only compared is borrowed,
// and `tracing` is read without an intermediate `serde_json::Value`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawEvent<'a> {
    #[serde(borrow)]
    event_type: Cow<'a, str>,
    request_id: Option<String>,
    deadline_ms: Option<u64>,
    invoked_function_arn: Option<String>,
    tracing: Option<RawTracing>,
    shutdown_reason: Option<String>,
}

/// What the chain reads of an event: the same fields but for `invokedFunctionArn` and
/// `tracing`, which it has no use for and serde then skips unread (no copy, no UTF-8 check):
/// about 2,000 instructions less per invocation on the way to the next event
/// (`bench --instructions`).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ChainEvent<'a> {
    #[serde(borrow)]
    event_type: Cow<'a, str>,
    request_id: Option<String>,
    deadline_ms: Option<u64>,
    shutdown_reason: Option<String>,
}

/// Decodes the body of an `event/next` answer.
///
/// ```
/// use deferred_core::extension::{decode_event, NextEvent};
/// let body = br#"{"eventType":"INVOKE","deadlineMs":1700000000000,"requestId":"r-1","invokedFunctionArn":"arn:aws:lambda:eu-west-1:1:function:f"}"#;
/// let NextEvent::Invoke(event) = decode_event(body)? else { panic!("an INVOKE event") };
/// assert_eq!(event.request_id, "r-1");
/// assert!(decode_event(b"{\"eventType\":\"RESTART\"}").is_err());
/// # Ok::<(), deferred_core::extension::ClientError>(())
/// ```
pub fn decode_event(body: &[u8]) -> Result<NextEvent, ClientError> {
    let raw: RawEvent<'_> = parse(body)?;
    let trace_id = raw.tracing.and_then(|t| t.value);
    let extras = (raw.invoked_function_arn, trace_id);
    build(
        &raw.event_type,
        raw.request_id,
        raw.deadline_ms,
        raw.shutdown_reason,
        extras,
    )
}

/// [`decode_event`] for the chain's own line: an INVOKE event comes with no
/// `invoked_function_arn` or `trace_id`, which are not read ([`ChainEvent`]), whatever the
/// body holds there.
pub(crate) fn decode_chain_event(body: &[u8]) -> Result<NextEvent, ClientError> {
    let raw: ChainEvent<'_> = parse(body)?;
    build(
        &raw.event_type,
        raw.request_id,
        raw.deadline_ms,
        raw.shutdown_reason,
        (None, None),
    )
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ClientError> {
    // serde builds a struct from a JSON array as well as from an object; an event is an object.
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(ClientError::Malformed(
            "event/next body is not a JSON object".into(),
        ));
    }
    // One UTF-8 check over the whole body, after which serde_json checks no string again,
    // rather than one check per string it reads (seven in an INVOKE event): about 700
    // instructions less per event. A body that is not UTF-8 is read from its bytes as before,
    // where strings that are only skipped are not checked: the same events decode, and the
    // same bodies are refused with the same errors.
    match std::str::from_utf8(body) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(body),
    }
    .map_err(|e| ClientError::Malformed(format!("event/next body is not an event: {e}")))
}

/// The event from its fields: `extras` are the invoked function's ARN and the trace id.
fn build(
    event_type: &str,
    request_id: Option<String>,
    deadline_ms: Option<u64>,
    shutdown_reason: Option<String>,
    (invoked_function_arn, trace_id): (Option<String>, Option<String>),
) -> Result<NextEvent, ClientError> {
    match event_type {
        "INVOKE" => {
            let request_id = request_id
                .filter(|id| !id.is_empty())
                .ok_or_else(|| ClientError::Malformed("INVOKE event without requestId".into()))?;
            let deadline = deadline_ms
                .and_then(deadline_from_epoch_ms)
                .ok_or_else(|| ClientError::Malformed("INVOKE event without deadlineMs".into()))?;
            Ok(NextEvent::Invoke(InvokeEvent {
                request_id,
                deadline,
                invoked_function_arn,
                trace_id,
            }))
        }
        "SHUTDOWN" => Ok(NextEvent::Shutdown(ShutdownEvent {
            reason: shutdown_reason.unwrap_or_default(),
            deadline: deadline_ms.and_then(deadline_from_epoch_ms),
        })),
        other => Err(ClientError::Malformed(format!(
            "event/next returned an unknown eventType {other:?}"
        ))),
    }
}

/// `tracing`: its `value`, typed strictly (a non-string value is an error, as for every other
/// field); its other keys are ignored.
struct RawTracing {
    value: Option<String>,
}

impl<'de> Deserialize<'de> for RawTracing {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Only a JSON object: a derived struct would accept an array as well.
        deserializer.deserialize_map(TracingVisitor)
    }
}

struct TracingVisitor;

/// The keys of `tracing`, read without allocating.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum TracingKey {
    Value,
    #[serde(other)]
    Other,
}

impl<'de> Visitor<'de> for TracingVisitor {
    type Value = RawTracing;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a tracing object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawTracing, A::Error> {
        let mut value: Option<Option<String>> = None;
        while let Some(key) = map.next_key::<TracingKey>()? {
            match key {
                TracingKey::Value if value.is_some() => {
                    return Err(de::Error::duplicate_field("value"));
                }
                TracingKey::Value => value = Some(map.next_value()?),
                TracingKey::Other => {
                    map.next_value::<de::IgnoredAny>()?;
                }
            }
        }
        Ok(RawTracing {
            value: value.flatten(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invoke_with_tracing() {
        let body = br#"{"eventType":"INVOKE","deadlineMs":1700000000500,"requestId":"abc","invokedFunctionArn":"arn","tracing":{"type":"X-Amzn-Trace-Id","value":"Root=1-2-3"}}"#;
        let NextEvent::Invoke(ev) = decode_event(body).expect("valid") else {
            panic!("expected INVOKE")
        };
        assert_eq!(ev.request_id, "abc");
        assert_eq!(ev.trace_id.as_deref(), Some("Root=1-2-3"));
        assert_eq!(
            ev.deadline,
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_500)
        );
    }

    #[test]
    fn tracing_without_value_and_escaped_strings() {
        // Escapes make serde hand over owned strings rather than borrowed ones: both decode.
        let body = br#"{"eventType":"INV\u004fKE","deadlineMs":1700000000500,"requestId":"a\"b","tracing":{"type":"X-Amzn-Trace-Id","extra":{"nested":[1,2]}}}"#;
        let NextEvent::Invoke(ev) = decode_event(body).expect("valid") else {
            panic!("expected INVOKE")
        };
        assert_eq!(ev.request_id, "a\"b");
        assert_eq!(ev.trace_id, None);
        assert_eq!(ev.invoked_function_arn, None);
        let body = br#"{"eventType":"INVOKE","deadlineMs":1700000000500,"requestId":"a","tracing":{"value":null}}"#;
        assert!(matches!(decode_event(body), Ok(NextEvent::Invoke(ev)) if ev.trace_id.is_none()));
        // The shape the malformed cases below break, whole.
        let body = br#"{"eventType":"INVOKE","requestId":"a","deadlineMs":5,"tracing":{"value":"Root=1"}}"#;
        assert!(
            matches!(decode_event(body), Ok(NextEvent::Invoke(ev)) if ev.trace_id.as_deref() == Some("Root=1"))
        );
    }

    #[test]
    fn shutdown() {
        let body =
            br#"{"eventType":"SHUTDOWN","shutdownReason":"SPINDOWN","deadlineMs":1700000000500}"#;
        assert!(matches!(decode_event(body), Ok(NextEvent::Shutdown(s)) if s.reason == "SPINDOWN"));
    }

    #[test]
    fn the_chains_decoding_reads_the_same_event_without_its_extras() {
        let invoke = br#"{"eventType":"INVOKE","deadlineMs":1700000000500,"requestId":"a\"b","invokedFunctionArn":"arn","tracing":{"type":"X-Amzn-Trace-Id","value":"Root=1-2-3"}}"#;
        let Ok(NextEvent::Invoke(full)) = decode_event(invoke) else {
            panic!("expected INVOKE")
        };
        let Ok(NextEvent::Invoke(lean)) = decode_chain_event(invoke) else {
            panic!("expected INVOKE")
        };
        assert_eq!(
            (&lean.request_id, lean.deadline),
            (&full.request_id, full.deadline)
        );
        assert_eq!((lean.invoked_function_arn, lean.trace_id), (None, None));
        let shutdown =
            br#"{"eventType":"SHUTDOWN","shutdownReason":"SPINDOWN","deadlineMs":1700000000500}"#;
        assert_eq!(
            decode_chain_event(shutdown).ok(),
            decode_event(shutdown).ok()
        );
        // What it skips may be of any shape; what it reads is as strict as `decode_event`.
        let odd_extras = br#"{"eventType":"INVOKE","requestId":"a","deadlineMs":5,"tracing":[7],"invokedFunctionArn":{}}"#;
        assert!(
            matches!(decode_chain_event(odd_extras), Ok(NextEvent::Invoke(ev)) if ev.request_id == "a")
        );
        for body in [
            &b"[]"[..],
            b"{\"eventType\":\"INVOKE\",\"requestId\":\"\",\"deadlineMs\":5}",
            b"{\"eventType\":\"INVOKE\",\"requestId\":7,\"deadlineMs\":5}",
            b"{\"eventType\":\"INVOKE\",\"requestId\":\"a\",\"requestId\":\"b\",\"deadlineMs\":5}",
            b"{\"eventType\":\"RESTART\"}",
            b"{\"eventType\":\"INVOKE\",\"requestId\":\"a\",\"deadlineMs\":5,\"tracing\":{\"value\":\"a\"}",
        ] {
            assert_malformed(decode_chain_event, body);
        }
    }

    #[test]
    fn a_body_that_is_not_utf8_decodes_as_its_bytes_do() {
        // Skipped strings are not checked: an ARN that is not UTF-8 does not refuse the event
        // to the chain, which skips it, and does to `decode_event`, which reads it.
        let arn = b"{\"eventType\":\"INVOKE\",\"requestId\":\"a\",\"deadlineMs\":5,\"invokedFunctionArn\":\"\xff\"}";
        assert!(
            matches!(decode_chain_event(arn), Ok(NextEvent::Invoke(ev)) if ev.request_id == "a")
        );
        assert_malformed(decode_event, arn);
        // A string that is read is checked, whichever decoding reads it.
        let id = b"{\"eventType\":\"INVOKE\",\"requestId\":\"\xff\",\"deadlineMs\":5}";
        assert_malformed(decode_chain_event, id);
        assert_malformed(decode_event, id);
        // The same errors as when every body was read from its bytes, UTF-8 or not.
        for body in [
            &arn[..],
            id,
            br#"{"eventType":"INVOKE","requestId":7}"#,
            b"{\"a\xff\":1",
        ] {
            let from_bytes = serde_json::from_slice::<ChainEvent<'_>>(body)
                .err()
                .map(|e| format!("event/next body is not an event: {e}"));
            let decoded = match decode_chain_event(body) {
                Err(ClientError::Malformed(m)) => Some(m),
                _ => None,
            };
            assert_eq!(decoded, from_bytes);
        }
    }

    /// `decode` finds `body` malformed.
    fn assert_malformed(decode: fn(&[u8]) -> Result<NextEvent, ClientError>, body: &[u8]) {
        assert!(
            matches!(decode(body), Err(ClientError::Malformed(_))),
            "{:?}",
            String::from_utf8_lossy(body)
        );
    }

    #[test]
    fn malformed_inputs_are_errors() {
        for body in [
            &b""[..],
            b"null",
            b"[]",
            b"{}",
            b"{\"eventType\":\"INVOKE\"}",
            b"{\"eventType\":\"INVOKE\",\"requestId\":\"a\"}",
            b"{\"eventType\":\"INVOKE\",\"requestId\":\"\",\"deadlineMs\":5}",
            b"{\"eventType\":\"INVOKE\",\"requestId\":\"a\",\"deadlineMs\":-5}",
            b"{\"eventType\":\"INVOKE\",\"requestId\":\"a\",\"deadlineMs\":0}",
            b"{\"eventType\":7}",
            b"{\"eventType\":\"RESTART\"}",
            b"\xff\xfe",
            // `tracing` must be an object whose `value` is a string, given once.
            b"{\"eventType\":\"INVOKE\",\"requestId\":\"a\",\"deadlineMs\":5,\"tracing\":[\"X\",\"Root=1\"]}",
            b"{\"eventType\":\"INVOKE\",\"requestId\":\"a\",\"deadlineMs\":5,\"tracing\":{\"value\":7}}",
            b"{\"eventType\":\"INVOKE\",\"requestId\":\"a\",\"deadlineMs\":5,\"tracing\":{\"value\":\"a\",\"value\":\"b\"}}",
            b"{\"eventType\":\"INVOKE\",\"requestId\":\"a\",\"deadlineMs\":5,\"tracing\":\"Root=1\"}",
        ] {
            assert_malformed(decode_event, body);
        }
    }
}
