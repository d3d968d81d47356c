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
//! size: it is chunks of [`CHUNK`] entries, each mapped with a raw `mmap` the first
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
//! entry is freed. A thread that answers nothing for 100 ms ([`ANSWER`]) while nothing else
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

use crate::sys::regs;
use std::cell::Cell;
use std::sync::atomic::{compiler_fence, fence, AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

const SIGNAL: libc::c_int = libc::SIGURG;

/// How long a grace period waits for answers while none comes (see the module docs).
const ANSWER: Duration = Duration::from_millis(100);

/// How long a grace period waits for threads found inside a hit path to come out.
const INSIDE: Duration = Duration::from_secs(1);

/// When a thread found inside is asked again.
const AGAIN: Duration = Duration::from_micros(50);

/// When the next grace period is worth trying, for a caller that wants one now and
/// then. A try that cannot complete costs up to [`ANSWER`] (a thread blocking the
/// signal), so after a failure the next try waits as long; counting failures instead
/// would stop trying for good once nothing more is retired, though the thread that
/// blocked may have exited since (it then answers `Gone`).
pub(crate) struct Retry(Option<Instant>);

impl Retry {
    /// Due at once.
    pub(crate) const fn new() -> Self {
        Retry(None)
    }

    /// Whether a grace period may be tried now.
    pub(crate) fn due(&self) -> bool {
        self.0.is_none_or(|at| Instant::now() >= at)
    }

    /// Runs [`quiescent`] for `slots` and remembers when to try again if it failed.
    pub(crate) fn quiescent(&mut self, slots: &[(usize, usize)]) -> bool {
        let done = quiescent(slots);
        self.0 = (!done).then(|| Instant::now() + ANSWER);
        done
    }
}

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
/// thread on its first time (a site's hit path records it through [`Thread::index`]).
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
        let mut index = self.index.get();
        if index == 0 {
            index = self.record();
        }
        (index != u32::MAX).then(|| index as usize - 1)
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

// ---- the thread table ----

/// One entry of the thread table: its owner, and the mailbox of the samples that ask
/// through it. All zero is a free entry with no request (a chunk comes zeroed).
struct Entry {
    /// The owner's thread id (low 32 bits; 0: free) and a generation (high 32 bits)
    /// that every change of owner bumps, so that a compare-exchange taking the entry
    /// back from an exited thread fails if it changed hands meanwhile.
    owner: AtomicU64,
    /// The sample asked through this entry: its round (high 32 bits) and the id of the
    /// thread asked (low 32 bits); 0: none yet.
    ask: AtomicU64,
    /// The `ask` the answer below answers (published last).
    answered: AtomicU64,
    /// The pc the sampled thread was at.
    pc: AtomicUsize,
    /// How deep the sampled thread was in hit paths (`depth` + `active`).
    inside: AtomicU32,
    /// The breakpoint its SIGTRAP handler was resolving (0: none).
    trap: AtomicUsize,
}

/// Entries per chunk (40 KiB: ten pages).
const CHUNK_BITS: usize = 10;
const CHUNK: usize = 1 << CHUNK_BITS;
/// Chunks at most: 4 Mi entries, the kernel's `PID_MAX_LIMIT` (2^22), so that every
/// thread a process can have at once finds one.
const MAX_CHUNKS: usize = 1 << 12;
const MAX_ENTRIES: usize = CHUNK * MAX_CHUNKS;

type Chunk = [Entry; CHUNK];

/// The chunks mapped so far (null: not yet), by index.
static CHUNKS: [AtomicPtr<Chunk>; MAX_CHUNKS] = [const { AtomicPtr::new(std::ptr::null_mut()) }; MAX_CHUNKS];
/// Entries handed out for the first time so far, in index order (which may run ahead of
/// the chunks mapped: an index whose chunk could not be mapped is skipped).
static FRESH: AtomicUsize = AtomicUsize::new(0);
/// Where the next recording thread starts looking for an entry to take back.
static SWEEP: AtomicUsize = AtomicUsize::new(0);
/// How many entries a recording thread looks at to take one back before it takes a new
/// one: enough that a table whose threads come and go stays about as large as the
/// most threads alive at once, few enough that recording costs a few system calls.
const LOOK: usize = 4;
/// A thread found no entry: grace periods list every thread of the process too.
static OVERFLOW: AtomicBool = AtomicBool::new(false);

/// Entry `index`, if its chunk is mapped. Lock-free.
fn entry(index: usize) -> Option<&'static Entry> {
    let p = CHUNKS.get(index >> CHUNK_BITS)?.load(Ordering::Acquire);
    // SAFETY: a non-null chunk pointer was stored (Release, loaded Acquire) by
    // `map_chunk` from a zero-filled private mapping of a whole `Chunk` (all zero is a
    // valid `Entry`: atomics), never unmapped or written through a non-atomic
    // reference, so a shared reference to it is valid for the rest of the process.
    (!p.is_null()).then(|| unsafe { &(*p)[index & (CHUNK - 1)] })
}

