//! The function-graph tracer on `#[traceable]` functions, whose sites have exit paths:
//! the light path (`site::fgraph` in probe-rt), which records calls without return
//! probes' instances (so without their `maxactive` limit), and its hand-overs with the
//! full path when other probes share a site.
//!
//! One tracer at a time takes the light path, so these tests take turns (`TURN`).

use probekit::trace::{Snapshot, ThreadTrace, Tracer};
use probekit::{PtRegs, ReturnProbe};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

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

mod switching {
    use super::black_box;
    #[probekit::traceable]
    pub fn hot(x: u64) -> u64 {
        black_box(x ^ 0x5a)
    }
}

fn empty_return(_r: &PtRegs, _: &mut ()) {}

/// Another return probe on the site comes and goes while threads call it: the site's
/// exit path changes between the light and the full trampolines under the calls, and
/// a call may enter through one and return through the other. Every call is recorded
/// once (kept or counted lost), returned, with its value.
#[test]
fn calls_across_changes_of_path_are_each_recorded_once() {
    let _turn = turn();
    const THREADS: usize = 3;
    let tracer = Tracer::builder().pattern(&glob("switching")).args(1).retval().register().unwrap();
    tracer.start();
    let stop = AtomicBool::new(false);
    let total: u64 = std::thread::scope(|s| {
        let workers: Vec<_> = (0..THREADS)
            .map(|_| {
                s.spawn(|| {
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        assert_eq!(switching::hot(black_box(n)), n ^ 0x5a);
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        for _ in 0..40 {
            let p = ReturnProbe::builder().function(switching::hot as fn(u64) -> u64).handler(empty_return).register().unwrap();
            std::thread::sleep(std::time::Duration::from_micros(200));
            drop(p);
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        stop.store(true, Ordering::Relaxed);
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    tracer.stop();
    let snap = tracer.snapshot();
    assert_eq!(tracer.nmissed(), 0);
    // The rings wrap (millions of calls): what they no longer hold is counted.
    assert_eq!(snap.calls() as u64 + snap.lost(), total);
    for t in &snap.threads {
        for c in &t.calls {
            assert!(!c.unwound && c.depth == 0);
            assert_eq!(c.ret, Some(c.args()[0] ^ 0x5a));
        }
    }
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
