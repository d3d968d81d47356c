//! A breakpoint that is not probekit's (the program's own `int3`/`brk`) reaches the
//! SIGTRAP handler that was there before, unchanged (seed 004).

use probe_rt::{Probe, PtRegs};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

static FOREIGN: AtomicU64 = AtomicU64::new(0);

extern "C" fn previous_handler(_sig: libc::c_int, _info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    FOREIGN.fetch_add(1, Ordering::Relaxed);
    // aarch64: `brk` leaves the pc on itself; step over it (x86_64 int3 already did).
    #[cfg(target_arch = "aarch64")]
    // SAFETY: the kernel passes a valid ucontext_t for SA_SIGINFO handlers.
    unsafe {
        (*(ctx as *mut libc::ucontext_t)).uc_mcontext.pc += 4;
    }
    let _ = ctx;
}

#[inline(never)]
#[no_mangle]
extern "C" fn ft_double(a: u64) -> u64 {
    a.wrapping_mul(2)
}

static PROBED: AtomicU64 = AtomicU64::new(0);

fn on_hit(_r: &PtRegs) {
    PROBED.fetch_add(1, Ordering::Relaxed);
}

fn foreign_trap() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: int3 traps to the SIGTRAP handler, which returns after it.
    unsafe {
        std::arch::asm!("int3")
    };
    #[cfg(target_arch = "aarch64")]
    // SAFETY: as above; the previous handler steps over the brk.
    unsafe {
        std::arch::asm!("brk #1")
    };
}

#[test]
fn foreign_breakpoints_reach_the_previous_handler() {
    // SAFETY: installs a SA_SIGINFO handler of the right signature.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = previous_handler as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGTRAP, &sa, std::ptr::null_mut()), 0);
    }
    let f = ft_double as extern "C" fn(u64) -> u64;
    let p = Probe::builder().function(f).pre(on_hit).register().unwrap();
    foreign_trap();
    assert_eq!(FOREIGN.load(Ordering::Relaxed), 1, "the program's own breakpoint reached its handler");
    assert_eq!(black_box(f)(21), 42);
    assert_eq!((p.nhit(), PROBED.load(Ordering::Relaxed)), (1, 1), "the probe still works");
    foreign_trap();
    assert_eq!(FOREIGN.load(Ordering::Relaxed), 2);
}
