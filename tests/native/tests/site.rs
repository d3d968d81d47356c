//! Site probes: `#[traceable]` functions probed at their patchable entries, no trap.
//! Seed 003's cases (+0 rides the site, inside the site is refused, the listing's
//! flags), registers through the site trampoline, patching while threads run through
//! the site, and return probes and overrides on sites.

use probekit::{Entry, Error, Probe, PtRegs, ReturnProbe};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes of a site (x86_64: a 5-byte nop; aarch64: `mov x9, x30; nop`).
#[cfg(target_arch = "x86_64")]
const SITE_LEN: usize = 5;
#[cfg(target_arch = "aarch64")]
const SITE_LEN: usize = 8;

fn site_bytes(site: usize) -> Vec<u8> {
    // SAFETY: a site is in the text of this executable, mapped readable.
    unsafe { std::slice::from_raw_parts(site as *const u8, SITE_LEN) }.to_vec()
}

fn is_nop(bytes: &[u8]) -> bool {
    #[cfg(target_arch = "x86_64")]
    return bytes == [0x0f, 0x1f, 0x44, 0x00, 0x00];
    #[cfg(target_arch = "aarch64")]
    return bytes == [0xe9, 0x03, 0x1e, 0xaa, 0x1f, 0x20, 0x03, 0xd5]; // mov x9, x30; nop
}

/// The line of `probekit::list()` for the probe at `addr`.
fn listed(addr: usize) -> Option<String> {
    probekit::list().to_string().lines().find(|l| l.starts_with(&format!("{addr:016x} "))).map(str::to_string)
}

#[probekit::traceable]
fn seed(a: u64) -> u64 {
    black_box(a) * 2 + 1
}

static SEEN: AtomicU64 = AtomicU64::new(0);

fn see_arg(regs: &PtRegs) {
    SEEN.store(regs.arg(0).unwrap_or(0), Ordering::Relaxed);
}

#[test]
fn plus_zero_rides_the_site_and_lists_as_site() {
    let f = seed as fn(u64) -> u64;
    let site = probekit::sites().into_iter().find(|s| s.name.ends_with("::seed")).expect("the site is listed");
    assert!(is_nop(&site_bytes(site.site)), "a disabled site is a nop");
    let p = Probe::builder().function(f).pre(see_arg).register().unwrap();
    assert_eq!(p.address(), site.site, "the probe is on the site (+0)");
    assert!(!is_nop(&site_bytes(site.site)), "an enabled site is a call");
    assert_eq!(seed(20), 41);
    assert_eq!((SEEN.load(Ordering::Relaxed), p.nhit(), p.nmissed()), (20, 1, 0));
    let line = listed(site.site).expect("listed");
    assert!(line.ends_with(&format!("  k  {}+0x0  [SITE]", site.name)), "{line}");
    p.disable().unwrap();
    assert!(is_nop(&site_bytes(site.site)), "disabling writes the nop back");
    assert!(listed(site.site).unwrap().ends_with("  [DISABLED][SITE]"));
    assert_eq!(seed(3), 7);
    assert_eq!(p.nhit(), 1);
    p.enable().unwrap();
    assert_eq!(seed(4), 9);
    assert_eq!(p.nhit(), 2);
    drop(p);
    assert!(is_nop(&site_bytes(site.site)));
    assert_eq!(listed(site.site), None);
}

#[probekit::traceable]
fn inside(a: u64) -> u64 {
    black_box(a) + 3
}

#[test]
fn inside_the_site_is_refused() {
    let site = probekit::sites().into_iter().find(|s| s.name.ends_with("::inside")).expect("listed").site;
    #[cfg(target_arch = "x86_64")]
    let offsets = 1..SITE_LEN;
    #[cfg(target_arch = "aarch64")]
    let offsets = [4usize].into_iter();
    for off in offsets {
        // SAFETY: the address is an instruction of this test's code, not data.
        let e = unsafe { Probe::builder().address(site + off) }.pre(see_arg).register().unwrap_err();
        assert!(matches!(&e, Error::InsideSite { addr, site: s, function } if *addr == site + off && *s == site && function.ends_with("::inside")), "{e}");
        // Also counted from the function the program calls.
        let e = Probe::builder().function(inside as fn(u64) -> u64).offset(off).pre(see_arg).register().unwrap_err();
        assert!(matches!(e, Error::InsideSite { .. }), "{e}");
    }
    assert!(is_nop(&site_bytes(site)), "nothing was armed");
    assert_eq!(inside(1), 4);
}

