//! The differential fuzzer of issue 13: functions of random instructions, run unprobed
//! and then probed at every instruction boundary, as a breakpoint
//! ([`Optimize::Never`]) and jump-optimized ([`Optimize::Required`], where the address
//! allows it; a refusal is counted by its reason), each with an empty pre handler and
//! with one that only reads the registers (and does float math, which uses the vector
//! registers and MXCSR/FPSR). Every probed run must end with the unprobed run's
//! general registers, flags, FP/SIMD registers and control/status registers, and the
//! memory the function touches (a scratch buffer, a data page it reaches
//! pc-relatively, the x86_64 red zone); every probe must hit as often as its
//! instruction ran (both mechanisms alike); the two mechanisms' handlers must see the
//! same registers. A third handler (`pre_mut`) changes a register the probed
//! instruction does not use and the status flags: breakpoint and detour must then end
//! alike, with the same hits.
//!
//! The generated functions (x86_64 through iced-x86's encoder, aarch64 from
//! encodings) hold ALU operations, moves, loads and stores on a scratch buffer through
//! a base register, pc-relative loads, stores and address computations (data and
//! code), forward short and near branches, calls of a local helper (direct, through a
//! register, x86_64 through memory), push/pop pairs, the x86_64 red zone, and FP/SIMD
//! operations; they run in a page written while read-write and then made read+execute
//! (never both), declared with [`probe_rt::jit::declare`] so that probekit knows the
//! function's bounds. An asm harness loads every register from a state struct, calls
//! the function and stores them all back.
//!
//! Fixed seed by default (a few seconds natively, about ten under qemu-aarch64). The
//! long run, with its summary:
//! `PROBEKIT_FUZZ_CASES=6000 PROBEKIT_FUZZ_SEED=1234 cargo test --release -p probe-rt
//! --test opt_fuzz -- --nocapture` (`PROBEKIT_FUZZ_ONLY=<case>` runs one case of a
//! seed). Each case replaces the last one's code, and every optimized address of
//! replaced code keeps its detour block (probe-rt's `optprobe::block`): about 10 KB
//! a case. Under qemu-aarch64 run several seeds of ~60 cases instead (about ten
//! seconds each).
//!
//! Where the ABI lets a probe differ from the unprobed run, the comparison says so:
//! an optimized probe at an x86_64 function's entry keeps only the vector argument
//! registers (xmm0-xmm7) and the MXCSR control bits, as a call would (System V AMD64
//! ABI 1.0, §3.2.1: xmm8-15 and the MXCSR status bits are not preserved across calls;
//! probe-rt's build.rs, `Fp::Args`). The status bits do differ there (the reading
//! handler's float math sets the precision flag); nothing else may. So that the
//! registers it may change there cannot reach what is compared, every x86_64 function
//! defines xmm8-15 before reading them, as a compiled one does.

use probe_rt::{jit, Error, Optimize, Probe, PtRegs};
use std::collections::BTreeMap;
use std::mem::offset_of;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Bytes of the scratch buffer the generated code reads and writes through its base
/// register (x86_64 r15, aarch64 x28).
const SCRATCH: usize = 256;
/// Bytes at the start of the data page (right after the code page) that pc-relative
/// loads and stores reach.
const DATA: usize = 256;
/// The generated function's name, for probekit.
const NAME: &str = "probekit_fuzz_case";

/// A small xorshift64* generator: the same numbers for a seed on every machine.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// A number in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<T: Copy>(&mut self, s: &[T]) -> T {
        s[self.below(s.len() as u64) as usize]
    }
    /// True `percent` times in 100.
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    /// A value that is often interesting: small, all ones, a sign bit, or random.
    fn value(&mut self) -> u64 {
        match self.below(8) {
            0 => self.below(16),
            1 => u64::MAX - self.below(4),
            2 => 1 << self.below(64),
            3 => (self.next() as i32) as i64 as u64,
            _ => self.next(),
        }
    }
}

/// Every register the harness loads and stores. x86_64: `gpr` in encoding order (rax,
/// rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8..r15; the rsp slot unused), `flags` rflags,
/// `fpcr` MXCSR, `vec` xmm0-15, `redzone` the 14 words below the function's stack
/// pointer (`[rsp - 8]` first; the 128-byte red zone but the two words a signal that
/// arrives in the harness, right after the call returns, could overwrite). aarch64:
/// x0..x30, NZCV, FPCR, FPSR, v0-v31.
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Machine {
    gpr: [u64; 32],
    flags: u64,
    fpcr: u64,
    fpsr: u64,
    _pad: u64,
    vec: [[u64; 2]; 32],
    redzone: [u64; REDZONE],
    _pad2: [u64; 2],
}

const REDZONE: usize = 14;

/// What the harness reads (`inp`, and the function at `target`) and writes (`out`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Ctx {
    inp: Machine,
    out: Machine,
    target: u64,
}

// The harness: `fuzz_run(ctx)`, as tests/native/tests/clobber.rs's: the host's
// callee-saved registers on its own stack, `ctx` and the target in the two words the
// call is made above (`call [rsp]`), the red zone the function will see (below the
// return address the call pushes) filled from `inp.redzone`, MXCSR, the xmm
// registers, the flags and every general register but rsp loaded; after the call the
// flags are saved first (pushfq), then `ctx` swapped into rdi (no register is free).
//
// ```text
// rsp + 16  ctx                rsp - 8            the return address (the call)
// rsp + 8   (alignment)        rsp - 16 - 8k      red zone word k (k < 14): [rsp' - 8 - 8k]
// rsp       the target                            for the function's rsp' = rsp - 8
// ```
#[cfg(target_arch = "x86_64")]
std::arch::global_asm!(
    ".pushsection .text.fuzz_run, \"ax\", @progbits",
    ".balign 16",
    ".globl fuzz_run",
    ".hidden fuzz_run",
    ".type fuzz_run, @function",
    "fuzz_run:",
    "push rbp",
    "push rbx",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "push rdi",                            // [rsp + 8] = ctx (then 8 bytes of alignment)
    "sub rsp, 8",
    "push qword ptr [rdi + {target}]",     // [rsp] = the target; rsp is 16-aligned
    ".irp k, 0,1,2,3,4,5,6,7,8,9,10,11,12,13",
    "mov rax, qword ptr [rdi + {in_rz} + 8 * \\k]",
    "mov qword ptr [rsp - 16 - 8 * \\k], rax",
    ".endr",
    "ldmxcsr dword ptr [rdi + {in_fpcr}]",
    ".irp k, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
    "movdqu xmm\\k, xmmword ptr [rdi + {in_vec} + 16 * \\k]",
    ".endr",
    "push qword ptr [rdi + {in_flags}]",
    "popfq",
    "mov rax, qword ptr [rdi + {in_gpr} + 0]",
    "mov rcx, qword ptr [rdi + {in_gpr} + 8]",
    "mov rdx, qword ptr [rdi + {in_gpr} + 16]",
    "mov rbx, qword ptr [rdi + {in_gpr} + 24]",
    "mov rbp, qword ptr [rdi + {in_gpr} + 40]",
    "mov rsi, qword ptr [rdi + {in_gpr} + 48]",
    "mov r8, qword ptr [rdi + {in_gpr} + 64]",
    "mov r9, qword ptr [rdi + {in_gpr} + 72]",
    "mov r10, qword ptr [rdi + {in_gpr} + 80]",
    "mov r11, qword ptr [rdi + {in_gpr} + 88]",
    "mov r12, qword ptr [rdi + {in_gpr} + 96]",
    "mov r13, qword ptr [rdi + {in_gpr} + 104]",
    "mov r14, qword ptr [rdi + {in_gpr} + 112]",
    "mov r15, qword ptr [rdi + {in_gpr} + 120]",
    "mov rdi, qword ptr [rdi + {in_gpr} + 56]",
    "call qword ptr [rsp]",
    "pushfq",                              // [rsp] = flags, [rsp + 24] = ctx
    "xchg rdi, qword ptr [rsp + 24]",      // xchg: flags untouched
    "mov qword ptr [rdi + {out_gpr} + 0], rax",
    "mov qword ptr [rdi + {out_gpr} + 8], rcx",
    "mov qword ptr [rdi + {out_gpr} + 16], rdx",
    "mov qword ptr [rdi + {out_gpr} + 24], rbx",
    "mov qword ptr [rdi + {out_gpr} + 40], rbp",
    "mov qword ptr [rdi + {out_gpr} + 48], rsi",
    "mov qword ptr [rdi + {out_gpr} + 64], r8",
    "mov qword ptr [rdi + {out_gpr} + 72], r9",
    "mov qword ptr [rdi + {out_gpr} + 80], r10",
    "mov qword ptr [rdi + {out_gpr} + 88], r11",
    "mov qword ptr [rdi + {out_gpr} + 96], r12",
    "mov qword ptr [rdi + {out_gpr} + 104], r13",
    "mov qword ptr [rdi + {out_gpr} + 112], r14",
    "mov qword ptr [rdi + {out_gpr} + 120], r15",
    "mov rax, qword ptr [rsp + 24]",       // rdi after the call
    "mov qword ptr [rdi + {out_gpr} + 56], rax",
    "pop rax",
    "mov qword ptr [rdi + {out_flags}], rax",
    "stmxcsr dword ptr [rdi + {out_fpcr}]",
    ".irp k, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
    "movdqu xmmword ptr [rdi + {out_vec} + 16 * \\k], xmm\\k",
    ".endr",
    ".irp k, 0,1,2,3,4,5,6,7,8,9,10,11,12,13",
    "mov rax, qword ptr [rsp - 16 - 8 * \\k]",
    "mov qword ptr [rdi + {out_rz} + 8 * \\k], rax",
    ".endr",
    "mov dword ptr [rsp - 8], 0x1f80",     // the host's MXCSR back (Rust's default)
    "ldmxcsr dword ptr [rsp - 8]",
    "cld",
    "add rsp, 24",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbx",
    "pop rbp",
    "ret",
    ".size fuzz_run, . - fuzz_run",
    ".popsection",
    target = const offset_of!(Ctx, target),
    in_gpr = const offset_of!(Ctx, inp) + offset_of!(Machine, gpr),
    in_flags = const offset_of!(Ctx, inp) + offset_of!(Machine, flags),
    in_fpcr = const offset_of!(Ctx, inp) + offset_of!(Machine, fpcr),
    in_vec = const offset_of!(Ctx, inp) + offset_of!(Machine, vec),
    in_rz = const offset_of!(Ctx, inp) + offset_of!(Machine, redzone),
    out_gpr = const offset_of!(Ctx, out) + offset_of!(Machine, gpr),
    out_flags = const offset_of!(Ctx, out) + offset_of!(Machine, flags),
    out_fpcr = const offset_of!(Ctx, out) + offset_of!(Machine, fpcr),
    out_vec = const offset_of!(Ctx, out) + offset_of!(Machine, vec),
    out_rz = const offset_of!(Ctx, out) + offset_of!(Machine, redzone),
);

