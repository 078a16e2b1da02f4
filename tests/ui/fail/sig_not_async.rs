use deferred_core::deferred_handler;
use lambda_runtime::{Error, LambdaEvent};
use serde_json::Value;

#[deferred_handler]
fn handler(event: LambdaEvent<Value>) -> Result<Value, Error> {
    Ok(event.payload)
}

fn main() {}
