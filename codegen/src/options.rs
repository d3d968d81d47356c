//! The options of a plan: which registers are restored ([`Policy`]), which FP/SIMD
//! state is kept ([`Fp`]), which kind of routine ([`Shape`]). A module of their own,
//! which depends on nothing, so that the frame layout (which reserves the names the
//! routines' constants take) and the plans both use them without depending on each
//! other.

use std::fmt;

/// Which general registers the trampoline restores from the frame.
///
/// Under both policies every register that has a field is *saved* into it, so the
/// frame is complete, and every caller-saved register without a field is spilled to a
/// hidden area and restored, so the probed code never sees a handler's scratch values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Policy {
    /// Every register that has a field is restored from it: a handler's write to any
    /// general register (and to the flags and the resume address) takes effect. The
    /// trampoline trusts no calling convention (the choice of seed 000's author), except
    /// for the x86_64 flags at a function's entry and return (`Entry`, `Kretprobe`),
    /// which the ABI does not keep across calls: saved, not restored; and except for
    /// the aarch64 register the routine resumes through (`x30`; `x16` for `Entry`),
    /// which gets the frame's pc.
    All,
    /// Callee-saved registers (SysV: rbx, rbp, r12–r15; AAPCS64: x19–x29) are left to
    /// the ABI on the way out: the handler is a normal function that preserves them, so
    /// they are not reloaded. A handler's write to one of their fields has **no effect**.
    /// Caller-saved registers, flags and the resume address are restored as under `All`.
    CallerSaved,
}

