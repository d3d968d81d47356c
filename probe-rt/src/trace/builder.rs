//! [`TracerBuilder`]: which functions a tracer attaches to, what it records, and its
//! registration.

use super::clock::Clock;
use super::light::{LightGuard, Member};
use super::ring::{Full, Ring, MAX_ARGS};
use super::{after_fork_in_child, Function, Slot, State, Tracer, NEXT_GENERATION};
use crate::multi::{MultiProbe, MultiProbeBuilder};
use crate::site::fgraph;
use crate::{Error, FnAddr, Probe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Describes a [`Tracer`]: which functions, what to record, how much.
pub struct TracerBuilder {
    probe: MultiProbeBuilder<Slot>,
    nargs: usize,
    retval: bool,
    capacity: usize,
    threads: usize,
    max_depth: usize,
    maxactive: usize,
    full: Full,
}

impl std::fmt::Debug for TracerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TracerBuilder")
            .field("args", &self.nargs)
            .field("retval", &self.retval)
            .field("capacity", &self.capacity)
            .field("threads", &self.threads)
            .field("max_depth", &self.max_depth)
            .field("maxactive", &self.maxactive)
            .field("full", &self.full)
            .finish_non_exhaustive()
    }
}

impl TracerBuilder {
    /// The defaults (see [`Tracer::builder`]).
    pub(super) fn new() -> TracerBuilder {
        TracerBuilder {
            probe: MultiProbe::with_data::<Slot>(),
            nargs: 0,
            retval: false,
            capacity: 1 << 14,
            threads: 64,
            max_depth: 256,
            maxactive: 256,
            full: Full::Overwrite,
        }
    }

    /// Trace every function whose name matches the glob (see [`MultiProbeBuilder::pattern`]).
    pub fn pattern(mut self, glob: &str) -> Self {
        self.probe = self.probe.pattern(glob);
        self
    }

    /// Leave out the functions whose name matches the glob.
    pub fn exclude(mut self, glob: &str) -> Self {
        self.probe = self.probe.exclude(glob);
        self
    }

    /// Only functions of objects whose path contains `part` (see [`MultiProbeBuilder::object`]).
    pub fn object(mut self, part: &str) -> Self {
        self.probe = self.probe.object(part);
        self
    }

    /// Trace functions by name.
    pub fn names<S: AsRef<str>>(mut self, names: impl IntoIterator<Item = S>) -> Self {
        self.probe = self.probe.names(names);
        self
    }

    /// Trace a function given by pointer.
    pub fn function(mut self, f: impl FnAddr) -> Self {
        self.probe = self.probe.function(f);
        self
    }

    /// Record the first `n` integer arguments of each call (at most [`MAX_ARGS`]).
    pub fn args(mut self, n: usize) -> Self {
        self.nargs = n.min(MAX_ARGS);
        self
    }

    /// Record each call's integer return value (`rax`/`x0`).
    pub fn retval(mut self) -> Self {
        self.retval = true;
        self
    }

    /// Records each thread's ring holds (rounded up to a power of two; default 16,384).
    /// [`TracerBuilder::register`] fails with [`Error::OutOfMemory`] if the rings
    /// cannot be allocated.
    pub fn capacity(mut self, records: usize) -> Self {
        self.capacity = records.max(1);
        self
    }

    /// How many threads can be traced at once (one ring each; default 64). When every
    /// ring has an owner, a new thread takes over the ring of one that exited, whose
    /// unread records are given up (counted, with its calls dropped or too deep, in
    /// [`Snapshot::exited_lost`](super::Snapshot::exited_lost)).
    pub fn threads(mut self, n: usize) -> Self {
        self.threads = n.max(1);
        self
    }

    /// How deep a thread's traced calls may nest (default 256); deeper calls are not
    /// traced and are counted in [`ThreadTrace::too_deep`](super::ThreadTrace::too_deep).
    pub fn max_depth(mut self, n: usize) -> Self {
        self.max_depth = n.clamp(1, 1 << 24);
        self
    }

    /// How many calls of each function can be in flight at once, over all threads
    /// (its return probe's `maxactive`; default 256). Calls on the light path (see
    /// the [module docs](super)) have no such limit.
    pub fn maxactive(mut self, n: usize) -> Self {
        self.maxactive = n.max(1);
        self
    }

    /// What a full ring does (default [`Full::Overwrite`]).
    pub fn when_full(mut self, full: Full) -> Self {
        self.full = full;
        self
    }

    /// Allocates the rings and attaches to every chosen function (as one batch);
    /// recording starts with [`Tracer::start`]. Errors as
    /// [`MultiProbeBuilder::register`], and [`Error::OutOfMemory`] if the rings cannot
    /// be allocated (their size overflows, or the allocator refuses).
    pub fn register(self) -> Result<Tracer, Error> {
        static AT_FORK: std::sync::Once = std::sync::Once::new();
        // SAFETY: registering a fork handler that only resets this thread's cells (the
        // child is single-threaded when it runs).
        AT_FORK.call_once(|| unsafe {
            libc::pthread_atfork(None, None, Some(after_fork_in_child as unsafe extern "C" fn()));
        });
        // Every ring before anything is attached: a refused allocation leaves nothing.
        let capacity = self.capacity.checked_next_power_of_two().ok_or(Error::OutOfMemory { bytes: usize::MAX })?;
        let rings = (0..self.threads).map(|_| Ring::new(capacity, self.max_depth, self.nargs, self.retval, self.full)).collect::<Result<_, _>>()?;
        let state = Arc::new(State {
            generation: NEXT_GENERATION.fetch_add(1, Ordering::Relaxed),
            clock: Clock::new(),
            running: AtomicBool::new(false),
            retval: self.retval,
            nargs: self.nargs,
            rings,
            no_ring: AtomicU64::new(0),
            missed: AtomicU64::new(0),
            exited_lost: AtomicU64::new(0),
        });
        let (on_entry, on_exit) = (state.clone(), state.clone());
        // Sites with an exit path take light records if this tracer holds the light path.
        let light = LightGuard::take(&state);
        let member_state = light.as_ref().map(|_| state.clone());
        let probe = self
            .probe
            .member(move |f| {
                let state = member_state.as_ref()?;
                // Only where the exit path will run: a light record has no other way to
                // see its calls return.
                let site = crate::site::table::site_of(f.addr)?;
                if !crate::site::patch::exit_path_usable(site.site) {
                    return None;
                }
                let member = Arc::new(Member { state: state.clone(), id: f.id });
                Some(Probe::builder().function_start(f.addr).internal_pre_owned(fgraph::HOOK, member))
            })
            .maxactive(self.maxactive)
            .entry(move |regs, f, slot| on_entry.enter(regs, f, slot))
            .exit(move |regs, _f, slot| on_exit.exit(regs, slot))
            .register()?;
        // Indexed by id; a function that matched but could not be attached keeps its
        // id (see `MultiProbeHandle::functions`) with address 0.
        let mut functions = Vec::new();
        for a in probe.functions() {
            let id = a.id as usize;
            if functions.len() <= id {
                functions.resize_with(id + 1, || Function { name: "[not attached]".to_string(), addr: 0 });
            }
            functions[id] = Function { name: a.name.clone(), addr: a.addr };
        }
        let functions: Arc<[Function]> = functions.into();
        super::live(&state);
        Ok(Tracer { light, probe, state, functions, reader: Mutex::new(()), t0: AtomicU64::new(0) })
    }
}
