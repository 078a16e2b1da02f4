//! A crate whose `core` is another crate (`extern crate … as core;` at its root, which takes
//! `::core` over): the expansion names `core` through deferred-core, as `defer!` does.
extern crate serde_json as core;

use deferred_core::{defer, deferred_handler};
use lambda_runtime::{Context, LambdaEvent};

#[deferred_handler(flush_timeout = "1s")]
async fn handler(mut event: LambdaEvent<u8>) -> u8 {
    event.payload += 1;
    defer!("named", async {});
    event.payload
}

#[deferred_handler]
async fn destructured(LambdaEvent { payload, .. }: LambdaEvent<u8>) -> u8 {
    defer!(async {});
    payload
}

fn main() {
    // `core` is serde_json here.
    let _ = core::json!(null);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    assert_eq!(
        runtime.block_on(handler(LambdaEvent::new(1, Context::default()))),
        2
    );
    assert_eq!(
        runtime.block_on(destructured(LambdaEvent::new(3, Context::default()))),
        3
    );
}
