//! A plain function that returns a future (no trait, no `#[async_trait]`): the error says to
//! make it an `async fn` of the future's output, not to go through a trait method.
use std::future::Future;

use deferred_core::deferred_handler;
use lambda_runtime::{Error, LambdaEvent};
use serde_json::Value;

#[deferred_handler]
fn handler(event: LambdaEvent<Value>) -> impl Future<Output = Result<Value, Error>> + Send {
    async move { Ok(event.payload) }
}

#[deferred_handler]
fn unit(event: LambdaEvent<Value>) -> impl Future<Output = ()> {
    async move { drop(event) }
}

fn main() {
    let _ = handler(LambdaEvent::new(Value::Null, Default::default()));
}