/// Which FP/SIMD state the trampoline preserves around the handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fp {
    /// None: the handler must not touch FP/SIMD registers (e.g. `-C target-feature=-sse`
    /// code), or the probed point must have none live.
    None,
    /// Argument registers: x86_64 `xmm0`–`xmm7`, aarch64 `q0`–`q7` (what is live at a function entry).
    Args,
    /// Return registers: x86_64 `xmm0`–`xmm1`, aarch64 `q0`–`q1` (what is live at a function return).
    Return,
    /// As `Args`, and on x86_64 the bits above 128 of `ymm0`–`ymm7` / `zmm0`–`zmm7` too:
    /// a C function may take `__m256` and `__m512` arguments there, and a handler's AVX
    /// code (glibc's `memcpy` is some) changes them. How the routine learns which upper
    /// halves to keep is the `wide_mode` operand's (a `u64`, probe-rt's
    /// `probekit_wide_mode`, set before `main`): with [`Fp::WIDE_ASK`] it asks the CPU
    /// which state is in use (`xgetbv` with `ecx = 1`: ~2.7 ns on some CPUs, ~12 on
    /// others) and keeps that; without it, it keeps the upper halves (the zmm bits too
    /// with [`Fp::WIDE_ZMM`]) whatever they hold and tests them for zero (~2 ns; but
    /// 512-bit instructions on every hit, which lower the clock of CPUs with AVX-512
    /// frequency licences: probe-rt asks on Intel's CPUs, tests elsewhere). Either way
    /// what was in use, or not zero, is put back (`vinsertf128`, `vinsertf64x4`); the
    /// rest is left in its initial state (`vzeroupper` on the way out: the registers
    /// past these too, caller-saved), so a handler's AVX code costs the probed code no
    /// transition penalty. Until `wide_mode` is set (a hit in an earlier constructor)
    /// the ymm halves are tested and the zmm bits not kept (zeroed, if the ymm halves
    /// are put back). Needs AVX enabled by the OS
    /// (XCR0 bit 2), and what `wide_mode` asks for: the caller checks
    /// (`probekit::cpu_support().wide` answers for probe-rt's `wide_mode`), and uses
    /// `Args` where the CPU has no AVX state (`Args` is then exact). aarch64: as `Args`.
    ArgsWide,
    /// As `Return`, with the upper halves of `ymm0`–`ymm1` / `zmm0`–`zmm1` kept as
    /// `ArgsWide` keeps them (an `__m256` or `__m512` return value). aarch64: as `Return`.
    ReturnWide,
    /// Everything: x86_64 `xsave64`/`xrstor64` of the components in a run-time mask into
    /// an area of run-time size (operands `xsave_mask` and `xsave_size`); aarch64
    /// `q0`–`q31`, `fpcr` and `fpsr`. What is live mid-function. x86_64 needs `xsave`
    /// enabled by the OS (`CPUID.1:ECX.OSXSAVE`; `probekit::cpu_support().xsave`),
    /// without which `xsave64` faults.
    Full,
    /// Everything, as `Full`, but x86_64 saves with `xsavec64`: the compacted form,
    /// which leaves out the components in their initial state (the AVX upper halves
    /// after `vzeroupper`, unused AVX-512 state) and which `xrstor64` reads back. Faster
    /// where the CPU has it (`CPUID.(EAX=0DH,ECX=1):EAX[1]`, Skylake and Zen on); the
    /// caller checks (`probekit::cpu_support().xsavec`). aarch64: as `Full`.
    FullCompact,
    /// Everything, as `Full`, but x86_64 asks the CPU which state is in use (`xgetbv`
    /// with `ecx = 1`) and keeps it with moves, not `xsave`: `xrstor`
    /// alone costs 50-70 ns on some CPUs (virtual ones among them), the moves a few.
    /// Always `xmm0`–`xmm15` and MXCSR (`vmovaps`, `vstmxcsr`); x87 state in use by its
    /// control and status words (written back if the handler changed them), or with
    /// `fxsave64` when values are on the x87 stack (its TOP is not 0: a stack holding
    /// eight values, or MMX state, looks empty by it; a handler running x87 or MMX code
    /// inside the probed code's MMX sequence is not supported); then, where in use, the
    /// `ymm0`–`ymm15` upper halves, the
    /// `zmm0`–`zmm15` bits 256-511, `zmm16`–`zmm31` and `k0`–`k7`, each at its offset in
    /// the standard (non-compacted) `xsave` layout of the run-time area (operands
    /// `xsave_size` and `xsave_mask`, as `Full`), so the handler finds `xmm0`–`xmm15` at
    /// 160 and MXCSR at 24 as with `Full` (the other bytes of the legacy region are not
    /// written on the move path). State that was in its initial state at the entry is
    /// put back in it on the way out (`vzeroupper`; `zmm16`–`zmm31` and `k0`–`k7`
    /// zeroed if the handler used them; `fninit` if the handler left an x87 status),
    /// so a handler's AVX code costs the probed code nothing after, and the probed
    /// code finds the zeros and flags it had. MXCSR is reloaded only if the handler
    /// changed it (`ldmxcsr` costs ~4 ns).
    /// Any other component in use (AMX tiles, APX registers, ...) takes an `xsavec64`
    /// of the whole mask instead, which `xrstor64` reads back. PKRU is not kept: a
    /// handler that changes it changes the probed code's, as with a breakpoint probe.
    ///
    /// The upper parts go to Intel's standard offsets ([`Fp::IN_USE_COMPONENTS`]: 576
    /// AVX, 1088 opmask, 1152 ZMM_Hi256, 1664 Hi16_ZMM) on every CPU. A CPU without MPX
    /// may place them lower in its own standard layout (AMD Zen 4: 832, 896, 1408, and
    /// a 2,432-byte area) and then asks for too small an area: the run-time area must
    /// hold [`Fp::in_use_area`] bytes for the components XCR0 enables (probe-rt's
    /// `xsave_size` does).
    ///
    /// Needs AVX and `xgetbv` with `ecx = 1` and XSAVEC
    /// (`CPUID.(EAX=0DH,ECX=1):EAX[2:1]`), and AVX512BW where XCR0 enables AVX-512
    /// state (`kmovq`): the caller checks (`probekit::cpu_support().in_use`), and uses
    /// `FullCompact` or `Full` elsewhere. aarch64: as `Full`.
    FullInUse,
    /// x86_64: `xmm0`–`xmm15` and MXCSR, with the bits above 127 of `ymm0`–`ymm15` /
    /// `zmm0`–`zmm15` kept as `ArgsWide` keeps its registers'. What is live mid-function
    /// in code of legacy SSE encodings only (no VEX, EVEX or XOP instruction, no x87,
    /// MMX or `xsave`-family instruction): such code reads no bit above 127 and never
    /// touches `zmm16`–`zmm31` or `k0`–`k7`, which the ABI leaves dead across the call
    /// that brought execution into it. The upper halves are kept all the same (as
    /// `ArgsWide` keeps them): a vector argument may pass through
    /// such code unread, and a caller may hold a value there across its call to code it
    /// knows leaves them alone (GCC's `-fipa-ra`). The caller decides that the probed
    /// code is such code (probekit's optimized probes decode the whole function). MXCSR
    /// is reloaded only if the handler changed it, as `FullInUse` does. Values on the
    /// x87 stack (a `long double` a callee returned, passing through) are kept with
    /// `fxsave64` when its TOP says there are any; a handler's x87 status is left as it
    /// leaves it. Needs what `ArgsWide` needs (`probekit::cpu_support().wide`).
    /// aarch64: as `Full`.
    Sse,
}

