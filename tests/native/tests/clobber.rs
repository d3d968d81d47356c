//! Registers after a probed call: for every probe kind, every general register, the
//! flags and the stack pointer after the call equal those of the unprobed run, except
//! the differences the ABI allows, which probe-rt's crate docs list ("Registers after
//! a probed call"). The set of registers that differ is asserted exactly, per kind and
//! architecture, so a new difference fails here, and so does a documented one that
//! went away (the docs must change with it).
//!
//! A harness in asm loads every general register but the stack pointer, and the flags,
//! with known values, calls the target, and stores every general register, the flags
//! and the stack pointer right after the call. Breakpoint and return probes target an
//! asm function (`.type`/`.size` give the symbol tables its boundaries) that changes
//! one register and no flags. Site probes target a `#[traceable] extern "C"` function
//! with an empty body (a bare `ret`, checked), entered at its site, where its wrapper's
//! call lands: the wrapper's own code (a debug build adjusts the stack with `sub`/`add`,
//! which set the flags) would hide what the trampoline left. Every handler scribbles
//! over the caller-saved registers and the flags (reading the frame only: the safe
//! API), so a register the machinery does not restore shows the scribble.
//!
//! Each kind runs with two register sets (the second the complement of the first, the
//! flags all set, then all clear), so that a register left at any fixed value differs
//! from the unprobed run in at least one of them.

use probekit::{Probe, PtRegs, ReturnProbe};
use std::mem::offset_of;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// What the harness reads and writes. General registers by number: x86_64 in encoding
/// order (rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8..r15; the rsp slot unused),
/// aarch64 x0..x30 (x30 is not loaded: the call writes it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Ctx {
    in_gpr: [u64; 32],
    in_flags: u64,
    target: u64,
    out_gpr: [u64; 32],
    out_flags: u64,
    /// The stack pointer at the call (before it pushed anything) and right after it.
    in_sp: u64,
    out_sp: u64,
}

#[cfg(target_arch = "x86_64")]
const NGPR: usize = 16;
#[cfg(target_arch = "aarch64")]
const NGPR: usize = 31;

/// One value of a run that can differ: a general register, the flags or the stack pointer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Value {
    Gpr(usize),
    Flags,
    Sp,
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        #[cfg(target_arch = "x86_64")]
        const NAMES: [&str; NGPR] = ["rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"];
        match self {
            #[cfg(target_arch = "x86_64")]
            Value::Gpr(n) => f.write_str(NAMES[*n]),
            #[cfg(target_arch = "aarch64")]
            Value::Gpr(n) => write!(f, "x{n}"),
            Value::Flags if cfg!(target_arch = "x86_64") => f.write_str("rflags"),
            Value::Flags => f.write_str("nzcv"),
            Value::Sp => f.write_str("sp"),
        }
    }
}

