//! A `LambdaEvent` of another version of lambda_runtime than deferred-core's is another type.
//! The testkit has one lambda_runtime, so a type of the same name stands in for it (the
//! error is the same: `HandlerInput` is not implemented for it); the note says what to check.
mod lambda_runtime_0_13 {
    pub struct LambdaEvent<T> {
        pub payload: T,
    }
}

use deferred_core::deferred_handler;
use lambda_runtime_0_13::LambdaEvent;

#[deferred_handler]
async fn handler(event: LambdaEvent<u8>) -> u8 {
    event.payload
}

fn main() {}
