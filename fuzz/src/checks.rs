//! The checks of the fuzz targets (issue 5, "Bad input"), one function per target. Each takes
//! the raw input, must not panic on any input, and asserts what the code under test promises
//! when it accepts the input.
//!
//! The fuzz targets (`fuzz/fuzz_targets/`, nightly, libFuzzer) call these functions, and so
//! does the corpus replay on stable, `deferred-core/tests/fuzz_corpus.rs`, which includes this
//! file with `#[path]`. So this file may use only what both builds have: `deferred_core`,
//! `lambda_runtime`, `http`, `serde_json` and `httparse` (a dependency of deferred-core).

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

/// The line's bounds on an answer (`line.rs`): an answer this long may be refused for its size.
const LINE_BOUND: usize = 16 * 1024;

/// Target `line_answers`: `data` is what the Runtime API sends on the chain's own `event/next`
/// connection (`deferred-core/src/extension/line.rs`) before it closes it; its first byte
/// chooses how the rest is cut into reads ([`reads`]).
///
/// The line's reader must read every answer or fail with `Malformed` or `Transport`, never
/// panic or wait for bytes it has, and stop after an error or an answer that ends the
/// connection. Each answer it reads is checked against [`frame`], RFC 9112's framing written
/// out again: it must be the answer that `frame` finds where the previous one ended (status,
/// body, persistence, and its end in the bytes). An answer that `frame` finds whole may be
/// refused only if it is longer than the line's bounds.
pub fn line_answers(data: &[u8]) {
    let Some((&split, stream)) = data.split_first() else {
        return;
    };
    let answers = deferred_core::__private::line_answers(&reads(stream, split))
        .expect("the reader waited for bytes it had been given (a hang)");
    assert!(!answers.is_empty(), "no answer and no error");
    let mut start = 0;
    for (i, answer) in answers.iter().enumerate() {
        let last = i + 1 == answers.len();
        let expected = frame(&stream[start..]);
        match answer {
            Err(error) => {
                assert!(last, "read on after an error");
                assert!(
                    matches!(error, ClientError::Malformed(_) | ClientError::Transport(_)),
                    "{error:?}"
                );
                assert!(!error.to_string().is_empty());
                if let Framed::Answer { len, .. } = expected {
                    assert!(
                        len > LINE_BOUND,
                        "refused a well-formed answer of {len} bytes: {error}"
                    );
                }
            }
            Ok((status, body, keep, end)) => {
                let Framed::Answer {
                    status: framed_status,
                    body: framed_body,
                    keep: framed_keep,
                    len,
                } = expected
                else {
                    panic!("accepted an answer that is {expected:?}: {status} {body:?}");
                };
                assert_eq!(*status, framed_status);
                assert_eq!(*body, framed_body, "the body is not the framed bytes");
                assert_eq!(*keep, framed_keep, "persistence");
                assert_eq!(*end, start + len, "the answer does not end where framed");
                assert!(*keep || last, "read on after the connection's last answer");
                start = *end;
            }
        }
    }
}

/// `stream` cut into the reads that return it: one read for `split` 0, else reads of 1 to
/// 2^(`split` % 12) bytes, their lengths drawn from a generator seeded with `split`
/// (`'0'`: one byte per read, `'~'`: up to 64).
pub fn reads(stream: &[u8], split: u8) -> Vec<&[u8]> {
    if split == 0 {
        return vec![stream];
    }
    let max = 1usize << (split % 12);
    let mut state = u32::from(split);
    let mut reads = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let len = (1 + (state >> 16) as usize % max).min(rest.len());
        let (read, after) = rest.split_at(len);
        reads.push(read);
        rest = after;
    }
    reads
}

/// What [`frame`] finds at the start of the bytes.
#[derive(Debug)]
pub enum Framed {
    /// A whole answer, `len` bytes with the blank lines and interim answers before it.
    Answer {
        status: u16,
        body: Vec<u8>,
        keep: bool,
        len: usize,
    },
    /// An answer that must be refused.
    Refused,
    /// The bytes end before the answer does.
    Incomplete,
}

