//! Benchmark: caller latency, environment busy time, lost telemetry and overhead of
//! lambda-deferred, side by side with the alternatives, on the testkit's Lambda emulator and
//! OTLP sink.
//!
//! ```text
//! cargo run --release -p examples --bin bench -- --quick          # about a minute
//! cargo run --release -p examples --bin bench -- --docs           # full run, writes docs/
//! ```
//!
//! Flags: `--quick` (reduced sizes), `--docs` (write `docs/BENCHMARKS.md` and the SVG charts),
//! `--serial` (run the modes of scenarios a, b and e one after the other instead of at once),
//! `--check` (exit 1 on a failed invocation, or on a lost span or an early release in modes 5
//! and 6 in scenarios a and b: `.ci/run` runs `--quick --check`);
//! for profiling, `--only c,d` (these scenarios), `--modes none,run,ext-only` (these modes),
//! `--cold N` (N cold starts) and `--wrap CMD` (start the function under `CMD`: `taskset`,
//! `valgrind --tool=callgrind`); `--instructions` (module `instructions`) counts the
//! instructions per invocation of scenario (c) under callgrind, which `--check` then holds to
//! a bound.
//!
//! The binary plays both sides: the driver (module `driver`) starts an emulator and a sink per
//! mode and scenario and re-executes this binary as the Lambda function (`BENCH_ROLE=function`,
//! module `function`), the way `quickstart` does.

mod driver;
mod function;
mod instructions;
mod report;

/// Set on the child process: run as the Lambda function rather than as the driver.
const ROLE_ENV: &str = "BENCH_ROLE";

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    if std::env::var_os(ROLE_ENV).is_some() {
        function::main().await
    } else {
        driver::main().await
    }
}
