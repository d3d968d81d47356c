//! Issue 17, "signals that are not probekit's" (items 4, 8, 9): SIGTRAPs that are not
//! from a probekit breakpoint must reach the program's own handler, or its default
//! action; a handler installed over probekit's is reported at the next registration;
//! children started with `std::process::Command` must not inherit a breakpoint they
//! cannot handle. Each scenario runs in a child process (see the crate docs), with the
//! program's own handler installed before probekit's first registration unless said.

use hostile_tests::{install_sigtrap, is_child, report, run_child};
use probekit::{Error, Probe, PtRegs};
use std::hint::black_box;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

static HITS: AtomicU64 = AtomicU64::new(0);

fn count(_: &PtRegs) {
    HITS.fetch_add(1, Ordering::Relaxed);
}

#[inline(never)]
extern "C" fn hostile_triple(x: u64) -> u64 {
    black_box(x).wrapping_mul(3)
}

#[inline(never)]
extern "C" fn hostile_plus_one(x: u64) -> u64 {
    black_box(x) + 1
}

/// Probes `hostile_triple` and checks that the probe fires.
fn armed_probe() -> probekit::ProbeHandle {
    let f = hostile_triple as extern "C" fn(u64) -> u64;
    let p = Probe::builder().function(f).pre(count).register().expect("probe hostile_triple");
    assert_eq!(black_box(f)(14), 42);
    assert_eq!(p.nhit(), 1, "the probe fires");
    p
}

/// SIGTRAPs the program's own handler received, and the `si_code` of the last.
static OWN: AtomicU64 = AtomicU64::new(0);
static OWN_CODE: AtomicI32 = AtomicI32::new(0);

extern "C" fn own_handler(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    OWN_CODE.store(unsafe { (*info).si_code }, Ordering::Relaxed);
    OWN.fetch_add(1, Ordering::Relaxed);
}

/// Waits (at most 5 s) until the program's handler has counted `n`: a signal sent
/// with `kill` to the process may be delivered to another of its threads.
fn wait_own(n: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    while OWN.load(Ordering::Relaxed) < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    OWN.load(Ordering::Relaxed)
}

// ---------------------------------------------------------------------------------
// Item 4: 200 external `kill(pid, SIGTRAP)` with a probe armed.

#[test]
#[ignore = "a child scenario: its parent test runs it in a process of its own"]
fn child_external_kill_sigtrap() {
    if !is_child() {
        return;
    }
    install_sigtrap(own_handler);
    let p = armed_probe();
    // To the process: delivered to any of its threads, and a SIGTRAP still pending
    // absorbs the next ones (standard signals do not queue), so at least one arrives.
    for _ in 0..200 {
        // SAFETY: kill sends SIGTRAP to this process, whose handler is installed.
        unsafe { libc::kill(libc::getpid(), libc::SIGTRAP) };
    }
    report("own_kill", wait_own(1));
    // Those may reach another thread of the process (the test harness's) and land
    // late: wait until none has arrived for a while, so they do not count below.
    let mut last = OWN.load(Ordering::Relaxed);
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = OWN.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
    }
    // To this thread: each is delivered as the call returns, so every one counts.
    let before = OWN.load(Ordering::Relaxed);
    for _ in 0..200 {
        // SAFETY: tgkill sends SIGTRAP to this thread, whose handler is installed.
        unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), libc::gettid(), libc::SIGTRAP) };
    }
    report("own", OWN.load(Ordering::Relaxed) - before);
    report("value", black_box(hostile_triple as extern "C" fn(u64) -> u64)(5));
    report("nhit", p.nhit());
}

/// Item 4.
#[test]
fn external_sigtrap_reaches_the_programs_handler() {
    let out = run_child("child_external_kill_sigtrap");
    out.assert_ok();
    let d = out.describe();
    assert!(out.number("own_kill") >= 1, "a SIGTRAP sent to the process reaches the program's handler\n{d}");
    // One more at most: a SIGTRAP sent to the process still pending (standard signals
    // do not queue) may be delivered during the thread's 200.
    assert!((200..=201).contains(&out.number("own")), "every SIGTRAP sent to the thread reaches the program's handler\n{d}");
    assert_eq!(out.number("value"), 15, "{d}");
    assert_eq!(out.number("nhit"), 2, "the probe still works\n{d}");
}

// ---------------------------------------------------------------------------------
// Item 8: `raise(SIGTRAP)` and `icebp` with a probe armed.

#[test]
#[ignore = "a child scenario: its parent test runs it in a process of its own"]
fn child_raise_sigtrap_with_handler() {
    if !is_child() {
        return;
    }
    install_sigtrap(own_handler);
    // SAFETY: raise sends SIGTRAP to this thread, whose handler is installed.
    unsafe { libc::raise(libc::SIGTRAP) };
    report("own_before", OWN.load(Ordering::Relaxed));
    let p = armed_probe();
    // SAFETY: as above.
    unsafe { libc::raise(libc::SIGTRAP) };
    report("own", OWN.load(Ordering::Relaxed));
    report("si_code", OWN_CODE.load(Ordering::Relaxed));
    report("nhit", p.nhit());
}

