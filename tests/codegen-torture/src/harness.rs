//! The harness that enters a routine with every register set and captures every
//! register after it. Test scaffolding, not a trampoline: it addresses only `Ctx`,
//! whose offsets are `const` operands from `offset_of!`.
//!
//! On entry the harness saves the host's callee-saved state, switches to the test
//! stack at `P` (the target routine at `[P]`, the `Ctx` pointer at `[P+8]`), loads the
//! flags, vector and general registers from `Ctx` (x86_64: and a value on the x87
//! stack if `Ctx::x87` asks, popped after) and enters the routine as its shape is
//! entered. At the continuation it captures everything without a free register by
//! using the words above `P`, and returns to the host.

use super::Ctx;
use std::mem::offset_of;

/// How a routine is entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// `call [P]` / `ldr x30, [sp]; blr x30`: a routine called like a function.
    Call,
    /// Return into the routine: x86_64 `call f` where f drops its return address and
    /// jumps to the routine; aarch64 `br` to it with x30 = the routine (as the probed
    /// function's `ret` would). The handler returns the continuation.
    Kret,
    /// aarch64 ftrace site: `mov x9, x30; bl <routine>`.
    Ftrace,
}

#[cfg(target_arch = "x86_64")]
macro_rules! x86_harness {
    ($name:literal, $invoke:literal, $alt:literal) => {
        core::arch::global_asm!(
            concat!(
                ".pushsection .text.", $name, ", \"ax\", @progbits\n",
                ".balign 16\n.globl ", $name, "\n.hidden ", $name, "\n.type ", $name, ", @function\n",
                $name, ":\n",
                "push rbp\npush rbx\npush r12\npush r13\npush r14\npush r15\nsub rsp, 8\n",
                "mov qword ptr [rdi + {host_sp}], rsp\n",
                "mov rsp, qword ptr [rdi + {p}]\n",
                "cmp qword ptr [rdi + {x87}], 0\nje 5f\nfld1\n5:\n",
                // The bits above 127 first (`Ctx::upper`; the legacy `movups` below keeps
                // them): zmm0-31 and k0-7, or ymm0-15. Before the flags are loaded, with
                // rax not yet.
                "mov rax, qword ptr [rdi + {upper}]\n",
                "test al, 2\njz 7f\n",
                ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31\n",
                "vmovdqu64 zmm\\i, zmmword ptr [rdi + {in_zmm} + 64 * \\i]\n.endr\n",
                ".irp i, 0,1,2,3,4,5,6,7\nkmovq k\\i, qword ptr [rdi + {in_k} + 8 * \\i]\n.endr\n",
                "7:\ntest al, 1\njz 8f\n",
                ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15\n",
                "vmovdqu ymm\\i, ymmword ptr [rdi + {in_zmm} + 64 * \\i]\n.endr\n",
                "8:\n",
                "push qword ptr [rdi + {in_flags}]\npopfq\n",
                "movups xmm0, [rdi + {in_vec} + 0]\nmovups xmm1, [rdi + {in_vec} + 16]\n",
                "movups xmm2, [rdi + {in_vec} + 32]\nmovups xmm3, [rdi + {in_vec} + 48]\n",
                "movups xmm4, [rdi + {in_vec} + 64]\nmovups xmm5, [rdi + {in_vec} + 80]\n",
                "movups xmm6, [rdi + {in_vec} + 96]\nmovups xmm7, [rdi + {in_vec} + 112]\n",
                "movups xmm8, [rdi + {in_vec} + 128]\nmovups xmm9, [rdi + {in_vec} + 144]\n",
                "movups xmm10, [rdi + {in_vec} + 160]\nmovups xmm11, [rdi + {in_vec} + 176]\n",
                "movups xmm12, [rdi + {in_vec} + 192]\nmovups xmm13, [rdi + {in_vec} + 208]\n",
                "movups xmm14, [rdi + {in_vec} + 224]\nmovups xmm15, [rdi + {in_vec} + 240]\n",
                "mov rax, [rdi + {in_gpr} + 0]\nmov rcx, [rdi + {in_gpr} + 8]\n",
                "mov rdx, [rdi + {in_gpr} + 16]\nmov rbx, [rdi + {in_gpr} + 24]\n",
                "mov rbp, [rdi + {in_gpr} + 40]\nmov rsi, [rdi + {in_gpr} + 48]\n",
                "mov r8, [rdi + {in_gpr} + 64]\nmov r9, [rdi + {in_gpr} + 72]\n",
                "mov r10, [rdi + {in_gpr} + 80]\nmov r11, [rdi + {in_gpr} + 88]\n",
                "mov r12, [rdi + {in_gpr} + 96]\nmov r13, [rdi + {in_gpr} + 104]\n",
                "mov r14, [rdi + {in_gpr} + 112]\nmov r15, [rdi + {in_gpr} + 120]\n",
                "mov rdi, [rdi + {in_gpr} + 56]\n",
                $invoke,
                // Capture: flags first (pushfq writes [P-8]), then swap the Ctx pointer in.
                "pushfq\n",
                "xchg rdi, qword ptr [rsp + 16]\n",
                "mov [rdi + {out_gpr} + 0], rax\nmov [rdi + {out_gpr} + 8], rcx\n",
                "mov [rdi + {out_gpr} + 16], rdx\nmov [rdi + {out_gpr} + 24], rbx\n",
                "mov [rdi + {out_gpr} + 40], rbp\nmov [rdi + {out_gpr} + 48], rsi\n",
                "mov [rdi + {out_gpr} + 64], r8\nmov [rdi + {out_gpr} + 72], r9\n",
                "mov [rdi + {out_gpr} + 80], r10\nmov [rdi + {out_gpr} + 88], r11\n",
                "mov [rdi + {out_gpr} + 96], r12\nmov [rdi + {out_gpr} + 104], r13\n",
                "mov [rdi + {out_gpr} + 112], r14\nmov [rdi + {out_gpr} + 120], r15\n",
                "mov rax, [rsp + 16]\nmov [rdi + {out_gpr} + 56], rax\n",
                "pop rax\nmov [rdi + {out_flags}], rax\n",
                "mov [rdi + {out_sp}], rsp\n",
                "movups [rdi + {out_vec} + 0], xmm0\nmovups [rdi + {out_vec} + 16], xmm1\n",
                "movups [rdi + {out_vec} + 32], xmm2\nmovups [rdi + {out_vec} + 48], xmm3\n",
                "movups [rdi + {out_vec} + 64], xmm4\nmovups [rdi + {out_vec} + 80], xmm5\n",
                "movups [rdi + {out_vec} + 96], xmm6\nmovups [rdi + {out_vec} + 112], xmm7\n",
                "movups [rdi + {out_vec} + 128], xmm8\nmovups [rdi + {out_vec} + 144], xmm9\n",
                "movups [rdi + {out_vec} + 160], xmm10\nmovups [rdi + {out_vec} + 176], xmm11\n",
                "movups [rdi + {out_vec} + 192], xmm12\nmovups [rdi + {out_vec} + 208], xmm13\n",
                "movups [rdi + {out_vec} + 224], xmm14\nmovups [rdi + {out_vec} + 240], xmm15\n",
                // The bits above 127 (`Ctx::capture`: 2 zmm0-31 and k0-7, 1 ymm0-15).
                "cmp qword ptr [rdi + {capture}], 2\njne 7f\n",
                ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31\n",
                "vmovdqu64 zmmword ptr [rdi + {out_zmm} + 64 * \\i], zmm\\i\n.endr\n",
                ".irp i, 0,1,2,3,4,5,6,7\nkmovq qword ptr [rdi + {out_k} + 8 * \\i], k\\i\n.endr\n",
                "7:\ncmp qword ptr [rdi + {capture}], 1\njne 8f\n",
                ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15\n",
                "vmovdqu ymmword ptr [rdi + {out_zmm} + 64 * \\i], ymm\\i\n.endr\n",
                "8:\n",
                "cmp qword ptr [rdi + {x87}], 0\nje 6f\nfstp st(0)\n6:\n",
                "cld\n",
                "mov rsp, qword ptr [rdi + {host_sp}]\n",
                "add rsp, 8\npop r15\npop r14\npop r13\npop r12\npop rbx\npop rbp\nret\n",
                $alt,
                ".size ", $name, ", . - ", $name, "\n.popsection\n"
            ),
            host_sp = const offset_of!(Ctx, host_sp),
            p = const offset_of!(Ctx, p),
            in_flags = const offset_of!(Ctx, in_flags),
            in_vec = const offset_of!(Ctx, in_vec),
            in_gpr = const offset_of!(Ctx, in_gpr),
            out_gpr = const offset_of!(Ctx, out_gpr),
            out_flags = const offset_of!(Ctx, out_flags),
            out_sp = const offset_of!(Ctx, out_sp),
            out_vec = const offset_of!(Ctx, out_vec),
            x87 = const offset_of!(Ctx, x87),
            upper = const offset_of!(Ctx, upper),
            capture = const offset_of!(Ctx, capture),
            in_zmm = const offset_of!(Ctx, in_zmm),
            out_zmm = const offset_of!(Ctx, out_zmm),
            in_k = const offset_of!(Ctx, in_k),
            out_k = const offset_of!(Ctx, out_k),
        );
    };
}

