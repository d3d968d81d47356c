//! Return probes on sites that have an exit path (probe-codegen `site::exit_asm`): the
//! enabled site jumps to it, and the return is observed without hijacking the return
//! address. What users see must be what the hijack gave them: the entry data, the
//! return registers (changed ones reach the caller), stack-passed arguments, panics
//! unwinding through, recursion, and a probe unregistered while a thread is inside.

use probekit::{Probe, PtRegs, ReturnProbe};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};

/// Whether the enabled site jumps to its exit path: x86_64 `jmp rel32` (not the
/// trampoline's `call rel32`), aarch64 `b` after the `mov x9, x30` (not `bl`).
#[cfg(target_arch = "x86_64")]
fn jumps_to_exit_path(site: usize) -> bool {
    // SAFETY: a site is in the text of this executable, mapped readable.
    unsafe { *(site as *const u8) == 0xe9 }
}
#[cfg(target_arch = "aarch64")]
fn jumps_to_exit_path(site: usize) -> bool {
    // SAFETY: as above; the site's second word, 4-aligned.
    unsafe { *((site + 4) as *const u32) >> 26 == 0b000101 }
}

fn site_of(name: &str) -> usize {
    probekit::sites().into_iter().find(|s| s.name.ends_with(name)).expect("the site is listed").site
}

/// Return probes are registered one test at a time: the tests count hits.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

#[probekit::traceable]
fn twice(a: u64) -> u64 {
    black_box(a) * 2
}

#[test]
fn a_return_probe_switches_the_site_to_its_exit_path_and_back() {
    let _s = serial();
    let site = site_of("::twice");
    let f = twice as fn(u64) -> u64;
    let entry = Probe::builder().function(f).pre(|_: &PtRegs| {}).register().unwrap();
    assert!(!jumps_to_exit_path(site), "an entry probe alone keeps the call");
    let seen = Arc::new(AtomicU64::new(0));
    let s = seen.clone();
    let r = ReturnProbe::builder().function(f).handler(move |regs: &PtRegs, _: &mut ()| s.store(regs.return_value(), Ordering::Relaxed)).register().unwrap();
    assert!(jumps_to_exit_path(site), "a return probe takes the exit path");
    assert_eq!(twice(21), 42);
    assert_eq!(seen.load(Ordering::Relaxed), 42);
    assert_eq!((entry.nhit(), r.nhit(), r.nmissed()), (1, 1, 0));
    drop(r);
    assert!(!jumps_to_exit_path(site), "the last return probe gone, back to the call");
    assert_eq!(twice(5), 10);
    assert_eq!(entry.nhit(), 2);
    drop(entry);
    // A return probe alone enables the site straight onto its exit path.
    let r = ReturnProbe::builder().function(f).handler(|_: &PtRegs, _: &mut ()| {}).register().unwrap();
    assert!(jumps_to_exit_path(site));
    assert_eq!(twice(1), 2);
    assert_eq!(r.nhit(), 1);
}

/// Two words back: the return handler's changes to rax and rdx (x0 and x1) must reach
/// the caller.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
struct Pair(u64, u64);

#[probekit::traceable]
extern "C" fn pair(a: u64) -> Pair {
    Pair(black_box(a), black_box(a) + 1)
}

#[probekit::traceable]
fn half(a: f64) -> f64 {
    black_box(a) / 2.0
}

