//! Chaos: back-to-back invocations, each with a plan drawn at random (a seeded RNG): handlers
//! that succeed, fail, panic, stream or nearly spend the deadline; actions that succeed, fail,
//! panic, hang or spawn a task; idle gaps (the environment is frozen); a collector whose
//! behaviour changes every few invocations (slow, stalling, failing, refusing, answering
//! garbage); late INVOKE events, slow Extensions API answers and failed `event/next` calls.
//! The soak (`reliability_soak.rs`) holds one fault steady; this mixes them, to find the
//! interleavings no single fault produces.
//!
//! What must hold for every invocation, whatever the mix:
//! - G1: the response does not wait for deferred work;
//! - G2: the environment is released (the runtime and the extension both wait in their `next`
//!   calls) only after the invocation's actions have ended;
//! - G3: under `run`, a chained phase follows the response (a phase run inline, when the chain
//!   is broken, runs before it; a nearly spent invocation's phase, cut at its end with nothing
//!   run, may end first), and no action starts before the response;
//! - G4: no invocation reaches its deadline, none is released by the chain's safety net, the
//!   environment is never reset, and `event/next` is never called twice at once;
//! - G5: every action that ends by itself ran, whatever the handler or the other actions did;
//! - each invocation is reported exactly once;
//! - spans: a clean flush delivered the invocation's spans before the release, and every span
//!   is delivered in the end unless a report in between counted spans lost (their export
//!   failed); no report counts spans dropped on a full queue (2,048 spans cannot pile up
//!   here, so such a count would be false).
//!
//! `CHAOS_SEED` replays a run (the seed is printed, and named on failure);
//! `CHAOS_INVOCATIONS` sets its size.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use deferred_testkit::emulator::{
    EmulatorConfig, Fault, InvokeOutcome, InvokeResult, RestoredConnections, Timeline,
};
use deferred_testkit::otlp::{Behaviour, Reply};
use serde_json::{Value, json};
use support::{Env, phase_end, start};

/// When the environment was released after `t`: both the runtime and the extension wait in
/// their `next` calls (Lambda freezes it then). The extension alone calls `event/next` early
/// when the phase ran inline, before the runtime's next call.
fn released(t: &Timeline) -> Instant {
    t.complete.expect("the invocation completed")
}

/// How long the phase of a report took (`… took 790.5ms; …`).
fn took(report: &str) -> Option<Duration> {
    let ms = report.split(" took ").nth(1)?.split("ms").next()?;
    Some(Duration::from_secs_f64(ms.parse::<f64>().ok()? / 1e3))
}

/// Whether the phase report of an invocation says it ran inline (the chain was broken).
fn inline(report: &str) -> bool {
    report.contains("deferred phase (Inline)")
}

/// Whether a log line counts spans lost ("1 span lost", "N spans lost").
fn counts_lost(line: &str) -> bool {
    line.contains("spans lost") || line.contains("span lost")
}

/// Whether a log line counts spans dropped ("1 span dropped", "N spans dropped").
fn counts_dropped(line: &str) -> bool {
    line.contains("spans dropped") || line.contains("span dropped")
}

/// The function's timeout: short, so a hanging action (cut at the deadline minus the 100 ms
/// safety margin) costs under a second.
const FUNCTION_TIMEOUT: Duration = Duration::from_secs(1);

/// How much later than the handler's own time the response may be posted (G1): generous, for
/// a loaded 2-core machine; a response that waited on a hanging action would take at least
/// 300 ms more. (A wait for the flush, capped at `FLUSH_TIMEOUT_MS`, may stay within it: under
/// the layer, G3's ordering checks catch that.)
const RESPONSE_SLACK: Duration = Duration::from_millis(250);

/// One invocation's plan, and what it lets the test expect.
#[derive(Debug)]
struct Case {
    payload: Value,
    /// `ok`, `err` or `panic`.
    handler: &'static str,
    handler_ms: u64,
    /// The streamed answer's extra time (chunks x ms), if it streams.
    stream_ms: Option<u64>,
    /// The actions that end by themselves (ok, err, spawn): each must post `end:<name>`.
    ending: Vec<String>,
    /// How many of those trace a span that closes (ok, err).
    action_spans: usize,
    /// Whether an action hangs (queued last: it is cut at the phase's end).
    hangs: bool,
    /// Whether the handler leaves too little time for the actions (they may not run).
    nearly_spent: bool,
    /// Idle before the invocation (the environment freezes).
    idle: Option<Duration>,
    /// The collector's new behaviour, from this invocation on.
    behaviour: Option<Behaviour>,
    /// An emulator fault armed (once) before the invocation.
    fault: Option<Fault>,
}