#[cfg(target_arch = "x86_64")]
// A handler that redirects execution sends it to `torture_alt_call`, which clears the
// marker word at [P+24] (no register is free) and continues as usual.
x86_harness!(
    "torture_enter_call",
    "call qword ptr [rsp]\n.globl torture_cont_call\ntorture_cont_call:\n",
    ".globl torture_alt_call\ntorture_alt_call:\nmov qword ptr [rsp + 24], 0\njmp torture_cont_call\n"
);
// The "function" at 2: drops its return address (lea: flags untouched), scrubs it
// (only the handler may know it), and, as a hijacked `ret` would, continues in the
// routine at [P] with rsp = P.
#[cfg(target_arch = "x86_64")]
x86_harness!(
    "torture_enter_kret",
    "call 2f\n.globl torture_cont_kret\ntorture_cont_kret:\njmp 3f\n2:\nlea rsp, [rsp + 8]\nmov qword ptr [rsp - 8], 0\njmp qword ptr [rsp]\n3:\n",
    ""
);

#[cfg(target_arch = "aarch64")]
macro_rules! a64_harness {
    ($name:literal, $invoke:literal, $alt:literal) => {
        core::arch::global_asm!(
            concat!(
                ".pushsection .text.", $name, ", \"ax\", %progbits\n",
                ".balign 16\n.globl ", $name, "\n.hidden ", $name, "\n.type ", $name, ", %function\n",
                $name, ":\n",
                "stp x29, x30, [sp, #-160]!\n",
                "stp x19, x20, [sp, #16]\nstp x21, x22, [sp, #32]\nstp x23, x24, [sp, #48]\n",
                "stp x25, x26, [sp, #64]\nstp x27, x28, [sp, #80]\n",
                "stp d8, d9, [sp, #96]\nstp d10, d11, [sp, #112]\nstp d12, d13, [sp, #128]\nstp d14, d15, [sp, #144]\n",
                "mov x1, sp\nstr x1, [x0, #{host_sp}]\n",
                "ldr x1, [x0, #{p}]\nmov sp, x1\n",
                "ldr x1, [x0, #{in_flags}]\nmsr nzcv, x1\n",
                "add x1, x0, #{in_vec}\n",
                "ldp q0, q1, [x1, #0]\nldp q2, q3, [x1, #32]\nldp q4, q5, [x1, #64]\nldp q6, q7, [x1, #96]\n",
                "ldp q8, q9, [x1, #128]\nldp q10, q11, [x1, #160]\nldp q12, q13, [x1, #192]\nldp q14, q15, [x1, #224]\n",
                "ldp q16, q17, [x1, #256]\nldp q18, q19, [x1, #288]\nldp q20, q21, [x1, #320]\nldp q22, q23, [x1, #352]\n",
                "ldp q24, q25, [x1, #384]\nldp q26, q27, [x1, #416]\nldp q28, q29, [x1, #448]\nldp q30, q31, [x1, #480]\n",
                "add x1, x0, #{in_gpr}\n",
                "ldr x30, [x1, #240]\n",
                "ldp x28, x29, [x1, #224]\nldp x26, x27, [x1, #208]\nldp x24, x25, [x1, #192]\n",
                "ldp x22, x23, [x1, #176]\nldp x20, x21, [x1, #160]\nldp x18, x19, [x1, #144]\n",
                "ldp x16, x17, [x1, #128]\nldp x14, x15, [x1, #112]\nldp x12, x13, [x1, #96]\n",
                "ldp x10, x11, [x1, #80]\nldp x8, x9, [x1, #64]\nldp x6, x7, [x1, #48]\n",
                "ldp x4, x5, [x1, #32]\nldp x2, x3, [x1, #16]\nldp x0, x1, [x1, #0]\n",
                $invoke,
                // Capture: x0 to the scratch word at [P+16], the Ctx pointer from [P+8].
                "str x0, [sp, #16]\n",
                "ldr x0, [sp, #8]\n",
                "str x1, [x0, #{out_gpr1}]\n",
                "add x1, x0, #{out_gpr}\n",
                "stp x2, x3, [x1, #16]\nstp x4, x5, [x1, #32]\nstp x6, x7, [x1, #48]\nstp x8, x9, [x1, #64]\n",
                "stp x10, x11, [x1, #80]\nstp x12, x13, [x1, #96]\nstp x14, x15, [x1, #112]\nstp x16, x17, [x1, #128]\n",
                "stp x18, x19, [x1, #144]\nstp x20, x21, [x1, #160]\nstp x22, x23, [x1, #176]\nstp x24, x25, [x1, #192]\n",
                "stp x26, x27, [x1, #208]\nstp x28, x29, [x1, #224]\nstr x30, [x1, #240]\n",
                "ldr x2, [sp, #16]\nstr x2, [x1, #0]\n",
                "mrs x2, nzcv\nstr x2, [x0, #{out_flags}]\n",
                "mov x2, sp\nstr x2, [x0, #{out_sp}]\n",
                "add x1, x0, #{out_vec}\n",
                "stp q0, q1, [x1, #0]\nstp q2, q3, [x1, #32]\nstp q4, q5, [x1, #64]\nstp q6, q7, [x1, #96]\n",
                "stp q8, q9, [x1, #128]\nstp q10, q11, [x1, #160]\nstp q12, q13, [x1, #192]\nstp q14, q15, [x1, #224]\n",
                "stp q16, q17, [x1, #256]\nstp q18, q19, [x1, #288]\nstp q20, q21, [x1, #320]\nstp q22, q23, [x1, #352]\n",
                "stp q24, q25, [x1, #384]\nstp q26, q27, [x1, #416]\nstp q28, q29, [x1, #448]\nstp q30, q31, [x1, #480]\n",
                "ldr x1, [x0, #{host_sp}]\nmov sp, x1\n",
                "ldp d8, d9, [sp, #96]\nldp d10, d11, [sp, #112]\nldp d12, d13, [sp, #128]\nldp d14, d15, [sp, #144]\n",
                "ldp x19, x20, [sp, #16]\nldp x21, x22, [sp, #32]\nldp x23, x24, [sp, #48]\n",
                "ldp x25, x26, [sp, #64]\nldp x27, x28, [sp, #80]\n",
                "ldp x29, x30, [sp], #160\nret\n",
                $alt,
                ".size ", $name, ", . - ", $name, "\n.popsection\n"
            ),
            host_sp = const offset_of!(Ctx, host_sp),
            p = const offset_of!(Ctx, p),
            in_flags = const offset_of!(Ctx, in_flags),
            in_vec = const offset_of!(Ctx, in_vec),
            in_gpr = const offset_of!(Ctx, in_gpr),
            out_gpr = const offset_of!(Ctx, out_gpr),
            out_gpr1 = const offset_of!(Ctx, out_gpr) + 8,
            out_flags = const offset_of!(Ctx, out_flags),
            out_sp = const offset_of!(Ctx, out_sp),
            out_vec = const offset_of!(Ctx, out_vec),
        );
    };
}

