//! Arbitrary bytes as the body of an Extensions API `event/next` answer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| deferred_fuzz::checks::extension_event(data));
