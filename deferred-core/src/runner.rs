//! The chain's phase thread: runs each chained phase (its actions on the runtime, its first
//! flush right on this thread), then sends the next `event/next` from here.
//!
//! Why a thread of its own: from the response to the next invocation, every hand-off between
//! threads is a wake-up on the path (and CPU). Here the layer's `responded` wakes this thread
//! once; with no actions, the flush and the request follow on the same thread. A flush cannot
//! be interrupted, so the chain's task watches it: when it overruns its end, the watchdog
//! takes the phase over and starts a fresh phase thread, which first reports the phase and
//! sends `event/next`; the stuck one exits when its flush returns
//! ([`Runner::watchdog`]). Should the OS refuse that thread, no phase is left unrun: the next
//! one tries again, or runs on the runtime's blocking pool ([`Runner::revive`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};

use tokio::sync::{Notify, OwnedMutexGuard};
use tokio::time::Instant;

use crate::core::Core;
use crate::extension::line::Line;
use crate::flush::{Flusher, NotStarted, try_spawn_blocking};
use crate::phase::{self, Budget, Running, Staged};
use crate::report::{FlushReport, PhaseKind};
use crate::scope::lock;

/// A phase for the phase thread: the job, the event it arms the next call for, and its end.
type Work = crate::core::Ready;

/// The end of a phase the watchdog took over (its report and `event/next`), for the thread
/// that replaces the retired one.
type Ending = Box<dyn FnOnce() + Send>;

/// Why a phase thread did not start, and the [`Ending`] it was to run first.
type Refused = (std::io::Error, Option<Ending>);

/// Starts an OS thread running the closure ([`os_thread`] here, the chain's own in
/// `chain.rs`); in tests, one the OS refuses.
pub(crate) type Spawner = fn(Box<dyn FnOnce() + Send>) -> std::io::Result<()>;

fn os_thread(run: Box<dyn FnOnce() + Send>) -> std::io::Result<()> {
    named_thread("deferred-phase", run)
}

/// Starts an OS thread named `name` running `run`.
pub(crate) fn named_thread(name: &str, run: Box<dyn FnOnce() + Send>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(run)
        .map(drop)
}

/// The phase thread(s) of the chain.
#[derive(Debug)]
pub(crate) struct Runner {
    handle: tokio::runtime::Handle,
    pub(crate) line: Arc<Line>,
    /// The chain's core, for a phase thread started later (the core holds the runner).
    core: Weak<Core>,
    spawner: Spawner,
    /// Phases to run, and the condition the phase thread waits on. (A mutex and a condvar
    /// rather than `std::sync::mpsc`: its receiver spins and parks more than once per
    /// message, each a context switch on the path to the next invocation.)
    queue: Mutex<Pending>,
    queued: Condvar,
    watch: Mutex<Watch>,
    /// Wakes the chain's task when a flush must be watched sooner than it planned to wake.
    pub(crate) poke: Notify,
    /// The event of the latest phase submitted, and of the latest ended (event numbers grow
    /// on the chain's line): a phase is pending while the first is the greater.
    submitted: AtomicU64,
    ended: AtomicU64,
}

/// The phases waiting for the phase thread.
#[derive(Debug, Default)]
struct Pending {
    work: VecDeque<Work>,
    /// The threads that serve the queue (or are starting to): the phase thread; none when
    /// the OS refused the watchdog's replacement (Lambda quotas: "Execution
    /// processes/threads: 1,024") until one serves it again.
    servers: usize,
}

impl Pending {
    /// A server stops serving the queue, or never started.
    fn leave(&mut self) {
        self.servers = self.servers.saturating_sub(1);
    }
}

/// What the watchdog sees, and when the chain's task plans to look next.
#[derive(Debug, Default)]
struct Watch {
    flushing: Option<Flushing>,
    chain_wakes_at: Option<Instant>,
}

impl Watch {
    /// For the phase thread whose flush has returned: its own phase back, unless the watchdog
    /// took it over. By then the slot may hold a later phase, of the thread that replaced this
    /// one (which set it just before its own flush), and that one is not this thread's to end:
    /// ending it here would arm a stale `event/next` and leave the later one unarmed, so the
    /// environment would be held to its deadline.
    fn claim(&mut self, thread: &Arc<AtomicBool>) -> Option<Flushing> {
        self.flushing.take_if(|f| Arc::ptr_eq(&f.retired, thread))
    }

    /// Whether the phase being flushed is still `thread`'s (the watchdog has not taken it).
    fn owns(&self, thread: &Arc<AtomicBool>) -> bool {
        self.flushing
            .as_ref()
            .is_some_and(|f| Arc::ptr_eq(&f.retired, thread))
    }

    /// For the watchdog: the phase whose flush has overrun its end (by `now`), taken over, its
    /// thread retired. Retired under this lock, so that thread, back from its flush, finds the
    /// phase gone and exits rather than serving the queue beside its replacement.
    fn overrun(&mut self, now: Instant) -> Option<Flushing> {
        let flushing = self.flushing.take_if(|f| now >= f.end)?;
        flushing.retired.store(true, Ordering::Release);
        Some(flushing)
    }
}

/// A chained phase done with its actions and flushes, for [`Runner::end_phase`].
struct Over {
    staged: Staged,
    flushes: Vec<FlushReport>,
    serial: OwnedMutexGuard<()>,
    seq: u64,
}

