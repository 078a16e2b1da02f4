//! The recommended order: `#[tracing::instrument]` above `#[deferred_handler]`. `instrument`
//! sees the function as written, so `skip`/`fields` can name a destructured argument's bindings.
use deferred_core::{defer, deferred_handler};
use lambda_runtime::{Context, Error, LambdaEvent, service_fn};
use serde_json::{Value, json};
use tracing_subscriber::util::SubscriberInitExt as _;

fn current_span() -> Option<&'static str> {
    tracing::Span::current()
        .metadata()
        .map(|metadata| metadata.name())
}

#[tracing::instrument(skip(event), fields(request_id = %event.context.request_id), err)]
#[deferred_handler(flush_timeout = "5s")]
async fn handler(event: LambdaEvent<Value>) -> Result<Value, Error> {
    assert_eq!(current_span(), Some("handler"));
    defer!(async {});
    Ok(event.payload)
}

#[tracing::instrument(skip(payload), fields(request_id = %context.request_id))]
#[deferred_handler]
async fn destructured(
    LambdaEvent { payload, context }: LambdaEvent<Value>,
) -> Result<Value, Error> {
    assert_eq!(current_span(), Some("destructured"));
    let _ = context;
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
