//! Executes probe-codegen routines for real: fills every general register, the flags
//! and every vector register with distinct random values, enters the routine the way
//! its shape is entered (call, return into it, or the arm64 ftrace site sequence),
//! lets a handler record the frame, rewrite fields and clobber every caller-saved
//! register, and checks every register after the routine against what the frame,
//! the policy and the shape promise. x86_64 wide modes (`ArgsWide`, `ReturnWide`,
//! `FullInUse`, `Sse`) are checked on all the bits they keep: random values above bit 127 in
//! ymm0-15, or zmm0-31 and k0-7 where the CPU has AVX-512, back as they were after the
//! handler clobbered them, and zero again where they met their initial state.
//!
//! The harness is hand-written test asm: it is not a trampoline and touches no frame
//! field, only its own `Ctx`, whose offsets enter as `const` operands.

use std::cell::Cell;
use std::sync::atomic::AtomicU64;

pub mod frames;
pub mod macro_frames;

/// What a frame element holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum V {
    /// General register by number (x86_64 encoding order; aarch64 xN).
    Gpr(u8),
    /// Stack pointer (aarch64 `sp`).
    Sp,
    /// Resume address (`rip`, `pc`).
    Pc,
    /// Flags (`eflags`, `pstate`).
    Flags,
    /// x86_64 segment selector by encoding number.
    Seg(u8),
    /// A defined constant.
    Const(u64),
}

/// One frame element of a routine's frame.
#[derive(Clone, Copy, Debug)]
pub struct Elem {
    pub off: usize,
    pub size: usize,
    pub v: V,
}

/// Bytes of probe-codegen's site, stated independently: x86_64 `call rel32`, aarch64
/// `mov x9, x30; bl` (a Site routine's pc field is the continuation less this).
const SITE_LEN: usize = if cfg!(target_arch = "x86_64") { 5 } else { 8 };

/// Mirrors probe_codegen::Shape for the generated table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    SaveRestore,
    Kretprobe,
    Entry,
    Site,
}

/// Mirrors probe_codegen::Fp for the generated table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FpMode {
    None,
    Args,
    Return,
    ArgsWide,
    ReturnWide,
    Full,
    FullCompact,
    FullInUse,
    Sse,
}

/// A generated routine and what the checker needs to know of it.
pub struct Routine {
    pub name: &'static str,
    pub entry: unsafe extern "C" fn(),
    pub shape: Kind,
    /// Policy `All` (else `CallerSaved`).
    pub all: bool,
    pub fp: FpMode,
    pub frame_size: usize,
    pub alloc: usize,
    pub fp_area: Option<(usize, usize)>,
    pub elems: &'static [Elem],
}

// The Builder's .S switches to Intel syntax and back for GNU as (`cc`); in global_asm!
// Intel is the default already, which rustc points out.
#[allow(clippy::all, bad_asm_style)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/generated.rs"));
}
pub use generated::ROUTINES;

// The Builder's .S refers to probe-rt's exported `probekit_xsave_size`, `_mask` and
// `probekit_wide_mode`.
use probe_rt as _;

/// `xsave` area size for the x86_64 `Fp::Full` routines (CPUID.(EAX=0DH,ECX=0):EBX).
pub static XSAVE_SIZE: AtomicU64 = AtomicU64::new(4096);
/// `xsave` requested-feature bitmap (XCR0).
pub static XSAVE_MASK: AtomicU64 = AtomicU64::new(0);
/// How the x86_64 wide routines learn which upper halves to keep (probe-codegen's
/// `Fp::WIDE_ASK`, `Fp::WIDE_ZMM`): set for each run (see `wide_mode`).
pub static WIDE_MODE: AtomicU64 = AtomicU64::new(0);

/// State exchanged with the harness.
#[repr(C, align(16))]
pub struct Ctx {
    host_sp: u64,
    in_gpr: [u64; 32],
    in_flags: u64,
    out_gpr: [u64; 32],
    out_flags: u64,
    out_sp: u64,
    p: u64,
    in_vec: [[u8; 16]; 32],
    out_vec: [[u8; 16]; 32],
    /// x86_64: the harness pushes 1.0 on the x87 stack before the routine and pops it
    /// after (not 0), so that the routine meets values there.
    x87: u64,
    /// x86_64: what the harness loads from `in_zmm` and `in_k` before the routine, the
    /// low 128 bits then overwritten from `in_vec`: 2 zmm0-31 and k0-7, 1 ymm0-15, 0
    /// nothing (the state stays as `set_in_use`/`set_upper_state` left it).
    upper: u64,
    /// x86_64: what the harness stores to `out_zmm` and `out_k` after it (as `upper`).
    capture: u64,
    in_k: [u64; 8],
    out_k: [u64; 8],
    in_zmm: [[u8; 64]; 32],
    out_zmm: [[u8; 64]; 32],
}

