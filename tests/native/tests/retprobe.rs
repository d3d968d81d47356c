//! Return probes: values, instances, entry decisions, unwinding, longjmp.

use probekit::{Entry, Error, PtRegs, ReturnProbe};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

#[inline(never)]
fn add(a: u64, b: u64) -> u64 {
    black_box(a) + black_box(b)
}

#[inline(never)]
fn ptr_of(v: *const u64) -> *const u64 {
    black_box(v)
}

#[inline(never)]
fn halve(x: f64) -> f64 {
    black_box(x) / 2.0
}

#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
struct Pair {
    a: u64,
    b: u64,
}

#[inline(never)]
extern "C" fn pair(a: u64) -> Pair {
    Pair { a: black_box(a), b: black_box(a) * 3 }
}

#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
struct Big {
    v: [u64; 6],
}

#[inline(never)]
extern "C" fn big(a: u64) -> Big {
    let mut v = [0; 6];
    for (i, x) in v.iter_mut().enumerate() {
        *x = black_box(a) + i as u64;
    }
    Big { v }
}

static RET_SEEN: AtomicU64 = AtomicU64::new(0);
static F64_SEEN: AtomicU64 = AtomicU64::new(0);

fn see_ret(regs: &PtRegs, _: &mut ()) {
    RET_SEEN.store(regs.return_value(), Ordering::Relaxed);
}

fn see_f64(regs: &PtRegs, _: &mut ()) {
    F64_SEEN.store(regs.fp_return().map_or(0, |v| v.as_f64().to_bits()), Ordering::Relaxed);
}

fn noop(_: &PtRegs, _: &mut ()) {}

#[test]
fn return_values_reach_the_caller_unchanged() {
    let x = 41u64;
    let unprobed = (add(2, 3), ptr_of(&x), halve(5.0), pair(7), big(9));
    let probes = [
        ReturnProbe::builder().function(add as fn(u64, u64) -> u64).handler(see_ret).register().unwrap(),
        ReturnProbe::builder().function(ptr_of as fn(*const u64) -> *const u64).handler(noop).register().unwrap(),
        ReturnProbe::builder().function(halve as fn(f64) -> f64).handler(see_f64).register().unwrap(),
        ReturnProbe::builder().function(pair as extern "C" fn(u64) -> Pair).handler(noop).register().unwrap(),
        ReturnProbe::builder().function(big as extern "C" fn(u64) -> Big).handler(noop).register().unwrap(),
    ];
    assert_eq!(add(2, 3), unprobed.0);
    assert_eq!(RET_SEEN.load(Ordering::Relaxed), 5);
    assert_eq!(ptr_of(&x), unprobed.1);
    assert_eq!(halve(5.0), unprobed.2);
    assert_eq!(f64::from_bits(F64_SEEN.load(Ordering::Relaxed)), 2.5, "the handler reads the FP return register");
    assert_eq!(pair(7), unprobed.3);
    assert_eq!(big(9), unprobed.4);
    for p in &probes {
        assert_eq!((p.nhit(), p.nmissed()), (1, 0), "probe at {:#x}", p.address());
    }
}

#[inline(never)]
fn triple(a: u64) -> u64 {
    black_box(a) * 3
}

fn plus_one(regs: &mut PtRegs, _: &mut ()) {
    regs.set_return_value(regs.return_value() + 1);
}

#[test]
fn a_handler_changes_what_the_caller_sees() {
    // SAFETY: `triple` returns a `u64`: any value is one.
    let p = unsafe { ReturnProbe::builder().function(triple as fn(u64) -> u64).handler_mut(plus_one) }.register().unwrap();
    assert_eq!(triple(5), 16);
    p.disable().unwrap();
    assert_eq!(triple(5), 15);
    p.enable().unwrap();
    assert_eq!(triple(5), 16);
    drop(p);
    assert_eq!(triple(5), 15);
}

#[inline(never)]
fn depth(n: u64) -> u64 {
    if black_box(n) == 0 {
        0
    } else {
        depth(n - 1) + 2
    }
}

static DEPTH_RETURNS: AtomicU64 = AtomicU64::new(0);

fn count_depth(_: &PtRegs, _: &mut ()) {
    DEPTH_RETURNS.fetch_add(1, Ordering::Relaxed);
}

#[test]
fn recursion_deeper_than_maxactive_misses_exactly_the_excess() {
    let p = ReturnProbe::builder().function(depth as fn(u64) -> u64).handler(count_depth).maxactive(8).register().unwrap();
    assert_eq!(p.maxactive(), 8);
    // 31 calls (n = 30 .. 0): the outer 8 are watched, the 23 below are not.
    assert_eq!(depth(30), 60);
    assert_eq!((p.nhit(), p.nmissed(), DEPTH_RETURNS.load(Ordering::Relaxed)), (8, 23, 8));
    // Every instance came back: the next call is watched.
    assert_eq!(depth(3), 6);
    assert_eq!((p.nhit(), p.nmissed()), (8 + 4, 23));
}

