use deferred_core::deferred_handler;
use lambda_runtime::LambdaEvent;

#[deferred_handler(level = "info")]
async fn handler(event: LambdaEvent<()>) {
    let _ = event;
}

fn main() {}
