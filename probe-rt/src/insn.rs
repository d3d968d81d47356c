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
        if addr >= start && (addr - start) % 4 == 0 { Ok(()) } else { Err(bad) }
    }
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use super::*;
    use iced_x86::{BlockEncoder, BlockEncoderOptions, Code, ConditionCode, Decoder, DecoderOptions, FlowControl, Formatter, InstructionBlock, IntelFormatter, Mnemonic};

    const JMP: u64 = 1;
    const JCC: u64 = 2;
    const CALL: u64 = 3;
    const LOOP: u64 = 4;
    const RET: u64 = 5;

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
            _ => Err(unsupported(" (indirect branches, far transfers and traps are not simulated yet)")),
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
        let rip = match sim.kind {
            JMP => sim.a,
            JCC => if holds(sim.b, flags) { sim.a } else { next },
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
                if taken { sim.a } else { next }
            }
            CALL => {
                // The return address goes where `call` puts it: below rsp, inside the
                // 128 bytes the kernel kept free (the red zone) when it built the
                // signal frame, so it overwrites nothing live.
                let rsp = g[REG_RSP as usize] as u64 - 8;
                // SAFETY: rsp - 8 is the interrupted thread's own stack, writable, as it
                // would be for the `call` itself.
                unsafe { (rsp as *mut u64).write(next) };
                g[REG_RSP as usize] = rsp as i64;
                sim.a
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
        (0x3b00_0000, 0x1c00_0000, "ldr (literal) into an FP/SIMD register"),
    ];

    /// Simulated classes: `(mask, value)`.
    const SIMULATED: &[(u32, u32)] = &[
        (0x7c00_0000, 0x1400_0000), // b, bl
        (0xff00_0010, 0x5400_0000), // b.cond
        (0x7e00_0000, 0x3400_0000), // cbz, cbnz
        (0x7e00_0000, 0x3600_0000), // tbz, tbnz
        (0x1f00_0000, 0x1000_0000), // adr, adrp
        (0x3b00_0000, 0x1800_0000), // ldr (literal), ldrsw (literal), prfm (literal)
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
        if cond & 1 == 1 && cond != 0xf { !r } else { r }
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
        } else if w & 0xff00_0010 == 0x5400_0000 {
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
        } else if w & 0x3b00_0000 == 0x1800_0000 {
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
