//! A function-graph tracer: ftrace's `function_graph`, or LLVM XRay's flight-data
//! recorder, in a process (cargo feature `trace`).
//!
//! A [`Tracer`] attaches an entry and a return handler to every function a glob or a
//! list chooses (through a [`MultiProbe`](crate::multi::MultiProbe)) and records, per thread, one record per
//! call: the function, its depth, the enter and exit times, and optionally the first
//! arguments and the return value. Records go to per-thread rings allocated when the
//! tracer is registered: the hit path takes no lock and allocates nothing. A full ring
//! overwrites its oldest record or drops the new one ([`Full`]), and counts what it
//! lost.
//!
//! ```no_run
//! # fn main() -> Result<(), probe_rt::Error> {
//! use probe_rt::trace::{EventStyle, Tracer, Weight}; // probekit::trace in the facade
//! let tracer = Tracer::builder().pattern("myapp::parser::*").args(2).retval().register()?;
//! tracer.start();
//! // ... the workload ...
//! tracer.stop();
//! let snap = tracer.snapshot(); // also while running
//! snap.write_chrome_json(std::fs::File::create("trace.json").unwrap(), EventStyle::Complete).unwrap();
//! snap.write_flamegraph(std::fs::File::create("flame.svg").unwrap(), Weight::Time, "parser").unwrap();
//! # Ok(()) }
//! ```
//!
//! # Nesting
//! Each call's record is written when it returns, with its depth on its thread's stack
//! of traced calls, so a snapshot holds whole calls that nest: recursion, threads and
//! calls that overlap in time on different threads all come out right (bcc's
//! `funclatency` says it cannot do this for recursive functions; per-call data can).
//! A call that never returns because a panic went past it is recorded with the flag
//! `unwound` as the panic unwinds its frame: the code that watches its return (a
//! site's exit path, a return probe's stub) has a personality routine, which the
//! unwinder calls there. Its exit time is when the panic left it, and it is in a
//! snapshot taken right after. A `longjmp` runs no unwinder: the calls it abandons end,
//! `unwound`, when their thread's next traced entry or return at or above their frames
//! shows them gone, which is how the return probe underneath finds out (see
//! [`retprobe`](crate::retprobe), "Finding the instance"); a traced call made from
//! deeper in the stack before that nests under them.
//!
//! Calls still running when a snapshot is taken are not in it (their records are
//! written when they return); a call whose caller's record is missing (lost, or
//! still running) still nests under the right depth, and flame graphs name the
//! missing frames `[not recorded]`.
//!
//! # The light path
//! A `#[traceable]` function whose site has an exit path (all but generic ones and
//! those whose arguments may need more than ~500 bytes of stack) is traced the way
//! ftrace's `function_graph` traces a kernel function, not through a return probe:
//! its site jumps to its exit path, which calls two light trampolines that save the
//! argument or return registers only (not a whole [`PtRegs`]), and the return is
//! matched to its entry by stack pointer and return address on the thread's ring. No
//! return-probe instance is taken, so [`TracerBuilder::maxactive`] does not limit
//! these calls, and a traced call costs about two thirds of what the return-probe path
//! cost (see the README's `hit/trace_record`). One tracer at a time takes the light
//! path (a tracer registered while another holds it traces every function with return
//! probes), and a site where another probe is armed too, or a return probe is
//! registered, takes the full trampolines meanwhile, through which the tracer's calls
//! are recorded the same way. Like return probes (see
//! [`retprobe`](crate::retprobe), "Finding the instance"), the matching assumes a
//! thread's traced calls run on one stack: a traced function called on a
//! `sigaltstack` or a coroutine's stack can end its thread's other calls as unwound.
//!
//! # Costs and limits
//! Each traced call costs its probe hit (a trap, or a trampoline on `#[traceable]`
//! functions), two reads of the cycle counter (converted to `CLOCK_MONOTONIC`
//! nanoseconds when read out; a CPU without an invariant TSC reads `clock_gettime`
//! instead; the first tracer of a process measures the counter's rate for 10 ms) and
//! a few stores. The rings are allocated up front:
//! [`TracerBuilder::threads`] rings of [`TracerBuilder::capacity`] records each; a
//! thread that finds none free takes over the ring of a thread that exited, if there
//! is one (that thread's unread records, and its counts of calls dropped or too
//! deep, go to [`Snapshot::exited_lost`]),
//! else it is not traced (counted in [`Snapshot::no_ring`]). The calls each function
//! off the light path can have in flight at once, over all threads, are its return
//! probe's `maxactive` ([`TracerBuilder::maxactive`]); calls beyond it are not traced
//! (counted in [`Snapshot::missed`]).

