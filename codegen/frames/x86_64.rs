/// The register frame of a probe hit on x86_64.
///
/// Field order and names are Linux's `struct pt_regs` (arch/x86/include/asm/ptrace.h,
/// up to `ss`) with the user-space names of `struct user_regs_struct`
/// (sys/user.h), so code written against either reads naturally here. Field order is
/// memory order: the trampolines of probe-codegen store each register at the offset
/// of its field, and this file is the only place those offsets come from (probe-codegen
/// parses it, probe-rt `include!`s it).
///
/// Every field holds a defined value when a handler sees the frame:
/// the general registers and `eflags` hold the values of the probed context,
/// `rsp` and `rip` the stack pointer and resume address of that context,
/// `cs` and `ss` the segment selectors, and `orig_rax` is `u64::MAX`
/// (the kernel's "not in a system call").
#[repr(C)]
#[allow(missing_docs)] // each field is the register it is named after
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PtRegs {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub orig_rax: u64,
    pub rip: u64,
    pub cs: u64,
    pub eflags: u64,
    pub rsp: u64,
    pub ss: u64,
}
