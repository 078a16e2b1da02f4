//! Compile-time behaviour of `#[deferred_handler]` and `defer!`, with trybuild.
//!
//! `tests/ui/pass/*.rs` must compile and run; `tests/ui/fail/*.rs` must fail to compile with
//! exactly the errors in the `.stderr` next to them. After changing a message, regenerate with
//! `TRYBUILD=overwrite cargo test -p deferred-testkit --test ui`, then read the diff.

#[test]
fn ui() {
    let cases = trybuild::TestCases::new();
    cases.pass("ui/pass/*.rs");
    cases.compile_fail("ui/fail/*.rs");
}
