//! Optimized probes beside sites: a probe on a `#[traceable]` function's entry keeps
//! riding the site (a call already, no trap: it satisfies `Optimize::Required`), and
//! one past the site, on an ordinary instruction, may be optimized.

use probekit::{NotOptimized, Optimize, Probe, PtRegs};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

#[probekit::traceable]
fn traced(a: u64) -> u64 {
    black_box(a).wrapping_mul(3).wrapping_add(1)
}

static HITS: AtomicU64 = AtomicU64::new(0);

#[test]
fn a_site_probe_stays_a_site_and_satisfies_required() {
    let f = traced as fn(u64) -> u64;
    let p = Probe::builder()
        .function(f)
        .pre(|_: &PtRegs| {
            HITS.fetch_add(1, Ordering::Relaxed);
        })
        .optimize(Optimize::Required)
        .register()
        .expect("a site probe");
    assert!(!p.is_optimized());
    assert_eq!(p.why_not_optimized(), Some(NotOptimized::Site));
    let listed = probekit::list().0.into_iter().find(|i| i.addr == p.address()).expect("listed");
    assert!(listed.site && !listed.optimized, "{listed:?}");
    assert_eq!(black_box(f)(2), 7);
    assert_eq!(HITS.load(Ordering::Relaxed), 1);
}
