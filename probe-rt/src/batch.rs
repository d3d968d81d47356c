//! Batch registration of probes of any kinds (the kernel's `register_kprobes`).

use crate::breakpoint::batch::{register_many, unregister_many};
use crate::breakpoint::{ProbeBuilder, ProbeHandle};
use crate::retprobe::{Pending, ReturnProbeBuilder, ReturnProbeHandle};
use crate::Error;

pub use crate::breakpoint::batch::BatchError;

/// Something [`register_batch`] registers: a [`ProbeBuilder`] (breakpoint or site
/// probe), a [`ReturnProbeBuilder`], or an [`AnyProbe`] to mix kinds in one batch.
pub trait BatchMember: sealed::Sealed + Sized {
    /// What registering it gives.
    type Handle: BatchHandle;
    /// Splits the member into the probe to register and, for a return probe, the rest
    /// of it (made ready: data, stubs, instances).
    #[doc(hidden)]
    fn prepare(self) -> Result<(ProbeBuilder, <Self::Handle as BatchHandle>::Rest), Error>;
}

/// Something [`unregister_batch`] unregisters: the handles [`register_batch`] gives.
pub trait BatchHandle: sealed::Sealed + Sized {
    /// What a handle holds besides its probe's handle.
    #[doc(hidden)]
    type Rest;
    /// The probe's handle and the rest (`None` if already unregistered).
    #[doc(hidden)]
    fn split(self) -> Option<(ProbeHandle, Self::Rest)>;
    /// The handle from its parts, once the probe is registered.
    #[doc(hidden)]
    fn join(probe: ProbeHandle, rest: Self::Rest) -> Self;
    /// After the probe was unregistered (`done`) or could not be.
    #[doc(hidden)]
    fn close(rest: Self::Rest, done: bool);
}

/// A member of a batch of mixed kinds.
pub enum AnyProbe {
    /// A breakpoint or site probe.
    Probe(ProbeBuilder),
    /// A return probe (its per-call data type erased).
    Return(Box<dyn sealed::PrepareReturn>),
}

impl From<ProbeBuilder> for AnyProbe {
    fn from(b: ProbeBuilder) -> Self {
        AnyProbe::Probe(b)
    }
}

impl<T: Default + Send + 'static, S: 'static> From<ReturnProbeBuilder<T, S>> for AnyProbe {
    fn from(b: ReturnProbeBuilder<T, S>) -> Self {
        AnyProbe::Return(Box::new(b))
    }
}

/// What registering an [`AnyProbe`] gives.
#[derive(Debug)]
pub enum AnyHandle {
    /// A breakpoint or site probe's handle.
    Probe(ProbeHandle),
    /// A return probe's handle.
    Return(ReturnProbeHandle),
}

impl AnyHandle {
    /// The probed address (a return probe's function).
    pub fn address(&self) -> usize {
        match self {
            AnyHandle::Probe(h) => h.address(),
            AnyHandle::Return(h) => h.address(),
        }
    }

    /// Hits whose handlers ran (a return probe: calls whose entry took an instance).
    pub fn nhit(&self) -> u64 {
        match self {
            AnyHandle::Probe(h) => h.nhit(),
            AnyHandle::Return(h) => h.nhit(),
        }
    }

    /// Hits whose handlers did not run.
    pub fn nmissed(&self) -> u64 {
        match self {
            AnyHandle::Probe(h) => h.nmissed(),
            AnyHandle::Return(h) => h.nmissed(),
        }
    }
}

/// Types only this crate can name: the traits above are sealed, and what their hidden
/// methods pass is not public API.
mod sealed {
    use super::*;

    pub trait Sealed {}

    /// A return probe's rest: its `Core` and block.
    pub struct ReturnRest(pub(super) Pending);
    /// An [`AnyProbe`]'s rest: a return probe's, or none.
    pub struct AnyRest(pub(super) Option<Pending>);

    /// A return probe builder of any data type.
    pub trait PrepareReturn {
        #[doc(hidden)]
        fn prepare_boxed(self: Box<Self>) -> Result<(ProbeBuilder, ReturnRest), Error>;
    }

    impl<T: Default + Send + 'static, S: 'static> PrepareReturn for ReturnProbeBuilder<T, S> {
        fn prepare_boxed(self: Box<Self>) -> Result<(ProbeBuilder, ReturnRest), Error> {
            BatchMember::prepare(*self)
        }
    }

    impl Sealed for ProbeBuilder {}
    impl<T, S> Sealed for ReturnProbeBuilder<T, S> {}
    impl Sealed for AnyProbe {}
    impl Sealed for ProbeHandle {}
    impl Sealed for ReturnProbeHandle {}
    impl Sealed for AnyHandle {}
}
use sealed::{AnyRest, ReturnRest};

