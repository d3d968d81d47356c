//! x86_64: an optimized probe inside a function keeps all of the FP/SIMD state the
//! probed code has live there, whatever the handler does with it: `zmm0`–`zmm31` whole
//! (`ymm0`–`ymm15` without AVX-512), `k0`–`k7`, the x87 stack and control word, and
//! MXCSR. State in its initial state at the probe is in it after: the handler's AVX
//! and AVX-512 code leaves no upper halves in use (the transition penalty it would
//! cost the probed code), nor a value in `zmm16`–`zmm31` or a `k` register, which the
//! probed code may count on being zero.
#![cfg(target_arch = "x86_64")]

use probe_rt::{Optimize, Probe, ProbeHandle, PtRegs};
use std::sync::Mutex;
use vectors::{avx512, clobber_everything, xcr0};

#[path = "common/vectors.rs"]
mod vectors;

/// Where the state of `state512` and `state256` lives, in and out.
#[repr(C, align(64))]
#[derive(Clone, PartialEq)]
struct State {
    /// zmm0-31 (state512) or ymm0-15 (state256, the first 512 bytes).
    vec: [[u8; 64]; 32],
    k: [u64; 8],
    /// The x87 value pushed before the probe and popped after (an 80-bit load of a
    /// double, stored back as a double).
    st0: f64,
    fcw: u16,
    /// The x87 status word at the probe point, and before it.
    fsw: u16,
    fsw_before: u16,
    _pad: u16,
    mxcsr: u32,
    _pad2: u32,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("k", &self.k)
            .field("st0", &self.st0)
            .field("fcw", &self.fcw)
            .field("fsw", &self.fsw)
            .field("fsw_before", &self.fsw_before)
            .field("mxcsr", &self.mxcsr)
            .finish_non_exhaustive()
    }
}

std::arch::global_asm!(
    ".pushsection .text.mid_state_tests, \"ax\", @progbits",
    // The x87 and MXCSR parts both functions share. x87_keep: the caller's control
    // word and MXCSR, kept below the stack pointer (restored by x87_out).
    ".macro x87_keep",
    "fnstcw word ptr [rsp - 8]", // the caller's, restored at the end
    "stmxcsr dword ptr [rsp - 16]",
    ".endm",
    // x87_in: MXCSR and the x87 control word from `in`, and as `x87` says: 1, a value
    // pushed from `in`; 2, x87 state in use with the stack empty and a status (a store
    // that rounds: PE); 0, x87 state in its initial state (xrstor of the zeroed header
    // at `area`); then the x87 status word before the probe point.
    ".macro x87_in",
    "cmp edx, 1",
    "je 5f",
    "test edx, edx",
    "jz 4f",
    "fldcw word ptr [rdi + 2120]", // x87 2: in use, the stack empty, a status (PE)
    "fldpi",
    "fistp dword ptr [rsp - 24]",
    "jmp 2f",
    "5:", // x87 1: a value on the stack
    "fldcw word ptr [rdi + 2120]",
    "fld qword ptr [rdi + 2112]",
    "jmp 2f",
    "4:", // x87 state in its initial state: xrstor of the zeroed header at rcx, x87 only
    "mov r9, rcx",
    "mov eax, 1",
    "xrstor64 [r9]", // edx = 0
    "2:",
    "ldmxcsr dword ptr [rdi + 2128]",
    "fnstsw word ptr [rsi + 2124]",
    ".endm",
    // x87_out: the value popped (x87 1), the control word and MXCSR to `out`, the
    // caller's back, and return.
    ".macro x87_out",
    "cmp edx, 1",
    "jne 3f",
    "fstp qword ptr [rsi + 2112]",
    "3:",
    "fnstcw word ptr [rsi + 2120]",
    "stmxcsr dword ptr [rsi + 2128]",
    "fldcw word ptr [rsp - 8]",
    "ldmxcsr dword ptr [rsp - 16]",
    "vzeroupper",
    "ret",
    ".endm",
    // state512(in = rdi, out = rsi, x87 = edx, area = rcx): loads zmm0-31 and k0-7
    // from `in`, and the x87 state and MXCSR (x87_in); reaches the probe point; stores
    // them all to `out`, the x87 status word first.
    ".globl state512",
    ".type state512, @function",
    "state512:",
    "x87_keep",
    ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    "vmovdqu64 zmm\\i, zmmword ptr [rdi + 64 * \\i]",
    ".endr",
    ".irp i, 0,1,2,3,4,5,6,7",
    "kmovq k\\i, qword ptr [rdi + 2048 + 8 * \\i]",
    ".endr",
    "x87_in",
    ".globl state512_point",
    "state512_point:",
    "nop dword ptr [rax + rax]", // 5 bytes: the probe's jump replaces it
    "nop dword ptr [rax + rax]",
    "fnstsw word ptr [rsi + 2122]",
    ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    "vmovdqu64 zmmword ptr [rsi + 64 * \\i], zmm\\i",
    ".endr",
    ".irp i, 0,1,2,3,4,5,6,7",
    "kmovq qword ptr [rsi + 2048 + 8 * \\i], k\\i",
    ".endr",
    "x87_out",
    ".size state512, . - state512",
    // state256: the same with ymm0-15 and no k registers (AVX without AVX-512).
    ".globl state256",
    ".type state256, @function",
    "state256:",
    "x87_keep",
    ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
    "vmovdqu ymm\\i, ymmword ptr [rdi + 32 * \\i]",
    ".endr",
    "x87_in",
    ".globl state256_point",
    "state256_point:",
    "nop dword ptr [rax + rax]",
    "nop dword ptr [rax + rax]",
    "fnstsw word ptr [rsi + 2122]",
    ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
    "vmovdqu ymmword ptr [rsi + 32 * \\i], ymm\\i",
    ".endr",
    "x87_out",
    ".size state256, . - state256",
    ".popsection",
);

