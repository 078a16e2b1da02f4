//! An associated function (no receiver) in an `impl` block, using `Self` in its body.
use deferred_core::{defer, deferred_handler};
use lambda_runtime::{Context, Error, LambdaEvent, service_fn};
use serde_json::{Value, json};

struct Api;

impl Api {
    /// The handler; its doc comment is kept.
    #[deferred_handler]
    pub async fn handle(event: LambdaEvent<Value>) -> Result<Value, Error> {
        let status = Self::status();
        defer!(async move { Self::audit(status) });
        Ok(json!({ "status": status, "echo": event.payload }))
    }

    fn status() -> u16 {
        202
    }

    fn audit(_status: u16) {}
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let _runner = lambda_runtime::run(service_fn(Api::handle));

    let response = Api::handle(LambdaEvent::new(json!("hi"), Context::default()))
        .await
        .unwrap();
    assert_eq!(response, json!({ "status": 202, "echo": "hi" }));
}
