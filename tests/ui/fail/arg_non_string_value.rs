use std::time::Duration;

use deferred_core::deferred_handler;
use lambda_runtime::LambdaEvent;

#[deferred_handler(flush_timeout = 10)]
async fn number(event: LambdaEvent<()>) {
    let _ = event;
}

#[deferred_handler(flush_timeout = Duration::from_secs(10))]
async fn expression(event: LambdaEvent<()>) {
    let _ = event;
}

#[deferred_handler(crate = deferred_core)]
async fn path(event: LambdaEvent<()>) {
    let _ = event;
}

fn main() {
    let _ = Duration::ZERO;
}
