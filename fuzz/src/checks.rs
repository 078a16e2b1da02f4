//! The checks of the fuzz targets (issue 5, "Bad input"), one function per target. Each takes
//! the raw input, must not panic on any input, and asserts what the code under test promises
//! when it accepts the input.
//!
//! The fuzz targets (`fuzz/fuzz_targets/`, nightly, libFuzzer) call these functions, and so
//! does the corpus replay on stable, `deferred-core/tests/fuzz_corpus.rs`, which includes this
//! file with `#[path]`. So this file may use only what both builds have: `deferred_core`,
//! `lambda_runtime`, `http` and `serde_json`.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use deferred_core::extension::{ClientError, NextEvent, decode_event};
use deferred_core::{HandlerInput, Invocation};
use http::{HeaderMap, HeaderName, HeaderValue};
use lambda_runtime::{Config, Context, LambdaEvent};
use serde_json::Value;

/// Lambda's longest function timeout: the phase's bound when the deadline is unknown.
const MAX_FUNCTION_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// Safety margins the phase budget is computed with: none, the default, and absurd.
const MARGINS: [Duration; 3] = [Duration::ZERO, Duration::from_millis(100), Duration::MAX];

/// The Runtime API headers `lambda_runtime::Context::new` reads.
pub const REQUEST_ID: &str = "lambda-runtime-aws-request-id";
/// `Lambda-Runtime-Deadline-Ms`: epoch milliseconds.
pub const DEADLINE_MS: &str = "lambda-runtime-deadline-ms";

/// Target `extension_event`: `data` is the body of an `event/next` answer.
///
/// The decoder must answer `Ok` or `Err(Malformed)`, never panic. On `Ok`, the body is a JSON
/// object, an INVOKE has a non-empty request id and a non-zero deadline in whole
/// milliseconds, and each decoded field is the body's (when serde_json can read the body as a
/// `Value`: the decoder does not validate the fields it skips). The deadline then goes
/// through the phase budget, as the chain does with every INVOKE it holds.
pub fn extension_event(data: &[u8]) {
    let event = match decode_event(data) {
        Ok(event) => event,
        Err(error) => {
            assert!(matches!(error, ClientError::Malformed(_)), "{error:?}");
            assert!(!error.to_string().is_empty());
            return;
        }
    };
    assert_eq!(
        data.trim_ascii_start().first(),
        Some(&b'{'),
        "accepted a body that is not a JSON object"
    );
    let body = serde_json::from_slice::<Value>(data).ok();
    let field = |name: &str| body.as_ref().and_then(|b| b.get(name));
    let text = |name: &str| field(name).and_then(Value::as_str);
    match event {
        NextEvent::Invoke(invoke) => {
            assert!(
                !invoke.request_id.is_empty(),
                "an INVOKE without request id"
            );
            let ms = epoch_ms(invoke.deadline);
            assert_ne!(ms, 0, "an INVOKE without deadline");
            if body.is_some() {
                assert_eq!(text("eventType"), Some("INVOKE"));
                assert_eq!(text("requestId"), Some(invoke.request_id.as_str()));
                assert_eq!(field("deadlineMs").and_then(Value::as_u64), Some(ms));
                assert_eq!(
                    text("invokedFunctionArn"),
                    invoke.invoked_function_arn.as_deref()
                );
                let trace = field("tracing")
                    .and_then(|t| t.get("value"))
                    .and_then(Value::as_str);
                assert_eq!(trace, invoke.trace_id.as_deref());
            }
            phase_budget(Some(invoke.deadline));
        }
        NextEvent::Shutdown(shutdown) => {
            let ms = shutdown.deadline.map(epoch_ms);
            assert_ne!(ms, Some(0), "deadline 0 means none");
            if body.is_some() {
                assert_eq!(text("eventType"), Some("SHUTDOWN"));
                assert_eq!(text("shutdownReason").unwrap_or(""), shutdown.reason);
                let sent = field("deadlineMs")
                    .and_then(Value::as_u64)
                    .filter(|&ms| representable(ms));
                assert_eq!(sent, ms);
            }
            phase_budget(shutdown.deadline);
        }
        other => panic!("an event of a type the checks do not know: {other:?}"),
    }
}

