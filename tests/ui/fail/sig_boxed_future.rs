// What `#[async_trait]` makes of `async fn handle(&self, event: LambdaEvent<Value>)` before
// `#[deferred_handler]` below it sees the method.
use std::future::Future;
use std::pin::Pin;

use deferred_core::deferred_handler;
use lambda_runtime::{Error, LambdaEvent};
use serde_json::Value;

struct Api;

impl Api {
    #[deferred_handler]
    fn handle(
        &self,
        event: LambdaEvent<Value>,
    ) -> Pin<Box<dyn Future<Output = Result<Value, Error>> + Send + '_>> {
        Box::pin(async move { Ok(event.payload) })
    }
}

fn main() {
    let _ = Api.handle(LambdaEvent::new(Value::Null, Default::default()));
}
