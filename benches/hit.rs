//! Cost of one probe hit per mechanism, beside its floor (ids are stable: compare runs).
//!
//! - `hit/direct_call`: the probed function called plainly.
//! - `hit/int3_floor`: the same work behind a raw breakpoint (`int3`; aarch64 `brk`)
//!   whose SIGTRAP handler only steps over it: the floor of any trap-based probe.
//! - `hit/breakpoint`: a probekit probe with an empty pre handler (boosted: one trap),
//!   optimization off.
//! - `hit/optimized`: the same probe optimized (the default where it can be): a jump to
//!   a detour that calls the generated trampoline, no trap; at a plain function's entry
//!   (a leaf of legacy code: x86_64 keeps the argument registers' low halves there).
//! - `hit/opt_handing_on` (x86_64): the same at the entry of a function that may hand a
//!   vector argument on (a tail call): the argument registers whole.
//! - `hit/opt_mid`: an optimized probe on an instruction inside a function of legacy
//!   code (no VEX or EVEX instruction, as code built for baseline x86_64): x86_64 keeps
//!   xmm0-15, MXCSR and the argument registers' upper halves there, all that such code
//!   can read.
//! - `hit/opt_mid_avx` (x86_64): the same inside a function with AVX code, where the
//!   trampoline keeps all of the vector state in use.
//! - `hit/vector_state_floor`: the whole FP/SIMD state saved and restored once with
//!   the CPU's own instructions, as `opt_mid_avx`'s trampoline does where the CPU cannot
//!   tell which state is in use (x86_64 `xsavec64` + `xrstor64` of every component the
//!   OS enabled, or `xsave64` without XSAVEC; aarch64 q0-q31, FPCR and FPSR).
//! - `hit/vector_moves_floor` (x86_64): the floor of any probe inside a function whose
//!   handler may use vector registers, where the CPU tells which state is in use
//!   (`xgetbv` with `ecx = 1`): that question, and the moves of what is in use out and
//!   back (xmm0-15 and MXCSR always; the ymm and zmm upper halves, zmm16-31 and k0-7
//!   where in use; of x87 state in use, its status and control words, read and
//!   compared), as `opt_mid_avx`'s trampoline does there.
//! - `hit/in_use_query` (x86_64): `xgetbv` with `ecx = 1` alone, the question of which
//!   state is in use that `opt_mid_avx` asks once a hit, and `opt_handing_on`,
//!   `opt_mid` and the return trampolines on Intel's AVX-512 CPUs (its cost varies most
//!   between CPUs; elsewhere they test the upper halves for zero instead).
//! - `hit/opt_return`: a return probe with empty handlers whose entry is optimized.
//! - `hit/breakpoint_post`: pre and post handlers (two traps).
//! - `hit/return`: a return probe with empty handlers: the entry breakpoint, then the
//!   return through the stub and the generated trampoline.
//! - `hit/return_trampoline`: the return part alone: the entry hook is called
//!   directly (as a patched site will call it, no trap), then the function returns
//!   through the stub and the trampoline.
//! - `hit/site`: a `#[traceable]` function whose site is enabled, empty pre handler: a
//!   call of the generated site trampoline, no trap.
//! - `hit/site_disabled`: the same function with its site a nop.
//! - `hit/site_stub_floor`: the floor of any site probe: a function whose entry calls
//!   a minimal stub that saves the caller-saved general registers and calls an empty
//!   function (at a function entry the flags and callee-saved registers need nothing).
//!   The function and the stub each start a 64-byte line: the floor does not move
//!   with the layout of the build (it did, by up to 0.6 ns, at 16 bytes). That is
//!   its best layout; the generated trampolines are 16-byte aligned (64 measured the
//!   same for them).
//! - `hit/site_frame_floor`: the floor of a site probe that gives its handler the whole
//!   `PtRegs` frame: a stub called like `hit/site_stub_floor`'s that saves the frame as
//!   the generated site trampoline does (without FP/SIMD state), and does inline the
//!   least a probe's hit path must: a thread-local reentrancy flag tested, set and
//!   cleared, a per-thread hit counter, a direct call of an empty handler with the
//!   frame, the check that the handler left pc at the site. Hand-written, with no
//!   record lookup: what no site path can beat (the generated trampoline calls a
//!   dispatcher, which finds the site's record and its handler at run time).
//! - `hit/site_return`: a return probe on a site: entry and return, no trap at all.
//! - `hit/hijack_floor`: the floor of any return probe that hijacks the return address
//!   (kretprobes, uretprobes, Frida's `onLeave`, probekit's): a function that replaces
//!   its own return address with a stub's, the stub jumping to the real one. Its `ret`
//!   goes where the return-stack buffer did not predict; nothing is saved or called.
//!
//! `int3_floor` runs first, with its own SIGTRAP handler, before probekit installs its.

use criterion::{criterion_group, criterion_main, Criterion};
use probekit::{Optimize, Probe, PtRegs, ReturnProbe, ReturnProbeHandle};
use std::hint::black_box;

#[inline(never)]
#[no_mangle]
extern "C" fn hit_target(x: u64) -> u64 {
    x.wrapping_add(1)
}

#[inline(never)]
#[no_mangle]
extern "C" fn hit_target_post(x: u64) -> u64 {
    x.wrapping_add(1)
}

