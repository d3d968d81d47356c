//! Stack traces through probekit (issue 14, "Backtraces"): `probekit::backtrace()` and
//! `probekit::stack_trace(regs)` with return probes nested three deep, from the
//! innermost return handler, from an entry handler and from a function the probed
//! one calls; `stack_trace` from a breakpoint pre handler, a site handler and a return
//! handler; what libgcc's walk (the one `std::backtrace` uses) shows instead; the
//! perf map.
//!
//! Handlers store raw addresses in statics (no allocation in a handler); names are
//! looked up afterwards, outside the handlers.

use native_tests::libgcc_walk;
use probekit::{Probe, PtRegs, ReturnProbe};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// The tests probe shared functions: one at a time.
static LOCK: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

const DEPTH: usize = 64;

/// A trace a handler stores without allocating.
struct Trace {
    len: AtomicUsize,
    at: [AtomicUsize; DEPTH],
}

impl Trace {
    const fn new() -> Trace {
        Trace { len: AtomicUsize::new(0), at: [const { AtomicUsize::new(0) }; DEPTH] }
    }

    fn store(&self, t: &[usize]) {
        for (slot, a) in self.at.iter().zip(t) {
            slot.store(*a, Ordering::Relaxed);
        }
        self.len.store(t.len(), Ordering::Release);
    }

    fn take(&self) -> Vec<usize> {
        let n = self.len.swap(0, Ordering::Acquire);
        self.at[..n].iter().map(|a| a.load(Ordering::Relaxed)).collect()
    }

    /// `probekit::backtrace()` here.
    fn backtrace(&self) {
        let mut buf = [0usize; DEPTH];
        let n = probekit::backtrace(&mut buf);
        self.store(&buf[..n]);
    }

    /// `probekit::stack_trace(regs)`.
    fn stack_trace(&self, regs: &PtRegs) {
        let mut buf = [0usize; DEPTH];
        let n = probekit::stack_trace(regs, &mut buf);
        self.store(&buf[..n]);
    }

    /// libgcc's walk here (`native_tests::libgcc_walk`), as deep as the trace holds.
    fn libgcc(&self) {
        let mut buf = [0usize; DEPTH];
        let mut n = 0;
        libgcc_walk(|ip| {
            if n < DEPTH {
                buf[n] = ip;
                n += 1;
            }
        });
        self.store(&buf[..n]);
    }
}

/// The function each address is in: the first is a pc (`exact`) or, like all the
/// others, a return address, looked up one byte back where its call is.
fn names(trace: &[usize], exact: bool) -> Vec<String> {
    trace
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let at = if i == 0 && exact { *a } else { a.wrapping_sub(1) };
            probekit::__private::symbol_of(at).map_or_else(|| format!("<unknown {a:#x}>"), |(name, _)| name)
        })
        .collect()
}

/// Whether `addr` is in a mapping of a file (an image), not in memory made at run time.
fn in_an_image(addr: usize) -> bool {
    std::fs::read_to_string("/proc/self/maps").unwrap().lines().any(|l| {
        let mut f = l.split_whitespace();
        let (range, path) = (f.next().unwrap(), f.nth(4));
        let (lo, hi) = range.split_once('-').unwrap();
        let (lo, hi) = (usize::from_str_radix(lo, 16).unwrap(), usize::from_str_radix(hi, 16).unwrap());
        (lo..hi).contains(&addr) && path.is_some_and(|p| p.starts_with('/'))
    })
}

/// Every address of the trace is in an image (no stub, slot or other code made at run
/// time), none in probekit's functions, and the walk got past the test's own function
/// into the test harness.
fn assert_clean(trace: &[usize], exact: bool, test: &str) {
    let names = names(trace, exact);
    for (n, a) in names.iter().zip(trace) {
        assert!(in_an_image(*a) && !n.starts_with("probe_rt::") && !n.starts_with("probekit_"), "a runtime frame {n} in {names:#?}");
    }
    let at = names.iter().position(|n| n.ends_with(test)).unwrap_or_else(|| panic!("{test} is missing from {names:#?}"));
    assert!(names.len() > at + 1, "the walk stopped at the test: {names:#?}");
}

