//! One invocation from the wrapper's side: claim, run the body, hand the queue over.

use std::future::Future;

use crate::context::Invocation;
use crate::scope::{Options, Queue, with_queue};

pub(crate) async fn run<F: Future>(_invocation: Invocation, _options: Options, body: F) -> F::Output {
    // Placeholder: runs the actions inline after the body. Replaced by the chained phase.
    let queue = Queue::new(10_000);
    let out = with_queue(queue.clone(), body).await;
    while let Some(action) = queue.pop() {
        let _ = action.future.await;
    }
    out
}