/// Every integer and FP argument register, in and out of the handler.
#[probekit::traceable]
#[allow(clippy::too_many_arguments)]
fn many(a: u64, b: u64, c: u64, d: u64, e: u64, f: u64, x0: f64, x1: f64, x2: f64, x3: f64, x4: f64, x5: f64, x6: f64, x7: f64) -> f64 {
    (a + 2 * b + 3 * c + 4 * d + 5 * e + 6 * f) as f64 + x0 + 2.0 * x1 + 3.0 * x2 + 4.0 * x3 + 5.0 * x4 + 6.0 * x5 + 7.0 * x6 + 8.0 * x7
}

static FLOAT_WORK: AtomicU64 = AtomicU64::new(0);

/// Does float and vector work (which uses the FP/SIMD registers the arguments are in)
/// and changes the first integer argument.
fn float_math(regs: &mut PtRegs) {
    let mut acc = black_box(1.5f64);
    for i in 0..16 {
        acc = acc.mul_add(black_box(1.000_1), (i as f64).sqrt());
    }
    FLOAT_WORK.store(acc.to_bits(), Ordering::Relaxed);
    #[cfg(target_arch = "x86_64")]
    {
        regs.rdi += 1000;
    }
    #[cfg(target_arch = "aarch64")]
    {
        regs.regs[0] += 1000;
    }
}

#[test]
fn arguments_survive_a_handler_that_does_float_math_and_its_changes_reach_the_function() {
    let args = (1, 2, 3, 4, 5, 6, 0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5);
    let call = || many(args.0, args.1, args.2, args.3, args.4, args.5, args.6, args.7, args.8, args.9, args.10, args.11, args.12, args.13);
    let unprobed = call();
    // SAFETY: `many`'s first instruction; `many` is correct with any first argument.
    let p = unsafe { Probe::builder().address(many as *const () as usize).pre_mut(float_math) }.register().unwrap();
    assert_eq!(call(), unprobed + 1000.0, "FP arguments intact, the changed first argument arrived");
    assert_ne!(FLOAT_WORK.load(Ordering::Relaxed), 0);
    assert_eq!(p.nhit(), 1);
}

/// Integers, a reference and a pointer only: no FP/SIMD register carries an argument or
/// the return value.
#[probekit::traceable]
fn no_fp(a: u64, b: &u64, c: *const u8) -> u64 {
    black_box(a) + *b + c as u64
}

/// One float argument.
#[probekit::traceable]
fn some_fp(a: u64, k: f64) -> f64 {
    black_box(a) as f64 * k
}

extern "C" {
    // probe-rt's site trampolines (hidden symbols, linked into this executable).
    fn probekit_site_trampoline();
    fn probekit_site_trampoline_no_fp();
}

/// What the enabled site at `site` calls (x86_64 `call rel32`, aarch64 `bl`).
fn called_by(site: usize) -> usize {
    let b = site_bytes(site);
    #[cfg(target_arch = "x86_64")]
    {
        assert_eq!(b[0], 0xe8, "a call");
        (site + 5).wrapping_add_signed(i32::from_le_bytes([b[1], b[2], b[3], b[4]]) as isize)
    }
    #[cfg(target_arch = "aarch64")]
    {
        let bl = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        assert_eq!(bl >> 26, 0b100101, "a bl");
        (site + 4).wrapping_add_signed((((bl << 6) as i32) >> 6) as isize * 4)
    }
}