// The harness: `clobber_run(ctx)`. It keeps the host's callee-saved registers on its
// own stack, the target's address and `ctx` in the two words the call is made above
// (`call [rsp]`), and after the call saves the flags first (pushfq), then swaps `ctx`
// into rdi: no register is free there.
#[cfg(target_arch = "x86_64")]
std::arch::global_asm!(
    ".pushsection .text.clobber_run, \"ax\", @progbits",
    ".balign 16",
    ".globl clobber_run",
    ".hidden clobber_run",
    ".type clobber_run, @function",
    "clobber_run:",
    // rsp + 8 was 16-aligned; after 6 pushes and 8 bytes it is again, and after the two
    // words below rsp is 16-aligned at the call, as the SysV ABI wants.
    "push rbp",
    "push rbx",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "sub rsp, 8",
    "push rdi",                            // [rsp + 8] = ctx
    "push qword ptr [rdi + {target}]",     // [rsp] = the target
    "mov qword ptr [rdi + {in_sp}], rsp",
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
    "pushfq",                              // [rsp] = flags, [rsp + 16] = ctx
    "xchg rdi, qword ptr [rsp + 16]",      // xchg: flags untouched
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
    "mov rax, qword ptr [rsp + 16]",       // rdi after the call
    "mov qword ptr [rdi + {out_gpr} + 56], rax",
    "pop rax",
    "mov qword ptr [rdi + {out_flags}], rax",
    "mov qword ptr [rdi + {out_sp}], rsp",
    "cld",
    "add rsp, 24",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbx",
    "pop rbp",
    "ret",
    ".size clobber_run, . - clobber_run",
    ".popsection",
    // The asm targets: rax = rdi + 1, flags untouched (lea).
    ".pushsection .text.clobber_targets, \"ax\", @progbits",
    ".balign 16",
    ".globl clobber_target_bp",
    ".hidden clobber_target_bp",
    ".type clobber_target_bp, @function",
    "clobber_target_bp:",
    "lea rax, [rdi + 1]",
    "ret",
    ".size clobber_target_bp, . - clobber_target_bp",
    ".balign 16",
    ".globl clobber_target_bp_post",
    ".hidden clobber_target_bp_post",
    ".type clobber_target_bp_post, @function",
    "clobber_target_bp_post:",
    "lea rax, [rdi + 1]",
    "ret",
    ".size clobber_target_bp_post, . - clobber_target_bp_post",
    ".balign 16",
    ".globl clobber_target_ret",
    ".hidden clobber_target_ret",
    ".type clobber_target_ret, @function",
    "clobber_target_ret:",
    "lea rax, [rdi + 1]",
    "ret",
    ".size clobber_target_ret, . - clobber_target_ret",
    ".popsection",
    target = const offset_of!(Ctx, target),
    in_sp = const offset_of!(Ctx, in_sp),
    in_flags = const offset_of!(Ctx, in_flags),
    in_gpr = const offset_of!(Ctx, in_gpr),
    out_gpr = const offset_of!(Ctx, out_gpr),
    out_flags = const offset_of!(Ctx, out_flags),
    out_sp = const offset_of!(Ctx, out_sp),
);

// The harness: `clobber_run(ctx)`. Its frame holds the host's x19..x30, `ctx` at
// [sp + 96] and the target at [sp + 104]; x30 is the last base register and then
// carries the target (`blr` overwrites it anyway). After the call x0 goes to the
// target's word, which frees x0 for `ctx`.
#[cfg(target_arch = "aarch64")]
std::arch::global_asm!(
    ".pushsection .text.clobber_run, \"ax\", %progbits",
    ".balign 16",
    ".globl clobber_run",
    ".hidden clobber_run",
    ".type clobber_run, %function",
    "clobber_run:",
    "stp x29, x30, [sp, #-112]!",
    "stp x19, x20, [sp, #16]",
    "stp x21, x22, [sp, #32]",
    "stp x23, x24, [sp, #48]",
    "stp x25, x26, [sp, #64]",
    "stp x27, x28, [sp, #80]",
    "ldr x1, [x0, #{target}]",
    "stp x0, x1, [sp, #96]",
    "mov x1, sp",
    "str x1, [x0, #{in_sp}]",
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
    "ldr x30, [sp, #104]",
    "blr x30",
    // Loads, stores, add and mrs: nothing below changes nzcv before it is read.
    "str x0, [sp, #104]",
    "ldr x0, [sp, #96]",
    "str x1, [x0, #{out_gpr1}]",
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
    "ldr x2, [sp, #104]",
    "str x2, [x1, #0]",
    "mrs x2, nzcv",
    "str x2, [x0, #{out_flags}]",
    "mov x2, sp",
    "str x2, [x0, #{out_sp}]",
    "ldp x19, x20, [sp, #16]",
    "ldp x21, x22, [sp, #32]",
    "ldp x23, x24, [sp, #48]",
    "ldp x25, x26, [sp, #64]",
    "ldp x27, x28, [sp, #80]",
    "ldp x29, x30, [sp], #112",
    "ret",
    ".size clobber_run, . - clobber_run",
    ".popsection",
    // The asm targets: x0 = x0 + 1, flags untouched (add, not adds).
    ".pushsection .text.clobber_targets, \"ax\", %progbits",
    ".balign 16",
    ".globl clobber_target_bp",
    ".hidden clobber_target_bp",
    ".type clobber_target_bp, %function",
    "clobber_target_bp:",
    "add x0, x0, #1",
    "ret",
    ".size clobber_target_bp, . - clobber_target_bp",
    ".balign 16",
    ".globl clobber_target_bp_post",
    ".hidden clobber_target_bp_post",
    ".type clobber_target_bp_post, %function",
    "clobber_target_bp_post:",
    "add x0, x0, #1",
    "ret",
    ".size clobber_target_bp_post, . - clobber_target_bp_post",
    ".balign 16",
    ".globl clobber_target_ret",
    ".hidden clobber_target_ret",
    ".type clobber_target_ret, %function",
    "clobber_target_ret:",
    "add x0, x0, #1",
    "ret",
    ".size clobber_target_ret, . - clobber_target_ret",
    ".popsection",
    target = const offset_of!(Ctx, target),
    in_sp = const offset_of!(Ctx, in_sp),
    in_flags = const offset_of!(Ctx, in_flags),
    in_gpr = const offset_of!(Ctx, in_gpr),
    out_gpr = const offset_of!(Ctx, out_gpr),
    out_gpr1 = const offset_of!(Ctx, out_gpr) + 8,
    out_flags = const offset_of!(Ctx, out_flags),
    out_sp = const offset_of!(Ctx, out_sp),
);

