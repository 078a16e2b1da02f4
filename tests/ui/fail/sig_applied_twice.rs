use deferred_core::deferred_handler;
use lambda_runtime::{Error, LambdaEvent};
use serde_json::Value;

#[deferred_handler]
#[deferred_handler(flush_timeout = "1s")]
async fn handler(event: LambdaEvent<Value>) -> Result<Value, Error> {
    Ok(event.payload)
}

fn main() {
    // The function is still emitted: this call compiles.
    let _ = handler(LambdaEvent::new(Value::Null, Default::default()));
}
