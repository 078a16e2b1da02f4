//! `Deferred`: the builder that configures the core, registers the extension and runs the
//! Lambda runtime.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use lambda_runtime::{Diagnostic, IntoFunctionResponse, LambdaEvent, Service};
use serde::{Deserialize, Serialize};

use crate::core::{Config, Core, Mode, ReportHook};
use crate::extension::{Client, ClientError};
use crate::flush::{Flush, Flusher};
use crate::layer::DeferredLayer;
use crate::report::PhaseReport;

/// Configures and starts lambda-deferred.
///
/// ```no_run
/// use deferred_core::{deferred_handler, defer, Deferred};
/// use lambda_runtime::{service_fn, Error, LambdaEvent};
/// use serde_json::Value;
///
/// #[deferred_handler(flush_timeout = "2s")]
/// async fn handler(event: LambdaEvent<Value>) -> Result<Value, Error> {
///     defer!("audit", async move { /* runs after the response */ });
///     Ok(event.payload)
/// }
///
/// #[tokio::main]
/// async fn main() -> Result<(), Error> {
///     # let tracer_provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
///     Deferred::new()
///         .flush(tracer_provider.clone())
///         .run(service_fn(handler))
///         .await
/// }
/// ```
///
/// Outside Lambda, a handler called directly (a unit test) works with the same builder: no
/// extension can hold the environment, so the deferred work runs inline, before the handler
/// returns. (`run` itself needs a Lambda environment, as `lambda_runtime::run` does: to run
/// the whole function locally, use an emulator such as the test kit's.)
///
/// ```
/// use deferred_core::{ActionOutcome, Deferred, defer, deferred_handler};
/// use lambda_runtime::{Context, Error, LambdaEvent};
///
/// #[deferred_handler]
/// async fn handler(_event: LambdaEvent<()>) -> Result<(), Error> {
///     defer!("audit", async {});
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
/// assert_eq!(received.try_recv()?.actions[0].outcome, ActionOutcome::Ok);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Default)]
#[must_use = "a Deferred does nothing until `.start()` or `.run(…)`"]
pub struct Deferred {
    pub(crate) config: Config,
}

/// Why [`Deferred::start`] failed. Registration problems are not errors: the core falls back
/// to running deferred work inline, with one log line.
///
/// ```
/// use deferred_core::{Deferred, StartError};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), StartError> {
/// Deferred::new().start().await?;
/// // One core per process: a second start (or run) is refused.
/// let error = Deferred::new().start().await.unwrap_err();
/// assert!(matches!(error, StartError::AlreadyStarted));
/// assert!(error.to_string().contains("already started"));
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum StartError {
    /// `start` (or `run`) was called a second time in this process.
    AlreadyStarted,
    /// A setting of the builder cannot work: a zero `flush_timeout` would never flush, a zero
    /// `safety_margin` would let a phase run into the deadline (Lambda then times the
    /// invocation out) and one of 15 minutes or more would leave no phase any time, a zero
    /// `shutdown_timeout` would never run the final flush, a zero `register_timeout` would give
    /// up on the extension before the Runtime API could answer, and a zero `unclaimed_window`
    /// would give up on every INVOKE event before its handler could claim it (in the last two,
    /// every response would wait for its deferred work). Nothing was started: the process may
    /// call `start` again with a working setting.
    ///
    /// ```
    /// use deferred_core::{Deferred, StartError};
    /// use std::time::Duration;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let error = Deferred::new().flush_timeout(Duration::ZERO).start().await.unwrap_err();
    /// assert!(matches!(error, StartError::InvalidSetting { setting: "flush_timeout", .. }));
    /// assert!(error.to_string().contains("flush_timeout"));
    /// # }
    /// ```
    ///
    /// `#[non_exhaustive]`: it may gain fields (the value refused, say); match it with `..`.
    ///
    /// ```compile_fail,E0638
    /// use deferred_core::StartError;
    ///
    /// fn setting(error: &StartError) -> Option<&'static str> {
    ///     match error {
    ///         StartError::InvalidSetting { setting, reason: _ } => Some(setting),
    ///         _ => None,
    ///     }
    /// }
    /// ```
    #[non_exhaustive]
    InvalidSetting {
        /// The builder method that set it.
        setting: &'static str,
        /// Why it cannot work.
        reason: &'static str,
    },
    /// `start` (or `run`) was polled outside a Tokio runtime: the core runs its tasks on the
    /// current one. Nothing was started: the process may call `start` again on a runtime.
    NoRuntime,
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AlreadyStarted => f.write_str(
                "lambda-deferred is already started in this process (Deferred::start or run \
                 may be called once)",
            ),
            Self::InvalidSetting { setting, reason } => {
                write!(f, "Deferred::{setting}: {reason}")
            }
            Self::NoRuntime => f.write_str(
                "Deferred::start needs a Tokio runtime (with its time driver, as #[tokio::main] \
                 builds it), and was polled outside one",
            ),
        }
    }
}

impl std::error::Error for StartError {}

