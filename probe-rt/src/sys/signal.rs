//! Signals: installing a handler while keeping the disposition it replaces, and
//! passing a signal that is not ours on to that disposition, unchanged.

use crate::Error;
use std::sync::OnceLock;

/// Installs `handler` for `sig` (SA_SIGINFO, with `flags`), after keeping the previous
/// disposition in `previous` (so that it is in place before the handler can run).
pub(crate) fn take_signal(sig: libc::c_int, handler: usize, flags: libc::c_int, previous: &OnceLock<libc::sigaction>) -> Result<(), Error> {
    // SAFETY: sigaction with zeroed structs filled field by field; `handler` is an
    // extern "C" fn of the SA_SIGINFO signature (the callers pass one).
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 {
            return Err(Error::last_os(0, "sigaction"));
        }
        let _ = previous.set(old);
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler;
        sa.sa_flags = libc::SA_SIGINFO | flags;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
            return Err(Error::last_os(0, "sigaction"));
        }
    }
    Ok(())
}

/// Passes a signal that is not ours to the disposition before probekit's, unchanged.
pub(crate) fn chain(prev: Option<&libc::sigaction>, sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let Some(prev) = prev else { return };
    match prev.sa_sigaction {
        libc::SIG_IGN => {}
        libc::SIG_DFL => {
            // The default action: restore it. A signal the kernel raised for the
            // instruction (a fault) is raised again when it re-executes; one that was
            // sent (si_code <= 0) is sent again, delivered as this handler returns.
            // SAFETY: sigaction/raise are async-signal-safe; `info` is the kernel's.
            unsafe {
                libc::sigaction(sig, prev, std::ptr::null_mut());
                if sig != libc::SIGSEGV || (*info).si_code <= 0 {
                    libc::raise(sig);
                }
            }
        }
        h if prev.sa_flags & libc::SA_SIGINFO != 0 => {
            // SAFETY: the previous handler was installed with this signature (SA_SIGINFO).
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) = unsafe { std::mem::transmute(h) };
            f(sig, info, ctx);
        }
        h => {
            // SAFETY: a plain handler takes the signal number only.
            let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(h) };
            f(sig);
        }
    }
}