// The floor: a breakpoint, then the same work as hit_target.
#[cfg(target_arch = "x86_64")]
std::arch::global_asm!(".globl hit_int3", "hit_int3:", "int3", "lea rax, [rdi + 1]", "ret");
#[cfg(target_arch = "aarch64")]
std::arch::global_asm!(".globl hit_int3", "hit_int3:", "brk #1", "add x0, x0, #1", "ret");
extern "C" {
    fn hit_int3(x: u64) -> u64;
}

// Targets of optimized probes: a plain entry whose first instructions can take the
// 5-byte jump (x86_64), and the same work with the probe inside the function (at
// `hit_opt_mid_at`). Sized symbols: x86_64 optimization decodes the whole function.
#[cfg(target_arch = "x86_64")]
std::arch::global_asm!(
    ".globl hit_opt",
    ".type hit_opt, @function",
    "hit_opt:",
    "mov rax, rdi",
    "add rax, 1",
    "ret",
    ".size hit_opt, . - hit_opt",
    ".globl hit_opt_return",
    ".type hit_opt_return, @function",
    "hit_opt_return:",
    "mov rax, rdi",
    "add rax, 1",
    "ret",
    ".size hit_opt_return, . - hit_opt_return",
    ".globl hit_opt_mid",
    ".globl hit_opt_mid_at",
    ".type hit_opt_mid, @function",
    "hit_opt_mid:",
    "mov rax, rdi",
    "hit_opt_mid_at:",
    "add rax, 2",
    "sub rax, 1",
    "ret",
    ".size hit_opt_mid, . - hit_opt_mid",
    // The same in a function with AVX code (never run here: after its `ret`), whose
    // vector state at the probe may be anything: the trampoline keeps all in use.
    // hit_opt's work, then a tail call (of a plain `ret`).
    ".globl hit_opt_handing_on",
    ".type hit_opt_handing_on, @function",
    "hit_opt_handing_on:",
    "mov rax, rdi",
    "add rax, 1",
    "jmp hit_opt_handed",
    ".size hit_opt_handing_on, . - hit_opt_handing_on",
    ".type hit_opt_handed, @function",
    "hit_opt_handed:",
    "ret",
    ".size hit_opt_handed, . - hit_opt_handed",
    ".globl hit_opt_mid_avx",
    ".globl hit_opt_mid_avx_at",
    ".type hit_opt_mid_avx, @function",
    "hit_opt_mid_avx:",
    "mov rax, rdi",
    "hit_opt_mid_avx_at:",
    "add rax, 2",
    "sub rax, 1",
    "ret",
    "vzeroupper",
    ".size hit_opt_mid_avx, . - hit_opt_mid_avx",
);
#[cfg(target_arch = "x86_64")]
unsafe extern "C" {
    safe fn hit_opt_handing_on(x: u64) -> u64;
    safe fn hit_opt_mid_avx(x: u64) -> u64;
    safe fn hit_opt_mid_avx_at();
}
#[cfg(target_arch = "aarch64")]
std::arch::global_asm!(
    ".globl hit_opt",
    ".type hit_opt, %function",
    "hit_opt:",
    "add x0, x0, #1",
    "ret",
    ".size hit_opt, . - hit_opt",
    ".globl hit_opt_return",
    ".type hit_opt_return, %function",
    "hit_opt_return:",
    "add x0, x0, #1",
    "ret",
    ".size hit_opt_return, . - hit_opt_return",
    ".globl hit_opt_mid",
    ".globl hit_opt_mid_at",
    ".type hit_opt_mid, %function",
    "hit_opt_mid:",
    "mov x2, x0",
    "hit_opt_mid_at:",
    "add x2, x2, #2",
    "sub x0, x2, #1",
    "ret",
    ".size hit_opt_mid, . - hit_opt_mid",
);
// x + 1 each, touching only scratch registers: safe to call.
unsafe extern "C" {
    safe fn hit_opt(x: u64) -> u64;
    safe fn hit_opt_return(x: u64) -> u64;
    safe fn hit_opt_mid(x: u64) -> u64;
    safe fn hit_opt_mid_at();
}

extern "C" fn step_over(_sig: libc::c_int, _info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // x86_64: int3 already advanced the pc. aarch64: brk did not.
    #[cfg(target_arch = "aarch64")]
    // SAFETY: the kernel passes a valid ucontext_t to SA_SIGINFO handlers.
    unsafe {
        (*(_ctx as *mut libc::ucontext_t)).uc_mcontext.pc += 4;
    }
}

fn empty(_r: &PtRegs) {}

fn empty_return(_r: &PtRegs, _: &mut ()) {}

#[probekit::traceable]
fn hit_site(x: u64) -> u64 {
    x.wrapping_add(1)
}

#[probekit::traceable]
fn hit_site_disabled(x: u64) -> u64 {
    x.wrapping_add(1)
}

#[probekit::traceable]
fn hit_site_return(x: u64) -> u64 {
    x.wrapping_add(1)
}