/// The return address of a function at its entry (x86_64: the word at `rsp`; aarch64: `x30`).
fn return_address(regs: &PtRegs) -> usize {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: at a function's entry rsp points at the return address the call pushed.
    return unsafe { *(regs.rsp as *const usize) };
    #[cfg(target_arch = "aarch64")]
    return regs.regs[30] as usize;
}

// ---- Return probes nested three deep: outer → middle → inner → leaf ----

static LEAF_TRACES: AtomicBool = AtomicBool::new(false);
static FROM_LEAF: Trace = Trace::new();

#[inline(never)]
fn leaf(x: u64) -> u64 {
    if LEAF_TRACES.load(Ordering::Relaxed) {
        FROM_LEAF.backtrace();
    }
    black_box(x)
}

#[inline(never)]
fn inner(x: u64) -> u64 {
    leaf(black_box(x)) + 1
}

#[inline(never)]
fn middle(x: u64) -> u64 {
    inner(black_box(x)) + 1
}

#[inline(never)]
fn outer(x: u64) -> u64 {
    middle(black_box(x)) + 1
}

/// Calls outer: a frame of known name below the probed ones (a test's own function
/// is inlined into the harness's `FnOnce::call_once` in a release build).
#[inline(never)]
fn run_outer() -> u64 {
    outer(black_box(1))
}

/// The real return addresses of outer, middle and inner, from their entry handlers.
static RA: [AtomicUsize; 3] = [const { AtomicUsize::new(0) }; 3];

/// What inner's handlers capture.
static RET_BACKTRACE: Trace = Trace::new();
static RET_REGS: Trace = Trace::new();
static RAW: Trace = Trace::new();
static ENTRY_BACKTRACE: Trace = Trace::new();
static ENTRY_REGS: Trace = Trace::new();

/// Return probes on outer, middle and inner, each recording its real return address
/// at the entry; `at_entry` and `at_return` run in inner's handlers.
fn nest(at_entry: fn(&PtRegs), at_return: fn(&PtRegs)) -> Vec<probekit::ReturnProbeHandle> {
    nest_on([outer, middle, inner], at_entry, at_return)
}

/// [`nest`] on three other functions, outermost first.
fn nest_on(fns: [fn(u64) -> u64; 3], at_entry: fn(&PtRegs), at_return: fn(&PtRegs)) -> Vec<probekit::ReturnProbeHandle> {
    fns.into_iter()
        .enumerate()
        .map(|(i, f)| {
            ReturnProbe::builder()
                .function(f)
                .entry_handler(move |regs: &PtRegs, _: &mut ()| {
                    RA[i].store(return_address(regs), Ordering::Relaxed);
                    if i == 2 {
                        at_entry(regs);
                    }
                    true
                })
                .handler(move |regs: &PtRegs, _: &mut ()| {
                    if i == 2 {
                        at_return(regs);
                    }
                })
                .register()
                .unwrap()
        })
        .collect()
}

fn real_return_addresses() -> Vec<usize> {
    // Innermost first: inner's, middle's, outer's.
    RA.iter().rev().map(|a| a.load(Ordering::Relaxed)).collect()
}