/// A phase whose first flush runs on the phase thread.
#[derive(Debug)]
struct Flushing {
    seq: u64,
    staged: Staged,
    /// The other flushers, each on its own thread.
    running: Running,
    /// The flusher on the phase thread.
    here: String,
    end: Instant,
    /// Phases do not overlap (nor the SIGTERM flush): held until the phase is reported.
    serial: OwnedMutexGuard<()>,
    /// Set when the watchdog took the phase over: the thread exits once its flush returns.
    retired: Arc<AtomicBool>,
}

impl Runner {
    /// The runner of the chain that talks on `line`; its first phase thread starts now. The
    /// phases run on `user`, the runtime the function runs on (its actions are tasks there,
    /// its flushes see it as `Handle::current()`), wherever the chain's task runs.
    pub(crate) fn start(
        core: &Arc<Core>,
        line: Arc<Line>,
        user: tokio::runtime::Handle,
    ) -> std::io::Result<Arc<Self>> {
        Self::start_with(core, line, user, os_thread)
    }

    fn start_with(
        core: &Arc<Core>,
        line: Arc<Line>,
        handle: tokio::runtime::Handle,
        spawner: Spawner,
    ) -> std::io::Result<Arc<Self>> {
        let runner = Arc::new(Self {
            handle,
            line,
            core: Arc::downgrade(core),
            spawner,
            queue: Mutex::new(Pending {
                work: VecDeque::new(),
                servers: 1,
            }),
            queued: Condvar::new(),
            watch: Mutex::new(Watch::default()),
            poke: Notify::new(),
            submitted: AtomicU64::new(0),
            ended: AtomicU64::new(0),
        });
        runner.spawn_thread()?;
        Ok(runner)
    }

    fn spawn_thread(self: &Arc<Self>) -> std::io::Result<()> {
        self.spawn_thread_after(None).map_err(|(error, _)| error)
    }