/// Draws plans from a seeded RNG.
struct Planner {
    rng: fastrand::Rng,
    /// Only collector behaviours that lose nothing (no failed, refused or stalled export).
    lossless: bool,
}

impl Planner {
    fn case(&mut self, i: usize) -> Case {
        let rng = &mut self.rng;
        let handler = match rng.u32(0..100) {
            0..88 => "ok",
            88..94 => "err",
            _ => "panic",
        };
        let nearly_spent = rng.u32(0..100) == 0;
        let handler_ms = if nearly_spent {
            rng.u64(820..=850)
        } else {
            rng.u64(0..=20)
        };
        let stream = (handler == "ok" && rng.u32(0..100) < 6).then(|| {
            let (chunks, ms) = (rng.u64(0..=3), rng.u64(0..=5));
            (json!({ "chunks": chunks, "ms": ms }), chunks * ms)
        });
        let mut actions = Vec::new();
        let mut ending = Vec::new();
        let mut action_spans = 0;
        for n in 0..rng.usize(0..=3) {
            let name = format!("a{n}");
            let (kind, ms) = match rng.u32(0..100) {
                0..72 => ("ok", rng.u64(0..=15)),
                72..82 => ("err", rng.u64(0..=5)),
                82..90 => ("panic", rng.u64(0..=5)),
                _ => ("spawn", rng.u64(0..=100)),
            };
            if matches!(kind, "ok" | "err") {
                action_spans += 1;
            }
            // A panicking action posts its start mark only.
            if kind != "panic" {
                ending.push(name.clone());
            }
            actions.push(json!({ "name": name, "kind": kind, "ms": ms }));
        }
        let hangs = rng.u32(0..100) == 0;
        if hangs {
            actions.push(json!({ "name": "hang", "kind": "hang" }));
        }
        let mut payload = json!({
            "handler": handler,
            "handler_ms": handler_ms,
            "actions": actions,
        });
        if let Some((stream, _)) = &stream {
            payload["stream"] = stream.clone();
        }
        let idle = (rng.u32(0..100) < 3).then(|| Duration::from_millis(rng.u64(20..=150)));
        let behaviour = (i == 0 || rng.u32(0..100) < 4).then(|| self.behaviour());
        let fault = (self.rng.u32(0..100) < 3).then(|| self.fault());
        // An Extensions API delay lands on the invocation's own release (`event/next` after its
        // phase). A phase that ends near the deadline (a handler that nearly spends it, or an
        // action cut at the deadline minus the 100 ms margin) has no room for 200 ms more: a
        // timeout no library can prevent (seed 109053062, #543: handler 846 ms, delay 141 ms).
        // Drawn all the same, so that a seed's other plans do not change.
        let fault = fault.filter(|fault| {
            !((nearly_spent || hangs) && matches!(fault, Fault::ExtensionsApiDelay(_)))
        });
        Case {
            payload,
            handler,
            handler_ms,
            stream_ms: stream.map(|(_, ms)| ms),
            ending,
            action_spans,
            hangs,
            nearly_spent,
            idle,
            behaviour,
            fault,
        }
    }

    /// A collector: healthy, slow, stalling now and then, or a mixed schedule.
    fn behaviour(&mut self) -> Behaviour {
        let lossless = self.lossless;
        let rng = &mut self.rng;
        let ms = |rng: &mut fastrand::Rng, range| Duration::from_millis(rng.u64(range));
        match rng.u32(0..100) {
            0..40 => Behaviour::Normal,
            40..60 => Behaviour::Slow(ms(rng, 1..=30)),
            60..75 => Behaviour::StallEvery {
                every: rng.u32(5..=50),
                duration: ms(rng, 100..=600),
                base: ms(rng, 0..=2),
            },
            _ => Behaviour::Cycle(
                (0..rng.usize(5..=30))
                    .map(|_| match rng.u32(0..100) {
                        0..80 => Reply::Answer(ms(rng, 0..=3)),
                        80..88 => Reply::Hold(ms(rng, 50..=400)),
                        88..92 => Reply::Fail([500, 503, 429][rng.usize(0..3)]),
                        92..95 => Reply::Garbage,
                        95..98 => Reply::Refuse,
                        _ => Reply::Stall,
                    })
                    .map(|reply| match reply {
                        Reply::Fail(_) | Reply::Refuse | Reply::Stall if lossless => {
                            Reply::Answer(Duration::ZERO)
                        }
                        reply => reply,
                    })
                    .collect(),
            ),
        }
    }

