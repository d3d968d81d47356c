//! x86_64 vector-state helpers of the optimized-probe tests (`mod vectors` in each test
//! file that uses them): what a handler may do to the FP/SIMD state, and a harness that
//! holds a value in zmm16 across a call.
#![allow(dead_code)] // each test file uses some of them

/// XCR0: the state components the OS enabled.
pub fn xcr0() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: xgetbv with ecx = 0 is allowed where OSXSAVE is set (the callers check AVX,
    // which std detects only with it).
    unsafe { std::arch::asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    (hi as u64) << 32 | lo as u64
}

/// AVX-512 (with BW, for `kxnorq`) enabled by the CPU and the OS.
pub fn avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512bw") && xcr0() & 0xe0 == 0xe0
}

/// What a handler may do to the FP/SIMD state: vector code of every width (glibc's
/// `memcpy` is some), AVX-512 registers and masks (all ones in zmm16), the x87 stack
/// reset, another rounding mode and a raised exception flag.
pub fn clobber_everything() {
    let src = vec![0x5au8; 64 * 1024];
    let mut dst = vec![0u8; 64 * 1024];
    dst.copy_from_slice(std::hint::black_box(&src));
    std::hint::black_box(&dst);
    // SAFETY: writes only the registers declared clobbered (AVX-512 ones where
    // detected); fninit empties the x87 stack, which Rust code keeps empty; the
    // handler's MXCSR change is the point of the tests, and Rust code here does no FP
    // arithmetic that depends on it.
    unsafe {
        std::arch::asm!(
            "vpcmpeqd ymm0, ymm0, ymm0", "vpcmpeqd ymm8, ymm8, ymm8", "vpcmpeqd ymm15, ymm15, ymm15",
            "fninit", "fld1", "fldpi", "faddp st(1), st", "fstp st(0)",
            "sub rsp, 8", "mov dword ptr [rsp], 0x7f81", "ldmxcsr dword ptr [rsp]", "add rsp, 8",
            out("xmm0") _, out("xmm8") _, out("xmm15") _, out("st(0)") _,
        );
        if avx512() {
            std::arch::asm!(
                "vpternlogd zmm1, zmm1, zmm1, 0xff", "vpternlogd zmm9, zmm9, zmm9, 0xff",
                "vpternlogd zmm16, zmm16, zmm16, 0xff", "vpternlogd zmm24, zmm24, zmm24, 0xff", "vpternlogd zmm31, zmm31, zmm31, 0xff",
                "kxnorq k0, k0, k0", "kxnorq k3, k3, k3", "kxnorq k7, k7, k7",
                out("xmm1") _, out("xmm9") _, out("zmm16") _, out("zmm24") _, out("zmm31") _, out("k0") _, out("k3") _, out("k7") _,
            );
        }
    }
}

/// zmm16 zeroed, as a handler's AVX-512 code may.
///
/// # Safety
/// The CPU has AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn clobber_zmm16() {
    // SAFETY: the register is declared clobbered; the CPU has AVX-512 (the caller's promise).
    unsafe { std::arch::asm!("vpternlogd zmm16, zmm16, zmm16, 0", out("zmm16") _) };
}

/// zmm16 = all ones, the C function at `f` called with `x`, then zmm16 stored to `out`.
///
/// # Safety
/// The CPU has AVX-512F; `f` is a C function of one 64-bit integer argument that runs
/// on it, follows the C ABI and leaves zmm16 alone (the C ABI would let it clobber it).
#[target_feature(enable = "avx512f")]
pub unsafe fn all_ones_through(f: *const (), x: u64, out: &mut [u64; 8]) {
    // SAFETY: the caller's promises; every register the call may clobber but zmm16 is
    // declared clobbered.
    unsafe {
        std::arch::asm!(
            "vpternlogd zmm16, zmm16, zmm16, 0xff",
            "call rax",
            "vmovdqu64 [r12], zmm16",
            in("rax") f,
            in("rdi") x,
            // The output pointer in a register the call keeps.
            in("r12") out.as_mut_ptr(),
            out("zmm16") _,
            clobber_abi("C"),
        );
    }
}
