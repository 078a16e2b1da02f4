use deferred_core::deferred_handler;
use lambda_runtime::LambdaEvent;
use serde_json::Value;

struct Client;

#[deferred_handler]
async fn handler(event: LambdaEvent<Value>, client: &Client) -> Value {
    let _ = client;
    event.payload
}

fn main() {}
