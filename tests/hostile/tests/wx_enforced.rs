//! Issue 16: a process that can write code in neither way. A seccomp filter plays a W^X
//! policy (SELinux without `execmem`/`execmod`, PaX MPROTECT): `mprotect` and `mmap`
//! asking for writable *and* executable memory fail with EPERM. `/proc/self/mem` is
//! turned off either by the same filter (its `pwrite` family fails with EPERM) or by
//! `PROBEKIT_TEXT_WRITE=mprotect`. Then a breakpoint probe, a site probe, a return
//! probe and a batch each get `Error::TextNotWritable` naming both failures, before
//! anything is written or mapped: the targets' text is unchanged byte for byte and no
//! executable mapping appears. Each scenario runs in a child process (see the crate
//! docs): a seccomp filter cannot be taken off again.
//!
//! qemu-user refuses `PR_SET_SECCOMP` (its `do_prctl` returns EINVAL so that a guest
//! cannot filter the system calls qemu itself needs): there the scenario is skipped
//! with a message.

use hostile_tests::{is_child, report, run_child_with};
use probekit::{Error, Probe, PtRegs, ReturnProbe, TextWrites, WriteFailure};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

static HITS: AtomicU64 = AtomicU64::new(0);

fn count(_: &PtRegs) {
    HITS.fetch_add(1, Ordering::Relaxed);
}

fn count_return(_: &PtRegs, _: &mut ()) {
    HITS.fetch_add(1, Ordering::Relaxed);
}

#[inline(never)]
extern "C" fn wx_breakpoint_target(x: u64) -> u64 {
    black_box(x).wrapping_mul(5)
}

#[inline(never)]
extern "C" fn wx_return_target(x: u64) -> u64 {
    black_box(x).wrapping_add(11)
}

#[probekit::traceable]
fn wx_site_target(x: u64) -> u64 {
    black_box(x) ^ 0x55
}

/// The child's environment variable that says what the filter refuses.
const FILTER_ENV: &str = "PROBEKIT_WX_FILTER";

/// `AUDIT_ARCH_*` of linux/audit.h: the ELF machine, 64-bit, little-endian.
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e; // EM_X86_64
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7; // EM_AARCH64

/// Installs the W^X filter on this thread (and the threads it starts): `mprotect`,
/// `pkey_mprotect` and `mmap` with `PROT_WRITE | PROT_EXEC` both set fail with EPERM;
/// with `refuse_mem_writes`, so do `pwrite64`, `pwritev`, `pwritev2` and
/// `process_vm_writev` (the ways to write through `/proc/self/mem` or into a process).
/// Everything else is allowed: this stands in for a W^X policy, it is no sandbox.
///
/// Classic BPF written by hand, 12 to 16 instructions: a crate (seccompiler, libseccomp)
/// would be one more dependency to build on both lanes for one test, and `libc` already
/// has `sock_filter`, `sock_fprog` and the `SECCOMP_*` constants.
fn install_wx_filter(refuse_mem_writes: bool) -> Result<(), std::io::Error> {
    const W_X: u32 = (libc::PROT_WRITE | libc::PROT_EXEC) as u32;
    // struct seccomp_data (linux/seccomp.h): nr at 0, arch at 4, args[6] (u64) from 16;
    // the low word of args[2] (`prot` of all three calls) at 32 on little-endian.
    const NR: u32 = 0;
    const ARCH: u32 = 4;
    const ARG2_LOW: u32 = 16 + 2 * 8;
    let wx_calls = [libc::SYS_mprotect, libc::SYS_pkey_mprotect, libc::SYS_mmap];
    let write_calls: &[libc::c_long] =
        if refuse_mem_writes { &[libc::SYS_pwrite64, libc::SYS_pwritev, libc::SYS_pwritev2, libc::SYS_process_vm_writev] } else { &[] };
    // Layout: [0] load arch, [1] wrong arch → allow, [2] load nr, one compare per call,
    // [P] allow, [P+1] load prot, [P+2] and W|X, [P+3] both → deny, [P+4] deny,
    // [P+5] allow. Jumps count instructions after the jump.
    let p = 3 + wx_calls.len() + write_calls.len();
    let (check, deny, allow) = (p + 1, p + 4, p + 5);
    let stmt = |code: u32, k: u32| libc::sock_filter { code: code as u16, jt: 0, jf: 0, k };
    let jump = |at: usize, k: u32, jt: usize, jf: usize| libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt: u8::try_from(jt - at - 1).expect("a short filter"),
        jf: u8::try_from(jf - at - 1).expect("a short filter"),
        k,
    };
    let mut prog =
        vec![stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, ARCH), jump(1, AUDIT_ARCH, 2, allow), stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, NR)];
    for nr in wx_calls {
        prog.push(jump(prog.len(), nr as u32, check, prog.len() + 1));
    }
    for &nr in write_calls {
        prog.push(jump(prog.len(), nr as u32, deny, prog.len() + 1));
    }
    prog.push(stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW));
    prog.push(stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, ARG2_LOW));
    prog.push(stmt(libc::BPF_ALU | libc::BPF_AND | libc::BPF_K, W_X));
    prog.push(jump(prog.len(), W_X, deny, allow));
    prog.push(stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32));
    prog.push(stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW));
    assert_eq!(prog.len(), allow + 1);
    let fprog = libc::sock_fprog { len: prog.len() as u16, filter: prog.as_mut_ptr() };
    // SAFETY: prctl with PR_SET_NO_NEW_PRIVS takes integers only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fprog` points at `prog`, a valid classic BPF program of `len`
    // instructions, both alive for the call (the kernel copies the program).
    if unsafe { libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &fprog as *const libc::sock_fprog) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Why the scenario cannot run here: no seccomp filter could be installed.
