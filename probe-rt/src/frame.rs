//! The built-in frame types.
#[cfg(target_arch = "x86_64")]
include!("../../codegen/frames/x86_64.rs");
#[cfg(target_arch = "aarch64")]
include!("../../codegen/frames/aarch64.rs");
