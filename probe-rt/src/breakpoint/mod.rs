//! Breakpoint probes: the kprobe of a process.
//!
//! Registering writes a breakpoint (`int3`; aarch64 `brk #0x4b50`) over the target
//! instruction and copies that instruction, relocated, into an out-of-line slot. A hit
//! raises SIGTRAP; the handler builds a [`PtRegs`] from the signal context, runs the
//! pre handler, writes the registers back and sends the thread to the slot. Without a
//! post handler the slot jumps straight back to the next instruction (boosted: x86_64
//! an absolute `jmp [rip]`, aarch64 a `b` from a slot page within ±128 MiB); with one,
//! the slot ends in a second breakpoint that runs the post handler and resumes at the
//! next instruction. The trap flag is never used (single-stepping costs ~15 µs on
//! virtual machines).
//!
//! # Optimized probes
//! A probe is then switched to a jump to a detour when it can be (the kernel's
//! optprobes, see [`Optimize`] and `optprobe`): the same handlers with the same
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
pub(crate) mod trap;

use crate::arch::insn::{self, Exec, Sim, BREAKPOINT, TRAP_PC_ADVANCE};
use crate::optprobe::{self, Optimize};
use crate::registry::{self, record, Call, Handler, Owner, Record, Slots, NEAR, TRAPS};
use crate::sys::{code, maps};
use crate::Error;
use crate::{NotOptimized, PtRegs};
use std::sync::atomic::Ordering;

pub use crate::registry::RECLAIM_BATCH;
pub(crate) use trap::install_handler;

/// Something whose address can be probed: a function pointer of up to six arguments.
///
/// A function taking a reference has a higher-ranked pointer type
/// (`fn(&[u8]) -> u64` is `for<'a> fn(&'a [u8]) -> u64`), which these impls cannot cover
/// without overlapping the plain ones (rustc's `coherence_leak_check`). Name a lifetime
/// in the cast, `parse as fn(&'static [u8]) -> u64` (any function coerces to it), or
/// give the address, `.address(parse as usize)`.
pub trait FnAddr: Copy {
    /// The address of its first instruction.
    fn addr(self) -> usize;
}

macro_rules! fn_addr {
    ($($a:ident),*) => {
        impl<R, $($a),*> FnAddr for fn($($a),*) -> R { fn addr(self) -> usize { self as usize } }
        impl<R, $($a),*> FnAddr for extern "C" fn($($a),*) -> R { fn addr(self) -> usize { self as usize } }
        impl<R, $($a),*> FnAddr for unsafe fn($($a),*) -> R { fn addr(self) -> usize { self as usize } }
        impl<R, $($a),*> FnAddr for unsafe extern "C" fn($($a),*) -> R { fn addr(self) -> usize { self as usize } }
    };
}
fn_addr!();
fn_addr!(A);
fn_addr!(A, B);
fn_addr!(A, B, C);
fn_addr!(A, B, C, D);
fn_addr!(A, B, C, D, E);
fn_addr!(A, B, C, D, E, F);

/// A breakpoint probe. See the [module docs](self).
pub struct Probe;

impl Probe {
    /// Starts describing a probe.
    pub fn builder() -> ProbeBuilder {
        ProbeBuilder { target: None, offset: 0, pre: None, post: None, optimize: Optimize::by_default() }
    }
}

/// What a builder was told to probe.
#[derive(Clone, Debug)]
enum Target {
    /// A function's first instruction (a function pointer).
    Function(usize),
    /// A function by name.
    Symbol(String),
    /// A raw address, whose instruction boundary must be proven from the symbols.
    Address(usize),
}

/// Where a builder's target resolved to.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Resolved {
    /// The probed address.
    pub(crate) addr: usize,
    /// The start of the function the caller named (`.function`, `.symbol`), from which
    /// the instruction boundary is decoded; None for a raw address.
    pub(crate) start: Option<usize>,
}

