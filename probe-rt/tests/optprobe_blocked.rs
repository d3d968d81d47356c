//! A thread that blocks the sampling signal (`SIGURG`) stops every grace period over
//! the threads of the process: on x86_64 a jump that displaces more than one
//! instruction is then not written (the probe stays a breakpoint, and says why), and
//! `Optimize::Required` fails; once the thread has exited, the probe is optimized at
//! a later registration. aarch64 needs no grace period (one instruction is displaced).
//!
//! One test in a binary of its own: the blocking thread stops every grace period.

use probe_rt::{Optimize, Probe, PtRegs};
use std::hint::black_box;
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[cfg(target_arch = "x86_64")]
std::arch::global_asm!(
    ".globl blk_two",
    ".type blk_two, @function",
    "blk_two:",
    "mov rax, rdi",
    "add rax, 1",
    "ret",
    ".size blk_two, . - blk_two",
    ".globl blk_other",
    ".type blk_other, @function",
    "blk_other:",
    "mov rax, rdi",
    "add rax, 2",
    "ret",
    ".size blk_other, . - blk_other",
);
#[cfg(target_arch = "aarch64")]
std::arch::global_asm!(".globl blk_two", "blk_two:", "add x0, x0, #1", "ret", ".globl blk_other", "blk_other:", "add x0, x0, #2", "ret");
// x + 1 and x + 2, scratch registers only: safe to call.
unsafe extern "C" {
    safe fn blk_two(x: u64) -> u64;
    safe fn blk_other(x: u64) -> u64;
}

#[test]
fn a_thread_that_blocks_sampling_keeps_multi_instruction_windows_breakpoints_until_it_exits() {
    let (ready, is_ready) = mpsc::channel();
    let (stop, stopped) = mpsc::channel::<()>();
    let blocker = std::thread::spawn(move || {
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
    let f = blk_two as extern "C" fn(u64) -> u64;
    let start = Instant::now();
    let required = Probe::builder().function(f).pre(|_: &PtRegs| {}).optimize(Optimize::Required).register();
    let p = Probe::builder().function(f).pre(|_: &PtRegs| {}).register().expect("a breakpoint probe at least");
    #[cfg(target_arch = "x86_64")]
    {
        use probe_rt::{Error, NotOptimized};
        assert!(matches!(required, Err(Error::NotOptimized { reason: NotOptimized::ThreadsInWindow, .. })), "{required:?}");
        assert_eq!(p.why_not_optimized(), Some(NotOptimized::ThreadsInWindow));
        assert!(start.elapsed() < Duration::from_secs(5), "a failed grace period is not retried at once: {:?}", start.elapsed());
    }
    #[cfg(target_arch = "aarch64")]
    {
        let _ = start;
        assert!(required.is_ok() && p.is_optimized(), "one instruction needs no grace period: {required:?}");
    }
    assert_eq!(black_box(f)(1), 2);
    assert_eq!(p.nhit(), 1);
    stop.send(()).unwrap();
    blocker.join().unwrap();
    // Tried again by a later registration once the wait after the failure is over.
    let start = Instant::now();
    while !p.is_optimized() {
        assert!(start.elapsed() < Duration::from_secs(20), "not optimized {:?} after the blocking thread exited", start.elapsed());
        std::thread::sleep(Duration::from_millis(20));
        drop(Probe::builder().function(blk_other as extern "C" fn(u64) -> u64).register().expect("a probe"));
    }
    assert_eq!(black_box(f)(1), 2);
    assert_eq!(p.nhit(), 2);
}