// The harness: `fuzz_run(ctx)`. Its frame (176 bytes) holds the host's x19..x30 and
// d8..d15 (AAPCS64 2023Q3 §6.1.2: the low halves of v8-v15 are callee-saved), its
// FPCR, `ctx` at [sp + 160] and the target at [sp + 168]; the vector registers,
// FPCR, FPSR and NZCV are loaded through x1, the general registers through x30, which
// then carries the target (`blr` overwrites it anyway). After the call x0 goes to the
// target's word, which frees x0 for `ctx`.
#[cfg(target_arch = "aarch64")]
std::arch::global_asm!(
    ".pushsection .text.fuzz_run, \"ax\", %progbits",
    ".balign 16",
    ".globl fuzz_run",
    ".hidden fuzz_run",
    ".type fuzz_run, %function",
    "fuzz_run:",
    "stp x29, x30, [sp, #-176]!",
    "stp x19, x20, [sp, #16]",
    "stp x21, x22, [sp, #32]",
    "stp x23, x24, [sp, #48]",
    "stp x25, x26, [sp, #64]",
    "stp x27, x28, [sp, #80]",
    "stp d8, d9, [sp, #96]",
    "stp d10, d11, [sp, #112]",
    "stp d12, d13, [sp, #128]",
    "stp d14, d15, [sp, #144]",
    "ldr x1, [x0, #{target}]",
    "stp x0, x1, [sp, #160]",
    "add x1, x0, #{in_vec}",
    ".irp k, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    "ldr q\\k, [x1, #16 * \\k]",
    ".endr",
    "ldr x1, [x0, #{in_fpcr}]",
    "msr fpcr, x1",
    "ldr x1, [x0, #{in_fpsr}]",
    "msr fpsr, x1",
    "ldr x1, [x0, #{in_flags}]",
    "msr nzcv, x1",
    "add x30, x0, #{in_gpr}",
    "ldp x1, x2, [x30, #8]",
    "ldp x3, x4, [x30, #24]",
    "ldp x5, x6, [x30, #40]",
    "ldp x7, x8, [x30, #56]",
    "ldp x9, x10, [x30, #72]",
    "ldp x11, x12, [x30, #88]",
    "ldp x13, x14, [x30, #104]",
    "ldp x15, x16, [x30, #120]",
    "ldp x17, x18, [x30, #136]",
    "ldp x19, x20, [x30, #152]",
    "ldp x21, x22, [x30, #168]",
    "ldp x23, x24, [x30, #184]",
    "ldp x25, x26, [x30, #200]",
    "ldp x27, x28, [x30, #216]",
    "ldr x29, [x30, #232]",
    "ldr x0, [x30, #0]",
    "ldr x30, [sp, #168]",
    "blr x30",
    // Loads, stores, add and mrs: nothing below changes NZCV or FPSR before it is read.
    "str x0, [sp, #168]",
    "ldr x0, [sp, #160]",
    "str x1, [x0, #{out_gpr} + 8]",
    "add x1, x0, #{out_gpr}",
    "stp x2, x3, [x1, #16]",
    "stp x4, x5, [x1, #32]",
    "stp x6, x7, [x1, #48]",
    "stp x8, x9, [x1, #64]",
    "stp x10, x11, [x1, #80]",
    "stp x12, x13, [x1, #96]",
    "stp x14, x15, [x1, #112]",
    "stp x16, x17, [x1, #128]",
    "stp x18, x19, [x1, #144]",
    "stp x20, x21, [x1, #160]",
    "stp x22, x23, [x1, #176]",
    "stp x24, x25, [x1, #192]",
    "stp x26, x27, [x1, #208]",
    "stp x28, x29, [x1, #224]",
    "str x30, [x1, #240]",
    "ldr x2, [sp, #168]",
    "str x2, [x1, #0]",
    "mrs x2, nzcv",
    "str x2, [x0, #{out_flags}]",
    "mrs x2, fpcr",
    "str x2, [x0, #{out_fpcr}]",
    "mrs x2, fpsr",
    "str x2, [x0, #{out_fpsr}]",
    "add x1, x0, #{out_vec}",
    ".irp k, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    "str q\\k, [x1, #16 * \\k]",
    ".endr",
    "msr fpcr, xzr",                       // the host's FPCR back (Rust's default, 0)
    "msr fpsr, xzr",
    "ldp d8, d9, [sp, #96]",
    "ldp d10, d11, [sp, #112]",
    "ldp d12, d13, [sp, #128]",
    "ldp d14, d15, [sp, #144]",
    "ldp x19, x20, [sp, #16]",
    "ldp x21, x22, [sp, #32]",
    "ldp x23, x24, [sp, #48]",
    "ldp x25, x26, [sp, #64]",
    "ldp x27, x28, [sp, #80]",
    "ldp x29, x30, [sp], #176",
    "ret",
    ".size fuzz_run, . - fuzz_run",
    ".popsection",
    target = const offset_of!(Ctx, target),
    in_gpr = const offset_of!(Ctx, inp) + offset_of!(Machine, gpr),
    in_flags = const offset_of!(Ctx, inp) + offset_of!(Machine, flags),
    in_fpcr = const offset_of!(Ctx, inp) + offset_of!(Machine, fpcr),
    in_fpsr = const offset_of!(Ctx, inp) + offset_of!(Machine, fpsr),
    in_vec = const offset_of!(Ctx, inp) + offset_of!(Machine, vec),
    out_gpr = const offset_of!(Ctx, out) + offset_of!(Machine, gpr),
    out_flags = const offset_of!(Ctx, out) + offset_of!(Machine, flags),
    out_fpcr = const offset_of!(Ctx, out) + offset_of!(Machine, fpcr),
    out_fpsr = const offset_of!(Ctx, out) + offset_of!(Machine, fpsr),
    out_vec = const offset_of!(Ctx, out) + offset_of!(Machine, vec),
);

extern "C" {
    fn fuzz_run(ctx: *mut Ctx);
}

/// A generated function: its bytes (for the code page's start), the offsets of its
/// instructions, where its helper starts, which instructions call the helper, and a
/// listing for reports.
struct Generated {
    code: Vec<u8>,
    boundaries: Vec<usize>,
    helper: usize,
    calls: Vec<usize>,
    listing: Vec<String>,
}

#[cfg(target_arch = "x86_64")]
mod gen {
    //! x86_64: items of one to three instructions built with iced-x86's encoder
    //! (`Instruction::with*`), branch targets being items, laid out by its
    //! `BlockEncoder` (which picks the branch forms and relocates RIP-relative
    //! operands); push/pop pairs are one item, so no branch leaves one unbalanced.

    use super::{Generated, Rng, DATA, SCRATCH};
    use iced_x86::{
        BlockEncoder, BlockEncoderOptions, Code, Decoder, DecoderOptions, FlowControl, Formatter, Instruction, InstructionBlock, InstructionInfoFactory,
        IntelFormatter, MemoryOperand, Register,
    };
    use Register::*;

    const GPR: [Register; 16] = [RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8, R9, R10, R11, R12, R13, R14, R15];
    const GPR32: [Register; 16] = [EAX, ECX, EDX, EBX, ESP, EBP, ESI, EDI, R8D, R9D, R10D, R11D, R12D, R13D, R14D, R15D];
    const GPR8: [Register; 16] = [AL, CL, DL, BL, SPL, BPL, SIL, DIL, R8L, R9L, R10L, R11L, R12L, R13L, R14L, R15L];
    const XMM: [Register; 16] = [XMM0, XMM1, XMM2, XMM3, XMM4, XMM5, XMM6, XMM7, XMM8, XMM9, XMM10, XMM11, XMM12, XMM13, XMM14, XMM15];
    /// The register that holds the scratch buffer's address (never written).
    pub(super) const BASE: usize = 15;
    /// Virtual addresses of the items (item k at `VIP + 16 k`), for branch targets.
    const VIP: u64 = 0x10_0000;

    fn vip(item: usize) -> u64 {
        VIP + 16 * item as u64
    }

    /// The general registers (by number) the instruction at `off` of `code` reads or
    /// writes, explicitly or not (memory operands' base and index included).
    pub(super) fn used(code: &[u8], off: usize) -> u32 {
        let i = Decoder::with_ip(64, &code[off..], 0, DecoderOptions::NONE).decode();
        let mut info = InstructionInfoFactory::new();
        info.info(&i).used_registers().iter().filter_map(|u| GPR.iter().position(|g| *g == u.register().full_register())).fold(0, |m, k| m | 1 << k)
    }

    /// A register a handler may change anywhere in a generated function, if the probed
    /// instruction does not use it (`used`): any but rsp and the base. The code uses no
    /// other register as an address but right after loading it (`lea; call`), so the
    /// next instruction, where the probe then is, uses it.
    pub(super) fn changeable(k: usize) -> bool {
        k < 16 && k != 4 && k != BASE
    }

    /// A general register the code may write: any but rsp and the base.
    fn reg(r: &mut Rng) -> usize {
        loop {
            let k = r.below(16) as usize;
            if k != 4 && k != BASE {
                return k;
            }
        }
    }

    macro_rules! ins {
        ($code:expr) => {
            Instruction::with($code)
        };
        ($code:expr, $a:expr) => {
            Instruction::with1($code, $a).expect("valid operands")
        };
        ($code:expr, $a:expr, $b:expr) => {
            Instruction::with2($code, $a, $b).expect("valid operands")
        };
        ($code:expr, $a:expr, $b:expr, $c:expr) => {
            Instruction::with3($code, $a, $b, $c).expect("valid operands")
        };
    }

    /// `[base + 8k]` in the scratch buffer (room for 16 bytes).
    fn scratch(r: &mut Rng) -> MemoryOperand {
        MemoryOperand::with_base_displ(GPR[BASE], 8 * r.below((SCRATCH / 8 - 1) as u64) as i64)
    }

    /// `[rip + data + 8k]` (k > 0: word 0 holds the helper's address, never written).
    fn data(r: &mut Rng, data: usize) -> MemoryOperand {
        MemoryOperand::with_base_displ(RIP, (data + 8 + 8 * r.below((DATA / 8 - 3) as u64) as usize) as i64)
    }

    /// `[rsp - 8 - 8k]`: the red zone the harness filled.
    fn redzone(r: &mut Rng) -> MemoryOperand {
        MemoryOperand::with_base_displ(RSP, -8 - 8 * r.below(super::REDZONE as u64) as i64)
    }

    const CC_JCC: [Code; 8] = [
        Code::Je_rel32_64,
        Code::Jne_rel32_64,
        Code::Jb_rel32_64,
        Code::Jae_rel32_64,
        Code::Jl_rel32_64,
        Code::Jg_rel32_64,
        Code::Js_rel32_64,
        Code::Jo_rel32_64,
    ];
    const CC_JCC8: [Code; 8] =
        [Code::Je_rel8_64, Code::Jne_rel8_64, Code::Jb_rel8_64, Code::Jae_rel8_64, Code::Jl_rel8_64, Code::Jg_rel8_64, Code::Js_rel8_64, Code::Jp_rel8_64];
    const CMOV: [Code; 6] =
        [Code::Cmove_r64_rm64, Code::Cmovne_r64_rm64, Code::Cmovb_r64_rm64, Code::Cmova_r64_rm64, Code::Cmovl_r64_rm64, Code::Cmovp_r64_rm64];
    const SETCC: [Code; 6] = [Code::Sete_rm8, Code::Setne_rm8, Code::Setb_rm8, Code::Setbe_rm8, Code::Setge_rm8, Code::Seto_rm8];
    const ALU_RR: [Code; 10] = [
        Code::Add_rm64_r64,
        Code::Sub_rm64_r64,
        Code::And_rm64_r64,
        Code::Or_rm64_r64,
        Code::Xor_rm64_r64,
        Code::Adc_rm64_r64,
        Code::Sbb_rm64_r64,
        Code::Cmp_rm64_r64,
        Code::Test_rm64_r64,
        Code::Xchg_rm64_r64,
    ];
    const ALU_RI32: [Code; 4] = [Code::Add_rm64_imm32, Code::And_rm64_imm32, Code::Xor_rm64_imm32, Code::Cmp_rm64_imm32];
    const ALU_RI8: [Code; 4] = [Code::Sub_rm64_imm8, Code::Or_rm64_imm8, Code::Adc_rm64_imm8, Code::Sbb_rm64_imm8];
    const SHIFT: [Code; 5] = [Code::Shl_rm64_imm8, Code::Shr_rm64_imm8, Code::Sar_rm64_imm8, Code::Rol_rm64_imm8, Code::Ror_rm64_imm8];
    const UNARY: [Code; 4] = [Code::Inc_rm64, Code::Dec_rm64, Code::Neg_rm64, Code::Not_rm64];
    const SSE_RR: [Code; 14] = [
        Code::Addpd_xmm_xmmm128,
        Code::Subpd_xmm_xmmm128,
        Code::Mulpd_xmm_xmmm128,
        Code::Addsd_xmm_xmmm64,
        Code::Mulsd_xmm_xmmm64,
        Code::Divsd_xmm_xmmm64,
        Code::Sqrtsd_xmm_xmmm64,
        Code::Xorps_xmm_xmmm128,
        Code::Andps_xmm_xmmm128,
        Code::Paddq_xmm_xmmm128,
        Code::Psubd_xmm_xmmm128,
        Code::Pxor_xmm_xmmm128,
        Code::Punpcklqdq_xmm_xmmm128,
        Code::Movaps_xmm_xmmm128,
    ];

    /// One item of straight-line code (no branch, call or stack change but a balanced
    /// push/pop): for the body (`body`) or the helper, which gets no red zone (its own
    /// is below the body's).
    fn plain(r: &mut Rng, data_at: usize, body: bool) -> Vec<Instruction> {
        let (a, b) = (reg(r), reg(r));
        let (x, y) = (XMM[r.below(16) as usize], XMM[r.below(16) as usize]);
        let imm = r.value() as i32;
        match r.below(if body { 30 } else { 24 }) {
            0..=2 => vec![ins!(r.pick(&ALU_RR), GPR[a], GPR[b])],
            3 => vec![ins!(r.pick(&ALU_RI32), GPR[a], imm)],
            4 => vec![ins!(r.pick(&ALU_RI8), GPR[a], imm as i8 as i32)],
            5 => vec![ins!(Code::Add_rm32_r32, GPR32[a], GPR32[b])],
            6 => vec![ins!(r.pick(&SHIFT), GPR[a], r.below(64) as u32)],
            7 => vec![ins!(Code::Shl_rm64_CL, GPR[a], CL)],
            8 => vec![ins!(r.pick(&UNARY), GPR[a])],
            9 => vec![ins!(Code::Mov_r64_imm64, GPR[a], r.value())],
            10 => vec![ins!(Code::Movzx_r32_rm8, GPR32[a], GPR8[b])],
            11 => vec![ins!(Code::Imul_r64_rm64, GPR[a], GPR[b])],
            12 => {
                let index = [RAX, RCX, RDX, RBX, RBP, RSI, RDI, R8, R9, R10, R11, R12, R13, R14][r.below(14) as usize];
                let m = MemoryOperand::new(GPR[b], index, 1 << r.below(4), imm as i64, 8, false, None);
                vec![ins!(Code::Lea_r64_m, GPR[a], m)]
            }
            13 => vec![ins!(r.pick(&CMOV), GPR[a], GPR[b])],
            14 => vec![ins!(r.pick(&SETCC), GPR8[a])],
            15 => vec![ins!(Code::Mov_r64_rm64, GPR[a], scratch(r))],
            16 => vec![ins!(Code::Mov_rm64_r64, scratch(r), GPR[a])],
            17 => vec![ins!(r.pick(&[Code::Add_rm64_r64, Code::Xadd_rm64_r64, Code::Cmpxchg_rm64_r64]), scratch(r), GPR[a])],
            18 => vec![ins!(Code::Mov_rm32_imm32, scratch(r), imm)],
            19 => vec![ins!(r.pick(&SSE_RR), x, y)],
            20 => vec![ins!(Code::Pshufd_xmm_xmmm128_imm8, x, y, r.below(256) as u32)],
            21 => match r.below(4) {
                0 => vec![ins!(Code::Movq_xmm_rm64, x, GPR[a])],
                1 => vec![ins!(Code::Movq_rm64_xmm, GPR[a], x)],
                2 => vec![ins!(Code::Cvtsi2sd_xmm_rm64, x, GPR[a])],
                _ => vec![ins!(Code::Cvttsd2si_r64_xmmm64, GPR[a], x)],
            },
            22 => vec![ins!(Code::Ucomisd_xmm_xmmm64, x, y)],
            23 => match r.chance(50) {
                true => vec![ins!(Code::Movdqu_xmm_xmmm128, x, scratch(r))],
                false => vec![ins!(Code::Movdqu_xmmm128_xmm, scratch(r), x)],
            },
            // RIP-relative data, with an immediate after the displacement now and then.
            24 => match r.below(3) {
                0 => vec![ins!(Code::Mov_r64_rm64, GPR[a], data(r, data_at))],
                1 => vec![ins!(Code::Mov_rm64_r64, data(r, data_at), GPR[a])],
                _ => vec![ins!(Code::Lea_r64_m, GPR[a], data(r, data_at))],
            },
            25 => match r.below(4) {
                0 => vec![ins!(Code::Cmp_rm64_imm8, data(r, data_at), imm as i8 as i32)],
                1 => vec![ins!(Code::Add_rm64_imm32, data(r, data_at), imm)],
                2 => vec![ins!(Code::Mov_rm8_imm8, data(r, data_at), imm as u8 as u32)],
                _ => vec![ins!(Code::Movdqu_xmm_xmmm128, x, data(r, data_at))],
            },
            26 => vec![ins!(Code::Mov_rm64_r64, redzone(r), GPR[a])],
            27 => vec![ins!(r.pick(&[Code::Mov_r64_rm64, Code::Add_r64_rm64]), GPR[a], redzone(r))],
            28 => {
                // push, something that leaves rsp alone (not the red zone: it moved), pop
                let mid = plain_no_stack(r, data_at);
                let mut v = vec![ins!(Code::Push_r64, GPR[a])];
                v.extend(mid);
                v.push(ins!(Code::Pop_r64, GPR[b]));
                v
            }
            _ => vec![ins!(r.pick(&[Code::Nopd, Code::Nopq, Code::Lahf]))],
        }
    }

    fn plain_no_stack(r: &mut Rng, data_at: usize) -> Vec<Instruction> {
        loop {
            let v = plain(r, data_at, false);
            if v.len() == 1 {
                return v;
            }
        }
    }

    /// A function for a code page at `at` whose data page is `data_at`: `ret` after
    /// the body, then the helper.
    pub(super) fn function(r: &mut Rng, at: usize, data_at: usize) -> Generated {
        let n = 6 + r.below(26) as usize; // body items; item n is the body's ret
        let nh = 1 + r.below(4) as usize; // helper items: n + 1 .. n + 1 + nh, then its ret
        let helper = vip(n + 1);
        let mut items: Vec<Vec<Instruction>> = Vec::new();
        for k in 0..n {
            let target = k + 1 + r.below((n - k) as u64) as usize; // forward, up to the ret
            let near = target <= k + 4;
            let item = match r.below(100) {
                0..=8 => {
                    let code = if near && r.chance(50) { r.pick(&CC_JCC8) } else { r.pick(&CC_JCC) };
                    vec![Instruction::with_branch(code, vip(target)).expect("branch")]
                }
                9..=11 => vec![Instruction::with_branch(if near { Code::Jmp_rel8_64 } else { Code::Jmp_rel32_64 }, vip(target)).expect("branch")],
                12 if near => vec![Instruction::with_branch(r.pick(&[Code::Jrcxz_rel8_64, Code::Loop_rel8_64_RCX]), vip(target)).expect("branch")],
                13..=15 => vec![Instruction::with_branch(Code::Call_rel32_64, helper).expect("call")],
                16 => {
                    let a = reg(r);
                    vec![ins!(Code::Lea_r64_m, GPR[a], MemoryOperand::with_base_displ(RIP, helper as i64)), ins!(Code::Call_rm64, GPR[a])]
                }
                17 => vec![ins!(Code::Call_rm64, MemoryOperand::with_base_displ(RIP, data_at as i64))],
                18 => vec![ins!(Code::Lea_r64_m, GPR[reg(r)], MemoryOperand::with_base_displ(RIP, vip(target) as i64))],
                _ => plain(r, data_at, true),
            };
            items.push(item);
        }
        // xmm8-xmm15, which the ABI leaves undefined at a function's entry (caller-saved,
        // no argument), are defined before anything reads them, as a compiled function
        // does: in a random order and form, ahead of the first item. An optimized probe
        // at the entry keeps only xmm0-xmm7 (the module docs), so a read of one before it
        // is written would make the runs differ by what the handler left in it, which
        // the ABI allows (a handler built with optimizations does leave values there).
        let mut order: Vec<usize> = (8..16).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, r.below(i as u64 + 1) as usize);
        }
        let defined = order.iter().map(|&x| match r.below(5) {
            0 => ins!(Code::Movdqu_xmm_xmmm128, XMM[x], scratch(r)),
            1 => ins!(Code::Movq_xmm_rm64, XMM[x], GPR[reg(r)]),
            2 => ins!(Code::Pxor_xmm_xmmm128, XMM[x], XMM[x]),
            3 => ins!(Code::Movaps_xmm_xmmm128, XMM[x], XMM[r.below(8) as usize]),
            _ => ins!(Code::Pshufd_xmm_xmmm128_imm8, XMM[x], XMM[r.below(8) as usize], r.below(256) as u32),
        });
        items[0].splice(0..0, defined.collect::<Vec<_>>());
        items.push(vec![ins!(Code::Retnq)]);
        for _ in 0..nh {
            items.push(plain(r, data_at, false));
        }
        items.push(vec![ins!(Code::Retnq)]);
        // Virtual addresses: item k's instructions at VIP + 16 k + j.
        let mut all = Vec::new();
        for (k, item) in items.iter().enumerate() {
            for (j, i) in item.iter().enumerate() {
                let mut i = *i;
                i.set_ip(vip(k) + j as u64);
                all.push(i);
            }
        }
        // The branch forms as generated if they reach, else as the encoder fixes them.
        let block = || InstructionBlock::new(&all, at as u64);
        let code = BlockEncoder::encode(64, block(), BlockEncoderOptions::DONT_FIX_BRANCHES)
            .or_else(|_| BlockEncoder::encode(64, block(), BlockEncoderOptions::NONE))
            .expect("the generated code encodes")
            .code_buffer;
        let (mut boundaries, mut calls, mut listing) = (Vec::new(), Vec::new(), Vec::new());
        let mut helper_at: Option<usize> = Option::None;
        let mut rets = 0;
        let mut f = IntelFormatter::new();
        for i in Decoder::with_ip(64, &code, at as u64, DecoderOptions::NONE).iter() {
            let off = i.ip() as usize - at;
            assert!(!i.is_invalid(), "generated code decodes at +{off:#x}");
            boundaries.push(off);
            if i.flow_control() == FlowControl::Call || i.flow_control() == FlowControl::IndirectCall {
                calls.push(off);
            }
            let mut t = String::new();
            f.format(&i, &mut t);
            listing.push(format!("+{off:#05x}  {t}"));
            if i.flow_control() == FlowControl::Return {
                rets += 1;
                if rets == 1 {
                    helper_at = Some(off + i.len());
                }
            }
        }
        Generated { code, boundaries, helper: helper_at.expect("the body ends with ret"), calls, listing }
    }
}

