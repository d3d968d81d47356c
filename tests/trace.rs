//! The function-graph tracer (issue 15): what it records and what it writes.
//!
//! Each test traces functions of its own module (tests run in parallel, each with its
//! own tracer), makes a known number of calls, and checks the snapshot, the Chrome
//! trace JSON read back with serde_json (every thread's events nest: each begin has
//! its end, in order), the folded stacks and the flame graph against those calls.

use probekit::trace::{Call, EventStyle, Full, Snapshot, Tracer, Weight};
use serde_json::Value;
use std::collections::HashMap;
use std::hint::black_box;

#[path = "common/unwound.rs"]
mod unwound;

/// The functions of a module, as the tracer's glob names them.
fn glob(module: &str) -> String {
    format!("trace::{module}::*")
}

/// A timestamp of the JSON (µs) in ns, as Perfetto reads it: `llround(ts * 1000)`.
fn ns(v: &Value) -> i64 {
    (v.as_f64().expect("a number") * 1000.0).round() as i64
}

/// Reads the Chrome trace JSON back and checks its events nest on every thread.
/// Returns the call events (`X`, or `B` with their `E`) per thread: `(name, begin ns, end ns, depth)`.
fn read_chrome(snap: &Snapshot, style: EventStyle) -> HashMap<i64, Vec<(String, i64, i64, usize)>> {
    let mut json = Vec::new();
    snap.write_chrome_json(&mut json, style).unwrap();
    let v: Value = serde_json::from_slice(&json).expect("the trace is JSON");
    let events = v["traceEvents"].as_array().expect("traceEvents is an array");
    let mut names = HashMap::new();
    let mut out: HashMap<i64, Vec<(String, i64, i64, usize)>> = HashMap::new();
    let mut open: HashMap<i64, Vec<(String, i64)>> = HashMap::new();
    for e in events {
        let tid = e["tid"].as_i64().unwrap_or(0);
        let name = e["name"].as_str().unwrap().to_string();
        match e["ph"].as_str().unwrap() {
            "M" => {
                if name == "thread_name" {
                    names.insert(tid, e["args"]["name"].as_str().unwrap().to_string());
                }
            }
            "X" => {
                let (ts, dur) = (ns(&e["ts"]), ns(&e["dur"]));
                assert!(dur >= 0);
                out.entry(tid).or_default().push((name, ts, ts + dur, 0));
            }
            "B" => {
                let ts = ns(&e["ts"]);
                let stack = open.entry(tid).or_default();
                if let Some((_, parent)) = stack.last() {
                    assert!(*parent <= ts, "a begin before its parent's");
                }
                stack.push((name, ts));
            }
            "E" => {
                let ts = ns(&e["ts"]);
                let stack = open.entry(tid).or_default();
                let depth = stack.len() - 1;
                let (begun, at) = stack.pop().expect("every end has a begin");
                assert_eq!(begun, name, "an end matches the latest open begin");
                assert!(at <= ts, "an end after its begin");
                out.entry(tid).or_default().push((name, at, ts, depth));
            }
            ph => panic!("unexpected phase {ph}"),
        }
    }
    assert!(open.values().all(Vec::is_empty), "every begin has its end");
    for tid in out.keys() {
        assert!(names.contains_key(tid), "every thread with calls is named");
    }
    if style == EventStyle::Complete {
        // Complete events nest: sorted by begin, each lies inside the last open one it
        // overlaps, or after it.
        for calls in out.values_mut() {
            let mut stack: Vec<(i64, i64)> = Vec::new();
            for c in calls.iter_mut() {
                while stack.last().is_some_and(|&(_, end)| end <= c.1 && !(end == c.1 && c.2 == c.1)) {
                    stack.pop();
                }
                if let Some(&(b, e)) = stack.last() {
                    assert!(b <= c.1 && c.2 <= e, "complete events nest: {c:?} in ({b}, {e})");
                }
                c.3 = stack.len();
                stack.push((c.1, c.2));
            }
        }
    }
    out
}

