//! probekit runtime.
pub mod frame;
pub use frame::PtRegs;