impl Deferred {
    /// A builder with the defaults: no flushers, `flush_timeout` 10 s, safety margin 100 ms,
    /// at most 1000 actions per invocation, `shutdown_timeout` 400 ms, SIGTERM handled,
    /// `register_timeout` 5 s, `unclaimed_window` 500 ms, no report hook, no span counts, phase
    /// telemetry on.
    ///
    /// ```
    /// use deferred_core::{Deferred, defer, deferred_handler};
    /// use lambda_runtime::{Context, Error, LambdaEvent};
    ///
    /// #[deferred_handler]
    /// async fn handler(_event: LambdaEvent<()>) -> Result<(), Error> {
    ///     defer!(async {});
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
    /// let report = received.try_recv()?;
    /// assert_eq!(report.actions.len(), 1);
    /// assert!(report.flushes.is_empty()); // no flusher unless you add one
    /// # Ok(())
    /// # }
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Flushes `flush` after every invocation, after the deferred actions. Any number of
    /// flushers may be added; they flush concurrently, each on a thread of its own.
    ///
    /// Each is reported on its own, in the order they were added:
    ///
    /// ```
    /// use deferred_core::{Deferred, FlushError, FlushOutcome, deferred_handler, flush_fn};
    /// use lambda_runtime::{Context, Error, LambdaEvent};
    /// use opentelemetry_sdk::trace::SdkTracerProvider;
    ///
    /// #[deferred_handler]
    /// async fn handler(_event: LambdaEvent<()>) -> Result<(), Error> {
    ///     Ok(())
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Error> {
    /// let tracer_provider = SdkTracerProvider::builder().build();
    /// let (reports, received) = std::sync::mpsc::channel();
    /// Deferred::new()
    ///     .flush(tracer_provider.clone())
    ///     .flush(flush_fn("statsd", || Ok::<(), FlushError>(())))
    ///     .on_report(move |report| reports.send(report.clone()).unwrap())
    ///     .start()
    ///     .await?;
    /// handler(LambdaEvent::new((), Context::default())).await?;
    ///
    /// let report = received.try_recv()?;
    /// let names: Vec<_> = report.flushes.iter().map(|f| f.name.as_str()).collect();
    /// assert_eq!(names, ["tracer provider", "statsd"]);
    /// assert!(report.flushes.iter().all(|f| f.outcome == FlushOutcome::Ok));
    /// # Ok(())
    /// # }
    /// ```
    pub fn flush(mut self, flush: impl Flush) -> Self {
        self.config.flushers.push(Flusher::new(flush));
        self
    }

    /// Caps the flush of each phase (default 10 s); `#[deferred_handler(flush_timeout = …)]`
    /// overrides it per handler. Values above 15 minutes (Lambda's longest function timeout)
    /// count as 15 minutes; zero is refused by [`start`](Self::start)
    /// ([`StartError::InvalidSetting`]).
    ///
    /// A flusher still busy at the timeout is abandoned and reported
    /// [`TimedOut`](crate::FlushOutcome::TimedOut) (its thread runs on):
    ///
    /// ```
    /// use deferred_core::{
    ///     CutReason, Deferred, FlushError, FlushOutcome, deferred_handler, flush_fn,
    /// };
    /// use lambda_runtime::{Context, Error, LambdaEvent};
    /// use std::time::Duration;
    ///
    /// #[deferred_handler]
    /// async fn handler(_event: LambdaEvent<()>) -> Result<(), Error> {
    ///     Ok(())
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Error> {
    /// let stalled = flush_fn("stalled collector", || {
    ///     std::thread::sleep(Duration::from_millis(300));
    ///     Ok::<(), FlushError>(())
    /// });
    /// let (reports, received) = std::sync::mpsc::channel();
    /// Deferred::new()
    ///     .flush(stalled)
    ///     .flush_timeout(Duration::from_millis(50))
    ///     .on_report(move |report| reports.send(report.clone()).unwrap())
    ///     .start()
    ///     .await?;
    /// handler(LambdaEvent::new((), Context::default())).await?;
    ///
    /// let report = received.try_recv()?;
    /// assert_eq!(report.flushes[0].outcome, FlushOutcome::TimedOut);
    /// assert!(matches!(
    ///     report.cut[..],
    ///     [CutReason::FlushBudget { budget }] if budget <= Duration::from_millis(50)
    /// ));
    /// # Ok(())
    /// # }
    /// ```
    pub fn flush_timeout(mut self, timeout: Duration) -> Self {
        self.config.flush_timeout = bounded(timeout);
        self
    }

    /// How long before the invocation's deadline the deferred phase must be over (default
    /// 100 ms). Lambda stops the environment at the deadline, extension time included. Zero
    /// is refused by [`start`](Self::start): a phase that uses its whole budget would reach
    /// the deadline before its `event/next`. So is 15 minutes or more: no invocation lasts
    /// longer (Lambda's longest function timeout), so no phase would ever get any time.
    ///
    /// With the deadline 1 s away and a margin of 800 ms, the actions have at most 200 ms:
    ///
    /// ```
    /// use deferred_core::{ActionOutcome, CutReason, Deferred, defer, deferred_handler};
    /// use lambda_runtime::{Context, Error, LambdaEvent};
    /// use std::time::{Duration, SystemTime, UNIX_EPOCH};
    ///
    /// #[deferred_handler]
    /// async fn handler(_event: LambdaEvent<()>) -> Result<(), Error> {
    ///     defer!("slow", tokio::time::sleep(Duration::from_secs(60)));
    ///     Ok(())
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Error> {
    /// let (reports, received) = std::sync::mpsc::channel();
    /// Deferred::new()
    ///     .safety_margin(Duration::from_millis(800))
    ///     .on_report(move |report| reports.send(report.clone()).unwrap())
    ///     .start()
    ///     .await?;
    /// let mut context = Context::default();
    /// let deadline = SystemTime::now().duration_since(UNIX_EPOCH)? + Duration::from_secs(1);
    /// context.deadline = u64::try_from(deadline.as_millis())?;
    /// handler(LambdaEvent::new((), context)).await?;
    ///
    /// let report = received.try_recv()?;
    /// assert_eq!(report.actions[0].outcome, ActionOutcome::TimedOut);
    /// assert!(matches!(
    ///     report.cut[..],
    ///     [CutReason::ActionBudget { budget }] if budget <= Duration::from_millis(200)
    /// ));
    /// # Ok(())
    /// # }
    /// ```
    pub fn safety_margin(mut self, margin: Duration) -> Self {
        self.config.safety_margin = bounded(margin);
        self
    }

    /// The most actions one invocation may queue (default 1000); `defer!` past it panics,
    /// `try_defer!` returns [`DeferError::QueueFull`](crate::DeferError::QueueFull). 0 forbids
    /// deferring altogether (every `defer!` panics). The limit bounds the memory that one
    /// invocation's queue can hold; each action also holds what its future captured. Calls of
    /// deferred handlers made one after another in one invocation (a router) share it when
    /// their work joins one phase (with the runtime layer); calls running at the same time
    /// (`join_all` over records) each count from what the calls already returned had queued;
    /// with `start` alone, a call after the phase began runs its work inline, with a limit
    /// of its own.
    ///
    /// ```
    /// use deferred_core::{DeferError, Deferred, deferred_handler, try_defer};
    /// use lambda_runtime::{Context, Error, LambdaEvent};
    ///
    /// #[deferred_handler]
    /// async fn handler(_event: LambdaEvent<()>) -> Result<(), Error> {
    ///     try_defer!(async {})?;
    ///     try_defer!(async {})?;
    ///     let third = try_defer!(async {});
    ///     assert!(matches!(third, Err(DeferError::QueueFull { limit: 2, .. })));
    ///     Ok(())
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Error> {
    /// Deferred::new().max_actions(2).start().await?;
    /// handler(LambdaEvent::new((), Context::default())).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn max_actions(mut self, limit: usize) -> Self {
        self.config.max_actions = limit;
        self
    }

    /// The time allowed for the final flush on SIGTERM (default 400 ms; Lambda kills the
    /// process 500 ms after SIGTERM when only internal extensions are registered, so in Lambda
    /// `start`, or a registration that answers late, logs a warning for more than that).
    /// Values above 15 minutes count as 15 minutes; zero is refused by [`start`](Self::start).
    /// It bounds the final flush on SIGTERM where the core handles it (see
    /// [`handle_sigterm`](Self::handle_sigterm)), as it does in Lambda once the extension is
    /// registered (within `register_timeout` or later) and on Lambda Managed Instances; and,
    /// in every mode, [`DeferredHandle::drain`] and the drain of [`run`](Self::run) when
    /// lambda_runtime's loop fails.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// // With your own SIGTERM handler (`handle_sigterm(false)`, calling `shutdown()`), leave
    /// // 200 ms of the 500 ms to your own exit path.
    /// let deferred = deferred_core::Deferred::new()
    ///     .handle_sigterm(false)
    ///     .shutdown_timeout(Duration::from_millis(300));
    /// # let _ = deferred;
    /// ```
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.config.shutdown_timeout = bounded(timeout);
        self
    }

    /// How long `start` waits for the extension's registration before it gives up and runs
    /// deferred work inline (default 5 s; Lambda's whole init phase has 10 s). Should the
    /// registration answer later, the extension only acknowledges events from then on, so
    /// Lambda never waits for it, and SIGTERM gets the final flush. Values above 15 minutes
    /// count as 15 minutes (anything above Lambda's 10 s init limit only lets init fail
    /// first); zero is refused by [`start`](Self::start).
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let deferred = deferred_core::Deferred::new().register_timeout(Duration::from_secs(2));
    /// # let _ = deferred;
    /// ```
    pub fn register_timeout(mut self, timeout: Duration) -> Self {
        self.config.register_timeout = bounded(timeout);
        self
    }

    /// Whether the core handles SIGTERM with a final flush and exits (default true). Turn it
    /// off when the function handles SIGTERM itself, and call
    /// [`DeferredHandle::shutdown`] there: nothing else then runs the work in flight, the
    /// background phases (Managed Instances) and the final flush.
    ///
    /// That includes lambda_runtime's `spawn_graceful_shutdown_handler` (feature
    /// `graceful-shutdown`): it exits the process as soon as its hook returns, so beside the
    /// core's own handler whichever exits first wins, and the final flush may be cut short
    /// with no line saying so. Use `handle_sigterm(false)` and await
    /// [`DeferredHandle::shutdown`] in its hook. (It also registers an extension of its own,
    /// which this one does not need: SIGTERM comes to any function with one.)
    ///
    /// ```
    /// use deferred_core::Deferred;
    /// use tokio::signal::unix::{SignalKind, signal};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let mut sigterm = signal(SignalKind::terminate())?;
    /// let deferred = Deferred::new().handle_sigterm(false).start().await?;
    /// tokio::spawn(async move {
    ///     sigterm.recv().await;
    ///     // The deferred work in flight and the final flush, within `shutdown_timeout`.
    ///     deferred.shutdown().await;
    ///     // Your own shutdown: close connections, then exit.
    ///     std::process::exit(0);
    /// });
    /// # Ok(())
    /// # }
    /// ```
    pub fn handle_sigterm(mut self, handle: bool) -> Self {
        self.config.handle_sigterm = handle;
        self
    }

    /// When the handler is not wrapped by the runtime layer (`start` with your own
    /// `lambda_runtime::run`): how long an INVOKE event may stay unclaimed by a deferred
    /// handler before the core takes it for one that none will see (an event payload that did
    /// not deserialize) and releases the environment after a flush (default 500 ms). A handler
    /// that claims its event later runs its deferred work inline. Every invocation that no
    /// `#[deferred_handler]` claims (an undecodable payload, or a handler left undecorated)
    /// holds the environment, billed, for this window; with [`run`](Self::run) the runtime
    /// layer closes such invocations at once and the window never applies. Values above 15
    /// minutes count as 15 minutes; zero is refused by [`start`](Self::start).
    ///
    /// ```no_run
    /// use deferred_core::{Deferred, deferred_handler};
    /// use lambda_runtime::{Error, LambdaEvent, service_fn};
    /// use serde_json::Value;
    /// use std::time::Duration;
    ///
    /// #[deferred_handler]
    /// async fn handler(event: LambdaEvent<Value>) -> Result<Value, Error> {
    ///     Ok(event.payload)
    /// }
    ///
    /// #[tokio::main]
    /// async fn main() -> Result<(), Error> {
    ///     let _deferred = Deferred::new()
    ///         .unclaimed_window(Duration::from_millis(200))
    ///         .start()
    ///         .await?;
    ///     lambda_runtime::run(service_fn(handler)).await // no DeferredLayer: the window applies
    /// }
    /// ```
    pub fn unclaimed_window(mut self, window: Duration) -> Self {
        self.config.stray_window = bounded(window);
        self
    }

    /// Calls `hook` with the report of every deferred phase (after it is logged), e.g. to
    /// alert on repeated flush failures. A panic in the hook is caught and logged as an error;
    /// it does not stop the phase's release nor the chain.
    ///
    /// The hook runs before the environment is released, so Lambda waits while it runs. A
    /// hook that blocks (a synchronous HTTP call, a lock held elsewhere) cannot be interrupted:
    /// it holds its invocation until the phase's end plus half the safety margin, where the
    /// extension releases the environment anyway and logs an error, and what the hook still
    /// does may then be frozen; the next phase waits for it. Keep it to counting or queuing;
    /// to send something, record it where a registered flusher picks it up (an OpenTelemetry
    /// counter goes out with the meter provider's next flush).
    ///
    /// ```
    /// use deferred_core::{Deferred, defer, deferred_handler};
    /// use lambda_runtime::{Context, Error, LambdaEvent};
    /// use std::sync::atomic::{AtomicU64, Ordering};
    ///
    /// static UNCLEAN: AtomicU64 = AtomicU64::new(0);
    ///
    /// #[deferred_handler]
    /// async fn handler(_event: LambdaEvent<()>) -> Result<(), Error> {
    ///     defer!("mail", async { Err::<(), _>("HTTP 503") });
    ///     Ok(())
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Error> {
    /// Deferred::new()
    ///     .on_report(|report| {
    ///         if !report.is_clean() {
    ///             UNCLEAN.fetch_add(1, Ordering::Relaxed); // or page someone
    ///         }
    ///     })
    ///     .start()
    ///     .await?;
    /// handler(LambdaEvent::new((), Context::default())).await?;
    /// assert_eq!(UNCLEAN.load(Ordering::Relaxed), 1);
    /// # Ok(())
    /// # }
    /// ```
    pub fn on_report(mut self, hook: impl Fn(&PhaseReport) + Send + Sync + 'static) -> Self {
        self.config.on_report = Some(ReportHook(Arc::new(hook)));
        self
    }

    /// Counts of a [`CountingSpanExporter`](crate::CountingSpanExporter): each report then
    /// says how many spans were lost (their export failed) since the previous one, in
    /// [`PhaseReport::spans_lost`](crate::PhaseReport::spans_lost), its log line and its
    /// `deferred.phase` span. When a [`CountingSpanProcessor`](crate::CountingSpanProcessor)
    /// wraps the batch processor with the same counts, a report after a clean flush also says
    /// how many spans the processor dropped on a full queue
    /// ([`PhaseReport::spans_dropped`](crate::PhaseReport::spans_dropped)).
    ///
    /// ```
    /// use std::sync::Arc;
    ///
    /// let counts = Arc::new(deferred_core::ExportCounts::default());
    /// let deferred = deferred_core::Deferred::new().span_export_counts(counts);
    /// # let _ = deferred;
    /// ```
    pub fn span_export_counts(mut self, counts: Arc<crate::ExportCounts>) -> Self {
        self.config.span_counts = Some(counts);
        self
    }

    /// Whether each phase reports itself through OpenTelemetry's global providers (default
    /// true): a span `deferred.phase` (attributes `faas.invocation_id`,
    /// `deferred.phase.kind`, `deferred.outcome`, `deferred.actions`,
    /// `deferred.consecutive_flush_failures`, `deferred.cut_reason`, and
    /// `deferred.spans_lost` and `deferred.spans_dropped` with
    /// [`span_export_counts`](Self::span_export_counts)), in the
    /// invocation's trace (see [`PhaseReport::invocation_span`](crate::PhaseReport::invocation_span)), with a
    /// child span `deferred.action` per action and `deferred.flush` per flusher (only when
    /// the phase's span is recorded), and the
    /// histograms `deferred.phase.duration`, `deferred.action.duration` and
    /// `deferred.flush.duration` (seconds). Scope `lambda-deferred`.
    ///
    /// They are recorded when the phase is over, so they leave with the *next* phase's
    /// flush (or the final flush on SIGTERM): a phase cannot export its own span. The final
    /// flush's own ([`PhaseKind::Shutdown`](crate::PhaseKind::Shutdown)) has no flush after
    /// it: on SIGTERM it is a log line (and an `on_report` call) only. Set the
    /// global providers (`opentelemetry::global::set_tracer_provider`,
    /// `set_meter_provider`) before the first invocation; without them this costs next to
    /// nothing.
    ///
    /// They are recorded on the thread that ends the phase, before the environment is
    /// released, like the [`on_report`](Self::on_report) hook: with a batch span processor
    /// (the usual one) that only queues the spans, but a `SimpleSpanProcessor` exports each
    /// span as it ends, so a stalled exporter would hold the phase past its end (the chain
    /// then releases the environment at the end plus half the safety margin, and logs an
    /// error). Use a batch processor, or turn phase telemetry off.
    ///
    /// ```
    /// let deferred = deferred_core::Deferred::new().phase_telemetry(false);
    /// # let _ = deferred;
    /// ```
    pub fn phase_telemetry(mut self, enabled: bool) -> Self {
        self.config.phase_telemetry = enabled;
        self
    }

    /// Registers the internal extension (during init, before the runtime's first `next`) and
    /// arms the chain. Use it when you keep your own `lambda_runtime::run(…)` or
    /// `lambda_http::run(…)`; otherwise prefer [`run`](Self::run).
    ///
    /// Never fails for lack of Lambda: outside Lambda, or when registration is refused, it
    /// logs one line and deferred work runs inline before each response. It fails only when
    /// called a second time in the process ([`StartError::AlreadyStarted`]), for a setting
    /// that cannot work ([`StartError::InvalidSetting`]), or when polled outside a Tokio
    /// runtime ([`StartError::NoRuntime`]). The work runs in
    /// a task of its own: a caller that stops waiting (a `timeout` around it) does not stop
    /// it, and the core starts all the same, as Lambda, having registered the extension,
    /// expects.
    ///
    /// ```
    /// use deferred_core::{Deferred, Mode, StartError};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), StartError> {
    /// let deferred = Deferred::new().start().await?;
    /// assert_eq!(deferred.mode(), Mode::Inline); // not in Lambda
    /// assert!(matches!(Deferred::new().start().await, Err(StartError::AlreadyStarted)));
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// With your own `lambda_runtime::run`, call it before:
    ///
    /// ```no_run
    /// use deferred_core::{Deferred, deferred_handler};
    /// use lambda_runtime::{Error, LambdaEvent, service_fn};
    /// use serde_json::Value;
    ///
    /// #[deferred_handler]
    /// async fn handler(event: LambdaEvent<Value>) -> Result<Value, Error> {
    ///     Ok(event.payload)
    /// }
    ///
    /// #[tokio::main]
    /// async fn main() -> Result<(), Error> {
    ///     # let tracer_provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    ///     let _deferred = Deferred::new().flush(tracer_provider).start().await?;
    ///     lambda_runtime::run(service_fn(handler)).await
    /// }
    /// ```
    ///
    /// # Errors
    ///
    /// [`StartError::AlreadyStarted`] and [`StartError::InvalidSetting`], as above, and
    /// [`StartError::NoRuntime`] when polled outside a Tokio runtime:
    ///
    /// ```
    /// use deferred_core::{Deferred, StartError};
    /// use std::future::Future;
    /// use std::task::{Context, Poll, Waker};
    ///
    /// let mut start = std::pin::pin!(Deferred::new().start());
    /// let polled = start.as_mut().poll(&mut Context::from_waker(Waker::noop()));
    /// assert!(matches!(polled, Poll::Ready(Err(StartError::NoRuntime))));
    ///
    /// // Nothing was started: on a runtime, `start` works.
    /// let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    /// assert!(runtime.block_on(Deferred::new().start()).is_ok());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Panics
    ///
    /// In Lambda, on a runtime without the time driver (`enable_time`, which `#[tokio::main]`
    /// enables).
    pub async fn start(self) -> Result<DeferredHandle, StartError> {
        // Checked before the claim below: a refused setting leaves the process free to start.
        self.config.check()?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(StartError::NoRuntime);
        }
        // Claimed before registering: a second, concurrent `start` must not register an
        // extension that nobody drives (Lambda would hold init for its `event/next`).
        static STARTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if STARTING.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return Err(StartError::AlreadyStarted);
        }
        // A task of its own, so that a caller who stops waiting (a `timeout` around `start`)
        // does not drop a registration in flight: Lambda, having counted the extension in,
        // would hold init for its `event/next`, and no core would ever be installed.
        let setup = tokio::spawn(set_up(self.config));
        match setup.await {
            Ok(started) => started,
            Err(join) => std::panic::resume_unwind(join.try_into_panic().unwrap_or_else(|_| {
                Box::new("the runtime shut down while lambda-deferred was starting")
            })),
        }
    }

    /// [`start`](Self::start), then the Lambda runtime loop with `handler`, with the layer that
    /// starts each deferred phase once the response is out, and with the SnapStart resource
    /// ([`DeferredHandle::snapstart_resource`]). Same bounds as `lambda_runtime::run`. Should
    /// lambda_runtime's loop end with an error (an answer that does not serialize, a failed
    /// Runtime API call), the deferred work in flight and the final flush run first (see
    /// [`DeferredHandle::drain`]); then the error is returned.
    ///
    /// ```no_run
    /// use deferred_core::{Deferred, defer, deferred_handler};
    /// use lambda_runtime::{Error, LambdaEvent, service_fn};
    /// use serde_json::{Value, json};
    ///
    /// #[deferred_handler]
    /// async fn handler(event: LambdaEvent<Value>) -> Result<Value, Error> {
    ///     defer!("audit", async move { /* after the response */ });
    ///     Ok(json!({ "echo": event.payload }))
    /// }
    ///
    /// #[tokio::main]
    /// async fn main() -> Result<(), Error> {
    ///     Deferred::new().run(service_fn(handler)).await
    /// }
    /// ```
    ///
    /// # Errors
    ///
    /// [`start`](Self::start)'s errors, and those of lambda_runtime's loop.
    ///
    /// # Panics
    ///
    /// As [`start`](Self::start): in Lambda, on a runtime without the time driver. And, like
    /// `lambda_runtime::run`, outside Lambda or an emulator: lambda_runtime reads its
    /// configuration from the environment and panics without `AWS_LAMBDA_FUNCTION_NAME`,
    /// `AWS_LAMBDA_FUNCTION_MEMORY_SIZE` or `AWS_LAMBDA_FUNCTION_VERSION` ("Missing
    /// AWS_LAMBDA_FUNCTION_NAME env var"). To call a handler outside Lambda (a unit test), use
    /// [`start`](Self::start), which never fails for lack of Lambda, and call the handler.
    pub async fn run<A, F, R, B, S, D, E>(self, handler: F) -> Result<(), lambda_runtime::Error>
    where
        F: Service<LambdaEvent<A>, Response = R>,
        F::Future: Future<Output = Result<R, F::Error>>,
        F::Error: Into<Diagnostic> + fmt::Debug,
        A: for<'de> Deserialize<'de>,
        R: IntoFunctionResponse<B, S>,
        B: Serialize,
        S: futures_core::Stream<Item = Result<D, E>> + Unpin + Send + 'static,
        D: Into<bytes::Bytes> + Send,
        E: Into<lambda_runtime::Error> + Send + fmt::Debug,
    {
        let handle = self.start().await?;
        let ended = lambda_runtime::Runtime::new(handler)
            .layer(lambda_runtime::layers::TracingLayer::new())
            .layer(handle.layer())
            .register_snapstart_resource(handle.snapstart_resource())
            .run()
            .await;
        handle.drain_if_failed(ended).await
    }
}

impl Deferred {
    /// Like [`run`](Self::run), but with `lambda_runtime`'s concurrent loop: on Lambda Managed
    /// Instances it serves `AWS_LAMBDA_MAX_CONCURRENCY` invocations at once (deferred work then
    /// runs as background tasks); elsewhere it behaves as `run`. Same bounds as
    /// `lambda_runtime::run_concurrent`: the handler must be `Clone + Send`.
    ///
    /// ```no_run
    /// use deferred_core::{Deferred, defer, deferred_handler};
    /// use lambda_runtime::{Error, LambdaEvent, service_fn};
    /// use serde_json::Value;
    ///
    /// #[deferred_handler]
    /// async fn handler(event: LambdaEvent<Value>) -> Result<Value, Error> {
    ///     defer!("audit", async move { /* a background task on Managed Instances */ });
    ///     Ok(event.payload)
    /// }
    ///
    /// #[tokio::main]
    /// async fn main() -> Result<(), Error> {
    ///     Deferred::new().run_concurrent(service_fn(handler)).await
    /// }
    /// ```
    ///
    /// # Errors
    ///
    /// [`start`](Self::start)'s errors, and those of lambda_runtime's loop.
    ///
    /// # Panics
    ///
    /// As [`run`](Self::run): in Lambda, on a runtime without the time driver; outside Lambda
    /// (lambda_runtime's configuration is missing).
    pub async fn run_concurrent<A, F, R, B, S, D, E>(
        self,
        handler: F,
    ) -> Result<(), lambda_runtime::Error>
    where
        F: Service<LambdaEvent<A>, Response = R> + Clone + Send + 'static,
        F::Future: Future<Output = Result<R, F::Error>> + Send + 'static,
        F::Error: Into<Diagnostic> + fmt::Debug,
        A: for<'de> Deserialize<'de> + Send + 'static,
        R: IntoFunctionResponse<B, S> + Send + 'static,
        B: Serialize + Send + 'static,
        S: futures_core::Stream<Item = Result<D, E>> + Unpin + Send + 'static,
        D: Into<bytes::Bytes> + Send + 'static,
        E: Into<lambda_runtime::Error> + Send + fmt::Debug + 'static,
    {
        let handle = self.start().await?;
        let ended = lambda_runtime::Runtime::new(handler)
            .layer(lambda_runtime::layers::TracingLayer::new())
            .layer(handle.layer())
            .register_snapstart_resource(handle.snapstart_resource())
            .run_concurrent()
            .await;
        handle.drain_if_failed(ended).await
    }
}

/// The started core. Keep it if you build your own `lambda_runtime::Runtime` (add
/// [`layer`](Self::layer) to it); dropping it changes nothing.
///
/// ```
/// use deferred_core::{Deferred, defer, deferred_handler};
/// use lambda_runtime::{Context, Error, LambdaEvent};
///
/// #[deferred_handler]
/// async fn handler(_event: LambdaEvent<()>) -> Result<(), Error> {
///     defer!(async {});
///     Ok(())
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Error> {
/// let (reports, received) = std::sync::mpsc::channel();
/// let handle = Deferred::new()
///     .on_report(move |report| reports.send(report.actions.len()).unwrap())
///     .start()
///     .await?;
/// drop(handle); // the core stays installed for the process
/// handler(LambdaEvent::new((), Context::default())).await?;
/// assert_eq!(received.try_recv()?, 1);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct DeferredHandle {
    core: Arc<Core>,
}

impl DeferredHandle {
    /// Where deferred work runs in this process, decided once by [`Deferred::start`].
    ///
    /// ```
    /// use deferred_core::{Deferred, Mode};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), deferred_core::StartError> {
    /// let deferred = Deferred::new().start().await?;
    /// if deferred.mode() != Mode::Extension {
    ///     eprintln!("no extension: deferred work runs before each response");
    /// }
    /// assert_eq!(deferred.mode(), Mode::Inline); // outside Lambda
    /// # Ok(())
    /// # }
    /// ```
    pub fn mode(&self) -> Mode {
        self.core.mode
    }

