//! The displaced instruction: decode it, refuse what cannot run out of line, and build
//! the out-of-line slot (the instruction relocated for the slot's address, followed by
//! a breakpoint that brings execution back).

use crate::Error;

/// What a probe needs to know of its instruction.
pub(crate) struct Displaced {
    /// Length of the original instruction.
    pub len: usize,
    /// The slot's bytes for its address: the relocated instruction, then a jump back
    /// to the next instruction (boosted) or a breakpoint (for the post handler).
    pub slot: Vec<u8>,
    /// Offset of the trailing breakpoint in the slot, if it ends with one.
    pub slot_bp: Option<usize>,
}

/// Appends the slot's tail: a jump to `next` when `boost` and one can be encoded from
/// `from` (the tail's address), else a breakpoint. Returns the breakpoint's offset.
fn tail(slot: &mut Vec<u8>, from: usize, next: usize, boost: bool) -> Option<usize> {
    if boost {
        #[cfg(target_arch = "x86_64")]
        {
            // jmp qword ptr [rip + 0]; .quad next: absolute, clobbers no register.
            let _ = from;
            slot.extend_from_slice(&[0xff, 0x25, 0, 0, 0, 0]);
            slot.extend_from_slice(&(next as u64).to_le_bytes());
            return None;
        }
        #[cfg(target_arch = "aarch64")]
        {
            // b next: ±128 MiB, clobbers no register.
            let d = next as i64 - from as i64;
            if (-(1 << 27)..(1 << 27)).contains(&d) {
                slot.extend_from_slice(&(0x1400_0000u32 | ((d >> 2) as u32 & 0x03ff_ffff)).to_le_bytes());
                return None;
            }
        }
    }
    let at = slot.len();
    slot.extend_from_slice(BREAKPOINT);
    Some(at)
}

/// Bytes written over the probed instruction, and how far the pc has moved past the
/// breakpoint when its trap is delivered.
#[cfg(target_arch = "x86_64")]
pub(crate) const BREAKPOINT: &[u8] = &[0xcc]; // int3
#[cfg(target_arch = "x86_64")]
pub(crate) const TRAP_PC_ADVANCE: u64 = 1;

/// `brk #0x4b50` ("KP"): an immediate of probekit's own, so its traps are told from
/// the program's own `brk` instructions by the text, not only by address.
#[cfg(target_arch = "aarch64")]
pub(crate) const BREAKPOINT: &[u8] = &(0xd420_0000u32 | (0x4b50 << 5)).to_le_bytes();
#[cfg(target_arch = "aarch64")]
pub(crate) const TRAP_PC_ADVANCE: u64 = 0;

/// Whether the text at `addr` is a breakpoint instruction (ours or anyone's).
pub(crate) fn is_breakpoint_at(addr: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the thread trapped executing the instruction at `addr`, so the byte is
    // mapped, and text is mapped readable on Linux.
    return unsafe { (addr as *const u8).read_volatile() } == 0xcc;
    #[cfg(target_arch = "aarch64")]
    {
        // SAFETY: as above; aarch64 instructions are 4-aligned.
        let w = unsafe { (addr as *const u32).read_volatile() };
        w & 0xffe0_001f == 0xd420_0000 // BRK #imm
    }
}

/// An instruction the handler simulates on the signal context instead of running it
/// out of line (it reads the pc or leaves the slot): plain data, so it fits the
/// lock-free probe record, and [`simulate`] needs nothing but arithmetic and the
/// interrupted thread's own stack.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Sim {
    /// What to do (per architecture); 0: nothing to simulate, run out of line.
    pub kind: u64,
    pub a: u64,
    pub b: u64,
}

/// How a probed instruction is executed.
pub(crate) enum Exec {
    /// Out of line, in its slot.
    Slot(Displaced),
    /// Simulated by the handler.
    Simulate { len: usize, sim: Sim },
}