    /// A protocol fault the library recovers from without losing the invocation's phase.
    fn fault(&mut self) -> Fault {
        let rng = &mut self.rng;
        match rng.u32(0..7) {
            0 => Fault::EventNextAnswerDelay(Duration::from_millis(rng.u64(10..=200))),
            1 => Fault::ExtensionsApiDelay(Duration::from_millis(rng.u64(10..=200))),
            2 => Fault::EventNextStatus([500, 503][rng.usize(0..2)]),
            3 => Fault::EventNextCloseMidBody,
            4 => Fault::EventNextMalformedBody,
            5 => Fault::EventNextUnknownEventType,
            _ => Fault::EventNextWrongRequestId,
        }
    }
}

/// The trace id the fixture answers with: in a JSON body, or as a streamed answer's first line
/// (after lambda_runtime's prelude and its eight NUL bytes).
fn answered_trace_id(result: &InvokeResult) -> Option<String> {
    let body = result.outcome.body()?;
    if let Some(at) = body.windows(8).position(|w| w == [0; 8]) {
        let text = std::str::from_utf8(&body[at + 8..]).ok()?;
        let line = text.lines().next()?;
        return line.strip_prefix("trace_id ").map(str::to_owned);
    }
    let value: Value = serde_json::from_slice(body).ok()?;
    value["trace_id"].as_str().map(str::to_owned)
}

/// How the fixture is wired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wiring {
    /// `Deferred::run`: the phase follows the response POST.
    Run,
    /// `Deferred::start` and plain `lambda_runtime::run`: the phase starts when the handler
    /// returns, and the runtime's invoke span goes out with a later flush.
    Start,
    /// `Deferred::start` and a `Runtime` of the function's own with the deferred layer and the
    /// SnapStart resource, restored from a snapshot before the first invocation: the phase
    /// follows the response POST, as with `run`.
    SnapStart,
}

impl Wiring {
    /// Whether the runtime layer is installed (the phase follows the response POST).
    fn layered(self) -> bool {
        self != Self::Start
    }
}

/// One invocation as run: its case, the caller's result, and the trace id it answered.
struct Ran {
    case: Case,
    result: InvokeResult,
    trace_id: Option<String>,
}

impl Ran {
    /// The spans of its trace in `by_trace` (see [`spans_by_trace`]); none when it answered no
    /// trace id (a failed or panicked handler).
    fn spans<'s>(
        &self,
        by_trace: &'s HashMap<String, Vec<(String, Instant)>>,
    ) -> Option<&'s [(String, Instant)]> {
        let trace = self.trace_id.as_ref()?.to_ascii_lowercase();
        Some(by_trace.get(&trace).map(Vec::as_slice).unwrap_or_default())
    }

    /// The checks every wiring shares: the outcome the handler chose; G1, the response posted
    /// within the handler's own time (and its stream's) plus the slack, unless the chain was
    /// broken and the phase ran inline (before the response, by design): then for that phase
    /// too, but not for the INVOKE event the broken chain will not bring; one phase report.
    /// The timeline and when the response was posted, unless it has none.
    fn answered<'t>(
        &self,
        timelines: &'t HashMap<String, Timeline>,
        reports: &HashMap<String, Vec<String>>,
        fail: &mut impl FnMut(String),
    ) -> Option<(&'t Timeline, Instant)> {
        let (case, id) = (&self.case, &self.result.request_id);
        let expected = match case.handler {
            "ok" => self.result.outcome.is_success(),
            _ => matches!(self.result.outcome, InvokeOutcome::FunctionError { .. }),
        };
        if !expected {
            fail(format!("outcome {:?}", self.result.outcome));
        }
        let report = reports.get(id);
        let count = report.map_or(0, Vec::len);
        if count != 1 {
            fail(format!("{count} phase reports"));
        }
        let Some(t) = timelines.get(id) else {
            fail("no timeline".into());
            return None;
        };
        let (Some(received), Some(posted)) = (t.runtime_received, t.response_posted) else {
            fail("no response".into());
            return None;
        };
        let mut own = Duration::from_millis(case.handler_ms + case.stream_ms.unwrap_or(0));
        if let Some(took) = report
            .and_then(|r| r.first())
            .filter(|r| inline(r))
            .and_then(|r| took(r))
        {
            own += took;
        }
        let answered_in = posted.duration_since(received);
        if answered_in > own + RESPONSE_SLACK {
            fail(format!("response after {answered_in:?} (handler {own:?})"));
        }
        Some((t, posted))
    }
}

/// The emulator's timelines, by request id.
fn timelines(env: &Env) -> HashMap<String, Timeline> {
    env.emulator
        .timelines()
        .into_iter()
        .map(|t| (t.request_id.clone(), t))
        .collect()
}

/// The spans the collector received (name, when), by trace id in lower case.
fn spans_by_trace(env: &Env) -> HashMap<String, Vec<(String, Instant)>> {
    let mut by_trace: HashMap<String, Vec<(String, Instant)>> = HashMap::new();
    for span in env.sink.spans() {
        by_trace
            .entry(span.trace_id.to_ascii_lowercase())
            .or_default()
            .push((span.name, span.received_at));
    }
    by_trace
}

