//! Typed errors of the runtime: each names the problem and the address.

use crate::sys::code::WriteFailure;
use std::fmt;

/// Why a probe could not be registered or changed.
#[allow(missing_docs)] // fields: `addr` the address concerned, others as named
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// No target was given to the builder.
    NoTarget,
    /// No function of that name in the process.
    SymbolNotFound { name: String },
    /// The name is the end of several functions' Rust paths (`parse` for
    /// `a::parse` and `b::parse`): give more of the path, one of the `candidates`.
    AmbiguousSymbol { name: String, candidates: Vec<String> },
    /// The address is in no executable mapping of the process.
    NotExecutable { addr: usize },
    /// The bytes at the address do not decode as an instruction.
    NotInstruction { addr: usize },
    /// The address is inside an instruction (decoding from the function's start).
    NotInstructionBoundary { addr: usize, function: usize },
    /// The instruction cannot run out of line, and is not simulated (yet): its text is given.
    UnsupportedInstruction { addr: usize, insn: String },
    /// The address is in probekit's own hit path, which a probe would make recurse.
    Blacklisted { addr: usize, what: &'static str },
    /// Every probe slot of the process is in use.
    TooManyProbes { max: usize },
    /// The address is inside a `#[traceable]` function's patchable site (the kernel's
    /// `-EILSEQ`): probe the function itself (its site) instead.
    InsideSite { addr: usize, site: usize, function: String },
    /// A return probe's target is not the first instruction of a function.
    NotFunctionEntry { addr: usize, function: usize },
    /// A system call failed.
    Os { addr: usize, call: &'static str, errno: i32 },
    /// No function symbol of the process starts at or before the address within its
    /// image, so no instruction boundary can be proven there (the kernel refuses such
    /// addresses too): name the function (`.function`, `.symbol`) and give `.offset`.
    NoKnownStart { addr: usize },
    /// `.offset(n)` lies outside the named function (`size` bytes from `function`).
    OutsideFunction { addr: usize, function: usize, size: usize },
    /// The target address plus `.offset(n)` overflows the address space.
    AddressOverflow { base: usize, offset: usize },
    /// The address is executable but not readable (`[vsyscall]`): its instruction
    /// cannot be decoded or copied.
    NotReadable { addr: usize },
    /// The code the probe was registered on is gone: its mapping was unmapped or now
    /// holds other code (another library loaded at the same address). The probe
    /// never writes there again; unregister it.
    CodeGone { addr: usize },
    /// `maxactive` asks for more instances than a return probe may have.
    MaxactiveTooLarge { requested: usize, max: usize },
    /// Memory for the probe could not be allocated.
    OutOfMemory { bytes: usize },
    /// The program replaced probekit's SIGTRAP handler (`handler`, its address) after
    /// probekit installed it: probekit's breakpoints would reach that handler. Install
    /// your handler before the first probe is registered; probekit then passes it
    /// every trap that is not its own.
    SigtrapHandlerReplaced { handler: usize },
    /// A multi-function probe's glob does not parse.
    BadPattern { pattern: String, reason: String },
    /// A multi-function probe chose no function: no symbol matched its globs
    /// (`patterns`), and it was given no (`names`: 0) names or function pointers.
    NoMatch { patterns: Vec<String>, names: usize },
    /// A multi-function probe could not attach to `function` (at `addr`; 0 if the
    /// name did not resolve), for the reason `error`.
    Attach { function: String, addr: usize, error: Box<Error> },
    /// This process can write code in no way: `/proc/self/mem` is refused (or not
    /// seen, or forced off) and so is making text writable with `mprotect` (W^X
    /// enforced). Returned by every registration before anything is written (see
    /// [`crate::text_writes`]); also by a write whose `mprotect` alone is refused (a
    /// policy that let the self-test's anonymous page become writable but protects
    /// file-backed text), before that text is written.
    TextNotWritable { kernel: WriteFailure, mprotect: WriteFailure },
    /// The probe was registered with [`crate::Optimize::Required`] and cannot be
    /// optimized (turned into a jump), for the reason given.
    NotOptimized { addr: usize, reason: NotOptimized },
}

/// Why a probe is a breakpoint (a trap per hit) rather than a jump to a detour (see
/// [`crate::Optimize`]): the kernel's `can_optimize` reasons, each a variant, and the
/// few of a process.
#[allow(missing_docs)] // fields: `addr`/`at` the address concerned, others as named
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum NotOptimized {
    /// The probe was registered with [`crate::Optimize::Never`].
    Off,
    /// The probe is disabled (not armed): it is optimized again when enabled, if it can be.
    Disabled,
    /// The probe rides a `#[traceable]` function's site: a call already, never a trap.
    Site,
    /// The probe has a post handler, which runs after the displaced instruction: it
    /// stays a breakpoint (as the kernel's optimized kprobes, which never have one).
    PostHandler,
    /// Another probe armed at the same address cannot be optimized (a post handler,
    /// or [`crate::Optimize::Never`]): probes at one address share one mechanism.
    SharedWithBreakpoint,
    /// The function holding the address, or a separate cold part of it (`f.cold`), has
    /// no known size (no `.size` on its symbol), so no instruction of it can be shown
    /// not to jump into the displaced range.
    FunctionSizeUnknown,
    /// The whole instructions the jump displaces (5 bytes at least) run past the end of
    /// the function (the kernel's "too short").
    CrossesFunctionEnd { window_end: usize, function_end: usize },
    /// An instruction of the function or of a separate cold part of it (`f.cold`,
    /// `f.cold.N`: GCC's hot/cold split), at `from`, jumps into the displaced range
    /// past its first byte (to `to`): that jump would land inside the jump.
    JumpIntoWindow { from: usize, to: usize },
    /// The function (or a separate cold part of it) has an indirect jump (a jump
    /// table, at `at`) whose targets cannot be bounded.
    IndirectJumpInFunction { at: usize },
    /// An instruction of the displaced range (at `at`, its text given) cannot run in
    /// the detour: a branch, call or return, or data out of reach of the detour.
    UnrelocatableInstruction { at: usize, insn: String },
    /// The function does not decode as instructions at `at` (data in the text).
    UndecodableFunction { at: usize },
    /// Another probe, or a site, is inside the displaced range (at `at`).
    ProbeInWindow { at: usize },
    /// No memory for the detour could be had within jump range of the address.
    NoNearMemory,
    /// No grace period could show that no thread is inside the displaced range (a
    /// thread stayed there, or did not answer the sampling signal).
    ThreadsInWindow,
    /// Writing the detour or the jump failed.
    Write(Box<Error>),
    /// The CPU lacks an instruction the detour's trampoline needs (x86_64: LAHF/SAHF
    /// in 64-bit mode, which restore the flags, every x86_64 CPU since 2006 has them;
    /// and inside a function, `xsave` enabled by the OS). See [`crate::cpu_support`].
    CpuLacks { feature: &'static str },
}

impl fmt::Display for NotOptimized {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotOptimized::Off => write!(f, "optimization is off for this probe (`Optimize::Never`)"),
            NotOptimized::Disabled => write!(f, "the probe is disabled"),
            NotOptimized::Site => write!(f, "the probe rides a `#[traceable]` site (a call already, no trap)"),
            NotOptimized::PostHandler => write!(f, "the probe has a post handler, which only a breakpoint probe runs"),
            NotOptimized::SharedWithBreakpoint => {
                write!(f, "another probe at the address has a post handler or `Optimize::Never`, and probes at one address share one mechanism")
            }
            NotOptimized::FunctionSizeUnknown => write!(f, "the function's size is unknown, so jumps into the displaced range cannot be ruled out"),
            NotOptimized::CrossesFunctionEnd { window_end, function_end } => {
                write!(f, "the displaced instructions end at {window_end:#x}, past the function's end at {function_end:#x}")
            }
            NotOptimized::JumpIntoWindow { from, to } => write!(f, "the instruction at {from:#x} jumps into the displaced range, to {to:#x}"),
            NotOptimized::IndirectJumpInFunction { at } => {
                write!(f, "the function has an indirect jump at {at:#x} (a jump table?) whose targets cannot be checked")
            }
            NotOptimized::UnrelocatableInstruction { at, insn } => write!(f, "`{insn}` at {at:#x} cannot run in the detour"),
            NotOptimized::UndecodableFunction { at } => write!(f, "the function does not decode at {at:#x}"),
            NotOptimized::ProbeInWindow { at } => write!(f, "another probe or a site is inside the displaced range, at {at:#x}"),
            NotOptimized::NoNearMemory => write!(f, "no memory within jump range of the address for the detour"),
            NotOptimized::ThreadsInWindow => write!(f, "no grace period could show that no thread is inside the displaced range"),
            NotOptimized::Write(e) => write!(f, "writing the detour or the jump failed: {e}"),
            NotOptimized::CpuLacks { feature } => write!(f, "the CPU lacks {feature}, which the detour's trampoline needs"),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NoTarget => write!(f, "a probe needs a target: `.function(f)`, `.symbol(name)` or `.address(addr)`"),
            Error::SymbolNotFound { name } => write!(f, "no function `{name}` in the symbol tables of the process"),
            Error::AmbiguousSymbol { name, candidates } => {
                write!(f, "`{name}` names {} functions, give one of their paths: {}", candidates.len(), candidates.join(", "))
            }
            Error::NotExecutable { addr } => write!(f, "{addr:#x} is not in an executable mapping"),
            Error::NotInstruction { addr } => write!(f, "{addr:#x} does not hold a valid instruction"),
            Error::NotInstructionBoundary { addr, function } => {
                write!(f, "{addr:#x} is not an instruction boundary of the function at {function:#x} (+{:#x})", addr.wrapping_sub(*function))
            }
            Error::UnsupportedInstruction { addr, insn } => {
                write!(f, "{addr:#x}: `{insn}` cannot be probed yet (it cannot run out of line)")
            }
            Error::Blacklisted { addr, what } => write!(f, "{addr:#x} is in {what}, which probekit cannot probe"),
            Error::TooManyProbes { max } => write!(f, "all {max} probe slots of the process are used"),
            Error::InsideSite { addr, site, function } => {
                write!(f, "{addr:#x} is inside the patchable site of `{function}` at {site:#x} (+{:#x}): probe the function itself", addr.wrapping_sub(*site))
            }
            Error::NotFunctionEntry { addr, function } => write!(
                f,
                "{addr:#x} is not a function entry (it is +{:#x} into the function at {function:#x}); return probes go on entries",
                addr.wrapping_sub(*function)
            ),
            Error::NoKnownStart { addr } => write!(
                f,
                "no function symbol starts at or before {addr:#x}, so it cannot be proven an instruction boundary: \
                 name the function (`.function(f)` or `.symbol(name)`) and give `.offset(n)`"
            ),
            Error::OutsideFunction { addr, function, size } => {
                write!(f, "{addr:#x} is outside the named function at {function:#x} (+{:#x}, but it has {size:#x} bytes)", addr.wrapping_sub(*function))
            }
            Error::AddressOverflow { base, offset } => write!(f, "{base:#x} + offset {offset:#x} overflows the address space"),
            Error::NotReadable { addr } => write!(f, "{addr:#x} is in a mapping that cannot be read, so its instruction cannot be decoded"),
            Error::CodeGone { addr } => {
                write!(f, "the code probed at {addr:#x} is gone (unmapped, or other code is mapped there now): the probe will not write there again")
            }
            Error::MaxactiveTooLarge { requested, max } => write!(f, "maxactive {requested} is more than the {max} instances a return probe may have"),
            Error::OutOfMemory { bytes } => write!(f, "could not allocate {bytes} bytes for the probe"),
            Error::SigtrapHandlerReplaced { handler } => write!(
                f,
                "the program replaced probekit's SIGTRAP handler (now {handler:#x}), which would receive probekit's breakpoints: \
                 install your own SIGTRAP handler before the first probe is registered, and probekit passes it every trap that is not its own"
            ),
            Error::BadPattern { pattern, reason } => write!(f, "bad glob `{pattern}`: {reason}"),
            Error::NoMatch { patterns, names } => {
                write!(f, "no function of the process matches {patterns:?}")?;
                if *names == 0 {
                    write!(f, " (and no function was named)")?;
                }
                Ok(())
            }
            Error::Attach { function, addr, error } => write!(f, "cannot attach to `{function}` at {addr:#x}: {error}"),
            Error::TextNotWritable { kernel, mprotect } => write!(
                f,
                "this process cannot write code, so no probe can be armed: through /proc/self/mem, {kernel}; \
                 with mprotect (writable and executable), {mprotect}"
            ),
            Error::NotOptimized { addr, reason } => write!(f, "the probe at {addr:#x} cannot be optimized: {reason}"),
            Error::Os { addr, call, errno } => {
                write!(f, "{call} for {addr:#x} failed: {}", std::io::Error::from_raw_os_error(*errno))
            }
        }
    }
}

impl std::error::Error for Error {}

impl Error {
    /// The errno of the last failed system call, as an [`Error::Os`].
    pub(crate) fn last_os(addr: usize, call: &'static str) -> Error {
        Error::Os { addr, call, errno: std::io::Error::last_os_error().raw_os_error().unwrap_or(0) }
    }
}
