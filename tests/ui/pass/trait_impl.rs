//! A handler implementing a trait method whose future must be `Send`: the rewrite keeps the
//! signature, so the `impl` still matches the trait.
use std::future::Future;

use deferred_core::{defer, deferred_handler};
use lambda_runtime::{Context, Error, LambdaEvent};
use serde_json::{Value, json};

trait Handle {
    fn handle(
        &self,
        event: LambdaEvent<Value>,
    ) -> impl Future<Output = Result<Value, Error>> + Send;
}

struct Echo;

impl Handle for Echo {
    #[deferred_handler(flush_timeout = "1s")]
    async fn handle(&self, event: LambdaEvent<Value>) -> Result<Value, Error> {
        defer!("echo", async {});
        Ok(event.payload)
    }
}

fn spawnable<H: Handle + Sync>(handler: &H, event: LambdaEvent<Value>) -> impl Future + Send + '_ {
    handler.handle(event)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let event = LambdaEvent::new(json!([1, 2]), Context::default());
    assert_eq!(Echo.handle(event).await.unwrap(), json!([1, 2]));
    let _ = spawnable(&Echo, LambdaEvent::new(json!(null), Context::default()));
}
