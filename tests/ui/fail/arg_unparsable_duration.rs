use deferred_core::deferred_handler;
use lambda_runtime::LambdaEvent;

#[deferred_handler(flush_timeout = "10 sek")]
async fn unknown_unit(event: LambdaEvent<()>) {
    let _ = event;
}

#[deferred_handler(flush_timeout = "10")]
async fn no_unit(event: LambdaEvent<()>) {
    let _ = event;
}

#[deferred_handler(flush_timeout = "ten seconds")]
async fn words(event: LambdaEvent<()>) {
    let _ = event;
}

#[deferred_handler(flush_timeout = "")]
async fn empty(event: LambdaEvent<()>) {
    let _ = event;
}

fn main() {}
