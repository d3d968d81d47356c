//! Breakpoint probes: the kprobe of a process.
//!
//! Registering writes a breakpoint (`int3`; aarch64 `brk #0x4b50`) over the target
//! instruction and copies that instruction, relocated, into an out-of-line slot. A hit
//! raises SIGTRAP; the handler builds a [`PtRegs`](crate::PtRegs) from the signal context, runs the
//! pre handler, writes the registers back and sends the thread to the slot. Without a
//! post handler the slot jumps straight back to the next instruction (boosted: x86_64
//! an absolute `jmp [rip]`, aarch64 a `b` from a slot page within ±128 MiB); with one,
//! the slot ends in a second breakpoint that runs the post handler and resumes at the
//! next instruction. The trap flag is never used (single-stepping costs ~15 µs on
//! virtual machines).
//!
//! # Optimized probes
//! A probe is then switched to a jump to a detour when it can be (the kernel's
//! optprobes, see [`Optimize`](crate::Optimize) and `optprobe`): the same handlers with the same
//! registers, without the trap (tens of nanoseconds instead of microseconds). What
//! this page says of the SIGTRAP path holds for a probe's breakpoint, and for the
//! breakpoint the jump replaces and goes back to; [`ProbeHandle::is_optimized`] says
//! which a probe is, [`ProbeHandle::why_not_optimized`] why not.
//!
//! # What a handler may do
//! Handlers run in a signal handler on the thread that hit the probe: they read the
//! registers (and change them, registered with the `unsafe` `pre_mut`/`post_mut`), and
//! do what is async-signal-safe. They must not allocate, take
//! locks the interrupted code may hold, or print (`println!` locks stdout); push to a
//! lock-free buffer instead. A panic in a handler aborts the process (it cannot unwind
//! out of a signal handler). A probe hit inside a handler on the same thread is not run
//! again: it counts in [`ProbeHandle::nmissed`] and its instruction still executes.
//!
//! # Stack
//! A breakpoint hit runs on the thread's own stack, below the probed stack pointer
//! (and the x86_64 red zone): the kernel's signal frame (up to ~3.5 KiB with AVX-512
//! state) and the handler. Measured on x86_64: about 3.4 KiB for a hit with a pre
//! handler, 4.2 KiB with a post handler; a site hit about 1 KiB, a return about
//! 0.6 KiB, plus what the handlers use. A thread with less left is killed by SIGSEGV
//! (with a message on stderr), as a stack overflow is: never a wrong result.
//!
//! # Signals that are not probekit's
//! Only traps from breakpoint instructions are looked at (`si_code`); a SIGTRAP sent
//! with `kill`, `raise` or `sigqueue`, an `icebp`, or a breakpoint probekit never placed
//! goes to the disposition the program had before the first registration: its
//! handler, or the default action (the process is terminated, as without probekit).
//! Install your own SIGTRAP handler before registering the first probe: one installed
//! after would receive probekit's breakpoints, and the next registration fails with
//! [`Error::SigtrapHandlerReplaced`].
//!
//! # Lifetime
//! A probe's record and slot outlive its unregistration, because a thread may still be
//! in its handler, on its way to the slot or in it when the probe goes: they are
//! retired. Registration reuses retired records (and their slots, when near enough)
//! only after a grace period has shown that no thread can be using them: every other
//! thread is signalled and its interrupted pc read (see `grace`, the process analog of
//! `synchronize_rcu_tasks`). It runs when [`RECLAIM_BATCH`] records are retired; if it
//! cannot complete (the program handles `SIGURG`, or a thread blocks it), retired
//! records stay retired until a later try completes (tried at most every 100 ms), and
//! new registrations take new records meanwhile: there is no fixed limit on probes.

pub(crate) mod batch;
mod builder;
pub(crate) mod trap;

