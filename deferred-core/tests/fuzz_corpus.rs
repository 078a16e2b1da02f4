//! Issue 5, "Bad input": the CI-sized fuzz run. Replays every file of the committed fuzz
//! corpus (`fuzz/corpus/<target>/`) through the same checks as the cargo-fuzz targets
//! (`fuzz/src/checks.rs`, included here), on stable. Fuzzing itself needs nightly and
//! libFuzzer; the commands are in docs/RELIABILITY.md, "Fuzzing".

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use deferred_core::extension::ClientError;

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

/// The seeds of `line_answers` reach what they are named for: the replay is the CI's only
/// run of the target, and a seed that fails earlier than meant (on a bare LF where the chunked
/// framing wants CRLF) leaves its case unchecked. Found by review: 14 of the 19 seeds had
/// bare-LF line ends, so no seed read a chunked body whole, and the replay passed with the
/// `Transfer-Encoding` list check, the chunk's CRLF check, the HTTP/1.0 `Transfer-Encoding`
/// refusal or the case-insensitive `Connection: close` undone.
#[test]
fn line_answers_seeds_read_as_named() {
    // An event read, and whether its connection stays open.
    let event = "200 94 bytes";
    let kept = "200 94 bytes (kept)";
    let closed = "closed";
    let expected: &[(&str, &[&str])] = &[
        ("body_until_close.txt", &[event]),
        ("chunk_without_crlf.txt", &["chunk without CRLF"]),
        ("chunked_extensions_trailers.txt", &[kept, closed]),
        ("chunked_bad_content_length.txt", &[event]),
        ("chunked_conflicting_content_lengths.txt", &[event]),
        ("chunked_over_content_length.txt", &[event]),
        ("connection_close_any_case.txt", &[event]),
        ("connection_keep_alive_close.txt", &[event]),
        ("content_length.txt", &[kept, closed]),
        ("content_length_bytewise.txt", &[kept, closed]),
        (
            "content_length_conflict.txt",
            &["conflicting Content-Length fields"],
        ),
        ("content_length_duplicate.txt", &[kept, closed]),
        ("content_length_list.txt", &[kept, "bad Content-Length"]),
        ("content_length_signed.txt", &["bad Content-Length"]),
        ("http10_keep_alive.txt", &[kept, event]),
        ("interim_100_continue.txt", &[kept, closed]),
        (
            "pipelined_answers.txt",
            &[
                kept,
                kept,
                "403 80 bytes (kept)",
                "204 0 bytes (kept)",
                kept,
                closed,
            ],
        ),
        ("switching_101.txt", &["101 Switching Protocols"]),
        (
            "transfer_encoding_gzip_chunked.txt",
            &["unsupported Transfer-Encoding"],
        ),
        (
            "transfer_encoding_http10.txt",
            &["Transfer-Encoding in HTTP/1.0"],
        ),
        ("truncated_body.txt", &[closed]),
        ("truncated_chunk.txt", &[closed]),
        ("truncated_head.txt", &[closed]),
    ];
    let root = corpus_root().join("line_answers");
    let mut wrong = Vec::new();
    for (file, outcome) in expected {
        let data = match std::fs::read(root.join(file)) {
            Ok(data) => data,
            Err(error) => {
                wrong.push(format!("{file}: {error}"));
                continue;
            }
        };
        let (&split, stream) = data.split_first().expect("a seed is not empty");
        let answers =
            deferred_core::__private::line_answers(&checks::reads(stream, split)).expect("no hang");
        let read: Vec<String> = answers
            .iter()
            .map(|answer| match answer {
                Ok((status, body, keep, _)) => {
                    let kept = if *keep { " (kept)" } else { "" };
                    format!("{status} {} bytes{kept}", body.len())
                }
                Err(ClientError::Malformed(what)) => what
                    .strip_prefix("event/next answer: ")
                    .unwrap_or(what)
                    .to_owned(),
                Err(ClientError::Transport(_)) => closed.to_owned(),
                Err(other) => format!("{other:?}"),
            })
            .collect();
        if read != *outcome {
            wrong.push(format!("{file}: read {read:?}, named for {outcome:?}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
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
