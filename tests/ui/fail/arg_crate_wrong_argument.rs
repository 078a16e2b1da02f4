//! With `crate = "…"`, an argument that carries no Lambda context is reported as without it:
//! the call that requires the bound is not underlined from the attribute's string into the
//! signature.
extern crate deferred_core as renamed;

use lambda_runtime::LambdaEvent;
use renamed::deferred_handler;

#[deferred_handler(crate = "renamed")]
async fn payload_only(payload: u8) -> u8 {
    payload
}

#[deferred_handler(crate = "renamed")]
async fn by_reference(event: &LambdaEvent<u8>) -> u8 {
    event.payload
}

fn main() {}
