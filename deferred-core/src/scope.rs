//! The invocation scope: the task-local queue that `defer!` pushes onto.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::panic::Location;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use opentelemetry::context::FutureExt as _;
use opentelemetry::trace::TraceContextExt as _;

use crate::action::{Action, ActionLabel, DeferredAction};
use crate::context::Invocation;
use crate::report::{ActionReport, CutReason};

/// Options that `#[deferred_handler(...)]` passes for one handler.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// `flush_timeout = "…"`: caps this handler's flush; `None` keeps the builder's.
    pub flush_timeout: Option<Duration>,
}

// What the attribute writes, so that it names `core` nowhere (`::core` is another crate under
// a crate root's `extern crate … as core;`), and so that a wrong `crate = "…"` is one error:
// rustc dedups its "could not find" errors, but not those that suggest an import from `std`.
impl Options {
    /// No argument: the builder's flush timeout.
    pub const DEFAULT: Self = Self {
        flush_timeout: None,
    };

    /// `flush_timeout = "…"`, in nanoseconds.
    pub const fn flush_timeout_nanos(nanos: u64) -> Self {
        Self {
            flush_timeout: Some(Duration::from_nanos(nanos)),
        }
    }
}

/// Why `try_defer!` could not queue an action.
///
/// Its `Display` says "try_defer! at …"; `defer!` panics with the same message, saying
/// "defer! at …".
///
/// ```
/// use deferred_core::{DeferError, Deferred, deferred_handler, try_defer};
/// use lambda_runtime::{Context, Error, LambdaEvent};
///
/// #[deferred_handler]
/// async fn handler(_event: LambdaEvent<()>) -> Result<(), Error> {
///     try_defer!("first", async {})?;
///     let second = try_defer!("second", async {});
///     assert!(matches!(second, Err(DeferError::QueueFull { limit: 1, .. })));
///     Ok(())
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Error> {
/// Deferred::new().max_actions(1).start().await?;
/// handler(LambdaEvent::new((), Context::default())).await?;
///
/// // Not in a handler: nothing to attach the action to.
/// let error = try_defer!(async {}).unwrap_err();
/// assert!(matches!(error, DeferError::OutsideHandler { .. }));
/// assert!(error.to_string().contains("outside a #[deferred_handler]"));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeferError {
    /// Called outside a `#[deferred_handler]`'s dynamic extent (or in a task spawned from it,
    /// which does not inherit the handler's queue).
    OutsideHandler {
        /// Where `try_defer!` (or `defer!`) was called.
        location: &'static Location<'static>,
    },
    /// The invocation already holds the maximum number of actions.
    QueueFull {
        /// Where `try_defer!` (or `defer!`) was called.
        location: &'static Location<'static>,
        /// The limit (`Deferred::max_actions`).
        limit: usize,
    },
    /// Called by an action after its invocation's actions were over: an action abandoned at
    /// its budget (or at SIGTERM) that ran on. Nothing would run what it queues.
    PhaseOver {
        /// Where `try_defer!` (or `defer!`) was called.
        location: &'static Location<'static>,
    },
}

impl DeferError {
    /// The message, naming `called`, the macro that was called: the error is returned by
    /// `try_defer!` only, and `defer!` panics with the message naming itself.
    fn say(&self, called: &str, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OutsideHandler { location } => write!(
                f,
                "{called} at {location} ran outside a #[deferred_handler]: there is no invocation \
                 to attach the action to (a task spawned with tokio::spawn does not inherit the \
                 handler's queue; queue the action in the handler itself)"
            ),
            Self::QueueFull { location, limit } => write!(
                f,
                "{called} at {location}: this invocation already holds {limit} deferred actions, \
                 the limit set by Deferred::max_actions"
            ),
            Self::PhaseOver { location } => write!(
                f,
                "{called} at {location} ran after its invocation's deferred actions were over (in \
                 an action abandoned at its budget): nothing would run it"
            ),
        }
    }
}

/// Says "try_defer! at …": only `try_defer!` returns the error.
impl fmt::Display for DeferError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.say("try_defer!", f)
    }
}

/// A [`DeferError`]'s message for `defer!`'s panic: "defer! at …".
struct Panicked(DeferError);

impl fmt::Display for Panicked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.say("defer!", f)
    }
}

impl std::error::Error for DeferError {}

/// The actions of one invocation, shared by the handler's task and, during the phase, by the
/// actions themselves (an action may queue more).
#[derive(Debug)]
pub(crate) struct Queue {
    actions: Mutex<Actions>,
    limit: usize,
}

