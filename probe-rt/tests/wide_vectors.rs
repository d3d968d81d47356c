//! x86_64: a C function's `__m256` and `__m512` arguments and return values (in
//! `ymm0`–`ymm7` / `zmm0`–`zmm7`) reach it and its caller whole through every
//! trampoline that runs a handler at a function's entry or return, whatever AVX or
//! AVX-512 code the handler runs; and a handler's AVX code leaves no upper state
//! behind where there was none (the transition penalty it would cost the probed code).
#![cfg(target_arch = "x86_64")]

use probe_rt::{Optimize, Probe, PtRegs, ReturnProbe};
use std::sync::Mutex;

std::arch::global_asm!(
    ".pushsection .text.wide_tests, \"ax\", @progbits",
    // Stores ymm0-ymm7 at [rdi]: what a function taking eight __m256 sees.
    ".globl wide_args256",
    ".type wide_args256, @function",
    "wide_args256:",
    "vmovdqu ymmword ptr [rdi], ymm0",
    "vmovdqu ymmword ptr [rdi + 32], ymm1",
    "vmovdqu ymmword ptr [rdi + 64], ymm2",
    "vmovdqu ymmword ptr [rdi + 96], ymm3",
    "vmovdqu ymmword ptr [rdi + 128], ymm4",
    "vmovdqu ymmword ptr [rdi + 160], ymm5",
    "vmovdqu ymmword ptr [rdi + 192], ymm6",
    "vmovdqu ymmword ptr [rdi + 224], ymm7",
    "ret",
    ".size wide_args256, . - wide_args256",
    // Stores zmm0-zmm7 at [rdi]: what a function taking eight __m512 sees.
    ".globl wide_args512",
    ".type wide_args512, @function",
    "wide_args512:",
    "vmovdqu64 zmmword ptr [rdi], zmm0",
    "vmovdqu64 zmmword ptr [rdi + 64], zmm1",
    "vmovdqu64 zmmword ptr [rdi + 128], zmm2",
    "vmovdqu64 zmmword ptr [rdi + 192], zmm3",
    "vmovdqu64 zmmword ptr [rdi + 256], zmm4",
    "vmovdqu64 zmmword ptr [rdi + 320], zmm5",
    "vmovdqu64 zmmword ptr [rdi + 384], zmm6",
    "vmovdqu64 zmmword ptr [rdi + 448], zmm7",
    "ret",
    ".size wide_args512, . - wide_args512",
    // Returns ymm0-ymm1 (zmm0-zmm1 with rsi = 1) loaded from [rdi]: an __m256 (__m512)
    // return value, and a second register of a struct of two.
    ".globl wide_ret",
    ".type wide_ret, @function",
    "wide_ret:",
    "mov eax, 0",
    "test rsi, rsi",
    "jnz 2f",
    "vmovdqu ymm0, ymmword ptr [rdi]",
    "vmovdqu ymm1, ymmword ptr [rdi + 32]",
    "ret",
    "2:",
    "vmovdqu64 zmm0, zmmword ptr [rdi]",
    "vmovdqu64 zmm1, zmmword ptr [rdi + 64]",
    "ret",
    ".size wide_ret, . - wide_ret",
    // Returns which upper state is in use at its entry: XINUSE & (AVX | ZMM_Hi256).
    ".globl upper_in_use",
    ".type upper_in_use, @function",
    "upper_in_use:",
    "mov ecx, 1",
    "xgetbv",
    "and eax, 0x44",
    "ret",
    ".size upper_in_use, . - upper_in_use",
    ".popsection",
);

extern "C" {
    fn wide_args256();
    fn wide_args512();
    fn wide_ret();
    fn upper_in_use();
}

/// One test at a time: each arms probes the others' functions must not meet.
static SERIAL: Mutex<()> = Mutex::new(());

/// Whether this CPU runs the trampolines that keep vectors whole.
fn wide() -> bool {
    probe_rt::cpu_support().wide
}

