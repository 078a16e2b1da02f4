//! The expansion adds no lint on the user's code: CI runs clippy on this file with the lints
//! that a rebinding of the event could trip denied (`cargo clippy --all-targets -D warnings`),
//! and the handlers still run.
#![deny(
    clippy::shadow_same,
    clippy::shadow_reuse,
    clippy::shadow_unrelated,
    clippy::no_effect_underscore_binding,
    clippy::used_underscore_binding,
    clippy::redundant_locals,
    clippy::pedantic,
    unused_variables,
    unused_mut
)]

use deferred_core::deferred_handler;
use lambda_runtime::{Context, LambdaEvent};

#[deferred_handler]
async fn plain(event: LambdaEvent<u8>) -> u8 {
    event.payload
}

#[deferred_handler]
async fn mutated(mut event: LambdaEvent<u8>) -> u8 {
    event.payload += 1;
    event.payload
}

#[deferred_handler]
async fn destructured(LambdaEvent { payload, .. }: LambdaEvent<u8>) -> u8 {
    payload + 2
}

#[deferred_handler]
async fn ignored(_event: LambdaEvent<u8>) -> u8 {
    4
}

#[deferred_handler]
async fn raw(r#type: LambdaEvent<u8>) -> u8 {
    r#type.payload + 4
}

/// A crate that denies `clippy::implicit_return` (restriction) writes every return
/// explicitly; the expansion's own code must not be reported, on the attribute, where the user
/// cannot fix it.
#[deny(clippy::implicit_return)]
mod explicit_returns {
    use deferred_core::deferred_handler;
    use lambda_runtime::{Error, LambdaEvent};

    #[deferred_handler]
    pub(super) async fn value(event: LambdaEvent<u8>) -> u8 {
        return event.payload + 5;
    }

    #[deferred_handler(flush_timeout = "1s")]
    pub(super) async fn fallible(event: LambdaEvent<u8>) -> Result<u8, Error> {
        let n = event.payload.checked_add(6).ok_or("overflow")?;
        return Ok(n);
    }

    #[deferred_handler]
    pub(super) async fn unit(_event: LambdaEvent<u8>) {}

    // No tail to report, and no `return` of the diverging call (unreachable code).
    #[deferred_handler]
    pub(super) async fn never(_event: LambdaEvent<u8>) -> ! {
        loop {
            tokio::task::yield_now().await;
        }
    }
}

// A type macro that expands to `!`: the fake return, all `_` here, must not be a `return` of a
// diverging call (`clippy::diverging_sub_expression`, on by default, on the user's `never!()`).
macro_rules! never {
    () => { ! };
}

#[deferred_handler]
async fn type_macro_never(_event: LambdaEvent<u8>) -> never!() {
    loop {
        tokio::task::yield_now().await;
    }
}

// `-> impl Trait` whose body diverges (a stub, `panic!`, `process::exit`): the hidden type is
// `!`, and a fake return of it would trip `clippy::diverging_sub_expression` (on by default) on
// the user's `impl Debug`.
#[deferred_handler]
async fn opaque_stub(event: LambdaEvent<u8>) -> impl std::fmt::Debug {
    panic!("not written yet: {}", event.payload)
}

#[tokio::test(flavor = "current_thread")]
async fn handlers_run() {
    let event = || LambdaEvent::new(1, Context::default());
    assert_eq!(plain(event()).await, 1);
    assert_eq!(mutated(event()).await, 2);
    assert_eq!(destructured(event()).await, 3);
    assert_eq!(ignored(event()).await, 4);
    assert_eq!(raw(event()).await, 5);
    assert_eq!(explicit_returns::value(event()).await, 6);
    assert_eq!(explicit_returns::fallible(event()).await.ok(), Some(7));
    explicit_returns::unit(event()).await;
    // Compiled, not run: it never ends.
    let _ = (explicit_returns::never, type_macro_never, opaque_stub);
}
