//! One handler on many functions (the kernel's fprobe): a glob over a module's
//! functions, the handler told which function fired, return handlers with per-call
//! data, functions that cannot be attached reported, and detaching restores the text.

use probekit::{Attached, Error, MultiProbe, PtRegs};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// The module the globs choose from: plain functions (breakpoint probes) and
/// `#[traceable]` ones (site probes).
mod targets {
    use std::hint::black_box;

    #[inline(never)]
    pub fn alpha(x: u64) -> u64 {
        black_box(x).wrapping_mul(3)
    }

    #[inline(never)]
    pub fn beta(x: u64) -> u64 {
        black_box(x) ^ 0xbeef
    }

    #[inline(never)]
    pub fn gamma(x: u64) -> u64 {
        black_box(x).wrapping_add(0x6a)
    }

    #[probekit::traceable]
    pub fn traced_delta(x: u64) -> u64 {
        black_box(x).rotate_left(9)
    }

    /// Calls each function once (through `black_box`, so none is inlined or dropped);
    /// their results xor-ed (a `u64`, returned in a register, not through memory).
    pub fn call_all(x: u64) -> u64 {
        black_box(alpha as fn(u64) -> u64)(x) ^ black_box(beta as fn(u64) -> u64)(x) ^ black_box(gamma as fn(u64) -> u64)(x) ^ traced_delta(x)
    }
}

fn expected(x: u64) -> [u64; 4] {
    [x.wrapping_mul(3), x ^ 0xbeef, x.wrapping_add(0x6a), x.rotate_left(9)]
}

fn expected_all(x: u64) -> u64 {
    expected(x).iter().fold(0, |a, b| a ^ b)
}

const GLOB: &str = "multi::targets::*";

/// The globs run in one process with other tests: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// The address and id of the function whose entry handler ran last, and how many ran.
static LAST_ADDR: AtomicUsize = AtomicUsize::new(0);
static ENTRIES: AtomicU64 = AtomicU64::new(0);

fn on_entry(_regs: &PtRegs, f: &Attached, _: &mut ()) -> bool {
    LAST_ADDR.store(f.addr, Ordering::Relaxed);
    ENTRIES.fetch_add(1, Ordering::Relaxed);
    true
}

fn addrs() -> [usize; 4] {
    [
        targets::alpha as fn(u64) -> u64 as usize,
        targets::beta as fn(u64) -> u64 as usize,
        targets::gamma as fn(u64) -> u64 as usize,
        targets::traced_delta as fn(u64) -> u64 as usize,
    ]
}

/// The first 16 bytes at each function, and at the traced function's site.
fn text() -> Vec<Vec<u8>> {
    let site = probekit::sites().into_iter().find(|s| s.name.ends_with("targets::traced_delta")).expect("the site").site;
    // SAFETY: every address is code of this executable, mapped readable for at least 16
    // bytes (more text follows each).
    addrs().iter().chain([&site]).map(|a| unsafe { std::slice::from_raw_parts(*a as *const u8, 16) }.to_vec()).collect()
}

#[test]
fn a_glob_attaches_to_every_function_of_a_module_and_tells_the_handler_which() {
    let _s = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let before = text();
    let probe = MultiProbe::builder().pattern(GLOB).entry(on_entry).register().unwrap();
    let mut names: Vec<&str> = probe.functions().map(|f| f.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["multi::targets::alpha", "multi::targets::beta", "multi::targets::call_all", "multi::targets::gamma", "multi::targets::traced_delta"]);
    assert!(probe.skipped().is_empty(), "{:?}", probe.skipped());
    // Each attached function is listed; the traced one rides its site.
    let listing = probekit::list();
    for f in probe.functions() {
        assert!(listing.0.iter().any(|p| p.symbol.as_ref().is_some_and(|(n, _)| *n == f.name)), "{} not in\n{listing}", f.name);
    }
    assert!(listing.0.iter().any(|p| p.site && p.symbol.as_ref().is_some_and(|(n, _)| n.ends_with("traced_delta"))), "{listing}");

    // The handler learns which function fired, for each of them.
    for (i, &addr) in addrs().iter().enumerate() {
        let entries = ENTRIES.load(Ordering::Relaxed);
        let f = [targets::alpha, targets::beta, targets::gamma, targets::traced_delta][i];
        assert_eq!(black_box(f)(5), expected(5)[i]);
        assert_eq!(ENTRIES.load(Ordering::Relaxed) - entries, 1, "one entry handler ran for function {i}");
        assert_eq!(LAST_ADDR.load(Ordering::Relaxed), addr, "the handler saw function {i}");
    }
    let hits: Vec<(&str, u64)> = probe.hits().map(|(f, n)| (f.name.as_str(), n)).collect();
    assert!(hits.iter().all(|(n, h)| *h == u64::from(!n.ends_with("call_all"))), "{hits:?}");
    let ids: std::collections::HashSet<u32> = probe.functions().map(|f| f.id).collect();
    assert_eq!(ids.len(), 5, "each function has its own id");

    // Detach all: no handler runs, the text is as it was.
    probe.unregister().unwrap();
    let entries = ENTRIES.load(Ordering::Relaxed);
    assert_eq!(targets::call_all(6), expected_all(6));
    assert_eq!(ENTRIES.load(Ordering::Relaxed), entries, "no handler runs after detaching");
    assert_eq!(text(), before, "the text is restored byte for byte");

    // Ids number the functions of the probe.
    let again = MultiProbe::builder().pattern(GLOB).entry(on_entry).register().unwrap();
    assert_eq!(again.functions().map(|f| f.id).collect::<std::collections::HashSet<_>>(), (0..5).collect());
}

