//! What the function-graph tracer costs per traced call (issue 15's `hit/trace_record`),
//! beside its parts, measured in one run:
//!
//! - `hit/direct_call`: a plain call of a `#[traceable]` function whose site is a nop.
//! - `hit/site_return`: a return probe on a site with empty handlers: entry and return,
//!   no trap (what every traced call rides).
//! - `hit/clock`: one `CLOCK_MONOTONIC` read (`clock_gettime`; a traced call reads the
//!   cycle counter instead, twice).
//! - `hit/site_return_counter`: the floor of a traced call: the same return probe with
//!   handlers that read the cycle counter, as the tracer does (`rdtsc`, aarch64
//!   `cntvct_el0`), at the entry and at the return, and keep both in the per-call data.
//!   What `hit/trace_record` costs above it is the tracer's own bookkeeping.
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