#[cfg(target_arch = "aarch64")]
mod gen {
    //! aarch64: items of one or two instructions, encoded here (Arm ARM A64 encodings);
    //! pc-relative ones (branches, `adr`/`adrp`, literal loads) are encoded once every
    //! item's address is known. The function saves its return address in x27 first and
    //! returns with `ret x27`, so that it may call its helper with `bl`/`blr`. A push
    //! and pop pair (`stp` pre-index, `ldp` post-index on sp, around one instruction) is
    //! one item, so no branch leaves one unbalanced.

    use super::{Generated, Rng, DATA, SCRATCH};

    /// The register that holds the scratch buffer's address (never written).
    pub(super) const BASE: usize = 28;
    /// The register that keeps the function's return address.
    const LINK: u32 = 27;
    /// `mov x27, x30` (`orr x27, xzr, x30`) and `ret x27`.
    const SAVE_LINK: u32 = 0xaa1e_03fb;
    const RET_LINK: u32 = 0xd65f_0360;
    const RET: u32 = 0xd65f_03c0;
    const NOP: u32 = 0xd503_201f;

    /// An instruction, or a pc-relative one waiting for its addresses.
    #[derive(Clone, Copy)]
    enum Op {
        Word(u32),
        /// `b`, `bl` (`base` 0x14000000 / 0x94000000) to an item.
        B {
            base: u32,
            to: usize,
        },
        /// `b.cond`, `cbz`, `cbnz`, `ldr (literal)` (imm19 at bit 5) to an item or address.
        Imm19 {
            base: u32,
            to: Target,
        },
        /// `tbz`, `tbnz` (imm14 at bit 5) to an item.
        Imm14 {
            base: u32,
            to: usize,
        },
        /// `adr` / `adrp` (`page`) of xd to a target.
        Adr {
            rd: u32,
            page: bool,
            to: Target,
        },
    }

