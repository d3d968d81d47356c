//! Many threads alive at once, each hitting probes (issue 12, "Any number of
//! threads"):
//!
//! - `two_thousand_threads`: while [`THREADS`] threads call probed functions in a loop,
//!   the main thread registers and unregisters probes for [`ROUNDS`] rounds, on the
//!   functions they call, four per round. Every thread must have an entry in the grace
//!   periods' thread table (no fallback to listing the process's threads), a grace
//!   period must complete with all of them alive, and the records of unregistered
//!   probes must be reused (far fewer records taken than cycles made), which needs
//!   grace periods that complete with every thread in them. Every call's result must
//!   be right, every registration must succeed, and the two probes live throughout
//!   must count every call.
//! - `thread_entries_are_reused`: threads that exit give their table entries back: a
//!   second wave of [`THREADS`] threads alive at once, then threads started one after
//!   another, take the entries of the exited ones instead of growing the table.
//!
//! Times per registration and unregistration (a grace period runs inside a
//! registration now and then) and of one grace period are printed, not asserted.

use probekit::__private::{grace_period, record_counts, thread_table};
use probekit::{Probe, ProbeHandle, PtRegs};
use scale_tests::*;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Threads alive at once. The issue asks for at least 2,000 on both lanes; kept on
/// aarch64 (qemu-user runs each guest thread as a host thread). Before the thread
/// table grew without a cap (2026-12), it held 1,024 threads and past that a grace
/// period sampled every thread listed in `/proc/self/task`: natively all 2,000 passed
/// that way, one thread at a time; under qemu-aarch64, whose own threads are listed
/// too and never answer, 1,000 threads passed and 1,100 did not (no grace period
/// completed, retired records were never reused).
const THREADS: usize = 2_000;
/// Rounds of four registrations and four unregistrations: 4,800 cycles, well past the
/// 1,100 the reuse needs.
const ROUNDS: usize = 1_200;
/// Each thread's stack: small, so that 2,000 of them are cheap (a breakpoint hit needs
/// about 3.4 KiB of it, see probe-rt's `probe` docs).
const STACK: usize = 64 << 10;
/// How long a thread sleeps between two rounds of calls (longer under qemu, whose traps
/// cost ~10 times more). The threads are there to be
/// alive and in the hit paths, not to saturate the machine: with 20 ms, 2,000 threads
/// kept two cores busy (load ~1,400), every grace period waited for 2,000 runnable
/// threads to be scheduled, single registrations took up to 12 s and the rounds did
/// not finish in 10 minutes. With 100 ms they make ~20,000 rounds of calls a second.
const PAUSE: Duration = Duration::from_millis(if SLOW_LANE { 500 } else { 100 });

#[test]
fn two_thousand_threads() {
    run_child("child_two_thousand_threads", timeout(300));
}

#[test]
#[ignore = "child of two_thousand_threads"]
fn child_two_thousand_threads() {
    if is_child() {
        threads();
    }
}

/// Hits of the probes registered and unregistered during the rounds.
static CHURN_HITS: AtomicU64 = AtomicU64::new(0);

fn churn(_: &PtRegs) {
    CHURN_HITS.fetch_add(1, Ordering::Relaxed);
}

/// What the threads share.
struct Shared {
    stop: AtomicBool,
    /// Threads that made their first calls.
    ready: AtomicUsize,
    /// Calls with a wrong result.
    wrong: AtomicU64,
}

/// One thread's loop: `scale_bp_0` and `scale_site_0` (probed throughout), and a
/// plain and a traceable function that the rounds probe in turn, until told to stop.
/// Returns how many times it called each of the first two.
fn worker(id: usize, shared: &Shared) -> u64 {
    let mut calls = 0u64;
    loop {
        let k = 1 + (id + calls as usize) % (BP_FUNCTIONS - 1);
        let j = 1 + (id + calls as usize) % (SITE_FUNCTIONS - 1);
        let x = id as u64 * 1_000_003 + calls;
        let ok =
            call_bp(0) == bp_expected(0) && call_site(0, x) == site_expected(0, x) && call_bp(k) == bp_expected(k) && call_site(j, x) == site_expected(j, x);
        if !ok {
            shared.wrong.fetch_add(1, Ordering::Relaxed);
        }
        calls += 1;
        if calls == 1 {
            shared.ready.fetch_add(1, Ordering::Release);
        }
        if shared.stop.load(Ordering::Acquire) {
            return calls;
        }
        std::thread::sleep(PAUSE);
    }
}

/// A generated function, by index.
#[derive(Clone, Copy, Debug)]
enum Target {
    Bp(usize),
    Site(usize),
}

impl Target {
    /// Registers a probe on it that counts into [`CHURN_HITS`].
    fn register(self) -> Result<ProbeHandle, probekit::Error> {
        match self {
            Target::Bp(n) => Probe::builder().function(BP_TABLE[n]).pre(churn).register(),
            Target::Site(n) => Probe::builder().function(SITE_TABLE[n]).pre(churn).register(),
        }
    }
}