#[test]
fn a_site_keeps_fp_state_only_where_its_signature_can_carry_some() {
    let one = 1u64;
    for (f, keeps) in [(no_fp as fn(u64, &u64, *const u8) -> u64 as usize, false), (some_fp as fn(u64, f64) -> f64 as usize, true)] {
        let site = probekit::sites().into_iter().find(|s| s.function == f).expect("listed").site;
        // SAFETY: the functions' first instruction; both are correct with any first argument.
        let p = unsafe { Probe::builder().address(f).pre_mut(float_math) }.register().unwrap();
        let expected = if keeps { probekit_site_trampoline as *const () as usize } else { probekit_site_trampoline_no_fp as *const () as usize };
        assert_eq!(called_by(site), expected, "{f:#x}");
        drop(p);
    }
    // Through either trampoline the arguments arrive, changed by the handler where it
    // changed them, floats intact.
    let (_p, _q) = (
        // SAFETY: as above.
        unsafe { Probe::builder().address(no_fp as fn(u64, &u64, *const u8) -> u64 as usize).pre_mut(float_math) }.register().unwrap(),
        // SAFETY: as above.
        unsafe { Probe::builder().address(some_fp as fn(u64, f64) -> f64 as usize).pre_mut(float_math) }.register().unwrap(),
    );
    assert_eq!(no_fp(1, &one, std::ptr::without_provenance(2)), 1004);
    assert_eq!(some_fp(2, 0.25), 1002.0 * 0.25);
}

#[probekit::traceable]
fn hammered(a: u64) -> u64 {
    black_box(a).wrapping_mul(7) ^ 0x55
}

static HAMMER_HITS: AtomicU64 = AtomicU64::new(0);

fn count(_: &PtRegs) {
    HAMMER_HITS.fetch_add(1, Ordering::Relaxed);
}

#[test]
fn patching_under_fire_keeps_every_call_right() {
    let site = probekit::sites().into_iter().find(|s| s.name.ends_with("::hammered")).expect("listed").site;
    let callers = native_tests::callers(2, |a| assert_eq!(hammered(a), a.wrapping_mul(7) ^ 0x55));
    let p = Probe::builder().function(hammered as fn(u64) -> u64).pre(count).register().unwrap();
    for i in 0..300 {
        p.disable().unwrap();
        std::thread::yield_now();
        p.enable().unwrap();
        std::thread::yield_now();
        if i == 0 {
            // A call that began with the site enabled (the machine may be busy).
            callers.wait(3);
        }
    }
    p.disable().unwrap();
    let calls = callers.stop();
    let hits = p.nhit();
    drop(p);
    assert!(is_nop(&site_bytes(site)), "the nop is back");
    // Every hit ran its handler once; no call was hit twice.
    assert_eq!(HAMMER_HITS.load(Ordering::Relaxed), hits);
    assert!(hits > 0 && hits <= calls, "{hits} hits, {calls} calls");
}

#[probekit::traceable]
fn divide(a: u64, b: u64) -> u64 {
    black_box(a) / black_box(b).max(1)
}

static RETURNED: AtomicU64 = AtomicU64::new(0);

fn on_return(regs: &PtRegs, _: &mut ()) {
    RETURNED.store(regs.return_value(), Ordering::Relaxed);
}

fn refuse_zero(regs: &mut PtRegs, _: &mut ()) -> Entry {
    if regs.arg(1) == Some(0) {
        Entry::Override(u64::MAX)
    } else {
        Entry::Continue
    }
}

#[test]
fn return_probes_and_overrides_ride_the_site() {
    let f = divide as fn(u64, u64) -> u64;
    // SAFETY: `divide` returns a `u64`, any value of which its callers here accept.
    let p = unsafe { ReturnProbe::builder().function(f).entry_handler_mut(refuse_zero) }.handler(on_return).register().unwrap();
    let line = listed(p.address()).expect("listed");
    assert!(line.contains("  r  ") && line.ends_with("[SITE]"), "{line}");
    assert_eq!(divide(42, 6), 7);
    assert_eq!(RETURNED.load(Ordering::Relaxed), 7);
    assert_eq!(divide(42, 0), u64::MAX, "overridden at the site: the function did not run");
    assert_eq!(RETURNED.load(Ordering::Relaxed), 7, "an overridden call runs no return handler");
    assert_eq!((p.nhit(), p.nmissed()), (2, 0));
}

#[probekit::traceable]
fn shared_site(a: u64) -> u64 {
    black_box(a) + 100
}

