//! C helpers for probekit's tests (see `build.rs`).

use std::ffi::c_void;

extern "C" {
    /// Calls `f(arg)` under a `setjmp`: 0 when `f` returned, 1 when [`probekit_jump_out`]
    /// jumped back.
    pub fn probekit_jump_run(f: extern "C" fn(*mut c_void), arg: *mut c_void) -> i32;
    /// `longjmp`s to the innermost [`probekit_jump_run`] of this thread. Every frame
    /// between must be plain (no destructors to run).
    pub fn probekit_jump_out() -> !;
}

/// The path of the shared library built from `c/gone.c` (exports `probekit_gone_add`).
pub const GONE_SO: &str = env!("GONE_SO");
