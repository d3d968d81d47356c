//! Issue 17, item 11: a thread that blocks `SIGURG` stops grace periods, so retired
//! records are not reused meanwhile; registration must keep working (new records are
//! taken: there is no fixed limit), and once that thread has exited, grace periods
//! complete again and records are reused again.
//!
//! One test in a binary of its own: it counts the process's probe records.

use probe_rt::__private::record_counts;
use probe_rt::{Error, Probe, PtRegs};
use std::hint::black_box;
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[inline(never)]
#[no_mangle]
extern "C" fn gr_target(a: u64) -> u64 {
    black_box(a).wrapping_add(7)
}

fn noop(_r: &PtRegs) {}

fn cycle() -> Result<(), Error> {
    Probe::builder().function(gr_target as extern "C" fn(u64) -> u64).pre(noop).register()?.unregister()
}

/// Register/unregister cycles: enough to retire several batches of records.
const CYCLES: usize = 4 * probe_rt::probe::RECLAIM_BATCH;

#[test]
fn registration_works_while_a_thread_blocks_sigurg_and_reuse_resumes_after_it_exits() {
    let (ready, is_ready) = mpsc::channel();
    let (stop, stopped) = mpsc::channel::<()>();
    let blocker = std::thread::spawn(move || {
        // Hit a probe first: grace periods sample only threads that did.
        let p = Probe::builder().function(gr_target as extern "C" fn(u64) -> u64).pre(noop).register().unwrap();
        assert_eq!(gr_target(1), 8);
        drop(p);
        // SAFETY: sigset operations on a local set; blocking SIGURG for this thread only.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGURG);
            assert_eq!(libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()), 0);
        }
        ready.send(()).unwrap();
        let _ = stopped.recv();
    });
    is_ready.recv().unwrap();

    // No grace period completes: retired records pile up, and registration goes on with
    // new records.
    let (taken0, ..) = record_counts();
    for i in 0..CYCLES {
        cycle().unwrap_or_else(|e| panic!("cycle {i} while SIGURG is blocked: {e}"));
    }
    let (taken1, retired1, _) = record_counts();
    assert!(taken1 >= taken0 + CYCLES - probe_rt::probe::RECLAIM_BATCH, "records were reused without a grace period: {taken0} -> {taken1}");
    assert!(retired1 >= CYCLES - probe_rt::probe::RECLAIM_BATCH, "{retired1} retired");

    stop.send(()).unwrap();
    blocker.join().unwrap();
    // The blocking thread is gone: a later try completes (tries are at most every 100 ms)
    // and the retired records come back.
    let start = Instant::now();
    while record_counts().1 >= retired1 {
        assert!(start.elapsed() < Duration::from_secs(20), "no grace period completed {:?} after the blocking thread exited", start.elapsed());
        cycle().unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    eprintln!("records reused again {:?} after the blocking thread exited", start.elapsed());
    // And they are reused: further cycles take few new records.
    let (taken2, ..) = record_counts();
    for _ in 0..CYCLES {
        cycle().unwrap();
    }
    let (taken3, ..) = record_counts();
    assert!(taken3 - taken2 <= probe_rt::probe::RECLAIM_BATCH + 1, "records not reused: {taken2} -> {taken3}");
    assert_eq!(gr_target(1), 8);
}