/// Checks the folded stacks by calls add up to the calls, and the SVG is drawn.
fn check_folded_and_svg(snap: &Snapshot) -> HashMap<String, u64> {
    let folded: HashMap<String, u64> = snap
        .folded(Weight::Calls)
        .iter()
        .map(|l| {
            let (stack, n) = l.rsplit_once(' ').unwrap();
            (stack.to_string(), n.parse().unwrap())
        })
        .collect();
    assert_eq!(folded.values().sum::<u64>(), snap.calls() as u64, "folded counts equal the calls");
    let mut svg = Vec::new();
    snap.write_flamegraph(&mut svg, Weight::Time, "test").unwrap();
    let svg = String::from_utf8(svg).unwrap();
    assert!(svg.len() > 1000 && svg.contains("<svg") && svg.trim_end().ends_with("</svg>"), "an SVG flame graph");
    folded
}

/// Short names of a thread's calls' functions.
fn short<'a>(snap: &'a Snapshot, c: &Call) -> &'a str {
    snap.name(c).rsplit("::").next().unwrap()
}

mod threads {
    use super::black_box;
    #[inline(never)]
    pub extern "C" fn leaf(x: u64) -> u64 {
        black_box(x * 2 + 1)
    }
    #[inline(never)]
    pub extern "C" fn middle(x: u64) -> u64 {
        black_box(leaf(x) + leaf(x + 1))
    }
    #[inline(never)]
    pub extern "C" fn outer(x: u64) -> u64 {
        black_box(middle(x) + middle(x + 2))
    }
}

#[test]
fn eight_threads_nest_and_add_up() {
    const THREADS: u64 = 8;
    const CALLS: u64 = 40;
    let tracer = Tracer::builder().pattern(&glob("threads")).args(1).retval().register().unwrap();
    assert_eq!(tracer.functions().len(), 3, "{:?}", tracer.skipped());
    tracer.start();
    std::thread::scope(|s| {
        for t in 0..THREADS {
            std::thread::Builder::new()
                .name(format!("worker-{t}"))
                .spawn_scoped(s, move || {
                    for i in 0..CALLS {
                        black_box(black_box(threads::outer as extern "C" fn(u64) -> u64)(t * 1000 + i));
                    }
                })
                .unwrap();
        }
    });
    tracer.stop();
    let snap = tracer.snapshot();
    assert_eq!(snap.lost(), 0);
    assert_eq!(snap.missed, 0);
    let per_outer = 1 + 2 + 4;
    assert_eq!(snap.calls() as u64, THREADS * CALLS * per_outer, "every call recorded once");
    let workers: Vec<_> = snap.threads.iter().filter(|t| t.name.starts_with("worker-")).collect();
    assert_eq!(workers.len(), THREADS as usize, "one ring per thread, named");
    for t in &workers {
        assert_eq!(t.calls.len() as u64, CALLS * per_outer);
        for c in &t.calls {
            assert!(!c.unwound && c.exit_ns >= c.enter_ns);
            let expected_depth = match short(&snap, c) {
                "outer" => 0,
                "middle" => 1,
                "leaf" => 2,
                n => panic!("{n}"),
            };
            assert_eq!(c.depth, expected_depth);
            if short(&snap, c) == "leaf" {
                assert_eq!(c.ret, Some(c.args()[0] * 2 + 1), "each record whole: its argument and its return");
            }
        }
    }
    for style in [EventStyle::Complete, EventStyle::BeginEnd] {
        let chrome = read_chrome(&snap, style);
        assert_eq!(chrome.values().map(Vec::len).sum::<usize>(), snap.calls());
        if style == EventStyle::BeginEnd {
            for calls in chrome.values() {
                for (name, _, _, depth) in calls {
                    let want = if name.ends_with("outer") {
                        0
                    } else if name.ends_with("middle") {
                        1
                    } else {
                        2
                    };
                    assert_eq!(*depth, want, "{name} nested at its depth");
                }
            }
        }
    }
    let folded = check_folded_and_svg(&snap);
    let f = |s: &str| folded.get(&s.split(';').map(|n| format!("trace::threads::{n}")).collect::<Vec<_>>().join(";")).copied();
    assert_eq!(f("outer"), Some(THREADS * CALLS));
    assert_eq!(f("outer;middle"), Some(THREADS * CALLS * 2));
    assert_eq!(f("outer;middle;leaf"), Some(THREADS * CALLS * 4));
    tracer.unregister().unwrap();
}

