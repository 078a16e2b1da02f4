//! The OpenTelemetry setup the test fixtures and the examples use: OTLP/HTTP (protobuf)
//! exporters for traces, metrics and logs, the SDK's thread-based batch processors, and a
//! `tracing` subscriber that feeds spans to OpenTelemetry and prints to stderr.
//!
//! # What a user of these providers needs to know (opentelemetry_sdk / opentelemetry-otlp 0.33.1)
//!
//! - **`force_flush` blocks the calling thread.** Every provider's `force_flush` sends a
//!   message to its processor's worker thread and waits on a `std::sync::mpsc` channel. Call
//!   it from `tokio::task::spawn_blocking` (or a plain thread), never from an async task: on a
//!   current-thread runtime it would also stop everything else on that runtime.
//! - **Traces and logs: a flush waits at most 5 s for the worker's answer** (hard-coded
//!   `forceflush_timeout`, see [`PROCESSOR_FLUSH_TIMEOUT`]); past that it returns an error
//!   (`OTelSdkError::Timeout(5s)`, which `SdkTracerProvider::force_flush` wraps as
//!   `InternalFailure("errs: [Err(Timeout(5s))]")`). The worker thread itself is **not**
//!   interrupted: it stays inside the export until the exporter gives up, and a later flush
//!   queues behind it. The batch processors' `OTEL_BSP_EXPORT_TIMEOUT` is ignored by the
//!   thread-based processor.
//! - **Metrics: `SdkMeterProvider::force_flush` has no timeout of its own.** The periodic
//!   reader waits (`recv()`) until its worker has collected and exported; only the exporter's
//!   timeout bounds it.
//! - **The exporter's request timeout** is what really bounds an export: programmatic
//!   `.with_timeout(d)` (what [`build`] and [`init`] pass), else `OTEL_EXPORTER_OTLP_{TRACES,
//!   METRICS,LOGS}_TIMEOUT`, else `OTEL_EXPORTER_OTLP_TIMEOUT` (milliseconds), else
//!   **10 s** ([`DEFAULT_EXPORT_TIMEOUT`]). With the blocking reqwest client it is the
//!   client's whole-request timeout, and it is also the deadline of the retry loop: a retry
//!   starts only before it has run out, and then has a whole timeout of its own, so an export
//!   can last up to about twice the timeout. Keep twice it below the time you can afford to
//!   wait for a flush: with the default 10 s, a stalled collector makes a trace flush fail
//!   after 5 s but keeps the worker busy for 10 s (nearly 20 s after a late 504).
//! - **Retries:** network errors and HTTP 429, 502, 503, 504 are retried (3 retries,
//!   backoff from 100 ms, capped at 1.6 s); other statuses (500, 400, …) fail at once. A 429
//!   or 503 with `Retry-After: n` (seconds) waits n s (at most 30) before the retry if that
//!   ends within the timeout, and fails the export at once otherwise. A 200 whose body is not
//!   a valid `Export*ServiceResponse` counts as success (it is only logged at debug level).
//! - **Periodic exports:** spans are also exported every 5 s (`OTEL_BSP_SCHEDULE_DELAY`) or
//!   when 512 are queued, metrics every 60 s (`OTEL_METRIC_EXPORT_INTERVAL`).
//!
//! # HTTP client choice
//!
//! opentelemetry-otlp 0.33 offers three HTTP clients: `reqwest-blocking-client`,
//! `reqwest-client` and `hyper-client`. The SDK's batch span processor, batch log processor
//! and periodic reader run the export with `futures_executor::block_on` on their own OS
//! thread, where no Tokio runtime exists, so the two async clients do not work with them.
//! This crate uses `reqwest-blocking-client` (reqwest without default features: no TLS, no
//! HTTP/2; plain `http://` to a local collector is all the tests need). If some other crate
//! in the build enables `reqwest-client` or `hyper-client` on opentelemetry-otlp, the
//! exporter builder prefers that async client and exports fail: keep those features out of
//! the workspace.

