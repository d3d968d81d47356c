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
//! # Safety
//! As for single probes ([`ProbeBuilder::pre_mut`](crate::ProbeBuilder::pre_mut)):
//! handlers that only read registers are safe; [`MultiProbeBuilder::entry_mut`] and
//! [`MultiProbeBuilder::exit_mut`], which may change them or skip functions, are
//! `unsafe`.
//!
//! [`register_batch`]: crate::register_batch

mod targets;

use crate::batch::AnyHandle;
use crate::breakpoint::batch::register_many;
use crate::breakpoint::{FnAddr, Probe, ProbeBuilder};
use crate::retprobe::{self, Entry, ReturnProbe};
use crate::{Error, PtRegs};
use std::sync::Arc;

/// A function a [`MultiProbe`] attached to, as its handlers see it.
#[derive(Debug, PartialEq, Eq)]
pub struct Attached {
    /// A number for the function, unique within its probe and below the number of
    /// functions chosen (0, 1, …, in the order of [`MultiProbeHandle::functions`],
    /// with a gap where a function was refused when the probes were armed: see
    /// [`MultiProbeHandle::skipped`]): an index into a table of your own, say.
    pub id: u32,
    /// Its first instruction (a `#[traceable]` function: the address callers call).
    pub addr: usize,
    /// Its name: a Rust path without the hash (`myapp::parser::parse`), or the symbol.
    pub name: String,
}

/// An entry handler as the builder keeps it: may change the registers; what it returns
/// matters as for [`ReturnProbeBuilder::entry_handler_mut`](crate::ReturnProbeBuilder::entry_handler_mut).
type EntryFn<T> = dyn Fn(&mut PtRegs, &Attached, &mut T) -> Entry + Send + Sync;
/// A return handler as the builder keeps it.
type ExitFn<T> = dyn Fn(&mut PtRegs, &Attached, &mut T) + Send + Sync;
/// Another probe for a function, chosen by probekit's own clients (the tracer's light
/// records, see `site::fgraph`), or `None` for the usual one.
type MemberFn = dyn Fn(&Arc<Attached>) -> Option<ProbeBuilder> + Send + Sync;

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
        MultiProbeBuilder { choose: targets::Choice::default(), entry: None, exit: None, maxactive: None, strict: false, member: None }
    }
}

/// Describes a multi-function probe: which functions, which handlers.
pub struct MultiProbeBuilder<T> {
    choose: targets::Choice,
    entry: Option<Arc<EntryFn<T>>>,
    exit: Option<Arc<ExitFn<T>>>,
    maxactive: Option<usize>,
    strict: bool,
    member: Option<Arc<MemberFn>>,
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

    /// Runs at the entry of every attached function, with the registers there (the
    /// arguments), the function, and this call's data, fresh from `T::default()`;
    /// returns whether to watch this call (run the return handler when it returns;
    /// without one it does not matter). It observes (see [`Self::entry_mut`]).
    pub fn entry(self, h: impl Fn(&PtRegs, &Attached, &mut T) -> bool + Send + Sync + 'static) -> Self {
        // SAFETY: the handler gets the registers read-only, and returns `Continue` or
        // `Skip`, which only decide whether this probe watches the call.
        unsafe { self.entry_mut(move |r: &mut PtRegs, f: &Attached, d: &mut T| if h(r, f, d) { Entry::Continue } else { Entry::Skip }) }
    }

    /// An entry handler that may change the registers, or skip a function
    /// ([`Entry::Override`]).
    ///
    /// # Safety
    /// As [`ReturnProbeBuilder::entry_handler_mut`](crate::ReturnProbeBuilder::entry_handler_mut),
    /// for every function attached to.
    pub unsafe fn entry_mut(mut self, h: impl Fn(&mut PtRegs, &Attached, &mut T) -> Entry + Send + Sync + 'static) -> Self {
        self.entry = Some(Arc::new(h));
        self
    }

    /// Runs when an attached function returns (each function gets a return probe),
    /// with the registers there (the return value in `rax`/`x0`), the function, and
    /// this call's data as the entry handler left it. It observes (see
    /// [`Self::exit_mut`]).
    pub fn exit(self, h: impl Fn(&PtRegs, &Attached, &mut T) + Send + Sync + 'static) -> Self {
        // SAFETY: the handler gets the registers read-only: it changes nothing.
        unsafe { self.exit_mut(move |r: &mut PtRegs, f: &Attached, d: &mut T| h(r, f, d)) }
    }

