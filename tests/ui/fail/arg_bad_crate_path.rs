use deferred_core::deferred_handler;
use lambda_runtime::LambdaEvent;

#[deferred_handler(crate = "deferred core")]
async fn not_a_path(event: LambdaEvent<()>) {
    let _ = event;
}

fn main() {}