    /// The layer that starts each phase after the response is posted. Add it last (outermost)
    /// to your `lambda_runtime::Runtime`.
    ///
    /// ```no_run
    /// use deferred_core::{Deferred, deferred_handler};
    /// use lambda_runtime::{Error, LambdaEvent, Runtime, service_fn};
    /// use serde_json::Value;
    ///
    /// #[deferred_handler]
    /// async fn handler(event: LambdaEvent<Value>) -> Result<Value, Error> {
    ///     Ok(event.payload)
    /// }
    ///
    /// #[tokio::main]
    /// async fn main() -> Result<(), Error> {
    ///     let deferred = Deferred::new().start().await?;
    ///     Runtime::new(service_fn(handler))
    ///         .layer(lambda_runtime::layers::TracingLayer::new())
    ///         .layer(deferred.layer()) // last = outermost: phases start after the POST
    ///         .register_snapstart_resource(deferred.snapstart_resource())
    ///         .run()
    ///         .await
    /// }
    /// ```
    pub fn layer(&self) -> DeferredLayer {
        DeferredLayer::new(self.core.clone())
    }

    /// The SnapStart resource that re-establishes the extension's `event/next` after a
    /// restore. [`Deferred::run`] and [`Deferred::run_concurrent`] register it; register it
    /// yourself when you build your own `lambda_runtime::Runtime` (the free functions
    /// `lambda_runtime::run` and `lambda_http::run` cannot register SnapStart resources):
    ///
    /// ```no_run
    /// use deferred_core::{Deferred, deferred_handler};
    /// use lambda_runtime::{Error, LambdaEvent, Runtime, service_fn};
    /// use serde_json::Value;
    ///
    /// #[deferred_handler]
    /// async fn handler(event: LambdaEvent<Value>) -> Result<Value, Error> {
    ///     Ok(event.payload)
    /// }
    ///
    /// #[tokio::main]
    /// async fn main() -> Result<(), Error> {
    ///     let deferred = Deferred::new().start().await?;
    ///     Runtime::new(service_fn(handler))
    ///         .layer(lambda_runtime::layers::TracingLayer::new())
    ///         .layer(deferred.layer())
    ///         .register_snapstart_resource(deferred.snapstart_resource())
    ///         .run()
    ///         .await
    /// }
    /// ```
    ///
    /// Under SnapStart (`AWS_LAMBDA_INITIALIZATION_TYPE=snap-start`) the extension's
    /// `event/next` is in flight when the snapshot is taken. After the restore, the resource
    /// resets the extension client's connection pool and has the chain send a fresh
    /// `event/next`: if Lambda refuses it because the call from before the snapshot still
    /// waits, the chain keeps that call (an extension that only acknowledges events, after a
    /// late registration, drops it and calls again until Lambda accepts); if the old call
    /// fails, or neither answers within 200 ms, it is abandoned and the fresh one replaces it.
    /// Lambda counts the old call as waiting even when its connection is dead, refuses fresh
    /// calls until it has written the first INVOKE event to it (lost), and accepts one after
    /// that: that invocation's deferred work runs
    /// without its event, outside the chain, and a kept call is then taken for dead and
    /// replaced. `after_restore` returns once this is settled (at most 1 s) and never fails;
    /// `before_snapshot` flushes what init produced (bounded by `flush_timeout`, then waits up
    /// to one more for a flush it abandoned, so that none crosses the snapshot; each at most
    /// 30 s, as init, this hook included, must end within 130 s, or the function's timeout if
    /// longer), so restored environments do not export it again. Without the resource, an
    /// `event/next` whose connection did not survive the snapshot is never answered: the first
    /// invocation after the restore then runs its deferred work inline and holds the
    /// environment until its deadline. Outside SnapStart the resource does nothing. When
    /// nothing holds an `event/next` (the inline and background modes, unless a late
    /// registration made the extension acknowledge events), `after_restore` has nothing to
    /// re-establish, but `before_snapshot` still flushes.
    pub fn snapstart_resource(&self) -> Arc<dyn lambda_runtime::SnapStartResource> {
        say_snapshot_flush_capped(&self.core.config, initialization_type_is("snap-start"));
        Arc::new(crate::snapstart::SnapStartHook::new(
            self.core.clone(),
            crate::snapstart::Restores::global(),
        ))
    }

