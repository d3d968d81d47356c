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
//! synchronous signals first), so the sample then interrupts the handler. Only threads
//! that have ever entered a hit path are sampled (they record themselves there,
//! lock-free): no other thread can be using a probe, and threads that never run
//! probekit's code (helper threads of a runtime, of `io_uring`, of `qemu-user`) are
//! neither disturbed nor waited for. A thread that first enters a hit path after the
//! probes were disarmed finds them disarmed.
//!
//! Costs and limits: only registration runs a grace period, and only when it needs a
//! record (see `probe`) or a return probe's stubs (see `retprobe::pool`). A sampled
//! thread blocked in a system call that is not restarted (`nanosleep`, `epoll_wait`, …)
//! sees `EINTR`, as with any signal. If the program has its own `SIGURG` handler, or a
//! thread blocks the signal (no answer in 100 ms), no grace period completes and
//! retired records are not reused; registration tries again at most every 100 ms
//! ([`Retry`]), and succeeds once the blocking thread unblocks or exits.

use crate::sys::regs;
use std::cell::Cell;
use std::sync::atomic::{compiler_fence, fence, AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

const SIGNAL: libc::c_int = libc::SIGURG;

/// How long a thread may take to answer a sample.
const ANSWER: Duration = Duration::from_millis(100);

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
    /// 0 until this thread is in [`THREADS`], then its index there + 1 (`u32::MAX` if
    /// it found no room).
    index: Cell<u32>,
    /// This thread's id, once asked for (0 before).
    tid: Cell<i32>,
    /// Running a probe handler (reentrancy guard: probes hit meanwhile are missed).
    /// A site's dispatcher sets it before it reads any record and clears it after the
    /// last, instead of `depth`: a sample that finds it set counts as inside a hit path.
    pub(crate) active: Cell<bool>,
}

thread_local! {
    /// Const-initialised and without destructor: usable in a signal handler.
    static THREAD: Thread = const { Thread { depth: Cell::new(0), index: Cell::new(0), tid: Cell::new(0), active: Cell::new(false) } };
}

/// Runs `f` with this thread's state.
pub(crate) fn with_thread<R>(f: impl FnOnce(&Thread) -> R) -> R {
    THREAD.with(f)
}

/// How many threads that entered the SIGTRAP handler are remembered (exited ones
/// included); past that, every thread of the process is sampled.
const MAX_THREADS: usize = 1024;

/// The thread ids of threads that entered the SIGTRAP handler (0: a free entry).
#[allow(clippy::declare_interior_mutable_const)] // array initialiser only
const NO_THREAD: AtomicI32 = AtomicI32::new(0);
static THREADS: [AtomicI32; MAX_THREADS] = [NO_THREAD; MAX_THREADS];
/// A thread found no free entry in [`THREADS`].
static OVERFLOW: AtomicBool = AtomicBool::new(false);