/// Describes a probe: a target and handlers.
#[derive(Clone, Debug)]
pub struct ProbeBuilder {
    target: Option<Target>,
    offset: usize,
    pre: Option<Handler>,
    post: Option<Handler>,
    optimize: Optimize,
}

impl ProbeBuilder {
    /// Whether the probe may be optimized into a jump to a detour instead of a
    /// breakpoint: [`Optimize::WhenPossible`] by default (`PROBEKIT_OPTIMIZE=never`
    /// changes the default; see [`Optimize`]).
    pub fn optimize(mut self, optimize: Optimize) -> Self {
        self.optimize = optimize;
        self
    }

    /// The optimization the builder asks for.
    pub(crate) fn optimization(&self) -> Optimize {
        self.optimize
    }

    /// Probe a function (a function pointer: `my_fn as fn(u64) -> u64`; with reference
    /// arguments, name a lifetime: `parse as fn(&'static [u8]) -> u64`, see [`FnAddr`]).
    pub fn function(mut self, f: impl FnAddr) -> Self {
        self.target = Some(Target::Function(f.addr()));
        self
    }

    /// Probe a function item (generated code: see `__private::FnItem`).
    #[doc(hidden)]
    pub fn __function_item(mut self, f: crate::__private::FnItem) -> Self {
        self.target = Some(Target::Function(f.0));
        self
    }

    /// Probe a function of the process by name: of the executable or of a loaded shared
    /// library, exported or not (ELF symbol tables through `/proc/self/maps`). The name
    /// is a symbol (a C function, `getpid`; a mangled Rust symbol), a Rust path without
    /// the hash as `std::any::type_name` spells it (`my_crate::parser::number`, generic
    /// instances included), or the end of one (`number`, `parser::number`) when it
    /// names one function of the process only: else [`Error::AmbiguousSymbol`] lists
    /// the candidates. A name no symbol table has is looked up with `dlsym` (a library
    /// opened later).
    /// An IFUNC symbol (glibc's `memcpy`, `strlen`, …) names the implementation the
    /// process calls (what `dlsym` returns), not its resolver.
    pub fn symbol(mut self, name: &str) -> Self {
        self.target = Some(Target::Symbol(name.to_string()));
        self
    }

    /// Probe a raw address. It must be an instruction boundary provable from the
    /// symbol tables: inside a function whose symbol has a size, or after a sizeless
    /// symbol (hand-written asm) from which the code decodes to it; else registration
    /// fails with [`Error::NoKnownStart`].
    ///
    /// # Safety
    /// `addr` must be an instruction that runs as code, not data that lives in the
    /// text (a literal pool, a jump table, padding read as data): the symbol tables
    /// cannot tell them apart, and a breakpoint written over data changes what the
    /// program reads.
    pub unsafe fn address(mut self, addr: usize) -> Self {
        self.target = Some(Target::Address(addr));
        self
    }

    /// Bytes past the target (an instruction boundary). With `.function` or `.symbol`
    /// it must lie inside that function when its symbol gives its size
    /// ([`Error::OutsideFunction`]).
    pub fn offset(mut self, offset: usize) -> Self {
        self.offset = offset;
        self
    }

    /// Runs before the probed instruction, with the registers as they are there. It
    /// observes: it cannot change them (see [`Self::pre_mut`]). A closure may capture
    /// state (two probes sharing a handler tell each other apart by what each captured);
    /// it is dropped after the probe is unregistered and a grace period has passed
    /// (see [`crate::synchronize`]).
    pub fn pre(mut self, h: impl Fn(&PtRegs) + Send + Sync + 'static) -> Self {
        self.pre = Some(Handler::new(move |r: &mut PtRegs| h(r)));
        self
    }

    /// Runs after the probed instruction executed (out of line), with the registers as
    /// they are then. It observes (see [`Self::post_mut`]).
    pub fn post(mut self, h: impl Fn(&PtRegs) + Send + Sync + 'static) -> Self {
        self.post = Some(Handler::new(move |r: &mut PtRegs| h(r)));
        self
    }