    #[derive(Clone, Copy)]
    enum Target {
        Item(usize),
        Addr(usize),
    }

    /// A general register the body may write (`helper`: not x30, which it returns
    /// through): x0-x26, x29, x30.
    fn reg(r: &mut Rng, helper: bool) -> u32 {
        loop {
            let k = r.below(31) as u32;
            if k != LINK && k != BASE as u32 && !(helper && k == 30) {
                return k;
            }
        }
    }

    /// The general registers (by number) the instruction at `off` of `code` may read or
    /// write: every register field of its encoding, whatever the instruction (more than
    /// it uses, never fewer).
    pub(super) fn used(code: &[u8], off: usize) -> u32 {
        let w = u32::from_le_bytes(code[off..off + 4].try_into().expect("a word"));
        [0, 5, 10, 16].iter().fold(0, |m, s| m | 1 << ((w >> s) & 31))
    }

    /// A register a handler may change anywhere in a generated function, if the probed
    /// instruction does not use it (`used`): x0-x26 and x29. Not the link register (the
    /// helper returns through it), x27 (the function returns through it), the base or
    /// sp; the code uses no other register as an address but right after loading it
    /// (`adr; ldr`, `adr; blr`), so the next instruction, where the probe then is, uses it.
    pub(super) fn changeable(k: usize) -> bool {
        k <= 26 || k == 29
    }