/// Entries handed out so far (an upper bound of the indices in use).
fn entries() -> usize {
    FRESH.load(Ordering::Acquire).min(MAX_ENTRIES)
}

/// Maps chunk `c` unless another thread did. Async-signal-safe: raw `mmap`/`munmap`
/// system calls and a compare-exchange (libc's `mmap` is not called: the hit path
/// would then forbid probing it, see `blacklist`).
fn map_chunk(c: usize) -> Option<&'static Chunk> {
    let cell = CHUNKS.get(c)?;
    let mut p = cell.load(Ordering::Acquire);
    if p.is_null() {
        let bytes = std::mem::size_of::<Chunk>();
        let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as usize;
        let m = raw_syscall6(libc::SYS_mmap, [0, bytes, (libc::PROT_READ | libc::PROT_WRITE) as usize, flags, usize::MAX, 0]);
        // The kernel returns -errno (-4095..=-1) on failure.
        if (-4095..0).contains(&m) {
            return None;
        }
        p = match cell.compare_exchange(std::ptr::null_mut(), m as *mut Chunk, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => m as *mut Chunk,
            Err(other) => {
                // Another thread mapped it first: ours was never shared.
                raw_syscall6(libc::SYS_munmap, [m as usize, bytes, 0, 0, 0, 0]);
                other
            }
        };
    }
    // SAFETY: as in `entry`: a mapped, zero-filled chunk that stays for good.
    Some(unsafe { &*p })
}

/// The owner word that follows `owner` when thread `tid` (0: nobody) takes the entry.
fn next_owner(owner: u64, tid: i32) -> u64 {
    ((owner >> 32).wrapping_add(1) << 32) | u64::from(tid as u32)
}

impl Entry {
    /// Takes this entry for thread `tid` if it is free, or its owner has exited (or is
    /// `tid` itself: a thread takes an entry once, so one already holding its id was
    /// left by an exited thread whose id it got). Async-signal-safe.
    fn take(&self, tid: i32) -> bool {
        let owner = self.owner.load(Ordering::Acquire);
        let held = owner as u32 as i32;
        if held != 0 && held != tid && thread_alive(held) {
            return false;
        }
        self.owner.compare_exchange(owner, next_owner(owner, tid), Ordering::AcqRel, Ordering::Relaxed).is_ok()
    }
}

/// An entry for thread `tid`: one taken back if one of the [`LOOK`] entries at the
/// sweep cursor is free, else a new one. `None` if the table is full or the kernel
/// refused a new chunk's memory. Async-signal-safe.
fn take_entry(tid: i32) -> Option<usize> {
    let n = entries();
    if n > 0 {
        let start = SWEEP.fetch_add(LOOK, Ordering::Relaxed);
        for k in 0..LOOK.min(n) {
            let i = start.wrapping_add(k) % n;
            if entry(i).is_some_and(|e| e.take(tid)) {
                return Some(i);
            }
        }
    }
    loop {
        let i = FRESH.fetch_add(1, Ordering::AcqRel);
        if i >= MAX_ENTRIES {
            return None;
        }
        let chunk = map_chunk(i >> CHUNK_BITS)?;
        // It fails only if a sweeping thread took this (free) entry first.
        if chunk[i & (CHUNK - 1)].take(tid) {
            return Some(i);
        }
    }
}

