//! The fuzz targets of lambda-deferred (issue 5, "Bad input"). The checks live in
//! [`checks`], which `deferred-core/tests/fuzz_corpus.rs` includes with `#[path]` to replay
//! the committed corpus on stable.

pub mod checks;
