//! Arbitrary bytes, in arbitrary reads, as what the Extensions API sends on the chain's own
//! `event/next` connection.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| deferred_fuzz::checks::line_answers(data));
