//! Attributes, doc comments, inner attributes and visibility are kept; `unsafe fn` works.
#![deny(unused_variables, missing_docs)]
//! A crate with documented items.

use deferred_core::deferred_handler;
use lambda_runtime::{Context, LambdaEvent};

/// Documented, public, with an inner attribute that must still apply to the body.
#[deferred_handler]
#[must_use = "the handler's answer"]
pub async fn handler(event: LambdaEvent<u8>) -> u8 {
    #![allow(unused_variables)]
    let unused = 1;
    event.payload
}

pub(crate) mod inner {
    use super::*;

    /// Visible to the crate only.
    #[deferred_handler]
    #[cfg_attr(all(), allow(clippy::needless_return))]
    pub(crate) async unsafe fn raw(event: LambdaEvent<*const u8>) -> u8 {
        // SAFETY: the caller passes a valid pointer.
        return unsafe { *event.payload };
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    assert_eq!(handler(LambdaEvent::new(3, Context::default())).await, 3);
    let value = 4u8;
    let future = unsafe { inner::raw(LambdaEvent::new(&value as *const u8, Context::default())) };
    assert_eq!(future.await, 4);
}