mod recursion {
    use super::black_box;
    #[inline(never)]
    pub extern "C" fn rec(n: u64) -> u64 {
        if n == 0 {
            return black_box(0);
        }
        black_box(rec(black_box(n - 1)) + 1)
    }
}

#[test]
fn recursion_fifty_deep() {
    const DEPTH: u64 = 50;
    const RUNS: u64 = 5;
    let tracer = Tracer::builder().pattern(&glob("recursion")).args(1).retval().register().unwrap();
    tracer.start();
    for _ in 0..RUNS {
        assert_eq!(black_box(recursion::rec as extern "C" fn(u64) -> u64)(DEPTH), DEPTH);
    }
    tracer.stop();
    let snap = tracer.snapshot();
    assert_eq!(snap.calls() as u64, RUNS * (DEPTH + 1));
    let t = snap.threads.iter().find(|t| !t.calls.is_empty()).unwrap();
    for run in t.calls.chunks((DEPTH + 1) as usize) {
        for (d, c) in run.iter().enumerate() {
            // Sorted by entry: depth d is the call rec(DEPTH - d), returning DEPTH - d.
            assert_eq!((c.depth as u64, c.args()[0], c.ret), (d as u64, DEPTH - d as u64, Some(DEPTH - d as u64)));
            if d > 0 {
                let p = &run[d - 1];
                assert!(p.enter_ns <= c.enter_ns && c.exit_ns <= p.exit_ns, "each call inside its caller");
            }
        }
    }
    for style in [EventStyle::Complete, EventStyle::BeginEnd] {
        let chrome = read_chrome(&snap, style);
        let depths: Vec<usize> = chrome.values().flatten().map(|c| c.3).collect();
        assert_eq!(depths.iter().max(), Some(&(DEPTH as usize)));
    }
    let folded = check_folded_and_svg(&snap);
    let deepest = vec!["trace::recursion::rec"; DEPTH as usize + 1].join(";");
    assert_eq!(folded.get(&deepest), Some(&RUNS));
    assert_eq!(folded.len() as u64, DEPTH + 1);
}

mod panics {
    use super::black_box;
    #[inline(never)]
    pub extern "C-unwind" fn leaf(x: u64) -> u64 {
        if black_box(x) == 7 {
            panic!("leaf panics on 7 (expected by the test)");
        }
        x
    }
    #[inline(never)]
    pub extern "C-unwind" fn middle(x: u64) -> u64 {
        black_box(leaf(x) + 1)
    }
    #[inline(never)]
    pub extern "C" fn after(x: u64) -> u64 {
        black_box(x)
    }
    /// Catches the panic of `middle(7)` → `leaf(7)`; then calls `after` if asked.
    #[inline(never)]
    pub extern "C" fn outer(x: u64, then: u64) -> u64 {
        let caught = std::panic::catch_unwind(|| black_box(middle as extern "C-unwind" fn(u64) -> u64)(x));
        let r = caught.unwrap_or(99);
        if then != 0 {
            black_box(after(r));
        }
        r
    }
}

#[test]
fn panic_caught_above_a_traced_frame() {
    let tracer = Tracer::builder().pattern(&glob("panics")).exclude("*{{closure}}*").retval().register().unwrap();
    tracer.start();
    let outer = black_box(panics::outer as extern "C" fn(u64, u64) -> u64);
    assert_eq!(outer(3, 1), 4); // no panic: outer, middle, leaf, after
    assert_eq!(outer(7, 1), 99); // middle and leaf unwound; `after`'s entry finds them gone
    assert_eq!(outer(7, 0), 99); // middle and leaf unwound; `outer`'s return finds them gone
    assert_eq!(outer(5, 0), 6); // and tracing goes on as before
    tracer.stop();
    let snap = tracer.snapshot();
    let t = snap.threads.iter().find(|t| !t.calls.is_empty()).unwrap();
    let seen: Vec<(&str, u32, bool)> = t.calls.iter().map(|c| (short(&snap, c), c.depth, c.unwound)).collect();
    #[rustfmt::skip]
    let want = vec![
        ("outer", 0, false), ("middle", 1, false), ("leaf", 2, false), ("after", 1, false),
        ("outer", 0, false), ("middle", 1, true), ("leaf", 2, true), ("after", 1, false),
        ("outer", 0, false), ("middle", 1, true), ("leaf", 2, true),
        ("outer", 0, false), ("middle", 1, false), ("leaf", 2, false),
    ];
    assert_eq!(seen, want);
    let calls = &t.calls;
    // The unwound calls end as the panic unwinds them, innermost first: before
    // `after`'s entry, then before `outer`'s return; inside their caller either way.
    assert!(calls[6].exit_ns <= calls[5].exit_ns && calls[5].exit_ns <= calls[7].enter_ns);
    assert!(calls[10].exit_ns <= calls[9].exit_ns && calls[9].exit_ns <= calls[8].exit_ns);
    assert!(calls[5].ret.is_none() && calls[4].ret == Some(99));
    for style in [EventStyle::Complete, EventStyle::BeginEnd] {
        assert_eq!(read_chrome(&snap, style).values().map(Vec::len).sum::<usize>(), 14);
    }
    check_folded_and_svg(&snap);
}