fn avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

/// Sets every bit above 127 of ymm0-ymm15 (and zmm0-zmm15 with AVX-512): what a
/// handler's vector code may leave.
fn dirty_upper() {
    // SAFETY: writes only the registers declared clobbered; AVX is there (callers check).
    unsafe {
        std::arch::asm!(
            "vpcmpeqd ymm0, ymm0, ymm0", "vpcmpeqd ymm1, ymm1, ymm1", "vpcmpeqd ymm2, ymm2, ymm2", "vpcmpeqd ymm3, ymm3, ymm3",
            "vpcmpeqd ymm4, ymm4, ymm4", "vpcmpeqd ymm5, ymm5, ymm5", "vpcmpeqd ymm6, ymm6, ymm6", "vpcmpeqd ymm7, ymm7, ymm7",
            out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _, out("xmm4") _, out("xmm5") _, out("xmm6") _, out("xmm7") _,
        );
        if avx512() {
            std::arch::asm!(
                "vpternlogd zmm0, zmm0, zmm0, 0xff", "vpternlogd zmm1, zmm1, zmm1, 0xff",
                "vpternlogd zmm2, zmm2, zmm2, 0xff", "vpternlogd zmm3, zmm3, zmm3, 0xff",
                "vpternlogd zmm4, zmm4, zmm4, 0xff", "vpternlogd zmm5, zmm5, zmm5, 0xff",
                "vpternlogd zmm6, zmm6, zmm6, 0xff", "vpternlogd zmm7, zmm7, zmm7, 0xff",
                out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _, out("xmm4") _, out("xmm5") _, out("xmm6") _, out("xmm7") _,
            );
        }
    }
}