mod builder;
mod chrome;
mod clock;
mod flame;
mod light;
mod ring;
mod snapshot;

pub use builder::TracerBuilder;
pub use chrome::EventStyle;
pub use flame::Weight;
pub use ring::{Full, MAX_ARGS};
pub use snapshot::{Call, Function, Snapshot, ThreadTrace};

use crate::multi::{Attached, MultiProbeHandle, Skipped};
use crate::{Error, PtRegs};
pub use clock::now_ns;
use clock::Clock;
pub(crate) use light::Light;
use light::LightGuard;
use ring::Ring;
use std::cell::Cell;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// The per-call data of the tracer's return probes: where the call's frame is on its
/// thread's stack (its depth + 1; 0: not traced). Not zero-sized, so its address
/// tells the return probe's instances apart.
#[derive(Default)]
struct Slot(u32);

/// Distinguishes tracers in a thread's cache of its ring (never reused, unlike addresses).
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);
/// Numbers threads for ring ownership (with the thread id, a word no other thread of
/// the process has had).
static NEXT_SERIAL: AtomicU64 = AtomicU64::new(1);

/// The forking thread's word and ring hold its parent's thread id: in the child it
/// takes a word and a ring of its own at its next traced call (the parent's ring
/// there, owned by a thread the child does not have, can be taken over). Registered
/// with the first tracer.
extern "C" fn after_fork_in_child() {
    SERIAL.set(0);
    CACHE.set((0, std::ptr::null()));
    NO_RING.set(0);
    RETRY.set((0, 0));
}

/// This thread's word in a ring's `owner`: its serial (32 bits, never 0) and its
/// thread id, so that whether the owner has exited is read from the same word a
/// take-over replaces.
fn owner_word() -> u64 {
    let serial = loop {
        let s = NEXT_SERIAL.fetch_add(1, Ordering::Relaxed) as u32;
        if s != 0 {
            break s;
        }
    };
    (serial as u64) << 32 | crate::grace::with_thread(|t| t.tid()) as u32 as u64
}

thread_local! {
    /// This thread's word in a ring's `owner` (see [`owner_word`]; 0 until its first
    /// traced call). Const, no destructor: usable in a signal handler.
    static SERIAL: Cell<u64> = const { Cell::new(0) };
    /// The tracer generation this thread last traced for, and its ring there (see
    /// `State::cached_ring`; generation 0 is no tracer's).
    static CACHE: Cell<(u64, *const Ring)> = const { Cell::new((0, std::ptr::null())) };
    /// The tracer generation in which this thread found it owns no ring (returns do
    /// not claim one: see `State::own_ring`).
    static NO_RING: Cell<u64> = const { Cell::new(0) };
    /// The tracer generation this thread found no ring for, and the calls to wait
    /// before it looks for an exited thread's again.
    static RETRY: Cell<(u64, u32)> = const { Cell::new((0, 0)) };
}

/// Every registered tracer, for [`unwound`] (weak: a tracer's `State` goes with its
/// handle and its probes; dead entries are pruned at the next registration).
static LIVE: Mutex<Vec<Weak<State>>> = Mutex::new(Vec::new());

/// Adds a tracer to [`LIVE`].
fn live(state: &Arc<State>) {
    let mut live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
    live.retain(|w| w.strong_count() > 0);
    live.push(Arc::downgrade(state));
}