fn threads() {
    // A knob for investigating (`PROBEKIT_SCALE_THREADS=500`): how the time depends on
    // the thread count. The test asserts with the default.
    let threads = std::env::var("PROBEKIT_SCALE_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(THREADS);
    let site_addrs = site_addresses();
    let bp_addrs: Vec<usize> = (0..BP_FUNCTIONS).map(bp_address).collect();
    let before: Vec<_> = bp_addrs.iter().chain(&site_addrs).map(|a| text_at(*a)).collect();
    set_hit_table(vec![bp_addrs[0], site_addrs[0]]);
    let fixed_bp = Probe::builder().function(BP_TABLE[0]).pre(count_hit).register().expect("the breakpoint probe threads hit");
    let fixed_site = Probe::builder().function(SITE_TABLE[0]).pre(count_hit).register().expect("the site probe threads hit");

    let shared = Arc::new(Shared { stop: AtomicBool::new(false), ready: AtomicUsize::new(0), wrong: AtomicU64::new(0) });
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|id| {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("scale-{id}"))
                .stack_size(STACK)
                .spawn(move || worker(id, &shared))
                .unwrap_or_else(|e| panic!("start thread {id} of {threads}: {e}"))
        })
        .collect();
    while shared.ready.load(Ordering::Acquire) < threads {
        std::thread::sleep(Duration::from_millis(10));
    }
    measure("threads", format!("{threads} alive, each made its first calls, after {:.2} s", start.elapsed().as_secs_f64()));
    let table = thread_table();
    measure("thread table", format!("{table:?}"));
    assert!(!table.fallback && table.taken >= threads, "every thread that hit a probe has an entry of its own: {table:?}");
    let t = Instant::now();
    assert!(grace_period(), "a grace period completes with {threads} threads alive");
    measure("grace period", format!("{} with {threads} threads alive", per(t.elapsed(), 1)));
    let (taken_before, ..) = record_counts();

    // The rounds: four probes registered, then unregistered, while every thread calls.
    let (mut reg_time, mut unreg_time, mut slowest) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let rounds_start = Instant::now();
    for r in 0..ROUNDS {
        let k = 1 + r % (BP_FUNCTIONS - 1);
        let j = 1 + r % (SITE_FUNCTIONS - 1);
        let mut live = Vec::with_capacity(4);
        for (what, f) in [("scale_bp_0", Target::Bp(0)), ("scale_site_0", Target::Site(0)), ("scale_bp_k", Target::Bp(k)), ("scale_site_j", Target::Site(j))] {
            let t = Instant::now();
            let p =
                f.register().unwrap_or_else(|e| panic!("round {r} of {ROUNDS}: a probe on {what} ({f:?}) was refused, with {threads} threads running: {e}"));
            let d = t.elapsed();
            reg_time += d;
            slowest = slowest.max(d);
            live.push(p);
        }
        let t = Instant::now();
        for p in live {
            p.unregister().unwrap_or_else(|e| panic!("round {r}: unregister: {e}"));
        }
        unreg_time += t.elapsed();
        if (r + 1) % 100 == 0 {
            measure(
                "progress",
                format!("{} rounds after {:.2} s, slowest registration so far {}", r + 1, rounds_start.elapsed().as_secs_f64(), per(slowest, 1)),
            );
        }
    }
    let cycles = 4 * ROUNDS;
    let (taken_after, retired, free) = record_counts();
    measure("records", format!("{} taken for {cycles} cycles, {retired} retired, {free} free at the end", taken_after - taken_before));
    // Without reuse every cycle takes a record; with it, about a reclaim batch or two
    // (plus those taken while a grace period could not complete, retried every 100 ms).
    assert!(taken_after - taken_before <= cycles / 4, "records are reused: {} taken for {cycles} cycles", taken_after - taken_before);
    measure(
        "rounds",
        format!(
            "{ROUNDS} rounds, {cycles} register/unregister cycles in {:.2} s, {} probe hits meanwhile",
            rounds_start.elapsed().as_secs_f64(),
            CHURN_HITS.load(Ordering::Relaxed)
        ),
    );
    measure("register (threads running)", format!("{} per probe, slowest {}", per(reg_time, cycles), per(slowest, 1)));
    measure("unregister (threads running)", per(unreg_time, cycles));

    shared.stop.store(true, Ordering::Release);
    let calls: Vec<u64> = handles.into_iter().map(|h| h.join().expect("a worker thread panicked")).collect();
    let total: u64 = calls.iter().sum();
    measure("calls", format!("{total} per probed function, {} per thread at least", calls.iter().min().unwrap_or(&0)));

    assert_eq!(shared.wrong.load(Ordering::Relaxed), 0, "calls with a wrong result");
    assert_eq!(stray_hits(), 0, "no handler ran at an address that is no probed function");
    assert_eq!((fixed_bp.nhit(), fixed_bp.nmissed()), (total, 0), "(nhit, nmissed) of the breakpoint probe every thread hit");
    assert_eq!((fixed_site.nhit(), fixed_site.nmissed()), (total, 0), "(nhit, nmissed) of the site probe every thread hit");
    assert_eq!((hits_at(bp_addrs[0]), hits_at(site_addrs[0])), (total, total), "hits counted at each function's own address");
    fixed_bp.unregister().expect("unregister");
    fixed_site.unregister().expect("unregister");
    let after: Vec<_> = bp_addrs.iter().chain(&site_addrs).map(|a| text_at(*a)).collect();
    assert!(before == after, "the text of every generated function is restored byte for byte");
}

