//! bcc's `funclatency` in a process: a return probe times every call of a function of
//! this program, called from several threads at once, and `main` prints what bcc's
//! `funclatency spin` prints: the log2 histogram of the latencies, then `avg = …,
//! total: …, count: …` and `Detaching...` (the address, call and probe counts go to
//! stderr). `-u` and `-m` make it microseconds or milliseconds, as bcc's do.
//!
//! The entry handler stores a timestamp in the call's own data (`.data::<Call>()`, a
//! fresh `Call` per call, so concurrent calls do not share it); the return handler
//! computes the latency and counts it in a static array of atomic log2 slots (no
//! lock, no allocation: it may run anywhere the function returns). The example checks
//! itself (every call counted once, none missed, each handler pair saw its own call),
//! so running it is a test.
//!
//! Then bcc's `funclatency -F 'funclatency::nested::*'`: a glob attaches one
//! [`MultiProbe`] to every function of a module, recursive ones included, and prints
//! one histogram per function. bcc keeps one start time per thread: a nested call's
//! entry overwrites its caller's, so without `-l` only the innermost call of a nest or
//! recursion is timed (its man page: nested or recursive functions are "not supported
//! properly"); `-l LEVEL` (with `-F`, or a library's functions) keeps a stack of LEVEL
//! start times per thread instead, which pairs entries and returns for nests up to
//! LEVEL deep. Here every call has its own start time in its per-call data, at any
//! depth, so a recursive call's latency includes its callees' and no more, which the
//! example checks.
//!
//! ```text
//! cargo run --release --example funclatency [-- -u | -m]
//! ```

use bcc::{log2_slot, print_log2_hist};
use probekit::{MultiProbe, PtRegs, ReturnProbe};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Barrier;

#[path = "common/bcc.rs"]
mod bcc;

/// Threads calling the probed function at once.
const THREADS: u64 = 3;
/// Calls per thread.
const CALLS_PER_THREAD: u64 = 128;
/// Requested latencies are `[2^k, 2^(k+1))` ns for `k` in this range: 64 ns to 2 ms,
/// about 0.2 ms per call on average, so ~30 ms per thread natively.
const MIN_LOG2_NS: u64 = 6;
const MAX_LOG2_NS: u64 = 20;

/// Log2 slots as bcc's `bpf_log2l` numbers them: slot `i >= 1` holds
/// `[2^(i-1), 2^i - 1]` and slot 1 also 0; slot 0 stays empty.
static SLOTS: [AtomicU64; 65] = [const { AtomicU64::new(0) }; 65];
/// Sum of all latencies in ns, for bcc's `avg = …` line.
static TOTAL_NS: AtomicU64 = AtomicU64::new(0);
/// The histograms' unit in ns: 1, or 1000 for `-u`, 1000000 for `-m` (bcc divides the
/// latency before it finds the slot).
static UNIT_NS: AtomicU64 = AtomicU64::new(1);
/// Returns whose value was not the request their entry recorded (per-call data mixed up).
static MISMATCHED: AtomicU64 = AtomicU64::new(0);
/// Calls that measured shorter than the time they were asked to spin.
static TOO_SHORT: AtomicU64 = AtomicU64::new(0);
/// Calls between their entry and return handlers now, and the most there ever were.
static IN_FLIGHT: AtomicU64 = AtomicU64::new(0);
static MAX_IN_FLIGHT: AtomicU64 = AtomicU64::new(0);

/// One call's data: made by `Call::default()` at the entry, in the SIGTRAP handler
/// (plain integers: no allocation), seen by both handlers of that call only.
#[derive(Default)]
struct Call {
    /// `CLOCK_MONOTONIC` at the entry, in ns.
    start_ns: u64,
    /// The argument: how long the call was asked to take.
    requested_ns: u64,
}

/// `CLOCK_MONOTONIC` in nanoseconds.
///
/// The handlers call this, so it must be async-signal-safe: `clock_gettime` is on
/// POSIX's list of async-signal-safe functions (signal-safety(7)), and on Linux it is a
/// vDSO read without locks or allocation. `Instant::now` ends in the same call, but
/// only as an undocumented detail of std, and an `Instant` is opaque, while the
/// per-call data wants a plain `u64` with a `Default`.
fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC exists on every Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    debug_assert_eq!(rc, 0);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The probed function: spins for `ns` nanoseconds and returns `ns`. `extern "C"`
/// so that its argument and return value are where `PtRegs::arg(0)` and
/// `return_value()` read them (rdi/rax, x0/x0).
#[inline(never)]
extern "C" fn spin(ns: u64) -> u64 {
    let until = now_ns() + ns;
    while now_ns() < until {
        std::hint::spin_loop();
    }
    black_box(ns)
}