/// A panic is unwinding the frame of a traced call entered at `sp` (see
/// `crate::unwound`): every tracer ends this thread's calls entered there or deeper
/// as unwound, at this moment. Inside the hit path (a hit of a signal handler that
/// interrupts it is missed, not traced into the same ring); nothing if this thread
/// is in it already (its calls were missed then, not traced).
///
/// It never waits and never allocates: if [`LIVE`] is held (by a registration, by
/// this thread interrupted in here, or for good in a child made by `fork` while
/// another thread held it) the calls end as a `longjmp`'s do, at the thread's next
/// traced entry or return.
pub(crate) fn unwound(sp: usize) {
    let live = match LIVE.try_lock() {
        Ok(live) => live,
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => return,
    };
    if live.is_empty() {
        return;
    }
    let Some(_) = crate::site::enter_site() else { return };
    for state in live.iter().filter_map(Weak::upgrade) {
        if let Some(ring) = state.own_ring() {
            ring.unwind_to(ring.depth_without(|f| f.sp <= sp), state.clock.ticks());
        }
    }
    crate::site::leave_site();
}

/// What the handlers share with the handle.
struct State {
    generation: u64,
    /// The clock of the records (cycle counter ticks, converted when read).
    clock: Clock,
    running: AtomicBool,
    retval: bool,
    nargs: usize,
    rings: Box<[Ring]>,
    /// Calls on threads that found no free ring.
    no_ring: AtomicU64,
    /// Light records' calls not traced (see `fgraph::Hooks::missed`).
    missed: AtomicU64,
    /// Calls of exited threads given up when their ring was taken over: records not
    /// read, and calls dropped or too deep.
    exited_lost: AtomicU64,
}

/// Calls a thread without a ring makes between two tries to take over one of an
/// exited thread.
const RETRY_EVERY: u32 = 1024;

impl State {
    /// This thread's ring, claimed at its first call (lock-free: a scan and a CAS): a
    /// free one, or else one whose thread exited.
    #[inline(always)]
    fn ring(&self) -> Option<&Ring> {
        self.cached_ring().or_else(|| self.claim_ring())
    }

    /// This thread's ring if it has one already (no claim: for returns, which any
    /// thread's exit path may report).
    #[inline(always)]
    fn own_ring(&self) -> Option<&Ring> {
        self.cached_ring().or_else(|| self.find_own_ring())
    }

    /// This thread's ring in this tracer, if [`CACHE`] holds it: a pointer, not an
    /// index, so that the hit path finds it without a bounds check and a multiply
    /// (~1 ns of a traced call here).
    #[inline(always)]
    fn cached_ring(&self) -> Option<&Ring> {
        let (generation, ring) = CACHE.get();
        // SAFETY: only `cache_ring` writes CACHE with a generation other than 0, and
        // with a ring of `rings` of the `State` of that generation; no `State` has
        // generation 0 (NEXT_GENERATION starts at 1) and none is reused (it only
        // grows), so a match means that ring is one of `self.rings`: alive while
        // `self` is borrowed, and never moved (a boxed slice, never replaced). The
        // pair is not written in one store, but no reader sees half of it: every
        // reader and writer runs in a hit path with this thread's `active` flag set,
        // and a hit nested in one (a signal handler's) is missed, not traced.
        (generation == self.generation).then(|| unsafe { &*ring })
    }

    /// Ring `index`, cached for this thread as its ring in this tracer.
    fn cache_ring(&self, index: usize) -> &Ring {
        let ring = &self.rings[index];
        CACHE.set((self.generation, ring));
        ring
    }

    /// [`Self::own_ring`] past the cache: a scan, once per tracer on a thread that has
    /// no ring in it (until it claims one, which fills the cache).
    #[cold]
    fn find_own_ring(&self) -> Option<&Ring> {
        let me = SERIAL.get();
        if me == 0 || NO_RING.get() == self.generation {
            return None;
        }
        let Some(index) = self.rings.iter().position(|r| r.owner.load(Ordering::Relaxed) == me) else {
            NO_RING.set(self.generation);
            return None;
        };
        Some(self.cache_ring(index))
    }

