//! Diagnostic (ignored): the child's RSS growth per wiring, to tell the library's share of
//! the growth seen in the soak from the runtime's and the SDK's. See docs/RELIABILITY.md.

mod support;

use std::time::Duration;

use deferred_testkit::emulator::EmulatorConfig;
use serde_json::{Value, json};
use support::{rss_and_fds, start};

async fn growth(mode: &str, payload: Value, invocations: usize) -> (u64, u64) {
    let env = start(
        mode,
        EmulatorConfig {
            function_timeout: Duration::from_secs(5),
            ..EmulatorConfig::default()
        },
        &[("RUST_LOG", "warn,deferred=info")],
    )
    .await;
    let pid = env.emulator.child_pid().expect("pid");
    let mut at_1000 = 0;
    for i in 0..invocations {
        let result = env.invoke(payload.clone()).await;
        assert!(result.outcome.is_success());
        if i + 1 == 1000 {
            env.completed(&result.request_id).await;
            at_1000 = rss_and_fds(pid).0;
        }
        if i + 1 == invocations {
            env.completed(&result.request_id).await;
        }
    }
    (at_1000, rss_and_fds(pid).0)
}

/// `cargo test -p deferred-testkit --test reliability_rss -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "diagnostic: prints RSS growth per wiring"]
async fn rss_growth_per_wiring() {
    let n = 6000;
    for (mode, payload) in [
        ("sync", json!({})),
        ("run", json!({})),
        ("run", json!({ "actions": [{ "name": "a" }] })),
    ] {
        let (first, last) = growth(mode, payload.clone(), n).await;
        eprintln!(
            "rss {mode} {payload}: {first} kB after 1000, {last} kB after {n}: {:.0} B/invocation",
            (last as f64 - first as f64) * 1024.0 / (n - 1000) as f64
        );
    }
}

/// `cargo test -p deferred-testkit --test reliability_rss -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "diagnostic: prints RSS after rounds of 10,000 defers and of 10 MB captures"]
async fn rss_after_big_invocations() {
    for payload in [
        json!({ "defer_count": 10_000, "bulk_try": true }),
        json!({ "capture_bytes": 10 * 1024 * 1024 }),
    ] {
        let env = start(
            "run",
            EmulatorConfig {
                function_timeout: Duration::from_secs(10),
                ..EmulatorConfig::default()
            },
            &[("RUST_LOG", "warn")],
        )
        .await;
        let pid = env.emulator.child_pid().expect("pid");
        let mut samples = vec![rss_and_fds(pid).0];
        for _ in 0..12 {
            let result = env.invoke(payload.clone()).await;
            assert!(result.outcome.is_success());
            env.completed(&result.request_id).await;
            samples.push(rss_and_fds(pid).0);
        }
        eprintln!("rss {payload}: kB before and after each of 12 rounds {samples:?}");
    }
}