mod abandoned {
    use super::black_box;
    #[inline(never)]
    pub extern "C-unwind" fn leaf(x: u64) -> u64 {
        if black_box(x) == 7 {
            panic!("leaf panics on 7 (expected by the test)");
        }
        x
    }
    #[inline(never)]
    pub extern "C-unwind" fn middle(x: u64) -> u64 {
        black_box(leaf(x) + 1)
    }
    #[inline(never)]
    pub extern "C" fn later(x: u64) -> u64 {
        black_box(x)
    }
}

/// Untraced: catches the panic of `middle(x)` → `leaf(x)`.
#[inline(never)]
fn catch_middle(x: u64) -> Option<u64> {
    std::panic::catch_unwind(|| black_box(abandoned::middle as extern "C-unwind" fn(u64) -> u64)(x)).ok()
}

/// Untraced: calls `later` from a frame of its own, below where `middle` stood.
#[inline(never)]
fn later_from_deeper(x: u64) -> u64 {
    let pad = black_box([x; 32]);
    black_box(abandoned::later as extern "C" fn(u64) -> u64)(pad[31])
}

#[test]
fn a_panic_caught_in_untraced_code_ends_the_calls_as_it_unwinds_them() {
    let tracer = Tracer::builder().pattern(&glob("abandoned")).retval().register().unwrap();
    tracer.start();
    unwound::check_calls_abandoned_by_a_caught_panic(|| tracer.snapshot(), catch_middle, later_from_deeper);
    tracer.stop();
}

mod overflow {
    use super::black_box;
    #[inline(never)]
    pub extern "C" fn f(x: u64) -> u64 {
        black_box(x ^ 0x5555)
    }
}

#[test]
fn a_ring_that_overflows() {
    const CAPACITY: usize = 64;
    const CALLS: u64 = 1000;
    let f = black_box(overflow::f as extern "C" fn(u64) -> u64);
    for full in [Full::Overwrite, Full::Drop] {
        let tracer = Tracer::builder().pattern(&glob("overflow")).args(1).retval().capacity(CAPACITY).when_full(full).register().unwrap();
        tracer.start();
        for i in 0..CALLS {
            f(i);
        }
        tracer.stop();
        let snap = tracer.snapshot();
        let t = snap.threads.iter().find(|t| !t.calls.is_empty()).unwrap();
        assert_eq!(t.calls.len(), CAPACITY);
        assert_eq!(snap.lost(), CALLS - CAPACITY as u64, "{full:?}: losses counted");
        assert_eq!(snap.recorded, if full == Full::Overwrite { CALLS } else { CAPACITY as u64 });
        let first = if full == Full::Overwrite { CALLS - CAPACITY as u64 } else { 0 };
        for (k, c) in t.calls.iter().enumerate() {
            assert_eq!((c.args()[0], c.ret), (first + k as u64, Some((first + k as u64) ^ 0x5555)), "{full:?}: nothing corrupt");
        }
        read_chrome(&snap, EventStyle::BeginEnd);
        check_folded_and_svg(&snap);
        // A drain consumes: the ring takes new records after it, in both modes.
        assert_eq!(tracer.drain().calls(), CAPACITY);
        tracer.start();
        f(1);
        tracer.stop();
        let again = tracer.drain();
        assert_eq!(again.calls(), 1);
        assert_eq!(again.threads.iter().map(|t| t.overwritten).sum::<u64>(), 0);
    }
}

