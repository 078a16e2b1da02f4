//! What `defer!` accepts, and how an action is stored until its phase runs.

use std::borrow::Cow;
use std::fmt::{self, Display};
use std::future::Future;
use std::panic::Location;
use std::pin::Pin;

/// The boxed future of a queued action, resolved to `Err(message)` when the action failed.
pub(crate) type BoxAction = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'static>>;

/// What a deferred action may yield: `()`, or `Result<(), E>` whose error is reported.
///
/// Implemented for `()` and for `Result<(), E>` with `E: Display`; anything else is refused
/// at compile time. A failed action is reported as
/// [`ActionOutcome::Failed`](crate::ActionOutcome::Failed) with the error's text, and does not
/// stop the later actions or the flush.
///
/// ```
/// use deferred_core::{defer, deferred_handler};
/// use lambda_runtime::{Error, LambdaEvent};
/// use serde_json::Value;
///
/// # async fn refresh_cache() {}
/// # async fn send_receipt(_: &Value) -> Result<(), std::io::Error> { Ok(()) }
/// #[deferred_handler]
/// async fn handler(event: LambdaEvent<Value>) -> Result<(), Error> {
///     defer!(refresh_cache()); // yields ()
///     let order = event.payload.clone();
///     defer!("receipt", async move { send_receipt(&order).await }); // yields Result<(), io::Error>
///     Ok(())
/// }
/// ```
///
/// An action that yields anything else does not compile:
///
/// ```compile_fail,E0277
/// # use deferred_core::{defer, deferred_handler};
/// # use lambda_runtime::{Error, LambdaEvent};
/// # use serde_json::Value;
/// #[deferred_handler]
/// async fn handler(event: LambdaEvent<Value>) -> Result<(), Error> {
///     defer!(async { 42 }); // error: a deferred action must yield `()` or `Result<(), E>`
///     Ok(())
/// }
/// ```
#[diagnostic::on_unimplemented(
    message = "a deferred action must yield `()` or `Result<(), E>` with `E: Display`, not `{Self}`",
    label = "this is what the action's future yields",
    note = "an `Err` is reported in the deferred phase's report, like a panic; return `()` or map the error"
)]
pub trait Outcome: Send + 'static {
    /// `Err(message)` when the action failed: the text that the report shows, the error's
    /// `Display` in its alternate form (`{:#}`), which `anyhow` and `eyre` errors use to show
    /// their causes ("sending the receipt: connection refused").
    ///
    /// ```
    /// use deferred_core::Outcome;
    ///
    /// assert_eq!(().into_result(), Ok(()));
    /// let failed: Result<(), std::io::Error> = Err(std::io::Error::other("queue full"));
    /// assert_eq!(failed.into_result(), Err("queue full".to_string()));
    /// ```
    fn into_result(self) -> Result<(), String>;
}

impl Outcome for () {
    fn into_result(self) -> Result<(), String> {
        Ok(())
    }
}

impl<E: Display + Send + 'static> Outcome for Result<(), E> {
    fn into_result(self) -> Result<(), String> {
        self.map_err(|e| format!("{e:#}"))
    }
}

/// The return type of a function pointer: it names `!` on stable Rust, where `!` itself may
/// not be written as a type yet. Public only so that the impl below is (through `__private`).
pub trait Returns {
    /// `R` of `fn() -> R`.
    type Output;
}

impl<R> Returns for fn() -> R {
    type Output = R;
}

/// `!`, the type of an action that can only panic: `async { panic!("…") }` yields it in edition
/// 2024 (where a diverging block no longer falls back to `()`). It never yields a value; its
/// panic is reported like any action's.
///
/// ```
/// # use deferred_core::{defer, deferred_handler};
/// # use lambda_runtime::{Error, LambdaEvent};
/// # use serde_json::Value;
/// #[deferred_handler]
/// async fn handler(event: LambdaEvent<Value>) -> Result<(), Error> {
///     defer!("unreachable", async { panic!("a state the handler ruled out") });
///     Ok(())
/// }
/// ```
// Left out of the "other types implement `Outcome`" hint, which would print it by its
// stand-in name: a diverging action is not what a wrong output type is missing.
#[diagnostic::do_not_recommend]
impl Outcome for <fn() -> ! as Returns>::Output {
    fn into_result(self) -> Result<(), String> {
        match self {}
    }
}

