//! The shared-resource shape of the AWS examples, `(client: &Client, event: LambdaEvent<T>)`:
//! the error names the event argument as the event, and points at the client.
use deferred_core::deferred_handler;
use lambda_http::Request;
use lambda_runtime::{Error, LambdaEvent};
use serde_json::Value;

struct Client;

#[deferred_handler]
async fn function_handler(client: &Client, event: LambdaEvent<Value>) -> Result<Value, Error> {
    let _ = client;
    Ok(event.payload)
}

#[deferred_handler]
async fn http_handler(client: &Client, region: &str, request: Request) -> Result<(), Error> {
    let _ = (client, region, request);
    Ok(())
}

#[deferred_handler]
async fn between(client: &Client, event: LambdaEvent<Value>, table: &str) -> Value {
    let _ = (client, table);
    event.payload
}

fn main() {}
