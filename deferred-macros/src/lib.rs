//! Procedural macros for lambda-deferred: `#[deferred_handler]`.
//!
//! Use them through `deferred-core`, which re-exports them: this crate never depends on the
//! core (its doc examples do, as a dev-dependency), and the code it generates names only
//! `::deferred_core::__private::…` (or the path given with `crate = "…"`): not even `::core`,
//! which a crate root's `extern crate … as core;` makes another crate.
//!
//! Layout: `args` reads the attribute's arguments, `item` reads the function, `signature`
//! checks it and finds the event argument, `lints` splits the argument's lint attributes
//! between the signature and the body, `expand` writes the rewritten function.
//!
//! What the rewrite looks like (paths shortened):
//!
//! ```text
//! #[deferred_handler(flush_timeout = "10s")]
//! pub async fn handler(mut event: LambdaEvent<Value>) -> Result<Value, Error> { BODY }
//!
//! pub async fn handler(event: LambdaEvent<Value>) -> Result<Value, Error> {
//!     // A `return`, for `clippy::implicit_return`. `-> !` ends in
//!     // `let __deferred_never: Never = …;` instead, a type macro in a tail: a `return` of a
//!     // diverging call is unreachable code.
//!     return ::deferred_core::__private::scope(
//!         ::deferred_core::__private::invocation((&event,).0), // spans the argument's type
//!         ::deferred_core::__private::Options::flush_timeout_nanos(10000000000),
//!         async move {
//!             // Never taken: fixes the block's output type, for `?` and for error messages.
//!             if false {
//!                 return <Result<Value, Error> as ::deferred_core::__private::FakeReturn>::fake_return();
//!             }
//!             // The body's own local, with the parameter's lint attributes; a destructuring
//!             // pattern goes here. The signature's `event` is the macro's own (`mixed_site`).
//!             let mut event = ::deferred_core::__private::rebind(event);
//!             match () { () => { BODY } }
//!         },
//!     )
//!     .await;
//! }
//! ```
#![forbid(unsafe_code)]

mod args;
mod expand;
mod item;
mod lints;
mod signature;

use proc_macro::TokenStream;

