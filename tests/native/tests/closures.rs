//! Handlers with state: closures capturing what they need, seen by every hit on every
//! thread and dropped after unregistering and a grace period; and the order in which
//! several probes and return probes on one function run.

use probekit::{Probe, PtRegs, ReturnProbe};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[inline(never)]
fn shared_work(x: u64) -> u64 {
    black_box(x).wrapping_mul(7)
}

#[inline(never)]
fn other_work(x: u64) -> u64 {
    black_box(x).wrapping_add(3)
}

#[probekit::traceable]
fn traced_work(x: u64) -> u64 {
    black_box(x) ^ 0x55
}

/// The tests register probes on the same functions: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// State a handler captures, which says when it is dropped.
struct Counter {
    hits: AtomicU64,
    dropped: Arc<AtomicU64>,
}

impl Drop for Counter {
    fn drop(&mut self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn closure_state_is_seen_by_every_hit_and_dropped_after_a_grace_period() {
    let _s = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dropped = Arc::new(AtomicU64::new(0));
    let on_bp = Arc::new(Counter { hits: AtomicU64::new(0), dropped: dropped.clone() });
    let on_site = Arc::new(Counter { hits: AtomicU64::new(0), dropped: dropped.clone() });
    let on_ret = Arc::new(Counter { hits: AtomicU64::new(0), dropped: dropped.clone() });
    let (a, b, c) = (on_bp.clone(), on_site.clone(), on_ret.clone());
    let bp = Probe::builder().function(shared_work as fn(u64) -> u64).pre(move |_| _ = a.hits.fetch_add(1, Ordering::Relaxed)).register().unwrap();
    let site = Probe::builder().function(traced_work as fn(u64) -> u64).pre(move |_| _ = b.hits.fetch_add(1, Ordering::Relaxed)).register().unwrap();
    let ret = ReturnProbe::builder()
        .function(other_work as fn(u64) -> u64)
        .maxactive(64)
        .handler(move |r: &PtRegs, _: &mut ()| {
            // Only the right return values count: a closure of another probe would not.
            if r.return_value() >= 3 {
                c.hits.fetch_add(1, Ordering::Relaxed);
            }
        })
        .register()
        .unwrap();

    let threads = 4;
    let calls = if cfg!(target_arch = "aarch64") { 200 } else { 2000 };
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                for i in 0..calls {
                    let x = t * calls + i;
                    assert_eq!(shared_work(x), x.wrapping_mul(7));
                    assert_eq!(other_work(x), x.wrapping_add(3));
                    assert_eq!(traced_work(x), x ^ 0x55);
                }
            });
        }
    });
    let total = threads * calls;
    assert_eq!(on_bp.hits.load(Ordering::Relaxed), total, "every breakpoint hit saw the captured counter");
    assert_eq!(on_site.hits.load(Ordering::Relaxed), total, "every site hit saw the captured counter");
    assert_eq!(on_ret.hits.load(Ordering::Relaxed) + ret.nmissed(), total, "every watched return saw the captured counter");
    assert_eq!((bp.nhit(), site.nhit()), (total, total));

    // Unregistered, the handlers are kept until a grace period shows no thread can be
    // running them; then what they captured is dropped.
    drop((bp, site, ret));
    assert_eq!(Arc::strong_count(&on_bp), 2, "kept while a thread could still be in the handler");
    assert!(probekit::synchronize(), "a grace period completes");
    assert_eq!(Arc::strong_count(&on_bp), 1, "the breakpoint probe's closure was dropped");
    assert_eq!(Arc::strong_count(&on_site), 1, "the site probe's closure was dropped");
    assert_eq!(Arc::strong_count(&on_ret), 1, "the return probe's closure was dropped");
    assert_eq!(dropped.load(Ordering::Relaxed), 0, "the counters themselves live on here");
    drop((on_bp, on_site, on_ret));
    assert_eq!(dropped.load(Ordering::Relaxed), 3);
}

#[test]
fn two_probes_sharing_a_handler_tell_which_fired() {
    let _s = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let fired = Arc::new(Mutex::new(Vec::new()));
    // The same code for both, each closure with its own name.
    let probe = |name: &'static str, f: fn(u64) -> u64| {
        let fired = fired.clone();
        Probe::builder().function(f).pre(move |r: &PtRegs| {
            // A test handler may lock: no probed code holds this lock.
            fired.lock().unwrap().push((name, r.arg(0)));
        })
    };
    let p = probe("shared", shared_work).register().unwrap();
    let q = probe("other", other_work).register().unwrap();
    shared_work(1);
    other_work(2);
    shared_work(3);
    drop((p, q));
    assert_eq!(*fired.lock().unwrap(), [("shared", Some(1)), ("other", Some(2)), ("shared", Some(3))]);
}

/// Several probes on one function: the entry handlers (breakpoint probes' pre
/// handlers and return probes' entry handlers) run in registration order, the return
/// handlers in the reverse order (the last registered hijacked the return last).
#[test]
fn handlers_on_one_function_run_in_the_documented_order() {
    let _s = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    for f in [shared_work as fn(u64) -> u64, traced_work as fn(u64) -> u64] {
        let order = Arc::new(Mutex::new(String::new()));
        let log = |tag: &'static str| {
            let order = order.clone();
            move || order.lock().unwrap().push_str(tag)
        };
        let (e1, r1, e2, r2, k) = (log("e1 "), log("r1 "), log("e2 "), log("r2 "), log("k "));
        let first = ReturnProbe::builder()
            .function(f)
            .entry_handler(move |_: &PtRegs, _: &mut ()| {
                e1();
                true
            })
            .handler(move |_: &PtRegs, _: &mut ()| r1())
            .register()
            .unwrap();
        let plain = Probe::builder().function(f).pre(move |_| k()).register().unwrap();
        let second = ReturnProbe::builder()
            .function(f)
            .entry_handler(move |_: &PtRegs, _: &mut ()| {
                e2();
                true
            })
            .handler(move |_: &PtRegs, _: &mut ()| r2())
            .register()
            .unwrap();
        black_box(f)(4);
        assert_eq!(order.lock().unwrap().as_str(), "e1 k e2 r2 r1 ", "entries in registration order, returns in reverse");
        drop((first, plain, second));
    }
}
