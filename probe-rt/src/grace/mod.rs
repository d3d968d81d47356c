//! Grace periods: showing that no thread can still be using a retired probe's record
//! or out-of-line slot, so that both can be reused (the process analog of the kernel's
//! `synchronize_rcu_tasks`).
//!
//! A thread may be using a retired probe in four places: inside probekit's SIGTRAP
//! handler (which read the record, and may be running a handler), between the handler
//! and the slot (the kernel's sigreturn path), in the slot, or in a site's hit path
//! (which reads the records of the site's chain, and may be running a handler). Each
//! live thread is sent a signal, `SIGURG` (as Go's runtime uses it to preempt: its
//! default action is to be ignored, and programs rarely handle it), whose handler
//! reports the pc it interrupted and whether the thread is inside the SIGTRAP handler
//! (`depth`) or a site's hit path (`active`, set before the first record is read and
//! cleared after the last). A thread is quiescent when it is in neither and its pc is
//! in no *busy* range: the retired slots, the hit path's code, the sigreturn
//! trampoline (x86_64 glibc's `sa_restorer`, and the vDSO, where aarch64's lives). A
//! synchronous SIGTRAP still pending is delivered before the sample (Linux delivers
//! synchronous signals first), so the sample then interrupts the handler.
//!
//! # Which threads
//! Only threads that have ever entered a hit path are sampled: no other thread can be
//! using a probe, and threads that never run probekit's code (helper threads of a
//! runtime, of `io_uring`, of `qemu-user`) are neither disturbed nor waited for. A
//! thread records itself the first time it enters a hit path, which may be inside a
//! signal handler: it takes an entry of the *thread table* with atomics and system
//! calls only, no lock and no allocator, and remembers the entry's index in its
//! thread-local state, so later hits do not look for it again. The table has no fixed
//! size: it is chunks of `table::CHUNK` entries, each mapped with a raw `mmap` the first
//! time an entry of it is handed out and never unmapped or moved, found by index in a
//! static array of chunk pointers (room for the kernel's `PID_MAX_LIMIT` threads at
//! once). An entry holds its thread's id, and a generation that every change of owner
//! bumps; entries of exited threads are taken back, by the next threads to record
//! themselves (each looks at a few entries, from a cursor that goes round the table,
//! before it takes a new one: a thread id `tgkill` says names no thread is free) and by
//! grace periods (a sampled thread that has exited frees its entry). The generation
//! makes taking an entry back a compare-exchange that fails if it changed hands since
//! its thread was seen exited, even if a new thread got the same id meanwhile. Either a
//! grace period's snapshot of the table sees a recording thread, or (a fence on each
//! side) that thread's reads of the records see every retirement made before the
//! snapshot. A thread that first enters a hit path after the probes were disarmed
//! finds them disarmed.
//!
//! One fallback remains: a thread that finds no entry (the kernel refused the memory
//! for a new chunk, inside a hit path, where nothing can wait or report) cannot be
//! found through the table, so from then on a grace period also lists every thread of
//! the process (`/proc/self/task`) and enters those the table lacks itself, outside
//! any signal handler. Under qemu-user that list also holds qemu's own threads, which
//! answer no guest signal: there, after such a failure, no grace period completes.
//!
//! # Sampling in parallel
//! A grace period signals every thread of its snapshot first, then collects the
//! answers: each entry is also its thread's mailbox. The signal is queued with
//! `rt_tgsigqueueinfo` and carries the index of the entry it asks through, which also
//! reaches a thread that is not that entry's owner but got its id (the entry of an
//! exited thread not taken back yet), or that has no entry yet. The handler answers
//! into that entry, or into its own if the signal carries none (its information was
//! lost: the kernel drops it for a non-real-time signal past `RLIMIT_SIGPENDING`; or
//! it was sent with `tgkill`, the fallback where `rt_tgsigqueueinfo` is refused), and
//! only if the entry's current request names its own thread id: a request left over
//! from an earlier grace period is never answered for another thread. A thread found
//! inside a hit path or a busy range is asked again, 50 µs later, until it is out (for
//! up to one second). A thread the kernel no longer finds has exited (`Gone`): its
//! entry is freed. A thread that answers nothing for 100 ms (`sample::ANSWER`) while nothing else
//! answers either makes the grace period fail, unless by then it is gone too (it was
//! exiting when asked). The budget is overall, not per thread: a grace period with
//! thousands of threads takes about as long as it takes them all to be scheduled once,
//! and one with a silent thread 100 ms more.
//!
//! Costs and limits: only registration runs a grace period, and only when it needs a
//! record (see `probe`) or a return probe's stubs (see `retprobe::pool`). A sampled
//! thread blocked in a system call that is not restarted (`nanosleep`, `epoll_wait`, …)
//! sees `EINTR`, as with any signal. If the program has its own `SIGURG` handler, or a
//! thread blocks the signal (no answer in 100 ms), no grace period completes and
//! retired records are not reused; registration tries again at most every 100 ms
//! ([`Retry`]), and succeeds once the blocking thread unblocks or exits. A child made
//! by `fork` starts with the forking thread unrecorded (its id changed).

