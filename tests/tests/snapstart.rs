//! SnapStart: the fixture function runs under `AWS_LAMBDA_INITIALIZATION_TYPE=snap-start`, its
//! init ends in a snapshot (the emulator freezes it while its runtime waits in
//! `/restore/next` and its extension in `event/next`), and the first invocation restores it.
//! Whatever the restore does to the `event/next` in flight at the snapshot, the invocations
//! after it are chained: actions after the response, spans flushed before the environment is
//! released, exactly one `event/next` accepted at a time, no hang.

mod support;

use std::time::Duration;

use deferred_testkit::emulator::{EmulatorConfig, Restore, RestoredConnections};
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
    for i in 0..3 {
        let result = env
            .invoke(json!({ "actions": [{ "name": "a", "ms": 300 }] }))
            .await;
        assert!(result.outcome.is_success(), "#{i}: {:?}", result.outcome);
        let trace = trace_id(&result);
        let t = env.completed(&result.request_id).await;
        assert!(!t.timed_out, "#{i}: held to its deadline");
        let posted = t.response_posted.expect("posted");
        // No inline work (300 ms) and no wait for a missing INVOKE event (1 s) on the
        // response path.
        assert!(
            posted - t.invoked < Duration::from_millis(250),
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
/// restore (never answered, never closed). The SnapStart resource of `Deferred::run`
/// abandons it and the fresh call is the one that gets the first INVOKE event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_dead_event_next_is_replaced_after_the_restore() {
    let env = start("run", config(RestoredConnections::Blackhole), &[]).await;
    let stats = env.emulator.stats();
    assert_eq!((stats.snapshots, stats.restores), (1, 0), "{stats:?}");
    let name = extension(&env);

    assert_chained_invocations(&env).await;

    let restore = the_restore(&env);
    assert_eq!(restore.cut_calls, vec![format!("event/next {name}")]);
    assert!(restore.error.is_none(), "{restore:?}");
    let ready = restore.runtime_ready.expect("the restore phase ended");
    let first = env.emulator.timelines()[0].clone();
    // Before the first invocation: exactly one fresh event/next (the probe), sent while the
    // runtime's after_restore hooks ran, i.e. before its first /invocation/next.
    let fresh: Vec<_> = restore
        .event_next
        .iter()
        .filter(|(_, at)| *at < first.invoked)
        .collect();
    assert_eq!(fresh.len(), 1, "{restore:?}");
    assert!(fresh[0].1 <= ready);
    assert!(restore.refused_event_next.is_empty(), "{restore:?}");
    // The probe window (200 ms) is what the silent call costs the restore.
    assert!(
        ready - restore.restored < Duration::from_secs(1),
        "{restore:?}"
    );
    assert!(env.logged("abandoned for a fresh one").await);
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
    assert!(env.logged("survived it; the chain keeps it").await);
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

/// The connections are closed by the restore: the pre-snapshot call fails at once and a fresh
/// one replaces it before the first invocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_event_next_is_replaced_after_the_restore() {
    let env = start("run", config(RestoredConnections::Close), &[]).await;
    let name = extension(&env);
    assert_chained_invocations(&env).await;
    let restore = the_restore(&env);
    assert_eq!(restore.cut_calls, vec![format!("event/next {name}")]);
    // One fresh call replaced it; it may reach the emulator just after the first invocation
    // was dispatched (the restore settles as soon as it is sent): the INVOKE event waits for
    // it, and it is the call that receives it.
    let first = env.emulator.timelines()[0].clone();
    let received = first.extension_invoke[0].1;
    let fresh = restore
        .event_next
        .iter()
        .filter(|(_, at)| *at <= received)
        .count();
    assert_eq!(fresh, 1, "{restore:?}");
}

/// `Deferred::start` with a `Runtime` built by hand that registers
/// `DeferredHandle::snapstart_resource()`: the same as `run`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_own_runtime_with_the_resource_is_chained_after_the_restore() {
    let env = start("runtime", config(RestoredConnections::Blackhole), &[]).await;
    assert_chained_invocations(&env).await;
    assert_eq!(the_restore(&env).refused_event_next.len(), 0);
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
