//! `impl Trait` in the return type, with `?` inside the body.
use std::fmt::Debug;

use deferred_core::deferred_handler;
use lambda_runtime::{Context, Error, LambdaEvent};
use serde::Serialize;
use serde_json::{Value, json};

#[deferred_handler]
async fn handler(event: LambdaEvent<Value>) -> Result<impl Serialize + Debug, Error> {
    let n = event.payload["n"].as_u64().ok_or("`n` is missing")?;
    Ok(vec![n; 2])
}

#[deferred_handler]
async fn pair(event: LambdaEvent<u8>) -> (impl Debug, impl Serialize) {
    (event.payload, event.payload + 1)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let ok = handler(LambdaEvent::new(json!({ "n": 3 }), Context::default())).await;
    assert_eq!(serde_json::to_value(ok.unwrap()).unwrap(), json!([3, 3]));

    let err = handler(LambdaEvent::new(json!({}), Context::default())).await;
    assert_eq!(err.unwrap_err().to_string(), "`n` is missing");

    let (a, b) = pair(LambdaEvent::new(1, Context::default())).await;
    assert_eq!(format!("{a:?}"), "1");
    assert_eq!(serde_json::to_value(b).unwrap(), json!(2));
}