mod sample;
mod syscall;
mod table;

#[cfg(target_arch = "x86_64")]
pub(crate) use sample::window_clear;
pub(crate) use sample::{quiescent, set_hit_path, Retry};
pub(crate) use syscall::{gettid, thread_alive};
pub(crate) use table::table_state;

use std::cell::Cell;
use std::sync::atomic::{compiler_fence, fence, Ordering};
use table::{take_entry, OVERFLOW};

/// What the hit paths keep per thread, in one thread-local (a site hit accesses it
/// twice: on the way in and on the way out).
pub(crate) struct Thread {
    /// How deep this thread is in probekit's hit paths.
    depth: Cell<u32>,
    /// 0 until this thread has an entry in the thread table, then the entry's index + 1
    /// (`u32::MAX` if it found none).
    index: Cell<u32>,
    /// This thread's id, once asked for (0 before).
    tid: Cell<i32>,
    /// Running a probe handler (reentrancy guard: probes hit meanwhile are missed).
    /// A site's dispatcher sets it before it reads any record and clears it after the
    /// last, instead of `depth`: a sample that finds it set counts as inside a hit path.
    pub(crate) active: Cell<bool>,
    /// The breakpoint address this thread's SIGTRAP handler is resolving (0: none):
    /// a grace period before a jump is written over a range holding that address waits
    /// for it, one for another range does not (see [`window_clear`]).
    trap: Cell<usize>,
}

thread_local! {
    /// Const-initialised and without destructor: usable in a signal handler.
    static THREAD: Thread = const { Thread { depth: Cell::new(0), index: Cell::new(0), tid: Cell::new(0), active: Cell::new(false), trap: Cell::new(0) } };
}

/// A recorded thread's place among the per-thread hit counters (see
/// `registry::HIT_SHARDS`): its thread-table entry's index + 1 as [`Thread`] keeps it,
/// `u32::MAX` if it found no entry. Kept raw, so that a hit path tests it with one
/// unsigned comparison ([`Shard::counter`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Shard(u32);

impl Shard {
    /// The thread's counter: its entry's index, or `u32::MAX - 1` (past every
    /// counter) if it has none. Counters exist for the first `HIT_SHARDS` only.
    #[inline(always)]
    pub(crate) fn counter(self) -> usize {
        self.0.wrapping_sub(1) as usize
    }
}

/// Marks this thread's SIGTRAP handler as resolving the breakpoint at `bp` (until
/// [`untrapping`] with what this returns, the address it resolved before: traps nest).
/// Async-signal-safe.
#[inline(always)]
pub(crate) fn trapping(bp: usize) -> usize {
    with_thread(|t| {
        let before = t.trap.replace(bp);
        // Read by the sampling handler on this thread: before the records are read.
        compiler_fence(Ordering::SeqCst);
        before
    })
}

/// See [`trapping`].
#[inline(always)]
pub(crate) fn untrapping(before: usize) {
    with_thread(|t| {
        compiler_fence(Ordering::SeqCst);
        t.trap.set(before)
    })
}

