//! Optimized probes and the probes inside their displaced range: a thread resolving
//! such a probe's breakpoint is waited for before the jump is written, and a
//! registration refused inside the range leaves the optimized probe as it was. The
//! scenario that could run part of a jump runs in a child process (this binary
//! re-executed), so that a crash fails the test instead of the harness.

use probe_rt::{Optimize, Probe, PtRegs};

#[cfg(target_arch = "x86_64")]
#[path = "common/vectors.rs"]
mod vectors;

#[cfg(target_arch = "x86_64")]
std::arch::global_asm!(
    ".pushsection .text.optprobe_window, \"ax\", @progbits",
    // A window [0, 5) at win_fn whose second instruction (a 1-byte nop at +1) can be
    // probed by a breakpoint: its slot returns to +2, inside the window.
    ".globl win_fn",
    ".globl win_fn_in",
    ".type win_fn, @function",
    "win_fn:",
    "nop",
    "win_fn_in:",
    "nop",
    "mov rax, rdi",
    "add rax, 1",
    "ret",
    ".size win_fn, . - win_fn",
    // x + 1, its entry a window of two instructions.
    ".globl req_fn",
    ".type req_fn, @function",
    "req_fn:",
    "mov rax, rdi",
    "add rax, 1",
    "ret",
    ".size req_fn, . - req_fn",
    ".popsection",
);

#[cfg(target_arch = "aarch64")]
std::arch::global_asm!(
    ".pushsection .text.optprobe_window, \"ax\", %progbits",
    // x + 1: the `b` replaces its first instruction.
    ".globl req_fn",
    ".type req_fn, %function",
    "req_fn:",
    "add x0, x0, #1",
    "ret",
    ".size req_fn, . - req_fn",
    ".popsection",
);

// C ABI, scratch registers only: safe to call. Labels are addresses only.
unsafe extern "C" {
    #[cfg(target_arch = "x86_64")]
    safe fn win_fn(x: u64) -> u64;
    #[cfg(target_arch = "x86_64")]
    safe fn win_fn_in();
    safe fn req_fn(x: u64) -> u64;
}

