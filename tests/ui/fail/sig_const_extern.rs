use deferred_core::deferred_handler;
use lambda_runtime::LambdaEvent;

#[deferred_handler]
const async fn constant(event: LambdaEvent<()>) {
    let _ = event;
}

#[deferred_handler]
async extern "C" fn foreign(event: LambdaEvent<()>) {
    let _ = event;
}

fn main() {}