/// Which of an invocation's spans are not among `spans` (received by `by`, if given): its
/// `handler-work`, its actions' spans (unless it nearly spent its deadline, when they may not
/// run), and, with `runtime_span`, lambda_runtime's `Lambda runtime invoke`.
fn missing(
    case: &Case,
    spans: &[(String, Instant)],
    by: Option<Instant>,
    runtime_span: bool,
) -> Vec<&'static str> {
    let count = |name: &str| {
        spans
            .iter()
            .filter(|(n, at)| n == name && by.is_none_or(|by| *at <= by))
            .count()
    };
    let mut missing = Vec::new();
    if count("handler-work") == 0 {
        missing.push("handler-work");
    }
    if !case.nearly_spent && count("deferred-action") < case.action_spans {
        missing.push("deferred-action");
    }
    if runtime_span && count("Lambda runtime invoke") == 0 {
        missing.push("Lambda runtime invoke");
    }
    missing
}

/// The phase reports of [`reports_in_order`], by request id: how many, and their text.
/// The actions a phase report names, in its order (each `"name" (file:line) outcome`).
fn actions_in(report: &str) -> Vec<&str> {
    report
        .split("; ")
        .filter_map(|part| part.strip_prefix('"')?.split_once('"'))
        .filter(|(_, tail)| tail.starts_with(" ("))
        .map(|(name, _)| name)
        .collect()
}

fn reports(in_order: &[(String, String)]) -> HashMap<String, Vec<String>> {
    let mut by_id: HashMap<String, Vec<String>> = HashMap::new();
    for (id, line) in in_order {
        by_id.entry(id.clone()).or_default().push(line.clone());
    }
    by_id
}

/// Every phase report the function logged, in order, with its request id: the test's
/// invocations', and also those of INVOKE events it never sent (an `event/next` answer whose
/// `requestId` a fault replaced gets a phase of its own, and its report may be the one that
/// counts spans lost).
fn reports_in_order(env: &Env) -> Vec<(String, String)> {
    let mut reports = Vec::new();
    for line in env.emulator.function_logs() {
        let Some(rest) = line.split("deferred phase (").nth(1) else {
            continue;
        };
        let Some(id) = rest
            .split(") of \"")
            .nth(1)
            .and_then(|r| r.split('"').next())
        else {
            continue;
        };
        reports.push((id.to_owned(), line.clone()));
    }
    reports
}

/// Every per-invocation invariant of the module's list; the failures, each naming its
/// invocation.
fn check(env: &Env, wiring: Wiring, ran: &[Ran]) -> Vec<String> {
    let mut failures = Vec::new();
    let timelines = timelines(env);
    let in_order = reports_in_order(env);
    let reports = reports(&in_order);
    let mut previous_release: Option<Instant> = None;
    for (i, r) in ran.iter().enumerate() {
        let (case, id) = (&r.case, &r.result.request_id);
        let mut fail = |what: String| failures.push(format!("#{i} {id} {case:?}: {what}"));
        let Some((t, posted)) = r.answered(&timelines, &reports, &mut fail) else {
            continue;
        };
        if t.timed_out {
            fail("timed out".into());
            continue;
        }
        let release = released(t);
        let chained = reports
            .get(id)
            .and_then(|r| r.first())
            .is_some_and(|r| !inline(r));
        // G3: a chained phase (under `run`) follows the response, its actions included.
        if wiring.layered() && chained {
            // A nearly spent invocation's phase may reach its end (the deadline minus the
            // margin) while a loaded machine is still posting the response: it is then cut
            // with nothing run (checked below) and ends first, as G4 wants (seed 5 did, once
            // in about 60 runs beside other builds).
            if phase_end(t) < posted && !case.nearly_spent {
                fail("the chained phase ended before the response".into());
            }
            let names = case.payload["actions"].as_array().into_iter().flatten();
            for name in names.filter_map(|action| action["name"].as_str()) {
                if t.mark(&format!("start:{name}"))
                    .is_some_and(|at| at < posted)
                {
                    fail(format!("{name} started before the response"));
                }
            }
        }
        // G2: released after every action's end.
        for name in &case.ending {
            match t.mark(&format!("end:{name}")) {
                Some(end) if end > release => fail(format!("released before {name} ended")),
                Some(_) => {}
                None if !case.nearly_spent => fail(format!("{name} never ended")),
                None => {}
            }
        }
        // The batch processor's queue (2,048) cannot fill here: a drop count would be false.
        if reports
            .get(id)
            .is_some_and(|r| r.iter().any(|l| counts_dropped(l)))
        {
            fail("its report counts spans dropped".into());
        }
        if previous_release.is_some_and(|p| t.invoked < p) {
            fail("invoked before the previous phase ended".into());
        }
        previous_release = Some(release);
    }
    failures.extend(lost_spans(env, wiring, ran, &reports, &in_order));
    failures
}