    /// Lets the deferred work in flight finish, then runs the final flush, and returns its
    /// report: what the core does on SIGTERM, without the exit, and without SIGTERM's hurry.
    /// The work in flight gets until its own end (each phase's deadline minus the safety
    /// margin, plus half the margin for an aborted action to let go), or half of
    /// `shutdown_timeout` if that is later; what still runs then is cut,
    /// and the final flush gets half of `shutdown_timeout` from there (or what is left of the
    /// whole of it, if more), but never runs past the end of the last phase when that was
    /// still ahead as the drain began (its invocation may still be open, and Lambda stops the
    /// environment at its deadline): if the work in flight ran to that end, the final flush
    /// gets no time.
    ///
    /// For a function that runs its own loop after [`Deferred::start`]: when the
    /// loop ends with an error (lambda_runtime stops on an answer that does not serialize or
    /// a Runtime API call that fails), call it before returning the error, so the failed
    /// invocation's actions and the telemetry do not die with the process. `run` and
    /// `run_concurrent` do this themselves. Afterwards the core stops work at once (it is
    /// shutting down): call it only on the way out.
    ///
    /// ```no_run
    /// use deferred_core::{Deferred, deferred_handler};
    /// use lambda_runtime::{Error, LambdaEvent, service_fn};
    /// use serde_json::Value;
    ///
    /// #[deferred_handler]
    /// async fn handler(event: LambdaEvent<Value>) -> Result<Value, Error> {
    ///     Ok(event.payload)
    /// }
    ///
    /// #[tokio::main]
    /// async fn main() -> Result<(), Error> {
    ///     let deferred = Deferred::new().start().await?;
    ///     let ended = lambda_runtime::run(service_fn(handler)).await;
    ///     if ended.is_err() {
    ///         deferred.drain().await;
    ///     }
    ///     ended
    /// }
    /// ```
    pub async fn drain(&self) -> PhaseReport {
        crate::shutdown::final_flush_after(&self.core, self.core.work_until()).await
    }

