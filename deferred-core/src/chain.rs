//! The chained `event/next`: exactly one call in flight, and the next one only after the
//! previous invocation's deferred phase has ended.
//!
//! Lambda neither freezes the environment nor delivers the next invocation while a registered
//! extension has not called `event/next` (Extensions API docs, "Invoke phase": the invocation
//! ends when the runtime and every extension have signalled completion by calling next).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::core::{Chain, Core, Slot};
use crate::extension::line::Line;
use crate::extension::{Client, InvokeEvent, NextEvent};
use crate::phase::Budget;
use crate::report::PhaseKind;
use crate::runner::{Runner, Spawner};
use crate::snapstart::Restores;

/// The chain's thread, started while the registration is out (see `Prepared::begin`), with a
/// current-thread runtime of its own, built there; `user` is the runtime the function runs
/// on, where every phase runs. Dropped without `begin` (the registration failed), the thread
/// ends.
///
/// Why a thread: an INVOKE event (one per invocation) then wakes that thread only, not a
/// worker of the function's runtime, which on one vCPU takes the CPU from the handler and the
/// runtime's loop; and the chain's timers (the watchdog, the release of an event whose phase
/// does not end) run even while the function's runtime is blocked: by a blocking action on a
/// current-thread runtime, say, which would otherwise hold the environment to the function's
/// timeout (G4). Why started early: starting a thread and building a runtime take about
/// 0.1 ms, which would otherwise hold `start`, and so the runtime's first `/next` and the end
/// of init (cold start), after the registration's answer.
pub(crate) struct Prepared {
    user: tokio::runtime::Handle,
    /// Hands the thread its chain; the OS's refusal when there is no thread.
    thread: std::io::Result<std::sync::mpsc::SyncSender<Begin>>,
}

/// What the chain's thread runs, once the extension is registered.
struct Begin {
    core: Arc<Core>,
    client: Arc<Client>,
    extension_id: String,
    /// Closed when the function's runtime shuts down: the chain ends with it, as a task of it
    /// would.
    gone: tokio::sync::oneshot::Receiver<std::convert::Infallible>,
}

/// Starts the chain's thread (see [`Prepared`]), on the function's runtime.
pub(crate) fn prepare() -> Prepared {
    prepare_with(os_thread)
}

fn os_thread(run: Box<dyn FnOnce() + Send>) -> std::io::Result<()> {
    crate::runner::named_thread("deferred-chain", run)
}

/// [`prepare`], starting the chain's thread with `thread`.
fn prepare_with(thread: Spawner) -> Prepared {
    let user = tokio::runtime::Handle::current();
    // The subscriber in effect here (a thread's own default, in tests), for the chain's logs;
    // none yet (a function that sets its subscriber up after `start`): the chain's thread
    // follows the global default, whenever it is set, rather than keep the none it saw here.
    let dispatch = tracing::dispatcher::get_default(|current| {
        (!current.is::<tracing::subscriber::NoSubscriber>()).then(|| current.clone())
    });
    let (start, begun) = std::sync::mpsc::sync_channel::<Begin>(1);
    let theirs = user.clone();
    let thread = thread(Box::new(move || {
        let _logs = dispatch.as_ref().map(tracing::dispatcher::set_default);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build();
        // No registration, no chain: the thread ends (its runtime dropped here, outside any
        // async context).
        let Ok(begin) = begun.recv() else {
            return;
        };
        let runtime = match runtime {
            Ok(runtime) => runtime,
            Err(error) => {
                let why = format!("cannot build the chain's runtime: {error}");
                return begin.on_the_functions_runtime(&theirs, &why);
            }
        };
        let Begin {
            core,
            client,
            extension_id,
            gone,
        } = begin;
        let chain = drive(core, client, extension_id, theirs.clone());
        runtime.block_on(async move {
            tokio::select! {
                () = chain => {}
                _ = gone => {}
            }
        });
    }));
    Prepared {
        user,
        thread: thread.map(|()| start),
    }
}

impl Prepared {
    /// Runs the chain of the registered extension `extension_id` on the prepared thread, or,
    /// when the OS refused it, as a task of the function's runtime.
    pub(crate) fn begin(self, core: Arc<Core>, client: Arc<Client>, extension_id: String) {
        let (alive, gone) = tokio::sync::oneshot::channel::<std::convert::Infallible>();
        let begin = Begin {
            core,
            client,
            extension_id,
            gone,
        };
        // The thread waits for this; should it be gone all the same, the chain must run.
        let sent = match self.thread {
            Ok(start) => start
                .send(begin)
                .map_err(|std::sync::mpsc::SendError(begin)| {
                    (begin, "the chain's thread is gone".to_owned())
                }),
            Err(error) => Err((begin, format!("cannot start the chain's thread: {error}"))),
        };
        match sent {
            // The chain ends with the function's runtime, as a task of it would: this task is
            // dropped when that runtime shuts down, which closes the channel the thread watches.
            Ok(()) => {
                self.user.spawn(async move {
                    let _alive = alive;
                    std::future::pending::<()>().await;
                });
            }
            Err((begin, why)) => begin.on_the_functions_runtime(&self.user, &why),
        }
    }
}

impl Begin {
    /// Runs the chain as a task of the function's runtime, where it has no thread of its own
    /// (`why`).
    fn on_the_functions_runtime(self, user: &tokio::runtime::Handle, why: &str) {
        tracing::warn!(target: "deferred", error = why, "the chain runs on the function's runtime");
        user.spawn(drive(
            self.core,
            self.client,
            self.extension_id,
            user.clone(),
        ));
    }
}

