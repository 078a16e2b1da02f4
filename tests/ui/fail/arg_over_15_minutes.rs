use deferred_core::deferred_handler;
use lambda_runtime::LambdaEvent;

#[deferred_handler(flush_timeout = "15m 1s")]
async fn just_over(event: LambdaEvent<()>) {
    let _ = event;
}

#[deferred_handler(flush_timeout = "1h")]
async fn hour(event: LambdaEvent<()>) {
    let _ = event;
}

fn main() {}
