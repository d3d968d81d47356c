//! One handler on many functions: the kernel's fprobe, in a process.
//!
//! A [`MultiProbe`] attaches an entry handler, and optionally a return handler, to
//! every function a set of globs and lists chooses: Rust paths and symbol names of the
//! executable and every loaded library (their ELF symbol tables, exported or not), so
//! `"myapp::parser::*"` or `"str*"`. `#[traceable]` functions are attached through
//! their sites (no trap), other functions with breakpoint probes. Every function gets
//! probes of its own, registered as one batch (see [`register_batch`]), so attaching
//! to thousands of functions costs a few core syncs, not thousands.
//!
//! The handlers learn which function fired from their [`Attached`] argument (an id,
//! the address and the name), with no lookup on the hit path: each function's probe
//! carries its `Attached` as its context.
//!
//! Functions that cannot be probed (probekit's own hit path, an instruction that cannot
//! run out of line, …) are reported in [`MultiProbeHandle::skipped`] with the reason,
//! never silently left out; [`MultiProbeBuilder::strict`] makes any of them fail the
//! registration instead. Functions the globs would match but that probekit generated
//! itself (a `#[traceable]` function's `__probekit_site_*` and `__probekit_body_*`)
//! are not candidates: their function is.
//!
//! # Memory
//! The `Attached` of a function, and the pairing of a function with an entry handler,
//! are kept for the life of the process (a handler may still be running when its probe
//! goes): one per function and handler ever attached, a few dozen bytes and the name.
//! Attaching the same functions again reuses them.
//!
//! [`register_batch`]: crate::register_batch

mod targets;

use crate::batch::AnyHandle;
use crate::breakpoint::batch::register_many;
use crate::breakpoint::{FnAddr, Probe};
use crate::retprobe::{self, Core, Entry, Hooks};
use crate::{Error, PtRegs};
use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

/// A function a [`MultiProbe`] attached to, as its handlers see it.
#[derive(Debug, PartialEq, Eq)]
pub struct Attached {
    /// A number for the function, the same for every attachment in the process (an
    /// index into a table of your own, say).
    pub id: u32,
    /// Its first instruction (a `#[traceable]` function: the address callers call).
    pub addr: usize,
    /// Its name: a Rust path without the hash (`myapp::parser::parse`), or the symbol.
    pub name: &'static str,
}

/// A multi-function entry handler: the registers at the entry (the arguments), the
/// function, and this call's data, fresh from `T::default()`. What it returns matters
/// as for a return probe's entry handler ([`Entry`]); without a return handler,
/// `Continue` and `Skip` are the same.
pub type MultiEntryHandler<T> = fn(&mut PtRegs, &Attached, &mut T) -> Entry;

/// A multi-function return handler: the registers at the return (the return value in
/// `rax`/`x0`), the function, and this call's data as the entry handler left it.
pub type MultiExitHandler<T> = fn(&mut PtRegs, &Attached, &mut T);

/// A function that matched but could not be attached, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// Its name, or the name asked for.
    pub name: String,
    /// Its address (0 if a name did not resolve).
    pub addr: usize,
    /// Why it could not be attached.
    pub error: Error,
}

/// One handler on many functions. See the [module docs](self).
pub struct MultiProbe;

impl MultiProbe {
    /// Starts describing a multi-function probe without per-call data.
    pub fn builder() -> MultiProbeBuilder<()> {
        Self::with_data()
    }

    /// Starts describing a multi-function probe whose calls each get a `T` (from
    /// `T::default()` at the entry) that both handlers receive: a timestamp, say.
    pub fn with_data<T: Default + Send + 'static>() -> MultiProbeBuilder<T> {
        MultiProbeBuilder { choose: targets::Choice::default(), entry: None, exit: None, maxactive: None, strict: false }
    }
}

