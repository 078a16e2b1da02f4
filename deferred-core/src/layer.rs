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
use std::sync::atomic::Ordering;
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
        let request_id = invocation.context.request_id.clone();
        ResponseFuture {
            inner: Some(Box::pin(self.inner.call(invocation))),
            core: self.core.clone(),
            request_id,
        }
    }
}

/// The future of [`DeferredService`].
#[derive(Debug)]
pub struct ResponseFuture<F> {
    // Boxed so it can be dropped (closing the invocation's span) before the core is told.
    inner: Option<Pin<Box<F>>>,
    core: Arc<Core>,
    request_id: String,
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<(), BoxError>>,
{
    type Output = Result<(), BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let output = std::task::ready!(inner.as_mut().poll(cx));
        self.inner = None;
        self.core.responded(&self.request_id);
        Poll::Ready(output)
    }
}
