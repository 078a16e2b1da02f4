//! The `lambda_runtime` layer that starts the deferred phase only after the response has been
//! POSTed and the invocation's span has closed.
//!
//! In lambda_runtime 1.5, `Runtime::new(handler)` wraps the handler as
//! API-client(response(catch-panic(handler))): the inner service's future completes after the
//! response POST. A layer added last with `Runtime::layer` is outermost, so its future ends
//! after the POST and after `TracingLayer`'s span is dropped, and before the runtime's next
//! `/next` (runtime.rs, `process_invocation`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use lambda_runtime::LambdaInvocation;
use lambda_runtime_api_client::BoxError;
use tower::{Layer, Service};

use crate::core::Core;

/// A `lambda_runtime` layer that tells the core when each invocation's response is out.
///
/// [`Deferred::run`](crate::Deferred::run) installs it; add it yourself (outermost, i.e. last)
/// when you build your own `lambda_runtime::Runtime` after
/// [`Deferred::start`](crate::Deferred::start).
///
/// ```no_run
/// use deferred_core::{Deferred, deferred_handler};
/// use lambda_runtime::layers::TracingLayer;
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
///     // What `Deferred::run` does: your own runtime, with the layer last (outermost), and
///     // the SnapStart resource (see `DeferredHandle::snapstart_resource`).
///     Runtime::new(service_fn(handler))
///         .layer(TracingLayer::new())
///         .layer(deferred.layer())
///         .register_snapstart_resource(deferred.snapstart_resource())
///         .run()
///         .await
/// }
/// ```
#[derive(Clone, Debug)]
pub struct DeferredLayer {
    core: Arc<Core>,
}

impl DeferredLayer {
    pub(crate) fn new(core: Arc<Core>) -> Self {
        Self { core }
    }
}

impl<S> Layer<S> for DeferredLayer {
    type Service = DeferredService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        // From now on the layer, not a timer, tells the chain that an invocation is over.
        self.core.layer_installed.store(true, Ordering::Release);
        DeferredService {
            inner,
            core: self.core.clone(),
        }
    }
}

/// The service of [`DeferredLayer`].
///
/// It wraps the runtime's own stack (the service that decodes the event, calls the handler and
/// POSTs the response) and passes its result on unchanged:
///
/// ```
/// use deferred_core::Deferred;
/// use lambda_runtime::tower::{Layer, ServiceExt};
/// use lambda_runtime::{Context, Error, LambdaInvocation, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Error> {
/// let layer = Deferred::new().start().await?.layer();
/// // Stands in for lambda_runtime's stack: the handler, then the response POST.
/// let runtime = service_fn(|invocation: LambdaInvocation| async move {
///     assert_eq!(invocation.context.request_id, "8476a536-e9f4-11e8-9739-2dfe598c3fcd");
///     Ok::<(), Error>(())
/// });
/// let service = layer.layer(runtime);
///
/// let mut context = Context::default();
/// context.request_id = "8476a536-e9f4-11e8-9739-2dfe598c3fcd".into();
/// let invocation = LambdaInvocation {
///     parts: http::Response::new(()).into_parts().0,
///     body: r#"{"id": 42}"#.into(),
///     context,
/// };
/// // Completes once the inner service has; then the core knows the response is out.
/// service.oneshot(invocation).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct DeferredService<S> {
    inner: S,
    core: Arc<Core>,
}

impl<S> Service<LambdaInvocation> for DeferredService<S>
where
    S: Service<LambdaInvocation, Response = (), Error = BoxError>,
{
    type Response = ();
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, invocation: LambdaInvocation) -> Self::Future {
        inside_tracing_layer_check();
        let request_id = invocation.context.request_id.clone();
        // lambda_runtime decodes the event here, outside its handler's panic guard: a
        // `Deserialize` that panics is made an error, as in `ResponseFuture::poll`.
        let called =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.inner.call(invocation)));
        let state = match called {
            Ok(future) => Answer::Running(Box::pin(future)),
            Err(panic) => Answer::Failed(panicked(panic)),
        };
        ResponseFuture {
            state,
            core: self.core.clone(),
            request_id,
        }
    }
}

/// Says (once) when the layer sits inside lambda_runtime's `TracingLayer`, i.e. was added
/// before it: its future then ends while the invocation's span is still open, so the phase's
/// flush races that span's close and often misses it (it goes with the next flush). Checked on
/// the first invocation only: the order does not change.
fn inside_tracing_layer_check() {
    static CHECKED: AtomicBool = AtomicBool::new(false);
    if CHECKED.swap(true, Ordering::Relaxed) {
        return;
    }
    // lambda_runtime's `TracingService` enters this span around its inner service's `call`.
    let inside = tracing::Span::current()
        .metadata()
        .is_some_and(|span| span.name() == "Lambda runtime invoke");
    if inside {
        tracing::warn!(
            target: "deferred",
            "the DeferredLayer runs inside lambda_runtime's TracingLayer: add it last (outermost), \
             or the invocation's span may miss its own deferred flush"
        );
    }
}

