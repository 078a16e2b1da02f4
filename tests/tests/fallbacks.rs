//! The fallbacks of DESIGN.md: a broken chain runs work inline and re-arms; Managed Instances
//! run work in the background; SIGTERM flushes within the grace period and exits 0.

mod support;

use std::time::Duration;

use deferred_testkit::emulator::{EmulatorConfig, Fault, InvokeOutcome};
use serde_json::json;
use support::{Env, phase_end, start, trace_id};

fn config() -> EmulatorConfig {
    EmulatorConfig {
        function_timeout: Duration::from_secs(5),
        ..EmulatorConfig::default()
    }
}

/// `event/next` fails or answers something unusable: the invocation's work runs outside the
/// chain (nothing lost) but still before the runtime asks for the next invocation, so the
/// environment is not frozen under it: inline before the response when the wrapper already
/// knows the chain is broken, or in the layer right after the response when the failure comes
/// second (the job was parked for its event). The chain re-arms for the next invocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_event_next_runs_inline_then_the_chain_re_arms() {
    for fault in [
        Fault::EventNextStatus(500),
        Fault::EventNextMalformedBody,
        Fault::EventNextUnknownEventType,
        Fault::EventNextWrongRequestId,
        Fault::EventNextCloseMidBody,
    ] {
        let env = start("run", config(), &[]).await;
        env.emulator.faults().once(fault.clone());
        let hit = env.invoke(json!({ "actions": [{ "name": "a" }] })).await;
        assert!(hit.outcome.is_success(), "{fault:?}: {:?}", hit.outcome);
        let t = env.completed(&hit.request_id).await;
        assert!(!t.timed_out, "{fault:?}");
        let ran = t
            .mark("end:a")
            .unwrap_or_else(|| panic!("{fault:?}: the action was lost"));
        assert!(
            ran <= t
                .runtime_next
                .expect("the runtime asked for the next invocation"),
            "{fault:?}: outside the chain, before the runtime's next /next"
        );
        assert!(
            hit.latency < Duration::from_millis(900),
            "{fault:?}: the failure is not waited out ({:?})",
            hit.latency
        );

        // Re-armed: the next invocations are chained again.
        for _ in 0..2 {
            let next = env
                .invoke(json!({ "actions": [{ "name": "b", "ms": 50 }] }))
                .await;
            assert!(next.outcome.is_success(), "{fault:?}");
            let t = env.completed(&next.request_id).await;
            let b = t.mark("start:b").expect("b ran");
            assert!(
                b >= t.response_posted.expect("posted"),
                "{fault:?}: chained again"
            );
            assert!(
                phase_end(&t) >= t.mark("end:b").expect("b ended"),
                "{fault:?}"
            );
        }
        assert_eq!(
            env.emulator.stats().max_concurrent_event_next_per_extension,
            1,
            "{fault:?}"
        );
        // One phase, one report: an INVOKE event that a retried `event/next` still brings
        // after the inline phase is released, not given a flush-only phase of its own.
        let reports = env.logs_matching(&format!(
            "deferred phase (Inline) of \"{}\"",
            hit.request_id
        ));
        let all = env.logs_matching(&format!(") of \"{}\"", hit.request_id));
        assert_eq!((reports.len(), all.len()), (1, 1), "{fault:?}: {all:#?}");
    }
}