/// Runs test `name` again in a child process (a crash there fails the test here, with
/// `what` and the child's output), and returns true; in that child, returns false: the
/// caller goes on with the scenario.
#[cfg(target_arch = "x86_64")]
fn ran_in_child(name: &str, what: &str) -> bool {
    if std::env::var("OPTPROBE_WINDOW_CHILD").is_ok() {
        return false;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env("OPTPROBE_WINDOW_CHILD", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{what}: {}\n{text}", out.status);
    true
}

/// A thread resolving the breakpoint of a probe *inside* an optimized probe's range
/// (blocked in its pre handler), then running that probe's slot, which returns into
/// the range: when the inner probe is unregistered and the outer one optimized over
/// it, the grace period must wait for that thread, or it resumes inside the `jmp`.
#[cfg(target_arch = "x86_64")]
#[test]
fn a_thread_trapping_inside_the_range_is_waited_for_before_the_jump() {
    use std::hint::black_box;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;
    static IN_HANDLER: AtomicU32 = AtomicU32::new(0);
    static GO: AtomicU32 = AtomicU32::new(0);
    const NAME: &str = "a_thread_trapping_inside_the_range_is_waited_for_before_the_jump";
    if ran_in_child(NAME, "the thread ran part of the jump") {
        return;
    }
    let f = win_fn as extern "C" fn(u64) -> u64;
    assert_eq!(f(5), 6);
    let outer = Probe::builder().function(f).pre(|_: &PtRegs| {}).register().unwrap();
    assert!(outer.is_optimized(), "{:?}", outer.why_not_optimized());
    // SAFETY: win_fn_in is an instruction of win_fn.
    let inner = unsafe { Probe::builder().address(win_fn_in as *const () as usize) }
        .pre(|_: &PtRegs| {
            IN_HANDLER.store(1, Ordering::SeqCst);
            while GO.load(Ordering::SeqCst) == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        })
        .optimize(Optimize::Never)
        .register()
        .unwrap();
    assert!(!outer.is_optimized());
    let t = std::thread::spawn(move || black_box(f)(5));
    while IN_HANDLER.load(Ordering::SeqCst) == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    // Lets the thread go on a little after the outer probe's grace period started.
    let go = std::thread::spawn(|| {
        std::thread::sleep(Duration::from_millis(50));
        GO.store(1, Ordering::SeqCst);
    });
    // The thread is in the inner probe's SIGTRAP handler: the inner probe goes, and the
    // outer one is optimized again once the thread is out of the range and the slot.
    drop(inner);
    go.join().unwrap();
    assert_eq!(t.join().unwrap(), 6);
    assert_eq!(black_box(f)(5), 6);
}

/// A registration inside an optimized probe's range that fails its checks (here: not
/// an instruction boundary) leaves that probe optimized, even one registered with
/// `Optimize::Required`.
#[test]
fn a_refused_registration_inside_the_range_leaves_the_probe_optimized() {
    let f = req_fn as extern "C" fn(u64) -> u64;
    let p = Probe::builder().function(f).pre(|_: &PtRegs| {}).optimize(Optimize::Required).register().unwrap();
    assert!(p.is_optimized());
    // SAFETY: registration checks the address; this one is inside the first instruction.
    let bad = unsafe { Probe::builder().address(f as usize + 1) }.pre(|_: &PtRegs| {}).register();
    assert!(bad.is_err());
    assert!(p.is_optimized(), "Optimize::Required, now a breakpoint: {:?}", p.why_not_optimized());
    assert_eq!(std::hint::black_box(f)(5), 6);
}

/// Code replaced behind probekit's back while optimized, with an `int3` (0xcc) now on
/// its first byte: unregistering the probe finds no jump of its own there, and must
/// not write the original tail of the range over the new code.
#[cfg(target_arch = "x86_64")]
#[test]
fn unoptimizing_writes_no_tail_where_the_jump_is_not_ours() {
    // `mov eax, 42; ret`: the jump displaces the `mov` (5 bytes).
    let code = [0xb8, 42, 0, 0, 0, 0xc3];
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    // SAFETY: a fresh anonymous mapping of two pages, ours alone (never unmapped);
    // `code` fits in the first, made executable; the second stays read-write, whatever
    // gets mapped near.
    let f = unsafe {
        let p = libc::mmap(std::ptr::null_mut(), 2 * page, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0);
        assert_ne!(p, libc::MAP_FAILED);
        std::ptr::copy_nonoverlapping(code.as_ptr(), p as *mut u8, code.len());
        assert_eq!(libc::mprotect(p, page, libc::PROT_READ | libc::PROT_EXEC), 0);
        p as usize
    };
    // SAFETY: `f..f + 6` is one function, entered at `f` only.
    let jit = unsafe { probe_rt::jit::declare("optprobe_window_jit", f, code.len()) }.unwrap();
    let p = Probe::builder().symbol("optprobe_window_jit").optimize(Optimize::Required).pre(|_: &PtRegs| {}).register().unwrap();
    assert!(p.is_optimized());
    // The program writes other code there: an int3, then bytes of its own (nothing
    // runs it meanwhile).
    let new = [0xcc, 0x11, 0x22, 0x33, 0x44];
    // SAFETY: the page is ours; no thread runs it while it is rewritten.
    unsafe {
        assert_eq!(libc::mprotect(f as *mut libc::c_void, page, libc::PROT_READ | libc::PROT_WRITE), 0);
        std::ptr::copy_nonoverlapping(new.as_ptr(), f as *mut u8, new.len());
        assert_eq!(libc::mprotect(f as *mut libc::c_void, page, libc::PROT_READ | libc::PROT_EXEC), 0);
    }
    let _ = p.unregister();
    // SAFETY: reads the page (mapped, readable).
    let tail = unsafe { *((f + 1) as *const [u8; 4]) };
    assert_eq!(tail, [0x11, 0x22, 0x33, 0x44], "the original tail was written over the new code");
    drop(jit);
}

#[cfg(target_arch = "x86_64")]
std::arch::global_asm!(
    ".pushsection .text.optprobe_window_cold, \"ax\", @progbits",
    // GCC's hot/cold split (-freorder-blocks-and-partition): the cold part is a
    // function symbol of its own that jumps back into the hot part, here into the
    // window of cold_fn_at past its first byte.
    ".globl cold_fn",
    ".globl cold_fn_at",
    ".type cold_fn, @function",
    "cold_fn:",
    "test rdi, rdi",
    "js cold_fn.cold",
    "cold_fn_at:",
    "mov rax, rdi",
    "cold_fn_join:",
    "add rax, 1",
    "ret",
    ".size cold_fn, . - cold_fn",
    ".type cold_fn.cold, @function",
    "cold_fn.cold:",
    "mov rax, 100",
    "jmp cold_fn_join",
    ".size cold_fn.cold, . - cold_fn.cold",
    ".popsection",
);

#[cfg(target_arch = "x86_64")]
unsafe extern "C" {
    safe fn cold_fn(x: i64) -> i64;
    safe fn cold_fn_at();
}

/// A function's separate cold part (`f.cold`) that jumps back into the range: the
/// range is not optimized (the cold path would land inside the jump), and says why.
#[cfg(target_arch = "x86_64")]
#[test]
fn a_cold_part_that_jumps_into_the_range_keeps_the_probe_a_breakpoint() {
    use probe_rt::NotOptimized;
    use std::hint::black_box;
    const NAME: &str = "a_cold_part_that_jumps_into_the_range_keeps_the_probe_a_breakpoint";
    if ran_in_child(NAME, "the cold part ran into the range") {
        return;
    }
    let f = cold_fn as extern "C" fn(i64) -> i64;
    assert_eq!((f(5), f(-1)), (6, 101));
    // SAFETY: cold_fn_at is an instruction of cold_fn.
    let p = unsafe { Probe::builder().address(cold_fn_at as *const () as usize) }.pre(|_: &PtRegs| {}).register().unwrap();
    assert!(matches!(p.why_not_optimized(), Some(NotOptimized::JumpIntoWindow { .. })), "{:?}", p.why_not_optimized());
    assert_eq!(black_box(f)(5), 6);
    assert_eq!(black_box(f)(-1), 101);
}

#[cfg(target_arch = "x86_64")]
std::arch::global_asm!(
    ".pushsection .text.optprobe_window_cold_in, \"ax\", @progbits",
    // A probe inside a cold part is inside its function. cold_in_fn jumps into its cold
    // part's first window past its first byte (cold_in_fn.cold + 2, inside the
    // `xor; add` a jump there displaces), and has AVX code (where a caller may hold
    // anything in zmm16-31: a probe in its cold part keeps all of the state).
    ".globl cold_in_fn",
    ".type cold_in_fn, @function",
    "cold_in_fn:",
    "xor eax, eax",
    "test rdi, rdi",
    "js cold_in_fn.cold",
    "jz cold_in_fn_inside",
    "lea rax, [rdi + 1]",
    "ret",
    "vzeroupper",
    ".size cold_in_fn, . - cold_in_fn",
    ".globl cold_in_fn.cold",
    ".type cold_in_fn.cold, @function",
    "cold_in_fn.cold:",
    "xor eax, eax",
    "cold_in_fn_inside:",
    "add eax, 100",
    "cold_in_fn_later:",
    "mov rcx, rdi",
    "add rax, rcx",
    "ret",
    ".size cold_in_fn.cold, . - cold_in_fn.cold",
    ".popsection",
);

#[cfg(target_arch = "x86_64")]
unsafe extern "C" {
    safe fn cold_in_fn(x: i64) -> i64;
    safe fn cold_in_fn_later();
}

/// A probe inside a function's cold part (`f.cold`) is checked against the jumps of
/// the function and its other parts, and keeps the state the function may hold.
#[cfg(target_arch = "x86_64")]
#[test]
fn a_probe_in_a_cold_part_is_checked_as_inside_its_function() {
    use probe_rt::NotOptimized;
    use std::hint::black_box;
    let f = cold_in_fn as extern "C" fn(i64) -> i64;
    assert_eq!((f(5), f(0), f(-1)), (6, 100, 99));
    let p = Probe::builder().symbol("cold_in_fn.cold").pre(|_: &PtRegs| {}).register().unwrap();
    assert!(matches!(p.why_not_optimized(), Some(NotOptimized::JumpIntoWindow { .. })), "{:?}", p.why_not_optimized());
    assert_eq!((black_box(f)(0), black_box(f)(-1)), (100, 99));
    assert_eq!(p.nhit(), 1);
    drop(p);
    if !std::arch::is_x86_feature_detected!("avx512f") {
        return;
    }
    // The function has AVX code: zmm16 is kept across a probe in its cold part.
    use vectors::{all_ones_through, clobber_zmm16};
    // SAFETY: cold_in_fn_later is an instruction of cold_in_fn.cold.
    let p = unsafe { Probe::builder().address(cold_in_fn_later as *const () as usize) }
        // SAFETY: the CPU has AVX-512 (checked above).
        .pre(|_: &PtRegs| unsafe { clobber_zmm16() })
        .optimize(Optimize::Required)
        .register()
        .expect("optimized");
    let mut out = [0u64; 8];
    // SAFETY: AVX-512 (checked); cold_in_fn(-1) leaves zmm16 alone and touches what
    // the C ABI lets it.
    unsafe { all_ones_through(cold_in_fn as *const (), -1i64 as u64, &mut out) };
    assert_eq!(p.nhit(), 1);
    assert_eq!(out, [u64::MAX; 8], "zmm16 kept");
}

#[cfg(target_arch = "x86_64")]
std::arch::global_asm!(
    ".pushsection .text.optprobe_window_sled, \"ax\", @progbits",
    // 64 one-byte nops: a window of five of them at each of the first 56.
    ".globl sled_fn",
    ".type sled_fn, @function",
    "sled_fn:",
    ".rept 64",
    "nop",
    ".endr",
    "ret",
    ".size sled_fn, . - sled_fn",
    ".popsection",
);

#[cfg(target_arch = "aarch64")]
std::arch::global_asm!(
    ".pushsection .text.optprobe_window_sled, \"ax\", %progbits",
    ".globl sled_fn",
    ".type sled_fn, %function",
    "sled_fn:",
    ".rept 64",
    "nop",
    ".endr",
    "ret",
    ".size sled_fn, . - sled_fn",
    ".popsection",
);

unsafe extern "C" {
    safe fn sled_fn();
}

/// Where the jump at an optimized `addr` goes (its detour block's entry).
fn jump_target(addr: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: reads the text at an optimized address (mapped, readable).
        let j = unsafe { *(addr as *const [u8; 5]) };
        assert_eq!(j[0], 0xe9, "jmp rel32");
        addr.wrapping_add(5).wrapping_add_signed(i32::from_le_bytes(j[1..].try_into().unwrap()) as isize)
    }
    #[cfg(target_arch = "aarch64")]
    {
        // SAFETY: as above.
        let w = unsafe { *(addr as *const u32) };
        assert_eq!(w >> 26, 0b000101, "b");
        addr.wrapping_add_signed((((w << 6) as i32) >> 6) as isize * 4)
    }
}

/// A detour block, once written, serves no other address: a thread (in an out-of-line
/// helper the detour calls, or unwinding from a signal handler) may still be in it when
/// no grace period can tell. Many addresses optimized and unoptimized in turn (more than
/// it took to make parked blocks free before) each get a block of their own; an
/// address optimized again gets its own block back.
#[test]
fn a_detour_block_is_never_reused_for_another_address() {
    let step = if cfg!(target_arch = "aarch64") { 4 } else { 1 };
    let f = sled_fn as extern "C" fn() as usize;
    let mut owner: std::collections::HashMap<usize, usize> = std::collections::HashMap::new();
    for (n, k) in (0..48).chain(0..4).enumerate() {
        let at = f + k * step;
        // SAFETY: `at` is a nop of sled_fn.
        let p = unsafe { Probe::builder().address(at) }.pre(|_: &PtRegs| {}).optimize(Optimize::Required).register().unwrap();
        let block = jump_target(at);
        sled_fn();
        assert_eq!(p.nhit(), 1);
        let first = *owner.entry(block).or_insert(at);
        assert_eq!(first, at, "the block of {first:#x} was reused for {at:#x}");
        if n >= 48 {
            assert_eq!(owner.values().filter(|a| **a == at).count(), 1, "{at:#x} optimized again: its own block");
        }
        drop(p);
    }
}
