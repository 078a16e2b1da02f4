//! `defer!` in functions the handler calls, sync and async: the queue is the invocation's,
//! not the handler body's.
use std::sync::atomic::{AtomicUsize, Ordering};

use deferred_core::{defer, deferred_handler};
use lambda_runtime::{Context, Error, LambdaEvent};

static RUNS: AtomicUsize = AtomicUsize::new(0);

fn schedule_cleanup(id: u32) {
    defer!("cleanup", async move {
        RUNS.fetch_add(id as usize, Ordering::SeqCst);
    });
}

async fn store(id: u32) -> Result<u32, Error> {
    tokio::task::yield_now().await;
    schedule_cleanup(id);
    defer!(async {
        RUNS.fetch_add(100, Ordering::SeqCst);
    });
    Ok(id)
}

#[deferred_handler]
async fn handler(event: LambdaEvent<u32>) -> Result<u32, Error> {
    store(event.payload).await
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    assert_eq!(
        handler(LambdaEvent::new(5, Context::default()))
            .await
            .unwrap(),
        5
    );
    assert_eq!(RUNS.load(Ordering::SeqCst), 105);
}
