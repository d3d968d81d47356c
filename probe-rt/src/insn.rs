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
    // SAFETY: the trap was raised by executing `addr - 0` .. so the byte is mapped and readable
    // (text is mapped readable on Linux).
    return unsafe { (addr as *const u8).read_volatile() } == 0xcc;
    #[cfg(target_arch = "aarch64")]
    {
        // SAFETY: as above; aarch64 instructions are 4-aligned.
        let w = unsafe { (addr as *const u32).read_volatile() };
        w & 0xffe0_001f == 0xd420_0000 // BRK #imm
    }
}

/// Decodes the instruction at `addr` and builds its slot at `slot_addr`, boosted
/// (jumping straight back) if `boost` and the jump can be encoded.
pub(crate) fn displace(addr: usize, readable_end: usize, slot_addr: usize, boost: bool) -> Result<Displaced, Error> {
    let (len, mut slot) = imp::relocate(addr, readable_end, slot_addr)?;
    let from = slot_addr + slot.len();
    let slot_bp = tail(&mut slot, from, addr + len, boost);
    Ok(Displaced { len, slot, slot_bp })
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use super::*;
    use iced_x86::{BlockEncoder, BlockEncoderOptions, Decoder, DecoderOptions, FlowControl, Formatter, InstructionBlock, IntelFormatter};

    /// The instruction's length and its bytes relocated for `slot_addr`.
    pub(super) fn relocate(addr: usize, readable_end: usize, slot_addr: usize) -> Result<(usize, Vec<u8>), Error> {
        let n = (readable_end - addr).min(15);
        // SAFETY: addr..addr+n lies in a readable, executable mapping (checked by the caller).
        let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, n) };
        let mut d = Decoder::with_ip(64, bytes, addr as u64, DecoderOptions::NONE);
        let insn = d.decode();
        if insn.is_invalid() {
            return Err(Error::NotInstruction { addr });
        }
        let mut text = String::new();
        IntelFormatter::new().format(&insn, &mut text);
        // Only instructions that go on to the next one can run out of line: a branch or
        // call would leave from the slot's address (simulation is for a later step).
        if insn.flow_control() != FlowControl::Next {
            return Err(Error::UnsupportedInstruction { addr, insn: text });
        }
        // Relocated for the slot: RIP-relative operands keep pointing at their data.
        let block = [insn];
        let encoded = BlockEncoder::encode(64, InstructionBlock::new(&block, slot_addr as u64), BlockEncoderOptions::NONE)
            .map_err(|_| Error::UnsupportedInstruction { addr, insn: format!("{text} (out of rel32 range of the slot)") })?;
        Ok((insn.len(), encoded.code_buffer))
    }
}

#[cfg(target_arch = "aarch64")]
mod imp {
    use super::*;

    /// Instruction classes that read the pc or change the flow, and so cannot run out
    /// of line; the kernel's arm64 decoder (arch/arm64/kernel/probes/decode-insn.c)
    /// simulates most of them, a later step here will too. Hand-written: a handful of
    /// mask/value pairs from the Arm ARM, no crate decodes for this purpose.
    const REFUSED: &[(u32, u32, &str)] = &[
        (0x7c00_0000, 0x1400_0000, "b/bl (pc-relative branch)"),
        (0xff00_0010, 0x5400_0000, "b.cond (pc-relative branch)"),
        (0x7e00_0000, 0x3400_0000, "cbz/cbnz (pc-relative branch)"),
        (0x7e00_0000, 0x3600_0000, "tbz/tbnz (pc-relative branch)"),
        (0x1f00_0000, 0x1000_0000, "adr/adrp (reads the pc)"),
        (0x3b00_0000, 0x1800_0000, "ldr (literal) (reads the pc)"),
        (0xfe00_0000, 0xd600_0000, "br/blr/ret (branch to register)"),
        (0x3f00_0000, 0x0800_0000, "load/store exclusive (its monitor does not survive a trap)"),
        (0xff00_0000, 0xd400_0000, "svc/hvc/smc/brk/hlt (exception generation)"),
    ];

    /// The instruction's length and its bytes (nothing to relocate in what is accepted).
    pub(super) fn relocate(addr: usize, _readable_end: usize, _slot_addr: usize) -> Result<(usize, Vec<u8>), Error> {
        if addr % 4 != 0 {
            return Err(Error::NotInstruction { addr });
        }
        // SAFETY: addr is 4-aligned in a readable, executable mapping (checked by the caller).
        let w = unsafe { (addr as *const u32).read() };
        if let Some((_, _, what)) = REFUSED.iter().find(|(mask, value, _)| w & mask == *value) {
            return Err(Error::UnsupportedInstruction { addr, insn: format!("{w:#010x}: {what}") });
        }
        Ok((4, w.to_le_bytes().to_vec()))
    }
}
