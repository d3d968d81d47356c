//! x86_64: an optimized probe inside a function of legacy SSE code only (no VEX, EVEX,
//! x87 or MMX instruction: code built for baseline x86_64) keeps what such code can
//! have live there, whatever the handler does: `xmm0`–`xmm15`, MXCSR, and their bits
//! above 127 (a vector argument handed on unread, a caller's value kept across a call
//! to code it knows leaves them alone). What no such code can hold (`zmm16`–`zmm31`,
//! AVX-512 only) is the handler's to use: that the handler's value is found there
//! after shows that the probe took the trampoline that keeps the smaller state
//! (probe-codegen's `Fp::Sse`).
//!
//! At the entry of such a function the argument registers are live, and their bits
//! above 127 only if it may hand a vector argument on (a call or a tail call): a leaf
//! keeps their low halves alone.
#![cfg(target_arch = "x86_64")]

use probe_rt::{Optimize, Probe, PtRegs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use vectors::{avx512, clobber_everything};

#[path = "common/vectors.rs"]
mod vectors;

/// xmm0-15 and MXCSR, in and out.
#[repr(C, align(16))]
#[derive(Clone, Debug, PartialEq)]
struct Low {
    xmm: [[u8; 16]; 16],
    mxcsr: u32,
    _pad: [u32; 3],
}

/// The bits above 127 the test sets before the probe point and reads after it (by
/// calls of other functions: the probed one stays legacy code): bits 128-255 of
/// ymm0-15, bits 256-511 of zmm0-7, and zmm16 (AVX-512 only).
#[repr(C, align(64))]
#[derive(Clone, Debug, PartialEq)]
struct Upper {
    ymm: [[u8; 16]; 16],
    zmm: [[u8; 32]; 8],
    zmm16: [u8; 64],
}

std::arch::global_asm!(
    ".pushsection .text.mid_sse_tests, \"ax\", @progbits",
    // sse_mid(low_in: rdi, low_out: rsi, upper_in: rdx, upper_out: rcx, load: r8, dump: r9):
    // legacy SSE only. MXCSR and xmm0-15 from low_in, the upper bits by `load`, the
    // probe point, the upper bits out by `dump`, then xmm0-15 and MXCSR to low_out.
    ".globl sse_mid",
    ".globl sse_mid_point",
    ".type sse_mid, @function",
    "sse_mid:",
    "push rbx",
    "sub rsp, 16",
    "stmxcsr dword ptr [rsp]",
    "ldmxcsr dword ptr [rdi + 256]",
    "movups xmm0, [rdi]",
    "movups xmm1, [rdi + 16]",
    "movups xmm2, [rdi + 32]",
    "movups xmm3, [rdi + 48]",
    "movups xmm4, [rdi + 64]",
    "movups xmm5, [rdi + 80]",
    "movups xmm6, [rdi + 96]",
    "movups xmm7, [rdi + 112]",
    "movups xmm8, [rdi + 128]",
    "movups xmm9, [rdi + 144]",
    "movups xmm10, [rdi + 160]",
    "movups xmm11, [rdi + 176]",
    "movups xmm12, [rdi + 192]",
    "movups xmm13, [rdi + 208]",
    "movups xmm14, [rdi + 224]",
    "movups xmm15, [rdi + 240]",
    "call r8",
    "sse_mid_point:",
    "mov rbx, rdi",
    "add rbx, 256",
    "call r9",
    "movups [rsi], xmm0",
    "movups [rsi + 16], xmm1",
    "movups [rsi + 32], xmm2",
    "movups [rsi + 48], xmm3",
    "movups [rsi + 64], xmm4",
    "movups [rsi + 80], xmm5",
    "movups [rsi + 96], xmm6",
    "movups [rsi + 112], xmm7",
    "movups [rsi + 128], xmm8",
    "movups [rsi + 144], xmm9",
    "movups [rsi + 160], xmm10",
    "movups [rsi + 176], xmm11",
    "movups [rsi + 192], xmm12",
    "movups [rsi + 208], xmm13",
    "movups [rsi + 224], xmm14",
    "movups [rsi + 240], xmm15",
    "stmxcsr dword ptr [rsi + 256]",
    "ldmxcsr dword ptr [rsp]",
    "add rsp, 16",
    "pop rbx",
    "ret",
    ".size sse_mid, . - sse_mid",
    // The upper bits from [rdx] / to [rcx], keeping bits 0-127 (AVX; AVX-512 for the
    // zmm forms). vinsertf128 zeroes bits 256 on, so it goes first.
    ".macro ymm_op op, i",
    ".ifc \\op,load",
    "vinsertf128 ymm\\i, ymm\\i, [rdx + 16 * \\i], 1",
    ".else",
    "vextractf128 [rcx + 16 * \\i], ymm\\i, 1",
    ".endif",
    ".endm",
    ".macro zmm_op op, i",
    ".ifc \\op,load",
    "vinserti64x4 zmm\\i, zmm\\i, [rdx + 256 + 32 * \\i], 1",
    ".else",
    "vextracti64x4 [rcx + 256 + 32 * \\i], zmm\\i, 1",
    ".endif",
    ".endm",
    ".macro all_ymm op",
    "ymm_op \\op, 0",
    "ymm_op \\op, 1",
    "ymm_op \\op, 2",
    "ymm_op \\op, 3",
    "ymm_op \\op, 4",
    "ymm_op \\op, 5",
    "ymm_op \\op, 6",
    "ymm_op \\op, 7",
    "ymm_op \\op, 8",
    "ymm_op \\op, 9",
    "ymm_op \\op, 10",
    "ymm_op \\op, 11",
    "ymm_op \\op, 12",
    "ymm_op \\op, 13",
    "ymm_op \\op, 14",
    "ymm_op \\op, 15",
    ".endm",
    ".macro all_zmm op",
    "zmm_op \\op, 0",
    "zmm_op \\op, 1",
    "zmm_op \\op, 2",
    "zmm_op \\op, 3",
    "zmm_op \\op, 4",
    "zmm_op \\op, 5",
    "zmm_op \\op, 6",
    "zmm_op \\op, 7",
    ".endm",
    ".type load_upper256, @function",
    "load_upper256:",
    "all_ymm load",
    "ret",
    ".size load_upper256, . - load_upper256",
    ".type dump_upper256, @function",
    "dump_upper256:",
    "all_ymm dump",
    "ret",
    ".size dump_upper256, . - dump_upper256",
    ".type load_upper512, @function",
    "load_upper512:",
    "all_ymm load",
    "all_zmm load",
    "vmovdqu64 zmm16, [rdx + 512]",
    "ret",
    ".size load_upper512, . - load_upper512",
    ".type dump_upper512, @function",
    "dump_upper512:",
    "all_ymm dump",
    "all_zmm dump",
    "vmovdqu64 [rcx + 512], zmm16",
    "ret",
    ".size dump_upper512, . - dump_upper512",
    // with_upper(f: rdi, x: rsi, upper: rdx, out: rcx) -> f(x, out): ymm0 = (x, upper) at
    // the call, its bits 128-255 after it to out[1].
    ".type with_upper, @function",
    "with_upper:",
    "push rbx",
    "mov rbx, rcx",
    "vmovq xmm0, rsi",
    "vinsertf128 ymm0, ymm0, [rdx], 1",
    "mov rax, rdi",
    "mov rdi, rsi",
    "mov rsi, rbx",
    "call rax",
    "vextractf128 [rbx + 16], ymm0, 1",
    "pop rbx",
    "ret",
    ".size with_upper, . - with_upper",
    // Legacy code, a leaf: x + 1.
    ".globl legacy_leaf",
    ".type legacy_leaf, @function",
    "legacy_leaf:",
    "mov rax, rdi",
    "add rax, 1",
    "ret",
    ".size legacy_leaf, . - legacy_leaf",
    // Legacy code that hands its vector argument on unread (a tail call): x + 1, and
    // out[0] = ymm0's bits 128-255 as the callee gets them.
    ".globl legacy_pass",
    ".type legacy_pass, @function",
    "legacy_pass:",
    "mov rax, rdi",
    "add rax, 1",
    "jmp read_upper",
    ".size legacy_pass, . - legacy_pass",
    ".type read_upper, @function",
    "read_upper:",
    "vextractf128 [rsi], ymm0, 1",
    "ret",
    ".size read_upper, . - read_upper",
    // x87_caller(out: rdi, x: rsi) -> x87_pass(x), and the long double x87_pass returns
    // to out (as a double). x87_pass has no x87 instruction: the value a callee left in
    // st0 passes through it, past the probe point.
    ".type x87_caller, @function",
    "x87_caller:",
    "push rbx",
    "mov rbx, rdi",
    "mov rdi, rsi",
    "call x87_pass",
    "fstp qword ptr [rbx]",
    "pop rbx",
    "ret",
    ".size x87_caller, . - x87_caller",
    ".globl x87_pass",
    ".globl x87_pass_at",
    ".type x87_pass, @function",
    "x87_pass:",
    "sub rsp, 8",
    "call load_pi",
    "x87_pass_at:",
    "mov rax, rdi",
    "add rax, 1",
    "add rsp, 8",
    "ret",
    ".size x87_pass, . - x87_pass",
    ".type load_pi, @function",
    "load_pi:",
    "fldpi",
    "ret",
    ".size load_pi, . - load_pi",
    ".popsection",
);

extern "C" {
    fn sse_mid(
        low_in: *const Low,
        low_out: *mut Low,
        upper_in: *const Upper,
        upper_out: *mut Upper,
        load: unsafe extern "C" fn(),
        dump: unsafe extern "C" fn(),
    );
    fn sse_mid_point();
    fn load_upper256();
    fn dump_upper256();
    fn load_upper512();
    fn dump_upper512();
    fn with_upper(f: unsafe extern "C" fn(), x: u64, upper: *const [u8; 16], out: *mut [[u8; 16]; 2]) -> u64;
    fn legacy_leaf();
    fn legacy_pass();
    fn x87_caller(out: *mut f64, x: u64) -> u64;
    fn x87_pass();
    fn x87_pass_at();
}

fn pattern(seed: u8, i: usize) -> u8 {
    seed.wrapping_mul(37).wrapping_add((i as u8).wrapping_mul(11)) | 1
}

/// Runs `sse_mid` once.
fn run(low: &Low, upper: &Upper) -> (Low, Upper) {
    let mut low_out = Low { xmm: [[0; 16]; 16], mxcsr: 0, _pad: [0; 3] };
    let mut upper_out = Upper { ymm: [[0; 16]; 16], zmm: [[0; 32]; 8], zmm16: [0; 64] };
    let (load, dump): (unsafe extern "C" fn(), unsafe extern "C" fn()) = match avx512() {
        true => (load_upper512, dump_upper512),
        false => (load_upper256, dump_upper256),
    };
    // SAFETY: the four pointers are valid for the function's reads and writes; it
    // restores the caller's MXCSR and touches only caller-saved registers (rbx is
    // pushed and popped); `load`/`dump` use only AVX-512 where the CPU has it.
    unsafe { sse_mid(low, &mut low_out, upper, &mut upper_out, load, dump) };
    (low_out, upper_out)
}

#[test]
fn a_probe_inside_legacy_sse_code_keeps_what_it_can_read() {
    if !std::arch::is_x86_feature_detected!("avx") {
        eprintln!("skipped: no AVX");
        return;
    }
    let low = Low { xmm: std::array::from_fn(|r| std::array::from_fn(|i| pattern(r as u8, i))), mxcsr: 0x3fa1, _pad: [0; 3] };
    let upper = Upper {
        ymm: std::array::from_fn(|r| std::array::from_fn(|i| pattern(100 + r as u8, i))),
        zmm: std::array::from_fn(|r| std::array::from_fn(|i| pattern(150 + r as u8, i))),
        zmm16: std::array::from_fn(|i| pattern(200, i)),
    };
    let (low_unprobed, upper_unprobed) = run(&low, &upper);
    assert_eq!(low_unprobed, low, "unprobed");
    let mut want_upper = upper.clone();
    if !avx512() {
        want_upper.zmm = [[0; 32]; 8];
        want_upper.zmm16 = [0; 64];
    }
    assert_eq!(upper_unprobed, want_upper, "unprobed");

    let seen = Arc::new(AtomicU64::new(0));
    let s = seen.clone();
    let point = sse_mid_point as *const () as usize;
    let p = Probe::builder()
        .symbol("sse_mid")
        .offset(point - sse_mid as *const () as usize)
        .optimize(Optimize::Required)
        .pre(move |regs: &PtRegs| {
            s.store(regs.rip, Ordering::Relaxed);
            clobber_everything();
        })
        .register()
        .unwrap();
    assert!(p.is_optimized());
    let (low_probed, upper_probed) = run(&low, &upper);
    assert_eq!(p.nhit(), 1);
    assert_eq!(seen.load(Ordering::Relaxed), point as u64, "the handler ran at the probe");
    for i in 0..16 {
        assert_eq!(low_probed.xmm[i], low.xmm[i], "xmm{i}");
    }
    assert_eq!(low_probed.mxcsr, low.mxcsr, "MXCSR, exception flags included");
    // The upper halves: kept.
    for i in 0..16 {
        assert_eq!(upper_probed.ymm[i], want_upper.ymm[i], "ymm{i} bits 128-255");
    }
    for i in 0..8 {
        assert_eq!(upper_probed.zmm[i], want_upper.zmm[i], "zmm{i} bits 256-511");
    }
    // What legacy code cannot hold: the handler's, as it left it (the small trampoline ran).
    if avx512() {
        assert_eq!(upper_probed.zmm16, [0xff; 64], "zmm16: the handler's");
    }
}

/// Calls `f` (legacy_leaf or legacy_pass) under an entry probe whose handler leaves
/// all ones in ymm0 (and nothing else changed); returns what `with_upper` saw: the
/// result, and ymm0's bits 128-255 as a callee of `f` got them and after `f`.
fn entry_probed(symbol: &str, f: unsafe extern "C" fn()) -> (u64, [[u8; 16]; 2]) {
    let upper: [u8; 16] = std::array::from_fn(|i| pattern(77, i));
    let p = Probe::builder()
        .symbol(symbol)
        .optimize(Optimize::Required)
        .pre(|_: &PtRegs| {
            // SAFETY: writes only ymm0, declared clobbered; the CPU has AVX (the caller checked).
            unsafe { std::arch::asm!("vpcmpeqd ymm0, ymm0, ymm0", out("xmm0") _) }
        })
        .register()
        .unwrap();
    assert!(p.is_optimized());
    let mut out = [[0u8; 16]; 2];
    // SAFETY: the CPU has AVX (the caller checked); `f` touches rax and, legacy_pass,
    // 16 bytes at its second argument, `out`.
    let r = unsafe { with_upper(f, 41, &upper, &mut out) };
    assert_eq!(p.nhit(), 1);
    (r, out)
}

#[test]
fn an_entry_probe_keeps_a_vector_argument_handed_on() {
    if !std::arch::is_x86_feature_detected!("avx") || !probe_rt::cpu_support().wide {
        eprintln!("skipped: no AVX state");
        return;
    }
    let upper: [u8; 16] = std::array::from_fn(|i| pattern(77, i));
    let (r, out) = entry_probed("legacy_pass", legacy_pass);
    assert_eq!(r, 42);
    assert_eq!(out[0], upper, "ymm0 bits 128-255 as the tail-called function got them");
}

#[test]
fn an_entry_probe_on_a_leaf_of_legacy_code_keeps_the_low_halves() {
    if !std::arch::is_x86_feature_detected!("avx") {
        eprintln!("skipped: no AVX");
        return;
    }
    let (r, out) = entry_probed("legacy_leaf", legacy_leaf);
    assert_eq!(r, 42);
    // Dead in a leaf of legacy code: the handler's, as it left it (the trampoline that
    // keeps only the low halves ran).
    assert_eq!(out[1], [0xff; 16], "ymm0 bits 128-255 after the leaf");
}

#[test]
fn a_value_on_the_x87_stack_passing_through_legacy_code_is_kept() {
    let p = Probe::builder()
        .symbol("x87_pass")
        .offset(x87_pass_at as *const () as usize - x87_pass as *const () as usize)
        .optimize(Optimize::Required)
        .pre(|_: &PtRegs| {
            // SAFETY: empties the x87 stack (what a handler's x87 or MMX code may leave),
            // declared clobbered; the control word it sets is Linux's default.
            unsafe { std::arch::asm!("fninit", out("st(0)") _, out("st(1)") _) }
        })
        .register()
        .unwrap();
    assert!(p.is_optimized());
    let mut out = 0.0f64;
    // SAFETY: `out` is writable; the functions leave the x87 stack as they found it.
    let r = unsafe { x87_caller(&mut out, 41) };
    assert_eq!(p.nhit(), 1);
    assert_eq!(r, 42);
    assert_eq!(out, std::f64::consts::PI, "st0 across the probe");
}
