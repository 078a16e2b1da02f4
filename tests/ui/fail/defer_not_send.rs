use std::rc::Rc;

use deferred_core::{defer, deferred_handler};
use lambda_runtime::LambdaEvent;

#[deferred_handler]
async fn handler(event: LambdaEvent<u64>) {
    let shared = Rc::new(event.payload);
    defer!(async move {
        tokio::task::yield_now().await;
        drop(shared);
    });
}

fn main() {}