// The floor: `site_floor(x)` calls `site_floor_stub` at its entry, as an enabled site
// calls the trampoline, then does hit_target's work. The stub keeps what a handler
// call may clobber and a function entry still needs: the caller-saved general
// registers (aarch64: and the return address, which the site moved to x9).
#[cfg(target_arch = "x86_64")]
std::arch::global_asm!(
    ".balign 64", // a line of its own: the floor's layout does not drift
    ".globl site_floor",
    "site_floor:",
    "call 4f",
    "lea rax, [rdi + 1]",
    "ret",
    ".balign 64",
    "4:", // site_floor_stub: rsp % 16 == 0 here
    "push rax",
    "push rcx",
    "push rdx",
    "push rsi",
    "push rdi",
    "push r8",
    "push r9",
    "push r10",
    "push r11",
    "sub rsp, 8", // 16-aligned for the call
    "call 5f",
    "add rsp, 8",
    "pop r11",
    "pop r10",
    "pop r9",
    "pop r8",
    "pop rdi",
    "pop rsi",
    "pop rdx",
    "pop rcx",
    "pop rax",
    "ret",
    ".balign 16",
    "5:", // the empty handler
    "ret",
);
#[cfg(target_arch = "aarch64")]
std::arch::global_asm!(
    ".balign 64", // a line of its own: the floor's layout does not drift
    ".globl site_floor",
    "site_floor:",
    "mov x9, x30",
    "bl 4f",
    "add x0, x0, #1",
    "ret",
    ".balign 64",
    "4:", // site_floor_stub: x30 = the site's continuation, x9 = the return address
    "stp x0, x1, [sp, #-176]!",
    "stp x2, x3, [sp, #16]",
    "stp x4, x5, [sp, #32]",
    "stp x6, x7, [sp, #48]",
    "stp x8, x9, [sp, #64]",
    "stp x10, x11, [sp, #80]",
    "stp x12, x13, [sp, #96]",
    "stp x14, x15, [sp, #112]",
    "stp x16, x17, [sp, #128]",
    "stp x18, x30, [sp, #144]",
    "bl 5f",
    "ldp x18, x16, [sp, #144]", // x16 = the continuation
    "ldp x2, x3, [sp, #16]",
    "ldp x4, x5, [sp, #32]",
    "ldp x6, x7, [sp, #48]",
    "ldp x8, x9, [sp, #64]",
    "ldp x10, x11, [sp, #80]",
    "ldp x12, x13, [sp, #96]",
    "ldp x14, x15, [sp, #112]",
    "ldr x17, [sp, #136]",
    "ldp x0, x1, [sp], #176",
    "mov x30, x9", // the return address back where the function expects it
    "br x16",
    ".balign 16",
    "5:", // the empty handler
    "ret",
);
// The hijack floor: `hijack_floor(x)` returns x + 1 through `hijack_stub`, having put
// the real return address in `HIJACK_SAVED` (one thread runs it).
#[cfg(target_arch = "x86_64")]
std::arch::global_asm!(
    ".balign 16",
    ".globl hijack_floor",
    "hijack_floor:",
    "mov rax, [rsp]",
    "mov [rip + {saved}], rax",
    "lea rax, [rip + 6f]",
    "mov [rsp], rax",
    "lea rax, [rdi + 1]",
    "ret",
    "6:", // hijack_stub
    "jmp [rip + {saved}]",
    saved = sym HIJACK_SAVED,
);
#[cfg(target_arch = "aarch64")]
std::arch::global_asm!(
    ".balign 16",
    ".globl hijack_floor",
    "hijack_floor:",
    "adrp x16, {saved}",
    "str x30, [x16, :lo12:{saved}]",
    "adr x30, 6f",
    "add x0, x0, #1",
    "ret",
    "6:", // hijack_stub
    "adrp x16, {saved}",
    "ldr x16, [x16, :lo12:{saved}]",
    "br x16",
    saved = sym HIJACK_SAVED,
);
static mut HIJACK_SAVED: usize = 0;

/// Saves and restores the whole FP/SIMD state once, in a 64-byte aligned area on the
/// stack, as a mid-function trampoline does (see `hit/vector_state_floor`).
#[cfg(target_arch = "x86_64")]
fn vector_state_round_trip(area: &mut VectorArea, compact: bool) {
    let mask = probekit::__private::XSAVE_MASK.load(std::sync::atomic::Ordering::Relaxed);
    let (lo, hi) = (mask as u32, (mask >> 32) as u32);
    let p = area.0.as_mut_ptr();
    // SAFETY: the area is 64-byte aligned and at least CPUID.(EAX=0DH,ECX=0):EBX bytes
    // (checked where it is made), zeroed, so its header is valid for xrstor; the mask is
    // XCR0, which the OS enabled (it is 0 without OSXSAVE, and then nothing is saved).
    unsafe {
        if compact {
            std::arch::asm!("xsavec64 [{p}]", "xrstor64 [{p}]", p = in(reg) p, in("eax") lo, in("edx") hi, options(nostack));
        } else {
            std::arch::asm!("xsave64 [{p}]", "xrstor64 [{p}]", p = in(reg) p, in("eax") lo, in("edx") hi, options(nostack));
        }
    }
}
#[cfg(target_arch = "aarch64")]
fn vector_state_round_trip(area: &mut VectorArea, _compact: bool) {
    let p = area.0.as_mut_ptr();
    // SAFETY: the area holds 32 q registers and FPCR/FPSR (528 bytes); what is loaded
    // back is what was just stored.
    unsafe {
        std::arch::asm!(
            "stp q0, q1, [{p}]", "stp q2, q3, [{p}, #32]", "stp q4, q5, [{p}, #64]", "stp q6, q7, [{p}, #96]",
            "stp q8, q9, [{p}, #128]", "stp q10, q11, [{p}, #160]", "stp q12, q13, [{p}, #192]", "stp q14, q15, [{p}, #224]",
            "stp q16, q17, [{p}, #256]", "stp q18, q19, [{p}, #288]", "stp q20, q21, [{p}, #320]", "stp q22, q23, [{p}, #352]",
            "stp q24, q25, [{p}, #384]", "stp q26, q27, [{p}, #416]", "stp q28, q29, [{p}, #448]", "stp q30, q31, [{p}, #480]",
            "mrs {t}, fpcr", "str {t}, [{p}, #512]", "mrs {t}, fpsr", "str {t}, [{p}, #520]",
            "ldr {t}, [{p}, #512]", "msr fpcr, {t}", "ldr {t}, [{p}, #520]", "msr fpsr, {t}",
            "ldp q0, q1, [{p}]", "ldp q2, q3, [{p}, #32]", "ldp q4, q5, [{p}, #64]", "ldp q6, q7, [{p}, #96]",
            "ldp q8, q9, [{p}, #128]", "ldp q10, q11, [{p}, #160]", "ldp q12, q13, [{p}, #192]", "ldp q14, q15, [{p}, #224]",
            "ldp q16, q17, [{p}, #256]", "ldp q18, q19, [{p}, #288]", "ldp q20, q21, [{p}, #320]", "ldp q22, q23, [{p}, #352]",
            "ldp q24, q25, [{p}, #384]", "ldp q26, q27, [{p}, #416]", "ldp q28, q29, [{p}, #448]", "ldp q30, q31, [{p}, #480]",
            p = in(reg) p, t = out(reg) _, options(nostack),
        );
    }
}

