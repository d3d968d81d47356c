//! Issue 17, item 10, under fire: return probes are registered and unregistered in a
//! loop while other threads call the probed functions, some of the calls slow (in
//! flight across an unregistration and the reuse of the probe's stubs), some
//! abandoned by a caught panic (their instances stay busy). Every call returns the
//! right value to the right place, every return handler sees its own probe's data
//! (two data types of different layout take turns on the same stubs), and nothing is
//! freed under a thread: a handler that saw foreign or freed data would abort.

use probe_rt::{PtRegs, ReturnProbe};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CYCLES: usize = 600;
/// Under `qemu-user` (the aarch64 lane), where a cycle costs ~100 times more.
const CYCLES_EMULATED: usize = 150;

/// Running under `qemu-user` (its process name).
fn emulated() -> bool {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines().any(|l| l.starts_with("Name:") && l.contains("qemu"))
}
const MAXACTIVE: usize = 4;

#[inline(never)]
fn slow(n: u64) -> u64 {
    // Long enough that unregistration often happens while a call is in flight.
    let until = Instant::now() + Duration::from_micros(black_box(n % 3) * 100);
    while Instant::now() < until {
        std::hint::spin_loop();
    }
    n.wrapping_mul(3).wrapping_add(1)
}

#[inline(never)]
fn maybe_panics(n: u64) -> u64 {
    if black_box(n).is_multiple_of(4) {
        panic!("caught by the worker");
    }
    n + 1
}

const MAGIC_A: u64 = 0x5eed_a11c_e000_0001;
const MAGIC_B: u64 = 0x5eed_b0b0_0000_0002;

/// One data layout: a magic word, and what the entry saw.
struct A {
    magic: u64,
    arg: u64,
}

impl Default for A {
    fn default() -> Self {
        A { magic: MAGIC_A, arg: 0 }
    }
}

/// Another, larger, with its magic elsewhere.
struct B {
    args: [u64; 5],
    magic: u64,
}

impl Default for B {
    fn default() -> Self {
        B { args: [0; 5], magic: MAGIC_B }
    }
}

static CHECKED: AtomicU64 = AtomicU64::new(0);

fn check(ok: bool) {
    if !ok {
        // SAFETY: abort has no preconditions (a panic cannot leave a return handler).
        unsafe { libc::abort() };
    }
    CHECKED.fetch_add(1, Ordering::Relaxed);
}

fn enter_a(r: &PtRegs, d: &mut A) -> bool {
    d.arg = r.arg(0).unwrap();
    true
}

fn return_a(r: &PtRegs, d: &mut A) {
    check(d.magic == MAGIC_A && r.return_value() == d.arg.wrapping_mul(3).wrapping_add(1));
}

fn enter_b(r: &PtRegs, d: &mut B) -> bool {
    d.args = [r.arg(0).unwrap(); 5];
    true
}

fn return_b(r: &PtRegs, d: &mut B) {
    check(d.magic == MAGIC_B && d.args.iter().all(|a| *a == d.args[0]) && r.return_value() == d.args[0].wrapping_mul(3).wrapping_add(1));
}

fn on_panicky(_r: &PtRegs, d: &mut A) {
    check(d.magic == MAGIC_A);
}

#[test]
fn stubs_are_reused_under_calls_in_flight_and_abandoned() {
    std::panic::set_hook(Box::new(|_| {}));
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let mut workers: Vec<_> = (0..2)
        .map(|t| {
            let (stop, calls) = (stop.clone(), calls.clone());
            std::thread::spawn(move || {
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    assert_eq!(slow(i), i.wrapping_mul(3).wrapping_add(1));
                    calls.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            })
        })
        .collect();
    {
        let (stop, calls) = (stop.clone(), calls.clone());
        workers.push(std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                match std::panic::catch_unwind(|| maybe_panics(i)) {
                    Ok(v) => assert_eq!(v, i + 1),
                    Err(_) => assert_eq!(i % 4, 0),
                }
                calls.fetch_add(1, Ordering::Relaxed);
                i += 1;
                std::thread::sleep(Duration::from_micros(50));
            }
        }));
    }

    let cycles = if emulated() { CYCLES_EMULATED } else { CYCLES };
    for k in 0..cycles {
        let f = slow as fn(u64) -> u64;
        let p = match k % 2 {
            0 => ReturnProbe::builder().function(f).data::<A>().entry_handler(enter_a).handler(return_a).maxactive(MAXACTIVE).register(),
            _ => ReturnProbe::builder().function(f).data::<B>().entry_handler(enter_b).handler(return_b).maxactive(MAXACTIVE).register(),
        }
        .unwrap();
        let q = ReturnProbe::builder().function(maybe_panics as fn(u64) -> u64).data::<A>().handler(on_panicky).maxactive(MAXACTIVE).register().unwrap();
        std::thread::sleep(Duration::from_micros(300));
        p.unregister().unwrap();
        q.unregister().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    eprintln!("{cycles} cycles, {} calls, {} returns checked", calls.load(Ordering::Relaxed), CHECKED.load(Ordering::Relaxed));
    assert!(CHECKED.load(Ordering::Relaxed) > 0);
}
