//! SnapStart: keeping the chained `event/next` alive across a snapshot and its restore.
//!
//! # What happens around a snapshot
//!
//! With SnapStart (`AWS_LAMBDA_INITIALIZATION_TYPE=snap-start`) lambda_runtime 1.5 ends init
//! with `GET /2018-06-01/runtime/restore/next` instead of the first `invocation/next`: it runs
//! the `before_snapshot` hooks (LIFO), calls `/restore/next` (which blocks while Lambda takes
//! the snapshot and answers only after a restore), calls `reset_pool()` on its own API client
//! ("Stale connections to RAPID won't survive the snapshot"), then runs the `after_restore`
//! hooks (FIFO) before its first `invocation/next`; an `after_restore` error is reported to
//! `/restore/error` and ends the runtime (lambda_runtime 1.5.0, `runtime.rs`,
//! `run_restore_lifecycle`; `snapstart.rs`, `SnapStartResource`).
//!
//! Lambda takes the snapshot once init is complete, and init completes only when the runtime
//! waits in `/restore/next` *and* every extension waits in `event/next` (Runtime Interface
//! Emulator, `rapid/handlers.go`, `doRuntimeDomainInit`: `AwaitRuntimeRestoreReady`, then
//! `AwaitAgentsReady`). So the chain's first `event/next` is always in flight across the
//! snapshot.
//!
//! # What can happen to that call
//!
//! Whether a connection to the Runtime API that is open at snapshot time still works after the
//! restore is not documented. The evidence says it does: the runtime's own `/restore/next` is
//! such a call, and Lambda answers it after the restore (RIE `handleRestore` releases the
//! runtime, and its `RestoreRenderer` writes the 200 to that pending request); an extension's
//! pending `event/next` is released by the first invoke (`doInvoke`, `agent.Release()`), and
//! extensions with no restore handling at all (the Datadog extension's plain `event/next`
//! loop) run under SnapStart. lambda_runtime nevertheless rebuilds its pool, and a connection
//! that died would leave the chain waiting forever on a call nobody answers: the first
//! invocation after the restore would then wait for its INVOKE event, run its work inline and
//! hold the environment until its deadline. So the chain assumes neither:
//!
//! - [`SnapStartHook::after_restore`] bumps a restore counter and waits (at most
//!   [`SETTLE_TIMEOUT`]) until the chain has settled it, so the runtime asks for its first
//!   invocation only once the chain is in a known state;
//! - the chain resets the extension client's pool and sends a *probe*: a fresh `event/next`,
//!   while the pre-snapshot call is kept;
//! - if Lambda still holds the pre-snapshot call, the probe is refused at once with 403
//!   `Extension.InvalidExtensionState` (a second `next` from an extension that already waits
//!   is a state error: RIE `core/internalagent_states.go`, `Ready()` is allowed only from the
//!   Registered and Running states; `rapi/handler/agentnext.go`). The chain keeps the old call,
//!   which gets the first INVOKE event if its connection survived: nothing was lost. Lambda
//!   refuses the probe just the same when that connection is dead (an extension whose pending
//!   call lost its client stays Ready), and then writes the first INVOKE event to the dead
//!   call, where it is lost. So once an invocation has run its deferred work without its
//!   event (`Core::event_missed`), a kept call is taken for dead and abandoned, and the chain's
//!   retry, which Lambda accepts by then, replaces it ([`RestoreWatch::next_event_watching`]);
//! - if the pre-snapshot call fails (its connection was closed), the probe is the call (Lambda
//!   refuses it, too, while it still counts the closed call: the chain's retry path then takes
//!   over, and the first INVOKE event, written to the closed call, is taken as lost);
//! - if neither answers within [`PROBE_WINDOW`], the pre-snapshot call is taken for dead
//!   (a silently dropped connection) and abandoned: the probe, which Lambda accepted, is the
//!   one call in flight.
//!
//! The probe never competes with a live call for an event: no invocation can be dispatched
//! before the runtime's first `invocation/next`, which lambda_runtime makes only after every
//! `after_restore` hook has returned (RIE `handleRestore`: `AwaitRuntimeReadyWithDeadline`).
//! Should a refusal take longer than the window, the live call is dropped and the probe's
//! late refusal sends the chain to its retry path: the first invocation then runs its work
//! inline (slower, nothing lost) and the chain re-arms once Lambda has released the dropped
//! call. A closed pre-snapshot call may also fail before the hook runs, and goes the same
//! retry path (one warning), cut short by the restore.
//!
//! An extension that only acknowledges events (`late.rs`) holds nothing, and nothing tells it
//! that a kept call is dead: when its probe is refused it drops the pre-snapshot call and
//! retries until Lambda accepts ([`RestoreWatch::next_event`]).
//!
//! `before_snapshot` flushes what init produced, so that every environment restored from the
//! snapshot does not export it again. It leaves the chain's `event/next` alone: that call must
//! stay in flight across the snapshot (without it init would not complete), and no
//! invocation, so no deferred work, has run yet when the snapshot is taken.

