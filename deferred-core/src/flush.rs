//! What the deferred phase flushes: the `Flush` trait and its implementations.

use std::borrow::Cow;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, mpsc};

/// The error a flush reports.
///
/// Any `std::error::Error + Send + Sync`, or a string, converts into it with `into()` or `?`;
/// the report shows its `Display`, followed by its causes (`source()`) where that does not
/// already, as [`FlushOutcome::Failed`](crate::FlushOutcome::Failed): an HTTP client's "error
/// sending request" then says why.
///
/// ```
/// use deferred_core::FlushError;
///
/// fn push(ok: bool) -> Result<(), FlushError> {
///     if !ok {
///         return Err("collector refused the batch".into());
///     }
///     std::fs::metadata("/")?; // an io::Error converts too
///     Ok(())
/// }
///
/// assert_eq!(push(false).unwrap_err().to_string(), "collector refused the batch");
/// ```
pub type FlushError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Something flushed after every invocation, once the deferred actions have run.
///
/// `flush` may block (the OpenTelemetry SDK's `force_flush` does): the core never calls it on
/// a runtime worker, but on a thread of its own (the chain's phase thread for a chained
/// phase's first flusher; otherwise the flusher's own thread, started at its first call, or a
/// thread of the runtime's blocking pool if the OS refuses that one), inside the runtime's
/// context (`Handle::current()` works), under the flush's timeout. A flush that overruns is
/// abandoned (its thread runs on) and reported, and the next phase skips this flusher while
/// that call is still running, so a dead exporter never piles up threads.
///
/// Implemented for the three `opentelemetry_sdk` providers; wrap anything else with
/// [`flush_fn`].
///
/// ```
/// use deferred_core::{Deferred, Flush, FlushError, defer, deferred_handler};
/// use lambda_runtime::{Context, Error, LambdaEvent};
/// use std::borrow::Cow;
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicUsize, Ordering};
///
/// /// Buffers metric lines; `flush` sends them.
/// #[derive(Clone, Default)]
/// struct StatsdClient {
///     sent: Arc<AtomicUsize>,
/// }
///
/// impl Flush for StatsdClient {
///     fn name(&self) -> Cow<'static, str> {
///         "statsd".into()
///     }
///     fn flush(&self) -> Result<(), FlushError> {
///         // A blocking send is fine here: this never runs on a runtime worker.
///         self.sent.fetch_add(1, Ordering::SeqCst);
///         Ok(())
///     }
/// }
///
/// #[deferred_handler]
/// async fn handler(_event: LambdaEvent<()>) -> Result<(), Error> {
///     defer!(async { /* an action: runs before the flush */ });
///     Ok(())
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Error> {
/// let statsd = StatsdClient::default();
/// Deferred::new().flush(statsd.clone()).start().await?;
/// // Outside Lambda the phase, flush included, runs inline before the handler returns.
/// handler(LambdaEvent::new((), Context::default())).await?;
/// assert_eq!(statsd.sent.load(Ordering::SeqCst), 1);
/// # Ok(())
/// # }
/// ```
pub trait Flush: Send + Sync + 'static {
    /// How reports name this flusher ([`FlushReport::name`](crate::FlushReport::name)). Called
    /// once, when the flusher is registered.
    ///
    /// ```
    /// use deferred_core::Flush;
    /// use opentelemetry_sdk::trace::SdkTracerProvider;
    ///
    /// let provider = SdkTracerProvider::builder().build();
    /// assert_eq!(provider.name(), "tracer provider");
    /// ```
    fn name(&self) -> Cow<'static, str>;

    /// Flushes, blocking until done or failed. The core calls it after every invocation's
    /// actions, on a thread where blocking is fine; for the OpenTelemetry providers it is
    /// `force_flush`.
    ///
    /// ```
    /// use deferred_core::Flush;
    /// use opentelemetry_sdk::metrics::SdkMeterProvider;
    ///
    /// let provider = SdkMeterProvider::builder().build();
    /// provider.flush()?; // what the deferred phase does
    /// # Ok::<(), deferred_core::FlushError>(())
    /// ```
    fn flush(&self) -> Result<(), FlushError>;
}

impl Flush for opentelemetry_sdk::trace::SdkTracerProvider {
    fn name(&self) -> Cow<'static, str> {
        "tracer provider".into()
    }
    fn flush(&self) -> Result<(), FlushError> {
        self.force_flush().map_err(Into::into)
    }
}