/// A capacity whose rings cannot be allocated (their size overflows, or exceeds the
/// address space) is refused at registration with a typed error, before anything is
/// attached; the tracer's hit path never sees such a ring.
mod oversized {
    use super::black_box;
    #[inline(never)]
    pub extern "C" fn f(x: u64) -> u64 {
        black_box(x ^ 0xaaaa)
    }
}

#[test]
fn a_capacity_too_large_is_refused_at_registration() {
    for (capacity, args) in [(usize::MAX, 0), (1 << 62, 0), (1 << 61, 5), (1 << 50, 0)] {
        let r = Tracer::builder().pattern(&glob("oversized")).args(args).retval().capacity(capacity).register();
        assert!(matches!(r, Err(probekit::Error::OutOfMemory { .. })), "capacity {capacity}, {args} args: {r:?}");
    }
    // A tracer of the same functions still registers and records (nothing was left attached).
    let tracer = Tracer::builder().pattern(&glob("oversized")).capacity(64).register().unwrap();
    tracer.start();
    black_box(oversized::f as extern "C" fn(u64) -> u64)(1);
    tracer.stop();
    assert_eq!(tracer.snapshot().calls(), 1);
}

mod live {
    use super::black_box;
    #[inline(never)]
    pub extern "C" fn g(x: u64) -> u64 {
        black_box(x.wrapping_mul(3))
    }
}

#[test]
fn snapshots_while_running_hold_whole_records() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
    let tracer = Tracer::builder().pattern(&glob("live")).args(1).retval().capacity(256).register().unwrap();
    tracer.start();
    let stop = AtomicBool::new(false);
    let calls = AtomicU64::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            let g = black_box(live::g as extern "C" fn(u64) -> u64);
            let mut i = 0;
            while !stop.load(Relaxed) {
                g(i);
                i += 1;
                calls.store(i, Relaxed);
            }
        });
        // Snapshots race the writer for as long as it takes it to make calls: under
        // qemu the writer may not have started before 200 snapshots are done. The
        // stop is stored whatever happens, so a failed assertion cannot leave the
        // writer spinning and the scope waiting for it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        let mut snapshots = 0;
        let mut seen = 0;
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            while snapshots < 200 || (calls.load(Relaxed) < 10_000 && std::time::Instant::now() < deadline) {
                let snap = tracer.snapshot();
                for c in snap.threads.iter().flat_map(|t| &t.calls) {
                    assert_eq!(c.ret, Some(c.args()[0].wrapping_mul(3)), "a record torn by a concurrent write");
                    assert!(c.exit_ns >= c.enter_ns);
                }
                seen += snap.calls();
                snapshots += 1;
                std::thread::yield_now();
            }
        }));
        stop.store(true, Relaxed);
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
        assert!(seen > 0, "{snapshots} snapshots over {} calls saw none", calls.load(Relaxed));
    });
}

// Each traced function below has a body of its own: a release build merges identical
// functions into one (LLVM's MergeFunctions), and the tracers of two tests would then
// share it.
mod churn {
    use super::black_box;
    #[inline(never)]
    pub extern "C" fn h(x: u64) -> u64 {
        black_box(x + 1)
    }
}

/// Runs `calls` traced calls on a new thread, which then exits; its thread id.
fn on_a_thread_that_exits(calls: u64) -> i32 {
    calls_on_a_thread_that_exits(churn::h, calls)
}

/// Runs `calls` calls of `f` on a new thread, which then exits, and waits until the
/// kernel no longer finds it (what a take-over asks): `join` returns when the thread
/// cleared its id, a little before the kernel forgets it, and a thread that found no
/// ring then would try again only `RETRY_EVERY` calls later. Its thread id.
fn calls_on_a_thread_that_exits(f: extern "C" fn(u64) -> u64, calls: u64) -> i32 {
    let tid = std::thread::spawn(move || {
        let f = black_box(f);
        for i in 0..calls {
            f(i);
        }
        // SAFETY: gettid has no preconditions.
        unsafe { libc::gettid() }
    })
    .join()
    .unwrap();
    wait_until_gone(tid);
    tid
}

