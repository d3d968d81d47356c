//! The signal context ↔ [`PtRegs`]: what a breakpoint handler reads and writes back.

use crate::PtRegs;

#[cfg(target_arch = "x86_64")]
mod imp {
    use super::PtRegs;
    use libc::{
        ucontext_t, REG_EFL, REG_R10, REG_R11, REG_R12, REG_R13, REG_R14, REG_R15, REG_R8, REG_R9, REG_RAX, REG_RBP, REG_RBX, REG_RCX, REG_RDI, REG_RDX,
        REG_RIP, REG_RSI, REG_RSP,
    };

    /// Flags a handler may change: the status flags and DF (not TF, IF, …).
    pub(crate) const USER_FLAGS: u64 = 0xcd5 | 0x400;

    /// (field accessor, gregs index) of every general register.
    macro_rules! gprs {
        ($m:ident) => {
            $m!(r15 REG_R15, r14 REG_R14, r13 REG_R13, r12 REG_R12, rbp REG_RBP, rbx REG_RBX, r11 REG_R11,
                r10 REG_R10, r9 REG_R9, r8 REG_R8, rax REG_RAX, rcx REG_RCX, rdx REG_RDX, rsi REG_RSI, rdi REG_RDI)
        };
    }

    /// The frame of the interrupted context, reporting `pc` as its instruction pointer.
    pub(crate) fn read(uc: &ucontext_t, pc: u64) -> PtRegs {
        let g = &uc.uc_mcontext.gregs;
        let mut r = PtRegs::default();
        macro_rules! rd { ($($f:ident $i:ident),*) => { $( r.$f = g[$i as usize] as u64; )* }; }
        gprs!(rd);
        r.orig_rax = u64::MAX;
        r.rip = pc;
        r.eflags = g[REG_EFL as usize] as u64;
        r.rsp = g[REG_RSP as usize] as u64;
        // CSGSFS packs cs, gs, fs, ss (16 bits each) in that order.
        let csgsfs = g[libc::REG_CSGSFS as usize] as u64;
        r.cs = csgsfs & 0xffff;
        r.ss = (csgsfs >> 48) & 0xffff;
        r
    }

    /// Writes the handler's changes back: general registers, `rsp` (a return probe's
    /// override pops the return address), user flags, pc. `cs`, `ss` and `orig_rax`
    /// are read-only.
    pub(crate) fn write(uc: &mut ucontext_t, r: &PtRegs) {
        let g = &mut uc.uc_mcontext.gregs;
        macro_rules! wr { ($($f:ident $i:ident),*) => { $( g[$i as usize] = r.$f as i64; )* }; }
        gprs!(wr);
        g[REG_RSP as usize] = r.rsp as i64;
        let flags = g[REG_EFL as usize] as u64;
        g[REG_EFL as usize] = ((flags & !USER_FLAGS) | (r.eflags & USER_FLAGS)) as i64;
        g[REG_RIP as usize] = r.rip as i64;
    }

    pub(crate) fn pc(uc: &ucontext_t) -> u64 {
        uc.uc_mcontext.gregs[REG_RIP as usize] as u64
    }

    pub(crate) fn set_pc(uc: &mut ucontext_t, pc: u64) {
        uc.uc_mcontext.gregs[REG_RIP as usize] = pc as i64;
    }
}

#[cfg(target_arch = "aarch64")]
mod imp {
    use super::PtRegs;
    use libc::ucontext_t;

    /// Flags a handler may change: N, Z, C, V.
    const NZCV: u64 = 0xf000_0000;

    /// The frame of the interrupted context, reporting `pc` as its program counter.
    pub(crate) fn read(uc: &ucontext_t, pc: u64) -> PtRegs {
        let m = &uc.uc_mcontext;
        PtRegs { regs: m.regs, sp: m.sp, pc, pstate: m.pstate & NZCV }
    }

    /// Writes the handler's changes back: x0..x30, sp, NZCV, pc.
    pub(crate) fn write(uc: &mut ucontext_t, r: &PtRegs) {
        let m = &mut uc.uc_mcontext;
        m.regs = r.regs;
        m.sp = r.sp;
        m.pstate = (m.pstate & !NZCV) | (r.pstate & NZCV);
        m.pc = r.pc;
    }

    pub(crate) fn pc(uc: &ucontext_t) -> u64 {
        uc.uc_mcontext.pc
    }

    pub(crate) fn set_pc(uc: &mut ucontext_t, pc: u64) {
        uc.uc_mcontext.pc = pc;
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use imp::USER_FLAGS;
pub(crate) use imp::{pc, read, set_pc, write};
