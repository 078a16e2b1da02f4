//! The phase reports itself through OpenTelemetry: a `deferred.phase` span with a child span
//! per action and per flush, and duration histograms, through the global providers.
//!
//! Everything is recorded after the phase, from its report, with the report's timestamps: the
//! phase's own spans are still in the batch processor when the phase's flush ran, so they go
//! out with the next phase's flush (or the final flush on SIGTERM). Recording after the fact
//! keeps the phase itself free of telemetry work. The final flush's own report is recorded
//! too, after the last flush: exported only by a flush after it (the providers' `shutdown`
//! after `drain`), never on SIGTERM. Recorded before it, it could not say what the flush did,
//! which is all it reports (`tests/final_report_telemetry.rs`).

use std::borrow::Cow;
use std::sync::OnceLock;

use opentelemetry::metrics::Histogram;
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt as _};
use opentelemetry::{Context, InstrumentationScope, KeyValue, global};

use crate::report::{
    ActionOutcome, ActionReport, CutReason, FlushOutcome, PhaseKind, PhaseReport, Spans,
};

/// The instrumentation scope of every span and instrument.
fn scope() -> InstrumentationScope {
    InstrumentationScope::builder("lambda-deferred")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build()
}

struct Instruments {
    phase: Histogram<f64>,
    action: Histogram<f64>,
    flush: Histogram<f64>,
}

impl Instruments {
    fn new(meter: &opentelemetry::metrics::Meter) -> Self {
        let histogram = |name: &'static str, description: &'static str| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(description)
                .build()
        };
        Self {
            phase: histogram(
                "deferred.phase.duration",
                "Duration of a deferred phase: its actions, then its flushes",
            ),
            action: histogram("deferred.action.duration", "Duration of a deferred action"),
            flush: histogram(
                "deferred.flush.duration",
                "Duration of one provider's flush in a deferred phase",
            ),
        }
    }
}

/// Made on first use, from the global meter provider of that moment: set it before the first
/// invocation (as with every instrumented library).
fn instruments() -> &'static Instruments {
    static INSTRUMENTS: OnceLock<Instruments> = OnceLock::new();
    INSTRUMENTS.get_or_init(|| Instruments::new(&global::meter_with_scope(scope())))
}

/// The span current on this thread (as `tracing-opentelemetry` activates it), if any: the
/// parent of the phase span.
pub(crate) fn current_span() -> Option<opentelemetry::trace::SpanContext> {
    Context::map_current(|cx| {
        let span = cx.span().span_context().clone();
        span.is_valid().then_some(span)
    })
}

/// Records the phase's spans and metrics through the global providers.
pub(crate) fn record(report: &PhaseReport) {
    record_to(report, &global::tracer_with_scope(scope()), instruments());
}

