//! What the function-graph tracer costs per traced call (issue 15's `hit/trace_record`),
//! beside its parts, measured in one run:
//!
//! - `hit/direct_call`: a plain call of a `#[traceable]` function whose site is a nop.
//! - `hit/site_return`: a return probe on a site with empty handlers: entry and return,
//!   no trap (what every traced call rides).
//! - `hit/clock`: one `CLOCK_MONOTONIC` read (`clock_gettime`; a traced call reads the
//!   cycle counter instead, twice).
//! - `hit/trace_record`: the tracer on a site: entry and return, two timestamps, a
//!   frame pushed and a record written to the thread's ring.
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
fn traced(x: u64) -> u64 {
    x.wrapping_add(1)
}

#[probekit::traceable]
fn traced_args(x: u64) -> u64 {
    x.wrapping_add(1)
}

fn empty_return(_r: &PtRegs, _: &mut ()) {}

fn hit(c: &mut Criterion) {
    let mut g = c.benchmark_group("hit");
    g.bench_function("direct_call", |b| b.iter(|| black_box(plain as fn(u64) -> u64)(black_box(1))));

    let f = site_return as fn(u64) -> u64;
    let p = ReturnProbe::builder().function(f).handler(empty_return).register().expect("return probe on a site");
    g.bench_function("site_return", |b| b.iter(|| black_box(f)(black_box(1))));
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
