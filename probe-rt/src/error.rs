//! Typed errors of the runtime: each names the problem and the address.

use std::fmt;

/// Why a probe could not be registered or changed.
#[allow(missing_docs)] // fields: `addr` the address concerned, others as named
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// No target was given to the builder.
    NoTarget,
    /// No function of that name in the process.
    SymbolNotFound { name: String },
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
    /// `ReturnProbeBuilder::data` was called after a handler was given (handlers are
    /// typed by the data, so they were dropped): call `data` first.
    HandlersBeforeData,
    /// A system call failed.
    Os { addr: usize, call: &'static str, errno: i32 },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NoTarget => write!(f, "a probe needs a target: `.function(f)`, `.symbol(name)` or `.address(addr)`"),
            Error::SymbolNotFound { name } => write!(f, "no function `{name}` in the symbol tables of the process"),
            Error::NotExecutable { addr } => write!(f, "{addr:#x} is not in an executable mapping"),
            Error::NotInstruction { addr } => write!(f, "{addr:#x} does not hold a valid instruction"),
            Error::NotInstructionBoundary { addr, function } => write!(
                f,
                "{addr:#x} is not an instruction boundary of the function at {function:#x} (+{:#x})",
                addr - function
            ),
            Error::UnsupportedInstruction { addr, insn } => {
                write!(f, "{addr:#x}: `{insn}` cannot be probed yet (it cannot run out of line)")
            }
            Error::Blacklisted { addr, what } => write!(f, "{addr:#x} is in {what}, which probekit cannot probe"),
            Error::TooManyProbes { max } => write!(f, "all {max} probe slots of the process are used"),
            Error::InsideSite { addr, site, function } => write!(
                f,
                "{addr:#x} is inside the patchable site of `{function}` at {site:#x} (+{:#x}): probe the function itself",
                addr - site
            ),
            Error::NotFunctionEntry { addr, function } => write!(
                f,
                "{addr:#x} is not a function entry (it is +{:#x} into the function at {function:#x}); return probes go on entries",
                addr - function
            ),
            Error::HandlersBeforeData => {
                write!(f, "`.data::<T>()` came after a handler, which it drops: call `.data::<T>()` first")
            }
            Error::Os { addr, call, errno } => {
                write!(f, "{call} for {addr:#x} failed: {}", std::io::Error::from_raw_os_error(*errno))
            }
        }
    }
}

impl std::error::Error for Error {}
