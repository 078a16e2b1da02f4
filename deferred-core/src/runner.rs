//! The chain's phase thread: runs each chained phase (its actions on the runtime, its first
//! flush right on this thread), then sends the next `event/next` from here.
//!
//! Why a thread of its own: from the response to the next invocation, every hand-off between
//! threads is a wake-up on the path (and CPU). Here the layer's `responded` wakes this thread
//! once; with no actions, the flush and the request follow on the same thread. A flush cannot
//! be interrupted, so the chain's task watches it: when it overruns its end, the watchdog
//! takes the phase over and starts a fresh phase thread, and a blocking thread reports the
//! phase and sends `event/next`; the stuck one exits when its flush returns
//! ([`Runner::watchdog`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use tokio::sync::{Notify, OwnedMutexGuard};
use tokio::time::Instant;

use crate::core::Core;
use crate::extension::line::Line;
use crate::phase::{self, Budget, Running, Staged};
use crate::report::{FlushReport, PhaseKind};
use crate::scope::lock;

/// A phase for the phase thread: the job, the event it arms the next call for, and its end.
type Work = crate::core::Ready;

/// The phase thread(s) of the chain.
#[derive(Debug)]
pub(crate) struct Runner {
    handle: tokio::runtime::Handle,
    pub(crate) line: Arc<Line>,
    /// Phases to run, and the condition the phase thread waits on. (A mutex and a condvar
    /// rather than `std::sync::mpsc`: its receiver spins and parks more than once per
    /// message, each a context switch on the path to the next invocation.)
    queue: Mutex<VecDeque<Work>>,
    queued: Condvar,
    watch: Mutex<Watch>,
    /// Wakes the chain's task when a flush must be watched sooner than it planned to wake.
    pub(crate) poke: Notify,
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

    /// For the watchdog: the phase whose flush has overrun its end (by `now`), taken over, its
    /// thread retired. Retired under this lock, so that thread, back from its flush, finds the
    /// phase gone and exits rather than serving the queue beside its replacement.
    fn overrun(&mut self, now: Instant) -> Option<Flushing> {
        let flushing = self.flushing.take_if(|f| now >= f.end)?;
        flushing.retired.store(true, Ordering::Release);
        Some(flushing)
    }
}

/// A phase whose first flush runs on the phase thread.
#[derive(Debug)]
struct Flushing {
    seq: u64,
    staged: Staged,
    /// The other flushers, on blocking threads.
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
    /// The runner of the chain that talks on `line`; its first phase thread starts now.
    pub(crate) fn start(core: &Arc<Core>, line: Arc<Line>) -> std::io::Result<Arc<Self>> {
        let runner = Arc::new(Self {
            handle: tokio::runtime::Handle::current(),
            line,
            queue: Mutex::new(VecDeque::new()),
            queued: Condvar::new(),
            watch: Mutex::new(Watch::default()),
            poke: Notify::new(),
        });
        runner.spawn_thread(core.clone())?;
        Ok(runner)
    }

    fn spawn_thread(self: &Arc<Self>, core: Arc<Core>) -> std::io::Result<()> {
        let runner = self.clone();
        std::thread::Builder::new()
            .name("deferred-phase".into())
            .spawn(move || runner.thread(&core))
            .map(drop)
    }

    /// Queues the phase of event `seq`; the phase thread runs it and then arms the next call.
    pub(crate) fn submit(&self, work: Work) {
        lock(&self.queue).push_back(work);
        self.queued.notify_one();
    }

    fn thread(self: &Arc<Self>, core: &Arc<Core>) {
        let retired = Arc::new(AtomicBool::new(false));
        loop {
            let work = {
                let mut queue = lock(&self.queue);
                loop {
                    if let Some(work) = queue.pop_front() {
                        break work;
                    }
                    queue = self
                        .queued
                        .wait(queue)
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                }
            };
            let seq = work.seq;
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.handle.block_on(self.run(core, work, &retired));
            }));
            if ran.is_err() {
                // A panic out of the phase's own code (an `on_report` hook): the chain goes on.
                tracing::error!(target: "deferred", "a chained phase panicked; the chain goes on");
                drop(lock(&self.watch).claim(&retired));
                self.line.arm(seq);
            }
            if retired.load(Ordering::Acquire) {
                return;
            }
        }
    }

    /// Runs one chained phase, reports it, and arms the next `event/next`.
    async fn run(&self, core: &Arc<Core>, work: Work, retired: &Arc<AtomicBool>) {
        let Work { job, seq, end } = work;
        let serial = core.phase_lock.clone().lock_owned().await;
        // The slot's phase end, not one recomputed from the deadline: the chain's timers use
        // the same instant, so a flush ending there needs no poke.
        let budget = Budget { end };
        let flushers = &core.config.flushers;
        let staged =
            phase::run_actions_stage(job, flushers, budget, PhaseKind::Chained, core.stop()).await;
        let (Some(end), Some((first, rest))) = (staged.flush_end, flushers.split_first()) else {
            self.end_phase(core, staged, Vec::new(), serial, seq);
            return;
        };
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
        let report = phase::flush_here(first, end, phase_started);
        let Some(flushing) = lock(&self.watch).claim(retired) else {
            // The watchdog took this phase over (and reported it) while the flush ran.
            return;
        };
        let Flushing {
            mut staged,
            mut running,
            serial,
            ..
        } = flushing;
        running.add_done(report);
        let flushes = phase::collect_flushes(running, end, phase_started, &mut staged.cut).await;
        self.end_phase(core, staged, flushes, serial, seq);
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
        self.line.arm(seq);
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
    /// phase thread, and has a blocking thread report the phase (that flush timed out) and arm
    /// the next call.
    pub(crate) async fn watchdog(self: &Arc<Self>, core: &Arc<Core>) {
        let Some(Flushing {
            seq,
            mut staged,
            running,
            here,
            serial,
            ..
        }) = lock(&self.watch).overrun(Instant::now())
        else {
            return;
        };
        if let Err(error) = self.spawn_thread(core.clone()) {
            tracing::error!(target: "deferred", %error, "cannot start a new phase thread after a flush overran");
        }
        let flushes = running
            .abandon(&here, staged.started, &mut staged.cut)
            .await;
        // The report runs the user's `on_report` hook: not on the chain's task, which must
        // stay free to read events and to release an event whose phase does not end (a hook
        // that blocks here would otherwise hold the invocation to its deadline).
        let (runner, core) = (self.clone(), core.clone());
        tokio::task::spawn_blocking(move || runner.end_phase(&core, staged, flushes, serial, seq));
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
