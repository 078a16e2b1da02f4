//! G1-G6 of DESIGN.md, proven on the emulator with the fixture function as a child process.

mod support;

use std::time::Duration;

use deferred_testkit::emulator::{EmulatorConfig, Fault, FaultMode};
use deferred_testkit::otlp::Behaviour;
use serde_json::json;
use support::{phase_end, start, trace_id};

fn config(timeout_s: u64) -> EmulatorConfig {
    EmulatorConfig {
        function_timeout: Duration::from_secs(timeout_s),
        ..EmulatorConfig::default()
    }
}

/// G1 for a router that calls a deferred handler several times in one invocation (once per
/// record, say), itself undecorated. With the runtime layer (`run`, or the layer on an own
/// `Runtime`) every call's actions join the invocation's one phase, after the response, in
/// call order. Under `start()` the phase begins when the first call returns, so a later call's
/// work runs inline: at once, not after a 1 s wait for an INVOKE event already taken, and
/// without a warning about a late event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g1_a_deferred_handler_called_twice_in_one_invocation() {
    for mode in ["run", "runtime", "start"] {
        let env = start(mode, config(10), &[]).await;
        let hit = env
            .invoke(json!({
                "actions": [{ "name": "a", "ms": 300 }],
                "again": [{ "actions": [{ "name": "b", "ms": 300 }] }],
            }))
            .await;
        assert!(hit.outcome.is_success(), "{mode}: {:?}", hit.outcome);
        let t = env.completed(&hit.request_id).await;
        let posted = t.response_posted.expect("posted");
        let mark = |m: &str| {
            t.mark(m)
                .unwrap_or_else(|| panic!("{mode}: no mark {m}: {:?}", t.marks))
        };
        let answered = posted - t.invoked;
        if mode == "start" {
            assert!(mark("end:b") <= posted, "{mode}: b inline");
            // b's 300 ms and a generous slack; a 1 s wait first would make it 1.3 s.
            assert!(
                answered < Duration::from_millis(1000),
                "{mode}: b's 300 ms, not a 1 s wait first: {answered:?}"
            );
        } else {
            // Generous for a loaded machine; waiting for a and b would take 600 ms.
            assert!(
                answered < Duration::from_millis(450),
                "{mode}: the response waited for deferred work: {answered:?}"
            );
            assert!(posted <= mark("start:a"), "{mode}");
            assert!(mark("end:a") <= mark("start:b"), "{mode}: in call order");
            let report = format!("deferred phase (Chained) of \"{}\"", hit.request_id);
            assert!(env.logged(&report).await, "{mode}");
            let reports = env.logs_matching(&report);
            assert_eq!(reports.len(), 1, "{mode}: one phase: {reports:#?}");
        }
        // Under `start`, `b` runs inline and may end after `a`'s phase: before the response,
        // which holds the environment too.
        assert!(mark("end:a") <= phase_end(&t), "{mode}");
        assert!(mark("end:b") <= phase_end(&t).max(posted), "{mode}");
        let late = env.logs_matching("did not receive its INVOKE event in time");
        assert!(late.is_empty(), "{mode}: {late:#?}");
    }
}

/// G3 needs the layer outermost (added last), so that the invocation's span is closed when the
/// phase flushes. Added inside lambda_runtime's `TracingLayer`, the span races the flush and
/// often misses it: the core says so, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g3_a_layer_inside_the_tracing_layer_is_warned_about() {
    const WARNING: &str = "the DeferredLayer runs inside lambda_runtime's TracingLayer";
    for reversed in [true, false] {
        let flag = if reversed { "1" } else { "0" };
        let env = start("runtime", config(10), &[("FIXTURE_LAYERS_REVERSED", flag)]).await;
        for _ in 0..2 {
            let hit = env.invoke(json!({})).await;
            assert!(hit.outcome.is_success(), "{:?}", hit.outcome);
            env.completed(&hit.request_id).await;
        }
        if reversed {
            assert!(env.logged(WARNING).await);
            assert_eq!(env.logs_matching(WARNING).len(), 1, "once");
        } else {
            assert!(env.logs_matching(WARNING).is_empty());
        }
    }
}

