//! Sampling: a grace period signals every thread that may be using a probe and
//! collects where each was (see the parent module's docs, "Sampling in parallel").

use super::syscall::{getpid, gettid, thread_alive};
use super::table::{entries, entry, next_owner, take_entry, Entry, OVERFLOW};
use super::THREAD;
use crate::sys::regs;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

pub(super) const SIGNAL: libc::c_int = libc::SIGURG;

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

/// The `siginfo_t` a sample is queued with (`rt_tgsigqueueinfo`): the kernel's layout
/// for `SI_QUEUE` on 64-bit Linux (`_sifields._rt` after three `int`s, aligned to 8),
/// the same on x86_64 and aarch64, read back by libc's `si_pid`/`si_value`.
#[repr(C)]
pub(super) struct QueuedInfo {
    pub(super) signo: libc::c_int,
    pub(super) errno: libc::c_int,
    pub(super) code: libc::c_int,
    /// `_sifields` is aligned to 8 (it holds pointers).
    pub(super) align: libc::c_int,
    pub(super) pid: libc::pid_t,
    pub(super) uid: libc::uid_t,
    /// `sigval`: the index of the entry the sample asks through.
    pub(super) value: usize,
    pub(super) pad: [u8; 128 - 32],
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
pub(super) fn install() -> bool {
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
pub(super) struct Sampled {
    pub(super) index: usize,
    pub(super) tid: i32,
    /// The entry's owner word when the snapshot was taken (to free it if `tid` exited).
    pub(super) owner: u64,
    /// The request in flight (0: none: asked again at `again`).
    pub(super) ask: u64,
    /// When it was asked, or is to be asked again.
    pub(super) at: Instant,
}

/// What asking a thread gave.
pub(super) enum Asked {
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
    pub(super) fn gone(&self, entry: &Entry) {
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
pub(super) static SAMPLING: Mutex<u32> = Mutex::new(0);

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
