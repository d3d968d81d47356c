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

fn count(_r: &PtRegs) {
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

#[inline(never)]
#[no_mangle]
extern "C" fn reuse_target(a: u64) -> u64 {
    a.wrapping_mul(5).wrapping_sub(2)
}

#[inline(never)]
#[no_mangle]
extern "C" fn reuse_other(a: u64) -> u64 {
    a ^ 0x3c
}

static REUSE_HANDLED: AtomicU64 = AtomicU64::new(0);

fn count_reuse(_r: &PtRegs) {
    REUSE_HANDLED.fetch_add(1, Ordering::Relaxed);
}

/// More registrations than there are records: unregistered probes' records and slots
/// come back after grace periods, while threads run through the probed functions (a
/// reused slot rewritten under a thread still in it would return a wrong value).
#[test]
fn records_and_slots_are_reused_after_grace_periods() {
    let (f, g) = (reuse_target as extern "C" fn(u64) -> u64, reuse_other as extern "C" fn(u64) -> u64);
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..2)
        .map(|t| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    assert_eq!(black_box(f)(i), i.wrapping_mul(5).wrapping_sub(2));
                    assert_eq!(black_box(g)(i), i ^ 0x3c);
                    i += 1;
                }
                2 * (i - t)
            })
        })
        .collect();
    // Enough rounds that records are retired and reused many times over.
    let rounds = 19 * probe_rt::probe::RECLAIM_BATCH;
    let mut counted = 0;
    for round in 0..rounds {
        // Alternate targets, so a reused slot is rewritten with another instruction.
        let target = if round % 2 == 0 { f } else { g };
        let p = Probe::builder().function(target).pre(count_reuse).register().unwrap_or_else(|e| panic!("round {round}: {e}"));
        std::thread::yield_now();
        p.disable().unwrap();
        counted += p.nhit() + p.nmissed();
        p.unregister().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let calls: u64 = workers.into_iter().map(|w| w.join().expect("every call returned the right value")).sum();
    // Each count read right after disarming may miss a handler still running then (it
    // cannot be read later: the record is reused), never the other way round.
    let handled = REUSE_HANDLED.load(Ordering::Relaxed);
    assert!(counted <= handled && handled <= calls, "{counted} counted, {handled} handled, {calls} calls");
    assert!(probe_rt::list().0.iter().all(|p| p.addr != f as usize && p.addr != g as usize));
}