/// The entry handler: records what was asked and when.
fn on_entry(regs: &PtRegs, call: &mut Call) -> bool {
    call.requested_ns = regs.arg(0).unwrap_or(0);
    let now = IN_FLIGHT.fetch_add(1, Relaxed) + 1;
    MAX_IN_FLIGHT.fetch_max(now, Relaxed);
    call.start_ns = now_ns(); // last, so the handler's own work is not timed
    true // watch this call
}

/// The return handler: counts the latency in its log2 slot.
fn on_return(regs: &PtRegs, call: &mut Call) {
    let ns = now_ns().saturating_sub(call.start_ns);
    SLOTS[log2_slot(ns / UNIT_NS.load(Relaxed))].fetch_add(1, Relaxed);
    TOTAL_NS.fetch_add(ns, Relaxed);
    IN_FLIGHT.fetch_sub(1, Relaxed);
    if regs.return_value() != call.requested_ns {
        MISMATCHED.fetch_add(1, Relaxed);
    }
    if ns < call.requested_ns {
        TOO_SHORT.fetch_add(1, Relaxed);
    }
}

/// A xorshift64 step: deterministic pseudo-random requests, no dependency.
fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// What bcc prints after the histograms: the average and total in the histograms' unit
/// (`label`; bcc sums nanoseconds and divides at the end, dropping the fraction), then
/// `Detaching...`.
fn print_summary(total_ns: u64, count: u64, label: &str) {
    let total = total_ns / UNIT_NS.load(Relaxed);
    if let Some(avg) = total.checked_div(count) {
        println!();
        println!("avg = {avg} {label}, total: {total} {label}, count: {count}");
        println!();
    }
    println!("Detaching...");
}