extern "C" {
    fn clobber_run(ctx: *mut Ctx);
    fn clobber_target_bp();
    fn clobber_target_bp_post();
    fn clobber_target_ret();
}

/// The site probe's target: an empty body, entered at its site.
#[probekit::traceable]
pub extern "C" fn clobber_site() {}

/// The target of the return probe on a site.
#[probekit::traceable]
pub extern "C" fn clobber_site_ret() {}

/// The flags the harness loads: x86_64 the status flags (CF PF AF ZF SF OF) over the
/// bits user code cannot clear (IF, reserved bit 1), DF clear as the ABI wants at a
/// call; aarch64 N Z C V.
#[cfg(target_arch = "x86_64")]
const FLAGS: [u64; 2] = [0x202 | 0x8d5, 0x202];
#[cfg(target_arch = "aarch64")]
const FLAGS: [u64; 2] = [0xf000_0000, 0];

/// The register sets: one value per register, its number in two places so a value
/// that moved to another register is told apart; the second set is the complement.
fn input(set: usize, target: usize) -> Ctx {
    let mut ctx = Ctx { in_gpr: [0; 32], in_flags: FLAGS[set], target: target as u64, out_gpr: [0; 32], out_flags: 0, in_sp: 0, out_sp: 0 };
    for (n, g) in ctx.in_gpr.iter_mut().enumerate().take(NGPR) {
        let v = 0x5eed_0000_0000_0000 | (n as u64) << 40 | 0x0c10_b000 | n as u64;
        *g = if set == 0 { v } else { !v };
    }
    ctx
}

/// Runs the harness on `target` with register set `set`.
fn run(set: usize, target: usize) -> Ctx {
    let mut ctx = input(set, target);
    // SAFETY: `ctx` is valid for the harness's reads and writes; the harness restores
    // every callee-saved register and the stack pointer before it returns; the target
    // is a function that takes no arguments it reads as pointers (the asm targets add
    // 1 to the first argument register, the traceable ones have empty bodies), entered
    // as its ABI wants (the stack 16-aligned at the call).
    unsafe { clobber_run(&mut ctx) };
    assert_eq!(ctx.out_sp, ctx.in_sp, "the harness's own check: sp after the call");
    ctx
}

/// The values that differ between two runs.
fn differences(unprobed: &Ctx, probed: &Ctx) -> Vec<Value> {
    let mut d: Vec<Value> = (0..NGPR).filter(|n| unprobed.out_gpr[*n] != probed.out_gpr[*n]).map(Value::Gpr).collect();
    if unprobed.out_flags != probed.out_flags {
        d.push(Value::Flags);
    }
    if unprobed.out_sp != probed.out_sp {
        d.push(Value::Sp);
    }
    d
}