/// Waits until the kernel no longer finds the joined thread `tid`.
fn wait_until_gone(tid: i32) {
    let start = std::time::Instant::now();
    // SAFETY: tgkill with signal 0 checks that the thread exists and sends nothing.
    while unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, 0) } == 0 {
        assert!(start.elapsed() < std::time::Duration::from_secs(10), "thread {tid} still found 10 s after it was joined");
        std::thread::yield_now();
    }
}

#[test]
fn rings_of_exited_threads_are_taken_over_and_live_ones_are_not() {
    let tracer = Tracer::builder().pattern(&glob("churn")).threads(2).capacity(64).register().unwrap();
    tracer.start();
    let (a, b) = (on_a_thread_that_exits(3), on_a_thread_that_exits(4));
    let snap = tracer.snapshot();
    let per_tid = |s: &Snapshot| s.threads.iter().map(|t| (t.tid, t.calls.len())).collect::<HashMap<_, _>>();
    assert_eq!(per_tid(&snap), HashMap::from([(a, 3), (b, 4)]));
    // Both rings have owners, both exited: a third thread takes one over, and the
    // unread records there are given up (and counted).
    let c = on_a_thread_that_exits(5);
    let snap = tracer.snapshot();
    let seen = per_tid(&snap);
    assert_eq!(seen.get(&c), Some(&5), "{seen:?}");
    assert_eq!(seen.len(), 2, "{seen:?}");
    let kept = seen.iter().find(|(t, _)| **t != c).map(|(t, n)| (*t, *n)).unwrap();
    assert!(kept == (a, 3) || kept == (b, 4), "{kept:?}");
    assert_eq!(snap.exited_lost, 7 - kept.1 as u64);
    assert_eq!(snap.calls() as u64 + snap.exited_lost, 12);
    assert_eq!(snap.no_ring, 0);
    // Drained first, nothing is given up.
    let drained = tracer.drain();
    assert_eq!(drained.calls(), 5 + kept.1);
    let d = on_a_thread_that_exits(6);
    let snap = tracer.snapshot();
    assert_eq!(per_tid(&snap).get(&d), Some(&6));
    assert_eq!(snap.exited_lost, 7 - kept.1 as u64, "nothing more given up");
    // Live threads keep their rings: once this thread and another live one hold the
    // two (taken over from exited ones), a new thread is not traced.
    let h = black_box(churn::h as extern "C" fn(u64) -> u64);
    h(0);
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let (ready, started) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        h(0);
        ready.send(()).unwrap();
        wait.recv().unwrap();
    });
    started.recv().unwrap();
    let before = tracer.snapshot().no_ring;
    on_a_thread_that_exits(8);
    assert_eq!(tracer.snapshot().no_ring, before + 8, "both rings' threads are alive: not traced");
    go.send(()).unwrap();
    holder.join().unwrap();
}

mod churn_waves {
    use super::black_box;
    #[inline(never)]
    pub extern "C" fn h(x: u64) -> u64 {
        black_box(x + 2)
    }
}

#[test]
fn rings_changing_hands_under_churn_keep_each_thread_s_records_its_own() {
    // Waves of short threads on two rings: take-overs race each other and snapshots.
    // Each thread passes its own id, so a record on the wrong thread shows.
    let tracer = Tracer::builder().pattern(&glob("churn_waves")).args(1).threads(2).capacity(256).register().unwrap();
    tracer.start();
    let calls_each = 50;
    let own = |s: &Snapshot| {
        for t in &s.threads {
            let wrong: Vec<u64> = t.calls.iter().map(|c| c.args()[0]).filter(|a| *a != t.tid as u64).collect();
            assert!(wrong.is_empty(), "records of other threads on {}: {wrong:?}", t.tid);
        }
    };
    let (mut spawned, mut drained, mut overwritten) = (0, 0, 0);
    let mut last = tracer.snapshot();
    for _ in 0..8 {
        let wave: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(move || {
                    let h = black_box(churn_waves::h as extern "C" fn(u64) -> u64);
                    // SAFETY: gettid has no preconditions.
                    let tid = unsafe { libc::gettid() } as u64;
                    for _ in 0..calls_each {
                        h(tid);
                    }
                })
            })
            .collect();
        spawned += wave.len() as u64;
        own(&tracer.snapshot());
        for w in wave {
            w.join().unwrap();
        }
        last = tracer.drain();
        own(&last);
        drained += last.calls() as u64;
        overwritten += last.threads.iter().map(|t| t.overwritten).sum::<u64>();
    }
    // Every call is somewhere: drained, given up with an exited thread's ring, not
    // traced for want of a ring, overwritten, or missed.
    assert_eq!(drained + last.exited_lost + last.no_ring + overwritten + last.missed, spawned * calls_each);
    assert!(drained > 0);
}