#[test]
fn thread_entries_are_reused() {
    run_child("child_thread_entries_are_reused", timeout(120));
}

#[test]
#[ignore = "child of thread_entries_are_reused"]
fn child_thread_entries_are_reused() {
    if is_child() {
        entries_reused();
    }
}

/// Threads started one after another in `entries_reused`.
const ONE_BY_ONE: usize = 3_000;

/// How much the table may grow while threads take entries back: a recording thread
/// looks at a few entries only, and one that finds them all held (by threads still
/// exiting, or by others of its wave racing it) takes a new one. Without reuse the
/// table grows by one entry per thread.
const SLACK: usize = 16;

/// `n` threads alive at once, each having called `scale_bp_0` once; they exit when the
/// returned closure is called, which joins them and returns their ids.
fn wave(n: usize) -> impl FnOnce() -> Vec<i32> {
    let barrier = Arc::new(std::sync::Barrier::new(n + 1));
    let ready = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let (barrier, ready) = (Arc::clone(&barrier), Arc::clone(&ready));
            std::thread::Builder::new()
                .stack_size(STACK)
                .spawn(move || {
                    assert_eq!(call_bp(0), bp_expected(0));
                    ready.fetch_add(1, Ordering::Release);
                    barrier.wait();
                    // SAFETY: gettid has no preconditions.
                    unsafe { libc::gettid() }
                })
                .unwrap_or_else(|e| panic!("start thread {i} of {n}: {e}"))
        })
        .collect();
    while ready.load(Ordering::Acquire) < n {
        std::thread::sleep(Duration::from_millis(5));
    }
    move || {
        barrier.wait();
        handles.into_iter().map(|h| h.join().expect("a thread")).collect()
    }
}

/// Waits until the kernel finds none of `tids` any more (a joined thread may still be
/// exiting).
fn wait_gone(tids: &[i32]) {
    let start = Instant::now();
    let alive = || tids.iter().filter(|t| std::path::Path::new(&format!("/proc/self/task/{t}")).exists()).count();
    while alive() > 0 {
        assert!(start.elapsed() < Duration::from_secs(30), "{} threads still listed 30 s after they were joined", alive());
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn entries_reused() {
    set_hit_table(vec![bp_address(0)]);
    let probe = Probe::builder().function(BP_TABLE[0]).pre(count_hit).register().expect("a probe");

    // A first wave: every thread gets an entry, past the 1,024 of the old table.
    let join = wave(THREADS);
    let first = thread_table();
    measure("first wave", format!("{THREADS} threads alive: {first:?}"));
    assert!(!first.fallback && first.taken >= THREADS && first.entries >= THREADS, "an entry each: {first:?}");
    assert!(grace_period(), "a grace period completes with {THREADS} threads alive");
    let tids = join();
    wait_gone(&tids);

    // A grace period frees the entries of the threads it finds gone.
    assert!(grace_period(), "a grace period completes");
    let freed = thread_table();
    measure("after the first wave exited and a grace period", format!("{freed:?}"));
    assert!(freed.taken < SLACK, "the exited threads' entries are free: {freed:?}");

    // A second wave takes them instead of new ones.
    let join = wave(THREADS);
    let second = thread_table();
    measure("second wave", format!("{THREADS} threads alive: {second:?}"));
    assert!(!second.fallback && second.taken >= THREADS, "an entry each: {second:?}");
    assert!(second.entries <= first.entries + SLACK, "the second wave took the first's entries: {first:?} then {second:?}");
    let tids = join();
    wait_gone(&tids);

    // Threads one after another, no grace period between: each takes back an exited
    // thread's entry itself.
    for i in 0..ONE_BY_ONE {
        std::thread::Builder::new()
            .stack_size(STACK)
            .spawn(|| assert_eq!(call_bp(0), bp_expected(0)))
            .unwrap_or_else(|e| panic!("start thread {i}: {e}"))
            .join()
            .expect("a thread");
    }
    let third = thread_table();
    measure("after threads one by one", format!("{ONE_BY_ONE} threads: {third:?}"));
    assert!(!third.fallback && third.entries <= second.entries + SLACK, "the threads took exited threads' entries: {second:?} then {third:?}");

    let hits = (2 * THREADS + ONE_BY_ONE) as u64;
    assert_eq!((probe.nhit(), probe.nmissed(), hits_at(bp_address(0))), (hits, 0, hits), "every call hit the probe");
    assert_eq!(stray_hits(), 0);
    probe.unregister().expect("unregister");
}