/// Target `runtime_headers`: `data` is the header block of an `invocation/next` answer, one
/// `name: value` per line (LF or CRLF; a line without `:` is skipped; a name or value that
/// `http` rejects is skipped, as hyper would have refused the answer).
///
/// The headers go through what lambda_runtime 1.5 does with them (`Context::new`, with the
/// request id read as its `invoke_request_id` does), then, when it accepts them, through
/// `Invocation::from_context`, the `HandlerInput` of `LambdaEvent`, and the phase budget. The
/// request id and the deadline must be the headers'; a deadline that `SystemTime` cannot
/// represent must be unknown, not a panic.
pub fn runtime_headers(data: &[u8]) {
    let headers = header_map(data);
    // lambda_runtime 1.5 `expect`s both headers (the Runtime API always sends them): without
    // one it panics in its own code, before any of ours runs. Not this crate's to fuzz.
    let (Some(id), Some(deadline)) = (headers.get(REQUEST_ID), headers.get(DEADLINE_MS)) else {
        return;
    };
    let Ok(request_id) = id.to_str() else {
        return; // lambda_runtime answers this invocation with an error
    };
    let deadline_ms = deadline.to_str().ok().and_then(|d| d.parse::<u64>().ok());
    let Ok(context) = Context::new(request_id, Arc::new(Config::default()), &headers) else {
        return;
    };
    assert_eq!(context.request_id, request_id);
    assert_eq!(Some(context.deadline), deadline_ms);

    let invocation = Invocation::from_context(&context);
    assert_eq!(invocation.request_id, request_id);
    match invocation.deadline {
        Some(deadline) => assert_eq!(epoch_ms(deadline), context.deadline),
        None => assert!(context.deadline == 0 || !representable(context.deadline)),
    }
    assert_eq!(LambdaEvent::new((), context).invocation(), invocation);
    phase_budget(invocation.deadline);
}

/// The header block of `runtime_headers`.
pub fn header_map(data: &[u8]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii_start());
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            headers.append(name, value);
        }
    }
    headers
}

/// The deadline → phase budget arithmetic (`Budget::new`): no overflow, and the phase ends
/// between now and the deadline minus the margin, the deadline capped at Lambda's longest
/// timeout (which is also the bound when the deadline is unknown).
fn phase_budget(deadline: Option<SystemTime>) {
    for margin in MARGINS {
        let (before, wall_before) = (Instant::now(), SystemTime::now());
        let end = deferred_core::__private::phase_end(deadline, margin);
        let (after, wall_after) = (Instant::now(), SystemTime::now());
        assert!(end >= before, "the phase ends before it starts");
        let unknown = before + MAX_FUNCTION_TIMEOUT;
        match deadline {
            None => assert!(unknown <= end && end <= after + MAX_FUNCTION_TIMEOUT),
            Some(deadline) => {
                let left = |wall| {
                    deadline
                        .duration_since(wall)
                        .unwrap_or(Duration::ZERO)
                        // No invocation outlives Lambda's longest timeout: capped.
                        .min(MAX_FUNCTION_TIMEOUT)
                        .saturating_sub(margin)
                };
                if let Some(latest) = after.checked_add(left(wall_before)) {
                    assert!(end <= latest, "the phase ends after the deadline");
                }
                let earliest = before.checked_add(left(wall_after)).unwrap_or(unknown);
                assert!(end >= earliest.min(unknown), "the phase ends too early");
            }
        }
    }
}

/// A deadline's epoch milliseconds; it must be a whole number of them.
fn epoch_ms(deadline: SystemTime) -> u64 {
    let since = deadline
        .duration_since(UNIX_EPOCH)
        .expect("a deadline before 1970");
    assert_eq!(
        since.subsec_nanos() % 1_000_000,
        0,
        "not whole milliseconds"
    );
    u64::try_from(since.as_millis()).expect("more milliseconds than a u64 holds")
}

/// Whether this platform's `SystemTime` can hold `ms` after the epoch.
fn representable(ms: u64) -> bool {
    UNIX_EPOCH.checked_add(Duration::from_millis(ms)).is_some()
}