/// Without the layer (`start`), the wrapper waits (briefly) after the body for the INVOKE event.
/// When the `event/next` call that carried it fails and the event is lost with it, the wait
/// must end with the failure, not run to its 1 s cap. Here the failed answer comes 30 ms into
/// the handler (so the wrapper is waiting for the event by then), and the handler takes longer
/// than that plus the chain's first backoff, so the chain is armed again (waiting for the next
/// event) by the time the wrapper looks. The work then runs inline, the invocation is reported once, and the chain
/// serves the next invocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_start_a_lost_invoke_event_does_not_hold_the_response() {
    for fault in [
        Fault::EventNextCloseMidBody,
        Fault::EventNextMalformedBody,
        Fault::EventNextUnknownEventType,
    ] {
        let env = start("start", config(), &[]).await;
        env.emulator
            .faults()
            .once(Fault::EventNextAnswerDelay(Duration::from_millis(30)));
        env.emulator.faults().once(fault.clone());
        let hit = env
            .invoke(json!({ "handler_ms": 100, "actions": [{ "name": "a" }] }))
            .await;
        assert!(hit.outcome.is_success(), "{fault:?}: {:?}", hit.outcome);
        let t = env.completed(&hit.request_id).await;
        let answered = t.response_posted.expect("posted") - t.invoked;
        // The handler's 100 ms, plus a generous slack; waiting the event out takes 1 s more.
        assert!(
            answered < Duration::from_millis(600),
            "{fault:?}: the response waited {answered:?}"
        );
        let ran = t.mark("end:a").expect("the action ran");
        assert!(
            ran <= t.response_posted.expect("posted"),
            "{fault:?}: inline"
        );
        assert!(
            env.logged(&format!(
                "deferred phase (Inline) of \"{}\"",
                hit.request_id
            ))
            .await,
            "{fault:?}"
        );
        chained_again_after(&env, &hit.request_id, &fault).await;
    }
}

/// After an invocation whose INVOKE event was lost: the next one is chained again, and the
/// lost one was reported once (its inline phase; the event, should it still come, gets none).
async fn chained_again_after(env: &Env, lost: &str, fault: &Fault) {
    let next = env
        .invoke(json!({ "actions": [{ "name": "b", "ms": 50 }] }))
        .await;
    let t = env.completed(&next.request_id).await;
    assert!(
        phase_end(&t) >= t.mark("end:b").expect("b ended"),
        "{fault:?}"
    );
    assert!(
        env.logged(&format!(
            "deferred phase (Chained) of \"{}\"",
            next.request_id
        ))
        .await,
        "{fault:?}: the next invocation is chained again"
    );
    let reports = env.logs_matching(&format!(") of \"{lost}\""));
    assert_eq!(reports.len(), 1, "{fault:?}: {reports:#?}");
}

/// The same loss, but before the handler starts (a slow middleware in front of it): the chain
/// has failed, backed off and re-armed by then, so nothing is left for the wrapper to see
/// waiting on. The failed call said it lost an event, and the first handler to start without
/// its event is that event's. Under `start` its work runs inline at once instead of after a 1 s
/// wait on the response path; under `run` it runs right after the response instead of after a
/// 1 s wait that holds the environment. The next invocation is chained again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invoke_event_lost_before_the_handler_is_not_waited_for() {
    for mode in ["start", "run"] {
        for fault in [
            Fault::EventNextCloseMidBody,
            Fault::EventNextMalformedBody,
            Fault::EventNextUnknownEventType,
        ] {
            let env = start(mode, config(), &[("HANDLER_START_DELAY_MS", "150")]).await;
            env.emulator.faults().once(fault.clone());
            let hit = env.invoke(json!({ "actions": [{ "name": "a" }] })).await;
            assert!(
                hit.outcome.is_success(),
                "{mode} {fault:?}: {:?}",
                hit.outcome
            );
            let t = env.completed(&hit.request_id).await;
            let posted = t.response_posted.expect("posted");
            let next = t.runtime_next.expect("the runtime asked for the next one");
            // The 150 ms delay, plus a generous slack; waiting the event out takes 1 s more.
            let answered = posted - t.invoked;
            assert!(
                answered < Duration::from_millis(700),
                "{mode} {fault:?}: the response waited {answered:?}"
            );
            let ran = t.mark("end:a").expect("the action ran");
            if mode == "start" {
                assert!(ran <= posted, "{mode} {fault:?}: inline");
            } else {
                assert!(
                    posted <= ran && ran <= next,
                    "{mode} {fault:?}: after the response, before the next /next"
                );
                assert!(
                    next - posted < Duration::from_millis(500),
                    "{mode} {fault:?}: the environment was held {:?} after the response",
                    next - posted
                );
            }
            chained_again_after(&env, &hit.request_id, &fault).await;
        }
    }
}

