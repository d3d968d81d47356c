//! The SIGTRAP path of breakpoint probes: the signal handler, the hit path it runs
//! (aggregated probes in registration order, the out-of-line slot or a simulation,
//! post handlers, seed 004's back-up), and the x86_64 stack-exhaustion guard.

use crate::arch::insn::{self, Sim, TRAP_PC_ADVANCE};
use crate::registry::{self, call_handler, record, set_active, TRAPS};
use crate::sys::regs;
use crate::sys::signal::{chain, take_signal};
use crate::{grace, Error};
use std::cell::Cell;
use std::sync::atomic::Ordering;
use std::sync::{Once, OnceLock};

/// The SIGTRAP disposition before probekit's, for traps that are not ours.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
/// x86_64: the SIGSEGV disposition before probekit's (see `on_sigsegv`).
#[cfg(target_arch = "x86_64")]
static PREVIOUS_SEGV: OnceLock<libc::sigaction> = OnceLock::new();
static INSTALL: Once = Once::new();

thread_local! {
    /// `(address, count)` of this thread's consecutive back-ups over a breakpoint that is
    /// a probe's but was not armed when the thread looked (see `on_sigtrap`).
    static BACKUPS: Cell<(usize, u32)> = const { Cell::new((0, 0)) };
}

/// How many times in a row a thread re-runs a probe address whose breakpoint it keeps
/// meeting disarmed before it treats the breakpoint as someone else's.
const MAX_BACKUPS: u32 = 1000;

/// Installs the SIGTRAP handler on the first registration; on later ones, checks that
/// it is still installed: a handler the program installed over it would receive
/// probekit's breakpoints ([`Error::SigtrapHandlerReplaced`]).
pub(crate) fn install_handler() -> Result<(), Error> {
    let mut result = Ok(());
    INSTALL.call_once(|| {
        // SA_NODEFER: a probe hit inside a handler traps inside this signal handler;
        // a blocked synchronous SIGTRAP would kill the process instead.
        // No SA_ONSTACK: the handler runs on the thread's own stack (below the
        // x86_64 red zone, which the kernel skips). The alternate stack Rust gives
        // each thread is 8 KiB, for its stack-overflow message; a signal frame is
        // ~3.5 KiB on an AVX-512 machine, so a handler there, or a probe hit inside
        // a handler (two frames), overflowed it: measured, SIGSEGV.
        result = take_signal(libc::SIGTRAP, on_sigtrap as *const () as usize, libc::SA_RESTART | libc::SA_NODEFER, &PREVIOUS);
        // On the alternate stack, as the handler it chains to (Rust's stack-overflow
        // handler) runs: it is called when the thread's stack is exhausted.
        #[cfg(target_arch = "x86_64")]
        if result.is_ok() {
            result = take_signal(libc::SIGSEGV, on_sigsegv as *const () as usize, libc::SA_ONSTACK | libc::SA_NODEFER, &PREVIOUS_SEGV);
        }
    });
    result?;
    // SAFETY: reading a disposition only.
    let mut cur: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::sigaction(libc::SIGTRAP, std::ptr::null(), &mut cur) } != 0 {
        return Err(Error::last_os(0, "sigaction"));
    }
    match cur.sa_sigaction == on_sigtrap as *const () as usize {
        true => Ok(()),
        false => Err(Error::SigtrapHandlerReplaced { handler: cur.sa_sigaction }),
    }
}

/// The SIGTRAP handler. Async-signal-safe: atomics, a const thread-local, no locks,
/// no allocation.
pub(crate) extern "C" fn on_sigtrap(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t and ucontext_t for SA_SIGINFO handlers.
    let (code, uc) = unsafe { ((*info).si_code, &mut *(ctx as *mut libc::ucontext_t)) };
    // Grace periods see this thread as inside the hit path until `hit` is done.
    let ours = from_breakpoint(code) && {
        grace::enter();
        let before = grace::trapping((regs::pc(uc) - TRAP_PC_ADVANCE) as usize);
        let ours = hit(uc);
        grace::untrapping(before);
        grace::leave();
        ours
    };
    if !ours {
        chain(PREVIOUS.get(), sig, info, ctx);
    }
}

/// `si_code` values (asm-generic/siginfo.h): a signal the kernel raised for an
/// exception with no siginfo of its own, and a breakpoint instruction's.
#[cfg(target_arch = "x86_64")]
const SI_KERNEL: libc::c_int = 0x80;
#[cfg(target_arch = "aarch64")]
const TRAP_BRKPT: libc::c_int = 1;