/// The thread table now (`__private::thread_table`).
pub(crate) fn table_state() -> crate::__private::ThreadTable {
    let n = entries();
    let taken = (0..n).filter_map(entry).filter(|e| e.owner.load(Ordering::Relaxed) as u32 != 0).count();
    crate::__private::ThreadTable { entries: n, taken, fallback: OVERFLOW.load(Ordering::Relaxed) }
}

// ---- system calls ----

/// A system call with up to three integer arguments and no memory operands, made
/// directly: the hit paths use it, and going through libc's `syscall`, `gettid` or
/// `getpid` would recurse if those functions were probed. Callers pass only calls
/// that read and write no user memory (gettid, getpid, tgkill).
fn raw_syscall3(nr: libc::c_long, a: usize, b: usize, c: usize) -> isize {
    let ret: isize;
    // SAFETY: the callers' system calls touch no user memory (see above); the
    // registers the kernel clobbers are declared.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        core::arch::asm!("syscall", inlateout("rax") nr as isize => ret, in("rdi") a, in("rsi") b, in("rdx") c,
            out("rcx") _, out("r11") _, options(nostack, nomem, preserves_flags));
    }
    // SAFETY: as above (aarch64: x8 the number, x0..x2 the arguments, x0 the result).
    #[cfg(target_arch = "aarch64")]
    unsafe {
        core::arch::asm!("svc #0", in("x8") nr, inlateout("x0") a => ret, in("x1") b, in("x2") c, options(nostack, nomem, preserves_flags));
    }
    ret
}

/// A system call with six integer arguments, made directly (as [`raw_syscall3`]), for
/// `mmap` and `munmap` of the thread table's chunks: they change the address space but
/// read and write no memory the program holds a reference to.
fn raw_syscall6(nr: libc::c_long, a: [usize; 6]) -> isize {
    let ret: isize;
    // SAFETY: the callers map fresh memory or unmap a mapping nothing references (see
    // above); the registers the kernel clobbers are declared. Not `nomem`: the
    // compiler must not assume memory unchanged across a change of the address space.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        core::arch::asm!("syscall", inlateout("rax") nr as isize => ret, in("rdi") a[0], in("rsi") a[1], in("rdx") a[2], in("r10") a[3],
            in("r8") a[4], in("r9") a[5], out("rcx") _, out("r11") _, options(nostack, preserves_flags));
    }
    // SAFETY: as above (aarch64: x8 the number, x0..x5 the arguments, x0 the result).
    #[cfg(target_arch = "aarch64")]
    unsafe {
        core::arch::asm!("svc #0", in("x8") nr, inlateout("x0") a[0] => ret, in("x1") a[1], in("x2") a[2], in("x3") a[3], in("x4") a[4],
            in("x5") a[5], options(nostack, preserves_flags));
    }
    ret
}

/// The calling thread's id (a raw system call, see [`raw_syscall3`]).
pub(crate) fn gettid() -> i32 {
    raw_syscall3(libc::SYS_gettid, 0, 0, 0) as i32
}

/// This process's id (a raw system call, see [`raw_syscall3`]).
fn getpid() -> i32 {
    raw_syscall3(libc::SYS_getpid, 0, 0, 0) as i32
}

/// Whether the thread `tid` of this process may still be alive: false only when the
/// kernel says the id names no thread of it (an id reused by a new thread keeps
/// looking alive: an instance it names is then reclaimed only once that one exits).
/// Async-signal-safe.
pub(crate) fn thread_alive(tid: i32) -> bool {
    // tgkill with signal 0 checks that the thread exists and sends nothing.
    raw_syscall3(libc::SYS_tgkill, getpid() as usize, tid as usize, 0) != -(libc::ESRCH as isize)
}