/// Describes a multi-function probe: which functions, which handlers.
pub struct MultiProbeBuilder<T> {
    choose: targets::Choice,
    entry: Option<MultiEntryHandler<T>>,
    exit: Option<MultiExitHandler<T>>,
    maxactive: Option<usize>,
    strict: bool,
}

impl<T: Default + Send + 'static> MultiProbeBuilder<T> {
    /// Attach to every function whose name matches the glob (`*` any characters, `?`
    /// one, `[abc]` a class): its Rust path without the hash (`myapp::parser::*`) or
    /// its symbol (`str*`). May be given several times: the union.
    pub fn pattern(mut self, glob: &str) -> Self {
        self.choose.patterns.push(glob.to_string());
        self
    }

    /// Leave out the functions whose name matches this glob (the kernel's notfilter).
    pub fn exclude(mut self, glob: &str) -> Self {
        self.choose.excludes.push(glob.to_string());
        self
    }

    /// Only functions of the executable or libraries whose path contains `part`
    /// (`"libz.so"`, the executable's name): for patterns.
    pub fn object(mut self, part: &str) -> Self {
        self.choose.object = Some(part.to_string());
        self
    }

    /// Attach to functions by name, as [`ProbeBuilder::symbol`](crate::ProbeBuilder::symbol)
    /// names one. A name that resolves to nothing is reported as skipped.
    pub fn names<S: AsRef<str>>(mut self, names: impl IntoIterator<Item = S>) -> Self {
        self.choose.names.extend(names.into_iter().map(|s| s.as_ref().to_string()));
        self
    }

    /// Attach to a function given by pointer (see [`FnAddr`]).
    pub fn function(mut self, f: impl FnAddr) -> Self {
        self.choose.functions.push(f.addr());
        self
    }

    /// Runs at the entry of every attached function.
    pub fn entry(mut self, h: MultiEntryHandler<T>) -> Self {
        self.entry = Some(h);
        self
    }

    /// Runs when an attached function returns (each function gets a return probe).
    pub fn exit(mut self, h: MultiExitHandler<T>) -> Self {
        self.exit = Some(h);
        self
    }

    /// With a return handler: how many calls of each function can be watched at once
    /// (see [`ReturnProbeBuilder::maxactive`](crate::ReturnProbeBuilder::maxactive)).
    pub fn maxactive(mut self, n: usize) -> Self {
        self.maxactive = Some(n);
        self
    }

    /// Fail the registration, with [`Error::Attach`] naming it, if any chosen function
    /// cannot be attached, instead of reporting it in [`MultiProbeHandle::skipped`].
    pub fn strict(mut self) -> Self {
        self.strict = true;
        self
    }

    /// Chooses the functions and attaches to all of them as one batch: either every
    /// function that can be attached is live, or none is and no byte of text changed.
    /// Errors: a bad glob ([`Error::BadPattern`]), nothing chosen ([`Error::NoMatch`]),
    /// nothing attachable, or with [`Self::strict`] any function that cannot be
    /// attached ([`Error::Attach`], naming it).
    pub fn register(self) -> Result<MultiProbeHandle, Error> {
        let (chosen, mut skipped) = self.choose.resolve()?;
        if self.strict {
            if let Some(s) = skipped.drain(..).next() {
                return Err(attach_error(&s.name, s.addr, s.error));
            }
        }
        // Each function's probe, and for a return probe the rest of it.
        let mut members = Vec::with_capacity(chosen.len());
        for (name, addr) in chosen {
            let attached = intern(&name, addr);
            match self.member(attached) {
                Ok((probe, rest)) => members.push((attached, probe, rest)),
                Err(error) if self.strict => return Err(attach_error(&name, addr, error)),
                Err(error) => skipped.push(Skipped { name, addr, error }),
            }
        }
        let (attached, (probes, rests)): (Vec<_>, (Vec<_>, Vec<_>)) = members.into_iter().map(|(a, p, r)| (a, (p, r))).unzip();
        let mut refused = Vec::new();
        let handles = register_many(probes, |i, e| {
            refused.push((i, e.clone()));
            !self.strict
        })
        .map_err(|e| attach_error(attached[e.index].name, attached[e.index].addr, e.error))?;
        for (i, error) in refused {
            skipped.push(Skipped { name: attached[i].name.to_string(), addr: attached[i].addr, error });
        }
        // A member left out drops its rest: a return probe's is retired.
        let probes: Vec<(&'static Attached, AnyHandle)> = handles
            .into_iter()
            .zip(rests)
            .zip(attached)
            .filter_map(|((h, rest), a)| {
                let h = h?;
                Some((
                    a,
                    match rest {
                        None => AnyHandle::Probe(h),
                        Some(p) => AnyHandle::Return(p.handle(h)),
                    },
                ))
            })
            .collect();
        if probes.is_empty() {
            let s = skipped.first().expect("resolve() chose at least one function");
            return Err(attach_error(&s.name, s.addr, s.error.clone()));
        }
        Ok(MultiProbeHandle { probes, skipped })
    }

    /// The probe for `attached`: a return probe when there is a return handler, else a
    /// probe whose pre handler calls the entry handler.
    fn member(&self, attached: &'static Attached) -> Result<(crate::ProbeBuilder, Option<retprobe::Pending>), Error> {
        let target = Probe::builder().function_start(attached.addr);
        match self.exit {
            None => {
                let hook = intern_hook(attached, self.entry.map_or(0, |h| h as usize));
                Ok((target.internal_pre(run_entry_only::<T>, hook as *const Hook as usize), None))
            }
            Some(exit) => {
                let hooks = Hooks {
                    handler: exit as usize,
                    entry: self.entry.map_or(0, |h| h as usize),
                    run_entry: run_entry::<T>,
                    run_return: run_return::<T>,
                    ctx: attached as *const Attached as usize,
                };
                let (probe, rest) = retprobe::prepare::<T>(&target, self.maxactive, hooks)?;
                Ok((probe, Some(rest)))
            }
        }
    }
}

