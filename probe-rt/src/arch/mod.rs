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

/// The `xsave` area size and requested-feature bitmap the runtime's own x86_64
/// trampolines read (set before `main` with `__private::XSAVE_SIZE` and `XSAVE_MASK`,
/// which generated code outside probe-rt reads): copies that are not exported, so
/// that the trampolines' RIP-relative reads of them link into a shared object too (an
/// exported symbol there may be preempted, and needs the GOT).
#[cfg(target_arch = "x86_64")]
pub(crate) static XSAVE_SIZE: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(512 + 64);
#[cfg(target_arch = "x86_64")]
pub(crate) static XSAVE_MASK: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
#[cfg(target_arch = "x86_64")]
pub(crate) static WIDE_MODE: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// How the wide modes (probe-codegen's `Fp::ArgsWide`, `ReturnWide`, `Sse`) learn which
/// upper halves to keep on a CPU whose XCR0 is `xcr0`: on Intel's CPUs with AVX-512
/// state they ask it (`Fp::WIDE_ASK`: `xgetbv` with `ecx = 1`, ~2.7 ns there), as the
/// test of the values would run 512-bit instructions on every hit, which lower the
/// clock of the CPUs with AVX-512 frequency licences (Skylake-SP, Cascade Lake);
/// elsewhere they test the values (`Fp::WIDE_ZMM` where XCR0 enables ZMM_Hi256): ~2
/// ns, where the question costs ~12 on AMD Zen 4.
#[cfg(target_arch = "x86_64")]
pub(crate) fn wide_mode(xcr0: u64) -> u64 {
    use core::arch::x86_64::{__cpuid, __cpuid_count};
    let id = __cpuid(0);
    let intel = (id.ebx, id.edx, id.ecx) == (u32::from_le_bytes(*b"Genu"), u32::from_le_bytes(*b"ineI"), u32::from_le_bytes(*b"ntel"));
    let can_ask = id.eax >= 0xd && __cpuid_count(0xd, 1).eax & 4 != 0;
    if intel && can_ask && xcr0 & WIDE_ZMM != 0 {
        WIDE_ASK
    } else {
        xcr0 & WIDE_ZMM
    }
}

// `IN_USE_COMPONENTS`, `WIDE_ASK`, `WIDE_ZMM`: probe-codegen's, generated.
#[cfg(target_arch = "x86_64")]
include!(concat!(env!("OUT_DIR"), "/xsave.rs"));

/// The bytes of the area `fp = full-in-use` moves reach where XCR0 is `xcr0`
/// (probe-codegen's `Fp::in_use_area`, from the same table).
#[cfg(target_arch = "x86_64")]
pub(crate) fn in_use_area(xcr0: u64) -> u64 {
    IN_USE_COMPONENTS.iter().filter(|&&(bit, ..)| xcr0 & (1 << bit) != 0).map(|&(_, at, len)| at + len).fold(512 + 64, u64::max)
}

/// What of probe-codegen's routines the CPU this process runs on can run, as CPUID
/// and XCR0 tell (asked once). The runtime's own trampolines go by it; a crate that
/// generates routines (`#[pt_regs(fp = ...)]`, the CLI's `--fp`, probe-codegen's
/// `Fp`) checks it before calling one whose mode needs more than x86_64 itself has,
/// and picks another mode where it says no: those routines would fault (`xgetbv`
/// with `ecx = 1`, `xsavec64`, `kmovq`) or keep less than they say.
///
/// aarch64 needs nothing beyond the architecture: every field is `true` there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CpuSupport {
    /// x86_64 routines that restore the flags (probe-codegen's `SaveRestore` shape,
    /// the optimized probes' detours) use LAHF/SAHF in 64-bit mode:
    /// `CPUID.80000001H:ECX[0]`, every x86_64 CPU since 2006.
    pub lahf_sahf: bool,
    /// `fp = full` keeps the FP/SIMD state: the OS enabled `xsave`
    /// (`CPUID.1:ECX.OSXSAVE[bit 27]`). Without it their `xsave64` faults.
    pub xsave: bool,
    /// `fp = full_compact` runs (`xsavec64`): `xsave`, then
    /// `CPUID.(EAX=0DH,ECX=1):EAX[1]`.
    pub xsavec: bool,
    /// `fp = args_wide`, `return_wide` and `sse` run (probe-codegen's `Fp::ArgsWide`,
    /// `Fp::ReturnWide` and `Fp::Sse`, the runtime's trampolines that keep vector
    /// arguments and return values whole, and xmm0-15 inside legacy SSE code): the OS
    /// enabled AVX state (XCR0 bit 2; where they ask the CPU which state is in use, see
    /// `__private::WIDE_MODE`, it has `xgetbv` with `ecx = 1`).
    /// Otherwise the runtime's narrow ones run (and inside legacy SSE code the one that
    /// keeps all of the state), exact without AVX state.
    pub wide: bool,
    /// `fp = full_in_use` runs (probe-codegen's `Fp::FullInUse`, which moves the state
    /// in use): `wide` and `xsavec`, the CPU tells which state is in use (`xgetbv` with
    /// `ecx = 1`: `CPUID.(EAX=0DH,ECX=1):EAX[2]`), and AVX512BW (`kmovq`) where XCR0
    /// enables the AVX-512 state. It moves the state to Intel's standard `xsave`
    /// offsets on every CPU, and the runtime sizes its area for them (AMD Zen 4 asks
    /// for less).
    pub in_use: bool,
}

