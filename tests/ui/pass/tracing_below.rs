//! The other order: `#[deferred_handler]` above `#[tracing::instrument]` also compiles and
//! runs; `instrument` then sees the rewritten function (a destructured argument is renamed).
use deferred_core::{defer, deferred_handler};
use lambda_runtime::{Context, Error, LambdaEvent, service_fn};
use serde_json::{Value, json};
use tracing_subscriber::util::SubscriberInitExt as _;

fn current_span() -> Option<&'static str> {
    tracing::Span::current()
        .metadata()
        .map(|metadata| metadata.name())
}

#[deferred_handler(flush_timeout = "5s")]
#[tracing::instrument(skip(event), fields(request_id = %event.context.request_id), err)]
async fn handler(event: LambdaEvent<Value>) -> Result<Value, Error> {
    assert_eq!(current_span(), Some("handler"));
    defer!(async {});
    Ok(event.payload)
}

#[deferred_handler]
#[tracing::instrument]
async fn destructured(LambdaEvent { payload, .. }: LambdaEvent<Value>) -> Result<Value, Error> {
    assert_eq!(current_span(), Some("destructured"));
    Ok(payload)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    tracing_subscriber::registry().init();
    let _runner = lambda_runtime::run(service_fn(handler));

    let response = handler(LambdaEvent::new(json!(1), Context::default())).await;
    assert_eq!(response.unwrap(), json!(1));
    let response = destructured(LambdaEvent::new(json!(2), Context::default())).await;
    assert_eq!(response.unwrap(), json!(2));
}