// ---- sampling ----

/// The `siginfo_t` a sample is queued with (`rt_tgsigqueueinfo`): the kernel's layout
/// for `SI_QUEUE` on 64-bit Linux (`_sifields._rt` after three `int`s, aligned to 8),
/// the same on x86_64 and aarch64, read back by libc's `si_pid`/`si_value`.
#[repr(C)]
struct QueuedInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    /// `_sifields` is aligned to 8 (it holds pointers).
    align: libc::c_int,
    pid: libc::pid_t,
    uid: libc::uid_t,
    /// `sigval`: the index of the entry the sample asks through.
    value: usize,
    pad: [u8; 128 - 32],
}

// The kernel copies exactly a `siginfo_t` (128 bytes) from the pointer passed.
static_assertions::const_assert_eq!(std::mem::size_of::<QueuedInfo>(), std::mem::size_of::<libc::siginfo_t>());
// `_sifields` starts at 16 on 64-bit: `pid` there, `uid` at 20, the `sigval` at 24.
static_assertions::const_assert_eq!(std::mem::offset_of!(QueuedInfo, pid), 16);
static_assertions::const_assert_eq!(std::mem::offset_of!(QueuedInfo, value), 24);

extern "C" fn on_sample(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes valid siginfo and ucontext to SA_SIGINFO handlers.
    let (info, uc) = unsafe { (&*info, &*(ctx as *const libc::ucontext_t)) };
    // SAFETY: si_pid and si_value are valid for SI_QUEUE (checked first).
    let named = (info.si_code == libc::SI_QUEUE && unsafe { info.si_pid() } == getpid()).then(|| unsafe { info.si_value() }.sival_ptr as usize);
    // The thread-local read directly, not through `with_thread`: every instance of that
    // is the hit path's (the blacklist's tests find it by name).
    let (tid, own, inside, trap) = THREAD.with(|t| {
        // Inside the SIGTRAP handler (`depth`), or in a site's hit path (`active`).
        (t.tid(), t.index.get().wrapping_sub(1) as usize, t.depth.get() + t.active.get() as u32, t.trap.get())
    });
    let pc = regs::pc(uc) as usize;
    // The entry the sample names, and this thread's own (the sample may have lost its
    // information: see the module docs). Anything else was not a sample: SIGURG's
    // default action is to ignore it.
    for index in named.into_iter().chain((Some(own) != named).then_some(own)) {
        if let Some(e) = entry(index) {
            let ask = e.ask.load(Ordering::Acquire);
            if ask != 0 && ask as u32 as i32 == tid {
                e.pc.store(pc, Ordering::Relaxed);
                e.inside.store(inside, Ordering::Relaxed);
                e.trap.store(trap, Ordering::Relaxed);
                e.answered.store(ask, Ordering::Release);
            }
        }
    }
}

static INSTALL: Once = Once::new();
/// The sampling handler is installed (the program had none of its own for SIGURG).
static USABLE: AtomicBool = AtomicBool::new(false);

/// Installs the sampling handler unless the program handles SIGURG itself.
fn install() -> bool {
    INSTALL.call_once(|| {
        // SAFETY: sigaction with zeroed structs filled field by field; the handler has
        // the SA_SIGINFO signature.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(SIGNAL, std::ptr::null(), &mut old) != 0 || !matches!(old.sa_sigaction, libc::SIG_DFL | libc::SIG_IGN) {
                return;
            }
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sample as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            USABLE.store(libc::sigaction(SIGNAL, &sa, std::ptr::null_mut()) == 0, Ordering::Relaxed);
        }
    });
    USABLE.load(Ordering::Relaxed)
}

