//! An ordering harness for the core's state machine.
//!
//! It drives a real core (the chain's `drive_with` loop, its line and phase thread, the wrapper
//! `invocation::run_on` with its drop guard, and the runtime layer) against a stand-in
//! Extensions API over TCP, and enumerates the interleavings of the events of one invocation,
//! or of two back to back, in both configurations (with the runtime layer, as `Deferred::run`;
//! without it, as `Deferred::start`). After each run it checks the invariants the design asks
//! for (see [`check`]).
//!
//! A run is a list of [`Step`]s. The runtime's steps of one invocation keep their order, and so
//! do the extension's; the enumerator interleaves the two. Between two invocations the run
//! waits until Lambda would deliver the next one: the runtime is done with the first (the
//! layer's future, or the wrapper, has completed) and the extension waits in `event/next`.
//!
//! `cargo test -p deferred-core --lib harness` runs a reduced set (a few seconds);
//! `DEFERRED_HARNESS=full` runs every ordering (about 15 minutes on two cores; the known gaps in
//! `known()` are listed but do not fail it), and `DEFERRED_HARNESS=only:<text>` the orderings
//! whose `{layer} {steps:?}` contains `<text>` (failing on any failure).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tower::{Layer as _, Service as _};

use crate::chain::tests::invoke_body;
use crate::context::Invocation;
use crate::core::{Config, Core, Mode, ReportHook};
use crate::extension::line::tests::{with_length, with_status};
use crate::report::PhaseKind;
use crate::scope::Options;

const CLAIM: Duration = Duration::from_millis(300);
const STRAY: Duration = Duration::from_millis(150);
const MARGIN: Duration = Duration::from_millis(100);
/// Between two steps: long enough for the core to react, short against the windows above.
const SETTLE: Duration = Duration::from_millis(20);
/// How long one deferred action runs.
const ACTION: Duration = Duration::from_millis(30);
/// A deadline far enough that reaching its phase end is a hold, not a step.
const LONG: Duration = Duration::from_secs(6);
/// A deadline the `Deadline` step waits out.
const SHORT: Duration = Duration::from_millis(700);
/// How long Lambda would wait for an invocation to complete before the harness calls it held.
const HELD: Duration = Duration::from_millis(1500);
/// Timing slack on a loaded two-core machine.
const SLACK: Duration = Duration::from_millis(150);

/// One event of a run; `u8` is the invocation (1 or 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Step {
    /// The runtime calls the (deferred) handler: the wrapper starts (`begin`); its body queues
    /// one action.
    Begin(u8),
    /// The handler returns (`await_event`, `dispatch`).
    Return(u8),
    /// The handler's future is dropped mid-body (a timeout around the handler).
    Drop(u8),
    /// With the layer: the response is posted (`responded`, then `claim_parked`). Without a
    /// `Begin` before it: the runtime answered without calling the handler (undecodable).
    Respond(u8),
    /// The chain's `event/next` is answered with the invocation's INVOKE event.
    Event(u8),
    /// The chain's `event/next` is answered with the invocation's event, cut short: lost.
    Lost(u8),
    /// The chain's `event/next` fails without losing an event (an API error, 500).
    Fail(u8),
    /// The chain's `event/next` is answered with an INVOKE event of another request id.
    Other(u8),
    /// The invocation's deadline minus the margin passes.
    Deadline(u8),
    /// SIGTERM: the final flush runs; nothing happens after it.
    Sigterm,
}

impl Step {
    fn inv(self) -> u8 {
        match self {
            Step::Begin(i)
            | Step::Return(i)
            | Step::Drop(i)
            | Step::Respond(i)
            | Step::Event(i)
            | Step::Lost(i)
            | Step::Fail(i)
            | Step::Other(i)
            | Step::Deadline(i) => i,
            Step::Sigterm => 0,
        }
    }
}

/// One run: the configuration, whether deadlines are short, and the steps.
#[derive(Debug, Clone)]
pub(crate) struct Scenario {
    pub(crate) layer: bool,
    pub(crate) short: bool,
    pub(crate) steps: Vec<Step>,
}

fn rid(i: u8) -> String {
    format!("r-{i}")
}

/// What happened, with when.
#[derive(Debug, Default)]
struct Rec {
    /// Per request id: each run of its action (start, end).
    actions: HashMap<String, Vec<(Instant, Option<Instant>)>>,
    /// Phase reports: request id, kind, when.
    reports: Vec<(String, PhaseKind, Instant)>,
    /// Per invocation: when the runtime was done with it (the layer's future, or the wrapper).
    done: HashMap<u8, Instant>,
    /// Per invocation: whether its body started (its action was queued).
    started: HashMap<u8, Instant>,
}