/// A lost event whose handler had already started (the `event/next` call that would have
/// brought it answered 500: the event is lost, as in RAPID, and the retry waits for the next
/// one) is not taken for the next invocation's: that one, whose handler starts before its own
/// event arrives, is chained as usual, not run inline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_start_a_loss_after_its_handler_started_is_not_the_next_invocations() {
    let env = start("start", config(), &[]).await;
    env.emulator.faults().once(Fault::EventNextStatus(500));
    let hit = env
        .invoke(json!({ "handler_ms": 100, "actions": [{ "name": "a" }] }))
        .await;
    assert!(hit.outcome.is_success(), "{:?}", hit.outcome);
    env.completed(&hit.request_id).await;
    // The next handler starts before its event reaches the extension.
    env.emulator
        .faults()
        .once(Fault::EventNextAnswerDelay(Duration::from_millis(30)));
    let next = env
        .invoke(json!({ "actions": [{ "name": "b", "ms": 1000 }] }))
        .await;
    let t = env.completed(&next.request_id).await;
    assert!(
        env.logged(&format!(
            "deferred phase (Chained) of \"{}\"",
            next.request_id
        ))
        .await,
        "{:#?}",
        env.logs_matching("deferred")
    );
    // The event's 30 ms, plus a generous slack; run inline, `b` would take 1 s.
    let answered = t.response_posted.expect("posted") - t.invoked;
    assert!(
        answered < Duration::from_millis(600),
        "the response waited for the action: {answered:?}"
    );
}

/// A handler future dropped mid-body (a timeout layer of the user's around the handler), before
/// the extension's copy of its INVOKE event arrived: its queued action still runs in the
/// invocation's chained phase, which holds the environment until it is done (before, under
/// `start()`, it ran as a loose background task while the event was released at once, so
/// Lambda could freeze it). With the layer, the job is parked for its event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_future_dropped_before_its_event_still_runs_its_work_chained() {
    for mode in ["start", "runtime"] {
        let env = start(mode, config(), &[("HANDLER_TIMEOUT_MS", "200")]).await;
        // Well within the layer's 1 s wait for a parked job's event.
        env.emulator
            .faults()
            .once(Fault::EventNextAnswerDelay(Duration::from_millis(700)));
        let hit = env
            .invoke(json!({ "handler": "hang", "actions": [{ "name": "a", "ms": 300 }] }))
            .await;
        assert!(
            !hit.outcome.is_success(),
            "{mode}: the timeout is the invocation's error: {:?}",
            hit.outcome
        );
        let t = env.completed(&hit.request_id).await;
        let posted = t.response_posted.expect("the error was posted");
        // The handler's 200 ms, plus a generous slack; waiting for the event takes 700 ms.
        assert!(
            posted - t.invoked < Duration::from_millis(500),
            "{mode}: the error waited {:?} for the late event",
            posted - t.invoked
        );
        let ran = t.mark("end:a").expect("the dropped handler's action ran");
        assert!(
            phase_end(&t) >= ran,
            "{mode}: the environment was released before the action ended"
        );
        assert!(
            env.logged(&format!(
                "deferred phase (Chained) of \"{}\"",
                hit.request_id
            ))
            .await,
            "{mode}: {:#?}",
            env.logs_matching(&hit.request_id)
        );
        assert!(env.invoke(json!({})).await.outcome.is_success(), "{mode}");
    }
}