    /// What the core does on SIGTERM, without the exit, for a function that handles SIGTERM
    /// itself ([`Deferred::handle_sigterm`]`(false)`): the work in flight gets half of
    /// `shutdown_timeout`, then what still runs is cut and the final flush runs, all within
    /// `shutdown_timeout`, so that it ends before Lambda's grace period does. Returns the final
    /// flush's report. Afterwards the core stops work at once: call it only on the way out.
    ///
    /// ```
    /// use deferred_core::{Deferred, PhaseKind};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), deferred_core::StartError> {
    /// let deferred = Deferred::new().handle_sigterm(false).start().await?;
    /// // In your SIGTERM handler, before your own cleanup and exit:
    /// let report = deferred.shutdown().await;
    /// assert_eq!(report.kind, PhaseKind::Shutdown);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn shutdown(&self) -> PhaseReport {
        crate::shutdown::final_flush(&self.core).await
    }

    /// For `run` and `run_concurrent`: lambda_runtime's loop ended with `ended`; on an error,
    /// [`drain`](Self::drain) before returning it.
    async fn drain_if_failed(
        &self,
        ended: Result<(), lambda_runtime::Error>,
    ) -> Result<(), lambda_runtime::Error> {
        if let Err(error) = &ended {
            tracing::error!(
                target: "deferred",
                %error,
                "the Lambda runtime loop ended with an error: the deferred work in flight \
                 runs, then the final flush, before the error is returned"
            );
            self.drain().await;
        }
        ended
    }
}