static ORDER: AtomicU64 = AtomicU64::new(0);

fn first(regs: &mut PtRegs) {
    ORDER.store(ORDER.load(Ordering::Relaxed) * 10 + 1, Ordering::Relaxed);
    #[cfg(target_arch = "x86_64")]
    {
        regs.rdi *= 2;
    }
    #[cfg(target_arch = "aarch64")]
    {
        regs.regs[0] *= 2;
    }
}

fn second(regs: &PtRegs) {
    // Runs after the first, and sees its change.
    let digit = if regs.arg(0) == Some(10) { 2 } else { 9 };
    ORDER.store(ORDER.load(Ordering::Relaxed) * 10 + digit, Ordering::Relaxed);
}

fn third(_: &PtRegs) {
    ORDER.store(ORDER.load(Ordering::Relaxed) * 10 + 3, Ordering::Relaxed);
}

/// `shared_site(5)`, and the digits its handlers wrote, in their order.
fn order_of_call() -> (u64, u64) {
    ORDER.store(0, Ordering::Relaxed);
    let r = shared_site(5);
    (r, ORDER.load(Ordering::Relaxed))
}

#[test]
fn probes_on_one_site_share_it_in_registration_order() {
    let f = shared_site as fn(u64) -> u64;
    let site = probekit::sites().into_iter().find(|s| s.name.ends_with("::shared_site")).expect("listed").site;
    // SAFETY: `shared_site` is correct with any argument.
    let a = unsafe { Probe::builder().function(f).pre_mut(first) }.register().unwrap();
    let b = Probe::builder().function(f).pre(second).register().unwrap();
    let c = Probe::builder().function(f).pre(third).register().unwrap();
    assert_eq!(order_of_call(), (110, 123), "registration order; the first handler's change reached the others and the function");
    // Disabling keeps a probe's place (the kernel's aggregated kprobes do the same).
    b.disable().unwrap();
    assert_eq!(order_of_call(), (110, 13));
    b.enable().unwrap();
    assert_eq!(order_of_call(), (110, 123));
    // Unregistering one in the middle leaves the others in order; a new one comes last.
    drop(b);
    assert_eq!(order_of_call(), (110, 13));
    let d = Probe::builder().function(f).pre(second).register().unwrap();
    assert_eq!(order_of_call(), (110, 132));
    drop(a);
    assert!(!is_nop(&site_bytes(site)), "still enabled for the other probes");
    assert_eq!(order_of_call(), (105, 39));
    assert_eq!((c.nhit(), d.nhit()), (6, 2));
    drop((c, d));
    assert!(is_nop(&site_bytes(site)), "the last one out writes the nop back");
}

#[probekit::traceable]
fn reused_a(a: u64) -> u64 {
    black_box(a).wrapping_mul(5).wrapping_sub(2)
}

#[probekit::traceable]
fn reused_b(a: u64) -> u64 {
    black_box(a) ^ 0x3c
}

static REUSE_SITES: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
static REUSE_HANDLED: AtomicU64 = AtomicU64::new(0);
static REUSE_WRONG: AtomicU64 = AtomicU64::new(0);

/// Counts, and checks it runs at the site its probe was registered on (`which`).
fn on_reused(regs: &PtRegs, which: usize) {
    REUSE_HANDLED.fetch_add(1, Ordering::Relaxed);
    if regs.instruction_pointer() != REUSE_SITES[which].load(Ordering::Relaxed) {
        REUSE_WRONG.fetch_add(1, Ordering::Relaxed);
    }
}

fn on_reused_a(regs: &PtRegs) {
    on_reused(regs, 0);
}

fn on_reused_b(regs: &PtRegs) {
    on_reused(regs, 1);
}