/// A handler future dropped while its deferred work runs inline (the extension's INVOKE event
/// came too late, so the work runs before the response, and a timeout around the handler fires
/// during it): the action it was running, the actions not yet run, and the flush are handed
/// over to a phase of their own rather than lost with the future, and still run one at a time:
/// `b` only once `a` is over. That phase runs loose (the invocation is over), so Lambda may
/// freeze it: it finishes after the next thaw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_future_dropped_during_its_inline_phase_hands_the_rest_over() {
    let env = start("start", config(), &[("HANDLER_TIMEOUT_MS", "1300")]).await;
    // Past the wrapper's 1 s wait: the work runs inline, from about 1 s in.
    env.emulator
        .faults()
        .once(Fault::EventNextAnswerDelay(Duration::from_millis(1600)));
    let hit = env
        .invoke(json!({ "actions": [{ "name": "a", "ms": 600 }, { "name": "b" }] }))
        .await;
    assert!(!hit.outcome.is_success(), "timed out: {:?}", hit.outcome);
    env.completed(&hit.request_id).await;
    // The invocation is over when the late event is released (1.6 s), and Lambda freezes
    // the function, before `a` (due at 1.6 s) and `b` could finish: the next invocation thaws
    // it for long enough.
    assert!(
        env.invoke(json!({ "handler_ms": 500 }))
            .await
            .outcome
            .is_success()
    );
    assert!(
        env.logged(&format!(
            "deferred phase (Background) of \"{}\"",
            hit.request_id
        ))
        .await,
        "{:#?}",
        env.logs_matching(&hit.request_id)
    );
    let t = env.timeline(&hit.request_id);
    let a = t
        .mark("end:a")
        .expect("a, running when the future was dropped, ended");
    let b = t
        .mark("start:b")
        .expect("b, queued after the running action, still ran");
    assert!(b >= a, "b ran beside a: {t:#?}");
}

/// Lambda Managed Instances: no INVOKE registration; work runs as background tasks after the
/// answer, one invocation's actions isolated from another's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_instances_run_deferred_work_in_the_background() {
    let env = start(
        "run",
        EmulatorConfig {
            managed_instances: Some(4),
            ..config()
        },
        &[],
    )
    .await;
    assert!(
        env.emulator.extensions().is_empty(),
        "no extension registered"
    );
    let result = env
        .invoke(json!({ "actions": [{ "name": "bg", "ms": 1000 }] }))
        .await;
    assert!(result.outcome.is_success());
    // Generous for a loaded machine; running `bg` first would take 1 s.
    assert!(
        result.latency < Duration::from_millis(600),
        "{:?}",
        result.latency
    );
    assert!(
        env.marked(&result.request_id, "end:bg").await,
        "the background action ran"
    );
    assert!(env.logged("Managed Instances").await);
}

/// SIGTERM: the final flush runs within Lambda's 500 ms grace for internal extensions, and the
/// process exits 0 by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_and_exits_within_the_grace_period() {
    let env = start("run", config(), &[]).await;
    let result = env.invoke(json!({})).await;
    let trace = trace_id(&result);
    env.completed(&result.request_id).await;
    let shutdown = env.emulator.shutdown().await;
    assert!(!shutdown.killed, "{shutdown:?}");
    assert!(
        shutdown.exit_status.expect("reaped").success(),
        "{shutdown:?}"
    );
    assert!(
        shutdown.duration < Duration::from_millis(500),
        "{shutdown:?}"
    );
    assert!(env.sink.spans_in_trace(&trace) > 0);
    env.assert_final_flush_ok("SIGTERM").await;
}

/// lambda_runtime's loop ends with an error (the answer does not serialize, so it cannot be
/// posted, and lambda_runtime stops): `run` (or `drain`, after an own loop) still lets the
/// failed invocation's action run and the final flush go out before the error is returned and
/// the process exits. (Before, `run` returned at once and the action died with the process,
/// unreported.) The action runs to its end, not to half of `shutdown_timeout` (200 ms) as on
/// SIGTERM: no kill is coming here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_loop_that_fails_still_runs_the_deferred_work() {
    // `run` drains by itself; with `start` and its own loop, the fixture calls `drain`.
    for mode in ["run", "start"] {
        let env = start(mode, config(), &[]).await;
        let result = env
            .invoke(json!({ "handler": "unserializable", "actions": [{ "name": "a", "ms": 600 }] }))
            .await;
        assert!(
            matches!(&result.outcome, InvokeOutcome::FunctionError { error_type, .. } if error_type == "Runtime.ExitError"),
            "{mode}: {:?}",
            result.outcome
        );
        if mode == "run" {
            assert!(
                env.logged("the Lambda runtime loop ended with an error")
                    .await
            );
        }
        env.assert_final_flush_ok(mode).await;
        let t = env.timeline(&result.request_id);
        assert!(t.mark("end:a").is_some(), "{mode}: the action ran: {t:?}");
        assert!(
            env.logs_matching("abandoned without a report").is_empty(),
            "{mode}: the phase ended on its own"
        );
        let cut = env.logs_matching("cut by shutdown");
        assert!(cut.is_empty(), "{mode}: {cut:#?}");
    }
}