/// [`Deferred::start`]'s work, to its end whether or not the caller still waits: registers
/// the extension when it can, installs the core, and starts what drives it.
async fn set_up(config: Config) -> Result<DeferredHandle, StartError> {
    let (mode, registered) = choose_mode(config.register_timeout).await;
    let core = Core::new(config, mode);
    if !Core::install(core.clone()) {
        return Err(StartError::AlreadyStarted);
    }
    match registered {
        Registered::Chain(client, extension_id, chain) => {
            chain.begin(core.clone(), client, extension_id);
        }
        // Not dropped: should Lambda register us after all, it would wait for our
        // `event/next` before ending init.
        Registered::Late(pending) => {
            tokio::spawn(crate::late::pass_through(pending, core.clone()));
        }
        Registered::No => {}
    }
    let in_lambda = std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some();
    if core.config.handle_sigterm && in_lambda && mode != Mode::Inline {
        crate::shutdown::install(core.clone());
    }
    say_past_the_grace(&core.config, mode == Mode::Extension, in_lambda);
    Ok(DeferredHandle { core })
}

/// Says, once the extension is registered (by `start`, or late), that `shutdown_timeout` runs
/// past Lambda's grace after SIGTERM, if it does (see [`past_the_grace`]).
pub(crate) fn say_past_the_grace(config: &Config, registered: bool, in_lambda: bool) {
    if let Some(grace) = past_the_grace(config, registered, in_lambda) {
        tracing::warn!(
            target: "deferred",
            shutdown_timeout = ?config.shutdown_timeout,
            ?grace,
            "shutdown_timeout is longer than the time Lambda gives the runtime after SIGTERM: \
             a final flush still running then is killed, and the spans it carries are lost"
        );
    }
}

