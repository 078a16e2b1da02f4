//! The driver: one emulator, one OTLP sink and one child process per mode and scenario.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use deferred_testkit::emulator::{Emulator, EmulatorConfig, FunctionSpec};
use deferred_testkit::otlp::{Behaviour, OtlpSink};
use deferred_testkit::telemetry::ENDPOINT_ENV;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use lambda_runtime::Error;

use super::ROLE_ENV;
use super::{instructions, report};

/// The modes compared: (BENCH_MODE, label).
pub(crate) const MODES: [(&str, &str); 6] = [
    ("none", "0 no flush (baseline)"),
    ("sync", "1 sync flush"),
    ("otel-layer", "2 OpenTelemetryLayer"),
    ("naive", "4 naive spawn"),
    ("run", "5 Deferred::run"),
    ("start", "6 Deferred::start"),
];

/// Scenario (c) only: plain `lambda_runtime::run` plus a bare extension that re-arms
/// `event/next` at once: the price of the extension round trip without lambda-deferred.
pub(crate) const EXT_ONLY: (&str, &str) = ("ext-only", "bare extension (c only)");

/// Scenario (c) only: the same bare extension, re-arming only once a layer says the response
/// is POSTed: the least a design that flushes after the POST and off the runtime's threads
/// can cost.
pub(crate) const EXT_AFTER_POST: (&str, &str) = (
    "ext-after-post",
    "floor: bare extension, re-armed after the POST (c only)",
);

/// Every mode of scenario c, in table order: the six modes, then the bare extension and the
/// floor.
pub(crate) fn c_modes() -> impl Iterator<Item = (&'static str, &'static str)> {
    MODES.into_iter().chain([EXT_ONLY, EXT_AFTER_POST])
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scenario {
    A,
    B,
    C,
    D,
    E,
}

impl Scenario {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Scenario::A => "a",
            Scenario::B => "b",
            Scenario::C => "c",
            Scenario::D => "d",
            Scenario::E => "e",
        }
    }

    pub(crate) fn describe(self) -> &'static str {
        match self {
            Scenario::A => {
                "back-to-back, handler 20 ms, exporter 5 ms, 2 s stall on every 50th export"
            }
            Scenario::B => "as (a) + a 300 ms deferred action",
            Scenario::C => "overhead: empty handler, no telemetry, no-op flush",
            Scenario::D => "cold start: process start to first response",
            Scenario::E => "exporter down: every export stalls 3 s, flush_timeout 1 s",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Sizes {
    pub(crate) a: usize,
    pub(crate) b: usize,
    pub(crate) c_secs: u64,
    pub(crate) d: usize,
    pub(crate) e: usize,
}

const FULL: Sizes = Sizes {
    a: 1000,
    b: 200,
    c_secs: 10,
    d: 30,
    e: 10,
};
const QUICK: Sizes = Sizes {
    a: 100,
    b: 20,
    c_secs: 2,
    d: 10,
    e: 3,
};

/// One mode in one scenario.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub(crate) scenario: Scenario,
    pub(crate) mode: &'static str,
    pub(crate) label: &'static str,
    pub(crate) n: usize,
    /// Caller latency (scenario d: cold start), from dispatch to the response.
    pub(crate) latency: Vec<Duration>,
    pub(crate) per_sec: f64,
    /// Per invocation: from the response POST to the invocation being complete.
    pub(crate) busy: Vec<Duration>,
    pub(crate) spans_created: usize,
    pub(crate) spans_received: usize,
    pub(crate) premature: usize,
    pub(crate) rss_kib: u64,
    /// CPU time of the child per invocation.
    pub(crate) cpu_per_inv: Duration,
    /// Scenario c: `cpu_per_inv` in each round (the modes take turns), to show its spread.
    pub(crate) cpu_rounds: Vec<Duration>,
    /// Scenario c: invocations per second in each round (`per_sec` is their median).
    pub(crate) rate_rounds: Vec<f64>,
    /// Scenario c: the part of `cpu_per_inv` spent on the extension's own threads (the phase
    /// and chain threads of modes 5 and 6, the bare extension's thread); the rest is the
    /// runtime's.
    pub(crate) extension_cpu_per_inv: Duration,
    /// Scenario c: CPU time of the benchmark's own process per invocation: the emulator
    /// serving the Runtime and Extensions APIs, and the caller (plus the benchmark's own
    /// bookkeeping and progress bar, the same in every mode). An extension's `event/next`
    /// costs this side too, as on Lambda it costs the server behind the APIs.
    pub(crate) api_cpu_per_inv: Duration,
    /// Invocations that did not succeed, or whose invocation never completed (a phase that
    /// ran to the function's timeout: the caller had its answer, but the environment was
    /// reset); those are missing from busy and premature.
    pub(crate) errors: usize,
    /// Invocations whose deferred phase never began a flush (no `flush-start` mark).
    pub(crate) unflushed: usize,
    /// Spans the sink received twice.
    pub(crate) duplicate_spans: usize,
    /// The clock ticks (10 ms) behind `cpu_per_inv` outside scenario c: below about 20 the
    /// figure is the tick's resolution, not a measurement.
    pub(crate) cpu_ticks: u64,
    /// Scenario c: context switches of the child (all threads) per invocation.
    pub(crate) switches_per_inv: f64,
    /// Scenario c: the part of `switches_per_inv` on the extension's own threads.
    pub(crate) extension_switches_per_inv: f64,
    /// Scenario c: where each invocation's cycle goes, as the emulator saw it.
    pub(crate) cycle: Cycle,
}