use std::error::Error;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{LogExporter, MetricExporter, Protocol, SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::logs::SdkLoggerProvider;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{BatchSpanProcessor, SdkTracerProvider};
use tracing_subscriber::filter::{EnvFilter, LevelFilter};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{Layer as _, fmt};

/// The error type of this module's fallible functions.
pub type BoxError = Box<dyn Error + Send + Sync>;

/// The exporter's request timeout when neither code nor environment sets one (10 s).
pub const DEFAULT_EXPORT_TIMEOUT: Duration = opentelemetry_otlp::OTEL_EXPORTER_OTLP_TIMEOUT_DEFAULT;

/// How long the SDK's batch span processor and batch log processor wait for their worker
/// to answer a `force_flush` (5 s, hard-coded in opentelemetry_sdk 0.33, not configurable).
pub const PROCESSOR_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// The environment variable [`init_from_env`] reads the collector's base URL from.
pub const ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// The environment variable [`export_timeout_from_env`] reads (milliseconds).
pub const TIMEOUT_ENV: &str = "OTEL_EXPORTER_OTLP_TIMEOUT";

/// The three SDK providers, each exporting OTLP/HTTP protobuf to the same collector.
///
/// Cloning a provider is cheap and shares it. Dropping the last clone shuts it down, which
/// exports what is left and may block up to 5 s: drop or [`shutdown`](Telemetry::shutdown)
/// off the async runtime when the collector may be stalled.
#[derive(Debug, Clone)]
pub struct Telemetry {
    /// How many spans the span exporter delivered and lost (for
    /// `Deferred::span_export_counts`).
    pub span_counts: std::sync::Arc<deferred_core::ExportCounts>,
    /// Spans, through a [`BatchSpanProcessor`] (its own thread).
    pub tracer_provider: SdkTracerProvider,
    /// Metrics, through a [`PeriodicReader`] (its own thread).
    pub meter_provider: SdkMeterProvider,
    /// Log records, through a batch log processor (its own thread). Nothing bridges
    /// `tracing` events to it; emit through the `opentelemetry::logs` API.
    pub logger_provider: SdkLoggerProvider,
    service_name: String,
}

impl Telemetry {
    /// A `tracing` subscriber: a registry with a `tracing-opentelemetry` layer that exports
    /// spans at `INFO` and above through [`tracer_provider`](Self::tracer_provider), and a fmt
    /// layer to stderr filtered by `RUST_LOG` (default `info`). `RUST_LOG` does not change
    /// what is exported.
    ///
    /// Install it globally with [`init`], or for a scope with
    /// `tracing::subscriber::set_default(telemetry.subscriber())` (handy in tests, where
    /// only one global subscriber may exist per process).
    pub fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync + 'static {
        let tracer = self.tracer_provider.tracer(self.service_name.clone());
        let otel = tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(LevelFilter::INFO);
        let env_filter =
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
        // Plain text when stderr is captured (by the emulator, or Lambda's log collector).
        let stderr = fmt::layer()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .with_filter(env_filter);
        tracing_subscriber::registry().with(otel).with(stderr)
    }

    /// Flushes the three providers one after the other and returns the first error.
    /// **Blocks** (up to 5 s per trace or log flush, up to the export timeout for metrics):
    /// call it from `spawn_blocking`.
    pub fn force_flush(&self) -> Result<(), BoxError> {
        let traces = self.tracer_provider.force_flush();
        let metrics = self.meter_provider.force_flush();
        let logs = self.logger_provider.force_flush();
        traces?;
        metrics?;
        logs?;
        Ok(())
    }

    /// Shuts the three providers down (exporting what is left). **Blocks**, like
    /// [`force_flush`](Self::force_flush).
    pub fn shutdown(&self) -> Result<(), BoxError> {
        let traces = self.tracer_provider.shutdown();
        let metrics = self.meter_provider.shutdown();
        let logs = self.logger_provider.shutdown();
        traces?;
        metrics?;
        logs?;
        Ok(())
    }
}