fn no_filter_here(e: std::io::Error) -> String {
    let why = if hostile_tests::emulated() { "qemu-user refuses PR_SET_SECCOMP" } else { "this kernel has no seccomp filters (CONFIG_SECCOMP_FILTER)?" };
    format!("no seccomp filter could be installed here ({e}): {why}")
}

/// The first 32 bytes of code at `addr`.
fn text_at(addr: usize) -> Vec<u8> {
    // SAFETY: `addr` is the entry of a function of this test binary, in its read+execute
    // text mapping, which holds at least 32 more bytes (other functions follow it); the
    // bytes are only read.
    unsafe { std::slice::from_raw_parts(addr as *const u8, 32) }.to_vec()
}

/// The executable mappings of the process.
fn exec_mappings() -> Vec<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("/proc/self/maps");
    maps.lines().filter(|l| l.split_whitespace().nth(1).is_some_and(|p| p.contains('x'))).map(str::to_string).collect()
}

#[test]
#[ignore = "a child scenario: its parent test runs it in a process of its own"]
fn child_register_where_no_code_can_be_written() {
    if !is_child() {
        return;
    }
    let bp = wx_breakpoint_target as extern "C" fn(u64) -> u64;
    let ret = wx_return_target as extern "C" fn(u64) -> u64;
    let site = wx_site_target as fn(u64) -> u64;
    let targets = [bp as usize, ret as usize, site as usize];
    let before: Vec<Vec<u8>> = targets.iter().map(|&t| text_at(t)).collect();
    let refuse_mem_writes = std::env::var(FILTER_ENV).as_deref() == Ok("mprotect+pwrite");
    if let Err(e) = install_wx_filter(refuse_mem_writes) {
        report("SKIP", no_filter_here(e));
        return;
    }
    // The self-test runs now, under the filter; then nothing registration does may map
    // or change code.
    let writes = probekit::text_writes();
    report("writes", format!("{writes:?}"));
    let maps_before = exec_mappings();

    let r_bp = Probe::builder().function(bp).pre(count).register().map(|_| ());
    let r_post = Probe::builder().function(bp).pre(count).post(count).register().map(|_| ());
    let r_site = Probe::builder().function(site).pre(count).register().map(|_| ());
    let r_ret = ReturnProbe::builder().function(ret).handler(count_return).register().map(|_| ());
    let r_batch = probekit::register_batch([Probe::builder().function(bp).pre(count), Probe::builder().function(site).pre(count)]).map(|_| ());
    report("breakpoint", format!("{r_bp:?}"));
    report("breakpoint_post", format!("{r_post:?}"));
    report("site", format!("{r_site:?}"));
    report("return", format!("{r_ret:?}"));
    report("batch", format!("{:?}", r_batch.map_err(|b| (b.index, b.error))));
    if let Err(e) = &r_bp {
        eprintln!("breakpoint probe: {e}");
    }

    let after: Vec<Vec<u8>> = targets.iter().map(|&t| text_at(t)).collect();
    report("text_unchanged", before == after);
    report("exec_mappings_unchanged", maps_before == exec_mappings());
    report("header", probekit::list().to_string().lines().next().unwrap_or(""));
    // The functions run as before, and no handler ran.
    report("values", format!("{} {} {}", bp(3), ret(3), wx_site_target(3)));
    report("hits", HITS.load(Ordering::Relaxed));
}

/// Runs child scenario `name` with `env`; `None` if it was skipped (said on stderr).
fn run(name: &str, env: &[(&str, &str)]) -> Option<hostile_tests::Outcome> {
    let out = run_child_with(name, env);
    out.assert_ok();
    if let Some(why) = out.skipped() {
        eprintln!("skipped: {why}");
        return None;
    }
    Some(out)
}

