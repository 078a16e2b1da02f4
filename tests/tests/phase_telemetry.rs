//! The deferred phase reports itself through OpenTelemetry (issue 6): a `deferred.phase` span
//! with a child per action and per flush, and duration histograms. Phase N's span is recorded
//! after phase N's flush, so it reaches the collector in phase N+1's flush, or in the final
//! flush on SIGTERM.

mod support;

use std::time::Duration;

use deferred_testkit::emulator::EmulatorConfig;
use deferred_testkit::otlp::ReceivedSpan;
use serde_json::json;
use support::{Env, phase_end};

fn phase_span<'a>(spans: &'a [ReceivedSpan], request_id: &str) -> Option<&'a ReceivedSpan> {
    spans.iter().find(|s| {
        s.name == "deferred.phase" && s.attribute("faas.invocation_id") == Some(request_id)
    })
}

fn children<'a>(spans: &'a [ReceivedSpan], parent: &ReceivedSpan) -> Vec<&'a ReceivedSpan> {
    spans
        .iter()
        .filter(|s| s.parent_span_id.as_deref() == Some(parent.span_id.as_str()))
        .collect()
}

async fn start() -> Env {
    support::start("run", EmulatorConfig::default(), &[("FLUSH_METRICS", "1")]).await
}

#[tokio::test]
async fn phase_n_is_exported_in_phase_n_plus_1_with_its_actions_and_flushes() {
    let env = start().await;
    let first = env
        .invoke(
            json!({ "actions": [{ "name": "audit", "ms": 20 }, { "name": "bad", "kind": "err" }] }),
        )
        .await;
    let first_done = env.completed(&first.request_id).await;

    // Phase 1 cannot carry its own span: it is recorded after its flush.
    let before = env.sink.spans();
    assert!(
        phase_span(&before, &first.request_id).is_none(),
        "phase 1's span arrived with phase 1"
    );
    assert!(
        before
            .iter()
            .all(|s| s.received_at <= phase_end(&first_done)),
        "something was exported after the environment was released"
    );

    let second = env.invoke(json!({})).await;
    let second_done = env.completed(&second.request_id).await;
    let spans = env.sink.spans();
    let phase = phase_span(&spans, &first.request_id).expect("phase 1's span, in phase 2's flush");
    assert!(
        phase.received_at <= phase_end(&second_done),
        "phase 1's span must be in phase 2's flush, before the release"
    );
    // The phase hangs under the span lambda_runtime opened for the invocation (which the
    // fixture's tracing-opentelemetry layer exports): one trace per invocation, phase included.
    let invoke = spans
        .iter()
        .find(|s| {
            s.name == "Lambda runtime invoke" && s.attribute("requestId") == Some(&first.request_id)
        })
        .expect("the invocation's span");
    assert_eq!(
        phase.parent_span_id.as_deref(),
        Some(invoke.span_id.as_str())
    );
    assert_eq!(phase.trace_id, invoke.trace_id);
    assert_eq!(phase.scope, "lambda-deferred");
    assert_eq!(phase.attribute("deferred.phase.kind"), Some("chained"));
    // One action returned Err: the phase is an error, not a cut.
    assert_eq!(phase.attribute("deferred.outcome"), Some("error"));
    assert_eq!(phase.attribute("deferred.cut_reason"), None);
    assert!(phase.end_time_unix_nano >= phase.start_time_unix_nano + 20_000_000);

    let kids = children(&spans, phase);
    let names: Vec<_> = kids
        .iter()
        .map(|s| {
            (
                s.name.as_str(),
                s.attribute("deferred.action.name")
                    .or(s.attribute("deferred.flush.provider"))
                    .unwrap_or(""),
                s.attribute("deferred.outcome").unwrap_or(""),
            )
        })
        .collect();
    for expected in [
        ("deferred.action", "audit", "ok"),
        ("deferred.action", "bad", "failed"),
        ("deferred.flush", "tracer provider", "ok"),
        ("deferred.flush", "meter provider", "ok"),
    ] {
        assert!(names.contains(&expected), "{expected:?} not in {names:?}");
    }
    let audit = kids
        .iter()
        .find(|s| s.attribute("deferred.action.name") == Some("audit"))
        .expect("audit span");
    assert!(audit.end_time_unix_nano - audit.start_time_unix_nano >= 20_000_000);
    assert!(audit.start_time_unix_nano >= phase.start_time_unix_nano);
    assert!(
        audit
            .attribute("code.file.path")
            .is_some_and(|p| p.ends_with("fixture.rs"))
    );

    // The histograms ride the same flushes (the meter provider is a flusher here).
    for metric in [
        "deferred.phase.duration",
        "deferred.action.duration",
        "deferred.flush.duration",
    ] {
        assert!(
            env.sink.metric_points(metric) > 0,
            "{metric} not exported: {:?}",
            env.sink.metric_names()
        );
    }

    // Phase 2's span waits for the next flush: here, the final flush on SIGTERM.
    assert!(phase_span(&env.sink.spans(), &second.request_id).is_none());
    let shutdown = env.emulator.shutdown().await;
    assert!(!shutdown.killed, "{shutdown:?}");
    let arrived = env
        .sink
        .wait_until(Duration::from_secs(2), |store| {
            phase_span(&store.spans(), &second.request_id).is_some()
        })
        .await;
    assert!(arrived, "the last phase's span is lost on SIGTERM");
}

#[tokio::test]
async fn a_phase_cut_by_its_budget_says_why() {
    let env = support::start(
        "run",
        EmulatorConfig {
            function_timeout: Duration::from_secs(2),
            ..EmulatorConfig::default()
        },
        &[("FLUSH_TIMEOUT_MS", "500")],
    )
    .await;
    let cut = env
        .invoke(json!({ "actions": [{ "name": "stuck", "kind": "hang" }] }))
        .await;
    env.completed(&cut.request_id).await;
    let next = env.invoke(json!({})).await;
    env.completed(&next.request_id).await;

    let spans = env.sink.spans();
    let phase = phase_span(&spans, &cut.request_id).expect("the cut phase's span");
    assert_eq!(phase.attribute("deferred.outcome"), Some("cut"));
    assert_eq!(
        phase.attribute("deferred.cut_reason"),
        Some("action_budget")
    );
    let stuck = children(&spans, phase)
        .into_iter()
        .find(|s| s.attribute("deferred.action.name") == Some("stuck"))
        .expect("the hung action's span");
    assert_eq!(stuck.attribute("deferred.outcome"), Some("timed_out"));
}
