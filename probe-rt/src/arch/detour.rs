//! Jump-optimized probes (the kernel's optprobes): the detour block each optimized
//! address jumps to, its layout and encodings, and the displaced instructions: which
//! can be displaced (x86_64: whole instructions covering the 5-byte `jmp rel32`, and
//! the function they are in decoded whole, as `can_optimize` in the kernel's
//! arch/x86/kernel/kprobes/opt.c; aarch64: the one instruction a `b` replaces) and
//! their copies relocated for the block.
//!
//! # The block
//! One block of [`BLOCK`] bytes per optimized address, near it (x86_64 ±2 GiB, aarch64
//! ±128 MiB: a slot page, see `registry::NEAR`). It starts with two words the
//! dispatcher and the entry read, then three resume stubs, then the code the probed
//! address jumps to:
//!
//! ```text
//! x86_64                                     aarch64
//! +0   .quad probed address                  +0   .quad probed address
//! +8   .quad trampoline                      +8   .quad trampoline
//! +16  ret 136        (redirect, same rsp)   +16  brk         (redirect, any)
//! +19  int3           (redirect, any)        +20  ldr x30, [sp], #32; ret (redirect to x30)
//! +20  lea rsp, [rsp + 144]; ret (rsp + 8)   +28  str x30, [sp, #-32]!    <- entry
//! +32  lea rsp, [rsp - 144]    <- entry      +32  nop; bl trampoline  |  ldr x30, +8; blr x30
//! +40  nop; call rel32 | call [rip - 38]     +40  ldr x30, [sp], #32      <- continuation
//! +46  lea rsp, [rsp + 144]    <- continuation +44 the displaced instruction, relocated
//! +54  the displaced instructions, relocated      b back
//!      jmp back                              +96  literals of the relocation
//! ```
//!
//! The entry first moves the stack pointer over what it must not touch (x86_64: the
//! 128-byte red zone of the probed code, and a 16-byte hole; aarch64 has no red zone:
//! a 32-byte hole holding x30), with `lea`/`str` (no flags changed, no register but the
//! one saved), then calls the generated trampoline (probe-codegen's SaveRestore shape
//! over `PtRegs`, every register and the FP/SIMD state saved and restored), whose
//! dispatcher runs the probes with the registers of the probed context. The trampoline
//! returns to the continuation, which takes the stack pointer back and runs the
//! relocated instructions, then jumps back after them. A handler that changed the pc
//! (or the stack pointer) is resumed through a stub instead, the dispatcher having put
//! the new values in the hole: `ret 136` pops the new rip and drops the hole and the
//! red zone at once; `lea; ret` pops it from the probed stack (a return, rsp + 8);
//! otherwise a breakpoint whose trap sets every register from the hole.
//!
//! # Unwind rules
//! [`unwind`] describes every instruction of a block where a thread can stand (a
//! signal taken there, the trampoline's caller while it dispatches) as the probed
//! code's own frame, so that an unwinder walks on from the right place: at the entry,
//! before and after the trampoline call, the probed pc with the stack pointer above
//! the hole (aarch64: x30 saved in it); in the copy, the original instruction each
//! relocated one stands for (aarch64: past the link of a relocated `bl`/`blr`, the
//! callee's entry, and a pushed x16 accounted for); in a resume stub, the pc (and
//! stack pointer) the dispatcher left in the hole or on the stack.

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::*;

#[cfg(target_arch = "aarch64")]
pub(crate) use a64::*;

/// Bytes of one detour block (a divisor of the page size).
pub(crate) const BLOCK: usize = 128;

/// Offset of the probed address in a block.
pub(crate) const PROBE: usize = 0;
/// Offset of the trampoline's address in a block.
pub(crate) const TRAMP: usize = 8;

/// What a thread at one instruction of the relocated copy stands for, for the block's
/// unwind rules: the probed code at an original instruction (every register as there,
/// the stack pointer `below` bytes lower while the copy has something pushed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CopyRow {
    /// Offset of the instruction in the copy.
    pub at: usize,
    pub pc: CopyPc,
    pub below: usize,
}

/// The pc a thread in the copy stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CopyPc {
    /// An instruction of the probed code, not yet run.
    At(usize),
    /// aarch64: the `br` of a relocated `blr`, past the link: the callee's first
    /// instruction, whose address is in this register.
    #[cfg_attr(target_arch = "x86_64", allow(dead_code))]
    InReg(u8),
}