/// What the handler saw and did, for the current thread's run.
struct Run {
    routine: &'static Routine,
    frame: Vec<u8>,
    fp: Vec<u8>,
    /// What the handler returns: the real return address (Kretprobe), where to resume
    /// (Site).
    returns: usize,
    df_clear: bool,
    hits: u32,
    /// The frame and FP area pointers the handler got: the stack pointer at the call.
    frame_at: usize,
    fp_at: usize,
    /// Where the handler sends execution by rewriting pc/rip, if it does.
    redirect_to: Option<usize>,
}

thread_local! {
    static CURRENT: Cell<*mut Run> = const { Cell::new(std::ptr::null_mut()) };
}

const GPR_XOR: u64 = 0xa5a5_0000_0000_0000;
const VEC_XOR: u8 = 0x3c;
#[cfg(target_arch = "x86_64")]
const FLAGS_XOR: u64 = 0x8c1; // CF | ZF | SF | OF
#[cfg(target_arch = "x86_64")]
const FLAGS_MASK: u64 = 0xcd5 | 0x400; // status flags and DF
#[cfg(target_arch = "aarch64")]
const FLAGS_XOR: u64 = 0xf000_0000; // N Z C V
#[cfg(target_arch = "aarch64")]
const FLAGS_MASK: u64 = 0xf000_0000;

fn modified(v: u64, n: u8) -> u64 {
    v ^ GPR_XOR ^ (n as u64) << 8
}

/// The handler every torture routine calls.
///
/// # Safety
/// Called by a generated routine with its frame and FP area, on a thread that set `CURRENT`.
#[no_mangle]
pub unsafe extern "C" fn torture_handler(frame: *mut u8, fp: *mut u8) -> usize {
    // SAFETY: the thread set CURRENT to a live Run before entering the routine.
    let run = unsafe { &mut *CURRENT.with(|c| c.get()) };
    run.hits += 1;
    run.frame_at = frame as usize;
    run.fp_at = fp as usize;
    #[cfg(target_arch = "x86_64")]
    {
        let flags: u64;
        // SAFETY: reads rflags through the stack the handler owns.
        unsafe { core::arch::asm!("pushfq", "pop {}", out(reg) flags) };
        run.df_clear = flags & 0x400 == 0;
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        run.df_clear = true;
    }
    let r = run.routine;
    // SAFETY: the routine passes a frame of frame_size bytes.
    let f = unsafe { std::slice::from_raw_parts_mut(frame, r.frame_size) };
    run.frame.copy_from_slice(f);
    for e in r.elems.iter().filter(|e| e.size == 8) {
        let old = u64::from_ne_bytes(f[e.off..e.off + 8].try_into().expect("8 bytes"));
        let new = match (e.v, run.redirect_to) {
            (V::Gpr(n), _) => modified(old, n),
            (V::Flags, _) => old ^ FLAGS_XOR,
            // A site routine resumes where the handler's return value says, never at
            // the pc field: a wrong one there must change nothing.
            (V::Pc, _) if r.shape == Kind::Site => old ^ 0xf0,
            (V::Pc, Some(to)) => to as u64,
            _ => continue,
        };
        f[e.off..e.off + 8].copy_from_slice(&new.to_ne_bytes());
    }
    if let Some((_, size)) = r.fp_area {
        let (start, len) = fp_vector_span(r);
        // SAFETY: the routine passes an FP area of `size` bytes (the legacy region of an xsave area).
        let area = unsafe { std::slice::from_raw_parts_mut(fp.add(start), len) };
        run.fp.clear();
        run.fp.extend_from_slice(area);
        for b in area.iter_mut() {
            *b ^= VEC_XOR;
        }
        let _ = size;
    }
    clobber();
    if matches!(r.fp, FpMode::ArgsWide | FpMode::ReturnWide | FpMode::FullInUse | FpMode::Sse) {
        clobber_upper();
    }
    if r.fp == FpMode::FullInUse {
        clobber_in_use();
    }
    run.returns
}

/// Makes every vector register's bits above 127 non-zero (x86_64), as a handler's
/// AVX or AVX-512 code may: the wide routines restore the low halves all the same.
#[inline(always)]
fn clobber_upper() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: only writes registers declared as clobbered; AVX is enabled (the wide
    // routines need it: `init_xsave` checked), AVX-512 only where detected.
    unsafe {
        core::arch::asm!(
            "vpcmpeqd ymm0, ymm0, ymm0", "vpcmpeqd ymm1, ymm1, ymm1", "vpcmpeqd ymm2, ymm2, ymm2", "vpcmpeqd ymm3, ymm3, ymm3",
            "vpcmpeqd ymm4, ymm4, ymm4", "vpcmpeqd ymm5, ymm5, ymm5", "vpcmpeqd ymm6, ymm6, ymm6", "vpcmpeqd ymm7, ymm7, ymm7",
            out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _, out("xmm4") _, out("xmm5") _, out("xmm6") _, out("xmm7") _,
        );
        if std::arch::is_x86_feature_detected!("avx512f") {
            core::arch::asm!(
                "vpternlogd zmm0, zmm0, zmm0, 0xff", "vpternlogd zmm1, zmm1, zmm1, 0xff",
                "vpternlogd zmm2, zmm2, zmm2, 0xff", "vpternlogd zmm3, zmm3, zmm3, 0xff",
                out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _,
            );
        }
    }
}