#[test]
fn from_the_innermost_return_handler() {
    let _g = serial();
    let probes = nest(
        |_| {},
        |regs| {
            RET_BACKTRACE.backtrace();
            RET_REGS.stack_trace(regs);
        },
    );
    assert_eq!(run_outer(), 4);
    drop(probes);
    let real = real_return_addresses();
    let (bt, st) = (RET_BACKTRACE.take(), RET_REGS.take());
    // In a return handler both start at the probed context: inner's real return
    // address, then middle's and outer's (both still hijacked on the stack).
    assert_eq!(bt[..3], real[..], "backtrace(): {:#?}", names(&bt, false));
    assert_eq!(st[..3], real[..], "stack_trace(regs): {:#?}", names(&st, false));
    assert_eq!(bt, st, "one walk");
    assert_eq!(names(&bt[..3], false), ["traces::middle", "traces::outer", "traces::run_outer"].map(String::from));
    assert_clean(&bt, false, "::run_outer");
}

#[test]
fn from_an_entry_handler() {
    let _g = serial();
    let probes = nest(
        |regs| {
            ENTRY_BACKTRACE.backtrace();
            ENTRY_REGS.stack_trace(regs);
        },
        |_| {},
    );
    assert_eq!(run_outer(), 4);
    drop(probes);
    let real = real_return_addresses();
    let (bt, st) = (ENTRY_BACKTRACE.take(), ENTRY_REGS.take());
    // At inner's entry: inner itself, its return address (not hijacked yet), then
    // middle's and outer's real ones (their stubs translated).
    let want: Vec<usize> = std::iter::once(inner as fn(u64) -> u64 as usize).chain(real).collect();
    assert_eq!(bt[..4], want[..], "backtrace(): {:#?}", names(&bt, true));
    assert_eq!(st[..4], want[..], "stack_trace(regs): {:#?}", names(&st, true));
    assert_eq!(bt, st, "one walk");
    assert_clean(&bt, true, "::run_outer");
}

#[test]
fn from_a_function_the_probed_one_calls() {
    let _g = serial();
    let probes = nest(|_| {}, |_| {});
    LEAF_TRACES.store(true, Ordering::Relaxed);
    assert_eq!(run_outer(), 4);
    LEAF_TRACES.store(false, Ordering::Relaxed);
    drop(probes);
    let real = real_return_addresses();
    let bt = FROM_LEAF.take();
    // From where backtrace() was called (in a debug build `Trace::backtrace`, else
    // inlined into leaf): leaf, inner (leaf's caller), then the three real return
    // addresses.
    let all = names(&bt, false);
    let at = all.iter().position(|n| n == "traces::leaf").unwrap_or_else(|| panic!("{all:#?}"));
    assert!(at <= 1 && all[..at].iter().all(|n| n == "traces::Trace::backtrace"), "{all:#?}");
    assert_eq!(all[at + 1], "traces::inner", "{all:#?}");
    assert_eq!(bt[at + 2..at + 5], real[..], "{all:#?}");
    assert_clean(&bt, false, "::run_outer");
}

static THREAD_TRACES: AtomicUsize = AtomicUsize::new(0);
static THREAD_WRONG: AtomicUsize = AtomicUsize::new(0);

#[test]
fn from_return_handlers_on_several_threads_at_once() {
    // Each thread's walk translates its own stubs (its own live instances): the real
    // return addresses are the same on every thread, the stubs are not.
    let _g = serial();
    let probes = nest_on(
        [outer, middle, inner],
        |_| {},
        |_| {
            let mut buf = [0usize; 8];
            let n = probekit::backtrace(&mut buf);
            let real = [&RA[2], &RA[1], &RA[0]].map(|a| a.load(Ordering::Relaxed));
            if n < 3 || buf[..3] != real {
                THREAD_WRONG.fetch_add(1, Ordering::Relaxed);
            }
            THREAD_TRACES.fetch_add(1, Ordering::Relaxed);
        },
    );
    assert_eq!(run_outer(), 4, "one call first: the return addresses are recorded");
    let callers = native_tests::callers(3, |_| assert_eq!(run_outer(), 4));
    while THREAD_TRACES.load(Ordering::Relaxed) < 600 {
        std::thread::yield_now();
    }
    callers.stop();
    drop(probes);
    assert_eq!(THREAD_WRONG.load(Ordering::Relaxed), 0, "of {} traces", THREAD_TRACES.load(Ordering::Relaxed));
}