    /// A source register: any, xzr included (31 in these encodings).
    fn src(r: &mut Rng) -> u32 {
        r.below(32) as u32
    }

    fn plain(r: &mut Rng, helper: bool, data: usize) -> Vec<Op> {
        use Op::Word as W;
        let (d, n, m, a) = (reg(r, helper), src(r), src(r), src(r));
        let (vd, vn, vm, va) = (r.below(32) as u32, r.below(32) as u32, r.below(32) as u32, r.below(32) as u32);
        let sf = if r.chance(75) { 1 << 31 } else { 0 };
        let n_sp = n.min(30); // add/sub (immediate) read sp as register 31: not that
        let cond = r.below(15) as u32;
        match r.below(if helper { 26 } else { 30 }) {
            // add, adds, sub, subs (immediate)
            0 | 1 => vec![W(sf
                | [0x1100_0000u32, 0x3100_0000, 0x5100_0000, 0x7100_0000][r.below(4) as usize]
                | (r.below(2) as u32) << 22
                | (r.below(4096) as u32) << 10
                | n_sp << 5
                | d)],
            // add, adds, sub, subs (shifted register)
            2 | 3 => {
                let shift = r.below(3) as u32;
                let amount = r.below(if sf != 0 { 64 } else { 32 }) as u32;
                vec![W(sf | [0x0b00_0000u32, 0x2b00_0000, 0x4b00_0000, 0x6b00_0000][r.below(4) as usize] | shift << 22 | m << 16 | amount << 10 | n << 5 | d)]
            }
            // and, orr, eor, ands, bic (shifted register)
            4 | 5 => {
                let amount = r.below(64) as u32;
                vec![W(0x8000_0000
                    | [0x0a00_0000u32, 0x2a00_0000, 0x4a00_0000, 0x6a00_0000, 0x0a20_0000][r.below(5) as usize]
                    | (r.below(4) as u32) << 22
                    | m << 16
                    | amount << 10
                    | n << 5
                    | d)]
            }
            // and, orr, eor, ands (immediate, 64-bit: N = 1, any immr, imms < 63)
            6 => vec![W(0x9240_0000
                | [0u32, 0x2000_0000, 0x4000_0000, 0x6000_0000][r.below(4) as usize]
                | (r.below(64) as u32) << 16
                | (r.below(63) as u32) << 10
                | n << 5
                | d)],
            // madd, msub
            7 => vec![W(0x9b00_0000 | (r.below(2) as u32) << 15 | m << 16 | a << 10 | n << 5 | d)],
            // udiv, sdiv, lslv, lsrv, asrv, rorv
            8 => vec![W(sf | 0x1ac0_0000 | [0x800u32, 0xc00, 0x2000, 0x2400, 0x2800, 0x2c00][r.below(6) as usize] | m << 16 | n << 5 | d)],
            // adc, adcs, sbc, sbcs
            9 => vec![W(sf | [0x1a00_0000u32, 0x3a00_0000, 0x5a00_0000, 0x7a00_0000][r.below(4) as usize] | m << 16 | n << 5 | d)],
            // csel, csinc, csinv, csneg
            10 => vec![W(sf | [0x1a80_0000u32, 0x1a80_0400, 0x5a80_0000, 0x5a80_0400][r.below(4) as usize] | m << 16 | cond << 12 | n << 5 | d)],
            // ccmp, ccmn (register)
            11 => vec![W(sf | [0x7a40_0000u32, 0x3a40_0000][r.below(2) as usize] | m << 16 | cond << 12 | n << 5 | r.below(16) as u32)],
            // movz, movk, movn (64-bit)
            12 => vec![W([0xd280_0000u32, 0xf280_0000, 0x9280_0000][r.below(3) as usize] | (r.below(4) as u32) << 21 | (r.value() as u32 & 0xffff) << 5 | d)],
            // ubfm, sbfm, extr (64-bit)
            13 => match r.below(3) {
                0 => vec![W(0xd340_0000 | (r.below(64) as u32) << 16 | (r.below(64) as u32) << 10 | n << 5 | d)],
                1 => vec![W(0x9340_0000 | (r.below(64) as u32) << 16 | (r.below(64) as u32) << 10 | n << 5 | d)],
                _ => vec![W(0x93c0_0000 | m << 16 | (r.below(64) as u32) << 10 | n << 5 | d)],
            },
            // clz, rbit, rev
            14 => vec![W([0xdac0_1000u32, 0xdac0_0000, 0xdac0_0c00][r.below(3) as usize] | n << 5 | d)],
            // ldr/str x, w, h, b, ldrsw on the scratch buffer (scaled unsigned offset)
            15 | 16 => {
                let (base, size) = r.pick(&[
                    (0xf940_0000u32, 8u64),
                    (0xf900_0000, 8),
                    (0xb940_0000, 4),
                    (0xb900_0000, 4),
                    (0x7940_0000, 2),
                    (0x7900_0000, 2),
                    (0x3940_0000, 1),
                    (0x3900_0000, 1),
                    (0xb980_0000, 4),
                ]);
                let off = r.below(SCRATCH as u64 / size - 2) as u32;
                vec![W(base | off << 10 | (BASE as u32) << 5 | d)]
            }
            // ldp/stp x on the scratch buffer (two different registers for ldp)
            17 => {
                let d2 = loop {
                    let k = reg(r, helper);
                    if k != d {
                        break k;
                    }
                };
                let off = r.below(SCRATCH as u64 / 8 - 2) as u32;
                vec![W(r.pick(&[0xa940_0000u32, 0xa900_0000]) | off << 15 | d2 << 10 | (BASE as u32) << 5 | d)]
            }
            // ldr/str q, d on the scratch buffer
            18 => {
                let (base, size) = r.pick(&[(0x3dc0_0000u32, 16u64), (0x3d80_0000, 16), (0xfd40_0000, 8), (0xfd00_0000, 8)]);
                let off = r.below(SCRATCH as u64 / size - 1) as u32;
                vec![W(base | off << 10 | (BASE as u32) << 5 | vd)]
            }
            // fmov d <-> x, scvtf, fcvtzs, dup, ins, umov
            19 => match r.below(7) {
                0 => vec![W(0x9e67_0000 | n << 5 | vd)],
                1 => vec![W(0x9e66_0000 | vn << 5 | d)],
                2 => vec![W(0x9e62_0000 | n << 5 | vd)],
                3 => vec![W(0x9e78_0000 | vn << 5 | d)],
                4 => vec![W(0x4e08_0c00 | n << 5 | vd)],
                5 => vec![W(0x4e18_1c00 | n << 5 | vd)],
                _ => vec![W(0x4e18_3c00 | vn << 5 | d)],
            },
            // fadd, fsub, fmul, fdiv d; fadd s; fsqrt d; fmadd d
            20 | 21 => match r.below(7) {
                k @ 0..=3 => vec![W([0x1e60_2800u32, 0x1e60_3800, 0x1e60_0800, 0x1e60_1800][k as usize] | vm << 16 | vn << 5 | vd)],
                4 => vec![W(0x1e20_2800 | vm << 16 | vn << 5 | vd)],
                5 => vec![W(0x1e61_c000 | vn << 5 | vd)],
                _ => vec![W(0x1f40_0000 | vm << 16 | va << 10 | vn << 5 | vd)],
            },
            // fcmp d (sets NZCV)
            22 => vec![W(0x1e60_2000 | vm << 16 | vn << 5)],
            // add v.2d, eor v.16b, fadd v.2d, mul v.4s
            23 => vec![W([0x4ee0_8400u32, 0x6e20_1c00, 0x4e60_d400, 0x4ea0_9c00][r.below(4) as usize] | vm << 16 | vn << 5 | vd)],
            24 => vec![W(NOP)],
            25 => vec![W(0xaa00_03e0 | m << 16 | d)], // mov xd, xm
            // pc-relative: adr/adrp of the data page, and literal loads from it
            26 => vec![Op::Adr { rd: d, page: r.chance(30), to: Target::Addr(data + 8 * r.below(DATA as u64 / 8) as usize) }],
            27 | 28 => {
                let lit = data + 16 * r.below(DATA as u64 / 16) as usize;
                // ldr w, x, ldrsw (literal) into xd; ldr s, d, q (literal) into vd; prfm
                let (base, t) = r.pick(&[
                    (0x1800_0000u32, d),
                    (0x5800_0000, d),
                    (0x9800_0000, d),
                    (0x1c00_0000, vd),
                    (0x5c00_0000, vd),
                    (0x9c00_0000, vd),
                    (0xd800_0000, 0),
                ]);
                vec![Op::Imm19 { base: base | t, to: Target::Addr(lit) }]
            }
            // adr of the scratch base's neighbour, then a load through it
            _ => {
                let lit = data + 8 * r.below(DATA as u64 / 8) as usize;
                vec![Op::Adr { rd: d, page: false, to: Target::Addr(lit) }, W(0xf940_0000 | d << 5 | reg(r, helper))]
            }
        }
    }