/// Scenario c: the parts of an invocation's cycle, per invocation, from the emulator's
/// timeline. Their p50s show which part a mode lengthens.
#[derive(Debug, Clone, Default)]
pub(crate) struct Cycle {
    /// From the event's dispatch to the response POST (handler and runtime).
    pub(crate) to_response: Vec<Duration>,
    /// From the response POST to the runtime's next `/next`.
    pub(crate) to_runtime_next: Vec<Duration>,
    /// From the response POST to the invocation being complete (the last `event/next`).
    pub(crate) to_complete: Vec<Duration>,
}

pub(crate) fn pct(v: &[Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    let mut s = v.to_vec();
    s.sort();
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

const USAGE: &str = "\
usage: bench [--quick] [--docs] [--serial] [--check] [--only a,b,c,d,e] [--modes none,sync,otel-layer,naive,run,start,ext-only,ext-after-post] [--cold N] [--wrap CMD] [--instructions]
  --quick   reduced sizes (about a minute)
  --docs    write docs/BENCHMARKS.md and the SVG charts (a full run: --quick, --only and --modes are for exploring)
  --serial  run the modes of scenarios a, b and e one after the other instead of at once
  --check   fail (exit 1) if an invocation failed (or, in a, b and e, never completed), or if modes 5 and 6 broke
            a guarantee: lost a span, sent one twice, skipped a flush or released the
            environment early in scenarios a and b, made the caller wait for the action (b) or
            the stalled exporter (e), or held the environment past flush_timeout + 500 ms (e)
            (the ratio targets are not checked: they move with the machine)
  --only    run only these scenarios
  --modes   run only these modes
  --cold N  N cold starts in scenario d
  --wrap    start the function as `CMD <this binary>` (words split at spaces), to profile it:
            --wrap \"taskset -c 1\", --wrap \"valgrind --tool=callgrind\"; CMD must run the
            function in its own process (exec it), as taskset and valgrind do
  --instructions
            also count the instructions per invocation of modes 0, floor and 5 in scenario c
            under callgrind (needs valgrind; about 15 s; --docs counts whenever valgrind is
            installed); with --check, fail if mode 5 adds more than 50k over the floor";

fn usage_error(why: &str) -> ! {
    eprintln!("bench: {why}\n\n{USAGE}");
    std::process::exit(2);
}

/// The value after `flag` in `args`, if the flag is there.
fn value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let at = args.iter().position(|a| a == flag)?;
    args.get(at + 1).map(String::as_str)
}

/// Exits with a usage error when the comma-separated `list` after `flag` names something that
/// is not in `names`.
fn known(flag: &str, what: &str, list: Option<&str>, names: &[&str]) {
    for name in list.into_iter().flat_map(|list| list.split(',')) {
        if !names.contains(&name) {
            usage_error(&format!("{flag}: no {what} {name:?}"));
        }
    }
}

/// Whether `name` is in the comma-separated `list`; everything is when there is no list.
fn listed(list: Option<&str>, name: &str) -> bool {
    list.is_none_or(|list| list.split(',').any(|x| x == name))
}

pub(crate) async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return Ok(());
    }
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--quick" | "--docs" | "--serial" | "--check" | "--instructions" => {}
            "--only" | "--modes" | "--cold" | "--wrap" if rest.next().is_some() => {}
            other => usage_error(&format!("bad argument {other:?}")),
        }
    }
    let partial = [
        "--quick",
        "--only",
        "--modes",
        "--cold",
        "--wrap",
        "--instructions",
    ];
    if args.iter().any(|a| a == "--docs") && args.iter().any(|a| partial.contains(&a.as_str())) {
        usage_error(
            "--docs records a full run: no --quick, --only, --modes, --cold, --wrap or --instructions with it",
        );
    }
    let quick = args.iter().any(|a| a == "--quick");
    let docs = args.iter().any(|a| a == "--docs");
    let serial = args.iter().any(|a| a == "--serial");
    let mut sizes = if quick { QUICK } else { FULL };
    // `--only a,d`: run only these scenarios; `--modes run,none`: only these modes (by key:
    // none, sync, otel-layer, naive, run, start, ext-only, ext-after-post); for profiling one
    // against another.
    let (only, only_modes) = (value(&args, "--only"), value(&args, "--modes"));
    let scenarios = [
        Scenario::A,
        Scenario::B,
        Scenario::C,
        Scenario::D,
        Scenario::E,
    ];
    known("--only", "scenario", only, &scenarios.map(Scenario::name));
    known(
        "--modes",
        "mode",
        only_modes,
        &c_modes().map(|(key, _)| key).collect::<Vec<_>>(),
    );
    let wanted = |s: Scenario| listed(only, s.name());
    let mode_wanted = |mode: &str| listed(only_modes, mode);
    // `--cold N`: N cold starts.
    if let Some(n) = value(&args, "--cold") {
        sizes.d = n
            .parse()
            .unwrap_or_else(|_| usage_error(&format!("--cold takes a number, not {n:?}")));
    }
    if let Some(wrap) = value(&args, "--wrap") {
        let words: Vec<String> = wrap.split_whitespace().map(str::to_owned).collect();
        if words.is_empty() {
            usage_error("--wrap takes a command, not an empty string");
        }
        WRAP.get_or_init(|| words);
    }
    // A full run for the docs counts too, where valgrind is installed; an explicit
    // `--instructions` without it fails before anything runs.
    let asked = args.iter().any(|a| a == "--instructions");
    let count = (asked || docs) && instructions::available();
    if asked && !count {
        return Err(instructions::NEEDS_VALGRIND.into());
    }
    let started = Instant::now();
    let multi = MultiProgress::new();
    let mut rows = Vec::new();
    for scenario in [Scenario::A, Scenario::B, Scenario::E] {
        if !wanted(scenario) {
            continue;
        }
        let n = match scenario {
            Scenario::A => sizes.a,
            Scenario::B => sizes.b,
            _ => sizes.e,
        };
        let mut tasks = Vec::new();
        for (mode, label) in MODES.into_iter().filter(|(m, _)| mode_wanted(m)) {
            let bar = bar(&multi, n as u64, scenario, label);
            let task = tokio::spawn(steady(scenario, mode, label, n, bar));
            if serial {
                rows.push(task.await??);
            } else {
                tasks.push(task);
            }
        }
        for task in tasks {
            rows.push(task.await??);
        }
    }
    if wanted(Scenario::C) {
        let modes: Vec<_> = c_modes().filter(|(m, _)| mode_wanted(m)).collect();
        let bar = bar(
            &multi,
            sizes.c_secs * modes.len() as u64,
            Scenario::C,
            "all modes, interleaved",
        );
        rows.extend(overhead(&modes, Duration::from_secs(sizes.c_secs), bar).await?);
    }
    for (mode, label) in MODES
        .into_iter()
        .filter(|(m, _)| wanted(Scenario::D) && mode_wanted(m))
    {
        let bar = bar(&multi, sizes.d as u64, Scenario::D, label);
        rows.push(cold_start(mode, label, sizes.d, bar).await?);
    }
    let counted = if count {
        let modes: Vec<_> = instructions::COUNTED
            .iter()
            .filter_map(|name| c_modes().find(|(m, _)| m == name))
            .filter(|(m, _)| mode_wanted(m))
            .collect();
        let bar = bar(
            &multi,
            2 * modes.len() as u64,
            Scenario::C,
            "instructions (callgrind)",
        );
        Some(instructions::measure(&modes, bar).await?)
    } else {
        None
    };
    multi.clear().ok();
    let took = started.elapsed();
    let table = report::table(&rows);
    println!("{table}");
    let mut targets = report::targets(&rows);
    match &counted {
        Some(counts) => {
            let _ = writeln!(targets, "{}", instructions::line(counts));
        }
        None if docs => {
            let _ = writeln!(
                targets,
                "- (c) instructions per invocation: not counted (valgrind not found)"
            );
        }
        None => {}
    }
    println!("{targets}");
    println!(
        "{} run took {:.0} s",
        if quick { "quick" } else { "full" },
        took.as_secs_f64()
    );
    if docs {
        report::write_docs(&rows, &table, &targets, quick, serial, sizes, took)?;
        println!("wrote docs/BENCHMARKS.md, docs/bench-latency.svg, docs/bench-busy.svg");
    }
    if args.iter().any(|a| a == "--check") {
        let mut failures = report::broken_guarantees(&rows);
        failures.extend(counted.as_deref().and_then(instructions::over_bound));
        if !failures.is_empty() {
            for failure in &failures {
                eprintln!("bench --check: {failure}");
            }
            std::process::exit(1);
        }
        println!(
            "check: every invocation succeeded (and completed, in a, b and e); in (a) and (b) modes 5 and 6 lost no span, sent none twice, flushed every phase and never released early; their callers never waited for the action (b) or the stalled exporter (e), and no phase outlived flush_timeout by 500 ms (e){}",
            if counted.as_deref().and_then(instructions::own).is_some() {
                "; lambda-deferred's own instructions per invocation are within their bound"
            } else {
                ""
            }
        );
    }
    Ok(())
}

