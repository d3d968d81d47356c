//! A child made by `fork` inside a return-probed call. The forking thread's live
//! instances held the parent's thread id; in the child that id names no thread, so
//! unless the child re-owns them, a new call takes the thread's *own* live instance
//! over as an exited thread's (the list loops on itself, and the return hangs or
//! goes astray).

use probe_rt::{PtRegs, ReturnProbe};
use std::hint::black_box;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

static PARENT: AtomicI32 = AtomicI32::new(0);

#[inline(never)]
extern "C" fn target(cb: extern "C" fn(u64) -> u64, x: u64) -> u64 {
    black_box(cb(black_box(x))).wrapping_add(1)
}

extern "C" fn noop(x: u64) -> u64 {
    black_box(x)
}

/// Forks; the child makes one nested call of `target` (maxactive 1: the only instance
/// is the outer call's, held under the parent's thread id).
extern "C" fn forker(x: u64) -> u64 {
    // SAFETY: fork has no preconditions; the child (single-threaded) only makes a call,
    // returns through the probed calls and `_exit`s (below), taking no lock another
    // thread of the parent could have held.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        return target(noop, x);
    }
    pid as u64
}

fn on_return(_r: &PtRegs, _d: &mut u64) {}

/// How the child `child` ended: "exited with N", "killed by signal N", or "hung"
/// (killed after 5 s).
fn wait_child(child: libc::pid_t) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut status = 0;
    loop {
        // SAFETY: waitpid on our own child with a valid status pointer.
        let w = unsafe { libc::waitpid(child, &mut status, libc::WNOHANG) };
        if w == child {
            return if libc::WIFEXITED(status) {
                format!("exited with {}", libc::WEXITSTATUS(status))
            } else {
                format!("killed by signal {}", libc::WTERMSIG(status))
            };
        }
        if Instant::now() > deadline {
            // SAFETY: our own child.
            unsafe {
                libc::kill(child, libc::SIGKILL);
                libc::waitpid(child, &mut status, 0);
            }
            return "hung (killed after 5 s)".to_string();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_child_forked_inside_a_probed_call_returns_through_its_own_instances() {
    // maxactive 1: the nested call in the child finds no free instance, only the
    // outer call's, which must not look like an exited thread's.
    let p = ReturnProbe::builder()
        .function(target as extern "C" fn(extern "C" fn(u64) -> u64, u64) -> u64)
        .data::<u64>()
        .handler(on_return)
        .maxactive(1)
        .register()
        .unwrap();
    // SAFETY: getpid has no preconditions.
    PARENT.store(unsafe { libc::getpid() }, Ordering::SeqCst);
    let r = target(forker, 7);
    // SAFETY: as above.
    if unsafe { libc::getpid() } != PARENT.load(Ordering::SeqCst) {
        // The child got back here through both stubs: the right answer.
        // SAFETY: _exit has no preconditions.
        unsafe { libc::_exit(if r == 9 { 0 } else { 3 }) };
    }
    let outcome = wait_child((r - 1) as libc::pid_t);
    drop(p);
    assert_eq!(outcome, "exited with 0", "the child returned through its stubs");
}

static PARENT2: AtomicI32 = AtomicI32::new(0);

#[inline(never)]
extern "C" fn target2(cb: extern "C" fn() -> u64) -> u64 {
    black_box(cb()).wrapping_add(1)
}

/// Forks; both return at once, the child with 0.
extern "C" fn fork_only() -> u64 {
    // SAFETY: fork has no preconditions; the child returns through the probed call and
    // `_exit`s (below), taking no lock another thread of the parent could have held.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    pid as u64
}

/// The child's first step in probekit's code after the fork is a return through a
/// stub: the dispatcher marks the thread inside a hit path, and a grace period must
/// see it there, so the thread records itself (the forking thread's entry in the
/// thread table was the parent's, and the child forgot it).
#[test]
fn a_child_whose_first_hit_path_is_a_return_is_recorded_for_grace_periods() {
    let p = ReturnProbe::builder().function(target2 as extern "C" fn(extern "C" fn() -> u64) -> u64).data::<u64>().handler(on_return).register().unwrap();
    // SAFETY: getpid has no preconditions.
    PARENT2.store(unsafe { libc::getpid() }, Ordering::SeqCst);
    let r = target2(fork_only);
    // SAFETY: as above.
    if unsafe { libc::getpid() } != PARENT2.load(Ordering::SeqCst) {
        let recorded = probe_rt::__private::this_thread_recorded();
        // SAFETY: _exit has no preconditions.
        unsafe {
            libc::_exit(if r == 1 && recorded {
                0
            } else if r == 1 {
                4
            } else {
                3
            })
        };
    }
    let outcome = wait_child((r - 1) as libc::pid_t);
    drop(p);
    assert_eq!(outcome, "exited with 0", "exit 4: the child returned through the stub unrecorded");
}