    /// A function for a code page at `at` whose data page is `data`: the link saved,
    /// the body, `ret x27`, then the helper and its `ret`.
    pub(super) fn function(r: &mut Rng, at: usize, data: usize) -> Generated {
        let n = 6 + r.below(26) as usize; // body items 1..=n; item n + 1 is the body's ret
        let nh = 1 + r.below(4) as usize;
        let helper = n + 2;
        let mut items: Vec<Vec<Op>> = vec![vec![Op::Word(SAVE_LINK)]];
        for k in 1..=n {
            let to = k + 1 + r.below((n + 1 - k) as u64) as usize; // forward, up to the ret
            let t = src(r);
            let item = match r.below(100) {
                0..=5 => vec![Op::Imm19 { base: 0x5400_0000 | r.below(15) as u32, to: Target::Item(to) }], // b.cond
                6..=7 => vec![Op::Imm19 { base: r.pick(&[0xb400_0000u32, 0xb500_0000, 0x3400_0000]) | t, to: Target::Item(to) }], // cbz, cbnz
                8..=9 => {
                    let bit = r.below(64) as u32;
                    vec![Op::Imm14 { base: r.pick(&[0x3600_0000u32, 0x3700_0000]) | (bit >> 5) << 31 | (bit & 31) << 19 | t, to }]
                }
                10..=11 => vec![Op::B { base: 0x1400_0000, to }],
                12..=14 => vec![Op::B { base: 0x9400_0000, to: helper }],
                15 => {
                    // adr xn, helper; blr xn (x30 too: `blr x30` cannot be relocated)
                    let x = if r.chance(25) { 30 } else { reg(r, true) };
                    vec![Op::Adr { rd: x, page: false, to: Target::Item(helper) }, Op::Word(0xd63f_0000 | x << 5)]
                }
                16 => vec![Op::Adr { rd: reg(r, false), page: false, to: Target::Item(to) }],
                17..=19 => {
                    // stp xa, xb, [sp, #-16]!; one instruction; ldp xc, xd, [sp], #16
                    let (a, b, c) = (src(r), src(r), reg(r, false));
                    let d = loop {
                        let k = reg(r, false);
                        if k != c {
                            break k;
                        }
                    };
                    let mid = loop {
                        let p = plain(r, false, data);
                        if p.len() == 1 {
                            break p[0];
                        }
                    };
                    vec![Op::Word(0xa9bf_0000 | b << 10 | 31 << 5 | a), mid, Op::Word(0xa8c1_0000 | d << 10 | 31 << 5 | c)]
                }
                _ => plain(r, false, data),
            };
            items.push(item);
        }
        items.push(vec![Op::Word(RET_LINK)]);
        for _ in 0..nh {
            items.push(plain(r, true, data));
        }
        items.push(vec![Op::Word(RET)]);
        // Item addresses, then the words.
        let mut starts = Vec::new();
        let mut pc = at;
        for item in &items {
            starts.push(pc);
            pc += 4 * item.len();
        }
        let addr = |t: Target| match t {
            Target::Item(k) => starts[k],
            Target::Addr(a) => a,
        };
        let mut words = Vec::new();
        for (k, item) in items.iter().enumerate() {
            for (j, op) in item.iter().enumerate() {
                let pc = starts[k] + 4 * j;
                let rel = |to: usize| (to as i64 - pc as i64) >> 2;
                words.push(match *op {
                    Op::Word(w) => w,
                    Op::B { base, to } => base | (rel(starts[to]) as u32 & 0x03ff_ffff),
                    Op::Imm19 { base, to } => base | (rel(addr(to)) as u32 & 0x7ffff) << 5,
                    Op::Imm14 { base, to } => base | (rel(starts[to]) as u32 & 0x3fff) << 5,
                    Op::Adr { rd, page: false, to } => {
                        let d = addr(to) as i64 - pc as i64;
                        0x1000_0000 | ((d & 3) as u32) << 29 | ((d >> 2) as u32 & 0x7ffff) << 5 | rd
                    }
                    Op::Adr { rd, page: true, to } => {
                        let d = (addr(to) as i64 >> 12) - (pc as i64 >> 12);
                        0x9000_0000 | ((d & 3) as u32) << 29 | ((d >> 2) as u32 & 0x7ffff) << 5 | rd
                    }
                });
            }
        }
        let code: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let boundaries: Vec<usize> = (0..words.len()).map(|k| 4 * k).collect();
        let calls = words.iter().enumerate().filter(|(_, w)| *w & 0xfc00_0000 == 0x9400_0000 || *w & 0xffff_fc1f == 0xd63f_0000).map(|(k, _)| 4 * k).collect();
        let listing = words.iter().enumerate().map(|(k, w)| format!("+{:#05x}  {w:08x}", 4 * k)).collect();
        Generated { code, boundaries, helper: starts[helper] - at, calls, listing }
    }
}

/// The code page the functions are written into (read+execute, rewritten per case
/// while read-write: never both) and the data page after it (read-write).
struct Region {
    code: usize,
    data: usize,
    page: usize,
}

impl Region {
    fn new() -> Region {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        // SAFETY: a fresh anonymous mapping of two pages, ours alone (never unmapped);
        // the first is made read+execute at once.
        let code = unsafe {
            let p = libc::mmap(std::ptr::null_mut(), 2 * page, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0);
            assert_ne!(p, libc::MAP_FAILED);
            assert_eq!(libc::mprotect(p, page, libc::PROT_READ | libc::PROT_EXEC), 0);
            p as usize
        };
        Region { code, data: code + page, page }
    }

    /// Writes `code` at the start of the code page (the rest traps), with no probe in it.
    fn load(&self, code: &[u8]) {
        assert!(code.len() <= self.page);
        #[cfg(target_arch = "x86_64")]
        let fill = 0xcc; // int3
        #[cfg(target_arch = "aarch64")]
        let fill = 0; // udf #0
                      // SAFETY: the code page is ours; no probe is registered in it and no thread runs
                      // it while it is writable (and not executable).
        unsafe {
            assert_eq!(libc::mprotect(self.code as *mut libc::c_void, self.page, libc::PROT_READ | libc::PROT_WRITE), 0);
            let p = self.code as *mut u8;
            std::ptr::write_bytes(p, fill, self.page);
            std::ptr::copy_nonoverlapping(code.as_ptr(), p, code.len());
            assert_eq!(libc::mprotect(self.code as *mut libc::c_void, self.page, libc::PROT_READ | libc::PROT_EXEC), 0);
        }
        sync_icache(self.code, code.len());
    }
}

/// Makes freshly written code visible to instruction fetch (aarch64: `dc cvau`,
/// `ic ivau` per 4-byte step, which covers any line size; x86_64 needs nothing).
fn sync_icache(addr: usize, len: usize) {
    #[cfg(target_arch = "aarch64")]
    for a in (addr & !3..addr + len).step_by(4) {
        // SAFETY: cache maintenance by address on mapped memory (allowed at EL0 on Linux).
        unsafe { std::arch::asm!("dc cvau, {a}", "dsb ish", "ic ivau, {a}", "dsb ish", "isb", a = in(reg) a, options(nostack)) };
    }
    let _ = (addr, len);
}

/// The scratch buffer (16-aligned for the vector loads and stores).
#[repr(C, align(16))]
struct Scratch([u64; SCRATCH / 8]);

/// What a run leaves: every register, the scratch buffer and the data page's words.
#[derive(Clone, PartialEq, Eq)]
struct Outcome {
    m: Machine,
    scratch: [u64; SCRATCH / 8],
    data: [u64; DATA / 8],
}

/// One case's inputs.
struct Input {
    m: Machine,
    scratch: [u64; SCRATCH / 8],
    data: [u64; DATA / 8],
}

