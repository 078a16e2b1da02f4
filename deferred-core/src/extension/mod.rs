//! A client of the Lambda Extensions API (2020-01-01), as used by the internal extension that
//! keeps the environment alive during the deferred phase.
//!
//! Public so that tests and tools can drive the protocol directly; most users never touch it.
//!
//! The protocol, from the extension's side: register during init, then call `event/next` in
//! a loop. Each call answers with the next event and tells Lambda that the extension has
//! finished with the previous one.
//!
//! ```no_run
//! use deferred_core::extension::{Client, ClientError, NextEvent};
//!
//! # async fn example() -> Result<(), ClientError> {
//! let Some(client) = Client::from_env() else {
//!     return Ok(()); // not in Lambda
//! };
//! let client = client?;
//! let registration = client.register("my-extension", &["INVOKE"]).await?;
//! loop {
//!     match client.next_event(&registration.extension_id).await? {
//!         NextEvent::Invoke(invoke) => {
//!             // Work done here, before the next `next_event`, delays the freeze of the
//!             // environment (and the next invocation), never the caller's response.
//!             let _ = invoke.deadline;
//!         }
//!         NextEvent::Shutdown(_) => break,
//!         _ => {} // an event type this version does not know
//!     }
//! }
//! # Ok(())
//! # }
//! ```

mod client;
mod error;
mod event;
pub(crate) mod line;
#[cfg(test)]
mod parity;
pub(crate) mod register;

pub use client::{Client, Registration};
pub use error::ClientError;
pub use event::{InvokeEvent, NextEvent, ShutdownEvent, decode_event};