impl Fp {
    /// x86_64 `FullInUse`: where its moves put each state component above the legacy
    /// region and the header: `(XCR0 bit, offset in the area, bytes)` for AVX (ymm0-15
    /// bits 128-255), opmask (k0-7), ZMM_Hi256 (zmm0-15 bits 256-511) and Hi16_ZMM
    /// (zmm16-31). Intel's standard `xsave` offsets, the same on every CPU.
    pub const IN_USE_COMPONENTS: [(u32, u64, u64); 4] = [(2, 576, 256), (5, 1088, 64), (6, 1152, 512), (7, 1664, 1024)];

    /// x86_64 `ArgsWide`, `ReturnWide` and `Sse`: a bit of their `wide_mode` operand (a
    /// `u64`): ask the CPU which upper halves are in use (`xgetbv` with `ecx = 1`, which
    /// the CPU must have) and keep those. Without it they keep the upper halves whatever
    /// they hold and put back those that are not zero (see [`Fp::ArgsWide`]).
    pub const WIDE_ASK: u64 = 0x01;
    /// x86_64 `ArgsWide`, `ReturnWide` and `Sse`: a bit of their `wide_mode` operand,
    /// without [`Fp::WIDE_ASK`]: XCR0 enables ZMM_Hi256 (bit 6, the same bit), so the
    /// zmm bits 256-511 are kept too (EVEX `vextractf64x4`: the CPU has AVX-512F).
    pub const WIDE_ZMM: u64 = 0x40;

    /// x86_64 `FullInUse`: the bytes of the area its moves reach where XCR0 is `xcr0`
    /// (at least the legacy region and the header, 576). A CPU's own standard size
    /// (`CPUID.(EAX=0DH,ECX=0):EBX`) may be smaller (see [`Fp::FullInUse`]).
    pub const fn in_use_area(xcr0: u64) -> u64 {
        let mut end = 576;
        let mut i = 0;
        while i < Self::IN_USE_COMPONENTS.len() {
            let (bit, at, len) = Self::IN_USE_COMPONENTS[i];
            if xcr0 & (1 << bit) != 0 && at + len > end {
                end = at + len;
            }
            i += 1;
        }
        end
    }

    /// `Full`, `FullCompact` or `FullInUse`: all of the FP/SIMD state.
    pub fn is_full(self) -> bool {
        matches!(self, Fp::Full | Fp::FullCompact | Fp::FullInUse)
    }

    /// `ArgsWide` or `ReturnWide`: the upper halves of the vector registers kept too.
    pub fn is_wide(self) -> bool {
        matches!(self, Fp::ArgsWide | Fp::ReturnWide)
    }

    /// The mode that keeps the same 128-bit registers: `Args` for `ArgsWide`,
    /// `Return` for `ReturnWide`, itself otherwise.
    pub fn narrow(self) -> Fp {
        match self {
            Fp::ArgsWide => Fp::Args,
            Fp::ReturnWide => Fp::Return,
            fp => fp,
        }
    }
}

