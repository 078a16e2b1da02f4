//! Identifiers and clocks: request ids, extension ids, trace ids, epoch milliseconds.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// 64 random-looking bits: SipHash with a per-process random key over a counter. Unique within
/// the process, which is all the emulator needs (no cryptographic claim).
fn random_u64() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.finish()
}

/// A random (version 4) UUID in its canonical 8-4-4-4-12 form, as Lambda uses for request ids
/// and `Lambda-Extension-Identifier`.
pub(crate) fn uuid_v4() -> String {
    let hi = (random_u64() & 0xffff_ffff_ffff_0fff) | 0x0000_0000_0000_4000;
    let lo = (random_u64() & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        hi >> 32,
        (hi >> 16) & 0xffff,
        hi & 0xffff,
        lo >> 48,
        lo & 0xffff_ffff_ffff
    )
}

/// Whether `s` parses as a UUID. The AWS emulator answers 403 `Extension.InvalidExtensionIdentifier`
/// when the header does not (aws-lambda-runtime-interface-emulator, lambda/rapi/middleware/middleware.go).
pub(crate) fn is_uuid(s: &str) -> bool {
    let bytes = s.as_bytes();
    bytes.len() == 36
        && bytes.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// An X-Ray trace header value: `Root=1-<epoch hex>-<96 bits>;Parent=<64 bits>;Sampled=0`.
pub(crate) fn trace_id() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!(
        "Root=1-{:08x}-{:08x}{:016x};Parent={:016x};Sampled=0",
        secs & 0xffff_ffff,
        random_u64() & 0xffff_ffff,
        random_u64(),
        random_u64()
    )
}

/// Milliseconds since the Unix epoch, the unit of `Lambda-Runtime-Deadline-Ms` and `deadlineMs`.
pub(crate) fn epoch_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// [`epoch_ms_now`] `after` from now: a deadline in the unit Lambda sends it in.
pub(crate) fn epoch_ms_in(after: Duration) -> u64 {
    epoch_ms_now().saturating_add(u64::try_from(after.as_millis()).unwrap_or(u64::MAX / 2))
}

/// 32 hex digits, for the log stream name.
pub(crate) fn hex128() -> String {
    format!("{:016x}{:016x}", random_u64(), random_u64())
}