/// Says, where the SnapStart resource is made under SnapStart, that the flush before the
/// snapshot does not get all of `flush_timeout`, if it does not (see [`snapshot_flush_capped`]).
fn say_snapshot_flush_capped(config: &Config, snap_start: bool) {
    if let Some(limit) = snapshot_flush_capped(config, snap_start) {
        tracing::info!(
            target: "deferred",
            flush_timeout = ?config.flush_timeout,
            ?limit,
            "SnapStart: the flush before the snapshot gets at most {limit:?}, not all of \
             flush_timeout, and as long again for a flush it abandons: init, before_snapshot \
             included, must end within 130 s (or the function's timeout if longer)"
        );
    }
}

/// The limit that caps the flush of `before_snapshot` under SnapStart
/// ([`SNAPSHOT_FLUSH_LIMIT`](crate::snapstart::SNAPSHOT_FLUSH_LIMIT)), when `flush_timeout` is
/// longer and there is a flush.
fn snapshot_flush_capped(config: &Config, snap_start: bool) -> Option<Duration> {
    let limit = crate::snapstart::SNAPSHOT_FLUSH_LIMIT;
    (snap_start && !config.flushers.is_empty() && config.flush_timeout > limit).then_some(limit)
}

/// How long Lambda lets a runtime with an internal extension run after SIGTERM before it
/// sends SIGKILL: "up to 300 ms (500 ms for a runtime with an internal extension)" (Lambda
/// developer guide, "Extensions API", shutdown phase).
const SIGTERM_GRACE: Duration = Duration::from_millis(500);

/// The grace that `shutdown_timeout` overruns, when the core's own SIGTERM flush is bounded by
/// it in Lambda's usual environment with the extension `registered` (in time, or late: either
/// way Lambda sends SIGTERM and the core handles it); not on Managed Instances, which document
/// no such limit, and not where `drain` is all that uses it.
fn past_the_grace(config: &Config, registered: bool, in_lambda: bool) -> Option<Duration> {
    (config.handle_sigterm && in_lambda && registered && config.shutdown_timeout > SIGTERM_GRACE)
        .then_some(SIGTERM_GRACE)
}

/// What registering the extension gave `start`.
enum Registered {
    /// No extension: deferred work runs inline, or in the background.
    No,
    /// The registered extension's client and identifier, to drive the chain with, and the
    /// chain's thread.
    Chain(Arc<Client>, String, crate::chain::Prepared),
    /// A registration still unanswered at the register timeout.
    Late(crate::late::Pending),
}

/// Whether Lambda set `AWS_LAMBDA_INITIALIZATION_TYPE` to `value` (`on-demand`,
/// `provisioned-concurrency`, `snap-start` or `lambda-managed-instances`).
fn initialization_type_is(value: &str) -> bool {
    std::env::var("AWS_LAMBDA_INITIALIZATION_TYPE").as_deref() == Ok(value)
}

/// Decides where deferred work runs, registering the extension when it can.
async fn choose_mode(register_timeout: Duration) -> (Mode, Registered) {
    // Lambda Managed Instances run several invocations at once and never freeze; INVOKE
    // registration is refused there (Lambda Managed Instances docs). Only in Lambda: outside
    // it, nothing would drain the background tasks (no SIGTERM handler is installed there).
    if initialization_type_is("lambda-managed-instances")
        && std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some()
    {
        tracing::info!(target: "deferred", "Lambda Managed Instances: deferred work runs as background tasks, drained on SIGTERM");
        return (Mode::Background, Registered::No);
    }
    let client = match Client::from_env() {
        None => {
            tracing::info!(target: "deferred", "not running in Lambda (no AWS_LAMBDA_RUNTIME_API): deferred work runs inline before each response");
            return (Mode::Inline, Registered::No);
        }
        Some(Err(error)) => {
            tracing::warn!(target: "deferred", %error, "deferred work runs inline before each response");
            return (Mode::Inline, Registered::No);
        }
        Some(Ok(client)) => Arc::new(client),
    };
    // Unique per process; not the name of a file in /opt/extensions, so Lambda treats it as
    // an internal extension (Extensions API docs, "Extensions API reference").
    let name = format!("lambda-deferred-{}", std::process::id());
    let (authority, prefix) = client.endpoint();
    let (sent, out) = tokio::sync::oneshot::channel();
    let mut registration: crate::late::Registering = Box::pin(
        crate::extension::register::register(authority.into(), prefix.into(), name.clone(), sent),
    );
    let mut chain = None;
    let answer = tokio::time::timeout(register_timeout, async {
        // The chain's thread starts while Lambda answers (see `register.rs`).
        tokio::select! {
            biased;
            answer = &mut registration => return answer,
            Ok(()) = out => chain = Some(crate::chain::prepare()),
        }
        (&mut registration).await
    })
    .await;
    match answer {
        Ok(Ok(registration)) => {
            tracing::debug!(target: "deferred", extension = %name, "internal extension registered");
            let chain = chain.unwrap_or_else(crate::chain::prepare);
            (
                Mode::Extension,
                Registered::Chain(client, registration.extension_id, chain),
            )
        }
        Ok(Err(error)) => {
            log_refused(&error);
            (Mode::Inline, Registered::No)
        }
        Err(_) => {
            tracing::warn!(target: "deferred", timeout = ?register_timeout, "extension registration did not answer: deferred work runs inline before each response");
            let pending = crate::late::Pending {
                client,
                registration,
            };
            (Mode::Inline, Registered::Late(pending))
        }
    }
}