fn bar(multi: &MultiProgress, len: u64, scenario: Scenario, label: &str) -> ProgressBar {
    let bar = multi.add(ProgressBar::new(len));
    bar.set_style(
        ProgressStyle::with_template("{prefix:>26} [{bar:30}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("({}) {label}", scenario.name()));
    bar
}

/// `--wrap`: the command the function is started under, if any.
static WRAP: OnceLock<Vec<String>> = OnceLock::new();

fn spec(mode: &str, sink: Option<&OtlpSink>) -> Result<FunctionSpec, Error> {
    spec_under(WRAP.get().map_or(&[], Vec::as_slice), mode, sink)
}

/// The function in `mode`, started as `wrap <this binary>` when `wrap` is not empty.
pub(crate) fn spec_under(
    wrap: &[String],
    mode: &str,
    sink: Option<&OtlpSink>,
) -> Result<FunctionSpec, Error> {
    let exe = std::env::current_exe()?;
    let mut spec = match wrap.split_first() {
        Some((program, args)) => args
            .iter()
            .fold(FunctionSpec::new(program), |spec, arg| spec.arg(arg))
            .arg(exe.to_string_lossy()),
        None => FunctionSpec::new(exe),
    }
    .env(ROLE_ENV, "function")
    .env("BENCH_MODE", mode)
    .env(
        "RUST_LOG",
        std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into()),
    );
    spec = match sink {
        Some(sink) => spec
            .env(ENDPOINT_ENV, sink.endpoint())
            .env("BENCH_MARKS", "1"),
        None => spec.env("BENCH_NOOP", "1"),
    };
    Ok(spec)
}

pub(crate) fn config() -> EmulatorConfig {
    EmulatorConfig {
        // Long enough for a synchronous flush through a 3 s stall: the bench measures the
        // stall's cost, not the reset that a short timeout would add on top.
        function_timeout: Duration::from_secs(10),
        ..EmulatorConfig::default()
    }
}

/// `/proc/<pid>/status` VmHWM (KiB) and utime + stime (clock ticks) of the child.
fn proc_stats(pid: Option<u32>) -> (u64, u64) {
    let Some(pid) = pid else { return (0, 0) };
    let hwm = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0);
    let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name (which is in parentheses): utime is field 14.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    (hwm, ticks)
}