/// The kind of routine a plan generates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Shape {
    /// A routine called like a function (`call` / `bl`): allocate, save, call the
    /// handler, restore, resume at the frame's pc. The bare save/restore pair. On
    /// x86_64 it restores the flags (the status flags and DF) with `sahf` and an
    /// addition rather than `popfq`: the CPU needs LAHF/SAHF in 64-bit mode
    /// (`CPUID.80000001H:ECX[0]`), as every x86_64 CPU since 2006 has.
    ///
    /// Over a frame with stack pointer and pc fields it carries DWARF call-frame
    /// information (`.cfi_*`) saying that at the handler call the caller is the frame's
    /// context, as a signal frame's is: the stack pointer, the pc (exactly: the
    /// return-address column holds pc + 1, because unwinders look up return address
    /// − 1) and every general register read from their fields, so that an unwinder in
    /// the handler (a backtrace, a panic) walks on from the context the routine resumes
    /// (aarch64: in the return-address column libgcc keeps for signal frames, 96, as
    /// `x30` has a field of its own). Elsewhere in the routine the return address is
    /// undefined: a walk stops there rather than go astray.
    SaveRestore,
    /// The return trampoline of seed 000: entered by the probed function's `ret`,
    /// it saves, calls the handler, which returns the real return address, installs
    /// it as the resume address, restores and returns there. On x86_64 the flags are
    /// saved but not restored: at a function return they carry nothing (SysV), and DF
    /// leaves clear, as the ABI wants it there.
    ///
    /// It carries DWARF call-frame information (`.cfi_*`), so that an unwinder in the
    /// handler (a backtrace, a panic) walks through it to the probed function's real
    /// caller. At the handler call the return address is read from the frame's pc
    /// field (or the hidden resume slot): **the handler must write the real return
    /// address there before anything can unwind**. Elsewhere in the routine the
    /// return address is marked undefined: a walk stops there rather than go astray.
    Kretprobe,
    /// Entered from a patched site by `call` (x86_64) or `mov x9, x30; bl` (aarch64,
    /// as the kernel's ftrace): steps over the x86_64 red zone, saves, calls,
    /// restores and resumes at the continuation (the frame's pc). The site is a
    /// function's entry: on x86_64 the flags are saved but not restored (the ABI does
    /// not preserve them across calls; DF comes clear, as the ABI has it at an entry,
    /// so no `cld` runs, and leaves clear), and the stack has
    /// the alignment the ABI gives every function entry (`rsp + 8` 16-aligned before the
    /// site's `call`), so the frame sits at a fixed distance below it, with no run-time
    /// alignment ([`Plan::probed_sp_offset`](crate::Plan::probed_sp_offset); `Fp::Full`, whose xsave area is sized at
    /// run time, and frames too large to allocate without probing the pages still align
    /// at run time).
    ///
    /// On x86_64 the site's own `call` writes the return address at `[rsp-8]`, inside
    /// the probed code's red zone; the routine keeps the other 120 bytes of it (and
    /// 8 more) untouched. A site is therefore placed where that word is dead: at a
    /// function entry, as `#[traceable]` sites are, the callee has not used its red
    /// zone yet. (A site deeper in a function needs a stub that skips the red zone and
    /// gives the stack the function-entry alignment before its call.)
    ///
    /// On aarch64 the routine reloads `x9` (the link register the site moved there,
    /// as the unprobed function has it) and `x30` from their fields and resumes with
    /// `ret x16`: x16 (IP0) is free at a function entry, since AAPCS64 lets veneers
    /// and PLT stubs overwrite it between caller and callee. It is the one register
    /// that leaves with another value than it came (the resume address), and a
    /// handler's write to its field has no effect.
    ///
    /// Over a frame with stack pointer and pc fields it carries the call-frame
    /// information of [`Shape::SaveRestore`]: at the handler call the caller is the
    /// probed function at its entry (x86_64: the stack pointer above the return
    /// address; aarch64: the link register, in `x9` at the site, is the `x30` field).
    Entry,
    /// [`Shape::Entry`] called from probe-codegen's own site ([`crate::site`]): the
    /// frame's pc reads as the site's address (the continuation less
    /// [`site::len`](crate::site::len)), as a kprobe's `regs->ip` reads as the probed
    /// address, and the routine resumes at the address the handler returns (x86_64
    /// `rax`, aarch64 `x0`; the continuation to go on into the function) rather than at
    /// the frame's pc, which is not read back. A dispatcher so sees the site without
    /// computing it and goes on without a store; it tells a handler's redirect by the
    /// pc field, and returns it.
    ///
    /// On x86_64 the resume address the site's `call` pushed is written only if the
    /// handler returns another: a store there just before the `ret` that reads it
    /// costs ~0.3 ns a hit (measured, `hit/site`).
    Site,
}

macro_rules! names {
    ($t:ty { $($v:ident = $s:literal),* $(,)? }) => {
        impl $t {
            /// Every value.
            pub const ALL: &'static [$t] = &[$(<$t>::$v),*];
            /// The CLI spelling.
            pub fn name(self) -> &'static str { match self { $(<$t>::$v => $s),* } }
        }
        impl std::str::FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s { $($s => Ok(<$t>::$v),)* _ => Err(format!(
                    "unknown {} `{}`: must be one of {}", stringify!($t).to_lowercase(), s,
                    [$(concat!("`", $s, "`")),*].join(", "))) }
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.name()) }
        }
    };
}
names!(Policy { All = "all", CallerSaved = "caller-saved" });
names!(Fp { None = "none", Args = "args", Return = "return", ArgsWide = "args-wide", ReturnWide = "return-wide", Full = "full", FullCompact = "full-compact", FullInUse = "full-in-use", Sse = "sse" });
names!(Shape { SaveRestore = "save-restore", Kretprobe = "kretprobe", Entry = "entry", Site = "site" });

impl Shape {
    /// Whether routines of this shape run at a function's entry, called from a site
    /// ([`Shape::Entry`], [`Shape::Site`]).
    pub fn at_entry(self) -> bool {
        matches!(self, Shape::Entry | Shape::Site)
    }

    /// Whether at the handler call the routine's caller is the frame's context, which
    /// it resumes (every shape but [`Shape::Kretprobe`], whose caller is the probed
    /// function's, found through the frame's pc): what its call-frame information says.
    pub(crate) fn resumes_frame_context(self) -> bool {
        self != Shape::Kretprobe
    }

    /// The shape in the names of its constants: `SAVE_RESTORE` (`S_ALLOC_SAVE_RESTORE`).
    pub fn const_suffix(self) -> String {
        self.name().replace('-', "_").to_uppercase()
    }
}
