//! Shared set-up of the integration tests: the emulator, the OTLP sink and the fixture function.
#![allow(dead_code, unreachable_pub)]

use std::time::{Duration, Instant};

use deferred_testkit::emulator::{Emulator, EmulatorConfig, FunctionSpec, InvokeResult, Timeline};
use deferred_testkit::otlp::OtlpSink;
use serde_json::Value;

pub struct Env {
    pub emulator: Emulator,
    pub sink: OtlpSink,
}

/// The fixture function (src/bin/fixture.rs) wired as `mode`, with extra environment.
pub async fn start(mode: &str, config: EmulatorConfig, env: &[(&str, &str)]) -> Env {
    let sink = OtlpSink::start().await.expect("sink");
    start_with_endpoint(mode, config, env, sink.clone(), &sink.endpoint()).await
}

pub async fn start_with_endpoint(
    mode: &str,
    config: EmulatorConfig,
    env: &[(&str, &str)],
    sink: OtlpSink,
    endpoint: &str,
) -> Env {
    let emulator = Emulator::start(config).await.expect("emulator");
    let mut spec = FunctionSpec::new(env!("CARGO_BIN_EXE_fixture"))
        .env("FIXTURE_MODE", mode)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .env("OTEL_EXPORTER_OTLP_TIMEOUT", "1000")
        .env("RUST_LOG", "info");
    for (k, v) in env {
        spec = spec.env(*k, *v);
    }
    emulator.spawn_function(spec).await.expect("function init");
    Env { emulator, sink }
}

impl Env {
    pub async fn invoke(&self, payload: Value) -> InvokeResult {
        self.emulator.invoke(payload.to_string()).await
    }

    /// The timeline of `request_id`, once the invocation is complete (or timed out).
    pub async fn completed(&self, request_id: &str) -> Timeline {
        let id = request_id.to_owned();
        let done = self
            .emulator
            .wait_until(Duration::from_secs(20), move |_, timelines| {
                timelines
                    .iter()
                    .any(|t| t.request_id == id && (t.complete.is_some() || t.timed_out))
            })
            .await;
        assert!(done, "invocation {request_id} never completed");
        self.timeline(request_id)
    }

    /// Waits (up to 5 s) until the function has posted `mark` for `request_id`: whether it
    /// did.
    pub async fn marked(&self, request_id: &str, mark: &'static str) -> bool {
        let id = request_id.to_owned();
        self.emulator
            .wait_until(Duration::from_secs(5), move |_, ts| {
                ts.iter()
                    .any(|t| t.request_id == id && t.mark(mark).is_some())
            })
            .await
    }

    pub fn timeline(&self, request_id: &str) -> Timeline {
        self.emulator
            .timelines()
            .into_iter()
            .find(|t| t.request_id == request_id)
            .expect("timeline")
    }

    /// Spans of `trace_id` the sink received before `at`.
    pub fn spans_before(&self, trace_id: &str, at: Instant) -> Vec<String> {
        self.sink
            .spans()
            .into_iter()
            .filter(|s| s.trace_id.eq_ignore_ascii_case(trace_id) && s.received_at <= at)
            .map(|s| s.name)
            .collect()
    }

    /// Waits (bounded) until the function has logged a line containing `needle`: its output
    /// is captured asynchronously.
    pub async fn logged(&self, needle: &str) -> bool {
        let needle = needle.to_owned();
        self.emulator
            .wait_for_log(move |line| line.contains(&needle), Duration::from_secs(5))
            .await
            .is_some()
    }

    /// Waits (bounded) for the report of the final flush (on SIGTERM, or by the drain after a
    /// failed runtime loop) and asserts that it flushed the tracer provider; `context` starts
    /// the failure's message.
    pub async fn assert_final_flush_ok(&self, context: &str) {
        let report = self
            .emulator
            .wait_for_log(
                |line| line.contains("deferred phase (Shutdown)"),
                Duration::from_secs(5),
            )
            .await
            .unwrap_or_else(|| panic!("no final flush report: {:#?}", self.function_logs_tail()));
        assert!(
            report.contains("flush tracer provider ok"),
            "{context}: the final flush: {report}"
        );
    }

    /// The function's last 30 log lines, for a failure message.
    fn function_logs_tail(&self) -> Vec<String> {
        let logs = self.emulator.function_logs();
        logs[logs.len().saturating_sub(30)..].to_vec()
    }

    /// The request ids of the invocations that overran their deadline.
    pub fn overran(&self) -> Vec<String> {
        self.emulator
            .timelines()
            .into_iter()
            .filter(|t| t.timed_out)
            .map(|t| t.request_id)
            .collect()
    }

    /// The error lines of the chain's safety net: an environment released because its phase
    /// had not ended by its end (which hides a G4 bug from the emulator's timeout count).
    pub fn safety_net_releases(&self) -> Vec<String> {
        self.logs_matching("had not ended by its end")
    }

    pub fn logs_matching(&self, needle: &str) -> Vec<String> {
        self.emulator
            .function_logs()
            .into_iter()
            .filter(|l| l.contains(needle))
            .collect()
    }
}

/// The trace id the fixture puts in its answer.
pub fn trace_id(result: &InvokeResult) -> String {
    let body = result.outcome.body().expect("a successful invocation");
    let value: Value = serde_json::from_slice(body).expect("json answer");
    value["trace_id"].as_str().expect("trace_id").to_owned()
}

/// When the extension asked for the next event after this invocation: the end of its
/// deferred phase.
pub fn phase_end(timeline: &Timeline) -> Instant {
    timeline
        .extension_next
        .first()
        .map(|(_, at)| *at)
        .expect("the extension called event/next")
}

/// A child's resident set (kB) and open file descriptors, from /proc.
pub fn rss_and_fds(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .count();
    (rss, fds)
}