/// Decodes the instruction at `addr`, whose original bytes (no breakpoints) start
/// `code`, and decides how it runs: simulated, or out of line in a slot at `slot_addr`
/// (boosted, jumping straight back, if `boost` and possible).
pub(crate) fn prepare(addr: usize, code: &[u8], slot_addr: usize, boost: bool) -> Result<Exec, Error> {
    match imp::decode(addr, code, slot_addr)? {
        Decoded::Simulate(len, sim) => Ok(Exec::Simulate { len, sim }),
        Decoded::Relocated(len, mut slot) => {
            let from = slot_addr + slot.len();
            let slot_bp = tail(&mut slot, from, addr + len, boost);
            Ok(Exec::Slot(Displaced { len, slot, slot_bp }))
        }
    }
}

enum Decoded {
    Simulate(usize, Sim),
    /// Length, and the bytes relocated for the slot.
    Relocated(usize, Vec<u8>),
}

pub(crate) use imp::simulate;

/// Where the code at `addr` (bytes `code`) branches or calls directly, outside itself:
/// `call`/`jmp`/`jcc` rel (x86_64), `bl`/`b` (aarch64), and calls or jumps through a
/// pointer at a fixed address (x86_64 `call [rip + got]`, read now). For the
/// blacklist's closure of the hit path: indirect calls through registers (handlers)
/// are not followed.
pub(crate) fn branch_targets(addr: usize, code: &[u8]) -> Vec<usize> {
    let outside = |t: usize| t < addr || t >= addr + code.len();
    #[cfg(target_arch = "x86_64")]
    {
        use iced_x86::{Decoder, DecoderOptions, FlowControl, OpKind};
        let mut out = Vec::new();
        let mut d = Decoder::with_ip(64, code, addr as u64, DecoderOptions::NONE);
        for i in &mut d {
            match i.flow_control() {
                FlowControl::Call | FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch if matches!(i.op0_kind(), OpKind::NearBranch64) => {
                    out.push(i.near_branch_target() as usize)
                }
                FlowControl::IndirectCall | FlowControl::IndirectBranch if i.is_ip_rel_memory_operand() => {
                    let slot = i.ip_rel_memory_address() as usize;
                    if let Some(t) = crate::sys::code::read(slot, 8).and_then(|b| b.try_into().ok()).map(usize::from_le_bytes) {
                        out.push(t);
                    }
                }
                _ => {}
            }
        }
        out.retain(|t| outside(*t));
        out
    }
    #[cfg(target_arch = "aarch64")]
    {
        code.chunks_exact(4)
            .enumerate()
            .filter_map(|(k, w)| {
                let w = u32::from_le_bytes(w.try_into().ok()?);
                // b / bl imm26
                (w & 0x7c00_0000 == 0x1400_0000).then(|| (addr + 4 * k).wrapping_add(((((w & 0x03ff_ffff) << 6) as i32 >> 4) as isize) as usize))
            })
            .filter(|t| outside(*t))
            .collect()
    }
}

/// Where a PLT entry at `addr` (its first bytes `code`) jumps: the value of its GOT slot
/// (x86_64 `[endbr64;] [bnd] jmp [rip + got]`; aarch64 `adrp x16; ldr x17, [x16, #off];
/// add; br x17`). None if it is not one.
pub(crate) fn plt_target(addr: usize, code: &[u8]) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    let slot = {
        use iced_x86::{Decoder, DecoderOptions, FlowControl};
        let mut d = Decoder::with_ip(64, code, addr as u64, DecoderOptions::NONE);
        let first_jump = d.iter().take(3).find(|i| i.flow_control() != FlowControl::Next)?;
        (first_jump.flow_control() == FlowControl::IndirectBranch && first_jump.is_ip_rel_memory_operand())
            .then(|| first_jump.ip_rel_memory_address() as usize)?
    };
    #[cfg(target_arch = "aarch64")]
    let slot = {
        let w = |k: usize| Some(u32::from_le_bytes(code.get(4 * k..4 * k + 4)?.try_into().ok()?));
        let (adrp, ldr) = (w(0)?, w(1)?);
        // adrp x16, page; ldr x17, [x16, #imm12 * 8]
        if adrp & 0x9f00_001f != 0x9000_0010 || ldr & 0xffc0_03ff != 0xf940_0211 {
            return None;
        }
        let imm = (((adrp >> 29) & 3) | ((adrp >> 3) & 0x1f_fffc)) as i64;
        let page = (addr & !0xfff).wrapping_add(((imm << 43 >> 43) << 12) as usize);
        page + ((ldr >> 10) & 0xfff) as usize * 8
    };
    crate::sys::code::read(slot, 8).and_then(|b| b.try_into().ok()).map(usize::from_le_bytes)
}

