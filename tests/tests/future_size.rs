//! A deferred handler's future stays small whatever its body holds across an `.await`:
//! lambda_runtime's layers move the handler's future whole several times per invocation, so
//! each byte of it is copied that many times (and sits on the stack where it is built).

use deferred_core::deferred_handler;
use lambda_runtime::{Context, Error, LambdaEvent};

/// What the body keeps across its `.await`.
const HELD: usize = 16 * 1024;

#[deferred_handler]
async fn holds_a_buffer(event: LambdaEvent<u8>) -> Result<u8, Error> {
    let buffer = [event.payload; HELD];
    tokio::task::yield_now().await;
    Ok(std::hint::black_box(&buffer)[HELD - 1])
}

/// The same body without the attribute.
async fn plain(event: LambdaEvent<u8>) -> Result<u8, Error> {
    let buffer = [event.payload; HELD];
    tokio::task::yield_now().await;
    Ok(std::hint::black_box(&buffer)[HELD - 1])
}

fn event() -> LambdaEvent<u8> {
    LambdaEvent::new(7, Context::default())
}

#[test]
fn the_body_is_held_once_and_off_the_handlers_future() {
    let plain = std::mem::size_of_val(&plain(event()));
    let deferred = std::mem::size_of_val(&holds_a_buffer(event()));
    assert!(
        plain > HELD,
        "the plain body's future holds the buffer: {plain} bytes"
    );
    // Before: an `async fn` that takes the body and awaits it keeps it twice, and the body
    // went through two of them (more than 4 x 16 KB).
    assert!(
        deferred < 4 * 1024,
        "the deferred handler's future is {deferred} bytes (the plain body's: {plain})"
    );
}

#[tokio::test]
async fn the_boxed_body_still_runs_to_its_output() {
    assert_eq!(holds_a_buffer(event()).await.expect("ok"), 7);
}
