use deferred_core::{defer, deferred_handler};
use lambda_runtime::LambdaEvent;

#[derive(Debug)]
struct NotDisplay;

#[deferred_handler]
async fn handler(event: LambdaEvent<u64>) {
    let id = event.payload;
    defer!(async move { id + 1 });
    defer!(async { Err::<(), _>(NotDisplay) });
}

fn main() {}
