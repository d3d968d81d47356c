//! Seed 004's races: threads run through a probed function while another thread arms
//! and disarms it. A thread that traps on a breakpoint removed meanwhile backs up and
//! runs the original instruction; every call returns the right value; every hit is
//! counted once; the original bytes are back at the end.

use probe_rt::{Probe, PtRegs};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

#[inline(never)]
#[no_mangle]
extern "C" fn race_target(a: u64) -> u64 {
    a.wrapping_mul(3).wrapping_add(1)
}

static HANDLED: AtomicU64 = AtomicU64::new(0);

fn count(_r: &mut PtRegs) {
    HANDLED.fetch_add(1, Ordering::Relaxed);
}

#[test]
fn arming_and_disarming_under_fire() {
    let f = race_target as extern "C" fn(u64) -> u64;
    // SAFETY: reads the first bytes of a function of this binary.
    let before = unsafe { *(f as usize as *const [u8; 4]) };
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..3)
        .map(|t| {
            let (stop, calls) = (stop.clone(), calls.clone());
            std::thread::spawn(move || {
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    assert_eq!(black_box(f)(i), i.wrapping_mul(3).wrapping_add(1));
                    calls.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            })
        })
        .collect();

    // Register / disarm rounds (the handles are read and unregistered at the end,
    // when no handler can still be running).
    let mut rounds = Vec::new();
    for _ in 0..30 {
        let p = Probe::builder().function(f).pre(count).register().unwrap();
        std::thread::sleep(std::time::Duration::from_micros(200));
        p.disable().unwrap();
        rounds.push(p);
    }
    // Enable / disable rounds on one probe.
    let p = Probe::builder().function(f).pre(count).register().unwrap();
    for _ in 0..200 {
        p.disable().unwrap();
        std::thread::yield_now();
        p.enable().unwrap();
        std::thread::yield_now();
    }
    std::thread::sleep(std::time::Duration::from_millis(5));
    p.disable().unwrap();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    rounds.push(p);
    let counted: u64 = rounds.iter().map(|p| p.nhit() + p.nmissed()).sum();
    for p in rounds {
        p.unregister().unwrap();
    }

    // Every hit counted by a probe ran its handler exactly once.
    assert_eq!(HANDLED.load(Ordering::Relaxed), counted);
    assert!(counted > 0 && counted <= calls.load(Ordering::Relaxed), "{counted} hits of {} calls", calls.load(Ordering::Relaxed));
    // SAFETY: as above.
    assert_eq!(unsafe { *(f as usize as *const [u8; 4]) }, before, "original bytes restored");
}
