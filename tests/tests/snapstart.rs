//! SnapStart: the fixture function runs under `AWS_LAMBDA_INITIALIZATION_TYPE=snap-start`, its
//! init ends in a snapshot (the emulator freezes it while its runtime waits in
//! `/restore/next` and its extension in `event/next`), and the first invocation restores it.
//! Whatever the restore does to the `event/next` in flight at the snapshot, the invocations
//! after it are chained: actions after the response, spans flushed before the environment is
//! released, exactly one `event/next` accepted at a time, no hang.

mod support;

use std::time::Duration;

use deferred_testkit::emulator::{
    Emulator, EmulatorConfig, Fault, FunctionSpec, Restore, RestoredConnections,
};
use deferred_testkit::otlp::OtlpSink;
use serde_json::json;
use support::{Env, phase_end, start, trace_id};

fn config(connections: RestoredConnections) -> EmulatorConfig {
    EmulatorConfig {
        function_timeout: Duration::from_secs(5),
        snap_start: true,
        restored_connections: connections,
        ..EmulatorConfig::default()
    }
}

/// The one restore of this environment.
fn the_restore(env: &Env) -> Restore {
    let restores = env.emulator.restores();
    assert_eq!(restores.len(), 1, "{restores:?}");
    restores[0].clone()
}

/// The extension's name (`lambda-deferred-<pid>`).
fn extension(env: &Env) -> String {
    let names = env.emulator.extensions();
    assert_eq!(names.len(), 1, "{names:?}");
    names[0].clone()
}

/// Invokes three times with an action each, and checks every invocation is chained: the
/// answer comes without the deferred work, the action runs after the response and before the
/// extension's next `event/next`, the invocation's spans are exported before that, and the
/// invocation completes without reaching its deadline.
async fn assert_chained_invocations(env: &Env) {
    assert_invocations(env, false).await;
}

/// [`assert_chained_invocations`] after a restore that left the pre-snapshot `event/next`
/// dead (`Close`, `Blackhole`). Lambda's Runtime API server does not notice: the extension
/// stays Ready, the probe is refused, and the first INVOKE event is written to the dead call
/// and lost (what the emulator models, as RAPID does). The first invocation cannot be chained:
/// its action still runs, before the runtime's next `/next` (nothing lost, nothing frozen
/// under it), and it is not held to its deadline; the two after it are chained.
async fn assert_chained_after_a_lost_first_event(env: &Env) {
    assert_invocations(env, true).await;
}

async fn assert_invocations(env: &Env, first_lost: bool) {
    for i in 0..3 {
        let result = env
            .invoke(json!({ "actions": [{ "name": "a", "ms": 300 }] }))
            .await;
        assert!(result.outcome.is_success(), "#{i}: {:?}", result.outcome);
        let trace = trace_id(&result);
        let t = env.completed(&result.request_id).await;
        assert!(!t.timed_out, "#{i}: held to its deadline");
        if first_lost && i == 0 {
            assert_eq!(t.extension_lost.len(), 1, "the first event is lost: {t:?}");
            assert!(t.extension_invoke.is_empty(), "{t:?}");
            let end = t.mark("end:a").expect("the action ran");
            let next = t
                .runtime_next
                .expect("the runtime asked for the next invocation");
            assert!(
                end <= next,
                "the action ran before the runtime's next /next"
            );
            // (Under `Close` the chain's retries run beside that work, which runs inline: the
            // one Lambda accepts once the event is lost may come while it runs; the runtime,
            // which has not answered yet, holds the environment.)
            continue;
        }
        let posted = t.response_posted.expect("posted");
        // No wait for a missing INVOKE event (1 s) on the response path (a generous bound for
        // a loaded machine); no inline work either: the action starts after the response.
        assert!(
            posted - t.invoked < Duration::from_millis(700),
            "#{i}: answered after {:?}",
            posted - t.invoked
        );
        let start = t.mark("start:a").expect("the action ran");
        let end = t.mark("end:a").expect("the action ended");
        assert!(start >= posted, "#{i}: the action ran before the response");
        let released = phase_end(&t);
        assert!(released >= end, "#{i}: event/next before the action ended");
        let spans = env.spans_before(&trace, released);
        assert!(
            spans.iter().any(|s| s == "deferred-action")
                && spans.iter().any(|s| s == "handler-work"),
            "#{i}: spans flushed before the release: {spans:?}"
        );
    }
    assert_eq!(
        env.emulator.stats().max_concurrent_event_next_per_extension,
        1
    );
}

