//! Run telemetry flushes and deferred actions after an AWS Lambda function has answered.
//!
//! A handler annotated `#[deferred_handler]` returns its response at once; the actions it
//! queued with [`defer!`] and the flush of every registered [`Flush`] (the OpenTelemetry SDK
//! providers, or anything wrapped with [`flush_fn`]) run after the response, while an
//! in-process (internal) Lambda extension keeps the environment from freezing until they are
//! done.
//!
//! ```no_run
//! use deferred_core::{defer, deferred_handler, Deferred};
//! use lambda_runtime::{service_fn, Error, LambdaEvent};
//! use serde_json::{json, Value};
//!
//! #[deferred_handler(flush_timeout = "2s")]
//! async fn handler(event: LambdaEvent<Value>) -> Result<Value, Error> {
//!     let id = 42;
//!     defer!("notify", async move { notify(id).await });   // after the response
//!     Ok(json!({ "status": 202, "id": id }))
//! }
//! # async fn notify(_: u64) {}
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Error> {
//!     let tracer_provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
//!     Deferred::new()
//!         .flush(tracer_provider.clone())
//!         .run(service_fn(handler))
//!         .await
//! }
//! ```
//!
//! # How it works: the chained `event/next`
//!
//! Lambda neither freezes an environment nor delivers the next invocation while a registered
//! extension has not called `GET /extension/event/next`. The core registers an internal
//! extension during init and keeps exactly one `event/next` call in flight; the next call is
//! made only when the previous invocation's deferred phase has ended:
//!
//! ```text
//!  runtime:    next ──► handler ──► POST response ──► next ─────────────────────► handler N+1
//!  caller:                          ◄── response (at once)
//!  extension:  event/next ──► INVOKE N            [ actions… ─► flush ] ──► event/next ──► INVOKE N+1
//!                                                  └─ deferred phase ──┘
//!  Lambda:                                        environment held until here, then frozen
//! ```
//!
//! With [`Deferred::run`] a `lambda_runtime` layer starts the phase once the response has been
//! POSTed and the invocation's span has closed, so that span is in the same flush.
//!
//! # Budget
//!
//! The phase ends before the invocation's deadline minus a safety margin (100 ms by
//! default). The flush keeps a reserve of `flush_timeout`, but at most half of the time left,
//! and the actions are cut before they eat into it. Flushers run concurrently, each on a
//! thread of its own; one that overruns is abandoned, reported, and skipped while it still
//! runs.
//!
//! # Observability
//!
//! Every phase reports itself, as a [`PhaseReport`], in three ways:
//!
//! - a `tracing` event with target `deferred`: `info` when the phase is clean, `warn`
//!   otherwise, its message the report's `Display`;
//! - the hook given to [`Deferred::on_report`];
//! - OpenTelemetry, through the global providers (scope `lambda-deferred`; turned off with
//!   [`Deferred::phase_telemetry`]): a span `deferred.phase` (attributes `faas.invocation_id`,
//!   `deferred.phase.kind`, `deferred.outcome`, `deferred.actions`,
//!   `deferred.consecutive_flush_failures`, `deferred.cut_reason`, `deferred.spans_lost`,
//!   `deferred.spans_dropped`),
//!   a child of the span current when the handler started
//!   ([`PhaseReport::invocation_span`]: the invocation's span with `tracing-opentelemetry`),
//!   with a child span `deferred.action` per action and `deferred.flush` per flusher, and the
//!   histograms `deferred.phase.duration`, `deferred.action.duration` and
//!   `deferred.flush.duration` (seconds).
//!
//! The spans and metrics are recorded from the report once the phase is over, with its
//! timestamps. A phase cannot export its own span, since its flush is part of it: the span of
//! phase N goes out with phase N+1's flush, or with the final flush on SIGTERM. Set the global
//! providers before the first invocation.
//!
//! A failed flush does not say how many spans it lost. Wrap the span exporter in a
//! [`CountingSpanExporter`] and give its counts to [`Deferred::span_export_counts`]: each report
//! then carries `spans_lost` ([`PhaseReport::spans_lost`]), the spans whose export failed since
//! the previous report. Its `deferred.phase` span has it as the attribute `deferred.spans_lost`.
//! When it is not zero the phase is not clean: its log line is a `warn` with a `spans_lost`
//! field, and its message contains "N spans lost (their export failed)" ("1 span lost" for
//! one). Spans the batch processor drops on a full queue never reach an exporter: wrap the
//! processor in a [`CountingSpanProcessor`] with the same counts, and a report after a clean
//! flush carries them too ([`PhaseReport::spans_dropped`], at least that many).
//!
//! # Fallbacks
//!
//! Outside Lambda, when registration fails, or while the chain is broken, deferred work runs
//! inline before the handler returns: slower, but nothing is lost. On Lambda Managed
//! Instances it runs as background tasks. On SIGTERM the core runs the final flush within
//! `shutdown_timeout` (400 ms by default, inside the 500 ms Lambda gives a function with an
//! internal extension), then exits.
//!
//! # OpenTelemetry versions
//!
//! This release is built against `opentelemetry` and `opentelemetry_sdk` **0.33**, and their
//! types are part of its API: [`Flush`] is implemented for the 0.33 providers,
//! [`CountingSpanExporter`] and [`CountingSpanProcessor`] implement the 0.33 traits,
//! [`PhaseReport::invocation_span`] is a 0.33 `SpanContext`, and phase telemetry is recorded
//! through the 0.33 global providers. Use the same versions, or the re-exports
//! [`deferred_core::opentelemetry`](crate::opentelemetry) and
//! [`deferred_core::opentelemetry_sdk`](crate::opentelemetry_sdk). With another version, a
//! provider does not implement `Flush` (error E0277, naming two versions of
//! `opentelemetry_sdk`), and a provider set with that version's `opentelemetry::global` is not
//! the one phase telemetry records through: the `deferred.*` spans and metrics are dropped
//! without a word. Moving to a newer OpenTelemetry is a breaking release of this crate.
//!
//! ```
//! use deferred_core::Deferred;
//! use deferred_core::opentelemetry_sdk::trace::SdkTracerProvider; // the version Flush is for
//!
//! let provider = SdkTracerProvider::builder().build();
//! deferred_core::opentelemetry::global::set_tracer_provider(provider.clone());
//! let deferred = Deferred::new().flush(provider);
//! # let _ = deferred;
//! ```
//!
//! # lambda_runtime version
//!
//! This release is built against `lambda_runtime` **1.x** (and `lambda_http` 1.x with the
//! `http` feature). A function that depends on another version (0.13, say) has two
//! `LambdaEvent` types, which do not mix: `#[deferred_handler]` says it "cannot find the
//! Lambda context in an argument of type `LambdaEvent<T>`", and [`Deferred::run`] that the
//! handler's signature does not match (error E0631). `cargo tree -d` lists the crates present
//! in two versions.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

// The README's Rust examples that are not `ignore`d compile as doctests, so that the first
// code a user copies cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;

mod action;
mod builder;
mod chain;
mod context;
mod core;
mod counting;
pub mod extension;
mod flush;
#[cfg(test)]
mod harness;
mod invocation;
mod late;
mod layer;
mod macros;
mod otel;
mod phase;
mod report;
mod runner;
mod scope;
mod shutdown;
mod snapstart;

pub use action::{ActionLabel, DeferredAction, Outcome};
pub use builder::{Deferred, DeferredHandle, StartError};
pub use context::{HandlerInput, Invocation};
pub use core::Mode;
pub use counting::{CountingSpanExporter, CountingSpanProcessor, ExportCounts};
pub use deferred_macros::deferred_handler;
pub use flush::{Flush, FlushError, FlushFn, flush_fn};
pub use layer::{DeferredLayer, DeferredService, ResponseFuture};
pub use report::{
    ActionOutcome, ActionReport, CutReason, FlushOutcome, FlushReport, PhaseKind, PhaseReport,
};
pub use scope::DeferError;

/// The `opentelemetry` this release is built against (see
/// [OpenTelemetry versions](crate#opentelemetry-versions)).
#[doc(no_inline)]
pub use opentelemetry;
/// The `opentelemetry_sdk` this release is built against, whose providers implement [`Flush`]
/// (see [OpenTelemetry versions](crate#opentelemetry-versions)).
#[doc(no_inline)]
pub use opentelemetry_sdk;

/// What the code generated by `#[deferred_handler]` and `defer!` calls. Not a public API: it
/// changes without notice.
#[doc(hidden)]
pub mod __private {
    pub use crate::action::Returns;
    pub use crate::context::{HandlerInput, Invocation};
    pub use crate::scope::{Options, defer, defer_or_panic, scope};
    pub use ::core;

    /// A value of any type, for the `return` the macro puts, never taken, first in a handler's
    /// body: it fixes the body's output type. A call, not `loop {}`, so the expansion has no
    /// unreachable code to `allow` (an `allow` under the user's `forbid` is error E0453); a
    /// trait, so the call can start with a `<` spanned at the user's return type, where
    /// rustc's "return type inferred here" then points.
    pub trait FakeReturn {
        /// Never called.
        fn fake_return() -> Self;
    }

    impl<T> FakeReturn for T {
        fn fake_return() -> T {
            unreachable!("the fake return of #[deferred_handler] is never taken")
        }
    }

    /// `!` under a name, for the `let` that ends a `-> !` handler (`let _: ! = …` is
    /// unstable; a function pointer's return type is not).
    pub type Never = <fn() -> ! as FnOutput>::Output;

    /// The return type of a function pointer.
    pub trait FnOutput {
        /// The type.
        type Output;
    }

    impl<T> FnOutput for fn() -> T {
        type Output = T;
    }

    /// Moves the handler's argument into its body, under the user's name or pattern: a call,
    /// as `let _event = _event;` would trip `clippy::no_effect_underscore_binding`.
    pub fn rebind<T>(value: T) -> T {
        value
    }

    /// The invocation a handler argument belongs to.
    pub fn invocation<T: HandlerInput + ?Sized>(input: &T) -> Invocation {
        input.invocation()
    }

    /// When the deferred phase of an invocation ending at `deadline` must be over, keeping
    /// `margin` spare (the phase budget). For the fuzz targets (`fuzz/`) and their corpus replay.
    pub fn phase_end(
        deadline: Option<std::time::SystemTime>,
        margin: std::time::Duration,
    ) -> std::time::Instant {
        crate::phase::Budget::new(deadline, margin).end.into_std()
    }

    /// One answer read by the extension's `event/next` line: `(status, body, whether the
    /// connection stays open, how many of the connection's bytes were read through its end)`,
    /// or why it failed.
    pub type LineAnswer = Result<(u16, Vec<u8>, bool, usize), crate::extension::ClientError>;

    /// The answers the extension's `event/next` line reads on a connection where the API sends
    /// `reads` (each what one read returns) and then closes, each as if its request were out,
    /// until the first error or an answer that ends the connection; `None` if the reader waited for more while every byte
    /// was there (a hang, on a socket). For the fuzz target `line_answers` (`fuzz/`) and its
    /// corpus replay.
    pub fn line_answers(reads: &[&[u8]]) -> Option<Vec<LineAnswer>> {
        crate::extension::line::answers_from(reads)
    }
}
