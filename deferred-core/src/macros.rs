//! `defer!` and `try_defer!`: they need no parsing, so they are `macro_rules!`.

/// Queues an action to run after the response of the current `#[deferred_handler]` invocation.
///
/// `defer!(future)` or `defer!("name", future)`. The future must be `Send + 'static` (use
/// `async move`) and yield `()` or `Result<(), E>` with `E: Display`; an `Err` or a panic is
/// reported in the deferred phase's report and does not stop later actions or the flush.
///
/// Actions run one by one, in the order they were queued, after the response has been sent and
/// before the telemetry flush.
///
/// # Panics
///
/// When called outside a `#[deferred_handler]` (or in a task spawned from one, which does not
/// inherit the handler's queue), or past the queue's limit: the action would otherwise be lost
/// without a trace. Use [`try_defer!`] to handle those cases yourself.
///
/// ```
/// # use deferred_core::defer;
/// # async fn validate(_: u64) {}
/// # fn handler_body(id: u64) {
/// defer!(async move { validate(id).await });
/// defer!("audit", async move { Ok::<(), std::io::Error>(()) });
/// # }
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
/// cannot be queued.
///
/// ```
/// # use deferred_core::{try_defer, DeferError};
/// // Outside a deferred handler the action is handed back as an error, never dropped silently.
/// let result = try_defer!("cleanup", async {});
/// assert!(matches!(result, Err(DeferError::OutsideHandler { .. })));
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
