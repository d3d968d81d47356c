//! probekit at scale (issue 12): the generated functions the scale tests probe, the
//! bookkeeping that proves each probe fired on its own function, and the harness that
//! runs each scenario in a child process.
//!
//! `build.rs` generates [`BP_FUNCTIONS`] plain functions in one `global_asm!` block
//! (`scale_bp_N` returns `BP_BASE + N`) and [`SITE_FUNCTIONS`] `#[traceable]`
//! functions (`scale_site_N(x) = x + N`): breakpoint probes go on the first, site
//! probes on the second, several per function, each its own live probe.
//!
//! # Why child processes
//! A process holds one probe registry: scenarios sharing a process would share its
//! records (and, today, its 1,024-record cap) and disturb each other's timings. A
//! scenario that hangs (a grace period that never completes) must fail the test, not
//! hang CI. So each scenario is an `#[ignore]`d child test that the parent test starts
//! again in a process of its own, with a timeout, as `tests/hostile` does; under the
//! aarch64 lane the child is started through `CROSS_RUNNER` (qemu-user).

use probekit::PtRegs;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

include!(concat!(env!("OUT_DIR"), "/bp_functions.rs"));

/// The generated `#[traceable]` functions, in a module of their own so that their
/// names (`scale_tests::sites::scale_site_N`) are easy to pick out of `sites()`.
pub mod sites {
    include!(concat!(env!("OUT_DIR"), "/site_functions.rs"));
}
pub use sites::{SITE_FUNCTIONS, SITE_TABLE};

/// Whether the scenarios run on the slow lane (aarch64, which runs under qemu-user
/// here): counts that only cost time are scaled down there, and the tests say so.
pub const SLOW_LANE: bool = cfg!(target_arch = "aarch64");

/// Bytes of text snapshotted at each probed function.
pub const SNAPSHOT: usize = 16;

/// The address of `scale_bp_n`.
pub fn bp_address(n: usize) -> usize {
    BP_TABLE[n] as usize
}

/// Calls `scale_bp_n`.
pub fn call_bp(n: usize) -> u32 {
    // SAFETY: `scale_bp_n` (build.rs) takes no arguments, touches only the return
    // register, and returns: an `extern "C" fn() -> u32` as declared.
    unsafe { BP_TABLE[n]() }
}

/// What `scale_bp_n` returns.
pub fn bp_expected(n: usize) -> u32 {
    BP_BASE + n as u32
}

/// Calls `scale_site_n(x)`.
pub fn call_site(n: usize, x: u64) -> u64 {
    SITE_TABLE[n](x)
}

/// What `scale_site_n(x)` returns.
pub fn site_expected(n: usize, x: u64) -> u64 {
    x.wrapping_add(n as u64)
}

/// The site address of each `scale_site_N`, by N, from `probekit::sites()` (the
/// address a site probe reports and patches; the function pointer is a wrapper that
/// calls it).
pub fn site_addresses() -> Vec<usize> {
    let all = probekit::sites();
    SITE_TABLE
        .iter()
        .enumerate()
        .map(|(n, f)| {
            let f = *f as usize;
            all.iter().find(|s| s.function == f).unwrap_or_else(|| panic!("scale_site_{n} ({f:#x}) is not in probekit::sites()")).site
        })
        .collect()
}

/// The first [`SNAPSHOT`] bytes of text at `addr`.
pub fn text_at(addr: usize) -> [u8; SNAPSHOT] {
    let mut b = [0u8; SNAPSHOT];
    // SAFETY: `addr` is a generated function or site in this executable's text, mapped
    // readable, with at least SNAPSHOT bytes after it (build.rs pads the asm block;
    // a site is followed by its function's jump and more text). A volatile read: the
    // runtime changes these bytes behind the compiler's back.
    for (i, byte) in b.iter_mut().enumerate() {
        *byte = unsafe { std::ptr::read_volatile((addr + i) as *const u8) };
    }
    b
}

/// Hits per probed address, counted by [`count_hit`]: proves each probe fired on the
/// function it was registered on (the pc it sees), not merely that it fired.
struct HitTable {
    /// The probed addresses, sorted.
    addrs: Vec<usize>,
    /// Hits at `addrs[i]`, all probes there together.
    hits: Vec<AtomicU64>,
}

