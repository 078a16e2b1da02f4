//! A key written in kebab case is one unknown argument, with the hint.
use deferred_core::deferred_handler;
use lambda_runtime::LambdaEvent;

#[deferred_handler(flush-timeout = "1s")]
async fn flush_timeout(event: LambdaEvent<()>) {
    let _ = event;
}

#[deferred_handler(crate-name = "deferred_core")]
async fn crate_name(event: LambdaEvent<()>) {
    let _ = event;
}

fn main() {}
