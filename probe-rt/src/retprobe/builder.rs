//! The public face of return probes: [`ReturnProbe`]'s builder, which turns its
//! handlers and per-call data into a [`Core`] and its instances, the
//! registration (through an entry probe whose hook is [`super::on_entry`]), and the
//! handle. The instances and the hit path are the parent module's.

use super::{at_fork, drop_data, on_entry, pool, run_entry, run_no_entry, run_no_return, run_return, Core, Entry, HasHandler, NoHandler};
use crate::breakpoint::{self as probe, FnAddr, ProbeBuilder, ProbeHandle};
use crate::registry::Owner;
use crate::{Error, PtRegs};
use std::cell::UnsafeCell;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// The most instances a return probe may have: calls watched at once on all threads
/// (2,000 threads each 500 calls deep). Each costs a stub, an instance and a `T`, all
/// allocated at registration: a larger request is an error, not an abort on a failed
/// allocation.
pub const MAX_MAXACTIVE: usize = 1 << 20;

/// The kernel's default `maxactive`: max(10, 2 × the number of CPUs).
fn default_maxactive() -> usize {
    // SAFETY: sysconf has no preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
    10.max(2 * cpus.max(1) as usize)
}

/// A return probe. See the [module docs](super).
pub struct ReturnProbe;

impl ReturnProbe {
    /// Starts describing a return probe (with no per-call data; see
    /// [`ReturnProbeBuilder::data`]).
    pub fn builder() -> ReturnProbeBuilder<(), NoHandler> {
        ReturnProbeBuilder { target: probe::Probe::builder(), handler: None, entry: None, maxactive: None, _state: PhantomData }
    }
}

/// What runs a return probe's handlers, typed for its data and closures.
type RunEntry = unsafe fn(&Core, usize, &mut PtRegs) -> Entry;
type RunReturn = unsafe fn(&Core, usize, &mut PtRegs);

/// A return handler as a `Core` keeps it: the closure's address, its run function,
/// and what keeps it alive.
type Erased<R> = (usize, R, Owner);

fn erase<F: Send + Sync + 'static, R>(f: F, run: R) -> Erased<R> {
    let owner = Arc::new(f);
    (Arc::as_ptr(&owner) as usize, run, owner)
}

/// Describes a return probe: a function, handlers, per-call data `T`, `maxactive`.
/// `S` is [`NoHandler`] until a handler is given, then [`HasHandler`]: the data type
/// can only be chosen before (the handlers are typed by it), which the compiler checks.
pub struct ReturnProbeBuilder<T, S = NoHandler> {
    target: ProbeBuilder,
    handler: Option<Erased<RunReturn>>,
    entry: Option<Erased<RunEntry>>,
    maxactive: Option<usize>,
    _state: PhantomData<fn(T, S)>,
}

impl<T, S> std::fmt::Debug for ReturnProbeBuilder<T, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReturnProbeBuilder").field("target", &self.target).field("maxactive", &self.maxactive).finish_non_exhaustive()
    }
}

impl<T, S> ReturnProbeBuilder<T, S> {
    /// Probe the return of a function (a function pointer).
    pub fn function(mut self, f: impl FnAddr) -> Self {
        self.target = self.target.function(f);
        self
    }

    /// Probe the return of a function item (generated code: see `__private::FnItem`).
    #[doc(hidden)]
    pub fn __function_item(mut self, f: crate::__private::FnItem) -> Self {
        self.target = self.target.__function_item(f);
        self
    }

    /// Probe the return of a function of the process by name (see
    /// [`ProbeBuilder::symbol`]).
    pub fn symbol(mut self, name: &str) -> Self {
        self.target = self.target.symbol(name);
        self
    }

    /// Probe the return of the function starting at a raw address.
    ///
    /// # Safety
    /// As [`ProbeBuilder::address`]: `addr` must be a function's first instruction.
    pub unsafe fn address(mut self, addr: usize) -> Self {
        // SAFETY: the caller's promise is the one `ProbeBuilder::address` asks for.
        self.target = unsafe { self.target.address(addr) };
        self
    }

    /// How many calls can be watched at once, on all threads together (default, and
    /// for 0, as the kernel: max(10, 2 × CPUs)). An entry that finds every instance in
    /// use is not watched and counts in [`ReturnProbeHandle::nmissed`]. At most
    /// [`MAX_MAXACTIVE`] ([`Error::MaxactiveTooLarge`]). On a `#[traceable]` function
    /// whose site has an exit path, as many instances again are kept in reserve, each
    /// parked for one thread's calls (see the module docs): those are watched on top.
    pub fn maxactive(mut self, n: usize) -> Self {
        self.maxactive = Some(n);
        self
    }

