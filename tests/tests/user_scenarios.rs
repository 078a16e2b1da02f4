//! What a user writing ordinary functions with `#[deferred_handler]` and `defer!` sees, end to
//! end on the emulator with the fixture function.

mod support;

use std::time::Duration;

use deferred_testkit::emulator::EmulatorConfig;
use serde_json::json;
use support::{phase_end, start, trace_id};

fn config(timeout_s: u64) -> EmulatorConfig {
    EmulatorConfig {
        function_timeout: Duration::from_secs(timeout_s),
        ..EmulatorConfig::default()
    }
}

/// The invocation's span (`Lambda runtime invoke`, what a user's latency dashboards read) ends
/// with the invocation, not with its deferred actions: the actions run after the response, and
/// their own spans are children of it, but they do not stretch it to the phase's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_invocation_span_does_not_last_as_long_as_its_deferred_actions() {
    for mode in ["run", "start"] {
        let env = start(mode, config(10), &[]).await;
        let result = env
            .invoke(json!({ "actions": [{ "name": "slow", "ms": 800 }] }))
            .await;
        let trace = trace_id(&result);
        let done = env.completed(&result.request_id).await;
        assert!(phase_end(&done) - done.invoked >= Duration::from_millis(800));
        // It may go out with this flush or a later one: invoke again to be sure of it.
        let next = env.invoke(json!({})).await;
        env.completed(&next.request_id).await;
        let spans = env.sink.spans();
        let invoke = spans
            .iter()
            .find(|s| {
                s.name == "Lambda runtime invoke"
                    && s.attribute("requestId") == Some(&result.request_id)
            })
            .unwrap_or_else(|| panic!("{mode}: the invocation's span"));
        let action = spans
            .iter()
            .find(|s| s.name == "deferred-action" && s.trace_id.eq_ignore_ascii_case(&trace))
            .unwrap_or_else(|| panic!("{mode}: the action's span"));
        assert_eq!(
            action.parent_span_id.as_deref(),
            Some(invoke.span_id.as_str()),
            "{mode}: the action's span is in the invocation's trace"
        );
        let lasted = Duration::from_nanos(invoke.end_time_unix_nano - invoke.start_time_unix_nano);
        assert!(
            lasted < Duration::from_millis(400),
            "{mode}: the invocation's span lasted {lasted:?}: the 800 ms deferred action after \
             the response is counted in it"
        );
        env.emulator.shutdown().await;
    }
}