    /// Starts a phase thread that runs `first` (the end of a phase the watchdog took over)
    /// before it serves the queue; gives `first` back when the thread cannot be started.
    fn spawn_thread_after(self: &Arc<Self>, first: Option<Ending>) -> Result<(), Refused> {
        let Some(core) = self.core.upgrade() else {
            let gone = std::io::Error::other("the chain's core is gone: no phase thread to start");
            return Err((gone, first));
        };
        // The closure moves into the thread; a slot lets `first` come back when it never starts.
        let slot = Arc::new(Mutex::new(first));
        let theirs = slot.clone();
        let runner = self.clone();
        (self.spawner)(Box::new(move || {
            let first = lock(&theirs).take();
            if let Some(first) = first {
                // `end_phase` catches the hooks' panics; any other must not cost the queue
                // its server, nor must its payload's drop.
                if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(first)) {
                    phase::drop_panic(panic);
                }
            }
            runner.serve(&core, false);
        }))
        .map_err(|error| (error, lock(&slot).take()))
    }

    /// Queues the phase of event `seq`; the phase thread runs it and then arms the next call.
    pub(crate) fn submit(self: &Arc<Self>, work: Work) {
        self.submitted.fetch_max(work.seq, Ordering::AcqRel);
        let threadless = {
            let mut pending = lock(&self.queue);
            pending.work.push_back(work);
            // The server this call starts, counted now so that no other call starts one too.
            let threadless = pending.servers == 0;
            pending.servers += usize::from(threadless);
            threadless
        };
        if threadless {
            self.revive();
        } else {
            self.queued.notify_one();
        }
    }

    /// With no phase thread (the OS refused the watchdog's replacement): starts one now, or,
    /// if the OS still refuses, runs the queued phases on a thread of the runtime's blocking
    /// pool (which keeps idle threads: the flushes run there), so that none is left unrun.
    /// The server is counted already.
    fn revive(self: &Arc<Self>) {
        let Err(error) = self.spawn_thread() else {
            return;
        };
        tracing::error!(target: "deferred", %error, "cannot start a phase thread: this phase runs on a blocking thread of the runtime");
        let runner = self.clone();
        let standing_in = self
            .core
            .upgrade()
            .map(|core| to_blocking_pool(&self.handle, move || runner.serve(&core, true)));
        if !matches!(standing_in, Some(Ok(()))) {
            lock(&self.queue).leave();
            tracing::error!(target: "deferred", "no blocking thread either: this phase waits for the next phase thread");
        }
    }

    /// Runs the queued phases, one at a time: for ever on a phase thread, or until the queue
    /// is empty (`until_empty`, on a blocking thread standing in for one). Returns when the
    /// watchdog retired it, unless no other thread took its place.
    fn serve(self: &Arc<Self>, core: &Arc<Core>, until_empty: bool) {
        let retired = Arc::new(AtomicBool::new(false));
        loop {
            let work = {
                let mut pending = lock(&self.queue);
                loop {
                    if let Some(work) = pending.work.pop_front() {
                        break work;
                    }
                    if until_empty {
                        pending.leave();
                        return;
                    }
                    pending = self
                        .queued
                        .wait(pending)
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                }
            };
            let seq = work.seq;
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.run(core, work, &retired);
            }));
            if let Err(panic) = ran {
                // A panic out of the phase's own code (`finish` catches the `on_report`
                // hook's): the chain goes on, whatever its payload does when dropped.
                phase::drop_panic(panic);
                tracing::error!(target: "deferred", "a chained phase panicked; the chain goes on");
                drop(lock(&self.watch).claim(&retired));
                self.ended.fetch_max(seq, Ordering::AcqRel);
                self.line.arm(seq);
            }
            if retired.load(Ordering::Acquire) && !self.resume(&retired) {
                return;
            }
        }
    }

    /// For a retired thread back from its flush: whether it serves the queue again, because
    /// no other thread does (the OS refused its replacement).
    fn resume(&self, retired: &AtomicBool) -> bool {
        let mut pending = lock(&self.queue);
        if pending.servers > 0 {
            return false;
        }
        pending.servers = 1;
        retired.store(false, Ordering::Release);
        true
    }

    /// Runs one chained phase, reports it, and arms the next `event/next`. The first flush
    /// runs outside `block_on`: within it the thread counts as the runtime's own, and tokio
    /// panics at a flush that waits on async work there (`Handle::block_on`, `blocking_recv`),
    /// which [`Flush`](crate::Flush) allows ("a thread where blocking is fine").
    ///
    /// The phase's end (its report, the `on_report` hook) runs outside `block_on` too, in the
    /// runtime's context, whether or not a half of the phase had to wait: `complete` hands a
    /// half to `block_on` only when it is pending, and a hook that blocks on async work would
    /// otherwise work for one phase and panic for the next.
    fn run(&self, core: &Arc<Core>, work: Work, retired: &Arc<AtomicBool>) {
        let (first, end, phase_started) =
            match complete(&self.handle, self.begin(core, work, retired)) {
                Ok(flushing) => flushing,
                Err(over) => return self.end_here(core, over),
            };
        // Checked again: the end may have passed since `begin` looked (a loaded machine). And
        // claimed under the lock the watchdog takes the phase over with at its end: the flush
        // either starts before the take-over (which then abandons it, as it should), or not at
        // all, rather than after the watchdog has reported it and released the environment.
        let claim = {
            let watch = lock(&self.watch);
            (watch.owns(retired) && Instant::now() < end).then(|| first.claim())
        };
        let report = claim.map(|claim| {
            // The runtime's context, as on its blocking threads: `Handle::current()` works.
            let _runtime = self.handle.enter();
            phase::flush_here(first, claim, end, phase_started)
        });
        let over = complete(
            &self.handle,
            self.conclude(first, report, end, phase_started, retired),
        );
        if let Some(over) = over {
            self.end_here(core, over);
        }
    }

    /// [`end_phase`](Self::end_phase) on this thread, in the runtime's context.
    fn end_here(&self, core: &Core, over: Over) {
        let _runtime = self.handle.enter();
        let Over {
            staged,
            flushes,
            serial,
            seq,
        } = over;
        self.end_phase(core, staged, flushes, serial, seq);
    }

    /// A chained phase up to its first flush: runs its actions, starts the other flushers,
    /// and leaves the phase to the watchdog should the first flush overrun. `Err` when the
    /// phase is over already (nothing to flush, or no time left): what ends it.
    async fn begin<'c>(
        &self,
        core: &'c Arc<Core>,
        work: Work,
        retired: &Arc<AtomicBool>,
    ) -> Result<(&'c Flusher, Instant, Instant), Over> {
        let Work { job, seq, end } = work;
        let serial = core.phase_lock.clone().lock_owned().await;
        // The slot's phase end, not one recomputed from the deadline: the chain's timers use
        // the same instant, so a flush ending there needs no poke.
        let budget = Budget { end };
        let flushers = &core.config.flushers;
        let staged =
            phase::run_actions_stage(job, flushers, budget, PhaseKind::Chained, core.stop()).await;
        let (Some(end), Some((first, rest))) = (staged.flush_end, flushers.split_first()) else {
            return Err(Over {
                staged,
                flushes: Vec::new(),
                serial,
                seq,
            });
        };
        if Instant::now() >= end {
            // No time left to flush (the handler ran to the phase's end): every flusher is
            // reported not run, here, with no watchdog to race for a flush that never began.
            let mut staged = staged;
            let flushes = phase::run_flushes(flushers, end, staged.started, &mut staged.cut).await;
            return Err(Over {
                staged,
                flushes,
                serial,
                seq,
            });
        }
        let running = phase::start_flushes(rest, end);
        let phase_started = staged.started;
        let poke = {
            let mut watch = lock(&self.watch);
            watch.flushing = Some(Flushing {
                seq,
                staged,
                running,
                here: first.name.to_string(),
                end,
                serial,
                retired: retired.clone(),
            });
            watch.chain_wakes_at.is_none_or(|at| at > end)
        };
        if poke {
            self.poke.notify_one();
        }
        Ok((first, end, phase_started))
    }

    /// A chained phase after its first flush (`report`; `None` when its end had come before
    /// it could start): unless the watchdog took it over meanwhile, collects the other
    /// flushes: what ends it.
    async fn conclude(
        &self,
        first: &Flusher,
        report: Option<FlushReport>,
        end: Instant,
        phase_started: Instant,
        retired: &Arc<AtomicBool>,
    ) -> Option<Over> {
        // None: the watchdog took this phase over (and reported it) while the flush ran.
        let flushing = lock(&self.watch).claim(retired)?;
        let Flushing {
            seq,
            mut staged,
            mut running,
            serial,
            ..
        } = flushing;
        match report {
            Some(report) => running.add_done(report),
            None => running.add_not_started(first, NotStarted::NoTime),
        }
        let flushes = phase::collect_flushes(running, end, phase_started, &mut staged.cut).await;
        Some(Over {
            staged,
            flushes,
            serial,
            seq,
        })
    }

    /// The end of every chained phase, whoever ends it: reports it, lets the next phase (or
    /// the SIGTERM flush) run, and arms the next `event/next`.
    fn end_phase(
        &self,
        core: &Core,
        staged: Staged,
        flushes: Vec<FlushReport>,
        serial: OwnedMutexGuard<()>,
        seq: u64,
    ) {
        core.finish(staged.into_report(flushes));
        drop(serial);
        self.ended.fetch_max(seq, Ordering::AcqRel);
        self.line.arm(seq);
    }

    /// Whether a phase handed to the runner has not ended yet (queued, or running).
    pub(crate) fn phase_pending(&self) -> bool {
        self.ended.load(Ordering::Acquire) < self.submitted.load(Ordering::Acquire)
    }

    /// Waits until no phase is pending. Polled: it runs once per process (SIGTERM, a panic of
    /// the chain), and a notification would cost every invocation.
    pub(crate) async fn phases_ended(&self) {
        while self.phase_pending() {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    }

    /// For the chain's task, before it sleeps until `planned`: when it must wake instead (the
    /// end of a flush that runs on the phase thread, if sooner).
    pub(crate) fn wake_at(&self, planned: Option<Instant>) -> Option<Instant> {
        let mut watch = lock(&self.watch);
        let at = match (&watch.flushing, planned) {
            (Some(f), Some(p)) => Some(f.end.min(p)),
            (Some(f), None) => Some(f.end),
            (None, p) => p,
        };
        watch.chain_wakes_at = at;
        at
    }

    /// Abandons the phase whose flush on the phase thread has overrun its end: starts a fresh
    /// phase thread, which first reports the phase (that flush timed out) and arms the next
    /// call.
    pub(crate) async fn watchdog(self: &Arc<Self>, core: &Arc<Core>) {
        let Some(Flushing {
            seq,
            mut staged,
            running,
            here,
            serial,
            end,
            ..
        }) = lock(&self.watch).overrun(Instant::now())
        else {
            return;
        };
        let flushes = running
            .abandon(&here, end, staged.started, &mut staged.cut)
            .await;
        // The report runs the user's `on_report` hook: not on the chain's task, which must
        // stay free to read events and to release an event whose phase does not end (a hook
        // that blocks here would otherwise hold the invocation to its deadline). Nor on the
        // runtime's blocking pool, which may have no thread free (`max_blocking_threads`,
        // the user's blocking work): the report and `event/next` would wait there, and every
        // later phase for the phase lock. On the thread that replaces the retired one, first
        // (the next phase waits for this one's end anyway).
        let (runner, ending_core) = (self.clone(), core.clone());
        let ending: Ending = Box::new(move || {
            // The runtime's context, as on the phase thread and the blocking threads.
            let _runtime = runner.handle.enter();
            runner.end_phase(&ending_core, staged, flushes, serial, seq);
        });
        // The retired thread's count passes to its replacement.
        let Err((error, ending)) = self.spawn_thread_after(Some(ending)) else {
            return;
        };
        // The queue is empty: the next phase comes after this one's release, below. It tries
        // again ([`Runner::submit`]).
        tracing::error!(target: "deferred", %error, "cannot start a new phase thread after a flush overran");
        lock(&self.queue).leave();
        if let Some(Err(ending)) = ending.map(|ending| to_blocking_pool(&self.handle, ending)) {
            // Here, rather than not at all: the chain's task must live on.
            ending();
        }
    }
}