#[cfg(target_arch = "aarch64")]
a64_harness!(
    "torture_enter_call",
    "ldr x30, [sp]\nblr x30\n.globl torture_cont_call\ntorture_cont_call:\n",
    ".globl torture_alt_call\ntorture_alt_call:\nstr xzr, [sp, #24]\nb torture_cont_call\n"
);
#[cfg(target_arch = "aarch64")]
a64_harness!("torture_enter_kret", "ldr x30, [sp]\nbr x30\n.globl torture_cont_kret\ntorture_cont_kret:\n", "");
#[cfg(target_arch = "aarch64")]
a64_harness!(
    "torture_enter_ftrace",
    "mov x9, x30\nldr x30, [sp]\nblr x30\n.globl torture_cont_ftrace\ntorture_cont_ftrace:\n",
    ".globl torture_alt_ftrace\ntorture_alt_ftrace:\nstr xzr, [sp, #24]\nb torture_cont_ftrace\n"
);

extern "C" {
    fn torture_enter_call(ctx: *mut Ctx);
    fn torture_enter_kret(ctx: *mut Ctx);
    #[cfg(target_arch = "aarch64")]
    fn torture_enter_ftrace(ctx: *mut Ctx);
    fn torture_cont_call();
    fn torture_cont_kret();
    #[cfg(target_arch = "aarch64")]
    fn torture_cont_ftrace();
    fn torture_alt_call();
    #[cfg(target_arch = "aarch64")]
    fn torture_alt_ftrace();
}