#[derive(Debug, Default)]
struct Actions {
    queued: VecDeque<Action>,
    /// An action left running by a phase that was dropped while it awaited it (a timeout
    /// around the handler, during an inline phase): the next phase of this queue waits for it
    /// (or cuts it) before it starts the next action, so the actions still run one at a time.
    running: Option<RunningAction>,
    /// The phase found the queue empty and went on: a later push would never run.
    closed: bool,
    /// Actions queued with `defer!` so far, run or not (what `max_actions` limits), including
    /// those of earlier calls in the invocation ([`Queue::after`]).
    pushed: usize,
    /// The `flush_timeout`s of deferred handlers called in this scope (a router calling its
    /// route's handler, or an action calling a deferred handler): the invocation's one flush
    /// gets the longest of its handlers', as when calls in a row join one phase
    /// ([`Job::join`](crate::phase::Job::join)).
    nested: NestedFlush,
    /// The builder's `flush_timeout`, once the job is made ([`Queue::flush_timeout`]): for a
    /// handler without one of its own that an action calls later.
    builder_flush: Option<Duration>,
    /// Of `pushed`, the earlier calls' (already counted where they are queued).
    before: usize,
    /// What a phase of this queue that was dropped before it reported had done (a timeout
    /// around the handler, during an inline phase): for the report of the phase that takes the
    /// queue over, which then covers every action queued.
    unreported: Unreported,
}

/// See [`Actions::unreported`]: the reports of the actions a dropped phase finished (or
/// skipped), in queue order, and what it cut.
#[derive(Debug, Default)]
pub(crate) struct Unreported {
    pub(crate) actions: Vec<ActionReport>,
    pub(crate) cut: Vec<CutReason>,
}

/// See [`Actions::nested`]: whether a nested handler had no `flush_timeout` of its own (the
/// builder's then counts), and the longest one given.
#[derive(Debug, Default, Clone, Copy)]
struct NestedFlush {
    default: bool,
    longest: Option<Duration>,
}

impl NestedFlush {
    /// `base`, or longer if a nested handler asked for more, or had none of its own and the
    /// builder's `default` is longer.
    fn over(self, base: Duration, default: Option<Duration>) -> Duration {
        let nested_default = default.filter(|_| self.default).unwrap_or_default();
        base.max(self.longest.unwrap_or_default())
            .max(nested_default)
    }
}

/// An action's task, started by a phase that is gone.
#[derive(Debug)]
pub(crate) struct RunningAction {
    pub(crate) label: ActionLabel,
    pub(crate) task: tokio::task::JoinHandle<Result<(), String>>,
    /// When the phase that is gone started it: the phase that takes it over reports it from
    /// then, as the one that started it never reports.
    pub(crate) started: tokio::time::Instant,
}

/// See [`Queue::next`].
#[derive(Debug)]
pub(crate) enum Next {
    Running(RunningAction),
    Queued(Action),
}

impl Queue {
    pub(crate) fn new(limit: usize) -> Arc<Self> {
        Self::after(limit, 0)
    }

    /// The queue of a later call of a deferred handler in an invocation whose earlier calls
    /// queued `before` actions (their job held for the phase this one joins): `limit` is the
    /// invocation's (`max_actions`), not each call's.
    pub(crate) fn after(limit: usize, before: usize) -> Arc<Self> {
        Arc::new(Self {
            actions: Mutex::new(Actions {
                pushed: before,
                before,
                ..Actions::default()
            }),
            limit,
        })
    }

    /// Notes the options of a deferred handler called in this scope: its `flush_timeout`
    /// counts for the invocation's flush ([`flush_timeout`](Self::flush_timeout)).
    fn nest(&self, options: Options) {
        let nested = &mut lock(&self.actions).nested;
        match options.flush_timeout {
            Some(timeout) => nested.longest = nested.longest.max(Some(timeout)),
            None => nested.default = true,
        }
    }

    /// The flush timeout of the invocation whose outermost handler asked for `own` (`None`:
    /// the builder's `default`): the longest of its handlers'. Keeps `default`, for the
    /// handlers that its actions call later ([`flush_timeout_after_actions`](Self::flush_timeout_after_actions)).
    pub(crate) fn flush_timeout(&self, own: Option<Duration>, default: Duration) -> Duration {
        let mut actions = lock(&self.actions);
        actions.builder_flush = Some(default);
        actions.nested.over(own.unwrap_or(default), Some(default))
    }

    /// The flush timeout of this queue's phase once its actions have run: `settled` (the
    /// job's), or longer if a deferred handler that an action called asked for more (or had
    /// none of its own, and the builder's is longer). Such a call comes after the job was
    /// made, and the flush comes after every action.
    pub(crate) fn flush_timeout_after_actions(&self, settled: Duration) -> Duration {
        let actions = lock(&self.actions);
        actions.nested.over(settled, actions.builder_flush)
    }