/// What else a handler may use where the whole state is kept (x86_64): `zmm16`–`zmm31`
/// and `k1`–`k7` (AVX-512 machines), and the x87 stack.
#[inline(always)]
fn clobber_in_use() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: writes only declared registers; the x87 push is popped again. AVX-512 only
    // where detected.
    unsafe {
        core::arch::asm!("fldpi", "fstp st(0)", out("st(0)") _);
        if std::arch::is_x86_feature_detected!("avx512bw") {
            core::arch::asm!(
                "vpternlogd zmm16, zmm16, zmm16, 0xff", "vpternlogd zmm23, zmm23, zmm23, 0xff",
                "vpternlogd zmm31, zmm31, zmm31, 0xff", "kxnorq k1, k1, k1", "kxnorq k7, k7, k7",
                out("zmm16") _, out("zmm23") _, out("zmm31") _, out("k1") _, out("k7") _,
            );
        }
    }
}

/// The state a `Fp::FullInUse` routine meets at its entry (x86_64), one per path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum InUse {
    /// Upper halves, AVX-512 and x87 state in their initial state: the moves of the
    /// legacy region only, and the initial state put back on the way out.
    Clean,
    /// Upper halves, `zmm16`–`zmm31` and `k` registers in use, and x87 state with an
    /// empty stack (as after any signal): every move, and the x87 words.
    Upper,
    /// A value on the x87 stack as well: `fxsave64`.
    X87,
    /// AMX tile configuration in use (where the CPU and kernel have AMX): the `xsavec64`
    /// path. Elsewhere as `Upper`.
    Amx,
}

/// Puts the state components in the state `s` names (x86_64).
fn set_in_use(s: InUse) {
    #[cfg(target_arch = "x86_64")]
    {
        #[repr(C, align(64))]
        struct Area([u8; 4096]);
        let avx512 = std::arch::is_x86_feature_detected!("avx512bw");
        let mut area = Box::new(Area([0; 4096]));
        // Initial state for x87, AVX, opmask, ZMM_Hi256 and Hi16_ZMM: xrstor of a zeroed
        // header (XSTATE_BV = 0) with those in the requested-feature bitmap. With AVX
        // in it, xrstor also loads MXCSR from the legacy region: the current one.
        let rfbm = XSAVE_MASK.load(std::sync::atomic::Ordering::Relaxed) & 0xe5;
        // SAFETY: the area is 64-aligned and 4 KiB: a standard-form header that is all
        // zero is valid, components whose XSTATE_BV bit is 0 are initialised, and MXCSR
        // is loaded with the value stored just before. Every register it may change is
        // declared (`clobber_abi`: the vector, mask and x87 registers).
        unsafe {
            core::arch::asm!(
                "stmxcsr dword ptr [{p} + 24]", "xrstor64 [{p}]", "vzeroupper",
                p = in(reg) area.0.as_mut_ptr(), in("eax") rfbm as u32, in("edx") 0, clobber_abi("C"),
            );
        }
        if s == InUse::Clean {
            return;
        }
        // SAFETY: writes only declared registers (AVX-512 ones where detected).
        unsafe {
            core::arch::asm!("vpcmpeqd ymm15, ymm15, ymm15", out("xmm15") _);
            if avx512 {
                core::arch::asm!(
                    "vpternlogd zmm14, zmm14, zmm14, 0xff", "vpternlogd zmm20, zmm20, zmm20, 0xff", "kxnorq k2, k2, k2",
                    out("zmm14") _, out("zmm20") _, out("k2") _,
                );
            }
        }
        // SAFETY: pushes and pops the x87 stack: x87 state in use, the stack empty.
        unsafe { core::arch::asm!("fld1", "fstp st(0)", out("st(0)") _) };
        match s {
            // The harness pushes a value on the x87 stack for the run (`Ctx::x87`).
            InUse::X87 => {}
            InUse::Amx if amx() => {
                // Palette 1, tile 0 of 1 row of 4 bytes: the tile configuration in use.
                area.0[..64].fill(0);
                area.0[0] = 1;
                area.0[16] = 4;
                area.0[48] = 1;
                // SAFETY: a valid palette-1 configuration; the kernel granted the tile
                // data permission (`amx`). Released after the run (`release`).
                unsafe { core::arch::asm!("ldtilecfg [{p}]", p = in(reg) area.0.as_ptr()) };
            }
            _ => {}
        }
    }
    let _ = s;
}