fn random_input(r: &mut Rng, scratch: &Scratch, region: &Region, helper: usize) -> Input {
    let mut m = Machine::default();
    for g in &mut m.gpr {
        *g = r.value();
    }
    m.gpr[gen::BASE] = scratch.0.as_ptr() as u64;
    for v in &mut m.vec {
        *v = [r.value(), r.value()];
    }
    #[cfg(target_arch = "x86_64")]
    {
        m.gpr[4] = 0;
        // The status flags (CF PF AF ZF SF OF) at random, IF and the reserved bit 1 set.
        m.flags = 0x202 | (r.next() & 0x8d5);
        // Default control (all exceptions masked, round to nearest), random status bits.
        m.fpcr = 0x1f80 | (r.next() & 0x3f);
        for w in &mut m.redzone {
            *w = r.value();
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        m.flags = r.next() & 0xf000_0000; // NZCV
        m.fpcr = 0; // the default: round to nearest, no flush to zero, no traps
        m.fpsr = r.next() & 0x9f; // cumulative exception bits (IOC DZC OFC UFC IXC, IDC)
    }
    let mut data = [0u64; DATA / 8];
    for w in &mut data {
        *w = r.value();
    }
    data[0] = (region.code + helper) as u64; // x86_64 `call [rip + data]`
    let mut s = [0u64; SCRATCH / 8];
    for w in &mut s {
        *w = r.value();
    }
    Input { m, scratch: s, data }
}

/// Runs the function in the code page from `input`.
fn run(region: &Region, scratch: &mut Scratch, input: &Input) -> Outcome {
    scratch.0 = input.scratch;
    let data = region.data as *mut [u64; DATA / 8];
    // SAFETY: the data page is ours, read-write, and only the generated code uses it.
    unsafe { data.write_volatile(input.data) };
    let mut ctx = Ctx { inp: input.m, out: Machine::default(), target: region.code as u64 };
    // SAFETY: the code page holds a generated function, which touches only the
    // registers the harness loads, the scratch buffer (whose address the base register
    // holds), the data page and (x86_64) the red zone the harness filled; it returns
    // with the stack pointer it was called with.
    unsafe { fuzz_run(std::hint::black_box(&mut ctx)) };
    // SAFETY: as above.
    let data = unsafe { data.read_volatile() };
    Outcome { m: ctx.out, scratch: std::hint::black_box(scratch).0, data }
}

#[cfg(target_arch = "x86_64")]
const GPR_NAMES: [&str; 16] = ["rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"];

/// The differences between `want` (unprobed, say) and `got`, with the names of the
/// two runs. `entry_opt`: an
/// optimized probe at the function's entry, where the ABI lets vector registers other
/// than arguments and the x86_64 MXCSR status bits differ (see the module docs).
fn differences(want: &Outcome, got: &Outcome, entry_opt: bool, (wname, gname): (&str, &str)) -> Vec<String> {
    let mut d = Vec::new();
    let mut cmp = |name: String, a: u64, b: u64| {
        if a != b {
            d.push(format!("{name}: {a:#x} {wname}, {b:#x} {gname}"));
        }
    };
    #[cfg(target_arch = "x86_64")]
    {
        for k in (0..16).filter(|k| *k != 4) {
            cmp(GPR_NAMES[k].into(), want.m.gpr[k], got.m.gpr[k]);
        }
        // The status flags and DF.
        cmp("rflags".into(), want.m.flags & 0xcd5, got.m.flags & 0xcd5);
        let mxcsr = if entry_opt { !0x3f } else { !0 };
        cmp("mxcsr".into(), want.m.fpcr & mxcsr, got.m.fpcr & mxcsr);
        for k in 0..if entry_opt { 8 } else { 16 } {
            for h in 0..2 {
                cmp(format!("xmm{k}[{h}]"), want.m.vec[k][h], got.m.vec[k][h]);
            }
        }
        for k in 0..REDZONE {
            cmp(format!("[rsp - {}]", 8 + 8 * k), want.m.redzone[k], got.m.redzone[k]);
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        let _ = entry_opt;
        for k in 0..31 {
            cmp(format!("x{k}"), want.m.gpr[k], got.m.gpr[k]);
        }
        cmp("nzcv".into(), want.m.flags, got.m.flags);
        cmp("fpcr".into(), want.m.fpcr, got.m.fpcr);
        cmp("fpsr".into(), want.m.fpsr, got.m.fpsr);
        for k in 0..32 {
            for h in 0..2 {
                cmp(format!("v{k}[{h}]"), want.m.vec[k][h], got.m.vec[k][h]);
            }
        }
    }
    for k in 0..SCRATCH / 8 {
        cmp(format!("scratch[{}]", 8 * k), want.scratch[k], got.scratch[k]);
    }
    for k in 0..DATA / 8 {
        cmp(format!("data[{}]", 8 * k), want.data[k], got.data[k]);
    }
    d
}

/// What a reading handler saw at its first hit: every general register, the pc, the
/// stack pointer and the flags.
const SEEN: usize = 34;

fn seen(r: &PtRegs) -> [u64; SEEN] {
    let mut s = [0u64; SEEN];
    #[cfg(target_arch = "x86_64")]
    {
        let g = [r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15];
        s[..16].copy_from_slice(&g);
        s[16] = r.rip;
        s[17] = r.eflags & 0xcd5;
    }
    #[cfg(target_arch = "aarch64")]
    {
        s[..31].copy_from_slice(&r.regs);
        s[31] = r.sp;
        s[32] = r.pc;
        s[33] = r.pstate & 0xf000_0000;
    }
    s
}

fn seen_name(k: usize) -> String {
    #[cfg(target_arch = "x86_64")]
    return match k {
        0..16 => GPR_NAMES[k].to_string(),
        16 => "rip".into(),
        17 => "rflags".into(),
        _ => format!("#{k}"),
    };
    #[cfg(target_arch = "aarch64")]
    return match k {
        0..31 => format!("x{k}"),
        31 => "sp".into(),
        32 => "pc".into(),
        _ => "nzcv".into(),
    };
}

/// A reading handler's record: hits, the registers of the first, and a sink for its
/// float math (so the compiler keeps it).
struct Seen {
    hits: AtomicU64,
    regs: [AtomicU64; SEEN],
    sink: AtomicU64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mech {
    Breakpoint,
    Optimized,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Handler {
    Empty,
    Reads,
    /// Changes a register and the flags (`pre_mut`): the two mechanisms must agree on
    /// what follows.
    Writes(Change),
}

/// What a writing handler changes: general register `reg` to `value`, and the status
/// flags (x86_64 CF PF AF ZF SF OF; aarch64 NZCV) by `flags` (xor).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Change {
    reg: usize,
    value: u64,
    flags: u64,
}

fn apply(r: &mut PtRegs, c: Change) {
    #[cfg(target_arch = "x86_64")]
    {
        let g = match c.reg {
            0 => &mut r.rax,
            1 => &mut r.rcx,
            2 => &mut r.rdx,
            3 => &mut r.rbx,
            5 => &mut r.rbp,
            6 => &mut r.rsi,
            7 => &mut r.rdi,
            8 => &mut r.r8,
            9 => &mut r.r9,
            10 => &mut r.r10,
            11 => &mut r.r11,
            12 => &mut r.r12,
            13 => &mut r.r13,
            _ => &mut r.r14,
        };
        *g = c.value;
        r.eflags ^= c.flags;
    }
    #[cfg(target_arch = "aarch64")]
    {
        r.regs[c.reg] = c.value;
        r.pstate ^= c.flags;
    }
}

fn variants(change: Change) -> [(Mech, Handler); 6] {
    [
        (Mech::Breakpoint, Handler::Reads),
        (Mech::Optimized, Handler::Reads),
        (Mech::Breakpoint, Handler::Empty),
        (Mech::Optimized, Handler::Empty),
        (Mech::Breakpoint, Handler::Writes(change)),
        (Mech::Optimized, Handler::Writes(change)),
    ]
}

/// What one probed run gave.
struct Probed {
    nhit: u64,
    seen: Option<[u64; SEEN]>,
}

/// Counts over a whole run.
#[derive(Default)]
struct Stats {
    cases: u64,
    unprobed: u64,
    compared: BTreeMap<&'static str, u64>,
    refused: BTreeMap<String, u64>,
    breakpoint_refused: BTreeMap<String, u64>,
    divergences: Vec<String>,
}

/// The variant's name in a reason (`UnrelocatableInstruction { .. }` -> its name).
fn reason_name(e: &Error) -> String {
    let text = match e {
        Error::NotOptimized { reason, .. } => format!("{reason:?}"),
        e => format!("{e:?}"),
    };
    text.split([' ', '(', '{']).next().unwrap_or_default().to_string()
}

/// Registers a probe of `mech` with `handler` at `off` into the function, runs the
/// function once from `input` and unregisters it; Err if it could not be registered.
fn probed_run(region: &Region, scratch: &mut Scratch, input: &Input, off: usize, mech: Mech, handler: Handler) -> Result<(Outcome, Probed), Error> {
    let b = Probe::builder().symbol(NAME).offset(off).optimize(match mech {
        Mech::Breakpoint => Optimize::Never,
        Mech::Optimized => Optimize::Required,
    });
    let record = Arc::new(Seen { hits: AtomicU64::new(0), regs: [const { AtomicU64::new(0) }; SEEN], sink: AtomicU64::new(0) });
    let b = match handler {
        Handler::Empty => b.pre(|_| {}),
        // SAFETY: the generated code is correct with any value in any register
        // `gen::changeable` allows, unless the probed instruction uses it (the caller
        // picks one it does not use), and with any status flags (they only choose
        // between branches, which all go forward to instructions of the function).
        Handler::Writes(c) => unsafe { b.pre_mut(move |r| apply(r, c)) },
        Handler::Reads => {
            let record = record.clone();
            b.pre(move |r| {
                if record.hits.fetch_add(1, Ordering::Relaxed) == 0 {
                    for (k, v) in seen(r).iter().enumerate() {
                        record.regs[k].store(*v, Ordering::Relaxed);
                    }
                }
                // Float math over the registers: the handler's code uses vector registers.
                let s = seen(r);
                let f = s.iter().fold(0.5f64, |acc, v| acc * 1.000_1 + (*v as f64).sqrt() / 3.0);
                record.sink.fetch_add(f.to_bits(), Ordering::Relaxed);
            })
        }
    };
    let h = b.register()?;
    assert_eq!(h.is_optimized(), mech == Mech::Optimized, "{mech:?} at +{off:#x}: {:?}", h.why_not_optimized());
    let out = run(region, scratch, input);
    let nhit = h.nhit();
    h.unregister().expect("unregistered");
    let seen = (handler == Handler::Reads && record.hits.load(Ordering::Relaxed) > 0).then(|| std::array::from_fn(|k| record.regs[k].load(Ordering::Relaxed)));
    Ok((out, Probed { nhit, seen }))
}

/// One case: generate, run unprobed, then probed at every boundary.
fn case(seed: u64, index: u64, region: &Region, scratch: &mut Scratch, stats: &mut Stats) {
    let mut r = Rng::new(seed ^ index.wrapping_mul(0xd1b5_4a32_d192_ed03));
    let g = gen::function(&mut r, region.code, region.data);
    region.load(&g.code);
    // SAFETY: the code page starts with the generated function, `g.code.len()` bytes,
    // decoding from its first byte, entered only there (the harness calls it; its own
    // branches and calls stay inside), unchanged until the guard is dropped below.
    let jit = unsafe { jit::declare(NAME, region.code, g.code.len()) }.expect("declared");
    let input = random_input(&mut r, scratch, region, g.helper);
    let want = run(region, scratch, &input);
    assert!(want == run(region, scratch, &input), "case {index} of seed {seed:#x}: two unprobed runs differ (the generator made nondeterministic code)");
    stats.unprobed += 2;
    stats.cases += 1;
    let mut hits: BTreeMap<usize, Vec<(Mech, u64)>> = BTreeMap::new();
    let report = |stats: &mut Stats, off: usize, what: String| {
        let listing: Vec<String> =
            g.listing.iter().map(|l| if l.starts_with(&format!("+{off:#05x} ")) { format!("{l}   <== probed") } else { l.clone() }).collect();
        stats.divergences.push(format!(
            "seed {seed:#x} case {index}: probe at {:#x} (+{off:#x}) {what}\nfunction at {:#x}:\n  {}",
            region.code + off,
            region.code,
            listing.join("\n  ")
        ));
    };
    for &off in &g.boundaries {
        let mut seen_by: Vec<(Mech, [u64; SEEN])> = Vec::new();
        let mut written: Vec<(Mech, Outcome, u64)> = Vec::new();
        // A register the probed instruction does not use, a value, some flags.
        let used = gen::used(&g.code, off);
        let regs: Vec<usize> = (0..32).filter(|k| gen::changeable(*k) && used & 1 << k == 0).collect();
        let change = Change { reg: r.pick(&regs), value: r.value(), flags: r.next() & if cfg!(target_arch = "x86_64") { 0x8d5 } else { 0xf000_0000 } };
        for (mech, handler) in variants(change) {
            let (got, p) = match probed_run(region, scratch, &input, off, mech, handler) {
                Ok(x) => x,
                Err(e @ Error::NotOptimized { .. }) if mech == Mech::Optimized => {
                    *stats.refused.entry(reason_name(&e)).or_default() += 1;
                    continue;
                }
                Err(e) => {
                    *stats.breakpoint_refused.entry(reason_name(&e)).or_default() += 1;
                    report(stats, off, format!("could not be registered as {mech:?}: {e}"));
                    continue;
                }
            };
            *stats.compared.entry(if mech == Mech::Breakpoint { "breakpoint" } else { "optimized" }).or_default() += 1;
            if let Handler::Writes(_) = handler {
                // Compared between the mechanisms below: the change makes it another run.
                written.push((mech, got, p.nhit));
                continue;
            }
            let d = differences(&want, &got, mech == Mech::Optimized && off == 0, ("unprobed", "probed"));
            if !d.is_empty() {
                report(stats, off, format!("({mech:?}, {handler:?} handler) diverges:\n    {}", d.join("\n    ")));
            }
            hits.entry(off).or_default().push((mech, p.nhit));
            if let Some(s) = p.seen {
                seen_by.push((mech, s));
                let pc = s[if cfg!(target_arch = "x86_64") { 16 } else { 32 }];
                if pc != (region.code + off) as u64 {
                    report(stats, off, format!("({mech:?}) handler saw pc {pc:#x}"));
                }
            }
        }
        // The two mechanisms' handlers saw the same registers.
        if let [(_, a), (_, b)] = seen_by[..] {
            let d: Vec<String> =
                (0..SEEN).filter(|k| a[*k] != b[*k]).map(|k| format!("{}: {:#x} breakpoint, {:#x} optimized", seen_name(k), a[k], b[k])).collect();
            if !d.is_empty() {
                report(stats, off, format!("handlers saw different registers:\n    {}", d.join("\n    ")));
            }
        }
        // A handler's change has the same effect through both mechanisms.
        if let [(_, a, na), (_, b, nb)] = &written[..] {
            let mut d = differences(a, b, off == 0, ("breakpoint", "optimized"));
            if na != nb {
                d.push(format!("hits: {na} breakpoint, {nb} optimized"));
            }
            if !d.is_empty() {
                report(stats, off, format!("with a handler that makes {change:?}, the mechanisms diverge:\n    {}", d.join("\n    ")));
            }
        }
    }
    // Hits: every variant of a boundary alike; the body's instructions ran at most
    // once (its branches go forward), the entry once, the helper's as often as it
    // was called.
    let calls: u64 = g.calls.iter().filter_map(|c| hits.get(c)).filter_map(|h| h.first()).map(|(_, n)| n).sum();
    for (&off, h) in &hits {
        let n = h[0].1;
        let bad = if h.iter().any(|(_, m)| *m != n) {
            Some(format!("hit counts differ between variants: {h:?}"))
        } else if off == 0 && n != 1 {
            Some(format!("the entry hit {n} times"))
        } else if off < g.helper && n > 1 {
            Some(format!("a body instruction hit {n} times"))
        } else if off >= g.helper && n != calls {
            Some(format!("a helper instruction hit {n} times, the helper was called {calls} times"))
        } else {
            None
        };
        if let Some(b) = bad {
            report(stats, off, b);
        }
    }
    drop(jit);
}

#[test]
fn probed_runs_equal_unprobed_runs() {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.strip_prefix("0x").map_or_else(|| v.parse().ok(), |h| u64::from_str_radix(h, 16).ok()));
    // About 5 ms a case natively in a release build, 160 ms under qemu-aarch64 (the CI
    // lane).
    let default_cases = if cfg!(target_arch = "x86_64") { 256 } else { 64 };
    let cases = env("PROBEKIT_FUZZ_CASES").unwrap_or(default_cases);
    let seed = env("PROBEKIT_FUZZ_SEED").unwrap_or(0x13_f022);
    let only = env("PROBEKIT_FUZZ_ONLY");
    let region = Region::new();
    let mut scratch = Box::new(Scratch([0; SCRATCH / 8]));
    let mut stats = Stats::default();
    let start = std::time::Instant::now();
    for index in 0..cases {
        if only.is_none_or(|o| o == index) {
            case(seed, index, &region, &mut scratch, &mut stats);
        }
    }
    let compared: u64 = stats.compared.values().sum();
    println!(
        "opt_fuzz: seed {seed:#x}, {} cases, {} unprobed runs, {compared} probed executions compared ({:?}), Optimize::Required refused {:?}, \
         breakpoints refused {:?}, {} divergences, {:.1?}",
        stats.cases,
        stats.unprobed,
        stats.compared,
        stats.refused,
        stats.breakpoint_refused,
        stats.divergences.len(),
        start.elapsed()
    );
    assert!(stats.compared.get("optimized").is_some_and(|n| *n > 0), "no probe was optimized: the fuzzer tests nothing of optprobes");
    let shown = 3.min(stats.divergences.len());
    assert!(shown == 0, "{} divergences; the first {shown}:\n\n{}", stats.divergences.len(), stats.divergences[..shown].join("\n\n"));
}