/// An answer whose `Serialize` panics (an impl that unwraps): lambda_runtime serializes it in
/// its response layer, outside the guard that catches the handler's panics, so the panic goes
/// up through the `DeferredLayer`. The invocation's action and the flush must still run, as
/// for an answer whose serialization fails with an error (above). Before, the panic unwound
/// through the layer (which never said the response was out) and out of `run`: the process
/// died with its deferred work and its spans, unreported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_that_panics_as_it_serializes_still_runs_the_deferred_work() {
    let env = start("run", config(), &[]).await;
    let result = env
        .invoke(json!({ "handler": "paniconserialize", "actions": [{ "name": "a", "ms": 100 }] }))
        .await;
    assert!(
        matches!(&result.outcome, InvokeOutcome::FunctionError { error_type, .. } if error_type == "Runtime.ExitError"),
        "{:?}",
        result.outcome
    );
    let t = env.timeline(&result.request_id);
    assert!(t.mark("end:a").is_some(), "the action ran: {t:?}");
    assert!(
        env.logged("the Lambda runtime loop ended with an error")
            .await,
        "run drained before returning the error"
    );
    env.assert_final_flush_ok("an answer that panics as it serializes")
        .await;
}

/// An event whose decoding panics (a `Deserialize` impl that unwraps): lambda_runtime decodes
/// it in its response layer's `call`, outside its handler's panic guard, so the panic goes up
/// through the `DeferredLayer`'s `call`. The handler never runs, but as for an event that
/// fails to decode with an error the invocation still gets its flush (its span is delivered)
/// before the process exits. Before, the panic unwound out of `run`: no drain, no flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_that_panics_as_it_decodes_is_still_flushed() {
    let env = start("run", config(), &[]).await;
    let result = env.invoke(json!({ "decode_panics": true })).await;
    assert!(
        matches!(&result.outcome, InvokeOutcome::FunctionError { error_type, .. } if error_type == "Runtime.ExitError"),
        "{:?}",
        result.outcome
    );
    assert!(
        env.logged("the Lambda runtime loop ended with an error")
            .await,
        "run drained before returning the error"
    );
    assert!(
        env.sink
            .spans()
            .iter()
            .any(|s| s.name == "Lambda runtime invoke"),
        "the invocation's span is flushed"
    );
}

/// The same failed loop while a flusher is still busy from an earlier phase (a stalled
/// exporter, abandoned at its `flush_timeout`), with nothing else in flight: the final flush
/// stays within `shutdown_timeout` and the process exits well before the deadline, so Lambda
/// reports `Runtime.ExitError`. Before, the drain's final flush waited for the busy flusher
/// until the end of the last phase handed over (its deadline minus half the margin) plus half
/// of `shutdown_timeout`, past the deadline: the environment was held to the function timeout
/// and reset as a timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_loop_with_a_busy_flusher_exits_before_the_deadline() {
    for mode in ["run", "start"] {
        let env = start(
            mode,
            config(),
            &[("FLUSH_TIMEOUT_MS", "300"), ("FIXTURE_FLUSH_HANG", "1")],
        )
        .await;
        let first = env.invoke(json!({})).await;
        assert!(first.outcome.is_success(), "{mode}: {:?}", first.outcome);
        assert!(!env.completed(&first.request_id).await.timed_out, "{mode}");
        // The `hang` flusher was abandoned and still runs; now the loop fails.
        let failed = env.invoke(json!({ "handler": "unserializable" })).await;
        assert!(
            matches!(&failed.outcome, InvokeOutcome::FunctionError { error_type, .. } if error_type == "Runtime.ExitError"),
            "{mode}: the process did not exit before the deadline: {:?} after {:?}",
            failed.outcome,
            failed.latency
        );
        assert!(
            failed.latency < Duration::from_secs(2),
            "{mode}: the drain took {:?}",
            failed.latency
        );
        assert!(env.overran().is_empty(), "{mode}");
    }
}