type Shared<T> = Arc<Mutex<T>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The stand-in Extensions API: records each `event/next` and answers the one in flight.
#[derive(Default)]
struct ApiState {
    writers: HashMap<u64, Arc<tokio::sync::Mutex<OwnedWriteHalf>>>,
    /// The connection whose request waits for an answer.
    pending: Option<u64>,
    requests: Vec<Instant>,
    /// When each answer went out, and what it was.
    answers: Vec<(Instant, String)>,
    /// Requests that arrived while another was in flight: the connection of the one in
    /// flight, and the new one's.
    doubles: Vec<(u64, u64)>,
    /// Connections whose close the API has read.
    closed: std::collections::HashSet<u64>,
    /// Connections the client closed with their request unanswered, before the run ended:
    /// calls Lambda would still count as waiting (and so answer a later call with an error,
    /// the next event going to the dead one). Counted whether or not the API read the close
    /// before the call that replaced it.
    abandoned: Vec<u64>,
    /// The run is over: the chain's task is aborted, which may drop the call in flight.
    stopped: bool,
    /// Requests with this run's extension id other than `event/next` (the chain sends none).
    unexpected: Vec<String>,
}

/// Whose a request head (up to its blank line) is.
#[derive(Debug, PartialEq, Eq)]
enum Caller {
    /// This run's chain calling `event/next`.
    Next,
    /// This run's chain, with another request.
    Unexpected,
    /// Another client: the API's port is an ephemeral one, which a client elsewhere on the
    /// machine may still dial (a process whose own server had that port, retrying). Not the
    /// chain under test, whose every request carries the run's extension id.
    Foreign,
}

fn caller(head: &str, extension_id: &str) -> Caller {
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let ours = lines.any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.eq_ignore_ascii_case("Lambda-Extension-Identifier") && value.trim() == extension_id
        })
    });
    if !ours {
        Caller::Foreign
    } else if request_line == "GET /2020-01-01/extension/event/next HTTP/1.1" {
        Caller::Next
    } else {
        Caller::Unexpected
    }
}

/// An extension id no other run (in this process or another) uses, so that the API can tell
/// the chain's requests from anyone else's.
fn unique_extension_id() -> String {
    static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("ext-{}-{run}", std::process::id())
}

struct Api {
    state: Shared<ApiState>,
    tasks: Vec<JoinHandle<()>>,
}

