//! The function-graph tracer on `#[traceable]` functions, whose sites have exit paths:
//! the light path (`site::fgraph` in probe-rt), which records calls without return
//! probes' instances (so without their `maxactive` limit), and its hand-overs with the
//! full path when other probes share a site.
//!
//! One tracer at a time takes the light path, so these tests take turns (`TURN`).

use probekit::trace::{Snapshot, ThreadTrace, Tracer};
use probekit::{PtRegs, ReturnProbe};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

#[path = "common/unwound.rs"]
mod unwound;

static TURN: Mutex<()> = Mutex::new(());

fn turn() -> std::sync::MutexGuard<'static, ()> {
    TURN.lock().unwrap_or_else(|p| p.into_inner())
}

/// The functions of a module, as the tracer's glob names them.
fn glob(module: &str) -> String {
    format!("{}::{module}::*", module_path!())
}

/// Every call of `t` lies inside the call one level up that began last before it.
fn check_nesting(t: &ThreadTrace) {
    let mut open: Vec<(u64, u64)> = Vec::new();
    for c in &t.calls {
        open.truncate(c.depth as usize);
        assert_eq!(open.len(), c.depth as usize, "a call at depth {} without its caller", c.depth);
        if let Some(&(enter, exit)) = open.last() {
            assert!(enter <= c.enter_ns && c.exit_ns <= exit, "each call inside its caller");
        }
        open.push((c.enter_ns, c.exit_ns));
    }
}

fn short<'a>(snap: &'a Snapshot, t: &ThreadTrace, i: usize) -> &'a str {
    snap.name(&t.calls[i]).rsplit("::").next().unwrap()
}

mod threads {
    use super::black_box;
    #[probekit::traceable]
    pub fn leaf(x: u64) -> u64 {
        black_box(x * 2 + 1)
    }
    #[probekit::traceable]
    pub fn middle(x: u64) -> u64 {
        black_box(leaf(x) + leaf(x + 1))
    }
    #[probekit::traceable]
    pub fn outer(x: u64) -> u64 {
        black_box(middle(x) + middle(x + 2))
    }
}

#[test]
fn eight_threads_nest_and_add_up() {
    let _turn = turn();
    const THREADS: u64 = 8;
    const CALLS: u64 = 40;
    let tracer = Tracer::builder().pattern(&glob("threads")).args(1).retval().register().unwrap();
    assert_eq!(tracer.functions().len(), 3, "{:?}", tracer.skipped());
    tracer.start();
    std::thread::scope(|s| {
        for t in 0..THREADS {
            s.spawn(move || {
                for i in 0..CALLS {
                    let x = t * 1000 + i;
                    assert_eq!(threads::outer(black_box(x)), 8 * x + 16);
                }
            });
        }
    });
    tracer.stop();
    let snap = tracer.snapshot();
    assert_eq!(tracer.nmissed(), 0);
    assert_eq!(snap.calls() as u64, THREADS * CALLS * 7);
    let busy: Vec<&ThreadTrace> = snap.threads.iter().filter(|t| !t.calls.is_empty()).collect();
    assert_eq!(busy.len() as u64, THREADS);
    for t in busy {
        assert_eq!(t.calls.len() as u64, CALLS * 7);
        check_nesting(t);
        for (i, c) in t.calls.iter().enumerate() {
            assert!(!c.unwound);
            let x = c.args()[0];
            let (depth, ret) = match short(&snap, t, i) {
                "outer" => (0, 8 * x + 16),
                "middle" => (1, 4 * x + 4),
                "leaf" => (2, 2 * x + 1),
                other => panic!("unexpected {other}"),
            };
            assert_eq!((c.depth, c.ret), (depth, Some(ret)));
        }
    }
}

mod recursion {
    use super::black_box;
    #[probekit::traceable]
    pub fn rec(n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        black_box(rec(black_box(n - 1)) + 1)
    }
}

#[test]
fn recursion_fifty_deep_with_one_instance() {
    let _turn = turn();
    const DEPTH: u64 = 50;
    const RUNS: u64 = 5;
    // One instance per function: the return-probe path would miss all calls but one
    // of each run.
    let tracer = Tracer::builder().pattern(&glob("recursion")).args(1).retval().maxactive(1).register().unwrap();
    tracer.start();
    for _ in 0..RUNS {
        assert_eq!(recursion::rec(black_box(DEPTH)), DEPTH);
    }
    tracer.stop();
    let snap = tracer.snapshot();
    assert_eq!(tracer.nmissed(), 0);
    assert_eq!(snap.calls() as u64, RUNS * (DEPTH + 1));
    let t = snap.threads.iter().find(|t| !t.calls.is_empty()).unwrap();
    check_nesting(t);
    for run in t.calls.chunks((DEPTH + 1) as usize) {
        for (d, c) in run.iter().enumerate() {
            assert_eq!((c.depth as u64, c.args()[0], c.ret), (d as u64, DEPTH - d as u64, Some(DEPTH - d as u64)));
        }
    }
}

