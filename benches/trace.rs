//! What the function-graph tracer costs per traced call (issue 15's `hit/trace_record`),
//! beside its parts, measured in one run:
//!
//! - `hit/direct_call`: a plain call of a `#[traceable]` function whose site is a nop.
//! - `hit/site_return`: a return probe on a site with empty handlers: entry and return,
//!   no trap (what every traced call rides).
//! - `hit/clock`: one `CLOCK_MONOTONIC` read (`clock_gettime`; a traced call reads the
//!   cycle counter instead, twice).
//! - `hit/site_return_counter`: the same return probe with handlers that read the
//!   cycle counter, as the tracer does (`rdtsc`, aarch64 `cntvct_el0`), at the entry
//!   and at the return, and keep both in the per-call data: what a traced call of a
//!   site cost through return probes, less the tracer's own bookkeeping.
//! - `hit/trace_floor`: the floor of a traced call on the light path: an exit path's
//!   shape with two minimal stubs, each keeping what a call may clobber there and
//!   calling a function that reads the cycle counter and stores it.
//! - `hit/trace_record`: the tracer on a site: entry and return, two timestamps, a
//!   frame pushed and a record written to the thread's ring. The site has an exit
//!   path, so the call takes the tracer's light path (probe-rt `site::fgraph`: light
//!   trampolines that save the argument or return registers only, no return-probe
//!   instance), not the return probe `hit/site_return` measures.
//! - `hit/trace_record_args`: the same with two arguments and the return value kept.
//!
//! `cargo bench --bench trace`; in CI `-- --test` (each runs once).

use criterion::{criterion_group, criterion_main, Criterion};
use probekit::trace::{now_ns, Full, Tracer};
use probekit::{PtRegs, ReturnProbe};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

#[probekit::traceable]
fn plain(x: u64) -> u64 {
    x.wrapping_add(1)
}

#[probekit::traceable]
fn site_return(x: u64) -> u64 {
    x.wrapping_add(1)
}

#[probekit::traceable]
fn site_return_counter(x: u64) -> u64 {
    x.wrapping_add(1)
}

#[probekit::traceable]
fn traced(x: u64) -> u64 {
    x.wrapping_add(1)
}

#[probekit::traceable]
fn traced_args(x: u64) -> u64 {
    x.wrapping_add(1)
}

fn empty_return(_r: &PtRegs, _: &mut ()) {}

/// Where the floor's stubs store their counter reads (one thread runs it).
static TRACE_FLOOR_TICKS: [AtomicU64; 2] = [const { AtomicU64::new(0) }; 2];

