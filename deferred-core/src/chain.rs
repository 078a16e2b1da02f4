//! The chained `event/next`: exactly one call in flight, and the next one only after the
//! previous invocation's deferred phase has ended.
//!
//! Lambda neither freezes the environment nor delivers the next invocation while a registered
//! extension has not called `event/next` (Extensions API docs, "Invoke phase": the invocation
//! ends when the runtime and every extension have signalled completion by calling next).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::context::Invocation;
use crate::core::{Chain, Core, Slot};
use crate::extension::{Client, InvokeEvent, NextEvent};
use crate::phase::Budget;
use crate::report::PhaseKind;
use crate::scope::Queue;
use crate::snapstart::Restores;

/// Runs the chain until the process ends (or a SHUTDOWN event arrives).
pub(crate) async fn drive(core: Arc<Core>, client: Arc<Client>, extension_id: String) {
    drive_with(core, client, extension_id, Restores::global()).await;
}

/// [`drive`], watching `restores`: after a SnapStart restore the pool is reset and the
/// `event/next` in flight at the snapshot is re-established (see `snapstart.rs`).
pub(crate) async fn drive_with(
    core: Arc<Core>,
    client: Arc<Client>,
    extension_id: String,
    restores: Arc<Restores>,
) {
    let mut restores = restores.watch();
    let mut failures: u32 = 0;
    loop {
        core.state.send_modify(|s| s.chain = Chain::Armed);
        let next = restores
            .next_event(|| client.next_event(&extension_id), || client.reset_pool())
            .await;
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
                hold(&core, event).await;
            }
            Ok(NextEvent::Shutdown(event)) => {
                // Internal extensions cannot subscribe to SHUTDOWN; should one arrive anyway,
                // flush and stop calling.
                core.state.send_modify(|s| s.chain = Chain::Stopped);
                tracing::info!(target: "deferred", reason = %event.reason, "SHUTDOWN event: final flush");
                crate::shutdown::final_flush(&core).await;
                return;
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                core.state.send_modify(|s| s.chain = Chain::Broken);
                // One clear line when the chain breaks, then one per 100 failed retries.
                if failures == 1 || failures.is_multiple_of(100) {
                    tracing::warn!(
                        target: "deferred",
                        %error,
                        failures,
                        "event/next failed: deferred work runs inline until the chain is re-armed"
                    );
                }
                // A restore ends the backoff: the retry then goes out on a fresh pool.
                tokio::select! {
                    () = tokio::time::sleep(backoff(failures)) => {}
                    _ = restores.changed() => {}
                }
            }
        }
    }
}

/// How long to wait before calling `event/next` again after `failures` failures in a row.
pub(crate) fn backoff(failures: u32) -> Duration {
    Duration::from_millis(10u64.saturating_mul(1 << failures.min(7)).min(1000))
}

enum Decision {
    /// Run the phase with the wrapper's job.
    Run,
    /// Run a phase with no actions (the flush): nobody will claim the invocation.
    Empty(&'static str),
    /// The wrapper released the event (it did not match): no phase.
    Released,
}

/// Holds an INVOKE event until its invocation is over, then runs its phase.
async fn hold(core: &Arc<Core>, event: InvokeEvent) {
    let request_id = event.request_id.clone();
    let deadline = event.deadline;
    let arrived = Instant::now();
    let phase_end = Budget::new(Some(deadline), core.config.safety_margin).end;
    let stray_at = arrived + core.config.stray_window;

    let mut closed_already = false;
    core.state.send_modify(|s| {
        s.chain = Chain::Holding;
        if s.was_closed(&request_id) {
            // Its wrapper gave up waiting for this event and ran the work inline.
            closed_already = true;
            return;
        }
        let claimed = s.expected.as_deref() == Some(request_id.as_str());
        if claimed {
            s.expected = None;
        }
        s.slot = Some(Slot {
            event,
            claimed,
            job: None,
            responded: false,
        });
    });
    if closed_already {
        return;
    }

    let mut rx = core.state.subscribe();
    let decision = loop {
        let decision = {
            let state = rx.borrow_and_update();
            decide(core, state.slot.as_ref(), &request_id, stray_at, phase_end)
        };
        match decision {
            Ok(decision) => break decision,
            // Undecided: wait for a change of state, or until then.
            Err(until) => {
                let _ = tokio::time::timeout_at(until, rx.changed()).await;
            }
        }
    };

    let mut job = None;
    core.state.send_modify(|s| {
        if let Some(slot) = s.slot.take_if(|slot| slot.event.request_id == request_id) {
            job = slot.job;
        }
        if job.is_none() {
            s.close(request_id.clone());
        }
    });
    let job = match decision {
        Decision::Released => return,
        Decision::Run => job,
        Decision::Empty(why) => {
            tracing::debug!(target: "deferred", request_id, why, "phase without actions");
            job
        }
    };
    // Nobody handed a queue over: a phase with no actions, the flush only.
    let job = job.unwrap_or_else(|| {
        let invocation = Invocation {
            request_id,
            deadline: Some(deadline),
        };
        core.job(&invocation, Queue::new(0), None)
    });
    core.run_phase(job, PhaseKind::Chained).await;
}

/// What to do with the held event now; `Err(until)` when it is too early to tell.
fn decide(
    core: &Core,
    slot: Option<&Slot>,
    request_id: &str,
    stray_at: Instant,
    phase_end: Instant,
) -> Result<Decision, Instant> {
    let Some(slot) = slot.filter(|slot| slot.event.request_id == request_id) else {
        return Ok(Decision::Released);
    };
    let now = Instant::now();
    let layer = core.layer_installed();
    if slot.job.is_some() && (!layer || slot.responded) {
        return Ok(Decision::Run);
    }
    if layer && slot.responded && !slot.claimed {
        return Ok(Decision::Empty(
            "the runtime answered without calling the handler (undecodable event?)",
        ));
    }
    if !layer && !slot.claimed && now >= stray_at {
        return Ok(Decision::Empty(
            "no handler claimed the invocation in time (undecodable event?)",
        ));
    }
    if now >= phase_end {
        return Ok(Decision::Empty(
            "the invocation reached its deadline before its handler returned",
        ));
    }
    if !layer && !slot.claimed {
        Err(stray_at.min(phase_end))
    } else {
        Err(phase_end)
    }
}