/// The span checks: a clean flush delivered the invocation's own spans before its release;
/// every span was delivered in the end, unless a report from its invocation up to the next
/// clean flush counted spans lost.
fn lost_spans(
    env: &Env,
    wiring: Wiring,
    ran: &[Ran],
    reports: &HashMap<String, Vec<String>>,
    in_order: &[(String, String)],
) -> Vec<String> {
    let report = |id: &str| reports.get(id).and_then(|r| r.first()).cloned();
    let clean: Vec<bool> = ran
        .iter()
        .map(|r| {
            report(&r.result.request_id).is_some_and(|l| l.contains("flush tracer provider ok"))
        })
        .collect();
    // Whether a report from invocation `i`'s to invocation `j`'s, in log order (the reports of
    // events the test never sent included), counted spans lost.
    let mut position: HashMap<&str, usize> = HashMap::new();
    for (at, (id, _)) in in_order.iter().enumerate() {
        position.entry(id.as_str()).or_insert(at);
    }
    let counted_lost = |i: usize, j: usize| {
        let at = |k: usize| position.get(ran[k].result.request_id.as_str()).copied();
        match (at(i), at(j)) {
            (Some(from), Some(to)) if from <= to => in_order[from..=to]
                .iter()
                .any(|(_, line)| counts_lost(line)),
            _ => ran[i..=j]
                .iter()
                .any(|r| report(&r.result.request_id).is_some_and(|l| counts_lost(&l))),
        }
    };
    let by_trace = spans_by_trace(env);
    let mut failures = Vec::new();
    for (i, r) in ran.iter().enumerate() {
        let Some(spans) = r.spans(&by_trace) else {
            continue;
        };
        let id = &r.result.request_id;
        let next_clean = (i + 1..ran.len()).find(|&j| clean[j]);
        // Before the release, by its own flush.
        if clean[i] && !r.case.hangs {
            let release = released(&env.timeline(id));
            // Run inline (before the response), the phase cannot carry the runtime's span.
            let chained = report(id).is_some_and(|r| !inline(&r));
            let missing = missing(&r.case, spans, Some(release), wiring.layered() && chained);
            if !missing.is_empty() {
                let seen: Vec<(&String, i128)> = spans
                    .iter()
                    .map(|(n, at)| (n, signed_ms(*at, release)))
                    .collect();
                failures.push(format!(
                    "#{i} {id} {:?}: its clean flush missed {missing:?}; spans (ms after the \
                     release) {seen:?}; reports {:?}",
                    r.case,
                    reports.get(id)
                ));
            }
        }
        // In the end (a later clean flush carries what a skipped or abandoned one left).
        let Some(j) = next_clean else { continue };
        if counted_lost(i, j) {
            continue;
        }
        let missing = missing(&r.case, spans, None, true);
        if !missing.is_empty() {
            failures.push(format!(
                "#{i} {id}: never delivered {missing:?} (next clean flush #{j})"
            ));
        }
    }
    failures
}

/// `at` relative to `origin`, in ms (negative: before).
fn signed_ms(at: Instant, origin: Instant) -> i128 {
    match at.checked_duration_since(origin) {
        Some(after) => after.as_millis() as i128,
        None => -(origin.duration_since(at).as_millis() as i128),
    }
}

/// G4, over the whole run: no timeout, no reset, no restart, no release by the safety net,
/// never two `event/next` at once. Checked after every invocation, so that on failure the
/// last cases and the function's last log lines are those of the fault.
fn assert_no_overrun(env: &Env, pid: u32, seed: u64, ran: &[Ran]) {
    let stats = env.emulator.stats();
    let net = env.safety_net_releases();
    if stats.timeouts == 0
        && stats.resets == 0
        && net.is_empty()
        && stats.max_concurrent_event_next_per_extension <= 1
        && env.emulator.child_pid() == Some(pid)
    {
        return;
    }
    let overran = env.overran();
    let last: Vec<String> = ran
        .iter()
        .enumerate()
        .rev()
        .take(3)
        .map(|(i, r)| format!("#{i} {}: {:?}", r.result.request_id, r.case))
        .collect();
    let logs = env.emulator.function_logs();
    let tail = &logs[logs.len().saturating_sub(60)..];
    panic!(
        "seed {seed} (replay with CHAOS_SEED={seed}): overran {overran:?}, released by the net \
         {net:#?}; {stats:?}; the last cases {last:#?}; the function's last logs {tail:#?}"
    );
}