mod vanish {
    use super::black_box;
    /// Ends its thread then and there: no return, no unwinding.
    #[inline(never)]
    pub extern "C" fn gone(x: u64) -> u64 {
        if black_box(x) == 1 {
            // SAFETY: exit ends this thread only; nothing of it is used again (a raw
            // pthread, joined by the kernel's clearing of its id).
            unsafe { libc::syscall(libc::SYS_exit, 0) };
        }
        x
    }
    #[inline(never)]
    pub extern "C" fn outer(x: u64) -> u64 {
        black_box(gone(x) + 1)
    }
}

/// A thread that ends inside traced calls (the `exit` system call: they never return
/// and no panic unwinds them): when its ring is taken over, those calls are counted
/// as lost, so that every call made is a record or a loss.
#[test]
fn calls_in_flight_on_a_thread_that_vanished_count_as_lost_when_its_ring_is_taken_over() {
    static VANISHED: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);
    extern "C" fn vanishing(_: *mut libc::c_void) -> *mut libc::c_void {
        // SAFETY: gettid has no preconditions.
        VANISHED.store(unsafe { libc::gettid() }, std::sync::atomic::Ordering::Relaxed);
        black_box(vanish::outer as extern "C" fn(u64) -> u64)(1);
        unreachable!("the thread exited in `gone`");
    }
    let tracer = Tracer::builder().pattern(&glob("vanish")).threads(1).capacity(16).register().unwrap();
    tracer.start();
    let mut thread: libc::pthread_t = 0;
    // SAFETY: a thread running `vanishing`, which takes no argument; joined below.
    assert_eq!(unsafe { libc::pthread_create(&mut thread, std::ptr::null(), vanishing, std::ptr::null_mut()) }, 0);
    // SAFETY: the thread just created, joined once (the kernel clears its id at exit).
    assert_eq!(unsafe { libc::pthread_join(thread, std::ptr::null_mut()) }, 0);
    wait_until_gone(VANISHED.load(std::sync::atomic::Ordering::Relaxed));
    // Its ring, with `outer` and `gone` in flight, passes to a thread that calls once.
    let tid = calls_on_a_thread_that_exits(vanish::outer, 1);
    let snap = tracer.snapshot();
    assert_eq!(snap.threads.iter().map(|t| (t.tid, t.calls.len())).collect::<Vec<_>>(), [(tid, 2)]);
    assert_eq!(snap.exited_lost, 2, "outer and gone of the vanished thread");
    assert_eq!(snap.calls() as u64 + snap.lost(), 4);
}

mod lossy {
    use super::black_box;
    #[inline(never)]
    pub extern "C" fn f(x: u64) -> u64 {
        black_box(x + 3)
    }
}

#[test]
fn an_exited_thread_s_losses_stay_counted_once_its_ring_is_taken_over() {
    // One ring of 4: 10 calls overwrite 6 records (or drop 6 calls); a second thread
    // takes the ring over. Every call stays in `calls() + lost()`.
    for full in [Full::Drop, Full::Overwrite] {
        let tracer = Tracer::builder().pattern(&glob("lossy")).threads(1).capacity(4).when_full(full).register().unwrap();
        tracer.start();
        let books = |s: &Snapshot| s.calls() as u64 + s.lost();
        calls_on_a_thread_that_exits(lossy::f, 10);
        assert_eq!(books(&tracer.snapshot()), 10, "{full:?}: before the take-over");
        calls_on_a_thread_that_exits(lossy::f, 1);
        let after = tracer.snapshot();
        assert_eq!(after.threads.len(), 1, "{full:?}: the ring was taken over");
        assert_eq!((after.calls(), after.exited_lost), (1, 10), "{full:?}: after the take-over");
        assert_eq!(books(&after), 11, "{full:?}");
    }
}

