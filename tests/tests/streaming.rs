//! Response streaming (`lambda_runtime::StreamResponse`, function URLs in `RESPONSE_STREAM`
//! mode): the handler returns at once and a task writes the response afterwards. The deferred
//! phase must neither hold the stream back nor miss what it traced, and an error in the middle
//! of the stream must not cost the invocation its deferred work.

mod support;

use std::time::Instant;

use deferred_testkit::emulator::{EmulatorConfig, InvokeResult, Timeline};
use serde_json::json;
use support::{Env, phase_end};

/// lambda_runtime sends a streamed response as a JSON metadata prelude, eight NUL bytes, then
/// the stream itself: the prelude's status and the stream's text.
fn split(result: &InvokeResult) -> (serde_json::Value, String) {
    let body = result.outcome.body().expect("a successful invocation");
    let at = body
        .windows(8)
        .position(|w| w == [0; 8])
        .expect("the prelude's delimiter");
    let prelude = serde_json::from_slice(&body[..at]).expect("a JSON prelude");
    let text = String::from_utf8(body[at + 8..].to_vec()).expect("UTF-8 lines");
    (prelude, text)
}

/// The trace id the fixture writes as the stream's first line.
fn trace_id(text: &str) -> String {
    text.lines()
        .next()
        .and_then(|line| line.strip_prefix("trace_id "))
        .expect("the trace id line")
        .to_owned()
}

/// lambda_runtime's span of the invocation closes with the stream: the invocation's phase
/// must flush it, with the action's span.
fn assert_flushed(env: &Env, trace_id: &str, done: &Timeline) {
    let flushed = env.spans_before(trace_id, phase_end(done));
    for span in ["Lambda runtime invoke", "deferred-action"] {
        assert!(
            flushed.iter().any(|s| s == span),
            "{span} not in {flushed:?}"
        );
    }
}

fn mark(timeline: &Timeline, text: &str) -> Instant {
    timeline
        .mark(text)
        .unwrap_or_else(|| panic!("no mark {text:?} in {:?}", timeline.marks))
}

async fn start(mode: &str) -> Env {
    support::start(mode, EmulatorConfig::default(), &[]).await
}

#[tokio::test]
async fn with_run_the_phase_starts_once_the_stream_is_over_and_flushes_its_spans() {
    let env = start("run").await;
    let result = env
        .invoke(json!({
            "stream": { "chunks": 3, "ms": 40 },
            "actions": [{ "name": "audit", "ms": 20 }],
        }))
        .await;
    let (prelude, text) = split(&result);
    assert_eq!(prelude["statusCode"], 200);
    assert_eq!(
        text.lines().skip(1).collect::<Vec<_>>(),
        ["chunk 0", "chunk 1", "chunk 2"]
    );

    let done = env.completed(&result.request_id).await;
    let posted = done.response_posted.expect("response posted");
    // The response's POST lasts as long as the stream, and the layer's phase follows it.
    assert!(mark(&done, "stream-end") < posted);
    assert!(posted <= mark(&done, "start:audit"));
    assert!(mark(&done, "end:audit") <= phase_end(&done));
    assert_flushed(&env, &trace_id(&text), &done);
    assert_eq!(
        env.emulator.stats().max_concurrent_event_next_per_extension,
        1
    );
}

#[tokio::test]
async fn with_start_a_long_action_does_not_hold_the_stream_back() {
    let env = start("start").await;
    let result = env
        .invoke(json!({
            "stream": { "chunks": 3, "ms": 100 },
            "actions": [{ "name": "slow", "ms": 1000 }],
        }))
        .await;
    let (_, text) = split(&result);
    assert!(text.ends_with("chunk 2\n"), "{text:?}");

    let done = env.completed(&result.request_id).await;
    let posted = done.response_posted.expect("response posted");
    // The phase starts when the handler returns, beside the stream (300 ms): the caller has the
    // whole stream while the action (1 s) still runs, and Lambda is let go only after both.
    assert!(mark(&done, "start:slow") < posted);
    assert!(posted < mark(&done, "end:slow"));
    assert!(mark(&done, "end:slow") <= phase_end(&done));
    assert!(done.complete.expect("complete") >= phase_end(&done));
}

#[tokio::test]
async fn a_stream_that_fails_midway_still_gets_its_actions_and_flush() {
    let env = start("run").await;
    let result = env
        .invoke(json!({
            "stream": { "chunks": 2, "ms": 10, "fail": true },
            "actions": [{ "name": "audit", "ms": 10 }],
        }))
        .await;
    // lambda_runtime 1.5 writes the error into the stream as text, in the form of the error
    // trailers the Runtime API documents (`Lambda-Runtime-Function-Error-Type`).
    let (_, text) = split(&result);
    assert!(
        text.contains("Lambda-Runtime-Function-Error-Type: Runtime.StreamError"),
        "{text:?}"
    );

    let done = env.completed(&result.request_id).await;
    let posted = done.response_posted.expect("response posted");
    assert!(posted <= mark(&done, "start:audit"));
    assert!(mark(&done, "end:audit") <= phase_end(&done));
    assert_flushed(&env, &trace_id(&text), &done);

    // The environment goes on serving.
    let next = env.invoke(json!({})).await;
    assert!(next.outcome.body().is_some(), "{:?}", next.outcome);
}

/// A task writing the stream that panics drops its sender: lambda_runtime ends the stream
/// there, as if complete (it cannot tell, so no error trailer), and the invocation's actions
/// and flush still run after it, as for any stream.
#[tokio::test]
async fn a_stream_whose_writer_panics_still_gets_its_actions_and_flush() {
    let env = start("run").await;
    let result = env
        .invoke(json!({
            "stream": { "chunks": 2, "ms": 10, "panic": true },
            "actions": [{ "name": "audit", "ms": 10 }],
        }))
        .await;
    let (prelude, text) = split(&result);
    assert_eq!(prelude["statusCode"], 200);
    assert_eq!(
        text.lines().skip(1).collect::<Vec<_>>(),
        ["chunk 0", "chunk 1"],
        "{text:?}"
    );
    assert!(env.logged("the stream's writer panicked on purpose").await);

    let done = env.completed(&result.request_id).await;
    let posted = done.response_posted.expect("response posted");
    assert!(mark(&done, "stream-end") < posted);
    assert!(posted <= mark(&done, "start:audit"));
    assert!(mark(&done, "end:audit") <= phase_end(&done));
    assert_flushed(&env, &trace_id(&text), &done);

    // The environment goes on serving.
    let next = env.invoke(json!({})).await;
    assert!(next.outcome.body().is_some(), "{:?}", next.outcome);
    assert_eq!(env.emulator.stats().resets, 0);
}