use std::future::Future;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use lambda_runtime::{BoxFuture, Error, SnapStartResource};
use tokio::sync::{Notify, watch};

use crate::core::Core;
use crate::extension::{ClientError, NextEvent};

/// How long the probe may stay unanswered before the pre-snapshot `event/next` is taken for
/// dead. A refusal of the probe takes one loopback round trip; the window only delays the
/// restore when the pre-snapshot call is dead and silent.
pub(crate) const PROBE_WINDOW: Duration = Duration::from_millis(200);

/// How long `after_restore` waits for the chain to settle a restore. Lambda gives the restore
/// hooks 10 s ("SnapStart runtime hooks": `SnapStartTimeoutException`).
pub(crate) const SETTLE_TIMEOUT: Duration = Duration::from_secs(1);

/// The longest the flush before the snapshot may take, and again the wait for a flush it
/// abandoned: `before_snapshot` ends within twice this, whatever `flush_timeout` says. Under
/// SnapStart, init, this hook included, must end within 130 s or the function's timeout if
/// longer (AWS, "Lambda SnapStart runtime hooks"); the function's timeout is not known here,
/// and the init code before the hook counts too. A hook past that fails init, and with it
/// the snapshot; capped, the worst is init's telemetry exported by every
/// restored environment (which the hook then warns of). A flush of init's telemetry that
/// takes this long is a stalled exporter.
pub(crate) const SNAPSHOT_FLUSH_LIMIT: Duration = Duration::from_secs(30);

/// The restores of this process, as the `after_restore` hook announces them and the chain
/// settles them.
#[derive(Debug)]
pub(crate) struct Restores {
    /// How many restores were announced.
    announced: watch::Sender<u64>,
    /// The last restore the chain has settled.
    settled: watch::Sender<u64>,
}

static GLOBAL: LazyLock<Arc<Restores>> = LazyLock::new(Restores::new);

impl Restores {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            announced: watch::Sender::new(0),
            settled: watch::Sender::new(0),
        })
    }

    /// The restores of this process (the chain of `Deferred::start` watches these).
    pub(crate) fn global() -> Arc<Self> {
        GLOBAL.clone()
    }

    /// What the chain watches, with every restore announced so far counted as seen.
    pub(crate) fn watch(self: &Arc<Self>) -> RestoreWatch {
        let rx = self.announced.subscribe();
        let seen = *rx.borrow();
        RestoreWatch {
            restores: self.clone(),
            rx,
            seen,
        }
    }

    /// Whether anything (the chain) watches the restores: otherwise nobody holds a call across
    /// the snapshot and nobody would settle a restore.
    fn watched(&self) -> bool {
        self.announced.receiver_count() > 0
    }

    /// Announces a restore; returns its number.
    fn announce(&self) -> u64 {
        let mut number = 0;
        self.announced.send_modify(|n| {
            *n += 1;
            number = *n;
        });
        number
    }

    fn settle(&self, number: u64) {
        self.settled.send_if_modified(|n| {
            let newer = number > *n;
            if newer {
                *n = number;
            }
            newer
        });
    }

    /// Waits until restore `number` is settled, at most `timeout`; false on timeout.
    async fn settled(&self, number: u64, timeout: Duration) -> bool {
        let mut rx = self.settled.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|n| *n >= number))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// The chain's view of the restores.
#[derive(Debug)]
pub(crate) struct RestoreWatch {
    restores: Arc<Restores>,
    rx: watch::Receiver<u64>,
    /// The last restore the chain has acted on.
    seen: u64,
}

/// How a probe race ended.
enum Race<T> {
    /// The answer for the chain (an event, or an error for its retry path).
    Done(Result<NextEvent, ClientError>),
    /// Lambda refused the probe (with this error): it still counts the pre-snapshot call,
    /// alive or dead.
    KeepOld(ClientError),
    /// The pre-snapshot call is dead: the probe is the call in flight.
    Replace(T),
}

impl RestoreWatch {
    /// Waits until a restore newer than the last one acted on is announced; returns its
    /// number (without marking it seen). Cancel-safe.
    pub(crate) async fn changed(&mut self) -> u64 {
        loop {
            let number = *self.rx.borrow_and_update();
            if number > self.seen {
                return number;
            }
            if self.rx.changed().await.is_err() {
                // The sender lives in a static (or in the test that made it): never here.
                std::future::pending::<()>().await;
            }
        }
    }