#[inline(never)]
fn scaled(a: u64) -> u64 {
    black_box(a) * 10
}

#[derive(Default)]
struct Arg(u64);

fn skip_odd(regs: &mut PtRegs, d: &mut Arg) -> Entry {
    d.0 = regs.arg(0).unwrap();
    match d.0 {
        7 => Entry::Override(700_000),
        a if a % 2 == 1 => Entry::Skip,
        _ => Entry::Continue,
    }
}

static DATA_SEEN: AtomicU64 = AtomicU64::new(0);
static DATA_CALLS: AtomicU64 = AtomicU64::new(0);

fn check_data(regs: &PtRegs, d: &mut Arg) {
    // The argument recorded at the entry, next to the result at the return.
    DATA_SEEN.store(d.0 * 1000 + regs.return_value(), Ordering::Relaxed);
    DATA_CALLS.fetch_add(1, Ordering::Relaxed);
}

#[test]
fn entry_handler_skips_overrides_and_passes_data() {
    // SAFETY: `scaled` returns a `u64` and has no effect to skip.
    let p =
        unsafe { ReturnProbe::builder().function(scaled as fn(u64) -> u64).data::<Arg>().entry_handler_mut(skip_odd) }.handler(check_data).register().unwrap();
    assert_eq!(scaled(4), 40);
    assert_eq!((DATA_SEEN.load(Ordering::Relaxed), DATA_CALLS.load(Ordering::Relaxed)), (4040, 1));
    assert_eq!(scaled(5), 50, "skipped: the function ran, the return handler did not");
    assert_eq!(DATA_CALLS.load(Ordering::Relaxed), 1);
    assert_eq!(scaled(7), 700_000, "overridden: the function did not run");
    assert_eq!(DATA_CALLS.load(Ordering::Relaxed), 1);
    assert_eq!(scaled(6), 60);
    assert_eq!((DATA_SEEN.load(Ordering::Relaxed), DATA_CALLS.load(Ordering::Relaxed)), (6060, 2));
    assert_eq!((p.nhit(), p.nmissed()), (4, 0));
}

#[inline(never)]
fn thrower(n: u64) -> u64 {
    if black_box(n) > 0 {
        panic!("deep {n}");
    }
    n
}

#[inline(never)]
fn middle(n: u64) -> u64 {
    thrower(black_box(n)) + 1
}

#[inline(never)]
fn probed_outer(n: u64) -> u64 {
    middle(black_box(n)) + 1
}

#[inline(never)]
fn real_caller_of_outer(n: u64) -> std::thread::Result<u64> {
    std::panic::catch_unwind(|| probed_outer(n))
}

/// Runs `f` with the panic hook silenced: its panics are expected.
fn quietly<R>(f: impl FnOnce() -> R) -> R {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = f();
    std::panic::set_hook(hook);
    r
}

#[test]
fn a_panic_unwinds_through_a_hijacked_frame() {
    let p = ReturnProbe::builder().function(probed_outer as fn(u64) -> u64).handler(noop).maxactive(1).register().unwrap();
    let r = quietly(|| real_caller_of_outer(3));
    let payload = r.expect_err("the panic reaches catch_unwind");
    assert_eq!(payload.downcast_ref::<String>().map(String::as_str), Some("deep 3"));
    // The instance left behind is reclaimed by the next entry (maxactive 1).
    assert_eq!(real_caller_of_outer(0).unwrap(), 2);
    assert_eq!((p.nhit(), p.nmissed()), (2, 0));
}

/// probekit's own trace, taken where `thrower_twice` panics.
static TWICE_TRACE: std::sync::Mutex<Vec<usize>> = std::sync::Mutex::new(Vec::new());

#[inline(never)]
fn thrower_twice(n: u64) -> u64 {
    if black_box(n) > 0 {
        let mut out = [0usize; 32];
        let len = probekit::backtrace(&mut out);
        *TWICE_TRACE.lock().unwrap() = out[..len].to_vec();
        panic!("twice {n}");
    }
    n + 2
}

#[inline(never)]
fn probed_twice(n: u64) -> u64 {
    thrower_twice(black_box(n)) + 2
}

#[inline(never)]
fn real_caller_of_twice(n: u64) -> std::thread::Result<u64> {
    std::panic::catch_unwind(|| probed_twice(n))
}