static HITS: OnceLock<HitTable> = OnceLock::new();
/// Hits whose pc is in no probed address of the table.
static STRAY: AtomicU64 = AtomicU64::new(0);
/// Return-handler runs, and those whose return value was no generated function's.
static RETURNS: AtomicU64 = AtomicU64::new(0);
static BAD_RETURNS: AtomicU64 = AtomicU64::new(0);

/// Sets the addresses [`count_hit`] counts (once per process, before any probe is
/// registered).
pub fn set_hit_table(mut addrs: Vec<usize>) {
    addrs.sort_unstable();
    addrs.dedup();
    let hits = addrs.iter().map(|_| AtomicU64::new(0)).collect();
    assert!(HITS.set(HitTable { addrs, hits }).is_ok(), "the hit table is set once");
}

/// Hits counted at `addr` so far.
pub fn hits_at(addr: usize) -> u64 {
    let t = HITS.get().expect("set_hit_table first");
    t.addrs.binary_search(&addr).map_or(0, |i| t.hits[i].load(Ordering::Relaxed))
}

/// Hits at no address of the table.
pub fn stray_hits() -> u64 {
    STRAY.load(Ordering::Relaxed)
}

/// A pre handler: counts the hit at its pc. Async-signal-safe (a lock-free read of an
/// initialised `OnceLock`, a binary search, atomics).
pub fn count_hit(regs: &PtRegs) {
    let pc = regs.instruction_pointer() as usize;
    match HITS.get().and_then(|t| t.addrs.binary_search(&pc).ok().map(|i| &t.hits[i])) {
        Some(h) => h.fetch_add(1, Ordering::Relaxed),
        None => STRAY.fetch_add(1, Ordering::Relaxed),
    };
}

/// A return handler: counts the return and checks that the value is one a generated
/// plain function returns.
pub fn count_return(regs: &PtRegs, _: &mut ()) {
    RETURNS.fetch_add(1, Ordering::Relaxed);
    let v = regs.return_value();
    if !(u64::from(BP_BASE)..u64::from(BP_BASE) + BP_FUNCTIONS as u64).contains(&v) {
        BAD_RETURNS.fetch_add(1, Ordering::Relaxed);
    }
}

/// `(returns seen, returns with a wrong value)`.
pub fn returns() -> (u64, u64) {
    (RETURNS.load(Ordering::Relaxed), BAD_RETURNS.load(Ordering::Relaxed))
}

/// Mean time per item, for the printed measurements.
pub fn per(d: Duration, n: usize) -> String {
    let ns = d.as_nanos() / n.max(1) as u128;
    match ns {
        0..=9_999 => format!("{ns} ns"),
        10_000..=9_999_999 => format!("{:.1} µs", ns as f64 / 1e3),
        _ => format!("{:.2} ms", ns as f64 / 1e6),
    }
}

/// Prints one measurement line (flushed at once, so that a child killed after it
/// keeps it): `MEASURE <what>: <value>`. The parent prints the child's output.
pub fn measure(what: &str, value: impl std::fmt::Display) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "MEASURE {what}: {value}");
    let _ = out.flush();
}

// ---- the child-process harness: tests/hostile's ----

use hostile_tests::cross_runner;
pub use hostile_tests::is_child;

/// One scenario at a time per test binary: scenarios measure time, and two at once on a
/// two-core machine would measure each other.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs child test `name` of this test binary in a process of its own (through the
/// cross runner, if any), prints what it printed, and asserts that it exited 0 within
/// `timeout`.
pub fn run_child(name: &str, timeout: Duration) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let out = hostile_tests::spawn_child(name, &[], timeout);
    println!("{}", out.describe());
    assert!(out.exited_ok(), "child `{name}` failed (its output is above)");
}

/// The time a scenario may take before it counts as hung: qemu-user is slower (the
/// scenarios measured 4 to 8 times slower there).
pub fn timeout(native_secs: u64) -> Duration {
    Duration::from_secs(if cross_runner().is_some() { native_secs * 4 } else { native_secs })
}