/// The future of [`DeferredService`].
///
/// It yields the inner future's output; when that is ready (the response is POSTed), it drops
/// the inner future, closing the invocation's span, and only then tells the core that the
/// deferred phase may start. A failed POST is passed on as it was; a panic out of the runtime's
/// stack (lambda_runtime catches the handler's only) becomes an error, after which the core is
/// told all the same:
///
/// ```
/// use deferred_core::{Deferred, ResponseFuture};
/// use lambda_runtime::tower::{Layer, Service};
/// use lambda_runtime::{Context, Error, LambdaInvocation, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Error> {
/// let layer = Deferred::new().start().await?.layer();
/// let mut service = layer.layer(service_fn(|_: LambdaInvocation| async {
///     Err::<(), Error>("the response POST failed".into())
/// }));
/// let invocation = LambdaInvocation {
///     parts: http::Response::new(()).into_parts().0,
///     body: Default::default(),
///     context: Context::default(),
/// };
/// std::future::poll_fn(|cx| service.poll_ready(cx)).await?;
/// let future: ResponseFuture<_> = service.call(invocation);
/// assert_eq!(future.await.unwrap_err().to_string(), "the response POST failed");
/// # Ok(())
/// # }
/// ```
pub struct ResponseFuture<F> {
    state: Answer<F>,
    core: Arc<Core>,
    request_id: String,
}

/// Where a [`ResponseFuture`] is in answering its invocation.
enum Answer<F> {
    /// The inner future runs. Boxed so it can be dropped (closing the invocation's span)
    /// before the core is told.
    Running(Pin<Box<F>>),
    /// The runtime's stack panicked in `call`: the output, given once the core is told.
    Failed(BoxError),
    /// After the response, rarely: the wait for the event of a job parked for it, with the
    /// output to give once it is over.
    Claiming(Claim, Result<(), BoxError>),
    /// The output was given.
    Done,
}

type Claim = Pin<Box<dyn Future<Output = ()> + Send>>;

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("request_id", &self.request_id)
            .field(
                "responded",
                &matches!(self.state, Answer::Claiming(..) | Answer::Done),
            )
            .finish_non_exhaustive()
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<(), BoxError>>,
{
    type Output = Result<(), BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // `ResponseFuture` is `Unpin` (its inner future is boxed): its state can be moved.
        let output = match std::mem::replace(&mut self.state, Answer::Done) {
            Answer::Claiming(mut claim, output) => {
                if claim.as_mut().poll(cx).is_pending() {
                    self.state = Answer::Claiming(claim, output);
                    return Poll::Pending;
                }
                return Poll::Ready(output);
            }
            Answer::Done => return Poll::Ready(Ok(())),
            Answer::Failed(error) => Err(error),
            Answer::Running(mut inner) => {
                // lambda_runtime catches the handler's panics only: one out of the rest of its
                // stack (an answer whose `Serialize` panics, in its response layer) would
                // unwind through here, the core never told, and out of the runtime loop,
                // losing this invocation's deferred work. Made the error it is when that
                // serialization fails with an `Err`: the loop ends with it, and `run` drains
                // before it returns it.
                let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    inner.as_mut().poll(cx)
                }));
                match polled {
                    Ok(Poll::Pending) => {
                        self.state = Answer::Running(inner);
                        return Poll::Pending;
                    }
                    Ok(Poll::Ready(output)) => output,
                    Err(panic) => Err(panicked(panic)),
                }
                // `inner` is dropped here, closing the invocation's span before the core is told.
            }
        };
        if !self.core.responded(&self.request_id) {
            return Poll::Ready(output);
        }
        // The job waits for an INVOKE event that has not arrived: wait for it here, after the
        // response and before the runtime's next `/next`, so nothing is frozen meanwhile.
        let (core, request_id) = (self.core.clone(), self.request_id.clone());
        self.state = Answer::Claiming(
            Box::pin(async move { core.claim_parked(&request_id).await }),
            output,
        );
        self.poll(cx)
    }
}

/// The error that a panic out of lambda_runtime's stack (not the handler's) becomes.
fn panicked(panic: Box<dyn std::any::Any + Send>) -> BoxError {
    format!(
        "lambda_runtime panicked while answering the invocation: {}",
        crate::phase::panic_message(panic)
    )
    .into()
}
