//! Describing a breakpoint probe and registering it: the target (a function, a
//! symbol, an address, an offset into a function), the handlers and whether to
//! optimize; then the record staged, the instruction prepared out of line (or
//! simulated) and the probe armed, optimized where it can be. See the [parent
//! module](super) for what a probe does once armed.

use super::{arm, install_handler, known_start, original_code, resolve, unstage, ProbeHandle};
use crate::arch::insn::{self, Exec, Sim, BREAKPOINT, TRAP_PC_ADVANCE};
use crate::optprobe::{self, Optimize};
use crate::registry::{self, record, Call, Handler, Owner, Slots, NEAR, TRAPS};
use crate::sys::{code, maps};
use crate::Error;
use crate::{NotOptimized, PtRegs};
use std::sync::atomic::Ordering;
use std::sync::Arc;

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

/// A breakpoint probe. See the [module docs](super).
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
    pub(super) post: Option<Handler>,
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
    pub(super) fn owners(&self) -> [Option<Owner>; 2] {
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

    /// Runs probekit's own handler `h(regs, ctx)` as the pre handler, with `ctx` the
    /// address of `owner`'s value, which the probe keeps alive.
    #[cfg_attr(not(feature = "trace"), allow(dead_code))]
    pub(crate) fn internal_pre_owned<T: Send + Sync + 'static>(mut self, h: Call, owner: Arc<T>) -> Self {
        self.pre = Some(Handler::internal_owned(h, owner));
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