/// Whether a SIGTRAP with this `si_code` came from a breakpoint instruction that can be
/// probekit's: x86_64 `int3` raises SIGTRAP with `SI_KERNEL` (do_int3_user passes no
/// siginfo), aarch64 `brk` with `TRAP_BRKPT`. A signal sent with `kill`, `raise`,
/// `tgkill` or `sigqueue` (`si_code` <= 0: SI_USER, SI_TKILL, SI_QUEUE), an x86_64
/// `icebp`, a single step or a hardware breakpoint (TRAP_BRKPT, TRAP_TRACE,
/// TRAP_HWBKPT) never is: those go to the program's handler untouched.
fn from_breakpoint(code: libc::c_int) -> bool {
    #[cfg(target_arch = "x86_64")]
    return code == SI_KERNEL;
    #[cfg(target_arch = "aarch64")]
    return code == TRAP_BRKPT;
}

/// x86_64: a probe hit on a thread with too little stack left for the SIGTRAP frame.
/// The kernel cannot deliver SIGTRAP and raises SIGSEGV instead, with the pc already
/// past the `int3`: a handler that returns (Rust's stack-overflow handler does, when
/// the fault is not in its guard page) would resume inside the displaced instruction
/// and compute a wrong result. So the pc is put back on the breakpoint and the process
/// is told why it dies: the breakpoint traps again, the frame fails again, and the
/// kernel kills the process with SIGSEGV, a crash anyone can see. (aarch64 `brk`
/// leaves the pc on itself, so there the second attempt happens by itself.)
#[cfg(target_arch = "x86_64")]
pub(crate) extern "C" fn on_sigsegv(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t and ucontext_t for SA_SIGINFO handlers.
    let (code, uc) = unsafe { ((*info).si_code, &mut *(ctx as *mut libc::ucontext_t)) };
    let pc = regs::pc(uc) as usize;
    let bp = pc.wrapping_sub(TRAP_PC_ADVANCE as usize);
    // Only records are read (no text, which may be what faulted).
    let at_ours = || crate::site::patch::poking(bp) || registry::armed_at(bp).next().is_some() || TRAPS.head(pc) != 0;
    // The trap number tells a failed SIGTRAP frame (the #BP the kernel was delivering,
    // 3) from a general-protection fault (13) right after a 1-byte probed instruction.
    let trapno = uc.uc_mcontext.gregs[libc::REG_TRAPNO as usize];
    if code == SI_KERNEL && trapno == 3 && at_ours() {
        let msg = b"probekit: a thread hit a probe with too little stack left for the signal frame (a breakpoint hit needs about 4 KiB below the stack pointer): killed by SIGSEGV\n";
        // SAFETY: write(2) of a static buffer.
        unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
        regs::set_pc(uc, bp as u64);
        // Default action from now on: the next attempt kills the process.
        if let Some(prev) = PREVIOUS_SEGV.get() {
            let mut dfl = *prev;
            dfl.sa_sigaction = libc::SIG_DFL;
            // SAFETY: sigaction is async-signal-safe; `dfl` is a valid disposition.
            unsafe { libc::sigaction(sig, &dfl, std::ptr::null_mut()) };
        }
        return;
    }
    chain(PREVIOUS_SEGV.get(), sig, info, ctx);
}