fn record_to<T>(report: &PhaseReport, tracer: &T, metrics: &Instruments)
where
    T: opentelemetry::trace::Tracer,
    T::Span: Send + Sync + 'static,
{
    let outcome = phase_outcome(report);
    let phase_end = report.started + report.duration;
    let mut attributes = vec![
        KeyValue::new("faas.invocation_id", report.request_id.clone()),
        KeyValue::new("deferred.phase.kind", kind(report.kind)),
        KeyValue::new("deferred.outcome", outcome),
        KeyValue::new("deferred.actions", report.actions.len() as i64),
        KeyValue::new(
            "deferred.consecutive_flush_failures",
            i64::from(report.consecutive_flush_failures),
        ),
    ];
    if let Some(lost) = report.spans_lost {
        attributes.push(KeyValue::new(
            "deferred.spans_lost",
            i64::try_from(lost).unwrap_or(i64::MAX),
        ));
    }
    if let Some(dropped) = report.spans_dropped {
        attributes.push(KeyValue::new(
            "deferred.spans_dropped",
            i64::try_from(dropped).unwrap_or(i64::MAX),
        ));
    }
    if !report.cut.is_empty() {
        attributes.push(KeyValue::new("deferred.cut_reason", cut_reasons(report)));
    }

    // A child of the invocation's span where the handler had one: the phase then shows in the
    // invocation's trace, though it starts after that span ended.
    let parent = match &report.invocation_span {
        Some(span) => Context::new().with_remote_span_context(span.clone()),
        None => Context::new(),
    };
    let mut phase = tracer
        .span_builder("deferred.phase")
        .with_kind(SpanKind::Internal)
        .with_start_time(report.started)
        .with_attributes(attributes)
        .start_with_context(tracer, &parent);
    if outcome != "ok" {
        phase.set_status(Status::error(summary(report)));
    }
    // A phase span that is not recorded (no global tracer provider, or sampled out) gets no
    // children: they would be built for nobody, or exported without their parent.
    let parent = if phase.is_recording() {
        Some(Context::new().with_span(phase))
    } else {
        phase.end_with_timestamp(phase_end);
        None
    };

    metrics.phase.record(
        report.duration.as_secs_f64(),
        &[
            KeyValue::new("deferred.phase.kind", kind(report.kind)),
            KeyValue::new("deferred.outcome", outcome),
        ],
    );

    if let Some(parent) = &parent {
        // What cut the actions that were cut: the budget, or SIGTERM.
        let shutdown = report.cut.contains(&CutReason::Shutdown);
        let actions = report.actions.iter().map(|action| {
            let attributes = vec![
                KeyValue::new("deferred.action.name", action_name(action)),
                KeyValue::new("code.file.path", action.label.location.file()),
                KeyValue::new("code.line.number", i64::from(action.label.location.line())),
                KeyValue::new("deferred.outcome", action_outcome(&action.outcome)),
            ];
            let error = action_error(&action.outcome, shutdown);
            (
                "deferred.action",
                action.offset,
                action.duration,
                attributes,
                error,
            )
        });
        let flushes = report.flushes.iter().map(|flush| {
            let attributes = vec![
                KeyValue::new("deferred.flush.provider", flush.name.clone()),
                KeyValue::new("deferred.outcome", flush_outcome(&flush.outcome)),
            ];
            let error = flush_error(&flush.outcome);
            (
                "deferred.flush",
                flush.offset,
                flush.duration,
                attributes,
                error,
            )
        });
        for (name, offset, duration, attributes, error) in actions.chain(flushes) {
            let start = report.started + offset;
            let mut span = tracer
                .span_builder(name)
                .with_start_time(start)
                .with_attributes(attributes)
                .start_with_context(tracer, parent);
            if let Some(error) = error {
                span.set_status(Status::error(error));
            }
            span.end_with_timestamp(start + duration);
        }
    }

    // Actions and flushes that never ran have no duration to show.
    for action in report
        .actions
        .iter()
        .filter(|a| a.outcome != ActionOutcome::NotRun)
    {
        metrics.action.record(
            action.duration.as_secs_f64(),
            &[
                KeyValue::new("deferred.action.name", action_name(action)),
                KeyValue::new("deferred.outcome", action_outcome(&action.outcome)),
            ],
        );
    }
    for flush in report
        .flushes
        .iter()
        .filter(|f| !matches!(f.outcome, FlushOutcome::NotRun(_)))
    {
        metrics.flush.record(
            flush.duration.as_secs_f64(),
            &[
                KeyValue::new("deferred.flush.provider", flush.name.clone()),
                KeyValue::new("deferred.outcome", flush_outcome(&flush.outcome)),
            ],
        );
    }

    if let Some(parent) = parent {
        parent.span().end_with_timestamp(phase_end);
    }
}

/// The action's name, `unnamed` when it has none.
fn action_name(action: &ActionReport) -> Cow<'static, str> {
    action
        .label
        .name
        .clone()
        .unwrap_or(Cow::Borrowed("unnamed"))
}

/// `ok`, `cut` (something was cut for time or shutdown), or `error` (an action or a flush
/// failed, or spans were lost or dropped, and nothing was cut).
fn phase_outcome(report: &PhaseReport) -> &'static str {
    if !report.cut.is_empty() {
        "cut"
    } else if report.is_clean() {
        "ok"
    } else {
        "error"
    }
}