#[test]
fn a_panic_unwinds_through_two_hijacks_of_one_frame() {
    // Two return probes on one function: its return address goes to the second one's
    // stub, which returns to the first one's. An unwinder must not stand on both (they
    // would share a CFA); in a release build the catch is right in the real caller.
    let a = ReturnProbe::builder().function(probed_twice as fn(u64) -> u64).handler(noop).maxactive(1).register().unwrap();
    let b = ReturnProbe::builder().function(probed_twice as fn(u64) -> u64).handler(noop).maxactive(1).register().unwrap();
    let r = quietly(|| real_caller_of_twice(3));
    let payload = r.expect_err("the panic reaches catch_unwind");
    assert_eq!(payload.downcast_ref::<String>().map(String::as_str), Some("twice 3"));
    assert_eq!(real_caller_of_twice(0).unwrap(), 4);
    assert_eq!((a.nhit(), a.nmissed(), b.nhit(), b.nmissed()), (2, 0, 2, 0));
    // probekit's own walk, too, goes past both stubs to the real caller.
    let trace = TWICE_TRACE.lock().unwrap().clone();
    let caller = real_caller_of_twice as fn(u64) -> std::thread::Result<u64> as usize;
    assert!(trace.iter().any(|ip| *ip > caller && *ip < caller + 256), "probekit::backtrace reaches real_caller_of_twice ({caller:#x}): {trace:#x?}");
}

static TRACE: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

#[inline(never)]
fn traced() -> u64 {
    *TRACE.lock().unwrap() = std::backtrace::Backtrace::force_capture().to_string();
    black_box(1)
}

#[inline(never)]
fn caller_of_traced() -> u64 {
    traced() + black_box(1)
}

#[test]
#[inline(never)] // its name is looked for in backtraces: its own frame in a release build too
fn a_backtrace_in_a_probed_function_names_the_real_caller() {
    let _p = ReturnProbe::builder().function(traced as fn() -> u64).handler(noop).register().unwrap();
    assert_eq!(caller_of_traced(), 2);
    let trace = TRACE.lock().unwrap().clone();
    assert!(trace.contains("caller_of_traced"), "the real caller is missing:\n{trace}");
    assert!(trace.contains("a_backtrace_in_a_probed_function_names_the_real_caller"), "the walk stopped early:\n{trace}");
}

#[inline(never)]
fn returns_to_handler_trace() -> u64 {
    black_box(5)
}

#[inline(never)]
fn caller_of_handler_trace() -> u64 {
    returns_to_handler_trace() + black_box(1)
}

static HANDLER_FRAMES: AtomicUsize = AtomicUsize::new(0);
static HANDLER_SAW_CALLER: AtomicUsize = AtomicUsize::new(0);

fn walk_in_handler(_: &PtRegs, _: &mut ()) {
    // No allocation here: the raw walk, with symbols resolved without allocating.
    let mut frames = 0;
    let target = caller_of_handler_trace as fn() -> u64 as usize;
    native_tests::libgcc_walk(|ip| {
        frames += 1;
        if ip > target && ip < target + 256 {
            HANDLER_SAW_CALLER.store(1, Ordering::Relaxed);
        }
    });
    HANDLER_FRAMES.store(frames, Ordering::Relaxed);
}

#[test]
fn a_walk_from_a_return_handler_reaches_the_real_caller() {
    let _p = ReturnProbe::builder().function(returns_to_handler_trace as fn() -> u64).handler(walk_in_handler).register().unwrap();
    assert_eq!(caller_of_handler_trace(), 6);
    assert_eq!(HANDLER_SAW_CALLER.load(Ordering::Relaxed), 1, "{} frames, the real caller not among them", HANDLER_FRAMES.load(Ordering::Relaxed));
}

#[inline(never)]
extern "C" fn jumps_out(_: *mut std::ffi::c_void) {
    // SAFETY: only plain frames (nothing to drop) lie between here and the
    // probekit_jump_run that called run_jumper, whose jmp_buf is live.
    unsafe { native_tests::probekit_jump_out() }
}

#[inline(never)]
fn probed_jumper(n: u64) -> u64 {
    if black_box(n) > 0 {
        jumps_out(std::ptr::null_mut());
    }
    n + 1
}

extern "C" fn run_jumper(arg: *mut std::ffi::c_void) {
    black_box(probed_jumper(arg as u64));
}

#[test]
fn longjmp_past_a_probed_frame_leaves_no_stale_instance() {
    let p = ReturnProbe::builder().function(probed_jumper as fn(u64) -> u64).handler(noop).maxactive(1).register().unwrap();
    for _ in 0..5 {
        // SAFETY: run_jumper's frames are plain; the jump lands in probekit_jump_run.
        assert_eq!(unsafe { native_tests::probekit_jump_run(run_jumper, std::ptr::dangling_mut()) }, 1);
    }
    // maxactive 1: every entry found the instance the previous longjmp left behind
    // reclaimed, and so does a normal call now.
    assert_eq!(probed_jumper(0), 1);
    assert_eq!((p.nhit(), p.nmissed()), (6, 0));
}