/// G1: with a 2 s action and a stalled exporter, the caller gets the answer as fast as with no
/// deferred work; the work still happens, after the response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g1_caller_latency_excludes_deferred_work() {
    let env = start("run", config(10), &[("FLUSH_TIMEOUT_MS", "1000")]).await;
    // Warm up, and measure a handler with no deferred work and a healthy exporter.
    env.invoke(json!({})).await;
    let plain = env.invoke(json!({})).await;
    assert!(plain.outcome.is_success());
    env.completed(&plain.request_id).await;

    env.sink.set_behaviour(Behaviour::Stall);
    let loaded = env
        .invoke(json!({ "actions": [{ "name": "slow", "ms": 2000 }] }))
        .await;
    assert!(loaded.outcome.is_success(), "{:?}", loaded.outcome);
    // Generous for a loaded machine; a response that waited would take 2 s more.
    assert!(
        loaded.latency < plain.latency + Duration::from_millis(1000),
        "caller latency with deferred work {:?} vs without {:?}",
        loaded.latency,
        plain.latency
    );
    let timeline = env.completed(&loaded.request_id).await;
    let posted = timeline.response_posted.expect("response posted");
    let end = timeline.mark("end:slow").expect("the action ran");
    assert!(
        end >= posted + Duration::from_millis(1900),
        "the action ran after the response"
    );
    assert!(phase_end(&timeline) >= end);
    assert!(!timeline.timed_out);
    // The next invocation proceeds.
    env.sink.set_behaviour(Behaviour::Normal);
    assert!(env.invoke(json!({})).await.outcome.is_success());
}

/// G2: one `event/next` in flight at most, never while the phase runs, and N+1 only after N's
/// phase ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g2_event_next_is_chained_behind_the_phase() {
    let env = start("run", config(5), &[]).await;
    let mut ids = Vec::new();
    for _ in 0..15 {
        let result = env
            .invoke(json!({ "actions": [{ "name": "a", "ms": 20 }, { "name": "b", "ms": 20 }] }))
            .await;
        assert!(result.outcome.is_success());
        ids.push(result.request_id);
    }
    let mut previous_end = None;
    for id in &ids {
        let t = env.completed(id).await;
        let next = phase_end(&t);
        assert!(
            next >= t.mark("end:b").expect("b ran"),
            "event/next during the phase"
        );
        assert!(t.mark("start:a").expect("a ran") >= t.response_posted.expect("posted"));
        if let Some(previous) = previous_end {
            assert!(t.invoked >= previous, "N+1 started before N's phase ended");
        }
        previous_end = Some(next);
    }
    assert_eq!(
        env.emulator.stats().max_concurrent_event_next_per_extension,
        1
    );
}

/// G3: actions in queue order, then the flush, which carries the actions' spans and the
/// invocation's own spans, all delivered before the environment is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g3_actions_in_order_then_the_flush_with_every_span() {
    let env = start("run", config(5), &[]).await;
    let result = env
        .invoke(json!({ "actions": [
            { "name": "a", "ms": 30 }, { "name": "b", "ms": 1 }, { "name": "c", "ms": 10 }
        ] }))
        .await;
    let trace = trace_id(&result);
    let t = env.completed(&result.request_id).await;
    let at = |m: &str| t.mark(m).unwrap_or_else(|| panic!("mark {m}"));
    assert!(at("end:a") <= at("start:b"));
    assert!(at("end:b") <= at("start:c"));
    let spans = env.spans_before(&trace, phase_end(&t));
    let count = |name: &str| spans.iter().filter(|s| *s == name).count();
    assert_eq!(count("deferred-action"), 3, "{spans:?}");
    assert_eq!(count("handler-work"), 1, "{spans:?}");
    assert_eq!(
        count("Lambda runtime invoke"),
        1,
        "the invocation span: {spans:?}"
    );
}