/// Distinct bytes: no register's upper half looks like its lower one or another's.
fn pattern<const N: usize>(seed: u8) -> [u8; N] {
    std::array::from_fn(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
}

/// Calls `wide_args256` with ymm0-ymm7 = `vals` and returns what it saw.
fn call_args256(vals: &[u8; 256]) -> [u8; 256] {
    let mut out = [0u8; 256];
    // SAFETY: loads 256 bytes of `vals`, calls a function that writes 256 bytes at
    // rdi = `out`, under the C ABI (its clobbers declared by clobber_abi).
    unsafe {
        std::arch::asm!(
            "vmovdqu ymm0, ymmword ptr [rsi]", "vmovdqu ymm1, ymmword ptr [rsi + 32]",
            "vmovdqu ymm2, ymmword ptr [rsi + 64]", "vmovdqu ymm3, ymmword ptr [rsi + 96]",
            "vmovdqu ymm4, ymmword ptr [rsi + 128]", "vmovdqu ymm5, ymmword ptr [rsi + 160]",
            "vmovdqu ymm6, ymmword ptr [rsi + 192]", "vmovdqu ymm7, ymmword ptr [rsi + 224]",
            "call {f}",
            f = sym wide_args256,
            inout("rdi") out.as_mut_ptr() => _,
            inout("rsi") vals.as_ptr() => _,
            clobber_abi("C"),
        );
    }
    out
}

/// Calls `wide_args512` with zmm0-zmm7 = `vals` and returns what it saw.
fn call_args512(vals: &[u8; 512]) -> [u8; 512] {
    let mut out = [0u8; 512];
    // SAFETY: as `call_args256`, with AVX-512 (callers check).
    unsafe {
        std::arch::asm!(
            "vmovdqu64 zmm0, zmmword ptr [rsi]", "vmovdqu64 zmm1, zmmword ptr [rsi + 64]",
            "vmovdqu64 zmm2, zmmword ptr [rsi + 128]", "vmovdqu64 zmm3, zmmword ptr [rsi + 192]",
            "vmovdqu64 zmm4, zmmword ptr [rsi + 256]", "vmovdqu64 zmm5, zmmword ptr [rsi + 320]",
            "vmovdqu64 zmm6, zmmword ptr [rsi + 384]", "vmovdqu64 zmm7, zmmword ptr [rsi + 448]",
            "call {f}",
            f = sym wide_args512,
            inout("rdi") out.as_mut_ptr() => _,
            inout("rsi") vals.as_ptr() => _,
            clobber_abi("C"),
        );
    }
    out
}

/// Calls `wide_ret` (`zmm`: the 512-bit form) on `vals` and returns ymm0-ymm1
/// (zmm0-zmm1) as its caller gets them.
fn call_ret(vals: &[u8; 128], zmm: bool) -> [u8; 128] {
    let mut out = [0u8; 128];
    // SAFETY: the function reads 64 (128) bytes at rdi; the results are stored into
    // `out` (128 bytes) after the call; the C ABI's clobbers are declared.
    unsafe {
        match zmm {
            false => std::arch::asm!(
                "push rdx", "push rdx",
                "call {f}",
                "pop rdx", "pop rdx",
                "vmovdqu ymmword ptr [rdx], ymm0", "vmovdqu ymmword ptr [rdx + 32], ymm1",
                f = sym wide_ret,
                inout("rdi") vals.as_ptr() => _,
                inout("rsi") 0u64 => _,
                inout("rdx") out.as_mut_ptr() => _,
                clobber_abi("C"),
            ),
            true => std::arch::asm!(
                "push rdx", "push rdx",
                "call {f}",
                "pop rdx", "pop rdx",
                "vmovdqu64 zmmword ptr [rdx], zmm0", "vmovdqu64 zmmword ptr [rdx + 64], zmm1",
                f = sym wide_ret,
                inout("rdi") vals.as_ptr() => _,
                inout("rsi") 1u64 => _,
                inout("rdx") out.as_mut_ptr() => _,
                clobber_abi("C"),
            ),
        }
    }
    out
}

/// Calls `upper_in_use` with the upper state clean (after `vzeroupper`): what it
/// found in use at its entry, and what its caller finds in use after its return.
fn in_use_around_a_clean_call() -> (u32, u32) {
    let (entry, after): (u32, u32);
    // SAFETY: vzeroupper keeps bits 0-127; the call follows the C ABI (clobbers
    // declared); xgetbv with ecx = 1 is there (checked by the caller).
    unsafe {
        std::arch::asm!(
            "vzeroupper",
            "call {f}",
            "mov esi, eax",
            "mov ecx, 1",
            "xgetbv",
            "and eax, 0x44",
            f = sym upper_in_use,
            out("eax") after,
            out("esi") entry,
            clobber_abi("C"),
        )
    };
    (entry, after)
}

#[test]
fn entry_handlers_leave_vector_arguments_whole() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    if !wide() {
        eprintln!("skipped: no AVX state (the narrow trampolines run)");
        return;
    }
    let vals = pattern::<256>(3);
    assert_eq!(call_args256(&vals), vals, "unprobed");
    for optimize in [Optimize::Required, Optimize::Never] {
        let p = Probe::builder().symbol("wide_args256").optimize(optimize).pre(|_: &PtRegs| dirty_upper()).register().unwrap();
        assert_eq!(p.is_optimized(), optimize == Optimize::Required);
        assert_eq!(call_args256(&vals), vals, "{optimize:?}: ymm arguments");
        assert_eq!(p.nhit(), 1);
        drop(p);
    }
    if !avx512() {
        eprintln!("AVX-512 part skipped: no AVX-512");
        return;
    }
    let vals = pattern::<512>(5);
    assert_eq!(call_args512(&vals), vals, "unprobed");
    for optimize in [Optimize::Required, Optimize::Never] {
        let p = Probe::builder().symbol("wide_args512").optimize(optimize).pre(|_: &PtRegs| dirty_upper()).register().unwrap();
        assert_eq!(call_args512(&vals), vals, "{optimize:?}: zmm arguments");
        drop(p);
    }
}

