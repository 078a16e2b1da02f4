//! `?` (with a `From` conversion) and early `return` in the body, and a handler with no return
//! type.
use std::fmt;
use std::num::ParseIntError;

use deferred_core::{defer, deferred_handler};
use lambda_runtime::{Context, LambdaEvent};

#[derive(Debug, PartialEq)]
struct BadInput(String);

impl fmt::Display for BadInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad input: {}", self.0)
    }
}

impl std::error::Error for BadInput {}

impl From<ParseIntError> for BadInput {
    fn from(error: ParseIntError) -> Self {
        Self(error.to_string())
    }
}

#[deferred_handler]
async fn handler(event: LambdaEvent<String>) -> Result<u64, BadInput> {
    if event.payload.is_empty() {
        return Err(BadInput("empty".to_owned()));
    }
    let n: u64 = event.payload.trim().parse()?;
    if n == 0 {
        return Ok(0);
    }
    defer!(async move { assert!(n > 0) });
    Ok(n * 2)
}

#[deferred_handler]
async fn no_return_type(event: LambdaEvent<bool>) {
    if event.payload {
        return;
    }
    defer!(async {});
}

fn event<T>(payload: T) -> LambdaEvent<T> {
    LambdaEvent::new(payload, Context::default())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    assert_eq!(handler(event("21".to_owned())).await, Ok(42));
    assert_eq!(handler(event("0".to_owned())).await, Ok(0));
    assert_eq!(
        handler(event(String::new())).await,
        Err(BadInput("empty".to_owned()))
    );
    let error = handler(event("x".to_owned())).await.unwrap_err();
    assert_eq!(
        error.to_string(),
        "bad input: invalid digit found in string"
    );
    no_return_type(event(true)).await;
    no_return_type(event(false)).await;
}
