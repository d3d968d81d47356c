//! Non-default frames the torture runs through every routine shape. build.rs reads
//! this file with `FrameLayout::from_file`, and the crate compiles it, so the
//! generated offset assertions check probe-codegen's layout against rustc's.
#![allow(dead_code)]

/// x86_64: a subset of registers in unusual order, explicit padding and constants;
/// rcx, rdx, rsi, r8–r11 have no field, so they go through the hidden spill area.
#[repr(C)]
pub struct X86Sparse {
    pub _tag: u32,
    pub rdi: u64,
    pub r12: u64,
    pub eflags: u64,
    pub _pad: [u8; 3],
    pub rax: u64,
    pub rip: u64,
    pub orig_rax: u32,
}

/// x86_64: every register in reverse encoding order with odd padding in between.
#[repr(C)]
pub struct X86Reversed {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub _a: u16,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rbp: u64,
    pub rsp: u64,
    pub rbx: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rax: u64,
    pub ss: u64,
    pub cs: u64,
    pub eflags: u64,
    pub rip: u64,
    pub _b: u8,
    /// Large constants, filled by loops: all ones, and zero with an unaligned head and tail.
    pub orig_rax: [u64; 17],
    pub _c: [u8; 133],
}

/// x86_64: registers past 32 KiB (disp32), no rip field (a kretprobe keeps the
/// resume address in a hidden slot).
#[repr(C)]
pub struct X86Big {
    pub _big: [u64; 4200],
    pub rbx: u64,
    pub rdx: u64,
}

/// x86_64: no register at all; everything is hidden.
#[repr(C)]
pub struct X86Empty {
    pub _nothing: u64,
}

/// aarch64: a subset in unusual order with padding; pc and x0 far from x30.
#[repr(C)]
pub struct A64Sparse {
    pub _tag: u32,
    pub x3: u64,
    pub x20: u64,
    pub pc: u64,
    pub _pad: [u8; 5],
    pub x30: u64,
    pub x0: u64,
}

/// aarch64: register ranges bound by array fields (`regs` = x0.., `x19` = x19..x28).
#[repr(C)]
pub struct A64Ranges {
    pub x19: [u64; 10],
    pub _odd: u8,
    pub orig_x0: [u64; 17],
    pub regs: [u64; 8],
    pub lr: u64,
    pub sp: u64,
    pub pstate: u64,
    pub fp: u64,
}

/// aarch64: fields past 32 KiB, reached through a base register materialised once
/// (x5, the first register below 32 KiB that can serve).
#[repr(C)]
pub struct A64Big {
    pub x0: u64,
    pub x1: u64,
    pub x2: u64,
    pub x5: u64,
    pub _big: [u64; 4200],
    pub x3: u64,
    pub pc: u64,
    pub pstate: u64,
    pub x30: u64,
    pub x19: u64,
}

/// aarch64: no register at all; everything is hidden.
#[repr(C)]
pub struct A64Empty {
    pub _nothing: u64,
}
