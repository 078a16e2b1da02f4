//! The basic case: `LambdaEvent<Value>` in, `Result<Value, Error>` out, one deferred action.
use std::sync::atomic::{AtomicUsize, Ordering};

use deferred_core::{defer, deferred_handler};
use lambda_runtime::{Context, Error, LambdaEvent, service_fn};
use serde_json::{Value, json};

static DEFERRED_RUNS: AtomicUsize = AtomicUsize::new(0);

#[deferred_handler]
async fn handler(event: LambdaEvent<Value>) -> Result<Value, Error> {
    let name = event.payload["name"].as_str().unwrap_or("world").to_owned();
    defer!(async move {
        DEFERRED_RUNS.fetch_add(1, Ordering::SeqCst);
    });
    Ok(json!({ "greeting": format!("hello, {name}") }))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    // The rewritten handler still fits lambda_runtime's runner (built, not started).
    let _runner = lambda_runtime::run(service_fn(handler));

    let event = LambdaEvent::new(json!({ "name": "Ada" }), Context::default());
    let response = handler(event).await.unwrap();
    assert_eq!(response, json!({ "greeting": "hello, Ada" }));
    assert_eq!(DEFERRED_RUNS.load(Ordering::SeqCst), 1);
}
