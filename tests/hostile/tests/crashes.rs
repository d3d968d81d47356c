//! Issue 17, "crashes" (items 5, 6 and 7): registration racing `dlopen`/`dlclose`,
//! targets that would make the next hit recurse or crash, pages that cannot be read,
//! arithmetic overflow and huge allocations must be refused with a typed error, and
//! the process must survive. Each scenario runs in a child process (see the crate
//! docs). (Item 4 is in `signals.rs`.)

#[cfg(target_arch = "x86_64")]
use hostile_tests::sigtrap_disposition;
use hostile_tests::{is_child, report, run_child};
use probekit::{Error, Probe, PtRegs, ReturnProbe};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

static HITS: AtomicU64 = AtomicU64::new(0);

fn count(_: &PtRegs) {
    HITS.fetch_add(1, Ordering::Relaxed);
}

#[inline(never)]
extern "C" fn hostile_square(x: u64) -> u64 {
    black_box(x).wrapping_mul(x)
}

fn square() -> extern "C" fn(u64) -> u64 {
    hostile_square as extern "C" fn(u64) -> u64
}

// ---------------------------------------------------------------------------------
// Item 6: the sigreturn trampoline of probekit's own SIGTRAP handler. x86_64 only:
// glibc gives `sa_restorer` (`__restore_rt`) there; aarch64 returns from signals through
// the vDSO's `__kernel_rt_sigreturn` and leaves `sa_restorer` empty.

#[cfg(target_arch = "x86_64")]
#[test]
#[ignore = "a child scenario: its parent test runs it in a process of its own"]
fn child_probe_on_sa_restorer() {
    if !is_child() {
        return;
    }
    let p = Probe::builder().function(square()).pre(count).register().expect("a first probe installs the handler");
    let restorer = sigtrap_disposition().sa_restorer.map_or(0, |f| f as usize);
    report("restorer", format!("{restorer:#x}"));
    assert_ne!(restorer, 0, "glibc sets sa_restorer on x86_64");
    // SAFETY: the address is an instruction of this test's code, not data.
    let r = unsafe { Probe::builder().address(restorer) }.pre(count).register();
    report("register", format!("{:?}", r.as_ref().map(|_| ())));
    report("blacklisted", matches!(r, Err(Error::Blacklisted { .. })));
    // Accepted: the next hit returns from the signal handler through the probed
    // trampoline (the issue saw a crash).
    report("value", black_box(square())(7));
    report("nhit", p.nhit());
}

/// Item 6: `__restore_rt`.
#[cfg(target_arch = "x86_64")]
#[test]
fn probe_on_sigreturn_trampoline_is_refused() {
    let out = run_child("child_probe_on_sa_restorer");
    out.assert_ok();
    assert_eq!(out.expect_value("blacklisted"), "true", "the sigreturn trampoline must be Err(Blacklisted)\n{}", out.describe());
}

// The `[vsyscall]` page: executable, not readable. x86_64 only (aarch64 has none).
#[cfg(target_arch = "x86_64")]
const VSYSCALL: usize = 0xffff_ffff_ff60_0000;

#[cfg(target_arch = "x86_64")]
#[test]
#[ignore = "a child scenario: its parent test runs it in a process of its own"]
fn child_probe_on_vsyscall() {
    if !is_child() {
        return;
    }
    // SAFETY: the address is an instruction of this test's code, not data.
    let r = unsafe { Probe::builder().address(VSYSCALL) }.pre(count).register();
    report("register", format!("{:?}", r.as_ref().map(|_| ())));
    report("refused", matches!(r, Err(Error::NotReadable { addr } | Error::NotExecutable { addr }) if addr == VSYSCALL));
}

/// Item 6: an executable page that cannot be read.
#[cfg(target_arch = "x86_64")]
#[test]
fn probe_on_unreadable_page_is_refused() {
    let out = run_child("child_probe_on_vsyscall");
    out.assert_ok();
    assert_eq!(out.expect_value("refused"), "true", "[vsyscall] must be Err(NotReadable or NotExecutable)\n{}", out.describe());
}

/// Functions of the hit path, by name. In a release build some are inlined away:
/// then `SymbolNotFound` is right too; in a debug build each must be found and refused.
const HIT_PATH: [&str; 6] = [
    "probe_rt::registry::set_active",
    "probe_rt::grace::leave",
    "probe_rt::grace::Thread::index",
    "probe_rt::sys::regs::imp::set_pc",
    "probe_rt::sys::regs::imp::pc",
    "probe_rt::breakpoint::trap::run_posts",
];

#[test]
#[ignore = "a child scenario: its parent test runs it in a process of its own"]
fn child_probe_on_hit_path() {
    if !is_child() {
        return;
    }
    for name in HIT_PATH {
        let r = Probe::builder().symbol(name).pre(count).register();
        let verdict = match &r {
            Err(Error::Blacklisted { .. }) => "blacklisted",
            Err(Error::SymbolNotFound { .. }) => "not-found",
            Err(_) => "other-error",
            Ok(_) => "accepted",
        };
        // Accepted ones are dropped before any probe can be hit.
        drop(r);
        report(name, verdict);
    }
}