// The same nest on `#[traceable]` functions: entries through their sites (the site
// dispatcher, no trap), returns through the stubs.

#[probekit::traceable]
fn site_inner(x: u64) -> u64 {
    black_box(x) + 1
}

#[probekit::traceable]
fn site_middle(x: u64) -> u64 {
    site_inner(black_box(x)) + 1
}

#[probekit::traceable]
fn site_outer(x: u64) -> u64 {
    site_middle(black_box(x)) + 1
}

#[inline(never)]
fn run_site_outer() -> u64 {
    site_outer(black_box(1))
}

static SITE_RET: Trace = Trace::new();
static SITE_ENTRY: Trace = Trace::new();

#[test]
fn through_sites_nested_three_deep() {
    let _g = serial();
    let probes = nest_on([site_outer, site_middle, site_inner], |regs| SITE_ENTRY.stack_trace(regs), |_| SITE_RET.backtrace());
    assert_eq!(run_site_outer(), 4);
    drop(probes);
    let real = real_return_addresses();
    let (ret, entry) = (SITE_RET.take(), SITE_ENTRY.take());
    // A traceable function is a wrapper that calls its naked site, which jumps to the
    // body (the wrapper may be inlined): the real return addresses come in order, and
    // only the traceable functions' own parts stand between them.
    let in_order = |t: &[usize], exact| {
        let all = names(t, exact);
        let mut at = 0;
        for (i, ra) in real.iter().enumerate() {
            let found = t[at..].iter().position(|a| a == ra).unwrap_or_else(|| panic!("real return address {i} missing: {all:#?}"));
            assert!(all[at..at + found].iter().all(|n| n.starts_with("traces::__probekit_") || n.starts_with("traces::site_")), "{all:#?}");
            at += found + 1;
        }
    };
    assert_eq!(ret[0], real[0], "from the return handler: {:#?}", names(&ret, false));
    in_order(&ret, false);
    assert_clean(&ret, false, "::run_site_outer");
    // From the entry handler: the site, then the same.
    assert_eq!(names(&entry[..1], true), ["traces::__probekit_site_site_inner"]);
    assert_eq!(entry[1], real[0], "from the entry handler: {:#?}", names(&entry, true));
    in_order(&entry, true);
    assert_clean(&entry, true, "::run_site_outer");
}

#[test]
fn libgcc_shows_one_stub_frame_per_hijacked_return_on_the_stack() {
    // The documented difference of std::backtrace (crate docs of probekit::backtrace):
    // the walk is right, with one extra frame at a stub before each real return
    // address still hijacked on the stack. (libgcc's unwinder may allocate the first
    // time it searches probekit's registered unwind tables: done once before the
    // probes are armed.)
    let _g = serial();
    libgcc_walk(|_| {});
    let probes = nest(
        |_| {},
        |_| {
            RAW.libgcc();
        },
    );
    assert_eq!(run_outer(), 4);
    drop(probes);
    let real = real_return_addresses();
    let raw = RAW.take();
    let at = raw.iter().position(|ip| *ip == real[0]).unwrap_or_else(|| panic!("inner's real return address is missing: {:#?}", names(&raw, false)));
    let names = names(&raw, false);
    assert_eq!(names[at - 1], "probekit_kretprobe_trampoline", "the trampoline's CFI leads to inner's caller");
    // middle's stub, middle's real return address, outer's stub, outer's.
    assert!(names[at + 1].starts_with("<unknown"), "{names:#?}");
    assert_eq!(raw[at + 2], real[1], "{names:#?}");
    assert!(names[at + 3].starts_with("<unknown"), "{names:#?}");
    assert_eq!(raw[at + 4], real[2], "{names:#?}");
}

static SITE_LIBGCC: Trace = Trace::new();