/// A future that `defer!` can queue: `Send + 'static`, yielding an [`Outcome`].
///
/// Implemented for every such future: an `async move` block, or the call of an `async fn`
/// (not awaited). The action runs after the response, so it may not borrow from the handler:
/// move what it needs into it.
///
/// ```
/// use deferred_core::DeferredAction;
///
/// fn queue(_: impl DeferredAction) {}
///
/// async fn notify(id: u64) -> Result<(), std::io::Error> { Ok(()) }
///
/// let id = 7;
/// queue(notify(id)); // an async fn call, not awaited
/// queue(async move { notify(id).await.ok(); }); // an async block that yields ()
/// ```
///
/// A plain closure is not a future, and an action may not borrow a local:
///
/// ```compile_fail,E0277
/// # use deferred_core::DeferredAction;
/// # fn queue(_: impl DeferredAction) {}
/// queue(|| println!("not a future"));
/// ```
///
/// ```compile_fail,E0373
/// # use deferred_core::DeferredAction;
/// # fn queue(_: impl DeferredAction) {}
/// let order = String::from("o-1");
/// queue(async { println!("{}", &order) }); // borrows `order`: not 'static
/// ```
///
/// Sealed: it cannot be implemented outside this crate, so it may gain methods (the queue's
/// needs) in a minor release.
///
/// ```compile_fail,E0277
/// use deferred_core::DeferredAction;
/// use std::future::Future;
/// use std::pin::Pin;
///
/// struct Mine;
/// impl DeferredAction for Mine {
///     fn into_boxed(self) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> {
///         Box::pin(async { Ok(()) })
///     }
/// }
/// ```
#[diagnostic::on_unimplemented(
    message = "`defer!` needs a future, such as `async move {{ … }}`, but `{Self}` is not a future",
    label = "not a future",
    note = "to defer a plain function call, wrap it: `defer!(async move {{ notify(id) }})`; to defer an `async fn`, call it without `.await`: `defer!(notify(id))`"
)]
pub trait DeferredAction: sealed::Sealed + Send + 'static {
    /// Boxes the action for the queue, its output turned into a `Result<(), String>` with
    /// [`Outcome::into_result`]. `defer!` calls it; you need not.
    ///
    /// ```
    /// use deferred_core::DeferredAction;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let action = async { Err::<(), _>("no route to host") }.into_boxed();
    /// assert_eq!(action.await, Err("no route to host".to_string()));
    /// # }
    /// ```
    fn into_boxed(self) -> BoxAction;
}

/// Sealed: every future that can be an action already is one, and the trait may gain methods
/// (the queue's needs) without breaking an implementation outside this crate.
mod sealed {
    pub trait Sealed {}

    impl<F> Sealed for F
    where
        F: std::future::Future + Send + 'static,
        F::Output: super::Outcome,
    {
    }
}

impl<F> DeferredAction for F
where
    F: Future + Send + 'static,
    F::Output: Outcome,
{
    fn into_boxed(self) -> BoxAction {
        Box::pin(async move { self.await.into_result() })
    }
}

/// One queued action: its future and what the report says about it.
pub(crate) struct Action {
    pub(crate) name: Option<Cow<'static, str>>,
    pub(crate) location: &'static Location<'static>,
    pub(crate) future: BoxAction,
}

impl Action {
    pub(crate) fn label(&self) -> ActionLabel {
        ActionLabel {
            name: self.name.clone(),
            location: self.location,
        }
    }
}

impl fmt::Debug for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.label(), f)
    }
}

/// How an action is named in reports: its name if it has one, and where it was queued.
///
/// Its `Display` is the form the phase's log line uses: `"name" (file:line:column)`, or
/// `action at file:line:column` for an unnamed action.
///
/// ```
/// use deferred_core::{Deferred, defer, deferred_handler};
/// use lambda_runtime::{Context, Error, LambdaEvent};
/// use std::sync::{Arc, Mutex};
///
/// #[deferred_handler]
/// async fn handler(_event: LambdaEvent<()>) -> Result<(), Error> {
///     defer!("notify", async {});
///     defer!(async {});
///     Ok(())
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Error> {
/// let labels = Arc::new(Mutex::new(Vec::new()));
/// let seen = labels.clone();
/// // Outside Lambda the phase runs inline, before the handler returns.
/// Deferred::new()
///     .on_report(move |report| {
///         let mut seen = seen.lock().unwrap();
///         seen.extend(report.actions.iter().map(|a| a.label.clone()));
///     })
///     .start()
///     .await?;
/// handler(LambdaEvent::new((), Context::default())).await?;
///
/// let labels = labels.lock().unwrap();
/// assert_eq!(labels[0].name.as_deref(), Some("notify"));
/// assert!(labels[0].to_string().starts_with("\"notify\" ("));
/// assert_eq!(labels[1].name, None);
/// assert!(labels[1].to_string().starts_with("action at "));
/// # Ok(())
/// # }
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct ActionLabel {
    /// The name given to `defer!("name", …)`, if any.
    pub name: Option<Cow<'static, str>>,
    /// Where `defer!` was called.
    pub location: &'static Location<'static>,
}

impl fmt::Debug for ActionLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Display for ActionLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(name) => write!(f, "\"{name}\" ({})", self.location),
            None => write!(f, "action at {}", self.location),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error that shows its cause only in its alternate form, as `anyhow` and `eyre` do.
    struct WithCause;

    impl Display for WithCause {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("sending the receipt")?;
            if f.alternate() {
                f.write_str(": connection refused")?;
            }
            Ok(())
        }
    }

    /// A failed action is reported with its error's causes, where the error shows them in its
    /// alternate form. Found by review: `to_string` left them out.
    #[test]
    fn a_failed_action_is_reported_with_its_causes() {
        let failed: Result<(), WithCause> = Err(WithCause);
        assert_eq!(
            failed.into_result(),
            Err("sending the receipt: connection refused".to_owned())
        );
    }
}
