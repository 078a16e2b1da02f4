//! `impl Trait` nested in a trait object of the return type (`dyn Iterator<Item = impl …>`).
use std::fmt::Display;

use deferred_core::deferred_handler;
use lambda_runtime::{Context, LambdaEvent};

#[deferred_handler]
async fn handler(event: LambdaEvent<u8>) -> Box<dyn Iterator<Item = impl Display> + Send> {
    Box::new(0..event.payload)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let items: Vec<String> = handler(LambdaEvent::new(3, Context::default()))
        .await
        .map(|n| n.to_string())
        .collect();
    assert_eq!(items, ["0", "1", "2"]);
}