// The floor of a traced call on the light path: `trace_floor(x)` is shaped like a
// site's exit path around hit_target's work (a call of an entry stub, a call of the
// body, a call of an exit stub), and each stub keeps what a call may clobber that is
// live there (entry: the argument registers, general and FP/SIMD, and the other
// caller-saved general registers; exit: the return registers and the same others),
// then calls a function that reads the cycle counter and stores it. What
// `hit/trace_record` costs above it is the runtime's: finding the site's record,
// the reentrancy flag, the ring's frame stack and record.
#[cfg(target_arch = "x86_64")]
std::arch::global_asm!(
    ".balign 16",
    ".globl trace_floor",
    "trace_floor:",
    "call 4f",
    "sub rsp, 8",
    "call 6f",
    "add rsp, 8",
    "call 5f",
    "ret",
    "4:", // the entry stub: rsp % 16 == 0 here
    "push rdi",
    "push rsi",
    "push rdx",
    "push rcx",
    "push r8",
    "push r9",
    "push rax",
    "push r10",
    "push r11",
    "sub rsp, 136",
    "movaps [rsp], xmm0",
    "movaps [rsp + 16], xmm1",
    "movaps [rsp + 32], xmm2",
    "movaps [rsp + 48], xmm3",
    "movaps [rsp + 64], xmm4",
    "movaps [rsp + 80], xmm5",
    "movaps [rsp + 96], xmm6",
    "movaps [rsp + 112], xmm7",
    "xor edi, edi",
    "call 7f",
    "movaps xmm0, [rsp]",
    "movaps xmm1, [rsp + 16]",
    "movaps xmm2, [rsp + 32]",
    "movaps xmm3, [rsp + 48]",
    "movaps xmm4, [rsp + 64]",
    "movaps xmm5, [rsp + 80]",
    "movaps xmm6, [rsp + 96]",
    "movaps xmm7, [rsp + 112]",
    "add rsp, 136",
    "pop r11",
    "pop r10",
    "pop rax",
    "pop r9",
    "pop r8",
    "pop rcx",
    "pop rdx",
    "pop rsi",
    "pop rdi",
    "ret",
    "5:", // the exit stub: rsp % 16 == 0 here
    "push rax",
    "push rdx",
    "push rcx",
    "push rsi",
    "push rdi",
    "push r8",
    "push r9",
    "push r10",
    "push r11",
    "sub rsp, 40",
    "movaps [rsp], xmm0",
    "movaps [rsp + 16], xmm1",
    "mov edi, 8",
    "call 7f",
    "movaps xmm0, [rsp]",
    "movaps xmm1, [rsp + 16]",
    "add rsp, 40",
    "pop r11",
    "pop r10",
    "pop r9",
    "pop r8",
    "pop rdi",
    "pop rsi",
    "pop rcx",
    "pop rdx",
    "pop rax",
    "ret",
    "6:", // the body: hit_target's work
    "lea rax, [rdi + 1]",
    "ret",
    "7:", // the counter, stored at byte `rdi` of TRACE_FLOOR_TICKS
    "rdtsc",
    "shl rdx, 32",
    "or rax, rdx",
    "lea rdx, [rip + {ticks}]",
    "mov [rdx + rdi], rax",
    "ret",
    ticks = sym TRACE_FLOOR_TICKS,
);
#[cfg(target_arch = "aarch64")]
std::arch::global_asm!(
    ".balign 16",
    ".globl trace_floor",
    "trace_floor:",
    "stp x29, x30, [sp, #-16]!",
    "bl 4f",
    "bl 6f",
    "bl 5f",
    "ldp x29, x30, [sp], #16",
    "ret",
    "4:", // the entry stub
    "stp x0, x1, [sp, #-304]!",
    "stp x2, x3, [sp, #16]",
    "stp x4, x5, [sp, #32]",
    "stp x6, x7, [sp, #48]",
    "stp x8, x9, [sp, #64]",
    "stp x10, x11, [sp, #80]",
    "stp x12, x13, [sp, #96]",
    "stp x14, x15, [sp, #112]",
    "stp x16, x17, [sp, #128]",
    "stp x18, x30, [sp, #144]",
    "stp q0, q1, [sp, #160]",
    "stp q2, q3, [sp, #192]",
    "stp q4, q5, [sp, #224]",
    "stp q6, q7, [sp, #256]",
    "mov x0, #0",
    "bl 7f",
    "ldp q6, q7, [sp, #256]",
    "ldp q4, q5, [sp, #224]",
    "ldp q2, q3, [sp, #192]",
    "ldp q0, q1, [sp, #160]",
    "ldp x18, x30, [sp, #144]",
    "ldp x16, x17, [sp, #128]",
    "ldp x14, x15, [sp, #112]",
    "ldp x12, x13, [sp, #96]",
    "ldp x10, x11, [sp, #80]",
    "ldp x8, x9, [sp, #64]",
    "ldp x6, x7, [sp, #48]",
    "ldp x4, x5, [sp, #32]",
    "ldp x2, x3, [sp, #16]",
    "ldp x0, x1, [sp], #304",
    "ret",
    "5:", // the exit stub
    "stp x0, x1, [sp, #-224]!",
    "stp x2, x3, [sp, #16]",
    "stp x4, x5, [sp, #32]",
    "stp x6, x7, [sp, #48]",
    "stp x8, x9, [sp, #64]",
    "stp x10, x11, [sp, #80]",
    "stp x12, x13, [sp, #96]",
    "stp x14, x15, [sp, #112]",
    "stp x16, x17, [sp, #128]",
    "stp x18, x30, [sp, #144]",
    "stp q0, q1, [sp, #160]",
    "stp q2, q3, [sp, #192]",
    "mov x0, #8",
    "bl 7f",
    "ldp q2, q3, [sp, #192]",
    "ldp q0, q1, [sp, #160]",
    "ldp x18, x30, [sp, #144]",
    "ldp x16, x17, [sp, #128]",
    "ldp x14, x15, [sp, #112]",
    "ldp x12, x13, [sp, #96]",
    "ldp x10, x11, [sp, #80]",
    "ldp x8, x9, [sp, #64]",
    "ldp x6, x7, [sp, #48]",
    "ldp x4, x5, [sp, #32]",
    "ldp x2, x3, [sp, #16]",
    "ldp x0, x1, [sp], #224",
    "ret",
    "6:", // the body: hit_target's work
    "add x0, x0, #1",
    "ret",
    "7:", // the counter, stored at byte `x0` of TRACE_FLOOR_TICKS
    "mrs x16, cntvct_el0",
    "adrp x17, {ticks}",
    "add x17, x17, :lo12:{ticks}",
    "str x16, [x17, x0]",
    "ret",
    ticks = sym TRACE_FLOOR_TICKS,
);
// x + 1, touching only scratch registers and TRACE_FLOOR_TICKS: safe to call.
unsafe extern "C" {
    safe fn trace_floor(x: u64) -> u64;
}