impl Api {
    /// An API on an ephemeral port for the chain of `extension_id`: requests without that id
    /// are not counted, and their connection is closed.
    async fn start(extension_id: &str) -> (Self, String) {
        let extension_id: Arc<str> = extension_id.into();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let authority = listener.local_addr().expect("addr").to_string();
        let state: Shared<ApiState> = Arc::default();
        let st = state.clone();
        let accept = tokio::spawn(async move {
            let mut next_id = 0;
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                next_id += 1;
                let id = next_id;
                let (mut reader, writer) = stream.into_split();
                lock(&st)
                    .writers
                    .insert(id, Arc::new(tokio::sync::Mutex::new(writer)));
                let st = st.clone();
                let extension_id = extension_id.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    'read: loop {
                        let n = match reader.read(&mut chunk).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                            buf.drain(..end + 4);
                            let mut s = lock(&st);
                            match caller(&head, &extension_id) {
                                Caller::Next => {}
                                Caller::Unexpected => {
                                    s.unexpected.push(head);
                                    continue;
                                }
                                Caller::Foreign => {
                                    eprintln!(
                                        "harness: a request from another client on connection {id}, ignored: {:?}",
                                        head.lines().next().unwrap_or_default()
                                    );
                                    break 'read;
                                }
                            }
                            if let Some(earlier) = s.pending {
                                s.doubles.push((earlier, id));
                            }
                            s.pending = Some(id);
                            s.requests.push(Instant::now());
                        }
                    }
                    let mut s = lock(&st);
                    if s.pending == Some(id) {
                        s.pending = None;
                        if !s.stopped {
                            s.abandoned.push(id);
                        }
                    }
                    s.writers.remove(&id);
                    s.closed.insert(id);
                });
            }
        });
        (
            Self {
                state,
                tasks: vec![accept],
            },
            authority,
        )
    }

    /// Answers the `event/next` in flight (waiting for one at most `within`) with `answer`;
    /// `close` closes the connection after it.
    async fn answer(&self, what: String, answer: String, close: bool) -> Result<(), String> {
        let waited = Instant::now();
        let (id, writer) = loop {
            {
                let mut s = lock(&self.state);
                if let Some(id) = s.pending.take() {
                    let writer = s.writers.get(&id).cloned();
                    if close {
                        s.writers.remove(&id);
                    }
                    s.answers.push((Instant::now(), what.clone()));
                    break (id, writer);
                }
            }
            if waited.elapsed() > HELD {
                return Err(format!(
                    "{what}: no event/next in flight for {HELD:?} (the environment is held)"
                ));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let Some(writer) = writer else {
            return Err(format!("{what}: connection {id} is gone"));
        };
        let mut writer = writer.lock().await;
        let _ = writer.write_all(answer.as_bytes()).await;
        if close {
            let _ = writer.shutdown().await;
        }
        Ok(())
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The runtime's side of one invocation.
#[derive(Default)]
struct Runtime {
    ret: Option<oneshot::Sender<()>>,
    drop: Option<oneshot::Sender<()>>,
    post: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// Runs `scenario`; returns the violations found (empty: none) and a trace for the report.
pub(crate) async fn run(scenario: &Scenario) -> Vec<String> {
    let rec: Shared<Rec> = Arc::default();
    let r = rec.clone();
    let config = Config {
        claim_timeout: CLAIM,
        stray_window: STRAY,
        safety_margin: MARGIN,
        shutdown_timeout: Duration::from_millis(400),
        phase_telemetry: false,
        on_report: Some(ReportHook(Arc::new(move |report| {
            lock(&r)
                .reports
                .push((report.request_id.clone(), report.kind, Instant::now()));
        }))),
        ..Config::default()
    };
    let core = Core::new(config, Mode::Extension);
    if scenario.layer {
        core.layer_installed
            .store(true, std::sync::atomic::Ordering::Release);
    }
    let extension_id = unique_extension_id();
    let (api, authority) = Api::start(&extension_id).await;
    let client = Arc::new(crate::extension::Client::new(&authority).expect("client"));
    let drive = tokio::spawn(crate::chain::drive_with(
        core.clone(),
        client,
        extension_id,
        crate::snapstart::Restores::new(),
        tokio::runtime::Handle::current(),
    ));
    let mut violations = Vec::new();
    // The first event/next.
    let t0 = Instant::now();
    while lock(&api.state).pending.is_none() {
        if t0.elapsed() > Duration::from_secs(3) {
            violations.push("no first event/next".into());
            drive.abort();
            return violations;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }

    let mut deadlines: HashMap<u8, SystemTime> = HashMap::new();
    let mut runtimes: HashMap<u8, Runtime> = HashMap::new();
    // When each invocation was complete (runtime done, extension waiting in event/next).
    let mut complete: HashMap<u8, Instant> = HashMap::new();
    // Per invocation: when its own event was answered intact; when it was lost/other.
    let mut delivered: HashMap<u8, Instant> = HashMap::new();
    let mut unreachable: HashMap<u8, Instant> = HashMap::new();
    // The last runtime step (return/drop/respond) of each invocation.
    let mut last_runtime_step: HashMap<u8, Instant> = HashMap::new();
    let mut sigterm_at = None;
    let mut current = 1u8;

    // Extension steps that found no event/next in flight wait for one (Lambda delivers an
    // event only to a call): they go after the next step, in their order.
    let mut steps: std::collections::VecDeque<Step> = scenario.steps.iter().copied().collect();
    let mut blocked: std::collections::VecDeque<Step> = std::collections::VecDeque::new();
    let mut done_steps: Vec<Step> = Vec::new();
    loop {
        let step = if let Some(&b) = blocked.front() {
            if lock(&api.state).pending.is_some() {
                blocked.pop_front();
                b
            } else if let Some(s) = steps.pop_front() {
                if is_extension(s) {
                    blocked.push_back(s);
                    tokio::time::sleep(SETTLE).await;
                    continue;
                }
                s
            } else {
                blocked.pop_front();
                b
            }
        } else if let Some(s) = steps.pop_front() {
            if is_extension(s) && lock(&api.state).pending.is_none() && !steps.is_empty() {
                blocked.push_back(s);
                continue;
            }
            s
        } else {
            break;
        };
        done_steps.push(step);
        let i = step.inv();
        if i > current {
            // Lambda delivers invocation i only once invocation i-1 is complete.
            match await_complete(&api, &rec, current).await {
                Ok(at) => {
                    complete.insert(current, at);
                }
                Err(e) => violations.push(e),
            }
            current = i;
        }
        let deadline = *deadlines.entry(i).or_insert_with(|| {
            let d = SystemTime::now() + if scenario.short { SHORT } else { LONG };
            let ms = d.duration_since(UNIX_EPOCH).expect("epoch").as_millis() as u64;
            UNIX_EPOCH + Duration::from_millis(ms)
        });
        match step {
            Step::Begin(i) => {
                let rt = runtimes.entry(i).or_default();
                let (ret_tx, ret_rx) = oneshot::channel();
                let (drop_tx, drop_rx) = oneshot::channel::<()>();
                let (post_tx, post_rx) = oneshot::channel::<()>();
                let (started_tx, started_rx) = oneshot::channel();
                rt.ret = Some(ret_tx);
                rt.drop = Some(drop_tx);
                rt.post = Some(post_tx);
                let invocation = Invocation {
                    request_id: rid(i),
                    deadline: Some(deadline),
                };
                let rec2 = rec.clone();
                let wrapper = {
                    let core = core.clone();
                    let rec = rec.clone();
                    async move {
                        let body = async move {
                            let id = rid(i);
                            lock(&rec).started.insert(i, Instant::now());
                            let rec_a = rec.clone();
                            crate::scope::defer(None, async move {
                                let start = Instant::now();
                                let at = {
                                    let mut r = lock(&rec_a);
                                    let runs = r.actions.entry(id.clone()).or_default();
                                    runs.push((start, None));
                                    runs.len() - 1
                                };
                                tokio::time::sleep(ACTION).await;
                                lock(&rec_a).actions.get_mut(&id).expect("run")[at].1 =
                                    Some(Instant::now());
                            })
                            .expect("defer");
                            let _ = started_tx.send(());
                            let _ = ret_rx.await;
                        };
                        tokio::select! {
                            () = crate::invocation::run_on(core, invocation, Options::default(), body) => {}
                            _ = drop_rx => {}
                        }
                    }
                };
                if scenario.layer {
                    let mut parts = Some((wrapper, post_rx));
                    let mut service = crate::layer::DeferredLayer::new(core.clone()).layer(
                        tower::service_fn(move |_: lambda_runtime::LambdaInvocation| {
                            let (wrapper, post_rx) = parts.take().expect("called once");
                            async move {
                                wrapper.await;
                                let _ = post_rx.await;
                                Ok::<(), lambda_runtime_api_client::BoxError>(())
                            }
                        }),
                    );
                    let future = service.call(lambda_invocation(i));
                    rt.task = Some(tokio::spawn(async move {
                        let _ = future.await;
                        lock(&rec2).done.insert(i, Instant::now());
                    }));
                } else {
                    rt.task = Some(tokio::spawn(async move {
                        wrapper.await;
                        lock(&rec2).done.insert(i, Instant::now());
                    }));
                }
                if tokio::time::timeout(Duration::from_secs(2), started_rx)
                    .await
                    .is_err()
                {
                    violations.push(format!("{step:?}: the body did not start"));
                }
            }
            Step::Return(i) => {
                last_runtime_step.insert(i, Instant::now());
                if let Some(tx) = runtimes.get_mut(&i).and_then(|rt| rt.ret.take()) {
                    let _ = tx.send(());
                }
            }
            Step::Drop(i) => {
                last_runtime_step.insert(i, Instant::now());
                if let Some(tx) = runtimes.get_mut(&i).and_then(|rt| rt.drop.take()) {
                    let _ = tx.send(());
                }
            }
            Step::Respond(i) => {
                last_runtime_step.insert(i, Instant::now());
                let rt = runtimes.entry(i).or_default();
                if let Some(tx) = rt.post.take() {
                    let _ = tx.send(());
                } else if scenario.layer && rt.task.is_none() {
                    // Undecodable: the layer sees the invocation, the handler never runs.
                    let mut service = crate::layer::DeferredLayer::new(core.clone()).layer(
                        tower::service_fn(|_: lambda_runtime::LambdaInvocation| async {
                            Ok::<(), lambda_runtime_api_client::BoxError>(())
                        }),
                    );
                    let future = service.call(lambda_invocation(i));
                    let rec2 = rec.clone();
                    rt.task = Some(tokio::spawn(async move {
                        let _ = future.await;
                        lock(&rec2).done.insert(i, Instant::now());
                    }));
                }
            }
            Step::Event(i) => {
                let body = invoke_body(&rid(i), deadline);
                match api
                    .answer(format!("{step:?}"), with_length(&body), false)
                    .await
                {
                    Ok(()) => {
                        delivered.insert(i, Instant::now());
                    }
                    Err(e) => violations.push(e),
                }
            }
            Step::Lost(i) => {
                let body = invoke_body(&rid(i), deadline);
                // Half of the body is sent: the answer is cut short.
                let mut cut = with_length(&body);
                cut.truncate(cut.len() - body.len() / 2);
                match api.answer(format!("{step:?}"), cut, true).await {
                    Ok(()) => {
                        unreachable.insert(i, Instant::now());
                    }
                    Err(e) => violations.push(e),
                }
            }
            Step::Fail(_) => {
                let body = r#"{"errorMessage":"boom","errorType":"Extension.Unknown"}"#;
                let answer = with_status("500 Internal Server Error", body);
                if let Err(e) = api.answer(format!("{step:?}"), answer, false).await {
                    violations.push(e);
                }
            }
            Step::Other(i) => {
                let body = invoke_body(&format!("x-{i}"), deadline);
                match api
                    .answer(format!("{step:?}"), with_length(&body), false)
                    .await
                {
                    Ok(()) => {
                        unreachable.insert(i, Instant::now());
                    }
                    Err(e) => violations.push(e),
                }
            }
            Step::Deadline(_) => {
                let end = deadline - MARGIN + Duration::from_millis(30);
                if let Ok(left) = end.duration_since(SystemTime::now()) {
                    tokio::time::sleep(left).await;
                }
            }
            Step::Sigterm => {
                sigterm_at = Some(Instant::now());
                let flushed = tokio::time::timeout(
                    Duration::from_secs(2),
                    crate::shutdown::final_flush(&core),
                )
                .await;
                if flushed.is_err() {
                    violations.push("the final flush did not end within 2 s".into());
                }
                break;
            }
        }
        tokio::time::sleep(SETTLE).await;
    }
    let ended = Instant::now();
    if sigterm_at.is_none() {
        match await_complete(&api, &rec, current).await {
            Ok(at) => {
                complete.insert(current, at);
            }
            Err(e) => violations.push(e),
        }
        // Anything that escaped the chain shows up now.
        tokio::time::sleep(Duration::from_millis(120)).await;
    }
    lock(&api.state).stopped = true;
    drive.abort();
    for rt in runtimes.values_mut() {
        if let Some(task) = rt.task.take() {
            task.abort();
        }
    }

    let ran = Scenario {
        steps: done_steps,
        ..scenario.clone()
    };
    check(
        &ran,
        &rec,
        &api,
        Facts {
            complete,
            delivered,
            unreachable,
            last_runtime_step,
            sigterm_at,
            ended,
        },
        &mut violations,
    );
    if !violations.is_empty() && ran.steps != scenario.steps {
        violations.insert(0, format!("(ran as {:?})", ran.steps));
    }
    if !violations.is_empty() {
        let s = core.state.borrow();
        violations.push(format!(
            "  state at the end: chain {:?}, slot {:?}, expected {:?}, parked {:?}, closed {:?}, lost_event {:?}",
            s.chain,
            s.slot.as_ref().map(|s| (&s.event.request_id, s.claimed, s.job.is_some(), s.responded)),
            s.expected,
            s.parked.as_ref().map(|j| &j.request_id),
            s.closed,
            s.lost_event.is_some(),
        ));
    }
    violations
}

fn is_extension(step: Step) -> bool {
    matches!(
        step,
        Step::Event(_) | Step::Lost(_) | Step::Fail(_) | Step::Other(_)
    )
}

fn lambda_invocation(i: u8) -> lambda_runtime::LambdaInvocation {
    let mut context = lambda_runtime::Context::default();
    context.request_id = rid(i);
    lambda_runtime::LambdaInvocation {
        parts: http::Response::new(()).into_parts().0,
        body: Default::default(),
        context,
    }
}

/// Waits until invocation `i` is complete as Lambda sees it: the runtime is done with it and
/// the extension waits in `event/next` (a request after the last answer).
async fn await_complete(api: &Api, rec: &Shared<Rec>, i: u8) -> Result<Instant, String> {
    let from = Instant::now();
    loop {
        let runtime_done = {
            let r = lock(rec);
            // An invocation the runtime never saw (no step of its runtime side) is done.
            r.done.contains_key(&i) || !r.started.contains_key(&i)
        };
        let waiting = lock(&api.state).pending.is_some();
        if runtime_done && waiting {
            return Ok(Instant::now());
        }
        if from.elapsed() > HELD {
            return Err(format!(
                "invocation {i} not complete {HELD:?} after its last step: runtime done {runtime_done}, extension waiting in event/next {waiting} (the environment is held)"
            ));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

struct Facts {
    complete: HashMap<u8, Instant>,
    delivered: HashMap<u8, Instant>,
    unreachable: HashMap<u8, Instant>,
    last_runtime_step: HashMap<u8, Instant>,
    sigterm_at: Option<Instant>,
    ended: Instant,
}

/// The invariants:
/// - every queued action runs exactly once (never dropped, never twice), and every invocation
///   has at most one phase;
/// - `event/next` is never in flight twice; the call after an invocation's own event goes out
///   only after that invocation's action has ended (G2);
/// - work that cannot be chained runs inline or right after the response: every action of an
///   invocation has ended when the invocation is complete (the runtime done, the extension in
///   `event/next`: Lambda may freeze or deliver the next one), and none starts after;
/// - no runtime wait (the wrapper's or the layer's) lasts longer than `claim_timeout`, nor
///   nearly that long when the event had already been lost or replaced by another;
/// - an event is never held past its phase end (the completion waits above are bounded by
///   `HELD`, far below the long deadline's phase end).
fn check(scenario: &Scenario, rec: &Shared<Rec>, api: &Api, f: Facts, v: &mut Vec<String>) {
    let rec = lock(rec);
    let api = lock(&api.state);
    let invs: Vec<u8> = {
        let mut v: Vec<u8> = scenario
            .steps
            .iter()
            .map(|s| s.inv())
            .filter(|i| *i > 0)
            .collect();
        v.dedup();
        v
    };
    for &i in &invs {
        let id = rid(i);
        let runs = rec.actions.get(&id).map_or(&[][..], Vec::as_slice);
        let started = rec.started.contains_key(&i);
        // Under SIGTERM only work whose handler had ended before it must have run.
        let handed = scenario
            .steps
            .iter()
            .take_while(|s| **s != Step::Sigterm)
            .any(|s| matches!(s, Step::Return(j) | Step::Drop(j) if *j == i));
        // Past its phase end before the response, its actions are cut (G4), and a second,
        // empty phase report is harmless.
        let last_step = scenario.steps.iter().rposition(
            |s| matches!(s, Step::Return(j) | Step::Drop(j) | Step::Respond(j) if *j == i),
        );
        let cut = scenario
            .steps
            .iter()
            .position(|s| *s == Step::Deadline(i))
            .is_some_and(|d| last_step.is_none_or(|l| d < l));
        let must_run = started && !cut && (f.sigterm_at.is_none() || handed);
        if must_run && runs.is_empty() {
            v.push(format!("inv {i}: its queued action never ran"));
        }
        if runs.len() > 1 {
            v.push(format!("inv {i}: its action ran {} times", runs.len()));
        }
        if let Some(end_by) = f.sigterm_at.map(|_| f.ended)
            && runs.iter().any(|(_, end)| end.is_none_or(|e| e > end_by))
            && handed
        {
            v.push(format!(
                "inv {i}: its action had not ended when the final flush returned"
            ));
        }
        let phases = rec
            .reports
            .iter()
            .filter(|(r, k, _)| *r == id && *k != PhaseKind::Shutdown)
            .count();
        if phases > 1 && !cut {
            v.push(format!("inv {i}: {phases} phases"));
        }
        if let Some(&done) = f.complete.get(&i) {
            for (start, end) in runs {
                match end {
                    Some(end) if *end <= done => {}
                    Some(end) => v.push(format!(
                        "inv {i}: its action ended {:?} after the invocation was complete (escaped the chain)",
                        end.duration_since(done)
                    )),
                    None => v.push(format!(
                        "inv {i}: its action {} when the invocation was complete and never ended (escaped the chain)",
                        if *start <= done { "ran" } else { "had not started" }
                    )),
                }
            }
        }
        // G2: the call after this invocation's own event, only after its action ended, when
        // its phase is chained (an inline phase is over before the runtime's next `next`,
        // which the completion check above sees).
        let chained = rec
            .reports
            .iter()
            .any(|(r, k, _)| *r == id && *k == PhaseKind::Chained);
        if let (true, Some(&at), Some((_, Some(end)))) =
            (chained, f.delivered.get(&i), runs.first())
            && let Some(next) = api.requests.iter().find(|t| **t > at)
            && next < end
        {
            v.push(format!(
                "inv {i}: event/next went out {:?} before its action ended (G2)",
                end.duration_since(*next)
            ));
        }
        // Waits on the runtime's side.
        if let (Some(&last), Some(&done)) = (f.last_runtime_step.get(&i), rec.done.get(&i)) {
            let waited = done.saturating_duration_since(last);
            let work = ACTION * u32::try_from(runs.len()).unwrap_or(1);
            if waited > CLAIM + work + SLACK {
                v.push(format!(
                    "inv {i}: the runtime waited {waited:?} after its last step"
                ));
            } else if f.unreachable.get(&i).is_some_and(|t| *t < last) && waited > CLAIM * 3 / 4 {
                v.push(format!(
                    "inv {i}: the runtime waited {waited:?} for an event already lost or replaced"
                ));
            }
        }
    }
    // A request on another connection while the earlier one's close was not read yet is a
    // double all the same: the chain dropped a call Lambda still counts as waiting.
    for (earlier, new) in &api.doubles {
        let how = if earlier == new {
            "on the same connection".to_owned()
        } else if api.closed.contains(earlier) {
            format!("on connection {new}, connection {earlier} closed unanswered")
        } else {
            format!("on connection {new}, connection {earlier} still open")
        };
        v.push(format!("two event/next calls in flight at once ({how})"));
    }
    for id in &api.abandoned {
        v.push(format!(
            "an event/next call abandoned unanswered (connection {id} closed by the chain)"
        ));
    }
    for head in &api.unexpected {
        v.push(format!(
            "a request other than event/next: {:?}",
            head.lines().next().unwrap_or_default()
        ));
    }
}

/// The interleavings of `a` and `b`, each keeping its order.
pub(crate) fn interleavings(a: &[Step], b: &[Step]) -> Vec<Vec<Step>> {
    if a.is_empty() {
        return vec![b.to_vec()];
    }
    if b.is_empty() {
        return vec![a.to_vec()];
    }
    let mut out = Vec::new();
    for mut rest in interleavings(&a[1..], b) {
        rest.insert(0, a[0]);
        out.push(rest);
    }
    for mut rest in interleavings(a, &b[1..]) {
        rest.insert(0, b[0]);
        out.push(rest);
    }
    out
}

/// The runtime's sides of invocation `i`: handled, dropped, undecodable.
fn runtime_sides(layer: bool, i: u8) -> Vec<Vec<Step>> {
    use Step::*;
    if layer {
        vec![
            vec![Begin(i), Return(i), Respond(i)],
            vec![Begin(i), Drop(i), Respond(i)],
            vec![Respond(i)],
        ]
    } else {
        vec![vec![Begin(i), Return(i)], vec![Begin(i), Drop(i)], vec![]]
    }
}

/// The extension's sides of invocation `i`.
fn extension_sides(i: u8) -> Vec<Vec<Step>> {
    use Step::*;
    vec![
        vec![Event(i)],
        vec![Fail(i), Event(i)],
        vec![Lost(i)],
        vec![Other(i)],
        vec![Other(i), Event(i)],
    ]
}

/// Every ordering of one invocation.
pub(crate) fn one_invocation(layer: bool, i: u8) -> Vec<Vec<Step>> {
    let mut out = Vec::new();
    for r in runtime_sides(layer, i) {
        for e in extension_sides(i) {
            out.extend(interleavings(&r, &e));
        }
    }
    out
}

/// `steps` with `extra` inserted at every position.
fn insert_everywhere(steps: &[Step], extra: Step) -> Vec<Vec<Step>> {
    (0..=steps.len())
        .map(|k| {
            let mut s = steps.to_vec();
            s.insert(k, extra);
            s
        })
        .collect()
}

/// All scenarios; `full` false: a reduced set for CI.
pub(crate) fn scenarios(full: bool) -> Vec<Scenario> {
    use Step::*;
    let mut out = Vec::new();
    for layer in [true, false] {
        let ones = one_invocation(layer, 1);
        for steps in &ones {
            out.push(Scenario {
                layer,
                short: false,
                steps: steps.clone(),
            });
        }
        // The deadline minus the margin, and SIGTERM, at every position of the orderings
        // with the plain or the lost event.
        for steps in ones
            .iter()
            .filter(|s| s.len() <= 4 && s.iter().all(|x| !matches!(x, Fail(_) | Other(_))))
        {
            for with in insert_everywhere(steps, Deadline(1)) {
                out.push(Scenario {
                    layer,
                    short: true,
                    steps: with,
                });
            }
            for with in insert_everywhere(steps, Sigterm) {
                out.push(Scenario {
                    layer,
                    short: false,
                    steps: with,
                });
            }
        }
        // Two back to back: every ordering of the first, then the second in its usual
        // orderings (and all of them, in the full set).
        let seconds: Vec<Vec<Step>> = if full {
            one_invocation(layer, 2)
        } else if layer {
            vec![
                vec![Begin(2), Event(2), Return(2), Respond(2)],
                vec![Begin(2), Return(2), Respond(2), Event(2)],
                vec![Event(2), Begin(2), Return(2), Respond(2)],
            ]
        } else {
            vec![
                vec![Begin(2), Event(2), Return(2)],
                vec![Begin(2), Return(2), Event(2)],
                vec![Event(2), Begin(2), Return(2)],
            ]
        };
        for first in &ones {
            for second in &seconds {
                let mut steps = first.clone();
                steps.extend(second);
                out.push(Scenario {
                    layer,
                    short: false,
                    steps,
                });
            }
        }
    }
    out
}

/// Runs `scenarios`, `parallel` at a time; returns the failing ones with their violations.
pub(crate) async fn run_all(
    scenarios: Vec<Scenario>,
    parallel: usize,
) -> Vec<(Scenario, Vec<String>)> {
    let scenarios = Arc::new(scenarios);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let failed: Shared<Vec<(Scenario, Vec<String>)>> = Arc::default();
    let mut workers = Vec::new();
    for _ in 0..parallel {
        let (scenarios, next, failed) = (scenarios.clone(), next.clone(), failed.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let k = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(scenario) = scenarios.get(k) else {
                    return;
                };
                let v = run(scenario).await;
                if !v.is_empty() {
                    lock(&failed).push((scenario.clone(), v));
                }
            }
        }));
    }
    for w in workers {
        w.await.expect("worker");
    }
    std::mem::take(&mut *lock(&failed))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Orderings that fail on known gaps (below; also in the README's Limits): left out of the
    /// default run. `DEFERRED_HARNESS=full` runs them and lists those that fail.
    fn known(s: &Scenario) -> bool {
        // Where invocation `i`'s step (any invocation's, for SIGTERM) first comes.
        let at = |step: fn(u8) -> Step, i: u8| s.steps.iter().position(|x| *x == step(i));
        // Both happen, the first before the second.
        let before = |a: Option<usize>, b: Option<usize>| a.zip(b).is_some_and(|(a, b)| a < b);
        let sigterm = s.steps.iter().position(|x| *x == Step::Sigterm);
        (1..=2).any(|i| {
            let has = |step: fn(u8) -> Step| at(step, i).is_some();
            if !s.layer {
                // Finding 1: a handler dropped after its event was lost, where the chain's
                // retry went out before the handler started: the retry lets Lambda complete
                // the invocation, and nothing can call it back, so the dropped handler's work
                // runs after the runtime is done. (Where the handler started first, the retry
                // waits for its work: `State::running_closed`.)
                let lost_then_dropped =
                    has(Step::Drop) && before(at(Step::Lost, i), at(Step::Begin, i));
                // Finding 3: SIGTERM while a wrapper waits for its INVOKE event (the handler
                // returned): the final flush does not wait for that wrapper's work.
                let sigterm_waiting =
                    before(at(Step::Return, i), sigterm) && !before(at(Step::Event, i), sigterm);
                // Finding 5: a dropped handler whose event has not come by its deadline minus
                // the margin: the wait for the event takes its whole budget, and its work is
                // not run.
                let deadline = at(Step::Deadline, i);
                let dropped_past_deadline = before(at(Step::Drop, i), deadline)
                    && !before(at(Step::Event, i), deadline)
                    && !before(at(Step::Lost, i), deadline);
                lost_then_dropped || sigterm_waiting || dropped_past_deadline
            } else {
                // Finding 4 (theory: the chain out of step): with the layer, an event no
                // handler call will claim is held to its phase end. An event of another
                // request id where the runtime never called the handler; or, after an
                // invocation the runtime answered without calling the handler and whose
                // event a failed call lost or held back, the next invocation's late or stray
                // event.
                let stray_other = has(Step::Other) && !has(Step::Begin);
                let undecodable_out_of_step = has(Step::Respond)
                    && !has(Step::Begin)
                    && (has(Step::Fail) || has(Step::Lost))
                    && s.steps.iter().any(|x| x.inv() == i + 1);
                stray_other || undecodable_out_of_step
            }
        })
    }

    /// The stand-in API counts only the run's chain: a request from any other client (one
    /// elsewhere on the machine dialing the ephemeral port its own server once had) is neither
    /// a second call in flight nor the call to answer, and its connection is closed. Two calls
    /// of the chain's own are a double, and a call whose connection the chain closes
    /// unanswered is abandoned.
    #[tokio::test]
    async fn the_api_counts_only_the_chains_own_requests() {
        let (api, authority) = Api::start("ext-7-3").await;
        let next = |id: &str| {
            format!(
                "GET /2020-01-01/extension/event/next HTTP/1.1\r\nHost: {authority}\r\n\
                 Lambda-Extension-Identifier: {id}\r\nAccept: */*\r\n\r\n"
            )
        };
        let state = api.state.clone();
        let requests = |n: usize| {
            let state = state.clone();
            async move {
                let from = Instant::now();
                while lock(&state).requests.len() < n {
                    assert!(from.elapsed() < Duration::from_secs(2), "{n} requests");
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        };
        let mut chain = tokio::net::TcpStream::connect(&authority)
            .await
            .expect("connect");
        chain
            .write_all(next("ext-7-3").as_bytes())
            .await
            .expect("write");
        requests(1).await;

        // Another process's extension, and its OTLP exporter, on the same port.
        for foreign in [
            next("ext-1"),
            format!("POST /v1/traces HTTP/1.1\r\nHost: {authority}\r\nContent-Length: 0\r\n\r\n"),
        ] {
            let mut other = tokio::net::TcpStream::connect(&authority)
                .await
                .expect("connect");
            other.write_all(foreign.as_bytes()).await.expect("write");
            let mut rest = Vec::new();
            tokio::time::timeout(Duration::from_secs(2), other.read_to_end(&mut rest))
                .await
                .expect("the foreign connection is closed")
                .ok();
        }
        {
            let s = lock(&api.state);
            assert_eq!(s.doubles, []);
            assert_eq!(
                s.pending,
                Some(1),
                "the chain's call is still the one in flight"
            );
            assert_eq!(s.requests.len(), 1);
        }
        api.answer("Event(1)".into(), with_length("{}"), false)
            .await
            .expect("answered");
        let mut answer = [0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(2), chain.read(&mut answer))
            .await
            .expect("the chain gets the answer")
            .expect("read");
        assert!(answer[..n].starts_with(b"HTTP/1.1 200 OK"));

        // The chain's own second call while one is in flight.
        chain
            .write_all(format!("{}{}", next("ext-7-3"), next("ext-7-3")).as_bytes())
            .await
            .expect("write");
        requests(3).await;
        assert_eq!(lock(&api.state).doubles, [(1, 1)]);

        // The chain drops its connection with a call unanswered.
        drop(chain);
        let from = Instant::now();
        while !lock(&api.state).closed.contains(&1) {
            assert!(from.elapsed() < Duration::from_secs(2), "the close is read");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert_eq!(lock(&api.state).abandoned, [1]);
    }

    #[test]
    fn the_enumerator_counts() {
        let a = [Step::Begin(1), Step::Return(1), Step::Respond(1)];
        let b = [Step::Fail(1), Step::Event(1)];
        assert_eq!(interleavings(&a, &b).len(), 10);
    }

    /// Every ordering (the reduced set unless `DEFERRED_HARNESS=full`); prints each failing one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn orderings_keep_the_invariants() {
        let mode = std::env::var("DEFERRED_HARNESS").unwrap_or_default();
        let full = mode == "full" || mode.starts_with("only:");
        let mut all = if full {
            scenarios(true)
        } else {
            // The default: every ordering of one invocation, in both configurations.
            [true, false]
                .into_iter()
                .flat_map(|layer| {
                    one_invocation(layer, 1)
                        .into_iter()
                        .map(move |steps| Scenario {
                            layer,
                            short: false,
                            steps,
                        })
                })
                .collect()
        };
        if mode != "full" && !mode.starts_with("only:") {
            all.retain(|s| !known(s));
        }
        if let Some(filter) = mode.strip_prefix("only:") {
            all.retain(|s| format!("{:?} {:?}", s.layer, s.steps).contains(filter));
        }
        let count = all.len();
        let started = std::time::Instant::now();
        let failed = run_all(all, 6).await;
        let mut text = String::new();
        for (s, v) in &failed {
            text.push_str(&format!(
                "{} short={} {:?}\n",
                if s.layer { "layer" } else { "start" },
                s.short,
                s.steps
            ));
            for line in v {
                text.push_str(&format!("    {line}\n"));
            }
        }
        // Known gaps (run by `full`) do not fail it; `only:` fails on any failure.
        let unknown = failed.iter().filter(|(s, _)| !known(s)).count();
        eprintln!(
            "{count} orderings in {:?}, {} failed ({unknown} not known gaps)",
            started.elapsed(),
            failed.len()
        );
        let ok = if mode.starts_with("only:") {
            failed.is_empty()
        } else {
            unknown == 0
        };
        if ok && !failed.is_empty() {
            eprintln!("the known gaps that failed:\n{text}");
        }
        assert!(
            ok,
            "{} of {count} orderings failed ({unknown} not known gaps):\n{text}",
            failed.len()
        );
    }
}