/// The child's live threads: each one's name (`comm`) and its
/// `/proc/<pid>/task/<tid>/<file>`.
fn per_thread(pid: Option<u32>, file: &str) -> Vec<(String, String)> {
    let Some(pid) = pid else { return Vec::new() };
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| {
            let name = std::fs::read_to_string(t.path().join("comm")).ok()?;
            let text = std::fs::read_to_string(t.path().join(file)).ok()?;
            Some((name.trim().to_owned(), text))
        })
        .collect()
}

/// Voluntary + involuntary context switches of the child so far: of every live thread, and of
/// the extension's own threads ([`extension_thread`]).
fn switches(pid: Option<u32>) -> (u64, u64) {
    summed(pid, "status", |status| {
        status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum()
    })
}

/// CPU time of a process (the child, or the benchmark itself) so far, in nanoseconds (the
/// first field of `schedstat`: exact, where utime + stime count 10 ms ticks): of every live
/// thread, and of the extension's own threads ([`extension_thread`]). Scenario c's windows
/// are shorter than tokio's 10 s keep-alive of idle blocking threads, so no thread that ran
/// in one exits during it.
fn cpu_ns(pid: Option<u32>) -> (u64, u64) {
    summed(pid, "schedstat", |text| {
        text.split_whitespace()
            .next()
            .and_then(|ns| ns.parse().ok())
            .unwrap_or(0)
    })
}