use crate::arch::insn::BREAKPOINT;
use crate::optprobe;
use crate::registry::{self, record, Owner, Record, Slots};
use crate::sys::{code, maps};
use crate::Error;
use crate::NotOptimized;
use std::sync::atomic::Ordering;

pub use crate::registry::RECLAIM_BATCH;
pub(crate) use builder::Resolved;
pub use builder::{FnAddr, Probe, ProbeBuilder};
pub(crate) use trap::install_handler;

/// The address of function `name`: from the ELF symbol tables of the executable and
/// its libraries, or else as the dynamic linker resolves it (`dlsym(RTLD_DEFAULT)`,
/// which also finds symbols of libraries opened later).
/// An IFUNC symbol resolves as `dlsym` resolves it: to the implementation the process
/// calls, not to the resolver the symbol table names.
pub(crate) fn resolve(name: &str) -> Result<usize, Error> {
    let not_found = || Error::SymbolNotFound { name: name.to_string() };
    let dlsym = || {
        let c = std::ffi::CString::new(name).ok()?;
        // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only looks up symbols
        // (an IFUNC's resolver already ran when the library was relocated).
        let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c.as_ptr()) };
        (!p.is_null()).then_some(p as usize)
    };
    match crate::sys::symbols::resolve_name(name) {
        Ok(Some(f)) if !f.ifunc => Ok(f.addr),
        Ok(_) => dlsym().ok_or_else(not_found),
        Err(candidates) => Err(Error::AmbiguousSymbol { name: name.to_string(), candidates }),
    }
}

/// The start of the function an instruction boundary at raw address `addr` is proven
/// from (see `symbols::known_start`).
pub(crate) fn known_start(addr: usize) -> Result<usize, Error> {
    crate::sys::symbols::known_start(addr).map(|f| f.addr).ok_or(Error::NoKnownStart { addr })
}

/// The original bytes of `from..to`: the text with every armed breakpoint and every
/// optimized probe's jump taken out (registration path, under the registry lock); None
/// if it is not readable (any more).
pub(crate) fn original_code(from: usize, to: usize) -> Option<Vec<u8>> {
    let mut code = without_breakpoints(from, to)?;
    optprobe::original(from, &mut code);
    Some(code)
}

/// The bytes of `from..to` with every armed breakpoint taken out (see [`original_code`]).
pub(crate) fn without_breakpoints(from: usize, to: usize) -> Option<Vec<u8>> {
    let mut code = code::read(from, to.checked_sub(from)?)?;
    // Where the text holds a breakpoint, the record armed there (if any) knows what it
    // replaced: a lookup per breakpoint, not a scan of every probe.
    let step = if cfg!(target_arch = "aarch64") { 4 } else { 1 };
    let mut at = from.next_multiple_of(step);
    while at + BREAKPOINT.len() <= to {
        let i = at - from;
        if code[i..i + BREAKPOINT.len()] == *BREAKPOINT {
            if let Some(e) = registry::armed_at(at).find(|e| !e.site.load(Ordering::Relaxed)) {
                code[i..i + BREAKPOINT.len()].copy_from_slice(&e.orig.load(Ordering::Relaxed).to_ne_bytes()[..BREAKPOINT.len()]);
            }
        }
        at += step;
    }
    Some(code)
}

/// Whether the code record `e` was registered on is still mapped at `target`: not
/// marked gone, and the mapping there is the same file at the same offset (anonymous
/// memory: the bytes are compared where they are written). Marks it gone if not.
pub(super) fn still_there(e: &Record, target: usize) -> bool {
    if e.gone.load(Ordering::Relaxed) {
        return false;
    }
    let id = e.code_id.load(Ordering::Relaxed);
    // The file and offset say whose code it is; the protection does not (a program may
    // make its text writable and not executable for a moment).
    let same = maps::mapping_of(target).is_some_and(|m| m.code_id(target) == id);
    if !same {
        e.gone.store(true, Ordering::Relaxed);
    }
    same
}

