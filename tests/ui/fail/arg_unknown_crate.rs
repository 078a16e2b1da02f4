use deferred_core::deferred_handler;
use lambda_runtime::LambdaEvent;

#[deferred_handler(crate = "no_such_crate")]
async fn unknown_crate(event: LambdaEvent<()>) {
    let _ = event;
}

fn main() {}
