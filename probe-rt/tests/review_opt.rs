//! Review of optprobes (issue 13): failing tests that prove findings. Each scenario
//! runs in a child process (this binary re-executed), so that a thread that executes
//! half of a jump crashes the child, not the harness; the parent reports what happened.

#![cfg(target_arch = "x86_64")]

use probe_rt::{Optimize, Probe, PtRegs};
use std::hint::black_box;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

std::arch::global_asm!(
    ".pushsection .text.review_opt, \"ax\", @progbits",
    // Finding 1: a window [0, 5) at rv_win whose second instruction (a 1-byte nop at
    // +1) is probed by a breakpoint: its slot returns to +2, inside the window.
    ".globl rv_win",
    ".globl rv_win_in",
    ".type rv_win, @function",
    "rv_win:",
    "nop",
    "rv_win_in:",
    "nop",
    "mov rax, rdi",
    "add rax, 1",
    "ret",
    ".size rv_win, . - rv_win",
    // Finding 2: GCC's hot/cold split (-freorder-blocks-and-partition): the cold part
    // is a function symbol of its own that jumps back into the hot part, here into the
    // window of rv_cold_at past its first byte.
    ".globl rv_cold",
    ".globl rv_cold_at",
    ".type rv_cold, @function",
    "rv_cold:",
    "test rdi, rdi",
    "js rv_cold.cold",
    "rv_cold_at:",
    "mov rax, rdi",
    "rv_cold_join:",
    "add rax, 1",
    "ret",
    ".size rv_cold, . - rv_cold",
    ".type rv_cold.cold, @function",
    "rv_cold.cold:",
    "mov rax, 100",
    "jmp rv_cold_join",
    ".size rv_cold.cold, . - rv_cold.cold",
    // Finding 3: a function taking a 256-bit vector argument (ymm0): returns the low
    // quadword of its upper half. Its entry is one 6-byte instruction.
    ".globl rv_ymm",
    ".type rv_ymm, @function",
    "rv_ymm:",
    "vextractf128 xmm1, ymm0, 1",
    "vmovq rax, xmm1",
    "vzeroupper",
    "ret",
    ".size rv_ymm, . - rv_ymm",
    // Finding 4: x + 1, its entry a window of two instructions.
    ".globl rv_req",
    ".type rv_req, @function",
    "rv_req:",
    "mov rax, rdi",
    "add rax, 1",
    "ret",
    ".size rv_req, . - rv_req",
    ".popsection",
);

// C ABI, scratch registers only: safe to call. Labels are addresses only.
unsafe extern "C" {
    safe fn rv_win(x: u64) -> u64;
    safe fn rv_win_in();
    safe fn rv_cold(x: i64) -> i64;
    safe fn rv_cold_at();
    safe fn rv_ymm();
    safe fn rv_req(x: u64) -> u64;
}

/// Runs `name` in a child process (this test binary, `--exact name`, `RV_CHILD=1`) and
/// returns its status and output.
fn in_child(name: &str) -> (std::process::ExitStatus, String) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env("RV_CHILD", "1")
        .output()
        .unwrap();
    (out.status, String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
}

fn child() -> bool {
    std::env::var("RV_CHILD").is_ok()
}

static IN_HANDLER: AtomicU32 = AtomicU32::new(0);
static GO: AtomicU32 = AtomicU32::new(0);

/// Finding 1: a thread resolving the breakpoint of a probe *inside* the range (here
/// blocked in that probe's pre handler) is not waited for by `window_clear`, which
/// only waits for traps at the window's own address; when the inner probe is
/// unregistered, the outer one is optimized over it, and the thread then runs the
/// inner probe's slot, which jumps back to +2: into the middle of the `jmp rel32`.
#[test]
fn a_thread_in_the_trap_handler_of_a_probe_inside_the_window_is_not_waited_for() {
    if !child() {
        let (status, out) = in_child("a_thread_in_the_trap_handler_of_a_probe_inside_the_window_is_not_waited_for");
        println!("child: {status}\n{out}");
        assert!(status.success(), "the thread executed part of the jump: {status}");
        return;
    }
    let f = rv_win as extern "C" fn(u64) -> u64;
    assert_eq!(f(5), 6);
    let outer = Probe::builder().function(f).pre(|_: &PtRegs| {}).register().unwrap();
    assert!(outer.is_optimized(), "{:?}", outer.why_not_optimized());
    // SAFETY: rv_win_in is an instruction of rv_win.
    let inner = unsafe { Probe::builder().address(rv_win_in as usize) }
        .pre(|_: &PtRegs| {
            IN_HANDLER.store(1, Ordering::SeqCst);
            while GO.load(Ordering::SeqCst) == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        })
        .optimize(Optimize::Never)
        .register()
        .unwrap();
    println!("outer with a probe in its window: {:?}", outer.why_not_optimized());
    let t = std::thread::spawn(move || black_box(f)(5));
    while IN_HANDLER.load(Ordering::SeqCst) == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    // The thread is in the inner probe's SIGTRAP handler: the inner probe goes, the
    // outer one is optimized at once (its ProbeInWindow reason is retried).
    drop(inner);
    println!("outer after the inner probe went: optimized = {}", outer.is_optimized());
    // SAFETY: reads the text of rv_win.
    let text = unsafe { *(f as usize as *const [u8; 5]) };
    println!("text at rv_win: {text:02x?} (the thread will resume at rv_win + 2)");
    GO.store(1, Ordering::SeqCst);
    let r = t.join().unwrap();
    println!("f(5) on the thread = {r}");
    assert_eq!(r, 6);
}