impl Flush for opentelemetry_sdk::metrics::SdkMeterProvider {
    fn name(&self) -> Cow<'static, str> {
        "meter provider".into()
    }
    fn flush(&self) -> Result<(), FlushError> {
        self.force_flush().map_err(Into::into)
    }
}

impl Flush for opentelemetry_sdk::logs::SdkLoggerProvider {
    fn name(&self) -> Cow<'static, str> {
        "logger provider".into()
    }
    fn flush(&self) -> Result<(), FlushError> {
        self.force_flush().map_err(Into::into)
    }
}

impl<T: Flush + ?Sized> Flush for Arc<T> {
    fn name(&self) -> Cow<'static, str> {
        (**self).name()
    }
    fn flush(&self) -> Result<(), FlushError> {
        (**self).flush()
    }
}

/// A [`Flush`] made of a name and a blocking closure.
///
/// The closure returns `Result<(), E>` for any `E` that converts into [`FlushError`] (an
/// error type, or a string).
///
/// ```
/// use deferred_core::{Deferred, flush_fn};
///
/// let deferred = Deferred::new().flush(flush_fn("metrics client", || {
///     // push buffered metrics somewhere; may block
///     Ok::<(), std::io::Error>(())
/// }));
/// ```
pub fn flush_fn<F, E>(name: impl Into<Cow<'static, str>>, f: F) -> FlushFn<F>
where
    F: Fn() -> Result<(), E> + Send + Sync + 'static,
    E: Into<FlushError>,
{
    FlushFn {
        name: name.into(),
        f,
    }
}

/// The [`Flush`] that [`flush_fn`] returns: its name, and the closure called on every flush.
///
/// ```
/// use deferred_core::{Flush, FlushFn, flush_fn};
///
/// let flusher: FlushFn<_> = flush_fn("queue", || Err::<(), _>("queue unreachable"));
/// assert_eq!(flusher.name(), "queue");
/// assert_eq!(flusher.flush().unwrap_err().to_string(), "queue unreachable");
/// ```
pub struct FlushFn<F> {
    name: Cow<'static, str>,
    f: F,
}

impl<F> fmt::Debug for FlushFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlushFn").field("name", &self.name).finish()
    }
}

impl<F, E> Flush for FlushFn<F>
where
    F: Fn() -> Result<(), E> + Send + Sync + 'static,
    E: Into<FlushError>,
{
    fn name(&self) -> Cow<'static, str> {
        self.name.clone()
    }
    fn flush(&self) -> Result<(), FlushError> {
        (self.f)().map_err(Into::into)
    }
}

/// What one call of a flush gave, and how long it took.
pub(crate) type Called = (Result<(), String>, std::time::Duration);

/// The panic of a flush on a thread other than the phase's, and how long the flush ran.
pub(crate) struct FlushPanic {
    pub(crate) payload: Box<dyn std::any::Any + Send>,
    pub(crate) took: std::time::Duration,
}

/// Why a flusher was not called; the report gives its `Display` as
/// [`FlushOutcome::NotRun`](crate::FlushOutcome::NotRun).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NotStarted {
    /// Its end (the deadline minus the margin, or `flush_timeout`) had come: the phase is
    /// cut ([`CutReason::FlushBudget`](crate::CutReason::FlushBudget)).
    NoTime,
    /// In the final flush: `shutdown_timeout` was over, or the deadline (minus the safety
    /// margin) of an invocation that may still be open had come.
    NoShutdownTime,
    /// Its previous call has not returned (an earlier phase abandoned it).
    StillRunning,
    /// Its previous call (another phase's) had not returned when the end came, waited for
    /// until then ([`Flusher::start_when_free`]): the phase is cut
    /// ([`CutReason::FlushBudget`](crate::CutReason::FlushBudget)), as by a flush that overran.
    StillRunningAtEnd,
    /// tokio could not start a thread for it; the panic's message.
    NoThread(String),
}

impl fmt::Display for NotStarted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoTime => f.write_str("no time left before the deadline or the flush_timeout"),
            Self::NoShutdownTime => f.write_str(
                "no time left within the shutdown_timeout or before the open invocation's deadline",
            ),
            Self::StillRunning => f.write_str("its previous flush is still running"),
            Self::StillRunningAtEnd => {
                f.write_str("its previous flush was still running when its time ran out")
            }
            Self::NoThread(why) => write!(f, "no thread could be started for it: {why}"),
        }
    }
}