    /// Actions queued so far, run or not (see [`Queue::after`]).
    pub(crate) fn pushed(&self) -> usize {
        lock(&self.actions).pushed
    }

    fn push(&self, action: Action) -> Result<(), DeferError> {
        let mut actions = lock(&self.actions);
        if actions.closed {
            return Err(DeferError::PhaseOver {
                location: action.location,
            });
        }
        // Every action queued counts, also those the phase has taken off already: actions
        // that queue more must not get past the limit.
        if actions.pushed >= self.limit {
            return Err(DeferError::QueueFull {
                location: action.location,
                limit: self.limit,
            });
        }
        actions.pushed += 1;
        actions.queued.push_back(action);
        Ok(())
    }

    /// What a phase does next: wait for the action a dropped phase left running, or start the
    /// next queued one; when there is neither, closes the queue (in the same step, so that no
    /// action queued meanwhile is left behind).
    pub(crate) fn next(&self) -> Option<Next> {
        let mut actions = lock(&self.actions);
        if let Some(running) = actions.running.take() {
            return Some(Next::Running(running));
        }
        let next = actions.queued.pop_front();
        actions.closed = next.is_none();
        next.map(Next::Queued)
    }

    /// Moves `other`'s queued actions to the end of this queue, in their order: a later call
    /// of a deferred handler in the same invocation joins the first call's phase.
    pub(crate) fn append(&self, other: &Queue) {
        let (moved, added) = {
            let mut other = lock(&other.actions);
            (
                std::mem::take(&mut other.queued),
                other.pushed.saturating_sub(other.before),
            )
        };
        let mut actions = lock(&self.actions);
        actions.queued.extend(moved);
        // Counted here too: actions of the joined phase that queue more stay within the limit.
        actions.pushed += added;
    }

    /// Leaves what a dropped phase of this queue did to the next phase's report: its action
    /// reports come first there (they started before that phase: offset 0).
    pub(crate) fn carry(&self, mut unreported: Unreported) {
        for action in &mut unreported.actions {
            action.offset = Duration::ZERO;
        }
        let mut actions = lock(&self.actions);
        actions.unreported.actions.append(&mut unreported.actions);
        actions.unreported.cut.append(&mut unreported.cut);
    }

    /// What dropped phases of this queue did and did not report ([`Queue::carry`]).
    pub(crate) fn take_unreported(&self) -> Unreported {
        std::mem::take(&mut lock(&self.actions).unreported)
    }

    /// Hands the running action of a dropped phase to the next phase of this queue.
    pub(crate) fn adopt(&self, running: RunningAction) {
        lock(&self.actions).running = Some(running);
    }

    /// The actions still to run (or to wait for), the one left running included.
    pub(crate) fn len(&self) -> usize {
        let actions = lock(&self.actions);
        actions.queued.len() + usize::from(actions.running.is_some())
    }
}

/// Locks a mutex, ignoring poisoning: every critical section here leaves the data consistent.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Polls `future` to its end, catching a panic out of any of its polls: its output, or the
/// panic's payload (it is not polled again after a panic).
pub(crate) async fn caught<F: Future>(mut future: Pin<&mut F>) -> std::thread::Result<F::Output> {
    std::future::poll_fn(|cx| {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| future.as_mut().poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    })
    .await
}

tokio::task_local! {
    static QUEUE: Arc<Queue>;
}

/// Runs `future` with `queue` as the target of `defer!`.
pub(crate) fn with_queue<F: Future>(
    queue: Arc<Queue>,
    future: F,
) -> tokio::task::futures::TaskLocalFuture<Arc<Queue>, F> {
    QUEUE.scope(queue, future)
}

/// Queues `action` on the current invocation.
#[track_caller]
pub fn defer<A: DeferredAction>(
    name: Option<Cow<'static, str>>,
    action: A,
) -> Result<(), DeferError> {
    let location = Location::caller();
    // In the OpenTelemetry context that was current where `defer!` ran (tracing-opentelemetry
    // activates the entered span's): the action's spans join the invocation's trace, as
    // children of the span that queued it, and that trace's spans are all in this phase's
    // flush. Not inside that `tracing` span itself: entered at every poll of the action, the
    // span would end (tracing-opentelemetry takes its last exit) only after the action, so the
    // invocation's span would last until its deferred work was done, not until the response.
    //
    // That span by its `SpanContext` only: the OpenTelemetry API ends a span when the last
    // `Context` holding it is dropped (`Tracer::in_span`, `mark_span_as_active`), so a
    // `Context` kept by the action would hold it open until the action was over too.
    // (`with_remote_span_context` keeps the span context's own `is_remote`: a local one stays local.)
    let context = opentelemetry::Context::current();
    let context = if context.has_active_span() {
        let span = context.span().span_context().clone();
        context.with_remote_span_context(span)
    } else {
        context
    };
    let action = Action {
        name,
        location,
        future: Box::pin(action.into_boxed().with_context(context)),
    };
    match QUEUE.try_with(|queue| queue.push(action)) {
        Ok(result) => result,
        Err(_) => Err(DeferError::OutsideHandler { location }),
    }
}