mod panics {
    use super::black_box;
    #[probekit::traceable]
    pub fn leaf(x: u64) -> u64 {
        if black_box(x) == 7 {
            panic!("leaf panics on 7 (expected by the test)");
        }
        x
    }
    #[probekit::traceable]
    pub fn middle(x: u64) -> u64 {
        black_box(leaf(x) + 1)
    }
    #[probekit::traceable]
    pub fn outer(x: u64) -> u64 {
        std::panic::catch_unwind(|| middle(black_box(x))).unwrap_or(99)
    }
}

#[test]
fn a_panic_caught_above_traced_sites_unwinds_their_calls() {
    let _turn = turn();
    let tracer = Tracer::builder().pattern(&glob("panics")).exclude("*{{closure}}*").retval().register().unwrap();
    assert_eq!(tracer.functions().len(), 3, "{:?}", tracer.skipped());
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    tracer.start();
    assert_eq!(panics::outer(black_box(7)), 99);
    assert_eq!(panics::outer(black_box(3)), 4);
    tracer.stop();
    std::panic::set_hook(hook);
    let snap = tracer.snapshot();
    let t = snap.threads.iter().find(|t| !t.calls.is_empty()).unwrap();
    check_nesting(t);
    let seen: Vec<(&str, u32, bool, Option<u64>)> =
        (0..t.calls.len()).map(|i| (short(&snap, t, i), t.calls[i].depth, t.calls[i].unwound, t.calls[i].ret)).collect();
    assert_eq!(
        seen,
        [
            ("outer", 0, false, Some(99)),
            ("middle", 1, true, None),
            ("leaf", 2, true, None),
            ("outer", 0, false, Some(4)),
            ("middle", 1, false, Some(4)),
            ("leaf", 2, false, Some(3)),
        ]
    );
}

mod abandoned {
    use super::black_box;
    #[probekit::traceable]
    pub fn leaf(x: u64) -> u64 {
        if black_box(x) == 7 {
            panic!("leaf panics on 7 (expected by the test)");
        }
        x
    }
    /// Stack-passed arguments enough for an exit-path frame over 128 bytes (x86_64's
    /// `add rsp, imm32`; `leaf`'s takes an `imm8`).
    #[probekit::traceable]
    #[allow(clippy::too_many_arguments)]
    #[rustfmt::skip]
    pub fn middle(x: u64, a: u64, b: u64, c: u64, d: u64, e: u64, f: u64, g: u64, h: u64, i: u64, j: u64, k: u64, l: u64, m: u64,
                  n: u64, o: u64, p: u64, q: u64, r: u64, s: u64, t: u64, u: u64, v: u64, w: u64) -> u64 {
        black_box(leaf(x) + 1 + [a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p, q, r, s, t, u, v, w].iter().sum::<u64>())
    }
    #[probekit::traceable]
    pub fn later(x: u64) -> u64 {
        black_box(x)
    }
}

/// Untraced: catches the panic of `middle(x)` → `leaf(x)`.
#[inline(never)]
fn catch_middle(x: u64) -> Option<u64> {
    std::panic::catch_unwind(|| abandoned::middle(black_box(x), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)).ok()
}

/// Untraced: calls `later` from a frame of its own, below where `middle` stood.
#[inline(never)]
fn later_from_deeper(x: u64) -> u64 {
    let pad = black_box([x; 32]);
    black_box(abandoned::later as fn(u64) -> u64)(pad[31])
}

/// The light path's exit paths end the calls a caught panic abandons as it unwinds
/// them (see `unwound::check_calls_abandoned_by_a_caught_panic`).
#[test]
fn a_panic_caught_in_untraced_code_ends_the_light_calls_as_it_unwinds_them() {
    let _turn = turn();
    let tracer = Tracer::builder().pattern(&glob("abandoned")).exclude("*{{closure}}*").retval().register().unwrap();
    assert_eq!(tracer.functions().len(), 3, "{:?}", tracer.skipped());
    tracer.start();
    unwound::check_calls_abandoned_by_a_caught_panic(|| tracer.snapshot(), catch_middle, later_from_deeper);
    tracer.stop();
}

