//! probekit facade.
pub use probe_rt::*;