/// Runs `f` with this thread's state. Inlined: the hit paths call it several times,
/// and `LocalKey::with` kept out of line costs a call each.
#[inline(always)]
pub(crate) fn with_thread<R>(f: impl FnOnce(&Thread) -> R) -> R {
    THREAD.with(f)
}

/// Marks the start of a hit path (the SIGTRAP handler) on this thread, recording the
/// thread on its first time (a site's hit path records it through [`Thread::shard`]).
/// Returns the index of the thread's entry in the thread table, which is its alone for
/// as long as it lives (an entry is taken back only once its thread has exited):
/// callers use it for counters only this thread writes. Async-signal-safe: atomics
/// and system calls.
pub(crate) fn enter() -> Option<usize> {
    with_thread(Thread::enter)
}

/// Marks its end.
pub(crate) fn leave() {
    with_thread(Thread::leave)
}

impl Thread {
    /// See [`enter`].
    pub(crate) fn enter(&self) -> Option<usize> {
        let index = self.index();
        self.depth.set(self.depth.get() + 1);
        // The sampling signal handler reads `depth` on this thread: the increment must
        // not move past the hit path's reads of the records.
        compiler_fence(Ordering::SeqCst);
        index
    }

    /// The index of this thread's entry in the thread table (taking one the first time).
    #[inline]
    pub(crate) fn index(&self) -> Option<usize> {
        let Shard(index) = self.shard();
        (index != u32::MAX).then(|| index as usize - 1)
    }

    /// This thread's hit counter [`Shard`], taking an entry of the thread table the
    /// first time.
    #[inline]
    pub(crate) fn shard(&self) -> Shard {
        match self.index.get() {
            0 => Shard(self.record()),
            index => Shard(index),
        }
    }

    /// [`Thread::shard`] if the thread has been recorded already, without the call
    /// that records it: for a hit path that keeps its short path free of calls, and
    /// takes its long one the first time.
    #[inline(always)]
    pub(crate) fn recorded_shard(&self) -> Option<Shard> {
        let index = self.index.get();
        (index != 0).then_some(Shard(index))
    }

    /// This thread's id (a system call the first time only).
    #[inline]
    pub(crate) fn tid(&self) -> i32 {
        let mut tid = self.tid.get();
        if tid == 0 {
            tid = gettid();
            self.tid.set(tid);
        }
        tid
    }

    /// Gives this thread an entry in the thread table (its first time in a hit path).
    /// Async-signal-safe: atomics and system calls (`mmap` for a new chunk).
    #[cold]
    pub(crate) fn record(&self) -> u32 {
        let index = match take_entry(self.tid()) {
            Some(i) => i as u32 + 1,
            None => {
                OVERFLOW.store(true, Ordering::Release);
                u32::MAX
            }
        };
        // Store-buffering pair with the fence in `snapshot`: either a grace period's
        // snapshot sees this thread's entry, or this thread's reads of the records
        // (after this fence) see every retirement made before that snapshot.
        fence(Ordering::SeqCst);
        self.index.set(index);
        index
    }

    /// See [`leave`].
    pub(crate) fn leave(&self) {
        compiler_fence(Ordering::SeqCst);
        self.depth.set(self.depth.get().saturating_sub(1));
    }
}

/// In a child made by `fork`: the forking thread got a new id, so its entry (the
/// parent's id) no longer reaches it; it records itself again at its next hit.
extern "C" fn after_fork_in_child() {
    THREAD.with(|t| {
        t.tid.set(0);
        t.index.set(0);
    });
}

extern "C" fn init() {
    // SAFETY: registering a fork handler that only resets this thread's cells (the
    // child is single-threaded when it runs); called before `main`.
    unsafe { libc::pthread_atfork(None, None, Some(after_fork_in_child as unsafe extern "C" fn())) };
}

/// Runs `init` before `main` (before any thread could record itself and fork).
#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = init;