std::arch::global_asm!(
    ".pushsection .text.mid_state_tests, \"ax\", @progbits",
    // clean_state(in = rdi, out = rsi, area = rdx, mask = ecx): puts x87, the upper
    // halves and the AVX-512 state in their initial state (xrstor of the zeroed header
    // at `area` for the components of `mask`), loads xmm0-15 from `in` (legacy loads:
    // bits 128 on untouched), reaches the probe point; then stores xmm0-15 at 0,
    // zmm16-31 at 1024 and k0-7 at 2048 (those `mask` has), XCR0 & XINUSE at 2176, the
    // x87 status and control words at 2180 and 2182, and MXCSR at 2188 (2184: before
    // the probe point), to `out`.
    ".globl clean_state",
    ".type clean_state, @function",
    "clean_state:",
    "mov r8d, ecx",
    "mov eax, ecx",
    "xor ecx, ecx",
    "mov r9, rdx",
    "xor edx, edx",
    "stmxcsr dword ptr [r9 + 24]", // xrstor loads MXCSR from the area when AVX is asked for: the current one
    "xrstor64 [r9]",
    "vzeroupper",
    ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
    "movups xmm\\i, xmmword ptr [rdi + 16 * \\i]",
    ".endr",
    "stmxcsr dword ptr [rsi + 2184]",
    ".globl clean_state_point",
    "clean_state_point:",
    "nop dword ptr [rax + rax]",
    "nop dword ptr [rax + rax]",
    ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
    "movups xmmword ptr [rsi + 16 * \\i], xmm\\i",
    ".endr",
    "mov ecx, 1",
    "xgetbv",
    "mov dword ptr [rsi + 2176], eax",
    "fnstsw word ptr [rsi + 2180]",
    "fnstcw word ptr [rsi + 2182]",
    "stmxcsr dword ptr [rsi + 2188]",
    "test r8d, 0x80",
    "jz 2f",
    ".irp i, 16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    "vmovdqu64 zmmword ptr [rsi + 64 * \\i], zmm\\i",
    ".endr",
    "2:",
    "test r8d, 0x20",
    "jz 3f",
    ".irp i, 0,1,2,3,4,5,6,7",
    "kmovq qword ptr [rsi + 2048 + 8 * \\i], k\\i",
    ".endr",
    "3:",
    "ret",
    ".size clean_state, . - clean_state",
    ".popsection",
);

extern "C" {
    fn state512(input: *const State, out: *mut State, x87: u32, area: *mut u8);
    fn state256(input: *const State, out: *mut State, x87: u32, area: *mut u8);
    fn clean_state(input: *const u8, out: *mut u8, area: *mut u8, mask: u32);
    // The probe points: labels inside the functions above.
    fn state512_point();
    fn state256_point();
    fn clean_state_point();
}

/// A probe on the instruction at `point` inside the function `symbol`, optimized.
fn probe_at(symbol: &str, function: usize, point: usize, pre: impl Fn(&PtRegs) + Send + Sync + 'static) -> ProbeHandle {
    let p = Probe::builder().symbol(symbol).offset(point - function).optimize(Optimize::Required).pre(pre).register().unwrap();
    assert!(p.is_optimized());
    assert_eq!(p.address(), point);
    p
}

/// One test at a time: each arms probes the others' functions must not meet.
static SERIAL: Mutex<()> = Mutex::new(());

/// An `xsave` area: 64-aligned, its header zero (XSTATE_BV = 0: an `xrstor` of it puts
/// the components it is asked for in their initial state).
#[repr(C, align(64))]
struct Area([u8; 4096]);

fn input() -> State {
    State {
        vec: std::array::from_fn(|r| std::array::from_fn(|i| (r as u8).wrapping_mul(31).wrapping_add((i as u8).wrapping_mul(7)) | 1)),
        k: std::array::from_fn(|i| 0x0123_4567_89ab_cdef_u64.rotate_left(8 * i as u32)),
        st0: std::f64::consts::E,
        fcw: 0x067f,   // round down (bits 10-11 = 01), every exception masked
        mxcsr: 0x3fa1, // round down (bits 13-14 = 01), every exception masked, PE and IE raised
        fsw: 0,
        fsw_before: 0,
        _pad: 0,
        _pad2: 0,
    }
}