/// `spawn_blocking` on `handle` (the current runtime's when `None`), its panic given as
/// `Err` with the panic's message. tokio panics when it cannot start a thread (the pool has
/// none free and the OS refuses a new one) and outside a runtime; the work then did not
/// start, and the caller must say so rather than die of the panic. Built with
/// `panic = "abort"`, the panic ends the process, as any panic would.
pub(crate) fn try_spawn_blocking<F, R>(
    handle: Option<&tokio::runtime::Handle>,
    work: F,
) -> Result<tokio::task::JoinHandle<R>, String>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match handle {
        Some(handle) => handle.spawn_blocking(work),
        None => tokio::task::spawn_blocking(work),
    }))
    .map_err(crate::phase::panic_message)
}

/// A registered flusher and whether a call to it is still running (maybe abandoned).
#[derive(Clone)]
pub(crate) struct Flusher {
    pub(crate) name: Cow<'static, str>,
    inner: Arc<dyn Flush>,
    busy: Arc<AtomicBool>,
    /// Told when a call returns.
    returned: Arc<tokio::sync::Notify>,
    /// The flusher's own thread, started at its first call off the phase thread (empty while
    /// the OS refuses it: tried again at the next call). Not the runtime's blocking pool: a
    /// flush that never returns would hold one of its threads, and the runtime's drop (when
    /// `main` returns) waits for those for ever, so the process would not exit. One thread
    /// is enough: a flusher has at most one call running ([`busy`](Self::busy)).
    thread: Arc<OnceLock<mpsc::Sender<Call>>>,
}

/// A call for the flusher's thread: the runtime it is made from (entered on that thread for
/// the call, as on the runtime's blocking threads, so a flush may use `Handle::current()`),
/// and where to answer.
type Call = (tokio::runtime::Handle, Reply);

/// Where the flusher's thread answers a call: the blocking task that waits for it on a
/// current-thread runtime, or the task that awaits it on a multi-thread one.
enum Reply {
    Blocking(Answer),
    Task(tokio::sync::oneshot::Sender<std::thread::Result<Called>>),
}

impl Reply {
    fn send(self, called: std::thread::Result<Called>) {
        let unsent = match self {
            Self::Blocking(answer) => answer.send(Some(called)).err().and_then(|unsent| unsent.0),
            Self::Task(answer) => answer.send(called).err(),
        };
        // Nothing waits (its runtime shut down): a panic's payload is dropped here, and its
        // drop must not end the flusher's thread, which later calls need.
        if let Some(Err(panic)) = unsent {
            crate::phase::drop_panic(panic);
        }
    }
}

/// Where the flusher's thread sends what a call gave (a panic as `Err`), and [`Gone`] `None`.
type Answer = mpsc::SyncSender<Option<std::thread::Result<Called>>>;

/// Sends `None` when dropped: with the task that holds it, when the runtime shuts down.
struct Gone(Answer);

impl Drop for Gone {
    fn drop(&mut self) {
        let _ = self.0.try_send(None);
    }
}

impl fmt::Debug for Flusher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Flusher")
            .field("name", &self.name)
            .field("busy", &self.busy.load(Ordering::Relaxed))
            .finish()
    }
}

impl Flusher {
    pub(crate) fn new(flush: impl Flush) -> Self {
        Self {
            name: flush.name(),
            inner: Arc::new(flush),
            busy: Arc::new(AtomicBool::new(false)),
            returned: Arc::new(tokio::sync::Notify::new()),
            thread: Arc::new(OnceLock::new()),
        }
    }

    /// The flusher's own thread, started now if need be; `None` if the OS refused it. A
    /// refusal is not kept: it is often passing (a thread limit, memory), and a flusher sent
    /// to the blocking pool for good would bring back the hung-drop problem above. Called
    /// with the flusher [`busy`](Self::busy), so no two calls race to start the thread.
    fn thread(&self) -> Option<&mpsc::Sender<Call>> {
        if let Some(calls) = self.thread.get() {
            return Some(calls);
        }
        let (calls, called) = mpsc::channel::<Call>();
        // Without the cell: the thread ends once the flusher's last clone is gone.
        let this = Self {
            thread: Arc::new(OnceLock::new()),
            ..self.clone()
        };
        let run = move || {
            for (runtime, reply) in called {
                let called = {
                    let _runtime = runtime.enter();
                    this.call_catching()
                };
                reply.send(called);
            }
        };
        spawn_thread(run).ok()?;
        // A lost race (impossible while busy) drops `calls`, and the thread just started ends.
        let _ = self.thread.set(calls);
        self.thread.get()
    }