/// Where the trampolines keep the upper parts whatever they hold and put back those
/// that are not zero (all but Intel's AVX-512 CPUs), one register's part alone not
/// zero is still put back: the test ORs every register's, the ymm halves and the zmm
/// bits apart.
#[test]
fn one_upper_part_not_zero_alone_is_kept() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    if !wide() {
        eprintln!("skipped: no AVX state (the narrow trampolines run)");
        return;
    }
    let p = Probe::builder().symbol("wide_args256").optimize(Optimize::Required).pre(|_: &PtRegs| dirty_upper()).register().unwrap();
    for i in 0..8 {
        // ymm{i} bits 128-255 alone not zero.
        let mut vals = [0u8; 256];
        vals[32 * i + 16..32 * i + 32].copy_from_slice(&pattern::<16>(i as u8 + 1));
        assert_eq!(call_args256(&vals), vals, "ymm{i}'s upper half alone");
    }
    assert_eq!(p.nhit(), 8);
    drop(p);
    if !avx512() {
        eprintln!("AVX-512 part skipped: no AVX-512");
        return;
    }
    let p = Probe::builder().symbol("wide_args512").optimize(Optimize::Required).pre(|_: &PtRegs| dirty_upper()).register().unwrap();
    for i in 0..8 {
        // zmm{i} bits 256-511 alone not zero (every ymm half zero).
        let mut vals = [0u8; 512];
        vals[64 * i + 32..64 * i + 64].copy_from_slice(&pattern::<32>(i as u8 + 1));
        assert_eq!(call_args512(&vals), vals, "zmm{i}'s bits 256-511 alone");
    }
    assert_eq!(p.nhit(), 8);
}

#[test]
fn return_handlers_leave_vector_return_values_whole() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    if !wide() {
        eprintln!("skipped: no AVX state (the narrow trampolines run)");
        return;
    }
    let vals = pattern::<128>(11);
    assert_eq!(call_ret(&vals, false)[..64], vals[..64], "unprobed");
    for optimize in [Optimize::Required, Optimize::Never] {
        let p = ReturnProbe::builder()
            .symbol("wide_ret")
            .optimize(optimize)
            .entry_handler(|_: &PtRegs, _: &mut ()| {
                dirty_upper();
                true
            })
            .handler(|_: &PtRegs, _: &mut ()| dirty_upper())
            .register()
            .unwrap();
        let got = call_ret(&vals, false);
        assert_eq!(got[..64], vals[..64], "{optimize:?}: ymm0-ymm1 returned");
        if avx512() {
            let got = call_ret(&vals, true);
            assert_eq!(got, vals, "{optimize:?}: zmm0-zmm1 returned");
        }
        drop(p);
    }
}

#[test]
fn a_handler_s_avx_code_leaves_no_upper_state_behind() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // The test asks the CPU which state is in use (the trampolines do not).
    if !wide() || core::arch::x86_64::__cpuid_count(0xd, 1).eax & 4 == 0 {
        eprintln!("skipped: no AVX state, or no xgetbv with ecx = 1");
        return;
    }
    assert_eq!(in_use_around_a_clean_call(), (0, 0), "unprobed");
    let p = Probe::builder().symbol("upper_in_use").optimize(Optimize::Required).pre(|_: &PtRegs| dirty_upper()).register().unwrap();
    assert!(p.is_optimized());
    assert_eq!(in_use_around_a_clean_call(), (0, 0), "an entry handler's AVX state reached the probed function");
    assert_eq!(p.nhit(), 1);
    drop(p);
    let p = ReturnProbe::builder().symbol("upper_in_use").handler(|_: &PtRegs, _: &mut ()| dirty_upper()).register().unwrap();
    assert_eq!(in_use_around_a_clean_call(), (0, 0), "a return handler's AVX state reached the caller");
    assert_eq!(p.nhit(), 1);
}