/// The next answer in `bytes`, framed as RFC 9112 says, with the line's choices where the RFC
/// leaves one: blank lines before it and interim (1xx) answers are read past, a 101 is refused,
/// each `Content-Length` value (a list element too) must be 1*DIGIT and agree with any other
/// unless a chunking frames the body, a `Transfer-Encoding` must be `chunked` alone (the line
/// decodes no other coding) in HTTP/1.1, `Connection: close` or an HTTP/1.0 answer without
/// `keep-alive` ends the connection, as do a body framed by the close and an answer with both
/// a `Transfer-Encoding` and a `Content-Length`.
/// The head, chunk sizes and trailers are lexed by httparse, as the line does.
pub fn frame(bytes: &[u8]) -> Framed {
    let mut at = bytes
        .iter()
        .take_while(|b| matches!(b, b'\r' | b'\n'))
        .count();
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 100];
        let mut response = httparse::Response::new(&mut headers);
        let head = match response.parse(&bytes[at..]) {
            Ok(httparse::Status::Complete(head)) => head,
            Ok(httparse::Status::Partial) => return Framed::Incomplete,
            Err(_) => return Framed::Refused,
        };
        at += head;
        let Some(status) = response.code else {
            return Framed::Refused;
        };
        if status == 101 {
            return Framed::Refused;
        }
        if (100..200).contains(&status) {
            continue;
        }
        let values = |name: &'static str| {
            response
                .headers
                .iter()
                .filter(move |h| h.name.eq_ignore_ascii_case(name))
                .map(|h| h.value)
        };
        // Every value of every field, each element of a list ("94, 94") one value (RFC 9110,
        // 8.6); all must be 1*DIGIT and agree, which matters only without a chunking.
        let mut lengths = Vec::new();
        let mut bad_length = false;
        for value in values("content-length") {
            for element in value.split(|&b| b == b',') {
                let element = element.trim_ascii();
                let digits = !element.is_empty() && element.iter().all(u8::is_ascii_digit);
                match std::str::from_utf8(element)
                    .ok()
                    .and_then(|v| v.parse::<usize>().ok())
                {
                    Some(length) if digits => lengths.push(length),
                    _ => bad_length = true,
                }
            }
        }
        bad_length |= lengths.windows(2).any(|pair| pair[0] != pair[1]);
        let chunked = values("transfer-encoding").next().is_some();
        let codings: Vec<&[u8]> = values("transfer-encoding").flat_map(elements).collect();
        let only_chunked =
            matches!(codings.as_slice(), [coding] if coding.eq_ignore_ascii_case(b"chunked"));
        if chunked && (!only_chunked || response.version != Some(1)) {
            return Framed::Refused;
        }
        // The chunking overrides the length, whatever its value (RFC 9112, 6.3).
        if bad_length && !chunked {
            return Framed::Refused;
        }
        let options: Vec<&[u8]> = values("connection").flat_map(elements).collect();
        let option = |name: &[u8]| options.iter().any(|o| o.eq_ignore_ascii_case(name));
        let rest = &bytes[at..];
        let (body, len, by_close) = if status == 204 || status == 304 {
            (Vec::new(), 0, false)
        } else if chunked {
            match dechunk(rest) {
                Ok((body, len)) => (body, len, false),
                Err(framed) => return framed,
            }
        } else if let Some(&length) = lengths.first() {
            let Some(body) = rest.get(..length) else {
                return Framed::Incomplete;
            };
            (body.to_vec(), length, false)
        } else {
            (rest.to_vec(), rest.len(), true)
        };
        let framed_both_ways = chunked && values("content-length").next().is_some();
        let keep = !option(b"close")
            && (response.version == Some(1) || option(b"keep-alive"))
            && !by_close
            && !framed_both_ways;
        return Framed::Answer {
            status,
            body,
            keep,
            len: at + len,
        };
    }
}

/// A chunked body at the start of `bytes`: its data and its length with the last chunk and the
/// trailers.
fn dechunk(bytes: &[u8]) -> Result<(Vec<u8>, usize), Framed> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let (skip, size) = match httparse::parse_chunk_size(&bytes[at..]) {
            Ok(httparse::Status::Complete(chunk)) => chunk,
            Ok(httparse::Status::Partial) => return Err(Framed::Incomplete),
            Err(_) => return Err(Framed::Refused),
        };
        at += skip;
        if size == 0 {
            let mut trailers = [httparse::EMPTY_HEADER; 32];
            return match httparse::parse_headers(&bytes[at..], &mut trailers) {
                Ok(httparse::Status::Complete((len, _))) => Ok((body, at + len)),
                Ok(httparse::Status::Partial) => Err(Framed::Incomplete),
                Err(_) => Err(Framed::Refused),
            };
        }
        let size = usize::try_from(size).map_err(|_| Framed::Incomplete)?;
        let Some(chunk) = at.checked_add(size).and_then(|end| bytes.get(at..end)) else {
            return Err(Framed::Incomplete);
        };
        body.extend_from_slice(chunk);
        at += size;
        match bytes.get(at..at + 2) {
            Some(b"\r\n") => at += 2,
            Some(_) => return Err(Framed::Refused),
            None => return Err(Framed::Incomplete),
        }
    }
}

/// The elements of a comma-separated field value, empty ones left out (RFC 9110, 5.6.1).
fn elements(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|element| !element.is_empty())
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