/// Runs the chain until the process ends (or a SHUTDOWN event arrives); its phases run on
/// `user`, the function's runtime.
///
/// Should the chain panic (a bug of ours), it is not left dead: Lambda completes an
/// invocation only once every registered extension has called `event/next` again, so a
/// chain that stopped calling would hold each invocation to its timeout and get the
/// environment reset. Deferred work runs inline from then on, and the extension acknowledges
/// each event at once, as when the phase thread cannot start.
pub(crate) async fn drive(
    core: Arc<Core>,
    client: Arc<Client>,
    extension_id: String,
    user: tokio::runtime::Handle,
) {
    let chain = drive_with(
        core.clone(),
        client.clone(),
        extension_id.clone(),
        Restores::global(),
        user.clone(),
    );
    let mut chain = std::pin::pin!(chain);
    match crate::scope::caught(chain.as_mut()).await {
        Ok(()) => return,
        // Its payload's drop must not unwind out of what follows either.
        Err(panic) => crate::phase::drop_panic(panic),
    }
    // The event the chain held, if any, with the job handed over for it: nothing would start
    // that phase now (the layer's `responded` and the chain's timers start it from the slot,
    // and the acknowledging below would let Lambda freeze the environment under it).
    let mut stranded = None;
    core.state.send_modify(|s| {
        s.chain = Chain::Stopped;
        stranded = s.slot.take().and_then(|slot| slot.job);
    });
    tracing::error!(
        target: "deferred",
        "the extension's chain panicked (a bug in lambda-deferred, please report it): deferred \
         work runs inline from now on, and the extension only acknowledges events so that \
         Lambda does not wait for it"
    );
    // Its work runs now, before the next `event/next` (a wrapper still to hand its job over
    // finds no event held, and runs it inline). On the function's runtime, as every phase:
    // should that runtime be blocked, the wait ends at the invocation's deadline, where
    // Lambda ends the invocation anyway.
    if let Some(job) = stranded {
        let by = Budget::new(job.deadline, Duration::ZERO).end;
        let phases = core.clone();
        let phase = user.spawn(async move { drop(phases.run_phase(job, PhaseKind::Inline).await) });
        if let Ok(joined) = tokio::time::timeout_at(by, phase).await {
            crate::phase::drop_joined(joined);
        }
    }
    match core.runner.get() {
        Some(runner) => acknowledge_on_line(&core, runner).await,
        None => crate::late::acknowledge(client, extension_id).await,
    }
}

/// After the chain panicked: calls `event/next` again as soon as each event arrives, on the
/// chain's own line. Not through a client of its own: a phase still in flight arms the line
/// when it ends, and a call of the client's beside that one would be a second `event/next`
/// in flight (Lambda answers one of the two with an error). That phase ends first, within
/// its end plus half the safety margin (its watchdog ran in the chain).
async fn acknowledge_on_line(core: &Arc<Core>, runner: &Arc<Runner>) {
    if let Some(until) = core.work_until() {
        let _ = tokio::time::timeout_at(until, runner.phases_ended()).await;
    }
    let line = &runner.line;
    let mut restores = Restores::global().watch();
    let mut failures: u32 = 0;
    loop {
        // Lets the next call go out, unless one is out already (then its answer is read).
        line.arm(line.seq());
        let next = restores
            .next_event_watching(|| line.call(), || line.reset(), &core.event_missed)
            .await;
        if !crate::late::acknowledged(next, &mut failures, &mut restores).await {
            return;
        }
    }
}

/// [`drive`], watching `restores`: after a SnapStart restore the line's connection is
/// replaced and the `event/next` in flight at the snapshot is re-established (see
/// `snapstart.rs`).
///
/// The chain's task reads the answers to `event/next`; it does not run the phases. A phase
/// starts where its last condition is met (the layer's `responded`, the wrapper's hand-over,
/// or this task's timers for a stray or overdue event) and runs on the phase thread, which
/// then sends the next `event/next` (`runner.rs`). This task wakes only for events, for those
/// timers, and for the watchdog of a flush that overruns. What runs the user's code here (the
/// final flush of a SHUTDOWN event; acknowledging events when no chain can run) goes to `user`.
pub(crate) async fn drive_with(
    core: Arc<Core>,
    client: Arc<Client>,
    extension_id: String,
    restores: Arc<Restores>,
    user: tokio::runtime::Handle,
) {
    // A second chain for one core, which `start` never makes: the first one drives the
    // phases, but this extension is registered too and must not keep Lambda waiting.
    if core.runner.get().is_some() {
        tracing::error!(target: "deferred", "a chain already runs for this core: this extension only acknowledges events");
        user.spawn(crate::late::acknowledge(client, extension_id));
        return;
    }
    let (authority, prefix) = client.endpoint();
    let line = Arc::new(Line::new(authority, prefix, &extension_id));
    let runner = match Runner::start(&core, line.clone(), user.clone()) {
        Ok(runner) => runner,
        Err(error) => {
            core.state.send_modify(|s| s.chain = Chain::Stopped);
            tracing::error!(target: "deferred", %error, "cannot start the chain's phase thread: deferred work runs inline");
            // Registered all the same: Lambda must not wait for this extension.
            user.spawn(crate::late::acknowledge(client, extension_id));
            return;
        }
    };
    // Set once: the check above is the one that counts, `start` making one chain per core.
    let _ = core.runner.set(runner.clone());
    let mut restores = restores.watch();
    let mut failures: u32 = 0;
    // The last event held, until its phase arms the next call.
    let mut due: Option<Due> = None;
    // One timer for the whole chain, moved rather than replaced: a new timer (the first to
    // exist, or earlier than the one a parked worker sleeps until) wakes that worker through
    // the driver, once per invocation; moving the only timer later does not.
    const IDLE: Duration = Duration::from_secs(24 * 3600);
    let mut idle = Instant::now() + IDLE;
    let timer = tokio::time::sleep_until(idle);
    tokio::pin!(timer);
    loop {
        let next = {
            let call =
                restores.next_event_watching(|| line.call(), || line.reset(), &core.event_missed);
            tokio::pin!(call);
            loop {
                if due.as_ref().is_some_and(|d| line.armed(d.seq)) {
                    due = None;
                }
                let planned = held_until(&core)
                    .into_iter()
                    .chain(due.as_ref().map(|d| d.at(&core)))
                    .min();
                let wake = runner.wake_at(planned);
                let now = Instant::now();
                if idle <= now {
                    idle = now + IDLE;
                }
                let at = wake.unwrap_or(idle);
                if timer.deadline() != at {
                    timer.as_mut().reset(at);
                }
                tokio::select! {
                    biased;
                    next = &mut call => break next,
                    () = &mut timer, if wake.is_some() => {
                        runner.watchdog(&core).await;
                        let mut ready = None;
                        core.state.send_if_modified(|state| {
                            ready = core.take_ready(state, Instant::now());
                            false
                        });
                        if let Some(ready) = ready {
                            core.submit(ready);
                        }
                        if let Some(due) = due.take_if(|d| Instant::now() >= d.at(&core)) {
                            due.release(&line);
                        }
                    }
                    () = runner.poke.notified() => {}
                }
            }
        };
        match next {
            Ok(NextEvent::Invoke(event)) => {
                if failures > 0 {
                    tracing::info!(
                        target: "deferred",
                        failures,
                        "event/next answers again: the chain is re-armed"
                    );
                }
                failures = 0;
                let seq = line.seq();
                due = hold(&core, event, seq).map(|(request_id, end)| Due {
                    seq,
                    request_id,
                    // Past its end only by the few ms an aborted action may take to drop.
                    at: end + core.config.safety_margin / 2,
                });
            }
            Ok(NextEvent::Shutdown(event)) => {
                // Internal extensions cannot subscribe to SHUTDOWN; should one arrive anyway,
                // flush and stop calling.
                core.state.send_modify(|s| s.chain = Chain::Stopped);
                tracing::info!(target: "deferred", reason = %event.reason, "SHUTDOWN event: final flush");
                // On the function's runtime: the flush runs the user's flushers and hooks.
                let flush = user.spawn(async move { crate::shutdown::final_flush(&core).await });
                crate::phase::drop_joined(flush.await);
                return;
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                // An event lost in this call's answer; or, refused because Lambda still counts
                // an earlier call of ours as waiting (its connection gone), the next INVOKE
                // event, which Lambda will write to that dead call. A wrapper that starts
                // without its event before the retry after this one (and its claim window) has
                // been refused or answered does not wait for it.
                let lost_in_answer = line.take_lost();
                let lost = (lost_in_answer || error.is_already_waiting())
                    .then(|| Instant::now() + backoff(failures) + core.config.claim_timeout);
                core.state.send_modify(|s| s.call_failed(lost));
                // One clear line when the chain breaks, then one per 100 failed retries.
                if failures == 1 || failures.is_multiple_of(100) {
                    tracing::warn!(
                        target: "deferred",
                        %error,
                        failures,
                        "event/next failed: deferred work runs inline until the chain is re-armed"
                    );
                }
                // A restore ends the backoff: the retry then goes out on a fresh connection.
                tokio::select! {
                    () = tokio::time::sleep(backoff(failures)) => {}
                    _ = restores.changed() => {}
                }
                // A dropped handler's job (no layer) that this failure left to a background
                // phase, or a wrapper still running whose invocation the failure closed (its
                // future may yet be dropped): the retry lets Lambda complete the invocation
                // (and freeze the environment), so it waits for that work, at most to its end.
                core.closed_work_over().await;
                core.state.send_modify(|s| s.chain = Chain::Armed);
            }
        }
    }
}