/// `value` of each thread's `/proc/<pid>/task/<tid>/<file>`, summed over every live thread
/// and over the extension's own threads.
fn summed(pid: Option<u32>, file: &str, value: impl Fn(&str) -> u64) -> (u64, u64) {
    let mut all = 0;
    let mut extension = 0;
    for (name, text) in per_thread(pid, file) {
        let n = value(&text);
        all += n;
        if extension_thread(&name) {
            extension += n;
        }
    }
    (all, extension)
}

/// lambda-deferred's phase thread and chain thread, or the bare extension's thread.
fn extension_thread(name: &str) -> bool {
    matches!(name, "deferred-phase" | "deferred-chain" | "bare-extension")
}

const TICK: Duration = Duration::from_millis(10);

/// Scenarios a, b and e: `n` invocations, one after the other.
async fn steady(
    scenario: Scenario,
    mode: &'static str,
    label: &'static str,
    n: usize,
    bar: ProgressBar,
) -> Result<Row, Error> {
    let sink = OtlpSink::start().await?;
    let action_ms = if scenario == Scenario::B { 300 } else { 0 };
    sink.set_behaviour(match scenario {
        Scenario::E => Behaviour::StallFor(Duration::from_secs(3)),
        _ => Behaviour::StallEvery {
            every: 50,
            duration: Duration::from_secs(2),
            base: Duration::from_millis(5),
        },
    });
    let emulator = Emulator::start(config()).await?;
    let mut spec = spec(mode, Some(&sink))?
        .env("BENCH_HANDLER_MS", "20")
        .env("BENCH_ACTION_MS", action_ms.to_string());
    if scenario == Scenario::E {
        spec = spec.env("BENCH_FLUSH_TIMEOUT_MS", "1000");
    }
    emulator.spawn_function(spec).await?;
    let (_, ticks0) = proc_stats(emulator.child_pid());
    let t0 = Instant::now();
    let mut results = Vec::with_capacity(n);
    // The request ids of the invocations that went wrong, each counted once.
    let mut bad = std::collections::HashSet::new();
    for i in 0..n {
        let r = emulator.invoke(format!("{{\"i\":{i}}}")).await;
        if !r.outcome.is_success() {
            bad.insert(r.request_id.clone());
        }
        results.push(r);
        bar.inc(1);
    }
    // The last invocation's deferred phase (or its timeout).
    let last = results
        .last()
        .map(|r| r.request_id.clone())
        .unwrap_or_default();
    emulator
        .wait_until(Duration::from_secs(12), |_, tls| {
            tls.iter()
                .any(|t| t.request_id == last && t.complete.is_some())
        })
        .await;
    let elapsed = t0.elapsed();
    let pid = emulator.child_pid();
    let (rss_kib, ticks1) = proc_stats(pid);
    // Give spans already on the wire a moment (a frozen child sends nothing more).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let received = sink.spans_named("bench.handler") + sink.spans_named("bench.action");
    let duplicate_spans = sink.duplicate_spans();
    // Marks that could not be posted: their invocations' premature count cannot be trusted.
    for line in emulator.function_logs() {
        if let Some((_, rest)) = line.split_once(super::function::MARK_FAILED) {
            let id = rest.split_whitespace().next().unwrap_or_default();
            bad.insert(id.to_owned());
        }
    }
    let created = n + if action_ms > 0 { n } else { 0 };
    let timelines: HashMap<String, _> = emulator
        .timelines()
        .into_iter()
        .map(|t| (t.request_id.clone(), t))
        .collect();
    let mut latency = Vec::new();
    let mut busy = Vec::new();
    let mut premature = 0;
    let mut unflushed = 0;
    for r in &results {
        let Some(t) = timelines.get(&r.request_id) else {
            bad.insert(r.request_id.clone());
            continue;
        };
        if t.timed_out || t.complete.is_none() {
            bad.insert(r.request_id.clone());
        }
        if t.mark("flush-start").is_none() {
            unflushed += 1;
        }
        // Caller latency from dispatch: one environment serves one invocation at a time; Lambda
        // would send a caller that finds it busy to another environment, so the queueing
        // behind the previous deferred phase is not the caller's latency (it shows in inv/s).
        let queued = t.invoked.saturating_duration_since(t.requested);
        latency.push(r.latency.saturating_sub(queued));
        if let (Some(posted), Some(complete)) = (t.response_posted, t.complete) {
            busy.push(complete.saturating_duration_since(posted));
            // Premature readiness: the environment was released (complete: runtime and
            // extension both waiting in next) while this invocation's deferred work still ran.
            let late = |text: &str| t.mark(text).is_none_or(|at| at > complete);
            let flushed = t.mark("flush-start").is_some() && late("flush-end");
            let acted = action_ms > 0 && late("action-end");
            let naive_unflushed = mode == "naive" && t.mark("flush-start").is_none();
            if flushed || acted || naive_unflushed {
                premature += 1;
            }
        }
    }
    emulator.shutdown().await;
    bar.finish();
    Ok(Row {
        scenario,
        mode,
        label,
        n,
        latency,
        per_sec: n as f64 / elapsed.as_secs_f64(),
        busy,
        spans_created: created,
        spans_received: received,
        premature,
        rss_kib,
        cpu_per_inv: TICK * u32::try_from(ticks1.saturating_sub(ticks0)).unwrap_or(u32::MAX)
            / n.max(1) as u32,
        cpu_ticks: ticks1.saturating_sub(ticks0),
        errors: bad.len(),
        unflushed,
        duplicate_spans,
        cpu_rounds: Vec::new(),
        rate_rounds: Vec::new(),
        extension_cpu_per_inv: Duration::ZERO,
        api_cpu_per_inv: Duration::ZERO,
        switches_per_inv: 0.0,
        extension_switches_per_inv: 0.0,
        cycle: Cycle::default(),
    })
}

