//! Lint attributes on the event argument cover what the expansion does with it (`mut` moves to
//! a rebinding in the body, a pattern binds there), in the signature and in the body, and a
//! `_`-prefixed argument works, unused or used.
#![deny(
    unused_mut,
    unused_variables,
    non_snake_case,
    unused_qualifications,
    unfulfilled_lint_expectations
)]

use deferred_core::deferred_handler;
use lambda_runtime::{Context, LambdaEvent};

#[deferred_handler]
async fn never_mutated(#[expect(unused_mut)] mut event: LambdaEvent<u8>) -> u8 {
    event.payload
}

#[deferred_handler]
async fn unused(#[allow(unused_variables)] event: LambdaEvent<u8>) -> u8 {
    7
}

#[deferred_handler]
async fn destructured_unused(
    #[expect(unused_variables)] LambdaEvent { payload, context }: LambdaEvent<u8>,
) -> u8 {
    payload
}

#[deferred_handler]
async fn destructured_allowed(
    #[allow(unused_variables)] LambdaEvent { payload, context }: LambdaEvent<u8>,
) -> u8 {
    payload + 1
}

// `non_snake_case` fires on the rebinding's name (the signature's is generated code).
#[deferred_handler]
async fn expected_on_name(#[expect(non_snake_case)] Event: LambdaEvent<u8>) -> u8 {
    Event.payload
}

#[deferred_handler]
async fn allowed_on_name(#[allow(non_snake_case)] Event: LambdaEvent<u8>) -> u8 {
    Event.payload
}

// A lint on the argument's type: the attribute still covers it (the expansion does not copy
// the type into the body).
#[deferred_handler]
async fn qualified(#[allow(unused_qualifications)] event: lambda_runtime::LambdaEvent<u8>) -> u8 {
    event.payload
}

#[deferred_handler]
async fn qualified_conditionally(
    #[cfg_attr(all(), allow(unused_qualifications))] event: lambda_runtime::LambdaEvent<u8>,
) -> u8 {
    event.payload
}

// One expectation fires on the type, the other on the name: both are met.
#[deferred_handler]
async fn expected_on_type_and_name(
    #[expect(unused_qualifications, unused_variables, reason = "both fire")]
    event: lambda_runtime::LambdaEvent<u8>,
) -> u8 {
    3
}

#[deferred_handler]
async fn ignored(_event: LambdaEvent<u8>) -> u8 {
    8
}

#[deferred_handler]
async fn underscore_mutated(mut _event: LambdaEvent<u8>) -> u8 {
    _event.payload += 1;
    _event.payload
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let event = || LambdaEvent::new(1, Context::default());
    assert_eq!(never_mutated(event()).await, 1);
    assert_eq!(unused(event()).await, 7);
    assert_eq!(destructured_unused(event()).await, 1);
    assert_eq!(destructured_allowed(event()).await, 2);
    assert_eq!(expected_on_name(event()).await, 1);
    assert_eq!(allowed_on_name(event()).await, 1);
    assert_eq!(qualified(event()).await, 1);
    assert_eq!(qualified_conditionally(event()).await, 1);
    assert_eq!(expected_on_type_and_name(event()).await, 3);
    assert_eq!(ignored(event()).await, 8);
    assert_eq!(underscore_mutated(event()).await, 2);
}
