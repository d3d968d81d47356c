//! What a tracer recorded, read out of its rings: calls per thread, in order, nested.

use super::ring::{Raw, HAS_RET, MAX_ARGS, UNWOUND};
use std::sync::Arc;

/// A traced function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Function {
    /// Its name: a Rust path without the hash, or the symbol.
    pub name: String,
    /// Its first instruction.
    pub addr: usize,
}

/// One finished call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Call {
    /// The function, an index into [`Snapshot::functions`].
    pub function: u32,
    /// How many traced calls of its thread were in flight when it began (0: none).
    pub depth: u32,
    /// `CLOCK_MONOTONIC` at the entry, in ns (read from the cycle counter, converted).
    pub enter_ns: u64,
    /// `CLOCK_MONOTONIC` at the return, in ns; for an unwound call, when a panic
    /// unwound its frame, or when its thread's next traced entry or return found its
    /// frame gone (a `longjmp`: see the [module docs](super), "Nesting").
    pub exit_ns: u64,
    /// It never returned: a panic or a `longjmp` went past its frame.
    pub unwound: bool,
    /// Its return value, if the tracer records them and it returned.
    pub ret: Option<u64>,
    args: [u64; MAX_ARGS],
    nargs: u8,
}

impl Call {
    /// Its first integer arguments, as many as the tracer records.
    pub fn args(&self) -> &[u64] {
        &self.args[..self.nargs as usize]
    }

    /// `exit_ns - enter_ns`.
    pub fn duration_ns(&self) -> u64 {
        self.exit_ns.saturating_sub(self.enter_ns)
    }

    /// Whether `self` can be an ancestor of `later`, a call of the same thread that
    /// began no earlier: shallower, and still running when `later` ended.
    pub(super) fn may_contain(&self, later: &Call) -> bool {
        self.depth < later.depth && self.exit_ns >= later.exit_ns
    }
}

/// One thread's calls.
#[derive(Clone, Debug)]
pub struct ThreadTrace {
    /// Its ring in the tracer and the ring's version when read (for `append`: a ring
    /// passes to another thread when its thread exits, and its version then moves on).
    ring: (usize, u64),
    /// Its thread id (Linux `gettid`).
    pub tid: i32,
    /// Its name when it first traced a call (`PR_GET_NAME`: 15 bytes at most).
    pub name: String,
    /// Its finished calls, by enter time (a caller before its callees).
    pub calls: Vec<Call>,
    /// Records overwritten before they could be read ([`Full::Overwrite`](super::Full)).
    pub overwritten: u64,
    /// Records dropped because the ring was full ([`Full::Drop`](super::Full)), since
    /// the thread took its ring.
    pub dropped: u64,
    /// Calls not traced because they nested deeper than
    /// [`TracerBuilder::max_depth`](super::TracerBuilder::max_depth), since the thread
    /// took its ring.
    pub too_deep: u64,
}

impl ThreadTrace {
    pub(super) fn new(ring: (usize, u64), tid: i32, name: String, raws: Vec<Raw>, nargs: usize, retval: bool) -> Self {
        let mut calls: Vec<Call> = raws
            .into_iter()
            .map(|r| Call {
                function: r.func,
                depth: r.depth,
                enter_ns: r.enter,
                exit_ns: r.exit,
                unwound: r.flags & UNWOUND != 0,
                ret: (retval && r.flags & HAS_RET != 0).then_some(r.ret),
                args: r.args,
                nargs: nargs as u8,
            })
            .collect();
        sort(&mut calls);
        ThreadTrace { ring, tid, name, calls, overwritten: 0, dropped: 0, too_deep: 0 }
    }

    /// With its counts of calls not recorded.
    pub(super) fn with_losses(self, overwritten: u64, dropped: u64, too_deep: u64) -> Self {
        ThreadTrace { overwritten, dropped, too_deep, ..self }
    }

    /// Whether its ring changed hands after it was read, by the ring versions of a
    /// snapshot: then that snapshot's `exited_lost` counts its `dropped` and `too_deep`.
    fn taken_over(&self, versions: &[u64]) -> bool {
        versions.get(self.ring.0).is_some_and(|v| *v != self.ring.1)
    }

    /// Calls this thread made that are not here: overwritten, dropped, or too deep.
    pub fn lost(&self) -> u64 {
        self.overwritten + self.dropped + self.too_deep
    }

    /// Runs `f` on every call in order with its stack: `stack[d]` is its caller at
    /// depth `d` (`None` where that call's record is missing: lost, or still running),
    /// and the last element is the call itself.
    pub fn walk(&self, mut f: impl FnMut(usize, &[Option<usize>])) {
        let mut open: Vec<usize> = Vec::new();
        let mut stack = Vec::new();
        for (i, c) in self.calls.iter().enumerate() {
            while open.last().is_some_and(|&o| !self.calls[o].may_contain(c)) {
                open.pop();
            }
            stack.clear();
            stack.resize(c.depth as usize + 1, None);
            for &o in &open {
                stack[self.calls[o].depth as usize] = Some(o);
            }
            stack[c.depth as usize] = Some(i);
            f(i, &stack);
            open.push(i);
        }
    }
}

