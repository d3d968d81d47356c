//! `#[traceable] extern "C"` functions, as asm and C callers need them: called from C
//! by their C name and through an `extern "C" fn` pointer (from C and from Rust), a
//! site probe on them sees the arguments, its changes reach the body, and the return
//! value comes back to C; the same without the probe.

use probekit::{Probe, PtRegs, ReturnProbe};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

/// The function C calls: keeps its C ABI and its C name; its entry is a site.
#[probekit::traceable]
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn probekit_traceable_c_scale(a: u64, b: u64) -> u64 {
    black_box(a) * 100 + b
}

static SEEN: AtomicU64 = AtomicU64::new(0);
static RETURNED: AtomicU64 = AtomicU64::new(0);

/// Records both arguments and adds 1000 to the second.
fn see_and_bump(regs: &mut PtRegs) {
    SEEN.store(regs.arg(0).unwrap_or(0) * 10_000 + regs.arg(1).unwrap_or(0), Ordering::Relaxed);
    #[cfg(target_arch = "x86_64")]
    {
        regs.rsi += 1000;
    }
    #[cfg(target_arch = "aarch64")]
    {
        regs.regs[1] += 1000;
    }
}

fn on_return(regs: &PtRegs, _: &mut ()) {
    RETURNED.store(regs.return_value(), Ordering::Relaxed);
}

fn by_name(a: u64, b: u64) -> u64 {
    // SAFETY: the C function only calls the Rust one, which takes and returns integers.
    unsafe { native_tests::probekit_c_calls_by_name(a, b) }
}

fn through(f: extern "C" fn(u64, u64) -> u64, a: u64, b: u64) -> u64 {
    // SAFETY: as above; `f` is a valid `extern "C" fn(u64, u64) -> u64`.
    unsafe { native_tests::probekit_c_calls_through(f, a, b) }
}

#[test]
fn a_site_probe_on_an_extern_c_function_works_from_c_and_through_pointers() {
    let f = probekit_traceable_c_scale as extern "C" fn(u64, u64) -> u64;
    let site = probekit::sites().into_iter().find(|s| s.name.ends_with("::probekit_traceable_c_scale")).expect("the site is listed");
    assert_eq!(site.function, f as usize, "the function C calls is the one the site table records");
    assert_eq!((by_name(4, 2), through(f, 4, 2), black_box(f)(4, 2)), (403, 403, 402), "unprobed");

    // SAFETY: the traced function adds its arguments: any second argument is fine.
    let p = unsafe { Probe::builder().function(f).pre_mut(see_and_bump) }.register().unwrap();
    assert_eq!(p.address(), site.site, "the probe rides the site (no trap)");
    assert_eq!(by_name(5, 3), 1504, "C by name: the handler saw the call and its change reached the body");
    assert_eq!(SEEN.load(Ordering::Relaxed), 50_003);
    assert_eq!(through(f, 6, 7), 1608, "C through the pointer");
    assert_eq!(SEEN.load(Ordering::Relaxed), 60_007);
    let ptr: extern "C" fn(u64, u64) -> u64 = black_box(f);
    assert_eq!(ptr(8, 9), 1809, "Rust through the pointer");
    assert_eq!(SEEN.load(Ordering::Relaxed), 80_009);
    assert_eq!((p.nhit(), p.nmissed()), (3, 0));
    drop(p);

    // A return probe rides the same site; C gets the value the function returned.
    let r = ReturnProbe::builder().function(f).handler(on_return).register().unwrap();
    assert_eq!(r.address(), site.site);
    assert_eq!(by_name(2, 1), 202);
    assert_eq!(RETURNED.load(Ordering::Relaxed), 201);
    assert_eq!(through(f, 3, 1), 302);
    assert_eq!(RETURNED.load(Ordering::Relaxed), 301);
    assert_eq!(r.nhit(), 2);
    drop(r);

    assert_eq!((by_name(4, 2), through(f, 4, 2)), (403, 403), "unprobed again");
    assert_eq!(SEEN.load(Ordering::Relaxed), 80_009, "no handler ran");
}
