//! Builder settings that cannot work are refused by `start`, which stays free to run again.
//! A file of its own: `start` succeeds once per process.

use std::time::Duration;

use deferred_core::{Deferred, Mode, StartError};

/// A builder with one setting changed.
type Set = fn(Deferred) -> Deferred;

#[tokio::test(flavor = "current_thread")]
async fn settings_that_cannot_work_are_refused_and_start_stays_free() {
    let refused: [(&str, Set); 4] = [
        ("flush_timeout", |d| d.flush_timeout(Duration::ZERO)),
        ("shutdown_timeout", |d| d.shutdown_timeout(Duration::ZERO)),
        ("register_timeout", |d| d.register_timeout(Duration::ZERO)),
        ("unclaimed_window", |d| d.unclaimed_window(Duration::ZERO)),
    ];
    for (name, set) in refused {
        let error = set(Deferred::new().handle_sigterm(false))
            .start()
            .await
            .expect_err(name);
        assert!(
            matches!(error, StartError::InvalidSetting { setting, .. } if setting == name),
            "{name}: {error:?}"
        );
        let message = error.to_string();
        assert!(
            message.starts_with(&format!("Deferred::{name}: ")),
            "{message}"
        );
    }
    // The smallest non-zero values are settings, not errors; nothing was claimed by the
    // refusals above.
    let started = Deferred::new()
        .handle_sigterm(false)
        .flush_timeout(Duration::from_nanos(1))
        .shutdown_timeout(Duration::from_nanos(1))
        .register_timeout(Duration::from_nanos(1))
        .unclaimed_window(Duration::from_nanos(1))
        .start()
        .await
        .expect("started");
    assert_eq!(started.mode(), Mode::Inline, "outside Lambda");
}