/// The CPU has AMX tiles and the kernel lets this process use them (asked once).
#[cfg(target_arch = "x86_64")]
fn amx() -> bool {
    static AMX: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AMX.get_or_init(|| {
        // CPUID.(EAX=07H,ECX=0):EDX[24] AMX-TILE, and XCR0 enables TILECFG and TILEDATA.
        let tile = core::arch::x86_64::__cpuid_count(7, 0).edx & (1 << 24) != 0;
        let xcr0 = XSAVE_MASK.load(std::sync::atomic::Ordering::Relaxed);
        const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
        const XFEATURE_XTILEDATA: i64 = 18;
        // SAFETY: arch_prctl(ARCH_REQ_XCOMP_PERM) only asks for a permission.
        tile && xcr0 & (3 << 17) == 3 << 17 && unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) } == 0
    })
}

/// Undoes what `set_in_use` left behind: the tile configuration of an `InUse::Amx` run.
fn release(s: InUse) {
    #[cfg(target_arch = "x86_64")]
    if s == InUse::Amx && amx() {
        // SAFETY: tilerelease needs only the permission `amx` asked for.
        unsafe { core::arch::asm!("tilerelease") };
    }
    let _ = s;
}

/// Held by a wide routine's run, from [`set_wide_mode`] to its return.
static WIDE_RUNS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Sets how the wide routines (Rust ones and the Builder's `.S`) learn which upper
/// halves to keep: asking the CPU (`ask`, where it has `xgetbv` with `ecx = 1`), or
/// testing the values (the zmm bits too where XCR0 enables them).
fn set_wide_mode(ask: bool) {
    #[cfg(target_arch = "x86_64")]
    {
        let mask = XSAVE_MASK.load(std::sync::atomic::Ordering::Relaxed);
        let can_ask = core::arch::x86_64::__cpuid_count(0xd, 1).eax & 4 != 0;
        // probe-codegen's `Fp::WIDE_ASK`, or `Fp::WIDE_ZMM` (XCR0 bit 6) where enabled.
        let mode = if ask && can_ask { 0x01 } else { mask & 0x40 };
        WIDE_MODE.store(mode, std::sync::atomic::Ordering::Relaxed);
        probe_rt::__private::WIDE_MODE.store(mode, std::sync::atomic::Ordering::Relaxed);
    }
    let _ = ask;
}

/// Puts the upper state of the vector registers in its initial state (`clean`) or
/// in use (x86_64): the wide routines take one path or the other at their entry.
#[inline(always)]
fn set_upper_state(clean: bool) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: vzeroupper keeps bits 0-127 and writes no memory; the other writes
    // only ymm15, declared clobbered. AVX is enabled (`init_xsave` checked).
    unsafe {
        match clean {
            true => core::arch::asm!("vzeroupper"),
            false => core::arch::asm!("vpcmpeqd ymm15, ymm15, ymm15", out("xmm15") _),
        }
    }
    let _ = clean;
}

/// What the harness moves of the vector registers above bit 127 (x86_64 wide modes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // aarch64 has none
enum Upper {
    None,
    /// ymm0-15 (AVX state, no AVX-512).
    Ymm,
    /// zmm0-31 and k0-7 (AVX-512 state, and AVX512BW for `kmovq`).
    Zmm,
}

impl Upper {
    fn level(self) -> u64 {
        self as u64
    }

    /// Bytes of each register it moves.
    fn bytes(self) -> usize {
        match self {
            Upper::None => 16,
            Upper::Ymm => 32,
            Upper::Zmm => 64,
        }
    }
}

/// What of the bits above 127 a routine of mode `fp` keeps and this CPU has.
fn upper_width(fp: FpMode) -> Upper {
    #[cfg(target_arch = "x86_64")]
    if matches!(fp, FpMode::ArgsWide | FpMode::ReturnWide | FpMode::FullInUse | FpMode::Sse) {
        let xcr0 = XSAVE_MASK.load(std::sync::atomic::Ordering::Relaxed);
        if xcr0 & 0xe0 == 0xe0 && std::arch::is_x86_feature_detected!("avx512bw") {
            return Upper::Zmm;
        }
        if xcr0 & 4 != 0 {
            return Upper::Ymm;
        }
    }
    let _ = fp;
    Upper::None
}

/// `(offset, length)` of the vector registers inside the FP area.
fn fp_vector_span(r: &Routine) -> (usize, usize) {
    match (r.fp, cfg!(target_arch = "x86_64")) {
        (FpMode::None, _) => (0, 0),
        (FpMode::Args | FpMode::ArgsWide, _) => (0, 8 * 16),
        (FpMode::Return | FpMode::ReturnWide, _) => (0, 2 * 16),
        (FpMode::Full | FpMode::FullCompact | FpMode::FullInUse, true) => (160, 16 * 16), // xmm0..15 in the xsave legacy region (first in every form)
        (FpMode::Full | FpMode::FullCompact | FpMode::FullInUse | FpMode::Sse, false) => (0, 32 * 16),
        (FpMode::Sse, true) => (0, 16 * 16),
    }
}

/// Number of vector registers the routine's FP mode covers.
fn fp_covered(r: &Routine) -> usize {
    fp_vector_span(r).1 / 16
}

