//! The report of one deferred phase: what ran, how long it took, what was cut and why.

use std::fmt;
use std::time::{Duration, SystemTime};

use crate::action::ActionLabel;

/// How a phase ran.
///
/// Outside Lambda every phase of an invocation is `Inline`, but for the work of a handler
/// future dropped before it completed (a timeout around the handler), which is `Background`
/// (and the final flush of [`DeferredHandle::shutdown`](crate::DeferredHandle::shutdown) and
/// [`drain`](crate::DeferredHandle::drain) is `Shutdown`, there too). With `handler` a
/// `#[deferred_handler]` as in [`PhaseReport`]'s example:
///
/// ```
/// # use deferred_core::{Deferred, deferred_handler};
/// # use lambda_runtime::{Context, Error, LambdaEvent};
/// # #[deferred_handler]
/// # async fn handler(_event: LambdaEvent<()>) -> Result<(), Error> {
/// #     Ok(())
/// # }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Error> {
/// use deferred_core::PhaseKind;
///
/// let (kinds, received) = std::sync::mpsc::channel();
/// Deferred::new()
///     .on_report(move |report| kinds.send(report.kind).unwrap())
///     .start()
///     .await?;
/// handler(LambdaEvent::new((), Context::default())).await?;
/// assert_eq!(received.try_recv()?, PhaseKind::Inline);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PhaseKind {
    /// After the response, with the extension holding the environment (the normal case).
    Chained,
    /// Run by the invocation itself, because no extension holds the environment for it:
    /// before the handler returned (outside Lambda, registration refused, chain broken, or the
    /// invocation was claimed too late), or, with the layer, right after the response when the
    /// INVOKE event its work was parked for never arrived (or the chain broke after the handler
    /// returned), still before the runtime asks for the next invocation.
    Inline,
    /// As a background task: on Lambda Managed Instances (nothing is frozen), and wherever no
    /// invocation runs the work itself: a handler future dropped before it completed (a
    /// timeout around the handler) with no chained phase to take its work, the job of an
    /// INVOKE event the chain found out of step, and, on SIGTERM, the jobs of finished
    /// handlers still waiting for their response or INVOKE event.
    Background,
    /// The final flush: on SIGTERM, or [`DeferredHandle::shutdown`](crate::DeferredHandle::shutdown)
    /// and [`drain`](crate::DeferredHandle::drain). Its report comes after the last flush: its
    /// log line and the `on_report` hook show it, but its own span and metrics (phase
    /// telemetry) cannot be in the flush they describe, and leave only with a flush after it
    /// (the providers' `shutdown` as `main` returns, after `drain`); never on SIGTERM, where
    /// the process exits after the final flush.
    Shutdown,
}