/// Runs `future` to its end on this thread, in `handle`'s context: polled once first, and
/// handed to `block_on` only when that poll is pending. A phase with no actions and one
/// flusher is ready at once, and `block_on` (entering the runtime, setting up a park for this
/// thread) would cost it about 1,000 instructions for nothing (`bench --instructions`).
fn complete<F: Future>(handle: &tokio::runtime::Handle, future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    {
        let _runtime = handle.enter();
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        if let std::task::Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
    }
    // Whatever it waits on holds the no-op waker only until `block_on` polls it again with
    // its own: a future must allow the waker to change between polls.
    handle.block_on(future)
}

/// Runs `run` on a thread of the runtime's blocking pool; gives it back when tokio cannot
/// start one ([`try_spawn_blocking`]).
fn to_blocking_pool<F>(handle: &tokio::runtime::Handle, run: F) -> Result<(), F>
where
    F: FnOnce() + Send + 'static,
{
    // The closure moves into the task; a slot lets it come back when the task never starts.
    let slot = Arc::new(Mutex::new(Some(run)));
    let theirs = slot.clone();
    let spawned = try_spawn_blocking(Some(handle), move || {
        let run = lock(&theirs).take();
        if let Some(run) = run {
            run();
        }
    });
    if spawned.is_ok() {
        return Ok(());
    }
    match lock(&slot).take() {
        Some(run) => Err(run),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::phase::{Job, Stop};
    use crate::scope::Queue;

    /// A phase of event `seq` flushing on the phase thread `thread` until `end`.
    async fn flushing(thread: &Arc<AtomicBool>, seq: u64, end: Instant) -> Flushing {
        let job = Job {
            request_id: format!("r-{seq}"),
            deadline: None,
            queue: Queue::new(0),
            flush_timeout: Duration::from_millis(100),
            parent: None,
        };
        let stop = Stop::new(tokio::sync::watch::channel(false).1);
        let staged =
            phase::run_actions_stage(job, &[], Budget { end }, PhaseKind::Chained, stop).await;
        Flushing {
            seq,
            staged,
            running: phase::start_flushes(&[], end),
            here: "f".into(),
            end,
            serial: Arc::new(tokio::sync::Mutex::new(())).lock_owned().await,
            retired: thread.clone(),
        }
    }

    /// The soak's hang: thread A's flush overran and the watchdog took its phase over; thread
    /// B, its replacement, has put a later phase in the slot when A's flush returns. A must
    /// not take (and end, with its own stale event) B's phase.
    #[tokio::test]
    async fn a_phase_thread_claims_only_its_own_phase() {
        let (a, b) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let now = Instant::now();
        let mut watch = Watch {
            flushing: Some(flushing(&a, 1, now).await),
            ..Watch::default()
        };
        let taken = watch.overrun(now).map(|f| f.seq);
        assert_eq!(taken, Some(1));
        assert!(a.load(Ordering::Acquire), "A is retired with the take-over");

        watch.flushing = Some(flushing(&b, 2, now + Duration::from_secs(60)).await);
        assert!(watch.claim(&a).is_none(), "A found B's phase and left it");
        assert!(watch.overrun(now).is_none(), "B's flush has time left");
        assert!(!b.load(Ordering::Acquire));
        assert_eq!(watch.claim(&b).map(|f| f.seq), Some(2));
        assert!(watch.flushing.is_none());
    }

    /// A phase thread starts its flush only while the phase is its own: once the watchdog has
    /// taken the phase over (and reported that flush abandoned, and released the environment),
    /// a thread that was held up between its check of the end and the flush does not start it.
    #[tokio::test]
    async fn a_flush_taken_over_before_it_began_is_not_started() {
        let a = Arc::new(AtomicBool::new(false));
        let now = Instant::now();
        let mut watch = Watch {
            flushing: Some(flushing(&a, 1, now).await),
            ..Watch::default()
        };
        assert!(watch.owns(&a));
        assert!(watch.overrun(now).is_some());
        assert!(
            !watch.owns(&a),
            "taken over: the thread must not start its flush"
        );
    }

    /// How many threads [`first_thread_only`] was asked for.
    static ASKED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    /// Spawns the first phase thread; the OS "refuses" every later one.
    fn first_thread_only(run: Box<dyn FnOnce() + Send>) -> std::io::Result<()> {
        if ASKED.fetch_add(1, Ordering::SeqCst) > 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                "Resource temporarily unavailable (test)",
            ));
        }
        os_thread(run)
    }

    /// Set once [`idle_first_thread`] has been asked for the first thread.
    static IDLE_ASKED: AtomicBool = AtomicBool::new(false);

    /// Starts no first phase thread (it "starts" and does nothing: the queue counts it as a
    /// server); every later one is a real one.
    fn idle_first_thread(run: Box<dyn FnOnce() + Send>) -> std::io::Result<()> {
        if IDLE_ASKED.swap(true, Ordering::SeqCst) {
            os_thread(run)
        } else {
            drop(run);
            Ok(())
        }
    }

    /// A phase thread whose first task (the end of a phase the watchdog took over) panics
    /// with a payload that panics in turn when dropped serves the queue all the same. Found
    /// by review: the thread dropped the payload unguarded, and its panic ended the thread
    /// before it served, the queue left with no server.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_phase_thread_serves_after_its_first_task_panicked() {
        let (core, reports) = reporting_core(Vec::new(), None);
        // Nothing listens: the calls the phases arm go nowhere.
        let line = Arc::new(Line::new("127.0.0.1:9", "", "ext-1"));
        let runner = Runner::start_with(
            &core,
            line,
            tokio::runtime::Handle::current(),
            idle_first_thread,
        )
        .expect("first thread");
        let first: Ending =
            Box::new(|| std::panic::panic_any(crate::phase::tests::PanicsWhenDropped));
        assert!(runner.spawn_thread_after(Some(first)).is_ok());
        runner.submit(work(1, Duration::from_secs(5)));
        assert!(reported(&reports, "r-1").await, "the new thread ran it");
    }

    /// A core of the extension mode with `flushers` (and `flush_timeout`, if given) whose
    /// reports' request ids are collected in the list it returns.
    fn reporting_core(
        flushers: Vec<crate::flush::Flusher>,
        flush_timeout: Option<Duration>,
    ) -> (Arc<Core>, Arc<Mutex<Vec<String>>>) {
        let reports: Arc<Mutex<Vec<String>>> = Arc::default();
        let hook = reports.clone();
        let defaults = crate::core::Config::default();
        let core = Core::new(
            crate::core::Config {
                flushers,
                flush_timeout: flush_timeout.unwrap_or(defaults.flush_timeout),
                on_report: Some(crate::core::ReportHook(Arc::new(move |report| {
                    lock(&hook).push(report.request_id.clone());
                }))),
                phase_telemetry: false,
                ..defaults
            },
            crate::core::Mode::Extension,
        );
        (core, reports)
    }

    /// Waits (up to 5 s) until `done` holds.
    async fn until(done: impl Fn() -> bool) -> bool {
        for _ in 0..500 {
            if done() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    /// Waits (up to 5 s) until `reports` holds `id`.
    async fn reported(reports: &Mutex<Vec<String>>, id: &str) -> bool {
        until(|| lock(reports).iter().any(|r| r == id)).await
    }

    /// A phase with no actions, of event `seq`, ending in `budget`.
    fn work(seq: u64, budget: Duration) -> Work {
        Work {
            job: Job {
                request_id: format!("r-{seq}"),
                deadline: None,
                queue: Queue::new(0),
                flush_timeout: Duration::from_millis(100),
                parent: None,
            },
            seq,
            end: Instant::now() + budget,
        }
    }

    /// The flush on the phase thread never returns and the OS refuses the thread that should
    /// replace it (Lambda caps a function at 1,024 threads): the later phases run all the same,
    /// on the runtime's blocking pool, and then on the old thread once its flush returns.
    /// (Before, none ran again: each invocation was held to the safety net, its actions lost.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn phases_run_when_the_os_refuses_a_new_phase_thread() {
        let (started, flushing) = std::sync::mpsc::channel::<()>();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let released = Mutex::new(released);
        let first = AtomicBool::new(true);
        let stuck = crate::flush_fn("stuck", move || {
            if first.swap(false, Ordering::SeqCst) {
                let _ = started.send(());
                let _ = lock(&released).recv();
            }
            Ok::<(), String>(())
        });
        let (core, reports) = reporting_core(
            vec![crate::flush::Flusher::new(stuck)],
            Some(Duration::from_millis(100)),
        );
        // Nothing listens: the calls the phases arm go nowhere.
        let line = Arc::new(Line::new("127.0.0.1:9", "", "ext-1"));
        let runner = Runner::start_with(
            &core,
            line,
            tokio::runtime::Handle::current(),
            first_thread_only,
        )
        .expect("first thread");

        let first = work(1, Duration::from_millis(100));
        let end = first.end;
        runner.submit(first);
        let flushing =
            tokio::task::spawn_blocking(move || flushing.recv_timeout(Duration::from_secs(5)));
        assert!(matches!(flushing.await, Ok(Ok(()))), "the flush started");
        // As the chain's task does once the flush's end has passed.
        tokio::time::sleep_until(end).await;
        runner.watchdog(&core).await;
        assert!(reported(&reports, "r-1").await, "the watchdog took it over");
        let servers = || lock(&runner.queue).servers;
        assert_eq!(servers(), 0, "the replacement was refused");

        runner.submit(work(2, Duration::from_secs(5)));
        assert!(reported(&reports, "r-2").await, "a blocking thread ran it");
        assert!(
            until(|| servers() == 0).await,
            "and left with the queue empty"
        );

        // The stuck flush returns: its thread, retired, finds no thread serving and serves.
        release.send(()).expect("the flush waits");
        assert!(
            until(|| servers() == 1).await,
            "the old thread serves again"
        );
        runner.submit(work(3, Duration::from_secs(5)));
        assert!(reported(&reports, "r-3").await, "the old thread ran it");
        assert_eq!(*lock(&reports), ["r-1", "r-2", "r-3"]);
        // The first thread, the watchdog's replacement, the one for r-2; none for r-3.
        assert_eq!(ASKED.load(Ordering::SeqCst), 3);
    }

    /// The watchdog's report of the phase it took over does not wait for a thread of the
    /// runtime's blocking pool: with none free (`max_blocking_threads(1)`, its thread held by
    /// blocking work of the user's that runs on), the phase is reported and ended at once.
    /// (Before, the report waited in the pool's queue: the invocation was held to the safety
    /// net, and every later phase waited for the phase lock, its actions not run.)
    #[test]
    fn a_taken_over_phase_is_reported_with_no_blocking_thread_free() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        let (release_pool, pool_held) = std::sync::mpsc::channel::<()>();
        let (release_flush, flush_held) = std::sync::mpsc::channel::<()>();
        let flush_held = Mutex::new(flush_held);
        let flushing = Arc::new(AtomicBool::new(false));
        let started = flushing.clone();
        let stuck = crate::flush_fn("stuck", move || {
            if !started.swap(true, Ordering::SeqCst) {
                let _ = lock(&flush_held).recv();
            }
            Ok::<(), String>(())
        });
        let ended = runtime.block_on(async {
            // The pool's only thread.
            let _pool = tokio::task::spawn_blocking(move || {
                let _ = pool_held.recv();
            });
            let (core, reports) = reporting_core(vec![crate::flush::Flusher::new(stuck)], None);
            // Nothing listens: the calls the phases arm go nowhere.
            let line = Arc::new(Line::new("127.0.0.1:9", "", "ext-1"));
            let runner = Runner::start(&core, line, tokio::runtime::Handle::current())
                .expect("a phase thread");
            let first = work(1, Duration::from_millis(100));
            let end = first.end;
            runner.submit(first);
            assert!(until(|| flushing.load(Ordering::SeqCst)).await, "flushing");
            // As the chain's task does once the flush's end has passed.
            tokio::time::sleep_until(end).await;
            runner.watchdog(&core).await;
            let first = reported(&reports, "r-1").await;
            // The next phase runs too (on the replacement thread).
            runner.submit(work(2, Duration::from_secs(5)));
            let second = reported(&reports, "r-2").await;
            (first, second, !runner.phase_pending())
        });
        let _ = release_pool.send(());
        let _ = release_flush.send(());
        runtime.shutdown_background();
        assert_eq!(ended, (true, true, true), "reported r-1, r-2; none pending");
    }

    /// The thread that replaced a retired one (and reported its phase first) is retired in
    /// turn when its own flush overruns: each phase is reported once, in order, each stuck
    /// thread exits when its flush returns, and one thread serves the queue after.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replacement_phase_thread_may_itself_be_replaced() {
        // The first two calls hang until released, each on the phase thread of its phase.
        let (release_first, first_held) = std::sync::mpsc::channel::<()>();
        let (release_second, second_held) = std::sync::mpsc::channel::<()>();
        let held = Mutex::new(vec![second_held, first_held]);
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let called = calls.clone();
        let flusher = crate::flush::Flusher::new(crate::flush_fn("stuck", move || {
            called.fetch_add(1, Ordering::SeqCst);
            let hold = lock(&held).pop();
            if let Some(hold) = hold {
                let _ = hold.recv();
            }
            Ok::<(), String>(())
        }));
        let reports: Arc<Mutex<Vec<crate::PhaseReport>>> = Arc::default();
        let hook = reports.clone();
        let core = Core::new(
            crate::core::Config {
                flushers: vec![flusher.clone()],
                on_report: Some(crate::core::ReportHook(Arc::new(move |report| {
                    lock(&hook).push(report.clone());
                }))),
                phase_telemetry: false,
                ..crate::core::Config::default()
            },
            crate::core::Mode::Extension,
        );
        // Nothing listens: the calls the phases arm go nowhere.
        let line = Arc::new(Line::new("127.0.0.1:9", "", "ext-1"));
        let runner =
            Runner::start(&core, line, tokio::runtime::Handle::current()).expect("a phase thread");
        let count = || lock(&reports).len();
        for (seq, release) in [(1, release_first), (2, release_second)] {
            let phase = work(seq, Duration::from_millis(100));
            let end = phase.end;
            runner.submit(phase);
            let flushing = || calls.load(Ordering::SeqCst) == usize::try_from(seq).unwrap_or(0);
            assert!(until(flushing).await, "phase {seq} flushes on its thread");
            // As the chain's task does once the flush's end has passed.
            tokio::time::sleep_until(end).await;
            runner.watchdog(&core).await;
            let taken_over = usize::try_from(seq).unwrap_or(0);
            assert!(
                until(|| count() == taken_over).await,
                "phase {seq} reported"
            );
            // Its thread exits once the flush returns (the replacement serves).
            release.send(()).expect("the flush waits");
            assert!(until(|| !flusher.is_busy()).await);
        }
        runner.submit(work(3, Duration::from_secs(5)));
        assert!(
            until(|| count() == 3).await,
            "the second replacement ran it"
        );
        assert!(until(|| !runner.phase_pending()).await);
        let reports = lock(&reports);
        let ids: Vec<_> = reports.iter().map(|r| r.request_id.as_str()).collect();
        assert_eq!(ids, ["r-1", "r-2", "r-3"]);
        let outcomes: Vec<_> = reports
            .iter()
            .map(|r| r.flushes[0].outcome.clone())
            .collect();
        assert_eq!(
            outcomes,
            [
                crate::FlushOutcome::TimedOut,
                crate::FlushOutcome::TimedOut,
                crate::FlushOutcome::Ok
            ]
        );
        assert_eq!(lock(&runner.queue).servers, 1);
    }

    /// A flush that waits on async work (`Handle::block_on`, `blocking_recv`: what a flush
    /// of an async client does) flushes on the phase thread as on any blocking thread.
    /// (Before, the phase thread ran it within `block_on`, where tokio panics at both.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flush_may_block_on_async_work_on_the_phase_thread() {
        // The first flusher runs on the phase thread: this one waits on async work both ways.
        let waits = crate::flush_fn("waits", || {
            tokio::runtime::Handle::current().block_on(tokio::task::yield_now());
            let (tx, rx) = tokio::sync::oneshot::channel();
            tokio::spawn(async move { tx.send(()) });
            rx.blocking_recv().map_err(|e| e.to_string())
        });
        let (reported, reports) = std::sync::mpsc::channel();
        let reported = Mutex::new(reported);
        let core = Core::new(
            crate::core::Config {
                flushers: vec![crate::flush::Flusher::new(waits)],
                on_report: Some(crate::core::ReportHook(Arc::new(move |report| {
                    let _ = lock(&reported).send(report.clone());
                }))),
                phase_telemetry: false,
                ..crate::core::Config::default()
            },
            crate::core::Mode::Extension,
        );
        // Nothing listens: the call the phase arms goes nowhere.
        let line = Arc::new(Line::new("127.0.0.1:9", "", "ext-1"));
        let runner =
            Runner::start(&core, line, tokio::runtime::Handle::current()).expect("a phase thread");
        runner.submit(work(1, Duration::from_secs(5)));
        let report =
            tokio::task::spawn_blocking(move || reports.recv_timeout(Duration::from_secs(5)))
                .await
                .expect("joined")
                .expect("the phase was reported");
        assert_eq!(report.flushes.len(), 1, "{report}");
        assert!(report.flushed(), "{report}");
        // Ended just after its report.
        assert!(until(|| !runner.phase_pending()).await);
    }

    /// The closure runs, once, on another thread.
    #[tokio::test]
    async fn to_blocking_pool_runs_the_closure_on_a_blocking_thread() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let here = std::thread::current().id();
        let sent = to_blocking_pool(&tokio::runtime::Handle::current(), move || {
            let _ = tx.send(std::thread::current().id());
        });
        assert!(sent.is_ok());
        let there = rx.await.expect("it ran");
        assert_ne!(there, here);
    }

    /// `complete` runs a future to its end off the runtime, in its context, ready at once or
    /// not: one woken by another thread of the runtime after its first poll is woken through
    /// `block_on`'s waker, not lost with the no-op one.
    #[test]
    fn complete_runs_ready_and_pending_futures_in_the_runtimes_context() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_time()
            .build()
            .expect("runtime");
        let handle = runtime.handle().clone();
        let id = complete(&handle, async { tokio::runtime::Handle::current().id() });
        assert_eq!(id, handle.id());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let woken = complete(&handle, async move {
            // Sent by a task of the runtime once this future has been polled (and is pending).
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let _ = tx.send(5);
            });
            rx.await
        });
        assert_eq!(woken, Ok(5));
    }

    /// What a probing hook saw: per phase, its request id and whether it could block on async
    /// work (`Handle::current().block_on`).
    type Probed = Arc<Mutex<Vec<(String, bool)>>>;

    /// A runner of a core of `config` (phase telemetry off) whose `on_report` hook probes
    /// whether it can block on async work; its phase thread is a real one, and nothing
    /// listens on its line: the calls its phases arm go nowhere.
    fn hook_probing_runner(config: crate::core::Config) -> (Arc<Runner>, Probed) {
        let seen: Probed = Arc::default();
        let hook = seen.clone();
        let core = Core::new(
            crate::core::Config {
                on_report: Some(crate::core::ReportHook(Arc::new(move |report| {
                    let blocked = std::panic::catch_unwind(|| {
                        tokio::runtime::Handle::current().block_on(async {});
                    });
                    lock(&hook).push((report.request_id.clone(), blocked.is_ok()));
                }))),
                phase_telemetry: false,
                ..config
            },
            crate::core::Mode::Extension,
        );
        let line = Arc::new(Line::new("127.0.0.1:9", "", "ext-1"));
        let runner = Runner::start_with(&core, line, tokio::runtime::Handle::current(), os_thread)
            .expect("a phase thread");
        (runner, seen)
    }

    /// The `on_report` hook of a chained phase runs in the same place whether or not the
    /// phase had to wait (an action to await, the phase lock held by the SIGTERM flush): in
    /// the runtime's context, outside `block_on`, where a hook may block on async work, as
    /// the first flush may and as the watchdog's report of a phase it took over does. Found
    /// by review: with the two halves polled once before `block_on`, a phase ready at once
    /// ended outside it and one that waited inside, so the same hook's
    /// `Handle::current().block_on(..)` worked for a phase with no actions and panicked
    /// ("Cannot start a runtime from within a runtime") for one with an action.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_report_hook_runs_alike_whether_or_not_the_phase_waited() {
        let (runner, seen) = hook_probing_runner(crate::core::Config::default());
        let reported = |id: &'static str| {
            let seen = seen.clone();
            until(move || lock(&seen).iter().any(|(r, _)| r == id))
        };
        // No actions: ready at its first poll.
        runner.submit(work(1, Duration::from_secs(5)));
        assert!(reported("r-1").await);
        // An action that waits: the phase's first half is pending at its first poll.
        let queue = Queue::new(1);
        crate::scope::with_queue(queue.clone(), async {
            crate::scope::defer(None, async {
                tokio::time::sleep(Duration::from_millis(20)).await;
            })
            .expect("queued");
        })
        .await;
        let mut second = work(2, Duration::from_secs(5));
        second.job.queue = queue;
        runner.submit(second);
        assert!(reported("r-2").await);
        assert_eq!(
            *lock(&seen),
            [("r-1".to_owned(), true), ("r-2".to_owned(), true)],
            "whether the hook could block on async work, per phase"
        );
    }

    /// The same, for a phase whose flushes had to wait: `conclude` pending at its first poll
    /// (a flusher on its own thread still running when the phase thread's flush returns),
    /// and so run by `block_on`. The test above covers the phases that end in `begin` only.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_report_hook_may_block_after_flushes_that_waited() {
        let quick = crate::flush_fn("quick", || Ok::<(), String>(()));
        // On a thread of its own: the phase thread's collection of it is pending.
        let slow = crate::flush_fn("slow", || {
            std::thread::sleep(Duration::from_millis(300));
            Ok::<(), String>(())
        });
        let (runner, seen) = hook_probing_runner(crate::core::Config {
            flushers: vec![
                crate::flush::Flusher::new(quick),
                crate::flush::Flusher::new(slow),
            ],
            flush_timeout: Duration::from_secs(2),
            ..crate::core::Config::default()
        });
        runner.submit(work(1, Duration::from_secs(5)));
        assert!(until(|| !runner.phase_pending()).await, "the phase ended");
        assert_eq!(
            *lock(&seen),
            [("r-1".to_owned(), true)],
            "whether the hook could block on async work"
        );
    }

    /// A flush that returns in time: its thread claims its phase, and the watchdog, later,
    /// finds nothing to take over.
    #[tokio::test]
    async fn a_flush_back_in_time_is_not_taken_over() {
        let a = Arc::new(AtomicBool::new(false));
        let end = Instant::now() + Duration::from_secs(60);
        let mut watch = Watch {
            flushing: Some(flushing(&a, 7, end).await),
            ..Watch::default()
        };
        assert!(watch.overrun(Instant::now()).is_none());
        assert_eq!(watch.claim(&a).map(|f| f.seq), Some(7));
        assert!(watch.overrun(end).is_none());
        assert!(!a.load(Ordering::Acquire), "not retired");
    }
}