/// More registrations than there are records, two probes at a time on alternating
/// sites, unregistered in alternating order, while threads call both functions: the
/// records come back after grace periods and are linked on the other site's chain,
/// and no call ever runs a handler of the other site or returns a wrong value.
#[test]
fn site_records_are_reused_after_grace_periods() {
    let sites = probekit::sites();
    for (which, name) in ["::reused_a", "::reused_b"].iter().enumerate() {
        let s = sites.iter().find(|s| s.name.ends_with(name)).expect("listed").site;
        REUSE_SITES[which].store(s as u64, Ordering::Relaxed);
    }
    let callers = native_tests::callers(2, |i| {
        assert_eq!(reused_a(i), i.wrapping_mul(5).wrapping_sub(2));
        assert_eq!(reused_b(i), i ^ 0x3c);
    });
    // Enough registrations that records are retired and reused many times over.
    let registrations = 19 * probekit::probe::RECLAIM_BATCH;
    let mut counted = 0;
    for round in 0..registrations / 2 {
        type Pair = (fn(u64) -> u64, fn(&PtRegs));
        let (f, h): Pair = if round % 2 == 0 { (reused_a, on_reused_a) } else { (reused_b, on_reused_b) };
        let p = Probe::builder().function(f).pre(h).register().unwrap_or_else(|e| panic!("round {round}: {e}"));
        let q = Probe::builder().function(f).pre(h).register().unwrap_or_else(|e| panic!("round {round}: {e}"));
        std::thread::yield_now();
        let (first, second) = if round % 3 == 0 { (q, p) } else { (p, q) };
        first.disable().unwrap();
        counted += first.nhit() + first.nmissed();
        first.unregister().unwrap();
        std::thread::yield_now();
        second.disable().unwrap();
        counted += second.nhit() + second.nmissed();
        second.unregister().unwrap();
    }
    let calls = 2 * callers.stop(); // two calls each time
    let handled = REUSE_HANDLED.load(Ordering::Relaxed);
    assert_eq!(REUSE_WRONG.load(Ordering::Relaxed), 0, "a handler ran at the other site");
    // Each count read right after disarming may miss a handler still running then (it
    // cannot be read later: the record is reused), never the other way round; a call
    // runs both probes of its round at most.
    assert!(counted <= handled && handled <= 2 * calls, "{counted} counted, {handled} handled, {calls} calls");
    for site in &REUSE_SITES {
        assert!(is_nop(&site_bytes(site.load(Ordering::Relaxed) as usize)), "the nop is back");
    }
}

pub trait Scale {
    fn scaled(&self, k: u64) -> u64;
}

pub struct Factor(u64);

#[probekit::traceable]
impl Scale for Factor {
    fn scaled(&self, k: u64) -> u64 {
        black_box(self.0) * k
    }
}

fn double_k(regs: &mut PtRegs) {
    #[cfg(target_arch = "x86_64")]
    {
        regs.rsi *= 2;
    }
    #[cfg(target_arch = "aarch64")]
    {
        regs.regs[1] *= 2;
    }
}

static SCALED: AtomicU64 = AtomicU64::new(0);

fn on_scaled(regs: &PtRegs, _: &mut ()) {
    SCALED.store(regs.return_value(), Ordering::Relaxed);
}

/// A method of a trait impl (`#[traceable]` on the impl) rides its site like any
/// traceable function: its handler's change reaches the method, and its return is
/// seen without a trap.
#[test]
fn trait_methods_ride_their_sites() {
    let f = <Factor as Scale>::scaled as fn(&'static Factor, u64) -> u64;
    let site = probekit::sites().into_iter().find(|s| s.name.ends_with("::<Factor as Scale>::scaled")).expect("listed");
    assert_eq!(site.function, f as usize);
    // SAFETY: `scaled` is correct with any `k`.
    let p = unsafe { Probe::builder().function(f).pre_mut(double_k) }.register().unwrap();
    assert_eq!(p.address(), site.site, "the probe is on the site");
    assert!(listed(site.site).expect("listed").ends_with("[SITE]"));
    assert_eq!(Factor(3).scaled(5), 30, "the handler doubled k");
    let r = ReturnProbe::builder().function(f).handler(on_scaled).register().unwrap();
    assert_eq!(Factor(4).scaled(5), 40);
    assert_eq!(SCALED.load(Ordering::Relaxed), 40);
    drop((p, r));
    assert!(is_nop(&site_bytes(site.site)));
    assert_eq!(Factor(3).scaled(5), 15);
}