/// Item 6: probekit's own hit path, by name.
#[test]
fn probe_on_hit_path_is_refused() {
    let out = run_child("child_probe_on_hit_path");
    out.assert_ok();
    for name in HIT_PATH {
        let v = out.expect_value(name);
        let not_found_ok = !cfg!(debug_assertions) && v == "not-found";
        assert!(v == "blacklisted" || not_found_ok, "`{name}` is in the hit path: must be Err(Blacklisted), got {v}\n{}", out.describe());
    }
}

#[test]
#[ignore = "a child scenario: its parent test runs it in a process of its own"]
fn child_offset_overflow() {
    if !is_child() {
        return;
    }
    let f = square();
    let r = Probe::builder().function(f).offset(usize::MAX).pre(count).register();
    report("register", format!("{:?}", r.as_ref().map(|_| ())));
    report("overflow", matches!(r, Err(Error::AddressOverflow { base, offset }) if base == f as usize && offset == usize::MAX));
}

/// Item 6: `.offset(usize::MAX)` (a debug build panicked on the addition).
#[test]
fn offset_overflow_is_a_typed_error() {
    let out = run_child("child_offset_overflow");
    out.assert_ok();
    assert_eq!(out.expect_value("overflow"), "true", "must be Err(AddressOverflow)\n{}", out.describe());
}

// ---------------------------------------------------------------------------------
// Item 7: `maxactive(1 << 28)`. The address space is limited to 1 GiB more than the
// child uses, so that an attempt to allocate the 4 GiB fails at once instead of
// swapping the machine (qemu-user does not apply the limit to the guest).

/// The process's virtual size, in bytes (`/proc/self/statm`).
fn virtual_size() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: u64 = statm.split_whitespace().next().and_then(|p| p.parse().ok()).expect("statm's size field");
    pages * hostile_tests::page_size() as u64
}

#[test]
#[ignore = "a child scenario: its parent test runs it in a process of its own"]
fn child_maxactive_huge() {
    if !is_child() {
        return;
    }
    let limit = virtual_size() + (1 << 30);
    let rl = libc::rlimit { rlim_cur: limit, rlim_max: limit };
    // SAFETY: setrlimit reads the struct; lowering a limit of this process is allowed.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &rl) }, 0, "setrlimit");
    let r = ReturnProbe::builder().function(square()).maxactive(1 << 28).register();
    report("register", format!("{:?}", r.as_ref().map(|_| ())));
    report("refused", matches!(r, Err(Error::MaxactiveTooLarge { requested, .. }) if requested == 1 << 28) || matches!(r, Err(Error::OutOfMemory { .. })));
    drop(r);
    // Still usable afterwards.
    let p = ReturnProbe::builder().function(square()).register();
    report("after", format!("{:?}", p.as_ref().map(|_| ())));
    report("value", black_box(square())(9));
}

/// Item 7.
#[test]
fn maxactive_huge_is_a_typed_error() {
    let out = run_child("child_maxactive_huge");
    out.assert_ok();
    let d = out.describe();
    assert_eq!(out.expect_value("refused"), "true", "must be Err(MaxactiveTooLarge or OutOfMemory)\n{d}");
    assert_eq!(out.expect_value("after"), "Ok(())", "{d}");
    assert_eq!(out.number("value"), 81, "{d}");
}

// ---------------------------------------------------------------------------------
// Item 5: registration and unregistration of a probe on a library's function while
// another thread loads and unloads that library. Timing-dependent: many rounds, and
// every outcome but a crash is acceptable (the probe registers, or the symbol is not
// found, or the code is gone by the time it is read or written).

#[test]
#[ignore = "a child scenario: its parent test runs it in a process of its own"]
fn child_register_racing_dlclose() {
    if !is_child() {
        return;
    }
    let rounds = if hostile_tests::emulated() { 50 } else { 300 };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loader = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let path = std::ffi::CString::new(env!("TWIN_A_SO")).expect("no NUL in a path");
            let mut cycles = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: a NUL-terminated path of a plain C library built for this target
                // (no constructors); the handle is closed once, and nothing of the library
                // is called.
                unsafe {
                    let h = libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
                    assert!(!h.is_null());
                    libc::dlclose(h);
                }
                cycles += 1;
            }
            cycles
        })
    };
    let (mut registered, mut refused) = (0u64, 0u64);
    for _ in 0..rounds {
        match Probe::builder().symbol("hostile_twin_value").pre(count).register() {
            Ok(p) => {
                registered += 1;
                let _ = p.unregister();
            }
            Err(_) => refused += 1,
        }
    }
    stop.store(true, Ordering::Relaxed);
    report("loads", loader.join().expect("the loader thread"));
    report("registered", registered);
    report("refused", refused);
}

/// Item 5: the process survives; both outcomes happen.
#[test]
fn registration_racing_dlclose_does_not_crash() {
    let out = run_child("child_register_racing_dlclose");
    out.assert_ok();
    assert!(out.number("loads") > 0, "{}", out.describe());
}