/// Writes known values over every caller-saved general register and the flags (x86_64
/// rax, rcx, rdx, rsi, rdi, r8–r11, status flags; aarch64 x0–x17, nzcv), as any
/// handler may leave them: what the machinery does not restore shows these.
#[inline(never)]
fn scribble() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: writes only registers declared as clobbered, and the flags (no
    // `preserves_flags`).
    unsafe {
        std::arch::asm!(
            "mov rax, 0x0bad", "mov rcx, 0x0bad", "mov rdx, 0x0bad", "mov rsi, 0x0bad", "mov rdi, 0x0bad",
            "mov r8, 0x0bad", "mov r9, 0x0bad", "mov r10, 0x0bad", "mov r11, 0x0bad",
            "xor eax, eax", // ZF PF set, CF OF SF clear
            out("rax") _, out("rcx") _, out("rdx") _, out("rsi") _, out("rdi") _,
            out("r8") _, out("r9") _, out("r10") _, out("r11") _,
        );
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: writes only registers declared as clobbered, and nzcv (no `preserves_flags`).
    unsafe {
        std::arch::asm!(
            "mov x0, #0xbad", "mov x1, #0xbad", "mov x2, #0xbad", "mov x3, #0xbad", "mov x4, #0xbad",
            "mov x5, #0xbad", "mov x6, #0xbad", "mov x7, #0xbad", "mov x8, #0xbad", "mov x9, #0xbad",
            "mov x10, #0xbad", "mov x11, #0xbad", "mov x12, #0xbad", "mov x13, #0xbad", "mov x14, #0xbad",
            "mov x15, #0xbad", "mov x16, #0xbad", "mov x17, #0xbad",
            "msr nzcv, xzr",
            out("x0") _, out("x1") _, out("x2") _, out("x3") _, out("x4") _, out("x5") _, out("x6") _,
            out("x7") _, out("x8") _, out("x9") _, out("x10") _, out("x11") _, out("x12") _, out("x13") _,
            out("x14") _, out("x15") _, out("x16") _, out("x17") _,
        );
    }
}

/// A read-only handler that counts its calls in `hits` and scribbles.
fn counting(hits: &Arc<AtomicU64>) -> impl Fn(&PtRegs) + Send + Sync + 'static {
    let hits = hits.clone();
    move |_regs: &PtRegs| {
        hits.fetch_add(1, Ordering::Relaxed);
        scribble();
    }
}

/// Runs both register sets on `target` unprobed, then with the probe `arm` registers
/// (dropped after), and returns every value that differed in either set, and the
/// probed runs; checks that the unprobed runs changed only what the target does
/// (`site`: a traceable function's site, see [`check_unprobed`]) and that the probe's
/// handlers ran `hits_per_call` times per call (counted in `hits`).
fn compare<P>(target: usize, site: bool, hits: &Arc<AtomicU64>, hits_per_call: u64, arm: impl FnOnce() -> P) -> (Vec<Value>, [Ctx; 2]) {
    let unprobed = [run(0, target), run(1, target)];
    unprobed.iter().for_each(|u| check_unprobed(u, site));
    let probe = arm();
    let probed = [run(0, target), run(1, target)];
    drop(probe);
    assert!(probekit::synchronize(), "a grace period completes");
    assert_eq!(hits.load(Ordering::Relaxed), 2 * hits_per_call, "the handlers ran on every probed call");
    let mut d: Vec<Value> = unprobed.iter().zip(&probed).flat_map(|(u, p)| differences(u, p)).collect();
    d.sort();
    d.dedup();
    (d, probed)
}

/// What an unprobed call changes, which also proves the harness: x86_64 the asm
/// targets' return register (rax = rdi + 1), nothing else; aarch64 the asm targets'
/// x0 (x0 + 1), x30 (the return address the call wrote) and, at a site, x9 (where the
/// site's `mov x9, x30` put it). The flags are left alone.
fn check_unprobed(unprobed: &Ctx, site: bool) {
    #[cfg(target_arch = "x86_64")]
    let (ret, arg) = (0, 7);
    #[cfg(target_arch = "aarch64")]
    let (ret, arg) = (0, 0);
    for n in (0..NGPR).filter(|n| *n != 4 || cfg!(target_arch = "aarch64")) {
        let want = match n {
            _ if n == ret && !site => unprobed.in_gpr[arg].wrapping_add(1),
            9 if site && cfg!(target_arch = "aarch64") => unprobed.out_gpr[30],
            30 => unprobed.out_gpr[30],
            _ => unprobed.in_gpr[n],
        };
        assert_eq!(unprobed.out_gpr[n], want, "unprobed: {} after the call", Value::Gpr(n));
    }
    assert_eq!(unprobed.out_flags, unprobed.in_flags, "unprobed: the flags after the call");
}

