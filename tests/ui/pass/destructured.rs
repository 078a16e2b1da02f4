//! Patterns in the argument (`ref mut` ones too), `mut` bindings, and user names that look
//! like the macro's own.
use deferred_core::{defer, deferred_handler};
use lambda_runtime::{Context, LambdaEvent};
use serde_json::{Value, json};

#[deferred_handler]
async fn handler(LambdaEvent { payload, context }: LambdaEvent<Value>) -> String {
    // Names like the generated ones do not clash with them.
    let __deferred_event = payload["id"].clone();
    let __deferred_return = context.request_id.clone();
    defer!(async move { drop(payload) });
    format!("{__deferred_event}@{__deferred_return}")
}

#[deferred_handler]
async fn tuple(
    LambdaEvent {
        payload: (a, b), ..
    }: LambdaEvent<(u8, u8)>,
) -> u8 {
    a + b
}

#[deferred_handler]
async fn mutable(mut event: LambdaEvent<Vec<u8>>) -> usize {
    event.payload.push(1);
    event.payload.len()
}

#[deferred_handler]
async fn ignored(_: LambdaEvent<Value>) -> &'static str {
    "ok"
}

#[deferred_handler]
async fn by_ref(ref event: LambdaEvent<u8>) -> u8 {
    event.payload
}

// `ref mut` bindings borrow the argument mutably, as in a plain function.
#[deferred_handler]
async fn by_ref_mut(ref mut event: LambdaEvent<u8>) -> u8 {
    event.payload += 1;
    event.payload
}

#[deferred_handler]
async fn field_by_ref_mut(
    LambdaEvent {
        ref mut payload, ..
    }: LambdaEvent<Vec<u8>>,
) -> usize {
    payload.push(1);
    payload.len()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut context = Context::default();
    context.request_id = "req-1".to_owned();
    let event = LambdaEvent::new(json!({ "id": 7 }), context);
    assert_eq!(handler(event).await, "7@req-1");

    assert_eq!(tuple(LambdaEvent::new((2, 3), Context::default())).await, 5);
    assert_eq!(
        mutable(LambdaEvent::new(vec![0], Context::default())).await,
        2
    );
    assert_eq!(
        ignored(LambdaEvent::new(json!(null), Context::default())).await,
        "ok"
    );
    assert_eq!(by_ref(LambdaEvent::new(9, Context::default())).await, 9);
    assert_eq!(
        by_ref_mut(LambdaEvent::new(9, Context::default())).await,
        10
    );
    assert_eq!(
        field_by_ref_mut(LambdaEvent::new(vec![0], Context::default())).await,
        2
    );
}
