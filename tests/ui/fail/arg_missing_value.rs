use deferred_core::deferred_handler;
use lambda_runtime::LambdaEvent;

#[deferred_handler(flush_timeout)]
async fn no_value(event: LambdaEvent<()>) {
    let _ = event;
}

#[deferred_handler(flush_timeout("10s"))]
async fn call_syntax(event: LambdaEvent<()>) {
    let _ = event;
}

#[deferred_handler("10s")]
async fn bare_string(event: LambdaEvent<()>) {
    let _ = event;
}

fn main() {}