    /// Whether a call is running (maybe abandoned).
    pub(crate) fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Acquire)
    }

    /// Waits, until `end` at most, for the running call to return.
    pub(crate) async fn wait_returned(&self, end: tokio::time::Instant) {
        loop {
            let returned = self.returned.notified();
            tokio::pin!(returned);
            // Registered before the check: a return in between is not missed.
            returned.as_mut().enable();
            if !self.busy.load(Ordering::Acquire) {
                return;
            }
            if tokio::time::timeout_at(end, returned).await.is_err() {
                return;
            }
        }
    }

    /// Starts the flush on its own thread (on a blocking thread of the runtime if the OS
    /// refused that); `Err` says why it did not start (a previous call still runs, or no
    /// thread could be had). The task yields the flush's result and its own duration; a panic
    /// of the flush is the task's.
    ///
    /// On a current-thread runtime the task is a blocking one that waits for the flusher's
    /// thread: tokio's paused clock (users' tests) does not jump while it runs, as it would
    /// past a flush on a thread tokio does not know. It stops waiting when the runtime shuts
    /// down (a flush that never returns must not keep the runtime's drop, and the process,
    /// from ending). On a multi-thread runtime (no paused clock) an ordinary task awaits it.
    pub(crate) fn start(&self) -> Result<tokio::task::JoinHandle<Called>, NotStarted> {
        if self.busy.swap(true, Ordering::AcqRel) {
            return Err(NotStarted::StillRunning);
        }
        let refused = |why: String| {
            // The flush did not run: it must not count as still running.
            self.busy.store(false, Ordering::Release);
            self.returned.notify_waiters();
            NotStarted::NoThread(why)
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Err(refused("not on a tokio runtime".into()));
        };
        let Some(thread) = self.thread() else {
            let this = self.clone();
            return try_spawn_blocking(Some(&runtime), move || {
                this.call_catching()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .map_err(refused);
        };
        let started = std::time::Instant::now();
        let ended = |reply: Reply| {
            // Its thread cannot end while the flusher lives; said rather than assumed.
            reply.send(Ok((
                Err("the flusher's thread has ended".into()),
                std::time::Duration::ZERO,
            )));
            self.busy.store(false, Ordering::Release);
            self.returned.notify_waiters();
        };
        if runtime.runtime_flavor() != tokio::runtime::RuntimeFlavor::CurrentThread {
            // tokio's clock cannot be paused here: a task awaits the answer, and nothing waits
            // on the blocking pool, where a pool with no thread free (`max_blocking_threads`,
            // another flush hung) would hold the answer of a flush that returned, and the
            // phase until its end. The task ends with the runtime: nothing holds its drop.
            let (answer, answered) = tokio::sync::oneshot::channel();
            if let Err(mpsc::SendError((_, reply))) =
                thread.send((runtime.clone(), Reply::Task(answer)))
            {
                ended(reply);
            }
            return Ok(runtime.spawn(async move {
                match answered.await {
                    Ok(Ok(called)) => called,
                    Ok(Err(panic)) => std::panic::resume_unwind(panic),
                    Err(_) => (
                        Err("the flusher's thread has ended".into()),
                        started.elapsed(),
                    ),
                }
            }));
        }
        let (answer, answered) = mpsc::sync_channel(2);
        let (waiting, waited) = tokio::sync::oneshot::channel::<()>();
        let task = try_spawn_blocking(Some(&runtime), move || {
            let _waiting = waiting;
            match answered.recv() {
                Ok(Some(Ok(called))) => called,
                Ok(Some(Err(panic))) => std::panic::resume_unwind(panic),
                Ok(None) | Err(_) => (
                    Err("the runtime shut down while the flush ran".into()),
                    started.elapsed(),
                ),
            }
        })
        .map_err(refused)?;
        // Dropped when the runtime shuts down, ending the wait above; or done with it.
        let gone = Gone(answer.clone());
        runtime.spawn(async move {
            let _gone = gone;
            let _ = waited.await;
        });
        if let Err(mpsc::SendError((_, reply))) = thread.send((runtime, Reply::Blocking(answer))) {
            ended(reply);
        }
        Ok(task)
    }

    /// Starts the flush once its previous call has returned, waiting for that until `end`:
    /// for phases that overlap other phases' flushes, where a busy flusher is another
    /// phase's flush (background phases, the final flush at SIGTERM). Several may wait for
    /// the same call; one of them wins the next, and the others wait for that one in turn.
    pub(crate) async fn start_when_free(
        &self,
        end: tokio::time::Instant,
    ) -> Result<tokio::task::JoinHandle<Called>, NotStarted> {
        loop {
            match self.start() {
                Err(NotStarted::StillRunning) if tokio::time::Instant::now() < end => {
                    self.wait_returned(end).await;
                }
                Err(NotStarted::StillRunning) => return Err(NotStarted::StillRunningAtEnd),
                started => return started,
            }
        }
    }

    /// Marks the flusher busy for a call on this thread (the chain's phase thread, which a
    /// watchdog replaces if the flush overruns); `Err` while a previous call still runs. The
    /// claim and the call are apart so that the phase thread can claim under the lock that the
    /// watchdog takes the phase over with.
    pub(crate) fn claim(&self) -> Result<Claimed<'_>, NotStarted> {
        if self.busy.swap(true, Ordering::AcqRel) {
            return Err(NotStarted::StillRunning);
        }
        Ok(Claimed(self))
    }

    /// [`call`](Self::call), its panic caught and given as a [`FlushPanic`], which keeps how
    /// long the flush ran: the task that yields it panics with it later, when the phase may
    /// look at it long after the panic.
    fn call_catching(&self) -> std::thread::Result<Called> {
        let began = std::time::Instant::now();
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.call())).map_err(|payload| {
            Box::new(FlushPanic {
                payload,
                took: began.elapsed(),
            }) as Box<dyn std::any::Any + Send>
        })
    }

    /// One call of the flush, `busy` set by the caller.
    fn call(&self) -> Called {
        // Cleared even when the flush panics, so the flusher is not skipped forever.
        struct Clear<'a>(&'a Flusher);
        impl Drop for Clear<'_> {
            fn drop(&mut self) {
                self.0.busy.store(false, Ordering::Release);
                self.0.returned.notify_waiters();
            }
        }
        let _clear = Clear(self);
        let started = std::time::Instant::now();
        let result = self
            .inner
            .flush()
            .map_err(|e| crate::report::with_causes(&*e));
        (result, started.elapsed())
    }
}