    /// `GET event/next` through `call`, across SnapStart restores, for an extension that only
    /// acknowledges events (`late.rs`): when a restore is announced while the call is in
    /// flight, `reset_pool` is called and a fresh call races the old one (see the module docs).
    /// Exactly one call is in flight, except during a probe race.
    ///
    /// Unlike the chain's [`next_event_watching`](Self::next_event_watching), a refused probe
    /// does not keep the old call: nothing would tell this extension that a kept call is dead
    /// (no invocation misses an event it holds), and a dead one would hold the first invocation
    /// after the restore to its deadline. It holds nothing, so the event a live old call would
    /// have brought is not missed: the refusal goes to the caller's retry path, whose calls
    /// Lambda refuses until it has written the first INVOKE event to the old call, and then
    /// accepts.
    pub(crate) async fn next_event<F, Fut>(
        &mut self,
        call: F,
        reset_pool: impl Fn(),
    ) -> Result<NextEvent, ClientError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<NextEvent, ClientError>>,
    {
        // The pool cannot tell whether the request is out: taken as out, it is raced.
        let reset_pool = || {
            reset_pool();
            true
        };
        self.next_event_across(call, reset_pool, &Notify::new(), false)
            .await
    }

    /// [`next_event`](Self::next_event), for the chain: `missed` is notified when an
    /// invocation ran its deferred work outside the chain because its INVOKE event never
    /// came. A call kept across a restore because the probe was refused is then abandoned
    /// (an error, for the chain's retry path): Lambda refuses the probe whether the kept
    /// call's connection is alive or dead (RAPID keeps an extension whose pending call lost
    /// its client in state Ready: `core/internalagent_states.go`), and a dead one took the
    /// first INVOKE event with it (`rapid/handlers.go`, `doInvoke`: `agent.Release()`), after
    /// which Lambda accepts a fresh call. Kept, it would hold the environment to the deadline.
    ///
    /// `reset_pool` tells whether the call's request was out when it reset the pool: one not
    /// out yet (a restore while a phase runs, not something Lambda does) is not raced but
    /// replaced by a fresh call, which sends its request once the phase arms it.
    pub(crate) async fn next_event_watching<F, Fut>(
        &mut self,
        call: F,
        reset_pool: impl Fn() -> bool,
        missed: &Notify,
    ) -> Result<NextEvent, ClientError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<NextEvent, ClientError>>,
    {
        self.next_event_across(call, reset_pool, missed, true).await
    }

    /// [`next_event_watching`](Self::next_event_watching); with `keep` false, a call that a
    /// refused probe would keep is abandoned at once (for [`next_event`](Self::next_event)).
    async fn next_event_across<F, Fut>(
        &mut self,
        mut call: F,
        reset_pool: impl Fn() -> bool,
        missed: &Notify,
        keep: bool,
    ) -> Result<NextEvent, ClientError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<NextEvent, ClientError>>,
    {
        // Created up front: a notification while the loop is between selects still counts.
        let missed = missed.notified();
        tokio::pin!(missed);
        let mut kept = false;
        // A restore announced while no call was in flight (the chain was holding an event or
        // backing off): there is nothing to abandon, the next call goes out on a fresh pool.
        let pending = *self.rx.borrow_and_update();
        if pending > self.seen {
            let _ = reset_pool();
            self.seen = pending;
            self.restores.settle(pending);
        }
        let mut current = Box::pin(call());
        loop {
            tokio::select! {
                biased;
                result = &mut current => return result,
                () = &mut missed, if kept => {
                    tracing::warn!(target: "deferred", "SnapStart restore: the event/next kept across it brought no INVOKE event for the invocation that ran; taken for dead (its connection did not survive) and replaced");
                    return Err(ClientError::Transport(
                        "event/next: the call kept across the SnapStart restore is dead".into(),
                    ));
                }
                // Under Lambda's protocol this runs once per process, before any invocation:
                // the snapshot is taken at the end of init, lambda_runtime runs the
                // `after_restore` hooks once, before its loop (`run_restore_lifecycle`), and its
                // first `invocation/next` follows them. So no phase has run or armed a call: the
                // call here is the pre-snapshot one, its request out (init completes only once
                // Lambda has it), and the probe is the one second request, by design; or a
                // retry after that call failed, not out yet, which is replaced. A restore during
                // a phase (one that has just armed, say) is not something Lambda does; should
                // one come, a request out is raced the same way (Lambda refuses the probe while
                // it counts that call), and one not out yet is replaced, not raced.
                number = self.changed() => {
                    let out = reset_pool();
                    self.seen = number;
                    // A call kept across an earlier restore has its request out, whatever the
                    // refused probe's answer made the pool think.
                    if !out && !kept {
                        // Nothing to race: the old call only waits to send, or reads a stale
                        // connection with no request on it. A probe would wait to send as
                        // well, and the window would abandon whichever call had sent by then.
                        current = Box::pin(call());
                        self.restores.settle(number);
                        continue;
                    }
                    match self.race(&mut current, &mut call).await {
                        Race::Done(result) => return result,
                        Race::KeepOld(_) if keep => {
                            tracing::info!(target: "deferred", "SnapStart restore: Lambda still counts the event/next in flight at the snapshot as waiting (the fresh call was refused); the chain keeps it, and replaces it should it bring no event for an invocation that ran");
                            kept = true;
                        }
                        Race::KeepOld(refused) => {
                            tracing::info!(target: "deferred", "SnapStart restore: Lambda still counts the event/next in flight at the snapshot as waiting (the fresh call was refused); the acknowledging extension does not keep it (it may be dead), and calls again until Lambda accepts");
                            return Err(refused);
                        }
                        Race::Replace(probe) => {
                            kept = false;
                            current = probe;
                        }
                    }
                }
            }
        }
    }

