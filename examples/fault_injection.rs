//! Fault injection with a return probe's entry handler, as the kernel's
//! `override_function_with_return` (bpf_override_return) does it: every third call of
//! a fallible function returns `-EIO` at once, without running the function's body,
//! and the caller's retry logic copes. Then the probe is unregistered and every call
//! succeeds the first time.
//!
//! The example checks itself (each operation succeeds, exactly `calls / 3` faults,
//! the body ran only for the others), so running it is a test.
//!
//! ```text
//! cargo run --release --example fault_injection
//! ```

use probekit::{Entry, PtRegs, ReturnProbe};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Logical operations per phase.
const OPS: u64 = 10;
/// Attempts the caller makes before it gives up on an operation.
const MAX_TRIES: u32 = 3;

/// Times `fetch`'s body ran.
static BODY_RUNS: AtomicU64 = AtomicU64::new(0);
/// Calls of `fetch` the entry handler saw.
static CALLS: AtomicU64 = AtomicU64::new(0);
/// Calls it made fail.
static INJECTED: AtomicU64 = AtomicU64::new(0);

/// The fallible function: the record `id`'s value (>= 0), or a negative errno.
///
/// Its return type is what makes `Entry::Override(v)` sound. An override skips the
/// body and hands the caller `v` in the integer return register, nothing else, so the
/// function must return exactly one integer there: an `extern "C"` `i64` is returned in
/// `rax` (System V AMD64 ABI, INTEGER class) and `x0` (AAPCS64), and every `u64` is a
/// valid `i64`. A `Result<u32, Errno>` would not do: the Rust ABI does not say how (or
/// whether in registers) an enum is returned, and one returned through a hidden
/// pointer would leave the caller reading memory nobody wrote. Hence the C convention
/// of a negative errno, which the caller turns back into a `Result` (see `try_fetch`).
#[inline(never)]
extern "C" fn fetch(id: u64) -> i64 {
    BODY_RUNS.fetch_add(1, Relaxed);
    black_box(id * 10 + 7) as i64
}

/// The entry handler: every third call fails with `-EIO` without entering `fetch`.
/// Other calls are not watched (`Skip`): there is no return handler to run, so their
/// return is not hijacked.
fn every_third_fails(_: &mut PtRegs, _: &mut ()) -> Entry {
    if (CALLS.fetch_add(1, Relaxed) + 1).is_multiple_of(3) {
        INJECTED.fetch_add(1, Relaxed);
        // -EIO as a 64-bit two's complement (the i32 sign-extends): what `fetch` would return.
        Entry::Override(i64::from(-libc::EIO) as u64)
    } else {
        Entry::Skip
    }
}

/// One call of `fetch`, its return value turned back into a `Result`.
fn try_fetch(id: u64) -> Result<u64, std::io::Error> {
    // Called through `black_box`: a real call, and the optimizer cannot assume from
    // the body it sees that `fetch` never fails.
    let f = black_box(fetch as extern "C" fn(u64) -> i64);
    match f(id) {
        v if v >= 0 => Ok(v as u64),
        e => Err(std::io::Error::from_raw_os_error(-e as i32)),
    }
}

/// A logical operation: fetches `id`, retrying transient errors (`EIO`) up to
/// `MAX_TRIES` attempts in all. Returns the value and the attempts it took.
fn fetch_with_retry(id: u64) -> Result<(u64, u32), std::io::Error> {
    let mut attempt = 1;
    loop {
        match try_fetch(id) {
            Ok(v) => return Ok((v, attempt)),
            Err(e) if e.raw_os_error() == Some(libc::EIO) && attempt < MAX_TRIES => {
                println!("  fetch({id}): attempt {attempt} failed: {e}; retrying");
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Runs `OPS` operations, checks each value, and returns how many took more than one try.
fn run_ops(first_id: u64) -> u64 {
    let mut retried = 0;
    for id in first_id..first_id + OPS {
        let (v, tries) = fetch_with_retry(id).unwrap_or_else(|e| panic!("fetch({id}) failed for good: {e}"));
        println!("fetch({id}) = {v} after {tries} attempt(s)");
        assert_eq!(v, id * 10 + 7);
        retried += u64::from(tries > 1);
    }
    retried
}

fn main() -> Result<(), probekit::Error> {
    // SAFETY: `fetch` returns an `i64`, and -EIO is a value its callers handle; skipping
    // it skips only a counter the example reads to show that it was skipped.
    let probe = unsafe { ReturnProbe::builder().function(fetch as extern "C" fn(u64) -> i64).entry_handler_mut(every_third_fails) }.register()?;
    println!("injecting -EIO into every third call of fetch at {:#x}", probe.address());
    let retried = run_ops(1);

    let (calls, injected, bodies) = (CALLS.load(Relaxed), INJECTED.load(Relaxed), BODY_RUNS.load(Relaxed));
    println!(
        "{OPS} operations: {calls} calls, {injected} failed by injection, {bodies} ran the body, {retried} retried; \
         probe: {} hits, {} missed",
        probe.nhit(),
        probe.nmissed()
    );
    // Running the example is a test: every operation succeeded (run_ops checked), and...
    assert_eq!(calls, OPS + injected, "one extra call per injected fault");
    assert_eq!(injected, calls / 3, "exactly every third call failed");
    assert_eq!(bodies, calls - injected, "the body ran only for calls not overridden");
    assert_eq!(retried, injected, "each fault cost its operation one retry (no two in a row)");
    assert_eq!((probe.nhit(), probe.nmissed()), (calls, 0));

    probe.unregister()?;
    println!("probe unregistered");
    assert_eq!(run_ops(OPS + 1), 0, "without the probe, every fetch succeeds the first time");
    let (calls_after, bodies_after) = (CALLS.load(Relaxed), BODY_RUNS.load(Relaxed));
    println!("{OPS} more operations: {} calls, all ran the body", bodies_after - bodies);
    assert_eq!(calls_after, calls, "the entry handler no longer runs");
    assert_eq!(bodies_after - bodies, OPS);
    Ok(())
}
