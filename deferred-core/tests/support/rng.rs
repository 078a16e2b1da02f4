//! The generator of the tests that make HTTP answers from a fixed seed (the parity test in
//! `src/extension/parity.rs`, `tests/fuzz_mutations.rs`): xorshift64, enough to vary the
//! answers, and the same ones on every run, so that a failure repeats. One file included by
//! both (`#[path]`): one is a unit test, the other an integration test, and neither can name
//! the other's items.

/// xorshift64 from its seed (not zero).
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `0..n` (`n` > 0).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// True `in_ten` times in ten.
    #[allow(dead_code)] // Only the parity test draws chances.
    pub(crate) fn chance(&mut self, in_ten: usize) -> bool {
        self.below(10) < in_ten
    }

    /// One of `of` (not empty).
    pub(crate) fn pick<'a>(&mut self, of: &[&'a str]) -> &'a str {
        of[self.below(of.len())]
    }
}
