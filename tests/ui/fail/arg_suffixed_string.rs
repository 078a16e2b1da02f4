//! A suffix after the closing quote makes one literal with the string; the suffix is not
//! ignored.
use deferred_core::deferred_handler;
use lambda_runtime::LambdaEvent;

#[deferred_handler(flush_timeout = "10s"abc)]
async fn suffixed(event: LambdaEvent<()>) {
    let _ = event;
}

fn main() {}