/// A function that handles SIGTERM itself (`handle_sigterm(false)`), as the README says:
/// `DeferredHandle::shutdown`, then its own cleanup, then it returns from `main`.
///
/// After a flush that never returns was abandoned (a stalled exporter; it runs after the
/// tracer provider, so on a thread of its own, where it ran on the runtime's blocking pool
/// before), the function's own SIGTERM
/// handler calls `shutdown()` and returns from `main`. The process must then exit within
/// Lambda's 500 ms grace. Before, the runtime's drop waited for the abandoned blocking task
/// for ever, and the process was killed (SIGKILL) at the end of the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_sigterm_handler_exits_although_a_flush_was_abandoned() {
    let env = start(
        "start",
        config(),
        &[
            ("FLUSH_TIMEOUT_MS", "300"),
            ("FIXTURE_FLUSH_HANG_LAST", "1"),
            ("FIXTURE_OWN_SIGTERM", "1"),
        ],
    )
    .await;
    let hit = env.invoke(json!({})).await;
    assert!(hit.outcome.is_success(), "{:?}", hit.outcome);
    assert!(!env.completed(&hit.request_id).await.timed_out);
    assert!(env.logged("flush hang-last abandoned").await);
    let shutdown = env.emulator.shutdown().await;
    assert!(
        env.logged("own SIGTERM handler done").await,
        "the handler ran"
    );
    assert!(!shutdown.killed, "the process did not exit: {shutdown:?}");
    assert!(
        shutdown.exit_status.expect("reaped").success(),
        "{shutdown:?}"
    );
}

/// A failing exporter: the caller is unaffected, each failed flush is reported, and the
/// report counts consecutive failures (for alerting) until a flush succeeds again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_flushes_are_counted_until_one_succeeds() {
    let env = start("run", config(), &[]).await;
    env.sink
        .set_behaviour(deferred_testkit::otlp::Behaviour::Fail {
            status: 500,
            times: 1000,
        });
    for _ in 0..2 {
        let result = env.invoke(json!({ "actions": [{ "name": "a" }] })).await;
        assert!(result.outcome.is_success());
        env.completed(&result.request_id).await;
    }
    assert!(env.logged("consecutive_flush_failures=2").await);
    env.sink
        .set_behaviour(deferred_testkit::otlp::Behaviour::Normal);
    let result = env.invoke(json!({ "actions": [{ "name": "a" }] })).await;
    let trace = trace_id(&result);
    let t = env.completed(&result.request_id).await;
    assert!(!env.spans_before(&trace, phase_end(&t)).is_empty());
    // The success reset the count: the next failure is a first one again.
    env.sink
        .set_behaviour(deferred_testkit::otlp::Behaviour::Fail {
            status: 500,
            times: 1000,
        });
    let result = env.invoke(json!({ "actions": [{ "name": "a" }] })).await;
    env.completed(&result.request_id).await;
    let firsts = || env.logs_matching("consecutive_flush_failures=1").len();
    let waited = std::time::Instant::now();
    while firsts() < 2 && waited.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(firsts(), 2, "{:?}", env.logs_matching("consecutive_flush"));
    assert!(env.logs_matching("consecutive_flush_failures=3").is_empty());
}