    /// Whether the entry's probe may be optimized into a jump (see
    /// [`crate::Optimize`]; when possible by default): entry and return then cost tens
    /// of nanoseconds, no trap.
    pub fn optimize(mut self, optimize: crate::Optimize) -> Self {
        self.target = self.target.optimize(optimize);
        self
    }

    /// Probe the return of the function starting at `addr` (known to be a start).
    pub(crate) fn function_start(mut self, addr: usize) -> Self {
        self.target = self.target.function_start(addr);
        self
    }

    fn typed(self) -> ReturnProbeBuilder<T, HasHandler> {
        ReturnProbeBuilder { target: self.target, handler: self.handler, entry: self.entry, maxactive: self.maxactive, _state: PhantomData }
    }
}

impl<T: Default + Send + 'static, S> ReturnProbeBuilder<T, S> {
    /// Runs when the function returns, with the registers there (`rax`/`x0` hold the
    /// return value) and this call's data. It observes (see [`Self::handler_mut`]). A
    /// closure may capture state; it is dropped after the probe is unregistered and a
    /// grace period has passed.
    pub fn handler(self, h: impl Fn(&PtRegs, &mut T) + Send + Sync + 'static) -> ReturnProbeBuilder<T, HasHandler> {
        // SAFETY: the handler gets the registers read-only: it changes nothing.
        unsafe { self.handler_mut(move |r: &mut PtRegs, d: &mut T| h(r, d)) }
    }

    /// A return handler that may change the registers, the return value
    /// ([`PtRegs::set_return_value`]) included; a changed instruction pointer is
    /// ignored (the function returns to its caller).
    ///
    /// # Safety
    /// The caller promises that every value the handler writes is one the caller of the
    /// probed function is correct with: a return value must be a valid value of the
    /// function's return type returned in `rax`/`x0` (an integer, a pointer that is
    /// valid for what the type says); for a function returning a reference, a `Box`, an
    /// FP value or a struct through memory, writing it is undefined behaviour. Other
    /// registers: callee-saved ones must keep their values.
    pub unsafe fn handler_mut<R: Fn(&mut PtRegs, &mut T) + Send + Sync + 'static>(mut self, h: R) -> ReturnProbeBuilder<T, HasHandler> {
        self.handler = Some(erase(h, run_return::<T, R> as RunReturn));
        self.typed()
    }

    /// Runs at the function's entry with the registers there (the arguments) and this
    /// call's data, fresh from `T::default()`; returns whether to watch this call (run
    /// the return handler when it returns: the kernel's entry handler returning 0). It
    /// observes (see [`Self::entry_handler_mut`]).
    pub fn entry_handler(self, h: impl Fn(&PtRegs, &mut T) -> bool + Send + Sync + 'static) -> ReturnProbeBuilder<T, HasHandler> {
        // SAFETY: the handler gets the registers read-only, and returns `Continue` or
        // `Skip`, which only decide whether this probe watches the call.
        unsafe { self.entry_handler_mut(move |r: &mut PtRegs, d: &mut T| if h(r, d) { Entry::Continue } else { Entry::Skip }) }
    }

    /// An entry handler that may change the registers, and skip the function
    /// altogether ([`Entry::Override`]: return a value to the caller at once, the
    /// kernel's `override_function_with_return`).
    ///
    /// # Safety
    /// As [`ProbeBuilder::pre_mut`] for the registers; and an [`Entry::Override`] value
    /// must be a valid return value of the function, as for [`Self::handler_mut`], and
    /// skipping the function's effects must leave the program correct.
    pub unsafe fn entry_handler_mut<E: Fn(&mut PtRegs, &mut T) -> Entry + Send + Sync + 'static>(mut self, h: E) -> ReturnProbeBuilder<T, HasHandler> {
        self.entry = Some(erase(h, run_entry::<T, E> as RunEntry));
        self.typed()
    }

    /// Checks the target (a function's first instruction), makes the instances and
    /// their stubs, and arms the entry. On error nothing is armed.
    pub fn register(self) -> Result<ReturnProbeHandle, Error> {
        let (entry, pending) = self.prepare()?;
        pending.finish(entry.register())
    }

    /// Everything registration does before the entry's probe is registered: the
    /// target checked, the data, stubs and instances made and pointed at the probe's
    /// `Core`. The entry's probe to register, and what becomes the handle.
    pub(crate) fn prepare(self) -> Result<(ProbeBuilder, Pending), Error> {
        // Before the stubs and instances are taken: where no code can be written, say why.
        crate::sys::code::writable()?;
        let probe::Resolved { addr, start } = self.target.resolve_target()?;
        crate::sys::maps::executable(addr)?;
        // The function the caller named, or the one the symbols prove for a raw address.
        let start = match start {
            Some(start) => start,
            None => probe::known_start(addr)?,
        };
        if start != addr {
            return Err(Error::NotFunctionEntry { addr, function: start });
        }
        let n = self.maxactive.filter(|n| *n > 0).unwrap_or_else(default_maxactive);
        if n > MAX_MAXACTIVE {
            return Err(Error::MaxactiveTooLarge { requested: n, max: MAX_MAXACTIVE });
        }

        // The data first (`T::default` may panic), then a block of stubs with their
        // unwind information and instances, reused or new (see `pool`), pointed at the
        // probe: everything a hit can reach exists before it is armed.
        // A site with an exit path gets as many instances again in reserve, to park
        // one per thread (`Core::take_parked`).
        let reserve = if crate::site::table::exit_of(addr).is_some() { n } else { 0 };
        let data: Box<[UnsafeCell<T>]> = (0..n + reserve).map(|_| UnsafeCell::new(T::default())).collect();
        at_fork();
        let block = pool::take(n + reserve)?;
        let data = Box::into_raw(data) as *mut UnsafeCell<T> as usize;
        let (handler, run_return, return_owner) = match self.handler {
            Some((h, run, owner)) => (h, run, Some(owner)),
            None => (0, run_no_return as unsafe fn(&Core, usize, &mut PtRegs), None),
        };
        let (entry, run_entry, entry_owner) = match self.entry {
            Some((h, run, owner)) => (h, run, Some(owner)),
            None => (0, run_no_entry::<T> as unsafe fn(&Core, usize, &mut PtRegs) -> Entry, None),
        };
        let core = Box::into_raw(Box::new(Core {
            live: AtomicBool::new(true),
            nmissed: AtomicU64::new(0),
            handler,
            entry,
            run_entry,
            run_return,
            _owners: [return_owner, entry_owner],
            insts: block.insts,
            shared: n,
            hint: AtomicUsize::new(0),
            data,
            drop_data: drop_data::<T>,
        }));
        block.assign(core, data, std::mem::size_of::<T>());
        let entry = probe::Probe::builder().function_start(addr).internal_pre(on_entry, core as usize).optimize(self.target.optimization());
        Ok((entry, Pending { core, block }))
    }
}

