//! Frames declared with `#[probekit::pt_regs]`: the macro generates their routines,
//! the torture runs them like the others. build.rs reads this file for the checker's
//! table; the options below must match its `MACRO_FRAMES` list.
#![allow(dead_code)]

use crate::torture_handler;

/// One frame for both architectures: per-arch bindings, a register range, padding,
/// an arch-only field, fields in unusual order.
#[probekit::pt_regs(shapes(save_restore, kretprobe, entry, site), policy = caller_saved, fp = args, handler = mixed_handler)]
#[repr(C)]
pub struct MacroMixed {
    #[reg(x86_64 = "rip", aarch64 = "pc")]
    pub ip: u64,
    pub _tag: u16,
    #[reg(x86_64 = "r8..=r11", aarch64 = "x19..=x22")]
    pub range: [u64; 4],
    #[reg(x86_64 = "rdi", aarch64 = "x0")]
    pub arg0: u64,
    #[reg(aarch64 = "x30")]
    pub lr: u64,
    #[reg(x86_64 = "eflags", aarch64 = "pstate")]
    pub flags: u64,
    #[reg(x86_64 = "rbx", aarch64 = "x29")]
    pub callee: u64,
    #[reg(x86_64 = "rsp", aarch64 = "sp")]
    pub stack: u64,
}

/// Every general register under `All` with the full FP/SIMD state (no pc field: no
/// site routine).
#[probekit::pt_regs(shapes(save_restore, kretprobe, entry), policy = all, fp = full, handler = full_handler)]
#[repr(C)]
pub struct MacroFull {
    #[reg(x86_64 = "rax..=r15", aarch64 = "x0..=x15")]
    pub gprs: [u64; 16],
    #[reg(aarch64 = "x16..=x30")]
    pub high: [u64; 15],
    #[reg(x86_64 = "eflags", aarch64 = "pstate")]
    pub flags: u64,
}

unsafe extern "C" fn mixed_handler(frame: *mut MacroMixed, fp: *mut u8) -> usize {
    // SAFETY: called by the routines with their frame and FP area.
    unsafe { torture_handler(frame.cast(), fp) }
}

unsafe extern "C" fn full_handler(frame: *mut MacroFull, fp: *mut u8) -> usize {
    // SAFETY: as above.
    unsafe { torture_handler(frame.cast(), fp) }
}