/// The site of a traceable function with an empty body: its address, after checking
/// that the site jumps to a body that is a bare `ret` (so what the registers hold
/// after a call of the site is what the probe machinery left).
fn empty_site(name: &str) -> usize {
    let site = probekit::sites().into_iter().find(|s| s.name.ends_with(name)).expect("the site is listed").site;
    // SAFETY: the site, its jump to the body and the body's first instruction are code
    // of this executable, mapped readable, and never written while this runs (no probe
    // is on the function yet).
    let read = |at: usize, n: usize| unsafe { std::slice::from_raw_parts(at as *const u8, n) }.to_vec();
    #[cfg(target_arch = "x86_64")]
    let body = {
        let j = read(site + 5, 5);
        match j[0] {
            0xe9 => (site + 10).wrapping_add_signed(i32::from_le_bytes(j[1..5].try_into().unwrap()) as isize),
            0xeb => (site + 7).wrapping_add_signed(j[1] as i8 as isize),
            op => panic!("the site's jump to the body: opcode {op:#x}"),
        }
    };
    #[cfg(target_arch = "aarch64")]
    let body = {
        let b = u32::from_le_bytes(read(site + 8, 4).try_into().unwrap());
        assert_eq!(b >> 26, 0b000101, "the site's jump to the body is a `b`");
        let imm = ((b & 0x03ff_ffff) << 6) as i32 >> 6;
        (site + 8).wrapping_add_signed(4 * imm as isize)
    };
    #[cfg(target_arch = "x86_64")]
    assert_eq!(read(body, 1), [0xc3], "the body of {name} is a bare `ret`");
    #[cfg(target_arch = "aarch64")]
    assert_eq!(read(body, 4), 0xd65f_03c0u32.to_le_bytes(), "the body of {name} is a bare `ret`");
    site
}

/// The values that differ after each probe kind (the table of probe-rt's crate docs,
/// "Registers after a probed call").
#[cfg(target_arch = "x86_64")]
mod expected {
    use super::Value;
    pub const BREAKPOINT: &[Value] = &[];
    pub const BREAKPOINT_POST: &[Value] = &[];
    /// The site trampoline leaves the status flags as its dispatcher and its own
    /// comparison of the resume address did.
    pub const SITE: &[Value] = &[Value::Flags];
    /// The return trampoline leaves the status flags as its dispatcher did.
    pub const RETURN: &[Value] = &[Value::Flags];
    pub const SITE_RETURN: &[Value] = &[Value::Flags];
}
#[cfg(target_arch = "aarch64")]
mod expected {
    use super::Value;
    pub const BREAKPOINT: &[Value] = &[];
    pub const BREAKPOINT_POST: &[Value] = &[];
    /// The site trampoline resumes through x16: it holds the site's continuation.
    pub const SITE: &[Value] = &[Value::Gpr(16)];
    /// The return stub jumps to the return trampoline through x16.
    pub const RETURN: &[Value] = &[Value::Gpr(16)];
    /// The exit path's exit trampoline resumes through x16.
    pub const SITE_RETURN: &[Value] = &[Value::Gpr(16)];
}

/// The values the documented differences have. x86_64: the flags are the dispatcher's,
/// but DF is clear, as the ABI wants at a return. aarch64: x16 holds `x16` (the site's
/// continuation, or the return trampoline's address).
fn check_documented_values(kind: &str, probed: &[Ctx; 2], x16: u64) {
    for p in probed {
        #[cfg(target_arch = "x86_64")]
        {
            let _ = x16;
            assert_eq!(p.out_flags & 0x400, 0, "{kind}: DF after the call");
        }
        #[cfg(target_arch = "aarch64")]
        assert_eq!(p.out_gpr[16], x16, "{kind}: x16 after the call");
    }
}

/// The address of the return trampoline, from the blacklist (which refuses probes there).
fn return_trampoline() -> u64 {
    probekit::blacklist().iter().find(|b| b.name == "probekit's return trampoline").expect("the return trampoline is blacklisted").start as u64
}

