use deferred_core::{defer, deferred_handler};
use lambda_runtime::LambdaEvent;

fn notify(_id: u64) {}

#[deferred_handler]
async fn handler(event: LambdaEvent<u64>) {
    defer!(notify(event.payload));
    defer!("answer", 42);
}

fn main() {}
