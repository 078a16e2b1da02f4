//! `crate = "…"`: the generated code names the renamed dependency, or a re-export.
extern crate deferred_core as renamed;

use lambda_runtime::{Context, LambdaEvent};
use renamed::{defer, deferred_handler};

mod facade {
    pub use ::deferred_core as deferred;
}

#[deferred_handler(crate = "renamed")]
async fn handler(event: LambdaEvent<u32>) -> u32 {
    defer!(async {});
    event.payload + 1
}

#[deferred_handler(crate = "crate::facade::deferred", flush_timeout = "3s")]
async fn through_a_reexport(event: LambdaEvent<u32>) -> u32 {
    event.payload * 2
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    assert_eq!(handler(LambdaEvent::new(1, Context::default())).await, 2);
    assert_eq!(
        through_a_reexport(LambdaEvent::new(4, Context::default())).await,
        8
    );
}