/// Overwrites every caller-saved register and the flags, as a real handler may.
#[inline(always)]
fn clobber() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: only writes registers declared as clobbered.
    unsafe {
        core::arch::asm!(
            "mov rax, -1", "mov rcx, -1", "mov rdx, -1", "mov rsi, -1", "mov rdi, -1",
            "mov r8, -1", "mov r9, -1", "mov r10, -1", "mov r11, -1",
            "pcmpeqd xmm0, xmm0", "pcmpeqd xmm1, xmm1", "pcmpeqd xmm2, xmm2", "pcmpeqd xmm3, xmm3",
            "pcmpeqd xmm4, xmm4", "pcmpeqd xmm5, xmm5", "pcmpeqd xmm6, xmm6", "pcmpeqd xmm7, xmm7",
            "pcmpeqd xmm8, xmm8", "pcmpeqd xmm9, xmm9", "pcmpeqd xmm10, xmm10", "pcmpeqd xmm11, xmm11",
            "pcmpeqd xmm12, xmm12", "pcmpeqd xmm13, xmm13", "pcmpeqd xmm14, xmm14", "pcmpeqd xmm15, xmm15",
            "xor eax, eax",
            out("rax") _, out("rcx") _, out("rdx") _, out("rsi") _, out("rdi") _,
            out("r8") _, out("r9") _, out("r10") _, out("r11") _,
            out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _, out("xmm4") _, out("xmm5") _,
            out("xmm6") _, out("xmm7") _, out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
            out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
        );
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: only writes registers declared as clobbered.
    unsafe {
        core::arch::asm!(
            "mov x0, #-1", "mov x1, #-1", "mov x2, #-1", "mov x3, #-1", "mov x4, #-1", "mov x5, #-1",
            "mov x6, #-1", "mov x7, #-1", "mov x8, #-1", "mov x9, #-1", "mov x10, #-1", "mov x11, #-1",
            "mov x12, #-1", "mov x13, #-1", "mov x14, #-1", "mov x15, #-1", "mov x16, #-1", "mov x17, #-1",
            "movi v0.16b, #0xff", "movi v1.16b, #0xff", "movi v2.16b, #0xff", "movi v3.16b, #0xff",
            "movi v4.16b, #0xff", "movi v5.16b, #0xff", "movi v6.16b, #0xff", "movi v7.16b, #0xff",
            "movi v16.16b, #0xff", "movi v17.16b, #0xff", "movi v18.16b, #0xff", "movi v19.16b, #0xff",
            "movi v20.16b, #0xff", "movi v21.16b, #0xff", "movi v22.16b, #0xff", "movi v23.16b, #0xff",
            "movi v24.16b, #0xff", "movi v25.16b, #0xff", "movi v26.16b, #0xff", "movi v27.16b, #0xff",
            "movi v28.16b, #0xff", "movi v29.16b, #0xff", "movi v30.16b, #0xff", "movi v31.16b, #0xff",
            "msr nzcv, xzr",
            out("x0") _, out("x1") _, out("x2") _, out("x3") _, out("x4") _, out("x5") _, out("x6") _,
            out("x7") _, out("x8") _, out("x9") _, out("x10") _, out("x11") _, out("x12") _, out("x13") _,
            out("x14") _, out("x15") _, out("x16") _, out("x17") _,
            out("v0") _, out("v1") _, out("v2") _, out("v3") _, out("v4") _, out("v5") _, out("v6") _,
            out("v7") _, out("v16") _, out("v17") _, out("v18") _, out("v19") _, out("v20") _,
            out("v21") _, out("v22") _, out("v23") _, out("v24") _, out("v25") _, out("v26") _,
            out("v27") _, out("v28") _, out("v29") _, out("v30") _, out("v31") _,
        );
    }
}

mod harness;
use harness::{enter, Entry};

/// Sets the x86_64 xsave size and mask from CPUID and XCR0 (no-op elsewhere).
pub fn init_xsave() {
    #[cfg(target_arch = "x86_64")]
    {
        let leaf1 = core::arch::x86_64::__cpuid(1);
        assert!(leaf1.ecx & (1 << 27) != 0, "OSXSAVE required for the Fp::Full torture");
        assert!(core::arch::x86_64::__cpuid_count(0xd, 1).eax & 2 != 0, "XSAVEC required for the Fp::FullCompact torture");
        assert!(std::arch::is_x86_feature_detected!("avx"), "AVX required for the Fp::ArgsWide torture");
        // What the runtime gives its own `fp = full` routines: the CPU's standard size,
        // or what `Fp::FullInUse`'s moves reach if more (AMD Zen 4), and XCR0.
        use std::sync::atomic::Ordering::Relaxed;
        let (size, mask) = (probe_rt::__private::XSAVE_SIZE.load(Relaxed), probe_rt::__private::XSAVE_MASK.load(Relaxed));
        let standard = core::arch::x86_64::__cpuid_count(0xd, 0).ebx as u64;
        assert!(size >= standard, "probe-rt's xsave size {size} below the CPU's {standard}");
        XSAVE_SIZE.store(size, Relaxed);
        XSAVE_MASK.store(mask, Relaxed);
    }
}

