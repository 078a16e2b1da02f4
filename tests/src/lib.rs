//! Test kit for lambda-deferred: a Lambda emulator and an OTLP/HTTP sink.
#![forbid(unsafe_code)]
pub mod mark;
pub mod otlp;
pub mod telemetry;

pub mod emulator;