/// What the CPU can run of probe-codegen's routines (see [`CpuSupport`]). Asked once:
/// in a virtual machine each CPUID traps to the hypervisor (~7 µs here).
#[cfg(target_arch = "x86_64")]
pub fn cpu_support() -> &'static CpuSupport {
    use core::arch::x86_64::{__cpuid, __cpuid_count};
    static CPU: std::sync::OnceLock<CpuSupport> = std::sync::OnceLock::new();
    CPU.get_or_init(|| {
        let osxsave = __cpuid(1).ecx & (1 << 27) != 0;
        let xcr0 = match osxsave {
            true => {
                let lo: u32;
                // SAFETY: xgetbv with ecx = 0 is allowed in user space when OSXSAVE is set (checked).
                unsafe { core::arch::asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") _, options(nomem, nostack)) };
                lo
            }
            false => 0,
        };
        let leaf_d1 = if osxsave { __cpuid_count(0xd, 1).eax } else { 0 };
        let (xsavec, in_use_query, wide) = (leaf_d1 & 2 != 0, leaf_d1 & 4 != 0, xcr0 & 4 != 0);
        let avx512 = match xcr0 & 0xe0 {
            0 => true,
            0xe0 => std::arch::is_x86_feature_detected!("avx512bw"),
            _ => false,
        };
        CpuSupport {
            lahf_sahf: __cpuid(0x8000_0000).eax >= 0x8000_0001 && __cpuid(0x8000_0001).ecx & 1 != 0,
            xsave: osxsave,
            xsavec,
            wide,
            in_use: wide && xsavec && in_use_query && avx512,
        }
    })
}

/// What the CPU can run of probe-codegen's routines (see [`CpuSupport`]): everything,
/// on aarch64.
#[cfg(target_arch = "aarch64")]
pub fn cpu_support() -> &'static CpuSupport {
    &CpuSupport { lahf_sahf: true, xsave: true, xsavec: true, wide: true, in_use: true }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_support_holds_together() {
        let c = cpu_support();
        // Each mode's needs include those it builds on.
        assert!(!c.xsavec || c.xsave, "{c:?}");
        assert!(!c.wide || c.xsave, "{c:?}");
        assert!(!c.in_use || (c.wide && c.xsavec), "{c:?}");
        #[cfg(target_arch = "x86_64")]
        {
            // The OS enables AVX state only with xsave, and std sees AVX only then.
            assert!(!c.wide || std::arch::is_x86_feature_detected!("avx"), "{c:?}");
            if c.xsave {
                // The area of the `fp = full` routines holds what the CPU's `xsave` writes
                // and what `Fp::FullInUse` moves, for the components XCR0 enables.
                use crate::__private::{XSAVE_MASK, XSAVE_SIZE};
                use core::sync::atomic::Ordering;
                let (size, mask) = (XSAVE_SIZE.load(Ordering::Relaxed), XSAVE_MASK.load(Ordering::Relaxed));
                assert!(size >= core::arch::x86_64::__cpuid_count(0xd, 0).ebx as u64, "{size}");
                assert!(size >= in_use_area(mask), "{size} {mask:#x}");
                if mask & 0xe0 == 0xe0 {
                    assert_eq!(in_use_area(mask), 2688);
                }
                // The wide modes' word: asked of the CPU, or the zmm bits where enabled.
                let wide = crate::__private::WIDE_MODE.load(Ordering::Relaxed);
                assert_eq!(wide, wide_mode(mask));
                assert!(wide == WIDE_ASK || wide == mask & WIDE_ZMM, "{wide:#x} {mask:#x}");
                assert_eq!(wide, WIDE_MODE.load(Ordering::Relaxed), "the runtime's copy");
            }
            if c.in_use {
                // What `Fp::FullInUse` runs first must not fault, and answers XCR0 & XINUSE.
                let ((lo0, hi0), (lo1, hi1)): ((u32, u32), (u32, u32));
                // SAFETY: `in_use` says xgetbv is there, with ecx = 0 and with ecx = 1.
                unsafe {
                    core::arch::asm!("xgetbv", in("ecx") 0, out("eax") lo0, out("edx") hi0, options(nomem, nostack));
                    core::arch::asm!("xgetbv", in("ecx") 1, out("eax") lo1, out("edx") hi1, options(nomem, nostack));
                }
                let (xcr0, in_use) = ((hi0 as u64) << 32 | lo0 as u64, (hi1 as u64) << 32 | lo1 as u64);
                assert_eq!(in_use & !xcr0, 0, "in use {in_use:#x} within XCR0 {xcr0:#x}");
            }
        }
        #[cfg(target_arch = "aarch64")]
        assert!(c.lahf_sahf && c.xsave && c.xsavec && c.wide && c.in_use, "{c:?}");
    }

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