/// The fixture's settings in every chaos run.
const FIXTURE_ENV: &[(&str, &str)] = &[
    ("FLUSH_TIMEOUT_MS", "100"),
    // Longer than the longest held export (600 ms): an export held that long is answered, not
    // timed out; a `Stall` is, and its spans are counted lost.
    ("OTEL_EXPORTER_OTLP_TIMEOUT", "2000"),
    ("RUST_LOG", "warn,deferred=info"),
    // A panic's backtrace, resolved from a debug build's symbols, takes the panicking handler's
    // response 300 ms the first time: not what G1 is about.
    ("RUST_BACKTRACE", "0"),
];

/// The number of invocations of this run: `CHAOS_INVOCATIONS` if set, else 600.
fn invocations() -> usize {
    std::env::var("CHAOS_INVOCATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600)
}

/// The seed of this run: `CHAOS_SEED` if set, else `default`.
fn seed(default: u64) -> u64 {
    std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

async fn chaos(wiring: Wiring, default_seed: u64) {
    let seed = seed(default_seed);
    let invocations = invocations();
    // Each wiring also takes one more flusher, so that both flush paths see the chaos: under
    // `run` the meter provider (a second flusher, on a thread of its own, beside the tracer
    // provider on the phase thread); under `start` a first flusher whose first call never
    // returns (the watchdog takes that phase over; the tracer provider then flushes on its
    // own thread for the whole run).
    // Under SnapStart, what the restore does to the `event/next` in flight at the snapshot
    // follows the seed: it survives (Lambda's own Runtime API server), is closed, or is left
    // dead and silent.
    let (mode, extra) = match wiring {
        Wiring::Run => ("run", ("FLUSH_METRICS", "1")),
        Wiring::Start => ("start", ("FIXTURE_FLUSH_HANG", "1")),
        Wiring::SnapStart => ("runtime", ("FIXTURE_INIT_SPAN", "1")),
    };
    let restored_connections = [
        RestoredConnections::Survive,
        RestoredConnections::Close,
        RestoredConnections::Blackhole,
    ][(seed % 3) as usize];
    let mut fixture_env = FIXTURE_ENV.to_vec();
    fixture_env.push(extra);
    let env = start(
        mode,
        EmulatorConfig {
            function_timeout: FUNCTION_TIMEOUT,
            snap_start: wiring == Wiring::SnapStart,
            restored_connections,
            ..EmulatorConfig::default()
        },
        &fixture_env,
    )
    .await;
    let pid = env.emulator.child_pid().expect("pid");
    let mut planner = Planner {
        rng: fastrand::Rng::with_seed(seed),
        lossless: false,
    };
    eprintln!("chaos ({wiring:?}): seed {seed}, {invocations} invocations");
    let started = Instant::now();
    let mut ran: Vec<Ran> = Vec::with_capacity(invocations + 5);
    for i in 0..invocations + 5 {
        // The last five: a healthy collector and plain invocations, whose clean flushes carry
        // whatever the chaos left queued.
        let case = if i < invocations {
            planner.case(i)
        } else {
            Case {
                payload: json!({}),
                handler: "ok",
                handler_ms: 0,
                stream_ms: None,
                ending: Vec::new(),
                action_spans: 0,
                hangs: false,
                nearly_spent: false,
                idle: None,
                behaviour: (i == invocations).then_some(Behaviour::Normal),
                fault: None,
            }
        };
        if let Some(idle) = case.idle {
            tokio::time::sleep(idle).await;
        }
        if let Some(behaviour) = &case.behaviour {
            env.sink.set_behaviour(behaviour.clone());
        }
        if let Some(fault) = &case.fault {
            // The fault is this invocation's: armed once the previous one is complete (its
            // response comes before its phase's end). Armed earlier, an Extensions API delay
            // would land on the previous release call, and 200 ms more on an invocation that
            // nearly spent its deadline is a timeout no library can prevent.
            if let Some(previous) = ran.last() {
                env.completed(&previous.result.request_id).await;
            }
            env.emulator.faults().once(fault.clone());
        }
        let result = env.invoke(case.payload.clone()).await;
        let trace_id = answered_trace_id(&result);
        ran.push(Ran {
            case,
            result,
            trace_id,
        });
        assert_no_overrun(&env, pid, seed, &ran);
    }
    let last = ran.last().expect("invocations").result.request_id.clone();
    env.completed(&last).await;
    assert!(
        env.logged(&format!("of \"{last}\"")).await,
        "seed {seed}: the last report"
    );
    let elapsed = started.elapsed();
    assert_no_overrun(&env, pid, seed, &ran);
    let failures = check(&env, wiring, &ran);
    let stats = env.emulator.stats();
    eprintln!(
        "chaos ({wiring:?}): seed {seed}, {} invocations in {elapsed:?}; {} failures; hangs {}, \
         nearly spent {}, faults {}, collector changes {}, handler errors {}; sink {:?}; \
         emulator {stats:?}",
        ran.len(),
        failures.len(),
        ran.iter().filter(|r| r.case.hangs).count(),
        ran.iter().filter(|r| r.case.nearly_spent).count(),
        ran.iter().filter(|r| r.case.fault.is_some()).count(),
        ran.iter().filter(|r| r.case.behaviour.is_some()).count(),
        ran.iter().filter(|r| r.case.handler != "ok").count(),
        env.sink.requests(),
    );
    if !failures.is_empty() {
        let ids: Vec<&str> = failures
            .iter()
            .filter_map(|f| {
                f.split_whitespace()
                    .nth(1)
                    .map(|id| id.trim_end_matches(':'))
            })
            .take(3)
            .collect();
        let logs: Vec<String> = ids.iter().flat_map(|id| env.logs_matching(id)).collect();
        // Spans the batch processor drops on a full queue are counted nowhere (the SDK logs
        // the first drop only): a span failure with this line has its explanation.
        let dropped = env.logs_matching("SpanDroppingStarted");
        panic!(
            "seed {seed}: {} failures (replay with CHAOS_SEED={seed}): {:#?}\nlogs of the first: \
             {logs:#?}\nthe batch processor's queue-full drops: {dropped:#?}",
            failures.len(),
            &failures[..failures.len().min(20)],
        );
    }
    let shutdown = env.emulator.shutdown().await;
    assert!(
        !shutdown.killed && shutdown.exit_status.is_some_and(|s| s.success()),
        "seed {seed}: {shutdown:?}"
    );
}

/// `Deferred::run`: the layer's wiring, phases after the response POST.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_under_run() {
    chaos(Wiring::Run, 1).await;
}

/// `Deferred::start` with plain `lambda_runtime::run`: no layer, the wrapper hands the job over
/// (and waits for the INVOKE event) after the body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_under_start() {
    chaos(Wiring::Start, 2).await;
}