/// Handles a trap at `uc`'s pc if it is probekit's: false if it is not.
pub(crate) fn hit(uc: &mut libc::ucontext_t) -> bool {
    let bp = (regs::pc(uc) - TRAP_PC_ADVANCE) as usize;
    if crate::site::patch::poking(bp) {
        // A site's temporary int3 while it is patched: on past the site, as if its nop ran.
        regs::set_pc(uc, (bp + crate::site::table::SITE_LEN) as u64);
        return true;
    }
    // A detour block's resume breakpoint: a handler of an optimized probe moved the pc
    // or the stack pointer, which only a trap can set with every other register as is.
    if crate::optprobe::resume_trap(bp, uc) {
        return true;
    }

    // Every probe armed at this address, in registration order (aggregation).
    // Found through the address's chain, not a scan: as fast with 100,000 probes as with one.
    let at_bp = || registry::armed_at(bp).filter(|e| !e.site.load(Ordering::Relaxed));
    if let Some(first) = at_bp().next() {
        BACKUPS.set((0, 0));
        let active = grace::with_thread(|t| t.active.get());
        for e in at_bp() {
            if active {
                // Hit inside a handler: count it, execute the instruction, no handlers.
                e.nmissed.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            e.nhit.fetch_add(1, Ordering::Relaxed);
            let pre = e.pre.load(Ordering::Relaxed);
            if pre != 0 {
                let mut r = regs::read(uc, bp as u64);
                set_active(true);
                call_handler(pre, e.ctx.load(Ordering::Relaxed), &mut r);
                set_active(false);
                regs::write(uc, &r);
                if r.instruction_pointer() != bp as u64 {
                    return true; // the handler redirected execution: the instruction is skipped
                }
            }
        }
        // The address is optimized, or being optimized or unoptimized (this breakpoint
        // is the jump's first byte meanwhile): on to the detour's relocated copy of the
        // displaced instructions, past the range the jump covers (the kernel's
        // `setup_detour_execution`), never into it.
        if let Some(copy) = at_bp().map(|e| e.detour.load(Ordering::Acquire)).find(|d| *d != 0) {
            regs::set_pc(uc, copy as u64);
            return true;
        }
        let sim = Sim { kind: first.sim_kind.load(Ordering::Relaxed), a: first.sim_a.load(Ordering::Relaxed), b: first.sim_b.load(Ordering::Relaxed) };
        if sim.kind == 0 {
            // Out of line: through a slot that ends in a breakpoint if any probe here has
            // a post handler (its own slot does), else through any (boosted) slot.
            let e = at_bp().find(|e| e.post.load(Ordering::Relaxed) != 0 && e.resume_trap.load(Ordering::Relaxed) != 0).unwrap_or(first);
            regs::set_pc(uc, e.slot.load(Ordering::Relaxed) as u64);
            return true;
        }
        // Simulated: its effect is applied here, then the post handlers see the result.
        insn::simulate(sim, bp, first.next.load(Ordering::Relaxed) - bp, uc);
        if !active {
            run_posts(bp, uc);
        }
        return true;
    }
    let pc = regs::pc(uc) as usize;
    let trap = (TRAPS.head(pc) as usize).checked_sub(1).map(record);
    if let Some(e) = trap.filter(|e| e.resume_trap.load(Ordering::Acquire) == pc) {
        let next = e.next.load(Ordering::Relaxed) as u64;
        regs::set_pc(uc, next);
        if !grace::with_thread(|t| t.active.get()) {
            run_posts(e.target.load(Ordering::Relaxed), uc);
        }
        return true;
    }
    // Not armed now, at an address that is or was probed. If the text is no breakpoint
    // any more, ours was removed after this thread hit it: back up and run the original
    // instruction (seed 004). If it is a breakpoint, a disarm and re-arm raced with this
    // lookup (the breakpoint is written after the record is armed, and removed before
    // it is disarmed, but the two reads here are not one): back up too, and the next
    // trap finds it armed, or the text restored. A trap at an address probekit never
    // probed (the program's own `int3`), or one that stays unarmed, is passed on: the
    // pc is never moved for a trap that is not probekit's.
    // A scan, but only on this path: a trap probekit did not find armed.
    let ours_once = registry::records().any(|(_, e)| e.target.load(Ordering::Relaxed) == bp);
    if ours_once && (!insn::is_breakpoint_at(bp) || backup_again(bp)) {
        regs::set_pc(uc, bp as u64);
        return true;
    }
    false
}

/// Runs the post handlers of the probes armed at `target`, in registration order, on
/// the context after the instruction (its pc is where execution continues).
fn run_posts(target: usize, uc: &mut libc::ucontext_t) {
    for e in registry::armed_at(target) {
        let post = e.post.load(Ordering::Relaxed);
        if post != 0 {
            let mut r = regs::read(uc, regs::pc(uc));
            set_active(true);
            call_handler(post, e.post_ctx.load(Ordering::Relaxed), &mut r);
            set_active(false);
            regs::write(uc, &r);
        }
    }
}

/// Counts a back-up over `bp` on this thread; false once there were too many in a row.
fn backup_again(bp: usize) -> bool {
    let (at, n) = BACKUPS.get();
    let n = if at == bp { n + 1 } else { 1 };
    BACKUPS.set((bp, n));
    n <= MAX_BACKUPS
}