/// A tiny deterministic generator for register values.
pub struct Rng(pub u64);
impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

const STACK: usize = 256 * 1024;
const CANARY: u8 = 0xcc;

/// Runs `r` once with random inputs from `rng`; `skew` misaligns the probed stack
/// pointer by 8 (x86_64: the dynamic alignment must cope; Entry always has the
/// function-entry alignment). Returns every mismatch.
/// `redirect`: the handler rewrites pc/rip (where the frame has it and the shape
/// resumes there) and execution must continue at the new address.
pub fn torture(r: &'static Routine, rng: &mut Rng, skew: bool, set_df: bool, redirect: bool) -> Result<(), String> {
    let is_x86 = cfg!(target_arch = "x86_64");
    let mut ctx: Box<Ctx> = Box::new(Ctx {
        host_sp: 0,
        in_gpr: [0; 32],
        in_flags: 0,
        out_gpr: [0; 32],
        out_flags: 0,
        out_sp: 0,
        p: 0,
        in_vec: [[0; 16]; 32],
        out_vec: [[0; 16]; 32],
        x87: 0,
        upper: 0,
        capture: 0,
        in_k: [0; 8],
        out_k: [0; 8],
        in_zmm: [[0; 64]; 32],
        out_zmm: [[0; 64]; 32],
    });
    for g in ctx.in_gpr.iter_mut() {
        *g = rng.next_u64();
    }
    for v in ctx.in_vec.iter_mut() {
        for c in v.chunks_mut(8) {
            c.copy_from_slice(&rng.next_u64().to_ne_bytes());
        }
    }
    for v in ctx.in_zmm.iter_mut() {
        for c in v.chunks_mut(8) {
            c.copy_from_slice(&rng.next_u64().to_ne_bytes());
        }
    }
    for k in ctx.in_k.iter_mut() {
        *k = rng.next_u64();
    }
    let flags = rng.next_u64();
    ctx.in_flags = if is_x86 {
        // IF, reserved bit 1, status flags and DF (0x400), but DF only where a routine
        // may meet it set: not at a function's entry (Entry), where the ABI has it
        // clear and the routine relies on that (no `cld`).
        match r.shape {
            Kind::Entry | Kind::Site => 0x202 | (flags & 0x8d5),
            _ => 0x202 | (flags & 0xcd5) | if set_df { 0x400 } else { 0 },
        }
    } else {
        flags & 0xf000_0000
    };
    // The test stack: probed sp P near its top, the target at [P], ctx at [P+8].
    let mut stack = vec![CANARY; STACK];
    let top = (stack.as_mut_ptr() as usize + STACK - 64) & !15;
    // x86_64 Entry runs at a function entry, where the ABI has P + 8 16-aligned: its
    // routines count on that (the plan's module docs), so it is the only P they meet.
    let at_function_entry = is_x86 && matches!(r.shape, Kind::Entry | Kind::Site);
    let p = top - if skew || at_function_entry { 8 } else { 0 };
    ctx.p = p as u64;
    let entry = match (r.shape, is_x86) {
        (Kind::Kretprobe, _) => Entry::Kret,
        (Kind::Entry | Kind::Site, false) => Entry::Ftrace,
        _ => Entry::Call,
    };
    let cont = harness::cont_address(entry);
    let target = r.entry as usize;
    let redirect_to = harness::alt_address(entry).filter(|_| redirect && r.elems.iter().any(|e| e.v == V::Pc));
    // SAFETY: p..p+32 lies inside `stack`.
    unsafe {
        (p as *mut u64).write(target as u64);
        ((p + 8) as *mut u64).write(&mut *ctx as *mut Ctx as u64);
        ((p + 24) as *mut u64).write(1); // the marker the redirect target clears
    }
    let mut run = Run {
        routine: r,
        frame: vec![0; r.frame_size],
        fp: Vec::with_capacity(1024),
        returns: match r.shape {
            Kind::Site => redirect_to.unwrap_or(cont),
            _ => cont,
        },
        df_clear: false,
        hits: 0,
        frame_at: 0,
        fp_at: 0,
        redirect_to,
    };
    CURRENT.with(|c| c.set(&mut run));
    // The wide routines' two paths: upper state clean at the entry, or in use; each
    // under both ways of learning which to keep: the CPU asked (where it can be), the
    // values tested. The word is shared: one wide run at a time (the tests run in
    // parallel threads).
    let _wide_run = matches!(r.fp, FpMode::ArgsWide | FpMode::ReturnWide | FpMode::Sse).then(|| {
        let run = WIDE_RUNS.lock().unwrap_or_else(|p| p.into_inner());
        set_upper_state(!skew);
        set_wide_mode(set_df);
        run
    });
    // The FullInUse routines' paths, one for each of the four runs.
    let in_use = match (skew, set_df) {
        (false, false) => InUse::Clean,
        (true, false) => InUse::Upper,
        (false, true) => InUse::X87,
        (true, true) => InUse::Amx,
    };
    if r.fp == FpMode::FullInUse {
        set_in_use(in_use);
        ctx.x87 = (in_use == InUse::X87) as u64;
    }
    // Sse's two x87 paths: the stack empty, or a value on it (`fxsave64`).
    if r.fp == FpMode::Sse {
        ctx.x87 = set_df as u64;
    }
    // The bits above 127 the wide modes keep: random ones on the paths that meet them in
    // use, none on the paths that meet them in their initial state; read back after.
    let upper = upper_width(r.fp);
    let loaded = match r.fp {
        FpMode::ArgsWide | FpMode::ReturnWide | FpMode::Sse => skew,
        FpMode::FullInUse => in_use != InUse::Clean,
        _ => false,
    };
    ctx.capture = upper.level();
    ctx.upper = if loaded { upper.level() } else { 0 };
    // SAFETY: ctx is valid; the harness switches to `stack` (alive until after the call) and back.
    unsafe { enter(entry, &mut ctx) };
    CURRENT.with(|c| c.set(std::ptr::null_mut()));
    if r.fp == FpMode::FullInUse {
        release(in_use);
    }

    // SAFETY: p+24 lies inside `stack`, alive.
    let marker = unsafe { ((p + 24) as *const u64).read() };
    let mut errors = Vec::new();
    let mut check = |what: String, got: u64, want: u64| {
        if got != want {
            errors.push(format!("{what}: got {got:#018x}, want {want:#018x}"));
        }
    };
    check("handler calls".into(), run.hits as u64, 1);
    check("resumed where the frame's pc said (marker cleared)".into(), marker, redirect_to.is_none() as u64);
    // The address execution resumed at: the continuation, or where the handler redirected it.
    let resumed = redirect_to.unwrap_or(cont) as u64;
    check("DF clear in handler".into(), run.df_clear as u64, 1);
    // The frame is the stack pointer at the handler call: the ABIs want it 16-aligned.
    check("frame alignment".into(), (run.frame_at % 16) as u64, 0);
    let fp_align = if is_x86 && matches!(r.fp, FpMode::Full | FpMode::FullCompact | FpMode::FullInUse) { 64 } else { 16 };
    match r.fp_area {
        Some((off, _)) => {
            check("FP area address".into(), run.fp_at as u64, (run.frame_at + off) as u64);
            check("FP area alignment".into(), (run.fp_at % fp_align) as u64, 0);
        }
        None => check("FP area address".into(), run.fp_at as u64, 0),
    }
    // The frame the handler saw.
    let x30_in = ctx.in_gpr[30];
    let pc_seen = match r.shape {
        Kind::Kretprobe => target as u64,
        // The site's address: the continuation less the site's length.
        Kind::Site => (cont - SITE_LEN) as u64,
        _ => cont as u64,
    };
    for e in r.elems {
        if let V::Const(c) = e.v {
            let byte = c as u8; // 0 or all ones: every byte of the field holds it
            if let Some(i) = run.frame[e.off..e.off + e.size].iter().position(|b| *b != byte) {
                check(format!("constant field @{} byte {i}", e.off), run.frame[e.off + i] as u64, byte as u64);
            }
            continue;
        }
        let mut bytes = [0u8; 8];
        let n = e.size.min(8);
        bytes[..n].copy_from_slice(&run.frame[e.off..e.off + n]);
        let got = u64::from_ne_bytes(bytes);
        let want = match e.v {
            V::Gpr(4) if is_x86 => p as u64,
            V::Gpr(30) if !is_x86 => match r.shape {
                Kind::SaveRestore => cont as u64,
                Kind::Kretprobe => target as u64,
                Kind::Entry | Kind::Site => x30_in,
            },
            V::Gpr(9) if !is_x86 && matches!(r.shape, Kind::Entry | Kind::Site) => x30_in,
            V::Gpr(n) => ctx.in_gpr[n as usize],
            V::Sp => p as u64,
            V::Pc => pc_seen,
            V::Flags => ctx.in_flags,
            V::Seg(n) => harness::segment(n),
            V::Const(c) => c,
        };
        let mask = if n == 8 { u64::MAX } else { (1u64 << (8 * n)) - 1 };
        let mask = if e.v == V::Flags { FLAGS_MASK } else { mask };
        check(format!("frame {:?} @{}", e.v, e.off), got & mask, want & mask);
    }
    // Implicit padding: written too (zero), so no byte of the frame is stale stack.
    let mut covered = vec![false; r.frame_size];
    for e in r.elems {
        covered[e.off..e.off + e.size].iter_mut().for_each(|c| *c = true);
    }
    for (i, _) in covered.iter().enumerate().filter(|(_, c)| !**c) {
        check(format!("padding byte @{i}"), run.frame[i] as u64, 0);
    }
    // Registers after the routine.
    let nregs = if is_x86 { 16 } else { 31 };
    for n in 0..nregs {
        if is_x86 && n == 4 {
            continue;
        }
        let elem = r.elems.iter().find(|e| e.v == V::Gpr(n as u8));
        let input = match (is_x86, r.shape, n) {
            (false, Kind::SaveRestore, 30) => cont as u64,
            // The site's `mov x9, x30` put the link register in x9.
            (false, Kind::Entry | Kind::Site, 9 | 30) => x30_in,
            _ => ctx.in_gpr[n],
        };
        // What the policies promise, stated independently of probe-codegen: callee-saved
        // registers (SysV rbx, rbp, r12-r15; AAPCS64 x19-x29) are reloaded from the
        // frame only under `All`, every other register that has a field always.
        let callee_saved = if is_x86 { matches!(n, 3 | 5 | 12..=15) } else { (19..=29).contains(&n) };
        let want = match (is_x86, r.shape, n) {
            // The resume register holds the resume address: x30 as after any call;
            // Entry's x16 (IP0, free at a function entry), so that x9 keeps the link
            // register the site put there.
            (false, Kind::Entry | Kind::Site, 16) | (false, Kind::SaveRestore | Kind::Kretprobe, 30) => resumed,
            _ if elem.is_some() && (r.all || !callee_saved) => modified(input, n as u8),
            _ => input,
        };
        check(format!("register {n} after"), ctx.out_gpr[n], want);
    }
    check("stack pointer after".into(), ctx.out_sp, p as u64);
    let flags_field = r.elems.iter().any(|e| e.v == V::Flags);
    if is_x86 && matches!(r.shape, Kind::Entry | Kind::Site | Kind::Kretprobe) {
        // A function entry or return: the status flags are not preserved across calls
        // (SysV), so these shapes do not restore them; DF must leave clear, as the ABI
        // wants there.
        check("DF after".into(), ctx.out_flags & 0x400, 0);
    } else {
        let want_flags = if flags_field { ctx.in_flags ^ FLAGS_XOR } else { ctx.in_flags };
        check("flags after".into(), ctx.out_flags & FLAGS_MASK, want_flags & FLAGS_MASK);
    }
    // Vector registers the FP mode covers: saved as they were, restored as the handler left them.
    let covered = fp_covered(r);
    for i in 0..covered {
        let seen: [u8; 16] = run.fp[16 * i..16 * i + 16].try_into().unwrap();
        check(format!("v{i} in FP area (lo)"), lo(&seen), lo(&ctx.in_vec[i]));
        check(format!("v{i} in FP area (hi)"), hi(&seen), hi(&ctx.in_vec[i]));
        let want: Vec<u8> = ctx.in_vec[i].iter().map(|b| b ^ VEC_XOR).collect();
        check(format!("v{i} after (lo)"), lo(&ctx.out_vec[i]), lo(&want));
        check(format!("v{i} after (hi)"), hi(&ctx.out_vec[i]), hi(&want));
    }
    // Their bits above 127: as they were at the entry (the handler clobbered them), or,
    // met in their initial state, in it again (zero).
    let (regs, whole) = match r.fp {
        FpMode::ArgsWide => (8, 0),
        FpMode::Sse => (16, 0),
        FpMode::ReturnWide => (2, 0),
        FpMode::FullInUse => (16, 16),
        _ => (0, 0),
    };
    let width = upper.bytes();
    let mut words = |i: usize, bytes: std::ops::Range<usize>| {
        for at in bytes.step_by(8) {
            let want = if loaded { u64::from_ne_bytes(ctx.in_zmm[i][at..at + 8].try_into().unwrap()) } else { 0 };
            check(format!("zmm{i} bytes {at}..{} after", at + 8), u64::from_ne_bytes(ctx.out_zmm[i][at..at + 8].try_into().unwrap()), want);
        }
    };
    for i in 0..regs {
        words(i, 16..width);
    }
    if upper == Upper::Zmm {
        for i in regs..regs + whole {
            words(i, 0..64);
        }
        if r.fp == FpMode::FullInUse {
            for k in 0..8 {
                check(format!("k{k} after"), ctx.out_k[k], if loaded { ctx.in_k[k] } else { 0 });
            }
        }
    }
    // The red zone of the probed code (x86_64 Entry): untouched below the call's own push.
    if is_x86 && matches!(r.shape, Kind::Entry | Kind::Site) {
        let base = stack.as_ptr() as usize;
        let zone = &stack[p - 136 - base..p - 8 - base];
        if let Some(i) = zone.iter().position(|b| *b != CANARY) {
            errors.push(format!("red zone byte at P-{} overwritten", 136 - i));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!("{} (skew {skew}, df {set_df}, state {in_use:?}):\n  {}", r.name, errors.join("\n  ")))
    }
}

fn lo(v: &[u8]) -> u64 {
    u64::from_ne_bytes(v[..8].try_into().unwrap())
}
fn hi(v: &[u8]) -> u64 {
    u64::from_ne_bytes(v[8..16].try_into().unwrap())
}

static_assertions::const_assert_eq!(core::mem::size_of::<Ctx>() % 16, 0);
