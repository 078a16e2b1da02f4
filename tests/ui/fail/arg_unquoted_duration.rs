//! A duration written without its quotes is a number with a suffix: the error shows the string
//! to write, as written.
use deferred_core::deferred_handler;
use lambda_runtime::LambdaEvent;

#[deferred_handler(flush_timeout = 10ms)]
async fn millis(event: LambdaEvent<()>) {
    let _ = event;
}

#[deferred_handler(flush_timeout = 1m30s)]
async fn minutes_and_seconds(event: LambdaEvent<()>) {
    let _ = event;
}

#[deferred_handler(flush_timeout = 1000)]
async fn bare_number(event: LambdaEvent<()>) {
    let _ = event;
}

#[deferred_handler(flush_timeout = 0)]
async fn zero(event: LambdaEvent<()>) {
    let _ = event;
}

fn main() {}
