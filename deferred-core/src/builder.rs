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
#[derive(Debug, Default)]
#[must_use = "a Deferred does nothing until `.start()` or `.run(…)`"]
pub struct Deferred {
    config: Config,
}

/// Why [`Deferred::start`] failed. Registration problems are not errors: the core falls back
/// to running deferred work inline, with one log line.
#[derive(Debug)]
#[non_exhaustive]
pub enum StartError {
    /// `start` (or `run`) was called a second time in this process.
    AlreadyStarted,
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AlreadyStarted => f.write_str(
                "lambda-deferred is already started in this process (Deferred::start or run \
                 may be called once)",
            ),
        }
    }
}

impl std::error::Error for StartError {}

impl Deferred {
    /// A builder with the defaults: no flushers, `flush_timeout` 10 s, safety margin 100 ms.
    pub fn new() -> Self {
        Self::default()
    }

    /// Flushes `flush` after every invocation, after the deferred actions. Any number of
    /// flushers may be added; they flush concurrently, each on its own blocking thread.
    pub fn flush(mut self, flush: impl Flush) -> Self {
        self.config.flushers.push(Flusher::new(flush));
        self
    }

    /// Caps the flush of each phase (default 10 s); `#[deferred_handler(flush_timeout = …)]`
    /// overrides it per handler.
    pub fn flush_timeout(mut self, timeout: Duration) -> Self {
        self.config.flush_timeout = bounded(timeout);
        self
    }

    /// How long before the invocation's deadline the deferred phase must be over (default
    /// 100 ms). Lambda stops the environment at the deadline, extension time included.
    pub fn safety_margin(mut self, margin: Duration) -> Self {
        self.config.safety_margin = bounded(margin);
        self
    }

    /// The most actions one invocation may queue (default 1000); `defer!` past it panics,
    /// `try_defer!` returns [`DeferError::QueueFull`](crate::DeferError::QueueFull).
    pub fn max_actions(mut self, limit: usize) -> Self {
        self.config.max_actions = limit;
        self
    }

    /// The time allowed for the final flush on SIGTERM (default 400 ms; Lambda kills the
    /// process 500 ms after SIGTERM when only internal extensions are registered).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.config.shutdown_timeout = bounded(timeout);
        self
    }

    /// How long `start` waits for the extension's registration before it gives up and runs
    /// deferred work inline (default 5 s; Lambda's whole init phase has 10 s). Should the
    /// registration answer later, the extension only acknowledges events from then on, so
    /// Lambda never waits for it.
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
    /// off when the function handles SIGTERM itself.
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
    /// layer closes such invocations at once and the window never applies.
    pub fn unclaimed_window(mut self, window: Duration) -> Self {
        self.config.stray_window = bounded(window);
        self
    }

    /// Calls `hook` with the report of every deferred phase (after it is logged), e.g. to
    /// alert on repeated flush failures. It runs on the phase's task: keep it short.
    pub fn on_report(mut self, hook: impl Fn(&PhaseReport) + Send + Sync + 'static) -> Self {
        self.config.on_report = Some(ReportHook(Arc::new(hook)));
        self
    }

    /// Counts of a [`CountingSpanExporter`](crate::CountingSpanExporter): each report then
    /// says how many spans were lost (their export failed) since the previous one, in
    /// [`PhaseReport::spans_lost`](crate::PhaseReport::spans_lost), its log line and its
    /// `deferred.phase` span.
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
    /// `deferred.phase.kind`, `deferred.outcome`, `deferred.cut_reason`) with a child span
    /// `deferred.action` per action and `deferred.flush` per flusher, and the histograms
    /// `deferred.phase.duration`, `deferred.action.duration` and `deferred.flush.duration`
    /// (seconds). Scope `lambda-deferred`.
    ///
    /// They are recorded when the phase is over, so they leave with the *next* phase's
    /// flush (or the final flush on SIGTERM): a phase cannot export its own span. Set the
    /// global providers (`opentelemetry::global::set_tracer_provider`,
    /// `set_meter_provider`) before the first invocation; without them this costs next to
    /// nothing.
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
    /// logs one line and deferred work runs inline before each response.
    pub async fn start(self) -> Result<DeferredHandle, StartError> {
        if Core::global().is_some() {
            return Err(StartError::AlreadyStarted);
        }
        let config = self.config;
        let (mode, chain) = choose_mode(config.register_timeout).await;
        let core = Core::new(config, mode);
        if !Core::install(core.clone()) {
            return Err(StartError::AlreadyStarted);
        }
        if let Some((client, extension_id)) = chain {
            tokio::spawn(crate::chain::drive(core.clone(), client, extension_id));
        }
        let in_lambda = std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some();
        if core.config.handle_sigterm && in_lambda && mode != Mode::Inline {
            crate::shutdown::install(core.clone());
        }
        Ok(DeferredHandle { core })
    }

    /// [`start`](Self::start), then the Lambda runtime loop with `handler`, with the layer that
    /// starts each deferred phase once the response is out. Same bounds as
    /// `lambda_runtime::run`.
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
        lambda_runtime::Runtime::new(handler)
            .layer(lambda_runtime::layers::TracingLayer::new())
            .layer(handle.layer())
            .register_snapstart_resource(handle.snapstart_resource())
            .run()
            .await
    }
}

