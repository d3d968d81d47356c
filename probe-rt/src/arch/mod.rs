//! Every machine-code encoding the runtime writes, per architecture, and the
//! instruction decoding, relocation and simulation of the displaced instruction
//! ([`insn`]), and the detour blocks of optimized probes ([`detour`]).

pub(crate) mod detour;
pub(crate) mod insn;

/// Bytes of [`abs_jump`]'s code.
#[cfg(target_arch = "x86_64")]
pub(crate) const ABS_JUMP: usize = 14;
#[cfg(target_arch = "aarch64")]
pub(crate) const ABS_JUMP: usize = 16;

/// A jump to `to` from anywhere, position-independent: x86_64 `jmp [rip]; .quad to`;
/// aarch64 `ldr x16, .+8; br x16; .quad to` (x16, IP0, is free at a call boundary:
/// the AAPCS64 lets veneers clobber it).
pub(crate) fn abs_jump(to: usize) -> [u8; ABS_JUMP] {
    let mut code = [0u8; ABS_JUMP];
    #[cfg(target_arch = "x86_64")]
    code[..6].copy_from_slice(&[0xff, 0x25, 0, 0, 0, 0]);
    #[cfg(target_arch = "aarch64")]
    {
        code[..4].copy_from_slice(&0x5800_0050u32.to_le_bytes());
        code[4..8].copy_from_slice(&0xd61f_0200u32.to_le_bytes());
    }
    code[ABS_JUMP - 8..].copy_from_slice(&(to as u64).to_le_bytes());
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abs_jump_encodes_its_target() {
        let to = 0x1122_3344_5566_7788usize;
        let code = abs_jump(to);
        assert_eq!(code[ABS_JUMP - 8..], to.to_le_bytes());
        #[cfg(target_arch = "x86_64")]
        assert_eq!(code[..6], [0xff, 0x25, 0, 0, 0, 0], "jmp qword ptr [rip]");
        #[cfg(target_arch = "aarch64")]
        {
            assert_eq!(code[..4], 0x5800_0050u32.to_le_bytes(), "ldr x16, .+8");
            assert_eq!(code[4..8], 0xd61f_0200u32.to_le_bytes(), "br x16");
        }
    }

    /// `bc.cond` (FEAT_HBC: `b.cond` with bit 4 set) is pc-relative: simulated, never
    /// run out of line from a slot, where it would branch relative to the slot.
    #[cfg(target_arch = "aarch64")]
    #[test]
    fn bc_cond_is_simulated_as_b_cond() {
        for w in [0x5400_0040u32, 0x5400_0050] {
            let exec = insn::prepare(0x40_0000, &w.to_le_bytes(), 0x50_0000, true).unwrap();
            assert!(matches!(exec, insn::Exec::Simulate { .. }), "{w:#x}");
        }
    }
}