impl ReturnProbeBuilder<(), NoHandler> {
    /// Gives every watched call a `U` (from `U::default()` at the entry), which both
    /// handlers receive. Only before a handler is given (they are typed by it).
    pub fn data<U: Default + Send + 'static>(self) -> ReturnProbeBuilder<U, NoHandler> {
        ReturnProbeBuilder { target: self.target, handler: None, entry: None, maxactive: self.maxactive, _state: PhantomData }
    }
}

/// A return probe's `Core` and block while its entry probe is being registered or
/// unregistered. Dropped, it stops the handlers and retires both (freed after a grace
/// period: a site's chain may have shown the entry to a thread, see `pool`).
pub(crate) struct Pending {
    core: *const Core,
    block: &'static pool::Block,
}

impl Pending {
    /// The handle, once the entry's probe is registered; on error the `Core` and
    /// block are retired.
    pub(crate) fn finish(self, entry: Result<ProbeHandle, Error>) -> Result<ReturnProbeHandle, Error> {
        let handle = self.handle(entry?);
        // The entry's slot, if it has one, gets its name now.
        crate::perfmap::on_register();
        Ok(handle)
    }

    /// The handle, with the entry's probe registered.
    pub(crate) fn handle(self, entry: ProbeHandle) -> ReturnProbeHandle {
        let this = std::mem::ManuallyDrop::new(self);
        ReturnProbeHandle { entry: Some(entry), core: this.core, block: this.block }
    }