fn attach_error(name: &str, addr: usize, error: Error) -> Error {
    Error::Attach { function: name.to_string(), addr, error: Box::new(error) }
}

/// A function with an entry handler, as an entry-only probe's context.
struct Hook {
    attached: &'static Attached,
    /// A `MultiEntryHandler<T>` (0: none), typed again by `run_entry_only::<T>`.
    entry: usize,
}

/// The `Attached` of the function `name` at `addr` (its code's identity included, so
/// other code loaded there later gets its own), made once.
fn intern(name: &str, addr: usize) -> &'static Attached {
    static TABLE: LazyLock<Mutex<HashMap<(usize, u64, String), &'static Attached>>> = LazyLock::new(Default::default);
    let code = crate::sys::maps::mapping_of(addr).map_or(0, |m| m.code_id(addr));
    let mut table = TABLE.lock().unwrap_or_else(|p| p.into_inner());
    let id = table.len() as u32;
    table.entry((addr, code, name.to_string())).or_insert_with(|| {
        // Leaked on purpose: hit paths may read it at any time after (see the module docs).
        Box::leak(Box::new(Attached { id, addr, name: Box::leak(name.into()) }))
    })
}

/// The `Hook` of `attached` with the entry handler `entry`, made once.
fn intern_hook(attached: &'static Attached, entry: usize) -> &'static Hook {
    static TABLE: LazyLock<Mutex<HashMap<(usize, usize), &'static Hook>>> = LazyLock::new(Default::default);
    let mut table = TABLE.lock().unwrap_or_else(|p| p.into_inner());
    // Leaked on purpose, as `Attached`.
    table.entry((attached as *const Attached as usize, entry)).or_insert_with(|| Box::leak(Box::new(Hook { attached, entry })))
}

/// The pre handler of an entry-only function's probe (`ctx`: its `&'static Hook`).
fn run_entry_only<T: Default>(regs: &mut PtRegs, ctx: usize) {
    // SAFETY: `ctx` was registered as the address of an interned `Hook`, never freed.
    let hook = unsafe { &*(ctx as *const Hook) };
    if hook.entry == 0 {
        return;
    }
    // SAFETY: stored from a `MultiEntryHandler<T>` for the `T` this function was made
    // for (`member` pairs them).
    let h = unsafe { std::mem::transmute::<usize, MultiEntryHandler<T>>(hook.entry) };
    if let Entry::Override(v) = h(regs, hook.attached, &mut T::default()) {
        // At a function entry (multi-function probes go on entries only).
        retprobe::override_return(regs, v);
    }
}

/// A multi-function return probe's entry: as `retprobe::run_entry`, with the function.
///
/// # Safety
/// `data` must point to a `T` used by this thread only (its instance is busy),
/// `core.entry` be 0 or a `MultiEntryHandler<T>`, `core.ctx` an interned `Attached`.
unsafe fn run_entry<T: Default>(core: &Core, data: usize, regs: &mut PtRegs) -> Entry {
    // SAFETY: by the caller's contract.
    let d = unsafe { &mut *(data as *mut T) };
    *d = T::default();
    if core.entry == 0 {
        return Entry::Continue;
    }
    // SAFETY: by the caller's contract (`member` made the `Core` so).
    let (h, f) = unsafe { (std::mem::transmute::<usize, MultiEntryHandler<T>>(core.entry), &*(core.ctx as *const Attached)) };
    h(regs, f, d)
}

/// A multi-function return probe's return: as `retprobe::run_return`, with the function.
///
/// # Safety
/// As [`run_entry`], with `core.handler` a `MultiExitHandler<T>`.
unsafe fn run_return<T>(core: &Core, data: usize, regs: &mut PtRegs) {
    if core.handler == 0 {
        return;
    }
    // SAFETY: by the caller's contract (`member` made the `Core` so).
    let (h, f, d) = unsafe { (std::mem::transmute::<usize, MultiExitHandler<T>>(core.handler), &*(core.ctx as *const Attached), &mut *(data as *mut T)) };
    h(regs, f, d)
}

/// A registered multi-function probe; every function is detached when it drops.
#[derive(Debug)]
pub struct MultiProbeHandle {
    probes: Vec<(&'static Attached, AnyHandle)>,
    skipped: Vec<Skipped>,
}

impl MultiProbeHandle {
    /// The functions attached to.
    pub fn functions(&self) -> impl Iterator<Item = &'static Attached> + '_ {
        self.probes.iter().map(|(a, _)| *a)
    }

    /// The functions chosen that could not be attached, and why.
    pub fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }

    /// Each attached function with its hits (calls whose entry handler ran).
    pub fn hits(&self) -> impl Iterator<Item = (&'static Attached, u64)> + '_ {
        self.probes.iter().map(|(a, h)| (*a, h.nhit()))
    }

    /// Hits over all functions.
    pub fn nhit(&self) -> u64 {
        self.probes.iter().map(|(_, h)| h.nhit()).sum()
    }

    /// Misses over all functions (hit inside a handler; with a return handler, also
    /// calls not watched because every instance was in use).
    pub fn nmissed(&self) -> u64 {
        self.probes.iter().map(|(_, h)| h.nmissed()).sum()
    }

    /// Detaches from every function, as one batch (what dropping the handle does, with
    /// the error).
    pub fn unregister(mut self) -> Result<(), Error> {
        self.detach()
    }

    fn detach(&mut self) -> Result<(), Error> {
        crate::unregister_batch(std::mem::take(&mut self.probes).into_iter().map(|(_, h)| h))
    }
}

impl Drop for MultiProbeHandle {
    fn drop(&mut self) {
        // The error cannot be returned from drop; `unregister` reports it.
        let _ = self.detach();
    }
}