#[inline(never)]
fn busy(a: u64) -> u64 {
    black_box(a).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(7)
}

#[inline(never)]
fn busy2(a: u64) -> u64 {
    busy(black_box(a)) ^ 1
}

#[test]
fn threads_and_register_unregister_rounds_return_right() {
    let callers = native_tests::callers(3, |a| {
        assert_eq!(busy2(a), busy(a) ^ 1);
        assert_eq!(busy(a), a.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(7));
    });
    for round in 0..150 {
        let p1 = ReturnProbe::builder().function(busy as fn(u64) -> u64).handler(noop).maxactive(4).register().unwrap();
        let p2 = ReturnProbe::builder().function(busy2 as fn(u64) -> u64).handler(noop).register().unwrap();
        if round % 3 == 0 {
            p1.disable().unwrap();
        }
        if round == 1 {
            // Calls made under the probes (the machine may be busy).
            callers.wait(4);
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
        drop(p1);
        std::thread::sleep(std::time::Duration::from_micros(100));
        p2.unregister().unwrap();
    }
    assert!(callers.stop() > 0);
}

#[test]
fn bad_targets_are_refused() {
    let inside = add as fn(u64, u64) -> u64 as usize + 1;
    // SAFETY: an instruction of `add` (refused: not its entry).
    let e = unsafe { ReturnProbe::builder().address(inside) }.handler(noop).register().unwrap_err();
    assert!(matches!(e, Error::NotFunctionEntry { addr, .. } if addr == inside), "{e:?}");
    // `.data::<T>()` after a handler does not compile (tests/ui).
    let e = ReturnProbe::builder().symbol("probekit_no_such_function").register().unwrap_err();
    assert!(matches!(e, Error::SymbolNotFound { .. }), "{e:?}");
}

#[inline(never)]
fn listed(a: u64) -> u64 {
    black_box(a) + 7
}

#[test]
fn the_listing_shows_return_probes_as_r() {
    let p = ReturnProbe::builder().function(listed as fn(u64) -> u64).handler(noop).register().unwrap();
    let line = |l: &probekit::ProbeList| l.to_string().lines().find(|s| s.contains("listed")).map(str::to_string);
    let shown = line(&probekit::list()).expect("the probe is listed");
    assert!(shown.starts_with(&format!("{:016x}  r  ", p.address())), "{shown}");
    assert!(shown.contains("  retprobe::listed+0x0") && !shown.contains("[DISABLED]"), "{shown}");
    p.disable().unwrap();
    assert!(line(&probekit::list()).unwrap().ends_with("[DISABLED]"));
    drop(p);
    assert_eq!(line(&probekit::list()), None);
}

#[inline(never)]
fn by_rust_path(a: u64) -> u64 {
    black_box(a) * 5
}

#[test]
fn a_rust_function_is_found_by_its_path() {
    // SAFETY: `by_rust_path` returns a `u64`: any value is one.
    let p = unsafe { ReturnProbe::builder().symbol("retprobe::by_rust_path").handler_mut(plus_one) }.register().unwrap();
    assert_eq!(p.address(), by_rust_path as fn(u64) -> u64 as usize);
    assert_eq!(by_rust_path(2), 11);
}

#[inline(never)]
fn dies_inside(n: u64) -> u64 {
    if black_box(n) == 13 {
        panic!("the thread ends here");
    }
    n + 1
}

#[test]
fn an_instance_held_by_an_exited_thread_is_reclaimed() {
    let p = ReturnProbe::builder().function(dies_inside as fn(u64) -> u64).handler(noop).maxactive(1).register().unwrap();
    // The panic unwinds through the hijacked frame and ends the thread, which still
    // holds the only instance on its (now dead) list.
    let tid = std::sync::Arc::new(AtomicU64::new(0));
    let seen = tid.clone();
    let r = quietly(|| {
        std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            seen.store(unsafe { libc::gettid() } as u64, Ordering::Relaxed);
            dies_inside(13)
        })
        .join()
    });
    assert!(r.is_err());
    // join returns once the thread cleared its id; the kernel thread may linger a
    // moment (under qemu-user, longer): wait until it is gone.
    let gone = || {
        // SAFETY: tgkill with signal 0 sends nothing; it only checks the thread.
        let r = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid.load(Ordering::Relaxed) as libc::pid_t, 0) };
        r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
    };
    let start = std::time::Instant::now();
    while !gone() {
        assert!(start.elapsed() < std::time::Duration::from_secs(10), "the thread never went");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // Another thread's call is still watched: the instance was taken over.
    assert_eq!(dies_inside(1), 2);
    assert_eq!((p.nhit(), p.nmissed()), (2, 0));
}