fn summary(report: &PhaseReport) -> String {
    let mut summary = format!(
        "{} of {} actions and {} of {} flushes did not succeed",
        report.failed_actions(),
        report.actions.len(),
        report.failed_flushes(),
        report.flushes.len()
    );
    if let Some(lost) = report.spans_lost.filter(|n| *n > 0) {
        summary.push_str(&format!("; {} lost", Spans(lost)));
    }
    if let Some(dropped) = report.spans_dropped.filter(|n| *n > 0) {
        summary.push_str(&format!("; {} dropped", Spans(dropped)));
    }
    // A cut phase may have no failure to count (its flush left to the final one on SIGTERM).
    if !report.cut.is_empty() {
        summary.push_str(&format!("; cut: {}", cut_reasons(report)));
    }
    summary
}

fn kind(kind: PhaseKind) -> &'static str {
    match kind {
        PhaseKind::Chained => "chained",
        PhaseKind::Inline => "inline",
        PhaseKind::Background => "background",
        PhaseKind::Shutdown => "shutdown",
    }
}

/// What the phase cut, as the attribute `deferred.cut_reason` names it: `shutdown,flush_budget`.
fn cut_reasons(report: &PhaseReport) -> String {
    let reasons: Vec<&str> = report.cut.iter().map(cut_reason).collect();
    reasons.join(",")
}

fn cut_reason(reason: &CutReason) -> &'static str {
    match reason {
        CutReason::ActionBudget { .. } => "action_budget",
        CutReason::Shutdown => "shutdown",
        CutReason::FlushBudget { .. } => "flush_budget",
    }
}

fn action_outcome(outcome: &ActionOutcome) -> &'static str {
    match outcome {
        ActionOutcome::Ok => "ok",
        ActionOutcome::Failed(_) => "failed",
        ActionOutcome::Panicked(_) => "panicked",
        ActionOutcome::TimedOut => "timed_out",
        ActionOutcome::NotRun => "not_run",
    }
}

fn action_error(outcome: &ActionOutcome, shutdown: bool) -> Option<String> {
    let why = if shutdown {
        "shutdown"
    } else {
        "out of budget"
    };
    match outcome {
        ActionOutcome::Ok => None,
        ActionOutcome::Failed(e) => Some(e.clone()),
        ActionOutcome::Panicked(m) => Some(format!("panicked: {m}")),
        ActionOutcome::TimedOut => Some(format!("abandoned: {why}")),
        ActionOutcome::NotRun => Some(format!("not run: {why}")),
    }
}

fn flush_outcome(outcome: &FlushOutcome) -> &'static str {
    match outcome {
        FlushOutcome::Ok => "ok",
        FlushOutcome::Failed(_) => "failed",
        FlushOutcome::Panicked(_) => "panicked",
        FlushOutcome::TimedOut => "timed_out",
        FlushOutcome::NotRun(_) => "not_run",
    }
}