/// When the held event (if any) must be looked at again by the chain's task: when [`decide`]
/// can next tell (the end of its stray window without the layer, or its phase end), and, as a
/// first look for the watchdog, the builder's `flush_timeout` after its arrival (a flush
/// cannot end sooner, unless a handler sets a shorter one: then the phase thread pokes the
/// task).
fn held_until(core: &Core) -> Option<Instant> {
    let state = core.state.borrow();
    let slot = state.slot.as_ref()?;
    let now = Instant::now();
    // When `decide` can next tell; if it can already, now (the timer's branch takes it).
    let mut at = decide(core.layer_installed(), slot, now)
        .err()
        .unwrap_or(now);
    if slot.watch_from > now {
        at = at.min(slot.watch_from);
    }
    Some(at)
}

/// An event whose phase has not armed the next call yet, and when the chain's task arms it
/// itself: a safety net for G4. A phase ends by its end (its actions and flushes are cut
/// there, a flush on the phase thread by the watchdog), so this fires only when something
/// after them holds the phase thread (a blocking `on_report` hook), or on a bug: the
/// environment is released rather than held to the deadline, where Lambda would time the
/// invocation out and reset it.
#[derive(Debug)]
struct Due {
    seq: u64,
    request_id: String,
    at: Instant,
}

impl Due {
    /// When to release it: not before a running wrapper's closed work is over (without the
    /// layer), at most its end. An event that `Core::begin` found out of step is released
    /// once that work is over (`Core::arm_after_closed_work`); its phase end, earlier, must
    /// not let the call out meanwhile.
    fn at(&self, core: &Core) -> Instant {
        core.closed_work_end()
            .map_or(self.at, |until| self.at.max(until))
    }

    fn release(self, line: &Line) {
        if line.armed(self.seq) {
            return;
        }
        tracing::error!(
            target: "deferred",
            request_id = %self.request_id,
            "the deferred phase had not ended by its end (the deadline minus the safety \
             margin, plus half the margin): the environment is released now, and what the \
             phase still runs may be frozen with it (a blocking on_report hook?)"
        );
        line.arm(self.seq);
    }
}

/// Holds an INVOKE event (event `seq` on the line) until its invocation is over: its phase
/// starts where its last condition is met (see [`decide`]). Returns the request id and its
/// phase end, unless the event is released at once.
fn hold(core: &Arc<Core>, event: InvokeEvent, seq: u64) -> Option<(String, Instant)> {
    let arrived = Instant::now();
    let phase_end = Budget::new(Some(event.deadline), core.config.safety_margin).end;
    let stray_at = arrived + core.config.stray_window;
    let mut closed_already = false;
    let mut ready = None;
    let request_id = event.request_id.clone();
    core.state.send_modify(|s| {
        s.chain = Chain::Holding;
        // An event arrived: whatever a failed call lost was not a handler's still to start.
        s.lost_event = None;
        s.begun_unseen = false;
        s.lost_to = None;
        let request_id = event.request_id.as_str();
        if s.was_closed(request_id) {
            // Its wrapper gave up waiting for this event and ran the work inline. (Its answer,
            // if noted, is this event's: not one for a later event with its id, a retry.)
            s.responded_early.take_if(|id| id == request_id);
            closed_already = true;
            s.chain = Chain::Armed;
            return;
        }
        // A wrapper already started (or its job is parked) for another invocation than this
        // event's: the chain is out of step (`Core::begin` sees the other order). The event is
        // released at once, rather than held, unclaimed, to its end.
        let waiting = s
            .expected
            .as_deref()
            .or(s.parked.as_ref().map(|job| job.request_id.as_str()))
            .filter(|id| *id != request_id)
            .map(str::to_owned);
        if let Some(waiting) = waiting {
            if s.expected.take().is_some() {
                // A wrapper still runs for it (its job not parked): its work is closed now.
                s.close_running(waiting.clone(), s.expected_deadline);
            }
            s.out_of_step(waiting, request_id.to_owned());
            closed_already = true;
            return;
        }
        let mut claimed = s.expected.as_deref() == Some(request_id);
        if claimed {
            s.expected = None;
        }
        let job = s.parked.take_if(|job| job.request_id == request_id);
        claimed |= job.is_some();
        let responded = s.responded_early.take_if(|id| id == request_id).is_some();
        s.slot = Some(Slot {
            event,
            seq,
            stray_at,
            phase_end,
            watch_from: arrived + core.config.flush_timeout,
            claimed,
            job,
            responded,
        });
        ready = core.take_ready(s, arrived);
    });
    if closed_already {
        core.arm_after_closed_work(seq);
        return None;
    }
    if let Some(ready) = ready {
        core.submit(ready);
    }
    Some((request_id, phase_end))
}

