//! Issue 17, "resources that never come back" (items 10, 11 and 12): register/unregister
//! cycles of every probe kind must not grow memory or mappings, registration must
//! recover once a thread that blocked grace periods has exited, and return-probe
//! instances held by threads that died are reclaimed however many threads the process
//! has had. Each scenario runs in a child process (see the crate docs).
//!
//! 100,000 cycles of each probe kind natively, as the issue asks (about 5 s each in a
//! debug build), after 200 to warm up; 1,000 under qemu-user, where the heap is
//! bounded instead of qemu's RSS (see `RSS_BOUND`). The leak the issue measured,
//! 5.6 KiB a return probe, is 5.5 MiB over 1,000 cycles already.

use hostile_tests::{is_child, maps_lines, report, rss_bytes, run_child};
use probekit::{Probe, PtRegs, ReturnProbe};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

static HITS: AtomicU64 = AtomicU64::new(0);

fn count(_: &PtRegs) {
    HITS.fetch_add(1, Ordering::Relaxed);
}

fn count_return(_: &PtRegs, _: &mut ()) {
    HITS.fetch_add(1, Ordering::Relaxed);
}

#[inline(never)]
extern "C" fn hostile_cube(x: u64) -> u64 {
    black_box(x).wrapping_mul(x).wrapping_mul(x)
}

fn cube() -> extern "C" fn(u64) -> u64 {
    hostile_cube as extern "C" fn(u64) -> u64
}

const WARMUP: usize = 200;
/// The cycles measured: the 100,000 natively; 1,000 under qemu-user, where a
/// cycle costs ten times as much.
fn cycles() -> usize {
    if hostile_tests::emulated() {
        1_000
    } else {
        100_000
    }
}
/// How much RSS may grow over [`cycles`] cycles after the warm-up. Under qemu-user
/// the RSS is qemu's, which grows with its translation cache as patched code is
/// translated again (2.5 to 9 MiB measured over 1000 cycles, leak or not): there the
/// heap the program allocated is bounded instead ([`HEAP_BOUND`]).
const RSS_BOUND: usize = 2 << 20;
/// How much the heap in use may grow over [`cycles`] cycles after the warm-up.
const HEAP_BOUND: usize = 256 << 10;

/// Bytes of heap in use (glibc's `mallinfo2`).
fn heap_bytes() -> usize {
    // SAFETY: mallinfo2 has no preconditions; it returns a struct by value.
    unsafe { libc::mallinfo2() }.uordblks
}
/// How many mappings may be added over [`cycles`] cycles after the warm-up.
const MAPS_BOUND: usize = 8;

/// Runs `cycle` [`WARMUP`] times, measures, runs it [`cycles`] times, measures, and
/// reports both.
fn measure(mut cycle: impl FnMut()) {
    for _ in 0..WARMUP {
        cycle();
    }
    let (rss, maps, heap) = (rss_bytes(), maps_lines(), heap_bytes());
    for _ in 0..cycles() {
        cycle();
    }
    report("rss_before", rss);
    report("rss_after", rss_bytes());
    report("heap_before", heap);
    report("heap_after", heap_bytes());
    report("maps_before", maps);
    report("maps_after", maps_lines());
    report("hits", HITS.load(Ordering::Relaxed));
}

/// Runs a cycles scenario in a child of its own, with time for its 100,000 cycles.
fn run_cycles(name: &str) -> hostile_tests::Outcome {
    hostile_tests::spawn_child(name, &[], std::time::Duration::from_secs(300))
}

fn assert_bounded(out: &hostile_tests::Outcome) {
    let cycles = cycles();
    out.assert_ok();
    let d = out.describe();
    let (rss0, rss1) = (out.number("rss_before") as usize, out.number("rss_after") as usize);
    let (maps0, maps1) = (out.number("maps_before") as usize, out.number("maps_after") as usize);
    let (heap0, heap1) = (out.number("heap_before") as usize, out.number("heap_after") as usize);
    if !hostile_tests::emulated() {
        assert!(rss1 <= rss0 + RSS_BOUND, "RSS grew by {} KiB over {cycles} cycles\n{d}", (rss1 - rss0) >> 10);
    }
    assert!(heap1 <= heap0 + HEAP_BOUND, "the heap grew by {} KiB over {cycles} cycles\n{d}", (heap1 - heap0) >> 10);
    assert!(maps1 <= maps0 + MAPS_BOUND, "{} mappings added over {cycles} cycles\n{d}", maps1 - maps0);
    assert_eq!(out.number("hits"), (WARMUP + cycles) as u64, "every cycle's probe fired\n{d}");
}

#[test]
#[ignore = "a child scenario: its parent test runs it in a process of its own"]
fn child_return_probe_cycles() {
    if !is_child() {
        return;
    }
    measure(|| {
        let p = ReturnProbe::builder().function(cube()).handler(count_return).register().expect("register");
        assert_eq!(black_box(cube())(3), 27);
        p.unregister().expect("unregister");
    });
}

/// Item 10: return probes.
#[test]
fn return_probe_cycles_do_not_leak() {
    assert_bounded(&run_cycles("child_return_probe_cycles"));
}

#[test]
#[ignore = "a child scenario: its parent test runs it in a process of its own"]
fn child_probe_cycles() {
    if !is_child() {
        return;
    }
    measure(|| {
        let p = Probe::builder().function(cube()).pre(count).register().expect("register");
        assert_eq!(black_box(cube())(3), 27);
        p.unregister().expect("unregister");
    });
}

#[probekit::traceable]
fn hostile_traced(x: u64) -> u64 {
    black_box(x).wrapping_mul(5)
}