    /// A pre handler that may change the registers: they are written back before the
    /// probed instruction runs; a changed instruction pointer is followed (execution
    /// resumes there, the probed instruction does not run).
    ///
    /// # Safety
    /// Whatever the handler writes must keep the program's invariants: the compiler
    /// assumed the registers hold what its code put there, so a wrong value (a pointer
    /// register, the stack pointer, a return address, the instruction pointer) is
    /// undefined behaviour in the probed code. The caller promises that every change
    /// the handler makes is one the probed code is correct with (as a debugger user
    /// promises when setting a register).
    pub unsafe fn pre_mut(mut self, h: impl Fn(&mut PtRegs) + Send + Sync + 'static) -> Self {
        self.pre = Some(Handler::new(h));
        self
    }

    /// A post handler that may change the registers, written back before execution
    /// continues after the probed instruction.
    ///
    /// # Safety
    /// As [`Self::pre_mut`].
    pub unsafe fn post_mut(mut self, h: impl Fn(&mut PtRegs) + Send + Sync + 'static) -> Self {
        self.post = Some(Handler::new(h));
        self
    }

    /// What keeps the handlers alive (the handle holds it while the probe is registered).
    fn owners(&self) -> [Option<Owner>; 2] {
        [self.pre.as_ref().and_then(Handler::owner), self.post.as_ref().and_then(Handler::owner)]
    }

    /// Probe the function starting at `addr` (already checked to be a function start).
    pub(crate) fn function_start(mut self, addr: usize) -> Self {
        self.target = Some(Target::Function(addr));
        self
    }

    /// Runs probekit's own handler `h(regs, ctx)` as the pre handler (`ctx` outlives
    /// the probe).
    pub(crate) fn internal_pre(mut self, h: Call, ctx: usize) -> Self {
        self.pre = Some(Handler::internal(h, ctx));
        self
    }

    /// The address the builder names, and where its function starts when the caller
    /// named one.
    pub(crate) fn resolve_target(&self) -> Result<Resolved, Error> {
        let (base, named) = match &self.target {
            Some(Target::Symbol(name)) => (resolve(name)?, true),
            Some(Target::Function(f)) => (*f, true),
            Some(Target::Address(a)) => (*a, false),
            None => return Err(Error::NoTarget),
        };
        // A traceable function is entered through its site: offsets count from there.
        let base = crate::site::table::site_of(base).map_or(base, |s| s.site);
        let addr = base.checked_add(self.offset).ok_or(Error::AddressOverflow { base, offset: self.offset })?;
        if named && self.offset > 0 {
            // Only where the symbol says how long the function is (sizeless: decoded).
            if let Some(f) = crate::sys::symbols::function_at(base).filter(|f| f.addr == base && f.size > 0 && self.offset >= f.size) {
                return Err(Error::OutsideFunction { addr, function: base, size: f.size });
            }
        }
        Ok(Resolved { addr, start: named.then_some(base) })
    }

    /// Checks the target, prepares the out-of-line slot and arms the breakpoint.
    /// On error nothing is left armed or writable.
    pub fn register(self) -> Result<ProbeHandle, Error> {
        // Before anything is taken or written: where no code can be written, say why.
        code::writable()?;
        install_handler()?;
        let mut reg = registry::lock();
        let index = self.stage(&mut reg)?;
        let e = record(index);
        let addr = e.target.load(Ordering::Relaxed);
        // Required, and a post handler: refused before anything is armed.
        if self.optimize == Optimize::Required && !e.site.load(Ordering::Relaxed) && self.post.is_some() {
            unstage(&mut reg, &[index]);
            reg.bury(self.owners().into_iter().flatten());
            return Err(Error::NotOptimized { addr, reason: NotOptimized::PostHandler });
        }
        if let Err(err) = arm(e, true) {
            unstage(&mut reg, &[index]);
            reg.bury(self.owners().into_iter().flatten());
            return Err(err);
        }
        e.live.store(true, Ordering::Relaxed);
        optprobe::settle(&[addr]);
        let handle = ProbeHandle { index, owners: self.owners() };
        if self.optimize == Optimize::Required && !e.site.load(Ordering::Relaxed) {
            if let Some(reason) = optprobe::why_not(e) {
                // Unregistered as a handle would be, under the same lock.
                let mut handle = handle;
                let undone = handle.retire_locked(&mut reg);
                std::mem::forget(handle);
                undone?;
                return Err(Error::NotOptimized { addr, reason });
            }
        }
        Ok(handle)
    }