#[test]
fn the_return_handler_changes_the_return_registers() {
    let _s = serial();
    let r = ReturnProbe::builder().function(pair as extern "C" fn(u64) -> Pair).data::<u64>().entry_handler(|regs: &PtRegs, d: &mut u64| {
        *d = regs.arg(0).unwrap();
        true
    });
    // SAFETY: `pair` returns two `u64`s in rax and rdx (x0, x1), any values of which
    // the test accepts.
    let r = unsafe {
        r.handler_mut(|regs: &mut PtRegs, d: &mut u64| {
            #[cfg(target_arch = "x86_64")]
            {
                regs.rax += 100;
                regs.rdx = *d * 1000;
            }
            #[cfg(target_arch = "aarch64")]
            {
                regs.regs[0] += 100;
                regs.regs[1] = *d * 1000;
            }
        })
    }
    .register()
    .unwrap();
    assert_eq!(pair(7), Pair(107, 7000));
    assert_eq!(pair(black_box(9)), Pair(109, 9000));
    drop(r);
    assert_eq!(pair(7), Pair(7, 8));

    // The FP return register is seen (xmm0 / q0).
    let got = Arc::new(Mutex::new(None));
    let g = got.clone();
    let r = ReturnProbe::builder()
        .function(half as fn(f64) -> f64)
        .handler(move |regs: &PtRegs, _: &mut ()| *g.lock().unwrap() = regs.fp_return().map(|v| v.as_f64()))
        .register()
        .unwrap();
    assert_eq!(half(5.0), 2.5);
    assert_eq!(*got.lock().unwrap(), Some(2.5));
    drop(r);

    // A function whose return value no FP/SIMD register carries: its exit path's
    // trampolines keep no FP/SIMD state, so there is no FP return register to see.
    let fp = Arc::new(Mutex::new(None));
    let g = fp.clone();
    let r = ReturnProbe::builder()
        .function(twice as fn(u64) -> u64)
        .handler(move |regs: &PtRegs, _: &mut ()| *g.lock().unwrap() = Some(regs.fp_return()))
        .register()
        .unwrap();
    assert_eq!(twice(5), 10);
    assert_eq!(*fp.lock().unwrap(), Some(None));
    drop(r);
}

/// Sixteen integers and ten floats: beyond the registers of both ABIs (6 + 8 on x86_64,
/// 8 + 8 on aarch64), and a struct passed in memory.
#[derive(Clone, Copy)]
#[repr(C)]
struct Big {
    a: [u64; 5],
}

#[probekit::traceable]
#[allow(clippy::too_many_arguments)]
fn many(
    a0: u64,
    a1: u64,
    a2: u64,
    a3: u64,
    a4: u64,
    a5: u64,
    a6: u64,
    a7: u64,
    a8: u64,
    a9: u64,
    big: Big,
    f0: f64,
    f1: f64,
    f2: f64,
    f3: f64,
    f4: f64,
    f5: f64,
    f6: f64,
    f7: f64,
    f8: f64,
    f9: f32,
    last: u8,
) -> u64 {
    let ints = a0 + 2 * a1 + 3 * a2 + 4 * a3 + 5 * a4 + 6 * a5 + 7 * a6 + 8 * a7 + 9 * a8 + 10 * a9;
    let bigs: u64 = big.a.iter().enumerate().map(|(i, v)| (i as u64 + 11) * v).sum();
    let floats = f0 + 2.0 * f1 + 3.0 * f2 + 4.0 * f3 + 5.0 * f4 + 6.0 * f5 + 7.0 * f6 + 8.0 * f7 + 9.0 * f8 + 10.0 * f9 as f64;
    ints + bigs + floats as u64 + 1000 * last as u64
}

#[test]
fn stack_passed_arguments_arrive_intact() {
    let _s = serial();
    let call = || {
        many(black_box(1), 2, 3, 4, 5, 6, 7, 8, 9, 10, Big { a: [100, 200, 300, 400, 500] }, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, black_box(7))
    };
    let expected = call();
    let hits = Arc::new(AtomicU64::new(0));
    let h = hits.clone();
    // SAFETY: `many` is a function's first instruction (too many arguments for
    // `function`).
    let r = unsafe { ReturnProbe::builder().address(many as *const () as usize) }
        .handler(move |regs: &PtRegs, _: &mut ()| {
            if regs.return_value() == expected {
                h.fetch_add(1, Ordering::Relaxed);
            }
        })
        .register()
        .unwrap();
    assert!(jumps_to_exit_path(site_of("::many")));
    for _ in 0..3 {
        assert_eq!(call(), expected);
    }
    assert_eq!((hits.load(Ordering::Relaxed), r.nhit(), r.nmissed()), (3, 3, 0));
}