mod switching {
    use super::black_box;
    #[probekit::traceable]
    pub fn hot(x: u64) -> u64 {
        black_box(x ^ 0x5a)
    }
}

fn empty_return(_r: &PtRegs, _: &mut ()) {}

/// Calls `hot` from `THREADS` threads in `ROUNDS` rounds of `PER_ROUND` calls each,
/// while `flip(round)` runs between rounds on this thread (a round's calls overlap the
/// flip after it: the workers start the next round as soon as it is announced).
/// Returns the calls made.
fn under_flips(flip: impl Fn(u32)) -> u64 {
    const THREADS: u64 = 3;
    const ROUNDS: u32 = 40;
    const PER_ROUND: u64 = 500;
    let round = AtomicU32::new(0);
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            s.spawn(|| {
                for r in 0..ROUNDS {
                    while round.load(Ordering::Acquire) < r {
                        std::hint::spin_loop();
                    }
                    for i in 0..PER_ROUND {
                        let n = u64::from(r) * PER_ROUND + i;
                        assert_eq!(switching::hot(black_box(n)), n ^ 0x5a);
                    }
                }
            });
        }
        for r in 0..ROUNDS {
            round.store(r, Ordering::Release);
            flip(r);
        }
    });
    THREADS * u64::from(ROUNDS) * PER_ROUND
}

/// Checks that `tracer` recorded each of `total` calls of `switching::hot` once,
/// returned, with its value (every ring holds them all: none is lost).
fn each_call_once(tracer: &Tracer, total: u64) {
    let snap = tracer.snapshot();
    assert_eq!(tracer.nmissed(), 0);
    assert_eq!(snap.lost(), 0);
    assert_eq!(snap.calls() as u64, total);
    let mut args: Vec<u64> = Vec::new();
    for t in &snap.threads {
        for c in &t.calls {
            assert!(!c.unwound && c.depth == 0, "{c:?}");
            assert_eq!(c.ret, Some(c.args()[0] ^ 0x5a));
            args.push(c.args()[0]);
        }
    }
    // Each thread makes the calls 0..total/THREADS once.
    args.sort_unstable();
    assert!(args.chunks(3).enumerate().all(|(i, c)| c.iter().all(|a| *a == i as u64)));
}

/// Another return probe on the site comes and goes while threads call it: the site's
/// exit path changes between the light and the full trampolines under the calls, and
/// a call may enter through one and return through the other. Every call is recorded
/// once, returned, with its value.
#[test]
fn calls_across_changes_of_path_are_each_recorded_once() {
    let _turn = turn();
    let tracer = Tracer::builder().pattern(&glob("switching")).args(1).retval().threads(4).capacity(1 << 15).register().unwrap();
    tracer.start();
    let probe = Mutex::new(None);
    let total = under_flips(|r| {
        let mut p = probe.lock().unwrap();
        *p = match p.take() {
            None => Some(ReturnProbe::builder().function(switching::hot as fn(u64) -> u64).handler(empty_return).register().unwrap()),
            Some(_) => None,
        };
        let _ = r;
    });
    tracer.stop();
    each_call_once(&tracer, total);
}

static ENTRIES: AtomicU64 = AtomicU64::new(0);
static RETURNS: AtomicU64 = AtomicU64::new(0);

/// The same with the other return probe registered throughout, disabled and enabled:
/// while it is registered the site keeps the full trampolines, so that every call it
/// watched runs its return handler, disabled or not (as `disable` promises).
#[test]
fn a_return_probe_disabled_and_enabled_beside_the_tracer_sees_every_return() {
    let _turn = turn();
    let tracer = Tracer::builder().pattern(&glob("switching")).args(1).retval().threads(4).capacity(1 << 15).register().unwrap();
    tracer.start();
    let probe = ReturnProbe::builder()
        .function(switching::hot as fn(u64) -> u64)
        .entry_handler(|_, _: &mut ()| {
            ENTRIES.fetch_add(1, Ordering::Relaxed);
            true
        })
        .handler(|_, _| {
            RETURNS.fetch_add(1, Ordering::Relaxed);
        })
        .register()
        .unwrap();
    let total = under_flips(|r| if r % 2 == 0 { probe.disable().unwrap() } else { probe.enable().unwrap() });
    tracer.stop();
    drop(probe);
    each_call_once(&tracer, total);
    assert!(ENTRIES.load(Ordering::Relaxed) > 0);
    assert_eq!(RETURNS.load(Ordering::Relaxed), ENTRIES.load(Ordering::Relaxed));
}