impl CopyPc {
    /// The rule of the pc column: the instruction's address + 1 (unwinders look it up
    /// at − 1, see `crate::unwind`).
    fn rule(self) -> crate::unwind::Expr {
        match self {
            CopyPc::At(a) => crate::unwind::Expr::addr(a + 1),
            CopyPc::InReg(r) => crate::unwind::Expr::breg(r, 1),
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{CopyPc, CopyRow, BLOCK, PROBE, TRAMP};
    use crate::unwind::{Expr, Fde, Program, PC, SP};
    use crate::NotOptimized;
    use iced_x86::{
        BlockEncoder, BlockEncoderOptions, CpuidFeature, Decoder, DecoderError, DecoderOptions, EncodingKind, FlowControl, Formatter, Instruction,
        InstructionBlock, IntelFormatter, OpKind, Register,
    };

    /// Bytes of the jump written at the probed address (`jmp rel32`).
    pub(crate) const JUMP: usize = 5;
    /// How far below the probed rsp the entry moves it: the red zone and a 16-byte hole.
    pub(crate) const HOLE: usize = 128 + 16;
    /// Resume stub: `ret 136` pops the rip the dispatcher put at the bottom of the hole
    /// and drops the hole and the red zone: rsp is the probed one again.
    pub(crate) const RESUME_SAME_SP: usize = 16;
    /// Resume stub: `int3`, whose trap takes rip and rsp from the hole (`[rsp]`, `[rsp + 8]`).
    pub(crate) const RESUME_TRAP: usize = 19;
    /// Resume stub: `lea rsp, [rsp + 144]; ret`, a return from the probed function: pops
    /// the rip the dispatcher wrote at the probed rsp.
    pub(crate) const RESUME_POP: usize = 20;
    /// Where the probed address jumps.
    pub(crate) const ENTRY: usize = 32;
    /// Where the trampoline returns (the return address the dispatcher finds in `rip`).
    pub(crate) const CONT: usize = 46;
    /// The relocated instructions.
    pub(crate) const COPY: usize = 54;

    /// `lea rsp, [rsp + disp32]`.
    fn lea_rsp(disp: i32) -> [u8; 8] {
        let d = disp.to_le_bytes();
        [0x48, 0x8d, 0xa4, 0x24, d[0], d[1], d[2], d[3]]
    }

    /// `jmp rel32` at `from` to `to`, if in range.
    pub(crate) fn jump(from: usize, to: usize) -> Option<[u8; JUMP]> {
        let rel = i32::try_from(to as i64 - (from as i64 + JUMP as i64)).ok()?;
        let r = rel.to_le_bytes();
        Some([0xe9, r[0], r[1], r[2], r[3]])
    }

    /// The block at `block` for the probe at `probe`, whose trampoline is at `tramp`;
    /// `copy`: the relocated instructions and the jump back, for `block + COPY`.
    pub(crate) fn block(block: usize, probe: usize, tramp: usize, copy: &[u8]) -> Vec<u8> {
        let mut b = vec![0xcc; BLOCK]; // int3 wherever nothing is
        b[PROBE..PROBE + 8].copy_from_slice(&(probe as u64).to_le_bytes());
        b[TRAMP..TRAMP + 8].copy_from_slice(&(tramp as u64).to_le_bytes());
        b[RESUME_SAME_SP..RESUME_SAME_SP + 3].copy_from_slice(&[0xc2, (HOLE - 8) as u8, 0]); // ret 136
        b[RESUME_TRAP] = 0xcc;
        b[RESUME_POP..RESUME_POP + 8].copy_from_slice(&lea_rsp(HOLE as i32));
        b[RESUME_POP + 8] = 0xc3; // ret
        b[ENTRY..ENTRY + 8].copy_from_slice(&lea_rsp(-(HOLE as i32)));
        let call = ENTRY + 8;
        match i32::try_from(tramp as i64 - (block + CONT) as i64) {
            // nop; call rel32 (the return address is the continuation either way)
            Ok(rel) => {
                b[call] = 0x90;
                b[call + 1] = 0xe8;
                b[call + 2..CONT].copy_from_slice(&rel.to_le_bytes());
            }
            // call qword ptr [rip + disp32]: the trampoline's address at +8
            Err(_) => {
                b[call..call + 2].copy_from_slice(&[0xff, 0x15]);
                b[call + 2..CONT].copy_from_slice(&(TRAMP as i32 - CONT as i32).to_le_bytes());
            }
        }
        b[CONT..COPY].copy_from_slice(&lea_rsp(HOLE as i32));
        b[COPY..COPY + copy.len()].copy_from_slice(copy);
        b
    }

    /// The most bytes the relocated copy may take (with its jump back).
    pub(crate) const COPY_MAX: usize = BLOCK - COPY;

    /// The unwind rules of the block at `block` for the probe at `probe`, whose copy
    /// is `copy_len` bytes laid out as `rows` says (see the module docs).
    pub(crate) fn unwind(block: usize, probe: usize, rows: &[CopyRow], copy_len: usize) -> Fde {
        let start = RESUME_SAME_SP;
        let mut p = Program::default();
        let hole = HOLE as u64;
        // `ret 136`: the new rip at [rsp], the probed rsp above the hole (and `int3`:
        // the new rsp at [rsp + 8]). The pc is an instruction's: + 1.
        p.cfa(SP, hole).val_expr(PC, Expr::breg(SP, 0).deref().plus(1));
        p.row(RESUME_TRAP - start).cfa_expr(Expr::breg(SP, 8).deref());
        // `lea; ret`: a return from the probed function, to the word at the probed rsp;
        // after the `lea`, the usual rule of a `ret`.
        p.row(RESUME_POP - start).cfa(SP, hole + 8).val_expr(PC, Expr::breg(SP, HOLE as i64).deref());
        p.row(RESUME_POP + 8 - start).cfa(SP, 8).val_expr(PC, Expr::breg(SP, 0).deref());
        // The entry, before and after the red zone is stepped over; the trampoline's
        // return address (the continuation) is looked up here too.
        p.row(ENTRY - start).cfa(SP, 0).val_expr(PC, Expr::addr(probe + 1));
        p.row(ENTRY + 8 - start).cfa(SP, hole);
        for r in rows {
            p.row(COPY + r.at - start).cfa(SP, r.below as u64).val_expr(PC, r.pc.rule());
        }
        Fde { begin: block + start, end: block + COPY + copy_len, program: p }
    }

    /// The instructions a jump at an address displaces.
    pub(crate) struct Window {
        /// Bytes displaced (whole instructions, at least [`JUMP`]).
        pub(crate) len: usize,
        insns: Vec<Instruction>,
    }

    fn text(i: &Instruction) -> String {
        let mut t = String::new();
        IntelFormatter::new().format(i, &mut t);
        t
    }

    /// The window of a jump at `addr`, inside the function at `start` whose original
    /// bytes (no breakpoints, no jumps) are `func`, checked as the kernel's
    /// `can_optimize` checks it: whole instructions that fall through (no branch, call,
    /// return, trap) and end inside the function; no instruction of the function
    /// jumps into it past its first byte, and the function has no indirect jump but
    /// through a pointer at a fixed address (a call of another function: a GOT entry).
    pub(crate) fn window(addr: usize, start: usize, func: &[u8]) -> Result<Window, NotOptimized> {
        let end = start + func.len();
        let off = addr.checked_sub(start).filter(|o| *o < func.len()).ok_or(NotOptimized::CrossesFunctionEnd { window_end: addr, function_end: end })?;
        let mut d = Decoder::with_ip(64, &func[off..], addr as u64, DecoderOptions::NONE);
        let (mut insns, mut len) = (Vec::new(), 0);
        while len < JUMP {
            let i = d.decode();
            if i.is_invalid() {
                return Err(match d.last_error() {
                    DecoderError::NoMoreBytes => NotOptimized::CrossesFunctionEnd { window_end: addr + len + 1, function_end: end },
                    _ => NotOptimized::UndecodableFunction { at: addr + len },
                });
            }
            if i.flow_control() != FlowControl::Next {
                return Err(NotOptimized::UnrelocatableInstruction { at: addr + len, insn: text(&i) });
            }
            len += i.len();
            insns.push(i);
        }
        no_jump_into(addr, len, start, func)?;
        Ok(Window { len, insns })
    }

    /// Checks that no instruction of the code at `start` (original bytes `code`: a
    /// function, or a separate part of one) jumps into `addr..addr + len` past its first
    /// byte, and that it has no indirect jump but through a pointer at a fixed address.
    pub(crate) fn no_jump_into(addr: usize, len: usize, start: usize, code: &[u8]) -> Result<(), NotOptimized> {
        let inside = |t: u64| (addr as u64 + 1..(addr + len) as u64).contains(&t);
        let mut d = Decoder::with_ip(64, code, start as u64, DecoderOptions::NONE);
        for i in &mut d {
            if i.is_invalid() {
                return Err(NotOptimized::UndecodableFunction { at: i.ip() as usize });
            }
            if matches!(i.op0_kind(), OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64) && inside(i.near_branch_target()) {
                return Err(NotOptimized::JumpIntoWindow { from: i.ip() as usize, to: i.near_branch_target() as usize });
            }
            // `jmp [rip + got]` is a tail call of another function; anything else may be
            // a jump table, whose targets cannot be read from the code.
            let through_got = i.is_ip_rel_memory_operand() && i.memory_index() == Register::None;
            if i.flow_control() == FlowControl::IndirectBranch && !through_got {
                return Err(NotOptimized::IndirectJumpInFunction { at: i.ip() as usize });
            }
        }
        Ok(())
    }

    /// What the code of a function can do with the FP/SIMD state: see [`vector_use`].
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) struct VectorUse {
        /// It keeps to legacy SSE: no VEX, EVEX or XOP instruction (so none that reads
        /// a vector register above bit 127, or `zmm16`-`zmm31`, or `k0`-`k7`), and none
        /// of the x87, MMX, 3DNow! or `fxsave`/`xsave` families (which read the x87 stack
        /// or the whole state). Inside such code only `xmm0`-`xmm15` (whole: a value may
        /// pass through it unread) and MXCSR can be live of the FP/SIMD state: what
        /// probe-codegen's `Fp::Sse` keeps.
        pub(crate) legacy: bool,
        /// It calls nothing and jumps nowhere outside itself (a leaf, no tail call): it
        /// cannot hand a vector argument on. Legacy code of that kind has nothing live
        /// above bit 127 at all.
        pub(crate) leaf: bool,
    }

    /// What the code at `start` (original bytes `code`: a function, or a separate part
    /// of one) can do with the FP/SIMD state. Undecodable code is neither legacy nor a
    /// leaf.
    pub(crate) fn vector_use(start: usize, code: &[u8]) -> VectorUse {
        use CpuidFeature as F;
        let wide = |f: &CpuidFeature| {
            matches!(
                f,
                F::FPU
                    | F::FPU287
                    | F::FPU287XL_ONLY
                    | F::FPU387
                    | F::FPU387SL_ONLY
                    | F::MMX
                    | F::D3NOW
                    | F::D3NOWEXT
                    | F::CYRIX_D3NOW
                    | F::FXSR
                    | F::XSAVE
                    | F::XSAVEC
                    | F::XSAVEOPT
                    | F::XSAVES
            )
        };
        let x87_or_mmx =
            |i: &Instruction| (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Register && (i.op_register(n).is_st() || i.op_register(n).is_mm()));
        let inside = |i: &Instruction| (start as u64..(start + code.len()) as u64).contains(&i.near_branch_target());
        let mut uses = VectorUse { legacy: true, leaf: true };
        let mut falls_through = true;
        for i in Decoder::with_ip(64, code, start as u64, DecoderOptions::NONE) {
            if i.is_invalid() {
                return VectorUse { legacy: false, leaf: false };
            }
            uses.legacy &= i.encoding() == EncodingKind::Legacy && !i.cpuid_features().iter().any(wide) && !x87_or_mmx(&i);
            uses.leaf &= match i.flow_control() {
                FlowControl::Next | FlowControl::Return | FlowControl::Interrupt | FlowControl::Exception => true,
                FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch => inside(&i),
                _ => false,
            };
            falls_through = matches!(i.flow_control(), FlowControl::Next | FlowControl::ConditionalBranch);
        }
        // Code that runs off its end goes on into the next function's, as a tail call.
        uses.leaf &= !falls_through;
        uses
    }

    impl Window {
        /// The displaced instructions relocated for `at` (RIP-relative operands keep
        /// pointing at their data), then a jump back to `next`.
        /// With the bytes, where each relocated instruction (and the jump back) is in
        /// them and which original instruction it stands for (see [`CopyRow`]).
        pub(crate) fn relocate(&self, at: usize, next: usize) -> Result<(Vec<u8>, Vec<CopyRow>), NotOptimized> {
            let first = &self.insns[0];
            let unrelocatable = || {
                let i = self.insns.iter().find(|i| i.is_ip_rel_memory_operand()).unwrap_or(first);
                NotOptimized::UnrelocatableInstruction { at: i.ip() as usize, insn: format!("{} (its data is out of rel32 range of the detour)", text(i)) }
            };
            let encoded = BlockEncoder::encode(64, InstructionBlock::new(&self.insns, at as u64), BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
                .map_err(|_| unrelocatable())?;
            let mut rows = Vec::new();
            for (i, off) in self.insns.iter().zip(&encoded.new_instruction_offsets) {
                if *off != u32::MAX {
                    rows.push(CopyRow { at: *off as usize, pc: CopyPc::At(i.ip() as usize), below: 0 });
                }
            }
            let mut code = encoded.code_buffer;
            rows.push(CopyRow { at: code.len(), pc: CopyPc::At(next), below: 0 });
            code.extend_from_slice(&jump(at + code.len(), next).ok_or_else(unrelocatable)?);
            if code.len() > COPY_MAX {
                return Err(unrelocatable());
            }
            Ok((code, rows))
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn vector_use_tells_legacy_code_and_leaves() {
            let uses = |code: &[u8]| vector_use(0x1000, code);
            let (legacy_leaf, legacy, neither) =
                (VectorUse { legacy: true, leaf: true }, VectorUse { legacy: true, leaf: false }, VectorUse { legacy: false, leaf: false });
            let ret = 0xc3;
            // mov rax, rdi; movaps xmm0, xmm1; addsd xmm0, xmm1; ret
            assert_eq!(uses(&[0x48, 0x89, 0xf8, 0x0f, 0x28, 0xc1, 0xf2, 0x0f, 0x58, 0xc1, ret]), legacy_leaf);
            // A branch back inside, then ret.
            assert_eq!(uses(&[0x48, 0x89, 0xf8, 0x75, 0xfb, ret]), legacy_leaf, "jne to the first byte");
            for (insn, what) in [
                (&[0xc5, 0xf8, 0x77][..], "vzeroupper (VEX)"),
                (&[0x62, 0xf1, 0x7d, 0x48, 0xef, 0xc0], "vpxord zmm0 (EVEX)"),
                (&[0xd9, 0xe8], "fld1 (x87)"),
                (&[0xdd, 0x08], "fisttp (x87, SSE3)"),
                (&[0x0f, 0x77], "emms (MMX)"),
                (&[0xf3, 0x0f, 0xd6, 0xc1], "movq2dq xmm0, mm1 (an MMX register)"),
                (&[0x0f, 0xae, 0x00], "fxsave [rax]"),
                (&[0x0f, 0x01, 0xd0], "xgetbv (xsave family)"),
            ] {
                let code: Vec<u8> = insn.iter().copied().chain([ret]).collect();
                assert!(!uses(&code).legacy, "{what}");
            }
            // Legacy, but not leaves: each may hand a vector argument on.
            for (code, what) in [
                (&[0xe8, 0, 0, 0, 0, ret][..], "call"),
                (&[0xe9, 0, 0x10, 0, 0], "jmp outside"),
                (&[0x74, 0x10, ret], "je outside"),
                (&[0xff, 0xe0], "jmp rax"),
                (&[0xff, 0xd0, ret], "call rax"),
                (&[0xc7, 0xf8, 0, 0, 0, 0, ret], "xbegin"),
                (&[0x48, 0x89, 0xf8], "runs off its end"),
                (&[0x48, 0x89, 0xf8, 0x74, 0xfb], "runs off its end after a branch"),
            ] {
                assert_eq!(uses(code), legacy, "{what}");
            }
            assert_eq!(uses(&[0x0f, 0x0b]), legacy_leaf, "ud2 ends it");
            assert_eq!(uses(&[0x48, 0x89]), neither, "undecodable");
        }

        #[test]
        fn the_block_layout_is_as_documented() {
            let (at, probe) = (0x7000_0000usize, 0x7000_1000usize);
            let b = block(at, probe, at + 0x100, &[0x90, 0xe9, 1, 2, 3, 4]);
            assert_eq!(b.len(), BLOCK);
            assert_eq!(b[..8], (probe as u64).to_le_bytes());
            assert_eq!(b[RESUME_SAME_SP..RESUME_SAME_SP + 3], [0xc2, 0x88, 0x00], "ret 136");
            assert_eq!(b[RESUME_TRAP], 0xcc);
            assert_eq!(b[RESUME_POP..RESUME_POP + 9], [0x48, 0x8d, 0xa4, 0x24, 0x90, 0, 0, 0, 0xc3], "lea rsp, [rsp + 144]; ret");
            assert_eq!(b[ENTRY..ENTRY + 8], [0x48, 0x8d, 0xa4, 0x24, 0x70, 0xff, 0xff, 0xff], "lea rsp, [rsp - 144]");
            // nop; call rel32 to block + 0x100 from the continuation
            assert_eq!(b[ENTRY + 8..CONT], [0x90, 0xe8, 0xd2, 0, 0, 0]);
            assert_eq!(b[CONT..COPY], [0x48, 0x8d, 0xa4, 0x24, 0x90, 0, 0, 0]);
            assert_eq!(b[COPY..COPY + 6], [0x90, 0xe9, 1, 2, 3, 4]);
            // A trampoline out of rel32 range: through its address at +8.
            let far = block(at, probe, 0x7fff_0000_0000, &[]);
            assert_eq!(far[ENTRY + 8..CONT], [0xff, 0x15, 0xda, 0xff, 0xff, 0xff], "call [rip - 38]");
            // Every instruction decodes where the layout says.
            let mut d = Decoder::with_ip(64, &b[RESUME_POP..], (at + RESUME_POP) as u64, DecoderOptions::NONE);
            assert_eq!(text(&d.decode()), "lea rsp,[rsp+90h]");
            assert_eq!(text(&d.decode()), "ret");
        }

        #[test]
        fn a_jump_is_rel32_or_nothing() {
            assert_eq!(jump(0x1000, 0x1005), Some([0xe9, 0, 0, 0, 0]));
            assert_eq!(jump(0x1000, 0x1000), Some([0xe9, 0xfb, 0xff, 0xff, 0xff]));
            assert_eq!(jump(0x1000, 0x1000 + (1 << 32)), None);
        }

        #[test]
        fn a_window_takes_whole_instructions() {
            // push rbp; mov rbp, rsp; sub rsp, 16; mov eax, 1; add rsp, 16; pop rbp; ret
            let f = [0x55, 0x48, 0x89, 0xe5, 0x48, 0x83, 0xec, 0x10, 0xb8, 1, 0, 0, 0, 0x48, 0x83, 0xc4, 0x10, 0x5d, 0xc3];
            let w = window(0x1000, 0x1000, &f).expect("optimizable");
            assert_eq!(w.len, 8, "push, mov, sub");
            assert_eq!(window(0x1001, 0x1000, &f).expect("mid-function").len, 7, "mov, sub");
            assert_eq!(window(0x100d, 0x1000, &f).expect("add, pop").len, 5);
            // From `pop rbp` the window would take the `ret`.
            assert!(matches!(window(0x1011, 0x1000, &f), Err(NotOptimized::UnrelocatableInstruction { at: 0x1012, .. })));
            // A 4-byte function: too short.
            assert!(matches!(window(0x1000, 0x1000, &[0x48, 0x89, 0xf8, 0x90]), Err(NotOptimized::CrossesFunctionEnd { function_end: 0x1004, .. })));
        }

        #[test]
        fn jumps_into_the_window_and_jump_tables_are_refused() {
            // 0: mov eax, 1; 5: mov ecx, 2; 10: jne 5 (into the window of 0..10 past its start); 12: ret
            let f = [0xb8, 1, 0, 0, 0, 0xb9, 2, 0, 0, 0, 0x75, 0xf9, 0xc3];
            assert!(window(0x1005, 0x1000, &f).is_ok(), "a jump to the window's first byte is fine");
            let mut g = f;
            g[0] = 0x90;
            g[1..5].copy_from_slice(&[0x90, 0x90, 0x90, 0x90]);
            // nop x5; mov ecx, 2; jne 5: a window at 3 holds nop, nop, mov (3..10) and 5 is inside
            assert_eq!(window(0x1003, 0x1000, &g).err(), Some(NotOptimized::JumpIntoWindow { from: 0x100a, to: 0x1005 }));
            // mov eax, 1; mov ecx, 2; jmp rax; ret
            let t = [0xb8, 1, 0, 0, 0, 0xb9, 2, 0, 0, 0, 0xff, 0xe0, 0xc3];
            assert_eq!(window(0x1000, 0x1000, &t).err(), Some(NotOptimized::IndirectJumpInFunction { at: 0x100a }));
            // ... but `jmp [rip + got]`, a tail call, is fine.
            let mut u = t.to_vec();
            u.splice(10..12, [0xff, 0x25, 0, 0, 0, 0]);
            assert!(window(0x1000, 0x1000, &u).is_ok());
        }

        #[test]
        fn relocation_keeps_rip_relative_data() {
            // lea rax, [rip + 0x100]; nop; ret  at 0x1000: the data at 0x1107
            let f = [0x48, 0x8d, 0x05, 0x00, 0x01, 0x00, 0x00, 0x90, 0xc3];
            let w = window(0x1000, 0x1000, &f).expect("optimizable");
            assert_eq!(w.len, 7);
            let (code, rows) = w.relocate(0x2000, 0x1007).expect("in range");
            assert_eq!(rows, [CopyRow { at: 0, pc: CopyPc::At(0x1000), below: 0 }, CopyRow { at: 7, pc: CopyPc::At(0x1007), below: 0 }]);
            let mut d = Decoder::with_ip(64, &code, 0x2000, DecoderOptions::NONE);
            let lea = d.decode();
            assert_eq!(lea.ip_rel_memory_address(), 0x1107, "the same data from the copy");
            let jmp = d.decode();
            assert_eq!(jmp.near_branch_target(), 0x1007, "then back after the window");
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod a64 {
    use super::{CopyPc, CopyRow, BLOCK, PROBE, TRAMP};
    use crate::unwind::{Expr, Fde, Program, PC, RA, SP};
    use crate::NotOptimized;

    /// Bytes of the `b` written at the probed address.
    pub(crate) const JUMP: usize = 4;
    /// How far below the probed sp the entry moves it: x30, and the new pc and sp of a
    /// redirect.
    pub(crate) const HOLE: usize = 32;
    /// Resume stub: the probe's breakpoint, whose trap takes x30, pc and sp from the
    /// hole (`[sp]`, `[sp + 8]`, `[sp + 16]`).
    pub(crate) const RESUME_TRAP: usize = 16;
    /// Resume stub: `ldr x30, [sp], #32; ret`: to the (new) x30, the sp unchanged.
    pub(crate) const RESUME_X30: usize = 20;
    /// Where the probed address branches.
    pub(crate) const ENTRY: usize = 28;
    /// Where the trampoline returns (the return address the dispatcher finds in `pc`).
    pub(crate) const CONT: usize = 40;
    /// The relocated instruction.
    pub(crate) const COPY: usize = 44;
    /// The literals of the relocated instruction (two at most).
    pub(crate) const POOL: usize = 96;

    const NOP: u32 = 0xd503_201f;
    const RET: u32 = 0xd65f_03c0;
    /// `str x30, [sp, #-32]!`
    const PUSH_X30: u32 = 0xf81e_0ffe;
    /// `ldr x30, [sp], #32`
    const POP_X30: u32 = 0xf842_07fe;
    /// `blr x30`
    const BLR_X30: u32 = 0xd63f_03c0;
    /// `str x16, [sp, #-16]!` and `ldr x16, [sp], #16`
    const PUSH_X16: u32 = 0xf81f_0ff0;
    const POP_X16: u32 = 0xf841_07f0;

    /// `b`/`bl` (`link`) at `from` to `to`, if in range (±128 MiB).
    pub(crate) fn branch(from: usize, to: usize, link: bool) -> Option<u32> {
        let d = to as i64 - from as i64;
        ((-(1 << 27)..(1 << 27)).contains(&d) && d % 4 == 0).then(|| (if link { 0x9400_0000 } else { 0x1400_0000 }) | ((d >> 2) as u32 & 0x03ff_ffff))
    }

    /// `ldr x<rt>, <to>` (64-bit literal) at `from`, if in range (±1 MiB).
    fn ldr_literal(rt: u32, from: usize, to: usize) -> Option<u32> {
        let d = to as i64 - from as i64;
        ((-(1 << 20)..(1 << 20)).contains(&d) && d % 4 == 0).then(|| 0x5800_0000 | (((d >> 2) as u32 & 0x7ffff) << 5) | rt)
    }

    /// The block at `block` for the probe at `probe`, whose trampoline is at `tramp`;
    /// `copy`: the relocated instruction and the branch back, for `block + COPY`;
    /// `pool`: its literals, for `block + POOL`.
    pub(crate) fn block(block: usize, probe: usize, tramp: usize, copy: &[u32], pool: &[u64]) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK];
        let mut put = |at: usize, w: u32| b[at..at + 4].copy_from_slice(&w.to_le_bytes());
        put(RESUME_TRAP, u32::from_le_bytes(crate::arch::insn::BREAKPOINT.try_into().expect("4 bytes")));
        put(RESUME_X30, POP_X30);
        put(RESUME_X30 + 4, RET);
        put(ENTRY, PUSH_X30);
        match branch(block + ENTRY + 8, tramp, true) {
            Some(bl) => {
                put(ENTRY + 4, NOP);
                put(ENTRY + 8, bl);
            }
            None => {
                put(ENTRY + 4, ldr_literal(30, block + ENTRY + 4, block + TRAMP).expect("in the block"));
                put(ENTRY + 8, BLR_X30);
            }
        }
        put(CONT, POP_X30);
        for (k, w) in copy.iter().enumerate() {
            put(COPY + 4 * k, *w);
        }
        // Nothing else runs: a breakpoint of probekit's wherever no code is.
        let brk = u32::from_le_bytes(crate::arch::insn::BREAKPOINT.try_into().expect("4 bytes"));
        for at in (COPY + 4 * copy.len()..POOL).step_by(4) {
            put(at, brk);
        }
        b[PROBE..PROBE + 8].copy_from_slice(&(probe as u64).to_le_bytes());
        b[TRAMP..TRAMP + 8].copy_from_slice(&(tramp as u64).to_le_bytes());
        for (k, v) in pool.iter().enumerate() {
            b[POOL + 8 * k..POOL + 8 * k + 8].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// The unwind rules of the block at `block` for the probe at `probe`, whose copy
    /// is the words `rows` describes (see the module docs). The pc is in its own
    /// column ([`PC`]): x30 has rules of its own.
    pub(crate) fn unwind(block: usize, probe: usize, rows: &[CopyRow]) -> Fde {
        let start = RESUME_TRAP;
        let mut p = Program::default();
        let hole = HOLE as u64;
        // `brk`: x30, pc and sp in the hole.
        p.cfa_expr(Expr::breg(SP, 16).deref()).saved_at(RA, Expr::breg(SP, 0)).val_expr(PC, Expr::breg(SP, 8).deref().plus(1));
        // `ldr x30, [sp], #32; ret`: a return to the x30 in the hole, then in x30.
        p.row(RESUME_X30 - start).cfa(SP, hole).val_expr(PC, Expr::breg(SP, 0).deref());
        p.row(RESUME_X30 + 4 - start).cfa(SP, 0).same(RA).in_reg(PC, RA);
        // The entry, then x30 in the hole until the continuation takes it back.
        p.row(ENTRY - start).val_expr(PC, Expr::addr(probe + 1));
        p.row(ENTRY + 4 - start).cfa(SP, hole).saved_at(RA, Expr::breg(SP, 0));
        for r in rows {
            p.row(COPY + r.at - start).cfa(SP, r.below as u64).same(RA).val_expr(PC, r.pc.rule());
        }
        let end = rows.last().map_or(COPY, |r| COPY + r.at + 4);
        Fde { begin: block + start, end: block + end, program: p }
    }

    /// What each word of a relocated copy stands for: the original instruction at
    /// `addr` (not yet run), but where `pcs` says otherwise (by index), with a pushed x16
    /// accounted for.
    fn copy_rows(code: &[u32], addr: usize, pcs: &[(usize, CopyPc)]) -> Vec<CopyRow> {
        let mut below = 0;
        let mut rows = Vec::new();
        for (k, w) in code.iter().enumerate() {
            let pc = pcs.iter().find(|(i, _)| *i == k).map_or(CopyPc::At(addr), |(_, pc)| *pc);
            rows.push(CopyRow { at: 4 * k, pc, below });
            match *w {
                PUSH_X16 => below += 16,
                POP_X16 => below -= 16,
                _ => {}
            }
        }
        rows
    }

    fn sext(v: u64, bits: u32) -> i64 {
        ((v << (64 - bits)) as i64) >> (64 - bits)
    }

    /// The instruction `w` at `addr` relocated for `at` (the block's copy), then a
    /// branch back to `addr + 4`, with the literals it loads for `pool`: every
    /// pc-relative form the breakpoint path simulates rewritten into an equivalent
    /// sequence that clobbers nothing the instruction does not write (x16 is saved
    /// around the one that needs a register), the rest copied as they are.
    ///
    /// Also says what each word of the copy stands for (see [`CopyRow`]).
    #[allow(clippy::type_complexity)]
    pub(crate) fn relocate(w: u32, addr: usize, at: usize, pool: usize) -> Result<(Vec<u32>, Vec<u64>, Vec<CopyRow>), NotOptimized> {
        let refuse = |why: &str| NotOptimized::UnrelocatableInstruction { at: addr, insn: format!("{w:#010x}: {why}") };
        let pc = addr as u64;
        let next = addr + 4;
        let mut code: Vec<u32> = Vec::new();
        let mut lits: Vec<u64> = Vec::new();
        // `ldr x<rt>, =value` at the next position of `code`.
        let ldr_value = |rt: u32, value: u64, code: &mut Vec<u32>, lits: &mut Vec<u64>| -> Result<(), NotOptimized> {
            let from = at + 4 * code.len();
            let lit = pool + 8 * lits.len();
            lits.push(value);
            code.push(ldr_literal(rt, from, lit).ok_or_else(|| refuse("literal out of reach"))?);
            Ok(())
        };
        let branch_at =
            |code: &Vec<u32>, to: usize, link: bool| branch(at + 4 * code.len(), to, link).ok_or_else(|| refuse("branch target out of reach of the detour"));
        let rt = w & 0x1f;
        if w & 0x7c00_0000 == 0x1400_0000 {
            // b, bl: the link register as the original sets it
            let to = pc.wrapping_add_signed(sext((w & 0x03ff_ffff) as u64, 26) * 4) as usize;
            let link = w >> 31 == 1;
            if link {
                ldr_value(30, next as u64, &mut code, &mut lits)?;
            }
            let b = branch_at(&code, to, false)?;
            code.push(b);
            // Past the link, the state is the callee's entry.
            let pcs = if link { vec![(1, CopyPc::At(to))] } else { vec![] };
            let rows = copy_rows(&code, addr, &pcs);
            return Ok((code, lits, rows));
        }
        // b.cond (and bc.cond), cbz/cbnz, tbz/tbnz: the same test over two instructions, to a `b`
        // to the target; falling through goes back.
        let cond = if w & 0xff00_0000 == 0x5400_0000 || w & 0x7e00_0000 == 0x3400_0000 {
            Some(((w & !(0x7ffff << 5)) | (2 << 5), sext((w >> 5 & 0x7ffff) as u64, 19)))
        } else if w & 0x7e00_0000 == 0x3600_0000 {
            Some(((w & !(0x3fff << 5)) | (2 << 5), sext((w >> 5 & 0x3fff) as u64, 14)))
        } else {
            None
        };
        if let Some((test, imm)) = cond {
            let to = pc.wrapping_add_signed(imm * 4) as usize;
            code.push(test); // taken: +8
            code.push(branch_at(&code, next, false)?);
            code.push(branch_at(&code, to, false)?);
            let rows = copy_rows(&code, addr, &[]);
            return Ok((code, lits, rows));
        }
        // The `br` of a relocated `blr` (past the link: the callee's entry).
        let mut linked = None;
        if w & 0x1f00_0000 == 0x1000_0000 {
            // adr, adrp: the value, loaded
            let imm = sext(((w >> 5 & 0x7ffff) << 2 | (w >> 29 & 3)) as u64, 21);
            let v = if w >> 31 == 1 { (pc & !0xfff).wrapping_add_signed(imm << 12) } else { pc.wrapping_add_signed(imm) };
            match rt {
                31 => code.push(NOP), // xzr
                _ => ldr_value(rt, v, &mut code, &mut lits)?,
            }
        } else if w & 0x3f00_0000 == 0x1800_0000 {
            // ldr (literal) w, x, sw; prfm (literal): the address, then the load from it
            let lit = pc.wrapping_add_signed(sext((w >> 5 & 0x7ffff) as u64, 19) * 4);
            match (w >> 30, rt) {
                (3, _) => code.push(NOP), // prfm: a hint
                (_, 31) => return Err(refuse("ldr (literal) into xzr")),
                (opc, _) => {
                    ldr_value(rt, lit, &mut code, &mut lits)?;
                    // ldr wt, [xt] / ldr xt, [xt] / ldrsw xt, [xt]
                    let base = [0xb940_0000u32, 0xf940_0000, 0xb980_0000][opc as usize];
                    code.push(base | rt << 5 | rt);
                }
            }
        } else if w & 0x3f00_0000 == 0x1c00_0000 {
            // ldr (literal) s, d, q: the address in x16, saved around
            let lit = pc.wrapping_add_signed(sext((w >> 5 & 0x7ffff) as u64, 19) * 4);
            let load = match w >> 30 {
                0 => 0xbd40_0000u32, // ldr st, [x16]
                1 => 0xfd40_0000,    // ldr dt, [x16]
                2 => 0x3dc0_0000,    // ldr qt, [x16]
                _ => return Err(refuse("ldr (literal) into an FP/SIMD register with opc 0b11 (unallocated)")),
            };
            code.push(PUSH_X16);
            ldr_value(16, lit, &mut code, &mut lits)?;
            code.push(load | 16 << 5 | rt);
            code.push(POP_X16);
        } else if w & 0xffff_fc1f == 0xd63f_0000 {
            // blr xn: the link register as the original sets it, then `br xn`
            let rn = w >> 5 & 0x1f;
            if rn == 30 {
                return Err(refuse("blr x30 (the target is the link register it sets)"));
            }
            ldr_value(30, next as u64, &mut code, &mut lits)?;
            linked = Some((code.len(), CopyPc::InReg(rn as u8)));
            code.push(0xd61f_0000 | rn << 5);
        } else if w & 0xffff_fc1f == 0xd61f_0000 || w & 0xffff_fc1f == 0xd65f_0000 {
            code.push(w); // br, ret: position-independent
        } else if w & 0xfe00_0000 == 0xd600_0000 {
            return Err(refuse("branch to register with pointer authentication, or eret"));
        } else if w & 0xff00_0000 == 0xd400_0000 {
            return Err(refuse("exception generation"));
        } else if w & 0x3f00_0000 == 0x0800_0000 {
            return Err(refuse("load/store exclusive"));
        } else {
            code.push(w); // position-independent
        }
        // Past the instruction's effect: the next one.
        let pcs: Vec<(usize, CopyPc)> = linked.into_iter().chain([(code.len(), CopyPc::At(next))]).collect();
        code.push(branch_at(&code, next, false)?);
        let rows = copy_rows(&code, addr, &pcs);
        Ok((code, lits, rows))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        const A: usize = 0x40_0000;
        const AT: usize = 0x40_8000;
        const POOLA: usize = 0x40_8040;

        #[test]
        fn the_block_layout_is_as_documented() {
            let tramp = 0x40_0100;
            let b = block(AT - COPY, A, tramp, &[NOP], &[7]);
            let word = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
            assert_eq!(b[..8], (A as u64).to_le_bytes());
            assert_eq!(word(RESUME_X30), 0xf84207fe, "ldr x30, [sp], #32");
            assert_eq!(word(RESUME_X30 + 4), 0xd65f03c0, "ret");
            assert_eq!(word(ENTRY), 0xf81e0ffe, "str x30, [sp, #-32]!");
            assert_eq!(word(ENTRY + 4), NOP);
            assert_eq!(word(ENTRY + 8) >> 26, 0b100101, "bl");
            assert_eq!(word(CONT), 0xf84207fe);
            assert_eq!(word(COPY), NOP);
            assert_eq!(b[POOL..POOL + 8], 7u64.to_le_bytes());
            // A trampoline out of bl range: `ldr x30, <+8>; blr x30`.
            let far = block(0x1000_0000, A, 0x7000_0000_0000, &[], &[]);
            let word = |at: usize| u32::from_le_bytes(far[at..at + 4].try_into().unwrap());
            assert_eq!(word(ENTRY + 4), 0x58ffff5e, "ldr x30, .-24");
            assert_eq!(word(ENTRY + 8), 0xd63f03c0, "blr x30");
        }

        #[test]
        fn plain_instructions_are_copied() {
            let stp = 0xa9bf7bfd; // stp x29, x30, [sp, #-16]!
            let (code, lits, _) = relocate(stp, A, AT, POOLA).unwrap();
            assert_eq!(code, vec![stp, branch(AT + 4, A + 4, false).unwrap()]);
            assert!(lits.is_empty());
        }

        #[test]
        fn branches_are_rewritten_for_the_detour() {
            // bl A + 0x100
            let (code, lits, rows) = relocate(0x9400_0040, A, AT, POOLA).unwrap();
            let pcs: Vec<CopyPc> = rows.iter().map(|r| r.pc).collect();
            assert_eq!(pcs, [CopyPc::At(A), CopyPc::At(A + 0x100)], "past the link: the callee's entry");
            assert_eq!(lits, vec![A as u64 + 4], "x30 = the original return address");
            assert_eq!(code[0], ldr_literal(30, AT, POOLA).unwrap());
            assert_eq!(code[1], branch(AT + 4, A + 0x100, false).unwrap());
            // b.eq A + 8 (imm19 = 2): b.eq +8; b back; b target
            let (code, _, _) = relocate(0x5400_0040, A, AT, POOLA).unwrap();
            assert_eq!(code, vec![0x5400_0040, branch(AT + 4, A + 4, false).unwrap(), branch(AT + 8, A + 8, false).unwrap()]);
            // bc.eq A + 8 (FEAT_HBC, bit 4 set): relocated as b.cond, not copied as is
            let (code, _, _) = relocate(0x5400_0050, A, AT, POOLA).unwrap();
            assert_eq!(code, vec![0x5400_0050, branch(AT + 4, A + 4, false).unwrap(), branch(AT + 8, A + 8, false).unwrap()]);
            // cbz x3, A - 4 (imm19 = -1)
            let (code, _, _) = relocate(0xb4ff_ffe3, A, AT, POOLA).unwrap();
            assert_eq!(code[0], 0xb400_0043, "cbz x3, +8");
            assert_eq!(code[2], branch(AT + 8, A - 4, false).unwrap());
            // tbnz w1, #3, A + 12 (imm14 = 3)
            let (code, _, _) = relocate(0x3718_0061, A, AT, POOLA).unwrap();
            assert_eq!(code[0], 0x3718_0041, "tbnz w1, #3, +8");
            assert_eq!(code[2], branch(AT + 8, A + 12, false).unwrap());
            // A target out of reach of the detour is refused.
            assert!(relocate(0x1400_0000 | 0x0200_0000, A, A + (100 << 20), A + (100 << 20) + 0x40).is_err(), "b A - 128 MiB from A + 100 MiB");
        }

        #[test]
        fn pc_relative_values_and_loads_are_rewritten() {
            // adrp x5, A + 0x3000 (immlo = 3, immhi = 0)
            let (code, lits, _) = relocate(0xf000_0005, A, AT, POOLA).unwrap();
            assert_eq!(lits, vec![(A as u64 & !0xfff) + 0x3000]);
            assert_eq!(code[0], ldr_literal(5, AT, POOLA).unwrap());
            // ldr x2, A + 0x20 (literal): address, then ldr x2, [x2]
            let (code, lits, _) = relocate(0x5800_0102, A, AT, POOLA).unwrap();
            assert_eq!(lits, vec![A as u64 + 0x20]);
            assert_eq!(code[1], 0xf940_0042, "ldr x2, [x2]");
            // ldrsw x7, literal
            let (code, _, _) = relocate(0x9800_0107, A, AT, POOLA).unwrap();
            assert_eq!(code[1], 0xb980_00e7, "ldrsw x7, [x7]");
            // ldr q1, literal: through x16, saved around
            let (code, lits, rows) = relocate(0x9c00_0101, A, AT, POOLA).unwrap();
            let below: Vec<usize> = rows.iter().map(|r| r.below).collect();
            assert_eq!(below, [0, 16, 16, 16, 0], "x16 pushed below the probed sp in between");
            assert_eq!(rows[4].pc, CopyPc::At(A + 4));
            assert_eq!(lits, vec![A as u64 + 0x20]);
            assert_eq!(code[0], PUSH_X16);
            assert_eq!(code[1], ldr_literal(16, AT + 4, POOLA).unwrap());
            assert_eq!(code[2], 0x3dc0_0201, "ldr q1, [x16]");
            assert_eq!(code[3], POP_X16);
            // blr x3: x30 = A + 4, then br x3
            let (code, lits, rows) = relocate(0xd63f_0060, A, AT, POOLA).unwrap();
            let pcs: Vec<CopyPc> = rows.iter().map(|r| r.pc).collect();
            assert_eq!(pcs, [CopyPc::At(A), CopyPc::InReg(3), CopyPc::At(A + 4)], "the br of blr x3 enters the callee at x3");
            assert_eq!((code[1], lits), (0xd61f_0060, vec![A as u64 + 4]));
            assert!(relocate(0xd63f_03c0, A, AT, POOLA).is_err(), "blr x30");
            assert!(relocate(0xc85f_7c20, A, AT, POOLA).is_err(), "ldxr");
        }
    }
}