#[probekit::traceable]
fn fails_on(a: u64, bad: u64) -> u64 {
    if black_box(a) == bad {
        panic!("bad argument {a}");
    }
    a + 1
}

#[test]
fn a_panic_unwinds_through_the_exit_path() {
    let _s = serial();
    let returns = Arc::new(AtomicU64::new(0));
    let r2 = returns.clone();
    let r = ReturnProbe::builder().function(fails_on as fn(u64, u64) -> u64).handler(move |_: &PtRegs, _: &mut ()| {
        r2.fetch_add(1, Ordering::Relaxed);
    });
    let r = r.register().unwrap();
    assert!(jumps_to_exit_path(site_of("::fails_on")));
    for round in 0..3 {
        let caught = std::panic::catch_unwind(|| fails_on(black_box(7), 7));
        assert!(caught.is_err(), "round {round}: the panic reached the caller");
        assert_eq!(fails_on(1, 7), 2, "round {round}: the next call returns right");
    }
    assert_eq!(returns.load(Ordering::Relaxed), 3, "only the calls that returned ran the handler");
    assert_eq!(r.nmissed(), 0);
}

#[probekit::traceable]
fn depth(n: u64) -> u64 {
    if n == 0 {
        return 0;
    }
    depth(black_box(n - 1)) + 1
}

#[test]
fn recursion_fifty_deep_pairs_every_return_with_its_entry() {
    let _s = serial();
    let mismatches = Arc::new(AtomicU64::new(0));
    let returns = Arc::new(AtomicU64::new(0));
    let (m, n) = (mismatches.clone(), returns.clone());
    let r = ReturnProbe::builder()
        .function(depth as fn(u64) -> u64)
        .maxactive(64)
        .data::<u64>()
        .entry_handler(|regs: &PtRegs, d: &mut u64| {
            *d = regs.arg(0).unwrap();
            true
        })
        .handler(move |regs: &PtRegs, d: &mut u64| {
            // depth(n) returns n: the data is this call's.
            if regs.return_value() != *d {
                m.fetch_add(1, Ordering::Relaxed);
            }
            n.fetch_add(1, Ordering::Relaxed);
        })
        .register()
        .unwrap();
    assert_eq!(depth(50), 50);
    assert_eq!((returns.load(Ordering::Relaxed), mismatches.load(Ordering::Relaxed)), (51, 0));
    assert_eq!((r.nhit(), r.nmissed()), (51, 0));
}

static INSIDE: AtomicBool = AtomicBool::new(false);
static GATE: Mutex<Option<Arc<Barrier>>> = Mutex::new(None);

#[probekit::traceable]
fn waits(a: u64) -> u64 {
    if INSIDE.load(Ordering::Relaxed) {
        let gate = GATE.lock().unwrap().clone().unwrap();
        gate.wait(); // inside
        gate.wait(); // the probe is gone
    }
    black_box(a) + 5
}

#[test]
fn unregistered_while_a_thread_is_inside_it_still_returns_right() {
    let _s = serial();
    let gate = Arc::new(Barrier::new(2));
    *GATE.lock().unwrap() = Some(gate.clone());
    let returns = Arc::new(AtomicU64::new(0));
    let r2 = returns.clone();
    let r = ReturnProbe::builder()
        .function(waits as fn(u64) -> u64)
        .handler(move |_: &PtRegs, _: &mut ()| {
            r2.fetch_add(1, Ordering::Relaxed);
        })
        .register()
        .unwrap();
    INSIDE.store(true, Ordering::Relaxed);
    let t = std::thread::spawn(|| waits(black_box(10)));
    gate.wait();
    r.unregister().unwrap();
    assert!(!jumps_to_exit_path(site_of("::waits")));
    gate.wait();
    assert_eq!(t.join().unwrap(), 15);
    INSIDE.store(false, Ordering::Relaxed);
    assert_eq!(returns.load(Ordering::Relaxed), 0, "an unregistered probe's handler does not run");
    assert_eq!(waits(1), 6);
    // And again with a new probe while the old call's instance is long released.
    let r = ReturnProbe::builder().function(waits as fn(u64) -> u64).handler(|_: &PtRegs, _: &mut ()| {}).register().unwrap();
    assert_eq!(waits(2), 7);
    assert_eq!(r.nhit(), 1);
}