#[test]
#[inline(never)] // its name is looked for in backtraces: its own frame in a release build too
fn libgcc_walks_from_a_site_handler_to_the_callers() {
    // The site trampoline's call-frame information gives the probed function at its
    // entry as the handler's caller, and the naked site has the entry's rules: the walk
    // std::backtrace takes goes on to the real callers.
    let _g = serial();
    libgcc_walk(|_| {});
    let p = Probe::builder()
        .function(site_inner as fn(u64) -> u64)
        .pre(|_: &PtRegs| {
            SITE_LIBGCC.libgcc();
        })
        .register()
        .unwrap();
    assert_eq!(run_site_outer(), 4);
    drop(p);
    let names = names(&SITE_LIBGCC.take(), false);
    // `site_inner` takes and returns integers only: its site calls the trampoline that
    // keeps no FP/SIMD state.
    let tramp = names.iter().position(|n| n == "probekit_site_trampoline_no_fp").unwrap_or_else(|| panic!("{names:#?}"));
    assert_eq!(names.get(tramp + 1).map(String::as_str), Some("traces::__probekit_site_site_inner"), "the site, at the probed function's entry: {names:#?}");
    let outer = names.iter().position(|n| n.ends_with("::run_site_outer")).unwrap_or_else(|| panic!("the walk stops before the callers: {names:#?}"));
    assert!(names[tramp + 2..outer].iter().any(|n| n.contains("site_middle")), "{names:#?}");
    assert!(names[outer + 1..].iter().any(|n| n.ends_with("::libgcc_walks_from_a_site_handler_to_the_callers")), "{names:#?}");
}

// ---- stack_trace from a breakpoint pre handler and a site handler ----

static BP_REGS: Trace = Trace::new();
static BP_BACKTRACE: Trace = Trace::new();

#[inline(never)]
fn bp_target(x: u64) -> u64 {
    black_box(x) * 3
}

#[inline(never)]
fn bp_caller(x: u64) -> u64 {
    bp_target(black_box(x)) + 1
}

#[inline(never)]
fn run_bp() -> u64 {
    bp_caller(black_box(2))
}

#[test]
fn from_a_breakpoint_pre_handler() {
    let _g = serial();
    let p = Probe::builder()
        .function(bp_target as fn(u64) -> u64)
        .pre(|regs: &PtRegs| {
            BP_REGS.stack_trace(regs);
            BP_BACKTRACE.backtrace();
        })
        .register()
        .unwrap();
    assert_eq!(run_bp(), 7);
    drop(p);
    let (st, bt) = (BP_REGS.take(), BP_BACKTRACE.take());
    assert_eq!(st[0], bp_target as fn(u64) -> u64 as usize);
    let want = ["traces::bp_target", "traces::bp_caller", "traces::run_bp"].map(String::from);
    assert_eq!(names(&st[..3], true), want, "{:#?}", names(&st, true));
    assert_eq!(bt, st, "backtrace() in the handler starts at the probed context: {:#?}", names(&bt, true));
    assert_clean(&st, true, "::run_bp");
}

static TINY: Trace = Trace::new();

#[test]
fn a_short_buffer_in_a_handler_holds_the_probed_context() {
    // The handler's own frames and probekit's do not fill the buffer: one address is
    // the probed function's.
    let _g = serial();
    let p = Probe::builder()
        .function(bp_target as fn(u64) -> u64)
        .pre(|_: &PtRegs| {
            let mut one = [0usize; 1];
            let n = probekit::backtrace(&mut one);
            TINY.store(&one[..n]);
        })
        .register()
        .unwrap();
    assert_eq!(run_bp(), 7);
    drop(p);
    assert_eq!(TINY.take(), [bp_target as fn(u64) -> u64 as usize]);
}

static MID_REGS: Trace = Trace::new();
static POST_REGS: Trace = Trace::new();
static POST_BACKTRACE: Trace = Trace::new();