/// The sum of the return values each return handler saw, and the functions' ids seen.
static RETURNS: AtomicU64 = AtomicU64::new(0);
static NESTED: AtomicU64 = AtomicU64::new(0);

fn enter_with_arg(regs: &PtRegs, _f: &Attached, arg: &mut u64) -> bool {
    *arg = regs.arg(0).unwrap_or(0);
    true
}

fn exit_with_arg(regs: &PtRegs, f: &Attached, arg: &mut u64) {
    // The per-call data is this call's: call_all's argument is its own, not that of a
    // function it called (which returned before it).
    if f.name.ends_with("call_all") {
        NESTED.store(*arg, Ordering::Relaxed);
        return;
    }
    // The entry handler's data reaches the return handler (no assert here: a panic
    // in a handler aborts; a wrong argument shows in the sum).
    RETURNS.fetch_add(regs.return_value() + (*arg != 11) as u64 * 1_000_000, Ordering::Relaxed);
}

#[test]
fn return_handlers_get_the_function_and_per_call_data() {
    let _s = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let before = text();
    let probe = MultiProbe::with_data::<u64>().pattern(GLOB).exclude("*::gamma").entry(enter_with_arg).exit(exit_with_arg).register().unwrap();
    assert_eq!(probe.functions().count(), 4, "gamma is excluded");
    assert_eq!(probekit::list().0.iter().filter(|p| p.is_return).count(), 4);
    let returns = RETURNS.load(Ordering::Relaxed);
    assert_eq!(targets::call_all(11), expected_all(11));
    let e = expected(11);
    assert_eq!(RETURNS.load(Ordering::Relaxed) - returns, e[0] + e[1] + e[3], "alpha, beta and traced_delta returned through their handlers");
    assert_eq!(NESTED.load(Ordering::Relaxed), 11);
    drop(probe);
    assert_eq!(text(), before, "the text is restored byte for byte");
}

#[test]
fn functions_that_cannot_be_attached_are_reported_not_skipped_silently() {
    let _s = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // probekit's own hit path is refused (it would recurse): reported with the reason.
    let hit_path = "probe_rt::retprobe::on_entry";
    let probe = MultiProbe::builder().pattern(GLOB).names([hit_path, "no_such_function_anywhere"]).register().unwrap();
    assert_eq!(probe.functions().count(), 5);
    let skipped = probe.skipped();
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    assert!(skipped.iter().any(|s| s.name == hit_path && matches!(s.error, Error::Blacklisted { .. })), "{skipped:?}");
    assert!(skipped.iter().any(|s| s.name == "no_such_function_anywhere" && matches!(s.error, Error::SymbolNotFound { .. })), "{skipped:?}");
    drop(probe);

    // Strict: the first of them fails the whole registration, and nothing is attached.
    let before = text();
    let listed = probekit::list().0.len();
    let err = MultiProbe::builder().pattern(GLOB).names([hit_path]).strict().register().unwrap_err();
    assert!(matches!(&err, Error::Attach { function, error, .. } if function == hit_path && matches!(**error, Error::Blacklisted { .. })), "{err}");
    assert_eq!(probekit::list().0.len(), listed);
    assert_eq!(text(), before);

    // Nothing chosen, or a glob that does not parse: typed errors.
    assert!(matches!(MultiProbe::builder().pattern("multi::no_such_module::*").register(), Err(Error::NoMatch { .. })));
    assert!(matches!(MultiProbe::builder().pattern("multi::[").register(), Err(Error::BadPattern { .. })));
}