fn names(values: &[Value]) -> String {
    format!("[{}]", values.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", "))
}

#[track_caller]
fn assert_differences(kind: &str, got: &[Value], want: &[Value]) {
    assert!(got == want, "{kind}: registers that differ from the unprobed run: {}, documented: {}", names(got), names(want));
}

#[test]
fn breakpoint_without_post_handler() {
    let target = clobber_target_bp as unsafe extern "C" fn() as usize;
    let hits = Arc::new(AtomicU64::new(0));
    let (d, _) =
        compare(target, false, &hits, 1, || Probe::builder().function(clobber_target_bp as unsafe extern "C" fn()).pre(counting(&hits)).register().unwrap());
    assert_differences("breakpoint", &d, expected::BREAKPOINT);
}

#[test]
fn breakpoint_with_post_handler() {
    let target = clobber_target_bp_post as unsafe extern "C" fn() as usize;
    let hits = Arc::new(AtomicU64::new(0));
    let (d, _) = compare(target, false, &hits, 2, || {
        Probe::builder().function(clobber_target_bp_post as unsafe extern "C" fn()).pre(counting(&hits)).post(counting(&hits)).register().unwrap()
    });
    assert_differences("breakpoint with a post handler", &d, expected::BREAKPOINT_POST);
}

#[test]
fn site_probe() {
    let site = empty_site("::clobber_site");
    let hits = Arc::new(AtomicU64::new(0));
    let (d, probed) = compare(site, true, &hits, 1, || {
        let p = Probe::builder().function(clobber_site as extern "C" fn()).pre(counting(&hits)).register().unwrap();
        assert_eq!(p.address(), site, "the probe rides the site");
        p
    });
    assert_differences("site probe", &d, expected::SITE);
    // aarch64: the site's continuation, where the trampoline resumed (`ret x16`).
    check_documented_values("site probe", &probed, site as u64 + 8);
}

#[test]
fn return_probe() {
    let target = clobber_target_ret as unsafe extern "C" fn() as usize;
    let hits = Arc::new(AtomicU64::new(0));
    let (d, probed) = compare(target, false, &hits, 1, || {
        let hits = hits.clone();
        ReturnProbe::builder()
            .function(clobber_target_ret as unsafe extern "C" fn())
            .handler(move |_regs: &PtRegs, _: &mut ()| {
                hits.fetch_add(1, Ordering::Relaxed);
                scribble();
            })
            .register()
            .unwrap()
    });
    assert_differences("return probe", &d, expected::RETURN);
    // aarch64: the stub jumped to the return trampoline through x16.
    check_documented_values("return probe", &probed, return_trampoline());
}

#[test]
fn entry_and_return_probe_on_a_site() {
    let site = empty_site("::clobber_site_ret");
    let hits = Arc::new(AtomicU64::new(0));
    let (d, probed) = compare(site, true, &hits, 2, || {
        let (entry_hits, return_hits) = (hits.clone(), hits.clone());
        let r = ReturnProbe::builder()
            .function(clobber_site_ret as extern "C" fn())
            .entry_handler(move |_regs: &PtRegs, _: &mut ()| {
                entry_hits.fetch_add(1, Ordering::Relaxed);
                scribble();
                true
            })
            .handler(move |_regs: &PtRegs, _: &mut ()| {
                return_hits.fetch_add(1, Ordering::Relaxed);
                scribble();
            })
            .register()
            .unwrap();
        assert_eq!(r.address(), site, "the return probe's entry rides the site");
        r
    });
    assert_differences("entry and return probe on a site", &d, expected::SITE_RETURN);
    // aarch64: the return came last, through the site's exit path (probe-codegen
    // `site::exit_asm`), whose exit trampoline resumed through x16 after its call: for
    // a function without arguments (no copy), 12 words in (the site's 3, then `mov x9,
    // x30; adrp; ldr; blr; sub sp; str x30; bl body; ldr x9; add sp; adrp; ldr; blr`).
    let _ = return_trampoline;
    check_documented_values("entry and return probe on a site", &probed, site as u64 + 15 * 4);
}
