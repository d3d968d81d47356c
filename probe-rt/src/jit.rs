//! Code generated at run time: declare where a function is, so that it can be probed.
//!
//! probekit proves an instruction boundary by decoding from the start of the function
//! that holds it, and optimizes a probe (a jump instead of a breakpoint, see
//! [`Optimize`](crate::Optimize)) only where it knows the whole function: x86_64
//! decodes all of it to show that nothing jumps into the displaced instructions. Both
//! come from the ELF symbol tables, which know nothing of code a JIT compiler (or a
//! test) wrote into anonymous memory: there, registration fails with
//! [`Error::NoKnownStart`](crate::Error::NoKnownStart) and optimization with
//! [`NotOptimized::FunctionSizeUnknown`](crate::NotOptimized::FunctionSizeUnknown).
//! [`declare`] tells probekit a function's name and bounds, as `perf`'s
//! `/tmp/perf-<pid>.map` and Frida's code ranges do; the function is then found by
//! address (a probe's boundary, optimization, stack traces, the listing) and by name
//! ([`ProbeBuilder::symbol`](crate::ProbeBuilder::symbol)) until its [`JitFunction`]
//! is dropped.
//!
//! Declared functions are not seen by multi-function probes' globs, which walk the
//! symbol tables of the images.
//!
//! # Example
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // `mov eax, 42; ret` (x86_64) or `mov w0, #42; ret` (aarch64), in a page written
//! // while read-write, then made read+execute (never both).
//! #[cfg(target_arch = "x86_64")]
//! let code: &[u8] = &[0xb8, 42, 0, 0, 0, 0xc3];
//! #[cfg(target_arch = "aarch64")]
//! let code: &[u8] = &[0x40, 0x05, 0x80, 0x52, 0xc0, 0x03, 0x5f, 0xd6];
//! // SAFETY: a fresh anonymous mapping of one page, ours alone; filled while writable,
//! // then made executable (the instruction cache needs no sync on x86_64; aarch64
//! // code would sync it here, as a JIT does).
//! let page = unsafe {
//!     let p = libc::mmap(std::ptr::null_mut(), 4096, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0);
//!     assert_ne!(p, libc::MAP_FAILED);
//!     std::ptr::copy_nonoverlapping(code.as_ptr(), p as *mut u8, code.len());
//!     assert_eq!(libc::mprotect(p, 4096, libc::PROT_READ | libc::PROT_EXEC), 0);
//!     p as usize
//! };
//! # #[cfg(target_arch = "aarch64")]
//! # return Ok(());
//! // SAFETY: the range is one function's code, decoding from its first byte, entered
//! // only there, and it stays mapped and unchanged while the guard lives.
//! let jit = unsafe { probe_rt::jit::declare("answer", page, code.len())? };
//! let probe = probe_rt::Probe::builder().symbol("answer").pre(|_regs| {}).register()?;
//! // SAFETY: the page holds a C-ABI function taking nothing and returning an int.
//! let answer = unsafe { std::mem::transmute::<usize, extern "C" fn() -> u32>(page) };
//! assert_eq!(answer(), 42);
//! assert_eq!(probe.nhit(), 1);
//! probe.unregister()?;
//! drop(jit);
//! # Ok(())
//! # }
//! ```

use crate::sys::image::Function;
use crate::sys::symbols::{self, JitClash};
use std::fmt;

/// A function declared with [`declare`]: probekit finds it by address and name while
/// this lives; dropping it takes the declaration back (probes already registered in it
/// stay, as breakpoints where they are not optimized yet).
#[derive(Debug)]
#[must_use = "the declaration is taken back when the guard is dropped"]
pub struct JitFunction {
    name: String,
    addr: usize,
    len: usize,
}

impl JitFunction {
    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its first byte.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always `false`: an empty function cannot be declared.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for JitFunction {
    fn drop(&mut self) {
        symbols::undeclare_jit(self.addr);
    }
}

/// Why a function could not be declared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JitError {
    /// The length is 0.
    Empty {
        /// The address given.
        addr: usize,
    },
    /// The range runs past the end of the address space.
    Overflow {
        /// The address given.
        addr: usize,
        /// The length given.
        len: usize,
    },
    /// Part of the range (from `addr`) is not mapped readable and executable.
    NotExecutable {
        /// The first byte of the range that is not.
        addr: usize,
    },
    /// The range overlaps a function declared before (and not dropped yet).
    Overlaps {
        /// The other function's name.
        other: String,
        /// Its first byte.
        addr: usize,
        /// Its length.
        len: usize,
    },
    /// A function declared before (and not dropped yet) has the name.
    NameTaken {
        /// The name.
        name: String,
        /// The other function's first byte.
        addr: usize,
    },
}

impl fmt::Display for JitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JitError::Empty { addr } => write!(f, "the function at {addr:#x} has length 0"),
            JitError::Overflow { addr, len } => write!(f, "{addr:#x} + {len:#x} bytes runs past the end of the address space"),
            JitError::NotExecutable { addr } => write!(f, "{addr:#x} is not in a readable, executable mapping"),
            JitError::Overlaps { other, addr, len } => write!(f, "the range overlaps `{other}`, declared at {addr:#x} ({len:#x} bytes)"),
            JitError::NameTaken { name, addr } => write!(f, "a function named `{name}` is declared already, at {addr:#x}"),
        }
    }
}

impl std::error::Error for JitError {}

/// Declares that `addr..addr + len` is the function `name`, generated at run time: it
/// can then be probed by name or address, and optimized (see the [module docs](self)).
/// A declared name is found before the symbol tables' names. The declaration lasts
/// until the returned guard is dropped.
///
/// # Safety
/// The range must be what a function symbol with that size would promise, for as long
/// as the guard lives: the machine code of one function, which decodes as instructions
/// from `addr` to its end (no literal pool or jump table inside: put data after
/// `addr + len`), that other code enters only at `addr` (calls) and never jumps into
/// (probekit's jump over several x86_64 instructions is shown safe from the function's
/// own branches only), and that stays mapped and unchanged. Unregister the probes in it
/// before changing or unmapping the code.
pub unsafe fn declare(name: &str, addr: usize, len: usize) -> Result<JitFunction, JitError> {
    if len == 0 {
        return Err(JitError::Empty { addr });
    }
    let end = addr.checked_add(len).ok_or(JitError::Overflow { addr, len })?;
    // Every byte of the range in executable, readable mappings (one after the other).
    let mut at = addr;
    while at < end {
        match crate::sys::maps::executable(at) {
            Ok(m) => at = m.end,
            Err(_) => return Err(JitError::NotExecutable { addr: at }),
        }
    }
    let f = Function { name: name.to_string(), path: String::new(), addr, size: len, ifunc: false, label: false };
    match symbols::declare_jit(f) {
        Ok(()) => Ok(JitFunction { name: name.to_string(), addr, len }),
        Err(JitClash::Range(g)) => Err(JitError::Overlaps { other: g.name, addr: g.addr, len: g.size }),
        Err(JitClash::Name(g)) => Err(JitError::NameTaken { name: g.name, addr: g.addr }),
    }
}