/// G4: nothing holds the environment past the deadline minus the margin: a stalled exporter, a
/// hung action, an exporter that is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g4_stalled_exporter_and_hung_action_end_before_the_deadline() {
    // Default flush_timeout (10 s) on a 3 s function: the budget, not the timeout, bounds it.
    let env = start("run", config(3), &[("OTEL_EXPORTER_OTLP_TIMEOUT", "30000")]).await;
    env.sink.set_behaviour(Behaviour::Stall);
    let hung = env
        .invoke(json!({ "actions": [{ "name": "hang", "kind": "hang" }, { "name": "never" }] }))
        .await;
    assert!(hung.outcome.is_success());
    let t = env.completed(&hung.request_id).await;
    assert!(!t.timed_out, "the phase overran the deadline");
    assert!(phase_end(&t) < t.deadline - Duration::from_millis(50));
    assert!(
        t.mark("start:never").is_none(),
        "a cut action does not start"
    );
    assert!(env.logged("not run").await, "the cut is reported");
    // Released by the phase at its end, not by the chain's safety net (whose line comes
    // before the report it preempts, on the same stream).
    let net = env.safety_net_releases();
    assert!(net.is_empty(), "{net:#?}");

    // The next invocation proceeds, with the exporter still stalled.
    let next = env.invoke(json!({ "actions": [{ "name": "ok" }] })).await;
    assert!(next.outcome.is_success());
    let t = env.completed(&next.request_id).await;
    assert!(!t.timed_out);
    assert!(t.mark("end:ok").is_some());
    assert_eq!(env.emulator.stats().resets, 0);
}

/// G4 with an exporter that is down (nothing listens on its port): each phase ends within
/// `flush_timeout` (1 s) of the response, with a generous slack, and nothing is reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g4_exporter_down_does_not_hold_the_environment() {
    let sink = deferred_testkit::otlp::OtlpSink::start()
        .await
        .expect("sink");
    // A port with nothing listening: bind, note the port, close.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = format!("http://{}", dead.local_addr().expect("addr"));
    drop(dead);
    let env = support::start_with_endpoint(
        "run",
        config(3),
        &[("FLUSH_TIMEOUT_MS", "1000")],
        sink,
        &endpoint,
    )
    .await;
    for _ in 0..2 {
        let result = env.invoke(json!({ "actions": [{ "name": "a" }] })).await;
        assert!(result.outcome.is_success());
        let t = env.completed(&result.request_id).await;
        assert!(!t.timed_out);
        assert!(phase_end(&t) <= t.response_posted.expect("posted") + Duration::from_millis(1500));
    }
    assert_eq!(env.emulator.stats().resets, 0);
}

/// G5: a panicking or failing action does not stop later actions, the flush or the chain; a
/// handler that fails, panics or gets an undecodable event still gets its actions and flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g5_failures_do_not_stop_the_phase() {
    let env = start("run", config(5), &[]).await;
    let result = env
        .invoke(json!({ "actions": [
            { "name": "p", "kind": "panic" }, { "name": "e", "kind": "err" }, { "name": "after" }
        ] }))
        .await;
    let trace = trace_id(&result);
    let t = env.completed(&result.request_id).await;
    assert!(t.mark("end:after").is_some());
    assert_eq!(
        env.spans_before(&trace, phase_end(&t)).len(),
        5,
        "3 actions, handler, invocation"
    );
    assert!(env.logged("panicked after").await);
    assert!(env.logged("action e failed on purpose").await);

    for handler in ["err", "panic"] {
        let result = env
            .invoke(json!({ "handler": handler, "actions": [{ "name": handler }] }))
            .await;
        assert!(
            !result.outcome.is_success(),
            "{handler}: {:?}",
            result.outcome
        );
        let t = env.completed(&result.request_id).await;
        assert!(
            t.mark(&format!("end:{handler}")).is_some(),
            "{handler}: action ran"
        );
        assert!(
            t.mark(&format!("start:{handler}")).expect("ran") >= t.response_posted.expect("posted")
        );
        // And its flush: the phase report names the tracer provider's, done.
        let needle = format!("of {:?} took", result.request_id);
        let report = env
            .emulator
            .wait_for_log(move |l| l.contains(&needle), Duration::from_secs(10))
            .await
            .expect("a phase report");
        assert!(
            report.contains("flush tracer provider ok"),
            "{handler}: {report}"
        );
    }
}