#[test]
fn from_the_middle_of_a_function_and_a_post_handler() {
    // The unwind rules hold at every instruction: a breakpoint past the prologue, on
    // the last instruction boundary in the first 16 bytes (registration refuses the
    // others), walks as one at the entry does; so does its post handler.
    let _g = serial();
    let f = bp_target as fn(u64) -> u64;
    let p = (1..16)
        .rev()
        .find_map(|off| {
            Probe::builder()
                .function(f)
                .offset(off)
                .pre(|regs: &PtRegs| MID_REGS.stack_trace(regs))
                .post(|regs: &PtRegs| {
                    POST_REGS.stack_trace(regs);
                    POST_BACKTRACE.backtrace();
                })
                .register()
                .ok()
        })
        .expect("an instruction boundary in the first 16 bytes");
    let at = p.address();
    assert_eq!(run_bp(), 7);
    drop(p);
    let (mid, post, post_bt) = (MID_REGS.take(), POST_REGS.take(), POST_BACKTRACE.take());
    assert_eq!(mid[0], at);
    let want = ["traces::bp_target", "traces::bp_caller", "traces::run_bp"].map(String::from);
    assert_eq!(names(&mid[..3], true), want, "{:#?}", names(&mid, true));
    assert_clean(&mid, true, "::run_bp");
    assert!(post[0] > at, "the post handler's pc is past the probed instruction");
    assert_eq!(names(&post[..3], true), want, "{:#?}", names(&post, true));
    assert_eq!(post_bt, post, "backtrace() in the post handler starts at its context");
    assert_eq!(post[1..], mid[1..], "the same callers");
}

static SITE_REGS: Trace = Trace::new();
static SITE_BACKTRACE: Trace = Trace::new();

#[probekit::traceable]
fn site_target(x: u64) -> u64 {
    black_box(x) * 5
}

#[inline(never)]
fn site_caller(x: u64) -> u64 {
    site_target(black_box(x)) + 1
}

#[inline(never)]
fn run_site() -> u64 {
    site_caller(black_box(2))
}

#[test]
fn from_a_site_handler() {
    let _g = serial();
    let p = Probe::builder()
        .function(site_target as fn(u64) -> u64)
        .pre(|regs: &PtRegs| {
            SITE_REGS.stack_trace(regs);
            SITE_BACKTRACE.backtrace();
        })
        .register()
        .unwrap();
    let site = probekit::sites().into_iter().find(|s| s.name.ends_with("::site_target")).expect("the site is listed");
    assert_eq!(p.address(), site.site, "a site probe");
    assert_eq!(run_site(), 11);
    drop(p);
    let (st, bt) = (SITE_REGS.take(), SITE_BACKTRACE.take());
    assert_eq!(st[0], site.site);
    // The site is the naked function `__probekit_site_site_target`, which the wrapper
    // `site_target` calls (unless the wrapper was inlined into the caller).
    let all = names(&st, true);
    assert_eq!(all[0], "traces::__probekit_site_site_target", "{all:#?}");
    let at = if all[1] == "traces::site_target" { 2 } else { 1 };
    assert_eq!(all[at..at + 2], ["traces::site_caller", "traces::run_site"].map(String::from), "{all:#?}");
    assert_eq!(bt, st, "backtrace() in the handler starts at the probed context: {:#?}", names(&bt, true));
    assert_clean(&st, true, "::run_site");
}

// ---- the perf map ----

#[inline(never)]
fn mapped(x: u64) -> u64 {
    black_box(x) ^ 7
}

#[inline(never)]
fn slotted(x: u64) -> u64 {
    black_box(x).wrapping_mul(9)
}

