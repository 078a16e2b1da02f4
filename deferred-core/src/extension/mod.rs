//! A client of the Lambda Extensions API (2020-01-01), as used by the internal extension that
//! keeps the environment alive during the deferred phase.
//!
//! Public so that tests and tools can drive the protocol directly; most users never touch it.

mod client;
mod error;
mod event;

pub use client::{Client, Registration};
pub use error::ClientError;
pub use event::{InvokeEvent, NextEvent, ShutdownEvent, decode_event};