    /// Everything registration does but arming: the target checked, the record taken,
    /// filled in, published and linked (a slot written for a breakpoint probe). Its
    /// index. Under the registry lock; nothing of the program's text is written.
    pub(super) fn stage(&self, reg: &mut Slots) -> Result<usize, Error> {
        let Resolved { addr, start } = self.resolve_target()?;
        if let Some(s) = crate::site::table::site_around(addr) {
            return Err(Error::InsideSite { addr, site: s.site, function: s.name });
        }
        if crate::site::table::site_of(addr).is_some_and(|s| s.site == addr) {
            return self.stage_site(reg, addr);
        }
        let mapping = maps::executable(addr)?;
        if let Some(what) = registry::blacklisted(addr) {
            return Err(Error::Blacklisted { addr, what });
        }
        // An instruction boundary, decoding from the start of the function: the one the
        // caller named, or the one the symbol tables prove (see `known_start`).
        let start = match start {
            Some(start) => start,
            None => known_start(addr)?,
        };
        let end = addr.saturating_add(15).min(mapping.end);
        if start != addr {
            insn::check_boundary(start, addr, &original_code(start, end).ok_or(Error::NotExecutable { addr: start })?)?;
        }
        let code = original_code(addr, end).ok_or(Error::NotExecutable { addr })?;
        let index = reg.take_record()?;
        let (len, slot, slot_bp, sim) = match self.prepare(reg, index, addr, &code) {
            Ok(p) => p,
            Err(err) => {
                reg.untake(index);
                return Err(err);
            }
        };

        let e = record(index);
        let mut orig = [0u8; 8];
        orig[..BREAKPOINT.len()].copy_from_slice(&code[..BREAKPOINT.len()]);
        e.target.store(addr, Ordering::Relaxed);
        e.code_id.store(mapping.code_id(addr), Ordering::Relaxed);
        e.orig.store(u64::from_ne_bytes(orig), Ordering::Relaxed);
        e.slot.store(slot, Ordering::Relaxed);
        e.next.store(addr + len, Ordering::Relaxed);
        // The slot's breakpoint, if it has one (a post handler), is found by its address.
        let (old_trap, trap) = (e.resume_trap.load(Ordering::Relaxed), slot_bp.map_or(0, |bp| slot + bp + TRAP_PC_ADVANCE as usize));
        if old_trap != 0 && old_trap != trap {
            TRAPS.set(old_trap, 0)?;
        }
        if trap != 0 {
            if let Err(err) = TRAPS.set(trap, index as u32 + 1) {
                reg.untake(index);
                return Err(err);
            }
        }
        e.resume_trap.store(trap, Ordering::Relaxed);
        e.sim_kind.store(sim.kind, Ordering::Relaxed);
        e.sim_a.store(sim.a, Ordering::Relaxed);
        e.sim_b.store(sim.b, Ordering::Relaxed);
        e.site.store(false, Ordering::Relaxed);
        // Inside the range an optimized probe's jump displaced: that probe goes back to
        // its breakpoint (and stays one while this probe is there). Only now, with the
        // address checked and the record ready: a registration refused earlier leaves
        // it optimized. If linking fails after all, it is optimized again.
        let window = optprobe::window_around(addr);
        if let Some(a) = window {
            if let Err(err) = optprobe::unoptimize(&[a]) {
                reg.untake(index);
                return Err(err);
            }
            optprobe::refuse(a, NotOptimized::ProbeInWindow { at: addr });
        }
        let linked = self.publish_and_link(reg, index);
        if let (Err(_), Some(a)) = (&linked, window) {
            optprobe::settle(&[a]);
        }
        linked
    }

