//! The operating system, seen from probekit: the process's memory maps and the
//! symbol tables of its images, reading and writing code, signals, and the signal
//! context as a [`PtRegs`](crate::PtRegs). Uses nothing else of probekit.

pub(crate) mod code;
pub(crate) mod image;
pub(crate) mod maps;
pub(crate) mod regs;
pub(crate) mod signal;
pub(crate) mod symbols;
