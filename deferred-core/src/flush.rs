//! What the deferred phase flushes: the `Flush` trait and its implementations.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// The error a flush reports.
pub type FlushError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Something flushed after every invocation, once the deferred actions have run.
///
/// `flush` may block (the OpenTelemetry SDK's `force_flush` does): the core always calls it on
/// a blocking thread (`spawn_blocking`), under the flush's timeout. A flush that overruns is
/// abandoned (its thread runs on) and reported, and the next phase skips this flusher while
/// that call is still running, so a dead exporter never piles up threads.
///
/// Implemented for the three `opentelemetry_sdk` providers; wrap anything else with
/// [`flush_fn`].
///
/// ```
/// use deferred_core::{Flush, FlushError};
/// use std::borrow::Cow;
///
/// struct StatsdClient;
/// impl Flush for StatsdClient {
///     fn name(&self) -> Cow<'static, str> { "statsd".into() }
///     fn flush(&self) -> Result<(), FlushError> { Ok(()) }
/// }
/// ```
pub trait Flush: Send + Sync + 'static {
    /// How reports name this flusher.
    fn name(&self) -> Cow<'static, str>;
    /// Flushes, blocking until done or failed.
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
/// ```
/// use deferred_core::{flush_fn, Deferred};
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

/// See [`flush_fn`].
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

/// A registered flusher and whether a call to it is still running (maybe abandoned).
#[derive(Clone)]
pub(crate) struct Flusher {
    pub(crate) name: Cow<'static, str>,
    inner: Arc<dyn Flush>,
    busy: Arc<AtomicBool>,
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
        }
    }

    /// Starts the flush on a blocking thread; `None` while a previous call still runs. The
    /// task yields the flush's result and its own duration.
    pub(crate) fn start(
        &self,
    ) -> Option<tokio::task::JoinHandle<(Result<(), String>, std::time::Duration)>> {
        if self.busy.swap(true, Ordering::AcqRel) {
            return None;
        }
        let inner = self.inner.clone();
        let busy = self.busy.clone();
        Some(tokio::task::spawn_blocking(move || {
            // Cleared even when the flush panics, so the flusher is not skipped forever.
            struct Clear(Arc<AtomicBool>);
            impl Drop for Clear {
                fn drop(&mut self) {
                    self.0.store(false, Ordering::Release);
                }
            }
            let _clear = Clear(busy);
            let started = std::time::Instant::now();
            let result = inner.flush().map_err(|e| e.to_string());
            (result, started.elapsed())
        }))
    }
}