impl BatchMember for ProbeBuilder {
    type Handle = ProbeHandle;
    fn prepare(self) -> Result<(ProbeBuilder, ()), Error> {
        Ok((self, ()))
    }
}

impl<T: Default + Send + 'static, S: 'static> BatchMember for ReturnProbeBuilder<T, S> {
    type Handle = ReturnProbeHandle;
    fn prepare(self) -> Result<(ProbeBuilder, ReturnRest), Error> {
        ReturnProbeBuilder::prepare(self).map(|(b, p)| (b, ReturnRest(p)))
    }
}

impl BatchMember for AnyProbe {
    type Handle = AnyHandle;
    fn prepare(self) -> Result<(ProbeBuilder, AnyRest), Error> {
        match self {
            AnyProbe::Probe(b) => Ok((b, AnyRest(None))),
            AnyProbe::Return(r) => r.prepare_boxed().map(|(b, r)| (b, AnyRest(Some(r.0)))),
        }
    }
}

impl BatchHandle for ProbeHandle {
    type Rest = ();
    fn split(self) -> Option<(ProbeHandle, ())> {
        Some((self, ()))
    }
    fn join(probe: ProbeHandle, (): ()) -> Self {
        probe
    }
    fn close((): (), _: bool) {}
}

impl BatchHandle for ReturnProbeHandle {
    type Rest = ReturnRest;
    fn split(mut self) -> Option<(ProbeHandle, ReturnRest)> {
        ReturnProbeHandle::split(&mut self).map(|(h, p)| (h, ReturnRest(p)))
    }
    fn join(probe: ProbeHandle, rest: ReturnRest) -> Self {
        rest.0.handle(probe)
    }
    fn close(rest: ReturnRest, done: bool) {
        rest.0.close(done)
    }
}

impl BatchHandle for AnyHandle {
    type Rest = AnyRest;
    fn split(self) -> Option<(ProbeHandle, AnyRest)> {
        match self {
            AnyHandle::Probe(h) => Some((h, AnyRest(None))),
            AnyHandle::Return(h) => BatchHandle::split(h).map(|(h, r)| (h, AnyRest(Some(r.0)))),
        }
    }
    fn join(probe: ProbeHandle, rest: AnyRest) -> Self {
        match rest.0 {
            None => AnyHandle::Probe(probe),
            Some(p) => AnyHandle::Return(p.handle(probe)),
        }
    }
    fn close(rest: AnyRest, done: bool) {
        if let Some(p) = rest.0 {
            p.close(done)
        }
    }
}

/// Registers a set of probes together, all or nothing (the kernel's
/// `register_kprobes`): either every one is live, or none is and no byte of text
/// changed; the error names the member that failed (its position) and why. The
/// members are breakpoint and site probes ([`ProbeBuilder`]), return probes
/// ([`ReturnProbeBuilder`]), or both kinds as [`AnyProbe`]s. The code writes are
/// batched as the kernel's `text_poke_bp_batch` does: every breakpoint, then one core
/// sync; sites every `int3`, one sync, every tail, one sync, every head, one sync. So
/// enabling N probes costs a few `membarrier` calls, not one or three per probe. The
/// handles come back in the order of the members.
pub fn register_batch<M: BatchMember>(members: impl IntoIterator<Item = M>) -> Result<Vec<M::Handle>, BatchError> {
    let mut probes = Vec::new();
    let mut rests = Vec::new();
    for (index, m) in members.into_iter().enumerate() {
        // On error the rests made so far are retired as they drop.
        let (b, rest) = m.prepare().map_err(|error| BatchError { index, error })?;
        probes.push(b);
        rests.push(rest);
    }
    let handles = register_many(probes, |_, _| false)?;
    // No member was skipped: every position holds its handle.
    Ok(handles.into_iter().flatten().zip(rests).map(|(h, rest)| M::Handle::join(h, rest)).collect())
}

/// Unregisters a set of probes together, with the code writes batched as in
/// [`register_batch`]. On error, the probes whose text could not be restored stay
/// registered and armed (their handles are dropped without another try: a return
/// probe's handlers stop, its calls in flight still return to their callers).
pub fn unregister_batch<H: BatchHandle>(handles: impl IntoIterator<Item = H>) -> Result<(), Error> {
    let (probes, rests): (Vec<ProbeHandle>, Vec<H::Rest>) = handles.into_iter().filter_map(H::split).unzip();
    let (r, done) = unregister_many(probes);
    for (rest, done) in rests.into_iter().zip(done) {
        H::close(rest, done);
    }
    r
}