#[probekit::traceable]
fn nested_inner(a: u64) -> u64 {
    black_box(a) + 1
}

#[probekit::traceable]
fn nested_outer(a: u64) -> u64 {
    nested_inner(black_box(a)) * 10
}

#[test]
fn two_return_probes_on_one_site_and_nested_sites_each_see_their_own_call() {
    let _s = serial();
    let order = Arc::new(Mutex::new(Vec::new()));
    let probe = |name: &'static str, f: fn(u64) -> u64| {
        let o = order.clone();
        ReturnProbe::builder()
            .function(f)
            .data::<u64>()
            .entry_handler(|regs: &PtRegs, d: &mut u64| {
                *d = regs.arg(0).unwrap();
                true
            })
            .handler(move |regs: &PtRegs, d: &mut u64| o.lock().unwrap().push((name, *d, regs.return_value())))
            .register()
            .unwrap()
    };
    let a = probe("outer a", nested_outer);
    let b = probe("outer b", nested_outer);
    let c = probe("inner", nested_inner);
    assert_eq!(nested_outer(4), 50);
    assert_eq!(*order.lock().unwrap(), [("inner", 4, 5), ("outer b", 4, 50), ("outer a", 4, 50)]);
    drop((a, b, c));
}

#[probekit::traceable]
fn busy_site(a: u64) -> u64 {
    black_box(a) ^ 0x55
}