mod drained {
    use super::black_box;
    #[inline(never)]
    pub extern "C" fn f(x: u64) -> u64 {
        black_box(x + 4)
    }
}

#[test]
fn a_drained_thread_s_losses_count_once_when_its_ring_is_taken_over() {
    // One ring of 4 dropping when full: 10 calls record 4 and drop 6; a drain delivers
    // the 4 and the thread's 6; a second thread takes the ring over, and the take-over
    // counts the 6 in `exited_lost`. The drains appended count them once.
    let tracer = Tracer::builder().pattern(&glob("drained")).threads(1).capacity(4).when_full(Full::Drop).register().unwrap();
    tracer.start();
    let books = |s: &Snapshot| s.calls() as u64 + s.lost();
    calls_on_a_thread_that_exits(drained::f, 10);
    let mut all = tracer.drain();
    assert_eq!((all.calls(), all.threads[0].dropped), (4, 6));
    assert_eq!(books(&all), 10);
    calls_on_a_thread_that_exits(drained::f, 1);
    let later = tracer.drain();
    assert_eq!((later.calls(), later.exited_lost), (1, 6), "the take-over counted the exited thread's drops");
    all.append(later);
    assert_eq!(all.threads.len(), 2, "both threads' traces");
    assert_eq!(books(&all), 11, "every call once: {all:?}");
}

mod raced {
    use super::black_box;
    #[inline(never)]
    pub extern "C" fn g(x: u64) -> u64 {
        black_box(x + 5)
    }
}

#[test]
fn a_drain_racing_take_overs_counts_each_call_once() {
    // One ring, short threads one after another (each starts once the last is gone:
    // never `no_ring`), each making fewer calls than the ring holds, and a thread
    // draining all along: drains race the take-overs. Each call is drained or given
    // up, not both.
    use std::sync::atomic::{AtomicBool, Ordering::*};
    use std::sync::Arc;
    let (threads, calls): (u64, u64) = if cfg!(target_arch = "x86_64") { (1000, 500) } else { (200, 50) };
    let tracer = Arc::new(Tracer::builder().pattern(&glob("raced")).threads(1).capacity(1024).register().unwrap());
    tracer.start();
    let done = Arc::new(AtomicBool::new(false));
    let drainer = {
        let (tracer, done) = (tracer.clone(), done.clone());
        std::thread::spawn(move || {
            let mut books = 0;
            let mut drain = || {
                let d = tracer.drain();
                books += d.calls() as u64 + d.threads.iter().map(|t| t.overwritten).sum::<u64>();
                d
            };
            while !done.load(Acquire) {
                drain();
                std::thread::sleep(std::time::Duration::from_micros(100));
            }
            let last = drain();
            books + last.exited_lost + last.no_ring + last.missed
        })
    };
    // Each thread waits (spinning) for the last to be gone, then calls at once: its
    // take-over lands near a drain of the last one's records.
    let (tx, rx) = std::sync::mpsc::channel::<i32>();
    let rx = Arc::new(std::sync::Mutex::new(rx));
    let mut last: Option<std::thread::JoinHandle<()>> = None;
    for k in 0..threads {
        let (tx, rx) = (tx.clone(), rx.clone());
        let next = std::thread::spawn(move || {
            if k > 0 {
                let before = rx.lock().unwrap().recv().unwrap();
                // SAFETY: tgkill with signal 0 checks that the thread exists and sends nothing.
                while unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), before, 0) } == 0 {
                    std::hint::spin_loop();
                }
            }
            let g = black_box(raced::g as extern "C" fn(u64) -> u64);
            for i in 0..calls {
                g(i);
            }
            // SAFETY: gettid has no preconditions.
            tx.send(unsafe { libc::gettid() }).unwrap();
        });
        if let Some(t) = last.replace(next) {
            t.join().unwrap();
        }
    }
    last.unwrap().join().unwrap();
    done.store(true, Release);
    assert_eq!(drainer.join().unwrap(), threads * calls, "calls drained, overwritten, given up, not traced");
}
