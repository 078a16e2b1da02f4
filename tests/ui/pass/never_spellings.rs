//! Handlers that never return a value, declared otherwise than with a literal `-> !`: the
//! expansion adds no unreachable code to them (a `return` of a diverging call would be).
#![forbid(unreachable_code)]
#![deny(warnings)]

use std::convert::Infallible;
use std::fmt::Debug;

use deferred_core::deferred_handler;
use lambda_runtime::{Context, Error, LambdaEvent};

/// An empty enum, the other way to spell "no value".
pub enum Void {}

async fn forever() -> Infallible {
    loop {
        tokio::task::yield_now().await;
    }
}

// A type macro may expand to `!`: the attribute cannot tell.
macro_rules! never {
    () => { ! };
}

#[deferred_handler]
async fn type_macro(_event: LambdaEvent<u8>) -> never!() {
    loop {
        tokio::task::yield_now().await;
    }
}

// `!` as a `macro_rules!` fragment reaches the attribute in an invisible group.
macro_rules! handler_returning {
    ($name:ident -> $ret:ty) => {
        #[deferred_handler]
        async fn $name(_event: LambdaEvent<u8>) -> $ret {
            loop {
                tokio::task::yield_now().await;
            }
        }
    };
}
handler_returning!(fragment -> !);

// Uninhabited types other than `!` are values to rustc: they end in a `return` as any other.
#[deferred_handler]
async fn infallible(_event: LambdaEvent<u8>) -> Infallible {
    forever().await
}

#[deferred_handler]
async fn empty_enum(_event: LambdaEvent<u8>) -> Void {
    match forever().await {}
}

#[deferred_handler]
async fn only_errors(event: LambdaEvent<u8>) -> Result<Infallible, Error> {
    let n = event.payload.checked_add(1).ok_or("overflow")?;
    Err(format!("never a value ({n})").into())
}

// The hidden type is `!`, which the attribute cannot see either.
#[deferred_handler]
async fn opaque(_event: LambdaEvent<u8>) -> impl Debug {
    std::process::exit(0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let failed = only_errors(LambdaEvent::new(1, Context::default())).await;
    assert_eq!(failed.unwrap_err().to_string(), "never a value (2)");
    // Compiled, not run: they never end.
    let _ = (type_macro, fragment, infallible, empty_enum, opaque);
}