/// Builds the providers for the collector at `endpoint` (a base URL such as
/// `http://127.0.0.1:4318`; `/v1/traces`, `/v1/metrics` and `/v1/logs` are appended), with
/// `service.name` = `service_name` and the exporters' request timeout `export_timeout`.
/// Installs nothing globally.
///
/// May be called from inside a Tokio runtime: opentelemetry-otlp creates the blocking HTTP
/// client on a helper thread.
pub fn build(
    endpoint: &str,
    service_name: &str,
    export_timeout: Duration,
) -> Result<Telemetry, BoxError> {
    let base = endpoint.trim_end_matches('/');
    let resource = Resource::builder()
        .with_service_name(service_name.to_owned())
        .build();

    let span_exporter = SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(format!("{base}/v1/traces"))
        .with_timeout(export_timeout)
        .build()?;
    // Counted, so phase reports can say how many spans a failed export lost, and how many the
    // batch processor dropped on a full queue.
    let span_exporter = deferred_core::CountingSpanExporter::new(span_exporter);
    let span_counts = span_exporter.counts();
    let batch = BatchSpanProcessor::builder(span_exporter).build();
    let tracer_provider = SdkTracerProvider::builder()
        .with_resource(resource.clone())
        .with_span_processor(deferred_core::CountingSpanProcessor::new(
            batch,
            span_counts.clone(),
        ))
        .build();

    let metric_exporter = MetricExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(format!("{base}/v1/metrics"))
        .with_timeout(export_timeout)
        .build()?;
    let meter_provider = SdkMeterProvider::builder()
        .with_resource(resource.clone())
        .with_reader(PeriodicReader::builder(metric_exporter).build())
        .build();

    let log_exporter = LogExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(format!("{base}/v1/logs"))
        .with_timeout(export_timeout)
        .build()?;
    let logger_provider = SdkLoggerProvider::builder()
        .with_resource(resource)
        .with_batch_exporter(log_exporter)
        .build();

    Ok(Telemetry {
        span_counts,
        tracer_provider,
        meter_provider,
        logger_provider,
        service_name: service_name.to_owned(),
    })
}

/// [`build`]s the providers, installs [`Telemetry::subscriber`] as the global `tracing`
/// subscriber, and registers the tracer and meter providers as OpenTelemetry's globals
/// (`opentelemetry::global::tracer(…)`, `meter(…)`). Fails if a global `tracing` subscriber
/// is already installed.
pub fn init(
    endpoint: &str,
    service_name: &str,
    export_timeout: Duration,
) -> Result<Telemetry, BoxError> {
    let telemetry = build(endpoint, service_name, export_timeout)?;
    telemetry.subscriber().try_init()?;
    opentelemetry::global::set_tracer_provider(telemetry.tracer_provider.clone());
    opentelemetry::global::set_meter_provider(telemetry.meter_provider.clone());
    Ok(telemetry)
}

/// [`init`] with the endpoint from `OTEL_EXPORTER_OTLP_ENDPOINT` (required) and the timeout
/// from [`export_timeout_from_env`] (else [`DEFAULT_EXPORT_TIMEOUT`]): what a fixture
/// binary started by a test calls.
pub fn init_from_env(service_name: &str) -> Result<Telemetry, BoxError> {
    let endpoint = std::env::var(ENDPOINT_ENV)
        .map_err(|error| format!("{ENDPOINT_ENV} must name the OTLP/HTTP collector: {error}"))?;
    let timeout = export_timeout_from_env().unwrap_or(DEFAULT_EXPORT_TIMEOUT);
    init(&endpoint, service_name, timeout)
}

/// The export timeout set by `OTEL_EXPORTER_OTLP_TIMEOUT` (whole milliseconds), if it is
/// set and valid.
pub fn export_timeout_from_env() -> Option<Duration> {
    std::env::var(TIMEOUT_ENV)
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_millis)
}

/// The OpenTelemetry trace id (32 hex digits) of the current `tracing` span, as the
/// [`Telemetry::subscriber`] layer assigned it; all zeros outside a span.
pub fn current_trace_id() -> String {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    tracing::Span::current()
        .context()
        .span()
        .span_context()
        .trace_id()
        .to_string()
}