/// Makes an `async fn` Lambda handler's `defer!` actions and telemetry flush run after the
/// response.
///
/// ```no_run
/// use deferred_core::{Deferred, defer, deferred_handler};
/// use lambda_runtime::{Error, LambdaEvent, service_fn};
/// use serde_json::{Value, json};
///
/// #[deferred_handler(flush_timeout = "10s")]
/// async fn handler(event: LambdaEvent<Value>) -> Result<Value, Error> {
///     let id = store(&event.payload).await?;
///     defer!(async move { validate(id).await });         // runs after the response
///     defer!("notify", async move { notify(id).await }); // a named action
///     Ok(json!({ "status": 202, "id": id }))
/// }
///
/// #[tokio::main]
/// async fn main() -> Result<(), Error> {
///     Deferred::new().run(service_fn(handler)).await
/// }
/// # async fn store(_: &Value) -> Result<u64, Error> { Ok(42) }
/// # async fn validate(_: u64) {}
/// # async fn notify(_: u64) -> Result<(), std::io::Error> { Ok(()) }
/// ```
///
/// The handler stays an ordinary `async fn` that a unit test can call. Without
/// `Deferred::start()` or `run()` in the process, its actions run inline, before it returns:
///
/// ```
/// use deferred_core::{defer, deferred_handler};
/// use lambda_runtime::{Context, Error, LambdaEvent};
/// use serde_json::{Value, json};
/// use std::sync::atomic::{AtomicBool, Ordering};
///
/// static NOTIFIED: AtomicBool = AtomicBool::new(false);
///
/// #[deferred_handler]
/// async fn handler(event: LambdaEvent<Value>) -> Result<Value, Error> {
///     defer!("notify", async { NOTIFIED.store(true, Ordering::SeqCst) });
///     Ok(json!({ "echo": event.payload }))
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Error> {
/// let response = handler(LambdaEvent::new(json!("hi"), Context::default())).await?;
/// assert_eq!(response, json!({ "echo": "hi" }));
/// assert!(NOTIFIED.load(Ordering::SeqCst));
/// # Ok(())
/// # }
/// ```
///
/// # The handler
///
/// An `async fn`, free or associated (`&self`, `&mut self` and `self` methods work too), with
/// exactly one argument besides the receiver: the argument that carries the Lambda context,
/// `lambda_runtime::LambdaEvent<T>` for any `T`, or `lambda_http::Request` (feature `http` of
/// deferred-core). The argument may be a pattern, such as
/// `LambdaEvent { payload, context }: LambdaEvent<Value>`.
///
/// ```
/// use deferred_core::{defer, deferred_handler};
/// use lambda_runtime::{Error, LambdaEvent};
/// use serde_json::Value;
///
/// struct Orders {
///     table: String,
/// }
///
/// impl Orders {
///     #[deferred_handler(flush_timeout = "500ms")]
///     async fn handle(&self, LambdaEvent { payload, context }: LambdaEvent<Value>) -> Result<Value, Error> {
///         let (table, request_id) = (self.table.clone(), context.request_id);
///         defer!(async move { println!("{request_id}: audit {table}") });
///         Ok(payload)
///     }
/// }
/// ```
///
/// The signature is kept as written: visibility, attributes and doc comments, generics and
/// `where` clauses, the return type (`impl Trait` too). The body runs unchanged, with `?` and
/// `return`, inside the invocation's deferred scope: every `defer!` called while it runs, in
/// the handler or in any function it calls, queues an action on this invocation. Type errors
/// in the body point at your code, as they would without the attribute. A deferred handler
/// called from another's body (a router calling its route's handler) joins the caller's
/// invocation: its actions run in the invocation's one deferred phase, after the caller's body.
/// So does a deferred handler called several times in one invocation by an undecorated caller
/// (a router calling it once per record), with the runtime layer (`Deferred::run`, or
/// `layer()` on your own `Runtime`): every call's actions run in the one phase, in call order.
/// One called from a deferred action joins that action's phase: its actions run after the
/// action that called it.
/// Under `Deferred::start` the phase begins when the first call returns, so the later calls'
/// actions run inline, before the response (said once in the log). Either way the phase's
/// one flush gets the longest `flush_timeout` of the handlers called in the invocation.
///
/// Lint attributes on the argument work as without the attribute: the argument is re-bound at
/// the top of the body, under its own name or pattern, and its `#[allow]`, `#[warn]`,
/// `#[deny]` and `#[forbid]` cover both that binding and the argument's type. An `#[expect]`
/// is split by lint: the lints about the name (`unused_variables`, `unused_mut`,
/// `non_snake_case`, clippy's binding lints) are expected on the binding, the others on the
/// type.
///
/// ```
/// # #![deny(unused_variables, unfulfilled_lint_expectations)]
/// use deferred_core::deferred_handler;
/// use lambda_runtime::LambdaEvent;
/// use serde_json::Value;
///
/// #[deferred_handler]
/// async fn handler(
///     #[expect(unused_variables, reason = "the context is not needed yet")]
///     LambdaEvent { payload, context }: LambdaEvent<Value>,
/// ) -> Value {
///     payload
/// }
/// ```
///
/// `const fn` and `extern` functions are rejected; `unsafe fn` works. A function with any
/// other argument list does not compile:
///
/// ```compile_fail
/// use deferred_core::deferred_handler;
/// use lambda_runtime::{Error, LambdaEvent};
/// use serde_json::Value;
///
/// #[deferred_handler]
/// async fn handler(event: LambdaEvent<Value>, extra: u32) -> Result<Value, Error> {
///     Ok(event.payload)
/// }
/// ```
///
/// # Arguments
///
/// - `flush_timeout = "…"`: the longest this handler's telemetry flush may take, written as a
///   [humantime](https://docs.rs/humantime) duration: `"250ms"`, `"10s"`, `"1m 30s"`. Checked
///   at compile time: it must be above zero and at most 15 minutes. Without it, the timeout
///   set on the `Deferred` builder applies. Where several deferred handlers run in one
///   invocation (one calling another, or calls in a row), the flush gets the longest of
///   theirs.
/// - `crate = "…"`: the path of the deferred-core crate, when the dependency is renamed in
///   `Cargo.toml` (`crate = "renamed"`) or re-exported (`crate = "my_facade::deferred"`, or
///   `crate = "crate::reexport"`). A path that does not start with `crate`, `self`, `super`
///   or `::` starts with the name of another crate: `"renamed"` means `::renamed`; for a
///   module of your own crate, start it with `crate::`.
///
/// ```
/// // A facade crate that re-exports deferred-core for its users.
/// mod facade {
///     pub use deferred_core as deferred;
/// }
///
/// use facade::deferred::{defer, deferred_handler};
/// use lambda_runtime::{Error, LambdaEvent};
/// use serde_json::Value;
///
/// #[deferred_handler(crate = "crate::facade::deferred", flush_timeout = "1m 30s")]
/// async fn handler(event: LambdaEvent<Value>) -> Result<Value, Error> {
///     defer!(async {});
///     Ok(event.payload)
/// }
/// # fn main() {}
/// ```
///
/// A duration out of range is a compile error:
///
/// ```compile_fail
/// # use deferred_core::deferred_handler;
/// # use lambda_runtime::{Error, LambdaEvent};
/// # use serde_json::Value;
/// #[deferred_handler(flush_timeout = "16m")] // error: at most 15 minutes
/// async fn handler(event: LambdaEvent<Value>) -> Result<Value, Error> {
///     Ok(event.payload)
/// }
/// ```
///
/// # With `#[tracing::instrument]`
///
/// Both orders compile. Put `#[tracing::instrument]` **above** `#[deferred_handler]`:
///
/// ```
/// # use deferred_core::deferred_handler;
/// # use lambda_runtime::{Error, LambdaEvent};
/// # use serde_json::Value;
/// #[tracing::instrument(skip(event), fields(request_id = %event.context.request_id))]
/// #[deferred_handler]
/// async fn handler(event: LambdaEvent<Value>) -> Result<Value, Error> {
///     Ok(event.payload)
/// }
/// ```
///
/// The attribute written first expands first, and the one written last ends up outermost at
/// run time. In this order:
///
/// - `instrument` sees the function as you wrote it, so `skip(…)` and `fields(…)` can name
///   the bindings of a destructured argument. Below `#[deferred_handler]` it would see the
///   rewritten signature, where such an argument has a generated name (`skip(payload)` then
///   fails with "attempting to skip non-existent parameter", and the whole event is recorded
///   with `Debug`).
/// - The span covers the handler's body and closes before the invocation's deferred work is
///   handed over, so it is always part of this invocation's flush. Below, the span would also
///   cover the hand-over itself and close only after it.
///
/// # Panics
///
/// The rewritten handler's future needs Tokio: polled outside a Tokio runtime (an executor
/// such as `futures::executor::block_on` in a unit test), or on a runtime built without its
/// time driver (`Builder::new_current_thread().build()` without `enable_time()`;
/// `#[tokio::main]` and `#[tokio::test]` enable it), it panics when the invocation ends. In
/// Lambda, lambda_runtime reports that panic as the invocation's error.
///
/// ```should_panic
/// use deferred_core::deferred_handler;
/// use lambda_runtime::{Context, Error, LambdaEvent};
///
/// #[deferred_handler]
/// async fn handler(_event: LambdaEvent<()>) -> Result<(), Error> {
///     Ok(())
/// }
///
/// let no_timers = tokio::runtime::Builder::new_current_thread().build().unwrap();
/// // Panics: "A Tokio 1.x context was found, but timers are disabled."
/// no_timers.block_on(handler(LambdaEvent::new((), Context::default()))).unwrap();
/// ```
///
/// # Errors
///
/// Wrong arguments and unsupported functions are reported at compile time, on the offending
/// tokens, and the function is still emitted next to the error so the rest of the crate keeps
/// compiling (and the IDE keeps working). A handler argument that does not carry the Lambda
/// context is reported by the type checker, on the argument's type.
#[proc_macro_attribute]
pub fn deferred_handler(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::deferred_handler(args.into(), item.into()).into()
}