    /// After the entry's probe was unregistered (`retire`) or could not be (its
    /// breakpoint may still run `on_entry` with this `Core`, which then stays forever):
    /// the handlers stop either way.
    pub(crate) fn close(self, retire: bool) {
        if !retire {
            // SAFETY: `core` is live until retired, and this is not retiring it.
            unsafe { &*self.core }.live.store(false, Ordering::Relaxed);
            std::mem::forget(self);
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        // SAFETY: `core` is live until retired, below.
        unsafe { &*self.core }.live.store(false, Ordering::Relaxed);
        pool::retire(self.block, self.core as usize);
    }
}

/// A registered return probe; unregistered when dropped.
pub struct ReturnProbeHandle {
    /// The entry's probe (`None` once unregistered).
    entry: Option<ProbeHandle>,
    /// The probe's state (from `Box::into_raw`), valid until [`Self::close`] retires
    /// it with the block: a pointer, not a reference, since it may be freed before the
    /// handle's memory is.
    core: *const Core,
    block: &'static pool::Block,
}

// SAFETY: the handle only reads the `Core` (atomics, and fields fixed at
// registration), from any thread; the per-call data it owns is `Send` (the builder's
// bound) and touched only by the hit paths.
unsafe impl Send for ReturnProbeHandle {}
// SAFETY: as above: every method takes `&self` and reads atomics or fixed fields.
unsafe impl Sync for ReturnProbeHandle {}

impl Drop for ReturnProbeHandle {
    fn drop(&mut self) {
        // The error cannot be returned from drop; `unregister` reports it.
        let _ = self.close();
    }
}

impl std::fmt::Debug for ReturnProbeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReturnProbeHandle").field("address", &self.address()).field("maxactive", &self.maxactive()).finish()
    }
}

impl ReturnProbeHandle {
    /// The probed function's address.
    pub fn address(&self) -> usize {
        self.entry().address()
    }

    /// How many calls can be watched at once.
    pub fn maxactive(&self) -> usize {
        self.core().shared
    }

    /// Re-arms a disabled probe.
    pub fn enable(&self) -> Result<(), Error> {
        self.entry().enable()
    }

    /// Disarms the entry: new calls are not watched; calls already watched still run
    /// the return handler.
    pub fn disable(&self) -> Result<(), Error> {
        self.entry().disable()
    }

    /// Whether the entry is armed.
    pub fn is_enabled(&self) -> bool {
        self.entry().is_enabled()
    }

    /// Whether the entry is optimized (a jump, not a breakpoint; see [`crate::Optimize`]).
    pub fn is_optimized(&self) -> bool {
        self.entry().is_optimized()
    }

    /// Why the entry is not optimized (None if it is).
    pub fn why_not_optimized(&self) -> Option<crate::NotOptimized> {
        self.entry().why_not_optimized()
    }

    /// Calls whose entry took an instance (watched, skipped or overridden).
    pub fn nhit(&self) -> u64 {
        self.core().insts.iter().map(|i| i.taken.load(Ordering::Relaxed)).sum()
    }

    /// Calls not watched: every instance was in use, or the entry was hit inside a
    /// handler.
    pub fn nmissed(&self) -> u64 {
        self.core().nmissed.load(Ordering::Relaxed) + self.entry().nmissed()
    }

    /// Runs the entry hook on `regs` as the breakpoint would, without a trap: `regs`
    /// must be a function entry's (x86_64: `rsp` points at the return address, which
    /// may be replaced there; aarch64: `regs[30]` is replaced). For benchmarks of the
    /// return path alone, and site trampolines. Not API.
    ///
    /// # Safety
    /// x86_64: `regs.rsp` must point at the live return-address slot of a call that
    /// has just entered the probed function (it is read and replaced). aarch64:
    /// `regs.sp` must be that call's stack pointer at the entry.
    #[doc(hidden)]
    pub unsafe fn __enter(&self, regs: &mut PtRegs) {
        on_entry(regs, self.core as usize);
    }

    /// Disarms the entry and stops the handlers; calls in flight still return to their
    /// callers (what dropping the handle does, with the error).
    pub fn unregister(mut self) -> Result<(), Error> {
        self.close()
    }

    /// The probe's state.
    fn core(&self) -> &Core {
        // SAFETY: retired (then freed after a grace period) only by `close`, which
        // consumes or ends the handle: until then it is the live `Core` made at
        // registration.
        unsafe { &*self.core }
    }

    /// The entry's probe.
    fn entry(&self) -> &ProbeHandle {
        self.entry.as_ref().expect("unregistered only when the handle goes")
    }

    /// Disarms the entry, then stops the handlers (`live`), then retires the block and
    /// the `Core` (freed after a grace period, see `pool`), unless disarming failed: the
    /// entry may then still run `on_entry` with this `Core`, which stays forever.
    fn close(&mut self) -> Result<(), Error> {
        let Some((entry, pending)) = self.split() else { return Ok(()) };
        let r = entry.unregister();
        pending.close(r.is_ok());
        r
    }

    /// The entry's probe and the rest, to unregister (once: `None` after).
    pub(crate) fn split(&mut self) -> Option<(ProbeHandle, Pending)> {
        let entry = self.entry.take()?;
        Some((entry, Pending { core: self.core, block: self.block }))
    }
}