/// Whether the text at `target` holds the bytes record `e` will put its breakpoint over
/// (not so if other contents were mapped there since it was prepared).
pub(super) fn orig_in_text(e: &Record, target: usize) -> bool {
    let orig = e.orig.load(Ordering::Relaxed).to_ne_bytes();
    code::read(target, BREAKPOINT.len()).is_some_and(|b| b == orig[..BREAKPOINT.len()])
}

/// Whether probekit's breakpoint is in the text at `addr` (readable and mapped).
pub(super) fn our_breakpoint_at(addr: usize) -> bool {
    code::read(addr, BREAKPOINT.len()).is_some_and(|b| b == BREAKPOINT)
}

/// Arms (writes the breakpoint) or disarms (restores the original bytes). The entry is
/// published before the breakpoint exists and unpublished after it is gone, so a
/// trap always finds it (or finds the text restored, seed 004). Probes at one address
/// share its breakpoint (aggregation): the first armed writes it, the last disarmed
/// removes it. Called under the registry lock.
fn arm(e: &Record, on: bool) -> Result<(), Error> {
    let target = e.target.load(Ordering::Relaxed);
    if !still_there(e, target) {
        // Whatever lives at the address now is not the code that was probed: disarmed
        // in place, for good, with nothing written (uprobes are tied to the file and
        // offset, not to the address).
        e.addr.store(0, Ordering::Release);
        optprobe::forget(target);
        return if on { Err(Error::CodeGone { addr: target }) } else { Ok(()) };
    }
    if e.site.load(Ordering::Relaxed) {
        return crate::site::arm(e, target, on);
    }
    // Records armed here whose breakpoint is not in the text any more are stale: the
    // code is gone (its library unloaded, maybe something else mapped there since).
    // They are disarmed in place, with nothing to restore: writing their original
    // bytes would corrupt whatever is there now, and sharing their breakpoint would
    // share nothing.
    let present = our_breakpoint_at(target) || optprobe::jump_in_text(target);
    if !present {
        registry::disarm_in_place(target);
        optprobe::forget(target);
    }
    let shared = registry::others_armed(e, target);
    // An optimized address goes back to its breakpoint before a probe that cannot be
    // optimized is armed there, and before its last probe is disarmed.
    if (on && !optprobe::allows(e)) || (!on && !shared) {
        optprobe::unoptimize(&[target])?;
    }
    if on && !shared && !orig_in_text(e, target) {
        // Not the bytes the probe was prepared for (mapped again with other contents).
        e.gone.store(true, Ordering::Relaxed);
        return Err(Error::CodeGone { addr: target });
    }
    if on {
        e.addr.store(target, Ordering::Release);
        let r = if shared { Ok(()) } else { code::write_code(target, BREAKPOINT).map(|()| code::sync_cores()) };
        if r.is_err() {
            e.addr.store(0, Ordering::Release);
        }
        r
    } else {
        let r = if shared || !present {
            Ok(())
        } else {
            let orig = e.orig.load(Ordering::Relaxed).to_ne_bytes();
            code::write_code(target, &orig[..BREAKPOINT.len()]).map(|()| code::sync_cores())
        };
        if r.is_ok() {
            e.addr.store(0, Ordering::Release);
        }
        r
    }
}

/// Takes staged (linked, unarmed) records back out: unlinked and retired, since a hit
/// path may have reached them through their chains (reused after a grace period).
pub(super) fn unstage(reg: &mut Slots, indices: &[usize]) {
    for &index in indices {
        registry::unlink(index);
        reg.retire(index);
    }
}

/// A registered probe; unregistered when dropped.
pub struct ProbeHandle {
    pub(crate) index: usize,
    /// What keeps its handlers alive: buried with the record when it is unregistered.
    pub(crate) owners: [Option<Owner>; 2],
}

impl std::fmt::Debug for ProbeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeHandle").field("address", &self.address()).field("enabled", &self.is_enabled()).finish()
    }
}