/// Checks that `addr` is an instruction boundary of the code starting at `start`, whose
/// original bytes (no breakpoints) are `code` (decoding forward from there; aarch64:
/// 4-byte alignment).
pub(crate) fn check_boundary(start: usize, addr: usize, code: &[u8]) -> Result<(), Error> {
    let bad = Error::NotInstructionBoundary { addr, function: start };
    #[cfg(target_arch = "x86_64")]
    {
        if addr < start || addr >= start + code.len() {
            return Err(bad);
        }
        let mut d = iced_x86::Decoder::with_ip(64, code, start as u64, iced_x86::DecoderOptions::NONE);
        while d.can_decode() {
            let ip = d.ip() as usize;
            if ip >= addr {
                return if ip == addr { Ok(()) } else { Err(bad) };
            }
            if d.decode().is_invalid() {
                return Err(bad);
            }
        }
        Err(bad)
    }
    #[cfg(target_arch = "aarch64")]
    {
        let _ = code;
        if addr >= start && (addr - start) % 4 == 0 {
            Ok(())
        } else {
            Err(bad)
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use super::*;
    use iced_x86::{
        BlockEncoder, BlockEncoderOptions, Code, ConditionCode, Decoder, DecoderOptions, FlowControl, Formatter, Instruction, InstructionBlock, IntelFormatter,
        Mnemonic, OpKind, Register,
    };

    const JMP: u64 = 1;
    const JCC: u64 = 2;
    const CALL: u64 = 3;
    const LOOP: u64 = 4;
    const RET: u64 = 5;
    /// `jmp`/`call` through a register or memory: the operand packed in `Sim::a` (see
    /// [`operand`]), the displacement in `Sim::b`.
    const JMP_IND: u64 = 6;
    const CALL_IND: u64 = 7;

    /// Register numbers in a packed operand: the encoding's 0..=15 (rax, rcx, …, r15),
    /// and these two.
    const RIP: u64 = 0x10;
    const NO_REG: u64 = 0xff;
    /// The operand is memory (read the target there), not the register itself.
    const MEM: u64 = 1 << 24;
    /// `gregs` index of each register number (SysV `ucontext_t`, glibc `sys/ucontext.h`).
    const GREGS: [libc::c_int; 16] = [
        libc::REG_RAX,
        libc::REG_RCX,
        libc::REG_RDX,
        libc::REG_RBX,
        libc::REG_RSP,
        libc::REG_RBP,
        libc::REG_RSI,
        libc::REG_RDI,
        libc::REG_R8,
        libc::REG_R9,
        libc::REG_R10,
        libc::REG_R11,
        libc::REG_R12,
        libc::REG_R13,
        libc::REG_R14,
        libc::REG_R15,
    ];

    /// The operand of a 64-bit indirect `jmp`/`call`, packed for [`simulate`] as
    /// `(base | index << 8 | scale << 16 | MEM, displacement)`: a register is `base`
    /// alone; memory is `[base + index * scale + displacement]`, a RIP-relative
    /// displacement counted from the next instruction, as the CPU does. None for what is
    /// not simulated: fs/gs overrides (their bases are not in the signal context) and
    /// 32-bit addresses.
    fn operand(insn: &Instruction) -> Option<(u64, u64)> {
        let gpr = |r: Register| match r {
            Register::None => Some(NO_REG),
            r if r.is_gpr64() => Some(r.number() as u64),
            _ => None,
        };
        match insn.op0_kind() {
            OpKind::Register => Some((gpr(insn.op0_register())?, 0)),
            OpKind::Memory if !matches!(insn.segment_prefix(), Register::FS | Register::GS) => {
                let (base, disp) = match insn.memory_base() {
                    // iced reports the absolute address; keep the instruction's own field.
                    Register::RIP => (RIP, insn.memory_displacement64().wrapping_sub(insn.next_ip())),
                    r => (gpr(r)?, insn.memory_displacement64()),
                };
                Some((base | gpr(insn.memory_index())? << 8 | (insn.memory_index_scale() as u64) << 16 | MEM, disp))
            }
            _ => None,
        }
    }

    pub(super) fn decode(addr: usize, code: &[u8], slot_addr: usize) -> Result<Decoded, Error> {
        let mut d = Decoder::with_ip(64, code, addr as u64, DecoderOptions::NONE);
        let insn = d.decode();
        if insn.is_invalid() {
            return Err(Error::NotInstruction { addr });
        }
        let mut text = String::new();
        IntelFormatter::new().format(&insn, &mut text);
        let unsupported = |why: &str| Error::UnsupportedInstruction { addr, insn: format!("{text}{why}") };
        let len = insn.len();
        let sim = |kind, a, b| Ok(Decoded::Simulate(len, Sim { kind, a, b }));
        let vendor = |options| Decoder::with_ip(64, code, addr as u64, options).decode().code();
        match insn.flow_control() {
            // Relocated for the slot: RIP-relative operands keep pointing at their data.
            FlowControl::Next => {
                let block = [insn];
                let encoded = BlockEncoder::encode(64, InstructionBlock::new(&block, slot_addr as u64), BlockEncoderOptions::NONE)
                    .map_err(|_| unsupported(" (its data is out of rel32 range of the slot)"))?;
                Ok(Decoded::Relocated(len, encoded.code_buffer))
            }
            FlowControl::UnconditionalBranch if insn.is_jmp_short_or_near() => sim(JMP, insn.near_branch_target(), 0),
            FlowControl::ConditionalBranch if insn.is_jcc_short_or_near() => sim(JCC, insn.near_branch_target(), insn.condition_code() as u64),
            FlowControl::ConditionalBranch => match insn.mnemonic() {
                Mnemonic::Loop => sim(LOOP, insn.near_branch_target(), 0),
                Mnemonic::Loope => sim(LOOP, insn.near_branch_target(), 1),
                Mnemonic::Loopne => sim(LOOP, insn.near_branch_target(), 2),
                Mnemonic::Jrcxz => sim(LOOP, insn.near_branch_target(), 3),
                _ => Err(unsupported("")),
            },
            FlowControl::Call if insn.is_call_near() => sim(CALL, insn.near_branch_target(), 0),
            FlowControl::Return if insn.code() == Code::Retnq => sim(RET, 0, 0),
            FlowControl::Return if insn.code() == Code::Retnq_imm16 => sim(RET, insn.immediate16() as u64, 0),
            // A 0x66 prefix makes these 16-bit on AMD, and is ignored on Intel: refused
            // (`vendor` decodes as AMD does).
            FlowControl::IndirectBranch | FlowControl::IndirectCall
                if matches!(insn.code(), Code::Jmp_rm64 | Code::Call_rm64) && vendor(DecoderOptions::AMD) == insn.code() =>
            {
                let (a, b) = operand(&insn).ok_or_else(|| unsupported(" (an fs/gs-relative or 32-bit address is not simulated)"))?;
                sim(if insn.code() == Code::Call_rm64 { CALL_IND } else { JMP_IND }, a, b)
            }
            _ => Err(unsupported(" (far transfers, 16-bit branches and traps are not simulated)")),
        }
    }

    /// Whether condition `cc` (iced's `ConditionCode`) holds for `rflags`.
    fn holds(cc: u64, f: u64) -> bool {
        let (cf, pf, zf, sf, of) = (f & 1 != 0, f & 4 != 0, f & 0x40 != 0, f & 0x80 != 0, f & 0x800 != 0);
        match cc {
            x if x == ConditionCode::o as u64 => of,
            x if x == ConditionCode::no as u64 => !of,
            x if x == ConditionCode::b as u64 => cf,
            x if x == ConditionCode::ae as u64 => !cf,
            x if x == ConditionCode::e as u64 => zf,
            x if x == ConditionCode::ne as u64 => !zf,
            x if x == ConditionCode::be as u64 => cf || zf,
            x if x == ConditionCode::a as u64 => !cf && !zf,
            x if x == ConditionCode::s as u64 => sf,
            x if x == ConditionCode::ns as u64 => !sf,
            x if x == ConditionCode::p as u64 => pf,
            x if x == ConditionCode::np as u64 => !pf,
            x if x == ConditionCode::l as u64 => sf != of,
            x if x == ConditionCode::ge as u64 => sf == of,
            x if x == ConditionCode::le as u64 => zf || sf != of,
            _ => !zf && sf == of, // g
        }
    }

    /// Applies `sim` (the instruction at `addr`, `len` bytes) to the interrupted context.
    pub(crate) fn simulate(sim: Sim, addr: usize, len: usize, uc: &mut libc::ucontext_t) {
        use libc::{REG_EFL, REG_RCX, REG_RIP, REG_RSP};
        let g = &mut uc.uc_mcontext.gregs;
        let next = (addr + len) as u64;
        let flags = g[REG_EFL as usize] as u64;
        // Pushes the return address where `call` puts it: below rsp, inside the 128 bytes
        // the kernel kept free (the red zone) when it built the signal frame, so it
        // overwrites nothing live.
        let push = |g: &mut [libc::greg_t], v: u64| {
            let rsp = (g[REG_RSP as usize] as u64).wrapping_sub(8);
            // SAFETY: rsp - 8 is the interrupted thread's own stack, writable, as it
            // would be for the `call` itself.
            unsafe { (rsp as *mut u64).write_unaligned(v) };
            g[REG_RSP as usize] = rsp as i64;
        };
        let rip = match sim.kind {
            JMP => sim.a,
            JCC => {
                if holds(sim.b, flags) {
                    sim.a
                } else {
                    next
                }
            }
            LOOP => {
                let zf = flags & 0x40 != 0;
                let rcx = g[REG_RCX as usize] as u64;
                let taken = match sim.b {
                    3 => rcx == 0, // jrcxz
                    v => {
                        let rcx = rcx.wrapping_sub(1);
                        g[REG_RCX as usize] = rcx as i64;
                        rcx != 0 && (v == 0 || (v == 1) == zf)
                    }
                };
                if taken {
                    sim.a
                } else {
                    next
                }
            }
            CALL => {
                push(g, next);
                sim.a
            }
            JMP_IND | CALL_IND => {
                // The target from the registers as they are before the instruction (a
                // `call [rsp]` reads its operand before it pushes).
                let reg = |n: u64| match n {
                    RIP => next,
                    n => GREGS.get(n as usize).map_or(0, |&i| g[i as usize] as u64),
                };
                let (a, mut to) = (sim.a, sim.b);
                to = to.wrapping_add(reg(a & 0xff)).wrapping_add(reg(a >> 8 & 0xff).wrapping_mul(a >> 16 & 0xff));
                if a & MEM != 0 {
                    // SAFETY: the thread was about to read these 8 bytes itself: valid
                    // for any operand the program means; a bad one faults here instead
                    // of at the instruction (SIGSEGV either way).
                    to = unsafe { (to as *const u64).read_unaligned() };
                }
                if sim.kind == CALL_IND {
                    push(g, next);
                }
                to
            }
            _ => {
                // RET (imm16): pop the return address, then imm16 more bytes.
                let rsp = g[REG_RSP as usize] as u64;
                // SAFETY: [rsp] is the interrupted thread's stack top, as `ret` reads it.
                let to = unsafe { (rsp as *const u64).read() };
                g[REG_RSP as usize] = (rsp + 8 + sim.a) as i64;
                to
            }
        };
        g[REG_RIP as usize] = rip as i64;
    }
}

#[cfg(target_arch = "aarch64")]
mod imp {
    use super::*;

    /// Instruction classes that can neither run out of line nor be simulated here yet.
    /// Hand-written: a handful of mask/value pairs from the Arm ARM (as the kernel's
    /// arch/arm64/kernel/probes/decode-insn.c); no crate decodes for this purpose.
    const REFUSED: &[(u32, u32, &str)] = &[
        (0x3f00_0000, 0x0800_0000, "load/store exclusive (its monitor does not survive a trap)"),
        (0xff00_0000, 0xd400_0000, "svc/hvc/smc/brk/hlt (exception generation)"),
        (0xff00_0000, 0xdc00_0000, "ldr (literal) into an FP/SIMD register with opc 0b11 (unallocated)"),
    ];

    /// Simulated classes: `(mask, value)`.
    const SIMULATED: &[(u32, u32)] = &[
        (0x7c00_0000, 0x1400_0000), // b, bl
        (0xff00_0000, 0x5400_0000), // b.cond, bc.cond (FEAT_HBC: bit 4 set)
        (0x7e00_0000, 0x3400_0000), // cbz, cbnz
        (0x7e00_0000, 0x3600_0000), // tbz, tbnz
        (0x1f00_0000, 0x1000_0000), // adr, adrp
        // Bit 26 (V) tells the two ldr (literal) forms apart: the mask must hold it.
        (0x3f00_0000, 0x1800_0000), // ldr (literal), ldrsw (literal), prfm (literal)
        (0x3f00_0000, 0x1c00_0000), // ldr (literal) into s, d, q
        (0xffff_fc1f, 0xd61f_0000), // br
        (0xffff_fc1f, 0xd63f_0000), // blr
        (0xffff_fc1f, 0xd65f_0000), // ret
    ];

    pub(super) fn decode(addr: usize, code: &[u8], _slot_addr: usize) -> Result<Decoded, Error> {
        let Some(w) = code.get(..4).filter(|_| addr % 4 == 0) else {
            return Err(Error::NotInstruction { addr });
        };
        let w = u32::from_le_bytes(w.try_into().expect("4 bytes"));
        if let Some((_, _, what)) = REFUSED.iter().find(|(mask, value, _)| w & mask == *value) {
            return Err(Error::UnsupportedInstruction { addr, insn: format!("{w:#010x}: {what}") });
        }
        if SIMULATED.iter().any(|(mask, value)| w & mask == *value) {
            return Ok(Decoded::Simulate(4, Sim { kind: 1, a: w as u64, b: 0 }));
        }
        if w & 0xfe00_0000 == 0xd600_0000 {
            return Err(Error::UnsupportedInstruction { addr, insn: format!("{w:#010x}: branch to register with pointer authentication or eret") });
        }
        Ok(Decoded::Relocated(4, w.to_le_bytes().to_vec()))
    }

    /// Record magics of the signal frame's `__reserved` area (Linux
    /// `arch/arm64/include/uapi/asm/sigcontext.h`): `fpsimd_context`, `sve_context`,
    /// `extra_context` (records that did not fit, elsewhere in the frame).
    const FPSIMD_MAGIC: u32 = 0x4650_8001;
    const SVE_MAGIC: u32 = 0x5356_4501;
    const EXTRA_MAGIC: u32 = 0x4558_5401;
    /// Offset of `__reserved` in `mcontext_t` (private in libc): after `pstate`, 16-aligned.
    const RESERVED: usize = (core::mem::offset_of!(libc::mcontext_t, pstate) + 8 + 15) & !15;
    // Soundness: the record walk below stays inside the 4096 bytes the kernel's
    // `struct sigcontext` gives `__reserved`, which must be all of the rest of libc's
    // `mcontext_t`.
    static_assertions::const_assert_eq!(core::mem::size_of::<libc::mcontext_t>() - RESERVED, 4096);

    /// Writes `v` into vector register `n` of the interrupted context and zeroes its
    /// bits above 128, as an FP/SIMD load does: into `fpsimd_context`, which sigreturn
    /// loads back, and, if the frame also carries the SVE registers (`sve_context` with
    /// register data: Linux when the thread's SVE state is live, qemu-user always on an
    /// SVE cpu, and qemu restores Z from it after V), into Z`n`. No allocation; the walk
    /// is bounded by the record sizes the kernel wrote.
    fn set_vreg(m: &mut libc::mcontext_t, n: usize, v: u128) {
        let base = m as *mut libc::mcontext_t as *mut u8;
        // SAFETY: RESERVED..size_of::<mcontext_t>() is inside `m` (asserted above).
        let (mut p, mut end) = unsafe { (base.add(RESERVED), base.add(core::mem::size_of::<libc::mcontext_t>())) };
        let mut extra = false;
        // SAFETY (every access below): `p..p + size` is a record inside `p..end`,
        // checked before it is read or written, and `p..end` is the `__reserved` area
        // of the kernel's signal frame or the extra area it points to, both in the
        // frame, readable and writable, which sigreturn reads back.
        unsafe {
            let left = |p: *mut u8, end: *mut u8| (end as usize).saturating_sub(p as usize);
            while left(p, end) >= 8 {
                let (magic, size) = ((p as *const u32).read_unaligned(), (p.add(4) as *const u32).read_unaligned() as usize);
                if magic == 0 || size < 8 || size > left(p, end) {
                    break; // the terminator (or a malformed frame: leave it)
                }
                match magic {
                    // head, fpsr, fpcr, then vregs[32]
                    FPSIMD_MAGIC if size >= 16 + 32 * 16 => (p.add(16 + n * 16) as *mut u128).write_unaligned(v),
                    // head, vl (bytes), flags, reserved; Z0..Z31 of vl bytes each from +16
                    SVE_MAGIC if size > 16 => {
                        let vl = (p.add(8) as *const u16).read_unaligned() as usize;
                        if vl >= 16 && 16 + 32 * vl <= size {
                            let z = p.add(16 + n * vl);
                            (z as *mut u128).write_unaligned(v);
                            z.add(16).write_bytes(0, vl - 16);
                        }
                    }
                    // head, datap, size: the records that did not fit; follow once
                    EXTRA_MAGIC if !extra && size >= 24 => {
                        extra = true;
                        let datap = (p.add(8) as *const u64).read_unaligned() as usize as *mut u8;
                        let len = (p.add(16) as *const u32).read_unaligned() as usize;
                        (p, end) = (datap, datap.wrapping_add(len));
                        continue;
                    }
                    _ => {}
                }
                p = p.add(size);
            }
        }
    }

    fn sext(v: u64, bits: u32) -> i64 {
        ((v << (64 - bits)) as i64) >> (64 - bits)
    }

    fn holds(cond: u32, nzcv: u64) -> bool {
        let (n, z, c, v) = (nzcv >> 31 & 1 != 0, nzcv >> 30 & 1 != 0, nzcv >> 29 & 1 != 0, nzcv >> 28 & 1 != 0);
        let r = match cond >> 1 {
            0 => z,
            1 => c,
            2 => n,
            3 => v,
            4 => c && !z,
            5 => n == v,
            6 => n == v && !z,
            _ => true,
        };
        // Odd codes negate, except 0b1111 (NV), which is "always" too.
        if cond & 1 == 1 && cond != 0xf {
            !r
        } else {
            r
        }
    }

    /// Applies the instruction word in `sim.a` at `addr` to the interrupted context.
    pub(crate) fn simulate(sim: Sim, addr: usize, _len: usize, uc: &mut libc::ucontext_t) {
        let m = &mut uc.uc_mcontext;
        let w = sim.a as u32;
        let pc = addr as u64;
        let x = |m: &libc::mcontext_t, r: u32| if r == 31 { 0 } else { m.regs[r as usize] };
        let rt = w & 0x1f;
        let set = |m: &mut libc::mcontext_t, r: u32, v: u64| {
            if r != 31 {
                m.regs[r as usize] = v;
            }
        };
        let mut next = pc + 4;
        if w & 0x7c00_0000 == 0x1400_0000 {
            // b, bl
            if w >> 31 == 1 {
                m.regs[30] = pc + 4;
            }
            next = pc.wrapping_add_signed(sext((w & 0x03ff_ffff) as u64, 26) * 4);
        } else if w & 0xff00_0000 == 0x5400_0000 {
            // b.cond, bc.cond
            if holds(w & 0xf, m.pstate) {
                next = pc.wrapping_add_signed(sext((w >> 5 & 0x7ffff) as u64, 19) * 4);
            }
        } else if w & 0x7e00_0000 == 0x3400_0000 {
            // cbz, cbnz (sf: 64-bit)
            let v = if w >> 31 == 1 { x(m, rt) } else { x(m, rt) & 0xffff_ffff };
            if (v == 0) != (w >> 24 & 1 == 1) {
                next = pc.wrapping_add_signed(sext((w >> 5 & 0x7ffff) as u64, 19) * 4);
            }
        } else if w & 0x7e00_0000 == 0x3600_0000 {
            // tbz, tbnz
            let bit = (w >> 31) << 5 | (w >> 19 & 0x1f);
            if (x(m, rt) >> bit & 1 == 0) != (w >> 24 & 1 == 1) {
                next = pc.wrapping_add_signed(sext((w >> 5 & 0x3fff) as u64, 14) * 4);
            }
        } else if w & 0x1f00_0000 == 0x1000_0000 {
            // adr, adrp
            let imm = sext(((w >> 5 & 0x7ffff) << 2 | (w >> 29 & 3)) as u64, 21);
            let v = if w >> 31 == 1 { (pc & !0xfff).wrapping_add_signed(imm << 12) } else { pc.wrapping_add_signed(imm) };
            set(m, rt, v);
        } else if w & 0x3f00_0000 == 0x1800_0000 {
            // ldr (literal): opc 00 w, 01 x, 10 sw, 11 prfm
            let at = pc.wrapping_add_signed(sext((w >> 5 & 0x7ffff) as u64, 19) * 4);
            // SAFETY: the literal is in the probed code's image, readable, as the
            // instruction itself would read it.
            let v = unsafe {
                match w >> 30 {
                    0 => Some((at as *const u32).read_unaligned() as u64),
                    1 => Some((at as *const u64).read_unaligned()),
                    2 => Some((at as *const i32).read_unaligned() as i64 as u64),
                    _ => None,
                }
            };
            if let Some(v) = v {
                set(m, rt, v);
            }
        } else if w & 0x3f00_0000 == 0x1c00_0000 {
            // ldr (literal) into an FP/SIMD register: opc 00 s, 01 d, 10 q (11 refused)
            let at = pc.wrapping_add_signed(sext((w >> 5 & 0x7ffff) as u64, 19) * 4);
            // SAFETY: as for the integer literal.
            let v = unsafe {
                match w >> 30 {
                    0 => (at as *const u32).read_unaligned() as u128,
                    1 => (at as *const u64).read_unaligned() as u128,
                    _ => (at as *const u128).read_unaligned(),
                }
            };
            set_vreg(m, rt as usize, v);
        } else {
            // br, blr, ret
            let target = x(m, w >> 5 & 0x1f);
            if w & 0xffff_fc1f == 0xd63f_0000 {
                m.regs[30] = pc + 4;
            }
            next = target;
        }
        m.pc = next;
    }
}