fn log_refused(error: &ClientError) {
    tracing::warn!(
        target: "deferred",
        %error,
        "extension registration failed: deferred work runs inline before each response (slower, nothing is lost)"
    );
}

impl Config {
    /// Refuses the settings that cannot work (see [`StartError::InvalidSetting`]).
    fn check(&self) -> Result<(), StartError> {
        let zero = [
            (
                "flush_timeout",
                self.flush_timeout,
                "a flush_timeout of zero leaves no time for the flush: nothing would ever be \
                 flushed (to flush nothing, add no flusher)",
            ),
            (
                "safety_margin",
                self.safety_margin,
                "a safety_margin of zero lets a phase that uses its budget (a stalled exporter) \
                 run to the deadline, so its event/next comes too late: Lambda times the \
                 invocation out and resets the environment",
            ),
            (
                "shutdown_timeout",
                self.shutdown_timeout,
                "a shutdown_timeout of zero leaves no time for the final flush on SIGTERM or \
                 drain (to leave SIGTERM to your own code, use handle_sigterm(false))",
            ),
            (
                "unclaimed_window",
                self.stray_window,
                "an unclaimed_window of zero gives up on every INVOKE event the moment it \
                 arrives, before its handler can claim it: under start() every handler's \
                 deferred work would run inline",
            ),
            (
                "register_timeout",
                self.register_timeout,
                "a register_timeout of zero gives up on the extension before the Runtime API \
                 can answer: every response would wait for its deferred work",
            ),
        ];
        if let Some((setting, _, reason)) = zero.into_iter().find(|(_, value, _)| value.is_zero()) {
            return Err(StartError::InvalidSetting { setting, reason });
        }
        // `bounded` made anything longer 15 minutes: no deadline is further away than that.
        if self.safety_margin >= crate::phase::MAX_FUNCTION_TIMEOUT {
            return Err(StartError::InvalidSetting {
                setting: "safety_margin",
                reason: "a safety_margin of 15 minutes or more (Lambda's longest function \
                         timeout) ends every phase before it begins: no action would ever \
                         run, nothing would be flushed before SIGTERM",
            });
        }
        Ok(())
    }
}

/// Lambda's longest function timeout: no setting needs more, and a larger one (`Duration::MAX`)
/// would overflow the clock arithmetic.
fn bounded(duration: Duration) -> Duration {
    duration.min(crate::phase::MAX_FUNCTION_TIMEOUT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(deferred: Deferred) -> Option<&'static str> {
        match deferred.config.check() {
            Err(StartError::InvalidSetting { setting, .. }) => Some(setting),
            _ => None,
        }
    }

    /// With a margin of zero, a phase whose flush stalls is cut at the deadline itself, and
    /// its `event/next` comes after it: on the emulator, every such invocation timed out.
    #[test]
    fn a_zero_safety_margin_is_refused() {
        let zero = Deferred::new().safety_margin(Duration::ZERO);
        assert_eq!(refused(zero), Some("safety_margin"));
        assert_eq!(
            refused(Deferred::new().safety_margin(Duration::from_millis(5))),
            None
        );
    }

    /// A margin no deadline can leave room for: in Lambda every phase's budget was zero, so
    /// every action was reported not run and no flush ran (on the emulator too).
    #[test]
    fn a_safety_margin_of_15_minutes_or_more_is_refused() {
        for margin in [Duration::from_secs(15 * 60), Duration::MAX] {
            let huge = Deferred::new().safety_margin(margin);
            assert_eq!(refused(huge), Some("safety_margin"), "{margin:?}");
        }
        let longest = Duration::from_secs(15 * 60) - Duration::from_millis(1);
        assert_eq!(refused(Deferred::new().safety_margin(longest)), None);
    }

    /// Under SnapStart, a `flush_timeout` longer than the flush before the snapshot may take
    /// is said where the SnapStart resource is made; not outside SnapStart, nor without a
    /// flusher.
    #[test]
    fn a_flush_timeout_past_the_snapshot_flush_limit_is_said_under_snapstart() {
        let limit = crate::snapstart::SNAPSHOT_FLUSH_LIMIT;
        let config = |timeout| {
            Deferred::new()
                .flush(crate::flush_fn("f", || Ok::<(), String>(())))
                .flush_timeout(timeout)
                .config
        };
        let long = config(limit + Duration::from_secs(1));
        assert_eq!(snapshot_flush_capped(&long, true), Some(limit));
        assert_eq!(snapshot_flush_capped(&config(limit), true), None);
        assert_eq!(snapshot_flush_capped(&long, false), None);
        let no_flusher = Deferred::new().flush_timeout(limit * 2).config;
        assert_eq!(snapshot_flush_capped(&no_flusher, true), None);
    }

    /// Lambda kills the runtime 500 ms after SIGTERM when an internal extension is registered:
    /// a longer `shutdown_timeout` is said at start, where the core's SIGTERM flush runs in
    /// Lambda's usual environment, and only there.
    #[test]
    fn a_shutdown_timeout_past_lambdas_grace_is_said_where_sigterm_is_handled() {
        let config = |ms, sigterm| {
            Deferred::new()
                .shutdown_timeout(Duration::from_millis(ms))
                .handle_sigterm(sigterm)
                .config
        };
        let over = config(800, true);
        assert_eq!(past_the_grace(&over, true, true), Some(SIGTERM_GRACE));
        assert_eq!(past_the_grace(&config(500, true), true, true), None);
        assert_eq!(past_the_grace(&Deferred::new().config, true, true), None);
        // Not the core's SIGTERM flush, or not in Lambda.
        assert_eq!(past_the_grace(&config(800, false), true, true), None);
        assert_eq!(past_the_grace(&over, true, false), None);
        // No extension registered (yet): Managed Instances, or inline.
        assert_eq!(past_the_grace(&over, false, true), None);
    }
}