/// Marks the start of a hit path (the SIGTRAP handler) on this thread, recording the
/// thread on its first time (a site's hit path records it through [`Thread::index`]). Returns the thread's index among
/// the recorded threads, which is its alone for the life of the process (entries are
/// never given back): callers use it for counters only this thread writes.
/// Async-signal-safe: atomics and a syscall.
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

    /// This thread's index among the recorded threads (recording it the first time).
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

    /// Records this thread in [`THREADS`] (its first time in a hit path).
    #[cold]
    pub(crate) fn record(&self) -> u32 {
        let tid = self.tid();
        let free = |t: &AtomicI32| t.load(Ordering::Relaxed) == 0 && t.compare_exchange(0, tid, Ordering::AcqRel, Ordering::Relaxed).is_ok();
        let index = match THREADS.iter().position(free) {
            Some(i) => i as u32 + 1,
            None => {
                OVERFLOW.store(true, Ordering::Release);
                u32::MAX
            }
        };
        // Store-buffering pair with the fence in `threads_to_sample`: either a grace
        // period's snapshot sees this thread, or this thread's reads of the records
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

// The one sample in flight (`quiescent` runs one grace period at a time).
static WANT: AtomicI32 = AtomicI32::new(0);
static SEQ: AtomicU64 = AtomicU64::new(0);
static ANSWERED: AtomicU64 = AtomicU64::new(0);
static PC: AtomicUsize = AtomicUsize::new(0);
static IN_HANDLER: AtomicU32 = AtomicU32::new(0);

static INSTALL: Once = Once::new();
/// The sampling handler is installed (the program had none of its own for SIGURG).
static USABLE: AtomicBool = AtomicBool::new(false);

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

/// The calling thread's id (a raw system call, see [`raw_syscall3`]).
pub(crate) fn gettid() -> i32 {
    raw_syscall3(libc::SYS_gettid, 0, 0, 0) as i32
}

/// Whether the thread `tid` of this process may still be alive: false only when the
/// kernel says the id names no thread of it (an id reused by a new thread keeps
/// looking alive: an instance it names is then reclaimed only once that one exits).
/// Async-signal-safe.
pub(crate) fn thread_alive(tid: i32) -> bool {
    let pid = raw_syscall3(libc::SYS_getpid, 0, 0, 0) as usize;
    // tgkill with signal 0 checks that the thread exists and sends nothing.
    raw_syscall3(libc::SYS_tgkill, pid, tid as usize, 0) != -(libc::ESRCH as isize)
}

extern "C" fn on_sample(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes valid siginfo and ucontext to SA_SIGINFO handlers.
    let (info, uc) = unsafe { (&*info, &*(ctx as *const libc::ucontext_t)) };
    // SAFETY: si_pid is valid for SI_TKILL (checked first).
    let ours = info.si_code == libc::SI_TKILL && unsafe { info.si_pid() } == std::process::id() as i32;
    if !ours || WANT.load(Ordering::Acquire) != gettid() {
        return; // not a sample: SIGURG's default action is to ignore it
    }
    PC.store(regs::pc(uc) as usize, Ordering::Relaxed);
    // Inside the SIGTRAP handler (`depth`), or in a site's hit path (`active`).
    IN_HANDLER.store(with_thread(|t| t.depth.get() + t.active.get() as u32), Ordering::Relaxed);
    ANSWERED.store(SEQ.load(Ordering::Relaxed), Ordering::Release);
}

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

/// What a sample found.
enum Sample {
    /// The pc the thread was at, and whether it was in the SIGTRAP handler.
    At(usize, bool),
    /// The thread has exited.
    Gone,
    /// No answer (the signal is blocked or handled by someone else).
    Silent,
}

fn sample(tid: i32) -> Sample {
    let seq = SEQ.fetch_add(1, Ordering::Relaxed) + 1;
    WANT.store(tid, Ordering::Release);
    // SAFETY: tgkill to a thread of this process; the handler is installed.
    let sent = unsafe { libc::syscall(libc::SYS_tgkill, std::process::id() as libc::c_long, tid as libc::c_long, SIGNAL as libc::c_long) };
    let result = if sent != 0 {
        Sample::Gone
    } else {
        let start = Instant::now();
        loop {
            if ANSWERED.load(Ordering::Acquire) == seq {
                break Sample::At(PC.load(Ordering::Relaxed), IN_HANDLER.load(Ordering::Relaxed) > 0);
            }
            if start.elapsed() > ANSWER {
                break Sample::Silent;
            }
            std::thread::yield_now();
        }
    };
    WANT.store(0, Ordering::Release);
    result
}

/// The threads that may be using a probe, but the calling one: those that entered the
/// SIGTRAP handler, or every thread of the process if they were too many to remember.
fn threads_to_sample() -> Vec<i32> {
    let me = gettid();
    // Pairs with the fence in `Thread::record`.
    fence(Ordering::SeqCst);
    let all: Vec<i32> = match OVERFLOW.load(Ordering::Acquire) {
        false => THREADS.iter().map(|t| t.load(Ordering::Acquire)).filter(|t| *t != 0).collect(),
        true => std::fs::read_dir("/proc/self/task").map(|d| d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect()).unwrap_or_default(),
    };
    all.into_iter().filter(|t| *t != me).collect()
}

/// What the table holds now (`__private::thread_table`).
pub(crate) fn table_state() -> crate::__private::ThreadTable {
    let taken = THREADS.iter().filter(|t| t.load(Ordering::Relaxed) != 0).count();
    crate::__private::ThreadTable { entries: MAX_THREADS, taken, fallback: OVERFLOW.load(Ordering::Relaxed) }
}

/// The code of the hit paths, outside the bookkeeping that tells a sample the thread
/// is inside one: given by the crate's top layer (which knows every mechanism's entry
/// points) through [`set_hit_path`], so that this layer depends on none of them.
static HIT_PATH: std::sync::OnceLock<fn() -> Vec<(usize, usize)>> = std::sync::OnceLock::new();

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

/// Whether every other thread is seen outside the SIGTRAP handler and outside the
/// `slots` (and the code leading into them), so that nothing can still use probes
/// disarmed before the call. Waits for threads that are inside (bounded).
pub(crate) fn quiescent(slots: &[(usize, usize)]) -> bool {
    // One sample in flight (`WANT`, `SEQ`, `ANSWERED` are shared): callers holding
    // different locks (the registry's, the return-probe stub pool's) take turns.
    static SAMPLING: Mutex<()> = Mutex::new(());
    let _one = SAMPLING.lock().unwrap_or_else(|p| p.into_inner());
    if !install() || !still_installed() {
        return false;
    }
    let busy = busy_ranges(slots);
    let deadline = Instant::now() + Duration::from_secs(1);
    for tid in threads_to_sample() {
        loop {
            match sample(tid) {
                // Exited. Its entry stays: clearing it could race with a new thread
                // given the same id recording itself, which would then go unsampled.
                Sample::Gone => break,
                Sample::Silent => return false,
                Sample::At(pc, in_handler) if !in_handler && !busy.iter().any(|(a, b)| (*a..*b).contains(&pc)) => break,
                Sample::At(..) if Instant::now() > deadline => return false,
                Sample::At(..) => std::thread::sleep(Duration::from_micros(50)),
            }
        }
    }
    true
}
