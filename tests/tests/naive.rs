//! The naive design (spawn the flush, let the runtime ask for the next event at once) loses
//! spans under the emulator's freeze; the chained design delivers them in the same invocation.
//! This is what tells the two apart.

mod support;

use std::time::Duration;

use deferred_testkit::emulator::EmulatorConfig;
use deferred_testkit::otlp::Behaviour;
use serde_json::json;
use support::{start, trace_id};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn naive_spawned_flush_is_frozen_chained_flush_is_not() {
    for (mode, expect_delivered) in [("naive", false), ("run", true)] {
        let env = start(mode, EmulatorConfig::default(), &[]).await;
        // A realistic exporter: 300 ms per export.
        env.sink
            .set_behaviour(Behaviour::Slow(Duration::from_millis(300)));
        let result = env.invoke(json!({ "handler_ms": 5 })).await;
        assert!(result.outcome.is_success());
        let trace = trace_id(&result);
        let t = env.completed(&result.request_id).await;
        let complete = t.complete.expect("complete");
        let in_invocation = env.spans_before(&trace, complete);
        assert_eq!(
            !in_invocation.is_empty(),
            expect_delivered,
            "{mode}: {in_invocation:?}"
        );
        if mode == "naive" {
            // Give the escaped flush every chance to finish, were the process not frozen: it
            // does not, because the environment is frozen under it.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            assert!(t.frozen.is_some(), "the environment was frozen");
            assert!(
                env.timeline(&result.request_id)
                    .mark("naive-flushed")
                    .is_none()
            );
        }
    }
}