/// Whether SIGURG still goes to the sampling handler (the program may have taken it).
fn still_installed() -> bool {
    // SAFETY: reading a disposition only.
    let mut cur: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::sigaction(SIGNAL, std::ptr::null(), &mut cur) == 0 && cur.sa_sigaction == on_sample as *const () as usize }
}

/// A thread a grace period samples, through one entry of the table.
struct Sampled {
    index: usize,
    tid: i32,
    /// The entry's owner word when the snapshot was taken (to free it if `tid` exited).
    owner: u64,
    /// The request in flight (0: none: asked again at `again`).
    ask: u64,
    /// When it was asked, or is to be asked again.
    at: Instant,
}

/// What asking a thread gave.
enum Asked {
    /// The signal is on its way.
    Sent,
    /// The thread has exited (its entry was freed).
    Gone,
    /// The signal could not be sent.
    Failed,
}

impl Sampled {
    /// Asks the thread for a sample in `round`, through its entry.
    fn ask(&mut self, round: u32, entry: &Entry, (pid, uid): (libc::pid_t, libc::uid_t)) -> Asked {
        self.ask = u64::from(round) << 32 | u64::from(self.tid as u32);
        self.at = Instant::now();
        entry.ask.store(self.ask, Ordering::Release);
        let info = QueuedInfo { signo: SIGNAL, errno: 0, code: libc::SI_QUEUE, align: 0, pid, uid, value: self.index, pad: [0; 96] };
        // SAFETY: rt_tgsigqueueinfo to a thread of this process, which reads the
        // 128-byte `info` (a live local of `siginfo_t`'s size); SI_QUEUE is a code a
        // process may send; the handler is installed.
        let mut sent = unsafe { libc::syscall(libc::SYS_rt_tgsigqueueinfo, pid as libc::c_long, self.tid as libc::c_long, SIGNAL as libc::c_long, &info) };
        let error = || std::io::Error::last_os_error().raw_os_error();
        if sent != 0 && error() != Some(libc::ESRCH) {
            // Refused (a seccomp filter may allow tgkill only): the plain signal, which
            // a thread answers in its own entry.
            // SAFETY: tgkill to a thread of this process; the handler is installed.
            sent = unsafe { libc::syscall(libc::SYS_tgkill, pid as libc::c_long, self.tid as libc::c_long, SIGNAL as libc::c_long) };
        }
        match sent {
            0 => Asked::Sent,
            _ if error() == Some(libc::ESRCH) => {
                self.gone(entry);
                Asked::Gone
            }
            _ => Asked::Failed,
        }
    }

    /// The thread has exited: its entry is freed, unless it changed hands since the
    /// snapshot (the generation tells), so that a new thread that got the same id
    /// keeps its own.
    fn gone(&self, entry: &Entry) {
        let _ = entry.owner.compare_exchange(self.owner, next_owner(self.owner, 0), Ordering::AcqRel, Ordering::Relaxed);
    }
}

/// The threads that may be using a probe, but the calling one, one entry each: those
/// in the table, and if a thread found no entry (or `every`), every thread of the
/// process (entered into the table here). `None` if one of those could not be entered.
/// With `every`, the entries taken here too (`(index, owner word)`), to give back.
#[allow(clippy::type_complexity)]
fn snapshot(every: bool) -> Option<(Vec<Sampled>, Vec<(usize, u64)>)> {
    let me = gettid();
    // Pairs with the fence in `Thread::record`.
    fence(Ordering::SeqCst);
    let now = Instant::now();
    let mut all: Vec<Sampled> = (0..entries())
        .filter_map(|i| {
            let owner = entry(i)?.owner.load(Ordering::Acquire);
            let tid = owner as u32 as i32;
            (tid != 0 && tid != me).then_some(Sampled { index: i, tid, owner, ask: 0, at: now })
        })
        .collect();
    all.sort_unstable_by_key(|s| s.tid);
    // An id in several entries (exited threads' not taken back yet) is one thread.
    all.dedup_by_key(|s| s.tid);
    let mut taken = Vec::new();
    if every || OVERFLOW.load(Ordering::Acquire) {
        let listed: Vec<i32> = std::fs::read_dir("/proc/self/task").ok()?.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
        let mut entered = Vec::new();
        for tid in listed.into_iter().filter(|t| *t != me && all.binary_search_by_key(t, |s| s.tid).is_err()) {
            let index = take_entry(tid)?;
            let owner = entry(index)?.owner.load(Ordering::Acquire);
            entered.push(Sampled { index, tid, owner, ask: 0, at: now });
        }
        if every {
            taken = entered.iter().map(|s| (s.index, s.owner)).collect();
        }
        all.append(&mut entered);
    }
    Some((all, taken))
}

