//! The generated code names only absolute paths: local items called `core`, `std`,
//! `deferred_core`, `Option`, `Result`, `Some`, `Ok` or `Duration` do not change what it means.
//! And `?` inside closures and async blocks of the body keeps its own types.
#![allow(dead_code, non_camel_case_types, non_snake_case)]

use ::deferred_core::{defer, deferred_handler};
use lambda_runtime::{Context, LambdaEvent};
use serde_json::{Value, json};

mod core {}
mod std {}
mod deferred_core {}
struct Option;
struct Duration;
struct Some;
type Result = ();
fn Ok() {}

#[deferred_handler(flush_timeout = "2s")]
async fn handler(event: LambdaEvent<Value>) -> ::std::result::Result<Value, lambda_runtime::Error> {
    let parse = |text: &str| -> ::std::result::Result<u16, ::std::num::ParseIntError> {
        let n = text.parse::<u16>()?;
        ::std::result::Result::Ok(n)
    };
    let n = parse("7")?;
    let later = async move {
        let m = "8".parse::<u16>()?;
        ::std::result::Result::<u16, ::std::num::ParseIntError>::Ok(m)
    };
    defer!(async move {
        let _ = later.await;
    });
    ::std::result::Result::Ok(json!({ "n": n, "echo": event.payload }))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let response = handler(LambdaEvent::new(json!("hi"), Context::default()))
        .await
        .unwrap();
    assert_eq!(response["n"], 7);
}