/// What became of one action.
///
/// An `Err` and a panic are told apart, and neither stops the later actions. (`TimedOut` and
/// `NotRun` come with a [`CutReason`]; see its example.)
///
/// ```
/// use deferred_core::{ActionOutcome, Deferred, defer, deferred_handler};
/// use lambda_runtime::{Context, Error, LambdaEvent};
///
/// #[deferred_handler]
/// async fn handler(_event: LambdaEvent<()>) -> Result<(), Error> {
///     defer!("cache", async {});
///     defer!("mail", async { Err::<(), _>("HTTP 503") });
///     defer!("buggy", async { None::<u32>.expect("a cached value"); });
///     defer!("after", async {});
///     Ok(())
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Error> {
/// let (reports, received) = std::sync::mpsc::channel();
/// Deferred::new()
///     .on_report(move |report| reports.send(report.clone()).unwrap())
///     .start()
///     .await?;
/// handler(LambdaEvent::new((), Context::default())).await?;
///
/// let outcomes: Vec<_> = received.try_recv()?.actions.into_iter().map(|a| a.outcome).collect();
/// assert_eq!(
///     outcomes,
///     [
///         ActionOutcome::Ok,
///         ActionOutcome::Failed("HTTP 503".into()),
///         ActionOutcome::Panicked("a cached value".into()),
///         ActionOutcome::Ok,
///     ]
/// );
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ActionOutcome {
    /// It completed (yielded `()` or `Ok(())`).
    Ok,
    /// It yielded `Err`; the error's text.
    Failed(String),
    /// It panicked; the panic's message.
    Panicked(String),
    /// It was still running when the actions' budget ran out, or when SIGTERM stopped the
    /// phase ([`CutReason::Shutdown`]), and was abandoned.
    TimedOut,
    /// It never started: the budget had run out, or SIGTERM had stopped the phase
    /// ([`CutReason::Shutdown`]).
    NotRun,
}

/// One action's line in the report.
///
/// Actions run one by one in queue order; `offset` and `duration` show it:
///
/// ```
/// use deferred_core::{Deferred, defer, deferred_handler};
/// use lambda_runtime::{Context, Error, LambdaEvent};
/// use std::time::Duration;
///
/// #[deferred_handler]
/// async fn handler(_event: LambdaEvent<()>) -> Result<(), Error> {
///     defer!("first", tokio::time::sleep(Duration::from_millis(20)));
///     defer!("second", async {});
///     Ok(())
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Error> {
/// let (reports, received) = std::sync::mpsc::channel();
/// Deferred::new()
///     .on_report(move |report| reports.send(report.clone()).unwrap())
///     .start()
///     .await?;
/// handler(LambdaEvent::new((), Context::default())).await?;
///
/// let report = received.try_recv()?;
/// let [first, second] = &report.actions[..] else { panic!("{report}") };
/// assert_eq!(first.label.name.as_deref(), Some("first"));
/// assert!(first.duration >= Duration::from_millis(20));
/// assert!(second.offset >= first.offset + first.duration);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ActionReport {
    /// The action's name and where it was queued.
    pub label: ActionLabel,
    /// When it started (or was skipped), from the start of the phase: 0 for an action taken
    /// over from a phase dropped while it ran (a timeout around the handler during an inline
    /// phase), which started before this phase.
    pub offset: Duration,
    /// How long it ran (for one taken over from a dropped phase, since that phase started it).
    pub duration: Duration,
    /// What became of it.
    pub outcome: ActionOutcome,
}

impl ActionReport {
    /// A report line for the action `label` that ended with `outcome`, at offset 0 and with
    /// duration 0: set the public fields as needed. For tests of code that reads reports (the
    /// struct is `#[non_exhaustive]`, so it cannot be built with a literal).
    ///
    /// ```
    /// use deferred_core::{ActionLabel, ActionOutcome, ActionReport};
    /// use std::panic::Location;
    /// use std::time::Duration;
    ///
    /// let label = ActionLabel { name: Some("notify".into()), location: Location::caller() };
    /// let mut action = ActionReport::new(label, ActionOutcome::Failed("HTTP 503".into()));
    /// action.duration = Duration::from_millis(120);
    /// assert_eq!(action.label.name.as_deref(), Some("notify"));
    /// ```
    pub fn new(label: ActionLabel, outcome: ActionOutcome) -> Self {
        Self {
            label,
            offset: Duration::ZERO,
            duration: Duration::ZERO,
            outcome,
        }
    }
}

/// What became of one flusher's flush.
///
/// Each flusher is reported on its own: one that fails does not fail the others.
///
/// ```
/// use deferred_core::{Deferred, FlushError, FlushOutcome, deferred_handler, flush_fn};
/// use lambda_runtime::{Context, Error, LambdaEvent};
///
/// #[deferred_handler]
/// async fn handler(_event: LambdaEvent<()>) -> Result<(), Error> {
///     Ok(())
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Error> {
/// let (reports, received) = std::sync::mpsc::channel();
/// Deferred::new()
///     .flush(flush_fn("statsd", || Ok::<(), FlushError>(())))
///     .flush(flush_fn("collector", || Err::<(), _>("connection refused")))
///     .on_report(move |report| reports.send(report.clone()).unwrap())
///     .start()
///     .await?;
/// handler(LambdaEvent::new((), Context::default())).await?;
///
/// let report = received.try_recv()?;
/// assert_eq!(report.flushes[0].outcome, FlushOutcome::Ok);
/// assert_eq!(
///     report.flushes[1].outcome,
///     FlushOutcome::Failed("connection refused".into())
/// );
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FlushOutcome {
    /// The flush succeeded.
    Ok,
    /// The flush returned an error; its text.
    Failed(String),
    /// The flush panicked; the panic's message.
    Panicked(String),
    /// The flush overran its timeout and was abandoned (its thread may still run).
    TimedOut,
    /// Not started; the reason (a previous flush still running, no time left).
    NotRun(String),
}

/// One flusher's line in the report.
///
/// The flushers start together, once the actions are over:
///
/// ```
/// use deferred_core::{Deferred, FlushOutcome, defer, deferred_handler};
/// use lambda_runtime::{Context, Error, LambdaEvent};
/// use opentelemetry_sdk::trace::SdkTracerProvider;
/// use std::time::Duration;
///
/// #[deferred_handler]
/// async fn handler(_event: LambdaEvent<()>) -> Result<(), Error> {
///     defer!(tokio::time::sleep(Duration::from_millis(10)));
///     Ok(())
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Error> {
/// let (reports, received) = std::sync::mpsc::channel();
/// Deferred::new()
///     .flush(SdkTracerProvider::builder().build())
///     .on_report(move |report| reports.send(report.clone()).unwrap())
///     .start()
///     .await?;
/// handler(LambdaEvent::new((), Context::default())).await?;
///
/// let report = received.try_recv()?;
/// let flush = &report.flushes[0];
/// assert_eq!(flush.name, "tracer provider");
/// assert_eq!(flush.outcome, FlushOutcome::Ok);
/// assert!(flush.offset >= Duration::from_millis(10)); // after the action
/// assert!(flush.offset + flush.duration <= report.duration);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct FlushReport {
    /// The flusher's name ([`Flush::name`](crate::Flush::name)).
    pub name: String,
    /// When it started (or was skipped), from the start of the phase.
    pub offset: Duration,
    /// How long the flush took (or ran before it was abandoned).
    pub duration: Duration,
    /// What became of it.
    pub outcome: FlushOutcome,
}

impl FlushReport {
    /// A report line for the flusher `name` that ended with `outcome`, at offset 0 and with
    /// duration 0: set the public fields as needed. For tests of code that reads reports.
    ///
    /// ```
    /// use deferred_core::{FlushOutcome, FlushReport};
    ///
    /// let flush = FlushReport::new("tracer provider", FlushOutcome::TimedOut);
    /// assert_eq!(flush.name, "tracer provider");
    /// ```
    pub fn new(name: impl Into<String>, outcome: FlushOutcome) -> Self {
        Self {
            name: name.into(),
            offset: Duration::ZERO,
            duration: Duration::ZERO,
            outcome,
        }
    }
}

/// Why part of the deferred work was cut.
///
/// An invocation whose deadline is 1 s away, with the default safety margin of 100 ms: the
/// actions have about 880 ms (no flusher, so the only reserve is the 20 ms a cancelled action
/// gets to be dropped). The slow action is cancelled at the end of that budget and the one
/// after it never starts.
///
/// ```
/// use deferred_core::{ActionOutcome, CutReason, Deferred, defer, deferred_handler};
/// use lambda_runtime::{Context, Error, LambdaEvent};
/// use std::time::{Duration, SystemTime, UNIX_EPOCH};
///
/// #[deferred_handler]
/// async fn handler(_event: LambdaEvent<()>) -> Result<(), Error> {
///     defer!("slow", tokio::time::sleep(Duration::from_secs(60)));
///     defer!("next", async {});
///     Ok(())
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Error> {
/// let (reports, received) = std::sync::mpsc::channel();
/// Deferred::new()
///     .on_report(move |report| reports.send(report.clone()).unwrap())
///     .start()
///     .await?;
/// let mut context = Context::default();
/// let deadline = SystemTime::now().duration_since(UNIX_EPOCH)? + Duration::from_secs(1);
/// context.deadline = u64::try_from(deadline.as_millis())?; // Lambda-Runtime-Deadline-Ms
/// handler(LambdaEvent::new((), context)).await?;
///
/// let report = received.try_recv()?;
/// assert_eq!(report.actions[0].outcome, ActionOutcome::TimedOut);
/// assert_eq!(report.actions[1].outcome, ActionOutcome::NotRun);
/// assert!(matches!(
///     report.cut[..],
///     [CutReason::ActionBudget { budget }] if budget <= Duration::from_millis(900)
/// ));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CutReason {
    /// The actions ran out of their budget: the invocation's deadline, minus the safety margin,
    /// minus the time reserved for the flush.
    ActionBudget {
        /// The time the actions had in all.
        budget: Duration,
    },
    /// The process is shutting down (SIGTERM): the running action was abandoned and the final
    /// flush took over.
    Shutdown,
    /// The flush ran out of time: `flush_timeout`, or the deadline minus the safety margin (in
    /// the final flush, [`PhaseKind::Shutdown`]: `shutdown_timeout`, or, when an invocation
    /// may still be open, as in a drain after `lambda_runtime` failed, its deadline minus the
    /// safety margin).
    FlushBudget {
        /// The time the flush had.
        budget: Duration,
    },
}

/// The report of one deferred phase, logged as a `tracing` event with target `deferred`.
///
/// [`Deferred::on_report`](crate::Deferred::on_report) hands every report to a hook of yours,
/// and [`Deferred::phase_telemetry`](crate::Deferred::phase_telemetry) records it through
/// OpenTelemetry. Its `Display` is the log line's message.
///
/// ```
/// use deferred_core::{
///     ActionOutcome, Deferred, FlushError, FlushOutcome, PhaseKind, defer, deferred_handler,
///     flush_fn,
/// };
/// use lambda_runtime::{Context, Error, LambdaEvent};
///
/// #[deferred_handler]
/// async fn handler(_event: LambdaEvent<()>) -> Result<(), Error> {
///     defer!("audit", async {});
///     defer!("notify", async { Err::<(), _>("HTTP 503 from the mailer") });
///     Ok(())
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Error> {
/// let (reports, received) = std::sync::mpsc::channel();
/// Deferred::new()
///     .flush(flush_fn("metrics", || Ok::<(), FlushError>(())))
///     .on_report(move |report| {
///         if report.consecutive_flush_failures >= 3 {
///             eprintln!("telemetry lost three phases in a row: {report}");
///         }
///         reports.send(report.clone()).unwrap();
///     })
///     .start()
///     .await?;
/// // Outside Lambda the phase runs inline: its report is out before the handler returns.
/// handler(LambdaEvent::new((), Context::default())).await?;
/// let report = received.try_recv()?;
///
/// assert_eq!(report.kind, PhaseKind::Inline);
/// assert_eq!(report.request_id, ""); // a hand-built Context has none
/// assert_eq!(report.actions[0].label.name.as_deref(), Some("audit"));
/// assert_eq!(report.actions[0].outcome, ActionOutcome::Ok);
/// assert_eq!(
///     report.actions[1].outcome,
///     ActionOutcome::Failed("HTTP 503 from the mailer".into())
/// );
/// assert_eq!(report.flushes[0].name, "metrics");
/// assert_eq!(report.flushes[0].outcome, FlushOutcome::Ok);
/// assert!(report.cut.is_empty());
/// assert!(report.flushed() && !report.is_clean()); // an action failed, the flush did not
/// assert_eq!(report.consecutive_flush_failures, 0);
/// assert!(report.to_string().starts_with("deferred phase (Inline) of \"\" took "));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PhaseReport {
    /// The invocation's request id (from the handler's `Context`: empty outside Lambda,
    /// unless the caller built one with an id).
    pub request_id: String,
    /// The OpenTelemetry span that was current when the handler started: with
    /// `tracing-opentelemetry` (which activates a span's context on entry by default), the
    /// span `lambda_runtime` opens for the invocation. The `deferred.phase` span is its child,
    /// in the invocation's trace. `None` when there was none (no OpenTelemetry context, phase
    /// telemetry off, a phase whose handler never ran, or the final flush): the phase span is
    /// then the root of a trace of its own.
    pub invocation_span: Option<opentelemetry::trace::SpanContext>,
    /// How the phase ran.
    pub kind: PhaseKind,
    /// When the phase started (wall clock).
    pub started: SystemTime,
    /// Every action queued, in queue order.
    pub actions: Vec<ActionReport>,
    /// Every flusher.
    pub flushes: Vec<FlushReport>,
    /// The whole phase.
    pub duration: Duration,
    /// What was cut, if anything.
    pub cut: Vec<CutReason>,
    /// How many phases in a row, this one included, had a flush that did not succeed (0 when
    /// this phase's flushes all succeeded): alert on it rather than on one failure. A phase
    /// that flushed nothing because its flush was left to the final flush (SIGTERM) neither
    /// ends nor extends the streak: it carries the standing count.
    pub consecutive_flush_failures: u32,
    /// Spans whose export failed since the previous report (this phase's flush, or a
    /// background export since), when the builder was given
    /// [`span_export_counts`](crate::Deferred::span_export_counts); `None` otherwise.
    pub spans_lost: Option<u64>,
    /// Spans the batch processor dropped on a full queue (they never reached the exporter)
    /// since the previous report that counted any: at least this many, counted up to the
    /// latest successful flush of that processor. Known after a phase whose flushes all
    /// succeeded, when the batch processor is wrapped in a
    /// [`CountingSpanProcessor`](crate::CountingSpanProcessor) with the counts given to
    /// [`span_export_counts`](crate::Deferred::span_export_counts); `None` otherwise.
    pub spans_dropped: Option<u64>,
}

impl PhaseReport {
    /// An empty report of a phase of `kind` for the invocation `request_id`: no action, no
    /// flush, nothing cut, started now, duration 0, no failure streak, no span counts. Set the
    /// public fields to describe the phase you need.
    ///
    /// The core builds the reports it hands to [`Deferred::on_report`](crate::Deferred::on_report);
    /// this is for testing such a hook (or anything else that reads reports) without running
    /// a phase, which needs [`Deferred::start`](crate::Deferred::start), possible once per
    /// process. The struct is `#[non_exhaustive]`, so it cannot be built with a literal.
    ///
    /// ```
    /// use deferred_core::{FlushOutcome, FlushReport, PhaseKind, PhaseReport};
    ///
    /// /// The hook's logic, kept in a function of its own so that it can be tested.
    /// fn should_page(report: &PhaseReport) -> bool {
    ///     report.consecutive_flush_failures >= 3
    /// }
    ///
    /// let mut report = PhaseReport::new(PhaseKind::Chained, "8476a536-e9f4-11e8-9739-2dfe598c3fcd");
    /// report.flushes.push(FlushReport::new("collector", FlushOutcome::Failed("503".into())));
    /// report.consecutive_flush_failures = 3;
    /// assert!(should_page(&report));
    /// assert!(!report.is_clean());
    /// assert_eq!(report.clone(), report);
    /// ```
    pub fn new(kind: PhaseKind, request_id: impl Into<String>) -> Self {
        Self {
            request_id: request_id.into(),
            invocation_span: None,
            kind,
            started: SystemTime::now(),
            actions: Vec::new(),
            flushes: Vec::new(),
            duration: Duration::ZERO,
            cut: Vec::new(),
            consecutive_flush_failures: 0,
            spans_lost: None,
            spans_dropped: None,
        }
    }

    /// True when every flush succeeded (or there was none to run).
    ///
    /// A flusher that keeps failing counts up
    /// [`consecutive_flush_failures`](Self::consecutive_flush_failures), phase after phase:
    ///
    /// ```
    /// # use deferred_core::{Deferred, deferred_handler, flush_fn};
    /// # use lambda_runtime::{Context, Error, LambdaEvent};
    /// # #[deferred_handler]
    /// # async fn handler(_event: LambdaEvent<()>) -> Result<(), Error> {
    /// #     Ok(())
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Error> {
    /// let (reports, received) = std::sync::mpsc::channel();
    /// Deferred::new()
    ///     .flush(flush_fn("collector", || Err::<(), _>("connection refused")))
    ///     .on_report(move |report| reports.send(report.clone()).unwrap())
    ///     .start()
    ///     .await?;
    /// for expected in 1..=2 {
    ///     handler(LambdaEvent::new((), Context::default())).await?;
    ///     let report = received.try_recv()?;
    ///     assert!(!report.flushed());
    ///     assert_eq!(report.consecutive_flush_failures, expected);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn flushed(&self) -> bool {
        self.flushes.iter().all(|f| f.outcome == FlushOutcome::Ok)
    }

    /// True when every action and flush succeeded, nothing was cut and no span was lost or
    /// dropped.
    ///
    /// The log line is `info` when it is true, `warn` otherwise. A failed action leaves
    /// [`flushed`](Self::flushed) true and this false (see [`PhaseReport`]'s example).
    ///
    /// ```
    /// use deferred_core::Deferred;
    /// use std::sync::atomic::{AtomicU64, Ordering};
    ///
    /// static UNCLEAN_PHASES: AtomicU64 = AtomicU64::new(0);
    ///
    /// let deferred = Deferred::new().on_report(|report| {
    ///     if !report.is_clean() {
    ///         UNCLEAN_PHASES.fetch_add(1, Ordering::Relaxed);
    ///     }
    /// });
    /// # let _ = deferred;
    /// ```
    pub fn is_clean(&self) -> bool {
        self.spans_lost.unwrap_or(0) == 0
            && self.spans_dropped.unwrap_or(0) == 0
            && self.cut.is_empty()
            && self.actions.iter().all(|a| a.outcome == ActionOutcome::Ok)
            && self.flushed()
    }

    /// How many actions did not succeed (failed, panicked, cut or not run).
    pub(crate) fn failed_actions(&self) -> usize {
        self.actions
            .iter()
            .filter(|a| a.outcome != ActionOutcome::Ok)
            .count()
    }

    /// How many flushes did not succeed.
    pub(crate) fn failed_flushes(&self) -> usize {
        self.flushes
            .iter()
            .filter(|f| f.outcome != FlushOutcome::Ok)
            .count()
    }

    /// Logs the report: `info` when clean, `warn` otherwise.
    pub(crate) fn emit(&self) {
        let (failed_actions, failed_flushes) = (self.failed_actions(), self.failed_flushes());
        let duration_ms = self.duration.as_secs_f64() * 1e3;
        if self.is_clean() {
            tracing::info!(
                target: "deferred",
                request_id = %self.request_id,
                kind = ?self.kind,
                actions = self.actions.len(),
                duration_ms,
                "{self}"
            );
        } else {
            tracing::warn!(
                target: "deferred",
                request_id = %self.request_id,
                kind = ?self.kind,
                actions = self.actions.len(),
                failed_actions,
                failed_flushes,
                cut = !self.cut.is_empty(),
                consecutive_flush_failures = self.consecutive_flush_failures,
                spans_lost = self.spans_lost.unwrap_or(0),
                spans_dropped = self.spans_dropped.unwrap_or(0),
                duration_ms,
                "{self}"
            );
        }
    }
}

struct Ms(Duration);

/// A count of spans, "1 span" or "N spans", for the texts that count them (the report's, its
/// span status, a flush's error).
pub(crate) struct Spans(pub(crate) u64);

impl fmt::Display for Spans {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            1 => f.write_str("1 span"),
            n => write!(f, "{n} spans"),
        }
    }
}

