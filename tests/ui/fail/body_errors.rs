//! Errors in the handler's body point at the user's code, not at generated code.
use deferred_core::deferred_handler;
use lambda_runtime::{Error, LambdaEvent};
use serde_json::Value;

#[deferred_handler]
async fn wrong_tail(event: LambdaEvent<Value>) -> Result<Value, Error> {
    event.payload
}

#[deferred_handler]
async fn wrong_return(event: LambdaEvent<Value>) -> Result<Value, Error> {
    if event.payload.is_null() {
        return Ok(1);
    }
    Ok(event.payload)
}

#[derive(Debug)]
struct BadInput;

#[deferred_handler]
async fn question_mark(event: LambdaEvent<String>) -> Result<u8, BadInput> {
    let n: u8 = event.payload.parse()?;
    Ok(n)
}

fn main() {}
