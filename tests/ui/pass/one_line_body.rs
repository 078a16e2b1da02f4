//! One-line bodies and `-> ()` handlers compile without a single warning.
#![deny(warnings)]

use deferred_core::deferred_handler;
use lambda_runtime::{Context, Error, LambdaEvent};
use serde_json::Value;

#[deferred_handler]
async fn echo(e: LambdaEvent<Value>) -> Result<Value, Error> { Ok(e.payload) }

#[deferred_handler]
async fn unit(_e: LambdaEvent<Value>) {}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let out = echo(LambdaEvent::new(Value::from(3), Context::default())).await.unwrap();
    assert_eq!(out, Value::from(3));
    unit(LambdaEvent::new(Value::Null, Context::default())).await;
}
