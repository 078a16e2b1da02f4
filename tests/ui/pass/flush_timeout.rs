//! The forms of `flush_timeout` that humantime reads.
use deferred_core::deferred_handler;
use lambda_runtime::{Context, LambdaEvent};

#[deferred_handler(flush_timeout = "250ms")]
async fn millis(event: LambdaEvent<u8>) -> u8 {
    event.payload
}

#[deferred_handler(flush_timeout = "1m 30s")]
async fn minutes_and_seconds(event: LambdaEvent<u8>) -> u8 {
    event.payload
}

#[deferred_handler(flush_timeout = "1.5s")]
async fn fraction(event: LambdaEvent<u8>) -> u8 {
    event.payload
}

#[deferred_handler(flush_timeout = "15min")]
async fn longest(event: LambdaEvent<u8>) -> u8 {
    event.payload
}

#[deferred_handler(flush_timeout = "10s")]
async fn trailing_comma(event: LambdaEvent<u8>) -> u8 {
    event.payload
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    assert_eq!(millis(LambdaEvent::new(1, Context::default())).await, 1);
    assert_eq!(
        minutes_and_seconds(LambdaEvent::new(2, Context::default())).await,
        2
    );
    assert_eq!(fraction(LambdaEvent::new(3, Context::default())).await, 3);
    assert_eq!(longest(LambdaEvent::new(4, Context::default())).await, 4);
    assert_eq!(
        trailing_comma(LambdaEvent::new(5, Context::default())).await,
        5
    );
}
