// Handlers are closures that capture state: two probes sharing code tell which fired.
use probekit::{Probe, PtRegs, ReturnProbe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[inline(never)]
#[no_mangle]
pub extern "C" fn closure_a(x: u64) -> u64 {
    x + 1
}

#[inline(never)]
#[no_mangle]
pub extern "C" fn closure_b(x: u64) -> u64 {
    x + 2
}

fn main() {
    let hits = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let probe_on = |f: extern "C" fn(u64) -> u64, which: usize| {
        let hits = hits.clone();
        Probe::builder().function(f).pre(move |_: &PtRegs| {
            hits[which].fetch_add(1, Ordering::Relaxed);
        })
    };
    let a = probe_on(closure_a, 0).register().unwrap();
    let b = probe_on(closure_b, 1).register().unwrap();
    let returns = Arc::new(AtomicU64::new(0));
    let seen = returns.clone();
    let r = ReturnProbe::builder()
        .function(closure_b as extern "C" fn(u64) -> u64)
        .handler(move |regs: &PtRegs, _: &mut ()| {
            seen.fetch_add(regs.return_value(), Ordering::Relaxed);
        })
        .register()
        .unwrap();
    assert_eq!(std::hint::black_box(closure_a as extern "C" fn(u64) -> u64)(1), 2);
    assert_eq!(std::hint::black_box(closure_b as extern "C" fn(u64) -> u64)(1), 3);
    assert_eq!(std::hint::black_box(closure_b as extern "C" fn(u64) -> u64)(2), 4);
    assert_eq!([hits[0].load(Ordering::Relaxed), hits[1].load(Ordering::Relaxed)], [1, 2]);
    assert_eq!(returns.load(Ordering::Relaxed), 7);
    drop((a, b, r));
}