/// Where a handler may redirect execution to (`None`: this entry cannot be redirected,
/// a kretprobe resumes where its handler says).
pub fn alt_address(entry: Entry) -> Option<usize> {
    match entry {
        Entry::Call => Some(torture_alt_call as *const () as usize),
        Entry::Kret => None,
        #[cfg(target_arch = "aarch64")]
        Entry::Ftrace => Some(torture_alt_ftrace as *const () as usize),
        #[cfg(not(target_arch = "aarch64"))]
        Entry::Ftrace => None,
    }
}

/// Runs the harness.
///
/// # Safety
/// `ctx` must be fully set up by [`crate::torture`]: its `p` points into a live test
/// stack holding the routine at `[p]` and `ctx` at `[p+8]`.
pub unsafe fn enter(entry: Entry, ctx: &mut Ctx) {
    // SAFETY: per the function's contract; the harness restores every callee-saved
    // register and the host stack before it returns.
    unsafe {
        match entry {
            Entry::Call => torture_enter_call(ctx),
            Entry::Kret => torture_enter_kret(ctx),
            #[cfg(target_arch = "aarch64")]
            Entry::Ftrace => torture_enter_ftrace(ctx),
            #[cfg(not(target_arch = "aarch64"))]
            Entry::Ftrace => unreachable!("the ftrace site sequence is aarch64's"),
        }
    }
}

/// Address execution continues at after the routine.
pub fn cont_address(entry: Entry) -> usize {
    match entry {
        Entry::Call => torture_cont_call as *const () as usize,
        Entry::Kret => torture_cont_kret as *const () as usize,
        #[cfg(target_arch = "aarch64")]
        Entry::Ftrace => torture_cont_ftrace as *const () as usize,
        #[cfg(not(target_arch = "aarch64"))]
        Entry::Ftrace => unreachable!("the ftrace site sequence is aarch64's"),
    }
}

/// The current value of x86_64 segment register number `n` (es, cs, ss, ds, fs, gs).
pub fn segment(n: u8) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        let v: u64;
        // SAFETY: reading a segment selector has no side effects.
        unsafe {
            match n {
                0 => core::arch::asm!("mov {}, es", out(reg) v),
                1 => core::arch::asm!("mov {}, cs", out(reg) v),
                2 => core::arch::asm!("mov {}, ss", out(reg) v),
                3 => core::arch::asm!("mov {}, ds", out(reg) v),
                4 => core::arch::asm!("mov {}, fs", out(reg) v),
                _ => core::arch::asm!("mov {}, gs", out(reg) v),
            }
        }
        v
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = n;
        0
    }
}
