//! The built-in register frames.
//!
//! The struct definitions live in `codegen/frames/<arch>.rs`, the one source of truth:
//! probe-codegen parses that file to generate every save/restore sequence, and this
//! module compiles the same text, which probe-codegen hands to the build script
//! (`builtin_source`), so the two cannot drift (DESIGN.md rule 1).

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
include!(concat!(env!("OUT_DIR"), "/frame.rs"));

// The Linux ABI, pinned: user-space tools and the kernel's own offsets
// (arch/x86/include/asm/ptrace.h; arch/arm64/include/uapi/asm/ptrace.h) agree on
// these, and handlers ported from kernel code rely on them.
#[cfg(target_arch = "x86_64")]
const _: () = {
    use memoffset::offset_of;
    use static_assertions::const_assert_eq;
    const_assert_eq!(offset_of!(PtRegs, r15), 0);
    const_assert_eq!(offset_of!(PtRegs, rbx), 40);
    const_assert_eq!(offset_of!(PtRegs, rax), 80);
    const_assert_eq!(offset_of!(PtRegs, rdi), 112);
    const_assert_eq!(offset_of!(PtRegs, orig_rax), 120);
    const_assert_eq!(offset_of!(PtRegs, rip), 128);
    const_assert_eq!(offset_of!(PtRegs, eflags), 144);
    const_assert_eq!(offset_of!(PtRegs, rsp), 152);
    const_assert_eq!(offset_of!(PtRegs, ss), 160);
    const_assert_eq!(core::mem::size_of::<PtRegs>(), 168);
};

#[cfg(target_arch = "aarch64")]
const _: () = {
    use memoffset::offset_of;
    use static_assertions::const_assert_eq;
    const_assert_eq!(offset_of!(PtRegs, regs), 0);
    const_assert_eq!(offset_of!(PtRegs, sp), 248);
    const_assert_eq!(offset_of!(PtRegs, pc), 256);
    const_assert_eq!(offset_of!(PtRegs, pstate), 264);
    const_assert_eq!(core::mem::size_of::<PtRegs>(), 272);
};

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
impl PtRegs {
    /// The address execution resumes at (`rip` / `pc`).
    pub fn instruction_pointer(&self) -> u64 {
        #[cfg(target_arch = "x86_64")]
        return self.rip;
        #[cfg(target_arch = "aarch64")]
        return self.pc;
    }

    /// Sets where execution resumes (`rip` / `pc`): a handler that changes it
    /// redirects execution (the probed instruction, or the function, is skipped).
    pub fn set_instruction_pointer(&mut self, pc: u64) {
        #[cfg(target_arch = "x86_64")]
        {
            self.rip = pc;
        }
        #[cfg(target_arch = "aarch64")]
        {
            self.pc = pc;
        }
    }

    /// The stack pointer of the probed context (`rsp` / `sp`). A breakpoint handler's
    /// change to it is applied; a site handler's only as part of returning from the
    /// function (rsp + 8 with rip = the return address, what [`crate::Entry::Override`]
    /// does); a return handler's is ignored.
    pub fn stack_pointer(&self) -> u64 {
        #[cfg(target_arch = "x86_64")]
        return self.rsp;
        #[cfg(target_arch = "aarch64")]
        return self.sp;
    }

    /// Integer argument `n` at a function entry (System V: rdi, rsi, rdx, rcx, r8, r9;
    /// AAPCS64: x0..x7), or `None` past the registers.
    pub fn arg(&self, n: usize) -> Option<u64> {
        #[cfg(target_arch = "x86_64")]
        return [self.rdi, self.rsi, self.rdx, self.rcx, self.r8, self.r9].get(n).copied();
        #[cfg(target_arch = "aarch64")]
        return self.regs[..8].get(n).copied();
    }

    /// Sets integer argument `n` at a function entry (the registers of [`Self::arg`]);
    /// false past the registers.
    pub fn set_arg(&mut self, n: usize, v: u64) -> bool {
        #[cfg(target_arch = "x86_64")]
        let r = [&mut self.rdi, &mut self.rsi, &mut self.rdx, &mut self.rcx, &mut self.r8, &mut self.r9].into_iter().nth(n);
        #[cfg(target_arch = "aarch64")]
        let r = self.regs[..8].get_mut(n);
        r.map(|r| *r = v).is_some()
    }

    /// The integer return value at a function return (`rax` / `x0`).
    pub fn return_value(&self) -> u64 {
        #[cfg(target_arch = "x86_64")]
        return self.rax;
        #[cfg(target_arch = "aarch64")]
        return self.regs[0];
    }

    /// Sets the integer return value (`rax` / `x0`).
    pub fn set_return_value(&mut self, v: u64) {
        #[cfg(target_arch = "x86_64")]
        {
            self.rax = v;
        }
        #[cfg(target_arch = "aarch64")]
        {
            self.regs[0] = v;
        }
    }

    /// The FP/SIMD return register (`xmm0` / `q0`) in a return probe's handler, where
    /// the trampoline keeps the FP/SIMD argument and return registers; `None` elsewhere
    /// (a breakpoint handler, a copy of the frame, a `#[traceable]` function whose
    /// return value no FP/SIMD register carries, whose trampolines keep none).
    pub fn fp_return(&self) -> Option<VReg> {
        let area = crate::retprobe::fp_area_of(self)?;
        // SAFETY: the trampoline's FP area starts with xmm0 / q0, 16 bytes, 16-aligned,
        // alive while its handler (which holds `self`) runs.
        Some(VReg(unsafe { *(area as *const u128) }))
    }
}

/// The 128 bits of an FP/SIMD register (`xmm` / `q`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VReg(pub u128);

impl VReg {
    /// The low 64 bits as an `f64` (a scalar `double` return value).
    pub fn as_f64(self) -> f64 {
        f64::from_bits(self.0 as u64)
    }

    /// The low 32 bits as an `f32` (a scalar `float` return value).
    pub fn as_f32(self) -> f32 {
        f32::from_bits(self.0 as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accessors_read_the_abi_registers() {
        let mut r = PtRegs::default();
        r.set_return_value(7);
        assert_eq!(r.return_value(), 7);
        #[cfg(target_arch = "x86_64")]
        {
            r.rdi = 1;
            r.r9 = 6;
            assert_eq!((r.arg(0), r.arg(5), r.arg(6)), (Some(1), Some(6), None));
        }
        #[cfg(target_arch = "aarch64")]
        {
            r.regs[0] = 1;
            r.regs[7] = 8;
            assert_eq!((r.arg(0), r.arg(7), r.arg(8)), (Some(1), Some(8), None));
        }
        assert_eq!(crate::offsets::S_FRAME_SIZE, core::mem::size_of::<PtRegs>());
    }
}
