//! Why `#[tracing::instrument]` goes above `#[deferred_handler]`: below it, `instrument` sees
//! the rewritten signature, where a destructured argument has been renamed.
use deferred_core::deferred_handler;
use lambda_runtime::LambdaEvent;
use serde_json::Value;

#[deferred_handler]
#[tracing::instrument(skip(payload))]
async fn handler(LambdaEvent { payload, .. }: LambdaEvent<Value>) -> Value {
    payload
}

fn main() {}