    /// [`Self::ring`] the first time on this thread (or after another tracer took the
    /// cache).
    #[cold]
    fn claim_ring(&self) -> Option<&Ring> {
        // A thread that found no ring waits before it looks again, without a scan:
        // only a take-over can give it one (no ring is ever freed).
        match RETRY.get() {
            (generation, wait) if generation == self.generation && wait > 0 => {
                RETRY.set((generation, wait - 1));
                self.no_ring.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            _ => {}
        }
        let mut me = SERIAL.get();
        if me == 0 {
            me = owner_word();
            SERIAL.set(me);
        }
        // Mine already (another tracer took the cache meanwhile), else a free one.
        let index = self.rings.iter().position(|r| r.owner.load(Ordering::Relaxed) == me).or_else(|| {
            let i = self
                .rings
                .iter()
                .position(|r| r.owner.load(Ordering::Relaxed) == 0 && r.owner.compare_exchange(0, me, Ordering::AcqRel, Ordering::Relaxed).is_ok())?;
            self.rings[i].name_thread();
            self.rings[i].ready.store(true, Ordering::Release);
            Some(i)
        });
        let Some(index) = index.or_else(|| self.take_over(me)) else {
            self.no_ring.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        if NO_RING.get() == self.generation {
            NO_RING.set(0);
        }
        if RETRY.get().0 == self.generation {
            RETRY.set((0, 0));
        }
        Some(self.cache_ring(index))
    }

    /// A ring whose thread exited, taken over for this thread (`me`), when every ring
    /// has an owner. A thread without a ring tries once in [`RETRY_EVERY`] calls (see
    /// [`Self::claim_ring`]): each try asks the kernel about every ring's thread.
    #[cold]
    fn take_over(&self, me: u64) -> Option<usize> {
        RETRY.set((self.generation, RETRY_EVERY - 1));
        self.rings.iter().position(|r| {
            // The owner's thread id is in the word the compare-and-swap below expects:
            // a ring another thread took over meanwhile is not taken from it.
            let owner = r.owner.load(Ordering::Acquire);
            if owner == 0 || !r.ready.load(Ordering::Acquire) || crate::grace::thread_alive(owner as u32 as i32) {
                return false;
            }
            let Some(lost) = r.take_over(owner, me) else { return false };
            // Release: a reader that sees this sees the version made odd before it
            // (`Tracer::lost_and_versions`).
            self.exited_lost.fetch_add(lost, Ordering::Release);
            r.name_thread();
            r.handed_over();
            true
        })
    }

    /// Ends the calls on this thread's stack whose frames are gone, at an entry at `sp`
    /// (at `now`). Just before, the return probes dropped this thread's instances of
    /// frames deeper than this entry, and at the same depth those that are not its
    /// caller (a tail call from a traced function returns through that function's stub
    /// and keeps it): at a return probe's entry, or on the light path
    /// (`retprobe::entering_exit_path`). The frames whose instances they dropped are
    /// gone; so are the light path's as deep or deeper (their data is a site, no
    /// instance's): their exit paths called the body below them.
    #[inline(always)]
    fn end_gone(ring: &Ring, sp: usize, now: u64) {
        let depth = ring.depth_without(|top| top.sp < sp || top.sp == sp && !crate::retprobe::watching(top.data));
        ring.unwind_to(depth, now);
    }

    /// The entry handler: records that a call began (if tracing), after ending the
    /// calls on this thread's stack whose frames are gone.
    fn enter(&self, regs: &PtRegs, f: &Attached, slot: &mut Slot) -> bool {
        if !self.running.load(Ordering::Relaxed) {
            return false;
        }
        let Some(ring) = self.ring() else { return false };
        let now = self.clock.ticks();
        let sp = regs.stack_pointer() as usize;
        Self::end_gone(ring, sp, now);
        let data = slot as *mut Slot as usize;
        match ring.push(f.id, sp, data, now, |a| regs.arg(a).unwrap_or(0)) {
            Some(depth) => {
                slot.0 = depth as u32 + 1;
                true
            }
            None => false,
        }
    }

    /// The return handler: records the call, after ending the calls above it on the
    /// stack (a panic or `longjmp` left them: they never returned).
    fn exit(&self, regs: &PtRegs, slot: &mut Slot) {
        let Some(depth) = (slot.0 as usize).checked_sub(1) else { return };
        let now = self.clock.ticks();
        let Some(ring) = self.ring() else { return };
        if depth >= ring.depth() || ring.frame(depth).data != slot as *mut Slot as usize {
            return; // not this call's frame: cannot happen while the stack mirrors the instances
        }
        ring.unwind_to(depth + 1, now);
        ring.pop(now, Some(if self.retval { regs.return_value() } else { 0 }));
    }
}

/// The function-graph tracer. See the [module docs](self).
pub struct Tracer {
    /// Dropped first: no light return looks for this tracer once its records go.
    light: Option<LightGuard>,
    probe: MultiProbeHandle,
    state: Arc<State>,
    functions: Arc<[Function]>,
    /// Serialises readers (`snapshot`, `drain`): a ring has one reader at a time.
    reader: Mutex<()>,
    /// When the first `start` happened (the time zero of exports).
    t0: AtomicU64,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer").field("functions", &self.functions.len()).field("running", &self.is_running()).finish_non_exhaustive()
    }
}

impl Tracer {
    /// Starts describing a tracer.
    pub fn builder() -> TracerBuilder {
        TracerBuilder::new()
    }