/// Finding 2: jumps into the window are looked for only inside the probed function's
/// symbol; a `.cold` part (a function symbol of its own) that jumps back into it is
/// not seen.
#[test]
fn a_cold_part_that_jumps_into_the_window_is_not_seen() {
    if !child() {
        let (status, out) = in_child("a_cold_part_that_jumps_into_the_window_is_not_seen");
        println!("child: {status}\n{out}");
        assert!(status.success(), "the cold path executed part of the jump: {status}");
        return;
    }
    let f = rv_cold as extern "C" fn(i64) -> i64;
    assert_eq!((f(5), f(-1)), (6, 101));
    // SAFETY: rv_cold_at is an instruction of rv_cold.
    let p = unsafe { Probe::builder().address(rv_cold_at as usize) }.pre(|_: &PtRegs| {}).register().unwrap();
    println!("optimized: {} ({:?})", p.is_optimized(), p.why_not_optimized());
    assert_eq!(black_box(f)(5), 6);
    let r = black_box(f)(-1);
    println!("f(-1) = {r}");
    assert_eq!(r, 101);
}

/// Calls rv_ymm with ymm0 = [1, 2, hi, 4]: returns `hi` if the upper half arrives.
fn call_ymm(hi: u64) -> u64 {
    let v: [u64; 4] = [1, 2, hi, 4];
    let r: u64;
    // SAFETY: rv_ymm reads ymm0 and writes rax, xmm1 (caller-saved, clobber_abi);
    // the stack may be used (no `nostack`), so rsp is aligned and no red zone is live.
    unsafe {
        std::arch::asm!("vmovdqu ymm0, [{p}]", "call {f}", p = in(reg) v.as_ptr(), f = in(reg) rv_ymm as usize, out("rax") r, clobber_abi("C"));
    }
    r
}

/// Finding 3: at a function's entry the x86_64 detour keeps only xmm0-xmm7 (Fp::Args),
/// but a 256-bit (or 512-bit) vector argument lives in ymm0-7 (zmm0-7): a handler that
/// runs any AVX code (`vzeroupper`: every AVX-compiled function, glibc's memcpy…)
/// zeroes the argument's upper half. A breakpoint keeps it (the kernel saves xstate).
#[test]
fn a_256_bit_argument_survives_a_probe_at_the_entry() {
    assert_eq!(call_ymm(0x1234), 0x1234);
    for mode in [Optimize::Never, Optimize::Required] {
        let p = Probe::builder()
            .function(rv_ymm as unsafe extern "C" fn())
            .pre(|_: &PtRegs| {
                // SAFETY: vzeroupper changes no memory; the CPU has AVX (asserted above).
                unsafe { std::arch::asm!("vzeroupper") }
            })
            .optimize(mode)
            .register()
            .unwrap();
        let got = call_ymm(0x1234);
        println!("{mode:?}: optimized = {}, upper half = {got:#x}", p.is_optimized());
        assert_eq!(got, 0x1234, "{mode:?}: the argument's upper half was lost");
        drop(p);
    }
}

/// Finding 4: `stage` takes an optimized window back to a breakpoint (and records
/// ProbeInWindow) *before* it validates the new probe; a registration that then fails
/// (here: not an instruction boundary) leaves the window a breakpoint for good, even
/// for a probe registered with `Optimize::Required`.
#[test]
fn a_failed_registration_inside_a_window_does_not_deoptimize_a_required_probe() {
    let f = rv_req as extern "C" fn(u64) -> u64;
    let p = Probe::builder().function(f).pre(|_: &PtRegs| {}).optimize(Optimize::Required).register().unwrap();
    assert!(p.is_optimized());
    // SAFETY: registration checks the address; this one is inside `mov rax, rdi`.
    let bad = unsafe { Probe::builder().address(f as usize + 1) }.pre(|_: &PtRegs| {}).register();
    println!("registration at rv_req + 1: {:?}", bad.as_ref().err());
    assert!(bad.is_err());
    println!("the Required probe: {:?}", p.why_not_optimized());
    assert!(p.is_optimized(), "Optimize::Required, now a breakpoint: {:?}", p.why_not_optimized());
}