    /// [`Self::stage`] for a probe on the site at `site`: no breakpoint, no slot; the
    /// first probe armed there enables the site.
    fn stage_site(&self, reg: &mut Slots, site: usize) -> Result<usize, Error> {
        let code_id = maps::executable(site)?.code_id(site);
        let index = reg.take_record()?;
        let e = record(index);
        e.target.store(site, Ordering::Relaxed);
        e.code_id.store(code_id, Ordering::Relaxed);
        e.orig.store(0, Ordering::Relaxed);
        e.next.store(site + crate::site::table::SITE_LEN, Ordering::Relaxed);
        e.sim_kind.store(0, Ordering::Relaxed);
        e.site.store(true, Ordering::Relaxed);
        self.publish_and_link(reg, index)
    }

    /// Fills in record `index`'s handlers and counters and makes it visible to the hit
    /// paths, unarmed (on error it goes back).
    fn publish_and_link(&self, reg: &mut Slots, index: usize) -> Result<usize, Error> {
        let e = record(index);
        e.gone.store(false, Ordering::Relaxed);
        e.nhit.store(0, Ordering::Relaxed);
        registry::reset_site_hits(index);
        e.nmissed.store(0, Ordering::Relaxed);
        let parts = |h: &Option<Handler>| h.as_ref().map_or((0, 0), |h| (h.call as usize, h.ctx));
        let ((pre, ctx), (post, post_ctx)) = (parts(&self.pre), parts(&self.post));
        e.pre.store(pre, Ordering::Relaxed);
        e.ctx.store(ctx, Ordering::Relaxed);
        e.post.store(post, Ordering::Relaxed);
        e.post_ctx.store(post_ctx, Ordering::Relaxed);
        e.opt_mode.store(self.optimize.byte(), Ordering::Relaxed);
        e.detour.store(0, Ordering::Relaxed);
        // Visible to the hit paths (Release: with the fields above) before it is armed:
        // by index, and on its address's chain.
        registry::publish(index);
        if let Err(err) = registry::link(index) {
            reg.untake(index);
            return Err(err);
        }
        optprobe::linked(index);
        Ok(index)
    }

    /// Prepares how the instruction at `addr` (original bytes `code`) runs for record
    /// `index`: out of line in a slot (the record's old one if it is near enough), or
    /// simulated. `(length, slot, slot breakpoint offset, simulation)`.
    fn prepare(&self, reg: &mut Slots, index: usize, addr: usize, code: &[u8]) -> Result<(usize, usize, Option<usize>, Sim), Error> {
        // Without a post handler the slot jumps straight back (boosted): one trap per hit.
        let boost = self.post.is_none();
        let old = record(index).slot.load(Ordering::Relaxed);
        let (page, slot) = match old {
            s if s != 0 && s.abs_diff(addr) < NEAR - code::page_size() => (None, s),
            _ => reg.find(addr).map(|(p, s)| (Some(p), s))?,
        };
        Ok(match insn::prepare(addr, code, slot, boost)? {
            Exec::Slot(d) => {
                code::write_code(slot, &d.slot)?;
                if let Some(p) = page {
                    reg.commit(p);
                }
                (d.len, slot, d.slot_bp, Sim::default())
            }
            // The record's old slot, if any, stays with it for a later reuse.
            Exec::Simulate { len, sim } => (len, if page.is_none() { old } else { 0 }, None, sim),
        })
    }
}

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
            if let Some((_, e)) = registry::armed_at(at).find(|(_, e)| !e.site.load(Ordering::Relaxed)) {
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
    /// [`Optimize`]).
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
        // The probes left at the address may be optimizable now.
        optprobe::settle(&[e.target.load(Ordering::Relaxed)]);
        Ok(())
    }
}

impl Drop for ProbeHandle {
    fn drop(&mut self) {
        // The error cannot be returned from drop; `unregister` reports it.
        let _ = self.retire();
    }
}