/// The code of the hit paths, outside the bookkeeping that tells a sample the thread
/// is inside one: given by the crate's top layer (which knows every mechanism's entry
/// points) through [`set_hit_path`], so that this layer depends on none of them.
static HIT_PATH: std::sync::OnceLock<fn() -> Ranges> = std::sync::OnceLock::new();

/// Address ranges, `[start, end)` each.
type Ranges = Vec<(usize, usize)>;

/// Tells grace periods where the hit paths' code is (see [`HIT_PATH`]).
pub(crate) fn set_hit_path(ranges: fn() -> Vec<(usize, usize)>) {
    let _ = HIT_PATH.set(ranges);
}

/// Code every thread must be out of for `busy` (retired slots) to be reusable: those,
/// the hit path, the sigreturn trampolines.
fn busy_ranges(slots: &[(usize, usize)]) -> Vec<(usize, usize)> {
    let mut busy = slots.to_vec();
    busy.extend(HIT_PATH.get().map(|f| f()).unwrap_or_default());
    #[cfg(target_arch = "x86_64")]
    {
        // glibc returns from handlers through its `__restore_rt` (sa_restorer).
        // SAFETY: reading a disposition only.
        let mut cur: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::sigaction(libc::SIGTRAP, std::ptr::null(), &mut cur) } == 0 {
            if let Some(r) = cur.sa_restorer {
                busy.push((r as usize, r as usize + 16));
            }
        }
    }
    // The vDSO (the kernel's sigreturn trampoline on aarch64).
    // SAFETY: getauxval has no preconditions.
    let vdso = unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) } as usize;
    if let Some(m) = crate::sys::maps::mapping_of(vdso).filter(|_| vdso != 0) {
        busy.push((vdso, m.end)); // the vDSO's ELF header is its first byte
    }
    busy
}

/// One grace period at a time: callers holding different locks (the registry's, the
/// return-probe stub pool's) take turns, and a request in an entry is one grace
/// period's. It holds the round of the last wave of requests.
static SAMPLING: Mutex<u32> = Mutex::new(0);

/// Whether every other thread is seen outside the SIGTRAP handler and outside the
/// `slots` (and the code leading into them), so that nothing can still use probes
/// disarmed before the call. Waits for threads that are inside (bounded): see the
/// module docs, "Sampling in parallel".
pub(crate) fn quiescent(slots: &[(usize, usize)]) -> bool {
    sample(slots, false, None)
}

/// Whether every thread of the process, not only those that entered a hit path
/// (listed from `/proc/self/task`, entered into the table as the fallback of the module
/// docs does), is seen with its pc outside `ranges` (and the code leading into them:
/// the sigreturn trampolines and the hit paths' own code, which may be about to send a
/// thread there) and not resolving a breakpoint inside one of the `traps` ranges:
/// before a jump is written over code any thread may be running (optimized probes),
/// where only those places matter. A thread inside a hit path for another address (a
/// hot breakpoint elsewhere, a handler) is not waited for. Under qemu-user the list
/// holds qemu's own threads, which answer no guest signal: there it never completes.
#[cfg(target_arch = "x86_64")] // aarch64 optimizes one instruction: no window
pub(crate) fn window_clear(ranges: &[(usize, usize)], traps: &[(usize, usize)]) -> bool {
    sample(ranges, true, Some(traps))
}