    /// Starts recording (again). Calls that began while stopped are not recorded.
    pub fn start(&self) {
        let _ = self.t0.compare_exchange(0, now_ns(), Ordering::Relaxed, Ordering::Relaxed);
        self.state.running.store(true, Ordering::Release);
    }

    /// Stops recording new calls; calls already in flight are still recorded when
    /// they return.
    pub fn stop(&self) {
        self.state.running.store(false, Ordering::Release);
    }

    /// Whether new calls are being recorded.
    pub fn is_running(&self) -> bool {
        self.state.running.load(Ordering::Relaxed)
    }

    /// The functions traced, indexed by [`Call::function`] (a function that matched
    /// but could not be attached has address 0 and is in [`Self::skipped`]).
    pub fn functions(&self) -> &[Function] {
        &self.functions
    }

    /// The functions chosen that could not be attached, and why.
    pub fn skipped(&self) -> &[Skipped] {
        self.probe.skipped()
    }

    /// Every finished call recorded and still in the rings, without consuming them
    /// (also while running).
    pub fn snapshot(&self) -> Snapshot {
        self.read(false)
    }

    /// Every finished call recorded since the last `drain`, consuming them: for long
    /// traces that are written out piece by piece (see [`Snapshot::append`]).
    pub fn drain(&self) -> Snapshot {
        self.read(true)
    }