fn main() -> Result<(), probekit::Error> {
    // bcc's -u and -m (-m wins if both are given, as in bcc).
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(bad) = args.iter().find(|a| !["-u", "-m"].contains(&a.as_str())) {
        let help = bad == "-h" || bad == "--help";
        if !help {
            eprintln!("funclatency: unexpected argument {bad:?}");
        }
        eprintln!("usage: funclatency [-u | -m]  (microsecond or millisecond histograms)");
        std::process::exit(if help { 0 } else { 2 });
    }
    let (unit_ns, label) = match (args.iter().any(|a| a == "-m"), args.iter().any(|a| a == "-u")) {
        (true, _) => (1_000_000, "msecs"),
        (false, true) => (1_000, "usecs"),
        _ => (1, "nsecs"),
    };
    UNIT_NS.store(unit_ns, Relaxed);

    let f = spin as extern "C" fn(u64) -> u64;
    // The default maxactive, max(10, 2 × CPUs), covers three threads without recursion.
    let probe = ReturnProbe::builder().function(f).data::<Call>().entry_handler(on_entry).handler(on_return).register()?;
    println!("Tracing 1 functions for \"spin\"... Hit Ctrl-C to end.");
    eprintln!("funclatency: spin at {:#x}, {THREADS} threads × {CALLS_PER_THREAD} calls", probe.address());

    let start = std::time::Instant::now();
    let barrier = Barrier::new(THREADS as usize);
    let made: u64 = std::thread::scope(|s| {
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let barrier = &barrier;
                s.spawn(move || {
                    let mut seed = 0x9e37_79b9_7f4a_7c15 ^ (t + 1);
                    barrier.wait();
                    let mut calls = 0;
                    for _ in 0..CALLS_PER_THREAD {
                        let k = MIN_LOG2_NS + xorshift(&mut seed) % (MAX_LOG2_NS - MIN_LOG2_NS + 1);
                        let ns = (1 << k) + xorshift(&mut seed) % (1 << k);
                        // Through `black_box`, a real call the optimizer cannot see into.
                        assert_eq!(black_box(f)(ns), ns);
                        calls += 1;
                    }
                    calls
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().expect("a caller thread panicked")).sum()
    });
    let elapsed = start.elapsed();

    let slots: Vec<u64> = SLOTS.iter().map(|s| s.load(Relaxed)).collect();
    let counted: u64 = slots.iter().sum();
    let total = TOTAL_NS.load(Relaxed);
    println!();
    print_log2_hist(&slots, label);
    print_summary(total, counted, label);
    eprintln!(
        "funclatency: {made} calls in {:.0?}; probe: {} hits, {} missed; up to {} calls in flight at once",
        elapsed,
        probe.nhit(),
        probe.nmissed(),
        MAX_IN_FLIGHT.load(Relaxed)
    );

    // Running the example is a test.
    assert_eq!(made, THREADS * CALLS_PER_THREAD);
    assert_eq!(counted, made, "every call lands in exactly one slot");
    assert_eq!(probe.nhit(), made);
    assert_eq!(probe.nmissed(), 0);
    assert_eq!(MISMATCHED.load(Relaxed), 0, "each return saw the request its own entry recorded");
    assert_eq!(TOO_SHORT.load(Relaxed), 0, "no call returned before the time it spun");
    assert_eq!(IN_FLIGHT.load(Relaxed), 0);
    assert!(MAX_IN_FLIGHT.load(Relaxed) >= 2, "the threads' calls overlapped");
    // 64 ns to 2 ms asked for: some 15 slots in ns, 11 in µs, 2 or 3 in ms.
    assert!(slots.iter().filter(|&&c| c > 0).count() >= if unit_ns < 1_000_000 { 4 } else { 1 }, "latencies spread over several slots");
    probe.unregister()?;
    nested_by_glob(label)
}

/// The functions the glob attaches to: a recursion and the leaf it ends in.
mod nested {
    use super::spin;
    use std::hint::black_box;

    /// Spins `ns`, then recurses `levels` deep; a call at `levels = k` takes at least
    /// `(k + 1) * ns` (its own spin and its callees').
    #[inline(never)]
    pub extern "C" fn descend(levels: u64, ns: u64) -> u64 {
        spin(ns);
        black_box(if levels == 0 { leaf(ns) } else { descend(levels - 1, ns) + 1 })
    }

    /// The recursion's end: spins `ns` once more.
    #[inline(never)]
    pub extern "C" fn leaf(ns: u64) -> u64 {
        spin(ns);
        black_box(0)
    }
}

/// One call's data for the glob: when it began and how long it must take at least.
#[derive(Default)]
struct Nested {
    start_ns: u64,
    at_least_ns: u64,
}

/// Per-function histograms over a glob, recursion included (bcc's `-F`), in `label`'s unit.
fn nested_by_glob(label: &str) -> Result<(), probekit::Error> {
    const LEVELS: u64 = 6;
    const SPIN_NS: u64 = 20_000;
    const RUNS: u64 = 8;
    let pattern = "funclatency::nested::*";
    let hists: std::sync::Arc<Vec<[AtomicU64; 65]>> = std::sync::Arc::new((0..2).map(|_| [const { AtomicU64::new(0) }; 65]).collect());
    let short = std::sync::Arc::new(AtomicU64::new(0));
    let total_ns = std::sync::Arc::new(AtomicU64::new(0));
    let (h, s, t) = (hists.clone(), short.clone(), total_ns.clone());
    let probe = MultiProbe::with_data::<Nested>()
        .pattern(pattern)
        .maxactive(64)
        .entry(|regs, f, call| {
            // descend(levels, ns) takes (levels + 2) spins: its own, its callees', the leaf's.
            let spins = if f.name.ends_with("::leaf") { 1 } else { regs.arg(0).unwrap_or(0) + 2 };
            call.at_least_ns = spins * if f.name.ends_with("::leaf") { regs.arg(0).unwrap_or(0) } else { regs.arg(1).unwrap_or(0) };
            call.start_ns = now_ns();
            true
        })
        .exit(move |_regs, f, call| {
            let ns = now_ns().saturating_sub(call.start_ns);
            if let Some(slots) = h.get(f.id as usize) {
                slots[log2_slot(ns / UNIT_NS.load(Relaxed))].fetch_add(1, Relaxed);
            }
            t.fetch_add(ns, Relaxed);
            if ns < call.at_least_ns {
                s.fetch_add(1, Relaxed);
            }
        })
        .register()?;
    println!(); // between the two runs
    println!("Tracing {} functions for \"{pattern}\"... Hit Ctrl-C to end.", probe.functions().count());
    let descend = black_box(nested::descend as extern "C" fn(u64, u64) -> u64);
    for _ in 0..RUNS {
        assert_eq!(descend(LEVELS, SPIN_NS), LEVELS);
    }
    // bcc: a blank line, then per function that was called a blank line, its name and
    // its histogram, then one summary of them all.
    println!();
    let mut count = 0;
    for f in probe.functions() {
        let slots: Vec<u64> = hists[f.id as usize].iter().map(|s| s.load(Relaxed)).collect();
        count += slots.iter().sum::<u64>();
        if slots.iter().any(|&c| c > 0) {
            println!();
            println!("Function = {}", f.name);
            print_log2_hist(&slots, label);
        }
    }
    print_summary(total_ns.load(Relaxed), count, label);
    eprintln!("funclatency: {RUNS} calls of descend({LEVELS}, {SPIN_NS} ns); probe: {} hits, {} missed", probe.nhit(), probe.nmissed());

    // Running the example is a test: every call counted under its function, and no
    // call measured shorter than the spins it and its callees made.
    for (f, hits) in probe.hits() {
        let want = if f.name.ends_with("::leaf") { RUNS } else { RUNS * (LEVELS + 1) };
        assert_eq!(hits, want, "{}", f.name);
        assert_eq!(hists[f.id as usize].iter().map(|s| s.load(Relaxed)).sum::<u64>(), want);
    }
    assert_eq!(probe.functions().count(), 2);
    assert_eq!(count, RUNS * (LEVELS + 2), "the summary counts every call");
    assert_eq!(probe.nmissed(), 0);
    assert_eq!(short.load(Relaxed), 0, "each call timed from its own entry, nested calls included");
    probe.unregister()
}
