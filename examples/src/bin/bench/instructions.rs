//! `--instructions`: instructions per invocation in scenario (c), counted by callgrind in the
//! function's process.
//!
//! Unlike CPU time, the count does not move with the machine's state or with where the kernel
//! runs the threads (docs/BENCHMARKS.md, "Where the threads run decides (c)"), so it can hold
//! lambda-deferred's own cost to a bound in CI. Each mode runs twice, each time in a fresh
//! function under `valgrind --tool=callgrind`: [`SHORT`] and [`LONG`] invocations after the
//! same warm-up. The difference of the two totals over the difference of the two counts
//! cancels the start-up and the shutdown. With `BENCH_CALLGRIND_DIR=<dir>` the output files
//! are kept there (`<mode>-<invocations>.callgrind`), for `callgrind_annotate`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use deferred_testkit::emulator::{Emulator, EmulatorConfig};
use indicatif::ProgressBar;
use lambda_runtime::Error;

use super::driver::{config, spec_under};

/// The most instructions per invocation that lambda-deferred's own code (mode 5 minus the
/// floor) may add before `--check` fails: about twice what it adds now (docs/BENCHMARKS.md).
pub(crate) const OWN_BOUND: f64 = 50_000.0;

/// The modes counted, by key: plain, the floor and mode 5 ([`own`] is the last minus the
/// floor).
pub(crate) const COUNTED: [&str; 3] = ["none", FLOOR, RUN];
const FLOOR: &str = "ext-after-post";
const RUN: &str = "run";

/// What an explicit `--instructions` needs.
pub(crate) const NEEDS_VALGRIND: &str =
    "bench --instructions needs valgrind (Debian: apt-get install valgrind)";

/// Invocations before the counted ones, in both runs.
const WARM_UP: usize = 50;
/// Invocations of the shorter run.
pub(crate) const SHORT: usize = 100;
/// Invocations of the longer run.
pub(crate) const LONG: usize = 1100;

/// One mode's count.
#[derive(Debug, Clone)]
pub(crate) struct Count {
    /// The mode's key (`BENCH_MODE`).
    pub(crate) mode: &'static str,
    /// The mode's label in the table.
    pub(crate) label: &'static str,
    /// User-space instructions of the function's process per invocation, all threads.
    pub(crate) per_invocation: f64,
}

/// Whether valgrind can be run.
pub(crate) fn available() -> bool {
    Command::new("valgrind")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Counts each of `modes` (key, label), two runs each: the bar moves once per run. The caller
/// has checked that valgrind is [`available`].
pub(crate) async fn measure(
    modes: &[(&'static str, &'static str)],
    bar: ProgressBar,
) -> Result<Vec<Count>, Error> {
    // `BENCH_CALLGRIND_DIR` keeps the output files there, for `callgrind_annotate`.
    let keep = std::env::var_os("BENCH_CALLGRIND_DIR").map(std::path::PathBuf::from);
    let dir = keep.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("bench-callgrind-{}", std::process::id()))
    });
    std::fs::create_dir_all(&dir)?;
    let mut counts = Vec::new();
    for &(mode, label) in modes {
        let short = total(mode, SHORT, &dir).await?;
        bar.inc(1);
        let long = total(mode, LONG, &dir).await?;
        bar.inc(1);
        counts.push(Count {
            mode,
            label,
            per_invocation: long.saturating_sub(short) as f64 / (LONG - SHORT) as f64,
        });
    }
    if keep.is_none() {
        // Best effort: the files are in the system's temporary directory.
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(counts)
}

/// Mode 5 (`run`) minus the floor (`ext-after-post`), when both were counted.
pub(crate) fn own(counts: &[Count]) -> Option<f64> {
    let of = |mode: &str| {
        counts
            .iter()
            .find(|c| c.mode == mode)
            .map(|c| c.per_invocation)
    };
    Some(of(RUN)? - of(FLOOR)?)
}

/// The figures as a line of the report.
pub(crate) fn line(counts: &[Count]) -> String {
    let each: Vec<String> = counts
        .iter()
        .map(|c| format!("{} {:.1}k", c.label, c.per_invocation / 1e3))
        .collect();
    let mut line = format!(
        "- (c) instructions per invocation (callgrind, the function's user space, all threads; {LONG} vs {SHORT} invocations): {}",
        each.join(" | ")
    );
    if let Some(own) = own(counts) {
        line.push_str(&format!(
            "; lambda-deferred's own code (mode 5 minus the floor): {:+.1}k, bound {:.0}k: **{}**",
            own / 1e3,
            OWN_BOUND / 1e3,
            if own <= OWN_BOUND { "met" } else { "missed" }
        ));
    }
    line
}

