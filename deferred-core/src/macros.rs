//! `defer!` and `try_defer!`: they need no parsing, so they are `macro_rules!`.

/// Queues an action to run after the response of the current `#[deferred_handler]` invocation.
///
/// `defer!(future)` or `defer!("name", future)`. The future must be `Send + 'static` (use
/// `async move`) and yield `()` or `Result<(), E>` with `E: Display`; an `Err` or a panic is
/// reported in the deferred phase's report and does not stop later actions or the flush.
///
/// The action runs in the OpenTelemetry context that was current where `defer!` ran: with
/// `tracing-opentelemetry`, the spans it opens are children of the span that queued it, in
/// the invocation's trace. It does not enter that `tracing` span (the span would then end only
/// when the action does): an event that the action logs outside a span of its own does not
/// carry that span's fields in formatted log lines, and `tracing-opentelemetry` does not
/// record it in the trace (it records an event in the current `tracing` span only). Log
/// records of an OpenTelemetry `SdkLoggerProvider` still get the trace and span ids of the
/// span that queued the action. Open a span in the action for the rest.
///
/// Actions run one by one, in the order they were queued, then the telemetry flush: after the
/// response has been sent with the runtime layer (`Deferred::run`), or from when the handler
/// returns, beside the response, with `Deferred::start` alone and on Managed Instances.
///
/// # Panics
///
/// When called outside a `#[deferred_handler]` (or in a task spawned from one, which does not
/// inherit the handler's queue), past the queue's limit, or from an action abandoned at its
/// budget that runs on after its invocation's actions were over: the action would otherwise be
/// lost without a trace. Use [`try_defer!`](crate::try_defer) to handle those cases yourself.
///
/// # Examples
///
/// In the handler, or in any function it calls:
///
/// ```
/// use deferred_core::{defer, deferred_handler};
/// use lambda_runtime::{Context, Error, LambdaEvent};
/// use serde_json::{Value, json};
/// use std::sync::atomic::{AtomicU64, Ordering};
///
/// static VALIDATED: AtomicU64 = AtomicU64::new(0);
///
/// async fn validate(id: u64) {
///     VALIDATED.store(id, Ordering::SeqCst);
/// }
///
/// async fn audit(id: u64) -> Result<(), std::io::Error> {
///     Ok(())
/// }
///
/// fn schedule_audit(id: u64) {
///     // Not the handler itself, but called while it runs: the action joins its queue.
///     defer!("audit", audit(id));
/// }
///
/// #[deferred_handler]
/// async fn handler(event: LambdaEvent<Value>) -> Result<Value, Error> {
///     let id = event.payload["id"].as_u64().unwrap_or_default();
///     defer!(async move { validate(id).await }); // an async block
///     schedule_audit(id);
///     Ok(json!({ "status": 202, "id": id }))
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Error> {
/// // Called directly, as in a unit test: with no `Deferred::start()` in the process, the
/// // actions run inline before the handler returns.
/// handler(LambdaEvent::new(json!({ "id": 42 }), Context::default())).await?;
/// assert_eq!(VALIDATED.load(Ordering::SeqCst), 42);
/// # Ok(())
/// # }
/// ```
///
/// Outside a handler it panics:
///
/// ```should_panic
/// # use deferred_core::defer;
/// defer!(async {}); // panics: "defer! at … ran outside a #[deferred_handler]"
/// ```
#[macro_export]
macro_rules! defer {
    ($name:expr, $action:expr $(,)?) => {
        $crate::__private::defer_or_panic(
            $crate::__private::core::option::Option::Some(
                $crate::__private::core::convert::Into::into($name),
            ),
            $action,
        )
    };
    ($action:expr $(,)?) => {
        $crate::__private::defer_or_panic($crate::__private::core::option::Option::None, $action)
    };
}

/// Like [`defer!`], but returns `Result<(), DeferError>` instead of panicking when the action
/// cannot be queued: outside a `#[deferred_handler]` ([`DeferError::OutsideHandler`]), past
/// the queue's limit ([`DeferError::QueueFull`]), or from an action abandoned at its budget
/// that ran on after its invocation's actions were over ([`DeferError::PhaseOver`]).
///
/// `try_defer!(future)` or `try_defer!("name", future)`, with the same rules as [`defer!`].
///
/// [`DeferError`]: crate::DeferError
/// [`DeferError::OutsideHandler`]: crate::DeferError::OutsideHandler
/// [`DeferError::QueueFull`]: crate::DeferError::QueueFull
/// [`DeferError::PhaseOver`]: crate::DeferError::PhaseOver
///
/// ```
/// use deferred_core::{DeferError, try_defer};
///
/// // Code shared between a handler and a background job: the job has no invocation to attach
/// // the action to, so it gets an error, and does the work itself.
/// async fn refresh_cache() {}
///
/// async fn after_update() {
///     match try_defer!("refresh cache", refresh_cache()) {
///         Ok(()) => {} // queued: runs after the response
///         Err(DeferError::OutsideHandler { .. }) => refresh_cache().await,
///         Err(error) => eprintln!("{error}"),
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// after_update().await; // not in a handler: refreshes at once
/// assert!(matches!(
///     try_defer!(async {}),
///     Err(DeferError::OutsideHandler { .. })
/// ));
/// # }
/// ```
#[macro_export]
macro_rules! try_defer {
    ($name:expr, $action:expr $(,)?) => {
        $crate::__private::defer(
            $crate::__private::core::option::Option::Some(
                $crate::__private::core::convert::Into::into($name),
            ),
            $action,
        )
    };
    ($action:expr $(,)?) => {
        $crate::__private::defer($crate::__private::core::option::Option::None, $action)
    };
}