/// The hard case: the `event/next` in flight at the snapshot is dead and silent after the
/// restore (never answered, never closed). Lambda still counts it (the extension stays
/// Ready), so the probe is refused and looks like a surviving call; the first INVOKE event is
/// written to the dead call and lost. The SnapStart resource of `Deferred::run` keeps the old
/// call only until an invocation runs without its event: then it is taken for dead and a
/// fresh call (accepted now) replaces it, after that invocation's work, so the environment is
/// not held to the deadline. (Before, the chain waited on the dead call for good.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_dead_event_next_is_replaced_after_the_restore() {
    let env = start("run", config(RestoredConnections::Blackhole), &[]).await;
    let stats = env.emulator.stats();
    assert_eq!((stats.snapshots, stats.restores), (1, 0), "{stats:?}");
    let name = extension(&env);

    assert_chained_after_a_lost_first_event(&env).await;

    let restore = the_restore(&env);
    assert_eq!(restore.cut_calls, vec![format!("event/next {name}")]);
    assert!(restore.error.is_none(), "{restore:?}");
    let ready = restore.runtime_ready.expect("the restore phase ended");
    let first = env.emulator.timelines()[0].clone();
    // The probe was refused (the dead call still counts), before the first /invocation/next;
    // no call was accepted before the first invocation.
    assert_eq!(restore.refused_event_next.len(), 1, "{restore:?}");
    assert!(restore.refused_event_next[0].1 <= ready, "{restore:?}");
    assert!(
        restore.event_next.iter().all(|(_, at)| *at > first.invoked),
        "{restore:?}"
    );
    // The refusal settles the restore at once.
    assert!(
        ready - restore.restored < Duration::from_secs(1),
        "{restore:?}"
    );
    // The replacing call went out only once the first invocation's work had ended.
    let end = first.mark("end:a").expect("the action ran");
    assert!(phase_end(&first) >= end, "{first:?}");
    assert!(env.logged("taken for dead").await);
}

/// What Lambda's Runtime API server does (its open-source code): the connection survives, the
/// pre-snapshot `event/next` is answered by the first invoke. The probe is refused (403
/// `Extension.InvalidExtensionState`), the old call is kept, nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_surviving_event_next_is_kept_after_the_restore() {
    let env = start("run", config(RestoredConnections::Survive), &[]).await;
    let name = extension(&env);

    assert_chained_invocations(&env).await;

    let restore = the_restore(&env);
    assert!(restore.cut_calls.is_empty(), "{restore:?}");
    let first = env.emulator.timelines()[0].clone();
    assert_eq!(
        restore
            .refused_event_next
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>(),
        vec![name.as_str()],
        "the probe was refused: {restore:?}"
    );
    assert!(
        restore.event_next.iter().all(|(_, at)| *at > first.invoked),
        "no event/next accepted between the restore and the first invocation: {restore:?}"
    );
    // The refusal settles the restore at once, without the probe window (timed in the unit
    // tests of deferred-core's snapstart.rs, on a paused clock).
    assert!(restore.runtime_ready.is_some(), "{restore:?}");
    assert_eq!(env.emulator.stats().refused_event_next_calls, 1);
    assert!(
        env.logged("the fresh call was refused); the chain keeps it")
            .await
    );
}

/// What init traced is flushed before the snapshot (`before_snapshot`), so it is exported once,
/// not again by every environment restored from the snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_telemetry_is_flushed_before_the_snapshot() {
    let env = start(
        "run",
        config(RestoredConnections::Survive),
        &[("FIXTURE_INIT_SPAN", "1")],
    )
    .await;
    // `start` returns once the snapshot is taken: the child is frozen.
    assert_eq!(env.emulator.stats().snapshots, 1);
    assert_eq!(
        env.sink.spans_named("init-work"),
        1,
        "init's span must be out before the snapshot"
    );
    let result = env.invoke(json!({})).await;
    env.completed(&result.request_id).await;
    assert_eq!(env.sink.spans_named("init-work"), 1, "exported once");
}

/// The connections are closed by the restore: the pre-snapshot call fails at once. Lambda
/// does not notice (the extension stays Ready): the chain's fresh calls are refused (403)
/// until the first INVOKE event has been written to the closed call, and lost; the next one
/// is accepted and ends the first invocation for the extension. That invocation's work runs
/// outside the chain (the chain is broken when its handler starts), the next ones are
/// chained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_event_next_is_replaced_after_the_restore() {
    let env = start("run", config(RestoredConnections::Close), &[]).await;
    let name = extension(&env);
    assert_chained_after_a_lost_first_event(&env).await;
    let restore = the_restore(&env);
    assert_eq!(restore.cut_calls, vec![format!("event/next {name}")]);
    // No call was accepted before the first invocation's event was lost: those that came
    // earlier were refused. (Whether any came earlier is a race between the chain's retry
    // after the closed call and the first invoke: either order is Lambda's.)
    let first = env.emulator.timelines()[0].clone();
    let lost = first.extension_lost[0].1;
    assert!(
        restore.event_next.iter().all(|(_, at)| *at >= lost),
        "{restore:?}"
    );
    assert!(
        restore.refused_event_next.iter().all(|(_, at)| *at < lost),
        "{restore:?}"
    );
}