/// Asks which state is in use and moves it out and back, in the standard `xsave`
/// layout of `area`, as probe-codegen's `Fp::FullInUse` does on its move path (see
/// `hit/vector_moves_floor`).
#[cfg(target_arch = "x86_64")]
fn vector_moves_round_trip(area: &mut VectorArea) {
    // SAFETY: writes only `area` (64-aligned, 16 KiB: the offsets reach 2688); every
    // register is put back as it was (vzeroupper, then what was in use reloaded); AVX,
    // and AVX-512 where its state is in use, are there (the caller checks `cpu_support().in_use`).
    unsafe {
        std::arch::asm!(
            "mov ecx, 1", "xgetbv", "mov r8, rax",
            "test r8b, 0x40", "jz 2f",
            ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15", "vextractf64x4 ymmword ptr [rsi + 1152 + 32 * \\i], zmm\\i, 1", ".endr",
            "2:", "test r8b, 0x04", "jz 3f",
            ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15", "vextractf128 xmmword ptr [rsi + 576 + 16 * \\i], ymm\\i, 1", ".endr",
            "3:", "test r8b, 0x20", "jz 4f",
            ".irp i, 0,1,2,3,4,5,6,7", "kmovq qword ptr [rsi + 1088 + 8 * \\i], k\\i", ".endr",
            "4:", "test r8b, 0x80", "jz 5f",
            ".irp i, 16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31", "vmovaps zmmword ptr [rsi + 1664 + 64 * (\\i - 16)], zmm\\i", ".endr",
            "5:", "test r8b, 1", "jz 13f", "fnstsw word ptr [rsi + 2]", "fnstcw word ptr [rsi]",
            "13:", "vstmxcsr dword ptr [rsi + 24]",
            ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15", "vmovaps xmmword ptr [rsi + 160 + 16 * \\i], xmm\\i", ".endr",
            "vzeroupper",
            "test r8b, 1", "jz 14f", "fnstsw ax", "cmp ax, word ptr [rsi + 2]", "fnstcw word ptr [rsi + 464]", "mov ax, word ptr [rsi + 464]", "cmp ax, word ptr [rsi]",
            "14:",
            ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15", "vmovaps xmm\\i, xmmword ptr [rsi + 160 + 16 * \\i]", ".endr",
            "vstmxcsr dword ptr [rsi + 28]", "mov eax, dword ptr [rsi + 24]", "cmp eax, dword ptr [rsi + 28]", "je 6f", "vldmxcsr dword ptr [rsi + 24]",
            "6:", "test r8b, 0x80", "jz 7f",
            ".irp i, 16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31", "vmovaps zmm\\i, zmmword ptr [rsi + 1664 + 64 * (\\i - 16)]", ".endr",
            "7:", "test r8b, 0x20", "jz 8f",
            ".irp i, 0,1,2,3,4,5,6,7", "kmovq k\\i, qword ptr [rsi + 1088 + 8 * \\i]", ".endr",
            "8:", "test r8b, 0x04", "jz 9f",
            ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15", "vinsertf128 ymm\\i, ymm\\i, xmmword ptr [rsi + 576 + 16 * \\i], 1", ".endr",
            "9:", "test r8b, 0x40", "jz 12f",
            ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15", "vinsertf64x4 zmm\\i, zmm\\i, ymmword ptr [rsi + 1152 + 32 * \\i], 1", ".endr",
            "12:",
            // rsi, not `in(reg)`: that could be rax, rcx, rdx or r8, which the asm writes.
            in("rsi") area.0.as_mut_ptr(),
            clobber_abi("C"),
        );
    }
}

