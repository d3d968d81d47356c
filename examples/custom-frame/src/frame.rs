//! The frame this crate's trampoline saves: only the registers it cares about, in its
//! own order, the same struct on x86_64 and aarch64. `#[pt_regs]` (without shapes)
//! declares it and checks its layout; build.rs reads this file to generate the code.

#[probekit::pt_regs]
#[repr(C)]
#[derive(Debug)]
pub struct MyRegs {
    /// First integer argument.
    #[reg(x86_64 = "rdi", aarch64 = "x0")]
    pub arg0: u64,
    /// Second integer argument.
    #[reg(x86_64 = "rsi", aarch64 = "x1")]
    pub arg1: u64,
    /// A scratch register the handler writes the result into.
    #[reg(x86_64 = "rax", aarch64 = "x2")]
    pub result: u64,
    /// Where the routine returns to.
    #[reg(x86_64 = "rip", aarch64 = "pc")]
    pub ip: u64,
    /// The caller's stack pointer (read-only).
    #[reg(x86_64 = "rsp", aarch64 = "sp")]
    pub sp: u64,
    /// Reserved, zero.
    pub _reserved: u32,
}
