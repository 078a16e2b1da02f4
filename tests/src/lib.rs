//! Test kit for lambda-deferred: a Lambda emulator and an OTLP/HTTP sink.
#![forbid(unsafe_code)]