    /// A return handler that may change the registers, the return value included.
    ///
    /// # Safety
    /// As [`ReturnProbeBuilder::handler_mut`](crate::ReturnProbeBuilder::handler_mut),
    /// for every function attached to.
    pub unsafe fn exit_mut(mut self, h: impl Fn(&mut PtRegs, &Attached, &mut T) + Send + Sync + 'static) -> Self {
        self.exit = Some(Arc::new(h));
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

    /// Attaches to the functions for which `member` gives a probe with that probe
    /// instead of the usual one (probekit's own clients: the tracer's light records).
    #[cfg_attr(not(feature = "trace"), allow(dead_code))]
    pub(crate) fn member(mut self, member: impl Fn(&Arc<Attached>) -> Option<ProbeBuilder> + Send + Sync + 'static) -> Self {
        self.member = Some(Arc::new(member));
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
            let attached = Arc::new(Attached { id: members.len() as u32, addr, name });
            match self.member_probe(attached.clone()) {
                Ok((probe, rest)) => members.push((attached, probe, rest)),
                Err(error) if self.strict => return Err(attach_error(&attached.name, addr, error)),
                Err(error) => skipped.push(Skipped { name: attached.name.clone(), addr, error }),
            }
        }
        let (attached, (probes, rests)): (Vec<_>, (Vec<_>, Vec<_>)) = members.into_iter().map(|(a, p, r)| (a, (p, r))).unzip();
        let mut refused = Vec::new();
        let handles = register_many(probes, |i, e| {
            refused.push((i, e.clone()));
            !self.strict
        })
        .map_err(|e| attach_error(&attached[e.index].name, attached[e.index].addr, e.error))?;
        for (i, error) in refused {
            skipped.push(Skipped { name: attached[i].name.to_string(), addr: attached[i].addr, error });
        }
        // A member left out drops its rest: a return probe's is retired.
        let probes: Vec<(Arc<Attached>, AnyHandle)> = handles
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

    /// The probe for `attached`: the [`Self::member`] one if it gives one, else a return
    /// probe when there is a return handler, else a probe whose pre handler calls the
    /// entry handler. Their closures hold the function's `Attached` and the shared
    /// handlers.
    fn member_probe(&self, attached: Arc<Attached>) -> Result<(ProbeBuilder, Option<retprobe::Pending>), Error> {
        if let Some(probe) = self.member.as_ref().and_then(|m| m(&attached)) {
            return Ok((probe, None));
        }
        let target = Probe::builder().function_start(attached.addr);
        let entry = self.entry.clone();
        match self.exit.clone() {
            None => {
                let pre = move |regs: &mut PtRegs| {
                    let Some(h) = &entry else { return };
                    if let Entry::Override(v) = h(regs, &attached, &mut T::default()) {
                        // At a function entry (multi-function probes go on entries only).
                        retprobe::override_return(regs, v);
                    }
                };
                // SAFETY: the handler changes registers only as the entry handler does,
                // which the caller of `entry_mut` vouched for (`entry` is safe: it
                // changes nothing).
                Ok((unsafe { target.pre_mut(pre) }, None))
            }
            Some(exit) => {
                let a = attached.clone();
                let builder = ReturnProbe::builder().data::<T>().function_start(attached.addr).maxactive(self.maxactive.unwrap_or(0));
                // SAFETY: the handlers change registers only as the user's handlers do,
                // which the caller of `entry_mut`/`exit_mut` vouched for (`entry` and
                // `exit` change nothing).
                let builder = unsafe {
                    builder
                        .entry_handler_mut(move |r: &mut PtRegs, d: &mut T| entry.as_ref().map_or(Entry::Continue, |h| h(r, &a, d)))
                        .handler_mut(move |r: &mut PtRegs, d: &mut T| exit(r, &attached, d))
                };
                let (probe, rest) = builder.prepare()?;
                Ok((probe, Some(rest)))
            }
        }
    }
}

fn attach_error(name: &str, addr: usize, error: Error) -> Error {
    Error::Attach { function: name.to_string(), addr, error: Box::new(error) }
}

/// A registered multi-function probe; every function is detached when it drops.
#[derive(Debug)]
pub struct MultiProbeHandle {
    probes: Vec<(Arc<Attached>, AnyHandle)>,
    skipped: Vec<Skipped>,
}

impl MultiProbeHandle {
    /// The functions attached to.
    pub fn functions(&self) -> impl Iterator<Item = &Attached> + '_ {
        self.probes.iter().map(|(a, _)| &**a)
    }

    /// The functions chosen that could not be attached, and why.
    pub fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }

    /// Each attached function with its hits (calls whose entry handler ran).
    pub fn hits(&self) -> impl Iterator<Item = (&Attached, u64)> + '_ {
        self.probes.iter().map(|(a, h)| (&**a, h.nhit()))
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