/// Per mode of scenario c: its environment and what was measured so far.
struct Overhead {
    emulator: Emulator,
    cpu_ns: u64,
    extension_cpu_ns: u64,
    api_cpu_ns: u64,
    busy_time: Duration,
    rates: Vec<f64>,
    cpu_rounds: Vec<Duration>,
    latency: Vec<Duration>,
    busy: Vec<Duration>,
    n: usize,
    errors: usize,
    switches: u64,
    extension_switches: u64,
    cycle: Cycle,
}

/// Scenario c: as many invocations as fit in `window` per mode, no telemetry, no-op flush.
/// The window is cut into rounds and the modes take turns (one environment each, frozen while
/// it waits), so that a load change on the machine hits every mode alike; inv/s is the median
/// over the rounds.
async fn overhead(
    modes: &[(&'static str, &'static str)],
    window: Duration,
    bar: ProgressBar,
) -> Result<Vec<Row>, Error> {
    const ROUNDS: u32 = 5;
    let mut envs = Vec::new();
    for (mode, _) in modes {
        let emulator = Emulator::start(config()).await?;
        emulator.spawn_function(spec(mode, None)?).await?;
        for _ in 0..50 {
            emulator.invoke("{}").await; // warm up
        }
        envs.push(Overhead {
            emulator,
            cpu_ns: 0,
            extension_cpu_ns: 0,
            api_cpu_ns: 0,
            busy_time: Duration::ZERO,
            rates: Vec::new(),
            cpu_rounds: Vec::new(),
            latency: Vec::new(),
            busy: Vec::new(),
            n: 0,
            errors: 0,
            switches: 0,
            extension_switches: 0,
            cycle: Cycle::default(),
        });
    }
    let slice = window / ROUNDS;
    for _ in 0..ROUNDS {
        for env in &mut envs {
            let emulator = &env.emulator;
            let (cpu0, extension_cpu0) = cpu_ns(emulator.child_pid());
            let (switches0, extension_switches0) = switches(emulator.child_pid());
            let (api_cpu0, _) = cpu_ns(Some(std::process::id()));
            let t0 = Instant::now();
            let mut results = Vec::new();
            while t0.elapsed() < slice {
                let r = emulator.invoke("{}").await;
                if !r.outcome.is_success() {
                    env.errors += 1;
                }
                results.push(r);
            }
            let last = results
                .last()
                .map(|r| r.request_id.clone())
                .unwrap_or_default();
            emulator
                .wait_until(Duration::from_secs(5), |_, tls| {
                    tls.iter()
                        .any(|t| t.request_id == last && t.complete.is_some())
                })
                .await;
            let elapsed = t0.elapsed();
            let (cpu1, extension_cpu1) = cpu_ns(emulator.child_pid());
            let (api_cpu1, _) = cpu_ns(Some(std::process::id()));
            env.api_cpu_ns += api_cpu1.saturating_sub(api_cpu0);
            let round_ns = cpu1.saturating_sub(cpu0);
            env.cpu_ns += round_ns;
            env.cpu_rounds
                .push(Duration::from_nanos(round_ns) / results.len().max(1) as u32);
            env.extension_cpu_ns += extension_cpu1.saturating_sub(extension_cpu0);
            let (switches1, extension_switches1) = switches(emulator.child_pid());
            env.switches += switches1.saturating_sub(switches0);
            env.extension_switches += extension_switches1.saturating_sub(extension_switches0);
            env.busy_time += elapsed;
            env.rates.push(results.len() as f64 / elapsed.as_secs_f64());
            env.n += results.len();
            let timelines: HashMap<String, _> = emulator
                .timelines()
                .into_iter()
                .map(|t| (t.request_id.clone(), t))
                .collect();
            for r in &results {
                if let Some(t) = timelines.get(&r.request_id) {
                    env.latency.push(
                        r.latency
                            .saturating_sub(t.invoked.saturating_duration_since(t.requested)),
                    );
                    if let (Some(p), Some(c)) = (t.response_posted, t.complete) {
                        env.busy.push(c.saturating_duration_since(p));
                        env.cycle
                            .to_response
                            .push(p.saturating_duration_since(t.invoked));
                        env.cycle.to_complete.push(c.saturating_duration_since(p));
                        if let Some(next) = t.runtime_next {
                            env.cycle
                                .to_runtime_next
                                .push(next.saturating_duration_since(p));
                        }
                    }
                }
            }
            bar.inc(1);
        }
    }
    bar.finish();
    let mut rows = Vec::new();
    for ((mode, label), env) in modes.iter().zip(envs) {
        let (rss_kib, _) = proc_stats(env.emulator.child_pid());
        env.emulator.shutdown().await;
        let mut rates = env.rates.clone();
        rates.sort_by(f64::total_cmp);
        let cpu = Duration::from_nanos(env.cpu_ns);
        rows.push(Row {
            scenario: Scenario::C,
            mode,
            label,
            n: env.n,
            latency: env.latency,
            per_sec: rates.get(rates.len() / 2).copied().unwrap_or(0.0),
            busy: env.busy,
            spans_created: 0,
            spans_received: 0,
            premature: 0,
            rss_kib,
            cpu_per_inv: cpu / env.n.max(1) as u32,
            cpu_rounds: env.cpu_rounds,
            rate_rounds: env.rates,
            extension_cpu_per_inv: Duration::from_nanos(env.extension_cpu_ns) / env.n.max(1) as u32,
            api_cpu_per_inv: Duration::from_nanos(env.api_cpu_ns) / env.n.max(1) as u32,
            errors: env.errors,
            unflushed: 0,
            duplicate_spans: 0,
            cpu_ticks: 0,
            switches_per_inv: env.switches as f64 / env.n.max(1) as f64,
            extension_switches_per_inv: env.extension_switches as f64 / env.n.max(1) as f64,
            cycle: env.cycle,
        });
    }
    Ok(rows)
}

