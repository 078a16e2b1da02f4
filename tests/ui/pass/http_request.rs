//! A `lambda_http::Request` handler (deferred-core feature `http`).
use std::sync::atomic::{AtomicBool, Ordering};

use deferred_core::{defer, deferred_handler};
use lambda_http::{Body, Context, Error, Request, RequestExt, Response, service_fn};

static NOTIFIED: AtomicBool = AtomicBool::new(false);

#[deferred_handler(flush_timeout = "2s")]
async fn handler(request: Request) -> Result<Response<Body>, Error> {
    let path = request.uri().path().to_owned();
    defer!("notify", async move {
        assert_eq!(path, "/orders");
        NOTIFIED.store(true, Ordering::SeqCst);
    });
    Ok(Response::builder()
        .status(202)
        .body(Body::from("accepted"))?)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    // lambda_http::run wants a `Send` future: the rewritten handler's is one.
    let _runner = lambda_http::run(service_fn(handler));

    let request = lambda_http::http::Request::builder()
        .uri("https://example.com/orders")
        .body(Body::Empty)
        .unwrap()
        .with_lambda_context(Context::default());
    let response = handler(request).await.unwrap();
    assert_eq!(response.status(), 202);
    assert!(NOTIFIED.load(Ordering::SeqCst));
}
