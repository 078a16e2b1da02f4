use deferred_core::deferred_handler;
use lambda_runtime::LambdaEvent;

#[deferred_handler(timeout = "10s")]
async fn short(event: LambdaEvent<()>) {
    let _ = event;
}

#[deferred_handler(flush_timout = "10s")]
async fn typo(event: LambdaEvent<()>) {
    let _ = event;
}

#[deferred_handler(krate = "deferred_core")]
async fn krate(event: LambdaEvent<()>) {
    let _ = event;
}

fn main() {}