/// Scenario d: `samples` fresh processes; from the spawn to the first response.
async fn cold_start(
    mode: &'static str,
    label: &'static str,
    samples: usize,
    bar: ProgressBar,
) -> Result<Row, Error> {
    let mut latency = Vec::new();
    let mut rss_kib = 0;
    let mut errors = 0;
    for _ in 0..samples {
        let emulator = Emulator::start(config()).await?;
        let spec = spec(mode, None)?;
        let t0 = Instant::now();
        emulator.spawn_function(spec).await?;
        let r = emulator.invoke("{}").await;
        latency.push(t0.elapsed());
        if !r.outcome.is_success() {
            errors += 1;
        }
        rss_kib = rss_kib.max(proc_stats(emulator.child_pid()).0);
        emulator.shutdown().await;
        bar.inc(1);
    }
    bar.finish();
    Ok(Row {
        scenario: Scenario::D,
        mode,
        label,
        n: samples,
        latency,
        per_sec: 0.0,
        busy: Vec::new(),
        spans_created: 0,
        spans_received: 0,
        premature: 0,
        rss_kib,
        cpu_per_inv: Duration::ZERO,
        errors,
        unflushed: 0,
        duplicate_spans: 0,
        cpu_ticks: 0,
        cpu_rounds: Vec::new(),
        rate_rounds: Vec::new(),
        extension_cpu_per_inv: Duration::ZERO,
        api_cpu_per_inv: Duration::ZERO,
        switches_per_inv: 0.0,
        extension_switches_per_inv: 0.0,
        cycle: Cycle::default(),
    })
}
