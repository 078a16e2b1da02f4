//! `defer!(future)` and `defer!("name", future)`; actions yielding `()` or `Result<(), E>`;
//! they run in the order they were queued.
use std::sync::Mutex;

use deferred_core::{defer, deferred_handler, try_defer};
use lambda_runtime::{Context, Error, LambdaEvent};

static RAN: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn record(what: impl Into<String>) {
    RAN.lock().unwrap().push(what.into());
}

#[deferred_handler]
async fn handler(event: LambdaEvent<u32>) -> Result<u32, Error> {
    let id = event.payload;
    defer!(async move { record(format!("unnamed {id}")) });
    defer!("named", async move { record(format!("named {id}")) });
    defer!(format!("audit-{id}"), async move {
        record("fallible");
        Ok::<(), std::io::Error>(())
    });
    try_defer!("tried", async { record("tried") })?;
    Ok(id)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    assert_eq!(
        handler(LambdaEvent::new(7, Context::default()))
            .await
            .unwrap(),
        7
    );
    assert_eq!(
        *RAN.lock().unwrap(),
        ["unnamed 7", "named 7", "fallible", "tried"]
    );
}