/// By enter time, a caller before a callee that began in the same nanosecond.
fn sort(calls: &mut [Call]) {
    calls.sort_by_key(|c| (c.enter_ns, c.depth));
}

/// What a tracer recorded. See [`Tracer::snapshot`](super::Tracer::snapshot).
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// The traced functions, indexed by [`Call::function`].
    pub functions: Arc<[Function]>,
    /// Every thread that traced a call, in the order they first did.
    pub threads: Vec<ThreadTrace>,
    /// Calls not traced because they were hit inside a handler or found every
    /// instance of their function's return probe in use, since the tracer was
    /// registered.
    pub missed: u64,
    /// Calls not traced because their thread found no free ring, since the tracer
    /// was registered.
    pub no_ring: u64,
    /// Calls of threads that exited, given up when their ring was given to a new
    /// thread (when every ring has an owner, a thread without one takes over the ring
    /// of one that exited), since the tracer was registered: records not read
    /// (overwritten or not) and the thread's [`ThreadTrace::dropped`] and
    /// [`ThreadTrace::too_deep`], which its trace no longer shows. With it, a snapshot's
    /// `calls() + lost()` is every call that finished on a ring.
    pub exited_lost: u64,
    /// Records written since the tracer was registered (in this snapshot, consumed by
    /// earlier drains, or lost).
    pub recorded: u64,
    /// The time zero of exports: `CLOCK_MONOTONIC` when the tracer first started.
    pub t0_ns: u64,
    /// Every ring's version when `exited_lost` was read, read so that the two agree (a
    /// take-over counted in `exited_lost` has moved its ring's version, and one not
    /// counted has not); empty where no such read succeeded. For `append`.
    pub(super) versions: Vec<u64>,
}

impl Snapshot {
    pub(super) fn new(functions: Arc<[Function]>, threads: Vec<ThreadTrace>, missed: u64, no_ring: u64, exited_lost: u64, recorded: u64, t0_ns: u64) -> Self {
        Snapshot { functions, threads, missed, no_ring, exited_lost, recorded, t0_ns, versions: Vec::new() }
    }

    /// Makes the threads agree with `exited_lost` (read after them; `versions` read
    /// with it): a thread whose ring was taken over in between has its `dropped` and
    /// `too_deep` counted there; and, unless this read consumed its records (a drain,
    /// whose compare-and-swap on the tail kept the take-over from counting them), its
    /// records too, as not read: it is left out.
    pub(super) fn settle(mut self, versions: Vec<u64>, consumed: bool) -> Self {
        self.threads.retain_mut(|t| {
            if !t.taken_over(&versions) {
                return true;
            }
            (t.dropped, t.too_deep) = (0, 0);
            consumed
        });
        Snapshot { versions, ..self }
    }

    /// Calls in the snapshot, over all threads.
    pub fn calls(&self) -> usize {
        self.threads.iter().map(|t| t.calls.len()).sum()
    }

    /// Calls made while tracing that are not in the snapshot (overwritten, dropped,
    /// too deep, or of exited threads given up), over all threads; see also
    /// [`Self::missed`] and [`Self::no_ring`].
    pub fn lost(&self) -> u64 {
        self.threads.iter().map(ThreadTrace::lost).sum::<u64>() + self.exited_lost
    }

    /// The name of a call's function.
    pub fn name(&self, call: &Call) -> &str {
        self.functions.get(call.function as usize).map_or("[unknown]", |f| f.name.as_str())
    }

    /// Adds a later snapshot of the same tracer (a [`Tracer::drain`](super::Tracer::drain)):
    /// its calls follow this one's, thread by thread; counters take the later values,
    /// overwritten records add up. A thread that exited and whose ring was then taken
    /// over keeps its trace here; its `dropped` and `too_deep` are then zero, since the
    /// later `exited_lost` counts them (with any it lost after this snapshot).
    pub fn append(&mut self, later: Snapshot) {
        for m in self.threads.iter_mut().filter(|m| m.taken_over(&later.versions)) {
            (m.dropped, m.too_deep) = (0, 0);
        }
        for t in later.threads {
            match self.threads.iter_mut().find(|m| m.ring == t.ring) {
                Some(m) => {
                    m.calls.extend(t.calls);
                    sort(&mut m.calls);
                    m.overwritten += t.overwritten;
                    m.dropped = t.dropped;
                    m.too_deep = t.too_deep;
                }
                None => self.threads.push(t),
            }
        }
        self.missed = later.missed;
        self.no_ring = later.no_ring;
        // `exited_lost` and the versions were read together: they stay together, so that
        // this snapshot, appended to an earlier one in turn, settles it against the
        // versions its `exited_lost` agrees with.
        self.exited_lost = later.exited_lost;
        self.versions = later.versions;
        self.recorded = later.recorded;
        if self.t0_ns == 0 {
            self.t0_ns = later.t0_ns;
        }
    }
}
