//! A comma missing between two arguments: one error, and both arguments still apply (the
//! handler is rewritten, so nothing else is reported).
use deferred_core::deferred_handler;
use lambda_runtime::LambdaEvent;

mod reexport {
    pub use deferred_core as dc;
}

#[deferred_handler(flush_timeout = "1s" crate = "crate::reexport::dc")]
async fn handler(event: LambdaEvent<u8>) -> u8 {
    event.payload
}

fn main() {}