/// A second tracer on the same functions meanwhile takes the return-probe path (the
/// light one is the first's): both record every call.
#[test]
fn two_tracers_on_one_site_both_record_every_call() {
    let _turn = turn();
    const CALLS: u64 = 100;
    let first = Tracer::builder().pattern(&glob("switching")).retval().register().unwrap();
    let second = Tracer::builder().pattern(&glob("switching")).retval().register().unwrap();
    first.start();
    second.start();
    for i in 0..CALLS {
        assert_eq!(switching::hot(black_box(i)), i ^ 0x5a);
    }
    first.stop();
    second.stop();
    for tracer in [&first, &second] {
        let snap = tracer.snapshot();
        assert_eq!(snap.calls() as u64, CALLS);
        assert!(snap.threads.iter().flat_map(|t| &t.calls).all(|c| !c.unwound && c.ret.is_some()));
    }
}

mod inflight {
    use std::sync::atomic::{AtomicBool, Ordering};
    pub static INSIDE: AtomicBool = AtomicBool::new(false);
    pub static GO: AtomicBool = AtomicBool::new(false);
    #[probekit::traceable]
    pub fn slow(x: u64) -> u64 {
        INSIDE.store(true, Ordering::SeqCst);
        while !GO.load(Ordering::SeqCst) {
            std::hint::spin_loop();
        }
        x + 1
    }
}

static INFLIGHT_RETURNS: AtomicU64 = AtomicU64::new(0);

/// A call a return probe watches, then the probe disabled while the call runs: its
/// return handler still runs (the site keeps the full trampolines while the probe is
/// registered), and the tracer records the call.
#[test]
fn disable_beside_the_tracer_runs_the_return_handler_of_a_call_in_flight() {
    let _turn = turn();
    let tracer = Tracer::builder().pattern(&glob("inflight")).retval().register().unwrap();
    tracer.start();
    let r = ReturnProbe::builder()
        .function(inflight::slow as fn(u64) -> u64)
        .handler(|_, _: &mut ()| {
            INFLIGHT_RETURNS.fetch_add(1, Ordering::SeqCst);
        })
        .register()
        .unwrap();
    let h = std::thread::spawn(|| inflight::slow(black_box(1)));
    while !inflight::INSIDE.load(Ordering::SeqCst) {
        std::hint::spin_loop();
    }
    r.disable().unwrap();
    inflight::GO.store(true, Ordering::SeqCst);
    assert_eq!(h.join().unwrap(), 2);
    tracer.stop();
    assert_eq!(INFLIGHT_RETURNS.load(Ordering::SeqCst), 1, "the watched call's return handler ran");
    let snap = tracer.snapshot();
    let calls: Vec<_> = snap.threads.iter().flat_map(|t| &t.calls).collect();
    assert_eq!(calls.len(), 1);
    assert_eq!((calls[0].unwound, calls[0].ret), (false, Some(2)));
}

mod stale {
    #[probekit::traceable]
    pub fn a(x: u64) -> u64 {
        std::hint::black_box(x + 1000)
    }
    #[probekit::traceable]
    pub fn b(x: u64) -> u64 {
        std::hint::black_box(x + 2000)
    }
}

#[inline(never)]
fn a_then_b() -> (u64, u64) {
    let ra = stale::a(black_box(1));
    let rb = stale::b(black_box(2));
    (ra, rb)
}

/// `a` is traced and overridden by another return probe's entry (so its exit path never
/// returns through the tracer's frame); `b`, called next at the same stack pointer, is
/// not traced but has a return probe: its return must not end `a`'s call.
#[test]
fn an_untraced_return_at_the_same_sp_does_not_end_a_traced_call() {
    let _turn = turn();
    let tracer = Tracer::builder().names([format!("{}::stale::a", module_path!())]).retval().register().unwrap();
    assert_eq!(tracer.functions().len(), 1, "{:?}", tracer.skipped());
    // SAFETY: `a` returns a u64, which 7 is.
    let over = unsafe {
        ReturnProbe::builder()
            .function(stale::a as fn(u64) -> u64)
            .entry_handler_mut(|_r: &mut PtRegs, _: &mut ()| probekit::Entry::Override(7))
            .register()
            .unwrap()
    };
    let rb = ReturnProbe::builder().function(stale::b as fn(u64) -> u64).handler(empty_return).register().unwrap();
    tracer.start();
    let (ra, rbv) = a_then_b();
    tracer.stop();
    drop((over, rb));
    assert_eq!((ra, rbv), (7, 2002));
    let snap = tracer.snapshot();
    assert!(snap.threads.iter().flat_map(|t| &t.calls).all(|c| c.ret != Some(2002)), "a's call recorded with b's return value");
}

