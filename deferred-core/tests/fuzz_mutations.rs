//! A small, stable fuzz run of the chain's HTTP reader that CI can afford: answers made by
//! mutating the `line_answers` seeds, and streams of generated answers, each checked by
//! `fuzz/src/checks.rs` (`line_answers`: no panic, no hang, and every answer read exactly as
//! `frame`, the framing written out again from RFC 9112, reads it). It keeps the reader and
//! that oracle in step: with the oracle of bbf6ece (before the reader took `Content-Length`
//! lists and ignored the length beside a chunking), it fails within seconds (found by review,
//! H17). A test binary of its own: a disagreement is an assertion of `checks.rs`, caught
//! here, and the panic hook it silences is the process's.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

#[allow(unreachable_pub, dead_code)]
#[path = "../../fuzz/src/checks.rs"]
mod checks;

/// Inputs per test: about a second each in a debug build.
const INPUTS: usize = 30_000;

#[path = "support/rng.rs"]
mod rng;
use rng::Rng;

/// Pieces of HTTP that a mutation inserts: the framing's words, its separators and faults.
const TOKENS: &[&[u8]] = &[
    b"Content-Length: ",
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: ",
    b"chunked",
    b"chunked,",
    b", ",
    b",",
    b"\r\n",
    b"0\r\n\r\n",
    b"HTTP/1.0",
    b"HTTP/1.1",
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"Connection: close\r\n",
    b"Connection: keep-alive\r\n",
    b"keep-alive",
    b"close",
    b"94",
    b"94, 94",
    b"5",
    b" ",
    b"\t",
    b"\r\n\r\n",
    b"204",
    b"304",
    b"101",
    b"5e\r\n",
    b"0;x\r\n",
    b"X-T: t\r\n",
    b"\x80",
    b"00",
    b"content-length: 94\r\n",
    b"Content-Length: 94,94\r\n",
    b"identity",
    b"\n",
];

/// One to four edits of `data` past its first byte (which cuts the stream into reads): a byte
/// changed, removed, a token inserted, a few bytes cut, a line doubled; or the cut changed.
fn mutate(rng: &mut Rng, data: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(4) {
        if data.len() < 2 {
            data.push(b'A');
        }
        let at = 1 + rng.below(data.len() - 1);
        match rng.below(7) {
            0 => data[at] = rng.next() as u8,
            1 => {
                data.remove(at);
            }
            2 | 3 => {
                let token = TOKENS[rng.below(TOKENS.len())];
                data.splice(at..at, token.iter().copied());
            }
            4 => {
                let end = (at + rng.below(8)).min(data.len());
                data.drain(at..end);
            }
            5 => {
                let start = data[..at]
                    .iter()
                    .rposition(|&b| b == b'\n')
                    .map_or(1, |p| p + 1);
                let end = data[at..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(data.len(), |p| at + p + 1);
                let line = data[start..end].to_vec();
                data.splice(start..start, line);
            }
            _ => data[0] = rng.next() as u8,
        }
    }
}

/// One answer, its framing fields drawn from the cases the RFC and the reader distinguish.
fn generated(rng: &mut Rng) -> String {
    const EVENT: &str = r#"{"eventType":"INVOKE","deadlineMs":4102444800000,"requestId":"r-1","invokedFunctionArn":"arn"}"#;
    let n = EVENT.len();
    let mut out = String::new();
    if rng.below(8) == 0 {
        out.push_str(rng.pick(&[
            "\r\n",
            "HTTP/1.1 100 Continue\r\nContent-Length: x\r\n\r\n",
            "HTTP/1.1 103 Early\r\nTransfer-Encoding: gzip\r\n\r\n",
        ]));
    }
    let version = rng.pick(&["HTTP/1.1", "HTTP/1.1", "HTTP/1.0"]);
    let status = rng.pick(&["200 OK", "200 OK", "204 No", "304 N", "500 E", "101 S"]);
    out.push_str(&format!("{version} {status}\r\n"));
    let mut fields: Vec<String> = Vec::new();
    for _ in 0..rng.below(3) {
        let coding = rng.pick(&[
            "chunked",
            "CHUNKED",
            "chunked,",
            ",chunked",
            "",
            " , ",
            "gzip",
            "chunked, chunked",
            "identity",
            "chunked ,,",
        ]);
        fields.push(format!("Transfer-Encoding: {coding}"));
    }
    for _ in 0..rng.below(3) {
        let length = match rng.below(10) {
            0 => format!("{n}, {n}"),
            1 => format!("{n},{n},{n}"),
            2 => format!("{n}, 5"),
            3 => format!("{n},"),
            4 => ",".into(),
            5 => String::new(),
            6 => format!("+{n}"),
            7 => format!("{n} , {n}"),
            8 => "0".into(),
            _ => format!("{n}"),
        };
        let name = rng.pick(&["Content-Length", "content-length"]);
        fields.push(format!("{name}: {length}"));
    }
    for _ in 0..rng.below(3) {
        let options = rng.pick(&[
            "close",
            "keep-alive",
            "Keep-Alive, close",
            ",close",
            "",
            "CLOSE",
        ]);
        fields.push(format!("Connection: {options}"));
    }
    for i in (1..fields.len()).rev() {
        fields.swap(i, rng.below(i + 1));
    }
    for field in &fields {
        out.push_str(field);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    match rng.below(4) {
        0 => out.push_str(EVENT),
        1 => out.push_str(&format!("{n:x}\r\n{EVENT}\r\n0\r\n\r\n")),
        2 => out.push_str(&format!(
            "5\r\n{}\r\n{:x}\r\n{}\r\n0\r\nX-T: t\r\n\r\n",
            &EVENT[..5],
            n - 5,
            &EVENT[5..]
        )),
        _ => {}
    }
    out
}

/// Runs `check` on `INPUTS` inputs from `next`; the first few that fail it, shown readably.
fn disagreements(mut next: impl FnMut() -> Vec<u8>) -> Vec<String> {
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut found = Vec::new();
    for _ in 0..INPUTS {
        let data = next();
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| checks::line_answers(&data))) {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            found.push(format!("{why}\n{:?}", String::from_utf8_lossy(&data)));
            if found.len() == 5 {
                break;
            }
        }
    }
    std::panic::set_hook(quiet);
    found
}

#[test]
fn mutated_seeds_read_as_the_oracle_frames_them() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/line_answers");
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .expect("the line_answers corpus")
        .map(|entry| std::fs::read(entry.expect("an entry").path()).expect("a seed"))
        .collect();
    // Sorted: the same inputs whatever order the file system lists them in.
    seeds.sort();
    let mut rng = Rng(0x1234_5678_9abc);
    let found = disagreements(|| {
        let mut data = seeds[rng.below(seeds.len())].clone();
        mutate(&mut rng, &mut data);
        data
    });
    assert!(found.is_empty(), "{}", found.join("\n\n"));
}

#[test]
fn generated_streams_read_as_the_oracle_frames_them() {
    let mut rng = Rng(0xfeed_beef_1234);
    let found = disagreements(|| {
        let mut data = vec![rng.next() as u8];
        for _ in 0..1 + rng.below(3) {
            data.extend_from_slice(generated(&mut rng).as_bytes());
        }
        data
    });
    assert!(found.is_empty(), "{}", found.join("\n\n"));
}