/// G5 with both wirings: an event that does not deserialize never reaches the handler, yet the
/// invocation is closed with a flush (its spans are delivered) and the chain moves on quickly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g5_undecodable_event_is_flushed_and_released() {
    for mode in ["run", "start"] {
        let env = start(mode, config(5), &[]).await;
        let bad = env.emulator.invoke("not json at all").await;
        assert!(!bad.outcome.is_success());
        let t = env.completed(&bad.request_id).await;
        let held = phase_end(&t) - t.response_posted.expect("posted");
        assert!(held < Duration::from_secs(2), "{mode}: held {held:?}");
        let spans = env.sink.spans();
        assert!(
            spans
                .iter()
                .any(|s| s.name == "Lambda runtime invoke" && s.received_at <= phase_end(&t)),
            "{mode}: the invocation span of the failed event is flushed"
        );
        let good = env.invoke(json!({ "actions": [{ "name": "a" }] })).await;
        assert!(good.outcome.is_success(), "{mode}");
        assert!(
            env.completed(&good.request_id)
                .await
                .mark("end:a")
                .is_some(),
            "{mode}"
        );
    }
}

/// `start` + plain `lambda_runtime::run`: actions after the response, chain kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_mode_runs_actions_after_the_response() {
    let env = start("start", config(5), &[]).await;
    for _ in 0..3 {
        let result = env
            .invoke(json!({ "actions": [{ "name": "a", "ms": 800 }] }))
            .await;
        assert!(result.outcome.is_success());
        // Generous for a loaded machine; running `a` first would take 800 ms.
        assert!(
            result.latency < Duration::from_millis(500),
            "{:?}",
            result.latency
        );
        let t = env.completed(&result.request_id).await;
        assert!(phase_end(&t) >= t.mark("end:a").expect("ran"));
    }
    assert_eq!(
        env.emulator.stats().max_concurrent_event_next_per_extension,
        1
    );
}

/// G6: registration refused: the function still answers, and the deferred work runs inline,
/// before the response, so nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g6_refused_registration_falls_back_to_inline() {
    for (status, error_type) in [
        (403, "Extension.TooManyExtensions"),
        (500, "Extension.Unknown"),
    ] {
        let sink = deferred_testkit::otlp::OtlpSink::start()
            .await
            .expect("sink");
        let emulator = deferred_testkit::emulator::Emulator::start(config(5))
            .await
            .expect("emu");
        emulator.faults().inject(
            Fault::RegisterStatus {
                status,
                error_type: error_type.into(),
            },
            FaultMode::Persistent,
        );
        let spec = deferred_testkit::emulator::FunctionSpec::new(env!("CARGO_BIN_EXE_fixture"))
            .env("FIXTURE_MODE", "run")
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", sink.endpoint())
            .env("RUST_LOG", "info");
        emulator.spawn_function(spec).await.expect("init");
        let env = support::Env { emulator, sink };
        let result = env.invoke(json!({ "actions": [{ "name": "a" }] })).await;
        assert!(result.outcome.is_success());
        let trace = trace_id(&result);
        let t = env.completed(&result.request_id).await;
        let posted = t.response_posted.expect("posted");
        assert!(
            t.mark("end:a").expect("ran") <= posted,
            "inline: before the response"
        );
        assert!(
            env.spans_before(&trace, posted)
                .iter()
                .any(|s| s == "deferred-action"),
            "flushed before the response"
        );
        assert!(env.logged("extension registration failed").await);
        assert_eq!(env.logs_matching("extension registration failed").len(), 1);
    }
}
