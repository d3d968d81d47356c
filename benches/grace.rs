//! Cost of one grace period by the number of threads alive that have hit a probe
//! (issue 12, "any number of threads"): what a registration that reuses a record waits
//! for (ids are stable: compare runs).
//!
//! - `grace/threads/N`: one grace period (`__private::grace_period`, no retired slots)
//!   with `N` threads alive besides the bench's own, each having hit a breakpoint
//!   probe once and then waiting on a barrier (asleep in `futex`, as idle threads of a
//!   real program are). Every one of them is sampled: signalled, and its answer
//!   waited for.
//!
//! The threads are started once and kept, growing from one bench to the next; 2,000
//! is the count the issue asks for on both lanes.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use probekit::Probe;
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

/// Thread counts measured, in increasing order.
const COUNTS: [usize; 3] = [0, 1_000, 2_000];

/// Each thread's stack: small, so that 2,000 of them are cheap (a breakpoint hit needs
/// a few KiB of it).
const STACK: usize = 64 << 10;

#[inline(never)]
#[no_mangle]
extern "C" fn grace_target(x: u64) -> u64 {
    x.wrapping_add(1)
}

fn empty(_r: &probekit::PtRegs) {}

fn grace(c: &mut Criterion) {
    let probe = Probe::builder().function(grace_target as extern "C" fn(u64) -> u64).pre(empty).register().expect("probe");
    let all = *COUNTS.last().expect("counts");
    // Every thread waits here after its hit; the bench's thread joins them at the end.
    let barrier = Arc::new(Barrier::new(all + 1));
    let ready = Arc::new(AtomicUsize::new(0));
    let mut threads = Vec::with_capacity(all);

    let mut g = c.benchmark_group("grace");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    for n in COUNTS {
        while threads.len() < n {
            let (barrier, ready) = (Arc::clone(&barrier), Arc::clone(&ready));
            let t = std::thread::Builder::new()
                .stack_size(STACK)
                .spawn(move || {
                    assert_eq!(black_box(grace_target as extern "C" fn(u64) -> u64)(1), 2);
                    ready.fetch_add(1, Ordering::Release);
                    barrier.wait();
                })
                .expect("spawn a thread");
            threads.push(t);
        }
        while ready.load(Ordering::Acquire) < n {
            std::thread::sleep(Duration::from_millis(1));
        }
        let table = probekit::__private::thread_table();
        eprintln!("grace/threads/{n}: thread table {table:?}");
        g.bench_with_input(BenchmarkId::new("threads", n), &n, |b, _| b.iter(|| assert!(probekit::__private::grace_period(), "a grace period completes")));
    }
    g.finish();
    barrier.wait();
    threads.into_iter().for_each(|t| t.join().expect("a thread"));
    assert_eq!(probe.nhit(), all as u64);
}

criterion_group!(benches, grace);
criterion_main!(benches);
