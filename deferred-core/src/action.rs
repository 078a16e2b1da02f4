//! What `defer!` accepts, and how an action is stored until its phase runs.

use std::borrow::Cow;
use std::fmt::{self, Display};
use std::future::Future;
use std::panic::Location;
use std::pin::Pin;

/// The boxed future of a queued action, resolved to `Err(message)` when the action failed.
pub(crate) type BoxAction = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'static>>;

/// What a deferred action may yield: `()`, or `Result<(), E>` whose error is reported.
#[diagnostic::on_unimplemented(
    message = "a deferred action must yield `()` or `Result<(), E>` with `E: Display`, not `{Self}`",
    label = "this is what the action's future yields",
    note = "an `Err` is reported in the deferred phase's report, like a panic; return `()` or map the error"
)]
pub trait Outcome: Send + 'static {
    /// `Err(message)` when the action failed.
    fn into_result(self) -> Result<(), String>;
}

impl Outcome for () {
    fn into_result(self) -> Result<(), String> {
        Ok(())
    }
}

impl<E: Display + Send + 'static> Outcome for Result<(), E> {
    fn into_result(self) -> Result<(), String> {
        self.map_err(|e| e.to_string())
    }
}

/// A future that `defer!` can queue: `Send + 'static`, yielding an [`Outcome`].
#[diagnostic::on_unimplemented(
    message = "`defer!` needs a future, such as `async move {{ … }}`, but `{Self}` is not a future",
    label = "not a future",
    note = "to defer a plain function call, wrap it: `defer!(async move {{ notify(id) }})`; to defer an `async fn`, call it without `.await`: `defer!(notify(id))`"
)]
pub trait DeferredAction: Send + 'static {
    /// Boxes the action for the queue.
    fn into_boxed(self) -> BoxAction;
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