/// [`quiescent`], of every thread of the process if `every`; with `traps`, a thread
/// counts as inside only while it resolves a breakpoint in one of these ranges.
fn sample(slots: &[(usize, usize)], every: bool, traps: Option<&[(usize, usize)]>) -> bool {
    let mut round = SAMPLING.lock().unwrap_or_else(|p| p.into_inner());
    if !install() || !still_installed() {
        return false;
    }
    let busy = busy_ranges(slots);
    let Some((pending, entered)) = snapshot(every) else { return false };
    let done = wait_out(&mut round, pending, &busy, traps);
    // Entries taken only for this grace period (threads listed because of `every`
    // that never entered a hit path) are given back, unless they changed hands since:
    // a thread that never answers (qemu-user's own) must not stay in the table, where
    // every later grace period would wait for it.
    for (index, owner) in entered {
        if let Some(e) = entry(index) {
            let _ = e.owner.compare_exchange(owner, next_owner(owner, 0), Ordering::AcqRel, Ordering::Relaxed);
        }
    }
    done
}

/// Samples the threads of `pending` until each is seen outside (see [`sample`]).
fn wait_out(round: &mut u32, mut pending: Vec<Sampled>, busy: &[(usize, usize)], traps: Option<&[(usize, usize)]>) -> bool {
    // SAFETY: getuid has no preconditions.
    let sender = (getpid(), unsafe { libc::getuid() });
    let start = Instant::now();
    // When an answer last came (or the last request went): silence is measured from it.
    let mut heard = start;
    // Each wave of requests has a round of its own, so that an answer to an earlier
    // request never passes for one to a later.
    let mut next_round = || {
        *round = round.wrapping_add(1).max(1);
        *round
    };
    let mut wave = next_round();
    while !pending.is_empty() {
        let now = Instant::now();
        let mut asked_again = false;
        let mut failed = false;
        pending.retain_mut(|s| {
            let Some(e) = entry(s.index) else { return false };
            if s.ask == 0 {
                // Due to be asked (the first time, or again after it was inside).
                if now < s.at {
                    return true;
                }
                asked_again = true;
                return match s.ask(wave, e, sender) {
                    Asked::Sent => true,
                    Asked::Gone => false,
                    Asked::Failed => {
                        failed = true;
                        true
                    }
                };
            }
            if e.answered.load(Ordering::Acquire) != s.ask {
                return true; // no answer yet
            }
            heard = now;
            let (pc, inside, trap) = (e.pc.load(Ordering::Relaxed), e.inside.load(Ordering::Relaxed), e.trap.load(Ordering::Relaxed));
            let out = match traps {
                None => inside == 0,
                Some(traps) => !traps.iter().any(|(a, b)| (*a..*b).contains(&trap)),
            };
            if out && !busy.iter().any(|(a, b)| (*a..*b).contains(&pc)) {
                return false; // quiescent
            }
            if now > start + INSIDE {
                failed = true;
            }
            // Inside: asked again a little later.
            s.ask = 0;
            s.at = now + AGAIN;
            true
        });
        if failed {
            return false;
        }
        if asked_again {
            heard = Instant::now();
            wave = next_round();
        } else if Instant::now() > heard + ANSWER {
            // Silence. A thread that was exiting when asked (the kernel still finds
            // it, but it runs no more code) is gone by now; any other blocks the
            // signal, or the signal goes elsewhere.
            let mut silent = false;
            pending.retain(|s| match entry(s.index) {
                Some(e) if s.ask != 0 && e.answered.load(Ordering::Acquire) != s.ask && !thread_alive(s.tid) => {
                    s.gone(e);
                    false
                }
                Some(e) => {
                    silent |= s.ask != 0 && e.answered.load(Ordering::Acquire) != s.ask;
                    true
                }
                None => false,
            });
            if silent {
                return false;
            }
            heard = Instant::now();
        }
        std::thread::yield_now();
    }
    true
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
    use super::*;
    use std::sync::mpsc;

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