    fn read(&self, consume: bool) -> Snapshot {
        let _reader = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        let mut threads = Vec::new();
        let mut recorded = 0;
        for (index, ring) in self.state.rings.iter().enumerate() {
            if !ring.ready.load(Ordering::Acquire) {
                continue;
            }
            // A seqlock reader of take-overs: what was read while the ring changed
            // hands is not kept (the ring is read again by the next snapshot).
            let version = ring.version.load(Ordering::Acquire);
            if version & 1 == 1 {
                continue;
            }
            let consumed = ring.tail.load(Ordering::Relaxed);
            let tail = consumed.max(ring.start.load(Ordering::Relaxed));
            let (mut raws, first) = ring.read(tail);
            let tid = ring.tid.load(Ordering::Relaxed);
            let name: Vec<u8> = ring.name.iter().flat_map(|w| w.load(Ordering::Relaxed).to_ne_bytes()).take_while(|b| *b != 0).collect();
            let (dropped, too_deep) = (ring.dropped.load(Ordering::Relaxed), ring.too_deep.load(Ordering::Relaxed));
            fence(Ordering::Acquire);
            if ring.version.load(Ordering::Relaxed) != version {
                continue;
            }
            for r in &mut raws {
                (r.enter, r.exit) = (self.state.clock.ns(r.enter), self.state.clock.ns(r.exit));
            }
            let head = first + raws.len() as u64;
            recorded += ring.head.load(Ordering::Relaxed);
            // `first` is at least `tail` unless the copy was torn (and then discarded
            // above); saturating all the same, a reader must not panic on it.
            let overwritten = first.saturating_sub(tail);
            // A take-over after the version check above counted the records past
            // `consumed` as given up, and moved the tail: then these are not delivered
            // (nor their thread's counts), or they would count twice.
            if consume && ring.tail.compare_exchange(consumed, head, Ordering::AcqRel, Ordering::Relaxed).is_err() {
                continue;
            }
            // Its thread's key for `Snapshot::append`: the ring and its version, not the
            // owner word. A take-over replaces the owner word *before* the version turns
            // odd (the compare-and-swap is what wins the ring), so a reader can see the
            // new owner and the old thread's records under one even version; the
            // version, read twice around the copy, is the one word that names the
            // thread whose records these are (it moves by 2 at each take-over).
            let thread = ThreadTrace::new((index, version), tid, String::from_utf8_lossy(&name).into_owned(), raws, self.state.nargs, self.state.retval);
            threads.push(thread.with_losses(overwritten, dropped, too_deep));
        }
        let (exited_lost, versions) = self.lost_and_versions();
        Snapshot::new(
            self.functions.clone(),
            threads,
            self.nmissed(),
            self.state.no_ring.load(Ordering::Relaxed),
            exited_lost,
            recorded,
            self.t0.load(Ordering::Relaxed),
        )
        .settle(versions, consume)
    }

    /// `exited_lost` and every ring's version, read so that they agree: the versions
    /// read before and after it are the same, and even (no take-over under way). A
    /// take-over makes its ring's version odd, then adds to `exited_lost` (Release),
    /// then makes the version even (Release): so a take-over this read of
    /// `exited_lost` counts has moved the version read after it, and one whose version
    /// the first read saw completed is counted. Versions empty if a take-over stayed
    /// under way for every try (a thread stopped inside one, or a child of `fork` that
    /// inherited it half done).
    fn lost_and_versions(&self) -> (u64, Vec<u64>) {
        let versions = || self.state.rings.iter().map(|r| r.version.load(Ordering::Acquire)).collect::<Vec<u64>>();
        for _ in 0..64 {
            let before = versions();
            let lost = self.state.exited_lost.load(Ordering::Acquire);
            if before.iter().all(|v| v & 1 == 0) && versions() == before {
                return (lost, before);
            }
            std::thread::yield_now();
        }
        (self.state.exited_lost.load(Ordering::Acquire), Vec::new())
    }

    /// Calls not traced because they were hit inside a handler, or every instance of
    /// their function's return probe was in use (see [`TracerBuilder::maxactive`]), or
    /// (on the light path) they entered while another probe was being armed beside
    /// the tracer on their function.
    pub fn nmissed(&self) -> u64 {
        self.probe.nmissed() + self.state.missed.load(Ordering::Relaxed)
    }

    /// Detaches from every function (what dropping the tracer does, with the error).
    pub fn unregister(self) -> Result<(), Error> {
        self.stop();
        let Tracer { light, probe, .. } = self;
        drop(light);
        probe.unregister()
    }
}

#[cfg(test)]
mod tests {
    /// A panic unwinding on a thread that holds (or forked from a holder of) the
    /// registry of tracers goes on: `unwound` gives up rather than wait.
    #[test]
    fn unwound_never_waits_for_the_registry_of_tracers() {
        let _held = super::LIVE.lock().unwrap();
        super::unwound(usize::MAX);
    }
}