/// Lambda Managed Instances with `run_concurrent` and `AWS_LAMBDA_MAX_CONCURRENCY=8`: eight
/// invocations at once, each answered at once, each one's actions run (in the background) on
/// its own queue, all drained on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_instances_serve_concurrent_invocations_with_isolated_queues() {
    let env = start(
        "concurrent",
        EmulatorConfig {
            managed_instances: Some(8),
            // No extension is registered, so Lambda's rule would give 0 ms: give the drain time.
            shutdown_grace: Some(Duration::from_millis(500)),
            ..config()
        },
        &[],
    )
    .await;
    let started = std::time::Instant::now();
    let mut calls = Vec::new();
    for i in 0..8 {
        let emulator = env.emulator.clone();
        let payload = json!({
            "handler_ms": 500,
            "actions": [{ "name": format!("own-{i}"), "ms": 100 }]
        });
        calls.push(tokio::spawn(async move {
            emulator.invoke(payload.to_string()).await
        }));
    }
    let mut results = Vec::new();
    for call in calls {
        results.push(call.await.expect("invoke task"));
    }
    // Eight 500 ms handlers served concurrently, not one after the other (4 s).
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );
    for result in &results {
        assert!(result.outcome.is_success(), "{:?}", result.outcome);
    }
    let ids: Vec<String> = results.iter().map(|r| r.request_id.clone()).collect();
    let all_ran = env
        .emulator
        .wait_until(Duration::from_secs(5), move |_, timelines| {
            ids.iter().all(|id| {
                timelines
                    .iter()
                    .find(|t| &t.request_id == id)
                    .is_some_and(|t| t.marks.iter().any(|(m, _)| m.starts_with("end:own-")))
            })
        })
        .await;
    assert!(all_ran, "every invocation's own action ran");
    // Isolation: each invocation ran exactly its own action, once.
    for t in env.emulator.timelines() {
        let ends: Vec<_> = t
            .marks
            .iter()
            .filter(|(m, _)| m.starts_with("end:"))
            .collect();
        assert_eq!(ends.len(), 1, "{}: {ends:?}", t.request_id);
    }
    // A mark names the invocation that deferred the action, not the phase that ran it: the
    // phase reports tell which queue each action ran from.
    for (i, result) in results.iter().enumerate() {
        let needle = format!("of {:?} took", result.request_id);
        let report = env
            .emulator
            .wait_for_log(
                move |l| l.contains("deferred phase") && l.contains(&needle),
                Duration::from_secs(5),
            )
            .await
            .expect("a phase report");
        let ran: Vec<&str> = report
            .match_indices("\"own-")
            .filter_map(|(at, _)| report[at + 1..].split('"').next())
            .collect();
        assert_eq!(ran, [format!("own-{i}")], "{report}");
    }
    let shutdown = env.emulator.shutdown().await;
    assert!(
        shutdown.exit_status.expect("reaped").success(),
        "{shutdown:?}"
    );
}

/// An `AWS_LAMBDA_RUNTIME_API` that is set but not text is reported as a broken endpoint
/// (deferred work then runs inline), not taken for "outside Lambda".
#[cfg(unix)]
#[test]
fn a_runtime_api_that_is_not_text_is_named_a_broken_endpoint() {
    use std::os::unix::ffi::OsStrExt as _;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fixture"))
        .env("FIXTURE_MODE", "start")
        .env(
            "AWS_LAMBDA_RUNTIME_API",
            std::ffi::OsStr::from_bytes(b"127.0.0.1:\xff"),
        )
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the fixture starts");
    // It stops by itself (lambda_runtime cannot run without the rest of Lambda's
    // environment); the bound only keeps a bug from hanging the test.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the fixture did not stop");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().expect("output");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(
        text.contains("bad AWS_LAMBDA_RUNTIME_API: not valid UTF-8"),
        "{text}"
    );
    assert!(!text.contains("not running in Lambda"), "{text}");
}

/// Outside Lambda (no `AWS_LAMBDA_RUNTIME_API`), an `AWS_LAMBDA_INITIALIZATION_TYPE` left
/// over from a Managed Instances environment (a copied `.env`, a shell) does not make deferred
/// work background tasks that nothing drains: it runs inline, as everywhere outside Lambda.
#[test]
fn outside_lambda_a_managed_instances_init_type_still_runs_inline() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_fixture"))
        .env("FIXTURE_MODE", "start")
        .env_remove("AWS_LAMBDA_RUNTIME_API")
        .env("AWS_LAMBDA_INITIALIZATION_TYPE", "lambda-managed-instances")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
        .env("RUST_LOG", "info")
        .output()
        .expect("the fixture runs");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(text.contains("not running in Lambda"), "{text}");
    assert!(!text.contains("Managed Instances"), "{text}");
}