/// What the child must have seen: every registration refused with `expected`, the
/// text and the executable mappings unchanged, the functions working.
fn check(out: &hostile_tests::Outcome, kernel: WriteFailure, mprotect: WriteFailure) {
    let expected = Error::TextNotWritable { kernel, mprotect };
    let describe = out.describe();
    assert_eq!(out.expect_value("writes"), format!("{:?}", TextWrites::Neither { kernel, mprotect }), "{describe}");
    for key in ["breakpoint", "breakpoint_post", "site", "return"] {
        assert_eq!(out.expect_value(key), format!("{:?}", Err::<(), _>(&expected)), "{key}: {describe}");
    }
    assert_eq!(out.expect_value("batch"), format!("{:?}", Err::<(), _>((0usize, &expected))), "{describe}");
    assert_eq!(out.expect_value("text_unchanged"), "true", "the targets' text changed\n{describe}");
    assert_eq!(out.expect_value("exec_mappings_unchanged"), "true", "registration mapped code\n{describe}");
    assert_eq!(out.expect_value("header"), format!("# text writes: {}", TextWrites::Neither { kernel, mprotect }), "{describe}");
    assert!(out.expect_value("header").starts_with("# text writes: none"), "{describe}");
    assert_eq!(out.expect_value("values"), format!("{} {} {}", 15, 14, 3 ^ 0x55), "{describe}");
    assert_eq!(out.number("hits"), 0, "{describe}");
}

/// Both ways refused by the filter: `pwrite` on /proc/self/mem and `mprotect` to W+X,
/// each named with its errno. (`auto`: the self-test chooses, whatever mode the parent
/// runs in.)
#[test]
fn neither_kernel_nor_mprotect_gives_a_typed_error_and_leaves_text_alone() {
    let Some(out) = run("child_register_where_no_code_can_be_written", &[(FILTER_ENV, "mprotect+pwrite"), ("PROBEKIT_TEXT_WRITE", "auto")]) else { return };
    check(&out, WriteFailure::Os { call: "pwrite /proc/self/mem", errno: libc::EPERM }, WriteFailure::Os { call: "mprotect", errno: libc::EPERM });
}

/// /proc/self/mem forced off by the setting, W^X enforced by the filter.
#[test]
fn kernel_forced_off_and_wx_enforced_gives_a_typed_error() {
    let Some(out) = run("child_register_where_no_code_can_be_written", &[(FILTER_ENV, "mprotect"), ("PROBEKIT_TEXT_WRITE", "mprotect")]) else { return };
    check(&out, WriteFailure::Forced, WriteFailure::Os { call: "mprotect", errno: libc::EPERM });
}

/// The filter without the setting: /proc/self/mem still works, so probes do, and no
/// mapping is ever writable and executable (the filter would have refused it).
#[test]
#[ignore = "a child scenario: its parent test runs it in a process of its own"]
fn child_register_under_wx_with_the_kernel_path() {
    if !is_child() {
        return;
    }
    if let Err(e) = install_wx_filter(false) {
        report("SKIP", no_filter_here(e));
        return;
    }
    report("writes", format!("{:?}", probekit::text_writes()));
    let bp = wx_breakpoint_target as extern "C" fn(u64) -> u64;
    let p = Probe::builder().function(bp).pre(count).post(count).register().expect("a breakpoint probe");
    let s = Probe::builder().function(wx_site_target as fn(u64) -> u64).pre(count).register().expect("a site probe");
    let r = ReturnProbe::builder().function(wx_return_target as extern "C" fn(u64) -> u64).handler(count_return).register().expect("a return probe");
    report("values", format!("{} {} {}", bp(3), wx_return_target(3), wx_site_target(3)));
    report("hits", HITS.load(Ordering::Relaxed));
    drop(r);
    s.unregister().expect("unregister the site probe");
    p.unregister().expect("unregister the breakpoint probe");
}

/// W^X enforced, /proc/self/mem allowed: the default mode needs nothing the policy
/// refuses. (Under qemu-user the kernel's way is not seen, so the child would need the
/// fallback the policy refuses; qemu refuses the filter anyway.)
#[test]
fn wx_enforced_alone_does_not_stop_the_kernel_path() {
    let Some(out) = run("child_register_under_wx_with_the_kernel_path", &[("PROBEKIT_TEXT_WRITE", "auto")]) else { return };
    assert_eq!(out.expect_value("writes"), format!("{:?}", TextWrites::Kernel { forced: false }), "{}", out.describe());
    assert_eq!(out.expect_value("values"), format!("{} {} {}", 15, 14, 3 ^ 0x55), "{}", out.describe());
    // pre + post of the breakpoint, the site's pre, the return handler.
    assert_eq!(out.number("hits"), 4, "{}", out.describe());
}