#[cfg(test)]
mod tests {
    use super::sample::*;
    use super::syscall::getpid;
    use super::table::*;
    use super::*;
    use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    /// The id of a thread that has exited and that the kernel no longer finds.
    fn dead_tid() -> i32 {
        let tid = std::thread::spawn(gettid).join().expect("a thread");
        let start = Instant::now();
        while thread_alive(tid) {
            assert!(start.elapsed() < Duration::from_secs(10), "thread {tid} still found 10 s after it was joined");
            std::thread::sleep(Duration::from_millis(1));
        }
        tid
    }

    /// A thread that never enters a hit path, blocked until the sender is dropped.
    fn idle_thread() -> (i32, mpsc::Sender<()>, std::thread::JoinHandle<()>) {
        let (tid_tx, tid_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let h = std::thread::spawn(move || {
            tid_tx.send(gettid()).expect("the test waits");
            let _ = stop_rx.recv();
        });
        (tid_rx.recv().expect("the thread's id"), stop_tx, h)
    }

    fn owner_tid(e: &Entry) -> i32 {
        e.owner.load(Ordering::Relaxed) as u32 as i32
    }

    #[test]
    fn an_entry_is_taken_when_free_or_left_by_an_exited_thread_never_from_a_live_one() {
        let e = Entry {
            owner: AtomicU64::new(0),
            ask: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            pc: AtomicUsize::new(0),
            inside: AtomicU32::new(0),
            trap: AtomicUsize::new(0),
        };
        let (me, dead) = (gettid(), dead_tid());
        assert!(e.take(me), "a free entry");
        assert_eq!((owner_tid(&e), e.owner.load(Ordering::Relaxed) >> 32), (me, 1), "owner and generation");
        assert!(!e.take(dead), "taken from a live thread");
        e.owner.store(next_owner(e.owner.load(Ordering::Relaxed), dead), Ordering::Relaxed);
        assert!(e.take(me), "an entry whose thread exited");
        assert_eq!(owner_tid(&e), me);
        // An entry already holding the taker's id was left by an exited thread that had it.
        assert!(e.take(me));
        assert_eq!(e.owner.load(Ordering::Relaxed) >> 32, 4, "every change of owner bumps the generation");
    }

    #[test]
    fn an_exited_threads_entry_that_changed_hands_since_the_snapshot_is_not_freed() {
        let dead = dead_tid();
        let e = Entry {
            owner: AtomicU64::new(7 << 32 | u64::from(dead as u32)),
            ask: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            pc: AtomicUsize::new(0),
            inside: AtomicU32::new(0),
            trap: AtomicUsize::new(0),
        };
        let seen = Sampled { index: 0, tid: dead, owner: e.owner.load(Ordering::Relaxed), ask: 0, at: Instant::now() };
        // A new thread takes it back, and (ids are reused) even the same id comes back.
        assert!(e.take(gettid()));
        e.owner.store(next_owner(e.owner.load(Ordering::Relaxed), dead), Ordering::Relaxed);
        seen.gone(&e);
        assert_eq!(owner_tid(&e), dead, "the entry's new owner keeps it");
        let now = Sampled { owner: e.owner.load(Ordering::Relaxed), ..seen };
        now.gone(&e);
        assert_eq!(owner_tid(&e), 0, "freed when unchanged");
    }

    #[test]
    fn a_queued_sample_reads_back_through_libc() {
        let info = QueuedInfo { signo: SIGNAL, errno: 0, code: libc::SI_QUEUE, align: 0, pid: 1234, uid: 56, value: 0x1234_5678_9abc, pad: [0; 96] };
        // SAFETY: two 128-byte plain-data C structs (asserted the same size above).
        let read: libc::siginfo_t = unsafe { std::mem::transmute(info) };
        // SAFETY: the fields of SI_QUEUE.
        let got = unsafe { (read.si_signo, read.si_code, read.si_pid(), read.si_uid(), read.si_value().sival_ptr as usize) };
        assert_eq!(got, (SIGNAL, libc::SI_QUEUE, 1234, 56, 0x1234_5678_9abc));
    }

    /// A thread that never entered a hit path but whose id an entry holds (as when an
    /// exited thread's entry was not taken back yet and its id went to a new thread)
    /// is asked through that entry and answers there: the sample names the entry.
    #[test]
    fn a_thread_answers_through_the_entry_the_sample_names() {
        let (tid, stop, h) = idle_thread();
        let index = take_entry(tid).expect("an entry");
        assert!(quiescent(&[]), "a grace period completes");
        let e = entry(index).expect("mapped");
        let answered = e.answered.load(Ordering::Acquire);
        assert!(answered != 0 && answered as u32 as i32 == tid, "thread {tid} answered in entry {index}: {answered:#x}");
        drop(stop);
        h.join().expect("the thread");
    }

    /// A sample that carries no entry (sent with `tgkill`, or its information lost) is
    /// answered in the thread's own entry.
    #[test]
    fn a_plain_signal_is_answered_in_the_threads_own_entry() {
        let (tx, rx) = mpsc::channel();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let h = std::thread::spawn(move || {
            tx.send((gettid(), with_thread(|t| t.index()))).expect("the test waits");
            let _ = stop_rx.recv();
        });
        let (tid, index) = rx.recv().expect("the thread's id and entry");
        let e = entry(index.expect("recorded")).expect("mapped");
        // No grace period meanwhile: it would put its own request in the entry.
        let _one = SAMPLING.lock().unwrap_or_else(|p| p.into_inner());
        assert!(install(), "the sampling handler is installed");
        let ask = 0xffff_fff0 << 32 | u64::from(tid as u32);
        e.ask.store(ask, Ordering::Release);
        // SAFETY: tgkill to a thread of this process, whose SIGURG handler is installed.
        assert_eq!(unsafe { libc::syscall(libc::SYS_tgkill, getpid() as libc::c_long, tid as libc::c_long, SIGNAL as libc::c_long) }, 0);
        let start = Instant::now();
        while e.answered.load(Ordering::Acquire) != ask {
            assert!(start.elapsed() < Duration::from_secs(10), "no answer in 10 s");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(e.inside.load(Ordering::Relaxed), 0, "the thread was outside every hit path");
        drop(stop_tx);
        h.join().expect("the thread");
    }

    /// A child made by `fork` runs the forking thread under a new id: its cached id
    /// and entry (the parent's id) are dropped, so that it records itself again.
    #[test]
    fn a_forked_child_forgets_the_forking_threads_id_and_entry() {
        let (tid, index) = with_thread(|t| (t.tid(), t.index()));
        assert!(tid == gettid() && index.is_some(), "recorded: {tid}, {index:?}");
        // SAFETY: the child runs only raw system calls and thread-local reads (no
        // allocation, no locks another thread of this process could hold), then _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            let ok = with_thread(|t| t.index.get() == 0 && t.tid.get() == 0 && t.tid() == gettid() && t.tid() != tid);
            // SAFETY: ends the child at once, without running the parent's destructors.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child, into a local.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "the child saw the parent's id or entry (status {status:#x})");
    }

    /// Once a thread found no entry, a grace period lists every thread of the process
    /// and enters those the table lacks. Not under qemu-user: its own threads (which
    /// run no guest code and answer no guest signal) are in `/proc/self/task` too.
    #[test]
    #[cfg_attr(target_arch = "aarch64", ignore = "qemu-user lists its own threads in /proc/self/task")]
    fn after_a_thread_found_no_entry_grace_periods_enter_every_thread() {
        let (tid, stop, h) = idle_thread();
        let held = |tid| (0..entries()).filter_map(entry).any(|e| owner_tid(e) == tid);
        assert!(!held(tid), "a thread that never entered a hit path has no entry");
        OVERFLOW.store(true, Ordering::Release);
        let done = quiescent(&[]);
        OVERFLOW.store(false, Ordering::Release);
        assert!(done, "a grace period completes");
        assert!(held(tid), "the grace period entered thread {tid}");
        drop(stop);
        h.join().expect("the thread");
    }
}