    /// Sends the probe and decides which call survives; settles the restore either way.
    async fn race<F, Fut>(
        &mut self,
        old: &mut std::pin::Pin<Box<Fut>>,
        call: &mut F,
    ) -> Race<std::pin::Pin<Box<Fut>>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<NextEvent, ClientError>>,
    {
        let mut probe = Box::pin(call());
        let window = tokio::time::sleep(PROBE_WINDOW);
        tokio::pin!(window);
        let race = loop {
            tokio::select! {
                biased;
                result = &mut probe => break match result {
                    // Said by the caller, which keeps the old call or not.
                    Err(error) if error.is_already_waiting() => Race::KeepOld(error),
                    // An event (the old call was dead), or an error for the retry path (the
                    // old call, dead or not, is dropped with this race).
                    other => Race::Done(other),
                },
                result = &mut *old => break match result {
                    // It cannot come before the runtime's first `next` (see the module
                    // docs), so the probe was refused or is still on its way.
                    Ok(event) => Race::Done(Ok(event)),
                    Err(error) => {
                        tracing::info!(target: "deferred", %error, "SnapStart restore: the event/next in flight at the snapshot failed; a fresh one replaces it");
                        Race::Replace(probe)
                    }
                },
                () = &mut window => {
                    tracing::info!(target: "deferred", window = ?PROBE_WINDOW, "SnapStart restore: the event/next in flight at the snapshot is silent; abandoned for a fresh one");
                    break Race::Replace(probe);
                }
                // Another restore meanwhile (not something Lambda does): settle it with this one.
                number = self.changed() => self.seen = number,
            }
        };
        self.restores.settle(self.seen);
        race
    }
}

/// The SnapStart resource of lambda-deferred: see [`crate::DeferredHandle::snapstart_resource`].
pub(crate) struct SnapStartHook {
    core: Arc<Core>,
    restores: Arc<Restores>,
}

impl std::fmt::Debug for SnapStartHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapStartHook")
            .field("mode", &self.core.mode)
            .finish_non_exhaustive()
    }
}

impl SnapStartHook {
    pub(crate) fn new(core: Arc<Core>, restores: Arc<Restores>) -> Self {
        Self { core, restores }
    }
}

