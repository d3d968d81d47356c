//! Cost of one probe hit per mechanism, beside its floor (ids are stable: compare runs).
//!
//! - `hit/direct_call`: the probed function called plainly.
//! - `hit/int3_floor`: the same work behind a raw breakpoint (`int3`; aarch64 `brk`)
//!   whose SIGTRAP handler only steps over it: the floor of any trap-based probe.
//! - `hit/breakpoint`: a probekit probe with an empty pre handler (boosted: one trap).
//! - `hit/breakpoint_post`: pre and post handlers (two traps).
//!
//! `int3_floor` runs first, with its own SIGTRAP handler, before probekit installs its.

use criterion::{criterion_group, criterion_main, Criterion};
use probekit::{Probe, PtRegs};
use std::hint::black_box;

#[inline(never)]
#[no_mangle]
extern "C" fn hit_target(x: u64) -> u64 {
    x.wrapping_add(1)
}

#[inline(never)]
#[no_mangle]
extern "C" fn hit_target_post(x: u64) -> u64 {
    x.wrapping_add(1)
}

// The floor: a breakpoint, then the same work as hit_target.
#[cfg(target_arch = "x86_64")]
std::arch::global_asm!(".globl hit_int3", "hit_int3:", "int3", "lea rax, [rdi + 1]", "ret");
#[cfg(target_arch = "aarch64")]
std::arch::global_asm!(".globl hit_int3", "hit_int3:", "brk #1", "add x0, x0, #1", "ret");
extern "C" {
    fn hit_int3(x: u64) -> u64;
}

extern "C" fn step_over(_sig: libc::c_int, _info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // x86_64: int3 already advanced the pc. aarch64: brk did not.
    #[cfg(target_arch = "aarch64")]
    // SAFETY: the kernel passes a valid ucontext_t to SA_SIGINFO handlers.
    unsafe {
        (*(_ctx as *mut libc::ucontext_t)).uc_mcontext.pc += 4;
    }
}

fn empty(_r: &mut PtRegs) {}

fn hit(c: &mut Criterion) {
    let mut g = c.benchmark_group("hit");
    g.bench_function("direct_call", |b| b.iter(|| black_box(hit_target as extern "C" fn(u64) -> u64)(black_box(1))));

    // SAFETY: a SA_SIGINFO handler of the right signature, installed before probekit's.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = step_over as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGTRAP, &sa, std::ptr::null_mut()), 0);
    }
    // SAFETY: hit_int3 traps, is stepped over by step_over, and returns x + 1.
    g.bench_function("int3_floor", |b| b.iter(|| unsafe { hit_int3(black_box(1)) }));

    let f = hit_target as extern "C" fn(u64) -> u64;
    let p = Probe::builder().function(f).pre(empty).register().expect("probe");
    g.bench_function("breakpoint", |b| b.iter(|| black_box(f)(black_box(1))));
    assert!(p.nhit() > 0);
    drop(p);

    let f = hit_target_post as extern "C" fn(u64) -> u64;
    let p = Probe::builder().function(f).pre(empty).post(empty).register().expect("probe");
    g.bench_function("breakpoint_post", |b| b.iter(|| black_box(f)(black_box(1))));
    drop(p);
    g.finish();
}

criterion_group!(benches, hit);
criterion_main!(benches);