#[test]
fn the_perf_map_names_trampolines_stubs_and_slots() {
    let _g = serial();
    probekit::perf_map(true).unwrap();
    let r = ReturnProbe::builder().function(mapped as fn(u64) -> u64).handler(|_: &PtRegs, _: &mut ()| {}).maxactive(3).register().unwrap();
    let b = Probe::builder().function(slotted as fn(u64) -> u64).pre(|_: &PtRegs| {}).register().unwrap();
    // A slot is named at the next registration, or when the map is turned on again.
    probekit::perf_map(true).unwrap();
    assert_eq!(mapped(1), 6);
    assert_eq!(slotted(1), 9);
    let text = std::fs::read_to_string(probekit::perf_map_path()).unwrap();
    let lines: Vec<(usize, usize, &str)> = text
        .lines()
        .map(|l| {
            let mut f = l.splitn(3, ' ');
            let mut hex = || usize::from_str_radix(f.next().unwrap(), 16).unwrap_or_else(|_| panic!("not `START SIZE name`: {l}"));
            (hex(), hex(), f.next().unwrap_or_else(|| panic!("no name: {l}")))
        })
        .collect();
    for name in ["probekit_kretprobe_trampoline", "probekit_site_trampoline", "probekit_site_trampoline_no_fp"] {
        assert!(lines.iter().any(|(_, size, n)| *n == name && *size > 1), "{name} missing:\n{text}");
    }
    // The block of 3 stubs: three adjacent entries of one block.
    let stubs: Vec<_> = lines.iter().filter(|(_, _, n)| n.starts_with("probekit_return_stub[")).collect();
    let block_of = |n: &str| n.rsplit_once('.').map(|(b, _)| b.to_string());
    let three = stubs.iter().filter_map(|(_, _, n)| block_of(n)).any(|b| stubs.iter().filter(|(_, _, n)| block_of(n).as_ref() == Some(&b)).count() == 3);
    assert!(three, "no block of three stubs:\n{text}");
    assert!(stubs.iter().all(|(_, size, _)| *size > 0));
    // The breakpoint on `slotted` runs its first instruction (a stack adjustment or a
    // store) out of line, in a slot.
    let target = slotted as fn(u64) -> u64 as usize;
    let slot_named = lines.iter().any(|(_, size, n)| *n == format!("probekit_slot[{target:x}]") && *size > 0);
    assert!(slot_named, "the slot of `slotted` ({target:#x}) is not named:\n{text}");
    drop((r, b));
    probekit::perf_map(false).unwrap();
    // The map outlives the process on purpose (perf reads it afterwards); a test's need not.
    let _ = std::fs::remove_file(probekit::perf_map_path());
}

/// The perf map turned on by the environment: a child process (this test binary again,
/// through the lane's `CROSS_RUNNER` under qemu-user) with `PROBEKIT_PERF_MAP=1`.
#[test]
fn the_perf_map_from_the_environment() {
    let exe = std::env::current_exe().unwrap();
    let runner = std::env::var("CROSS_RUNNER").ok().filter(|r| !r.trim().is_empty());
    let mut cmd = match &runner {
        Some(r) => {
            let mut words = r.split_whitespace();
            let mut c = std::process::Command::new(words.next().unwrap());
            c.args(words).arg(&exe);
            c
        }
        None => std::process::Command::new(&exe),
    };
    let out = cmd.args(["--ignored", "--exact", "perf_map_child", "--test-threads", "1"]).env("PROBEKIT_PERF_MAP", "1").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("1 passed"), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
#[ignore = "run by the_perf_map_from_the_environment in a process of its own"]
fn perf_map_child() {
    assert_eq!(std::env::var("PROBEKIT_PERF_MAP").as_deref(), Ok("1"));
    let path = probekit::perf_map_path();
    let r = ReturnProbe::builder().function(mapped as fn(u64) -> u64).handler(|_: &PtRegs, _: &mut ()| {}).maxactive(2).register().unwrap();
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let _ = std::fs::remove_file(&path);
    drop(r);
    assert!(text.contains(" probekit_kretprobe_trampoline\n"), "{text}");
    assert!(text.contains(".1]\n") && text.contains(" probekit_return_stub["), "{text}");
}
