//! Issue 5, "Bad input": the CI-sized fuzz run. Replays every file of the committed fuzz
//! corpus (`fuzz/corpus/<target>/`) through the same checks as the cargo-fuzz targets
//! (`fuzz/src/checks.rs`, included here), on stable. Fuzzing itself needs nightly and
//! libFuzzer; the commands are in docs/RELIABILITY.md, "Fuzzing".

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

#[allow(unreachable_pub, dead_code)]
#[path = "../../fuzz/src/checks.rs"]
mod checks;

fn corpus_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus")
}

/// The files of one target's corpus, sorted by name.
fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = corpus_root().join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a corpus entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

/// Runs `check` on every file of `target`'s corpus, and fails listing the files it panicked on.
fn replay(target: &str, check: fn(&[u8])) {
    let files = corpus(target);
    assert!(!files.is_empty(), "the corpus of {target} is empty");
    let failed: Vec<String> = files
        .iter()
        .filter(|path| {
            let data = std::fs::read(path).expect("a readable corpus file");
            catch_unwind(AssertUnwindSafe(|| check(&data))).is_err()
        })
        .map(|path| path.display().to_string())
        .collect();
    assert!(
        failed.is_empty(),
        "{target}: {} of {} corpus files fail (reproduce with `cargo +nightly fuzz run {target} <file>` in fuzz/):\n{}",
        failed.len(),
        files.len(),
        failed.join("\n")
    );
    println!("{target}: {} corpus files replayed", files.len());
}

#[test]
fn extension_event_corpus() {
    replay("extension_event", checks::extension_event);
}

#[test]
fn runtime_headers_corpus() {
    replay("runtime_headers", checks::runtime_headers);
}

#[test]
fn line_answers_corpus() {
    replay("line_answers", checks::line_answers);
}

/// A target added to the fuzz crate must be replayed here too.
#[test]
fn every_corpus_is_replayed() {
    let mut targets: Vec<String> = std::fs::read_dir(corpus_root())
        .expect("fuzz/corpus")
        .map(|entry| {
            entry
                .expect("a corpus dir")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    targets.sort();
    assert_eq!(
        targets,
        ["extension_event", "line_answers", "runtime_headers"]
    );
}