impl Deferred {
    /// Like [`run`](Self::run), but with `lambda_runtime`'s concurrent loop: on Lambda Managed
    /// Instances it serves `AWS_LAMBDA_MAX_CONCURRENCY` invocations at once (deferred work then
    /// runs as background tasks); elsewhere it behaves as `run`. Same bounds as
    /// `lambda_runtime::run_concurrent`.
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
        lambda_runtime::Runtime::new(handler)
            .layer(lambda_runtime::layers::TracingLayer::new())
            .layer(handle.layer())
            .register_snapstart_resource(handle.snapstart_resource())
            .run_concurrent()
            .await
    }
}

/// The started core. Keep it if you build your own `lambda_runtime::Runtime` (add
/// [`layer`](Self::layer) to it); dropping it changes nothing.
#[derive(Debug, Clone)]
pub struct DeferredHandle {
    core: Arc<Core>,
}

impl DeferredHandle {
    /// Where deferred work runs in this process.
    pub fn mode(&self) -> Mode {
        self.core.mode
    }

    /// The layer that starts each phase after the response is posted. Add it last (outermost)
    /// to your `lambda_runtime::Runtime`.
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
    /// waits, that call is kept; if the old call fails, or stays silent for 200 ms, it is
    /// abandoned and the fresh one replaces it. `after_restore` returns once this is settled
    /// (at most 1 s) and never fails; `before_snapshot` does nothing. Without the resource, an
    /// `event/next` whose connection did not survive the snapshot is never answered: the first
    /// invocation after the restore then runs its deferred work inline and holds the
    /// environment until its deadline. Outside SnapStart, and in the inline and background
    /// modes, the resource does nothing.
    pub fn snapstart_resource(&self) -> Arc<dyn lambda_runtime::SnapStartResource> {
        Arc::new(crate::snapstart::SnapStartHook::new(
            self.core.clone(),
            crate::snapstart::Restores::global(),
        ))
    }
}

/// Decides where deferred work runs, registering the extension when it can.
async fn choose_mode(register_timeout: Duration) -> (Mode, Option<(Arc<Client>, String)>) {
    // Lambda Managed Instances run several invocations at once and never freeze; INVOKE
    // registration is refused there (Lambda Managed Instances docs).
    if std::env::var("AWS_LAMBDA_INITIALIZATION_TYPE").as_deref() == Ok("lambda-managed-instances")
    {
        tracing::info!(target: "deferred", "Lambda Managed Instances: deferred work runs as background tasks, drained on SIGTERM");
        return (Mode::Background, None);
    }
    let client = match Client::from_env() {
        None => {
            tracing::info!(target: "deferred", "not running in Lambda (no AWS_LAMBDA_RUNTIME_API): deferred work runs inline before each response");
            return (Mode::Inline, None);
        }
        Some(Err(error)) => {
            tracing::warn!(target: "deferred", %error, "deferred work runs inline before each response");
            return (Mode::Inline, None);
        }
        Some(Ok(client)) => Arc::new(client),
    };
    // Unique per process; not the name of a file in /opt/extensions, so Lambda treats it as
    // an internal extension (Extensions API docs, "Extensions API reference").
    let name = format!("lambda-deferred-{}", std::process::id());
    let (registering, registered_as) = (client.clone(), name.clone());
    let mut registration =
        Box::pin(async move { registering.register(&registered_as, &["INVOKE"]).await });
    match tokio::time::timeout(register_timeout, &mut registration).await {
        Ok(Ok(registration)) => {
            tracing::debug!(target: "deferred", extension = %name, "internal extension registered");
            (Mode::Extension, Some((client, registration.extension_id)))
        }
        Ok(Err(error)) => {
            log_refused(&error);
            (Mode::Inline, None)
        }
        Err(_) => {
            tracing::warn!(target: "deferred", timeout = ?register_timeout, "extension registration did not answer: deferred work runs inline before each response");
            // Not dropped: should Lambda register us after all, it would wait for our
            // `event/next` before ending init.
            tokio::spawn(crate::late::pass_through(client, registration));
            (Mode::Inline, None)
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

/// Lambda's longest function timeout: no setting needs more, and a larger one (`Duration::MAX`)
/// would overflow the clock arithmetic.
fn bounded(duration: Duration) -> Duration {
    duration.min(Duration::from_secs(15 * 60))
}