fn flush_error(outcome: &FlushOutcome) -> Option<String> {
    match outcome {
        FlushOutcome::Ok => None,
        FlushOutcome::Failed(e) => Some(e.clone()),
        FlushOutcome::Panicked(m) => Some(format!("panicked: {m}")),
        FlushOutcome::TimedOut => Some("abandoned at its timeout".to_owned()),
        FlushOutcome::NotRun(why) => Some(format!("not run: {why}")),
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::panic::Location;
    use std::time::{Duration, SystemTime};

    use std::collections::BTreeMap;

    use opentelemetry::trace::{
        Link, SpanContext, SpanId, Status, TraceFlags, TraceId, TraceState, TracerProvider as _,
    };
    use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
    use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
    use opentelemetry_sdk::trace::{
        InMemorySpanExporter, Sampler, SamplingDecision, SamplingResult, SdkTracerProvider,
        ShouldSample, SpanData,
    };

    use super::*;
    use crate::action::ActionLabel;
    use crate::report::{ActionReport, FlushReport};

    fn report() -> PhaseReport {
        let label = |name: Option<&'static str>| ActionLabel {
            name: name.map(Cow::Borrowed),
            location: Location::caller(),
        };
        PhaseReport {
            request_id: "req-1".into(),
            invocation_span: None,
            kind: PhaseKind::Chained,
            started: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            actions: vec![
                ActionReport {
                    label: label(Some("audit")),
                    offset: Duration::from_millis(1),
                    duration: Duration::from_millis(30),
                    outcome: ActionOutcome::Ok,
                },
                ActionReport {
                    label: label(None),
                    offset: Duration::from_millis(31),
                    duration: Duration::from_millis(5),
                    outcome: ActionOutcome::Failed("boom".into()),
                },
            ],
            flushes: vec![FlushReport {
                name: "tracer provider".into(),
                offset: Duration::from_millis(36),
                duration: Duration::from_millis(12),
                outcome: FlushOutcome::Ok,
            }],
            duration: Duration::from_millis(50),
            cut: Vec::new(),
            consecutive_flush_failures: 0,
            spans_lost: None,
            spans_dropped: None,
        }
    }

    fn spans(report: &PhaseReport) -> Vec<SpanData> {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let meters = SdkMeterProvider::builder().build();
        let instruments = Instruments::new(&opentelemetry::metrics::MeterProvider::meter(
            &meters, "test",
        ));
        record_to(report, &provider.tracer("test"), &instruments);
        exporter.get_finished_spans().unwrap()
    }

    fn attribute(span: &SpanData, key: &str) -> Option<String> {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.to_string())
    }

    /// The phase span's status counts one span in the singular ("1 span lost"), more in the
    /// plural. Found by review: it said "1 spans lost".
    #[test]
    fn the_status_counts_one_span_in_the_singular() {
        let mut report = report();
        for (n, lost, dropped) in [
            (1, "; 1 span lost", "; 1 span dropped"),
            (2, "; 2 spans lost", "; 2 spans dropped"),
        ] {
            report.spans_lost = Some(n);
            report.spans_dropped = Some(n);
            let summary = summary(&report);
            assert!(
                summary.contains(lost) && summary.contains(dropped),
                "{summary}"
            );
        }
    }

    /// The span counts, when known, are attributes of the phase span; a drop makes the
    /// phase an error even when every action and flush succeeded.
    #[test]
    fn lost_and_dropped_spans_are_attributes_of_the_phase_span() {
        let mut report = report();
        report.actions.retain(|a| a.outcome == ActionOutcome::Ok);
        report.spans_lost = Some(0);
        report.spans_dropped = Some(7);
        let recorded = spans(&report);
        let phase = recorded
            .iter()
            .find(|s| s.name == "deferred.phase")
            .unwrap();
        assert_eq!(
            attribute(phase, "deferred.spans_lost").as_deref(),
            Some("0")
        );
        assert_eq!(
            attribute(phase, "deferred.spans_dropped").as_deref(),
            Some("7")
        );
        assert_eq!(
            attribute(phase, "deferred.outcome").as_deref(),
            Some("error")
        );
        assert!(
            matches!(&phase.status, Status::Error { description } if description.contains("7 spans dropped"))
        );

        report.spans_dropped = None;
        let recorded = spans(&report);
        let phase = recorded
            .iter()
            .find(|s| s.name == "deferred.phase")
            .unwrap();
        assert_eq!(attribute(phase, "deferred.spans_dropped"), None);
        assert_eq!(attribute(phase, "deferred.outcome").as_deref(), Some("ok"));
    }

    /// An action cut by SIGTERM says so in its span's status, not "out of budget".
    #[test]
    fn actions_cut_by_shutdown_say_so() {
        let mut report = report();
        report.actions[1].outcome = ActionOutcome::TimedOut;
        report.cut = vec![CutReason::Shutdown];
        let status = |report: &PhaseReport| {
            spans(report)
                .into_iter()
                .find(|s| {
                    s.name == "deferred.action"
                        && attribute(s, "deferred.outcome").as_deref() == Some("timed_out")
                })
                .map(|s| s.status)
        };
        assert!(
            matches!(status(&report), Some(Status::Error { description }) if description == "abandoned: shutdown")
        );
        report.cut = vec![CutReason::ActionBudget {
            budget: Duration::from_millis(30),
        }];
        assert!(
            matches!(status(&report), Some(Status::Error { description }) if description == "abandoned: out of budget")
        );
    }

    #[test]
    fn a_phase_span_with_a_child_per_action_and_per_flush_on_the_report_s_clock() {
        let report = report();
        let spans = spans(&report);
        assert_eq!(spans.len(), 4, "{spans:?}");
        let phase = spans.iter().find(|s| s.name == "deferred.phase").unwrap();
        assert_eq!(phase.parent_span_id, SpanId::INVALID);
        assert_eq!(phase.start_time, report.started);
        assert_eq!(phase.end_time, report.started + report.duration);
        assert_eq!(
            attribute(phase, "faas.invocation_id").as_deref(),
            Some("req-1")
        );
        assert_eq!(
            attribute(phase, "deferred.outcome").as_deref(),
            Some("error")
        );
        assert_eq!(attribute(phase, "deferred.cut_reason"), None);
        assert!(matches!(phase.status, Status::Error { .. }));

        let children: Vec<_> = spans
            .iter()
            .filter(|s| s.parent_span_id == phase.span_context.span_id())
            .collect();
        assert_eq!(children.len(), 3);
        for child in &children {
            assert_eq!(child.span_context.trace_id(), phase.span_context.trace_id());
        }
        let audit = children
            .iter()
            .find(|s| attribute(s, "deferred.action.name").as_deref() == Some("audit"))
            .unwrap();
        assert_eq!(audit.name, "deferred.action");
        assert_eq!(audit.start_time, report.started + Duration::from_millis(1));
        assert_eq!(audit.end_time, report.started + Duration::from_millis(31));
        assert_eq!(audit.status, Status::Unset);
        assert_eq!(attribute(audit, "code.file.path").as_deref(), Some(file!()));
        let failed = children
            .iter()
            .find(|s| attribute(s, "deferred.action.name").as_deref() == Some("unnamed"))
            .unwrap();
        assert_eq!(
            attribute(failed, "deferred.outcome").as_deref(),
            Some("failed")
        );
        assert_eq!(failed.status, Status::error("boom"));
        let flush = children
            .iter()
            .find(|s| s.name == "deferred.flush")
            .unwrap();
        assert_eq!(
            attribute(flush, "deferred.flush.provider").as_deref(),
            Some("tracer provider")
        );
        assert_eq!(flush.start_time, report.started + Duration::from_millis(36));
        assert_eq!(flush.end_time, report.started + Duration::from_millis(48));
    }

    /// A local span context, as the handler's invocation span would give, with `flags`.
    fn invocation_span(flags: TraceFlags) -> SpanContext {
        SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            flags,
            false,
            TraceState::default(),
        )
    }

    #[test]
    fn the_phase_span_is_a_child_of_the_invocation_span_in_its_trace() {
        let invocation = invocation_span(TraceFlags::SAMPLED);
        let mut report = report();
        report.invocation_span = Some(invocation.clone());
        let spans = spans(&report);
        assert_eq!(spans.len(), 4, "{spans:?}");
        let phase = spans.iter().find(|s| s.name == "deferred.phase").unwrap();
        assert_eq!(phase.parent_span_id, invocation.span_id());
        assert!(!phase.parent_span_is_remote);
        for span in &spans {
            assert_eq!(span.span_context.trace_id(), invocation.trace_id());
        }
    }

    #[test]
    fn an_invocation_sampled_out_takes_its_phase_with_it() {
        // The default sampler follows the parent: an unsampled invocation's phase is not
        // recorded either, so a trace never holds a phase without its invocation.
        let mut report = report();
        report.invocation_span = Some(invocation_span(TraceFlags::default()));
        assert!(spans(&report).is_empty());
    }

    #[test]
    fn current_span_is_the_attached_context_s_valid_span() {
        assert_eq!(current_span(), None);
        let span = invocation_span(TraceFlags::SAMPLED);
        let guard = Context::new()
            .with_remote_span_context(span.clone())
            .attach();
        assert_eq!(current_span(), Some(span));
        drop(guard);
        assert_eq!(current_span(), None);
    }

    #[test]
    fn a_cut_phase_says_why() {
        let mut report = report();
        report.actions.truncate(1);
        report.actions[0].outcome = ActionOutcome::TimedOut;
        report.flushes[0].outcome = FlushOutcome::TimedOut;
        report.cut = vec![
            CutReason::ActionBudget {
                budget: Duration::from_secs(1),
            },
            CutReason::FlushBudget {
                budget: Duration::from_secs(1),
            },
        ];
        let spans = spans(&report);
        let phase = spans.iter().find(|s| s.name == "deferred.phase").unwrap();
        assert_eq!(attribute(phase, "deferred.outcome").as_deref(), Some("cut"));
        assert_eq!(
            attribute(phase, "deferred.cut_reason").as_deref(),
            Some("action_budget,flush_budget")
        );
        let flush = spans.iter().find(|s| s.name == "deferred.flush").unwrap();
        assert_eq!(
            attribute(flush, "deferred.outcome").as_deref(),
            Some("timed_out")
        );
        assert!(matches!(flush.status, Status::Error { .. }));
    }

    /// A phase cut with nothing failed (its flush left to the final one on SIGTERM) is an
    /// error whose description says why. Found by review: it said only "0 of 1 actions and 0
    /// of 0 flushes did not succeed", an error that names no failure.
    #[test]
    fn a_cut_phase_s_status_names_the_cut() {
        let mut report = report();
        report.actions.truncate(1);
        report.flushes.clear();
        report.cut = vec![CutReason::Shutdown];
        let spans = spans(&report);
        let phase = spans.iter().find(|s| s.name == "deferred.phase").unwrap();
        assert!(
            matches!(&phase.status, Status::Error { description } if description.contains("cut: shutdown")),
            "{:?}",
            phase.status
        );
    }

    /// Records `report` with a tracer provider of `sampler` and a meter provider: the finished
    /// spans, and the number of data points per histogram.
    fn record_with(
        report: &PhaseReport,
        sampler: impl ShouldSample + 'static,
    ) -> (Vec<SpanData>, BTreeMap<String, u64>) {
        let spans = InMemorySpanExporter::default();
        let tracer = SdkTracerProvider::builder()
            .with_sampler(sampler)
            .with_simple_exporter(spans.clone())
            .build()
            .tracer("test");
        let metrics = InMemoryMetricExporter::default();
        let meters = SdkMeterProvider::builder()
            .with_reader(PeriodicReader::builder(metrics.clone()).build())
            .build();
        let instruments = Instruments::new(&opentelemetry::metrics::MeterProvider::meter(
            &meters, "test",
        ));
        record_to(report, &tracer, &instruments);
        meters.force_flush().unwrap();
        let mut counts = BTreeMap::new();
        for metric in metrics
            .get_finished_metrics()
            .unwrap()
            .iter()
            .flat_map(|rm| rm.scope_metrics())
            .flat_map(|sm| sm.metrics())
        {
            let AggregatedMetrics::F64(MetricData::Histogram(h)) = metric.data() else {
                panic!("{} is not an f64 histogram", metric.name());
            };
            assert_eq!(metric.unit(), "s");
            let n: u64 = h.data_points().map(|p| p.count()).sum();
            counts.insert(metric.name().to_owned(), n);
        }
        (spans.get_finished_spans().unwrap(), counts)
    }

    fn assert_every_duration_recorded(counts: &BTreeMap<String, u64>) {
        assert_eq!(counts.get("deferred.phase.duration"), Some(&1));
        assert_eq!(counts.get("deferred.action.duration"), Some(&2));
        assert_eq!(counts.get("deferred.flush.duration"), Some(&1));
    }

    #[test]
    fn durations_go_to_histograms_with_their_outcome() {
        let (spans, counts) = record_with(&report(), Sampler::AlwaysOn);
        assert_eq!(spans.len(), 4);
        assert_every_duration_recorded(&counts);
    }

    /// Samples every span but the phase's, as a sampler that is not parent-based may.
    #[derive(Clone, Debug)]
    struct DropsThePhase;

    impl ShouldSample for DropsThePhase {
        fn should_sample(
            &self,
            _: Option<&Context>,
            _: TraceId,
            name: &str,
            _: &SpanKind,
            _: &[KeyValue],
            _: &[Link],
        ) -> SamplingResult {
            SamplingResult {
                decision: if name == "deferred.phase" {
                    SamplingDecision::Drop
                } else {
                    SamplingDecision::RecordAndSample
                },
                attributes: Vec::new(),
                trace_state: TraceState::default(),
            }
        }
    }

    #[test]
    fn a_phase_span_not_recorded_gets_no_children_and_still_its_metrics() {
        let (spans, counts) = record_with(&report(), DropsThePhase);
        assert!(spans.is_empty(), "children without their parent: {spans:?}");
        assert_every_duration_recorded(&counts);
    }
}