mod mixed {
    #[probekit::traceable]
    pub fn g<T: Into<u64>>(x: T) -> u64 {
        let x: u64 = x.into();
        if std::hint::black_box(x) == 7 {
            panic!("g panics on 7 (expected by the test)");
        }
        x
    }
    #[probekit::traceable]
    pub fn l(x: u64) -> u64 {
        std::hint::black_box(x + 1)
    }
}

#[inline(never)]
fn run_caught(f: fn(u64) -> u64, x: u64) -> Option<u64> {
    std::panic::catch_unwind(move || f(black_box(x))).ok()
}

/// A return-probe frame (`g` is generic: its site has no exit path) abandoned by a
/// panic, then a light call (`l`) at the same stack pointer: `l` does not nest under
/// the dead `g`.
#[test]
fn a_light_entry_ends_an_abandoned_return_probe_frame_at_its_sp() {
    let _turn = turn();
    let tracer = Tracer::builder().function(mixed::g::<u64> as fn(u64) -> u64).function(mixed::l as fn(u64) -> u64).retval().register().unwrap();
    assert_eq!(tracer.functions().len(), 2, "{:?}", tracer.skipped());
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    tracer.start();
    let seen = (run_caught(mixed::g::<u64>, 7), run_caught(mixed::l, 1), run_caught(mixed::g::<u64>, 3));
    tracer.stop();
    std::panic::set_hook(hook);
    assert_eq!(seen, (None, Some(2), Some(3)));
    let snap = tracer.snapshot();
    let t = snap.threads.iter().find(|t| !t.calls.is_empty()).unwrap();
    let calls: Vec<(&str, u32, bool)> = (0..t.calls.len()).map(|i| (short(&snap, t, i), t.calls[i].depth, t.calls[i].unwound)).collect();
    assert_eq!(calls, [("g", 0, true), ("l", 0, false), ("g", 0, false)]);
}

mod errpath {
    #[probekit::traceable]
    pub fn hot(x: u64) -> u64 {
        std::hint::black_box(x ^ 1)
    }
}

/// A tracer whose registration fails takes and gives back the light path while
/// another thread returns through an exit path (each such return asks the light
/// path's holder): nothing it frees is still in use.
#[test]
fn failed_registrations_while_exit_paths_return() {
    let _turn = turn();
    let rp = ReturnProbe::builder().function(errpath::hot as fn(u64) -> u64).handler(empty_return).register().unwrap();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n = n.wrapping_add(errpath::hot(black_box(n)));
            }
            black_box(n);
        });
        for _ in 0..50 {
            assert!(Tracer::builder().pattern("no_such_module_xyz::*").threads(64).capacity(1).register().is_err());
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        stop.store(true, Ordering::Relaxed);
    });
    drop(rp);
}

mod same_ret {
    #[probekit::traceable]
    pub fn a(x: u64) -> u64 {
        if std::hint::black_box(x) == 7 {
            panic!("a panics on 7 (expected by the test)");
        }
        x + 1000
    }
    #[probekit::traceable]
    pub fn b(x: u64) -> u64 {
        std::hint::black_box(x + 2000)
    }
}

/// Each function called from the same instruction, at the same stack pointer, so with
/// the same return address.
#[inline(never)]
fn call_each(fs: &[fn(u64) -> u64], x: u64) -> Vec<Option<u64>> {
    fs.iter().map(|f| std::panic::catch_unwind(|| f(black_box(x))).ok()).collect()
}

/// `a` is traced and panics (its frame is left on the ring); `b`, called next from the
/// same instruction at the same stack pointer, is not traced but has a return probe:
/// its return through the full exit path must not end `a`'s call (returns are matched
/// by site, not only by stack pointer and return address).
#[test]
fn a_return_of_another_function_from_the_same_call_does_not_end_a_traced_call() {
    let _turn = turn();
    let tracer = Tracer::builder().names([format!("{}::same_ret::a", module_path!())]).retval().register().unwrap();
    assert_eq!(tracer.functions().len(), 1, "{:?}", tracer.skipped());
    let rb = ReturnProbe::builder().function(same_ret::b as fn(u64) -> u64).handler(empty_return).register().unwrap();
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    tracer.start();
    let seen = call_each(&[same_ret::a, same_ret::b], 7);
    tracer.stop();
    std::panic::set_hook(hook);
    drop(rb);
    assert_eq!(seen, [None, Some(2007)]);
    let snap = tracer.snapshot();
    assert!(snap.threads.iter().flat_map(|t| &t.calls).all(|c| c.ret != Some(2007)), "a's call recorded with b's return value");
}
