use deferred_core::deferred_handler;
use lambda_runtime::LambdaEvent;
use serde_json::Value;

#[deferred_handler]
async fn payload_only(payload: Value) -> Value {
    payload
}

#[deferred_handler]
async fn by_reference(event: &LambdaEvent<Value>) -> Value {
    event.payload.clone()
}

fn main() {}