/// Item 8: `raise` reaches the program's handler.
#[test]
fn raised_sigtrap_reaches_the_programs_handler() {
    let out = run_child("child_raise_sigtrap_with_handler");
    out.assert_ok();
    let d = out.describe();
    assert_eq!(out.number("own_before"), 1, "without probekit the handler runs (harness check)\n{d}");
    assert_eq!(out.number("own"), 2, "with a probe armed, raise(SIGTRAP) must still reach the handler\n{d}");
    assert_eq!(out.expect_value("si_code"), libc::SI_TKILL.to_string(), "the handler sees the signal as raised\n{d}");
}

#[test]
#[ignore = "a child scenario: its parent test runs it in a process of its own"]
fn child_raise_sigtrap_default() {
    if !is_child() {
        return;
    }
    let _p = armed_probe();
    // SAFETY: raise sends SIGTRAP to this thread; its default action ends the process.
    unsafe { libc::raise(libc::SIGTRAP) };
    report("survived", true);
}

/// Item 8: with the default disposition, `raise(SIGTRAP)` still ends the process.
#[test]
fn raised_sigtrap_with_default_disposition_kills() {
    let out = run_child("child_raise_sigtrap_default");
    assert_eq!(out.signal(), Some(libc::SIGTRAP), "raise(SIGTRAP) must kill the process with SIGTRAP\n{}", out.describe());
}

// `icebp` (int1) exists on x86 only: aarch64 has no equivalent one-byte trap that is
// not a breakpoint (its `brk` is probekit's own kind, covered by probe-rt's
// foreign_trap test).
#[cfg(target_arch = "x86_64")]
#[test]
#[ignore = "a child scenario: its parent test runs it in a process of its own"]
fn child_icebp_with_handler() {
    if !is_child() {
        return;
    }
    fn icebp() {
        // SAFETY: icebp (int1, 0xf1) raises a debug exception, which Linux delivers as
        // SIGTRAP with the pc after it; the installed handler returns, and execution goes on.
        unsafe { std::arch::asm!(".byte 0xf1", options(nomem, nostack)) };
    }
    install_sigtrap(own_handler);
    icebp();
    report("own_before", OWN.load(Ordering::Relaxed));
    let _p = armed_probe();
    icebp();
    report("own", OWN.load(Ordering::Relaxed));
}

/// Item 8: `icebp` reaches the program's handler (a hang here: the trap was taken for a
/// removed breakpoint and the pc moved back onto the icebp, forever).
#[cfg(target_arch = "x86_64")]
#[test]
fn icebp_reaches_the_programs_handler() {
    let out = run_child("child_icebp_with_handler");
    out.assert_ok();
    let d = out.describe();
    assert_eq!(out.number("own_before"), 1, "without probekit the handler runs (harness check)\n{d}");
    assert_eq!(out.number("own"), 2, "with a probe armed, icebp must still reach the handler\n{d}");
}

#[test]
#[ignore = "a child scenario: its parent test runs it in a process of its own"]
fn child_handler_installed_after_probekit() {
    if !is_child() {
        return;
    }
    let _p = armed_probe();
    let handler = install_sigtrap(own_handler);
    let r = Probe::builder().function(hostile_plus_one as extern "C" fn(u64) -> u64).pre(count).register();
    report("register", format!("{r:?}"));
    report("replaced", matches!(r, Err(Error::SigtrapHandlerReplaced { handler: h }) if h == handler));
}

/// Item 8: a SIGTRAP handler installed after probekit's is reported at the next
/// registration.
#[test]
fn handler_installed_after_probekit_is_reported() {
    let out = run_child("child_handler_installed_after_probekit");
    out.assert_ok();
    assert_eq!(out.expect_value("replaced"), "true", "must be Err(SigtrapHandlerReplaced {{ handler }})\n{}", out.describe());
}

// ---------------------------------------------------------------------------------
// Item 9: a probe on libc's `execve`, then `Command::status()`: the spawned child
// resets its signal handlers before it calls `execve`, so a breakpoint there kills it.
// Either registration is refused (Blacklisted), or the child runs.

#[test]
#[ignore = "a child scenario: its parent test runs it in a process of its own"]
fn child_probe_on_execve() {
    if !is_child() {
        return;
    }
    let r = Probe::builder().symbol("execve").pre(count).register();
    report("register", format!("{:?}", r.as_ref().map(|_| ())));
    report("blacklisted", matches!(r, Err(Error::Blacklisted { .. })));
    if r.is_ok() {
        let status = std::process::Command::new("true").status();
        report("status", format!("{status:?}"));
        report("success", status.is_ok_and(|s| s.success()));
    }
}

/// Item 9.
#[test]
fn probe_on_execve_does_not_kill_spawned_children() {
    let out = run_child("child_probe_on_execve");
    out.assert_ok();
    if out.expect_value("blacklisted") == "true" {
        return;
    }
    assert_eq!(out.expect_value("success"), "true", "`true` started with a probe on execve must succeed\n{}", out.describe());
}