/// A flusher claimed for a call on this thread ([`Flusher::claim`]); dropped uncalled, it is
/// free again.
pub(crate) struct Claimed<'a>(&'a Flusher);

impl Claimed<'_> {
    /// Runs the flush here. A panic is caught and given as `Err` with its payload.
    pub(crate) fn run_here(self) -> std::thread::Result<Called> {
        let flusher = self.0;
        // The call frees the flusher when it returns (or panics): not the claim's drop.
        std::mem::forget(self);
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| flusher.call()))
    }
}

impl Drop for Claimed<'_> {
    fn drop(&mut self) {
        self.0.busy.store(false, Ordering::Release);
        self.0.returned.notify_waiters();
    }
}

/// Starts a flusher's thread. Tests can make it fail as the OS would (`tests::REFUSE`).
fn spawn_thread(run: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    #[cfg(test)]
    if tests::REFUSE.with(|refuse| refuse.replace(false)) {
        return Err(std::io::Error::other("refused by the test"));
    }
    std::thread::Builder::new()
        .name("deferred-flush".into())
        .spawn(run)
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    std::thread_local! {
        /// Set: the next [`spawn_thread`] on this thread fails, as when the OS refuses it.
        pub(super) static REFUSE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// A flusher whose thread the OS refused once runs that call on the blocking pool, and
    /// gets its own thread at the next call: the refusal is not kept. Found by review: one
    /// passing refusal sent the flusher to the blocking pool for good, where a hung flush
    /// holds the runtime's drop.
    #[tokio::test]
    async fn a_refused_flusher_thread_is_tried_again_at_the_next_call() {
        let flusher = Flusher::new(flush_fn("where", || match std::thread::current().name() {
            Some("deferred-flush") => Ok(()),
            other => Err::<(), FlushError>(format!("on {other:?}").into()),
        }));
        REFUSE.with(|refuse| refuse.set(true));
        let (first, _) = flusher.start().expect("started").await.expect("ran");
        assert!(
            first.is_err(),
            "the refused call ran on the blocking pool: {first:?}"
        );
        let (second, _) = flusher.start().expect("started").await.expect("ran");
        assert!(
            second.is_ok(),
            "the next call has its own thread: {second:?}"
        );
    }

    /// An error that says what failed, with a cause that says why (as an HTTP client's
    /// "error sending request", whose cause is the refused connection).
    #[derive(Debug)]
    struct Failed(&'static str, Option<Box<Failed>>);

    impl fmt::Display for Failed {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Failed {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    /// A failed flush is reported with the causes of its error, each once: one that its
    /// error's own text shows already is not repeated.
    #[test]
    fn a_failed_flush_is_reported_with_its_causes() {
        let refused = || Some(Box::new(Failed("connection refused", None)));
        for (error, reported) in [
            (
                Failed("error sending request", refused()),
                "error sending request: connection refused",
            ),
            (
                Failed("export failed: connection refused", refused()),
                "export failed: connection refused",
            ),
            (Failed("timed out", None), "timed out"),
        ] {
            let error = std::sync::Mutex::new(Some(error));
            let flusher = Flusher::new(flush_fn("f", move || {
                let error = error.lock().expect("not poisoned").take();
                Err::<(), FlushError>(Box::new(error.expect("called once")))
            }));
            let (result, _) = flusher.call();
            assert_eq!(result, Err(reported.to_owned()));
        }
    }

    /// A flush whose thread could not be started is not taken for one still running: the
    /// next phase calls it.
    #[test]
    fn a_flush_whose_thread_cannot_start_is_called_next_time() {
        let flusher = Flusher::new(flush_fn("f", || Ok::<(), FlushError>(())));
        // Outside a runtime no thread is started, as when the OS refuses one.
        let refused = flusher.start().expect_err("no thread outside a runtime");
        assert!(matches!(refused, NotStarted::NoThread(_)), "{refused}");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        let (result, _) = runtime.block_on(async {
            let task = flusher.start().expect("not skipped as still running");
            task.await.expect("the flush ran")
        });
        assert!(result.is_ok());
    }

    /// A runtime with timers: multi-thread with one worker, or current-thread.
    fn timed_runtime(multi: bool) -> tokio::runtime::Runtime {
        if multi {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_time()
                .build()
        } else {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
        }
        .expect("a runtime")
    }

    /// A flush that never returns (abandoned at its end) does not keep the runtime's drop
    /// from ending, as a call on the runtime's blocking pool would: with `#[tokio::main]`,
    /// the process would not exit when `main` returns.
    #[test]
    fn a_hung_flush_does_not_hold_the_runtime_drop() {
        for multi in [true, false] {
            hung_flush_and_runtime_drop(multi);
        }
    }

    fn hung_flush_and_runtime_drop(multi: bool) {
        let (release, hung) = std::sync::mpsc::channel::<()>();
        let hung = std::sync::Mutex::new(hung);
        let flusher = Flusher::new(flush_fn("hung", move || {
            let _ = crate::scope::lock(&hung).recv();
            Ok::<(), FlushError>(())
        }));
        let runtime = timed_runtime(multi);
        let abandoned = runtime.block_on(async {
            let task = flusher.start().expect("started");
            tokio::time::timeout(std::time::Duration::from_millis(50), task).await
        });
        assert!(abandoned.is_err(), "the flush hangs");
        let (dropped, done) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(runtime);
            let _ = dropped.send(());
        });
        let ended = done.recv_timeout(std::time::Duration::from_secs(5));
        let _ = release.send(());
        assert!(
            ended.is_ok(),
            "the runtime's drop waited for the hung flush"
        );
        // The flush returns once released, and frees the flusher.
        let freed = (0..500).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(10));
            !flusher.is_busy()
        });
        assert!(freed);
    }

    /// A flush that panics, with a payload that panics in turn when dropped, once the runtime
    /// that called it has shut down: its answer goes nowhere and the payload is dropped on the
    /// flusher's thread, which serves the next call all the same. Found by review: the payload
    /// was dropped unguarded and its panic ended the thread; every later call of the flusher
    /// then failed ("the flusher's thread has ended").
    #[test]
    fn an_unanswered_flush_panic_does_not_end_the_flushers_thread() {
        for multi in [true, false] {
            unanswered_flush_panic(multi);
        }
    }

    fn unanswered_flush_panic(multi: bool) {
        let (release, held) = std::sync::mpsc::channel::<()>();
        let held = std::sync::Mutex::new(held);
        let first = AtomicBool::new(true);
        let flusher = Flusher::new(flush_fn("panics", move || {
            if first.swap(false, Ordering::SeqCst) {
                let _ = crate::scope::lock(&held).recv();
                std::panic::panic_any(crate::phase::tests::PanicsWhenDropped);
            }
            Ok::<(), FlushError>(())
        }));
        let runtime = || timed_runtime(multi);
        let first = runtime();
        first.block_on(async { drop(flusher.start().expect("started")) });
        drop(first);
        release.send(()).expect("the flush waits");
        let freed = (0..500).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(10));
            !flusher.is_busy()
        });
        assert!(freed, "the flush returned");
        let next = runtime().block_on(async {
            let task = flusher.start().expect("started");
            tokio::time::timeout(std::time::Duration::from_secs(5), task).await
        });
        let Ok(Ok((result, _))) = next else {
            panic!("the next flush did not return: {next:?}");
        };
        assert!(result.is_ok(), "multi-thread: {multi}, {result:?}");
    }

    /// A flush that waits on async work (`Handle::current().block_on(..)`: how a flush of an
    /// async client is written, CHANGELOG) works on the flusher's own thread as it did on the
    /// runtime's blocking threads, and as it does on the chain's phase thread
    /// (runner::tests::a_flush_may_block_on_async_work_on_the_phase_thread). Found by review:
    /// it panicked there ("there is no reactor running").
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flush_on_its_own_thread_is_in_the_runtimes_context() {
        let flusher = Flusher::new(flush_fn("async client", || {
            tokio::runtime::Handle::current().block_on(tokio::task::yield_now());
            let (tx, rx) = tokio::sync::oneshot::channel();
            tokio::spawn(async move { tx.send(()) });
            rx.blocking_recv().map_err(|e| e.to_string())
        }));
        for _ in 0..2 {
            let joined = flusher.start().expect("started").await;
            let (result, _) = joined.unwrap_or_else(|e| {
                panic!(
                    "the flush panicked: {}",
                    crate::phase::panic_message(e.into_panic())
                )
            });
            assert!(result.is_ok(), "{result:?}");
        }
    }

    /// A blocking pool with no thread free (`max_blocking_threads(1)`, its thread held by
    /// the wait for a hung flush) does not hold the answer of another flusher's call that
    /// returned: that flush is reported Ok, and the phase does not wait for its end. Found
    /// by review: it was reported timed out (although it ran) and every phase lasted until
    /// its end.
    #[test]
    fn a_busy_blocking_pool_does_not_hold_a_flush_that_returned() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(1)
            .enable_time()
            .build()
            .expect("a runtime");
        let (release, hung) = std::sync::mpsc::channel::<()>();
        let hung = std::sync::Mutex::new(hung);
        let flushers = [
            Flusher::new(flush_fn("hung", move || {
                let _ = crate::scope::lock(&hung).recv();
                Ok::<(), FlushError>(())
            })),
            Flusher::new(flush_fn("fine", || Ok::<(), FlushError>(()))),
        ];
        let budget = std::time::Duration::from_millis(500);
        runtime.block_on(async {
            for phase in 0..3 {
                let now = tokio::time::Instant::now();
                let mut cut = Vec::new();
                let reports =
                    crate::phase::run_flushes(&flushers, now + budget, now, &mut cut).await;
                assert_eq!(
                    reports[1].outcome,
                    crate::FlushOutcome::Ok,
                    "phase {phase}: {reports:?}"
                );
                if phase > 0 {
                    assert!(
                        now.elapsed() < budget / 2,
                        "phase {phase} took {:?}",
                        now.elapsed()
                    );
                }
            }
        });
        let _ = release.send(());
        runtime.shutdown_background();
    }
}