/// SnapStart: a function with its own `Runtime` (the deferred layer and the SnapStart
/// resource), restored before its first invocation; seed 5 leaves the `event/next` in flight
/// at the snapshot dead and silent after the restore (the hard case).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_after_a_snapstart_restore() {
    chaos(Wiring::SnapStart, 5).await;
}

/// Callers at once in [`chaos_concurrent`]: the function's `AWS_LAMBDA_MAX_CONCURRENCY`.
const CONCURRENCY: usize = 8;

/// Lambda Managed Instances (`Deferred::run_concurrent`, eight invocations at once): no
/// extension, every phase a background task after its response. Eight callers each run their
/// share of the plans back to back, on a collector whose changes lose nothing (so every span
/// must arrive). Asserted for every invocation: its outcome; G1; each action that ends by
/// itself ran exactly once, in its own invocation (isolated queues); exactly one phase
/// report; no timeout or reset; and, after SIGTERM (the drain, then the final flush), every
/// span of every successful invocation at the collector and a clean exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_concurrent() {
    let seed = seed(3);
    let invocations = invocations();
    let env = start(
        "concurrent",
        EmulatorConfig {
            function_timeout: FUNCTION_TIMEOUT,
            managed_instances: Some(CONCURRENCY as u32),
            // No extension, so Lambda's rule would give 0 ms: give the drain time.
            shutdown_grace: Some(Duration::from_millis(1500)),
            ..EmulatorConfig::default()
        },
        FIXTURE_ENV,
    )
    .await;
    let mut planner = Planner {
        rng: fastrand::Rng::with_seed(seed),
        lossless: true,
    };
    let mut shares: Vec<Vec<Case>> = (0..CONCURRENCY).map(|_| Vec::new()).collect();
    for i in 0..invocations {
        let mut case = planner.case(i);
        // No extension: its faults cannot apply.
        case.fault = None;
        shares[i % CONCURRENCY].push(case);
    }
    eprintln!("chaos (concurrent): seed {seed}, {invocations} invocations");
    let started = Instant::now();
    let callers: Vec<_> = shares
        .into_iter()
        .map(|share| {
            let (emulator, sink) = (env.emulator.clone(), env.sink.clone());
            tokio::spawn(async move {
                let mut ran = Vec::with_capacity(share.len());
                for case in share {
                    if let Some(idle) = case.idle {
                        tokio::time::sleep(idle).await;
                    }
                    if let Some(behaviour) = &case.behaviour {
                        sink.set_behaviour(behaviour.clone());
                    }
                    let result = emulator.invoke(case.payload.to_string()).await;
                    let trace_id = answered_trace_id(&result);
                    ran.push(Ran {
                        case,
                        result,
                        trace_id,
                    });
                }
                ran
            })
        })
        .collect();
    let mut ran = Vec::with_capacity(invocations);
    for caller in callers {
        ran.extend(caller.await.expect("caller"));
    }
    let answered = started.elapsed();
    env.sink.set_behaviour(Behaviour::Normal);

    // Every phase reported (they run after the responses, in the background).
    let ids: Vec<String> = ran.iter().map(|r| r.result.request_id.clone()).collect();
    let reported = env
        .emulator
        .wait_for_log(
            {
                let reports = std::sync::Mutex::new(std::collections::HashSet::new());
                move |line| {
                    let mut seen = reports.lock().expect("reports");
                    if let Some(id) = line
                        .split(") of \"")
                        .nth(1)
                        .and_then(|r| r.split('"').next())
                    {
                        seen.insert(id.to_owned());
                    }
                    ids.iter().all(|id| seen.contains(id))
                }
            },
            Duration::from_secs(20),
        )
        .await
        .is_some();
    let reports = reports(&reports_in_order(&env));
    let timelines = timelines(&env);
    let mut failures = Vec::new();
    if !reported {
        failures.push(format!(
            "only {} of {invocations} phases reported in 20 s",
            reports.len()
        ));
    }
    for (i, r) in ran.iter().enumerate() {
        let (case, id) = (&r.case, &r.result.request_id);
        let mut fail = |what: String| failures.push(format!("#{i} {id} {case:?}: {what}"));
        let Some((t, _)) = r.answered(&timelines, &reports, &mut fail) else {
            continue;
        };
        // Isolation: its own actions, each once. A mark names the invocation that queued the
        // action, whichever phase ran it; the phase's report names what that phase ran, none
        // of it from another queue.
        if let Some([report]) = reports.get(id).map(Vec::as_slice) {
            let mut queued: Vec<&str> = case.payload["actions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|action| action["name"].as_str())
                .collect();
            for name in actions_in(report) {
                match queued.iter().position(|q| *q == name) {
                    Some(at) => {
                        queued.remove(at);
                    }
                    None => fail(format!(
                        "its phase ran {name:?}, not queued by it: {report}"
                    )),
                }
            }
        }
        for name in &case.ending {
            let ends = t
                .marks
                .iter()
                .filter(|(m, _)| *m == format!("end:{name}"))
                .count();
            if ends != 1 && !(ends == 0 && case.nearly_spent) {
                fail(format!("{name} ended {ends} times"));
            }
        }
    }
    let stats = env.emulator.stats();
    if stats.timeouts > 0 || stats.resets > 0 {
        failures.push(format!("overran {:?}; {stats:?}", env.overran()));
    }

    // SIGTERM: the drain and the final flush deliver what is still queued.
    let shutdown = env.emulator.shutdown().await;
    if shutdown.killed || !shutdown.exit_status.is_some_and(|s| s.success()) {
        failures.push(format!("shutdown {shutdown:?}"));
    }
    let by_trace = spans_by_trace(&env);
    for (i, r) in ran.iter().enumerate() {
        let Some(spans) = r.spans(&by_trace) else {
            continue;
        };
        let missing = missing(&r.case, spans, None, true);
        if !missing.is_empty() {
            failures.push(format!(
                "#{i} {}: never delivered {missing:?}",
                r.result.request_id
            ));
        }
    }
    eprintln!(
        "chaos (concurrent): seed {seed}, {invocations} invocations answered in {answered:?}; {} \
         failures; hangs {}, nearly spent {}, collector changes {}, handler errors {}; sink \
         {:?}; emulator {stats:?}",
        failures.len(),
        ran.iter().filter(|r| r.case.hangs).count(),
        ran.iter().filter(|r| r.case.nearly_spent).count(),
        ran.iter().filter(|r| r.case.behaviour.is_some()).count(),
        ran.iter().filter(|r| r.case.handler != "ok").count(),
        env.sink.requests(),
    );
    assert!(
        failures.is_empty(),
        "seed {seed}: {} failures (replay with CHAOS_SEED={seed}): {:#?}",
        failures.len(),
        &failures[..failures.len().min(20)],
    );
}

#[test]
fn actions_in_names_the_actions_of_a_report() {
    let report = "INFO deferred: deferred phase (Chained) of \"r-1\" took 4.1ms; \"a0\" \
                  (tests/src/bin/fixture.rs:107:9) ok in 2.4ms; \"hang\" (tests/src/bin/fixture.rs:107:9) \
                  cut after 1ms; flush tracer provider ok in 1.6ms request_id=r-1";
    assert_eq!(actions_in(report), ["a0", "hang"]);
}