#[test]
fn a_probe_inside_a_function_keeps_every_register_of_every_width() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    if !std::arch::is_x86_feature_detected!("avx") {
        eprintln!("skipped: no AVX");
        return;
    }
    let (f, symbol, point): (unsafe extern "C" fn(*const State, *mut State, u32, *mut u8), _, unsafe extern "C" fn()) = match avx512() {
        true => (state512, "state512", state512_point),
        false => (state256, "state256", state256_point),
    };
    let mut area = Box::new(Area([0; 4096]));
    // x87: 1, a value on the stack (fxsave keeps it with the legacy region); 2, in use
    // with the stack empty (as in any thread after a signal: its words kept); 0, in its
    // initial state.
    for x87 in [1, 2, 0] {
        let mut want = input();
        if !avx512() {
            want.k = [0; 8];
            want.vec[16..].iter_mut().for_each(|v| *v = [0; 64]);
            want.vec[..16].iter_mut().for_each(|v| v[32..].fill(0));
        }
        match x87 {
            0 => (want.st0, want.fcw) = (0.0, 0x037f),
            2 => want.st0 = 0.0,
            _ => {}
        }
        let given = want.clone();
        let mut run = || {
            let mut out = input();
            out.vec = [[0; 64]; 32];
            out.k = [0; 8];
            (out.st0, out.fcw, out.fsw, out.fsw_before, out.mxcsr) = (0.0, 0, 0, 0, 0);
            // SAFETY: both point to a State, the area is 64-aligned with a zeroed header;
            // the function restores the caller's FCW and MXCSR and leaves the x87 stack empty.
            unsafe { f(&given, &mut out, x87, area.0.as_mut_ptr()) };
            out
        };
        let unprobed = run();
        (want.fsw, want.fsw_before) = (unprobed.fsw_before, unprobed.fsw_before);
        assert_eq!(unprobed, want, "unprobed (x87 {x87})");
        let seen = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let s = seen.clone();
        let p = probe_at(symbol, f as usize, point as usize, move |regs: &PtRegs| {
            s.store(regs.rip, std::sync::atomic::Ordering::Relaxed);
            clobber_everything();
        });
        let got = run();
        assert_eq!(p.nhit(), 1);
        assert_eq!(seen.load(std::sync::atomic::Ordering::Relaxed), p.address() as u64, "the handler ran at the probe");
        for (i, (g, w)) in got.vec.iter().zip(&want.vec).enumerate() {
            assert_eq!(g, w, "vector register {i} (x87 {x87})");
        }
        assert_eq!(got.k, want.k, "k0-k7 (x87 {x87})");
        assert_eq!(got.st0.to_bits(), want.st0.to_bits(), "the x87 value (x87 {x87})");
        assert_eq!(got.fcw, want.fcw, "the x87 control word (x87 {x87})");
        assert_eq!(got.fsw, got.fsw_before, "the x87 status word (x87 {x87})");
        assert_eq!(got.mxcsr, want.mxcsr, "MXCSR, exception flags included (x87 {x87})");
    }
}

#[test]
fn state_in_its_initial_state_at_the_probe_is_in_it_after() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    if !std::arch::is_x86_feature_detected!("avx") || std::arch::x86_64::__cpuid_count(0xd, 1).eax & 4 == 0 {
        eprintln!("skipped: no AVX, or no xgetbv with ecx = 1");
        return;
    }
    let mut area = Box::new(Area([0; 4096]));
    // x87, AVX, opmask, ZMM_Hi256, Hi16_ZMM: those XCR0 enables.
    let mask = (xcr0() & 0xe5) as u32;
    let xmm: [u8; 256] = std::array::from_fn(|i| (i as u8).wrapping_mul(13) | 1);
    let mut run = || {
        let mut out = [0xffu8; 2240];
        // SAFETY: `xmm` is 256 bytes, `out` 2240 (xmm at 0, zmm16-31 at 1024, k at 2048,
        // the in-use word at 2176), the area 64-aligned with a zeroed header.
        unsafe { clean_state(xmm.as_ptr(), out.as_mut_ptr(), area.0.as_mut_ptr(), mask) };
        out
    };
    let check = |out: &[u8; 2240], what: &str| {
        assert_eq!(out[..256], xmm, "{what}: xmm0-15");
        let in_use = u32::from_ne_bytes(out[2176..2180].try_into().unwrap());
        assert_eq!(in_use & 0x44, 0, "{what}: upper halves left in use after the probe point ({in_use:#x})");
        assert_eq!(out[2180..2184], [0, 0, 0x7f, 0x03], "{what}: the x87 status and control words");
        assert_eq!(out[2188..2192], out[2184..2188], "{what}: MXCSR");
        if mask & 0x80 != 0 {
            assert!(out[1024..2048].iter().all(|b| *b == 0), "{what}: zmm16-31 not zero");
        }
        if mask & 0x20 != 0 {
            assert!(out[2048..2112].iter().all(|b| *b == 0), "{what}: k0-7 not zero");
        }
    };
    check(&run(), "unprobed");
    let p = probe_at("clean_state", clean_state as *const () as usize, clean_state_point as *const () as usize, |_: &PtRegs| clobber_everything());
    check(&run(), "probed");
    assert_eq!(p.nhit(), 1);
}
