use deferred_core::deferred_handler;
use lambda_runtime::LambdaEvent;

#[deferred_handler(flush_timeout = "0s")]
async fn zero(event: LambdaEvent<()>) {
    let _ = event;
}

#[deferred_handler(flush_timeout = "-1s")]
async fn negative(event: LambdaEvent<()>) {
    let _ = event;
}

fn main() {}
