use deferred_core::{defer, deferred_handler};
use lambda_runtime::LambdaEvent;
use serde_json::Value;

async fn validate(_payload: &Value) {}

#[deferred_handler]
async fn handler(event: LambdaEvent<Value>) {
    defer!(validate(&event.payload));
}

fn main() {}
