//! Issue 17, item 11: a thread that blocks `SIGURG` stops grace periods, so retired
//! records are not reused and registration runs out of records; once that thread has
//! exited, grace periods complete again and registration works again.
//!
//! One test in a binary of its own: it takes every probe record of the process.

use probe_rt::probe::MAX_PROBES;
use probe_rt::{Error, Probe, PtRegs};
use std::hint::black_box;
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[inline(never)]
#[no_mangle]
extern "C" fn gr_target(a: u64) -> u64 {
    black_box(a).wrapping_add(7)
}

fn noop(_r: &mut PtRegs) {}

fn cycle() -> Result<(), Error> {
    Probe::builder().function(gr_target as extern "C" fn(u64) -> u64).pre(noop).register()?.unregister()
}

#[test]
fn registration_recovers_after_a_thread_blocking_sigurg_exits() {
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

    // No grace period completes: retired records pile up until none is left.
    let start = Instant::now();
    let exhausted = (0..=MAX_PROBES).map(|_| cycle()).find_map(Result::err);
    assert!(matches!(exhausted, Some(Error::TooManyProbes { .. })), "{exhausted:?} after {:?}", start.elapsed());
    eprintln!("records exhausted after {:?}", start.elapsed());

    stop.send(()).unwrap();
    blocker.join().unwrap();
    // The blocking thread is gone: a later try completes (tries are at most every 100 ms).
    let start = Instant::now();
    loop {
        match cycle() {
            Ok(()) => break,
            Err(Error::TooManyProbes { .. }) if start.elapsed() < Duration::from_secs(10) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("registration still fails {:?} after the blocking thread exited: {e}", start.elapsed()),
        }
    }
    eprintln!("registration recovered after {:?}", start.elapsed());
    // And keeps working.
    for _ in 0..MAX_PROBES + 64 {
        cycle().unwrap();
    }
    assert_eq!(gr_target(1), 8);
}