impl SnapStartResource for SnapStartHook {
    /// Flushes what init produced, so it is exported once, not once by every environment
    /// restored from the snapshot (each restored copy would otherwise find the same spans in
    /// its batch processor). Bounded by `flush_timeout`, then up to one more for a flush it
    /// abandoned to return (one still running would resume in every restored copy), each at
    /// most [`SNAPSHOT_FLUSH_LIMIT`] (init's time limit); never fails. The chain's
    /// `event/next` stays as it is: it must be in flight when the snapshot is taken (init is
    /// complete only then), and no deferred work exists before the first invocation.
    fn before_snapshot(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let flushers = &self.core.config.flushers;
            if flushers.is_empty() {
                return Ok(());
            }
            let timeout = self.core.config.flush_timeout.min(SNAPSHOT_FLUSH_LIMIT);
            let now = tokio::time::Instant::now();
            let end = now + timeout;
            let mut cut = Vec::new();
            let flushes = crate::phase::run_flushes(flushers, end, now, &mut cut).await;
            let failed: Vec<_> = flushes
                .iter()
                .filter(|f| f.outcome != crate::report::FlushOutcome::Ok)
                .map(|f| format!("{}: {:?}", f.name, f.outcome))
                .collect();
            if failed.is_empty() {
                tracing::debug!(target: "deferred", "SnapStart: init's telemetry flushed before the snapshot");
            } else {
                tracing::warn!(target: "deferred", ?failed, "SnapStart: flush before the snapshot did not succeed; what init buffered may be exported by every restored environment");
            }
            // A flush abandoned at `flush_timeout` would cross the snapshot and resume in every
            // restored environment (re-exporting init's telemetry, on a connection from before
            // the snapshot): give it one more `flush_timeout` to return, within init's limit
            // (see `SNAPSHOT_FLUSH_LIMIT`).
            let grace = tokio::time::Instant::now() + timeout;
            for flusher in flushers {
                flusher.wait_returned(grace).await;
            }
            let running: Vec<_> = flushers
                .iter()
                .filter(|f| f.is_busy())
                .map(|f| f.name.to_string())
                .collect();
            if !running.is_empty() {
                tracing::warn!(target: "deferred", ?running, "SnapStart: a flush abandoned before the snapshot still runs; it resumes in every restored environment");
            }
            // Said here, once: left to the first report after a restore, every restored
            // environment would report the same loss (and the same drops).
            let lost = self.core.settle_lost();
            if lost > 0 {
                tracing::warn!(target: "deferred", spans_lost = lost, "SnapStart: {lost} spans of init were lost before the snapshot (their export failed)");
            }
            let dropped = self.core.settle_dropped();
            if dropped > 0 {
                tracing::warn!(target: "deferred", spans_dropped = dropped, "SnapStart: {dropped} spans of init were dropped before the snapshot (the batch processor's queue was full)");
            }
            Ok(())
        })
    }

    /// Has the chain reset its pool and re-establish its `event/next`, and waits (bounded)
    /// until it has. Never fails: an error here would end the runtime, and the worst the chain
    /// can do is to fall back to running deferred work inline.
    fn after_restore(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            // Nothing watches (no chain, or it stopped; no acknowledging extension either):
            // nothing holds a call across the snapshot.
            if !self.restores.watched() {
                return Ok(());
            }
            let number = self.restores.announce();
            if !self.restores.settled(number, SETTLE_TIMEOUT).await {
                tracing::warn!(target: "deferred", timeout = ?SETTLE_TIMEOUT, "SnapStart restore: the chain did not re-establish its event/next in time; it goes on in the background");
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::sync::oneshot;

    use super::*;
    use crate::core::tests::{counted_core, inline_job};
    use crate::core::{Config, Mode};
    use crate::extension::decode_event;

    type Answer = Result<NextEvent, ClientError>;

    /// A flush that overruns `flush_timeout` before the snapshot is waited for (one more
    /// `flush_timeout`), so it does not cross the snapshot into every restored environment.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flush_abandoned_before_the_snapshot_is_waited_for() {
        let flusher = crate::flush::Flusher::new(crate::flush_fn("slow", || {
            std::thread::sleep(Duration::from_millis(600));
            Ok::<(), String>(())
        }));
        let core = Core::new(
            Config {
                flushers: vec![flusher.clone()],
                // Abandoned at 500 ms, back at 600 ms, waited for until 1 s: 400 ms of slack.
                flush_timeout: Duration::from_millis(500),
                phase_telemetry: false,
                ..Config::default()
            },
            Mode::Extension,
        );
        let hook = SnapStartHook::new(core, Restores::new());
        hook.before_snapshot().await.expect("never fails");
        assert!(
            !flusher.is_busy(),
            "the abandoned flush returned before the snapshot"
        );
    }

    /// A long `flush_timeout` (15 minutes) and a flush that never returns: the hook still ends
    /// within twice [`SNAPSHOT_FLUSH_LIMIT`], inside the 130 s that init, this hook included,
    /// may take under SnapStart. Found by review: it took 2 x `flush_timeout` (30 minutes),
    /// and init past its limit fails, with no snapshot.
    #[tokio::test(start_paused = true)]
    async fn the_flush_before_the_snapshot_ends_within_inits_limit() {
        let (release, stuck) = std::sync::mpsc::channel::<()>();
        let stuck = Mutex::new(stuck);
        let flusher = crate::flush::Flusher::new(crate::flush_fn("stuck", move || {
            // Until the test ends (the runtime waits for its blocking threads).
            let _ = stuck.lock().expect("stuck").recv();
            Ok::<(), String>(())
        }));
        let core = Core::new(
            Config {
                flushers: vec![flusher.clone()],
                flush_timeout: crate::phase::MAX_FUNCTION_TIMEOUT,
                phase_telemetry: false,
                ..Config::default()
            },
            Mode::Extension,
        );
        let hook = Arc::new(SnapStartHook::new(core, Restores::new()));
        let started = tokio::time::Instant::now();
        let snapshot = tokio::spawn({
            let hook = hook.clone();
            async move { hook.before_snapshot().await.is_ok() }
        });
        // The flush runs on a blocking thread, which stops the paused clock's auto-advance:
        // moved by hand, a second at a time, for up to 3 minutes.
        for _ in 0..180 {
            if snapshot.is_finished() {
                break;
            }
            tokio::time::advance(Duration::from_secs(1)).await;
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
        }
        let took = started.elapsed();
        assert!(snapshot.is_finished(), "still running after {took:?}");
        assert!(snapshot.await.expect("hook"), "never fails");
        assert!(
            took <= 2 * SNAPSHOT_FLUSH_LIMIT + Duration::from_secs(2),
            "before_snapshot took {took:?}"
        );
        assert!(flusher.is_busy(), "the flush is abandoned, not returned");
        drop(release);
    }

    /// Spans lost before the snapshot are said by the snapshot's hook, once, not by the first
    /// report of every environment restored from it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spans_lost_before_the_snapshot_are_not_reported_by_every_restore() {
        let counts = Arc::new(crate::ExportCounts::default());
        let core = counted_core(
            vec![crate::flush::Flusher::new(crate::flush_fn("f", || {
                Ok::<(), String>(())
            }))],
            counts.clone(),
        );
        counts.count_lost(3);
        let hook = SnapStartHook::new(core.clone(), Restores::new());
        hook.before_snapshot().await.expect("never fails");
        let report = core
            .run_phase(inline_job("r-1"), crate::report::PhaseKind::Inline)
            .await;
        assert_eq!(report.spans_lost, Some(0), "{report}");
        // A loss after the snapshot is reported as usual.
        counts.count_lost(2);
        assert_eq!(core.settle_lost(), 2);
    }

    /// A batch processor whose queue is always full: it drops every span.
    #[derive(Debug)]
    struct QueueFull;

    impl opentelemetry_sdk::trace::SpanProcessor for QueueFull {
        fn on_start(&self, _: &mut opentelemetry_sdk::trace::Span, _: &opentelemetry::Context) {}
        fn on_end(&self, _: opentelemetry_sdk::trace::SpanData) {}
        fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
            Ok(())
        }
        fn shutdown_with_timeout(&self, _: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
            Ok(())
        }
    }

    /// Spans dropped before the snapshot (init overflowed the batch processor's queue) are
    /// said by the snapshot's hook, once, as lost ones are. Found by review: the first clean
    /// report of every environment restored from the snapshot counted them again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spans_dropped_before_the_snapshot_are_not_reported_by_every_restore() {
        use opentelemetry::trace::{Tracer as _, TracerProvider as _};

        let counts = Arc::new(crate::ExportCounts::default());
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_span_processor(crate::CountingSpanProcessor::new(QueueFull, counts.clone()))
            .build();
        let core = counted_core(
            vec![crate::flush::Flusher::new(provider.clone())],
            counts.clone(),
        );
        let tracer = provider.tracer("init");
        for _ in 0..3 {
            tracer.in_span("init", |_| {});
        }
        let hook = SnapStartHook::new(core.clone(), Restores::new());
        hook.before_snapshot().await.expect("never fails");
        let report = core
            .run_phase(inline_job("r-1"), crate::report::PhaseKind::Inline)
            .await;
        assert_eq!(report.spans_dropped, Some(0), "{report}");
        // A drop after the snapshot is reported as usual.
        tracer.in_span("invocation", |_| {});
        let report = core
            .run_phase(inline_job("r-2"), crate::report::PhaseKind::Inline)
            .await;
        assert_eq!(report.spans_dropped, Some(1), "{report}");
    }

    /// Stand-in `event/next` calls: each call registers a sender the test answers through;
    /// a dropped call shows as a closed sender.
    #[derive(Clone, Default)]
    struct Calls(Arc<Mutex<Vec<oneshot::Sender<Answer>>>>);

    impl Calls {
        fn call(&self) -> impl Future<Output = Answer> + use<> {
            let (tx, rx) = oneshot::channel();
            self.0.lock().expect("calls").push(tx);
            async move {
                match rx.await {
                    Ok(answer) => answer,
                    // Never answered: a call nobody will answer, like a dead connection.
                    Err(_) => std::future::pending().await,
                }
            }
        }

        fn count(&self) -> usize {
            self.0.lock().expect("calls").len()
        }

        fn dropped(&self, i: usize) -> bool {
            self.0.lock().expect("calls")[i].is_closed()
        }

        fn answer(&self, i: usize, answer: Answer) {
            let tx = std::mem::replace(&mut self.0.lock().expect("calls")[i], oneshot::channel().0);
            let _ = tx.send(answer);
        }

        async fn wait_for(&self, n: usize) {
            while self.count() < n {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }

    fn invoke(request_id: &str) -> Answer {
        let body = format!(
            r#"{{"eventType":"INVOKE","deadlineMs":1700000003000,"requestId":"{request_id}"}}"#
        );
        decode_event(body.as_bytes())
    }

    fn request_id(answer: Answer) -> String {
        match answer.expect("an event") {
            NextEvent::Invoke(invoke) => invoke.request_id,
            other => panic!("{other:?}"),
        }
    }

    fn refused() -> Answer {
        Err(ClientError::Api {
            status: 403,
            error_type: Some("Extension.InvalidExtensionState".into()),
            message: "State transition from Ready to Ready failed".into(),
        })
    }

    /// Runs `next_event` on a task; returns its handle and the number of pool resets.
    fn spawn_next(
        restores: &Arc<Restores>,
        calls: &Calls,
    ) -> (tokio::task::JoinHandle<Answer>, Arc<AtomicUsize>) {
        let mut watch = restores.watch();
        let resets = Arc::new(AtomicUsize::new(0));
        let (calls, counter) = (calls.clone(), resets.clone());
        let task = tokio::spawn(async move {
            watch
                .next_event_watching(
                    || calls.call(),
                    || {
                        counter.fetch_add(1, Ordering::SeqCst);
                        true
                    },
                    &Notify::new(),
                )
                .await
        });
        (task, resets)
    }

    /// An acknowledging extension (`late.rs`, [`RestoreWatch::next_event`]) does not keep the
    /// pre-snapshot call when the probe is refused: nothing would tell it that the call is
    /// dead, and a dead one would hold the first invocation to its deadline. The refusal goes
    /// to its retry path, with the old call dropped. (Before, it kept the call for good.)
    #[tokio::test(start_paused = true)]
    async fn an_acknowledging_extension_does_not_keep_a_call_the_probe_found_counted() {
        let (restores, calls) = (Restores::new(), Calls::default());
        let mut watch = restores.watch();
        let task = {
            let calls = calls.clone();
            tokio::spawn(async move { watch.next_event(|| calls.call(), || {}).await })
        };
        calls.wait_for(1).await;
        let number = restores.announce();
        calls.wait_for(2).await;
        calls.answer(1, refused());
        assert!(restores.settled(number, Duration::from_secs(5)).await);
        let answer = tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("the refusal is the answer, not a wait on the old call")
            .expect("task");
        assert!(answer.is_err_and(|e| e.is_already_waiting()));
        assert!(calls.dropped(0), "the old call is abandoned");
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_restore_the_one_call_is_answered() {
        let (restores, calls) = (Restores::new(), Calls::default());
        let (task, resets) = spawn_next(&restores, &calls);
        calls.wait_for(1).await;
        calls.answer(0, invoke("req-1"));
        assert_eq!(request_id(task.await.expect("task")), "req-1");
        assert_eq!((calls.count(), resets.load(Ordering::SeqCst)), (1, 0));
    }

    /// Lambda still holds the pre-snapshot call: the probe is refused, the old call is kept
    /// and gets the first event, and the restore is settled at once (no window).
    #[tokio::test(start_paused = true)]
    async fn a_surviving_call_is_kept_when_the_probe_is_refused() {
        let (restores, calls) = (Restores::new(), Calls::default());
        let (task, resets) = spawn_next(&restores, &calls);
        calls.wait_for(1).await;
        let started = tokio::time::Instant::now();
        let number = restores.announce();
        calls.wait_for(2).await;
        calls.answer(1, refused());
        assert!(restores.settled(number, Duration::from_secs(5)).await);
        assert!(started.elapsed() < PROBE_WINDOW, "settled by the refusal");
        assert!(!calls.dropped(0), "the old call is kept");
        calls.answer(0, invoke("req-1"));
        assert_eq!(request_id(task.await.expect("task")), "req-1");
        assert_eq!((calls.count(), resets.load(Ordering::SeqCst)), (2, 1));
    }

    /// The pre-snapshot call is silent: after the window it is abandoned and the probe is the
    /// one call in flight; it gets the first event.
    #[tokio::test(start_paused = true)]
    async fn a_silent_call_is_abandoned_after_the_window() {
        let (restores, calls) = (Restores::new(), Calls::default());
        let (task, _resets) = spawn_next(&restores, &calls);
        calls.wait_for(1).await;
        let started = tokio::time::Instant::now();
        let number = restores.announce();
        assert!(restores.settled(number, Duration::from_secs(5)).await);
        assert!(started.elapsed() >= PROBE_WINDOW);
        assert_eq!(calls.count(), 2);
        tokio::task::yield_now().await;
        assert!(calls.dropped(0), "the dead call is abandoned");
        assert!(!calls.dropped(1), "the probe is kept");
        calls.answer(1, invoke("req-1"));
        assert_eq!(request_id(task.await.expect("task")), "req-1");
    }

    /// The pre-snapshot call fails (its connection was closed): the probe replaces it at once.
    #[tokio::test(start_paused = true)]
    async fn a_failed_call_is_replaced_by_the_probe() {
        let (restores, calls) = (Restores::new(), Calls::default());
        let (task, _resets) = spawn_next(&restores, &calls);
        calls.wait_for(1).await;
        let number = restores.announce();
        calls.wait_for(2).await;
        calls.answer(0, Err(ClientError::Transport("connection closed".into())));
        assert!(restores.settled(number, Duration::from_millis(1)).await);
        calls.answer(1, invoke("req-1"));
        assert_eq!(request_id(task.await.expect("task")), "req-1");
    }

    /// A probe that fails otherwise goes to the chain's retry path (with the old call dropped).
    #[tokio::test(start_paused = true)]
    async fn a_failing_probe_is_the_chains_error() {
        let (restores, calls) = (Restores::new(), Calls::default());
        let (task, _resets) = spawn_next(&restores, &calls);
        calls.wait_for(1).await;
        restores.announce();
        calls.wait_for(2).await;
        calls.answer(1, Err(ClientError::Transport("refused".into())));
        assert!(matches!(
            task.await.expect("task"),
            Err(ClientError::Transport(_))
        ));
        assert!(calls.dropped(0));
    }

    /// A restore announced while no call was in flight: the next call goes out on a fresh
    /// pool and the restore is settled at once, with no probe.
    #[tokio::test(start_paused = true)]
    async fn a_restore_between_calls_resets_the_pool_for_the_next_one() {
        let (restores, calls) = (Restores::new(), Calls::default());
        let mut watch = restores.watch();
        let number = restores.announce();
        assert_eq!(
            watch.changed().await,
            number,
            "seen by the backoff's select"
        );
        let resets = AtomicUsize::new(0);
        let next = watch.next_event(
            || calls.call(),
            || {
                resets.fetch_add(1, Ordering::SeqCst);
            },
        );
        tokio::pin!(next);
        assert!(futures_poll_once(next.as_mut()).await.is_none());
        assert!(restores.settled(number, Duration::from_millis(1)).await);
        assert_eq!((calls.count(), resets.load(Ordering::SeqCst)), (1, 1));
        calls.answer(0, invoke("req-1"));
        assert_eq!(request_id(next.await), "req-1");
    }

    async fn futures_poll_once<F: Future + Unpin>(mut future: F) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut future).poll(cx) {
                std::task::Poll::Ready(value) => Some(value),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }

    /// `after_restore` returns once the chain has settled the restore, and never fails.
    #[tokio::test(start_paused = true)]
    async fn after_restore_waits_for_the_chain() {
        let (restores, calls) = (Restores::new(), Calls::default());
        let core = Core::new(Config::default(), Mode::Extension);
        let hook = SnapStartHook::new(core, restores.clone());
        let (_task, resets) = spawn_next(&restores, &calls);
        calls.wait_for(1).await;
        let started = tokio::time::Instant::now();
        let restored = tokio::spawn(async move { hook.after_restore().await.is_ok() });
        calls.wait_for(2).await;
        calls.answer(1, refused());
        assert!(restored.await.expect("hook"));
        assert!(started.elapsed() < PROBE_WINDOW);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
    }

    /// A chain that does not settle the restore: the hook gives up after its timeout and still
    /// succeeds. Without a chain (inline and background modes) it returns at once.
    #[tokio::test(start_paused = true)]
    async fn after_restore_is_bounded_and_harmless_without_a_chain() {
        let restores = Restores::new();
        let core = Core::new(Config::default(), Mode::Extension);
        let hook = SnapStartHook::new(core, restores.clone());
        let stuck = restores.watch();
        let started = tokio::time::Instant::now();
        assert!(hook.after_restore().await.is_ok());
        assert!(started.elapsed() >= SETTLE_TIMEOUT);
        drop(stuck);

        for mode in [Mode::Inline, Mode::Background] {
            let restores = Restores::new();
            let hook = SnapStartHook::new(Core::new(Config::default(), mode), restores.clone());
            let started = tokio::time::Instant::now();
            assert!(hook.after_restore().await.is_ok());
            assert_eq!(started.elapsed(), Duration::ZERO, "{mode:?}");
            assert_eq!(
                *restores.announced.borrow(),
                0,
                "{mode:?}: nothing announced"
            );
            assert!(hook.before_snapshot().await.is_ok());
        }
    }
}