/// XCR0 & XINUSE (`xgetbv` with `ecx = 1`): which state is in use (see
/// `hit/in_use_query`).
#[cfg(target_arch = "x86_64")]
fn in_use_query() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the caller checks that `xgetbv` with `ecx = 1` is there (OSXSAVE,
    // CPUID.(EAX=0DH,ECX=1):EAX[2]).
    unsafe { std::arch::asm!("xgetbv", in("ecx") 1, out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    (hi as u64) << 32 | lo as u64
}

/// Room for any `xsave` area this machine asks for (AVX-512: 2.7 KiB; AMX's tile data
/// needs 8 KiB more), 64-byte aligned, zeroed.
#[repr(C, align(64))]
struct VectorArea([u8; 16384]);

// The frame floor: `site_frame_floor(x)` calls its stub at its entry, as an enabled
// site calls the trampoline; the stub saves every field of `PtRegs` as the generated
// site trampoline (no FP/SIMD state) does, with pc the site's address, then, inline:
// the reentrancy flag (a thread-local byte: `active`), the hit counter (a thread-local
// word), a direct call of the empty handler with the frame, the flag cleared, and the
// resume at the site's continuation unless the handler moved pc. Local-exec TLS: the
// bench is an executable.
#[cfg(target_arch = "x86_64")]
std::arch::global_asm!(
    ".pushsection .tbss, \"awT\", @nobits",
    ".balign 8",
    "frame_floor_tls: .zero 16", // active (byte), then the hit counter (word at +8)
    ".popsection",
    ".balign 64",
    ".globl site_frame_floor",
    "site_frame_floor:",
    "call 4f",
    "lea rax, [rdi + 1]",
    "ret",
    ".balign 64",
    "4:", // rsp % 16 == 0 here; the frame goes below the red zone
    "lea rsp, [rsp - {above_flags}]",
    "pushfq",
    "lea rsp, [rsp - {S_EFLAGS}]",
    "mov qword ptr [rsp + {S_R15}], r15",
    "mov qword ptr [rsp + {S_R14}], r14",
    "mov qword ptr [rsp + {S_R13}], r13",
    "mov qword ptr [rsp + {S_R12}], r12",
    "mov qword ptr [rsp + {S_RBP}], rbp",
    "mov qword ptr [rsp + {S_RBX}], rbx",
    "mov qword ptr [rsp + {S_R11}], r11",
    "mov qword ptr [rsp + {S_R10}], r10",
    "mov qword ptr [rsp + {S_R9}], r9",
    "mov qword ptr [rsp + {S_R8}], r8",
    "mov qword ptr [rsp + {S_RAX}], rax",
    "mov qword ptr [rsp + {S_RCX}], rcx",
    "mov qword ptr [rsp + {S_RDX}], rdx",
    "mov qword ptr [rsp + {S_RSI}], rsi",
    "mov qword ptr [rsp + {S_RDI}], rdi",
    "mov qword ptr [rsp + {S_ORIG_RAX}], -1",
    "mov rcx, cs",
    "mov qword ptr [rsp + {S_CS}], rcx",
    "lea rcx, [rsp + {probed_sp}]",
    "mov qword ptr [rsp + {S_RSP}], rcx",
    "mov rcx, ss",
    "mov qword ptr [rsp + {S_SS}], rcx",
    "mov rcx, qword ptr [rsp + {resume}]",
    "lea rcx, [rcx - 5]", // pc: the site
    "mov qword ptr [rsp + {S_RIP}], rcx",
    "cmp byte ptr fs:[frame_floor_tls@tpoff], 0",
    "jne 7f", // a hit inside a handler: nothing runs
    "mov byte ptr fs:[frame_floor_tls@tpoff], 1",
    "inc qword ptr fs:[frame_floor_tls@tpoff + 8]",
    "mov rdi, rsp",
    "xor esi, esi",
    "call 5f",
    "mov byte ptr fs:[frame_floor_tls@tpoff], 0",
    "mov rcx, qword ptr [rsp + {S_RIP}]",
    "lea rcx, [rcx + 5]",
    "cmp rcx, qword ptr [rsp + {resume}]",
    "je 7f",
    "mov qword ptr [rsp + {resume}], rcx", // redirected: resume at pc
    "7:",
    "mov rdi, qword ptr [rsp + {S_RDI}]",
    "mov rsi, qword ptr [rsp + {S_RSI}]",
    "mov rdx, qword ptr [rsp + {S_RDX}]",
    "mov rcx, qword ptr [rsp + {S_RCX}]",
    "mov rax, qword ptr [rsp + {S_RAX}]",
    "mov r8, qword ptr [rsp + {S_R8}]",
    "mov r9, qword ptr [rsp + {S_R9}]",
    "mov r10, qword ptr [rsp + {S_R10}]",
    "mov r11, qword ptr [rsp + {S_R11}]",
    "mov rbx, qword ptr [rsp + {S_RBX}]",
    "mov rbp, qword ptr [rsp + {S_RBP}]",
    "mov r12, qword ptr [rsp + {S_R12}]",
    "mov r13, qword ptr [rsp + {S_R13}]",
    "mov r14, qword ptr [rsp + {S_R14}]",
    "mov r15, qword ptr [rsp + {S_R15}]",
    "lea rsp, [rsp + {resume}]",
    "ret",
    ".balign 16",
    "5:", // the empty handler
    "ret",
    above_flags = const 128 + FRAME_ALLOC - PtRegs::S_EFLAGS - 8,
    resume = const FRAME_ALLOC + 128,
    probed_sp = const FRAME_ALLOC + 128 + 8,
    S_R15 = const PtRegs::S_R15,
    S_R14 = const PtRegs::S_R14,
    S_R13 = const PtRegs::S_R13,
    S_R12 = const PtRegs::S_R12,
    S_RBP = const PtRegs::S_RBP,
    S_RBX = const PtRegs::S_RBX,
    S_R11 = const PtRegs::S_R11,
    S_R10 = const PtRegs::S_R10,
    S_R9 = const PtRegs::S_R9,
    S_R8 = const PtRegs::S_R8,
    S_RAX = const PtRegs::S_RAX,
    S_RCX = const PtRegs::S_RCX,
    S_RDX = const PtRegs::S_RDX,
    S_RSI = const PtRegs::S_RSI,
    S_RDI = const PtRegs::S_RDI,
    S_ORIG_RAX = const PtRegs::S_ORIG_RAX,
    S_CS = const PtRegs::S_CS,
    S_RSP = const PtRegs::S_RSP,
    S_SS = const PtRegs::S_SS,
    S_RIP = const PtRegs::S_RIP,
    S_EFLAGS = const PtRegs::S_EFLAGS,
);
#[cfg(target_arch = "aarch64")]
std::arch::global_asm!(
    ".pushsection .tbss, \"awT\", %nobits",
    ".balign 8",
    "frame_floor_tls: .zero 16", // active (byte), then the hit counter (word at +8)
    ".popsection",
    ".balign 64",
    ".globl site_frame_floor",
    "site_frame_floor:",
    "mov x9, x30",
    "bl 4f",
    "add x0, x0, #1",
    "ret",
    ".balign 64",
    "4:", // x30 = the site's continuation, x9 = the return address
    "sub sp, sp, #{FRAME}",
    "stp x0, x1, [sp, #0]",
    "stp x2, x3, [sp, #16]",
    "stp x4, x5, [sp, #32]",
    "stp x6, x7, [sp, #48]",
    "stp x8, x9, [sp, #64]",
    "stp x10, x11, [sp, #80]",
    "stp x12, x13, [sp, #96]",
    "stp x14, x15, [sp, #112]",
    "stp x16, x17, [sp, #128]",
    "stp x18, x19, [sp, #144]",
    "stp x20, x21, [sp, #160]",
    "stp x22, x23, [sp, #176]",
    "stp x24, x25, [sp, #192]",
    "stp x26, x27, [sp, #208]",
    "stp x28, x29, [sp, #224]",
    "str x9, [sp, #{S_X30}]",
    "mov x19, x30", // the continuation, kept across the handler (x19 is restored from the frame)
    "sub x0, x30, #8", // pc: the site
    "str x0, [sp, #{S_PC}]",
    "add x0, sp, #{FRAME}",
    "str x0, [sp, #{S_SP}]",
    "mrs x0, nzcv",
    "str x0, [sp, #{S_PSTATE}]",
    "mov x16, x19",
    "mrs x20, tpidr_el0",
    "add x20, x20, #:tprel_hi12:frame_floor_tls",
    "add x20, x20, #:tprel_lo12_nc:frame_floor_tls",
    "ldrb w0, [x20]",
    "cbnz w0, 7f", // a hit inside a handler: nothing runs
    "mov w0, #1",
    "strb w0, [x20]",
    "ldr x0, [x20, #8]",
    "add x0, x0, #1",
    "str x0, [x20, #8]",
    "mov x0, sp",
    "mov x1, xzr",
    "bl 5f",
    "strb wzr, [x20]",
    "ldr x16, [sp, #{S_PC}]",
    "add x16, x16, #8",
    "cmp x16, x19",
    "b.eq 7f",
    "sub x16, x16, #8", // redirected: resume at pc
    "7:",
    "ldr x0, [sp, #{S_PSTATE}]",
    "msr nzcv, x0",
    "ldr x30, [sp, #{S_X30}]",
    "ldp x28, x29, [sp, #224]",
    "ldp x26, x27, [sp, #208]",
    "ldp x24, x25, [sp, #192]",
    "ldp x22, x23, [sp, #176]",
    "ldp x20, x21, [sp, #160]",
    "ldp x18, x19, [sp, #144]",
    "ldr x17, [sp, #136]",
    "ldp x14, x15, [sp, #112]",
    "ldp x12, x13, [sp, #96]",
    "ldp x10, x11, [sp, #80]",
    "ldp x8, x9, [sp, #64]",
    "ldp x6, x7, [sp, #48]",
    "ldp x4, x5, [sp, #32]",
    "ldp x2, x3, [sp, #16]",
    "ldp x0, x1, [sp, #0]",
    "add sp, sp, #{FRAME}",
    "ret x16",
    ".balign 16",
    "5:", // the empty handler
    "ret",
    FRAME = const FRAME_ALLOC,
    S_X30 = const PtRegs::S_X30,
    S_PC = const PtRegs::S_PC,
    S_SP = const PtRegs::S_SP,
    S_PSTATE = const PtRegs::S_PSTATE,
);
/// What the frame floor allocates below the red zone (x86_64) or the stack pointer:
/// the frame, 16-aligned (the site's call left the stack 16-aligned).
const FRAME_ALLOC: usize = PtRegs::S_FRAME_SIZE.next_multiple_of(16);

extern "C" {
    fn hijack_floor(x: u64) -> u64;
    fn site_floor(x: u64) -> u64;
    fn site_frame_floor(x: u64) -> u64;
}

#[inline(never)]
#[no_mangle]
extern "C" fn hit_target_return(x: u64) -> u64 {
    x.wrapping_add(1)
}

#[inline(never)]
#[no_mangle]
extern "C" fn hit_target_trampoline(x: u64) -> u64 {
    x.wrapping_add(1)
}

// `hijacked_call(x, target, enter)`: calls `target(x)` through `hijack_thunk`, which
// stands where a patched site's entry trampoline will: entered by a real `call` (so the
// return-stack buffer is as in a real call), it lets `enter(entry sp, return address)`
// replace the return address, as the entry hook does at a watched entry, and jumps to
// the target, whose return then goes through the stub and the trampoline.
#[cfg(target_arch = "x86_64")]
std::arch::global_asm!(
    ".globl hijacked_call",
    "hijacked_call:",
    "sub rsp, 8",
    "call 3f",
    "add rsp, 8",
    "ret",
    "3:", // hijack_thunk: [rsp] = the return address
    "push rdi",
    "push rsi",
    "lea rdi, [rsp + 16]", // sp at the callee's entry
    "mov rsi, [rsp + 16]",
    "sub rsp, 8", // 16-aligned for the call
    "call rdx",
    "add rsp, 8",
    "mov [rsp + 16], rax", // the return address to use
    "pop rsi",
    "pop rdi",
    "jmp rsi",
);
#[cfg(target_arch = "aarch64")]
std::arch::global_asm!(
    ".globl hijacked_call",
    "hijacked_call:",
    "stp x29, x30, [sp, #-16]!",
    "bl 3f",
    "ldp x29, x30, [sp], #16",
    "ret",
    "3:", // hijack_thunk: x30 = the return address
    "stp x0, x1, [sp, #-32]!",
    "str x30, [sp, #16]",
    "add x0, sp, #32", // sp at the callee's entry
    "mov x1, x30",
    "blr x2",
    "mov x30, x0", // the return address to use
    "ldp x0, x1, [sp], #32",
    "br x1",
);
extern "C" {
    fn hijacked_call(x: u64, target: extern "C" fn(u64) -> u64, enter: extern "C" fn(usize, usize) -> usize) -> u64;
}

static TRAMPOLINE_PROBE: std::sync::OnceLock<ReturnProbeHandle> = std::sync::OnceLock::new();

/// The entry hook of `TRAMPOLINE_PROBE` on a frame holding just the entry sp and the
/// return address: returns the return address to use.
extern "C" fn enter(sp: usize, ret: usize) -> usize {
    let mut r = PtRegs::default();
    #[cfg(target_arch = "x86_64")]
    {
        r.rsp = sp as u64; // the hook reads and replaces the word there
                           // SAFETY: sp is the return-address slot hijacked_call's thunk was called with.
        unsafe { TRAMPOLINE_PROBE.get().expect("registered").__enter(&mut r) };
        let _ = ret;
        // SAFETY: sp is the return address slot hijacked_call pushed.
        unsafe { *(sp as *const usize) }
    }
    #[cfg(target_arch = "aarch64")]
    {
        r.sp = sp as u64;
        r.regs[30] = ret as u64;
        // SAFETY: sp and x30 are those the thunk's caller entered it with.
        unsafe { TRAMPOLINE_PROBE.get().expect("registered").__enter(&mut r) };
        r.regs[30] as usize
    }
}

fn hit(c: &mut Criterion) {
    let mut g = c.benchmark_group("hit");
    g.bench_function("direct_call", |b| b.iter(|| black_box(hit_target as extern "C" fn(u64) -> u64)(black_box(1))));

    // SAFETY: a SA_SIGINFO handler of the right signature, installed before probekit's.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = step_over as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGTRAP, &sa, std::ptr::null_mut()), 0);
    }
    // SAFETY: hit_int3 traps, is stepped over by step_over, and returns x + 1.
    g.bench_function("int3_floor", |b| b.iter(|| unsafe { hit_int3(black_box(1)) }));

    let f = hit_target as extern "C" fn(u64) -> u64;
    let p = Probe::builder().function(f).pre(empty).optimize(Optimize::Never).register().expect("probe");
    g.bench_function("breakpoint", |b| b.iter(|| black_box(f)(black_box(1))));
    assert_eq!(p.nmissed(), 0);
    drop(p);

    let f = hit_opt as extern "C" fn(u64) -> u64;
    let p = Probe::builder().function(f).pre(empty).optimize(Optimize::Required).register().expect("optimized probe");
    g.bench_function("optimized", |b| b.iter(|| black_box(f)(black_box(1))));
    assert_eq!(p.nmissed(), 0);
    drop(p);
    #[cfg(target_arch = "x86_64")]
    {
        let f = hit_opt_handing_on as extern "C" fn(u64) -> u64;
        let p = Probe::builder().function(f).pre(empty).optimize(Optimize::Required).register().expect("optimized probe");
        g.bench_function("opt_handing_on", |b| b.iter(|| black_box(f)(black_box(1))));
        assert_eq!(p.nmissed(), 0);
    }

    let f = hit_opt_mid as extern "C" fn(u64) -> u64;
    // SAFETY: hit_opt_mid_at is an instruction of hit_opt_mid, not data.
    let p =
        unsafe { Probe::builder().address(hit_opt_mid_at as *const () as usize) }.pre(empty).optimize(Optimize::Required).register().expect("optimized probe");
    g.bench_function("opt_mid", |b| b.iter(|| black_box(f)(black_box(1))));
    assert_eq!(p.nmissed(), 0);
    drop(p);
    #[cfg(target_arch = "x86_64")]
    {
        let f = hit_opt_mid_avx as extern "C" fn(u64) -> u64;
        // SAFETY: hit_opt_mid_avx_at is an instruction of hit_opt_mid_avx, not data.
        let p = unsafe { Probe::builder().address(hit_opt_mid_avx_at as *const () as usize) }
            .pre(empty)
            .optimize(Optimize::Required)
            .register()
            .expect("optimized probe");
        g.bench_function("opt_mid_avx", |b| b.iter(|| black_box(f)(black_box(1))));
        assert_eq!(p.nmissed(), 0);
    }
    let mut area = Box::new(VectorArea([0; 16384]));
    #[cfg(target_arch = "x86_64")]
    let compact = {
        assert!(std::arch::x86_64::__cpuid_count(0xd, 0).ebx as usize <= area.0.len(), "the xsave area fits");
        probekit::cpu_support().xsavec
    };
    #[cfg(target_arch = "aarch64")]
    let compact = false;
    g.bench_function("vector_state_floor", |b| b.iter(|| vector_state_round_trip(black_box(&mut area), compact)));
    #[cfg(target_arch = "x86_64")]
    if probekit::cpu_support().in_use {
        g.bench_function("vector_moves_floor", |b| b.iter(|| vector_moves_round_trip(black_box(&mut area))));
    }
    #[cfg(target_arch = "x86_64")]
    if probekit::cpu_support().xsave && std::arch::x86_64::__cpuid_count(0xd, 1).eax & 4 != 0 {
        g.bench_function("in_use_query", |b| b.iter(|| black_box(in_use_query())));
    }

    let f = hit_opt_return as extern "C" fn(u64) -> u64;
    let p = ReturnProbe::builder().function(f).optimize(Optimize::Required).handler(empty_return).register().expect("optimized return probe");
    g.bench_function("opt_return", |b| b.iter(|| black_box(f)(black_box(1))));
    assert_eq!(p.nmissed(), 0);
    drop(p);

    let f = hit_target_post as extern "C" fn(u64) -> u64;
    let p = Probe::builder().function(f).pre(empty).post(empty).register().expect("probe");
    g.bench_function("breakpoint_post", |b| b.iter(|| black_box(f)(black_box(1))));
    drop(p);

    let f = hit_target_return as extern "C" fn(u64) -> u64;
    let p = ReturnProbe::builder().function(f).optimize(Optimize::Never).handler(empty_return).register().expect("return probe");
    g.bench_function("return", |b| b.iter(|| black_box(f)(black_box(1))));
    assert_eq!(p.nmissed(), 0);
    drop(p);

    // The entry breakpoint is disarmed: `enter` does its work, without a trap.
    let f = hit_target_trampoline as extern "C" fn(u64) -> u64;
    let p =
        TRAMPOLINE_PROBE.get_or_init(|| ReturnProbe::builder().function(f).optimize(Optimize::Never).handler(empty_return).register().expect("return probe"));
    p.disable().expect("disarm the entry breakpoint");
    // SAFETY: hijacked_call calls f(1) with a return address `enter` gave.
    g.bench_function("return_trampoline", |b| b.iter(|| unsafe { hijacked_call(black_box(1), f, enter) }));
    assert_eq!(p.nmissed(), 0);

    g.bench_function("site_disabled", |b| b.iter(|| black_box(hit_site_disabled as fn(u64) -> u64)(black_box(1))));
    // SAFETY: site_floor calls its stub, which preserves what it must, and returns x + 1.
    g.bench_function("site_stub_floor", |b| b.iter(|| unsafe { site_floor(black_box(1)) }));
    // SAFETY: site_frame_floor calls its stub, which restores every register the frame
    // holds, and returns x + 1.
    assert_eq!(unsafe { site_frame_floor(41) }, 42, "the frame floor resumes into its function");
    // SAFETY: as above.
    g.bench_function("site_frame_floor", |b| b.iter(|| unsafe { site_frame_floor(black_box(1)) }));
    let f = hit_site as fn(u64) -> u64;
    let p = Probe::builder().function(f).pre(empty).register().expect("site probe");
    assert!(probekit::list().0.iter().any(|i| i.addr == p.address() && i.site), "the probe rides the site");
    g.bench_function("site", |b| b.iter(|| black_box(f)(black_box(1))));
    assert_eq!(p.nmissed(), 0);
    drop(p);
    let f = hit_site_return as fn(u64) -> u64;
    let p = ReturnProbe::builder().function(f).handler(empty_return).register().expect("return probe on a site");
    g.bench_function("site_return", |b| b.iter(|| black_box(f)(black_box(1))));
    // SAFETY: hijack_floor returns x + 1 to its caller, through its stub; this thread
    // alone runs it.
    g.bench_function("hijack_floor", |b| b.iter(|| unsafe { hijack_floor(black_box(1)) }));
    assert_eq!(p.nmissed(), 0);
    drop(p);
    g.finish();
}

criterion_group!(benches, hit);
criterion_main!(benches);