impl fmt::Display for Ms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.1}ms", self.0.as_secs_f64() * 1e3)
    }
}

impl fmt::Display for PhaseReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "deferred phase ({:?}) of {:?} took {}",
            self.kind,
            self.request_id,
            Ms(self.duration)
        )?;
        for a in &self.actions {
            write!(f, "; {} ", a.label)?;
            match &a.outcome {
                ActionOutcome::Ok => write!(f, "ok in {}", Ms(a.duration))?,
                ActionOutcome::Failed(e) => write!(f, "failed after {}: {e}", Ms(a.duration))?,
                ActionOutcome::Panicked(e) => write!(f, "panicked after {}: {e}", Ms(a.duration))?,
                ActionOutcome::TimedOut => write!(f, "cut after {}", Ms(a.duration))?,
                ActionOutcome::NotRun => write!(f, "not run")?,
            }
        }
        for fl in &self.flushes {
            write!(f, "; flush {} ", fl.name)?;
            match &fl.outcome {
                FlushOutcome::Ok => write!(f, "ok in {}", Ms(fl.duration))?,
                FlushOutcome::Failed(e) => write!(f, "failed after {}: {e}", Ms(fl.duration))?,
                FlushOutcome::Panicked(e) => write!(f, "panicked after {}: {e}", Ms(fl.duration))?,
                FlushOutcome::TimedOut => write!(f, "abandoned after {}", Ms(fl.duration))?,
                FlushOutcome::NotRun(why) => write!(f, "not run: {why}")?,
            }
        }
        if let Some(lost) = self.spans_lost.filter(|n| *n > 0) {
            write!(f, "; {} lost (their export failed)", Spans(lost))?;
        }
        if let Some(dropped) = self.spans_dropped.filter(|n| *n > 0) {
            write!(
                f,
                "; {} dropped (the batch processor's queue was full)",
                Spans(dropped)
            )?;
        }
        for cut in &self.cut {
            match cut {
                CutReason::ActionBudget { budget } => write!(
                    f,
                    "; actions cut: their budget of {} (deadline - safety margin - flush reserve) ran out",
                    Ms(*budget)
                )?,
                CutReason::Shutdown => write!(f, "; cut by shutdown: the final flush took over")?,
                CutReason::FlushBudget { budget } => write!(
                    f,
                    "; flush cut: its budget of {} ({}) ran out",
                    Ms(*budget),
                    if self.kind == PhaseKind::Shutdown {
                        "shutdown_timeout, or the open invocation's deadline - safety margin"
                    } else {
                        "flush_timeout, or deadline - safety margin"
                    }
                )?,
            }
        }
        Ok(())
    }
}

/// `error`'s `Display`, then each cause (`source()`) that the text does not show already
/// (many errors print their cause in their own message too): the text of an error in a report
/// or a log line. An HTTP client's error says little at the top ("error sending request",
/// hyper's "client error (Connect)"); its cause says why.
pub(crate) fn with_causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(error) = cause {
        let shown = error.to_string();
        if !text.contains(&shown) {
            text.push_str(": ");
            text.push_str(&shown);
        }
        cause = error.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One span is "1 span", not "1 spans", in the report's text. Found by review.
    #[test]
    fn a_report_counts_one_span_in_the_singular() {
        let mut report = PhaseReport::new(PhaseKind::Chained, "r-1");
        for (n, lost, dropped) in [
            (
                1,
                "; 1 span lost (their export failed)",
                "; 1 span dropped (the batch processor's queue was full)",
            ),
            (
                2,
                "; 2 spans lost (their export failed)",
                "; 2 spans dropped (the batch processor's queue was full)",
            ),
        ] {
            report.spans_lost = Some(n);
            report.spans_dropped = Some(n);
            let text = report.to_string();
            assert!(text.contains(lost) && text.contains(dropped), "{text}");
        }
    }
}