/// [`defer`], panicking with the error's message (naming `defer!`) when the action cannot be
/// queued.
#[track_caller]
pub fn defer_or_panic<A: DeferredAction>(name: Option<Cow<'static, str>>, action: A) {
    if let Err(error) = defer(name, action) {
        panic!("{}", Panicked(error));
    }
}

/// Runs a handler's body in an invocation scope, then hands its queue to the core.
///
/// A deferred handler called by another (a router calling the route's handler), or by one
/// of its deferred actions, runs in the caller's scope: its actions join the caller's queue
/// and run in the invocation's one phase (after the caller's body, or after the action that
/// called it), and its `flush_timeout` counts for that phase's flush (the longest of the
/// invocation's handlers' applies). A scope of its own would hand a second queue over for the
/// same invocation.
pub fn scope<F: Future>(
    invocation: Invocation,
    options: Options,
    body: F,
) -> impl Future<Output = F::Output> {
    // Boxed once, here. Each `async fn` that takes a future and awaits it keeps two places
    // for it (the argument, and the awaited future), and the handler's future is moved
    // whole by lambda_runtime's layers several times per invocation: unboxed, the body was
    // held about four times over (a 20-line handler's future grew from 0.9 KB to 4.4 KB), and
    // those moves cost more than the allocation (`bench --instructions`).
    let body = Box::pin(body);
    async move {
        if QUEUE.try_with(|queue| queue.nest(options)).is_ok() {
            return body.await;
        }
        crate::invocation::run(invocation, options, body).await
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{Tracer as _, TracerProvider as _};
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};

    use super::*;

    /// The error names the macro that was called: `try_defer!` in the error it returns,
    /// `defer!` in its panic. Found by review: both said "defer! at …".
    #[test]
    fn the_error_names_the_macro_that_was_called() {
        let error = crate::try_defer!(async {}).unwrap_err();
        assert!(error.to_string().starts_with("try_defer! at "), "{error}");
        let panic = std::panic::catch_unwind(|| crate::defer!(async {})).unwrap_err();
        let message = crate::phase::panic_message(panic);
        assert!(message.starts_with("defer! at "), "{message}");
        assert!(
            message.contains("outside a #[deferred_handler]"),
            "{message}"
        );
        let location = Location::caller();
        for error in [
            DeferError::QueueFull { location, limit: 1 },
            DeferError::PhaseOver { location },
        ] {
            assert!(error.to_string().starts_with("try_defer! at "), "{error}");
        }
    }

    /// A span of the OpenTelemetry API ends when the last `Context` that holds it is dropped
    /// (`Tracer::in_span`, `mark_span_as_active`, `FutureExt::with_context`): an action queued
    /// in it must not hold it open until the action is over, as entering the `tracing` span
    /// did. The action's spans are still its children, in its trace. Found by review: the
    /// action kept the whole `Context`, so such a span lasted until its deferred work ended.
    #[tokio::test]
    async fn an_action_does_not_hold_open_the_span_that_queued_it() {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let tracer = provider.tracer("test");
        let queue = Queue::new(8);
        let in_action = tracer.clone();
        with_queue(queue.clone(), async {
            tracer.in_span("handler", |_| {
                let action = async move { in_action.in_span("action", |_| {}) };
                defer(None, action).expect("queued");
            });
        })
        .await;
        let names = |spans: &[opentelemetry_sdk::trace::SpanData]| -> Vec<String> {
            spans.iter().map(|s| s.name.to_string()).collect()
        };
        let ended = exporter.get_finished_spans().expect("spans");
        assert_eq!(
            names(&ended),
            ["handler"],
            "the span that queued the action ends with its code, not with the action"
        );
        let Some(Next::Queued(action)) = queue.next() else {
            panic!("the action is queued");
        };
        action.future.await.expect("it ran");
        let ended = exporter.get_finished_spans().expect("spans");
        assert_eq!(names(&ended), ["handler", "action"]);
        let (handler, action) = (&ended[0], &ended[1]);
        assert_eq!(action.parent_span_id, handler.span_context.span_id());
        assert!(!action.parent_span_is_remote, "a local parent");
        assert_eq!(
            action.span_context.trace_id(),
            handler.span_context.trace_id()
        );
    }
}