#[test]
#[ignore = "a child scenario: its parent test runs it in a process of its own"]
fn child_site_probe_cycles() {
    if !is_child() {
        return;
    }
    measure(|| {
        let p = Probe::builder().function(hostile_traced as fn(u64) -> u64).pre(count).register().expect("register");
        assert_eq!(hostile_traced(3), 15);
        p.unregister().expect("unregister");
    });
}

/// Item 10: site probes.
#[test]
fn site_probe_cycles_do_not_leak() {
    assert_bounded(&run_cycles("child_site_probe_cycles"));
}

// ---------------------------------------------------------------------------------
// Item 12: past 1,024 threads that hit probes, instances of a return probe held by
// threads that died must still be reclaimed.

/// The argument that makes `hostile_dies_inside` end its thread, holding the instance.
const DIE: u64 = u64::MAX;

#[inline(never)]
extern "C" fn hostile_dies_inside(x: u64) -> u64 {
    if black_box(x) == DIE {
        // SAFETY: ends this thread at once (no unwinding, no destructors): the thread
        // holds a return-probe instance, as one killed inside the function would.
        unsafe { libc::syscall(libc::SYS_exit, 0) };
    }
    x + 1
}

#[test]
#[ignore = "a child scenario: its parent test runs it in a process of its own"]
fn child_instances_of_dead_threads_past_1024() {
    if !is_child() {
        return;
    }
    let f = hostile_dies_inside as extern "C" fn(u64) -> u64;
    // 1,100 threads hit a probe, one after another: more than the 1,024 that the
    // thread table used to hold.
    let p = Probe::builder().function(cube()).pre(count).register().expect("register");
    for _ in 0..1100 {
        std::thread::spawn(|| assert_eq!(black_box(cube())(2), 8)).join().expect("a thread");
    }
    drop(p);
    let r = ReturnProbe::builder().function(f).handler(count_return).maxactive(4).register().expect("register");
    // Four more threads take every instance and die inside the function.
    let tids: Vec<i32> = (0..4)
        .map(|_| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                // SAFETY: gettid has no preconditions.
                tx.send(unsafe { libc::gettid() }).expect("main waits");
                black_box(f)(DIE);
            });
            rx.recv().expect("the thread's id")
        })
        .collect();
    let gone = |tid: i32| !std::path::Path::new(&format!("/proc/self/task/{tid}")).exists();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !tids.iter().all(|t| gone(*t)) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    report("threads_gone", tids.iter().all(|t| gone(*t)));
    let before = HITS.load(Ordering::Relaxed);
    for x in 0..10 {
        assert_eq!(black_box(f)(x), x + 1);
    }
    report("returns_seen", HITS.load(Ordering::Relaxed) - before);
    report("nmissed", r.nmissed());
}

/// Item 12.
#[test]
fn instances_of_dead_threads_are_reclaimed_past_1024_threads() {
    let out = run_child("child_instances_of_dead_threads_past_1024");
    out.assert_ok();
    let d = out.describe();
    assert_eq!(out.expect_value("threads_gone"), "true", "{d}");
    assert_eq!(out.number("returns_seen"), 10, "every call is watched: the dead threads' instances came back\n{d}");
    assert_eq!(out.number("nmissed"), 0, "{d}");
}

/// Item 10: breakpoint probes.
#[test]
fn probe_cycles_do_not_leak() {
    assert_bounded(&run_cycles("child_probe_cycles"));
}

// ---------------------------------------------------------------------------------
// Item 11: a thread that has hit a probe blocks SIGURG, so no grace period can finish
// while it lives; registrations use up the records. Once it has exited, registration
// must work again.

#[test]
#[ignore = "a child scenario: its parent test runs it in a process of its own"]
fn child_grace_blocked_then_thread_exits() {
    if !is_child() {
        return;
    }
    let f = cube();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (exit_tx, exit_rx) = std::sync::mpsc::channel::<()>();
    let p = Probe::builder().function(f).pre(count).register().expect("register");
    let blocker = std::thread::spawn(move || {
        // A hit first: only threads that entered a hit path are waited for.
        assert_eq!(black_box(f)(2), 8);
        // SAFETY: blocks SIGURG for this thread only, from a sigset built here.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGURG);
            assert_eq!(libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()), 0);
        }
        ready_tx.send(()).expect("main waits");
        let _ = exit_rx.recv();
    });
    ready_rx.recv().expect("the thread blocked SIGURG");
    assert_eq!(HITS.load(Ordering::Relaxed), 1);
    drop(p);
    // Cycles until a registration fails (the records are used up), at most 3000.
    let mut failed = None;
    for i in 0..3000 {
        match Probe::builder().function(f).pre(count).register() {
            Ok(p) => drop(p),
            Err(e) => {
                failed = Some((i, e));
                break;
            }
        }
    }
    report("failed_while_blocked", format!("{failed:?}"));
    exit_tx.send(()).expect("the thread waits");
    blocker.join().expect("the thread exits");
    let r = Probe::builder().function(f).pre(count).register();
    report("after_exit", format!("{:?}", r.as_ref().map(|_| ())));
    let before = HITS.load(Ordering::Relaxed);
    assert_eq!(black_box(f)(3), 27);
    report("fires_after_exit", HITS.load(Ordering::Relaxed) == before + 1);
}

/// Item 11.
#[test]
fn registration_recovers_after_blocking_thread_exits() {
    let out = run_child("child_grace_blocked_then_thread_exits");
    out.assert_ok();
    let d = out.describe();
    assert_eq!(out.expect_value("after_exit"), "Ok(())", "registration must work again once the thread that blocked SIGURG has exited\n{d}");
    assert_eq!(out.expect_value("fires_after_exit"), "true", "{d}");
}