/// `Deferred::start` with a `Runtime` built by hand that registers
/// `DeferredHandle::snapstart_resource()`: the same as `run` (a silently dead pre-snapshot
/// call loses the first event, and is replaced after that invocation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_own_runtime_with_the_resource_is_chained_after_the_restore() {
    let env = start("runtime", config(RestoredConnections::Blackhole), &[]).await;
    assert_chained_after_a_lost_first_event(&env).await;
    // The probe was refused: the dead pre-snapshot call still counted.
    assert_eq!(the_restore(&env).refused_event_next.len(), 1);
}

/// The negative check: the same function without the SnapStart resource, against a restore
/// that leaves the pre-snapshot `event/next` dead and silent. The chain waits on that call
/// for good: the first invocation's job waits for an INVOKE event that never comes (1 s, after
/// the response, in the layer), runs there, and the environment is then held until its
/// deadline, when Lambda (the emulator) resets it. This is the bug the resource fixes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_resource_a_dead_event_next_holds_the_environment_to_its_deadline() {
    let config = EmulatorConfig {
        function_timeout: Duration::from_secs(2),
        ..config(RestoredConnections::Blackhole)
    };
    let env = start("runtime", config, &[("FIXTURE_SNAPSTART_RESOURCE", "0")]).await;
    let result = env
        .invoke(json!({ "actions": [{ "name": "a", "ms": 100 }] }))
        .await;
    assert!(result.outcome.is_success(), "{:?}", result.outcome);
    let t = env.completed(&result.request_id).await;
    let posted = t.response_posted.expect("posted");
    let ran = t.mark("end:a").expect("the action ran");
    assert!(
        ran >= posted + Duration::from_millis(900),
        "not chained: the action ran once the layer stopped waiting for the event, after the \
         response: {:?}",
        ran - posted
    );
    assert!(
        posted - t.invoked < Duration::from_millis(500),
        "the response did not wait for the INVOKE event: {:?}",
        posted - t.invoked
    );
    assert!(t.timed_out, "the environment was held to the deadline");
    assert!(t.extension_next.is_empty(), "the chain never re-armed");
    assert_eq!(env.emulator.stats().timeouts, 1);
    let restore = the_restore(&env);
    assert!(restore.event_next.is_empty(), "{restore:?}");
    assert!(
        env.logged("the extension did not receive its INVOKE event in time")
            .await
    );
}

/// A registration answered after the register timeout: the extension only acknowledges events
/// (`late.rs`), its deferred work runs inline. Its `event/next` is in flight across the
/// snapshot too, and the restore leaves it dead and silent; Lambda still counts it, so the
/// probe is refused and the first INVOKE event is written to the dead call. The acknowledging
/// extension must call `event/next` again all the same: it holds nothing, so a lost event
/// costs nothing, but a call kept for good holds the first invocation to its deadline, and
/// Lambda resets the environment. (Before, it kept the dead call: the first invocation timed
/// out.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledging_extension_does_not_keep_a_dead_event_next_after_the_restore() {
    for connections in [
        RestoredConnections::Blackhole,
        RestoredConnections::Survive,
        RestoredConnections::Close,
    ] {
        acknowledging_after_a_restore(connections).await;
    }
}

async fn acknowledging_after_a_restore(connections: RestoredConnections) {
    let sink = OtlpSink::start().await.expect("sink");
    let emulator = Emulator::start(config(connections))
        .await
        .expect("emulator");
    emulator
        .faults()
        .always(Fault::RegisterAnswerDelay(Duration::from_millis(1500)));
    let spec = FunctionSpec::new(env!("CARGO_BIN_EXE_fixture"))
        .env("FIXTURE_MODE", "run")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", sink.endpoint())
        .env("OTEL_EXPORTER_OTLP_TIMEOUT", "1000")
        .env("RUST_LOG", "info")
        .env("REGISTER_TIMEOUT_MS", "300");
    emulator.spawn_function(spec).await.expect("function init");
    let env = Env { emulator, sink };
    assert!(
        env.logged("registration answered after the register timeout")
            .await
    );
    for i in 0..3 {
        let result = env
            .invoke(json!({ "actions": [{ "name": "a", "ms": 50 }] }))
            .await;
        let case = format!("{connections:?} #{i}");
        assert!(result.outcome.is_success(), "{case}: {:?}", result.outcome);
        let t = env.completed(&result.request_id).await;
        assert!(!t.timed_out, "{case}: held to its deadline: {t:?}");
        let posted = t.response_posted.expect("posted");
        assert!(t.mark("end:a").expect("ran") <= posted, "{case}: inline");
    }
    let stats = env.emulator.stats();
    assert_eq!(
        (stats.timeouts, stats.resets),
        (0, 0),
        "{connections:?}: {stats:?}"
    );
    assert_eq!(stats.max_concurrent_event_next_per_extension, 1);
}
