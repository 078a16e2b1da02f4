use deferred_core::deferred_handler;
use lambda_runtime::LambdaEvent;

#[deferred_handler(flush_timeout = "10s", flush_timeout = "20s")]
async fn handler(event: LambdaEvent<()>) {
    let _ = event;
}

fn main() {}