/// How long to wait before calling `event/next` again after `failures` failures in a row.
pub(crate) fn backoff(failures: u32) -> Duration {
    Duration::from_millis(10u64.saturating_mul(1 << failures.min(7)).min(1000))
}

/// Whether the held event's phase can start `now`: `Ok(None)` with the wrapper's job,
/// `Ok(Some(why))` without one (nobody will hand a job over), `Err(until)` when it is too early
/// to tell.
pub(crate) fn decide(
    layer: bool,
    slot: &Slot,
    now: Instant,
) -> Result<Option<&'static str>, Instant> {
    if slot.job.is_some() && (!layer || slot.responded) {
        return Ok(None);
    }
    if layer && slot.responded && !slot.claimed {
        return Ok(Some(
            "the runtime answered without calling the handler (undecodable event?)",
        ));
    }
    if !layer && !slot.claimed && now >= slot.stray_at {
        return Ok(Some(
            "no handler claimed the invocation in time (undecodable event?)",
        ));
    }
    if now >= slot.phase_end {
        return Ok(Some(
            "the invocation reached its deadline before its handler returned",
        ));
    }
    if !layer && !slot.claimed {
        Err(slot.stray_at.min(slot.phase_end))
    } else {
        Err(slot.phase_end)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::{SystemTime, UNIX_EPOCH};

    use tokio::io::AsyncWriteExt as _;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::core::{Config, Mode, Ticket};
    use crate::extension::line::tests::{request, with_length, with_status};
    use crate::scope::Queue;

    /// The stand-in API's next connection, within 5 s (`what` names it if none comes).
    async fn accept_within(listener: &TcpListener, what: &str) -> TcpStream {
        let accepted = tokio::time::timeout(Duration::from_secs(5), listener.accept()).await;
        let (stream, _) = accepted.expect(what).expect("accept");
        stream
    }

    /// The stand-in API's next connection (`what`), its first `event/next` read.
    async fn first_call(listener: &TcpListener, what: &str) -> TcpStream {
        let mut stream = accept_within(listener, what).await;
        request_within(&mut stream, Duration::from_secs(5))
            .await
            .expect("the first event/next");
        stream
    }

    /// Reads one request head; `None` if nothing arrives within `within`.
    async fn request_within(stream: &mut TcpStream, within: Duration) -> Option<String> {
        tokio::time::timeout(within, request(stream)).await.ok()
    }

    /// The body of an INVOKE event.
    pub(crate) fn invoke_body(request_id: &str, deadline: SystemTime) -> String {
        let ms = deadline
            .duration_since(UNIX_EPOCH)
            .expect("epoch")
            .as_millis();
        format!(
            r#"{{"eventType":"INVOKE","deadlineMs":{ms},"requestId":"{request_id}","invokedFunctionArn":"arn"}}"#
        )
    }

    /// An `event/next` answer with an INVOKE event.
    fn invoke(request_id: &str, deadline: SystemTime) -> String {
        with_length(&invoke_body(request_id, deadline))
    }

    /// A core with the runtime layer whose chain talks to a stand-in API: the API's end of the
    /// chain's connection, its first `event/next` read already.
    async fn chain() -> (Arc<Core>, TcpListener, TcpStream) {
        chain_with(true).await
    }

    /// [`chain`], with the runtime layer (`run`) or without it (`start`).
    async fn chain_with(layer: bool) -> (Arc<Core>, TcpListener, TcpStream) {
        chain_watching(layer, Restores::new()).await
    }

    /// A stand-in API, and a core (`config`, without phase telemetry) with a client for it.
    async fn stand_in(config: Config) -> (TcpListener, Arc<Core>, Arc<Client>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let authority = listener.local_addr().expect("addr").to_string();
        let config = Config {
            phase_telemetry: false,
            ..config
        };
        let core = Core::new(config, Mode::Extension);
        let client = Arc::new(Client::new(&authority).expect("client"));
        (listener, core, client)
    }

    /// [`chain_with`], watching `restores`.
    async fn chain_watching(
        layer: bool,
        restores: Arc<Restores>,
    ) -> (Arc<Core>, TcpListener, TcpStream) {
        let (listener, core, client) = stand_in(Config::default()).await;
        core.layer_installed
            .store(layer, std::sync::atomic::Ordering::Release);
        tokio::spawn(drive_with(
            core.clone(),
            client,
            "ext-1".into(),
            restores,
            tokio::runtime::Handle::current(),
        ));
        let stream = first_call(&listener, "the chain calls").await;
        (core, listener, stream)
    }

    /// The chain's `event/next` connection is gone while its call waits (a SnapStart restore
    /// that did not keep it). Lambda still counts that call as waiting: the chain's new call is
    /// refused (403 `Extension.InvalidExtensionState`) until the next INVOKE event has been
    /// written to the dead call, lost; then one is accepted. A wrapper that starts after that
    /// (the chain armed again, its event gone) must not wait its claim window for the event:
    /// its job runs right after the response.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_event_lost_to_a_dead_call_is_not_waited_for() {
        let (core, listener, api) = chain().await;
        drop(api);
        let mut api = accept_within(&listener, "the chain calls again").await;
        request(&mut api).await;
        let refused =
            r#"{"errorMessage":"already waiting","errorType":"Extension.InvalidExtensionState"}"#;
        api.write_all(with_status("403 Forbidden", refused).as_bytes())
            .await
            .expect("write");
        // The invocation came meanwhile (its event written to the dead call); this call is
        // accepted and waits for the next event.
        request_within(&mut api, Duration::from_secs(5))
            .await
            .expect("the chain calls again after the 403");
        tokio::time::timeout(
            Duration::from_secs(5),
            core.state.subscribe().wait_for(|s| s.chain == Chain::Armed),
        )
        .await
        .expect("armed")
        .expect("state");
        let deadline = SystemTime::now() + Duration::from_secs(4);
        let invocation = crate::context::Invocation {
            request_id: "r-1".into(),
            deadline: Some(deadline),
        };
        let ticket = core.begin(&invocation);
        assert!(
            core.dispatch(&ticket, job("r-1", deadline), "inline")
                .is_none(),
            "parked for the layer"
        );
        assert!(core.responded("r-1"));
        let started = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(3), core.claim_parked("r-1"))
            .await
            .expect("the layer's wait ended");
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "the layer waited {:?} for an event that was lost",
            started.elapsed()
        );
        assert!(core.state.borrow().parked.is_none(), "the job ran there");
    }

    /// Without the layer (`start`), a handler future dropped (a timeout around the handler)
    /// leaves its job waiting for its INVOKE event (`hand_over_later`). The `event/next` that
    /// carries the event fails and loses it: the job runs as a background phase. The retry,
    /// which lets Lambda complete the invocation (the runtime is done with it) and freeze the
    /// environment, must not go out while that phase runs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_handlers_job_left_by_a_failed_call_holds_the_retry() {
        let (core, listener, mut api) = chain_with(false).await;

        let deadline = SystemTime::now() + Duration::from_secs(10);
        let (ticket, job, ended) = r1_with_a_slow_action(&core, deadline).await;
        // The drop guard's path.
        core.hand_over_later(ticket, job);
        tokio::time::sleep(Duration::from_millis(20)).await;

        // The answer carrying r-1's event is cut short: lost.
        let body = invoke("r-1", deadline);
        api.write_all(&body.as_bytes()[..body.len() - 20])
            .await
            .expect("write");
        drop(api);
        let mut api = accept_within(&listener, "the chain calls again").await;
        request_within(&mut api, Duration::from_secs(5))
            .await
            .expect("the retry");
        assert!(
            ended.load(std::sync::atomic::Ordering::SeqCst),
            "the retry went out while the dropped handler's action still ran"
        );
    }

    /// Without the layer, a dropped handler's job whose invocation was already closed (its
    /// event later than the claim window, so its wrapper ran the work inline, and the future
    /// was dropped during that phase) runs as a background phase. Its event, arriving late,
    /// is released, and that release lets Lambda complete the invocation: it must wait for
    /// the background phase. Found by review: it went out at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_late_event_waits_for_its_dropped_handlers_closed_work() {
        let (core, _listener, mut api) = chain_with(false).await;
        let deadline = SystemTime::now() + Duration::from_secs(10);
        let (ticket, job, ended) = r1_with_a_slow_action(&core, deadline).await;
        // The claim window ran out: `hand_over` closed the invocation.
        core.state.send_modify(|s| {
            s.expected = None;
            s.close("r-1".into());
        });
        // The drop guard's path: refused by the chain, a background phase.
        core.hand_over_later(ticket, job);
        tokio::time::sleep(Duration::from_millis(20)).await;

        api.write_all(invoke("r-1", deadline).as_bytes())
            .await
            .expect("write");
        request_within(&mut api, Duration::from_secs(5))
            .await
            .expect("the next call");
        assert!(
            ended.load(std::sync::atomic::Ordering::SeqCst),
            "the late event was released while the dropped handler's action still ran"
        );
    }

    /// Without the layer, the chain holds an event (`r-0`) and a wrapper starts for another
    /// invocation (`r-1`): `begin` releases the event once `r-1`'s closed work is over. The
    /// chain's safety net for that event (its phase end plus half the margin) must not let the
    /// call out meanwhile. Found by review: it did, at the stale event's end, while `r-1`'s
    /// handler still ran.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_out_of_step_release_waits_past_the_stale_events_safety_net() {
        let (core, _listener, mut api) = chain_with(false).await;
        let stale = SystemTime::now() + Duration::from_millis(600);
        api.write_all(invoke("r-0", stale).as_bytes())
            .await
            .expect("write");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let invocation = crate::context::Invocation {
            request_id: "r-1".into(),
            deadline: Some(SystemTime::now() + Duration::from_secs(10)),
        };
        // `r-1`'s handler still runs.
        let handler = tokio::spawn(crate::invocation::run_on(
            core.clone(),
            invocation,
            crate::scope::Options::default(),
            std::future::pending::<()>(),
        ));
        let next = request_within(&mut api, Duration::from_millis(1500)).await;
        handler.abort();
        assert!(
            next.is_none(),
            "event/next went out while the out-of-step handler still ran"
        );
        // Dropped with no work left: the call goes out now.
        request_within(&mut api, Duration::from_secs(2))
            .await
            .expect("the next call once the handler is gone");
    }

    /// The OS refuses the chain's thread (Lambda caps a function at 1,024 threads): the chain
    /// runs as a task of the function's runtime, and its first `event/next` goes out. (Before,
    /// the chain's runtime, dropped in `start`'s async context, panicked there: "Cannot drop a
    /// runtime in a context where blocking is not allowed", and `start` with it.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_chain_whose_thread_is_refused_runs_on_the_functions_runtime() {
        fn refused(_: Box<dyn FnOnce() + Send>) -> std::io::Result<()> {
            Err(std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                "Resource temporarily unavailable (test)",
            ))
        }
        let (listener, core, client) = stand_in(Config::default()).await;
        prepare_with(refused).begin(core.clone(), client, "ext-1".into());
        first_call(&listener, "the chain calls").await;
        assert!(core.runner.get().is_some(), "the chain runs");
    }

    /// A chain that panics (a bug of ours; here, a `stray_window` no builder would let through
    /// makes `hold` overflow an `Instant`) is not left dead: Lambda would hold every invocation
    /// to its timeout waiting for this extension's next `event/next`. Deferred work runs inline
    /// from then on, and the extension acknowledges events, on the chain's own connection (a
    /// call on another, beside the one a phase in flight would send on the chain's, would be
    /// a second `event/next` in flight). Before session 22: the chain's thread ended with the
    /// panic, and no call came; before session 23: the calls went on a second connection.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_chain_acknowledges_events_from_then_on() {
        let (listener, core, client) = stand_in(Config {
            stray_window: Duration::MAX,
            ..Config::default()
        })
        .await;
        prepare().begin(core.clone(), client, "ext-1".into());
        let mut line = first_call(&listener, "the chain calls").await;
        let deadline = SystemTime::now() + Duration::from_secs(10);
        line.write_all(invoke("r-1", deadline).as_bytes())
            .await
            .expect("write");
        // On the chain's own connection: one call in flight, as before the panic.
        let call = request_within(&mut line, Duration::from_secs(5)).await;
        assert!(
            call.is_some_and(|call| call.contains("/event/next")),
            "the extension calls event/next again, on the chain's connection"
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(300), listener.accept())
                .await
                .is_err(),
            "no second connection, which could put a second event/next in flight"
        );
        assert_eq!(
            core.state.borrow().chain,
            Chain::Stopped,
            "work runs inline"
        );
        // And again after the next event.
        line.write_all(invoke("r-2", deadline).as_bytes())
            .await
            .expect("write");
        request_within(&mut line, Duration::from_secs(5))
            .await
            .expect("the call after r-2");
    }

    /// A panic while the chain holds an event with its job (the handler has returned, the
    /// layer's `responded` has not come yet) does not strand that job: the fall-back runs it
    /// before its first `event/next`, which would let Lambda freeze the environment. Here the
    /// panic is an overflow past `hold` (a `safety_margin` no builder would let through).
    /// Before: the call went out at once, and the job ran only if the layer's `responded`
    /// found it (no one looked in the slot after the panic), after the release.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_with_a_job_held_runs_it_before_the_next_call() {
        let reported = Arc::new(std::sync::Mutex::new(None));
        let hook = reported.clone();
        let (listener, core, client) = stand_in(Config {
            safety_margin: Duration::MAX,
            on_report: Some(crate::core::ReportHook(Arc::new(move |report| {
                *crate::scope::lock(&hook) = Some((report.request_id.clone(), Instant::now()));
            }))),
            ..Config::default()
        })
        .await;
        core.layer_installed
            .store(true, std::sync::atomic::Ordering::Release);
        let deadline = SystemTime::now() + Duration::from_secs(10);
        // The handler returned before its event arrived: its job waits for the event.
        core.state.send_modify(|s| {
            s.parked = Some(crate::phase::Job {
                request_id: "r-1".into(),
                deadline: Some(deadline),
                queue: Queue::new(0),
                flush_timeout: Duration::from_secs(1),
                parent: None,
            });
        });
        prepare().begin(core.clone(), client, "ext-1".into());
        let mut line = first_call(&listener, "the chain calls").await;
        line.write_all(invoke("r-1", deadline).as_bytes())
            .await
            .expect("write");
        let call = request_within(&mut line, Duration::from_secs(5)).await;
        let called = Instant::now();
        assert!(
            call.is_some_and(|call| call.contains("/event/next")),
            "the extension calls event/next again"
        );
        let reported = crate::scope::lock(&reported).clone();
        assert!(
            reported
                .as_ref()
                .is_some_and(|(id, at)| id == "r-1" && *at <= called),
            "r-1's phase ran before the call: {reported:?}"
        );
        assert_eq!(core.state.borrow().chain, Chain::Stopped);
    }

    /// After a panic, the acknowledging extension lets a phase still in flight end (it arms
    /// the line itself) before the next `event/next` goes out: at once, that call would
    /// release the environment while the phase runs. (Arming at once, as the fall-back does
    /// for an event with no phase, the call came within a few ms.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_a_panic_a_phase_in_flight_ends_before_the_next_call() {
        let slow = crate::flush_fn("slow", || {
            std::thread::sleep(Duration::from_millis(600));
            Ok::<(), crate::FlushError>(())
        });
        let (listener, core, _) = stand_in(Config {
            flushers: vec![crate::flush::Flusher::new(slow)],
            ..Config::default()
        })
        .await;
        let authority = listener.local_addr().expect("addr").to_string();
        let line = Arc::new(Line::new(&authority, "", "ext-1"));
        let runner = Runner::start(&core, line.clone(), tokio::runtime::Handle::current())
            .expect("a phase thread");
        let _ = core.runner.set(runner.clone());
        // The line's call answered with r-1, whose phase then runs.
        let call = tokio::spawn({
            let line = line.clone();
            async move { line.call().await }
        });
        let mut api = first_call(&listener, "the line calls").await;
        let deadline = SystemTime::now() + Duration::from_secs(10);
        api.write_all(invoke("r-1", deadline).as_bytes())
            .await
            .expect("write");
        let answer = call.await.expect("no panic");
        assert!(matches!(answer, Ok(NextEvent::Invoke(_))), "{answer:?}");
        core.submit(crate::core::Ready {
            job: crate::phase::Job {
                request_id: "r-1".into(),
                deadline: None,
                queue: Queue::new(0),
                flush_timeout: Duration::from_secs(3),
                parent: None,
            },
            seq: line.seq(),
            end: Instant::now() + Duration::from_secs(4),
        });
        let started = std::time::Instant::now();
        let acknowledging = tokio::spawn({
            let core = core.clone();
            async move { acknowledge_on_line(&core, &runner).await }
        });
        request_within(&mut api, Duration::from_secs(5))
            .await
            .expect("the next call, on the chain's connection");
        let after = started.elapsed();
        acknowledging.abort();
        assert!(
            after >= Duration::from_millis(500),
            "event/next went out {after:?} after the fall-back began, while the phase's 600 ms \
             flush ran"
        );
    }

    /// [`prepare`] and [`Prepared::begin`]: the chain reads its events on a thread of its own,
    /// while what the user wrote runs on the function's runtime: the action as its task, the
    /// first flush on the phase thread in its context, the `on_report` hook too. Then the next call goes out. And the
    /// chain's thread ends with the function's runtime, as a task of it would.
    #[test]
    fn a_spawned_chain_runs_the_users_work_on_the_functions_runtime() {
        let chain_threads = || {
            std::fs::read_dir("/proc/self/task")
                .expect("tasks")
                .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
                .filter(|name| name.trim() == "deferred-chain")
                .count()
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(users_work_on_the_functions_runtime());
        assert_eq!(chain_threads(), 1, "the chain's thread");
        drop(runtime);
        let t0 = std::time::Instant::now();
        while chain_threads() > 0 {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "the chain's thread outlived the runtime"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    async fn users_work_on_the_functions_runtime() {
        type Seen = Arc<std::sync::Mutex<Vec<(&'static str, Option<tokio::runtime::Id>)>>>;
        fn note(seen: &Seen, what: &'static str) {
            let runtime = tokio::runtime::Handle::try_current().ok().map(|h| h.id());
            crate::scope::lock(seen).push((what, runtime));
        }
        let seen: Seen = Arc::default();
        let (flushed, reported) = (seen.clone(), seen.clone());
        let config = Config {
            flushers: vec![crate::flush::Flusher::new(crate::flush_fn(
                "where",
                move || {
                    note(&flushed, "flush");
                    Ok::<(), crate::FlushError>(())
                },
            ))],
            on_report: Some(crate::core::ReportHook(Arc::new(move |_| {
                note(&reported, "report");
            }))),
            ..Config::default()
        };
        let (listener, core, client) = stand_in(config).await;
        core.layer_installed
            .store(true, std::sync::atomic::Ordering::Release);
        prepare().begin(core.clone(), client, "ext-1".into());
        let mut api = first_call(&listener, "the chain calls").await;

        let deadline = SystemTime::now() + Duration::from_secs(4);
        api.write_all(invoke("r-1", deadline).as_bytes())
            .await
            .expect("write");
        let invocation = crate::context::Invocation {
            request_id: "r-1".into(),
            deadline: Some(deadline),
        };
        let ticket = core.begin(&invocation);
        let queue = Queue::new(1);
        let acted = seen.clone();
        crate::scope::with_queue(queue.clone(), async move {
            crate::scope::defer(None, async move { note(&acted, "action") }).expect("defer");
        })
        .await;
        let job = crate::phase::Job {
            queue,
            ..job("r-1", deadline)
        };
        assert!(
            core.dispatch(&ticket, job, "inline").is_none(),
            "handed over"
        );
        // Parked until the event arrives, if the chain's thread has not read it yet.
        if core.responded("r-1") {
            tokio::time::timeout(Duration::from_secs(3), core.claim_parked("r-1"))
                .await
                .expect("the layer's wait ended");
        }
        request_within(&mut api, Duration::from_secs(5))
            .await
            .expect("the next call after the phase");
        let ours = Some(tokio::runtime::Handle::current().id());
        let seen = crate::scope::lock(&seen).clone();
        assert_eq!(
            seen,
            [("action", ours), ("flush", ours), ("report", ours)],
            "where the user's work ran"
        );
    }

    /// A wrapper begun for `r-1` (no layer: its ticket is chained) whose handler queued one
    /// 300 ms action: its ticket, its job, and whether the action has ended.
    async fn r1_with_a_slow_action(
        core: &Arc<Core>,
        deadline: SystemTime,
    ) -> (
        Ticket,
        crate::phase::Job,
        Arc<std::sync::atomic::AtomicBool>,
    ) {
        let invocation = crate::context::Invocation {
            request_id: "r-1".into(),
            deadline: Some(deadline),
        };
        let ticket = core.begin(&invocation);
        assert_eq!(ticket, Ticket::Chained("r-1".into()));
        let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let queue = Queue::new(1);
        let e = ended.clone();
        crate::scope::with_queue(queue.clone(), async move {
            crate::scope::defer(None, async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                e.store(true, std::sync::atomic::Ordering::SeqCst);
            })
            .expect("defer");
        })
        .await;
        let job = crate::phase::Job {
            queue,
            ..job("r-1", deadline)
        };
        (ticket, job, ended)
    }

    fn job(request_id: &str, deadline: SystemTime) -> crate::phase::Job {
        crate::phase::Job {
            request_id: request_id.into(),
            deadline: Some(deadline),
            queue: Queue::new(0),
            flush_timeout: Duration::from_millis(100),
            parent: None,
        }
    }

    /// With the runtime layer, the extension is given an INVOKE event for another request id
    /// than the one whose wrapper started (the chain out of step), after that wrapper started
    /// (`begin` handles the other order): whether the handler is still running or its job is
    /// already parked, the stray event is released at once, not held, unclaimed, to its
    /// deadline minus the margin (4 s here; 15 minutes at most on Lambda), and the job runs
    /// outside the chain.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_event_for_another_invocation_than_the_wrappers_is_released_at_once() {
        for parked in [false, true] {
            let (core, _listener, mut api) = chain().await;
            let deadline = SystemTime::now() + Duration::from_secs(4);
            let invocation = crate::context::Invocation {
                request_id: "r-1".into(),
                deadline: Some(deadline),
            };
            let ticket = core.begin(&invocation);
            assert_eq!(ticket, Ticket::Chained("r-1".into()));
            let claim = parked.then(|| {
                assert!(
                    core.dispatch(&ticket, job("r-1", deadline), "inline")
                        .is_none()
                );
                assert!(
                    core.responded("r-1"),
                    "the layer waits for the parked job's event"
                );
                let core = core.clone();
                tokio::spawn(async move { core.claim_parked("r-1").await })
            });
            api.write_all(invoke("other", deadline).as_bytes())
                .await
                .expect("write");
            let started = std::time::Instant::now();
            let next = request_within(&mut api, Duration::from_secs(6)).await;
            assert!(next.is_some(), "parked {parked}: no event/next at all");
            assert!(
                started.elapsed() < Duration::from_millis(1500),
                "parked {parked}: event/next went out after {:?}",
                started.elapsed()
            );
            match claim {
                // The layer's wait ended with the job taken back (it runs there).
                Some(claim) => {
                    tokio::time::timeout(Duration::from_secs(2), claim)
                        .await
                        .expect("the layer's wait ended")
                        .expect("claim_parked");
                    assert!(core.state.borrow().parked.is_none());
                }
                // The handler returns: its work runs outside the chain.
                None => {
                    let refused = core.dispatch(&ticket, job("r-1", deadline), "inline");
                    assert!(refused.is_some(), "runs inline");
                }
            }
        }
    }

    /// A wrapper begun for `r-1` with the layer, whose job (one `millis` ms action) is handed
    /// over and its response seen: its phase starts once the event is there. Returns whether
    /// the action has ended.
    async fn r1_responded_with_an_action(
        core: &Arc<Core>,
        deadline: SystemTime,
        millis: u64,
    ) -> Arc<std::sync::atomic::AtomicBool> {
        let invocation = crate::context::Invocation {
            request_id: "r-1".into(),
            deadline: Some(deadline),
        };
        let ticket = core.begin(&invocation);
        assert_eq!(ticket, Ticket::Chained("r-1".into()));
        let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let queue = Queue::new(1);
        let e = ended.clone();
        crate::scope::with_queue(queue.clone(), async move {
            crate::scope::defer(None, async move {
                tokio::time::sleep(Duration::from_millis(millis)).await;
                e.store(true, std::sync::atomic::Ordering::SeqCst);
            })
            .expect("defer");
        })
        .await;
        let job = crate::phase::Job {
            queue,
            ..job("r-1", deadline)
        };
        assert!(core.dispatch(&ticket, job, "inline").is_none(), "parked");
        assert!(core.responded("r-1"), "parked for its event");
        ended
    }

    /// A SnapStart restore (not something Lambda does after init, but the chain must keep G2
    /// whatever comes) while an invocation's phase runs, at any point of it (early: the probe
    /// window ends first; late: the phase ends within the window), once or twice in a row, with
    /// the API's keep-alive connection open or closed meanwhile: no `event/next` goes out, on
    /// any connection, before the phase ended; then exactly one, which stays in flight and
    /// brings the next event.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restore_during_a_phase_lets_one_call_out_after_it() {
        for closed in [false, true] {
            for (restore_after, twice) in [(20, false), (20, true), (250, false), (250, true)] {
                restore_during_a_phase(restore_after, twice, closed).await;
            }
        }
    }

    async fn restore_during_a_phase(restore_after: u64, twice: bool, closed: bool) {
        let case = format!("restore after {restore_after} ms, twice: {twice}, closed: {closed}");
        let restores = Restores::new();
        let (core, listener, mut api) = chain_watching(true, restores.clone()).await;
        let deadline = SystemTime::now() + Duration::from_secs(10);
        let ended = r1_responded_with_an_action(&core, deadline, 400).await;
        api.write_all(invoke("r-1", deadline).as_bytes())
            .await
            .expect("write");
        // A mark per request on any connection, in order: whether the action had ended. Each
        // request is answered with the next event once `answer` says so.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let (answer, answer_rx) = tokio::sync::watch::channel(false);
        let watch = {
            let ended = ended.clone();
            move |mut stream: TcpStream, tx: tokio::sync::mpsc::UnboundedSender<bool>| {
                let ended = ended.clone();
                let mut answer = answer_rx.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    // One read per request: each is one small write.
                    while let Ok(n) = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await {
                        if n == 0 {
                            break;
                        }
                        let _ = tx.send(ended.load(std::sync::atomic::Ordering::SeqCst));
                        let _ = answer.wait_for(|a| *a).await;
                        let next = invoke("r-2", SystemTime::now() + Duration::from_secs(10));
                        if stream.write_all(next.as_bytes()).await.is_err() {
                            break;
                        }
                    }
                });
            }
        };
        if closed {
            drop(api);
        } else {
            watch(api, tx.clone());
        }
        let accept = {
            let (tx, watch) = (tx.clone(), watch.clone());
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    watch(stream, tx.clone());
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(restore_after)).await;
        // The hook's own path: announce, wait until settled.
        let announce = || {
            let hook = crate::snapstart::SnapStartHook::new(core.clone(), restores.clone());
            tokio::spawn(async move {
                lambda_runtime::SnapStartResource::after_restore(&hook)
                    .await
                    .is_ok()
            })
        };
        let first = announce();
        let second = twice.then(announce);
        assert!(first.await.expect("hook"));
        if let Some(second) = second {
            assert!(second.await.expect("hook"));
        }
        let seen = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("{case}: no event/next after the phase"))
            .expect("seen");
        assert!(seen, "{case}: event/next went out while the phase ran");
        // Past the probe window: the call that went out must still be the chain's.
        assert!(
            tokio::time::timeout(Duration::from_millis(500), rx.recv())
                .await
                .is_err(),
            "{case}: a second event/next"
        );
        answer.send_replace(true);
        tokio::time::timeout(
            Duration::from_secs(3),
            core.state.subscribe().wait_for(|s| {
                s.slot
                    .as_ref()
                    .is_some_and(|slot| slot.event.request_id == "r-2")
            }),
        )
        .await
        .unwrap_or_else(|_| panic!("{case}: the next event never reached the chain"))
        .expect("state");
        accept.abort();
    }
    /// A SHUTDOWN event on the chain (internal extensions cannot subscribe to it, but should
    /// one come): the chain stops, bounded, without another `event/next`; later invocations
    /// run their work inline.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_shutdown_event_stops_the_chain() {
        let (core, _listener, mut api) = chain().await;
        api.write_all(
            with_length(r#"{"eventType":"SHUTDOWN","shutdownReason":"SPINDOWN","deadlineMs":1}"#)
                .as_bytes(),
        )
        .await
        .expect("write");
        tokio::time::timeout(
            Duration::from_secs(5),
            core.state
                .subscribe()
                .wait_for(|s| s.chain == Chain::Stopped),
        )
        .await
        .expect("stopped")
        .expect("state");
        assert!(
            request_within(&mut api, Duration::from_millis(800))
                .await
                .is_none(),
            "event/next after SHUTDOWN"
        );
        let invocation = crate::context::Invocation {
            request_id: "r-1".into(),
            deadline: Some(SystemTime::now() + Duration::from_secs(4)),
        };
        assert_eq!(core.begin(&invocation), Ticket::Inline);
    }

    /// The chain's `event/next` keeps failing (the backoff at its longest, 1 s), then a
    /// SnapStart restore: it ends the backoff, the hook returns at once, and exactly one call
    /// goes out, on a fresh connection, which brings the next event.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restore_while_backing_off_sends_one_call_at_once() {
        let restores = Restores::new();
        let (core, listener, mut api) = chain_watching(true, restores.clone()).await;
        let failed = with_status(
            "500 Internal Server Error",
            r#"{"errorMessage":"down","errorType":"Unknown"}"#,
        );
        api.write_all(failed.as_bytes()).await.expect("write");
        for _ in 0..7 {
            request_within(&mut api, Duration::from_secs(5))
                .await
                .expect("a retry");
            api.write_all(failed.as_bytes()).await.expect("write");
        }
        // Ordering only: the last failure read, its 1 s backoff begun.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = std::time::Instant::now();
        let hook = crate::snapstart::SnapStartHook::new(core.clone(), restores);
        lambda_runtime::SnapStartResource::after_restore(&hook)
            .await
            .expect("never fails");
        let mut fresh = accept_within(&listener, "a fresh connection").await;
        request_within(&mut fresh, Duration::from_secs(5))
            .await
            .expect("the call");
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "the call went out {:?} after the restore",
            started.elapsed()
        );
        // The old connection is closed by the reset, or silent.
        let mut byte = [0u8; 1];
        let old = tokio::time::timeout(
            Duration::from_millis(300),
            tokio::io::AsyncReadExt::read(&mut api, &mut byte),
        )
        .await;
        assert!(
            !matches!(old, Ok(Ok(n)) if n > 0),
            "a call on the old connection too"
        );
        let deadline = SystemTime::now() + Duration::from_secs(10);
        fresh
            .write_all(invoke("r-1", deadline).as_bytes())
            .await
            .expect("write");
        tokio::time::timeout(
            Duration::from_secs(3),
            core.state.subscribe().wait_for(|s| {
                s.slot
                    .as_ref()
                    .is_some_and(|slot| slot.event.request_id == "r-1")
            }),
        )
        .await
        .expect("the event reached the chain")
        .expect("state");
    }
}