/// The cycle counter, read as the tracer reads it.
#[inline(always)]
fn counter() -> u64 {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: RDTSC exists on every x86_64 CPU and Linux allows it in user mode.
    let ticks = unsafe { core::arch::x86_64::_rdtsc() };
    #[cfg(target_arch = "aarch64")]
    let ticks = {
        let ticks: u64;
        // SAFETY: Linux lets EL0 read CNTVCT_EL0.
        unsafe { core::arch::asm!("mrs {}, cntvct_el0", out(reg) ticks, options(nomem, nostack, preserves_flags)) };
        ticks
    };
    ticks
}

fn hit(c: &mut Criterion) {
    let mut g = c.benchmark_group("hit");
    g.bench_function("direct_call", |b| b.iter(|| black_box(plain as fn(u64) -> u64)(black_box(1))));

    let f = site_return as fn(u64) -> u64;
    let p = ReturnProbe::builder().function(f).handler(empty_return).register().expect("return probe on a site");
    g.bench_function("site_return", |b| b.iter(|| black_box(f)(black_box(1))));
    assert_eq!(p.nmissed(), 0);
    drop(p);

    let f = site_return_counter as fn(u64) -> u64;
    let p = ReturnProbe::builder()
        .function(f)
        .data::<[u64; 2]>()
        .entry_handler(|_, t| {
            t[0] = counter();
            true
        })
        .handler(|_, t| t[1] = black_box(counter()).wrapping_sub(t[0]))
        .register()
        .expect("return probe on a site");
    g.bench_function("site_return_counter", |b| b.iter(|| black_box(f)(black_box(1))));
    assert_eq!(p.nmissed(), 0);
    drop(p);

    g.bench_function("clock", |b| b.iter(now_ns));

    g.bench_function("trace_floor", |b| b.iter(|| trace_floor(black_box(1))));
    assert_eq!(trace_floor(1), 2);
    assert!(TRACE_FLOOR_TICKS.iter().all(|t| t.load(Ordering::Relaxed) != 0));

    // Overwrite: the ring wraps during the bench, as a flight recorder's does.
    let f = traced as fn(u64) -> u64;
    let t = Tracer::builder().function(f).capacity(1 << 12).when_full(Full::Overwrite).register().expect("tracer on a site");
    t.start();
    g.bench_function("trace_record", |b| b.iter(|| black_box(f)(black_box(1))));
    t.stop();
    assert_eq!(t.nmissed(), 0);
    assert!(t.snapshot().calls() > 0);
    drop(t);

    let f = traced_args as fn(u64) -> u64;
    let t = Tracer::builder().function(f).args(2).retval().capacity(1 << 12).register().expect("tracer on a site");
    t.start();
    g.bench_function("trace_record_args", |b| b.iter(|| black_box(f)(black_box(1))));
    t.stop();
    let snap = t.snapshot();
    assert!(snap.threads.iter().flat_map(|t| &t.calls).all(|c| c.args()[0] == 1 && c.ret == Some(2)));
    g.finish();
}

criterion_group!(benches, hit);
criterion_main!(benches);