/// For `--check`: why the counts break the bound, if they do.
pub(crate) fn over_bound(counts: &[Count]) -> Option<String> {
    let own = own(counts)?;
    (own > OWN_BOUND).then(|| {
        format!(
            "(c) lambda-deferred's own code costs {:.1}k instructions per invocation over the floor, above the bound of {:.0}k",
            own / 1e3,
            OWN_BOUND / 1e3
        )
    })
}

/// The instructions of one function, from its start to its exit, after `n` invocations.
async fn total(mode: &str, n: usize, dir: &Path) -> Result<u64, Error> {
    let out = dir.join(format!("{mode}-{n}.callgrind"));
    let wrap = [
        "valgrind".to_owned(),
        "--tool=callgrind".to_owned(),
        format!("--callgrind-out-file={}", out.display()),
    ];
    let emulator = Emulator::start(EmulatorConfig {
        // SIGTERM, then time for callgrind to write its file, in every mode: with no
        // extension registered, Lambda (and so the emulator) would SIGKILL at once.
        shutdown_grace: Some(Duration::from_secs(60)),
        ..config()
    })
    .await?;
    emulator
        .spawn_function(spec_under(&wrap, mode, None)?)
        .await?;
    for i in 0..WARM_UP + n {
        let result = emulator.invoke("{}").await;
        if !result.outcome.is_success() {
            return Err(format!("{mode} under callgrind: invocation {i} failed").into());
        }
    }
    let shutdown = emulator.shutdown().await;
    if shutdown.killed {
        return Err(format!("{mode} under callgrind did not exit after SIGTERM").into());
    }
    let text = std::fs::read_to_string(&out)
        .map_err(|e| format!("callgrind wrote no {}: {e}", out.display()))?;
    parse_total(&text).ok_or_else(|| format!("no totals line in {}", out.display()).into())
}

/// The instructions executed, from the `totals:` line of a callgrind output file (its
/// `summary:` line in older versions), whose first event is `Ir` by default.
fn parse_total(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| {
            line.strip_prefix("totals:")
                .or_else(|| line.strip_prefix("summary:"))
        })
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(mode: &'static str, per_invocation: f64) -> Count {
        Count {
            mode,
            label: mode,
            per_invocation,
        }
    }

    #[test]
    fn every_counted_mode_is_a_mode_of_c() {
        // The driver picks the counted modes by key and would skip an unknown one silently.
        let keys: Vec<&str> = crate::driver::c_modes().map(|(key, _)| key).collect();
        for key in COUNTED {
            assert!(keys.contains(&key), "{key} is not a mode");
        }
    }

    #[test]
    fn the_bound_holds_mode_5_over_the_floor() {
        let within = [count("ext-after-post", 114_400.0), count("run", 137_500.0)];
        assert_eq!(over_bound(&within), None);
        assert!(
            line(&within).contains("+23.1k, bound 50k: **met**"),
            "{}",
            line(&within)
        );
        let above = [count("ext-after-post", 114_400.0), count("run", 170_000.0)];
        let why = over_bound(&above).expect("over the bound");
        assert!(why.contains("55.6k"), "{why}");
        assert!(line(&above).contains("**missed**"));
        // Without both modes there is nothing to hold to the bound.
        let alone = [count("run", 1e9)];
        assert_eq!(over_bound(&alone), None);
        assert!(!line(&alone).contains("bound"));
    }

    #[test]
    fn the_total_is_the_first_figure_of_the_totals_line() {
        let file = "version: 1\ncreator: callgrind-3.19.0\nevents: Ir\nfn=(1) main\n5 12\ntotals: 1275399974\n";
        assert_eq!(parse_total(file), Some(1_275_399_974));
        assert_eq!(parse_total("events: Ir\nsummary: 42 7\n"), Some(42));
        assert_eq!(parse_total("events: Ir\nfn=(1) main\n"), None);
        assert_eq!(parse_total("totals: many\n"), None);
    }
}
