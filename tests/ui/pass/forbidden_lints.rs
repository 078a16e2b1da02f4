//! A crate that forbids the lints the generated code could trip: the expansion needs no
//! `allow` of its own for them (an `allow` under `forbid` is error E0453).
#![forbid(unreachable_code, unused_mut, unused_variables, redundant_semicolons)]

use deferred_core::deferred_handler;
use lambda_runtime::{Context, Error, LambdaEvent};

#[deferred_handler]
async fn handler(event: LambdaEvent<u8>) -> Result<u8, Error> {
    let n = event.payload.checked_add(1).ok_or("overflow")?;
    Ok(n)
}

#[deferred_handler]
async fn unit(mut event: LambdaEvent<u8>) {
    event.payload += 1;
}

#[deferred_handler]
async fn destructured(LambdaEvent { payload, .. }: LambdaEvent<u8>) -> u8 {
    payload
}

// Never returns: the rewrite ends in a `let` of the scope's call, not in an unreachable
// `return` of it.
#[deferred_handler]
async fn never(event: LambdaEvent<u8>) -> ! {
    loop {
        if event.payload > 0 {
            ::std::process::exit(0);
        }
        tokio::task::yield_now().await;
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let answer = handler(LambdaEvent::new(1, Context::default())).await;
    assert_eq!(answer.unwrap(), 2);
    unit(LambdaEvent::new(1, Context::default())).await;
    assert_eq!(destructured(LambdaEvent::new(5, Context::default())).await, 5);
    // Compiled, not run (it would end the test).
    let _ = never;
}
