/// The register frame of a probe hit on aarch64.
///
/// Layout of Linux's `struct user_pt_regs` (arch/arm64/include/uapi/asm/ptrace.h):
/// `regs[0..31]` are x0..x30, then `sp`, `pc` and `pstate`. Field order is memory
/// order: the trampolines of probe-codegen store each register at the offset of its
/// field, and this file is the only place those offsets come from (probe-codegen
/// parses it, probe-rt `include!`s it).
///
/// Every field holds a defined value when a handler sees the frame: `regs` and
/// `sp` hold the probed context, `pc` its resume address, and `pstate` its condition
/// flags (NZCV, bits 31..28; the other bits read as zero, user space cannot read them).
#[repr(C)]
#[allow(missing_docs)] // each field is the register it is named after
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PtRegs {
    pub regs: [u64; 31],
    pub sp: u64,
    pub pc: u64,
    pub pstate: u64,
}