impl ProbeHandle {
    fn entry(&self) -> &'static Record {
        record(self.index)
    }

    /// The probed address.
    pub fn address(&self) -> usize {
        self.entry().target.load(Ordering::Relaxed)
    }

    /// Re-arms a disabled probe (optimized again if it was, and still can be).
    pub fn enable(&self) -> Result<(), Error> {
        let _reg = registry::lock();
        if self.entry().addr.load(Ordering::Relaxed) != 0 {
            return Ok(());
        }
        arm(self.entry(), true)?;
        optprobe::settle(&[self.address()]);
        Ok(())
    }

    /// Disarms the probe: the original instruction is back, handlers stop running.
    pub fn disable(&self) -> Result<(), Error> {
        let _reg = registry::lock();
        if self.entry().addr.load(Ordering::Relaxed) == 0 {
            return Ok(());
        }
        arm(self.entry(), false)?;
        // The probes left at the address may be optimizable now.
        optprobe::settle(&[self.address()]);
        Ok(())
    }

    /// Whether the probe is armed (its breakpoint, jump or site call is in place).
    pub fn is_enabled(&self) -> bool {
        self.entry().addr.load(Ordering::Relaxed) != 0
    }

    /// Whether the probe is optimized: a jump to a detour, not a breakpoint (see
    /// [`Optimize`](crate::Optimize)).
    pub fn is_optimized(&self) -> bool {
        self.why_not_optimized().is_none()
    }

    /// Why the probe is not optimized (None if it is): the kernel's `can_optimize`
    /// reasons, and [`NotOptimized::Off`], [`NotOptimized::Disabled`], [`NotOptimized::Site`], ….
    pub fn why_not_optimized(&self) -> Option<NotOptimized> {
        optprobe::why_not(self.entry())
    }

    /// Hits whose handlers ran.
    pub fn nhit(&self) -> u64 {
        self.entry().nhit.load(Ordering::Relaxed) + registry::site_hits(self.index)
    }

    /// Hits whose handlers did not run (the probe was hit inside a handler).
    pub fn nmissed(&self) -> u64 {
        self.entry().nmissed.load(Ordering::Relaxed)
    }

    /// Disarms and retires the probe (what dropping the handle does, with the error).
    /// Its handlers are dropped after a grace period. If the original instruction
    /// cannot be written back, the probe stays armed, with no handle to remove it, and
    /// its handlers are never dropped.
    pub fn unregister(mut self) -> Result<(), Error> {
        let r = self.retire();
        // Retired (or left armed) once: not again when dropped. Its owners were taken.
        std::mem::forget(self);
        r
    }

    fn retire(&mut self) -> Result<(), Error> {
        let mut reg = registry::lock();
        self.retire_locked(&mut reg)
    }

    /// [`Self::retire`] under the registry lock.
    fn retire_locked(&mut self, reg: &mut Slots) -> Result<(), Error> {
        let owners = std::mem::take(&mut self.owners);
        let e = self.entry();
        if e.addr.load(Ordering::Relaxed) != 0 {
            if let Err(err) = arm(e, false) {
                // Still armed: its handlers may run at any time from now on.
                std::mem::forget(owners);
                return Err(err);
            }
        }
        registry::unlink(self.index);
        e.live.store(false, Ordering::Relaxed);
        reg.retire(self.index);
        reg.bury(owners.into_iter().flatten());
        // The probes left at the address may be optimizable now, or take a site's
        // light trampolines.
        optprobe::settle(&[e.target.load(Ordering::Relaxed)]);
        if e.site.load(Ordering::Relaxed) {
            crate::site::settle([e.target.load(Ordering::Relaxed)]);
        }
        Ok(())
    }
}

impl Drop for ProbeHandle {
    fn drop(&mut self) {
        // The error cannot be returned from drop; `unregister` reports it.
        let _ = self.retire();
    }
}