#[test]
fn threads_beyond_maxactive_each_return_right_and_every_watched_call_runs_its_handler() {
    let _s = serial();
    let handled = Arc::new(AtomicU64::new(0));
    let h = handled.clone();
    let r = ReturnProbe::builder()
        .function(busy_site as fn(u64) -> u64)
        .maxactive(2)
        .data::<u64>()
        .entry_handler(|regs: &PtRegs, d: &mut u64| {
            *d = regs.arg(0).unwrap();
            true
        })
        .handler(move |regs: &PtRegs, d: &mut u64| {
            // Counted only if the data is this call's.
            if regs.return_value() == *d ^ 0x55 {
                h.fetch_add(1, Ordering::Relaxed);
            }
        })
        .register()
        .unwrap();
    assert_eq!(r.maxactive(), 2);
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..1000 {
                    let a = t * 1_000_000 + i;
                    assert_eq!(busy_site(a), a ^ 0x55);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(r.nhit() + r.nmissed(), 8000, "every entry took an instance or was missed");
    assert_eq!(handled.load(Ordering::Relaxed), r.nhit(), "every watched call ran its handler, with its own data");
}

#[probekit::traceable]
fn parks(a: u64) -> u64 {
    black_box(a) + 2
}

#[test]
fn a_parked_instance_does_not_keep_an_unregistered_probe_alive() {
    let _s = serial();
    let captured = Arc::new(());
    let c = captured.clone();
    let r = ReturnProbe::builder()
        .function(parks as fn(u64) -> u64)
        .handler(move |_: &PtRegs, _: &mut ()| {
            let _ = &c;
        })
        .register()
        .unwrap();
    assert_eq!(parks(1), 3); // this thread parks an instance of the probe
    assert_eq!(r.nhit(), 1);
    r.unregister().unwrap();
    assert!(probekit::synchronize());
    assert_eq!(Arc::strong_count(&captured), 1, "the handler was dropped: the block went back");
    // The same function probed again takes a block with the old parking reset.
    let r = ReturnProbe::builder().function(parks as fn(u64) -> u64).handler(|_: &PtRegs, _: &mut ()| {}).register().unwrap();
    assert_eq!(parks(2), 4);
    assert_eq!((r.nhit(), r.nmissed()), (1, 0));
}

#[probekit::traceable]
extern "C" fn jumps(n: u64) -> u64 {
    if black_box(n) % 2 == 1 {
        // SAFETY: the frames between here and the probekit_jump_run in `run_jumps` are
        // plain (no destructors); its jmp_buf is live.
        unsafe { native_tests::probekit_jump_out() }
    }
    n * 3
}

extern "C" fn run_jumps(arg: *mut std::ffi::c_void) {
    // SAFETY: `arg` is the `u64` `longjmp_out_of_the_body_leaves_the_next_calls_right` passes.
    let n = unsafe { *(arg as *const u64) };
    black_box(jumps(n));
}

#[test]
fn longjmp_out_of_the_body_leaves_the_next_calls_right() {
    let _s = serial();
    let (returns, mismatches) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (r2, m2) = (returns.clone(), mismatches.clone());
    let r = ReturnProbe::builder()
        .function(jumps as extern "C" fn(u64) -> u64)
        .maxactive(1)
        .data::<u64>()
        .entry_handler(|regs: &PtRegs, d: &mut u64| {
            *d = regs.arg(0).unwrap();
            true
        })
        .handler(move |regs: &PtRegs, d: &mut u64| {
            if regs.return_value() != *d * 3 {
                m2.fetch_add(1, Ordering::Relaxed);
            }
            r2.fetch_add(1, Ordering::Relaxed);
        })
        .register()
        .unwrap();
    assert!(jumps_to_exit_path(site_of("::jumps")));
    for n in 0..10u64 {
        let mut arg = n;
        // SAFETY: run_jumps reads the u64 behind arg, which lives across the call.
        let jumped = unsafe { native_tests::probekit_jump_run(run_jumps, &mut arg as *mut u64 as *mut std::ffi::c_void) };
        assert_eq!(jumped, (n % 2) as i32);
        assert_eq!(jumps(2 * n), 6 * n, "a direct call after a jump");
    }
    // Every call was watched (the abandoned instances were found stale and reused), and
    // the ones that returned ran the handler with their own data.
    assert_eq!((r.nhit(), r.nmissed()), (20, 0));
    assert_eq!((returns.load(Ordering::Relaxed), mismatches.load(Ordering::Relaxed)), (15, 0));
}

#[probekit::traceable]
fn under_fire(a: u64, b: u64) -> u64 {
    black_box(a).wrapping_mul(3) ^ b
}

#[test]
fn switching_between_nop_call_and_exit_path_under_fire_keeps_every_call_right() {
    let _s = serial();
    let stop = Arc::new(AtomicBool::new(false));
    let wrong = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..3u64)
        .map(|t| {
            let (stop, wrong) = (stop.clone(), wrong.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let (a, b) = (t << 40 | i, i);
                    if under_fire(a, b) != a.wrapping_mul(3) ^ b {
                        wrong.fetch_add(1, Ordering::Relaxed);
                    }
                    i += 1;
                }
            })
        })
        .collect();
    let f = under_fire as fn(u64, u64) -> u64;
    let site = site_of("::under_fire");
    let mut seen_exit = false;
    for round in 0..40 {
        // nop -> call (entry probe) -> jump (return probe joins) -> call -> nop, and
        // nop -> jump -> nop, while three threads call the function.
        let entry = (round % 2 == 0).then(|| Probe::builder().function(f).pre(|_: &PtRegs| {}).register().unwrap());
        let ret = ReturnProbe::builder()
            .function(f)
            .data::<u64>()
            .entry_handler(|regs: &PtRegs, d: &mut u64| {
                *d = regs.arg(1).unwrap();
                true
            })
            .handler(|regs: &PtRegs, d: &mut u64| {
                // The return value's low bits are b's (a * 3 has them from a): checked
                // by the callers; here only that the handler runs with a datum.
                let _ = (regs.return_value(), *d);
            })
            .register()
            .unwrap();
        seen_exit |= jumps_to_exit_path(site);
        std::thread::sleep(std::time::Duration::from_millis(2));
        drop(ret);
        std::thread::sleep(std::time::Duration::from_millis(1));
        drop(entry);
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    assert!(seen_exit);
    assert_eq!(wrong.load(Ordering::Relaxed), 0, "every call returned its own value");
}
