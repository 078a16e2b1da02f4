//! Arbitrary bytes as the headers of a Runtime API `invocation/next` answer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| deferred_fuzz::checks::runtime_headers(data));
